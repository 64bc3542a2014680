//! `unitune bench`: times the UNet on random weights and inputs, so that our candle stack can be
//! compared with PyTorch + diffusers on the same machine. `dev/bench_torch.py` builds the same
//! presets and prints the same JSON; BENCHMARKS.md has the commands and the numbers.
//!
//! Every phase is timed separately and the median over `--iters` iterations (after `--warmup`) is
//! reported, with the process's peak resident memory (`VmHWM`), which includes building the model.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use clap::{Args, Subcommand, ValueEnum};
use unitune::models::ops::Activation;
use unitune::models::unet::{
    CheckpointGrads, DownBlockType, UNet2DConditionConfig, UNet2DConditionModel, UpBlockType,
};
use unitune::noise::Noise;
use unitune::train::OptimizerKind;

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
    #[arg(long, value_enum, default_value = "medium")]
    preset: Preset,
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// Timed iterations (the median is reported).
    #[arg(long, default_value_t = 5)]
    iters: usize,
    /// Untimed iterations first.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Seed of the inputs (latents, context, timesteps, target); candle draws the weights unseeded.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Run on the first CUDA device (needs a build with `--features cuda`).
    #[arg(long)]
    cuda: bool,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct TuneStepArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// adafactor or adamw.
    #[arg(long, default_value = "adafactor")]
    optimizer: String,
    #[arg(long, default_value_t = 1e-4)]
    lr: f64,
    /// Recompute each resnet and transformer in the backward pass instead of keeping its insides.
    #[arg(long)]
    gradient_checkpointing: bool,
}

/// UNet shapes, each with its latent size and context length.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum Preset {
    /// A few-second smoke test.
    Tiny,
    /// 128/256/512 channels, attention on the first two levels: 73.7 M weights at 32x32 latents.
    Medium,
    /// The Stable Diffusion 1.5 UNet (860 M weights) at 64x64 latents (512 px).
    Sd15,
}

impl Preset {
    /// The config, the latent size and the number of context tokens.
    fn shape(self) -> (UNet2DConditionConfig, usize, usize) {
        match self {
            Preset::Tiny => (sd_config(&[32, 64], 1, 4, 32, 8), 16, 8),
            Preset::Medium => (sd_config(&[128, 256, 512], 2, 8, 768, 32), 32, 77),
            Preset::Sd15 => (sd_config(&[320, 640, 1280, 1280], 2, 8, 768, 32), 64, 77),
        }
    }
}

/// An SD 1.x-style config: cross-attention on every level but the deepest, up blocks mirrored.
fn sd_config(
    channels: &[usize],
    layers: usize,
    heads: usize,
    cross_attention_dim: usize,
    groups: usize,
) -> UNet2DConditionConfig {
    let n = channels.len();
    let mut down_block_types = vec![DownBlockType::CrossAttnDownBlock2D; n - 1];
    down_block_types.push(DownBlockType::DownBlock2D);
    let mut up_block_types = vec![UpBlockType::UpBlock2D];
    up_block_types.extend(vec![UpBlockType::CrossAttnUpBlock2D; n - 1]);
    UNet2DConditionConfig {
        sample_size: None,
        in_channels: 4,
        out_channels: 4,
        center_input_sample: false,
        flip_sin_to_cos: true,
        freq_shift: 0.0,
        down_block_types,
        up_block_types,
        block_out_channels: channels.to_vec(),
        layers_per_block: vec![layers; n],
        num_attention_heads: vec![heads; n],
        transformer_layers_per_block: vec![1; n],
        cross_attention_dim,
        use_linear_projection: false,
        upcast_attention: false,
        downsample_padding: 1,
        mid_block_scale_factor: 1.0,
        act_fn: Activation::Silu,
        norm_num_groups: groups,
        norm_eps: 1e-5,
    }
}

/// A randomly initialised UNet whose weights are all trainable `Var`s, with fixed random inputs.
struct Setup {
    varmap: VarMap,
    unet: UNet2DConditionModel,
    sample: Tensor,    // [b, 4, h, w]
    timesteps: Tensor, // [b], integers in 0..1000
    context: Tensor,   // [b, tokens, cross_attention_dim]
    target: Tensor,    // [b, 4, h, w]
}

impl Setup {
    fn new(args: &CommonArgs) -> Result<Self> {
        if args.iters == 0 || args.batch == 0 {
            bail!("--iters and --batch must be at least 1");
        }
        let device = if args.cuda {
            Device::new_cuda(0)?
        } else {
            Device::Cpu
        };
        let dtype = match args.dtype.as_str() {
            "f32" => DType::F32,
            "f16" => DType::F16,
            "bf16" => DType::BF16,
            other => bail!("--dtype {other}: expected f32, f16 or bf16"),
        };
        let (cfg, size, tokens) = args.preset.shape();
        let varmap = VarMap::new();
        let unet =
            UNet2DConditionModel::new(VarBuilder::from_varmap(&varmap, dtype, &device), &cfg)?;
        let b = args.batch;
        let mut noise = Noise::seeded(args.seed);
        let mut randn = |shape: &[usize]| -> Result<Tensor> {
            Ok(noise.randn(shape, &device)?.to_dtype(dtype)?)
        };
        let sample = randn(&[b, cfg.in_channels, size, size])?;
        let context = randn(&[b, tokens, cfg.cross_attention_dim])?;
        let target = randn(&[b, cfg.out_channels, size, size])?;
        // SplitMix64 for the per-sample timesteps.
        let mut state = args.seed;
        let steps: Vec<f32> = (0..b)
            .map(|_| {
                state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
                let z = (state ^ (state >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                let z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                ((z ^ (z >> 31)) % 1000) as f32
            })
            .collect();
        let timesteps = Tensor::from_vec(steps, b, &device)?;
        Ok(Self {
            varmap,
            unet,
            sample,
            timesteps,
            context,
            target,
        })
    }

    fn params(&self) -> usize {
        self.varmap.all_vars().iter().map(|v| v.elem_count()).sum()
    }

    /// The MSE to the target, and where to take the gradients from (see `forward_train`).
    fn loss(&self) -> Result<(Tensor, CheckpointGrads)> {
        let (out, grads) = self
            .unet
            .forward_train(&self.sample, &self.timesteps, &self.context)?;
        let loss = (out - &self.target)?.sqr()?.mean_all()?; // out: [b, 4, h, w]
        Ok((loss.to_dtype(DType::F32)?, grads))
    }

    /// The same weights as constants: candle records no graph for them, like torch's `no_grad`.
    fn inference_unet(&self, cfg: &UNet2DConditionConfig) -> Result<UNet2DConditionModel> {
        let vars = self.varmap.data().lock().expect("varmap lock");
        let consts: HashMap<String, Tensor> = vars
            .iter()
            .map(|(name, var)| (name.clone(), var.as_detached_tensor()))
            .collect();
        let vb = VarBuilder::from_tensors(consts, self.sample.dtype(), self.sample.device());
        Ok(UNet2DConditionModel::new(vb, cfg)?)
    }

    /// Runs `iteration` `warmup + iters` times; each run returns the seconds of each of `names`
    /// (waiting for the device first). The result is the JSON object of the medians.
    fn time(
        &self,
        bench: &str,
        args: &CommonArgs,
        names: &[&str],
        mut iteration: impl FnMut() -> Result<Vec<f64>>,
    ) -> Result<String> {
        let mut samples = vec![Vec::new(); names.len()];
        for i in 0..args.warmup + args.iters {
            let secs = iteration()?;
            if i >= args.warmup {
                samples.iter_mut().zip(secs).for_each(|(s, x)| s.push(x));
            }
        }
        let preset = args.preset.to_possible_value().expect("no skipped presets");
        let mut json = format!(
            "{{\"bench\":\"{bench}\",\"impl\":\"candle\",\"preset\":\"{}\",\"batch\":{},\"iters\":{},\"params\":{}",
            preset.get_name(),
            args.batch,
            args.iters,
            self.params()
        );
        for (name, s) in names.iter().zip(samples) {
            let _ = write!(json, ",\"{name}\":{}", json_number(median(s), 4));
        }
        let _ = write!(json, ",\"peak_rss_mb\":{}}}", json_number(peak_rss_mb(), 0));
        Ok(json)
    }
}

pub fn run(command: BenchCommand) -> Result<()> {
    let (json, as_json) = match command {
        BenchCommand::Unet(args) => (bench_unet(&args)?, args.json),
        BenchCommand::TuneStep(args) => (bench_tune_step(&args)?, args.common.json),
    };
    if as_json {
        println!("{json}");
    } else {
        // One `key: value` line per field of the flat object.
        let body = json.trim_matches(|c| c == '{' || c == '}').replace('"', "");
        body.split(',')
            .for_each(|field| println!("{}", field.replacen(':', ": ", 1)));
    }
    Ok(())
}

fn bench_unet(args: &CommonArgs) -> Result<String> {
    let setup = Setup::new(args)?;
    let inference = setup.inference_unet(&args.preset.shape().0)?;
    let device = setup.sample.device();
    setup.time("unet", args, &["forward_s", "forward_backward_s"], || {
        let t0 = Instant::now();
        inference.forward(&setup.sample, &setup.timesteps, &setup.context)?;
        device.synchronize()?;
        let t1 = Instant::now();
        let (loss, checkpoints) = setup.loss()?;
        // Freeing the gradients and the graph counts too, as in torch.
        drop((checkpoints.backward(&loss)?, loss));
        device.synchronize()?;
        Ok(vec![(t1 - t0).as_secs_f64(), t1.elapsed().as_secs_f64()])
    })
}

fn bench_tune_step(args: &TuneStepArgs) -> Result<String> {
    let mut setup = Setup::new(&args.common)?;
    setup
        .unet
        .set_gradient_checkpointing(args.gradient_checkpointing);
    let kind: OptimizerKind = args.optimizer.parse()?;
    let mut optimizer = kind.build(setup.varmap.all_vars(), args.lr)?;
    let device = setup.sample.device();
    let names = ["forward_s", "backward_s", "optimizer_s", "step_s"];
    setup.time("tune-step", &args.common, &names, || {
        let t0 = Instant::now();
        let (loss, checkpoints) = setup.loss()?;
        device.synchronize()?;
        let t1 = Instant::now();
        let grads = checkpoints.backward(&loss)?;
        device.synchronize()?;
        let t2 = Instant::now();
        optimizer.step(&grads)?;
        // Freeing the gradients and the graph counts here, as torch's `zero_grad` does.
        drop((grads, loss, checkpoints));
        device.synchronize()?;
        let t3 = Instant::now();
        Ok([t1 - t0, t2 - t1, t3 - t2, t3 - t0]
            .map(|d| d.as_secs_f64())
            .to_vec())
    })
}

/// `x` with `decimals` digits, or `null` for NaN (JSON has no NaN).
fn json_number(x: f64, decimals: usize) -> String {
    if x.is_finite() {
        format!("{x:.decimals$}")
    } else {
        "null".into()
    }
}

/// The median (mean of the middle two for an even count); NaN when there are no samples.
fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    match xs.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => xs[n / 2],
        n => (xs[n / 2 - 1] + xs[n / 2]) / 2.0,
    }
}

/// `VmHWM` of /proc/self/status in MiB; NaN where there is no procfs.
fn peak_rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib = status.lines().find_map(|l| {
        l.strip_prefix("VmHWM:")?
            .trim()
            .strip_suffix("kB")?
            .trim()
            .parse()
            .ok()
    });
    kib.map_or(f64::NAN, |k: f64| k / 1024.0)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(subcommand)]
        command: BenchCommand,
    }

    /// The number after `"key":` in a flat JSON object.
    fn field(json: &str, key: &str) -> f64 {
        let (_, rest) = json
            .split_once(&format!("\"{key}\":"))
            .unwrap_or_else(|| panic!("no {key}: {json}"));
        let end = rest.find([',', '}']).unwrap_or(rest.len());
        rest[..end]
            .parse()
            .unwrap_or_else(|_| panic!("{key} is not a number: {json}"))
    }

    #[test]
    fn tiny_benches_report_every_phase() {
        let argv = "bench tune-step --preset tiny --batch 2 --iters 2 --warmup 0 --optimizer adamw --gradient-checkpointing";
        let BenchCommand::TuneStep(args) = Cli::parse_from(argv.split(' ')).command else {
            panic!()
        };
        let json = bench_tune_step(&args).unwrap();
        assert!(
            json.starts_with(r#"{"bench":"tune-step","impl":"candle","preset":"tiny""#),
            "{json}"
        );
        assert_eq!(field(&json, "batch"), 2.0);
        // The same weight count as diffusers' UNet2DConditionModel with this config.
        assert_eq!(field(&json, "params"), 792_964.0);
        for key in [
            "forward_s",
            "backward_s",
            "optimizer_s",
            "step_s",
            "peak_rss_mb",
        ] {
            assert!(field(&json, key) > 0.0, "{key}: {json}");
        }
        assert!(json.ends_with('}') && !json.contains("null"), "{json}");

        let argv = "bench unet --preset tiny --batch 1 --iters 1 --json";
        let BenchCommand::Unet(args) = Cli::parse_from(argv.split(' ')).command else {
            panic!()
        };
        let json = bench_unet(&args).unwrap();
        for key in ["forward_s", "forward_backward_s", "peak_rss_mb"] {
            assert!(field(&json, key) > 0.0, "{key}: {json}");
        }
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(Vec::new()).is_nan());
    }
}
