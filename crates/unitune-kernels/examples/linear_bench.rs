//! Linear layers at medium-UNet shapes: candle's matmul plus a broadcast bias (as
//! `candle_nn::Linear` computes it) against the custom op, forward and forward + backward (of
//! `sum(out ∘ r)`, all of input, weight and bias trainable).
//!
//! The machine may be busy, so both run in one process, back to back, in alternating order, and
//! what is printed are ratios candle / ours: the median over the repetitions of each pair's
//! wall-time ratio, and the ratio of the median CPU times (summed over all threads, from
//! `/proc/self/task/*/schedstat`: less sensitive to other processes than wall time).
//!
//! `cargo run --release -p unitune-kernels --example linear_bench`

use std::time::Instant;

use candle_core::{Device, Result, Tensor, Var};
use unitune_kernels::linear::linear;

/// CPU seconds used so far by all threads of this process.
fn cpu_seconds() -> f64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return f64::NAN;
    };
    let nanos: f64 = tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<f64>().ok())
        .sum();
    nanos / 1e9
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

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
    let reps = 21;
    // (name, input dims, outputs, bias)
    let cases: [(&str, &[usize], usize, bool); 5] = [
        ("[4,1024,128] -> 128", &[4, 1024, 128], 128, true),
        ("[4,1024,128] -> 1024 (GEGLU)", &[4, 1024, 128], 1024, true),
        ("[4,256,256] -> 256", &[4, 256, 256], 256, true),
        ("[4,77,768] -> 128 no bias", &[4, 77, 768], 128, false),
        ("[4,512] -> 512 (time emb)", &[4, 512], 512, true),
    ];
    println!("candle / ours: wall (median of paired ratios), CPU (ratio of medians)");
    println!(
        "{:<30} {:>10} {:>10} {:>10} {:>10}",
        "", "fwd wall", "fwd CPU", "f+b wall", "f+b CPU"
    );
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
        // (wall, CPU) seconds of one run.
        let run = |ours: bool, backward: bool| -> Result<(f64, f64)> {
            let (start, cpu) = (Instant::now(), cpu_seconds());
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
            Ok((start.elapsed().as_secs_f64(), cpu_seconds() - cpu))
        };
        let mut cells = Vec::new();
        for backward in [false, true] {
            let (mut wall_ratios, mut cpu_candle, mut cpu_ours) = (vec![], vec![], vec![]);
            for rep in 0..=reps {
                let order = if rep % 2 == 0 {
                    [false, true]
                } else {
                    [true, false]
                };
                let mut times = [(0.0, 0.0); 2];
                for ours in order {
                    times[ours as usize] = run(ours, backward)?;
                }
                // The first round only warms up.
                if rep > 0 {
                    wall_ratios.push(times[0].0 / times[1].0);
                    cpu_candle.push(times[0].1);
                    cpu_ours.push(times[1].1);
                }
            }
            cells.push(median(wall_ratios));
            cells.push(median(cpu_candle) / median(cpu_ours));
        }
        println!(
            "{name:<30} {:>9.2}x {:>9.2}x {:>9.2}x {:>9.2}x",
            cells[0], cells[1], cells[2], cells[3]
        );
    }
    Ok(())
}
