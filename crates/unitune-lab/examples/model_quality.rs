//! A trained model on held-out world scenes: the autoencoder's round trip (issue 13 asks for
//! 35 dB) and plain generation's caption-following, attribute by attribute.
//!
//!     cargo run --release -p unitune-lab --example model_quality -- MODEL_DIR [SCENES] [SEED] [GUIDANCE]

use unitune::pipelines::{LoadOptions, StableDiffusion};
use unitune_lab::quality::{caption_following, round_trip};
use unitune_lab::world::follow::{Following, FollowingCounts};
use unitune_lab::world::{SceneConfig, World};

fn main() -> unitune::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let Some(model) = args.get(1).map(std::path::PathBuf::from) else {
        eprintln!("usage: model_quality MODEL_DIR [SCENES] [SEED] [GUIDANCE]");
        std::process::exit(2);
    };
    let arg = |i: usize, default: &str| args.get(i).map_or(default.to_string(), String::clone);
    let bad = |e: String| unitune::Error::argument("arguments", e);
    let scenes: usize = arg(2, "64").parse().map_err(|e| bad(format!("{e}")))?;
    let seed: u64 = arg(3, "0").parse().map_err(|e| bad(format!("{e}")))?;
    let guidance: f64 = arg(4, "8").parse().map_err(|e| bad(format!("{e}")))?;
    let sd = StableDiffusion::load(&model, &LoadOptions::default())?;
    let world = World::new(SceneConfig::default(), seed)?;

    let trips = round_trip(&sd, &world, scenes)?;
    let mut db: Vec<f64> = trips.iter().map(|r| r.psnr).collect();
    db.sort_by(f64::total_cmp);
    println!(
        "{}: {scenes} held-out scenes (world seed {seed}); autoencoder round trip PSNR mean {:.2} dB, min {:.2}, median {:.2}",
        model.display(),
        db.iter().sum::<f64>() / db.len() as f64,
        db[0],
        db[db.len() / 2]
    );
    let report = |what: &str, f: &[Following]| {
        let [background, colour, shape, count, all] = FollowingCounts::of(f).cells();
        println!(
            "{what} follows the caption: background {background}, colour {colour}, shape {shape}, count {count}, all {all}"
        );
    };
    let trips: Vec<Following> = trips.iter().map(|r| r.following).collect();
    report("the round trip", &trips);
    let f = caption_following(&sd, &world, scenes, guidance, 30, seed)?;
    report(
        &format!("plain generation (g={guidance}, 30 DDIM steps)"),
        &f,
    );
    Ok(())
}
