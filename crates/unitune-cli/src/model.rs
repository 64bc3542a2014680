//! The options that say which model to load and where to run it, shared by `generate`, `tune`
//! and `edit`.

use std::path::PathBuf;

use anyhow::{bail, Result};
use candle_core::{DType, Device};
use clap::Args;
use unitune::pipelines::{LoadOptions, StableDiffusion};
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

#[derive(Args, Clone, Debug)]
pub struct ModelArgs {
    /// Stable Diffusion 1.x/2.x folder in the diffusers layout [default: the built-in model].
    #[arg(long)]
    pub model: Option<PathBuf>,
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
        };
        crate::builtin::load(self.model.as_deref(), &options)
    }

    /// These options as command-line arguments.
    pub fn to_argv(&self) -> Vec<String> {
        let mut argv = vec!["--device".to_string(), self.device.clone()];
        let optional = [
            (
                "--model",
                self.model.as_ref().map(|p| p.display().to_string()),
            ),
            ("--variant", self.variant.clone()),
            ("--dtype", self.dtype.clone()),
        ];
        for (flag, value) in optional {
            if let Some(value) = value {
                argv.extend([flag.to_string(), value]);
            }
        }
        argv
    }

    fn dtype(&self, device: &Device) -> Result<DType> {
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
