//! Nearest 2x upsampling at medium-UNet shapes: the broadcast the UNet composes off the kernels
//! (reshape to `[b, c, h, 1, w, 1]`, broadcast, reshape) against the custom op, forward and
//! forward + backward. The loss sums a 1x1 convolution of the output to one channel (the gemm op):
//! the upsampling then receives a contiguous gradient, as from the convolution after it in the
//! UNet, at little cost of its own (candle's `sum(out ∘ r)` would hand it a strided gradient and
//! spend more time in its own backward than the upsampling does).
//!
//! Prints ratios candle / ours from one process, timed as `common/mod.rs` describes; `--reps N`
//! sets the timed rounds, `--times` adds our absolute times.
//!
//! `cargo run --release -p unitune-kernels --example upsample_bench`

mod common;

use candle_core::{Device, Result, Tensor, Var};
use common::{Options, Table};
use unitune_kernels::conv::conv2d;
use unitune_kernels::upsample::upsample_nearest2x;

fn main() -> Result<()> {
    let dev = Device::Cpu;
    let opts = Options::from_args(15)?;
    let table = Table::new(24, &opts);
    for (b, c, h) in [(4, 256, 16), (4, 512, 8), (4, 128, 32)] {
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, c, h, h), &dev)?)?;
        let r = Tensor::randn(0f32, 1.0, (1, c, 1, 1), &dev)?;
        let xt = x.as_tensor();
        let name = format!("[{b},{c},{h},{h}] -> {}x{}", 2 * h, 2 * h);
        table.case(&name, |ours, backward| {
            let out = if ours {
                upsample_nearest2x(xt)?
            } else {
                xt.reshape((b, c, h, 1, h, 1))?
                    .broadcast_as((b, c, h, 2, h, 2))?
                    .reshape((b, c, 2 * h, 2 * h))?
            };
            if backward {
                let grads = conv2d(&out, &r, None, 0, 1)?.sum_all()?.backward()?;
                assert!(grads.get(xt).is_some());
            }
            Ok(())
        })?;
    }
    Ok(())
}
