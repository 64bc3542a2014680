//! DPM-Solver++ multistep (Lu et al. 2022), diffusers' `DPMSolverMultistepScheduler` with
//! `algorithm_type="dpmsolver++"`: the model output is turned into an x0 prediction, and each step
//! integrates the ODE in log-SNR (lambda) with the last one or two x0 predictions. "2M" is
//! solver_order 2; the first step, and the last ones when configured, are first order.

use candle_core::{DType, Tensor};

use super::{
    check_steps, div, mul, np_arange_down, np_linspace, steps_not_set, FinalSigmasType,
    NoiseSchedule, PredictionType, Scheduler, SchedulerConfig, SchedulerKind, StepIndex,
    TimestepSpacing,
};
use crate::noise::Noise;
use crate::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SolverType {
    Midpoint,
    Heun,
}

#[derive(Debug, Clone)]
pub struct DpmSolverMultistep {
    config: SchedulerConfig,
    solver_type: SolverType,
    /// sigma = sqrt((1 - acp) / acp) of each training timestep, float32 values.
    train_sigmas: Vec<f32>,
    /// Log-SNR of each training timestep, float32 as diffusers computes it.
    train_lambdas: Vec<f32>,
    num_inference_steps: Option<usize>,
    timesteps: Vec<f64>,
    /// One per timestep plus the final one, float32 as diffusers stores them.
    sigmas: Vec<f32>,
    /// The last `solver_order` x0 predictions, oldest first; [b, c, h, w] f32 each.
    model_outputs: Vec<Option<Tensor>>,
    lower_order_nums: usize,
    index: StepIndex,
}

impl DpmSolverMultistep {
    pub fn new(config: &SchedulerConfig) -> Result<Self> {
        let kind = SchedulerKind::DpmSolverMultistep;
        // diffusers maps the old "deis" to dpmsolver++, and logrho / bh1 / bh2 to midpoint.
        if !matches!(config.algorithm_type.as_str(), "dpmsolver++" | "deis") {
            let message = format!(
                "`{}` is not supported (only dpmsolver++)",
                config.algorithm_type
            );
            return Err(config.error("algorithm_type", message));
        }
        let solver_type = match config.solver_type.as_str() {
            "midpoint" | "logrho" | "bh1" | "bh2" => SolverType::Midpoint,
            "heun" => SolverType::Heun,
            other => return Err(config.error("solver_type", format!("unknown value `{other}`"))),
        };
        if !(1..=2).contains(&config.solver_order) {
            let message = format!("{} is not supported (1 or 2)", config.solver_order);
            return Err(config.error("solver_order", message));
        }
        config.reject_if(config.thresholding, "thresholding", kind)?;
        config.reject_if(config.use_karras_sigmas, "use_karras_sigmas", kind)?;
        config.reject_if(
            config.use_exponential_sigmas,
            "use_exponential_sigmas",
            kind,
        )?;
        config.reject_if(config.use_beta_sigmas, "use_beta_sigmas", kind)?;
        config.reject_if(config.use_lu_lambdas, "use_lu_lambdas", kind)?;
        config.reject_if(config.use_flow_sigmas, "use_flow_sigmas", kind)?;
        if let Some(v @ ("learned" | "learned_range")) = config.variance_type.as_deref() {
            return Err(config.error("variance_type", format!("`{v}` is not supported")));
        }
        let schedule = NoiseSchedule::new(config)?;
        let train_lambdas = schedule
            .alphas_cumprod()
            .iter()
            .map(|&a| {
                let a = a as f32;
                a.sqrt().ln() - (1.0 - a).sqrt().ln()
            })
            .collect();
        let timesteps = (0..config.num_train_timesteps)
            .rev()
            .map(|t| t as f64)
            .collect();
        Ok(DpmSolverMultistep {
            config: config.clone(),
            solver_type,
            train_sigmas: schedule.train_sigmas(),
            train_lambdas,
            num_inference_steps: None,
            timesteps,
            sigmas: Vec::new(),
            model_outputs: vec![None; config.solver_order],
            lower_order_nums: 0,
            index: StepIndex::default(),
        })
    }

    /// Timesteps for `n` steps: like the other schedulers', but spread over n + 1 points whose
    /// last (timestep 0) is dropped, and stopping at `lambda_min_clipped`.
    fn spaced_timesteps(&self, n: usize) -> Vec<f64> {
        let c = &self.config;
        let clip = c.lambda_min_clipped as f32;
        // Lambdas fall with t: count those below the clip from the end (torch.searchsorted).
        let clipped = self
            .train_lambdas
            .iter()
            .rev()
            .take_while(|&&l| l < clip)
            .count();
        let last_timestep = c.num_train_timesteps - clipped;
        match c.timestep_spacing_for(SchedulerKind::DpmSolverMultistep) {
            TimestepSpacing::Linspace => {
                let points = np_linspace(0.0, last_timestep as f64 - 1.0, n + 1);
                points[1..]
                    .iter()
                    .rev()
                    .map(|t| t.round_ties_even())
                    .collect()
            }
            TimestepSpacing::Leading => {
                let ratio = last_timestep / (n + 1);
                (1..=n)
                    .rev()
                    .map(|i| (i * ratio + c.steps_offset) as f64)
                    .collect()
            }
            TimestepSpacing::Trailing => {
                let ratio = c.num_train_timesteps as f64 / n as f64;
                np_arange_down(last_timestep as f64, ratio, n)
                    .into_iter()
                    .map(|t| t.round_ties_even() - 1.0)
                    .collect()
            }
        }
    }

    /// The x0 prediction at sigma `sigma` (diffusers' `convert_model_output` for dpmsolver++).
    fn convert_model_output(
        &self,
        model_output: &Tensor,
        sample: &Tensor,
        sigma: f32,
    ) -> Result<Tensor> {
        let (alpha_t, sigma_t) = alpha_sigma(sigma);
        Ok(match self.config.prediction_type {
            PredictionType::Epsilon => div(&(sample - mul(model_output, sigma_t)?)?, alpha_t)?,
            PredictionType::Sample => model_output.clone(),
            PredictionType::VPrediction => (mul(sample, alpha_t)? - mul(model_output, sigma_t)?)?,
        })
    }

    /// One DDIM-like step from sigmas[i] to sigmas[i + 1] with the x0 prediction `d0`.
    fn first_order_update(&self, d0: &Tensor, sample: &Tensor, i: usize) -> Result<Tensor> {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i + 1]);
        let (alpha_s, sigma_s) = alpha_sigma(self.sigmas[i]);
        // lambda_t is +inf at a final sigma of 0: exp(-h) = 0 and the step lands on d0.
        let h = lambda(alpha_t, sigma_t) - lambda(alpha_s, sigma_s);
        let c_sample = sigma_t / sigma_s;
        let c_d0 = alpha_t * ((-h).exp() - 1.0);
        Ok((mul(sample, c_sample)? - mul(d0, c_d0)?)?)
    }

    /// The two-step update from sigmas[i] to sigmas[i + 1] using the x0 predictions at i - 1, i.
    fn second_order_update(
        &self,
        m1: &Tensor,
        m0: &Tensor,
        sample: &Tensor,
        i: usize,
    ) -> Result<Tensor> {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i + 1]);
        let (alpha_s0, sigma_s0) = alpha_sigma(self.sigmas[i]);
        let (alpha_s1, sigma_s1) = alpha_sigma(self.sigmas[i - 1]);
        let lambda_t = lambda(alpha_t, sigma_t);
        let lambda_s0 = lambda(alpha_s0, sigma_s0);
        let lambda_s1 = lambda(alpha_s1, sigma_s1);
        let h = lambda_t - lambda_s0;
        let r0 = (lambda_s0 - lambda_s1) / h;
        // D1 is the finite difference of x0 predictions, per unit of h.
        let d1 = mul(&(m0 - m1)?, 1.0 / r0)?;
        let c_sample = sigma_t / sigma_s0;
        let c_d0 = alpha_t * ((-h).exp() - 1.0);
        let x_t = (mul(sample, c_sample)? - mul(m0, c_d0)?)?;
        Ok(match self.solver_type {
            SolverType::Midpoint => (x_t - mul(&d1, 0.5 * c_d0)?)?,
            SolverType::Heun => (x_t + mul(&d1, alpha_t * (((-h).exp() - 1.0) / h + 1.0))?)?,
        })
    }
}

/// (alpha_t, sigma_t) of the VP process at noise level sigma, float32 as in diffusers.
fn alpha_sigma(sigma: f32) -> (f32, f32) {
    let alpha_t = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha_t, sigma * alpha_t)
}

/// Log-SNR: log(alpha_t) - log(sigma_t).
fn lambda(alpha_t: f32, sigma_t: f32) -> f32 {
    alpha_t.ln() - sigma_t.ln()
}

impl Scheduler for DpmSolverMultistep {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::DpmSolverMultistep
    }

    fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        check_steps(num_inference_steps, &self.config)?;
        let timesteps = self.spaced_timesteps(num_inference_steps);
        if timesteps
            .iter()
            .any(|&t| !(0.0..self.config.num_train_timesteps as f64).contains(&t))
        {
            return Err(Error::argument(
                "steps",
                format!("{num_inference_steps} steps give timesteps {timesteps:?}"),
            ));
        }
        let sigma_last = match self.config.final_sigmas_type {
            FinalSigmasType::Zero => 0.0,
            FinalSigmasType::SigmaMin => self.train_sigmas[0],
        };
        self.sigmas = timesteps
            .iter()
            .map(|&t| self.train_sigmas[t as usize])
            .chain([sigma_last])
            .collect();
        self.num_inference_steps = Some(timesteps.len());
        self.timesteps = timesteps;
        self.model_outputs = vec![None; self.config.solver_order];
        self.lower_order_nums = 0;
        self.index = StepIndex::default();
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
        _noise: &mut Noise,
    ) -> Result<Tensor> {
        let n = self.num_inference_steps.ok_or_else(steps_not_set)?;
        // A timestep not in the schedule means the last step, as in diffusers.
        let i = self.index.current(&self.timesteps, timestep, Some(n - 1))?;
        let c = &self.config;
        let few_steps = c.lower_order_final && n < 15;
        let lower_order_final = i == n - 1
            && (c.euler_at_final || few_steps || c.final_sigmas_type == FinalSigmasType::Zero);

        let x0 = self
            .convert_model_output(model_output, sample, self.sigmas[i])?
            .to_dtype(DType::F32)?;
        self.model_outputs.remove(0);
        self.model_outputs.push(Some(x0.clone()));
        let sample = sample.to_dtype(DType::F32)?;

        // Second order needs the previous x0 (so never on the first step). diffusers' third-order
        // branch and its `lower_order_second` (which only demotes third order) do not arise.
        let first_order = self.lower_order_nums < 1 || lower_order_final;
        let prev_sample = match (&self.model_outputs[..], first_order) {
            ([Some(m1), Some(m0)], false) => self.second_order_update(m1, m0, &sample, i)?,
            _ => self.first_order_update(&x0, &sample, i)?,
        };
        self.lower_order_nums = (self.lower_order_nums + 1).min(c.solver_order);
        self.index.step = Some(i + 1);
        Ok(prev_sample.to_dtype(model_output.dtype())?)
    }

    fn set_begin_index(&mut self, begin_index: usize) {
        self.index.begin = Some(begin_index);
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, timestep: f64) -> Result<Tensor> {
        let n = self.num_inference_steps.ok_or_else(steps_not_set)?;
        let sigma =
            self.sigmas[self
                .index
                .for_add_noise(&self.timesteps, timestep, Some(n - 1))?];
        let (alpha_t, sigma_t) = alpha_sigma(sigma);
        Ok((mul(original, alpha_t)? + mul(noise, sigma_t)?)?)
    }
}
