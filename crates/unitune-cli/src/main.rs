//! The `unitune` command: argument parsing and reporting only; the work is in the `unitune` library.

mod generate;
mod progress;

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
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(args) => generate::run(args),
    };
    if let Err(err) = result {
        // The full chain: what we were doing, then the library's error naming the file or flag.
        eprintln!("error: {err}");
        for cause in err.chain().skip(1) {
            eprintln!("  caused by: {cause}");
        }
        let interrupted = err.chain().any(|c| matches!(c.downcast_ref(), Some(unitune::Error::Interrupted)));
        std::process::exit(if interrupted { 130 } else { 1 });
    }
}
