//! UniTune's tuning stage: fine-tune the UNet on (image, "token") pairs so that the token comes to
//! mean this one image. As in the paper: batch 4, 128 steps, Adafactor at a fixed lr of 1e-4, text
//! encoder (and VAE) frozen, most UNet layers trained; no prior-preservation loss.
//!
//! One step, as diffusers' DreamBooth script: the image's latent mean (times the VAE scaling
//! factor) repeated to the batch, per-sample noise and timesteps drawn uniformly from the training
//! schedule, the target chosen by `prediction_type`, an MSE loss, backward, optimizer step
//! (tests/tune.rs checks it against diffusers and transformers' Adafactor).
//!
//! When the session is stored in a coarse grid (`q2`-`q4`, [`DeltaEncoding`]), the tune is
//! followed by its distillation into that grid ([`super::distill`]): the file then holds the
//! distilled weights exactly, instead of the tuned ones rounded after the fact.
//!
//! A `lora` tune ([`TrainableLayers::Lora`]) trains the two factors of each weight's change
//! instead of the weight ([`super::lora`]); the session then holds deltas of that rank.
//!
//! To tune in less memory, turn on the UNet's gradient checkpointing before building the [`Tuner`]
//! (`sd.unet.set_gradient_checkpointing(true)`): the same updates, for about a third of the step's
//! activation memory and some more compute. A model loaded in f16 or bf16 is tuned with f32
//! master weights ([`super::master`]).

use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::Arc;

use candle_core::{DType, Tensor};
use image::RgbImage;
use rand::{Rng, SeedableRng};

use super::distill::{self, Distillation, Teacher};
use super::lora::LoraFactors;
use super::master::MasterWeights;
use super::{OptimizerKind, TrainOptimizer};
use crate::models::unet::CheckpointGrads;
use crate::noise::Noise;
use crate::pipelines::{Progress, StableDiffusion};
use crate::schedulers::{NoiseSchedule, PredictionType};
use crate::session::{codec, fingerprint, DeltaEncoding, Session};
use crate::tokenizer::ClipTokenizer;
use crate::weights::TrainableFilter;
use crate::{Error, Result};

/// Made-up words tried in order for the default token (the first is the paper's).
const TOKEN_CANDIDATES: [&str; 3] = ["beikkpic", "qlomvtex", "zwerpikd"];

/// Which UNet tensors the tune changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TrainableLayers {
    /// Every UNet tensor except normalisation scales/shifts and the timestep embedding MLP
    /// (about 99.9% of the weights): the paper's "most layers".
    #[default]
    Most,
    All,
    /// The transformer blocks only (self- and cross-attention, feed-forward, projections).
    Attention,
    /// The cross-attention layers (`attn2`) only: the smallest, text-facing part.
    CrossAttention,
    /// A LoRA of rank [`TuneSettings::lora_rank`] on every matrix and convolution weight that
    /// `most` tunes ([`super::lora`]): the delta is stored as its two factors.
    Lora,
}

impl FromStr for TrainableLayers {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "most" => Ok(Self::Most),
            "all" => Ok(Self::All),
            "attention" => Ok(Self::Attention),
            "cross-attention" => Ok(Self::CrossAttention),
            "lora" => Ok(Self::Lora),
            _ => Err(Error::argument(
                "layers",
                format!("`{s}` is not one of: most, all, attention, cross-attention, lora"),
            )),
        }
    }
}

impl TrainableLayers {
    /// Whether the UNet tensor `name` (diffusers' naming) is tuned.
    pub fn includes(self, name: &str) -> bool {
        match self {
            Self::All => true,
            Self::Most => {
                !name.starts_with("time_embedding.")
                    && !name.split('.').any(|part| part.contains("norm"))
            }
            Self::Attention => name.contains(".attentions."),
            Self::CrossAttention => name.contains(".attn2."),
            // Biases and other vectors have no low-rank form; they stay as they are.
            Self::Lora => Self::Most.includes(name) && name.ends_with(".weight"),
        }
    }

    pub fn filter(self) -> TrainableFilter {
        Arc::new(move |name: &str| self.includes(name))
    }
}

/// Everything that decides a tune, recorded in the session (as JSON, these field names).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TuneSettings {
    pub token: String,
    pub steps: usize,
    pub batch_size: usize,
    pub learning_rate: f64,
    pub optimizer: OptimizerKind,
    pub layers: TrainableLayers,
    pub seed: u64,
    /// How the session will be stored; a coarse grid is distilled into after the tune.
    /// Sessions written before this setting had none: the default then, q8.
    #[serde(default)]
    pub delta_encoding: DeltaEncoding,
    /// The distillation into a coarse `delta_encoding`; `None` for the other codes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distillation: Option<Distillation>,
    /// The rank of a `lora` tune; `None` for the others.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora_rank: Option<usize>,
}

impl TuneSettings {
    /// The paper's settings with the given token and seed.
    pub fn new(token: impl Into<String>, seed: u64) -> Self {
        Self {
            token: token.into(),
            steps: 128,
            batch_size: 4,
            learning_rate: 1e-4,
            optimizer: OptimizerKind::Adafactor,
            layers: TrainableLayers::Most,
            seed,
            delta_encoding: DeltaEncoding::default(),
            distillation: None,
            lora_rank: None,
        }
    }

    /// Whether the layers, the LoRA rank and the session's code go together.
    pub fn check(&self) -> Result<()> {
        let lora = self.layers == TrainableLayers::Lora;
        match (lora, self.lora_rank) {
            (true, None | Some(0)) => {
                return Err(Error::argument(
                    "lora-rank",
                    "a lora tune needs a rank of at least 1",
                ))
            }
            (false, Some(_)) => {
                return Err(Error::argument(
                    "lora-rank",
                    "only a tune with layers `lora` has a rank",
                ))
            }
            _ => {}
        }
        if lora && self.delta_encoding.coarse_levels().is_some() {
            return Err(Error::argument(
                "delta-encoding",
                format!(
                    "{} holds whole-weight deltas distilled into a grid; a lora tune stores its factors (lora)",
                    self.delta_encoding
                ),
            ));
        }
        let coarse = self.delta_encoding.coarse_levels().is_some();
        match (coarse, &self.distillation) {
            (true, None) => {
                return Err(Error::argument(
                    "delta-encoding",
                    format!("{} needs a distillation into its grid", self.delta_encoding),
                ))
            }
            (false, Some(_)) => {
                return Err(Error::argument(
                    "distill-steps",
                    format!(
                        "only a coarse code (q2-q4) is distilled into, not {}",
                        self.delta_encoding
                    ),
                ))
            }
            _ => {}
        }
        if !lora && self.delta_encoding == DeltaEncoding::Lora {
            return Err(Error::argument(
                "delta-encoding",
                "lora stores the factors of a lora tune (layers `lora`); `unitune export --format lora` approximates other tunes",
            ));
        }
        Ok(())
    }
}

/// The default rare token for `tokenizer`: the first candidate that the tokenizer splits into
/// several pieces, i.e. that is no word of its vocabulary and so carries no meaning of its own.
pub fn default_token(tokenizer: &ClipTokenizer) -> String {
    TOKEN_CANDIDATES
        .iter()
        .find(|t| tokenizer.tokenize(t).len() >= 2)
        .unwrap_or(&TOKEN_CANDIDATES[0])
        .to_string()
}

/// Why `token` is a poor choice, if it is: one vocabulary entry is a word the model already
/// knows, and tuning would overwrite that meaning.
pub fn token_warning(tokenizer: &ClipTokenizer, token: &str) -> Option<String> {
    let pieces = tokenizer.tokenize(token);
    match pieces.len() {
        0 => Some("the token is empty after normalisation".into()),
        1 => Some(format!(
            "`{token}` is a single word of the model's vocabulary, so it already means something; a made-up word such as `{}` binds more cleanly",
            default_token(tokenizer)
        )),
        _ => None,
    }
}

/// The noise and timesteps of one step, drawn by [`Tuner::step`] or given by a test.
pub struct StepInputs {
    /// [b, c, h, w]
    pub noise: Tensor,
    /// [b] u32, each in 0..num_train_timesteps.
    pub timesteps: Tensor,
}

/// A tune in progress: the frozen inputs (latents, text embedding), the optimizer, the RNG.
pub struct Tuner<'a> {
    sd: &'a StableDiffusion,
    settings: TuneSettings,
    schedule: NoiseSchedule,
    /// [b, c, h, w]: the image's latents, repeated.
    latents: Tensor,
    /// [b, 77, d]: the token's embedding, repeated.
    text: Tensor,
    optimizer: TrainOptimizer,
    /// f32 copies of half-precision trainable weights, which the optimizer updates (or, in a
    /// LoRA tune, sets from the factors).
    master: Option<MasterWeights>,
    /// The trained factors of a LoRA tune.
    lora: Option<LoraFactors>,
    timestep_rng: rand_chacha::ChaCha8Rng,
    /// Steps taken so far, the distillation's included.
    taken: usize,
    /// The tuned model, once the distillation has begun.
    teacher: Option<Teacher>,
}

impl<'a> Tuner<'a> {
    /// `sd` must have been loaded with a trainable filter (`LoadOptions::trainable`); `image` is
    /// `[1, 3, h, w]` in `[-1, 1]`. The optimizer is `settings.optimizer` with its defaults.
    pub fn new(sd: &'a StableDiffusion, image: &Tensor, settings: TuneSettings) -> Result<Self> {
        let (kind, lr) = (settings.optimizer, settings.learning_rate);
        Self::with_optimizer(sd, image, settings, |vars| kind.build(vars, lr))
    }

    /// As [`Tuner::new`] with an optimizer that `build` makes over the vars to update (`sd`'s
    /// trainable vars, or their f32 master copies), e.g. an Adafactor with transformers'
    /// factoring to compare with PyTorch. Its kind and learning rate must be the ones `settings`
    /// records.
    pub fn with_optimizer(
        sd: &'a StableDiffusion,
        image: &Tensor,
        settings: TuneSettings,
        build: impl FnOnce(Vec<candle_core::Var>) -> Result<TrainOptimizer>,
    ) -> Result<Self> {
        if settings.steps == 0 || settings.batch_size == 0 {
            return Err(Error::argument("steps/batch", "must be at least 1"));
        }
        settings.check()?;
        let vars = trainable_vars(sd)?;
        let master = MasterWeights::new(&vars)?;
        let lora = match settings.lora_rank {
            Some(rank) => Some(LoraFactors::new(
                &sd.unet_store.trainable_vars(),
                sd.unet_store.tensors(),
                rank,
                settings.seed,
            )?),
            None => None,
        };
        let optimizer = build(match (&lora, &master) {
            (Some(lora), _) => lora.vars(),
            (None, Some(master)) => master.masters(),
            (None, None) => vars,
        })?;
        let kind_matches = matches!(
            (settings.optimizer, &optimizer),
            (OptimizerKind::Adafactor, TrainOptimizer::Adafactor(_))
                | (OptimizerKind::AdamW, TrainOptimizer::AdamW(_))
        );
        if !kind_matches || optimizer.learning_rate() != settings.learning_rate {
            return Err(Error::argument(
                "optimizer",
                format!(
                    "settings say {} at lr {}, the optimizer given differs",
                    settings.optimizer, settings.learning_rate
                ),
            ));
        }
        let b = settings.batch_size;
        let posterior = sd.vae.encode(&image.to_dtype(sd.dtype)?)?;
        let latents = sd
            .scale_latents(&posterior.mean)?
            .detach()
            .repeat((b, 1, 1, 1))?;
        let (text, _) = sd.encode_prompt(&settings.token)?;
        let text = text.detach().repeat((b, 1, 1))?;
        Ok(Self {
            sd,
            schedule: NoiseSchedule::new(&sd.scheduler_config)?,
            latents,
            text,
            optimizer,
            master,
            lora,
            timestep_rng: rand_chacha::ChaCha8Rng::seed_from_u64(settings.seed ^ 0x5eed_7153),
            settings,
            taken: 0,
            teacher: None,
        })
    }

    /// Draws a step's noise and per-sample timesteps.
    pub fn draw_inputs(&mut self, noise: &mut Noise) -> Result<StepInputs> {
        let n = self.schedule.num_train_timesteps() as u32;
        let timesteps: Vec<u32> = (0..self.settings.batch_size)
            .map(|_| self.timestep_rng.gen_range(0..n))
            .collect();
        Ok(StepInputs {
            noise: noise
                .randn(self.latents.shape(), self.latents.device())?
                .to_dtype(self.latents.dtype())?,
            timesteps: Tensor::new(timesteps, self.latents.device())?,
        })
    }

    /// The training loss for given inputs (no update).
    pub fn loss(&self, inputs: &StepInputs) -> Result<Tensor> {
        let target = self.target(inputs)?;
        Ok(self
            .forward_loss(&self.noised(inputs)?, &self.text, &target, None)?
            .0)
    }

    /// The tune's target: what the model is trained to predict, by `prediction_type`.
    fn target(&self, inputs: &StepInputs) -> Result<Tensor> {
        Ok(match self.sd.scheduler_config.prediction_type {
            PredictionType::Epsilon => inputs.noise.clone(),
            PredictionType::VPrediction => {
                self.schedule
                    .get_velocity(&self.latents, &inputs.noise, &inputs.timesteps)?
            }
            PredictionType::Sample => self.latents.clone(),
        })
    }

    /// The loss against `target` on the noised latents with `text` (the mean squared error, or
    /// `teacher`'s distillation loss), and what back-propagates it (through checkpointed UNet
    /// units too, when the UNet has gradient checkpointing on).
    fn forward_loss(
        &self,
        (noisy, t): &(Tensor, Tensor),
        text: &Tensor,
        target: &Tensor,
        teacher: Option<&Teacher>,
    ) -> Result<(Tensor, CheckpointGrads)> {
        let (pred, grads) = self.sd.unet.forward_train(noisy, t, text)?;
        let error = (pred.to_dtype(DType::F32)? - target.to_dtype(DType::F32)?)?;
        let loss = match teacher {
            None => error.sqr()?.mean_all()?,
            Some(teacher) => distill::loss(&error, teacher.difference_weight)?,
        };
        Ok((loss, grads))
    }

    /// The step's noised latents, and its timesteps as the UNet takes them.
    fn noised(&self, inputs: &StepInputs) -> Result<(Tensor, Tensor)> {
        let noisy = self
            .schedule
            .add_noise(&self.latents, &inputs.noise, &inputs.timesteps)?;
        Ok((noisy, inputs.timesteps.to_dtype(DType::F32)?))
    }

    /// One optimisation step, of the tune or, after its `steps`, of the distillation; returns
    /// the loss before the update. With f16 weights a step whose gradients overflow is skipped
    /// ([`MasterWeights::take_grads`]).
    pub fn step(&mut self, inputs: &StepInputs) -> Result<f32> {
        if self.taken == self.settings.steps {
            self.start_distillation()?;
        }
        self.taken += 1;
        let (loss, backward, unrounded) = match &self.teacher {
            None => {
                let target = self.target(inputs)?;
                let (loss, backward) =
                    self.forward_loss(&self.noised(inputs)?, &self.text, &target, None)?;
                (loss, backward, vec![])
            }
            Some(teacher) => {
                let student = self.unrounded_weights()?;
                let text = teacher.text(
                    self.taken - 1 - self.settings.steps,
                    self.settings.batch_size,
                )?;
                let noised = teacher.inputs(self.noised(inputs)?)?;
                let target = teacher.predict(self.sd, &noised.0, &noised.1, &text)?;
                // The forward pass sees the delta on the grid; the gradient updates the
                // unrounded one (the straight-through estimator).
                set_on_grid(self.sd, &student, teacher.levels)?;
                let (loss, backward) = self.forward_loss(&noised, &text, &target, Some(teacher))?;
                let unrounded = match self.master {
                    None => student.into_iter().map(|(_, var, w)| (var, w)).collect(),
                    Some(_) => vec![],
                };
                (loss, backward, unrounded)
            }
        };
        let grads = match self.master.as_mut() {
            None => {
                let grads = backward.backward(&loss)?;
                for (var, weight) in unrounded {
                    var.set(&weight)?;
                }
                Some(grads)
            }
            Some(master) => {
                let mut grads = backward.backward(&(&loss * master.loss_scale())?)?;
                master.take_grads(&mut grads)?.then_some(grads)
            }
        };
        if let Some(mut grads) = grads {
            match &self.lora {
                None => self.optimizer.step(&grads)?,
                Some(lora) => {
                    let master = self.master.as_ref();
                    let updated = |var: &candle_core::Var| {
                        master.and_then(|m| m.master_of(var)).unwrap_or(var).clone()
                    };
                    lora.add_grads(&mut grads, updated)?;
                    self.optimizer.step(&grads)?;
                    for (var, weight) in lora.weights()? {
                        let var = updated(&var);
                        var.set(&weight.to_dtype(var.dtype())?)?;
                    }
                }
            }
            if let Some(master) = &self.master {
                master.sync()?;
            }
        }
        Ok(loss.to_scalar::<f32>()?)
    }

    /// After the tune's last step: the tuned weights become the teacher, and a fresh optimizer
    /// at the distillation's learning rate takes over the same weights.
    fn start_distillation(&mut self) -> Result<()> {
        let settings = &self.settings;
        let (Some(distillation), Some(levels)) = (
            &settings.distillation,
            settings.delta_encoding.coarse_levels(),
        ) else {
            return Ok(());
        };
        // Master weights change in place as the student trains: the teacher keeps a copy.
        let weights = (self.unrounded_weights()?.into_iter())
            .map(|(name, var, weight)| Ok((name, var, weight.copy()?)))
            .collect::<Result<_>>()?;
        self.teacher = Some(Teacher::new(
            self.sd,
            weights,
            levels,
            &settings.token,
            distillation,
        )?);
        let vars = match &self.master {
            Some(master) => master.masters(),
            None => trainable_vars(self.sd)?,
        };
        self.optimizer = settings.optimizer.build(vars, distillation.learning_rate)?;
        Ok(())
    }

    /// Every trainable var with its name and its weight as the optimizer holds it, in f32.
    fn unrounded_weights(&self) -> Result<Vec<Weight>> {
        self.sd
            .unet_store
            .trainable_vars()
            .into_iter()
            .map(|(name, var)| {
                let weight = self.unrounded(&var)?;
                Ok((name, var, weight))
            })
            .collect()
    }

    /// A trainable weight as the optimizer holds it, in f32: its master copy (the tensor
    /// itself, which the optimizer updates in place), which keeps the updates that half
    /// precision would round away, or a copy of the var itself.
    fn unrounded(&self, var: &candle_core::Var) -> Result<Tensor> {
        Ok(match self.master.as_ref().and_then(|m| m.master_of(var)) {
            Some(master) => master.as_tensor().clone(),
            None => var.as_tensor().to_dtype(DType::F32)?.copy()?,
        })
    }

    /// Steps skipped because f16 gradients overflowed (always 0 in f32 and bf16).
    pub fn skipped_steps(&self) -> usize {
        self.master.as_ref().map_or(0, MasterWeights::skipped_steps)
    }

    /// Tuned minus base of every trainable weight that changed (on the grid, for a coarse code).
    fn weight_deltas(&self) -> Result<BTreeMap<String, Tensor>> {
        let base = self.sd.unet_store.tensors();
        let mut deltas = BTreeMap::new();
        for (name, var) in self.sd.unet_store.trainable_vars() {
            let tuned = self.unrounded(&var)?;
            let base = base[&name].to_dtype(DType::F32)?;
            let delta = match self.settings.delta_encoding.coarse_levels() {
                Some(levels) => rounded_delta(&tuned, &base, levels)?,
                None => (tuned - base)?,
            };
            if delta.abs()?.max_all()?.to_scalar::<f32>()? > 0.0 {
                deltas.insert(name, delta);
            }
        }
        Ok(deltas)
    }

    /// The tuned weights as a session (deltas against the base weights) for `image`, the
    /// picture the tune saw.
    pub fn into_session(self, image: RgbImage, losses: Vec<f32>) -> Result<Session> {
        let base = self.sd.unet_store.tensors();
        let deltas = match &self.lora {
            // A LoRA's delta is the product of its factors.
            Some(lora) => lora.deltas()?.into_iter().collect(),
            None => self.weight_deltas()?,
        };
        Ok(Session {
            token: self.settings.token.clone(),
            base_fingerprint: fingerprint(base)?,
            image,
            settings: self.settings.clone(),
            losses,
            deltas,
        })
    }
}

/// A trainable var with its name and a weight for it in f32.
pub(super) type Weight = (String, candle_core::Var, Tensor);

/// Sets each var to its base weight plus the delta of `weight` on the `levels` grid.
fn set_on_grid(sd: &StableDiffusion, weights: &[Weight], levels: i32) -> Result<()> {
    let base = sd.unet_store.tensors();
    for (name, var, weight) in weights {
        let base = base[name].to_dtype(DType::F32)?;
        let rounded = (&base + rounded_delta(weight, &base, levels)?)?;
        var.set(&rounded.to_dtype(var.dtype())?)?;
    }
    Ok(())
}

/// `weight - base` on the `levels` grid (vectors as they are: [`codec::on_grid`]).
fn rounded_delta(weight: &Tensor, base: &Tensor, levels: i32) -> Result<Tensor> {
    codec::on_grid(&(weight - base)?, levels)
}

/// The UNet's trainable vars; none is an error (the model was loaded without a trainable filter,
/// or the filter matched nothing).
fn trainable_vars(sd: &StableDiffusion) -> Result<Vec<candle_core::Var>> {
    let vars: Vec<_> = sd
        .unet_store
        .trainable_vars()
        .into_iter()
        .map(|(_, v)| v)
        .collect();
    if vars.is_empty() {
        return Err(Error::argument("layers", "no UNet tensor is trainable"));
    }
    Ok(vars)
}

/// Runs a whole tune on `image` (already at the size to train at), and its distillation when
/// it has one, and returns the session. `on_step(step, loss)` is called after every step (e.g.
/// for a JSON log), the distillation's numbered on from the tune's.
pub fn tune(
    sd: &StableDiffusion,
    image: &RgbImage,
    settings: TuneSettings,
    noise: &mut Noise,
    progress: &mut dyn Progress,
    on_step: &mut dyn FnMut(usize, f32) -> Result<()>,
) -> Result<Session> {
    if let Some(warning) = token_warning(&sd.tokenizer, &settings.token) {
        progress.warn(&warning);
    }
    let pixels = crate::image_io::image_to_tensor(image, &sd.device)?;
    let phases = [
        ("tuning", settings.steps),
        (
            "distilling",
            settings.distillation.as_ref().map_or(0, |d| d.steps),
        ),
    ];
    let steps = phases[0].1 + phases[1].1;
    let mut tuner = Tuner::new(sd, &pixels, settings)?;
    let mut losses = Vec::with_capacity(steps);
    for (phase, phase_steps) in phases.into_iter().filter(|(_, n)| *n > 0) {
        progress.start(phase, phase_steps);
        for _ in 0..phase_steps {
            if progress.cancelled() {
                return Err(Error::Interrupted);
            }
            let inputs = tuner.draw_inputs(noise)?;
            let loss = tuner.step(&inputs)?;
            on_step(losses.len(), loss)?;
            losses.push(loss);
            progress.step(Some(&format!("loss {loss:.4}")));
        }
        progress.finish();
    }
    if tuner.skipped_steps() > 0 {
        progress.warn(&format!(
            "{} of {steps} steps were skipped: their f16 gradients overflowed (the loss scale backs off)",
            tuner.skipped_steps()
        ));
    }
    tuner.into_session(image.clone(), losses)
}
