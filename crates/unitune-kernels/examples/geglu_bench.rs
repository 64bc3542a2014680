//! GEGLU at medium-UNet shapes: candle's composite ops (two `narrow`s, `gelu_erf`, a product, as
//! the UNet composes diffusers' GEGLU off the CPU) against the fused custom op, forward and
//! forward + backward, interleaved in one process so that a busy machine slows both alike. Prints
//! time ratios (candle / ours); `--times` adds our absolute times (meaningful on an idle machine
//! only). The backward is that of `out.sum_all()`, through candle's autograd, so it includes
//! candle's gradient bookkeeping.
//!
//! `cargo run --release -p unitune-kernels --example geglu_bench`

use std::time::Instant;

use candle_core::{Result, Tensor, Var, D};
use unitune_kernels::geglu::geglu;

/// diffusers' GEGLU on `[..., 2 * inner]` in candle ops.
fn composite(proj: &Tensor) -> Result<Tensor> {
    let inner = proj.dim(D::Minus1)? / 2;
    let hidden = proj.narrow(D::Minus1, 0, inner)?;
    let gate = proj.narrow(D::Minus1, inner, inner)?;
    hidden * gate.gelu_erf()?
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<()> {
    let dev = candle_core::Device::Cpu;
    let reps = 31;
    // Absolute times are only meaningful on an idle machine.
    let verbose = std::env::args().any(|a| a == "--times");
    for (n, inner) in [(1024, 512), (256, 1024)] {
        let proj = Var::from_tensor(&Tensor::randn(0f32, 1.0, (4, n, 2 * inner), &dev)?)?;
        let pt = proj.as_tensor();
        let run = |ours: bool, backward: bool| -> Result<f64> {
            let start = Instant::now();
            let out = if ours { geglu(pt)? } else { composite(pt)? };
            if backward {
                let grads = out.sum_all()?.backward()?;
                assert!(grads.get(pt).is_some());
            }
            Ok(start.elapsed().as_secs_f64())
        };
        for backward in [false, true] {
            // Alternate the two so that a busy machine slows both alike; the median of the
            // ratios of neighbouring runs is robust to bursts of load.
            let (mut ratios, mut ours) = (Vec::new(), Vec::new());
            for _ in 0..reps {
                let candle = run(false, backward)?;
                let t = run(true, backward)?;
                ratios.push(candle / t);
                ours.push(t);
            }
            println!(
                "[4, {n}, 2 * {inner}] {}: candle / ours {:.1}x{}",
                if backward { "fwd+bwd" } else { "fwd    " },
                median(ratios),
                if verbose {
                    format!(" (median ours {:.3} ms)", median(ours) * 1e3)
                } else {
                    String::new()
                }
            );
        }
    }
    Ok(())
}
