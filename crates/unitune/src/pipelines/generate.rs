//! txt2img and img2img, as diffusers' `StableDiffusionPipeline` and
//! `StableDiffusionImg2ImgPipeline`: check the inputs, encode the prompts, prepare the latents
//! (pure noise, or the encoded image noised to the strength's starting step), run the denoising
//! loop with classifier-free guidance, decode.

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
    let guided = request.guidance_scale > 1.0;
    let embeddings = encode_prompts(sd, request, guided, progress)?;

    let mut scheduler = schedulers::build(request.scheduler, &sd.scheduler_config)?;
    scheduler.set_timesteps(request.num_inference_steps)?;
    let timesteps = match &request.image {
        None => scheduler.timesteps().to_vec(),
        Some(_) => img2img_timesteps(scheduler.as_mut(), request)?,
    };

    let initial_noise = |noise: &mut Noise| match &request.latents {
        Some(latents) => Ok(latents.to_device(&sd.device)?),
        None => noise.randn(latent_shape.clone(), &sd.device),
    };
    let mut latents = match &request.image {
        None => (initial_noise(noise)? * scheduler.init_noise_sigma())?,
        Some(image) => {
            let init = sd.encode_image(image, noise)?;
            scheduler.add_noise(&init, &initial_noise(noise)?, timesteps[0])?
        }
    };

    progress.start("denoising", timesteps.len());
    for &t in &timesteps {
        if progress.cancelled() {
            return Err(Error::Interrupted);
        }
        let noise_pred = guided_noise_pred(sd, scheduler.as_ref(), &latents, t, &embeddings, request.guidance_scale)?;
        latents = scheduler.step(&noise_pred, t, &latents, noise)?;
        progress.step(None);
    }
    progress.finish();
    sd.decode_latents(&latents)
}

/// Validates the request; returns the latent shape.
fn check_inputs(sd: &StableDiffusion, r: &GenerateRequest) -> Result<(usize, usize, usize, usize)> {
    let f = sd.vae_scale_factor();
    for (name, value) in [("width", r.width), ("height", r.height)] {
        if value == 0 || value % f != 0 {
            return Err(Error::argument(name, format!("{value} is not a positive multiple of {f}")));
        }
    }
    if r.num_inference_steps == 0 {
        return Err(Error::argument("steps", "must be at least 1"));
    }
    if !r.guidance_scale.is_finite() || r.guidance_scale < 0.0 {
        return Err(Error::argument("guidance", format!("{} must be a finite number >= 0", r.guidance_scale)));
    }
    let shape = (1, sd.vae_config.latent_channels, r.height / f, r.width / f);
    if let Some(image) = &r.image {
        if !(r.strength > 0.0 && r.strength <= 1.0) {
            return Err(Error::argument("strength", format!("{} is not in (0, 1]", r.strength)));
        }
        if image.dims() != [1, 3, r.height, r.width] {
            return Err(Error::argument("image", format!("shape {:?} does not match {}x{}", image.dims(), r.width, r.height)));
        }
    }
    if let Some(latents) = &r.latents {
        if latents.dims() != [shape.0, shape.1, shape.2, shape.3] {
            return Err(Error::argument(
                "init-noise",
                format!("tensor `latents` has shape {:?}, expected {:?} for {}x{}", latents.dims(), shape, r.width, r.height),
            ));
        }
    }
    Ok(shape)
}

/// `[2, 77, d]` (negative, positive) with guidance, else `[1, 77, d]`; warns about truncation.
fn encode_prompts(sd: &StableDiffusion, r: &GenerateRequest, guided: bool, progress: &mut dyn Progress) -> Result<Tensor> {
    let mut encode = |prompt: &str, what: &str| -> Result<Tensor> {
        let (embedding, cut) = sd.encode_prompt(prompt)?;
        if let Some(cut) = cut {
            let max = sd.tokenizer.max_length();
            progress.warn(&format!("{what} truncated to {max} tokens; dropped: \"{cut}\""));
        }
        Ok(embedding)
    };
    let cond = encode(&r.prompt, "prompt")?;
    if !guided {
        return Ok(cond);
    }
    let uncond = encode(&r.negative_prompt, "negative prompt")?;
    Ok(Tensor::cat(&[uncond, cond], 0)?)
}

/// diffusers' `get_timesteps`: keep the last `floor(steps * strength)` timesteps.
fn img2img_timesteps(scheduler: &mut dyn Scheduler, r: &GenerateRequest) -> Result<Vec<f64>> {
    let steps = r.num_inference_steps;
    let init_timestep = ((steps as f64 * r.strength) as usize).min(steps);
    if init_timestep == 0 {
        return Err(Error::argument(
            "strength",
            format!("{} with {steps} steps leaves no denoising step; raise --strength or --steps", r.strength),
        ));
    }
    let t_start = steps - init_timestep;
    scheduler.set_begin_index(t_start);
    Ok(scheduler.timesteps()[t_start..].to_vec())
}

/// The UNet's prediction at `t`, guided: `uncond + g * (cond - uncond)` when `embeddings` holds both.
fn guided_noise_pred(
    sd: &StableDiffusion,
    scheduler: &dyn Scheduler,
    latents: &Tensor,
    t: f64,
    embeddings: &Tensor,
    guidance_scale: f64,
) -> Result<Tensor> {
    let batch = embeddings.dim(0)?;
    let model_input = Tensor::cat(&vec![latents; batch], 0)?;
    let model_input = scheduler.scale_model_input(&model_input, t)?;
    let timesteps = Tensor::full(t as f32, batch, &sd.device)?;
    let pred = sd.unet.forward(&model_input, &timesteps, embeddings)?;
    if batch == 1 {
        return Ok(pred);
    }
    let (uncond, cond) = (pred.narrow(0, 0, 1)?, pred.narrow(0, 1, 1)?);
    Ok((&uncond + ((cond - &uncond)? * guidance_scale)?)?)
}
