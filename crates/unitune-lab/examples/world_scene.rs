//! Renders one scene of unitune's procedural world (the built-in model's training world) with its
//! caption and a ground-truth edit, e.g. to make a photo to tune on:
//!
//!     cargo run -p unitune-lab --example world_scene -- 1000 3 scene.png

use unitune_lab::world::{SceneConfig, World};

fn main() -> unitune::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, seed, index, out] = args.as_slice() else {
        eprintln!("usage: world_scene SEED INDEX OUT.png");
        std::process::exit(2);
    };
    let parse = |s: &str, what: &str| {
        s.parse::<u64>()
            .map_err(|e| unitune::Error::argument(what, e.to_string()))
    };
    let world = World::new(SceneConfig::default(), parse(seed, "SEED")?)?;
    let sample = world.edit_sample(parse(index, "INDEX")?);
    unitune::image_io::save_png(&sample.before, std::path::Path::new(out))?;
    println!("caption:     {}", sample.caption);
    println!("edit:        {}", sample.instruction);
    println!("edit prompt: {}", sample.prompt);
    Ok(())
}
