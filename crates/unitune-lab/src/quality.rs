//! What a trained model can do on held-out world scenes, apart from editing: how much of a picture
//! its autoencoder keeps, and how well plain generation follows a caption. The built-in model's
//! floor tests and the `model_quality` example measure with these.

use image::GrayImage;
use unitune::image_io::{image_to_tensor, tensor_to_image};
use unitune::noise::Noise;
use unitune::pipelines::{generate, GenerateRequest, NoProgress, StableDiffusion};
use unitune::Result;

use crate::bench_edits::HELD_OUT_START;
use crate::world::follow::{caption_followed, Following};
use crate::world::score::{psnr, Part};
use crate::world::World;

/// One scene through the autoencoder, decode(mean of encode(x)).
#[derive(Debug, Clone, Copy)]
pub struct RoundTrip {
    /// PSNR (dB) against the scene.
    pub psnr: f64,
    /// How the decoded picture follows the scene's caption: the ceiling of what a denoiser
    /// drawing in this autoencoder's latents can be scored (a shape lost here is lost to every
    /// latent method).
    pub following: Following,
}

/// The autoencoder's round trip of held-out scenes `HELD_OUT_START..+scenes` of `world`: the
/// ceiling of what any latent edit can keep.
pub fn round_trip(sd: &StableDiffusion, world: &World, scenes: usize) -> Result<Vec<RoundTrip>> {
    let mut all = Vec::with_capacity(scenes);
    for i in 0..scenes as u64 {
        let (scene, picture, _) = world.sample(HELD_OUT_START + i);
        let x = image_to_tensor(&picture, &sd.device)?;
        let latent = sd.vae.encode(&x)?.mode();
        let back = tensor_to_image(&sd.vae.decode(&latent)?, 0)?;
        let everywhere =
            GrayImage::from_pixel(picture.width(), picture.height(), image::Luma([255]));
        if let Some(psnr) = psnr(&back, &picture, &everywhere, Part::All)? {
            let following = caption_followed(&scene, &back, world.config())?;
            all.push(RoundTrip { psnr, following });
        }
    }
    Ok(all)
}

/// Plain generation (txt2img at `guidance_scale`, `steps` DDIM steps, noise seeded by `seed` and
/// the scene) from the captions of held-out scenes `HELD_OUT_START..+scenes` of `world`, each
/// picture scored attribute by attribute against its scene.
pub fn caption_following(
    sd: &StableDiffusion,
    world: &World,
    scenes: usize,
    guidance_scale: f64,
    steps: usize,
    seed: u64,
) -> Result<Vec<Following>> {
    let config = world.config();
    let mut all = Vec::with_capacity(scenes);
    for i in 0..scenes as u64 {
        let (scene, _, caption) = world.sample(HELD_OUT_START + i);
        let request = GenerateRequest {
            width: config.width as usize,
            height: config.height as usize,
            num_inference_steps: steps,
            guidance_scale,
            ..GenerateRequest::new(caption)
        };
        let mut noise = Noise::seeded(seed.wrapping_mul(1_000_003).wrapping_add(i));
        let image = tensor_to_image(&generate(sd, &request, &mut noise, &mut NoProgress)?, 0)?;
        all.push(caption_followed(&scene, &image, config)?);
    }
    Ok(all)
}
