//! `unitune tune`: fine-tune the UNet on one image bound to a rare token; writes a session.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use unitune::image_io;
use unitune::jobs::{ModelDefaults, PreparedTune, TuneJob};
use unitune::pipelines::StableDiffusion;
use unitune::session::{DeltaEncoding, Session};
use unitune::train::tune::TrainableLayers;
use unitune::train::OptimizerKind;

use crate::common::{check_output_dir, refuse_inputs, DistillArgs, ModelArgs};
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
    /// [default: the model's unitune.json, else 128]
    #[arg(long)]
    steps: Option<usize>,
    /// Images per step (copies of the one image, each with its own noise and timestep)
    /// [default: the model's unitune.json, else 4].
    #[arg(long)]
    batch: Option<usize>,
    /// [default: the model's unitune.json, else 1e-4]
    #[arg(long)]
    lr: Option<f64>,
    /// adafactor (the paper's) or adamw [default: the model's unitune.json, else adafactor].
    #[arg(long)]
    optimizer: Option<OptimizerKind>,
    /// UNet tensors to tune: most (all but norms and the timestep MLP), all, attention,
    /// cross-attention, or lora (a LoRA of every matrix and convolution that most tunes: a
    /// session of a few percent of the UNet) [default: the model's unitune.json, else most].
    #[arg(long)]
    layers: Option<TrainableLayers>,
    /// The rank of a --layers lora tune [default: the model's unitune.json, else 8].
    #[arg(long)]
    lora_rank: Option<usize>,
    /// Training size; the image is scaled to cover it and centre-cropped [default: the model's size].
    #[arg(long)]
    width: Option<usize>,
    #[arg(long)]
    height: Option<usize>,
    #[arg(long)]
    seed: Option<u64>,
    /// Write one JSON object per step ({"step", "loss", "seconds" since the tune started}) to
    /// this file.
    #[arg(long)]
    log_json: Option<PathBuf>,
    /// Recompute each UNet block's activations in the backward pass instead of keeping them:
    /// about a third of the memory for a training step, at the cost of one more forward.
    #[arg(long)]
    gradient_checkpointing: bool,
    /// How weight deltas are stored: q8 (int8 per row), q2, q3, q4 (a ±1, ±3, ±7 grid per
    /// row, deflated, distilled into after the tune: about 5%, 9%, 12% of the UNet in f32),
    /// f16, f32, or lora (a --layers lora tune's factors) [default: lora for a LoRA tune, else
    /// q8].
    #[arg(long)]
    delta_encoding: Option<DeltaEncoding>,
    #[command(flatten)]
    distill: DistillArgs,
    /// The session file to write (safetensors).
    #[arg(long, short)]
    output: PathBuf,
}

pub fn run(args: TuneArgs) -> Result<()> {
    for (flag, path) in [
        ("--output", Some(&args.output)),
        ("--log-json", args.log_json.as_ref()),
    ] {
        if let Some(path) = path {
            check_output_dir(path)?;
            refuse_inputs(flag, path, &[("image", Some(&args.image))])?;
        }
    }
    let base = ModelDefaults::read(&args.model.dir()?)?.tune_job();
    let layers = args.layers.unwrap_or(base.layers);
    if args.lora_rank.is_some() && layers != TrainableLayers::Lora {
        bail!("--lora-rank: only a --layers lora tune has a rank");
    }
    let job = TuneJob {
        token: args.token,
        steps: args.steps.unwrap_or(base.steps),
        batch_size: args.batch.unwrap_or(base.batch_size),
        learning_rate: args.lr.unwrap_or(base.learning_rate),
        optimizer: args.optimizer.unwrap_or(base.optimizer),
        layers,
        lora_rank: args.lora_rank.or(base.lora_rank),
        width: args.width,
        height: args.height,
        seed: args.seed,
        gradient_checkpointing: args.gradient_checkpointing,
        delta_encoding: args.delta_encoding,
        distill_steps: args.distill.distill_steps.or(base.distill_steps),
        distill_learning_rate: args.distill.distill_lr.or(base.distill_learning_rate),
        distill_prompts: base.distill_prompts,
        distill_difference_weight: (args.distill.distill_difference_weight)
            .or(base.distill_difference_weight),
    };
    if args.distill.any() && job.settings(String::new(), 0).distillation.is_none() {
        bail!("--distill-steps, --distill-lr, --distill-difference-weight: only a tune stored in q2, q3 or q4 is distilled");
    }
    let image = image_io::load_image(&args.image)?;
    let mut sd = args.model.load(Some(job.trainable()))?;
    let prepared = job.prepare(&sd, image)?;
    tune_and_save(&mut sd, prepared, &args.output, args.log_json.as_deref())?;
    Ok(())
}

/// Runs a prepared tune on `sd` (loaded with its trainable tensors), reporting as it goes, and
/// writes the session to `output` in the encoding it was tuned for; `edit` uses it when it is given an image but no session.
pub fn tune_and_save(
    sd: &mut StableDiffusion,
    prepared: PreparedTune,
    output: &Path,
    log_json: Option<&Path>,
) -> Result<Session> {
    let trainable = sd.unet_store.trainable_vars();
    let n_trainable: usize = trainable.iter().map(|(_, v)| v.elem_count()).sum();
    let (width, height) = prepared.image.dimensions();
    let s = &prepared.settings;
    eprintln!(
        "tuning {} tensors ({:.1} M weights, layers {:?}) on {width}x{height}, token `{}`, seed {}",
        trainable.len(),
        n_trainable as f64 / 1e6,
        s.layers,
        s.token,
        s.seed
    );

    let mut log = match log_json {
        Some(path) => Some(std::io::BufWriter::new(
            std::fs::File::create(path)
                .with_context(|| format!("--log-json {}", path.display()))?,
        )),
        None => None,
    };
    // Seconds since the tune started (the image's and prompt's encoding included), so that a
    // log shows the speed of each step too.
    let start = std::time::Instant::now();
    let mut on_step = |step: usize, loss: f32| -> unitune::Result<()> {
        if let (Some(log), Some(path)) = (log.as_mut(), log_json) {
            let seconds = (start.elapsed().as_secs_f64() * 1e3).round() / 1e3;
            let line = serde_json::json!({"step": step, "loss": loss, "seconds": seconds});
            writeln!(log, "{line}")
                .and_then(|()| log.flush())
                .map_err(|e| unitune::Error::io(path, e))?;
        }
        Ok(())
    };
    let session = prepared.run(sd, &mut BarProgress::new(), &mut on_step)?;
    session.save(output, session.settings.delta_encoding)?;
    // The tune's losses, then the distillation's (against the tuned model), each summed up.
    let (tune, distill) = session
        .losses
        .split_at(session.settings.steps.min(session.losses.len()));
    let trend = |losses: &[f32]| {
        let n = losses.len().clamp(1, 8) as f32;
        let first = losses.iter().take(8).sum::<f32>() / n;
        let last = losses.iter().rev().take(8).sum::<f32>() / n;
        format!("{first:.4} -> {last:.4}")
    };
    let distilled = match distill {
        [] => String::new(),
        d => format!(", distillation loss {}", trend(d)),
    };
    eprintln!(
        "wrote {} ({} tensors changed; loss {}{distilled}, means of first/last 8 steps)",
        output.display(),
        session.deltas.len(),
        trend(tune)
    );
    Ok(session)
}
