//! The distillation of a finished tune into the coarse grid its session is stored in (`q2`-`q4`,
//! [`crate::session::DeltaEncoding`]).
//!
//! Rounding a tune's delta to a ±1 grid after the fact loses a third of its norm and the picture
//! with it. Training through the grid on the tune's own loss gives the picture back, but that
//! loss sees the token alone, while edits sample the model under other prompts ("*token* *edit
//! prompt*", the base picture's caption, the empty prompt), where the rounded model strays from
//! the tuned one. So after the tune a student, the base weights plus a delta on the grid
//! (trained through it with the straight-through estimator, starting from the tuned delta),
//! learns to predict what the tuned model (the teacher) predicts on the picture's noised latents
//! under the token, the empty prompt and "*token* *prompt*" for each of a few prompts in the
//! model's language, each sample's prompt taken in turn (BENCHMARKS.md, "Session size").

use candle_core::Tensor;

use super::tune::Weight;
use crate::pipelines::StableDiffusion;
use crate::Result;

/// Prompts for models whose folder names none (`unitune.json`): a few captions in Stable
/// Diffusion's language, of other pictures than the one tuned.
pub const DEFAULT_PROMPTS: [&str; 2] = [
    "a photo of a dog on a city street",
    "an oil painting of a house by a lake",
];

/// How a tune stored in a coarse grid is distilled into it, recorded in the session.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Distillation {
    /// Steps of the tune's batch size; 0 rounds the tuned delta to the grid as it is.
    pub steps: usize,
    pub learning_rate: f64,
    /// Prompts beside the token and the empty one; each is distilled after the token.
    pub prompts: Vec<String>,
}

/// What the student is matched to: the tuned weights, and the prompts' text embeddings.
pub(super) struct Teacher {
    /// Each trainable var with its tuned weight in f32.
    weights: Vec<Weight>,
    /// The grid's steps each side of zero.
    pub(super) levels: i32,
    /// [1, 77, d] each: the token, "", then "token prompt" for each prompt.
    texts: Vec<Tensor>,
}

impl Teacher {
    pub(super) fn new(
        sd: &StableDiffusion,
        weights: Vec<Weight>,
        levels: i32,
        token: &str,
        prompts: &[String],
    ) -> Result<Self> {
        let mut all = vec![token.to_string(), String::new()];
        all.extend(prompts.iter().map(|p| format!("{token} {p}")));
        let texts = all
            .iter()
            .map(|p| Ok(sd.encode_prompt(p)?.0.detach()))
            .collect::<Result<_>>()?;
        Ok(Self {
            weights,
            levels,
            texts,
        })
    }

    /// The text embeddings of distillation step `step` (0-based) with `batch` samples: the
    /// prompts in turn, across steps.
    pub(super) fn text(&self, step: usize, batch: usize) -> Result<Tensor> {
        let n = self.texts.len();
        let texts: Vec<&Tensor> = (0..batch)
            .map(|i| &self.texts[(step * batch + i) % n])
            .collect();
        Ok(Tensor::cat(&texts, 0)?)
    }

    /// The tuned model's prediction; leaves the vars holding the tuned weights.
    pub(super) fn predict(
        &self,
        sd: &StableDiffusion,
        noisy: &Tensor,
        t: &Tensor,
        text: &Tensor,
    ) -> Result<Tensor> {
        for (_, var, weight) in &self.weights {
            var.set(&weight.to_dtype(var.dtype())?)?;
        }
        Ok(sd.unet.forward(noisy, t, text)?.detach())
    }
}
