//! The denoising stage every sampling pipeline shares (txt2img, img2img, UniTune's edit), named as
//! in diffusers: encode the prompts into a [`Guidance`] (how the UNet's predictions for several
//! prompts combine: classifier-free, prompt guidance, or both), [`prepare_latents`] (pure noise
//! over the whole schedule, or an image's latents noised to where a partial schedule starts), then
//! the loop ([`denoise`]) with an optional hook after every step ([`AfterStep`]) through which the
//! edit pipeline pulls the latents toward its base picture.

use candle_core::Tensor;
use image::RgbImage;

use super::{Progress, StableDiffusion};
use crate::image_io::tensor_to_image;
use crate::noise::Noise;
use crate::schedulers::{self, NoiseSchedule, Scheduler, SchedulerKind};
use crate::{Error, Result};

/// The checks every sampling pipeline makes on its step count and guidance scale.
pub(crate) fn check_sampling(num_inference_steps: usize, guidance_scale: f64) -> Result<()> {
    if num_inference_steps == 0 {
        return Err(Error::argument("steps", "must be at least 1"));
    }
    if !guidance_scale.is_finite() || guidance_scale < 0.0 {
        return Err(Error::argument(
            "guidance",
            format!("{guidance_scale} must be a finite number >= 0"),
        ));
    }
    Ok(())
}

/// `[1, 77, d]` embeddings of `prompt`; warns (naming it `what`) when it was truncated.
pub(crate) fn encode_prompt_checked(
    sd: &StableDiffusion,
    prompt: &str,
    what: &str,
    progress: &mut dyn Progress,
) -> Result<Tensor> {
    let (embedding, cut) = sd.encode_prompt(prompt)?;
    if let Some(cut) = cut {
        let max = sd.tokenizer.max_length();
        progress.warn(&format!(
            "{what} truncated to {max} tokens; dropped: \"{cut}\""
        ));
    }
    Ok(embedding)
}

/// diffusers' `get_timesteps` for a run that starts part-way through the schedule (img2img's
/// strength, edit's late start): keep the last `floor(steps * fraction)` timesteps and tell the
/// scheduler where it begins. `name` is the argument the fraction came from.
fn start_timesteps(
    scheduler: &mut dyn Scheduler,
    steps: usize,
    fraction: f64,
    name: &str,
) -> Result<Vec<f64>> {
    let t_start = steps - start_steps(steps, fraction, name)?;
    scheduler.set_begin_index(t_start);
    Ok(scheduler.timesteps()[t_start..].to_vec())
}

/// How many of `steps` a run starting at `fraction` takes (diffusers' `init_timestep`); an
/// error naming `name` when that is none.
pub(crate) fn start_steps(steps: usize, fraction: f64, name: &str) -> Result<usize> {
    let init_timestep = ((steps as f64 * fraction) as usize).min(steps);
    if init_timestep == 0 {
        return Err(Error::argument(
            name,
            format!(
                "{fraction} with {steps} steps leaves no denoising step; raise --{name} or --steps"
            ),
        ));
    }
    Ok(init_timestep)
}

/// Where a denoising run starts.
#[derive(Debug, Clone, Copy)]
pub enum Start<'a> {
    /// Pure noise (scaled by the scheduler's `init_noise_sigma`), the whole schedule.
    Noise,
    /// `latents` (scaled, `[1, c, h/8, w/8]`) noised to the first kept timestep of a run over the
    /// last `fraction` of the schedule: img2img's `strength`, the edit's late start. `name` is the
    /// argument the fraction came from, for errors.
    Latents {
        latents: &'a Tensor,
        fraction: f64,
        name: &'a str,
    },
}

/// A scheduler set up for a run, the timesteps it will take and the latents it starts from.
pub struct Prepared {
    pub scheduler: Box<dyn Scheduler>,
    pub timesteps: Vec<f64>,
    pub latents: Tensor,
}

/// diffusers' `prepare_latents` with the scheduler set-up before it: a `kind` scheduler over
/// `steps` steps from the model's scheduler config, and the initial latents from `noise`
/// (`[1, c, h/8, w/8]`, drawn by the caller so that each pipeline keeps its order of draws).
pub fn prepare_latents(
    sd: &StableDiffusion,
    kind: SchedulerKind,
    steps: usize,
    start: Start,
    noise: &Tensor,
) -> Result<Prepared> {
    let mut scheduler = schedulers::build(kind, &sd.scheduler_config)?;
    scheduler.set_timesteps(steps)?;
    let (timesteps, latents) = match start {
        Start::Noise => (
            scheduler.timesteps().to_vec(),
            (noise * scheduler.init_noise_sigma())?,
        ),
        Start::Latents {
            latents,
            fraction,
            name,
        } => {
            let timesteps = start_timesteps(scheduler.as_mut(), steps, fraction, name)?;
            let noised = scheduler.add_noise(latents, noise, timesteps[0])?;
            (timesteps, noised)
        }
    };
    Ok(Prepared {
        scheduler,
        timesteps,
        latents,
    })
}

/// How the UNet's predictions for the prompts of one batch combine into the prediction the
/// scheduler steps with. Subscripts: u = unconditional (negative) prompt, c = the prompt, b = a
/// baseline prompt, e = the edit prompt.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum GuidanceMode {
    /// One prompt: `eps = eps_c`.
    Conditional,
    /// Classifier-free guidance over (uncond, cond): `eps = eps_u + g (eps_c - eps_u)`.
    ClassifierFree { scale: f64 },
    /// Prompt guidance over (baseline, edit): `eps = eps_b + w (eps_e - eps_b)`; UniTune's
    /// guidance toward what the edit prompt adds to the baseline.
    Prompt { weight: f64 },
    /// Both over (uncond, baseline, edit):
    /// `eps = eps_u + g (eps_b - eps_u) + w (eps_e - eps_b)`. Classifier-free guidance toward
    /// the baseline plus prompt guidance along the edit's direction: `w = g` is plain
    /// classifier-free guidance on the edit prompt, `g = 1` is prompt guidance alone, `w > g`
    /// pushes the edit harder than classifier-free guidance would.
    Combined { scale: f64, weight: f64 },
}

impl GuidanceMode {
    /// How many prompts (UNet batch entries) the mode combines.
    pub fn prompt_count(self) -> usize {
        match self {
            Self::Conditional => 1,
            Self::ClassifierFree { .. } | Self::Prompt { .. } => 2,
            Self::Combined { .. } => 3,
        }
    }
}

/// The text conditioning of a denoising run: every prompt's embedding, run as one UNet batch,
/// and how the predictions combine.
#[derive(Debug, Clone)]
pub struct Guidance {
    /// [n, 77, d] in the order [`GuidanceMode`] lists them.
    embeddings: Tensor,
    mode: GuidanceMode,
}

impl Guidance {
    /// `embeddings` are `[1, 77, d]` each, in the order `mode` lists them.
    pub fn new(mode: GuidanceMode, embeddings: &[Tensor]) -> Result<Self> {
        if embeddings.len() != mode.prompt_count() {
            return Err(Error::argument(
                "guidance",
                format!(
                    "{mode:?} combines {} prompts, got {}",
                    mode.prompt_count(),
                    embeddings.len()
                ),
            ));
        }
        Ok(Self {
            embeddings: Tensor::cat(embeddings, 0)?,
            mode,
        })
    }

    pub fn mode(&self) -> GuidanceMode {
        self.mode
    }

    /// The guided model output at `t` for `latents` `[1, c, h, w]`.
    pub fn noise_pred(
        &self,
        sd: &StableDiffusion,
        scheduler: &dyn Scheduler,
        latents: &Tensor,
        t: f64,
    ) -> Result<Tensor> {
        let batch = self.embeddings.dim(0)?;
        let model_input = Tensor::cat(&vec![latents; batch], 0)?;
        let model_input = scheduler.scale_model_input(&model_input, t)?;
        let timesteps = Tensor::full(t as f32, batch, &sd.device)?;
        let pred = sd
            .unet
            .forward(&model_input, &timesteps, &self.embeddings)?; // [n, c, h, w]
        let part = |i: usize| pred.narrow(0, i, 1);
        Ok(match self.mode {
            GuidanceMode::Conditional => pred,
            GuidanceMode::ClassifierFree { scale: g } => {
                let (uncond, cond) = (part(0)?, part(1)?);
                (&uncond + ((cond - &uncond)? * g)?)?
            }
            GuidanceMode::Prompt { weight: w } => {
                let (baseline, edit) = (part(0)?, part(1)?);
                (&baseline + ((edit - &baseline)? * w)?)?
            }
            GuidanceMode::Combined {
                scale: g,
                weight: w,
            } => {
                let (uncond, baseline, edit) = (part(0)?, part(1)?, part(2)?);
                let toward_baseline = ((&baseline - &uncond)? * g)?;
                let toward_edit = ((edit - &baseline)? * w)?;
                ((&uncond + toward_baseline)? + toward_edit)?
            }
        })
    }
}

/// Rewrites the latents after a step: `(scheduler, index of the step just taken, latents)`.
pub type AfterStep<'a> = &'a mut dyn FnMut(&dyn Scheduler, usize, Tensor) -> Result<Tensor>;

/// The denoising loop of every pipeline: from `latents` at `timesteps[0]`, one guided scheduler
/// step per timestep, `after_step` (if any) after each. Checks for Ctrl-C between steps.
#[allow(clippy::too_many_arguments)]
pub fn denoise(
    sd: &StableDiffusion,
    scheduler: &mut dyn Scheduler,
    timesteps: &[f64],
    mut latents: Tensor,
    guidance: &Guidance,
    noise: &mut Noise,
    progress: &mut dyn Progress,
    label: &str,
    mut after_step: Option<AfterStep>,
) -> Result<Tensor> {
    progress.start(label, timesteps.len());
    let mut previews = Previews::new(sd, progress.preview_every())?;
    for (i, &t) in timesteps.iter().enumerate() {
        if progress.cancelled() {
            return Err(Error::Interrupted);
        }
        let noise_pred = guidance.noise_pred(sd, scheduler, &latents, t)?;
        if let Some(previews) = previews.as_mut().filter(|p| p.due(i, timesteps.len())) {
            let image = previews.decode(sd, scheduler, &latents, &noise_pred, t)?;
            progress.preview(i, &image);
        }
        latents = scheduler.step(&noise_pred, t, &latents, noise)?;
        if let Some(after_step) = after_step.as_mut() {
            latents = after_step(scheduler, i, latents)?;
        }
        progress.step(None);
    }
    progress.finish();
    Ok(latents)
}

/// The predicted clean pictures a [`Progress`] asked to see, every `every` steps but the last
/// (whose result follows at once).
struct Previews {
    every: usize,
    schedule: NoiseSchedule,
}

impl Previews {
    fn new(sd: &StableDiffusion, every: Option<usize>) -> Result<Option<Self>> {
        match every.filter(|&k| k > 0) {
            None => Ok(None),
            Some(every) => Ok(Some(Self {
                every,
                schedule: NoiseSchedule::new(&sd.scheduler_config)?,
            })),
        }
    }

    fn due(&self, step: usize, steps: usize) -> bool {
        (step + 1).is_multiple_of(self.every) && step + 1 < steps
    }

    /// Decodes the clean latents that the guided `noise_pred` predicts from `latents` at `t`.
    fn decode(
        &self,
        sd: &StableDiffusion,
        scheduler: &dyn Scheduler,
        latents: &Tensor,
        noise_pred: &Tensor,
        t: f64,
    ) -> Result<RgbImage> {
        let sample = scheduler.scale_model_input(latents, t)?;
        let prediction = sd.scheduler_config.prediction_type;
        let x0 = self
            .schedule
            .pred_original_sample(noise_pred, t, &sample, prediction)?;
        tensor_to_image(&sd.decode_latents(&x0)?, 0)
    }
}
