//! LayerNorm over the last dimension at the UNet's and CLIP's shapes: the composite of
//! `unitune::models::ops::LayerNorm` (candle ops) against the fused custom op, forward and
//! forward + backward. The backward is that of `out.sum_all()`, through candle's autograd, so it
//! includes candle's gradient bookkeeping.
//!
//! Prints ratios candle / ours from one process, timed as `common/mod.rs` describes; `--reps N`
//! sets the timed rounds, `--times` adds our absolute times.
//!
//! `cargo run --release -p unitune-kernels --example layer_norm_bench`

mod common;

use candle_core::{Device, Result, Tensor, Var, D};
use common::{Options, Table};
use unitune_kernels::layer_norm::layer_norm;

/// The composite LayerNorm of `unitune::models::ops::LayerNorm` on an f32 tensor.
fn composite(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let centred = x.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
    centred
        .broadcast_div(&(var + eps)?.sqrt()?)?
        .broadcast_mul(weight)?
        .broadcast_add(bias)
}

fn main() -> Result<()> {
    let dev = Device::Cpu;
    let opts = Options::from_args(41)?;
    let table = Table::new(16, &opts);
    for (b, n, c) in [(4, 1024, 128), (4, 256, 256), (2, 77, 768)] {
        let x = Var::from_tensor(&Tensor::randn(0.3f32, 1.5, (b, n, c), &dev)?)?;
        let weight = Var::from_tensor(&(Tensor::randn(0f32, 0.2, c, &dev)? + 1.0)?)?;
        let bias = Var::from_tensor(&Tensor::randn(0f32, 0.2, c, &dev)?)?;
        let (xt, wt, bt) = (x.as_tensor(), weight.as_tensor(), bias.as_tensor());
        table.case(&format!("[{b}, {n}, {c}]"), |ours, backward| {
            let out = if ours {
                layer_norm(xt, wt, bt, 1e-5)?
            } else {
                composite(xt, wt, bt, 1e-5)?
            };
            if backward {
                let grads = out.sum_all()?.backward()?;
                assert!(grads.get(xt).is_some() && grads.get(wt).is_some());
            }
            Ok(())
        })?;
    }
    Ok(())
}
