//! `unitune export`: the tuned model of a session as a diffusers folder, for the tools people
//! already use (diffusers' `from_pretrained`, and everything that reads that layout), or as a
//! LoRA file (kohya naming: AUTOMATIC1111, ComfyUI, diffusers' `load_lora_weights`).

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::DType;
use clap::Args;
use unitune::atomic::write_atomic;
use unitune::session::Session;
use unitune::weights::{export, lora};

use crate::common::{refuse_inputs, ModelArgs};

#[derive(Args)]
pub struct ExportArgs {
    /// The model the session was tuned on.
    #[command(flatten)]
    model: ModelArgs,
    /// Session file written by `unitune tune`.
    #[arg(long)]
    session: PathBuf,
    /// The folder to write (replaced whole if it exists; it appears only once complete), or
    /// with `--format lora` the .safetensors file.
    #[arg(long, short)]
    output: PathBuf,
    /// diffusers (the whole tuned model as a folder) or lora (the tune's change as a LoRA file).
    #[arg(long, default_value = "diffusers", value_parser = ["diffusers", "lora"])]
    format: String,
    /// --format lora: the rank of each layer's factorisation (the file grows with it, the error
    /// shrinks) [default: a LoRA tune's own rank, which is exact, else 32].
    #[arg(long)]
    rank: Option<usize>,
}

pub fn run(args: ExportArgs) -> Result<()> {
    let session = Session::load(&args.session)
        .with_context(|| format!("loading session {}", args.session.display()))?;
    let model = args.model.dir()?;
    let config = args.model.config.as_deref();
    refuse_inputs(
        "--output",
        &args.output,
        &[
            ("model", Some(&model)),
            ("config folder", config),
            ("session", Some(&args.session)),
        ],
    )?;
    // The output folder is replaced whole: it must not hold anything the export reads.
    for (what, input) in [
        ("the model", Some(model.as_path())),
        ("the --config folder", config),
    ] {
        let inside = |input: &std::path::Path| {
            let out = args.output.canonicalize();
            out.is_ok_and(|out| input.canonicalize().is_ok_and(|i| i.starts_with(&out)))
        };
        if input.is_some_and(inside) {
            bail!(
                "--output {} holds {what}; choose another folder",
                args.output.display()
            );
        }
    }
    if args.format == "lora" {
        return write_lora(&args, &session);
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

/// The session's delta as a LoRA file at `--rank`, with the error of the factorisation.
fn write_lora(args: &ExportArgs, session: &Session) -> Result<()> {
    let rank = args.rank.or(session.settings.lora_rank).unwrap_or(32);
    let lora = lora::from_deltas(&session.deltas, rank)?;
    let metadata = HashMap::from([
        ("ss_network_module".to_string(), "networks.lora".to_string()),
        ("ss_network_dim".to_string(), rank.to_string()),
        ("unitune_token".to_string(), session.token.clone()),
        (
            "unitune_base_fingerprint".to_string(),
            session.base_fingerprint.clone(),
        ),
    ]);
    write_atomic(&args.output, |tmp| {
        export::write_safetensors_with(tmp, &lora.tensors, DType::F16, metadata)
    })
    .with_context(|| format!("writing {}", args.output.display()))?;
    let worst = lora
        .layers
        .iter()
        .max_by(|a, b| a.relative_error.total_cmp(&b.relative_error));
    eprintln!(
        "wrote {}: a rank-{} LoRA of {} layers (kohya naming), {:.1}% relative error over the whole change{}",
        args.output.display(),
        rank,
        lora.layers.len(),
        100.0 * lora.relative_error,
        worst.map_or(String::new(), |w| format!(
            " (worst layer {}: {:.1}%)",
            w.name,
            100.0 * w.relative_error
        ))
    );
    if !lora.skipped.is_empty() {
        eprintln!(
            "left out {} vector deltas (biases), which a LoRA cannot hold",
            lora.skipped.len()
        );
    }
    Ok(())
}
