//! DDPM (Ho et al. 2020), diffusers' `DDPMScheduler` with its default `fixed_small` variance:
//! the posterior mean of x_{t-1} given the predicted x0, plus fresh noise at every t > 0.

use candle_core::Tensor;

use super::{
    div, draw_noise, integer_timesteps, mul, NoiseSchedule, PredictionType, Scheduler,
    SchedulerConfig, SchedulerKind,
};
use crate::noise::Noise;
use crate::{Error, Result};

#[derive(Debug, Clone)]
pub struct Ddpm {
    config: SchedulerConfig,
    schedule: NoiseSchedule,
    /// `None` until `set_timesteps`: then the previous timestep is simply t - 1, as in diffusers.
    num_inference_steps: Option<usize>,
    timesteps: Vec<f64>,
}

impl Ddpm {
    pub fn new(config: &SchedulerConfig) -> Result<Self> {
        config.reject_if(config.thresholding, "thresholding", SchedulerKind::Ddpm)?;
        match config.variance_type.as_deref() {
            None | Some("fixed_small") => {}
            Some(other) => {
                return Err(config.error(
                    "variance_type",
                    format!("`{other}` is not supported (only fixed_small)"),
                ))
            }
        }
        let schedule = NoiseSchedule::new(config)?;
        let timesteps = (0..config.num_train_timesteps)
            .rev()
            .map(|t| t as f64)
            .collect();
        Ok(Ddpm {
            config: config.clone(),
            schedule,
            num_inference_steps: None,
            timesteps,
        })
    }

    /// The timestep after `t` in the schedule, -1 after the last.
    fn previous_timestep(&self, t: usize) -> Result<i64> {
        if self.num_inference_steps.is_none() {
            return Ok(t as i64 - 1);
        }
        let index = self
            .timesteps
            .iter()
            .position(|&s| s == t as f64)
            .ok_or_else(|| {
                Error::argument(
                    "timestep",
                    format!("{t} is not in the scheduler's timesteps"),
                )
            })?;
        Ok(self.timesteps.get(index + 1).map_or(-1, |&s| s as i64))
    }
}

impl Scheduler for Ddpm {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::Ddpm
    }

    fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        self.timesteps = integer_timesteps(SchedulerKind::Ddpm, &self.config, num_inference_steps)?;
        self.num_inference_steps = Some(num_inference_steps);
        Ok(())
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        timestep: f64,
        sample: &Tensor,
        noise: &mut Noise,
    ) -> Result<Tensor> {
        let t = self.schedule.train_index(timestep)?;
        let prev_t = self.previous_timestep(t)?;
        let alpha_prod_t = self.schedule.alpha_prod(t);
        let alpha_prod_t_prev = match prev_t {
            0.. => self.schedule.alpha_prod(prev_t as usize),
            _ => 1.0,
        };
        let beta_prod_t = 1.0 - alpha_prod_t;
        let beta_prod_t_prev = 1.0 - alpha_prod_t_prev;
        let current_alpha_t = alpha_prod_t / alpha_prod_t_prev;
        let current_beta_t = 1.0 - current_alpha_t;

        // [b, c, h, w]
        let mut pred_original_sample = match self.config.prediction_type {
            PredictionType::Epsilon => div(
                &(sample - mul(model_output, beta_prod_t.sqrt())?)?,
                alpha_prod_t.sqrt(),
            )?,
            PredictionType::Sample => model_output.clone(),
            PredictionType::VPrediction => {
                (mul(sample, alpha_prod_t.sqrt())? - mul(model_output, beta_prod_t.sqrt())?)?
            }
        };
        if self.config.clip_sample {
            let range = self.config.clip_sample_range;
            pred_original_sample = pred_original_sample.clamp(-range, range)?;
        }

        // The posterior mean: a blend of the predicted x0 and the current sample.
        let pred_original_sample_coeff = alpha_prod_t_prev.sqrt() * current_beta_t / beta_prod_t;
        let current_sample_coeff = current_alpha_t.sqrt() * beta_prod_t_prev / beta_prod_t;
        let pred_prev_sample = (mul(&pred_original_sample, pred_original_sample_coeff)?
            + mul(sample, current_sample_coeff)?)?;
        if t == 0 {
            return Ok(pred_prev_sample);
        }
        // fixed_small: the posterior variance, floored as diffusers does (for its log variants).
        let variance =
            ((1.0 - alpha_prod_t_prev) / (1.0 - alpha_prod_t) * current_beta_t).max(1e-20);
        let variance_noise = draw_noise(noise, model_output)?;
        Ok((pred_prev_sample + mul(&variance_noise, variance.sqrt())?)?)
    }

    fn set_begin_index(&mut self, _begin_index: usize) {}

    fn add_noise(&self, original: &Tensor, noise: &Tensor, timestep: f64) -> Result<Tensor> {
        self.schedule.add_noise_at(original, noise, timestep)
    }
}
