//! `unitune bench-edits`: edit quality on held-out world scenes, scored against ground truth.
//!
//! Each scene of the procedural world comes with a random edit and its true result
//! ([`World::edit_sample`]). Every method edits the scene's picture with the edit prompt (the
//! edited scene's caption) and is scored by [`unitune::world::score`]: PSNR inside the edit's
//! region and outside it (fidelity to the unchanged scene), and whether the asked change happened.
//! The methods:
//! - UniTune: tune on the picture (the paper's settings, at each `--tune-lr`), then edit at each
//!   guidance x start (x auto-mask with `--auto-mask`);
//! - SDEdit: img2img from the picture at each `--strengths`, no tuning;
//! - plain: txt2img from the edit prompt alone;
//! - and three references: the unchanged picture (identity), the ground truth itself (which
//!   checks the checks: its success rate must be 100%), and the picture's autoencoder round trip
//!   (vae: how much of the scene any method working in latents can keep).
//!
//! Scenes are indices from [`HELD_OUT_START`] on, so they are never among a pretraining run's
//! scenes `0..world_scenes` whatever the seed. Every method of a scene samples from the same
//! seeded noise.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use image::{GrayImage, Luma, RgbImage};
use unitune::image_io::{image_to_tensor, save_png, tensor_to_image};
use unitune::noise::Noise;
use unitune::pipelines::{
    contact_sheet, edit, generate, AutoMask, EditBase, EditMask, EditRequest, GenerateRequest,
    LoadOptions, NoProgress, StableDiffusion,
};
use unitune::train::pretrain::TrainingState;
use unitune::train::tune::{default_token, tune, TrainableLayers, TuneSettings};
use unitune::world::score::{edit_happened, edit_kind, psnr, Part};
use unitune::world::{EditSample, SceneConfig, World};

/// PSNR outside the edit region (dB) from which a successful edit counts as having kept the scene.
pub const KEPT_DB: f64 = 20.0;

/// First held-out scene index: above any pretraining set (`0..world_scenes`).
pub const HELD_OUT_START: u64 = 1 << 32;

#[derive(Args)]
pub struct BenchEditsArgs {
    /// The model folder [default: the built-in model].
    #[arg(long)]
    model: Option<PathBuf>,
    /// Held-out scenes to edit.
    #[arg(long, default_value_t = 8)]
    scenes: usize,
    /// World seed of the held-out scenes, and seed of every noise draw.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// UniTune tuning steps (batch 4, Adafactor, most layers).
    #[arg(long, default_value_t = 128)]
    tune_steps: usize,
    /// UniTune learning rates, comma-separated; each is a separate tune per scene.
    #[arg(long, value_delimiter = ',', default_value = "1e-4")]
    tune_lr: Vec<f64>,
    /// Sampling steps (DDIM) of every method.
    #[arg(long, default_value_t = 30)]
    steps: usize,
    /// UniTune guidance scales, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "3,6")]
    guidance: Vec<f64>,
    /// UniTune start fractions (1 = from noise), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1.0,0.8")]
    start: Vec<f64>,
    /// Also run every UniTune setting with an automatic mask.
    #[arg(long)]
    auto_mask: bool,
    /// SDEdit strengths, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "0.5,0.7,0.9")]
    strengths: Vec<f64>,
    /// Classifier-free guidance of SDEdit and plain generation.
    #[arg(long, default_value_t = 8.0)]
    baseline_guidance: f64,
    /// Most objects per scene [default: the model's pretraining setting, else 2].
    #[arg(long)]
    max_objects: Option<usize>,
    /// Print one JSON object instead of tables.
    #[arg(long)]
    json: bool,
    /// Write an example grid (rows: scenes; columns: base, truth, best UniTune, best SDEdit,
    /// plain) to this PNG.
    #[arg(long)]
    grid: Option<PathBuf>,
    /// Pixels per scene pixel in the grid (nearest-neighbour upscaling).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=8))]
    grid_scale: u32,
}

/// One method at one setting, with its per-scene scores.
struct Row {
    method: &'static str,
    setting: String,
    psnr_in: Vec<Option<f64>>,
    psnr_out: Vec<Option<f64>>,
    success: Vec<bool>,
    /// Seconds per edit (sampling only).
    seconds: Vec<f64>,
    images: Vec<RgbImage>,
}

impl Row {
    fn success_rate(&self) -> f64 {
        self.success.iter().filter(|&&s| s).count() as f64 / self.success.len().max(1) as f64
    }

    /// Edits that succeeded and kept the rest of the scene: PSNR out at least [`KEPT_DB`] (or
    /// nothing outside, for background changes).
    fn kept(&self) -> usize {
        self.success
            .iter()
            .zip(&self.psnr_out)
            .filter(|(&ok, out)| ok && out.is_none_or(|db| db >= KEPT_DB))
            .count()
    }
}

/// One tune per scene and learning rate.
struct TuneRecord {
    lr: f64,
    seconds: Vec<f64>,
    /// Mean loss of the last quarter of the steps.
    final_loss: Vec<f64>,
    /// PSNR of the token-only sample (guidance off, from noise) against the tuned picture.
    reconstruction: Vec<f64>,
}

fn mean(xs: impl IntoIterator<Item = f64>) -> Option<f64> {
    let xs: Vec<f64> = xs.into_iter().collect();
    (!xs.is_empty()).then(|| xs.iter().sum::<f64>() / xs.len() as f64)
}

struct Bench<'a> {
    args: &'a BenchEditsArgs,
    config: SceneConfig,
    rows: Vec<Row>,
}

impl Bench<'_> {
    /// Scores `image` for scene `sample` under (method, setting), adding the row if new.
    fn record(
        &mut self,
        method: &'static str,
        setting: String,
        sample: &EditSample,
        image: RgbImage,
        seconds: f64,
    ) -> Result<()> {
        let position = self
            .rows
            .iter()
            .position(|r| r.method == method && r.setting == setting);
        let row = match position {
            Some(i) => &mut self.rows[i],
            None => {
                self.rows.push(Row {
                    method,
                    setting,
                    psnr_in: vec![],
                    psnr_out: vec![],
                    success: vec![],
                    seconds: vec![],
                    images: vec![],
                });
                self.rows.last_mut().expect("just pushed")
            }
        };
        row.psnr_in
            .push(psnr(&image, &sample.after, &sample.region, Part::Inside)?);
        row.psnr_out
            .push(psnr(&image, &sample.after, &sample.region, Part::Outside)?);
        row.success
            .push(edit_happened(sample, &image, &self.config)?);
        row.seconds.push(seconds);
        row.images.push(image);
        Ok(())
    }

    /// Tunes a fresh copy of the model on scene `i` at `record.lr`, then runs every UniTune
    /// setting.
    fn unitune(
        &mut self,
        i: usize,
        sample: &EditSample,
        base: &EditBase,
        token: &str,
        record: &mut TuneRecord,
    ) -> Result<()> {
        let args = self.args;
        let options = LoadOptions {
            trainable: Some(TrainableLayers::Most.filter()),
            ..LoadOptions::default()
        };
        let tuned = crate::builtin::load(args.model.as_deref(), &options)?;
        let settings = TuneSettings {
            steps: args.tune_steps,
            learning_rate: record.lr,
            ..TuneSettings::new(token, args.seed)
        };
        let t0 = Instant::now();
        let session = tune(
            &tuned,
            &sample.before,
            settings,
            &mut self.noise(i),
            &mut NoProgress,
            &mut |_, _| Ok(()),
        )
        .context("tuning")?;
        record.seconds.push(t0.elapsed().as_secs_f64());
        let tail = &session.losses[session.losses.len() * 3 / 4..];
        record
            .final_loss
            .push(mean(tail.iter().map(|&l| l as f64)).unwrap_or(f64::NAN));

        // Reconstruction: the token alone, no guidance, from noise.
        let mut request = EditRequest::new(token, "");
        request.guidance_scale = 1.0;
        request.num_inference_steps = args.steps;
        let out = edit(&tuned, base, &request, &mut self.noise(i), &mut NoProgress)?;
        let recon = tensor_to_image(&out.image, 0)?;
        let full = GrayImage::from_pixel(recon.width(), recon.height(), Luma([255]));
        record
            .reconstruction
            .push(psnr(&recon, &sample.before, &full, Part::All)?.unwrap_or(f64::NAN));

        let masks: &[bool] = if args.auto_mask {
            &[false, true]
        } else {
            &[false]
        };
        for &g in &args.guidance {
            for &start in &args.start {
                for &masked in masks {
                    let mut request = EditRequest::new(token, sample.prompt.clone());
                    request.guidance_scale = g;
                    request.start = start;
                    request.num_inference_steps = args.steps;
                    if masked {
                        request.mask = EditMask::Auto(AutoMask::default());
                    }
                    let t0 = Instant::now();
                    let out = edit(&tuned, base, &request, &mut self.noise(i), &mut NoProgress)?;
                    let seconds = t0.elapsed().as_secs_f64();
                    let mut setting = format!("{} g={g} start={start}", lr_label(record.lr));
                    if masked {
                        setting.push_str(" auto-mask");
                    }
                    self.record(
                        "unitune",
                        setting,
                        sample,
                        tensor_to_image(&out.image, 0)?,
                        seconds,
                    )?;
                }
            }
        }
        Ok(())
    }

    /// SDEdit at every strength and plain generation, on the untuned model.
    fn baselines(&mut self, i: usize, sample: &EditSample, sd: &StableDiffusion) -> Result<()> {
        let args = self.args;
        let plain = GenerateRequest {
            width: self.config.width as usize,
            height: self.config.height as usize,
            num_inference_steps: args.steps,
            guidance_scale: args.baseline_guidance,
            ..GenerateRequest::new(sample.prompt.clone())
        };
        let pixels = image_to_tensor(&sample.before, &sd.device)?;
        let mut runs: Vec<(&'static str, String, GenerateRequest)> = args
            .strengths
            .iter()
            .map(|&strength| {
                let request = GenerateRequest {
                    image: Some(pixels.clone()),
                    strength,
                    ..plain.clone()
                };
                let setting = format!("strength={strength} g={}", args.baseline_guidance);
                ("sdedit", setting, request)
            })
            .collect();
        runs.push(("plain", format!("g={}", args.baseline_guidance), plain));
        for (method, setting, request) in runs {
            let t0 = Instant::now();
            let out = generate(sd, &request, &mut self.noise(i), &mut NoProgress)?;
            let seconds = t0.elapsed().as_secs_f64();
            self.record(method, setting, sample, tensor_to_image(&out, 0)?, seconds)?;
        }
        Ok(())
    }

    /// Seeded noise of scene `scene`, the same for every method.
    fn noise(&self, scene: usize) -> Noise {
        Noise::seeded(
            self.args
                .seed
                .wrapping_mul(1_000_003)
                .wrapping_add(scene as u64),
        )
    }
}

/// The world's scene settings: the model's pretraining size and object count when its folder
/// has a training state, else the defaults of `unitune pretrain`.
fn scene_config(sd: &StableDiffusion, max_objects: Option<usize>) -> SceneConfig {
    let state = TrainingState::read(&sd.dir).ok();
    let size = state.as_ref().map_or(64, |s| s.settings.size as u32);
    SceneConfig {
        width: size,
        height: size,
        max_objects: max_objects
            .or(state.map(|s| s.settings.world_max_objects))
            .unwrap_or(2),
        ..SceneConfig::default()
    }
}

fn lr_label(lr: f64) -> String {
    format!("lr={lr:e}")
}

/// Everything a run measured.
struct Measurement {
    model: String,
    config: SceneConfig,
    samples: Vec<EditSample>,
    rows: Vec<Row>,
    tunes: Vec<TuneRecord>,
}

pub fn run(args: BenchEditsArgs) -> Result<()> {
    if let Some(grid) = &args.grid {
        crate::generate::check_output(grid, None)?;
    }
    let m = measure(&args)?;
    if let Some(path) = &args.grid {
        write_grid(&m.rows, &m.samples, args.grid_scale, path)?;
    }
    if args.json {
        println!("{}", to_json(&args, &m));
    } else {
        print!("{}", to_tables(&args, &m));
    }
    Ok(())
}

fn measure(args: &BenchEditsArgs) -> Result<Measurement> {
    if args.scenes == 0 {
        bail!("--scenes must be at least 1");
    }
    let sd = crate::builtin::load(args.model.as_deref(), &LoadOptions::default())?;
    let config = scene_config(&sd, args.max_objects);
    let world = World::new(config.clone(), args.seed)?;
    let token = default_token(&sd.tokenizer);
    let mut bench = Bench {
        args,
        config,
        rows: vec![],
    };
    let mut tunes: Vec<TuneRecord> = args
        .tune_lr
        .iter()
        .map(|&lr| TuneRecord {
            lr,
            seconds: vec![],
            final_loss: vec![],
            reconstruction: vec![],
        })
        .collect();
    let mut samples = vec![];

    for i in 0..args.scenes {
        let sample = world.edit_sample(HELD_OUT_START + i as u64);
        eprintln!(
            "scene {}/{} ({}): {}",
            i + 1,
            args.scenes,
            edit_kind(&sample.edit),
            sample.instruction
        );
        bench.record(
            "identity",
            "base".into(),
            &sample,
            sample.before.clone(),
            0.0,
        )?;
        bench.record("truth", "-".into(), &sample, sample.after.clone(), 0.0)?;
        let base = EditBase::new(&sd, sample.before.clone())?;
        // The autoencoder's round trip: the best any latent method can keep of the scene.
        let t0 = Instant::now();
        let round_trip = tensor_to_image(&sd.decode_latents(base.latents())?, 0)?;
        let seconds = t0.elapsed().as_secs_f64();
        bench.record("vae", "round trip".into(), &sample, round_trip, seconds)?;

        for record in tunes.iter_mut() {
            bench.unitune(i, &sample, &base, &token, record)?;
        }
        bench.baselines(i, &sample, &sd)?;
        samples.push(sample);
    }

    Ok(Measurement {
        model: sd.dir.display().to_string(),
        config: bench.config,
        samples,
        rows: bench.rows,
        tunes,
    })
}

/// The row of `method` that did best: highest success rate, then highest mean PSNR (in + out).
fn best<'a>(rows: &'a [Row], method: &str) -> Option<&'a Row> {
    let score = |r: &Row| {
        let m = |v: &[Option<f64>]| mean(v.iter().flatten().copied()).unwrap_or(0.0);
        (r.success_rate(), m(&r.psnr_in) + m(&r.psnr_out))
    };
    rows.iter().filter(|r| r.method == method).max_by(|a, b| {
        let (a, b) = (score(a), score(b));
        a.0.total_cmp(&b.0).then(a.1.total_cmp(&b.1))
    })
}

/// Cells upscaled `scale` times (nearest), so that the small scenes are easy to see.
fn write_grid(rows: &[Row], samples: &[EditSample], scale: u32, path: &Path) -> Result<()> {
    let columns: Vec<(&str, Option<&Row>)> = vec![
        ("BASE", best(rows, "identity")),
        ("TRUTH", best(rows, "truth")),
        ("UNITUNE", best(rows, "unitune")),
        ("SDEDIT", best(rows, "sdedit")),
        ("PLAIN", best(rows, "plain")),
    ];
    let present: Vec<(&str, &Row)> = columns
        .into_iter()
        .filter_map(|(name, row)| row.map(|r| (name, r)))
        .collect();
    let mut cells = vec![];
    for i in 0..samples.len() {
        for (_, row) in &present {
            let cell = &row.images[i];
            cells.push(image::imageops::resize(
                cell,
                cell.width() * scale,
                cell.height() * scale,
                image::imageops::FilterType::Nearest,
            ));
        }
    }
    let row_labels: Vec<String> = samples
        .iter()
        .map(|s| edit_kind(&s.edit).to_uppercase())
        .collect();
    let column_labels: Vec<String> = present.iter().map(|(n, _)| n.to_string()).collect();
    let settings: Vec<String> = present
        .iter()
        .filter(|(_, r)| matches!(r.method, "unitune" | "sdedit"))
        .map(|(_, r)| format!("{} {}", r.method, r.setting))
        .collect();
    let sheet: RgbImage = contact_sheet(
        &cells,
        &row_labels,
        &column_labels,
        Some(&settings.join("; ")),
    )?;
    save_png(&sheet, path)?;
    Ok(())
}

fn fmt_opt(x: Option<f64>, decimals: usize) -> String {
    x.filter(|x| x.is_finite())
        .map_or("-".into(), |x| format!("{x:.decimals$}"))
}

fn json_opt(x: Option<f64>, decimals: usize) -> String {
    x.filter(|x| x.is_finite())
        .map_or("null".into(), |x| format!("{x:.decimals$}"))
}

fn json_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Markdown tables: the scenes, the tunes, then methods x settings.
fn to_tables(a: &BenchEditsArgs, m: &Measurement) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "model {}; {} held-out scenes (seed {}, indices {}..), {}x{}, up to {} objects; {} sampling steps\n",
        m.model,
        m.samples.len(),
        a.seed,
        HELD_OUT_START,
        m.config.width,
        m.config.height,
        m.config.max_objects,
        a.steps
    );
    let _ = writeln!(s, "| scene | kind | instruction |\n|---|---|---|");
    for (i, sample) in m.samples.iter().enumerate() {
        let _ = writeln!(
            s,
            "| {i} | {} | {} |",
            edit_kind(&sample.edit),
            sample.instruction
        );
    }
    let _ = writeln!(
        s,
        "\n| UniTune tune ({} steps) | s per tune | final loss | reconstruction PSNR (dB) |\n|---|---|---|---|",
        a.tune_steps
    );
    for t in &m.tunes {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} |",
            lr_label(t.lr),
            fmt_opt(mean(t.seconds.iter().copied()), 1),
            fmt_opt(mean(t.final_loss.iter().copied()), 4),
            fmt_opt(mean(t.reconstruction.iter().copied()), 1)
        );
    }
    let _ = writeln!(
        s,
        "\n| method | setting | PSNR in (dB) | PSNR out (dB) | success | success, out >= {KEPT_DB} dB | s per edit |\n|---|---|---|---|---|---|---|"
    );
    for r in &m.rows {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {}/{} | {}/{} | {} |",
            r.method,
            r.setting,
            fmt_opt(mean(r.psnr_in.iter().flatten().copied()), 1),
            fmt_opt(mean(r.psnr_out.iter().flatten().copied()), 1),
            r.success.iter().filter(|&&x| x).count(),
            r.success.len(),
            r.kept(),
            r.success.len(),
            fmt_opt(mean(r.seconds.iter().copied()), 2)
        );
    }
    let kinds = ["colour", "shape", "add", "remove", "background"];
    let _ = writeln!(
        s,
        "\nSuccess by kind of edit, best setting of each method:\n\n| method | setting | {} |\n|---|---|{}",
        kinds.join(" | "),
        "---|".repeat(kinds.len())
    );
    for method in ["identity", "truth", "vae", "unitune", "sdedit", "plain"] {
        let Some(row) = best(&m.rows, method) else {
            continue;
        };
        let cells: Vec<String> = kinds
            .iter()
            .map(|kind| {
                let of_kind: Vec<bool> = m
                    .samples
                    .iter()
                    .zip(&row.success)
                    .filter(|(sample, _)| edit_kind(&sample.edit) == *kind)
                    .map(|(_, &ok)| ok)
                    .collect();
                let hits = of_kind.iter().filter(|&&ok| ok).count();
                format!("{hits}/{}", of_kind.len())
            })
            .collect();
        let _ = writeln!(s, "| {method} | {} | {} |", row.setting, cells.join(" | "));
    }
    s
}

fn to_json(a: &BenchEditsArgs, m: &Measurement) -> String {
    let list = |xs: Vec<String>| format!("[{}]", xs.join(","));
    let scenes = m
        .samples
        .iter()
        .enumerate()
        .map(|(i, s)| {
            format!(
                "{{\"index\":{},\"kind\":{},\"instruction\":{},\"caption\":{},\"prompt\":{}}}",
                HELD_OUT_START + i as u64,
                json_string(edit_kind(&s.edit)),
                json_string(&s.instruction),
                json_string(&s.caption),
                json_string(&s.prompt)
            )
        })
        .collect();
    let tunes = m
        .tunes
        .iter()
        .map(|t| {
            let nums =
                |v: &[f64], d: usize| list(v.iter().map(|&x| json_opt(Some(x), d)).collect());
            format!(
                "{{\"lr\":{:e},\"seconds\":{},\"final_loss\":{},\"reconstruction_psnr\":{}}}",
                t.lr,
                nums(&t.seconds, 2),
                nums(&t.final_loss, 5),
                nums(&t.reconstruction, 2)
            )
        })
        .collect();
    let rows = m
        .rows
        .iter()
        .map(|r| {
            let opts = |v: &[Option<f64>]| list(v.iter().map(|&x| json_opt(x, 2)).collect());
            format!(
                "{{\"method\":{},\"setting\":{},\"psnr_in\":{},\"psnr_out\":{},\"success\":{},\"seconds\":{}}}",
                json_string(r.method),
                json_string(&r.setting),
                opts(&r.psnr_in),
                opts(&r.psnr_out),
                list(r.success.iter().map(|b| b.to_string()).collect()),
                list(r.seconds.iter().map(|&x| json_opt(Some(x), 3)).collect())
            )
        })
        .collect();
    format!(
        "{{\"bench\":\"edits\",\"model\":{},\"seed\":{},\"first_index\":{},\"size\":{},\"max_objects\":{},\"steps\":{},\"tune_steps\":{},\"scenes\":{},\"tunes\":{},\"rows\":{}}}",
        json_string(&m.model),
        a.seed,
        HELD_OUT_START,
        m.config.width,
        m.config.max_objects,
        a.steps,
        a.tune_steps,
        list(scenes),
        list(tunes),
        list(rows)
    )
}

#[cfg(test)]
mod tests {
    use clap::Parser;
    use unitune::world::score::PSNR_MAX;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: BenchEditsArgs,
    }

    #[test]
    fn a_tiny_run_scores_every_method_and_the_references_check_out() {
        let fixture = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/tiny-sd1");
        let argv = format!(
            "bench-edits --model {fixture} --scenes 2 --tune-steps 1 --steps 2 --guidance 4 --start 0.9 --strengths 0.5"
        );
        let args = Cli::parse_from(argv.split(' ')).args;
        let m = measure(&args).unwrap();
        let methods: Vec<&str> = m.rows.iter().map(|r| r.method).collect();
        assert_eq!(
            methods,
            ["identity", "truth", "vae", "unitune", "sdedit", "plain"]
        );
        assert!(m
            .rows
            .iter()
            .all(|r| r.success.len() == 2 && r.images.len() == 2));
        let (identity, truth) = (&m.rows[0], &m.rows[1]);
        assert_eq!(truth.success, [true, true]);
        assert_eq!(identity.success, [false, false]);
        assert!(truth.psnr_in.iter().all(|&p| p == Some(PSNR_MAX)));
        // The base keeps everything outside the region, and differs inside it.
        assert!(identity.psnr_out.iter().flatten().all(|&p| p == PSNR_MAX));
        assert!(identity.psnr_in.iter().all(|p| p.is_some_and(|p| p < 30.0)));
        assert_eq!(m.tunes[0].reconstruction.len(), 2);

        let json: serde_json::Value = serde_json::from_str(&to_json(&args, &m)).unwrap();
        assert_eq!(json["rows"].as_array().unwrap().len(), 6);
        assert_eq!(json["scenes"][1]["index"], HELD_OUT_START + 1);
        assert_eq!(truth.kept(), 2);
        assert!(to_tables(&args, &m).contains("| truth | - | 60.0 | "));
    }
}
