//! GEGLU at medium-UNet shapes: candle's composite ops (two `narrow`s, `gelu_erf`, a product, as
//! the UNet composes diffusers' GEGLU off the CPU) against the fused custom op, forward and
//! forward + backward. The backward is that of `out.sum_all()`, through candle's autograd, so it
//! includes candle's gradient bookkeeping.
//!
//! Prints ratios candle / ours from one process, timed as `common/mod.rs` describes; `--reps N`
//! sets the timed rounds, `--times` adds our absolute times.
//!
//! `cargo run --release -p unitune-kernels --example geglu_bench`

mod common;

use candle_core::{Result, Tensor, Var, D};
use common::{Options, Table};
use unitune_kernels::geglu::geglu;

/// diffusers' GEGLU on `[..., 2 * inner]` in candle ops.
fn composite(proj: &Tensor) -> Result<Tensor> {
    let inner = proj.dim(D::Minus1)? / 2;
    let hidden = proj.narrow(D::Minus1, 0, inner)?;
    let gate = proj.narrow(D::Minus1, inner, inner)?;
    hidden * gate.gelu_erf()?
}

fn main() -> Result<()> {
    let dev = candle_core::Device::Cpu;
    let opts = Options::from_args(31)?;
    let table = Table::new(20, &opts);
    for (n, inner) in [(1024, 512), (256, 1024)] {
        let proj = Var::from_tensor(&Tensor::randn(0f32, 1.0, (4, n, 2 * inner), &dev)?)?;
        let pt = proj.as_tensor();
        table.case(&format!("[4, {n}, 2 * {inner}]"), |ours, backward| {
            let out = if ours { geglu(pt)? } else { composite(pt)? };
            if backward {
                let grads = out.sum_all()?.backward()?;
                assert!(grads.get(pt).is_some());
            }
            Ok(())
        })?;
    }
    Ok(())
}
