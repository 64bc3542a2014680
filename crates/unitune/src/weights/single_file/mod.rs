//! Single-file checkpoints: a whole Stable Diffusion 1.x/2.x pipeline in one safetensors file in
//! the original CompVis / Stability layout (`v1-5-pruned-emaonly.safetensors`, and the fine-tunes
//! shared for the AUTOMATIC1111 web UI and ComfyUI), read as diffusers' `from_single_file` reads it:
//!
//! - the networks are `model.diffusion_model.*` (UNet), `first_stage_model.*` (VAE) and
//!   `cond_stage_model.*` (text encoder); [`detect`] tells SD 1.x from 2.x and refuses others;
//! - their configs are inferred from the tensors' shapes ([`infer`]) or taken from a diffusers
//!   folder (`--config`, diffusers' `config=`), and so are the tokenizer (CLIP's, embedded:
//!   [`crate::tokenizer::embedded`]) and the scheduler;
//! - [`convert`] renames the tensors to diffusers' names in memory. The file is mapped, not read
//!   whole, so loading needs no memory or disk beyond the converted tensors.
//!
//! SD 1.x predicts noise (epsilon) at 512 px. SD 2.x files do not say: 2.x-base predicts noise at
//! 512 px, the 768 px models velocity. diffusers' rule is kept: a `global_step` of 875000 (the
//! released 2.x-base's) means epsilon, anything else, including none, v-prediction at 768 px;
//! `--prediction-type` and `--image-size` override it.

pub mod convert;
pub mod detect;
pub mod infer;

#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde_json::json;

use self::convert::{Component, Layout};
pub use self::detect::Family;
use self::infer::Shapes;
use super::export::TokenizerFiles;
use super::folder::check_model_index;
use super::{float_dtype, WeightStore, PICKLE_EXTENSIONS};
use crate::models::clip::ClipTextConfig;
use crate::models::unet::UNet2DConditionConfig;
use crate::models::vae::VaeConfig;
use crate::schedulers::{PredictionType, SchedulerConfig};
use crate::tokenizer::embedded::{clip_tokenizer_files, SD1_PAD, SD2_PAD};
use crate::{Error, Result};

/// The `global_step` of the released SD 2.x-base checkpoints, diffusers' sign of an epsilon model.
const SD2_BASE_GLOBAL_STEP: i64 = 875_000;

/// How to read a single file: diffusers' `from_single_file` arguments.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SingleFileOptions {
    /// A diffusers model folder whose component configs, tokenizer and scheduler are used instead
    /// of the inferred ones (`config=`).
    pub config: Option<PathBuf>,
    /// What the UNet predicts, instead of the inferred or configured one (`prediction_type=`).
    pub prediction_type: Option<PredictionType>,
    /// The picture size the model was trained at, in pixels (`image_size=`).
    pub image_size: Option<usize>,
}

/// Whether `model` names a single-file checkpoint: a file, or a missing path with a checkpoint's
/// extension (so that a mistyped file name is reported as a missing file, not as a folder).
pub fn is_single_file(model: &Path) -> bool {
    let checkpoint = model
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e == "safetensors" || PICKLE_EXTENSIONS.contains(&e));
    model.is_file() || (checkpoint && !model.exists())
}

impl SingleFileOptions {
    /// Fails when any option is set, for a model that is not a single file.
    pub fn refuse_for(&self, model: &Path) -> Result<()> {
        let given = [
            ("config", self.config.is_some()),
            ("prediction_type", self.prediction_type.is_some()),
            ("image_size", self.image_size.is_some()),
        ];
        match given.iter().find(|(_, set)| *set) {
            Some((name, _)) => Err(Error::argument(
                *name,
                format!(
                    "applies to single-file checkpoints; {} is a folder",
                    model.display()
                ),
            )),
            None => Ok(()),
        }
    }
}

/// What a diffusers folder would hold besides the weights, for one single file.
#[derive(Debug, Clone)]
pub struct Configs {
    pub family: Family,
    pub unet: UNet2DConditionConfig,
    pub vae: VaeConfig,
    pub text_encoder: ClipTextConfig,
    pub scheduler: SchedulerConfig,
    pub tokenizer: TokenizerFiles,
    /// Where the UNet's and text encoder's configs and the tokenizer came from, for errors: the
    /// `--config` folder's files, or the checkpoint itself when inferred.
    pub unet_source: PathBuf,
    pub text_encoder_source: PathBuf,
    pub tokenizer_source: PathBuf,
}

/// A single file's networks, converted, ready to build.
pub struct SingleFile {
    pub configs: Configs,
    pub unet: WeightStore,
    pub vae: WeightStore,
    pub text_encoder: WeightStore,
}

impl SingleFile {
    /// Maps `path`, works out its configs and converts its tensors onto `device`.
    pub fn open(path: &Path, options: &SingleFileOptions, device: &Device) -> Result<Self> {
        let all = [Component::Unet, Component::Vae, Component::TextEncoder];
        Self::open_only(path, options, device, &all)
    }

    /// [`Self::open`] converting only the tensors of `components` (the other stores are empty).
    pub fn open_only(
        path: &Path,
        options: &SingleFileOptions,
        device: &Device,
        components: &[Component],
    ) -> Result<Self> {
        let mapped = map(path)?;
        let file = parse(path, &mapped)?;
        let configs = Configs::of(path, &file, options)?;
        let layout = Layout {
            family: configs.family,
            unet_layers_per_block: uniform_layers(&configs)?,
            vae_levels: configs.vae.block_out_channels.len(),
            text_layers: configs.text_encoder.num_hidden_layers,
        };
        // In name order, so that the first bad tensor reported is the same on every run.
        let mut names = file.names();
        names.sort();
        let mut targets = Vec::new();
        for key in names {
            match convert::target(path, &layout, key)? {
                Some(target) if components.contains(&target.component()) => {
                    targets.push((key.to_string(), target))
                }
                _ => {}
            }
        }
        let mut parts = convert::apply(path, &targets, |key| {
            let view = file
                .tensor(key)
                .map_err(|e| Error::weights(path, e.to_string()))?;
            let dtype = float_dtype(path, key, &view)?;
            Tensor::from_raw_buffer(view.data(), dtype, view.shape(), device)
                .map_err(|e| Error::weights(path, format!("tensor `{key}`: {e}")))
        })?;
        let mut store = |component| {
            let part = parts.remove(&component).unwrap_or_default();
            WeightStore::from_tensors(path, part.tensors).with_file_names(part.file_names)
        };
        Ok(Self {
            unet: store(Component::Unet),
            vae: store(Component::Vae),
            text_encoder: store(Component::TextEncoder),
            configs,
        })
    }

    /// The configs of `path` without converting any weight (the file's header only).
    pub fn configs(path: &Path, options: &SingleFileOptions) -> Result<Configs> {
        let mapped = map(path)?;
        Configs::of(path, &parse(path, &mapped)?, options)
    }
}

impl Configs {
    fn of(
        path: &Path,
        file: &safetensors::SafeTensors,
        options: &SingleFileOptions,
    ) -> Result<Self> {
        let shapes: Shapes = file
            .tensors()
            .into_iter()
            .map(|(name, view)| (name, view.shape().to_vec()))
            .collect();
        let family = detect::family(path, shapes.keys().map(String::as_str))?;
        let mut configs = match &options.config {
            Some(dir) => Self::from_folder(dir, family)?,
            None => {
                let prediction = options
                    .prediction_type
                    .unwrap_or_else(|| default_prediction(family, global_step(file)));
                Self::infer(path, &shapes, family, prediction)?
            }
        };
        if let Some(prediction) = options.prediction_type {
            configs.scheduler.prediction_type = prediction;
        }
        if let Some(size) = options.image_size {
            let f = configs.vae.scale_factor();
            if size == 0 || size % f != 0 {
                return Err(Error::argument(
                    "image_size",
                    format!("{size} is not a positive multiple of {f} pixels"),
                ));
            }
            configs.unet.sample_size = Some(size / f);
            configs.vae.sample_size = size;
        }
        Ok(configs)
    }

    /// Configs inferred from the file's tensors for a model predicting `prediction`.
    fn infer(
        path: &Path,
        shapes: &Shapes,
        family: Family,
        prediction: PredictionType,
    ) -> Result<Self> {
        let v = prediction == PredictionType::VPrediction;
        // SD 2.x's 768 px models are its v-prediction ones (2.0-v, 2.1); every other SD trained at 512.
        let image_size = match (family, v) {
            (Family::Sd2, true) => 768,
            _ => 512,
        };
        // Stable Diffusion's fixed choices (see `infer`) do not fit every model: say so.
        let hint = |e: Error| match e {
            Error::Config {
                path,
                field,
                message,
            } => Error::config(
                path,
                field,
                format!(
                    "{message} (inferred from the file's shapes and Stable Diffusion's defaults; \
                     give the model's diffusers folder with --config)"
                ),
            ),
            other => other,
        };
        let vae =
            VaeConfig::from_json(path, infer::vae(path, shapes, image_size)?).map_err(hint)?;
        // diffusers' SD 2.1 (768 px, v) config upcasts attention; its 2.1-base and SD 1.x do not.
        let upcast = family == Family::Sd2 && v;
        let unet_json = infer::unet(
            path,
            shapes,
            family,
            image_size / vae.scale_factor(),
            upcast,
        )?;
        let unet = UNet2DConditionConfig::from_json(path, unet_json).map_err(hint)?;
        let text_encoder =
            ClipTextConfig::from_json(path, infer::text_encoder(path, shapes, family)?)
                .map_err(hint)?;
        let pad = match family {
            Family::Sd1 => SD1_PAD,
            Family::Sd2 => SD2_PAD,
        };
        Ok(Self {
            family,
            unet,
            vae,
            text_encoder,
            scheduler: SchedulerConfig::from_json_str(&scheduler_json(prediction), path)?,
            tokenizer: clip_tokenizer_files(pad),
            unet_source: path.into(),
            text_encoder_source: path.into(),
            tokenizer_source: path.into(),
        })
    }

    /// The configs, tokenizer and scheduler of the diffusers folder `dir`.
    fn from_folder(dir: &Path, family: Family) -> Result<Self> {
        check_model_index(dir)?;
        let unet_source = dir.join("unet/config.json");
        let text_encoder_source = dir.join("text_encoder/config.json");
        let tokenizer_source = dir.join("tokenizer");
        Ok(Self {
            family,
            unet: UNet2DConditionConfig::from_file(&unet_source)?,
            vae: VaeConfig::from_file(&dir.join("vae/config.json"))?,
            text_encoder: ClipTextConfig::from_file(&text_encoder_source)?,
            scheduler: SchedulerConfig::from_file(&dir.join("scheduler/scheduler_config.json"))?,
            tokenizer: TokenizerFiles::read(&tokenizer_source)?,
            unet_source,
            text_encoder_source,
            tokenizer_source,
        })
    }

    /// The picture size the model was trained at: the UNet's sample size in pixels.
    pub fn native_size(&self) -> Option<usize> {
        self.unet.sample_size.map(|s| s * self.vae.scale_factor())
    }
}

/// What the UNet predicts when nothing says: diffusers' `_legacy_load_scheduler` rule (see the
/// module doc).
fn default_prediction(family: Family, global_step: Option<i64>) -> PredictionType {
    match (family, global_step) {
        (Family::Sd1, _) | (Family::Sd2, Some(SD2_BASE_GLOBAL_STEP)) => PredictionType::Epsilon,
        (Family::Sd2, _) => PredictionType::VPrediction,
    }
}

/// What diffusers' single-file loading gives Stable Diffusion 1.x/2.x: the scheduler config of
/// the model's repo on the hub (`stable-diffusion-v1-5`, `stable-diffusion-2-1`), whose training
/// schedule is the `SCHEDULER_DEFAULT_CONFIG` of `single_file_utils.py`. Not the schedule
/// diffusers 0.42's `_legacy_load_scheduler` sets when asked for a `prediction_type` without an
/// original config (betas 0.02 to 0.085): no Stable Diffusion was trained on that.
fn scheduler_json(prediction: PredictionType) -> String {
    let prediction = match prediction {
        PredictionType::Epsilon => "epsilon",
        PredictionType::VPrediction => "v_prediction",
        PredictionType::Sample => "sample",
    };
    json!({
        "_class_name": "DDIMScheduler",
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000,
        "prediction_type": prediction,
        "clip_sample": false,
        "set_alpha_to_one": false,
        "steps_offset": 1,
    })
    .to_string()
}

/// The original layout numbers UNet blocks assuming one depth for every level.
fn uniform_layers(configs: &Configs) -> Result<usize> {
    match configs.unet.layers_per_block.as_slice() {
        [first, rest @ ..] if rest.iter().all(|l| l == first) => Ok(*first),
        other => Err(Error::config(
            &configs.unet_source,
            "layers_per_block",
            format!("{other:?}: a single-file checkpoint has the same number on every level"),
        )),
    }
}

/// The training step a checkpoint records, if it kept it as a tensor.
fn global_step(file: &safetensors::SafeTensors) -> Option<i64> {
    use safetensors::Dtype;
    let view = file.tensor("global_step").ok()?;
    let bytes = view.data();
    match view.dtype() {
        Dtype::I64 => Some(i64::from_le_bytes(bytes.get(..8)?.try_into().ok()?)),
        Dtype::I32 => Some(i32::from_le_bytes(bytes.get(..4)?.try_into().ok()?).into()),
        _ => None,
    }
}

/// The file, mapped into memory; pickle checkpoints are refused first.
fn map(path: &Path) -> Result<memmap2::Mmap> {
    let extension = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut head = [0u8; 9];
    let is_pickle = {
        use std::io::Read;
        let n = (&file).read(&mut head).map_err(|e| Error::io(path, e))?;
        // A safetensors file starts with its header's length (8 bytes) and then `{`. torch.save
        // writes a zip archive; older files are a bare pickle (protocol 2 and up).
        let head = &head[..n];
        let safetensors = head.get(8) == Some(&b'{');
        !safetensors && (head.starts_with(b"PK\x03\x04") || head.starts_with(&[0x80]))
    };
    if is_pickle || extension.is_some_and(|e| PICKLE_EXTENSIONS.contains(&e.as_str())) {
        return Err(Error::weights(
            path,
            format!(
                "a pickle checkpoint, which can run code when loaded; unitune reads safetensors \
                 only. Convert it once, e.g. python -c \"import torch, safetensors.torch as st; \
                 sd = torch.load('{name}', map_location='cpu', weights_only=True); \
                 st.save_file(sd.get('state_dict', sd), '{stem}.safetensors')\"",
                name = path.file_name().unwrap_or_default().to_string_lossy(),
                stem = path.file_stem().unwrap_or_default().to_string_lossy(),
            ),
        ));
    }
    // SAFETY: the map is only read. Like every mmap-based loader (safetensors', candle's), we rely
    // on no one truncating the file while it is loaded; the tensors are copied out right away.
    unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))
}

/// The safetensors header of a mapped file, checked against the file's length.
fn parse<'a>(path: &Path, mapped: &'a [u8]) -> Result<safetensors::SafeTensors<'a>> {
    safetensors::SafeTensors::deserialize(mapped).map_err(|e| {
        Error::weights(
            path,
            format!("not a readable safetensors file (corrupt or truncated?): {e}"),
        )
    })
}
