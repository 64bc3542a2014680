//! Speed (`unitune bench`): times the UNet on random weights and inputs, so that our candle stack can be
//! compared with PyTorch + diffusers on the same machine. `dev/bench_torch.py` builds the same
//! presets and prints the same JSON; BENCHMARKS.md has the commands and the numbers.
//!
//! Every phase is timed separately and the median over `iters` iterations (after `warmup`) is
//! reported, with the process's peak resident memory (`VmHWM`), which includes building the model.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use unitune::models::activations::Activation;
use unitune::models::unet::{
    CheckpointGrads, DownBlockType, UNet2DConditionConfig, UNet2DConditionModel, UpBlockType,
};
use unitune::noise::Noise;
use unitune::train::master::MasterWeights;
use unitune::train::OptimizerKind;
use unitune::{Error, Result};

/// What every speed bench takes. [`Default`] is `unitune bench unet` without flags.
#[derive(Debug, Clone)]
pub struct SpeedConfig {
    pub preset: Preset,
    pub batch: usize,
    /// Timed iterations (the median is reported).
    pub iters: usize,
    /// Untimed iterations first.
    pub warmup: usize,
    /// Seed of the inputs (latents, context, timesteps, target); candle draws the weights unseeded.
    pub seed: u64,
    pub dtype: DType,
    pub device: Device,
}

impl Default for SpeedConfig {
    fn default() -> Self {
        Self {
            preset: Preset::Medium,
            batch: 4,
            iters: 5,
            warmup: 1,
            seed: 0,
            dtype: DType::F32,
            device: Device::Cpu,
        }
    }
}

/// One training step: the UNet, an optimizer, and whether to checkpoint.
#[derive(Debug, Clone)]
pub struct TuneStepConfig {
    pub common: SpeedConfig,
    pub optimizer: OptimizerKind,
    pub lr: f64,
    /// Recompute each resnet and transformer in the backward pass instead of keeping its insides.
    pub gradient_checkpointing: bool,
    /// Train f16/bf16 weights as `unitune tune` does: the optimizer updates f32 master copies,
    /// written back rounded after each step, and f16 losses are scaled (mixed precision, as
    /// PyTorch's autocast with a GradScaler on f32 weights).
    pub master_weights: bool,
}

impl Default for TuneStepConfig {
    fn default() -> Self {
        Self {
            common: SpeedConfig::default(),
            optimizer: OptimizerKind::Adafactor,
            lr: 1e-4,
            gradient_checkpointing: false,
            master_weights: false,
        }
    }
}

/// What a bench measured: the medians of each phase in seconds, and the peak memory. Its JSON
/// (`serde_json::to_string`) is the object `dev/bench_torch.py` prints for PyTorch.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    pub bench: &'static str,
    #[serde(rename = "impl")]
    pub implementation: &'static str,
    pub preset: &'static str,
    pub batch: usize,
    pub iters: usize,
    pub params: usize,
    /// Median seconds by phase (`forward_s`, ...); `None` (JSON null) when nothing was timed.
    #[serde(flatten)]
    pub phases: BTreeMap<&'static str, Option<f64>>,
    pub peak_rss_mb: Option<f64>,
}

impl Report {
    /// One `key: value` line per field.
    pub fn to_lines(&self) -> String {
        let json = serde_json::to_value(self).expect("reports serialize");
        let mut out = String::new();
        for (key, value) in json.as_object().expect("an object") {
            let _ = writeln!(
                out,
                "{key}: {}",
                value.as_str().map_or(value.to_string(), String::from)
            );
        }
        out
    }
}

/// UNet shapes, each with its latent size and context length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Preset {
    /// A few-second smoke test.
    Tiny,
    /// 128/256/512 channels, attention on the first two levels: 73.7 M weights at 32x32 latents.
    Medium,
    /// The Stable Diffusion 1.5 UNet (860 M weights) at 64x64 latents (512 px).
    Sd15,
}

impl std::str::FromStr for Preset {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "tiny" => Ok(Self::Tiny),
            "medium" => Ok(Self::Medium),
            "sd15" => Ok(Self::Sd15),
            _ => Err(Error::argument(
                "preset",
                format!("`{s}` is not one of: tiny, medium, sd15"),
            )),
        }
    }
}

impl Preset {
    pub fn name(self) -> &'static str {
        match self {
            Self::Tiny => "tiny",
            Self::Medium => "medium",
            Self::Sd15 => "sd15",
        }
    }

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
    fn new(args: &SpeedConfig) -> Result<Self> {
        for (name, value) in [("iters", args.iters), ("batch", args.batch)] {
            if value == 0 {
                return Err(Error::argument(name, "must be at least 1"));
            }
        }
        let (device, dtype) = (args.device.clone(), args.dtype);
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
    /// (waiting for the device first). The report holds the medians.
    fn time(
        &self,
        bench: &'static str,
        args: &SpeedConfig,
        names: &[&'static str],
        mut iteration: impl FnMut() -> Result<Vec<f64>>,
    ) -> Result<Report> {
        let mut samples = vec![Vec::new(); names.len()];
        for i in 0..args.warmup + args.iters {
            let secs = iteration()?;
            if i >= args.warmup {
                samples.iter_mut().zip(secs).for_each(|(s, x)| s.push(x));
            }
        }
        let finite = |x: f64| x.is_finite().then_some(x);
        Ok(Report {
            bench,
            implementation: "candle",
            preset: args.preset.name(),
            batch: args.batch,
            iters: args.iters,
            params: self.params(),
            phases: names
                .iter()
                .zip(samples)
                .map(|(&name, s)| (name, finite(median(s))))
                .collect(),
            peak_rss_mb: finite(peak_rss_mb()),
        })
    }
}

/// UNet forward without gradient tracking (inference), and forward + backward of an MSE loss.
pub fn bench_unet(args: &SpeedConfig) -> Result<Report> {
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

/// One training step, timed as forward (with the loss), backward, and optimizer update (with
/// freeing the gradients).
pub fn bench_tune_step(args: &TuneStepConfig) -> Result<Report> {
    let mut setup = Setup::new(&args.common)?;
    setup
        .unet
        .set_gradient_checkpointing(args.gradient_checkpointing);
    let vars = setup.varmap.all_vars();
    let mut master = match args.master_weights {
        true => Some(MasterWeights::new(&vars)?.ok_or_else(|| {
            Error::argument(
                "master-weights",
                "needs half-precision weights (--dtype f16 or bf16)",
            )
        })?),
        false => None,
    };
    let trained = master.as_ref().map_or(vars, MasterWeights::masters);
    let mut optimizer = args.optimizer.build(trained, args.lr)?;
    let device = setup.sample.device();
    let names = ["forward_s", "backward_s", "optimizer_s", "step_s"];
    setup.time("tune-step", &args.common, &names, || {
        let t0 = Instant::now();
        let (loss, checkpoints) = setup.loss()?;
        device.synchronize()?;
        let t1 = Instant::now();
        // With master weights, as in `Tuner::step`: the scaled loss's gradients move onto the
        // master copies, and a step whose gradients overflowed is skipped (as by a GradScaler).
        let (grads, finite) = match master.as_mut() {
            None => (checkpoints.backward(&loss)?, true),
            Some(master) => {
                let mut grads = checkpoints.backward(&(&loss * master.loss_scale())?)?;
                let finite = master.take_grads(&mut grads)?;
                (grads, finite)
            }
        };
        device.synchronize()?;
        let t2 = Instant::now();
        if finite {
            optimizer.step(&grads)?;
            if let Some(master) = &master {
                master.sync()?;
            }
        }
        // Freeing the gradients and the graph counts here, as torch's `zero_grad` does.
        drop((grads, loss, checkpoints));
        device.synchronize()?;
        let t3 = Instant::now();
        Ok([t1 - t0, t2 - t1, t3 - t2, t3 - t0]
            .map(|d| d.as_secs_f64())
            .to_vec())
    })
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
    use super::*;

    #[test]
    fn tiny_benches_report_every_phase() {
        let tiny = SpeedConfig {
            preset: Preset::Tiny,
            batch: 2,
            iters: 2,
            warmup: 0,
            ..SpeedConfig::default()
        };
        let args = TuneStepConfig {
            common: tiny.clone(),
            optimizer: OptimizerKind::AdamW,
            gradient_checkpointing: true,
            ..TuneStepConfig::default()
        };
        let report = bench_tune_step(&args).unwrap();
        let json = serde_json::to_string(&report).unwrap();
        assert!(
            json.starts_with(r#"{"bench":"tune-step","impl":"candle","preset":"tiny""#),
            "{json}"
        );
        assert_eq!(report.batch, 2);
        // The same weight count as diffusers' UNet2DConditionModel with this config.
        assert_eq!(report.params, 792_964);
        for key in ["forward_s", "backward_s", "optimizer_s", "step_s"] {
            assert!(report.phases[key].is_some_and(|s| s > 0.0), "{key}: {json}");
        }
        assert!(report.peak_rss_mb.is_some_and(|m| m > 0.0));
        assert!(json.ends_with('}') && !json.contains("null"), "{json}");
        assert!(
            report.to_lines().contains("preset: tiny\n"),
            "{}",
            report.to_lines()
        );

        let args = SpeedConfig {
            batch: 1,
            iters: 1,
            ..tiny
        };
        let report = bench_unet(&args).unwrap();
        for key in ["forward_s", "forward_backward_s"] {
            assert!(
                report.phases[key].is_some_and(|s| s > 0.0),
                "{key}: {report:?}"
            );
        }
        assert!(report.peak_rss_mb.is_some_and(|m| m > 0.0));
    }

    #[test]
    fn master_weights_train_half_precision_weights() {
        let half = SpeedConfig {
            preset: Preset::Tiny,
            batch: 1,
            iters: 1,
            warmup: 1,
            dtype: DType::F16,
            ..SpeedConfig::default()
        };
        let args = TuneStepConfig {
            common: half.clone(),
            master_weights: true,
            ..TuneStepConfig::default()
        };
        let report = bench_tune_step(&args).unwrap();
        for key in ["forward_s", "backward_s", "optimizer_s", "step_s"] {
            assert!(
                report.phases[key].is_some_and(|s| s > 0.0),
                "{key}: {report:?}"
            );
        }
        // f32 weights have no master copies to keep: refused, naming the flag.
        let f32_args = TuneStepConfig {
            common: SpeedConfig {
                dtype: DType::F32,
                ..half
            },
            master_weights: true,
            ..TuneStepConfig::default()
        };
        let err = bench_tune_step(&f32_args).unwrap_err().to_string();
        assert!(err.contains("master-weights"), "{err}");
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(Vec::new()).is_nan());
    }
}
