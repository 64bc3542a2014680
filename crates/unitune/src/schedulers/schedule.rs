//! The training noise schedule (betas and their cumulative products) shared by every scheduler,
//! and the forward process used for training: `add_noise` and `get_velocity`.
//!
//! diffusers builds the schedule as float32 tensors: `torch.linspace` in float32, `1 - betas` in
//! float32 and `torch.cumprod`, which on CPU accumulates in float64 but stores float32. We
//! reproduce those roundings exactly and keep the results as f64 holding float32 values: the
//! last alphas_cumprod are ~0.005, and a relative error there is magnified ~14x by the
//! `1 / sqrt(alpha_prod)` of an epsilon step, so a schedule kept in f64 would drift from diffusers'.

use candle_core::{DType, Tensor};

use super::config::{BetaSchedule, PredictionType, SchedulerConfig};
use crate::{Error, Result};

#[derive(Debug, Clone)]
pub struct NoiseSchedule {
    betas: Vec<f64>,
    alphas: Vec<f64>,
    alphas_cumprod: Vec<f64>,
}

impl NoiseSchedule {
    pub fn new(config: &SchedulerConfig) -> Result<Self> {
        if config.rescale_betas_zero_snr {
            return Err(config.error("rescale_betas_zero_snr", "`true` is not supported"));
        }
        let n = config.num_train_timesteps;
        if config.trained_betas.is_none() && config.beta_schedule != BetaSchedule::SquaredcosCapV2 {
            for (field, value) in [
                ("beta_start", config.beta_start),
                ("beta_end", config.beta_end),
            ] {
                if !(value > 0.0 && value < 1.0) {
                    return Err(config.error(
                        field,
                        format!(
                            "{value} is not in (0, 1): a beta is the noise variance added per step"
                        ),
                    ));
                }
            }
        }
        let betas: Vec<f32> = match &config.trained_betas {
            Some(betas) if betas.len() != n => {
                return Err(config.error(
                    "trained_betas",
                    format!("has {} values but num_train_timesteps is {n}", betas.len()),
                ))
            }
            Some(betas) => betas.iter().map(|&b| b as f32).collect(),
            None => match config.beta_schedule {
                BetaSchedule::Linear => torch_linspace_f32(config.beta_start, config.beta_end, n),
                BetaSchedule::ScaledLinear => {
                    torch_linspace_f32(config.beta_start.sqrt(), config.beta_end.sqrt(), n)
                        .into_iter()
                        .map(|b| b * b)
                        .collect()
                }
                BetaSchedule::SquaredcosCapV2 => betas_for_alpha_bar(n, 0.999),
            },
        };
        // Betas of 1 or more (or NaN) make the schedule's signal vanish: sampling would run and
        // silently produce a black or NaN image.
        if let Some(i) = betas.iter().position(|b| !(*b > 0.0 && *b < 1.0)) {
            let field = match config.trained_betas {
                Some(_) => "trained_betas",
                None => "beta_schedule",
            };
            return Err(config.error(
                field,
                format!(
                    "gives beta {i} = {}; every beta must be in (0, 1)",
                    betas[i]
                ),
            ));
        }
        let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
        let mut acc = 1f64;
        let alphas_cumprod: Vec<f64> = alphas
            .iter()
            .map(|&a| {
                acc *= a as f64;
                acc as f32 as f64
            })
            .collect();
        if alphas_cumprod.last().is_some_and(|&a| a <= 0.0) {
            return Err(config.error(
                "num_train_timesteps",
                "with these betas the signal vanishes (alphas_cumprod reaches 0): fewer timesteps or smaller betas",
            ));
        }
        Ok(NoiseSchedule {
            betas: betas.into_iter().map(f64::from).collect(),
            alphas: alphas.into_iter().map(f64::from).collect(),
            alphas_cumprod,
        })
    }

    pub fn num_train_timesteps(&self) -> usize {
        self.betas.len()
    }

    pub fn betas(&self) -> &[f64] {
        &self.betas
    }

    pub fn alphas(&self) -> &[f64] {
        &self.alphas
    }

    pub fn alphas_cumprod(&self) -> &[f64] {
        &self.alphas_cumprod
    }

    /// `alphas_cumprod[t]` as the float32 diffusers holds.
    pub(super) fn alpha_prod(&self, t: usize) -> f32 {
        self.alphas_cumprod[t] as f32
    }

    /// `add_noise` of the integer-timestep schedulers (DDIM, DDPM) at one training timestep.
    pub(super) fn add_noise_at(
        &self,
        original: &Tensor,
        noise: &Tensor,
        timestep: f64,
    ) -> Result<Tensor> {
        let alpha_prod = self.alpha_prod(self.train_index(timestep)?);
        Ok((original.affine(alpha_prod.sqrt() as f64, 0.0)?
            + noise.affine((1.0 - alpha_prod).sqrt() as f64, 0.0)?)?)
    }

    /// The index of an integral training timestep.
    pub(super) fn train_index(&self, timestep: f64) -> Result<usize> {
        let n = self.num_train_timesteps();
        if timestep.fract() != 0.0 || !(0.0..n as f64).contains(&timestep) {
            return Err(Error::argument(
                "timestep",
                format!("{timestep} is not one of the training timesteps 0..{n}"),
            ));
        }
        Ok(timestep as usize)
    }

    /// The noise level sigma = sqrt((1 - alpha_prod) / alpha_prod) of each training timestep, in
    /// float32 arithmetic as diffusers' sigma-based schedulers compute it.
    pub(super) fn train_sigmas(&self) -> Vec<f32> {
        (0..self.num_train_timesteps())
            .map(|t| self.alpha_prod(t))
            .map(|a| ((1.0 - a) / a).sqrt())
            .collect()
    }

    /// The clean sample that `model_output` predicts from `sample` at `timestep` (diffusers'
    /// `pred_original_sample`). `sample` is in the forward process's space, which is what every
    /// scheduler's `scale_model_input` gives the UNet (a sigma-based sample divided by
    /// sqrt(sigma^2 + 1) is one); a fractional timestep takes the nearest training timestep's
    /// alphas_cumprod, close enough for a preview.
    pub fn pred_original_sample(
        &self,
        model_output: &Tensor,
        timestep: f64,
        sample: &Tensor,
        prediction_type: PredictionType,
    ) -> Result<Tensor> {
        let t = (timestep.round().max(0.0) as usize).min(self.num_train_timesteps() - 1);
        let alpha_prod = self.alpha_prod(t) as f64;
        let (sqrt_alpha, sqrt_beta) = (alpha_prod.sqrt(), (1.0 - alpha_prod).sqrt());
        Ok(match prediction_type {
            PredictionType::Epsilon => {
                ((sample - model_output.affine(sqrt_beta, 0.0)?)? / sqrt_alpha)?
            }
            PredictionType::VPrediction => {
                (sample.affine(sqrt_alpha, 0.0)? - model_output.affine(sqrt_beta, 0.0)?)?
            }
            PredictionType::Sample => model_output.clone(),
        })
    }

    /// The forward process: `sqrt(acp[t]) * x0 + sqrt(1 - acp[t]) * noise`, each sample of the
    /// batch at its own timestep. `timesteps`: [b] u32 or i64.
    pub fn add_noise(&self, x0: &Tensor, noise: &Tensor, timesteps: &Tensor) -> Result<Tensor> {
        let (sqrt_alpha_prod, sqrt_one_minus_alpha_prod) = self.coefficients(x0, timesteps)?;
        Ok((x0.broadcast_mul(&sqrt_alpha_prod)?
            + noise.broadcast_mul(&sqrt_one_minus_alpha_prod)?)?)
    }

    /// The v-prediction target: `sqrt(acp[t]) * noise - sqrt(1 - acp[t]) * x0`.
    pub fn get_velocity(&self, x0: &Tensor, noise: &Tensor, timesteps: &Tensor) -> Result<Tensor> {
        let (sqrt_alpha_prod, sqrt_one_minus_alpha_prod) = self.coefficients(x0, timesteps)?;
        Ok((noise.broadcast_mul(&sqrt_alpha_prod)?
            - x0.broadcast_mul(&sqrt_one_minus_alpha_prod)?)?)
    }

    /// Per-sample `sqrt(acp[t])` and `sqrt(1 - acp[t])` shaped [b, 1, ...] to broadcast over
    /// `x0`. Like diffusers, acp is cast to x0's dtype before the square roots.
    fn coefficients(&self, x0: &Tensor, timesteps: &Tensor) -> Result<(Tensor, Tensor)> {
        if !matches!(timesteps.dtype(), DType::U32 | DType::I64) || timesteps.rank() != 1 {
            return Err(Error::argument(
                "timesteps",
                format!(
                    "expected a [batch] u32 or i64 tensor, got {:?} {:?}",
                    timesteps.dtype(),
                    timesteps.shape()
                ),
            ));
        }
        let batch = timesteps.dim(0)?;
        if x0.rank() == 0 || x0.dim(0)? != batch {
            return Err(Error::argument(
                "timesteps",
                format!("{batch} timesteps for a batch of shape {:?}", x0.shape()),
            ));
        }
        let n = self.num_train_timesteps() as i64;
        let values = timesteps.to_dtype(DType::I64)?.to_vec1::<i64>()?;
        if let Some(t) = values.iter().find(|&&t| !(0..n).contains(&t)) {
            return Err(Error::argument(
                "timesteps",
                format!("{t} is outside 0..{n}"),
            ));
        }
        let acp: Vec<f32> = (0..n as usize).map(|t| self.alpha_prod(t)).collect();
        let acp = Tensor::from_vec(acp, self.alphas_cumprod.len(), x0.device())?
            .to_dtype(x0.dtype())?
            .index_select(&timesteps.to_device(x0.device())?, 0)?;
        let mut shape = vec![1; x0.rank()];
        shape[0] = batch;
        let sqrt_alpha_prod = acp.sqrt()?.reshape(shape.as_slice())?;
        let sqrt_one_minus_alpha_prod = acp.affine(-1.0, 1.0)?.sqrt()?.reshape(shape)?;
        Ok((sqrt_alpha_prod, sqrt_one_minus_alpha_prod))
    }
}

/// `torch.linspace(start, end, steps, dtype=torch.float32)` bit for bit: float32 step, and each
/// value a fused multiply-add from the nearer end (first half from `start`, second from `end`).
fn torch_linspace_f32(start: f64, end: f64, steps: usize) -> Vec<f32> {
    let (start, end) = (start as f32, end as f32);
    if steps == 1 {
        return vec![start];
    }
    let step = (end - start) / (steps - 1) as f32;
    let halfway = steps / 2;
    (0..steps)
        .map(|i| match i < halfway {
            true => step.mul_add(i as f32, start),
            false => (-step).mul_add((steps - 1 - i) as f32, end),
        })
        .collect()
}

/// The squaredcos_cap_v2 betas: 1 - alpha_bar(t2) / alpha_bar(t1) over [0, 1] in f64, capped at
/// `max_beta`, stored as float32. (candle-transformers computes `i / n` in integers, which makes
/// every t1 and t2 zero and every beta zero.)
fn betas_for_alpha_bar(n: usize, max_beta: f64) -> Vec<f32> {
    let alpha_bar = |t: f64| {
        ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
            .cos()
            .powi(2)
    };
    (0..n)
        .map(|i| {
            let t1 = i as f64 / n as f64;
            let t2 = (i + 1) as f64 / n as f64;
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(max_beta) as f32
        })
        .collect()
}
