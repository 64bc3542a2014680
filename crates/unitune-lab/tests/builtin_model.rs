//! The floor of the shipped built-in model (`models/shapes-64`), on held-out world scenes
//! (indices from `HELD_OUT_START`, never trained on): its autoencoder keeps at least 35 dB of a
//! scene, and plain generation draws what captions ask. The numbers a full measurement gives are
//! in BENCHMARKS.md; these few fixed scenes keep a retrained model from shipping below them.

use std::path::Path;

use unitune::pipelines::{LoadOptions, StableDiffusion};
use unitune_lab::quality::{caption_following, round_trip};
use unitune_lab::world::follow::FollowingCounts;
use unitune_lab::world::{SceneConfig, World};

fn model() -> StableDiffusion {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/shapes-64");
    StableDiffusion::load(&dir, &LoadOptions::default()).unwrap()
}

#[test]
fn the_autoencoder_keeps_35_db_of_held_out_scenes_and_their_shapes() {
    let world = World::new(SceneConfig::default(), 0).unwrap();
    let trips = round_trip(&model(), &world, 24).unwrap();
    let db: Vec<f64> = trips.iter().map(|r| r.psnr).collect();
    let mean = db.iter().sum::<f64>() / db.len() as f64;
    let min = db.iter().copied().fold(f64::INFINITY, f64::min);
    assert!(mean >= 35.0, "mean round trip {mean:.2} dB: {db:?}");
    assert!(min >= 28.0, "worst round trip {min:.2} dB: {db:?}");
    // What the scorer reads off the decoded scenes: a shape lost here is lost to every edit.
    let f: Vec<_> = trips.iter().map(|r| r.following).collect();
    let counts = FollowingCounts::of(&f);
    assert_eq!(
        (counts.background, counts.colour, counts.count),
        (24, 24, 24),
        "{f:?}"
    );
    assert!(
        counts.shape >= 16,
        "round trips with their shapes: {}/24: {f:?}",
        counts.shape
    );
}

#[test]
fn plain_generation_draws_the_asked_background_and_colours() {
    let world = World::new(SceneConfig::default(), 0).unwrap();
    let scenes = 12;
    let f = caption_following(&model(), &world, scenes, 8.0, 30, 0).unwrap();
    let counts = FollowingCounts::of(&f);
    let (background, colour) = (counts.background, counts.colour);
    assert!(background >= 11, "background {background}/{scenes}: {f:?}");
    assert!(colour >= 6, "colour {colour}/{scenes}: {f:?}");
}
