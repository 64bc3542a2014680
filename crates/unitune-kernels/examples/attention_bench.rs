//! Attention at medium-UNet shapes: candle's composite ops (as `unitune::models::ops::attention`
//! composes them) against the fused custom op, forward and forward + backward, interleaved in one
//! process so that a busy machine slows both alike. Prints time ratios (candle / ours) and the
//! bytes of score-sized tensors each keeps for the backward.
//!
//! `cargo run --release -p unitune-kernels --example attention_bench`

use std::time::Instant;

use candle_core::{Device, Result, Tensor, Var, D};
use unitune_kernels::attention::attention;

/// The composite attention: every intermediate below is score-sized and held by the graph.
fn composite(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let scores = (q.matmul(&k.t()?)? * scale)?; // [b, heads, n_q, n_k]
    let max = scores.max_keepdim(D::Minus1)?.detach();
    let num = scores.broadcast_sub(&max)?.exp()?;
    let den = num.sum_keepdim(D::Minus1)?;
    num.broadcast_div(&den)?.matmul(v)
}

/// Score-sized tensors the composite graph keeps: q·kᵀ, scaled, shifted, exponentiated, normalised.
const COMPOSITE_KEPT: usize = 5;

fn main() -> Result<()> {
    let dev = Device::Cpu;
    let reps = 10;
    // (name, b, heads, n_q, n_k, d): medium UNet, 128 channels / 8 heads at 32x32 and 256 / 8
    // at 16x16, self-attention, and cross-attention to 77 text tokens.
    let cases = [
        ("self 32x32", 4, 8, 1024, 1024, 16),
        ("self 16x16", 4, 8, 256, 256, 32),
        ("cross 32x32", 4, 8, 1024, 77, 16),
        ("cross 16x16", 4, 8, 256, 77, 32),
    ];
    for (name, b, h, nq, nk, d) in cases {
        let scale = 1.0 / (d as f64).sqrt();
        let var = |n: usize| Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, h, n, d), &dev)?);
        let (q, k, v) = (var(nq)?, var(nk)?, var(nk)?);
        let w = Tensor::randn(0f32, 1.0, (b, h, nq, d), &dev)?;
        let (qt, kt, vt) = (q.as_tensor(), k.as_tensor(), v.as_tensor());
        let run = |ours: bool, backward: bool| -> Result<f64> {
            let start = Instant::now();
            let out = if ours {
                attention(qt, kt, vt, scale)?
            } else {
                composite(qt, kt, vt, scale)?
            };
            if backward {
                let grads = (out * &w)?.sum_all()?.backward()?;
                assert!(
                    grads.get(qt).is_some() && grads.get(kt).is_some() && grads.get(vt).is_some()
                );
            }
            Ok(start.elapsed().as_secs_f64())
        };
        for backward in [false, true] {
            // One warm-up each, then alternate, keeping the best of each (least disturbed).
            let (mut best_candle, mut best_ours) = (run(false, backward)?, run(true, backward)?);
            let (mut sum_candle, mut sum_ours) = (0.0, 0.0);
            for _ in 0..reps {
                let t = run(false, backward)?;
                sum_candle += t;
                best_candle = f64::min(best_candle, t);
                let t = run(true, backward)?;
                sum_ours += t;
                best_ours = f64::min(best_ours, t);
            }
            println!(
                "{name} [{b}, {h}, {nq}, {d}] x {nk} keys {}: candle/ours best {:.2}x, mean {:.2}x",
                if backward { "fwd+bwd" } else { "fwd    " },
                best_candle / best_ours,
                sum_candle / sum_ours
            );
        }
        let scores_bytes = b * h * nq * nk * 4;
        println!(
            "{name}: kept for backward, candle {} x {:.1} MB = {:.1} MB, ours (log-sum-exp) {:.3} MB",
            COMPOSITE_KEPT,
            scores_bytes as f64 / 1e6,
            (COMPOSITE_KEPT * scores_bytes) as f64 / 1e6,
            (b * h * nq * 4) as f64 / 1e6
        );
    }
    Ok(())
}
