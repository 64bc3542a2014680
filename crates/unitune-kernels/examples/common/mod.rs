//! Timing shared by the kernel benchmark examples (each includes it with `mod common;`).
//!
//! The machine may be busy, so candle's op and ours run in one process, back to back, in
//! alternating order, so that load slows both alike; what is printed are ratios candle / ours,
//! robust to bursts of load: the median over the repetitions of each pair's wall-time ratio, and
//! the ratio of the median CPU times (summed over all threads, from `/proc/self/task/*/schedstat`:
//! less sensitive to other processes than wall time).
//!
//! Every example takes `--reps N` (timed rounds after one warm-up round) and `--times` (adds our
//! median wall times, meaningful on an idle machine only).

use std::time::Instant;

use candle_core::{Error, Result};

/// The command-line options of a benchmark example.
pub struct Options {
    /// Timed rounds of each comparison, after one warm-up round.
    pub reps: usize,
    /// Whether to print our absolute times too.
    pub times: bool,
}

impl Options {
    /// Parses `--reps N` (default `default_reps`) and `--times`.
    pub fn from_args(default_reps: usize) -> Result<Self> {
        let mut opts = Self {
            reps: default_reps,
            times: false,
        };
        let mut args = std::env::args().skip(1);
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "--times" => opts.times = true,
                "--reps" => {
                    opts.reps = args
                        .next()
                        .and_then(|n| n.parse().ok())
                        .filter(|&n| n > 0)
                        .ok_or_else(|| Error::Msg("--reps takes a positive count".into()))?
                }
                other => return Err(Error::Msg(format!("unknown argument {other:?}"))),
            }
        }
        Ok(opts)
    }
}

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

/// What one comparison measured.
pub struct Ratios {
    /// Median of the paired wall-time ratios candle / ours.
    pub wall: f64,
    /// Median CPU time of candle over that of ours.
    pub cpu: f64,
    /// Our median wall time, seconds.
    pub ours_wall: f64,
}

/// Times `run(false)` (candle) against `run(true)` (ours) over one warm-up round and `reps` timed
/// rounds, alternating which goes first. Each time includes dropping what `run` built.
pub fn compare(reps: usize, mut run: impl FnMut(bool) -> Result<()>) -> Result<Ratios> {
    let mut wall_ratios = Vec::with_capacity(reps);
    let (mut cpu_candle, mut cpu_ours, mut wall_ours) = (vec![], vec![], vec![]);
    for round in 0..=reps {
        let order = if round % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        // (wall, CPU) seconds, candle's then ours.
        let mut times = [(0.0, 0.0); 2];
        for ours in order {
            let (start, cpu) = (Instant::now(), cpu_seconds());
            run(ours)?;
            times[ours as usize] = (start.elapsed().as_secs_f64(), cpu_seconds() - cpu);
        }
        // The first round only warms up.
        if round > 0 {
            wall_ratios.push(times[0].0 / times[1].0);
            cpu_candle.push(times[0].1);
            cpu_ours.push(times[1].1);
            wall_ours.push(times[1].0);
        }
    }
    Ok(Ratios {
        wall: median(wall_ratios),
        cpu: median(cpu_candle) / median(cpu_ours),
        ours_wall: median(wall_ours),
    })
}

/// The printed table: one row per case, forward and forward + backward ratios.
pub struct Table {
    name_width: usize,
    reps: usize,
    times: bool,
}

impl Table {
    /// Prints the header; case names take `name_width` columns.
    pub fn new(name_width: usize, opts: &Options) -> Self {
        println!("candle / ours: wall (median of paired ratios), CPU (ratio of medians)");
        let mut header = format!(
            "{:<name_width$} {:>10} {:>10} {:>10} {:>10}",
            "", "fwd wall", "fwd CPU", "f+b wall", "f+b CPU"
        );
        if opts.times {
            header += &format!(" {:>12} {:>12}", "fwd ours", "f+b ours");
        }
        println!("{header}");
        Self {
            name_width,
            reps: opts.reps,
            times: opts.times,
        }
    }

    /// Compares `run(ours, backward)` forward only, then forward + backward, and prints the row.
    pub fn case(&self, name: &str, mut run: impl FnMut(bool, bool) -> Result<()>) -> Result<()> {
        let fwd = compare(self.reps, |ours| run(ours, false))?;
        let fwd_bwd = compare(self.reps, |ours| run(ours, true))?;
        let width = self.name_width;
        let mut row = format!(
            "{name:<width$} {:>9.2}x {:>9.2}x {:>9.2}x {:>9.2}x",
            fwd.wall, fwd.cpu, fwd_bwd.wall, fwd_bwd.cpu
        );
        if self.times {
            row += &format!(
                " {:>9.3} ms {:>9.3} ms",
                fwd.ours_wall * 1e3,
                fwd_bwd.ours_wall * 1e3
            );
        }
        println!("{row}");
        Ok(())
    }
}
