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
//! model's language, each sample's prompt taken in turn (BENCHMARKS.md, "Session size"). The
//! samples of a step share one noised picture, and the student's error in the differences
//! between its predictions, which guidance multiplies, counts more than the error they share.

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

/// [`Distillation::difference_weight`] unless the job or the model's folder names another:
/// the error in the differences counts 32 times. The built-in model's edits multiply the edit
/// prompt's difference from the baseline by 12 and the baseline's from the empty prompt by 3,
/// so an error there moves an edit some 10 times as much as an error all prompts share (100
/// times in squared error); 31 still leaves the shared error a say. Measured in BENCHMARKS.md,
/// "Session size".
pub const DEFAULT_DIFFERENCE_WEIGHT: f64 = 31.0;

/// How a tune stored in a coarse grid is distilled into it, recorded in the session.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Distillation {
    /// Steps of the tune's batch size; 0 rounds the tuned delta to the grid as it is.
    pub steps: usize,
    pub learning_rate: f64,
    /// Prompts beside the token and the empty one; each is distilled after the token.
    pub prompts: Vec<String>,
    /// How much more the student's error in the differences between its predictions under
    /// the step's prompts counts than its error in each prediction: guidance multiplies those
    /// differences (by up to 12 with the built-in model's prompt guidance), so an error there
    /// moves an edit more than an error all prompts share. Above 0, a step's samples share
    /// their noised latents so that the differences compare like with like. Sessions from
    /// before it existed were distilled with 0.
    #[serde(default)]
    pub difference_weight: f64,
}

/// What the student is matched to: the tuned weights, and the prompts' text embeddings.
pub(super) struct Teacher {
    /// Each trainable var with its tuned weight in f32.
    weights: Vec<Weight>,
    /// The grid's steps each side of zero.
    pub(super) levels: i32,
    /// [`Distillation::difference_weight`].
    pub(super) difference_weight: f64,
    /// [1, 77, d] each: the token, "", then "token prompt" for each prompt.
    texts: Vec<Tensor>,
}

impl Teacher {
    pub(super) fn new(
        sd: &StableDiffusion,
        weights: Vec<Weight>,
        levels: i32,
        token: &str,
        distillation: &Distillation,
    ) -> Result<Self> {
        let mut all = vec![token.to_string(), String::new()];
        all.extend(distillation.prompts.iter().map(|p| format!("{token} {p}")));
        let texts = all
            .iter()
            .map(|p| Ok(sd.encode_prompt(p)?.0.detach()))
            .collect::<Result<_>>()?;
        Ok(Self {
            weights,
            levels,
            difference_weight: distillation.difference_weight,
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

    /// The step's noised latents `(noisy, t)` as the student and the teacher see them: with a
    /// difference weight, every sample takes the first one's, so the batch holds one noised
    /// picture under several prompts.
    pub(super) fn inputs(&self, (noisy, t): (Tensor, Tensor)) -> Result<(Tensor, Tensor)> {
        if self.difference_weight == 0.0 {
            return Ok((noisy, t));
        }
        let b = noisy.dim(0)?;
        Ok((
            noisy.narrow(0, 0, 1)?.repeat((b, 1, 1, 1))?,
            t.narrow(0, 0, 1)?.repeat(b)?,
        ))
    }
}

/// The student's loss for its error `error` (`[b, ...]`, student minus teacher, f32): the mean
/// squared error plus `difference_weight` times that of the error's deviation from its batch
/// mean, which is what the differences between the samples' predictions get wrong.
pub(super) fn loss(error: &Tensor, difference_weight: f64) -> Result<Tensor> {
    let mse = error.sqr()?.mean_all()?;
    if difference_weight == 0.0 {
        return Ok(mse);
    }
    let deviation = error.broadcast_sub(&error.mean_keepdim(0)?)?;
    Ok((mse + (deviation.sqr()?.mean_all()? * difference_weight)?)?)
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor, Var};

    use super::loss;

    /// Two samples' errors (1, 3) and (3, 1): mean square 5, batch mean (2, 2), deviations
    /// ±(1, -1) of mean square 1. The error all samples share costs the same at any weight;
    /// the part that differs between them costs `1 + weight` times as much, and its gradient
    /// flows (the loss takes only ops with a backward).
    #[test]
    fn the_difference_weight_counts_what_differs_between_prompts() {
        let error = Var::new(&[[1f32, 3.], [3., 1.]], &Device::Cpu).unwrap();
        for (weight, expected) in [(0.0, 5.0), (3.0, 8.0)] {
            let l = loss(error.as_tensor(), weight).unwrap();
            assert_eq!(l.to_scalar::<f32>().unwrap(), expected);
        }
        let shared = Tensor::new(&[[2f32, 2.], [2., 2.]], &Device::Cpu).unwrap();
        let l = loss(&shared, 3.0).unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(l, 4.0);
        // d/de of mean(e²) + 3 mean((e - ē)²) over 4 values: e/2 + 3 (e - ē)/2.
        let grads = loss(error.as_tensor(), 3.0).unwrap().backward().unwrap();
        let g = grads.get(&error).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(g, vec![vec![-1.0, 3.0], vec![3.0, -1.0]]);
    }
}
