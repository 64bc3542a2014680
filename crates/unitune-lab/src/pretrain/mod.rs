//! Training a small text-to-image model from scratch (`unitune pretrain`): the built-in model.
//!
//! Two phases, as Stable Diffusion was made: first the autoencoder alone ([`vae`]), then the
//! text encoder and UNet together on its frozen latents ([`denoiser`]). Optionally
//! (`decoder_steps`), the decoder alone is refined, the encoder and so the latents unchanged, as
//! Stable Diffusion's ft-MSE autoencoder was; it runs after the autoencoder phase, or is added
//! with `--resume` to a run already past it. A new run may instead take a finished autoencoder
//! from another model folder (`vae_from`) and start at the denoiser. The networks are the same
//! classes that load published checkpoints, only smaller ([`Preset`]); every weight is created
//! from the seed ([`init`]). The result is a diffusers-layout folder (written by
//! [`unitune::weights::export`]) that [`unitune::pipelines::StableDiffusion::load`] and diffusers'
//! `StableDiffusionPipeline.from_pretrained` both read, sampled with DDIM.
//!
//! Choices: AdamW (weight decay 1e-2) with linear warmup and a cosine decay to a tenth of the
//! learning rate, gradients clipped to norm 1; Stable Diffusion's scaled-linear DDPM schedule
//! (0.00085 to 0.012, 1000 steps) with epsilon prediction (as SD 1.x), min-SNR-5 loss weighting and
//! offset noise; a 32-token text context. Every step's randomness (pictures, crops, caption dropout,
//! timesteps, noise) comes from a stream of the seed keyed by phase and step, so a resumed run
//! sees exactly the data an uninterrupted one would.
//!
//! On a 2-core CPU the `small` preset's defaults take one to two hours (see
//! `models/shapes-64/README.md`); run it with `CANDLE_NUM_THREADS=1 RAYON_NUM_THREADS=1` when
//! other work competes for the cores, since candle's worker threads spin while waiting.
//!
//! Checkpoints replace the output folder atomically (written to `DIR.tmp`, then swapped in) and
//! hold the weights in f32 and `training_state.json` ([`state`]). `--resume` restores weights,
//! step counts, loss curves and the data stream, but not AdamW's moment estimates (candle's
//! AdamW does not expose them): a resumed run restarts them, and the learning-rate warmup is
//! re-run from the resumed step so the fresh estimates do not meet the full learning rate.

mod data;
mod denoiser;
mod init;
mod presets;
mod run;
mod state;
mod vae;

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Var};
use candle_nn::VarBuilder;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

pub use data::DataSource;
pub use presets::{scheduler_config, Architecture, Preset};
pub use state::{LossLog, Phase, TrainingState, STATE_FILE};
pub use vae::{VaeLosses, KL_WEIGHT};

use self::data::Dataset;
use self::denoiser::{DenoiserTrainer, LatentCache};
use self::init::SeededInit;
use self::run::Run;
use self::vae::VaeTrainer;
use unitune::models::clip::{ClipTextConfig, ClipTextModel};
use unitune::models::unet::{UNet2DConditionConfig, UNet2DConditionModel};
use unitune::models::vae::{AutoencoderKl, VaeConfig};
use unitune::pipelines::Progress;
use unitune::schedulers::SchedulerConfig;
use unitune::tokenizer::ClipTokenizer;
use unitune::weights::export::{SpecialTokenIds, Tensors, TokenizerFiles};
use unitune::weights::WeightStore;
use unitune::{atomic, Error, Result};

/// The dtype of the weights in the final folder (checkpoints are always f32).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightsDtype {
    F32,
    F16,
}

impl FromStr for WeightsDtype {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" => Ok(WeightsDtype::F32),
            "f16" => Ok(WeightsDtype::F16),
            _ => Err(Error::argument(
                "dtype",
                format!("`{s}` is not one of: f32, f16"),
            )),
        }
    }
}

impl WeightsDtype {
    fn dtype(self) -> DType {
        match self {
            WeightsDtype::F32 => DType::F32,
            WeightsDtype::F16 => DType::F16,
        }
    }
}

/// Everything that decides a pretraining run, recorded in `training_state.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PretrainSettings {
    /// Picture side in pixels.
    pub size: usize,
    pub preset: Preset,
    /// World data: the training set is scenes `0..world_scenes`, each with 1 to
    /// `world_max_objects` objects.
    pub world_scenes: usize,
    pub world_max_objects: usize,
    pub vae_steps: usize,
    pub vae_batch_size: usize,
    /// The autoencoder trains on random square crops of this side (it is convolutional, so it
    /// then works on whole pictures): a quarter of the compute at half the size. 0: whole pictures.
    pub vae_crop: usize,
    pub vae_learning_rate: f64,
    /// Steps of the decoder's refinement: the decoder alone (the encoder, so the latents, kept
    /// as they are) on whole pictures, MSE + L1, as Stable Diffusion's ft-MSE autoencoder was
    /// made ([`vae`]). It can run at any point after the autoencoder phase, even after the
    /// denoiser, since the denoiser sees only the encoder's latents.
    #[serde(default)]
    pub decoder_steps: usize,
    #[serde(default = "default_decoder_learning_rate")]
    pub decoder_learning_rate: f64,
    /// Text encoder + UNet steps.
    pub steps: usize,
    pub batch_size: usize,
    pub learning_rate: f64,
    /// Extra weight, in the denoising loss, of the latents an object touches (world data): 0
    /// weighs every latent the same; 4 makes an object's latents count five times a plain
    /// background's, which otherwise fills most of every picture and of the loss.
    #[serde(default)]
    pub object_weight: f64,
    /// Linear warmup of both phases (and after a resume).
    pub warmup_steps: usize,
    /// Share of captions replaced by the empty prompt.
    pub caption_dropout: f64,
    /// The text encoder's context (`model_max_length`), bos and eos included. 32 holds every
    /// caption of the world's grammar (at most 24 tokens) and keeps the cross-attention from
    /// being diluted by the padding that fills CLIP's 77 positions.
    pub max_tokens: usize,
    /// Scale of the per-channel constant added to the diffusion noise (offset noise; see
    /// [`denoiser`]).
    pub offset_noise: f64,
    pub max_grad_norm: f64,
    pub seed: u64,
    /// Steps between checkpoints (0: only at the end of each phase).
    pub checkpoint_every: usize,
    pub weights_dtype: WeightsDtype,
    /// A model folder whose autoencoder this run took instead of training one (its phase and
    /// the decoder's refinement are skipped): a new denoiser on a finished autoencoder.
    #[serde(default)]
    pub vae_from: Option<PathBuf>,
}

fn default_decoder_learning_rate() -> f64 {
    2e-4
}

impl PretrainSettings {
    /// The defaults for `preset`. The `small` ones are those of the built-in model, which was
    /// trained in three runs resumed one from another (`models/shapes-64/README.md`): a single
    /// run differs only in its learning-rate schedule.
    pub fn new(preset: Preset) -> Self {
        Self {
            size: 64,
            preset,
            world_scenes: 4096,
            world_max_objects: 2,
            vae_steps: 900,
            vae_batch_size: 8,
            vae_crop: 32,
            vae_learning_rate: 2e-3,
            decoder_steps: 0,
            decoder_learning_rate: default_decoder_learning_rate(),
            steps: 2800,
            batch_size: 16,
            learning_rate: 1e-3,
            object_weight: 0.0,
            warmup_steps: 50,
            caption_dropout: 0.1,
            max_tokens: 32,
            offset_noise: 0.1,
            max_grad_norm: 1.0,
            seed: 0,
            checkpoint_every: 200,
            weights_dtype: WeightsDtype::F32,
            vae_from: None,
        }
    }

    fn validate(&self) -> Result<()> {
        if self.max_tokens < 3 {
            return Err(Error::argument(
                "max-tokens",
                "must be at least 3 (bos, a token, eos)",
            ));
        }
        // A run on an imported autoencoder trains none: its vae_steps are the import's (0 for
        // a folder that is no pretraining run).
        let vae_steps = match self.vae_from {
            Some(_) => 1,
            None => self.vae_steps,
        };
        for (name, value) in [
            ("vae-steps", vae_steps),
            ("steps", self.steps),
            ("vae-batch", self.vae_batch_size),
            ("batch", self.batch_size),
        ] {
            if value == 0 {
                return Err(Error::argument(name, "must be at least 1"));
            }
        }
        for (name, value) in [
            ("lr", self.learning_rate),
            ("vae-lr", self.vae_learning_rate),
            ("decoder-lr", self.decoder_learning_rate),
            ("max-grad-norm", self.max_grad_norm),
        ] {
            if !(value.is_finite() && value > 0.0) {
                return Err(Error::argument(
                    name,
                    format!("{value} is not a positive number"),
                ));
            }
        }
        if self.vae_crop > self.size {
            return Err(Error::argument(
                "vae-crop",
                format!(
                    "{} is larger than the pictures ({})",
                    self.vae_crop, self.size
                ),
            ));
        }
        for (name, value) in [
            ("offset-noise", self.offset_noise),
            ("object-weight", self.object_weight),
        ] {
            if !(value.is_finite() && value >= 0.0) {
                return Err(Error::argument(
                    name,
                    format!("{value} is not a number >= 0"),
                ));
            }
        }
        if !(0.0..1.0).contains(&self.caption_dropout) {
            return Err(Error::argument(
                "caption-dropout",
                format!("{} is not in [0, 1)", self.caption_dropout),
            ));
        }
        Ok(())
    }
}

/// Trains (or, with `resume`, continues training) the model into `output`; returns the final
/// state. Stops at the next step boundary when `progress` reports a cancel, after writing a
/// checkpoint, with [`Error::Interrupted`].
pub fn pretrain(
    output: &Path,
    source: &DataSource,
    settings: PretrainSettings,
    resume: bool,
    device: &Device,
    progress: &mut dyn Progress,
) -> Result<TrainingState> {
    settings.validate()?;
    atomic::recover_replace(output)?;
    let mut state = if resume {
        let saved = TrainingState::read(output)?;
        check_same_run(&saved, &settings, source)?;
        TrainingState { settings, ..saved }
    } else {
        check_unused(output)?;
        TrainingState::new(settings, source.describe())
    };
    let tokenizer_files = match resume {
        true => TokenizerFiles::read(&output.join("tokenizer"))?,
        false => world_tokenizer_files(state.settings.max_tokens)?,
    };
    let tokenizer = load_tokenizer(&tokenizer_files)?;
    let imported = match (state.settings.vae_from.clone(), resume) {
        (Some(dir), false) => Some(import_vae(&dir, &mut state)?),
        _ => None,
    };
    let s = state.settings.clone();
    let data = Dataset::open(source, s.size, s.seed, s.world_scenes, s.world_max_objects)?;
    // A resumed run takes the configs of the networks it saved.
    let mut arch = s
        .preset
        .architecture(s.size, tokenizer.vocab_size(), tokenizer.max_length())?;
    if let Some((config, _)) = &imported {
        check_latents(config, &arch.vae, &s)?;
        arch.vae = config.clone();
    } else if state.phase != Phase::Vae || state.vae_step > 0 {
        arch.vae = VaeConfig::from_file(&output.join("vae/config.json"))?;
    }
    if state.step > 0 {
        arch.text_encoder = ClipTextConfig::from_file(&output.join("text_encoder/config.json"))?;
        arch.unet = UNet2DConditionConfig::from_file(&output.join("unet/config.json"))?;
    }
    let f = arch.vae.scale_factor();
    if !s.vae_crop.is_multiple_of(f) {
        return Err(Error::argument(
            "vae-crop",
            format!(
                "{} is not a multiple of the autoencoder's factor {f}",
                s.vae_crop
            ),
        ));
    }
    let special = SpecialTokenIds {
        bos: tokenizer.bos_id(),
        eos: tokenizer.eos_id(),
        pad: tokenizer.pad_id(),
    };
    let mut run = Run::new(output, device, tokenizer_files, special, arch);
    // An imported autoencoder is written first, so that the run resumes like any other.
    if let Some((_, tensors)) = imported {
        run.write_vae_folder(&tensors, &state)?;
    }

    if state.phase == Phase::Vae {
        let new = |vb: VarBuilder| AutoencoderKl::new(vb, &run.arch.vae);
        let (vae, vars) = match state.vae_step {
            0 => fresh(s.seed, "vae", device, new)?,
            _ => load_trainable(&output.join("vae"), device, new)?,
        };
        let mut trainer = VaeTrainer::new(vae, vars, s.vae_learning_rate)?;
        run.train_vae(&mut trainer, &data, &mut state, progress)?;
    } else {
        run.vae_tensors = WeightStore::open(&output.join("vae"), None, device)?
            .tensors()
            .clone();
    }
    if state.decoder_step < s.decoder_steps {
        run.train_decoder(&data, &mut state, progress)?;
    }
    if state.phase == Phase::Done && state.step >= s.steps {
        return Ok(state);
    }

    let vae_store = WeightStore::from_tensors(output.join("vae"), run.vae_tensors.clone());
    let vae = vae_store.build(DType::F32, device, |vb| {
        AutoencoderKl::new(vb, &run.arch.vae)
    })?;
    let new_text = |vb: VarBuilder| ClipTextModel::new(vb, &run.arch.text_encoder);
    let new_unet = |vb: VarBuilder| UNet2DConditionModel::new(vb, &run.arch.unet);
    let ((text_encoder, text_vars), (unet, unet_vars)) = if state.step == 0 {
        let unet = fresh(s.seed, "unet", device, new_unet)?;
        // The UNet's output starts at zero (no noise predicted): the first loss is 1 whatever
        // the scale of the initial weights.
        for (_, var) in unet
            .1
            .iter()
            .filter(|(name, _)| name.starts_with("conv_out."))
        {
            var.set(&var.zeros_like()?)?;
        }
        (fresh(s.seed, "text_encoder", device, new_text)?, unet)
    } else {
        (
            load_trainable(&output.join("text_encoder"), device, new_text)?,
            load_trainable(&output.join("unet"), device, new_unet)?,
        )
    };
    let scaling = run.arch.vae.scaling_factor;
    // A resumed run keeps the schedule and prediction type it was started with.
    let scheduler = match state.step {
        0 => scheduler_config(),
        _ => SchedulerConfig::from_file(&output.join("scheduler/scheduler_config.json"))?,
    };
    let mut trainer = DenoiserTrainer::new(
        text_encoder,
        text_vars,
        unet,
        unet_vars,
        &scheduler,
        scaling,
        s.learning_rate,
    )?;
    let cache = LatentCache::build(
        &vae,
        &tokenizer,
        &data,
        s.batch_size,
        s.object_weight,
        device,
    )?;
    if cache.truncated > 0 {
        progress.warn(&format!(
            "{} of {} captions are longer than {} tokens and were cut short (raise --max-tokens)",
            cache.truncated,
            cache.len(),
            tokenizer.max_length()
        ));
    }
    run.train_denoiser(&mut trainer, &cache, &mut state, progress)?;
    Ok(state)
}

/// The autoencoder of the model folder `dir` (`vae_from`), its config and weights. The new run
/// starts past both autoencoder phases with that one's curves and step counts, when `dir` is a
/// pretraining folder, so that its `training_state.json` tells the whole history.
fn import_vae(dir: &Path, state: &mut TrainingState) -> Result<(VaeConfig, Tensors)> {
    let config = VaeConfig::from_file(&dir.join("vae/config.json"))?;
    let tensors = WeightStore::open(&dir.join("vae"), None, &Device::Cpu)?
        .tensors()
        .clone();
    if dir.join(STATE_FILE).is_file() {
        let source = TrainingState::read(dir)?;
        if source.phase == Phase::Vae {
            return Err(Error::argument(
                "vae-from",
                format!(
                    "{}'s autoencoder is still in training (step {} of {})",
                    dir.display(),
                    source.vae_step,
                    source.settings.vae_steps
                ),
            ));
        }
        state.vae_step = source.vae_step;
        state.decoder_step = source.decoder_step;
        (state.vae_loss, state.vae_l1, state.vae_kl) =
            (source.vae_loss, source.vae_l1, source.vae_kl);
        state.decoder_loss = source.decoder_loss;
        (state.vae_seconds, state.decoder_seconds) = (source.vae_seconds, source.decoder_seconds);
        state.latent_mean = source.latent_mean;
    } else {
        state.vae_step = 0;
        state.decoder_step = 0;
    }
    let s = &mut state.settings;
    (s.vae_steps, s.decoder_steps) = (state.vae_step, state.decoder_step);
    state.scaling_factor = Some(config.scaling_factor);
    state.phase = Phase::Denoiser;
    Ok((config, tensors))
}

/// The UNet is made for the preset's latents: the imported autoencoder must make the same.
fn check_latents(imported: &VaeConfig, preset: &VaeConfig, s: &PretrainSettings) -> Result<()> {
    let shape = |c: &VaeConfig| (c.latent_channels, c.scale_factor());
    if shape(imported) != shape(preset) {
        let from = s.vae_from.as_deref().unwrap_or(Path::new("")).display();
        return Err(Error::argument(
            "vae-from",
            format!(
                "{from}'s autoencoder makes {} latent channels at 1/{} of the picture; preset {:?} needs {} at 1/{}",
                imported.latent_channels,
                imported.scale_factor(),
                s.preset,
                preset.latent_channels,
                preset.scale_factor()
            ),
        ));
    }
    Ok(())
}

/// A network built from scratch with weights from the seed, and its trainable vars.
fn fresh<M>(
    seed: u64,
    network: &str,
    device: &Device,
    new: impl FnOnce(VarBuilder<'static>) -> candle_core::Result<M>,
) -> Result<(M, Vec<(String, Var)>)> {
    let init = Arc::new(SeededInit::new(seed, network));
    let model = new(init.var_builder(device))?;
    Ok((model, init.vars()))
}

/// A network built from the checkpoint folder `dir` with every tensor trainable.
fn load_trainable<M>(
    dir: &Path,
    device: &Device,
    new: impl FnOnce(VarBuilder<'static>) -> candle_core::Result<M>,
) -> Result<(M, Vec<(String, Var)>)> {
    let store = WeightStore::open(dir, None, device)?.with_trainable(Arc::new(|_: &str| true));
    let model = store.build(DType::F32, device, new)?;
    Ok((model, store.trainable_vars()))
}

/// The vars' current values by name (sharing storage: write them out before the next update).
fn var_tensors(vars: &[(String, Var)]) -> Tensors {
    vars.iter()
        .map(|(name, var)| (name.clone(), var.as_tensor().clone()))
        .collect()
}

/// Scales `grads` so that their global L2 norm over `vars` is at most `max_norm` (torch's
/// `clip_grad_norm_`); returns the norm before clipping.
fn clip_grad_norm(grads: &mut GradStore, vars: &[&Var], max_norm: f64) -> Result<f64> {
    let mut total = 0f64;
    for var in vars {
        if let Some(g) = grads.get(var.as_tensor()) {
            total += g
                .sqr()?
                .sum_all()?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?;
        }
    }
    let norm = total.sqrt();
    if norm > max_norm {
        let scale = max_norm / (norm + 1e-6);
        for var in vars {
            if let Some(g) = grads.remove(var.as_tensor()) {
                grads.insert(var.as_tensor(), (g * scale)?);
            }
        }
    }
    Ok(norm)
}

/// Linear warmup over `warmup` steps, then a cosine decay from `base` to `base / 10` at `total`.
fn learning_rate(base: f64, step: usize, total: usize, warmup: usize) -> f64 {
    if step < warmup {
        return base * (step + 1) as f64 / warmup as f64;
    }
    let progress = ((step - warmup) as f64 / (total.saturating_sub(warmup)).max(1) as f64).min(1.0);
    base * (0.1 + 0.45 * (1.0 + (std::f64::consts::PI * progress).cos()))
}

/// The uses of the seed's random numbers; each has one stream per step.
#[derive(Debug, Clone, Copy)]
enum Stream {
    /// Autoencoder steps: pictures, then the latent samples' noise.
    Vae = 1,
    /// Denoiser steps' discrete draws: pictures, caption dropout, timesteps.
    Draws = 2,
    /// Denoiser steps' Gaussian noise.
    Noise = 3,
    /// Decoder refinement steps: pictures.
    Decoder = 4,
}

/// The random numbers of `step` for `stream`.
fn step_rng(seed: u64, stream: Stream, step: usize) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(((stream as u64) << 48) | step as u64);
    rng
}

/// A resumed run must train the same networks on the same data.
fn check_same_run(
    saved: &TrainingState,
    settings: &PretrainSettings,
    source: &DataSource,
) -> Result<()> {
    let s = &saved.settings;
    let fields = [
        ("size", s.size.to_string(), settings.size.to_string()),
        (
            "preset",
            format!("{:?}", s.preset),
            format!("{:?}", settings.preset),
        ),
        ("seed", s.seed.to_string(), settings.seed.to_string()),
        (
            "world-scenes",
            s.world_scenes.to_string(),
            settings.world_scenes.to_string(),
        ),
        (
            "world-max-objects",
            s.world_max_objects.to_string(),
            settings.world_max_objects.to_string(),
        ),
        ("data", saved.data.clone(), source.describe()),
    ];
    for (name, was, now) in fields {
        if was != now {
            return Err(Error::argument(
                name,
                format!("the run being resumed used {was}, not {now}"),
            ));
        }
    }
    if saved.phase != Phase::Vae && settings.vae_steps > saved.vae_step {
        return Err(Error::argument(
            "vae-steps",
            format!("the autoencoder phase ended at step {}; it cannot be extended once the UNet has started", saved.vae_step),
        ));
    }
    Ok(())
}

/// A new run writes into a folder that does not exist or is empty.
fn check_unused(output: &Path) -> Result<()> {
    let used = std::fs::read_dir(output)
        .map(|mut d| d.next().is_some())
        .unwrap_or(false);
    if used {
        let hint = match output.join(STATE_FILE).is_file() {
            true => "pass --resume to continue its training",
            false => "choose a new folder",
        };
        return Err(Error::argument(
            "output",
            format!("{} exists and is not empty; {hint}", output.display()),
        ));
    }
    Ok(())
}

/// The world's tokenizer folder, in memory, with a context of `max_tokens` (its
/// `model_max_length`). A folder data set uses it too: its words that are not grammar words fall
/// back to byte-level tokens, which every CLIP vocabulary has.
fn world_tokenizer_files(max_tokens: usize) -> Result<TokenizerFiles> {
    let dir = scratch_dir("tokenizer");
    crate::world::write_tokenizer_files(&dir)?;
    let files = TokenizerFiles::read(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    let mut files = files?;
    for (name, bytes) in files
        .0
        .iter_mut()
        .filter(|(name, _)| name == "tokenizer_config.json")
    {
        let path = dir.join(&*name);
        let mut config: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|source| Error::Json {
                path: path.clone(),
                source,
            })?;
        config["model_max_length"] = max_tokens.into();
        *bytes = serde_json::to_vec_pretty(&config).expect("JSON values serialize");
    }
    Ok(files)
}

/// A temporary folder of its own for each call, so that runs in one process (tests) do not
/// share one.
fn scratch_dir(name: &str) -> PathBuf {
    static CALLS: AtomicUsize = AtomicUsize::new(0);
    let call = CALLS.fetch_add(1, Ordering::Relaxed);
    std::env::temp_dir().join(format!(
        "unitune-pretrain-{name}-{}-{call}",
        std::process::id()
    ))
}

/// A tokenizer from files in memory (the tokenizer reads a folder).
fn load_tokenizer(files: &TokenizerFiles) -> Result<ClipTokenizer> {
    let dir = scratch_dir("tokenizer-load");
    files.write(&dir)?;
    let tokenizer = ClipTokenizer::from_dir(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    tokenizer
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn learning_rate_warms_up_then_decays_to_a_tenth() {
        assert!((learning_rate(1.0, 0, 100, 10) - 0.1).abs() < 1e-12);
        assert!((learning_rate(1.0, 9, 100, 10) - 1.0).abs() < 1e-12);
        assert!((learning_rate(1.0, 10, 100, 10) - 1.0).abs() < 1e-12);
        assert!((learning_rate(1.0, 55, 100, 10) - 0.55).abs() < 1e-12);
        assert!((learning_rate(1.0, 100, 100, 10) - 0.1).abs() < 1e-12);
        assert!((learning_rate(1.0, 500, 100, 10) - 0.1).abs() < 1e-12);
    }

    #[test]
    fn grad_clipping_scales_to_the_max_norm() {
        let a = Var::new(&[3f32], &Device::Cpu).unwrap();
        let b = Var::new(&[4f32], &Device::Cpu).unwrap();
        // d/da (a² / 2 + b² / 2) = a: gradient (3, 4), norm 5.
        let loss = ((a.as_tensor().sqr().unwrap() + b.as_tensor().sqr().unwrap()).unwrap() * 0.5)
            .unwrap()
            .sum_all()
            .unwrap();
        let mut grads = loss.backward().unwrap();
        let norm = clip_grad_norm(&mut grads, &[&a, &b], 1.0).unwrap();
        assert!((norm - 5.0).abs() < 1e-6);
        let ga = grads.get(a.as_tensor()).unwrap().to_vec1::<f32>().unwrap()[0];
        assert!((ga - 0.6).abs() < 1e-5, "{ga}");
    }

    #[test]
    fn presets_check_the_size() {
        let arch = Preset::Small.architecture(64, 800, 77).unwrap();
        assert_eq!(arch.vae.scale_factor(), 4);
        assert_eq!(arch.unet.sample_size, Some(16));
        assert_eq!(arch.unet.cross_attention_dim, arch.text_encoder.hidden_size);
        let err = Preset::Small
            .architecture(40, 800, 77)
            .unwrap_err()
            .to_string();
        assert!(err.contains("size") && err.contains("16"), "{err}");
        // The medium preset: the same autoencoder, cross-attention on every level.
        let medium = Preset::Medium.architecture(64, 800, 77).unwrap();
        assert_eq!(medium.vae, arch.vae);
        assert_eq!(medium.unet.block_out_channels, vec![48, 96, 192]);
        assert!(medium
            .unet
            .down_block_types
            .iter()
            .all(|b| *b == unitune::models::unet::DownBlockType::CrossAttnDownBlock2D));
        assert_eq!(medium.unet.cross_attention_dim, 128);
    }
}
