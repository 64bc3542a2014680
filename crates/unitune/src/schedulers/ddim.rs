//! DDIM (Song et al. 2020), diffusers' `DDIMScheduler`: deterministic for eta = 0, with eta > 0
//! adding a fraction of DDPM's noise at each step.

use candle_core::Tensor;

use super::{
    div, draw_noise, integer_timesteps, mul, steps_not_set, NoiseSchedule, PredictionType,
    Scheduler, SchedulerConfig, SchedulerKind,
};
use crate::noise::Noise;
use crate::Result;

#[derive(Debug, Clone)]
pub struct Ddim {
    config: SchedulerConfig,
    schedule: NoiseSchedule,
    /// alpha_prod before the first training timestep: 1, or alphas_cumprod[0].
    final_alpha_cumprod: f32,
    /// The weight of DDPM's noise added at each step (0: deterministic DDIM, 1: DDPM's variance).
    eta: f64,
    num_inference_steps: Option<usize>,
    timesteps: Vec<f64>,
}

impl Ddim {
    pub fn new(config: &SchedulerConfig) -> Result<Self> {
        config.reject_if(config.thresholding, "thresholding", SchedulerKind::Ddim)?;
        if !(config.eta >= 0.0 && config.eta.is_finite()) {
            return Err(config.error(
                "eta",
                format!("{} must be a finite number >= 0", config.eta),
            ));
        }
        let schedule = NoiseSchedule::new(config)?;
        let final_alpha_cumprod = match config.set_alpha_to_one {
            true => 1.0,
            false => schedule.alpha_prod(0),
        };
        let timesteps = (0..config.num_train_timesteps)
            .rev()
            .map(|t| t as f64)
            .collect();
        Ok(Ddim {
            config: config.clone(),
            schedule,
            final_alpha_cumprod,
            eta: config.eta,
            num_inference_steps: None,
            timesteps,
        })
    }
}

impl Scheduler for Ddim {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::Ddim
    }

    fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        self.timesteps = integer_timesteps(SchedulerKind::Ddim, &self.config, num_inference_steps)?;
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
        let n = self.num_inference_steps.ok_or_else(steps_not_set)?;
        let t = self.schedule.train_index(timestep)?;
        // diffusers steps back by num_train / n whatever the spacing.
        let prev_t = t as i64 - (self.config.num_train_timesteps / n) as i64;
        let alpha_prod_t = self.schedule.alpha_prod(t);
        let alpha_prod_t_prev = match prev_t {
            0.. => self.schedule.alpha_prod(prev_t as usize),
            _ => self.final_alpha_cumprod,
        };
        let beta_prod_t = 1.0 - alpha_prod_t;
        let (sqrt_alpha, sqrt_beta) = (alpha_prod_t.sqrt(), beta_prod_t.sqrt());

        // [b, c, h, w] each.
        let (mut pred_original_sample, pred_epsilon) = match self.config.prediction_type {
            PredictionType::Epsilon => {
                let x0 = div(&(sample - mul(model_output, sqrt_beta)?)?, sqrt_alpha)?;
                (x0, model_output.clone())
            }
            PredictionType::Sample => {
                let eps = div(&(sample - mul(model_output, sqrt_alpha)?)?, sqrt_beta)?;
                (model_output.clone(), eps)
            }
            PredictionType::VPrediction => {
                let x0 = (mul(sample, sqrt_alpha)? - mul(model_output, sqrt_beta)?)?;
                let eps = (mul(model_output, sqrt_alpha)? + mul(sample, sqrt_beta)?)?;
                (x0, eps)
            }
        };
        if self.config.clip_sample {
            let range = self.config.clip_sample_range;
            pred_original_sample = pred_original_sample.clamp(-range, range)?;
        }

        let variance =
            (1.0 - alpha_prod_t_prev) / beta_prod_t * (1.0 - alpha_prod_t / alpha_prod_t_prev);
        let std_dev_t = self.eta as f32 * variance.sqrt();
        let direction_coeff = (1.0 - alpha_prod_t_prev - std_dev_t * std_dev_t).sqrt();
        let pred_sample_direction = mul(&pred_epsilon, direction_coeff)?;
        let prev_sample =
            (mul(&pred_original_sample, alpha_prod_t_prev.sqrt())? + pred_sample_direction)?;
        if self.eta > 0.0 {
            let variance_noise = draw_noise(noise, model_output)?;
            return Ok((prev_sample + mul(&variance_noise, std_dev_t)?)?);
        }
        Ok(prev_sample)
    }

    fn set_begin_index(&mut self, _begin_index: usize) {}

    fn add_noise(&self, original: &Tensor, noise: &Tensor, timestep: f64) -> Result<Tensor> {
        self.schedule.add_noise_at(original, noise, timestep)
    }
}
