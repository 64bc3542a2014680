//! Ancestral sampling with Euler steps (k-diffusion's `sample_euler_ancestral`), diffusers'
//! `EulerAncestralDiscreteScheduler`: each step goes down to a lower sigma deterministically and
//! adds fresh noise back up to the next sigma.

use candle_core::{DType, Tensor};

use super::euler::{init_noise_sigma, input_scale, interp_sigma, pred_original_sample};
use super::{
    check_steps, div, draw_noise, mul, spaced_timesteps, NoiseSchedule, PredictionType, Scheduler,
    SchedulerConfig, SchedulerKind, StepIndex, TimestepSpacing,
};
use crate::noise::Noise;
use crate::Result;

#[derive(Debug, Clone)]
pub struct EulerAncestralDiscrete {
    config: SchedulerConfig,
    /// sigma of each training timestep, float32 values.
    train_sigmas: Vec<f32>,
    timesteps: Vec<f64>,
    /// One per timestep plus a final 0, float32 as diffusers stores them.
    sigmas: Vec<f32>,
    index: StepIndex,
}

impl EulerAncestralDiscrete {
    pub fn new(config: &SchedulerConfig) -> Result<Self> {
        if config.prediction_type == PredictionType::Sample {
            return Err(config.error(
                "prediction_type",
                "`sample` is not supported by the euler-a scheduler",
            ));
        }
        let train_sigmas = NoiseSchedule::new(config)?.train_sigmas();
        // Before set_timesteps diffusers runs all training timesteps, down to sigma 0.
        let timesteps = (0..config.num_train_timesteps)
            .rev()
            .map(|t| t as f64)
            .collect();
        let sigmas = train_sigmas.iter().rev().cloned().chain([0.0]).collect();
        Ok(EulerAncestralDiscrete {
            config: config.clone(),
            train_sigmas,
            timesteps,
            sigmas,
            index: StepIndex::default(),
        })
    }
}

impl Scheduler for EulerAncestralDiscrete {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::EulerAncestral
    }

    fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        check_steps(num_inference_steps, &self.config)?;
        let c = &self.config;
        let spacing = c.timestep_spacing_for(SchedulerKind::EulerAncestral);
        self.timesteps = spaced_timesteps(
            spacing,
            c.num_train_timesteps,
            num_inference_steps,
            c.steps_offset,
        )
        .into_iter()
        .map(|t| t as f32 as f64)
        .collect();
        self.sigmas = self
            .timesteps
            .iter()
            .map(|&t| interp_sigma(&self.train_sigmas, t))
            .chain([0.0])
            .collect();
        self.index = StepIndex::default();
        Ok(())
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        let spacing = self
            .config
            .timestep_spacing_for(SchedulerKind::EulerAncestral);
        init_noise_sigma(&self.sigmas, spacing == TimestepSpacing::Leading)
    }

    fn scale_model_input(&self, sample: &Tensor, timestep: f64) -> Result<Tensor> {
        let sigma = self.sigmas[self.index.current(&self.timesteps, timestep, None)?];
        div(sample, input_scale(sigma))
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        timestep: f64,
        sample: &Tensor,
        noise: &mut Noise,
    ) -> Result<Tensor> {
        let i = self.index.current(&self.timesteps, timestep, None)?;
        let (sigma_from, sigma_to) = (self.sigmas[i], self.sigmas[i + 1]);
        let sample = sample.to_dtype(DType::F32)?;
        let model_output_f32 = model_output.to_dtype(DType::F32)?;
        let pred = pred_original_sample(
            self.config.prediction_type,
            &model_output_f32,
            &sample,
            sigma_from,
        )?;

        // Split the move to sigma_to into a deterministic part down to sigma_down and fresh noise
        // of std sigma_up, with sigma_down^2 + sigma_up^2 = sigma_to^2 (float32 as in diffusers).
        let (from, to) = (sigma_from * sigma_from, sigma_to * sigma_to);
        let sigma_up = (to * (from - to) / from).sqrt();
        let sigma_down = (to - sigma_up * sigma_up).sqrt();
        let derivative = div(&(&sample - pred)?, sigma_from)?;
        let dt = sigma_down - sigma_from;
        let prev_sample = (&sample + mul(&derivative, dt)?)?;
        let step_noise = draw_noise(noise, &model_output_f32)?;
        let prev_sample = (prev_sample + mul(&step_noise, sigma_up)?)?;
        self.index.step = Some(i + 1);
        Ok(prev_sample.to_dtype(model_output.dtype())?)
    }

    fn set_begin_index(&mut self, begin_index: usize) {
        self.index.begin = Some(begin_index);
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, timestep: f64) -> Result<Tensor> {
        let sigma = self.sigmas[self.index.for_add_noise(&self.timesteps, timestep, None)?];
        Ok((original + mul(noise, sigma)?)?)
    }
}
