//! GroupNorm + SiLU at medium-UNet shapes: candle's composite ops (candle_nn::GroupNorm's forward
//! math, then `silu`) against the fused custom op, forward and forward + backward. The backward is
//! that of `out.sum_all()`, through candle's autograd, so it includes candle's gradient
//! bookkeeping.
//!
//! Prints ratios candle / ours from one process, timed as `common/mod.rs` describes; `--reps N`
//! sets the timed rounds, `--times` adds our absolute times.
//!
//! `cargo run --release -p unitune-kernels --example group_norm_bench`

mod common;

use candle_core::{Device, Result, Tensor, Var};
use common::{Options, Table};
use unitune_kernels::group_norm::group_norm;

/// candle_nn's `GroupNorm::forward` on an f32 `[b, c, h, w]` tensor, then SiLU.
fn composite(x: &Tensor, gamma: &Tensor, beta: &Tensor, groups: usize, eps: f64) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let x3 = x.reshape((b, groups, ()))?;
    let len = (c / groups * h * w) as f64;
    let mean = (x3.sum_keepdim(2)? / len)?;
    let centred = x3.broadcast_sub(&mean)?;
    let var = (centred.sqr()?.sum_keepdim(2)? / len)?;
    let normed = centred
        .broadcast_div(&(var + eps)?.sqrt()?)?
        .reshape((b, c, h, w))?;
    normed
        .broadcast_mul(&gamma.reshape((1, c, 1, 1))?)?
        .broadcast_add(&beta.reshape((1, c, 1, 1))?)?
        .silu()
}

fn main() -> Result<()> {
    let dev = Device::Cpu;
    let opts = Options::from_args(41)?;
    let table = Table::new(20, &opts);
    for (c, hw) in [(128, 32), (256, 16), (512, 8)] {
        let x = Var::from_tensor(&Tensor::randn(0.3f32, 1.5, (4, c, hw, hw), &dev)?)?;
        let gamma = Var::from_tensor(&(Tensor::randn(0f32, 0.2, c, &dev)? + 1.0)?)?;
        let beta = Var::from_tensor(&Tensor::randn(0f32, 0.2, c, &dev)?)?;
        let (xt, gt, bt) = (x.as_tensor(), gamma.as_tensor(), beta.as_tensor());
        table.case(&format!("[4, {c}, {hw}, {hw}]"), |ours, backward| {
            let out = if ours {
                group_norm(xt, gt, bt, 32, 1e-5, true)?
            } else {
                composite(xt, gt, bt, 32, 1e-5)?
            };
            if backward {
                let grads = out.sum_all()?.backward()?;
                assert!(grads.get(xt).is_some() && grads.get(gt).is_some());
            }
            Ok(())
        })?;
    }
    Ok(())
}
