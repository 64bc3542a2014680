//! Attention at medium-UNet shapes, on q, k, v as the transformer's projections give them
//! (`[b, n, heads·d]`), forward and forward + backward, then the bytes of score-sized tensors each
//! way keeps for the backward. Ours is `attention_heads`, which reads and writes that layout in
//! place; it is compared with
//! - candle's composite ops (as `unitune::models::ops::attention` composes them off the CPU), on
//!   heads split out into `[b, heads, n, d]` and merged back as `ops::split_heads` and
//!   `ops::merge_heads` do;
//! - the fused kernel on `[b, heads, n, d]` between those same copies: what the transformer's
//!   attention did before `attention_heads`, so the cost of the copies (and of their backward).
//!
//! Prints ratios reference / ours from one process, timed as `common/mod.rs` describes (the
//! header's "candle" is the reference named above each table); `--reps N` sets the timed rounds,
//! `--times` adds our absolute times. `dev/bench_attention_torch.py` times PyTorch's
//! `scaled_dot_product_attention` on the same shapes.
//!
//! `cargo run --release -p unitune-kernels --example attention_bench`

mod common;

use candle_core::{Device, Result, Tensor, Var, D};
use common::{Options, Table};
use unitune_kernels::attention::{attention, attention_heads};

/// The composite attention: every intermediate below is score-sized and held by the graph.
fn composite(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let scores = (q.matmul(&k.t()?)? * scale)?; // [b, heads, n_q, n_k]
    let max = scores.max_keepdim(D::Minus1)?.detach();
    let num = scores.broadcast_sub(&max)?.exp()?;
    let den = num.sum_keepdim(D::Minus1)?;
    num.broadcast_div(&den)?.matmul(v)
}

/// `[b, n, heads·d]` -> `[b, heads, n, d]`, a copy (as `ops::split_heads`).
fn split_heads(xs: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, n, hd) = xs.dims3()?;
    xs.reshape((b, n, heads, hd / heads))?
        .transpose(1, 2)?
        .contiguous()
}

/// `[b, heads, n, d]` -> `[b, n, heads·d]`, a copy (as `ops::merge_heads`).
fn merge_heads(xs: &Tensor) -> Result<Tensor> {
    let (b, heads, n, d) = xs.dims4()?;
    xs.transpose(1, 2)?.reshape((b, n, heads * d))
}

/// Attention on split heads, between the copies.
type SplitAttention = fn(&Tensor, &Tensor, &Tensor, f64) -> Result<Tensor>;

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
    let references: [(&str, SplitAttention); 2] = [
        ("candle's composite ops on split heads", composite),
        (
            "split_heads copies, fused attention on [b, heads, n, d], merge_heads copy",
            attention,
        ),
    ];
    for (reference_name, reference) in references {
        println!("\nreference: {reference_name}; ours: attention_heads in place");
        let table = Table::new(40, &opts);
        for (name, b, h, nq, nk, d) in cases {
            let scale = 1.0 / (d as f64).sqrt();
            let var = |n: usize| Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, n, h * d), &dev)?);
            let (q, k, v) = (var(nq)?, var(nk)?, var(nk)?);
            let w = Tensor::randn(0f32, 1.0, (b, nq, h * d), &dev)?;
            let (qt, kt, vt) = (q.as_tensor(), k.as_tensor(), v.as_tensor());
            let shape = format!("{name} [{b}, {nq}, {h}x{d}] x {nk} keys");
            table.case(&shape, |ours, backward| {
                let out = if ours {
                    attention_heads(qt, kt, vt, h, scale)?
                } else {
                    let [q, k, v] = [qt, kt, vt].map(|t| split_heads(t, h));
                    merge_heads(&reference(&q?, &k?, &v?, scale)?)?
                };
                if backward {
                    let grads = (out * &w)?.sum_all()?.backward()?;
                    assert!([qt, kt, vt].iter().all(|t| grads.get(t).is_some()));
                }
                Ok(())
            })?;
        }
    }
    println!("\nkept for backward:");
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
