//! The `unitune` command: argument parsing and reporting only; the work is in the `unitune` library.

mod bench;
mod bench_edits;
mod builtin;
mod edit;
mod generate;
mod pretrain;
mod progress;
mod tune;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "unitune", version, about = "Text-driven editing of a single photo (UniTune) on Stable Diffusion")]
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
    Edit(edit::EditArgs),
    /// Train a small text-to-image model from scratch (the built-in model).
    Pretrain(pretrain::PretrainArgs),
    /// Time the model's building blocks (benchmarks; see BENCHMARKS.md).
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Measure edit quality on held-out world scenes against ground truth (see BENCHMARKS.md).
    BenchEdits(bench_edits::BenchEditsArgs),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::Tune(args) => tune::run(args),
        Command::Edit(args) => edit::run(args),
        Command::Pretrain(args) => pretrain::run(args),
        Command::Bench(command) => bench::run(command),
        Command::BenchEdits(args) => bench_edits::run(args),
    };
    if let Err(err) = result {
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
        let interrupted = err.chain().any(|c| matches!(c.downcast_ref(), Some(unitune::Error::Interrupted)));
        std::process::exit(if interrupted { 130 } else { 1 });
    }
}
