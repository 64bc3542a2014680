//! `unitune export`: the tuned model of a session as a diffusers folder, for the tools people
//! already use (diffusers' `from_pretrained`, and everything that reads that layout).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use unitune::session::Session;

use crate::common::{refuse_inputs, ModelArgs};

#[derive(Args)]
pub struct ExportArgs {
    /// The model the session was tuned on.
    #[command(flatten)]
    model: ModelArgs,
    /// Session file written by `unitune tune`.
    #[arg(long)]
    session: PathBuf,
    /// The folder to write (replaced whole if it exists; it appears only once complete).
    #[arg(long, short)]
    output: PathBuf,
}

pub fn run(args: ExportArgs) -> Result<()> {
    let session = Session::load(&args.session)
        .with_context(|| format!("loading session {}", args.session.display()))?;
    let model = args.model.dir()?;
    refuse_inputs(
        "--output",
        &args.output,
        &[
            ("model folder", Some(&model)),
            ("session", Some(&args.session)),
        ],
    )?;
    if args
        .output
        .canonicalize()
        .is_ok_and(|out| model.canonicalize().is_ok_and(|m| m.starts_with(&out)))
    {
        bail!(
            "--output {} holds the model folder; choose another folder",
            args.output.display()
        );
    }
    let sd = args.model.load(None)?;
    sd.export_tuned(&session, &args.output)
        .with_context(|| format!("exporting to {}", args.output.display()))?;
    eprintln!(
        "wrote {}: the model tuned on token `{}` ({} tensors changed), a diffusers folder",
        args.output.display(),
        session.token,
        session.deltas.len()
    );
    Ok(())
}
