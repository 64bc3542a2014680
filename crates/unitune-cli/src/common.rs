//! What the commands share: the options that say which model to load and where to run it, and
//! the checks on output paths that run before any work.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use clap::Args;
use unitune::pipelines::{LoadOptions, StableDiffusion};
use unitune::schedulers::PredictionType;
use unitune::weights::hub::resolve_model;
use unitune::weights::single_file::SingleFileOptions;
use unitune::weights::TrainableFilter;

/// The device named by `--device`: cpu, cuda or cuda:N.
pub fn parse_device(name: &str) -> Result<Device> {
    let ordinal = match name {
        "cpu" => return Ok(Device::Cpu),
        "cuda" => 0,
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => n,
            _ => bail!("--device {other}: expected cpu, cuda or cuda:N"),
        },
    };
    Device::new_cuda(ordinal).map_err(|e| anyhow::anyhow!("--device {name}: {e}"))
}

/// The distillation of a tune into a q2-q4 grid, as `tune` and `bench-edits` take it.
#[derive(Args, Clone, Debug)]
pub struct DistillArgs {
    /// Steps of the distillation into a q2-q4 grid (0: round the tuned delta instead)
    /// [default: the model's unitune.json, else as many as the tune's steps].
    #[arg(long)]
    pub distill_steps: Option<usize>,
    /// The distillation's learning rate [default: the model's unitune.json, else a tenth of
    /// the tune's].
    #[arg(long)]
    pub distill_lr: Option<f64>,
    /// How many times more the distillation weighs its error in the differences between its
    /// predictions under the prompts (which guidance multiplies) than the error they share, 0
    /// for plain matching [default: the model's unitune.json, else 31].
    #[arg(long)]
    pub distill_difference_weight: Option<f64>,
}

impl DistillArgs {
    /// Whether any of the flags was given.
    pub fn any(&self) -> bool {
        self.distill_steps.is_some()
            || self.distill_lr.is_some()
            || self.distill_difference_weight.is_some()
    }
}

#[derive(Args, Clone, Debug)]
pub struct ModelArgs {
    /// Stable Diffusion 1.x/2.x: a folder in the diffusers layout, a single-file checkpoint
    /// (`.safetensors` as the AUTOMATIC1111 web UI and ComfyUI load it), or a Hugging Face repo id
    /// (`owner/name`) already in the local cache [default: the built-in model].
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// With a single-file --model: a diffusers model folder whose configs, tokenizer and
    /// scheduler are used instead of those inferred from the file (diffusers' `config=`).
    #[arg(long, value_name = "DIR")]
    pub config: Option<PathBuf>,
    /// With a single-file --model: what its UNet predicts, epsilon or v_prediction [default:
    /// epsilon for SD 1.x; for SD 2.x v_prediction, unless the file records 2.x-base's
    /// global_step 875000].
    #[arg(long, value_parser = parse_prediction_type)]
    pub prediction_type: Option<PredictionType>,
    /// With a single-file --model: the picture size it was trained at, in pixels [default: 768
    /// for SD 2.x v_prediction, else 512].
    #[arg(long, value_name = "PIXELS")]
    pub image_size: Option<usize>,
    /// With a repo id: the branch, tag or commit of the cached snapshot [default: main].
    #[arg(long)]
    pub revision: Option<String>,
    /// Weights variant to load, e.g. `fp16` for `*.fp16.safetensors`.
    #[arg(long)]
    pub variant: Option<String>,
    /// cpu, cuda or cuda:N (CUDA needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Weights and compute precision: f32, f16 or bf16 [default: f32 on CPU, f16 on CUDA].
    /// Tuning in f16 or bf16 updates f32 master copies of the weights.
    #[arg(long)]
    pub dtype: Option<String>,
}

impl ModelArgs {
    /// Loads the model (the built-in one without `--model`), with `trainable` UNet tensors.
    pub fn load(&self, trainable: Option<TrainableFilter>) -> Result<StableDiffusion> {
        let device = parse_device(&self.device)?;
        let options = LoadOptions {
            dtype: self.dtype(&device)?,
            device,
            variant: self.variant.clone(),
            trainable,
            single_file: self.single_file(),
        };
        let dir = self.dir()?;
        StableDiffusion::load(&dir, &options)
            .with_context(|| format!("loading model {}", dir.display()))
    }

    /// How to read a single-file `--model` (the library refuses these flags for a folder).
    pub fn single_file(&self) -> SingleFileOptions {
        SingleFileOptions {
            config: self.config.clone(),
            prediction_type: self.prediction_type,
            image_size: self.image_size,
        }
    }

    /// The model's folder or single file: `--model` (a repo id resolved in the Hugging Face
    /// cache), or the built-in model, unpacked.
    pub fn dir(&self) -> Result<PathBuf> {
        match &self.model {
            Some(model) => Ok(resolve_model(
                &model.to_string_lossy(),
                self.revision.as_deref(),
            )?),
            None => crate::builtin::model_dir(None),
        }
    }

    /// The dtype `--dtype` names, or the device's default.
    pub fn dtype(&self, device: &Device) -> Result<DType> {
        match (self.dtype.as_deref(), device.is_cpu()) {
            (None, true) | (Some("f32"), _) => Ok(DType::F32),
            (None, false) | (Some("f16"), _) => Ok(DType::F16),
            // candle has no bf16 matrix multiply on the CPU.
            (Some("bf16"), true) => {
                bail!("--dtype bf16 needs --device cuda; use f32 or f16 on the CPU")
            }
            (Some("bf16"), false) => Ok(DType::BF16),
            (Some(other), _) => bail!("--dtype {other}: expected f32, f16 or bf16"),
        }
    }
}

/// `--prediction-type`: the values of diffusers' `prediction_type` a single file may need.
fn parse_prediction_type(value: &str) -> Result<PredictionType, String> {
    match value {
        "epsilon" => Ok(PredictionType::Epsilon),
        "v_prediction" => Ok(PredictionType::VPrediction),
        other => Err(format!("`{other}`: expected epsilon or v_prediction")),
    }
}

/// Fails early, before any long work, when `output`'s folder does not exist.
pub fn check_output_dir(output: &Path) -> Result<()> {
    match output.parent() {
        Some(dir) if !dir.as_os_str().is_empty() && !dir.is_dir() => {
            bail!(
                "{}: the output folder {} does not exist",
                output.display(),
                dir.display()
            )
        }
        _ => Ok(()),
    }
}

/// Refuses to write anything but a PNG, and never over the input image.
pub fn check_output(output: &Path, input: Option<&Path>) -> Result<()> {
    check_output_dir(output)?;
    let is_png = output
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("png"));
    if !is_png {
        bail!(
            "--output {}: only PNG output is supported (use a .png name)",
            output.display()
        );
    }
    refuse_inputs("--output", output, &[("image", input)])
}

/// Refuses `output` (given with `flag`) when it is one of `inputs` (what each is, and its path if
/// given), so that no input is lost.
pub fn refuse_inputs(flag: &str, output: &Path, inputs: &[(&str, Option<&Path>)]) -> Result<()> {
    let Ok(out) = output.canonicalize() else {
        return Ok(());
    };
    for (what, input) in inputs {
        if input.is_some_and(|i| i.canonicalize().is_ok_and(|i| i == out)) {
            bail!(
                "{flag} {} is the input {what}; choose another name so the input is kept",
                output.display()
            );
        }
    }
    Ok(())
}

/// `dir/stem<suffix>.<extension>` for `dir/stem.png`.
pub fn suffixed(output: &Path, suffix: &str, extension: &str) -> PathBuf {
    let stem = output
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    output.with_file_name(format!("{stem}{suffix}.{extension}"))
}
