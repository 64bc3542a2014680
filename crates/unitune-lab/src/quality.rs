//! What a trained model can do on held-out world scenes, apart from editing: how much of a picture
//! its autoencoder keeps, and how well plain generation follows a caption. The built-in model's
//! floor tests and the `vae_psnr` example measure with these.

use image::GrayImage;
use unitune::image_io::{image_to_tensor, tensor_to_image};
use unitune::noise::Noise;
use unitune::pipelines::{generate, GenerateRequest, NoProgress, StableDiffusion};
use unitune::Result;

use crate::bench_edits::HELD_OUT_START;
use crate::world::follow::{caption_followed, Following};
use crate::world::score::{psnr, Part};
use crate::world::World;

/// PSNR (dB) of the autoencoder's round trip, decode(mean of encode(x)), of held-out scenes
/// `HELD_OUT_START..+scenes` of `world`: the ceiling of what any latent edit can keep.
pub fn round_trip_psnr(sd: &StableDiffusion, world: &World, scenes: usize) -> Result<Vec<f64>> {
    let mut all = Vec::with_capacity(scenes);
    for i in 0..scenes as u64 {
        let (_, picture, _) = world.sample(HELD_OUT_START + i);
        let x = image_to_tensor(&picture, &sd.device)?;
        let latent = sd.vae.encode(&x)?.mode();
        let back = tensor_to_image(&sd.vae.decode(&latent)?, 0)?;
        let everywhere =
            GrayImage::from_pixel(picture.width(), picture.height(), image::Luma([255]));
        all.extend(psnr(&back, &picture, &everywhere, Part::All)?);
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
