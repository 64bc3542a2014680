//! `unitune generate`: txt2img, or img2img with `--image`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use unitune::image_io;
use unitune::noise::{random_seed, Noise};
use unitune::pipelines::{generate, read_init_noise, GenerateRequest, StableDiffusion};
use unitune::schedulers::SchedulerKind;

use crate::common::{check_output, ModelArgs};
use crate::progress::BarProgress;

#[derive(Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long)]
    prompt: String,
    /// What to steer away from (the unconditional prompt of classifier-free guidance).
    #[arg(long, default_value = "")]
    negative_prompt: String,
    /// Start from this image (img2img): PNG, JPEG or WebP.
    #[arg(long)]
    image: Option<PathBuf>,
    /// img2img: fraction of the schedule re-run from the noised image (1.0 ignores the image).
    #[arg(long, default_value_t = 0.8)]
    strength: f64,
    /// Number of denoising steps of the full schedule.
    #[arg(long, default_value_t = 50)]
    steps: usize,
    /// Classifier-free guidance scale; 1.0 or less skips the unconditional pass.
    #[arg(long, default_value_t = 7.5)]
    guidance: f64,
    /// ddim, ddpm, euler, euler-a or dpm++ [default: the folder's scheduler if supported, else ddim].
    #[arg(long)]
    scheduler: Option<SchedulerKind>,
    /// Override a field of scheduler_config.json, e.g. `timestep_spacing=trailing` or `eta=0.5`.
    #[arg(long = "scheduler-option", value_name = "KEY=VALUE")]
    scheduler_options: Vec<String>,
    /// Width in pixels, a multiple of 8 [default: the model's size, or the image's for img2img].
    #[arg(long)]
    width: Option<usize>,
    #[arg(long)]
    height: Option<usize>,
    /// Seed of the noise [default: random, printed].
    #[arg(long)]
    seed: Option<u64>,
    /// safetensors file whose f32 tensor `latents` [1, 4, H/8, W/8] replaces the initial noise
    /// (as diffusers' `latents=`).
    #[arg(long)]
    init_noise: Option<PathBuf>,
    /// Output PNG file.
    #[arg(long, short)]
    output: PathBuf,
}

pub fn run(args: GenerateArgs) -> Result<()> {
    check_output(&args.output, args.image.as_deref())?;
    // Every input file is read before the model: a bad one fails at once, naming its flag.
    let image = args
        .image
        .as_deref()
        .map(image_io::load_image)
        .transpose()?;
    let init_noise = args
        .init_noise
        .as_deref()
        .map(|path| {
            read_init_noise(path, &candle_core::Device::Cpu)
                .with_context(|| format!("--init-noise {}", path.display()))
        })
        .transpose()?;
    let mut sd = args.model.load(None)?;
    apply_scheduler_options(&mut sd, &args.scheduler_options)?;
    let scheduler = match args.scheduler {
        Some(kind) => kind,
        None => default_scheduler(&sd),
    };
    let (width, height) = sd.default_size(
        args.width,
        args.height,
        image.as_ref().map(|i| i.dimensions()),
    )?;
    let mut request = GenerateRequest::new(args.prompt.clone());
    (request.width, request.height) = (width, height);
    request.negative_prompt = args.negative_prompt;
    request.num_inference_steps = args.steps;
    request.guidance_scale = args.guidance;
    request.scheduler = scheduler;
    request.strength = args.strength;
    if let Some(img) = image {
        // The size is checked before the picture is resized to it.
        sd.check_size(request.width, request.height)?;
        let img = image_io::resize(img, request.width as u32, request.height as u32);
        request.image = Some(image_io::image_to_tensor(&img, &sd.device)?);
    }
    if let Some(latents) = init_noise {
        request.latents = Some(latents.to_device(&sd.device)?);
    }

    let seed = args.seed.unwrap_or_else(random_seed);
    eprintln!(
        "seed {seed}, {scheduler:?}, {} steps, {}x{}",
        request.num_inference_steps, request.width, request.height
    );
    let mut progress = BarProgress::new();
    let images = generate(&sd, &request, &mut Noise::seeded(seed), &mut progress)?;
    image_io::save_png(&image_io::tensor_to_image(&images, 0)?, &args.output)?;
    eprintln!("wrote {}", args.output.display());
    Ok(())
}

fn default_scheduler(sd: &StableDiffusion) -> SchedulerKind {
    sd.scheduler_config
        .class_name
        .as_deref()
        .and_then(SchedulerKind::from_class_name)
        .unwrap_or(SchedulerKind::Ddim)
}

/// Applies `--scheduler-option KEY=VALUE` overrides (VALUE read as JSON, else as a string).
fn apply_scheduler_options(sd: &mut StableDiffusion, options: &[String]) -> Result<()> {
    let pairs = options
        .iter()
        .map(|o| {
            o.split_once('=')
                .with_context(|| format!("--scheduler-option `{o}`: expected KEY=VALUE"))
        })
        .collect::<Result<Vec<_>>>()?;
    sd.scheduler_config = sd.scheduler_config.with_overrides(&pairs)?;
    Ok(())
}
