//! `unitune edit`: edits of a tuned session's image. One call loads the model and the session
//! once and runs every combination of prompts x seeds x guidance values x start values, so that
//! UniTune's per-image parameter search needs no reloading; sweeps also get a labelled contact
//! sheet.
//!
//! Output names, from `--output OUT.png`: one image is `OUT.png`; with several, each name gets a
//! suffix for every dimension that varies, in this order: `-p<N>` (the N-th prompt, from 1, when
//! there are several), `-seed<S>` (with `--seeds` above 1), `-g<G>` (with `--sweep-guidance`),
//! `-t<T0>` (with `--sweep-start`): `OUT-p2-seed43-g8-t0.9.png`. A sweep's contact sheet is
//! `OUT[-p<N>][-seed<S>]-sheet.png`. The mask used is written next to its image as
//! `<image>.mask.png` (the feathered weight of the edit per pixel; a given mask is written once,
//! as `OUT.mask.png`). Every file is written atomically, and no output may be one of the inputs.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use image::RgbImage;
use unitune::image_io;
use unitune::noise::Noise;
use unitune::pipelines::{
    contact_sheet, edit, prompt_with_token, AutoMask, EditBase, EditMask, EditRequest, Mask,
};
use unitune::schedulers::SchedulerKind;
use unitune::train::session::Session;

use crate::generate::{check_output, rand_seed};
use crate::model::ModelArgs;
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
    #[arg(long, default_value_t = 10.0)]
    guidance: f64,
    /// Turn on prompt guidance against this prompt: "" for the token alone, or a caption of the
    /// image (the token is put in front of it too).
    #[arg(long, value_name = "TEXT")]
    baseline_prompt: Option<String>,
    /// Prompt guidance weight w. With guidance on: eps = eps_u + g (eps_b - eps_u) + w (eps_e - eps_b),
    /// so w = g is plain guidance on the edit and w > g pushes the edit harder.
    #[arg(long, default_value_t = 15.0, requires = "baseline_prompt")]
    prompt_guidance: f64,
    /// Late start: the fraction of the schedule run from the image's noised latents (1 = from
    /// pure noise). 0.8-0.98 keeps more of the image; keep 1 for large semantic changes.
    #[arg(long, default_value_t = 1.0, value_name = "T0")]
    start: f64,
    /// Blend the image into the result after sampling: 0 = the edit, 1 = the image.
    #[arg(long, default_value_t = 0.0, value_name = "A")]
    interpolate: f64,
    /// Pull the latents toward the image's (noised to the step) after every step, by this weight;
    /// it compounds over the steps, so 0.05-0.2 already keeps much. 1 = the image.
    #[arg(long, default_value_t = 0.0)]
    latent_blend: f64,
    /// Mask picture, white where the edit may change the image (resized to it, binarised at half grey).
    #[arg(long, conflicts_with = "auto_mask")]
    mask: Option<PathBuf>,
    /// Estimate the mask from where an unmasked edit differs from the image, then edit again with it.
    #[arg(long)]
    auto_mask: bool,
    /// --auto-mask: a pixel changed when its blurred mean RGB difference exceeds this (0-1).
    #[arg(long, default_value_t = AutoMask::default().threshold, requires = "auto_mask")]
    mask_threshold: f64,
    /// --auto-mask: radius in pixels of the box blur of the difference before the threshold.
    #[arg(long, default_value_t = AutoMask::default().blur, requires = "auto_mask")]
    mask_blur: usize,
    /// --auto-mask: radius in pixels by which the changed region grows.
    #[arg(long, default_value_t = AutoMask::default().dilate, requires = "auto_mask")]
    mask_dilate: usize,
    /// Width in pixels of the mask's soft edge, outward; pixels farther from the mask are the image's.
    #[arg(long, default_value_t = 16)]
    feather: usize,
    /// Denoising steps of the full schedule (a late start runs the last fraction of them).
    #[arg(long, default_value_t = 50)]
    steps: usize,
    /// ddim, ddpm, euler, euler-a or dpm++.
    #[arg(long, default_value = "ddim")]
    scheduler: SchedulerKind,
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

/// One image to produce.
#[derive(Debug, Clone, PartialEq)]
struct Job {
    prompt: usize,
    seed: u64,
    guidance: f64,
    start: f64,
    output: PathBuf,
}

/// The images of one prompt and seed: a sweep's contact sheet.
#[derive(Debug, Clone, PartialEq)]
struct Group {
    prompt: usize,
    seed: u64,
    jobs: Vec<Job>,
    /// `Some` when guidance or start is swept.
    sheet: Option<PathBuf>,
}

pub fn run(args: EditArgs) -> Result<()> {
    let prompts = read_prompts(&args)?;
    check_output(&args.output, args.image.as_deref())?;
    if args.seeds == 0 {
        bail!("--seeds must be at least 1");
    }
    let seed = args.seed.unwrap_or_else(rand_seed);
    let guidances = sweep_or(&args.sweep_guidance, args.guidance, "--sweep-guidance")?;
    let starts = sweep_or(&args.sweep_start, args.start, "--sweep-start")?;
    let sweeps = (
        !args.sweep_guidance.is_empty(),
        !args.sweep_start.is_empty(),
    );
    let groups = plan(
        &args.output,
        prompts.len(),
        seed,
        args.seeds,
        &guidances,
        &starts,
        sweeps,
    );
    refuse_overwriting_inputs(&args, &groups)?;

    let (sd, session) = match &args.session {
        Some(path) => {
            let mut sd = args.model.load(None)?;
            let session = Session::load(path)
                .with_context(|| format!("loading session {}", path.display()))?;
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
            let seed = args.seed.unwrap_or_else(rand_seed);
            crate::tune::tune_image(&args.model, image, seed, &out)?
        }
    };
    let (width, height) = session.image.dimensions();
    let image = match (&args.session, &args.image) {
        (Some(_), Some(path)) => image_io::resize(image_io::load_image(path)?, width, height),
        _ => session.image.clone(),
    };
    let base = EditBase::new(&sd, image)?;
    let mask = if let Some(path) = &args.mask {
        let mask = Mask::load(path, width as usize, height as usize)?;
        let written = mask_path(&args.output);
        image_io::save_png(&mask.feathered(args.feather).to_image(), &written)?;
        eprintln!(
            "wrote {} (the mask, feathered by {} px)",
            written.display(),
            args.feather
        );
        EditMask::Given(mask)
    } else if args.auto_mask {
        EditMask::Auto(AutoMask {
            threshold: args.mask_threshold,
            blur: args.mask_blur,
            dilate: args.mask_dilate,
        })
    } else {
        EditMask::None
    };

    // Every request is checked before the first edit, so a bad sweep value fails at once.
    let request = |job: &Job| {
        let mut r = EditRequest::new(session.token.clone(), prompts[job.prompt].clone());
        r.negative_prompt = args.negative_prompt.clone();
        r.guidance_scale = job.guidance;
        r.baseline_prompt = args.baseline_prompt.clone();
        r.prompt_guidance = args.prompt_guidance;
        r.start = job.start;
        r.interpolation = args.interpolate;
        r.latent_blend = args.latent_blend;
        r.mask = mask.clone();
        r.feather = args.feather;
        r.num_inference_steps = args.steps;
        r.scheduler = args.scheduler;
        r
    };
    for job in groups.iter().flat_map(|g| &g.jobs) {
        request(job).check(&base)?;
    }

    let total: usize = groups.iter().map(|g| g.jobs.len()).sum();
    eprintln!(
        "token `{}`, {total} edit(s) of {width}x{height}, {} {} steps, seed {seed}",
        session.token, args.scheduler, args.steps
    );
    let mut progress = BarProgress::new();
    let mut done = 0;
    for group in &groups {
        let prompt = prompt_with_token(&session.token, &prompts[group.prompt]);
        let mut cells = Vec::new();
        for job in &group.jobs {
            done += 1;
            eprintln!(
                "[{done}/{total}] \"{prompt}\" seed {} guidance {} start {}",
                job.seed, job.guidance, job.start
            );
            let out = edit(
                &sd,
                &base,
                &request(job),
                &mut Noise::seeded(job.seed),
                &mut progress,
            )?;
            let result = image_io::tensor_to_image(&out.image, 0)?;
            image_io::save_png(&result, &job.output)?;
            eprintln!("wrote {}", job.output.display());
            if let (true, Some(used)) = (args.auto_mask, &out.mask) {
                let written = mask_path(&job.output);
                image_io::save_png(&used.to_image(), &written)?;
                eprintln!("wrote {}", written.display());
            }
            cells.push(result);
        }
        if let Some(sheet) = &group.sheet {
            let title = format!("{prompt} / seed {}", group.seed);
            image_io::save_png(&labelled_sheet(&cells, &guidances, &starts, &title)?, sheet)?;
            eprintln!("wrote {} (contact sheet)", sheet.display());
        }
    }
    Ok(())
}

/// `--prompt`s, then the lines of `--prompts`.
fn read_prompts(args: &EditArgs) -> Result<Vec<String>> {
    let mut prompts = args.prompts.clone();
    if let Some(path) = &args.prompts_file {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("--prompts {}", path.display()))?;
        prompts.extend(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(String::from),
        );
    }
    if prompts.is_empty() {
        bail!("no edit prompt: give --prompt TEXT (repeatable) or --prompts FILE");
    }
    Ok(prompts)
}

/// The swept values, or the single `value` when there is no sweep; duplicates would collide in
/// the output names.
fn sweep_or(values: &[f64], value: f64, flag: &str) -> Result<Vec<f64>> {
    if values.is_empty() {
        return Ok(vec![value]);
    }
    for (i, v) in values.iter().enumerate() {
        if values[..i].contains(v) {
            bail!("{flag} lists {v} twice");
        }
    }
    Ok(values.to_vec())
}

/// Every image and sheet to write, grouped by prompt and seed (see the module doc for the names).
fn plan(
    output: &Path,
    prompts: usize,
    seed: u64,
    seeds: usize,
    guidances: &[f64],
    starts: &[f64],
    (sweep_guidance, sweep_start): (bool, bool),
) -> Vec<Group> {
    let mut groups = Vec::new();
    for prompt in 0..prompts {
        for k in 0..seeds {
            let seed = seed.wrapping_add(k as u64);
            let mut group_suffix = String::new();
            if prompts > 1 {
                group_suffix += &format!("-p{}", prompt + 1);
            }
            if seeds > 1 {
                group_suffix += &format!("-seed{seed}");
            }
            let mut jobs = Vec::new();
            // Row-major in the contact sheet: rows are starts, columns guidance values.
            for &start in starts {
                for &guidance in guidances {
                    let mut suffix = group_suffix.clone();
                    if sweep_guidance {
                        suffix += &format!("-g{guidance}");
                    }
                    if sweep_start {
                        suffix += &format!("-t{start}");
                    }
                    jobs.push(Job {
                        prompt,
                        seed,
                        guidance,
                        start,
                        output: suffixed(output, &suffix, "png"),
                    });
                }
            }
            let sheet = (sweep_guidance || sweep_start)
                .then(|| suffixed(output, &format!("{group_suffix}-sheet"), "png"));
            groups.push(Group {
                prompt,
                seed,
                jobs,
                sheet,
            });
        }
    }
    groups
}

/// `dir/stem<suffix>.<extension>` for `dir/stem.png`.
fn suffixed(output: &Path, suffix: &str, extension: &str) -> PathBuf {
    let stem = output
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    output.with_file_name(format!("{stem}{suffix}.{extension}"))
}

/// `OUT.mask.png` for `OUT.png`.
fn mask_path(image: &Path) -> PathBuf {
    suffixed(image, ".mask", "png")
}

/// Refuses to run when an output would replace the session, the image, the mask or the prompts file.
fn refuse_overwriting_inputs(args: &EditArgs, groups: &[Group]) -> Result<()> {
    let inputs: Vec<PathBuf> = [
        args.session.as_ref(),
        args.image.as_ref(),
        args.mask.as_ref(),
        args.prompts_file.as_ref(),
    ]
    .into_iter()
    .flatten()
    .filter_map(|p| p.canonicalize().ok())
    .collect();
    let outputs = groups.iter().flat_map(|g| {
        let images = g
            .jobs
            .iter()
            .flat_map(|j| [j.output.clone(), mask_path(&j.output)]);
        images
            .chain(g.sheet.clone())
            .chain([mask_path(&args.output)])
    });
    for output in outputs {
        if output.canonicalize().is_ok_and(|o| inputs.contains(&o)) {
            bail!(
                "output {} is one of the inputs; choose another --output so the input is kept",
                output.display()
            );
        }
    }
    Ok(())
}

/// The contact sheet of one prompt and seed: columns `g=<guidance>`, rows `t0=<start>`.
fn labelled_sheet(
    cells: &[RgbImage],
    guidances: &[f64],
    starts: &[f64],
    title: &str,
) -> Result<RgbImage> {
    let columns: Vec<String> = guidances.iter().map(|g| format!("g={g}")).collect();
    let rows: Vec<String> = starts.iter().map(|t| format!("t0={t}")).collect();
    Ok(contact_sheet(cells, &rows, &columns, Some(title))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(groups: &[Group]) -> Vec<String> {
        groups
            .iter()
            .flat_map(|g| {
                g.jobs
                    .iter()
                    .map(|j| j.output.clone())
                    .chain(g.sheet.clone())
            })
            .map(|p| p.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn one_edit_keeps_the_output_name() {
        let groups = plan(
            Path::new("out/x.png"),
            1,
            7,
            1,
            &[10.0],
            &[1.0],
            (false, false),
        );
        assert_eq!(names(&groups), ["out/x.png"]);
    }

    #[test]
    fn names_carry_only_what_varies() {
        let groups = plan(Path::new("x.png"), 2, 42, 2, &[8.0], &[1.0], (false, false));
        assert_eq!(
            names(&groups),
            [
                "x-p1-seed42.png",
                "x-p1-seed43.png",
                "x-p2-seed42.png",
                "x-p2-seed43.png"
            ]
        );
        assert_eq!(groups[3].seed, 43);

        let groups = plan(
            Path::new("x.png"),
            1,
            5,
            1,
            &[4.0, 7.5],
            &[0.8, 0.9],
            (true, true),
        );
        assert_eq!(
            names(&groups),
            [
                "x-g4-t0.8.png",
                "x-g7.5-t0.8.png",
                "x-g4-t0.9.png",
                "x-g7.5-t0.9.png",
                "x-sheet.png"
            ]
        );
        let groups = plan(
            Path::new("x.png"),
            1,
            5,
            1,
            &[4.0, 8.0],
            &[0.9],
            (true, false),
        );
        assert_eq!(names(&groups), ["x-g4.png", "x-g8.png", "x-sheet.png"]);
        assert_eq!(
            mask_path(Path::new("a/x-g4.png")),
            Path::new("a/x-g4.mask.png")
        );
    }

    #[test]
    fn repeated_sweep_values_are_refused() {
        assert!(sweep_or(&[4.0, 8.0, 4.0], 1.0, "--sweep-guidance")
            .unwrap_err()
            .to_string()
            .contains("4 twice"));
        assert_eq!(sweep_or(&[], 3.0, "--sweep-start").unwrap(), [3.0]);
    }
}
