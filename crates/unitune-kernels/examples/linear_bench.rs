//! Linear layers at medium-UNet shapes: candle's matmul plus a broadcast bias (as
//! `candle_nn::Linear` computes it) against the custom op, forward and forward + backward (of
//! `sum(out ∘ r)`, all of input, weight and bias trainable).
//!
//! Prints ratios candle / ours from one process, timed as `common/mod.rs` describes; `--reps N`
//! sets the timed rounds, `--times` adds our absolute times.
//!
//! `cargo run --release -p unitune-kernels --example linear_bench`

mod common;

use candle_core::{Device, Result, Tensor, Var};
use common::{Options, Table};
use unitune_kernels::linear::linear;

/// `candle_nn::Linear::forward` on a contiguous input: the rows flattened into one matmul by
/// `Wᵀ`, then the bias broadcast over them.
fn candle_linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let c = dims[dims.len() - 1];
    let rows = x.elem_count() / c;
    let mut out_dims = dims;
    *out_dims.last_mut().expect("rank") = w.dim(0)?;
    let y = x.reshape((rows, c))?.matmul(&w.t()?)?.reshape(out_dims)?;
    match b {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

fn main() -> Result<()> {
    let dev = Device::Cpu;
    let opts = Options::from_args(21)?;
    // (name, input dims, outputs, bias)
    let cases: [(&str, &[usize], usize, bool); 5] = [
        ("[4,1024,128] -> 128", &[4, 1024, 128], 128, true),
        ("[4,1024,128] -> 1024 (GEGLU)", &[4, 1024, 128], 1024, true),
        ("[4,256,256] -> 256", &[4, 256, 256], 256, true),
        ("[4,77,768] -> 128 no bias", &[4, 77, 768], 128, false),
        ("[4,512] -> 512 (time emb)", &[4, 512], 512, true),
    ];
    let table = Table::new(30, &opts);
    for (name, x_dims, o, with_bias) in cases {
        let c = x_dims[x_dims.len() - 1];
        let mut out_dims = x_dims.to_vec();
        *out_dims.last_mut().expect("rank") = o;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, x_dims, &dev)?)?;
        let w = Var::from_tensor(&(Tensor::randn(0f32, 1.0, (o, c), &dev)? * 0.05)?)?;
        let b = Var::from_tensor(&Tensor::randn(0f32, 1.0, o, &dev)?)?;
        let r = Tensor::randn(0f32, 1.0, out_dims, &dev)?;
        let (xt, wt) = (x.as_tensor(), w.as_tensor());
        let bt = with_bias.then(|| b.as_tensor());
        table.case(name, |ours, backward| {
            let out = if ours {
                linear(xt, wt, bt)?
            } else {
                candle_linear(xt, wt, bt)?
            };
            if backward {
                let grads = (out * &r)?.sum_all()?.backward()?;
                assert!([Some(xt), Some(wt), bt]
                    .iter()
                    .flatten()
                    .all(|t| grads.get(t).is_some()));
            }
            Ok(())
        })?;
    }
    Ok(())
}
