//! `unitune edit`: a batch of edits of a tuned session's image ([`unitune::jobs::EditJob`]): one
//! call loads the model and the session once and runs every combination of prompts x seeds x
//! guidance values x start values; sweeps also get a labelled contact sheet.
//!
//! Output names, from `--output OUT.png`: `OUT<suffix>.png` with the suffix the job gives each
//! edit (none for a single edit; e.g. `OUT-p2-seed43-g8-t0.9.png`), and `OUT<suffix>.png` for a
//! sweep's contact sheet (`OUT[-p<N>][-seed<S>]-sheet.png`). The mask used is written next to its
//! image as `<image>.mask.png` (the feathered weight of the edit per pixel; a given mask is
//! written once, as `OUT.mask.png`). Every file is written atomically, and no output may be one
//! of the inputs.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use unitune::image_io;
use unitune::jobs::{
    read_prompts_file, EditEvent, EditGroup, EditJob, Editor, ModelDefaults, TuneJob,
};
use unitune::noise::random_seed;
use unitune::pipelines::{EditMask, Mask};
use unitune::schedulers::SchedulerKind;
use unitune::session::Session;

use crate::common::{check_output, refuse_inputs, suffixed, ModelArgs};
use crate::progress::BarProgress;

#[derive(Args)]
pub struct EditArgs {
    /// The model the session was tuned on.
    #[command(flatten)]
    model: ModelArgs,
    /// Session file written by `unitune tune`. Without it, `--image` is tuned first with
    /// `unitune tune`'s defaults and the session is saved as OUT.session for further edits.
    #[arg(long)]
    session: Option<PathBuf>,
    /// Without --session: the photo to tune on and edit. With it: edit this picture instead of the
    /// session's source image (resized to the session image's size), e.g. to refine an earlier edit.
    #[arg(long)]
    image: Option<PathBuf>,
    /// The edit, e.g. "two dogs in a restaurant"; the session's token is put in front unless the
    /// prompt already has it. Repeat for several edits.
    #[arg(long = "prompt", value_name = "TEXT")]
    prompts: Vec<String>,
    /// A file of edit prompts, one per line (blank lines skipped), after any --prompt.
    #[arg(long = "prompts", value_name = "FILE")]
    prompts_file: Option<PathBuf>,
    /// The unconditional prompt of classifier-free guidance (what to steer away from).
    #[arg(long, default_value = "")]
    negative_prompt: String,
    /// Classifier-free guidance scale g; 1 or less turns it off. UniTune wants strong guidance:
    /// weak guidance gives the base image back.
    /// [default: the model's unitune.json, else 10]
    #[arg(long)]
    guidance: Option<f64>,
    /// Turn on prompt guidance against this prompt: "" for the token alone, or a caption of the
    /// image (the token is put in front of it too).
    #[arg(long, value_name = "TEXT")]
    baseline_prompt: Option<String>,
    /// Prompt guidance weight w. With guidance on: eps = eps_u + g (eps_b - eps_u) + w (eps_e - eps_b),
    /// so w = g is plain guidance on the edit and w > g pushes the edit harder.
    /// [default: the model's unitune.json, else 10]
    #[arg(long, requires = "baseline_prompt")]
    prompt_guidance: Option<f64>,
    /// Late start: the fraction of the schedule run from the image's noised latents (1 = from
    /// pure noise). 0.8-0.98 keeps more of the image; keep 1 for large semantic changes
    /// [default: the model's unitune.json, else 1].
    #[arg(long, value_name = "T0")]
    start: Option<f64>,
    /// Blend the image into the result after sampling: 0 = the edit, 1 = the image
    /// [default: the model's unitune.json, else 0].
    #[arg(long, value_name = "A")]
    interpolate: Option<f64>,
    /// Pull the latents toward the image's (noised to the step) after every step, by this weight;
    /// it compounds over the steps, so 0.05-0.2 already keeps much. 1 = the image
    /// [default: the model's unitune.json, else 0].
    #[arg(long)]
    latent_blend: Option<f64>,
    /// Mask picture, white where the edit may change the image (resized to it, binarised at half grey).
    #[arg(long, conflicts_with = "auto_mask")]
    mask: Option<PathBuf>,
    /// Estimate the mask from where an unmasked edit differs from the image, then edit again with
    /// it [default: the model's unitune.json, else off].
    #[arg(long, conflicts_with = "no_auto_mask")]
    auto_mask: bool,
    /// No estimated mask, where the model's unitune.json asks for one.
    #[arg(long)]
    no_auto_mask: bool,
    /// Auto mask: a pixel changed when its blurred mean RGB difference exceeds this (0-1)
    /// [default: the model's unitune.json, else 0.1].
    #[arg(long)]
    mask_threshold: Option<f64>,
    /// Auto mask: radius in pixels of the box blur of the difference before the threshold
    /// [default: the model's unitune.json, else 4].
    #[arg(long)]
    mask_blur: Option<usize>,
    /// Auto mask: radius in pixels by which the changed region grows
    /// [default: the model's unitune.json, else 16].
    #[arg(long)]
    mask_dilate: Option<usize>,
    /// Width in pixels of the mask's soft edge, outward; pixels farther from the mask are the
    /// image's [default: the model's unitune.json, else 16].
    #[arg(long)]
    feather: Option<usize>,
    /// Denoising steps of the full schedule (a late start runs the last fraction of them)
    /// [default: the model's unitune.json, else 50].
    #[arg(long)]
    steps: Option<usize>,
    /// ddim, ddpm, euler, euler-a or dpm++ [default: the model's unitune.json, else ddim].
    #[arg(long)]
    scheduler: Option<SchedulerKind>,
    /// Seed of the noise; every image of one seed starts from the same noise, so a sweep
    /// compares the knobs alone [default: random, printed].
    #[arg(long)]
    seed: Option<u64>,
    /// Run each edit with this many seeds: --seed, --seed + 1, ...
    #[arg(long, default_value_t = 1)]
    seeds: usize,
    /// Guidance scales to try (comma separated), the contact sheet's columns.
    #[arg(long, value_delimiter = ',', value_name = "G,G,...")]
    sweep_guidance: Vec<f64>,
    /// Start fractions to try (comma separated), the contact sheet's rows.
    #[arg(long, value_delimiter = ',', value_name = "T0,T0,...")]
    sweep_start: Vec<f64>,
    /// Output PNG file. With several images each name gets a suffix for what varies: -p<N> (the
    /// N-th prompt), -seed<S>, -g<G>, -t<T0>, e.g. OUT-p2-seed43-g8-t0.9.png; a sweep also writes
    /// OUT[-p<N>][-seed<S>]-sheet.png; a mask goes next to its image as <image>.mask.png.
    #[arg(long, short)]
    output: PathBuf,
}

pub fn run(args: EditArgs) -> Result<()> {
    let defaults = ModelDefaults::read(&args.model.dir()?)?;
    let mut job = edit_job(&args, &defaults)?;
    let groups = job.plan(job.seed.unwrap_or_else(random_seed))?;
    let seed = groups[0].seed;
    check_output(&args.output, args.image.as_deref())?;
    refuse_overwriting_inputs(&args, &groups)?;

    let (sd, session) = match &args.session {
        Some(path) => {
            let mut sd = args.model.load(None)?;
            let session = Session::load(path)
                .with_context(|| format!("loading session {}", path.display()))?;
            let (width, height) = session.image.dimensions();
            read_mask(&args, &mut job, width, height)?;
            sd.apply_session(&session)
                .with_context(|| format!("applying session {}", path.display()))?;
            (sd, session)
        }
        None => {
            let image = args
                .image
                .as_deref()
                .context("give --session, or --image to tune on first")?;
            let out = args.output.with_extension("session");
            refuse_inputs("the session", &out, &[("image", Some(image))])?;
            let tune = TuneJob {
                seed: Some(seed),
                ..defaults.tune_job()
            };
            let mut sd = args.model.load(Some(tune.trainable()))?;
            let prepared = tune.prepare(&sd, image_io::load_image(image)?)?;
            let (width, height) = prepared.image.dimensions();
            read_mask(&args, &mut job, width, height)?;
            // The edits are checked against the picture the tune will see before it runs, so
            // that a bad knob fails before the session is written.
            job.check(&groups, width as usize, height as usize)?;
            let session = crate::tune::tune_and_save(&mut sd, prepared, &out, None)?;
            (sd, session)
        }
    };
    let (width, height) = session.image.dimensions();
    let image = match (&args.session, &args.image) {
        (Some(_), Some(path)) => image_io::resize(image_io::load_image(path)?, width, height),
        _ => session.image.clone(),
    };
    let editor = Editor::new(&sd, &session.token, image)?;
    editor.check(&job, &groups)?;
    if let EditMask::Given(mask) = &job.request.mask {
        let written = mask_path(&args.output);
        image_io::save_png(&mask.feathered(job.request.feather).to_image(), &written)?;
        eprintln!(
            "wrote {} (the mask, feathered by {} px)",
            written.display(),
            job.request.feather
        );
    }

    let total: usize = groups.iter().map(|g| g.items.len()).sum();
    eprintln!(
        "token `{}`, {total} edit(s) of {width}x{height}, {} {} steps, seed {seed}",
        session.token, job.request.scheduler, job.request.num_inference_steps
    );
    let mut on_event = |event: EditEvent| -> unitune::Result<()> {
        match event {
            EditEvent::Started {
                item,
                prompt,
                index,
                total,
            } => eprintln!(
                "[{index}/{total}] \"{prompt}\" seed {} guidance {} start {}",
                item.seed, item.guidance, item.start
            ),
            EditEvent::Finished {
                item,
                image,
                auto_mask,
            } => {
                let path = suffixed(&args.output, &item.suffix, "png");
                image_io::save_png(image, &path)?;
                eprintln!("wrote {}", path.display());
                if let Some(mask) = auto_mask {
                    let written = mask_path(&path);
                    image_io::save_png(&mask.to_image(), &written)?;
                    eprintln!("wrote {}", written.display());
                }
            }
            EditEvent::Sheet { group, image } => {
                let path = suffixed(
                    &args.output,
                    group.sheet.as_deref().unwrap_or("-sheet"),
                    "png",
                );
                image_io::save_png(image, &path)?;
                eprintln!("wrote {} (contact sheet)", path.display());
            }
        }
        Ok(())
    };
    editor.run(&job, &groups, &mut BarProgress::new(), &mut on_event)?;
    Ok(())
}

/// The edits the flags ask for, on the model's recommended settings (the mask file is read once
/// the picture's size is known).
fn edit_job(args: &EditArgs, defaults: &ModelDefaults) -> Result<EditJob> {
    fn set<T: Copy>(field: &mut T, flag: Option<T>) {
        if let Some(value) = flag {
            *field = value;
        }
    }
    let mut request = defaults.edit_request("", "");
    request.negative_prompt = args.negative_prompt.clone();
    request.baseline_prompt = args.baseline_prompt.clone();
    set(&mut request.guidance_scale, args.guidance);
    set(&mut request.prompt_guidance, args.prompt_guidance);
    set(&mut request.start, args.start);
    set(&mut request.interpolation, args.interpolate);
    set(&mut request.latent_blend, args.latent_blend);
    set(&mut request.feather, args.feather);
    set(&mut request.num_inference_steps, args.steps);
    set(&mut request.scheduler, args.scheduler);
    let auto = args.auto_mask || (!args.no_auto_mask && matches!(request.mask, EditMask::Auto(_)));
    request.mask = match auto {
        true => {
            let mut mask = defaults.auto_mask();
            set(&mut mask.threshold, args.mask_threshold);
            set(&mut mask.blur, args.mask_blur);
            set(&mut mask.dilate, args.mask_dilate);
            EditMask::Auto(mask)
        }
        false => EditMask::None,
    };
    Ok(EditJob {
        request,
        prompts: read_prompts(args)?,
        seed: args.seed,
        seeds: args.seeds,
        sweep_guidance: args.sweep_guidance.clone(),
        sweep_start: args.sweep_start.clone(),
    })
}

/// Reads `--mask`, if given, at the picture's size into the job.
fn read_mask(args: &EditArgs, job: &mut EditJob, width: u32, height: u32) -> Result<()> {
    if let Some(path) = &args.mask {
        job.request.mask = EditMask::Given(Mask::load(path, width as usize, height as usize)?);
    }
    Ok(())
}

/// `--prompt`s, then the lines of `--prompts`.
fn read_prompts(args: &EditArgs) -> Result<Vec<String>> {
    let mut prompts = args.prompts.clone();
    if let Some(path) = &args.prompts_file {
        prompts.extend(
            read_prompts_file(path).with_context(|| format!("--prompts {}", path.display()))?,
        );
    }
    if prompts.is_empty() {
        bail!("no edit prompt: give --prompt TEXT (repeatable) or --prompts FILE");
    }
    Ok(prompts)
}

/// `OUT.mask.png` for `OUT.png`.
fn mask_path(image: &Path) -> PathBuf {
    suffixed(image, ".mask", "png")
}

/// Refuses to run when an output would replace the session, the image, the mask or the prompts file.
fn refuse_overwriting_inputs(args: &EditArgs, groups: &[EditGroup]) -> Result<()> {
    let inputs = [
        ("session", args.session.as_deref()),
        ("image", args.image.as_deref()),
        ("mask", args.mask.as_deref()),
        ("prompts file", args.prompts_file.as_deref()),
    ];
    let outputs = groups.iter().flat_map(|g| {
        let images = g.items.iter().flat_map(|item| {
            let image = suffixed(&args.output, &item.suffix, "png");
            [mask_path(&image), image]
        });
        images
            .chain(g.sheet.iter().map(|s| suffixed(&args.output, s, "png")))
            .chain([mask_path(&args.output)])
    });
    for output in outputs {
        refuse_inputs("output", &output, &inputs)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_job_suffixes() {
        let job = EditJob {
            sweep_guidance: vec![4.0, 8.0],
            ..EditJob::new(vec!["a".into(), "b".into()])
        };
        let groups = job.plan(5).unwrap();
        let item = &groups[1].items[0];
        assert_eq!(
            suffixed(Path::new("out/x.png"), &item.suffix, "png"),
            Path::new("out/x-p2-g4.png")
        );
        assert_eq!(
            mask_path(Path::new("a/x-g4.png")),
            Path::new("a/x-g4.mask.png")
        );
    }
}
