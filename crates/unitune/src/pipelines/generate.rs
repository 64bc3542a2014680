//! txt2img and img2img, as diffusers' `StableDiffusionPipeline` and
//! `StableDiffusionImg2ImgPipeline`: check the inputs, encode the prompts, prepare the latents
//! (pure noise, or the encoded image noised to the strength's starting step), run the denoising
//! loop with classifier-free guidance, decode.
//!
//! The loop ([`denoise`]), the guidance ([`Guidance`]) and the partial schedule
//! ([`start_timesteps`]) are shared with the edit pipeline, which adds prompt guidance and
//! rewrites the latents between steps (masks, blending).

use candle_core::Tensor;

use super::{Progress, StableDiffusion};
use crate::noise::Noise;
use crate::schedulers::{self, Scheduler, SchedulerKind};
use crate::{Error, Result};

#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub prompt: String,
    /// The unconditional prompt of classifier-free guidance; empty means the empty prompt.
    pub negative_prompt: String,
    pub width: usize,
    pub height: usize,
    pub num_inference_steps: usize,
    /// 1.0 or less runs the conditional pass alone.
    pub guidance_scale: f64,
    pub scheduler: SchedulerKind,
    /// img2img: the image `[1, 3, height, width]` in `[-1, 1]`.
    pub image: Option<Tensor>,
    /// img2img: how much of the schedule is re-run, diffusers' `strength` (1.0 ignores the image).
    pub strength: f64,
    /// Replaces the initial noise draw `[1, c, height/8, width/8]`, as diffusers' `latents=`
    /// (for img2img: the noise added to the image's latents).
    pub latents: Option<Tensor>,
}

impl GenerateRequest {
    pub fn new(prompt: impl Into<String>) -> Self {
        Self {
            prompt: prompt.into(),
            negative_prompt: String::new(),
            width: 512,
            height: 512,
            num_inference_steps: 50,
            guidance_scale: 7.5,
            scheduler: SchedulerKind::Ddim,
            image: None,
            strength: 0.8,
            latents: None,
        }
    }
}

/// Runs the pipeline; returns the image `[1, 3, height, width]` in `[-1, 1]`.
pub fn generate(
    sd: &StableDiffusion,
    request: &GenerateRequest,
    noise: &mut Noise,
    progress: &mut dyn Progress,
) -> Result<Tensor> {
    let latent_shape = check_inputs(sd, request)?;
    let guidance = encode_prompts(sd, request, progress)?;

    let mut scheduler = schedulers::build(request.scheduler, &sd.scheduler_config)?;
    scheduler.set_timesteps(request.num_inference_steps)?;
    let timesteps = match &request.image {
        None => scheduler.timesteps().to_vec(),
        Some(_) => start_timesteps(
            scheduler.as_mut(),
            request.num_inference_steps,
            request.strength,
            "strength",
        )?,
    };

    let initial_noise = |noise: &mut Noise| match &request.latents {
        Some(latents) => Ok(latents.to_device(&sd.device)?),
        None => noise.randn(latent_shape, &sd.device),
    };
    let latents = match &request.image {
        None => (initial_noise(noise)? * scheduler.init_noise_sigma())?,
        Some(image) => {
            let init = sd.encode_image(image, noise)?;
            scheduler.add_noise(&init, &initial_noise(noise)?, timesteps[0])?
        }
    };

    let latents = denoise(
        sd,
        scheduler.as_mut(),
        &timesteps,
        latents,
        &guidance,
        noise,
        progress,
        "denoising",
        None,
    )?;
    sd.decode_latents(&latents)
}

/// Validates the request; returns the latent shape.
fn check_inputs(sd: &StableDiffusion, r: &GenerateRequest) -> Result<(usize, usize, usize, usize)> {
    let f = sd.vae_scale_factor();
    for (name, value) in [("width", r.width), ("height", r.height)] {
        if value == 0 || value % f != 0 {
            return Err(Error::argument(
                name,
                format!("{value} is not a positive multiple of {f}"),
            ));
        }
    }
    check_sampling(r.num_inference_steps, r.guidance_scale)?;
    let shape = (1, sd.vae_config.latent_channels, r.height / f, r.width / f);
    if let Some(image) = &r.image {
        if !(r.strength > 0.0 && r.strength <= 1.0) {
            return Err(Error::argument(
                "strength",
                format!("{} is not in (0, 1]", r.strength),
            ));
        }
        if image.dims() != [1, 3, r.height, r.width] {
            return Err(Error::argument(
                "image",
                format!(
                    "shape {:?} does not match {}x{}",
                    image.dims(),
                    r.width,
                    r.height
                ),
            ));
        }
    }
    if let Some(latents) = &r.latents {
        if latents.dims() != [shape.0, shape.1, shape.2, shape.3] {
            return Err(Error::argument(
                "init-noise",
                format!(
                    "tensor `latents` has shape {:?}, expected {:?} for {}x{}",
                    latents.dims(),
                    shape,
                    r.width,
                    r.height
                ),
            ));
        }
    }
    Ok(shape)
}

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

/// The prompt's guidance: classifier-free against the negative prompt when the scale is above 1
/// (as diffusers' `do_classifier_free_guidance`), else the prompt alone.
fn encode_prompts(
    sd: &StableDiffusion,
    r: &GenerateRequest,
    progress: &mut dyn Progress,
) -> Result<Guidance> {
    let cond = encode_prompt_checked(sd, &r.prompt, "prompt", progress)?;
    if r.guidance_scale <= 1.0 {
        return Guidance::new(GuidanceMode::Conditional, &[cond]);
    }
    let uncond = encode_prompt_checked(sd, &r.negative_prompt, "negative prompt", progress)?;
    Guidance::new(
        GuidanceMode::ClassifierFree {
            scale: r.guidance_scale,
        },
        &[uncond, cond],
    )
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
pub(crate) fn start_timesteps(
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
pub(crate) type AfterStep<'a> = &'a mut dyn FnMut(&dyn Scheduler, usize, Tensor) -> Result<Tensor>;

/// The denoising loop of every pipeline: from `latents` at `timesteps[0]`, one guided scheduler
/// step per timestep, `after_step` (if any) after each. Checks for Ctrl-C between steps.
#[allow(clippy::too_many_arguments)]
pub(crate) fn denoise(
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
    for (i, &t) in timesteps.iter().enumerate() {
        if progress.cancelled() {
            return Err(Error::Interrupted);
        }
        let noise_pred = guidance.noise_pred(sd, scheduler, &latents, t)?;
        latents = scheduler.step(&noise_pred, t, &latents, noise)?;
        if let Some(after_step) = after_step.as_mut() {
            latents = after_step(scheduler, i, latents)?;
        }
        progress.step(None);
    }
    progress.finish();
    Ok(latents)
}
