//! Euler's method on the probability-flow ODE in sigma space (Karras et al. 2022, Algorithm 2
//! without churn), diffusers' `EulerDiscreteScheduler`. The sample lives at scale sigma, so the
//! model sees it divided by sqrt(sigma^2 + 1).

use candle_core::{DType, Tensor};

use super::{
    check_steps, div, mul, spaced_timesteps, FinalSigmasType, NoiseSchedule, PredictionType,
    Scheduler, SchedulerConfig, SchedulerKind, StepIndex, TimestepSpacing,
};
use crate::noise::Noise;
use crate::Result;

#[derive(Debug, Clone)]
pub struct EulerDiscrete {
    config: SchedulerConfig,
    /// sigma of each training timestep, float32 values.
    train_sigmas: Vec<f32>,
    timesteps: Vec<f64>,
    /// One per timestep plus the final one, float32 as diffusers stores them.
    sigmas: Vec<f32>,
    index: StepIndex,
}

impl EulerDiscrete {
    pub fn new(config: &SchedulerConfig) -> Result<Self> {
        let kind = SchedulerKind::Euler;
        config.reject_if(config.use_karras_sigmas, "use_karras_sigmas", kind)?;
        config.reject_if(
            config.use_exponential_sigmas,
            "use_exponential_sigmas",
            kind,
        )?;
        config.reject_if(config.use_beta_sigmas, "use_beta_sigmas", kind)?;
        if config.interpolation_type != "linear" {
            let message = format!(
                "`{}` is not supported (only linear)",
                config.interpolation_type
            );
            return Err(config.error("interpolation_type", message));
        }
        match (config.timestep_type.as_str(), config.prediction_type) {
            ("continuous", PredictionType::VPrediction) => {
                return Err(config.error(
                    "timestep_type",
                    "`continuous` with v_prediction is not supported",
                ))
            }
            ("discrete" | "continuous", _) => {}
            (other, _) => {
                return Err(config.error("timestep_type", format!("unknown value `{other}`")))
            }
        }
        let train_sigmas = NoiseSchedule::new(config)?.train_sigmas();
        // Before set_timesteps diffusers runs all training timesteps, down to sigma 0.
        let n = config.num_train_timesteps;
        let timesteps = (0..n).rev().map(|t| t as f64).collect();
        let sigmas = train_sigmas.iter().rev().cloned().chain([0.0]).collect();
        Ok(EulerDiscrete {
            config: config.clone(),
            train_sigmas,
            timesteps,
            sigmas,
            index: StepIndex::default(),
        })
    }
}

/// `np.interp(t, arange(len), table)` in f64 at a timestep in [0, len - 1], stored as float32.
pub(super) fn interp_sigma(table: &[f32], t: f64) -> f32 {
    let j = t.floor() as usize;
    if t == j as f64 || j + 1 >= table.len() {
        return table[j.min(table.len() - 1)];
    }
    let slope = table[j + 1] as f64 - table[j] as f64;
    (slope * (t - j as f64) + table[j] as f64) as f32
}

/// sqrt(sigma^2 + 1), by which the model input is divided (the sample's std at sigma).
pub(super) fn input_scale(sigma: f32) -> f32 {
    (sigma * sigma + 1.0).sqrt()
}

/// The sigma-based schedulers' init_noise_sigma: the largest sigma, or sqrt(sigma^2 + 1) of it
/// for leading spacing (whose first timestep is not the noisiest).
pub(super) fn init_noise_sigma(sigmas: &[f32], leading: bool) -> f64 {
    let max = sigmas.iter().cloned().fold(f32::MIN, f32::max);
    (if leading { input_scale(max) } else { max }) as f64
}

/// The x0 prediction of the sigma-based Euler schedulers from an f32 `sample` at level `sigma`.
pub(super) fn pred_original_sample(
    prediction_type: PredictionType,
    model_output: &Tensor,
    sample: &Tensor,
    sigma: f32,
) -> Result<Tensor> {
    Ok(match prediction_type {
        PredictionType::Epsilon => (sample - mul(model_output, sigma)?)?,
        PredictionType::VPrediction => {
            let c_out = -sigma / input_scale(sigma);
            (mul(model_output, c_out)? + div(sample, sigma * sigma + 1.0)?)?
        }
        PredictionType::Sample => model_output.clone(),
    })
}

impl Scheduler for EulerDiscrete {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::Euler
    }

    fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        check_steps(num_inference_steps, &self.config)?;
        let c = &self.config;
        let spacing = c.timestep_spacing_for(SchedulerKind::Euler);
        // diffusers keeps these timesteps as float32 (linspace ones are fractional).
        self.timesteps = spaced_timesteps(
            spacing,
            c.num_train_timesteps,
            num_inference_steps,
            c.steps_offset,
        )
        .into_iter()
        .map(|t| t as f32 as f64)
        .collect();
        let sigma_last = match c.final_sigmas_type {
            FinalSigmasType::Zero => 0.0,
            FinalSigmasType::SigmaMin => self.train_sigmas[0],
        };
        let sigmas = self
            .timesteps
            .iter()
            .map(|&t| interp_sigma(&self.train_sigmas, t));
        self.sigmas = sigmas.chain([sigma_last]).collect();
        self.index = StepIndex::default();
        Ok(())
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        let leading =
            self.config.timestep_spacing_for(SchedulerKind::Euler) == TimestepSpacing::Leading;
        init_noise_sigma(&self.sigmas, leading)
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
        _noise: &mut Noise,
    ) -> Result<Tensor> {
        let i = self.index.current(&self.timesteps, timestep, None)?;
        let (sigma, sigma_next) = (self.sigmas[i], self.sigmas[i + 1]);
        // Without churn gamma is 0 and sigma_hat is sigma.
        let sample = sample.to_dtype(DType::F32)?;
        let model_output_f32 = model_output.to_dtype(DType::F32)?;
        let pred = pred_original_sample(
            self.config.prediction_type,
            &model_output_f32,
            &sample,
            sigma,
        )?;
        let derivative = div(&(&sample - pred)?, sigma)?;
        let dt = sigma_next - sigma;
        let prev_sample = (sample + mul(&derivative, dt)?)?;
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
