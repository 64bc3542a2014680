//! txt2img and img2img, as diffusers' `StableDiffusionPipeline` and
//! `StableDiffusionImg2ImgPipeline`: check the inputs, encode the prompts, prepare the latents
//! (pure noise, or the encoded image noised to the strength's starting step), run the denoising
//! loop with classifier-free guidance, decode.
//!
//! The stages come from [`super::denoising`], shared with the edit pipeline.

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::denoising::{
    check_sampling, denoise, encode_prompt_checked, prepare_latents, start_steps, Guidance,
    GuidanceMode, Prepared, Start,
};
use super::{Progress, StableDiffusion};
use crate::noise::Noise;
use crate::schedulers::SchedulerKind;
use crate::weights::read_safetensors;
use crate::{Error, Result};

/// Reads an `--init-noise` file: a safetensors file whose float tensor `latents` (finite values,
/// as every tensor [`read_safetensors`] reads) replaces the initial noise; its shape is checked
/// against the request by [`generate`].
pub fn read_init_noise(path: &Path, device: &Device) -> Result<Tensor> {
    let mut tensors = read_safetensors(&[path.to_path_buf()], device)?;
    let latents = tensors
        .remove("latents")
        .ok_or_else(|| Error::weights(path, "no tensor named `latents`"))?;
    let latents = latents.to_dtype(DType::F32)?;
    if latents.rank() != 4 {
        return Err(Error::weights(
            path,
            format!(
                "tensor `latents` has shape {:?}, expected [1, channels, height/8, width/8]",
                latents.dims()
            ),
        ));
    }
    Ok(latents)
}

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

    let initial_noise = |noise: &mut Noise| match &request.latents {
        Some(latents) => Ok(latents.to_device(&sd.device)?),
        None => noise.randn(latent_shape, &sd.device),
    };
    // img2img draws the image's posterior sample before the initial noise, as diffusers does.
    let init = match &request.image {
        Some(image) => Some(sd.encode_image(image, noise)?),
        None => None,
    };
    let start = match &init {
        None => Start::Noise,
        Some(latents) => Start::Latents {
            latents,
            fraction: request.strength,
            name: "strength",
        },
    };
    let Prepared {
        mut scheduler,
        timesteps,
        latents,
    } = prepare_latents(
        sd,
        request.scheduler,
        request.num_inference_steps,
        start,
        &initial_noise(noise)?,
    )?;

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
    sd.check_size(r.width, r.height)?;
    check_sampling(r.num_inference_steps, r.guidance_scale)?;
    let shape = (1, sd.vae_config.latent_channels, r.height / f, r.width / f);
    if let Some(image) = &r.image {
        if !(r.strength > 0.0 && r.strength <= 1.0) {
            return Err(Error::argument(
                "strength",
                format!("{} is not in (0, 1]", r.strength),
            ));
        }
        start_steps(r.num_inference_steps, r.strength, "strength")?;
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
