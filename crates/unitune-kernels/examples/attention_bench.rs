//! Attention at medium-UNet shapes: candle's composite ops (as `unitune::models::ops::attention`
//! composes them) against the fused custom op, forward and forward + backward, then the bytes of
//! score-sized tensors each keeps for the backward.
//!
//! Prints ratios candle / ours from one process, timed as `common/mod.rs` describes; `--reps N`
//! sets the timed rounds, `--times` adds our absolute times.
//!
//! `cargo run --release -p unitune-kernels --example attention_bench`

mod common;

use candle_core::{Device, Result, Tensor, Var, D};
use common::{Options, Table};
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
    let opts = Options::from_args(11)?;
    // (name, b, heads, n_q, n_k, d): medium UNet, 128 channels / 8 heads at 32x32 and 256 / 8
    // at 16x16, self-attention, and cross-attention to 77 text tokens.
    let cases = [
        ("self 32x32", 4, 8, 1024, 1024, 16),
        ("self 16x16", 4, 8, 256, 256, 32),
        ("cross 32x32", 4, 8, 1024, 77, 16),
        ("cross 16x16", 4, 8, 256, 77, 32),
    ];
    let table = Table::new(40, &opts);
    for (name, b, h, nq, nk, d) in cases {
        let scale = 1.0 / (d as f64).sqrt();
        let var = |n: usize| Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, h, n, d), &dev)?);
        let (q, k, v) = (var(nq)?, var(nk)?, var(nk)?);
        let w = Tensor::randn(0f32, 1.0, (b, h, nq, d), &dev)?;
        let (qt, kt, vt) = (q.as_tensor(), k.as_tensor(), v.as_tensor());
        let shape = format!("{name} [{b}, {h}, {nq}, {d}] x {nk} keys");
        table.case(&shape, |ours, backward| {
            let out = if ours {
                attention(qt, kt, vt, scale)?
            } else {
                composite(qt, kt, vt, scale)?
            };
            if backward {
                let grads = (out * &w)?.sum_all()?.backward()?;
                assert!([qt, kt, vt].iter().all(|t| grads.get(t).is_some()));
            }
            Ok(())
        })?;
    }
    println!("kept for backward:");
    for (name, b, h, nq, nk, _) in cases {
        let scores_bytes = b * h * nq * nk * 4;
        println!(
            "{name:<12} candle {} x {:.1} MB = {:.1} MB, ours (log-sum-exp) {:.3} MB",
            COMPOSITE_KEPT,
            scores_bytes as f64 / 1e6,
            (COMPOSITE_KEPT * scores_bytes) as f64 / 1e6,
            (b * h * nq * 4) as f64 / 1e6
        );
    }
    Ok(())
}
