//! UniTune's editing stage: sample from the tuned model with "<token> <edit prompt>", starting
//! from noise or (late start) from the base image's latents noised part-way, then bring the base
//! back where the scene should not change (masks, interpolation).
//!
//! One edit, in order:
//! 1. Guidance ([`GuidanceMode`]): classifier-free guidance against the negative prompt when
//!    `guidance_scale > 1`; prompt guidance against `baseline_prompt` when one is given; both at
//!    once as `eps = eps_u + g (eps_b - eps_u) + w (eps_e - eps_b)`, one UNet batch of 3.
//! 2. Start: `start` is the fraction of the schedule that is run (diffusers' img2img strength).
//!    1.0 starts from pure noise; below it, the base's VAE latent *mean* (deterministic) is
//!    noised to the first kept timestep with the run's initial noise.
//! 3. After every step the latents are pulled toward the base's latents noised to the next
//!    timestep (the clean latents after the last step), with the run's initial noise, as
//!    diffusers' inpainting does: `x = k * base_t + (1 - k) * x`, where the keep weight `k` is 1
//!    outside the mask (at latent resolution) and `latent_blend` inside it (everywhere without a
//!    mask). `latent_blend` compounds over the steps: small values (0.05-0.2) already keep much
//!    of the base's layout and colours; 1 returns the base.
//! 4. Decode; then the pixel-space interpolation `interpolation * base + (1 - interpolation) *
//!    sample` (0 = the sample, 1 = the base); then, with a mask, composite over the base pixels
//!    with the mask feathered outward by `feather` pixels, so pixels farther than that from the
//!    mask are the base's exactly.
//!
//! With [`EditMask::Auto`] the edit runs twice from the same initial noise: unmasked, then masked
//! with the region where the first sample differs from the base (see [`AutoMask`]).

use candle_core::{DType, Tensor};
use image::RgbImage;

use super::denoising::{
    check_sampling, denoise, encode_prompt_checked, prepare_latents, start_steps, Guidance,
    GuidanceMode, Prepared, Start,
};
use super::mask::{AutoMask, Mask};
use super::{Progress, StableDiffusion};
use crate::image_io::{image_to_tensor, tensor_to_image};
use crate::noise::Noise;
use crate::schedulers::{Scheduler, SchedulerKind};
use crate::{Error, Result};

/// The picture an edit starts from and falls back to, encoded once for any number of edits.
pub struct EditBase {
    image: RgbImage,
    /// [1, 3, h, w] f32 in [-1, 1]
    pixels: Tensor,
    /// [1, c, h/8, w/8]: the VAE latent mean, scaled for the UNet.
    latents: Tensor,
}

impl EditBase {
    /// Encodes `image`, whose sides must be multiples of the VAE factor (8); a session's source
    /// image always is.
    pub fn new(sd: &StableDiffusion, image: RgbImage) -> Result<Self> {
        let f = sd.vae_scale_factor() as u32;
        let (w, h) = image.dimensions();
        if w == 0 || h == 0 || w % f != 0 || h % f != 0 {
            return Err(Error::argument(
                "image",
                format!("{w}x{h} is not a positive multiple of {f} on each side"),
            ));
        }
        if w as usize * h as usize > super::MAX_WORK_PIXELS {
            return Err(Error::argument(
                "image",
                format!("{w}x{h} is more than unitune works at (4096x4096)"),
            ));
        }
        let pixels = image_to_tensor(&image, &sd.device)?;
        let posterior = sd.vae.encode(&pixels.to_dtype(sd.dtype)?)?;
        let latents = sd.scale_latents(&posterior.mean)?;
        Ok(Self {
            image,
            pixels,
            latents,
        })
    }

    pub fn image(&self) -> &RgbImage {
        &self.image
    }

    /// `[1, 3, h, w]` in `[-1, 1]`.
    pub fn pixels(&self) -> &Tensor {
        &self.pixels
    }

    /// `[1, c, h/8, w/8]`, scaled.
    pub fn latents(&self) -> &Tensor {
        &self.latents
    }
}

/// Where an edit may change the image.
#[derive(Debug, Clone, Default)]
pub enum EditMask {
    /// Everywhere.
    #[default]
    None,
    /// Inside a given mask (the base's size; white = may change).
    Given(Mask),
    /// Inside the region an unmasked edit changes, estimated and re-sampled.
    Auto(AutoMask),
}

#[derive(Debug, Clone)]
pub struct EditRequest {
    /// The session's rare token, put before `prompt` and `baseline_prompt` unless they hold it.
    pub token: String,
    /// The edit, e.g. "two dogs in a restaurant".
    pub prompt: String,
    /// The unconditional prompt of classifier-free guidance (empty: the empty prompt).
    pub negative_prompt: String,
    /// Classifier-free guidance scale `g`; 1.0 or less turns it off. Default 10: UniTune needs
    /// strong guidance (weak guidance gives the base back) and SD ports use 7-16; much above 16
    /// SD oversaturates.
    pub guidance_scale: f64,
    /// Turns on prompt guidance against this prompt (the token alone: `""`; or a caption of the
    /// base), weighted by `prompt_guidance`.
    pub baseline_prompt: Option<String>,
    /// Prompt guidance weight `w` (default 15: with the default `g` = 10, `w > g` pushes the
    /// edit's difference from the baseline harder than classifier-free guidance alone, which
    /// is what prompt guidance is for).
    pub prompt_guidance: f64,
    /// Fraction of the schedule run, in (0, 1]; 1.0 (default) starts from pure noise.
    pub start: f64,
    /// Pixel-space blend after sampling, in [0, 1]: 0 (default) = the sample, 1 = the base.
    pub interpolation: f64,
    /// Per-step latent pull toward the noised base, in [0, 1]: 0 (default) = off, 1 = the base.
    pub latent_blend: f64,
    pub mask: EditMask,
    /// Width in pixels of the mask's outward feather (default 16, two latents).
    pub feather: usize,
    pub num_inference_steps: usize,
    pub scheduler: SchedulerKind,
}

impl EditRequest {
    pub fn new(token: impl Into<String>, prompt: impl Into<String>) -> Self {
        Self {
            token: token.into(),
            prompt: prompt.into(),
            negative_prompt: String::new(),
            guidance_scale: 10.0,
            baseline_prompt: None,
            prompt_guidance: 15.0,
            start: 1.0,
            interpolation: 0.0,
            latent_blend: 0.0,
            mask: EditMask::None,
            feather: 16,
            num_inference_steps: 50,
            scheduler: SchedulerKind::Ddim,
        }
    }

    /// Checks every knob against `base` without running anything; [`edit`] does it first.
    pub fn check(&self, base: &EditBase) -> Result<()> {
        let (w, h) = base.image.dimensions();
        self.check_size(w as usize, h as usize)
    }

    /// Checks every knob for a base picture of `width` x `height`, before it is even encoded.
    pub fn check_size(&self, width: usize, height: usize) -> Result<()> {
        check_request(width, height, self)
    }

    /// How the predictions combine, from `guidance_scale` and `baseline_prompt`.
    pub fn guidance_mode(&self) -> GuidanceMode {
        let (g, w) = (self.guidance_scale, self.prompt_guidance);
        match (g > 1.0, self.baseline_prompt.is_some()) {
            (false, false) => GuidanceMode::Conditional,
            (true, false) => GuidanceMode::ClassifierFree { scale: g },
            (false, true) => GuidanceMode::Prompt { weight: w },
            (true, true) => GuidanceMode::Combined {
                scale: g,
                weight: w,
            },
        }
    }

    /// The prompts the UNet sees, in the order of [`Self::guidance_mode`].
    pub fn prompts(&self) -> Vec<String> {
        self.named_prompts()
            .into_iter()
            .map(|(prompt, _)| prompt)
            .collect()
    }

    /// The prompts with the names warnings use for them.
    fn named_prompts(&self) -> Vec<(String, &'static str)> {
        let edit = (prompt_with_token(&self.token, &self.prompt), "prompt");
        let baseline = (
            prompt_with_token(&self.token, self.baseline_prompt.as_deref().unwrap_or("")),
            "baseline prompt",
        );
        let negative = (self.negative_prompt.clone(), "negative prompt");
        match self.guidance_mode() {
            GuidanceMode::Conditional => vec![edit],
            GuidanceMode::ClassifierFree { .. } => vec![negative, edit],
            GuidanceMode::Prompt { .. } => vec![baseline, edit],
            GuidanceMode::Combined { .. } => vec![negative, baseline, edit],
        }
    }
}

/// `prompt` with `token` in front, unless one of its words already is the token (case and
/// surrounding punctuation ignored: "a Beikkpic, smiling" has it).
pub fn prompt_with_token(token: &str, prompt: &str) -> String {
    let token_lower = token.to_lowercase();
    let has_token = prompt.to_lowercase().split_whitespace().any(|word| {
        word == token_lower || word.trim_matches(|c: char| c.is_ascii_punctuation()) == token_lower
    });
    match (has_token || token.is_empty(), prompt.trim()) {
        (true, _) => prompt.to_string(),
        (false, "") => token.to_string(),
        (false, rest) => format!("{token} {rest}"),
    }
}

/// What an edit produced.
#[derive(Debug, Clone)]
pub struct EditOutput {
    /// The result `[1, 3, h, w]` in `[-1, 1]`: the sample, interpolated with and composited over
    /// the base.
    pub image: Tensor,
    /// The decoded sample `[1, 3, h, w]` before interpolation and compositing.
    pub sample: Tensor,
    /// The sampler's final latents `[1, c, h/8, w/8]` (of the masked pass with an auto mask).
    pub latents: Tensor,
    /// The feathered mask the sample was composited with (weight of the sample per pixel).
    pub mask: Option<Mask>,
}

/// Runs one edit of `base`. Draws the initial noise `[1, c, h/8, w/8]` first, then whatever the
/// scheduler draws.
pub fn edit(
    sd: &StableDiffusion,
    base: &EditBase,
    request: &EditRequest,
    noise: &mut Noise,
    progress: &mut dyn Progress,
) -> Result<EditOutput> {
    request.check(base)?;
    let embeddings = request
        .named_prompts()
        .iter()
        .map(|(prompt, what)| encode_prompt_checked(sd, prompt, what, progress))
        .collect::<Result<Vec<_>>>()?;
    let guidance = Guidance::new(request.guidance_mode(), &embeddings)?;
    let initial_noise = noise
        .randn(base.latents.shape(), &sd.device)?
        .to_dtype(base.latents.dtype())?;
    let run = Run {
        sd,
        base,
        request,
        guidance: &guidance,
        initial_noise: &initial_noise,
    };

    let mask = match &request.mask {
        EditMask::None => None,
        EditMask::Given(mask) => Some(mask.feathered(request.feather)),
        EditMask::Auto(params) => {
            let (latents, unmasked) = run.sample(None, noise, progress, "auto-mask pass")?;
            let found =
                Mask::from_difference(&tensor_to_image(&unmasked, 0)?, &base.image, params)?;
            if found.is_empty() {
                progress.warn(&format!(
                    "the edit changed no region by more than the auto-mask threshold {}; the result is the base (lower --mask-threshold or strengthen the edit)",
                    params.threshold
                ));
                let empty = found.feathered(request.feather);
                let image = composite(base, &unmasked, request.interpolation, Some(&empty))?;
                return Ok(EditOutput {
                    image,
                    sample: unmasked,
                    latents,
                    mask: Some(empty),
                });
            }
            Some(found.feathered(request.feather))
        }
    };
    let label = if matches!(request.mask, EditMask::Auto(_)) {
        "masked pass"
    } else {
        "editing"
    };
    let (latents, sample) = run.sample(mask.as_ref(), noise, progress, label)?;
    let image = composite(base, &sample, request.interpolation, mask.as_ref())?;
    Ok(EditOutput {
        image,
        sample,
        latents,
        mask,
    })
}

fn check_request(w: usize, h: usize, r: &EditRequest) -> Result<()> {
    check_sampling(r.num_inference_steps, r.guidance_scale)?;
    if !r.prompt_guidance.is_finite() || r.prompt_guidance < 0.0 {
        return Err(Error::argument(
            "prompt-guidance",
            format!("{} must be a finite number >= 0", r.prompt_guidance),
        ));
    }
    if !(r.start > 0.0 && r.start <= 1.0) {
        return Err(Error::argument(
            "start",
            format!("{} is not in (0, 1]", r.start),
        ));
    }
    start_steps(r.num_inference_steps, r.start, "start")?;
    for (name, value) in [
        ("interpolate", r.interpolation),
        ("latent-blend", r.latent_blend),
    ] {
        if !(0.0..=1.0).contains(&value) {
            return Err(Error::argument(name, format!("{value} is not in [0, 1]")));
        }
    }
    match &r.mask {
        EditMask::None => {}
        EditMask::Auto(params) => params.check()?,
        EditMask::Given(mask) => {
            if (mask.width(), mask.height()) != (w, h) {
                return Err(Error::argument(
                    "mask",
                    format!(
                        "{}x{} does not match the image's {w}x{h}",
                        mask.width(),
                        mask.height()
                    ),
                ));
            }
            if mask.is_empty() {
                return Err(Error::argument(
                    "mask",
                    "has no white pixel, so nothing may change",
                ));
            }
        }
    }
    Ok(())
}

/// What every sampling pass of one edit shares.
struct Run<'a> {
    sd: &'a StableDiffusion,
    base: &'a EditBase,
    request: &'a EditRequest,
    guidance: &'a Guidance,
    /// [1, c, h/8, w/8]: the noise of the start and of the noised base between steps.
    initial_noise: &'a Tensor,
}

impl Run<'_> {
    /// One pass of the sampler, constrained by `mask` (feathered, pixel resolution); returns
    /// the final latents and the decoded sample `[1, 3, h, w]`, f32.
    fn sample(
        &self,
        mask: Option<&Mask>,
        noise: &mut Noise,
        progress: &mut dyn Progress,
        label: &str,
    ) -> Result<(Tensor, Tensor)> {
        let (sd, r, base) = (self.sd, self.request, self.base);
        let start = if r.start < 1.0 {
            Start::Latents {
                latents: &base.latents,
                fraction: r.start,
                name: "start",
            }
        } else {
            Start::Noise
        };
        let Prepared {
            mut scheduler,
            timesteps,
            latents,
        } = prepare_latents(
            sd,
            r.scheduler,
            r.num_inference_steps,
            start,
            self.initial_noise,
        )?;

        let keep = self.keep_weights(mask)?;
        let mut pull_to_base =
            |scheduler: &dyn Scheduler, i: usize, latents: Tensor| -> Result<Tensor> {
                let Some(keep) = &keep else {
                    return Ok(latents);
                };
                let base_t = match timesteps.get(i + 1) {
                    Some(&next) => scheduler.add_noise(&base.latents, self.initial_noise, next)?,
                    None => base.latents.clone(),
                };
                let kept = base_t.broadcast_mul(keep)?;
                Ok((kept + latents.broadcast_mul(&(1.0 - keep)?)?)?)
            };
        let latents = denoise(
            sd,
            scheduler.as_mut(),
            &timesteps,
            latents,
            self.guidance,
            noise,
            progress,
            label,
            Some(&mut pull_to_base),
        )?;
        let decoded = sd.decode_latents(&latents)?.to_dtype(DType::F32)?;
        Ok((latents, decoded))
    }

    /// The keep weight `k` per latent `[1, 1, h/8, w/8]` (see the module doc), or `None` when
    /// nothing is pulled toward the base.
    fn keep_weights(&self, mask: Option<&Mask>) -> Result<Option<Tensor>> {
        let (sd, a) = (self.sd, self.request.latent_blend);
        let (_, _, h, w) = self.base.latents.dims4()?;
        let keep = match mask {
            None if a == 0.0 => return Ok(None),
            None => Tensor::full(a as f32, (1, 1, h, w), &sd.device)?,
            // 1 - m (1 - a): 1 outside the mask, a inside.
            Some(mask) => {
                (1.0 - (mask.latent(sd.vae_scale_factor())?.to_tensor(&sd.device)? * (1.0 - a))?)?
            }
        };
        Ok(Some(keep.to_dtype(self.base.latents.dtype())?))
    }
}

/// `interpolation * base + (1 - interpolation) * sample`, then with a mask `m`:
/// `(1 - m) * base + m * that`. Where `m` is 0, or the interpolation 1, the base comes out exactly.
fn composite(
    base: &EditBase,
    sample: &Tensor,
    interpolation: f64,
    mask: Option<&Mask>,
) -> Result<Tensor> {
    let mut edited = sample.clone();
    if interpolation > 0.0 {
        edited = ((&base.pixels * interpolation)? + (sample * (1.0 - interpolation))?)?;
    }
    let Some(mask) = mask else { return Ok(edited) };
    let m = mask.to_tensor(sample.device())?; // [1, 1, h, w]
    Ok((base.pixels.broadcast_mul(&(1.0 - &m)?)? + edited.broadcast_mul(&m)?)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_goes_first_unless_present() {
        assert_eq!(
            prompt_with_token("beikkpic", "two dogs"),
            "beikkpic two dogs"
        );
        assert_eq!(
            prompt_with_token("beikkpic", "  two dogs "),
            "beikkpic two dogs"
        );
        assert_eq!(
            prompt_with_token("beikkpic", "a Beikkpic, smiling"),
            "a Beikkpic, smiling"
        );
        assert_eq!(
            prompt_with_token("beikkpic", "beikkpicture"),
            "beikkpic beikkpicture"
        );
        assert_eq!(prompt_with_token("beikkpic", ""), "beikkpic");
        assert_eq!(prompt_with_token("", "a dog"), "a dog");
    }

    #[test]
    fn guidance_mode_and_prompt_order_follow_the_knobs() {
        let mut r = EditRequest::new("tok", "a hat");
        r.negative_prompt = "blurry".into();
        assert_eq!(
            r.guidance_mode(),
            GuidanceMode::ClassifierFree { scale: 10.0 }
        );
        assert_eq!(r.prompts(), ["blurry", "tok a hat"]);
        r.baseline_prompt = Some(String::new());
        assert_eq!(
            r.guidance_mode(),
            GuidanceMode::Combined {
                scale: 10.0,
                weight: 15.0
            }
        );
        assert_eq!(r.prompts(), ["blurry", "tok", "tok a hat"]);
        r.guidance_scale = 1.0;
        assert_eq!(r.guidance_mode(), GuidanceMode::Prompt { weight: 15.0 });
        assert_eq!(r.prompts(), ["tok", "tok a hat"]);
        r.baseline_prompt = None;
        assert_eq!(r.prompts(), ["tok a hat"]);
    }
}
