//! `unitune tune`: fine-tune the UNet on one image bound to a rare token; writes a session.

use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Args, Parser};
use unitune::image_io;
use unitune::noise::Noise;
use unitune::pipelines::StableDiffusion;
use unitune::train::session::{DeltaEncoding, Session};
use unitune::train::tune::{default_token, tune, TrainableLayers, TuneSettings};
use unitune::train::OptimizerKind;

use crate::generate::{check_output_dir, default_size, rand_seed};
use crate::model::ModelArgs;
use crate::progress::BarProgress;

#[derive(Args)]
pub struct TuneArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The photo to tune on (PNG, JPEG or WebP).
    #[arg(long)]
    image: PathBuf,
    /// The rare token the image is bound to [default: a made-up word the tokenizer splits, e.g. beikkpic].
    #[arg(long)]
    token: Option<String>,
    #[arg(long, default_value_t = 128)]
    steps: usize,
    /// Images per step (copies of the one image, each with its own noise and timestep).
    #[arg(long, default_value_t = 4)]
    batch: usize,
    #[arg(long, default_value_t = 1e-4)]
    lr: f64,
    /// adafactor (the paper's) or adamw.
    #[arg(long, default_value = "adafactor")]
    optimizer: OptimizerKind,
    /// UNet tensors to tune: most (all but norms and the timestep MLP), all, attention, cross-attention.
    #[arg(long, default_value = "most")]
    layers: TrainableLayers,
    /// Training size; the image is scaled to cover it and centre-cropped [default: the model's size].
    #[arg(long)]
    width: Option<usize>,
    #[arg(long)]
    height: Option<usize>,
    #[arg(long)]
    seed: Option<u64>,
    /// Write one JSON object per step ({"step", "loss"}) to this file.
    #[arg(long)]
    log_json: Option<PathBuf>,
    /// Recompute each UNet block's activations in the backward pass instead of keeping them:
    /// about a third of the memory for a training step, at the cost of one more forward.
    #[arg(long)]
    gradient_checkpointing: bool,
    /// How weight deltas are stored: q8 (int8 per-row, default), f16 or f32 (exact).
    #[arg(long, default_value = "q8")]
    delta_encoding: DeltaEncoding,
    /// The session file to write (safetensors).
    #[arg(long, short)]
    output: PathBuf,
}

pub fn run(args: TuneArgs) -> Result<()> {
    tune_and_save(args).map(|_| ())
}

/// Tunes as `unitune tune` does with these arguments, on `image` with every default, writing the
/// session to `output`; `edit` uses it when it is given an image but no session.
pub fn tune_image(
    model: &ModelArgs,
    image: &Path,
    seed: u64,
    output: &Path,
) -> Result<(StableDiffusion, Session)> {
    #[derive(clap::Parser)]
    struct Defaults {
        #[command(flatten)]
        args: TuneArgs,
    }
    let mut argv: Vec<OsString> = vec![
        "tune".into(),
        "--image".into(),
        image.into(),
        "--output".into(),
        output.into(),
    ];
    argv.extend(["--seed".into(), seed.to_string().into()]);
    argv.extend(model.to_argv().into_iter().map(OsString::from));
    tune_and_save(Defaults::try_parse_from(argv)?.args)
}

/// Runs the tune; returns the model (its UNet now holds the tuned weights) and the session written.
fn tune_and_save(args: TuneArgs) -> Result<(StableDiffusion, Session)> {
    check_output_dir(&args.output)?;
    for (flag, path) in [
        ("--output", Some(&args.output)),
        ("--log-json", args.log_json.as_ref()),
    ] {
        if let Some(path) = path {
            if path
                .canonicalize()
                .ok()
                .is_some_and(|p| args.image.canonicalize().ok() == Some(p))
            {
                anyhow::bail!(
                    "{flag} {} is the input image; choose another name",
                    path.display()
                );
            }
        }
    }
    let image = image_io::load_image(&args.image)?;
    let mut sd = args.model.load(Some(args.layers.filter()))?;
    sd.unet
        .set_gradient_checkpointing(args.gradient_checkpointing);
    let (width, height) = default_size(&sd, args.width, args.height, None)?;
    let image = image_io::resize_and_center_crop(image, width as u32, height as u32);

    let seed = args.seed.unwrap_or_else(rand_seed);
    let token = args.token.unwrap_or_else(|| default_token(&sd.tokenizer));
    let settings = TuneSettings {
        token: token.clone(),
        steps: args.steps,
        batch_size: args.batch,
        learning_rate: args.lr,
        optimizer: args.optimizer,
        layers: args.layers,
        seed,
    };
    let trainable = sd.unet_store.trainable_vars();
    let n_trainable: usize = trainable.iter().map(|(_, v)| v.elem_count()).sum();
    eprintln!(
        "tuning {} tensors ({:.1} M weights, layers {:?}) on {width}x{height}, token `{token}`, seed {seed}",
        trainable.len(),
        n_trainable as f64 / 1e6,
        args.layers
    );

    let mut log = match &args.log_json {
        Some(path) => Some(std::io::BufWriter::new(
            std::fs::File::create(path)
                .with_context(|| format!("--log-json {}", path.display()))?,
        )),
        None => None,
    };
    let mut on_step = |step: usize, loss: f32| -> unitune::Result<()> {
        if let Some(log) = log.as_mut() {
            writeln!(log, "{{\"step\": {step}, \"loss\": {loss}}}")
                .and_then(|()| log.flush())
                .map_err(|e| unitune::Error::io(args.log_json.as_ref().expect("log path"), e))?;
        }
        Ok(())
    };
    let session = tune(
        &sd,
        &image,
        settings,
        &mut Noise::seeded(seed),
        &mut BarProgress::new(),
        &mut on_step,
    )?;
    session.save(&args.output, args.delta_encoding)?;
    let n = session.losses.len().clamp(1, 8) as f32;
    let first = session.losses.iter().take(8).sum::<f32>() / n;
    let last = session.losses.iter().rev().take(8).sum::<f32>() / n;
    eprintln!(
        "wrote {} ({} tensors changed; loss {first:.4} -> {last:.4}, means of first/last 8 steps)",
        args.output.display(),
        session.deltas.len()
    );
    Ok((sd, session))
}
