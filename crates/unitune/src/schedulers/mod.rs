//! Sampling schedulers, one file per algorithm as in diffusers, matching diffusers 0.42.1 step by
//! step: DDIM, DDPM, Euler, Euler ancestral and DPM-Solver++ (2M).
//!
//! Pipelines hold a `Box<dyn Scheduler>` built by [`build`] from a [`SchedulerKind`] and the
//! folder's [`SchedulerConfig`]; training uses [`NoiseSchedule`] directly. Timesteps are f64
//! because Euler's linspace timesteps are fractional.
//!
//! Precision: diffusers keeps alphas_cumprod and sigmas as float32 tensors (built through f64
//! cumprod, cosine betas and interpolation) and computes each step's coefficients as 0-d float32
//! tensors. Our tables hold exactly those float32 values (tested bit for bit; an error in the last
//! alphas_cumprod, ~0.005, is amplified ~14x by the 1 / sqrt(alpha_prod) of an epsilon step), and
//! coefficients are computed in float32 in diffusers' order. torch's float32 sqrt on CPU is not
//! correctly rounded, so steps still differ by about an ulp: runs stay within 6e-7 of their largest
//! value.

mod config;
mod ddim;
mod ddpm;
mod dpm_solver;
mod euler;
mod euler_ancestral;
mod schedule;
#[cfg(test)]
mod tests;

use std::fmt;
use std::str::FromStr;

use candle_core::Tensor;

pub use config::{BetaSchedule, FinalSigmasType, PredictionType, SchedulerConfig, TimestepSpacing};
pub use ddim::Ddim;
pub use ddpm::Ddpm;
pub use dpm_solver::DpmSolverMultistep;
pub use euler::EulerDiscrete;
pub use euler_ancestral::EulerAncestralDiscrete;
pub use schedule::NoiseSchedule;

use crate::noise::Noise;
use crate::{Error, Result};

/// The sampling algorithms we implement; in JSON by their command-line names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum SchedulerKind {
    #[serde(rename = "ddim")]
    Ddim,
    #[serde(rename = "ddpm")]
    Ddpm,
    #[serde(rename = "euler")]
    Euler,
    #[serde(rename = "euler-a")]
    EulerAncestral,
    #[serde(rename = "dpm++")]
    DpmSolverMultistep,
}

impl SchedulerKind {
    pub const ALL: [SchedulerKind; 5] = [
        Self::Ddim,
        Self::Ddpm,
        Self::Euler,
        Self::EulerAncestral,
        Self::DpmSolverMultistep,
    ];

    /// The name on the command line: `ddim`, `ddpm`, `euler`, `euler-a` or `dpm++`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Ddim => "ddim",
            Self::Ddpm => "ddpm",
            Self::Euler => "euler",
            Self::EulerAncestral => "euler-a",
            Self::DpmSolverMultistep => "dpm++",
        }
    }

    /// The diffusers class, as `_class_name` in scheduler_config.json spells it.
    pub fn class_name(self) -> &'static str {
        match self {
            Self::Ddim => "DDIMScheduler",
            Self::Ddpm => "DDPMScheduler",
            Self::Euler => "EulerDiscreteScheduler",
            Self::EulerAncestral => "EulerAncestralDiscreteScheduler",
            Self::DpmSolverMultistep => "DPMSolverMultistepScheduler",
        }
    }

    /// `None` for classes we do not implement (PNDMScheduler, LMSDiscreteScheduler, ...).
    pub fn from_class_name(class_name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.class_name() == class_name)
    }
}

impl FromStr for SchedulerKind {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| {
                let names: Vec<_> = Self::ALL.iter().map(|k| k.name()).collect();
                Error::argument(
                    "scheduler",
                    format!(
                        "unknown scheduler `{s}` (expected one of {})",
                        names.join(", ")
                    ),
                )
            })
    }
}

impl fmt::Display for SchedulerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A sampling scheduler in diffusers' terms. Use: `set_timesteps(n)`; for img2img,
/// `set_begin_index(i)` and `add_noise` at `timesteps()[i]`; else start from noise times
/// `init_noise_sigma()`. Then for each timestep t: the model sees `scale_model_input(x, t)`, and
/// `x = step(model_output, t, x, noise)`.
pub trait Scheduler: Send {
    fn kind(&self) -> SchedulerKind;

    fn config(&self) -> &SchedulerConfig;

    /// Picks `num_inference_steps` timesteps; errors (argument "steps") for 0 or more than
    /// num_train_timesteps. Resets the step index and any solver history.
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()>;

    /// The timesteps to run, first to last (all training timesteps before `set_timesteps`).
    fn timesteps(&self) -> &[f64];

    /// The standard deviation of the initial noise for text-to-image (1 unless sigma-based).
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    /// The model input at `timestep`: unchanged, unless the scheduler is sigma-based (Euler
    /// kinds divide by sqrt(sigma^2 + 1)).
    fn scale_model_input(&self, sample: &Tensor, _timestep: f64) -> Result<Tensor> {
        Ok(sample.clone())
    }

    /// One denoising step from `timestep`, returning diffusers' `prev_sample`. Stochastic
    /// schedulers (DDIM with eta > 0, DDPM at t > 0, Euler ancestral) draw one `randn` of the
    /// sample's shape from `noise`; the others do not touch it.
    fn step(
        &mut self,
        model_output: &Tensor,
        timestep: f64,
        sample: &Tensor,
        noise: &mut Noise,
    ) -> Result<Tensor>;

    /// Start at `timesteps()[begin_index]` (img2img). A no-op for DDIM and DDPM, which, as in
    /// diffusers, find their place from the timestep itself.
    fn set_begin_index(&mut self, begin_index: usize);

    /// Noises a clean `original` to the level of `timestep` (one timestep for the whole batch).
    fn add_noise(&self, original: &Tensor, noise: &Tensor, timestep: f64) -> Result<Tensor>;
}

/// Builds the scheduler `kind` from `config`, checking that it supports the config's options.
pub fn build(kind: SchedulerKind, config: &SchedulerConfig) -> Result<Box<dyn Scheduler>> {
    Ok(match kind {
        SchedulerKind::Ddim => Box::new(Ddim::new(config)?),
        SchedulerKind::Ddpm => Box::new(Ddpm::new(config)?),
        SchedulerKind::Euler => Box::new(EulerDiscrete::new(config)?),
        SchedulerKind::EulerAncestral => Box::new(EulerAncestralDiscrete::new(config)?),
        SchedulerKind::DpmSolverMultistep => Box::new(DpmSolverMultistep::new(config)?),
    })
}

/// The `num_inference_steps` check every `set_timesteps` makes.
fn check_steps(num_inference_steps: usize, config: &SchedulerConfig) -> Result<()> {
    let max = config.num_train_timesteps;
    if num_inference_steps == 0 || num_inference_steps > max {
        return Err(Error::argument(
            "steps",
            format!("{num_inference_steps} is not in 1..={max}"),
        ));
    }
    Ok(())
}

/// The error for `step` before `set_timesteps` on schedulers that need it.
/// DDIM's and DDPM's timesteps: the spaced schedule, linspace values rounded half to even as
/// diffusers casts them to int64.
fn integer_timesteps(
    kind: SchedulerKind,
    config: &SchedulerConfig,
    num_inference_steps: usize,
) -> Result<Vec<f64>> {
    check_steps(num_inference_steps, config)?;
    let spacing = config.timestep_spacing_for(kind);
    let timesteps = spaced_timesteps(
        spacing,
        config.num_train_timesteps,
        num_inference_steps,
        config.steps_offset,
    );
    Ok(match spacing {
        TimestepSpacing::Linspace => timesteps.into_iter().map(f64::round_ties_even).collect(),
        _ => timesteps,
    })
}

fn steps_not_set() -> Error {
    Error::argument("steps", "set_timesteps must be called before step")
}

/// `np.linspace(start, stop, num)`: `i * step + start` in f64, the last value exactly `stop`
/// (a single value is `start`).
fn np_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 1 {
        return vec![start];
    }
    let step = (stop - start) / (num as f64 - 1.0);
    (0..num)
        .map(|i| {
            if i + 1 == num {
                stop
            } else {
                i as f64 * step + start
            }
        })
        .collect()
}

/// `np.arange(start, 0, -step)` for a float step, as numpy fills it: `start + i * delta` where
/// `delta` is `(start - step) - start`. numpy's length `ceil(start / step)` can come out one too
/// long through rounding (1000 / (1000 / 61) > 61), which yields a negative timestep; we keep at
/// most `max_len` values, as the caller asked for that many steps.
fn np_arange_down(start: f64, step: f64, max_len: usize) -> Vec<f64> {
    let len = ((start / step).ceil() as usize).min(max_len);
    let delta = (start - step) - start;
    (0..len)
        .map(|i| {
            if i == 1 {
                start - step
            } else {
                start + i as f64 * delta
            }
        })
        .collect()
}

/// The inference timesteps of DDIM, DDPM, Euler and Euler ancestral, before their casts (DDIM and
/// DDPM round linspace values to integers, Euler keeps them as float32).
fn spaced_timesteps(
    spacing: TimestepSpacing,
    num_train: usize,
    n: usize,
    steps_offset: usize,
) -> Vec<f64> {
    match spacing {
        TimestepSpacing::Linspace => np_linspace(0.0, (num_train - 1) as f64, n)
            .into_iter()
            .rev()
            .collect(),
        TimestepSpacing::Leading => {
            let ratio = num_train / n;
            (0..n)
                .rev()
                .map(|i| (i * ratio + steps_offset) as f64)
                .collect()
        }
        TimestepSpacing::Trailing => {
            np_arange_down(num_train as f64, num_train as f64 / n as f64, n)
                .into_iter()
                .map(|t| t.round_ties_even() - 1.0)
                .collect()
        }
    }
}

/// diffusers' `index_for_timestep`: the first match, or the second when the timestep appears
/// twice (so that an img2img run starting mid-schedule does not skip a sigma).
fn index_for_timestep(timesteps: &[f64], timestep: f64) -> Option<usize> {
    let mut matches = timesteps
        .iter()
        .enumerate()
        .filter(|(_, &t)| t == timestep)
        .map(|(i, _)| i);
    let first = matches.next()?;
    Some(matches.next().unwrap_or(first))
}

/// diffusers' step index of the sigma-based schedulers: set on the first `scale_model_input` or
/// `step`, from `set_begin_index` when given, else from the timestep; then advanced by `step`.
#[derive(Debug, Clone, Default)]
struct StepIndex {
    step: Option<usize>,
    begin: Option<usize>,
}

impl StepIndex {
    /// The index for `timestep`; `not_found` is used when the timestep is not in the schedule.
    fn current(&self, timesteps: &[f64], timestep: f64, not_found: Option<usize>) -> Result<usize> {
        let index = match (self.step, self.begin) {
            (Some(i), _) | (None, Some(i)) => Some(i),
            (None, None) => index_for_timestep(timesteps, timestep).or(not_found),
        };
        match index {
            Some(i) if i < timesteps.len() => Ok(i),
            Some(i) => Err(Error::argument(
                "timestep",
                format!("step {i} is past the last of {} timesteps", timesteps.len()),
            )),
            None => Err(Error::argument(
                "timestep",
                format!("{timestep} is not in the scheduler's timesteps"),
            )),
        }
    }

    /// The index diffusers' `add_noise` uses: by timestep unless a begin index is set.
    fn for_add_noise(
        &self,
        timesteps: &[f64],
        timestep: f64,
        not_found: Option<usize>,
    ) -> Result<usize> {
        match self.begin {
            Some(_) => self.current(timesteps, timestep, not_found),
            None => StepIndex::default().current(timesteps, timestep, not_found),
        }
    }
}

/// `tensor * c`, as torch multiplies by a 0-d float32 tensor.
fn mul(t: &Tensor, c: f32) -> Result<Tensor> {
    Ok(t.affine(c as f64, 0.0)?)
}

/// `tensor / c` as torch divides by a 0-d float32 tensor: a true division (candle's
/// `tensor / f64` multiplies by the reciprocal, which can be one rounding off).
fn div(t: &Tensor, c: f32) -> Result<Tensor> {
    let c = Tensor::new(c, t.device())?.to_dtype(t.dtype())?;
    Ok(t.broadcast_div(&c)?)
}

/// Stochastic schedulers' noise: one draw of `like`'s shape, in its dtype.
fn draw_noise(noise: &mut Noise, like: &Tensor) -> Result<Tensor> {
    Ok(noise
        .randn(like.shape(), like.device())?
        .to_dtype(like.dtype())?)
}
