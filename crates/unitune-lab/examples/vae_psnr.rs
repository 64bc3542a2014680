//! The autoencoder's round trip on held-out world scenes: PSNR of decode(mean of encode(x))
//! against x, the ceiling of what any latent edit can keep (issue 13 asks for 35 dB).
//!
//!     cargo run --release -p unitune-lab --example vae_psnr -- MODEL_DIR [SCENES] [SEED] [MAX_OBJECTS]

use candle_core::{DType, Device};
use image::GrayImage;
use unitune::image_io::{image_to_tensor, tensor_to_image};
use unitune::models::vae::{AutoencoderKl, VaeConfig};
use unitune::weights::WeightStore;
use unitune_lab::world::score::{psnr, Part};
use unitune_lab::world::{SceneConfig, World};

fn main() -> unitune::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let Some(model) = args.get(1).map(std::path::PathBuf::from) else {
        eprintln!("usage: vae_psnr MODEL_DIR [SCENES] [SEED] [MAX_OBJECTS]");
        std::process::exit(2);
    };
    let number = |i: usize, default: u64| args.get(i).map_or(Ok(default), |s| s.parse::<u64>());
    let bad = |e: std::num::ParseIntError| unitune::Error::argument("arguments", e.to_string());
    let scenes = number(2, 64).map_err(bad)?;
    let seed = number(3, 1_000_003).map_err(bad)?;
    let max_objects = number(4, 3).map_err(bad)? as usize;
    let device = Device::Cpu;
    let config = VaeConfig::from_file(&model.join("vae/config.json"))?;
    let vae =
        WeightStore::open(&model.join("vae"), None, &device)?
            .build(DType::F32, &device, |vb| AutoencoderKl::new(vb, &config))?;
    let world = World::new(
        SceneConfig {
            max_objects,
            ..SceneConfig::default()
        },
        seed,
    )?;
    let mut all = vec![];
    for index in 0..scenes {
        let (_, picture, _) = world.sample(index);
        let x = image_to_tensor(&picture, &device)?;
        let latent = vae.encode(&x)?.mode();
        let back = tensor_to_image(&vae.decode(&latent)?, 0)?;
        let everywhere =
            GrayImage::from_pixel(picture.width(), picture.height(), image::Luma([255]));
        all.extend(psnr(&back, &picture, &everywhere, Part::All)?);
    }
    all.sort_by(f64::total_cmp);
    let mean = all.iter().sum::<f64>() / all.len() as f64;
    println!(
        "{}: {} held-out scenes (world seed {seed}, up to {max_objects} objects): PSNR mean {mean:.2} dB, min {:.2}, median {:.2}",
        model.display(),
        all.len(),
        all[0],
        all[all.len() / 2]
    );
    Ok(())
}
