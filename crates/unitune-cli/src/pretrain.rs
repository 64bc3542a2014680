//! `unitune pretrain`: train a small text-to-image model from scratch (the built-in model) into a
//! diffusers-layout folder, with checkpoints and `--resume`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use unitune_lab::pretrain::{
    pretrain, DataSource, Preset, PretrainSettings, TrainingState, WeightsDtype,
};

use crate::progress::BarProgress;

/// Options left out take the preset's defaults, or with `--resume` the values the run was
/// started with.
#[derive(Args)]
pub struct PretrainArgs {
    /// Folder to write the model to (diffusers layout); checkpoints replace it as training goes.
    #[arg(long, short)]
    output: PathBuf,
    /// `world` (the built-in procedural scenes) or a folder of images with same-name .txt
    /// captions [default: world].
    #[arg(long)]
    data: Option<String>,
    /// Picture side in pixels.
    #[arg(long)]
    size: Option<usize>,
    /// Network sizes: small (the built-in model), medium (a wider UNet attending on every level)
    /// or tiny (tests) [default: small].
    #[arg(long)]
    preset: Option<Preset>,
    /// World data: train on scenes 0..N.
    #[arg(long)]
    world_scenes: Option<usize>,
    /// World data: at most this many objects per scene (1 to 3).
    #[arg(long)]
    world_max_objects: Option<usize>,
    /// Autoencoder steps (phase one).
    #[arg(long)]
    vae_steps: Option<usize>,
    /// Autoencoder pictures per step.
    #[arg(long)]
    vae_batch: Option<usize>,
    /// Side of the random crops the autoencoder trains on (0: whole pictures).
    #[arg(long)]
    vae_crop: Option<usize>,
    #[arg(long)]
    vae_lr: Option<f64>,
    /// Steps refining the decoder alone on whole pictures (the encoder, so the latents, kept):
    /// sharper round trips; may be added to a finished or running training with --resume.
    #[arg(long)]
    decoder_steps: Option<usize>,
    #[arg(long)]
    decoder_lr: Option<f64>,
    /// Text encoder + UNet steps (phase two).
    #[arg(long)]
    steps: Option<usize>,
    /// Text encoder + UNet pictures per step.
    #[arg(long)]
    batch: Option<usize>,
    /// Peak learning rate of phase two (AdamW; warmup, then cosine decay to a tenth).
    #[arg(long)]
    lr: Option<f64>,
    /// Extra loss weight of the latents an object touches (world data; 0: all the same). May be
    /// changed on --resume.
    #[arg(long)]
    object_weight: Option<f64>,
    /// The text encoder's context in tokens, bos and eos included.
    #[arg(long)]
    max_tokens: Option<usize>,
    /// Scale of the per-channel constant added to the diffusion noise (offset noise).
    #[arg(long)]
    offset_noise: Option<f64>,
    /// Warmup steps of each phase.
    #[arg(long)]
    warmup: Option<usize>,
    #[arg(long)]
    seed: Option<u64>,
    /// Steps between checkpoints (0: only at the end of each phase).
    #[arg(long)]
    checkpoint_every: Option<usize>,
    /// Weights of the final folder: f32, or f16 (half the size; checkpoints stay f32).
    #[arg(long)]
    dtype: Option<WeightsDtype>,
    /// Continue the training saved in --output (its training_state.json).
    #[arg(long)]
    resume: bool,
    /// A new run takes the autoencoder of this model folder instead of training one (both
    /// autoencoder phases skipped): a new denoiser, e.g. of another preset, on a finished
    /// autoencoder.
    #[arg(long, conflicts_with = "resume")]
    vae_from: Option<PathBuf>,
    /// cpu, cuda or cuda:N (CUDA needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    device: String,
}

pub fn run(args: PretrainArgs) -> Result<()> {
    let (mut settings, data) = match args.resume {
        true => {
            let saved = TrainingState::read(&args.output)
                .with_context(|| format!("resuming {}", args.output.display()))?;
            (saved.settings, saved.data)
        }
        false => (
            PretrainSettings::new(args.preset.unwrap_or(Preset::Small)),
            "world".to_string(),
        ),
    };
    let overrides: [(&mut usize, Option<usize>); 12] = [
        (&mut settings.max_tokens, args.max_tokens),
        (&mut settings.size, args.size),
        (&mut settings.world_scenes, args.world_scenes),
        (&mut settings.world_max_objects, args.world_max_objects),
        (&mut settings.vae_crop, args.vae_crop),
        (&mut settings.vae_steps, args.vae_steps),
        (&mut settings.decoder_steps, args.decoder_steps),
        (&mut settings.vae_batch_size, args.vae_batch),
        (&mut settings.steps, args.steps),
        (&mut settings.batch_size, args.batch),
        (&mut settings.warmup_steps, args.warmup),
        (&mut settings.checkpoint_every, args.checkpoint_every),
    ];
    for (field, value) in overrides {
        if let Some(v) = value {
            *field = v;
        }
    }
    settings.vae_learning_rate = args.vae_lr.unwrap_or(settings.vae_learning_rate);
    settings.decoder_learning_rate = args.decoder_lr.unwrap_or(settings.decoder_learning_rate);
    settings.learning_rate = args.lr.unwrap_or(settings.learning_rate);
    settings.seed = args.seed.unwrap_or(settings.seed);
    settings.offset_noise = args.offset_noise.unwrap_or(settings.offset_noise);
    settings.object_weight = args.object_weight.unwrap_or(settings.object_weight);
    settings.weights_dtype = args.dtype.unwrap_or(settings.weights_dtype);
    settings.preset = args.preset.unwrap_or(settings.preset);
    settings.vae_from = args.vae_from.or(settings.vae_from);
    let device = crate::common::parse_device(&args.device)?;
    let source = DataSource::parse(args.data.as_deref().unwrap_or(&data));
    let autoencoder = match &settings.vae_from {
        Some(dir) => format!("autoencoder from {}", dir.display()),
        None => format!(
            "autoencoder {} steps (batch {})",
            settings.vae_steps, settings.vae_batch_size
        ),
    };
    eprintln!(
        "pretraining {:?} at {}x{} on {}: {autoencoder}, unet+text {} steps (batch {}), seed {}",
        settings.preset,
        settings.size,
        settings.size,
        source.describe(),
        settings.steps,
        settings.batch_size,
        settings.seed
    );
    let state = pretrain(
        &args.output,
        &source,
        settings,
        args.resume,
        &device,
        &mut BarProgress::new(),
    )
    .with_context(|| format!("pretraining into {}", args.output.display()))?;
    eprintln!(
        "wrote {}: autoencoder L1 {:.4} after {} steps ({:.0} s, scaling_factor {:.4}); denoising loss {:.4} after {} steps ({:.0} s)",
        args.output.display(),
        state.vae_l1.latest(10),
        state.vae_step,
        state.vae_seconds,
        state.scaling_factor.unwrap_or(f64::NAN),
        state.loss.latest(10),
        state.step,
        state.seconds
    );
    Ok(())
}
