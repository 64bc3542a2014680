//! Fine-tunes an autoencoder's decoder alone on world scenes, as Stable Diffusion's ft-MSE VAE
//! was made: the encoder, and so the latent space the denoiser learnt, stays exactly as it is,
//! while the round trip gets sharper. Loss: MSE + L1 between the picture and the decoding of its
//! latent mean, on whole pictures. Writes `OUT/vae` (the whole autoencoder, f32) every `--every`
//! steps with the held-out PSNR printed; swap it into the model folder when done.
//!
//!     cargo run --release -p unitune-lab --example finetune_decoder -- MODEL_DIR OUT STEPS [LR] [BATCH]

use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use image::GrayImage;
use rand::{Rng, SeedableRng};
use unitune::atomic;
use unitune::image_io::{image_to_tensor, tensor_to_image};
use unitune::models::vae::{AutoencoderKl, VaeConfig};
use unitune::train::OptimizerKind;
use unitune::weights::{export, WeightStore};
use unitune::{Error, Result};
use unitune_lab::world::score::{psnr, Part};
use unitune_lab::world::{SceneConfig, World};

/// Held-out scenes for the PSNR: the same world seed as `vae_psnr`.
const HELD_OUT_SEED: u64 = 1_000_003;
const EVERY: usize = 250;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 4 {
        eprintln!("usage: finetune_decoder MODEL_DIR OUT STEPS [LR] [BATCH]");
        std::process::exit(2);
    }
    let bad =
        |what: &'static str| move |e: &dyn std::fmt::Display| Error::argument(what, e.to_string());
    let model = std::path::PathBuf::from(&args[1]);
    let out = std::path::PathBuf::from(&args[2]);
    let steps: usize = args[3].parse().map_err(|e| bad("STEPS")(&e))?;
    let lr: f64 = args
        .get(4)
        .map_or(Ok(2e-4), |s| s.parse())
        .map_err(|e| bad("LR")(&e))?;
    let batch: usize = args
        .get(5)
        .map_or(Ok(8), |s| s.parse())
        .map_err(|e| bad("BATCH")(&e))?;
    let device = Device::Cpu;
    let config = VaeConfig::from_file(&model.join("vae/config.json"))?;
    let decoder = |name: &str| name.starts_with("decoder.") || name.starts_with("post_quant_conv.");
    let store =
        WeightStore::open(&model.join("vae"), None, &device)?.with_trainable(Arc::new(decoder));
    let vae = store.build(DType::F32, &device, |vb| AutoencoderKl::new(vb, &config))?;
    let vars = store.trainable_vars();
    let mut optimizer =
        OptimizerKind::AdamW.build(vars.iter().map(|(_, v)| v.clone()).collect(), lr)?;
    // Training scenes from the pretraining world (seed 0), past the ones it trained on.
    let train = World::new(scene_config(), 0)?;
    let held_out = World::new(scene_config(), HELD_OUT_SEED)?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    println!(
        "step 0: held-out PSNR {:.2} dB",
        held_out_psnr(&vae, &held_out, &device)?
    );
    let started = Instant::now();
    let mut recent = vec![];
    for step in 1..=steps {
        let pictures: Vec<Tensor> = (0..batch)
            .map(|_| {
                let (_, picture, _) = train.sample(rng.gen_range(1 << 20..1 << 40));
                image_to_tensor(&picture, &device)
            })
            .collect::<Result<_>>()?;
        let x = Tensor::cat(&pictures, 0)?;
        let latents = vae.encode(&x)?.mode().detach();
        let error = (vae.decode(&latents)? - &x)?;
        let loss = (error.sqr()?.mean_all()? + error.abs()?.mean_all()?)?;
        // Cosine decay to a tenth, after a short warmup.
        let progress = step as f64 / steps as f64;
        let warm = (step as f64 / 50.0).min(1.0);
        optimizer.set_learning_rate(
            lr * warm * (0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())),
        );
        optimizer.step(&loss.backward()?)?;
        recent.push(loss.to_scalar::<f32>()?);
        if step % EVERY == 0 || step == steps {
            let mean = recent.iter().sum::<f32>() / recent.len() as f32;
            recent.clear();
            let db = held_out_psnr(&vae, &held_out, &device)?;
            println!(
                "step {step}: loss {mean:.5}, held-out PSNR {db:.2} dB, {:.0} s",
                started.elapsed().as_secs_f64()
            );
            save(&store, &vars, &config, &out)?;
        }
    }
    Ok(())
}

fn scene_config() -> SceneConfig {
    SceneConfig {
        max_objects: 3,
        ..SceneConfig::default()
    }
}

/// Mean PSNR of the round trip on 32 held-out scenes.
fn held_out_psnr(vae: &AutoencoderKl, world: &World, device: &Device) -> Result<f64> {
    let mut sum = 0.0;
    for index in 0..32 {
        let (_, picture, _) = world.sample(index);
        let latents = vae.encode(&image_to_tensor(&picture, device)?)?.mode();
        let back = tensor_to_image(&vae.decode(&latents)?, 0)?;
        let all = GrayImage::from_pixel(picture.width(), picture.height(), image::Luma([255]));
        sum += psnr(&back, &picture, &all, Part::All)?.unwrap_or(0.0);
    }
    Ok(sum / 32.0)
}

/// Writes the autoencoder (the frozen encoder as loaded, the decoder as trained) to `out/vae`.
fn save(
    store: &WeightStore,
    vars: &[(String, Var)],
    config: &VaeConfig,
    out: &std::path::Path,
) -> Result<()> {
    let mut tensors = store.tensors().clone();
    for (name, var) in vars {
        tensors.insert(name.clone(), var.as_tensor().copy()?);
    }
    atomic::replace_dir(out, |tmp| {
        export::write_vae(&tmp.join("vae"), config, &tensors, DType::F32)
    })
}
