//! Convolutions at medium-UNet shapes: candle's conv2d plus a broadcast bias (as
//! `candle_nn::Conv2d` computes it) against the gemm custom op, forward and forward + backward
//! (of `sum(out ∘ r)`, all of input, weight and bias trainable).
//!
//! The machine may be busy, so both run in one process, back to back, in alternating order, and
//! what is printed are ratios candle / ours: the median over the repetitions of each pair's
//! wall-time ratio, and the ratio of the median CPU times (summed over all threads, from
//! `/proc/self/task/*/schedstat`: less sensitive to other processes than wall time).
//!
//! `cargo run --release -p unitune-kernels --example conv_bench`

use std::time::Instant;

use candle_core::{Device, Result, Tensor, Var};
use unitune_kernels::conv::conv2d;

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

fn main() -> Result<()> {
    let dev = Device::Cpu;
    let reps = 15;
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
    println!("candle / ours: wall (median of paired ratios), CPU (ratio of medians)");
    println!(
        "{:<28} {:>10} {:>10} {:>10} {:>10}",
        "", "fwd wall", "fwd CPU", "f+b wall", "f+b CPU"
    );
    for (name, n, c, size, o, k, padding, stride) in cases {
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (n, c, size, size), &dev)?)?;
        let w = Var::from_tensor(&(Tensor::randn(0f32, 1.0, (o, c, k, k), &dev)? * 0.05)?)?;
        let b = Var::from_tensor(&Tensor::randn(0f32, 1.0, o, &dev)?)?;
        let out_size = (size + 2 * padding - k) / stride + 1;
        let r = Tensor::randn(0f32, 1.0, (n, o, out_size, out_size), &dev)?;
        let (xt, wt, bt) = (x.as_tensor(), w.as_tensor(), b.as_tensor());
        // (wall, CPU) seconds of one run.
        let run = |ours: bool, backward: bool| -> Result<(f64, f64)> {
            let (start, cpu) = (Instant::now(), cpu_seconds());
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
            "{name:<28} {:>9.2}x {:>9.2}x {:>9.2}x {:>9.2}x",
            cells[0], cells[1], cells[2], cells[3]
        );
    }
    Ok(())
}
