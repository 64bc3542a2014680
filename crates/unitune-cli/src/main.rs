//! The `unitune` command: argument parsing and reporting only; the work is in the `unitune`
//! library (its job layer, `unitune::jobs`) and, for the lab commands, in `unitune-lab`.

mod bench;
mod bench_edits;
mod builtin;
mod common;
mod edit;
mod export;
mod generate;
mod pretrain;
mod progress;
mod serve;
mod tune;
mod worker;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "unitune",
    version,
    about = "Text-driven editing of a single photo (UniTune) on Stable Diffusion"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate an image from a prompt (txt2img), or from a prompt and an image (img2img).
    Generate(generate::GenerateArgs),
    /// Fine-tune the model on one image bound to a rare token; writes a session file.
    Tune(tune::TuneArgs),
    /// Edit the tuned image with a prompt, from a session written by `tune`.
    Edit(Box<edit::EditArgs>),
    /// Write a session's tuned model as a diffusers folder.
    Export(export::ExportArgs),
    /// Serve the web page and HTTP API: tune once, edit live in a browser.
    Serve(serve::ServeArgs),
    /// Run tune and edit jobs from NATS JetStream for `unitune serve --nats` front ends.
    Worker(worker::WorkerArgs),
    /// Train a small text-to-image model from scratch (the built-in model).
    Pretrain(pretrain::PretrainArgs),
    /// Time the model's building blocks (benchmarks; see BENCHMARKS.md).
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Measure edit quality on held-out world scenes against ground truth (see BENCHMARKS.md).
    BenchEdits(bench_edits::BenchEditsArgs),
}

fn main() {
    keep_freed_memory();
    park_idle_candle_workers();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::Tune(args) => tune::run(args),
        Command::Edit(args) => edit::run(*args),
        Command::Export(args) => export::run(args),
        Command::Serve(args) => serve::run(args),
        Command::Worker(args) => worker::run(args),
        Command::Pretrain(args) => pretrain::run(args),
        Command::Bench(command) => bench::run(command),
        Command::BenchEdits(args) => bench_edits::run(args),
    };
    if let Err(err) = result {
        report(err);
    }
}

/// glibc's malloc serves every block over 32 MB with its own mmap and unmaps it on free, so each
/// large tensor of a diffusion step is fresh memory that the kernel faults in and zeroes page by
/// page: about a third of a CPU training step's backward pass in our profile (BENCHMARKS.md).
/// Keeping freed memory in the heap lets the next tensor reuse it.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator settings; called first thing, before any thread.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

/// candle runs its elementwise ops on a pool of its own, whose workers spin 25,000 times after
/// each op before they sleep. Our kernels run on rayon's threads, which those spinning workers
/// then compete with for the cores: a tenth of a CPU training step in our profile (BENCHMARKS.md).
/// Sleeping after 200 spins gives the cores back; a value the user set is kept.
fn park_idle_candle_workers() {
    const SPIN_LIMIT: &str = "CANDLE_BARRIER_POOL_SPIN_LIMIT";
    if std::env::var_os(SPIN_LIMIT).is_none() {
        // Called first thing, before any thread exists that could read the environment.
        std::env::set_var(SPIN_LIMIT, "200");
    }
}

/// Prints the error chain, then exits: 130 when interrupted (as shells report Ctrl-C), else 1.
fn report(err: anyhow::Error) -> ! {
    // The full chain: what we were doing, then the library's error naming the file or flag.
    eprintln!("error: {err}");
    let mut last = err.to_string();
    for cause in err.chain().skip(1) {
        // Library errors already end with their source's text (`path: reason`): say it once.
        let text = cause.to_string();
        if !last.ends_with(&text) {
            eprintln!("  caused by: {text}");
        }
        last = text;
    }
    let interrupted = err
        .chain()
        .any(|c| matches!(c.downcast_ref(), Some(unitune::Error::Interrupted)));
    std::process::exit(if interrupted { 130 } else { 1 });
}
