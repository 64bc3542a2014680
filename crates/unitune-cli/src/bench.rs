//! `unitune bench`: the speed benches of `unitune_lab::speed` (the UNet and one tune step on random
//! weights), printed as `key: value` lines or as the JSON object `dev/bench_torch.py` prints too.

use anyhow::Result;
use candle_core::DType;
use clap::{Args, Subcommand};
use unitune::train::OptimizerKind;
use unitune_lab::speed::{self, Preset, SpeedConfig, TuneStepConfig};

#[derive(Subcommand)]
pub enum BenchCommand {
    /// UNet forward without gradient tracking (inference), and forward + backward of an MSE loss.
    Unet(CommonArgs),
    /// One training step, timed as forward (with the loss), backward, and optimizer update (with
    /// freeing the gradients).
    TuneStep(TuneStepArgs),
}

#[derive(Args)]
pub struct CommonArgs {
    /// tiny (a few-second smoke test), medium (128/256/512 channels, 73.7 M weights at 32x32
    /// latents) or sd15 (the Stable Diffusion 1.5 UNet, 860 M weights, at 64x64 latents).
    #[arg(long, default_value = SpeedConfig::default().preset.name())]
    preset: Preset,
    #[arg(long, default_value_t = SpeedConfig::default().batch)]
    batch: usize,
    /// Timed iterations (the median is reported).
    #[arg(long, default_value_t = SpeedConfig::default().iters)]
    iters: usize,
    /// Untimed iterations first.
    #[arg(long, default_value_t = SpeedConfig::default().warmup)]
    warmup: usize,
    /// Seed of the inputs (latents, context, timesteps, target); candle draws the weights unseeded.
    #[arg(long, default_value_t = SpeedConfig::default().seed)]
    seed: u64,
    /// f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// cpu, cuda or cuda:N (CUDA needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct TuneStepArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// adafactor or adamw.
    #[arg(long, default_value_t = TuneStepConfig::default().optimizer)]
    optimizer: OptimizerKind,
    #[arg(long, default_value_t = TuneStepConfig::default().lr)]
    lr: f64,
    /// Recompute each resnet and transformer in the backward pass instead of keeping its insides.
    #[arg(long)]
    gradient_checkpointing: bool,
    /// With --dtype f16 or bf16: train through f32 master copies of the weights, with loss
    /// scaling in f16, as `unitune tune` does (dev/bench_torch.py: f32 weights under autocast).
    #[arg(long)]
    master_weights: bool,
}

impl CommonArgs {
    fn config(&self) -> Result<SpeedConfig> {
        let dtype = match self.dtype.as_str() {
            "f32" => DType::F32,
            "f16" => DType::F16,
            "bf16" => DType::BF16,
            other => anyhow::bail!("--dtype {other}: expected f32, f16 or bf16"),
        };
        Ok(SpeedConfig {
            preset: self.preset,
            batch: self.batch,
            iters: self.iters,
            warmup: self.warmup,
            seed: self.seed,
            dtype,
            device: crate::common::parse_device(&self.device)?,
        })
    }
}

pub fn run(command: BenchCommand) -> Result<()> {
    let (report, as_json) = match command {
        BenchCommand::Unet(args) => (speed::bench_unet(&args.config()?)?, args.json),
        BenchCommand::TuneStep(args) => {
            let config = TuneStepConfig {
                common: args.common.config()?,
                optimizer: args.optimizer,
                lr: args.lr,
                gradient_checkpointing: args.gradient_checkpointing,
                master_weights: args.master_weights,
            };
            (speed::bench_tune_step(&config)?, args.common.json)
        }
    };
    if as_json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", report.to_lines());
    }
    Ok(())
}
