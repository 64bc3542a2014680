//! What each delta encoding makes of tuned sessions: the file's size against the UNet's weights in
//! f32, the bits a matrix weight takes, and how far the stored deltas are from the session's.
//! Sessions that were distilled into a grid (`unitune tune --delta-encoding q2`) are exact in
//! it; the others show what rounding after the tune loses.
//!
//!     cargo run --release -p unitune-lab --example session_codes -- MODEL_DIR SESSION...

use std::path::{Path, PathBuf};

use unitune::pipelines::{LoadOptions, StableDiffusion};
use unitune::session::{DeltaEncoding, Session};

fn main() -> unitune::Result<()> {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let [model, sessions @ ..] = args.as_slice() else {
        eprintln!("usage: session_codes MODEL_DIR SESSION...");
        std::process::exit(2);
    };
    if sessions.is_empty() {
        eprintln!("usage: session_codes MODEL_DIR SESSION...");
        std::process::exit(2);
    }
    let sd = StableDiffusion::load(model, &LoadOptions::default())?;
    let unet_f32: usize = sd
        .unet_store
        .tensors()
        .values()
        .map(|t| t.elem_count() * 4)
        .sum();
    println!("| code | session, % of the UNet in f32 | bits per matrix weight | relative error of the matrix deltas |");
    println!("|---|---|---|---|");
    for encoding in DeltaEncoding::ALL {
        let (mut share, mut bits, mut err, mut stored) = (0f64, 0f64, 0f64, 0usize);
        for path in sessions {
            let session = Session::load(path)?;
            let name = Path::new("measured.unitune");
            // Only a LoRA tune's session has factors to store.
            let Ok(bytes) = session.to_bytes(name, encoding) else {
                continue;
            };
            let back = Session::from_bytes(&bytes, name)?;
            let (mut diff, mut norm, mut matrix) = (0f64, 0f64, 0usize);
            for (key, d) in &session.deltas {
                if d.rank() < 2 {
                    continue;
                }
                let sq = |t: &candle_core::Tensor| -> unitune::Result<f64> {
                    Ok(t.sqr()?.sum_all()?.to_scalar::<f32>()? as f64)
                };
                diff += sq(&(&back.deltas[key] - d)?)?;
                norm += sq(d)?;
                matrix += d.elem_count();
            }
            share += bytes.len() as f64 / unet_f32 as f64;
            bits += bytes.len() as f64 * 8.0 / matrix as f64;
            err += (diff / norm).sqrt();
            stored += 1;
        }
        if stored == 0 {
            continue;
        }
        let n = stored as f64;
        println!(
            "| {encoding} | {:.2} | {:.2} | {:.3} |",
            100.0 * share / n,
            bits / n,
            err / n
        );
    }
    Ok(())
}
