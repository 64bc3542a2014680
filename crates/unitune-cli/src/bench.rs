//! `unitune bench`: times the UNet on random weights and inputs, so that our candle stack can be
//! compared with PyTorch + diffusers on the same machine. `dev/bench_torch.py` builds the same
//! presets and prints the same JSON; BENCHMARKS.md has the commands and the numbers.
//!
//! Every phase is timed separately and the median over `--iters` iterations (after `--warmup`) is
//! reported, with the process's peak resident memory (`VmHWM`), which includes building the model.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use clap::{Args, Subcommand, ValueEnum};
use unitune::models::ops::Activation;
use unitune::models::unet::{
    DownBlockType, UNet2DConditionConfig, UNet2DConditionModel, UpBlockType,
};
use unitune::noise::Noise;
use unitune::train::OptimizerKind;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// UNet forward without gradient tracking (inference), and forward + backward of an MSE loss.
    Unet(CommonArgs),
    /// One training step, timed as forward (with the loss), backward and optimizer update.
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
    /// Seed of the weights' init order and of the inputs (latents, context, timesteps, target).
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
    fn name(self) -> &'static str {
        match self {
            Preset::Tiny => "tiny",
            Preset::Medium => "medium",
            Preset::Sd15 => "sd15",
        }
    }

    /// The config, the latent size and the number of context tokens.
    fn shape(self) -> (UNet2DConditionConfig, usize, usize) {
        use DownBlockType::{CrossAttnDownBlock2D as CrossDown, DownBlock2D as Down};
        match self {
            Preset::Tiny => (sd_config(&[32, 64], &[CrossDown, Down], 1, 4, 32, 8), 16, 8),
            Preset::Medium => (
                sd_config(
                    &[128, 256, 512],
                    &[CrossDown, CrossDown, Down],
                    2,
                    8,
                    768,
                    32,
                ),
                32,
                77,
            ),
            Preset::Sd15 => (
                sd_config(
                    &[320, 640, 1280, 1280],
                    &[CrossDown, CrossDown, CrossDown, Down],
                    2,
                    8,
                    768,
                    32,
                ),
                64,
                77,
            ),
        }
    }
}

/// An SD 1.x-style config; the up blocks mirror the down blocks.
fn sd_config(
    channels: &[usize],
    down: &[DownBlockType],
    layers: usize,
    heads: usize,
    cross_attention_dim: usize,
    groups: usize,
) -> UNet2DConditionConfig {
    let up = down.iter().rev().map(|d| match d {
        DownBlockType::DownBlock2D => UpBlockType::UpBlock2D,
        DownBlockType::CrossAttnDownBlock2D => UpBlockType::CrossAttnUpBlock2D,
    });
    let n = channels.len();
    UNet2DConditionConfig {
        sample_size: None,
        in_channels: 4,
        out_channels: 4,
        center_input_sample: false,
        flip_sin_to_cos: true,
        freq_shift: 0.0,
        down_block_types: down.to_vec(),
        up_block_types: up.collect(),
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
    params: usize,
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
        let dtype: DType = args
            .dtype
            .parse()
            .with_context(|| format!("--dtype {}", args.dtype))?;
        if !dtype.is_float() || dtype == DType::F64 {
            bail!(
                "--dtype {}: only f32, f16 and bf16 are benchmarked",
                args.dtype
            );
        }
        let (cfg, size, tokens) = args.preset.shape();
        let varmap = VarMap::new();
        let unet =
            UNet2DConditionModel::new(VarBuilder::from_varmap(&varmap, dtype, &device), &cfg)?;
        // Norm scales come out of a VarMap as zeros (plain `vb.get`); torch starts them at one.
        for (name, var) in varmap.data().lock().expect("varmap lock").iter() {
            if name.ends_with(".weight") && var.rank() == 1 {
                var.set(&var.ones_like()?)?;
            }
        }
        let params = varmap.all_vars().iter().map(|v| v.elem_count()).sum();
        let b = args.batch;
        let mut noise = Noise::seeded(args.seed);
        let mut randn = |shape: &[usize]| -> Result<Tensor> {
            Ok(noise.randn(shape, &device)?.to_dtype(dtype)?)
        };
        let sample = randn(&[b, cfg.in_channels, size, size])?;
        let context = randn(&[b, tokens, cfg.cross_attention_dim])?;
        let target = randn(&[b, cfg.out_channels, size, size])?;
        // SplitMix64: per-sample timesteps without another dependency.
        let mut state = args.seed;
        let steps: Vec<f32> = (0..b)
            .map(|_| {
                state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
                let mut z = state;
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                ((z ^ (z >> 31)) % 1000) as f32
            })
            .collect();
        let timesteps = Tensor::from_vec(steps, b, &device)?;
        Ok(Self {
            varmap,
            unet,
            params,
            sample,
            timesteps,
            context,
            target,
        })
    }

    fn loss(&self, unet: &UNet2DConditionModel) -> Result<Tensor> {
        let out = unet.forward(&self.sample, &self.timesteps, &self.context)?; // [b, 4, h, w]
        Ok((out - &self.target)?
            .sqr()?
            .mean_all()?
            .to_dtype(DType::F32)?)
    }

    /// The same weights as constants: candle records no graph for them, like torch's `no_grad`.
    fn inference_unet(&self, args: &CommonArgs) -> Result<UNet2DConditionModel> {
        let consts: HashMap<String, Tensor> =
            (self.varmap.data().lock().expect("varmap lock").iter())
                .map(|(name, var)| (name.clone(), var.as_detached_tensor()))
                .collect();
        let vb = VarBuilder::from_tensors(consts, self.sample.dtype(), self.sample.device());
        Ok(UNet2DConditionModel::new(vb, &args.preset.shape().0)?)
    }
}

/// Median seconds of each named phase, and the process's memory high-water mark.
struct Report {
    bench: &'static str,
    preset: Preset,
    batch: usize,
    iters: usize,
    params: usize,
    phases: Vec<(&'static str, f64)>,
    peak_rss_mb: f64,
}

impl Report {
    fn json(&self) -> String {
        let mut s = format!(
            "{{\"bench\":\"{}\",\"impl\":\"candle\",\"preset\":\"{}\",\"batch\":{},\"iters\":{},\"params\":{}",
            self.bench,
            self.preset.name(),
            self.batch,
            self.iters,
            self.params
        );
        for (name, secs) in &self.phases {
            let _ = write!(s, ",\"{name}\":{}", json_number(*secs, 4));
        }
        let _ = write!(s, ",\"peak_rss_mb\":{}}}", json_number(self.peak_rss_mb, 0));
        s
    }

    fn print(&self, json: bool) {
        if json {
            println!("{}", self.json());
            return;
        }
        let (preset, batch, iters) = (self.preset.name(), self.batch, self.iters);
        println!(
            "{} bench, preset {preset}, batch {batch}, {:.1} M weights, median of {iters}:",
            self.bench,
            self.params as f64 / 1e6
        );
        for (name, secs) in &self.phases {
            println!("  {name:<20} {secs:>8.3}");
        }
        println!("  {:<20} {:>8.0}", "peak_rss_mb", self.peak_rss_mb);
    }
}

pub fn run(command: BenchCommand) -> Result<()> {
    let (report, json) = match command {
        BenchCommand::Unet(args) => (bench_unet(&args)?, args.json),
        BenchCommand::TuneStep(args) => (bench_tune_step(&args)?, args.common.json),
    };
    report.print(json);
    Ok(())
}

fn bench_unet(args: &CommonArgs) -> Result<Report> {
    let setup = Setup::new(args)?;
    let inference = setup.inference_unet(args)?;
    let device = setup.sample.device().clone();
    let mut times = Timings::new(args, &["forward_s", "forward_backward_s"]);
    for _ in 0..args.warmup + args.iters {
        let t = Instant::now();
        inference.forward(&setup.sample, &setup.timesteps, &setup.context)?;
        device.synchronize()?;
        let forward = t.elapsed().as_secs_f64();
        let t = Instant::now();
        setup.loss(&setup.unet)?.backward()?;
        device.synchronize()?;
        times.push(&[forward, t.elapsed().as_secs_f64()]);
    }
    Ok(times.report("unet", args, setup.params))
}

fn bench_tune_step(args: &TuneStepArgs) -> Result<Report> {
    let common = &args.common;
    let setup = Setup::new(common)?;
    let kind: OptimizerKind = args.optimizer.parse()?;
    let mut optimizer = kind.build(setup.varmap.all_vars(), args.lr)?;
    let device = setup.sample.device().clone();
    let mut times = Timings::new(
        common,
        &["forward_s", "backward_s", "optimizer_s", "step_s"],
    );
    for _ in 0..common.warmup + common.iters {
        let t0 = Instant::now();
        let loss = setup.loss(&setup.unet)?;
        device.synchronize()?;
        let t1 = Instant::now();
        let grads = loss.backward()?;
        device.synchronize()?;
        let t2 = Instant::now();
        optimizer.step(&grads)?;
        device.synchronize()?;
        let t3 = Instant::now();
        let secs = |a: Instant, b: Instant| (b - a).as_secs_f64();
        times.push(&[secs(t0, t1), secs(t1, t2), secs(t2, t3), secs(t0, t3)]);
    }
    Ok(times.report("tune-step", common, setup.params))
}

/// Per-phase samples, the warm-up ones dropped.
struct Timings {
    names: &'static [&'static str],
    warmup: usize,
    seen: usize,
    samples: Vec<Vec<f64>>,
}

impl Timings {
    fn new(args: &CommonArgs, names: &'static [&'static str]) -> Self {
        Self {
            names,
            warmup: args.warmup,
            seen: 0,
            samples: vec![Vec::new(); names.len()],
        }
    }

    fn push(&mut self, secs: &[f64]) {
        self.seen += 1;
        if self.seen > self.warmup {
            self.samples
                .iter_mut()
                .zip(secs)
                .for_each(|(s, &x)| s.push(x));
        }
    }

    fn report(self, bench: &'static str, args: &CommonArgs, params: usize) -> Report {
        let phases = self
            .names
            .iter()
            .zip(self.samples)
            .map(|(&name, s)| (name, median(s)))
            .collect();
        let (preset, batch, iters) = (args.preset, args.batch, args.iters);
        Report {
            bench,
            preset,
            batch,
            iters,
            params,
            phases,
            peak_rss_mb: peak_rss_mb(),
        }
    }
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
            .parse::<f64>()
            .ok()
    });
    kib.map_or(f64::NAN, |k| k / 1024.0)
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
        let start = json
            .find(&format!("\"{key}\":"))
            .unwrap_or_else(|| panic!("no {key} in {json}"))
            + key.len()
            + 3;
        let rest = &json[start..];
        let end = rest.find([',', '}']).unwrap_or(rest.len());
        rest[..end]
            .parse()
            .unwrap_or_else(|_| panic!("{key} is not a number in {json}"))
    }

    #[test]
    fn tiny_benches_report_every_phase() {
        let args = [
            "unitune-bench",
            "tune-step",
            "--preset",
            "tiny",
            "--batch",
            "2",
            "--iters",
            "2",
            "--warmup",
            "0",
        ];
        let BenchCommand::TuneStep(args) = Cli::parse_from(args).command else {
            panic!("not tune-step")
        };
        let json = bench_tune_step(&args).unwrap().json();
        assert!(
            json.starts_with("{\"bench\":\"tune-step\",\"impl\":\"candle\",\"preset\":\"tiny\""),
            "{json}"
        );
        assert_eq!(field(&json, "batch"), 2.0);
        for key in [
            "forward_s",
            "backward_s",
            "optimizer_s",
            "step_s",
            "peak_rss_mb",
            "params",
        ] {
            assert!(field(&json, key) > 0.0, "{key} in {json}");
        }
        // The step is the three phases of the same iteration, so its median is at least the largest.
        assert!(
            field(&json, "step_s") >= field(&json, "backward_s"),
            "{json}"
        );

        let args = [
            "unitune-bench",
            "unet",
            "--preset",
            "tiny",
            "--batch",
            "1",
            "--iters",
            "1",
            "--json",
        ];
        let BenchCommand::Unet(args) = Cli::parse_from(args).command else {
            panic!("not unet")
        };
        let json = bench_unet(&args).unwrap().json();
        for key in ["forward_s", "forward_backward_s", "peak_rss_mb"] {
            assert!(field(&json, key) > 0.0, "{key} in {json}");
        }
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(Vec::new()).is_nan());
    }
}
