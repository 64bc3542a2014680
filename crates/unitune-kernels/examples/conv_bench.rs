//! Convolutions at medium-UNet shapes: candle's conv2d plus a broadcast bias (as
//! `candle_nn::Conv2d` computes it) against the gemm custom op, forward and forward + backward
//! (of `sum(out ∘ r)`, all of input, weight and bias trainable). Then a resnet's first
//! convolution plus its time embedding `temb[:, :, None, None]`: the gemm op with a bias per image
//! against the gemm op followed by a broadcast add (the UNet before the bias per image). Their
//! loss sums a 1x1 convolution of the output to one channel: a contiguous output gradient, as
//! from the group norm after it in the UNet, at little cost of its own (candle's `sum(out ∘ r)`
//! would take about as long as the broadcast add that is compared).
//!
//! Prints ratios candle / ours from one process, timed as `common/mod.rs` describes; `--reps N`
//! sets the timed rounds, `--times` adds our absolute times.
//!
//! `cargo run --release -p unitune-kernels --example conv_bench`

mod common;

use candle_core::{Device, Result, Tensor, Var, D};
use common::{Options, Table};
use unitune_kernels::conv::conv2d;

fn main() -> Result<()> {
    let dev = Device::Cpu;
    let opts = Options::from_args(15)?;
    // (name, n, c, size, o, kernel, padding, stride)
    let cases = [
        ("3x3 128->128 32x32", 4, 128, 32, 128, 3, 1, 1),
        ("3x3 256->256 16x16", 4, 256, 16, 256, 3, 1, 1),
        ("3x3 512->512 8x8", 4, 512, 8, 512, 3, 1, 1),
        ("1x1 256->512 16x16", 4, 256, 16, 512, 1, 0, 1),
        ("3x3 s2 128 32->16", 4, 128, 32, 128, 3, 1, 2),
        ("3x3 4->128 32x32 (conv_in)", 4, 4, 32, 128, 3, 1, 1),
        ("3x3 256->256 16x16 batch 2", 2, 256, 16, 256, 3, 1, 1),
    ];
    let table = Table::new(28, &opts);
    for (name, n, c, size, o, k, padding, stride) in cases {
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (n, c, size, size), &dev)?)?;
        let w = Var::from_tensor(&(Tensor::randn(0f32, 1.0, (o, c, k, k), &dev)? * 0.05)?)?;
        let b = Var::from_tensor(&Tensor::randn(0f32, 1.0, o, &dev)?)?;
        let out_size = (size + 2 * padding - k) / stride + 1;
        let r = Tensor::randn(0f32, 1.0, (n, o, out_size, out_size), &dev)?;
        let (xt, wt, bt) = (x.as_tensor(), w.as_tensor(), b.as_tensor());
        table.case(name, |ours, backward| {
            let out = if ours {
                conv2d(xt, wt, Some(bt), padding, stride)?
            } else {
                xt.conv2d(wt, padding, stride, 1, 1)?
                    .broadcast_add(&bt.reshape((1, o, 1, 1))?)?
            };
            if backward {
                let grads = (out * &r)?.sum_all()?.backward()?;
                assert!([xt, wt, bt].iter().all(|t| grads.get(t).is_some()));
            }
            Ok(())
        })?;
    }
    println!();
    println!("conv + temb (\"candle\": our conv, then a broadcast add; \"ours\": bias per image)");
    let table = Table::new(28, &opts);
    for (n, c, size) in [(4, 128, 32), (4, 256, 16), (4, 512, 8)] {
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (n, c, size, size), &dev)?)?;
        let w = Var::from_tensor(&(Tensor::randn(0f32, 1.0, (c, c, 3, 3), &dev)? * 0.05)?)?;
        let b = Var::from_tensor(&Tensor::randn(0f32, 1.0, c, &dev)?)?;
        let temb = Var::from_tensor(&Tensor::randn(0f32, 1.0, (n, c), &dev)?)?;
        let r = Tensor::randn(0f32, 1.0, (1, c, 1, 1), &dev)?;
        let (xt, wt, bt, tt) = (
            x.as_tensor(),
            w.as_tensor(),
            b.as_tensor(),
            temb.as_tensor(),
        );
        let name = format!("[{n},{c},{size},{size}] + temb");
        table.case(&name, |ours, backward| {
            let out = if ours {
                conv2d(xt, wt, Some(&bt.unsqueeze(0)?.broadcast_add(tt)?), 1, 1)?
            } else {
                conv2d(xt, wt, Some(bt), 1, 1)?
                    .broadcast_add(&tt.unsqueeze(D::Minus1)?.unsqueeze(D::Minus1)?)?
            };
            if backward {
                let grads = conv2d(&out, &r, None, 0, 1)?.sum_all()?.backward()?;
                assert!([xt, wt, bt, tt].iter().all(|t| grads.get(t).is_some()));
            }
            Ok(())
        })?;
    }
    Ok(())
}
