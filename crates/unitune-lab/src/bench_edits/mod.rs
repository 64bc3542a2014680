//! Edit quality (`unitune bench-edits`) on held-out world scenes, scored against ground truth.
//!
//! Each scene of the procedural world comes with a random edit and its true result
//! ([`World::edit_sample`]). Every method edits the scene's picture with the edit prompt (the
//! edited scene's caption) and is scored by [`crate::world::score`]: PSNR inside the edit's
//! region and outside it (fidelity to the unchanged scene), and whether the asked change happened.
//! The methods:
//! - UniTune: tune on the picture (the paper's settings, at each `tune_lr`), then edit at each
//!   guidance x start (x auto-mask with `auto_mask`, x prompt guidance against the picture's
//!   caption at each of `prompt_guidance`: the paper's prompt-to-prompt setting); what a row
//!   does not sweep (feather, the automatic mask's settings, interpolation) is the model's
//!   recommendation (`unitune.json`), else the library's default;
//! - UniTune with the model's defaults (`unitune.json`, else the paper's): one tune and one edit
//!   as `unitune edit` makes them with no flags (with the caption as baseline prompt where the
//!   model recommends prompt guidance);
//! - SDEdit: img2img from the picture at each of `strengths`, no tuning;
//! - plain: txt2img from the edit prompt alone; its pictures also measure the model's
//!   caption-following, attribute by attribute ([`crate::world::follow`]);
//! - and three references: the unchanged picture (identity), the ground truth itself (which
//!   checks the checks: its success rate must be 100%), and the picture's autoencoder round trip
//!   (vae: how much of the scene any method working in latents can keep).
//!
//! Scenes are indices from [`HELD_OUT_START`] on, so they are never among a pretraining run's
//! scenes `0..world_scenes` whatever the seed. Every method of a scene samples from the same
//! seeded noise, with the same sampler (the model's recommended scheduler, else DDIM).

mod report;

use std::path::{Path, PathBuf};
use std::time::Instant;

use image::{GrayImage, Luma, RgbImage};
use sha2::{Digest, Sha256};
use unitune::image_io::{image_to_tensor, tensor_to_image};
use unitune::jobs::{ModelDefaults, TuneJob};
use unitune::noise::Noise;
use unitune::pipelines::{
    edit, generate, EditBase, EditMask, EditRequest, GenerateRequest, LoadOptions, NoProgress,
    StableDiffusion,
};
use unitune::schedulers::SchedulerKind;
use unitune::session::{DeltaEncoding, Session};
use unitune::train::tune::{default_token, tune, TrainableLayers, TuneSettings};
use unitune::{Error, Result};

pub use self::report::{to_json, to_tables, write_grid};
use crate::pretrain::TrainingState;
use crate::world::follow::{caption_followed, Following};
use crate::world::score::{edit_happened, edit_kind, psnr, Part};
use crate::world::{EditSample, SceneConfig, World};

/// PSNR outside the edit region (dB) from which a successful edit counts as having kept the scene.
pub const KEPT_DB: f64 = 20.0;

/// First held-out scene index: above any pretraining set (`0..world_scenes`).
pub const HELD_OUT_START: u64 = 1 << 32;

/// What to measure. [`Default`] is `unitune bench-edits` without flags.
#[derive(Debug, Clone)]
pub struct BenchEditsConfig {
    /// The model folder.
    pub model: PathBuf,
    /// Held-out scenes to edit.
    pub scenes: usize,
    /// World seed of the held-out scenes, and seed of every noise draw.
    pub seed: u64,
    /// UniTune tuning steps (batch 4, Adafactor).
    pub tune_steps: usize,
    /// The layers the learning-rate sweep's tunes train (the model-defaults tune has its own).
    pub tune_layers: TrainableLayers,
    /// Their rank, for `lora`; `None`: the default.
    pub lora_rank: Option<usize>,
    /// UniTune learning rates; each is a separate tune per scene.
    pub tune_lr: Vec<f64>,
    /// Sampling steps (DDIM) of every method.
    pub steps: usize,
    /// UniTune guidance scales.
    pub guidance: Vec<f64>,
    /// UniTune start fractions (1 = from noise).
    pub start: Vec<f64>,
    /// Also run every UniTune setting with an automatic mask.
    pub auto_mask: bool,
    /// Also run every UniTune setting with prompt guidance at each of these weights, the
    /// scene's caption as the baseline prompt.
    pub prompt_guidance: Vec<f64>,
    /// SDEdit strengths.
    pub strengths: Vec<f64>,
    /// Classifier-free guidance of SDEdit and plain generation.
    pub baseline_guidance: f64,
    /// Most objects per scene; `None`: the model's pretraining setting, else 2.
    pub max_objects: Option<usize>,
    /// Keeps each tune's session in this folder and reuses it when a later run asks for the same
    /// tune (same model, scene and settings), so edit settings can be swept without retuning.
    pub sessions: Option<PathBuf>,
    /// How each tune's session is stored before its edits: they use the session as it comes
    /// back from a file in this code, as `unitune edit` would; `None`: the tune's own (lora
    /// for a LoRA tune, else q8).
    pub delta_encoding: Option<DeltaEncoding>,
    /// The encoding the tunes train for (a coarse grid is distilled into); `None`: the one
    /// they are stored in. Another one shows what rounding after the tune loses.
    pub tune_delta_encoding: Option<DeltaEncoding>,
    /// The distillation's steps, learning rate and difference weight, for a coarse code;
    /// `None`: the model's (`unitune.json`), else the library's.
    pub distill_steps: Option<usize>,
    pub distill_lr: Option<f64>,
    pub distill_difference_weight: Option<f64>,
}

impl Default for BenchEditsConfig {
    fn default() -> Self {
        Self {
            model: PathBuf::new(),
            scenes: 8,
            seed: 0,
            tune_steps: 128,
            tune_layers: TrainableLayers::default(),
            lora_rank: None,
            tune_lr: vec![1e-4],
            steps: 30,
            guidance: vec![3.0, 6.0],
            start: vec![1.0, 0.8],
            auto_mask: false,
            prompt_guidance: vec![],
            strengths: vec![0.5, 0.7, 0.9],
            baseline_guidance: 8.0,
            max_objects: None,
            sessions: None,
            delta_encoding: None,
            tune_delta_encoding: None,
            distill_steps: None,
            distill_lr: None,
            distill_difference_weight: None,
        }
    }
}

/// One method at one setting, with its per-scene scores.
pub struct Row {
    pub method: &'static str,
    pub setting: String,
    pub psnr_in: Vec<Option<f64>>,
    pub psnr_out: Vec<Option<f64>>,
    pub success: Vec<bool>,
    /// How far each picture follows the edit prompt (the edited scene's caption), attribute by
    /// attribute: for plain generation, the model's caption-following.
    pub following: Vec<Following>,
    /// Seconds per edit (sampling only).
    pub seconds: Vec<f64>,
    pub images: Vec<RgbImage>,
}

impl Row {
    pub fn success_rate(&self) -> f64 {
        self.success.iter().filter(|&&s| s).count() as f64 / self.success.len().max(1) as f64
    }

    /// Edits that succeeded and kept the rest of the scene: PSNR out at least [`KEPT_DB`] (or
    /// nothing outside, for background changes).
    pub fn kept(&self) -> usize {
        self.success
            .iter()
            .zip(&self.psnr_out)
            .filter(|(&ok, out)| ok && out.is_none_or(|db| db >= KEPT_DB))
            .count()
    }
}

/// One tune per scene and recipe.
pub struct TuneRecord {
    /// `lr=1e-4`, or `model defaults (...)`.
    pub label: String,
    pub lr: f64,
    pub steps: usize,
    pub seconds: Vec<f64>,
    /// Mean loss of the last quarter of the steps.
    pub final_loss: Vec<f64>,
    /// PSNR of the token-only sample (guidance off, from noise) against the tuned picture.
    pub reconstruction: Vec<f64>,
    /// The session file's size in the run's delta encoding, over the UNet's weights in f32.
    pub session_share: Vec<f64>,
}

fn mean(xs: impl IntoIterator<Item = f64>) -> Option<f64> {
    let xs: Vec<f64> = xs.into_iter().collect();
    (!xs.is_empty()).then(|| xs.iter().sum::<f64>() / xs.len() as f64)
}

struct Bench<'a> {
    args: &'a BenchEditsConfig,
    config: SceneConfig,
    /// The sampler of every method: the model's recommended one (`unitune.json`), which the
    /// UniTune edits use, so that SDEdit and plain generation are compared on the same.
    scheduler: SchedulerKind,
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
                    following: vec![],
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
        row.following
            .push(caption_followed(&sample.edited, &image, &self.config)?);
        row.seconds.push(seconds);
        row.images.push(image);
        Ok(())
    }

    /// Tunes a fresh copy of the model on scene `i` with `plan`'s recipe, then makes its edits.
    fn unitune(
        &mut self,
        i: usize,
        sample: &EditSample,
        base: &EditBase,
        token: &str,
        plan: &TunePlan,
        record: &mut TuneRecord,
    ) -> Result<()> {
        let args = self.args;
        let job = &plan.job;
        let settings = TuneJob {
            delta_encoding: (args.tune_delta_encoding.or(args.delta_encoding))
                .or(job.delta_encoding),
            ..job.clone()
        }
        .settings(token.to_string(), args.seed);
        let stored = args.delta_encoding.unwrap_or(settings.delta_encoding);
        let cached = args
            .sessions
            .as_ref()
            .map(|dir| dir.join(session_name(i, &settings)));
        let mut tuned = StableDiffusion::load(&args.model, &LoadOptions::default())?;
        let reuse = cached
            .as_deref()
            .filter(|path| path.exists())
            .and_then(|path| Session::load(path).ok())
            .filter(|s| s.settings == settings && s.image == sample.before)
            .filter(|s| tuned.apply_session(s).is_ok());
        let session = match reuse {
            Some(session) => session,
            None => {
                let options = LoadOptions {
                    trainable: Some(job.trainable()),
                    ..LoadOptions::default()
                };
                tuned = StableDiffusion::load(&args.model, &options)?;
                let t0 = Instant::now();
                let session = tune(
                    &tuned,
                    &sample.before,
                    settings,
                    &mut self.noise(i),
                    &mut NoProgress,
                    &mut |_, _| Ok(()),
                )?;
                record.seconds.push(t0.elapsed().as_secs_f64());
                if let Some(path) = &cached {
                    std::fs::create_dir_all(path.parent().expect("a file in the folder"))
                        .map_err(|e| Error::io(path, e))?;
                    session.save(path, DeltaEncoding::F32)?;
                }
                session
            }
        };
        // Edit with the session as a file in the run's encoding gives it back.
        let name = Path::new("bench.unitune");
        let bytes = session.to_bytes(name, stored)?;
        let unet_f32: usize = tuned
            .unet_store
            .tensors()
            .values()
            .map(|t| t.elem_count() * 4)
            .sum();
        record
            .session_share
            .push(bytes.len() as f64 / unet_f32 as f64);
        let session = Session::from_bytes(&bytes, name)?;
        // Applied to the base weights the model was loaded with, whatever the tune left in it.
        tuned.apply_session(&session)?;
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

        for planned in &plan.edits {
            let request = EditRequest {
                token: token.to_string(),
                prompt: sample.prompt.clone(),
                baseline_prompt: planned.caption_baseline.then(|| sample.caption.clone()),
                ..planned.request.clone()
            };
            let t0 = Instant::now();
            let out = edit(&tuned, base, &request, &mut self.noise(i), &mut NoProgress)?;
            let seconds = t0.elapsed().as_secs_f64();
            self.record(
                planned.method,
                planned.setting.clone(),
                sample,
                tensor_to_image(&out.image, 0)?,
                seconds,
            )?;
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
            scheduler: self.scheduler,
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

/// The session file of scene `scene`'s tune with `settings` in the `sessions` folder: the
/// settings' hash names it, and the model is checked when it is applied.
fn session_name(scene: usize, settings: &TuneSettings) -> String {
    let json = serde_json::to_string(settings).expect("settings serialize");
    let hash = Sha256::digest(json.as_bytes());
    let hex: String = hash[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("scene{scene}-{hex}.unitune")
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

/// One recipe of tuning and the edits made with each tune.
struct TunePlan {
    job: TuneJob,
    edits: Vec<PlannedEdit>,
}

struct PlannedEdit {
    method: &'static str,
    setting: String,
    /// The settings; token, prompt and baseline prompt are the scene's.
    request: EditRequest,
    /// Prompt guidance against the scene's caption.
    caption_baseline: bool,
}

/// The recipes: the paper's tune at each `tune_lr` with the grid of edit settings, then the
/// model's defaults (`unitune.json`, else the library's) as one tune and one edit.
fn plans(
    args: &BenchEditsConfig,
    defaults: &ModelDefaults,
) -> Result<(Vec<TunePlan>, Vec<TuneRecord>)> {
    let mut plans = vec![];
    let mut records = vec![];
    let record = |label: String, job: &TuneJob| TuneRecord {
        label,
        lr: job.learning_rate,
        steps: job.steps,
        seconds: vec![],
        final_loss: vec![],
        reconstruction: vec![],
        session_share: vec![],
    };
    let masks: &[bool] = if args.auto_mask {
        &[false, true]
    } else {
        &[false]
    };
    let weights: Vec<Option<f64>> = std::iter::once(None)
        .chain(args.prompt_guidance.iter().map(|&w| Some(w)))
        .collect();
    // Everything a row does not sweep (feather, the automatic mask's settings, ...) is the
    // model's recommendation: at 64 px the library's 16 px feather and dilation would be a
    // quarter of the picture.
    let auto_mask = defaults.auto_mask();
    // The model's recipe, with the distillation the flags ask for (the sweep's tunes take it too).
    let base = defaults.tune_job();
    let model_job = TuneJob {
        distill_steps: args.distill_steps.or(base.distill_steps),
        distill_learning_rate: args.distill_lr.or(base.distill_learning_rate),
        distill_difference_weight: args
            .distill_difference_weight
            .or(base.distill_difference_weight),
        ..base
    };
    for &lr in &args.tune_lr {
        let job = TuneJob {
            steps: args.tune_steps,
            learning_rate: lr,
            layers: args.tune_layers,
            lora_rank: args.lora_rank,
            distill_prompts: model_job.distill_prompts.clone(),
            distill_steps: model_job.distill_steps,
            distill_learning_rate: model_job.distill_learning_rate,
            distill_difference_weight: model_job.distill_difference_weight,
            ..TuneJob::default()
        };
        let mut edits = vec![];
        for &g in &args.guidance {
            for &start in &args.start {
                for &masked in masks {
                    for &weight in &weights {
                        let mut request = defaults.edit_request("", "");
                        request.guidance_scale = g;
                        request.mask = EditMask::None;
                        request.start = start;
                        request.num_inference_steps = args.steps;
                        let mut setting = format!("{} g={g} start={start}", lr_label(lr));
                        if masked {
                            request.mask = EditMask::Auto(auto_mask);
                            setting.push_str(" auto-mask");
                        }
                        if let Some(w) = weight {
                            request.prompt_guidance = w;
                            setting.push_str(&format!(" caption-pg={w}"));
                        }
                        edits.push(PlannedEdit {
                            method: "unitune",
                            setting,
                            request,
                            caption_baseline: weight.is_some(),
                        });
                    }
                }
            }
        }
        records.push(record(lr_label(lr), &job));
        plans.push(TunePlan { job, edits });
    }
    let job = model_job;
    let request = defaults.edit_request("", "");
    let caption_baseline = defaults.edit.prompt_guidance.is_some();
    let mut setting = format!("g={} start={}", request.guidance_scale, request.start);
    if matches!(request.mask, EditMask::Auto(_)) {
        setting.push_str(" auto-mask");
    }
    if caption_baseline {
        setting.push_str(&format!(" caption-pg={}", request.prompt_guidance));
    }
    let label = format!(
        "model defaults ({}, {} steps)",
        lr_label(job.learning_rate),
        job.steps
    );
    records.push(record(label, &job));
    plans.push(TunePlan {
        job,
        edits: vec![PlannedEdit {
            method: "defaults",
            setting,
            request,
            caption_baseline,
        }],
    });
    Ok((plans, records))
}

/// Everything a run measured.
pub struct Measurement {
    pub model: String,
    pub config: SceneConfig,
    pub samples: Vec<EditSample>,
    pub rows: Vec<Row>,
    pub tunes: Vec<TuneRecord>,
}

/// Runs every method on every scene.
pub fn measure(args: &BenchEditsConfig) -> Result<Measurement> {
    if args.scenes == 0 {
        return Err(Error::argument("scenes", "must be at least 1"));
    }
    let sd = StableDiffusion::load(&args.model, &LoadOptions::default())?;
    let config = scene_config(&sd, args.max_objects);
    let world = World::new(config.clone(), args.seed)?;
    let token = default_token(&sd.tokenizer);
    let defaults = ModelDefaults::read(&args.model)?;
    let mut bench = Bench {
        args,
        config,
        scheduler: defaults.edit_request("", "").scheduler,
        rows: vec![],
    };
    let (plans, mut tunes) = plans(args, &defaults)?;
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

        for (plan, record) in plans.iter().zip(tunes.iter_mut()) {
            bench.unitune(i, &sample, &base, &token, plan, record)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::world::score::PSNR_MAX;

    fn tiny_sd1() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-sd1")
    }

    /// A run small enough for a test on `model`: one scene, a one-step tune, two sampling steps,
    /// one UniTune setting (g 4 from noise), no SDEdit strength.
    fn tiny_run(model: &Path) -> BenchEditsConfig {
        BenchEditsConfig {
            model: model.into(),
            scenes: 1,
            tune_steps: 1,
            steps: 2,
            guidance: vec![4.0],
            start: vec![1.0],
            strengths: vec![],
            ..BenchEditsConfig::default()
        }
    }

    #[test]
    fn a_tiny_run_scores_every_method_and_the_references_check_out() {
        let args = BenchEditsConfig {
            scenes: 2,
            start: vec![0.9],
            strengths: vec![0.5],
            ..tiny_run(&tiny_sd1())
        };
        let m = measure(&args).unwrap();
        let methods: Vec<&str> = m.rows.iter().map(|r| r.method).collect();
        assert_eq!(
            methods,
            ["identity", "truth", "vae", "unitune", "defaults", "sdedit", "plain"]
        );
        assert!(m
            .rows
            .iter()
            .all(|r| r.success.len() == 2 && r.images.len() == 2));
        let (identity, truth) = (&m.rows[0], &m.rows[1]);
        assert_eq!(truth.success, [true, true]);
        assert!(truth.following.iter().all(|f| f.all()));
        assert_eq!(identity.success, [false, false]);
        assert!(truth.psnr_in.iter().all(|&p| p == Some(PSNR_MAX)));
        // The base keeps everything outside the region, and differs inside it.
        assert!(identity.psnr_out.iter().flatten().all(|&p| p == PSNR_MAX));
        assert!(identity.psnr_in.iter().all(|p| p.is_some_and(|p| p < 30.0)));
        assert_eq!(m.tunes[0].reconstruction.len(), 2);

        let json = to_json(&args, &m);
        assert_eq!(json["rows"].as_array().unwrap().len(), 7);
        // The fixture has no unitune.json: the defaults row is the paper's recipe.
        assert_eq!(m.tunes[1].label, "model defaults (lr=1e-4, 128 steps)");
        assert_eq!(json["scenes"][1]["index"], HELD_OUT_START + 1);
        assert_eq!(truth.kept(), 2);
        assert!(to_tables(&args, &m).contains("| truth | - | 60.0 | "));
    }

    /// A model that recommends a scheduler gets it for SDEdit and plain generation too: the
    /// plain row's picture is what `generate` makes with that scheduler from the scene's noise.
    #[test]
    fn the_baselines_sample_with_the_model_s_scheduler() {
        let fixture = tiny_sd1();
        let model =
            std::env::temp_dir().join(format!("unitune-bench-scheduler-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&model);
        unitune::weights::export::copy_tree(&fixture, &model, &|_| true).unwrap();
        std::fs::write(
            model.join("unitune.json"),
            r#"{"edit": {"scheduler": "euler"}}"#,
        )
        .unwrap();
        let run = |model: &Path| {
            let args = BenchEditsConfig {
                steps: 3,
                strengths: vec![0.6],
                ..tiny_run(model)
            };
            let m = measure(&args).unwrap();
            let image = |method: &str| {
                let row = m.rows.iter().find(|r| r.method == method).unwrap();
                row.images[0].clone()
            };
            (image("sdedit"), image("plain"), m, args)
        };
        let (ddim_sdedit, ddim_plain, ..) = run(&fixture);
        let (sdedit, plain, m, args) = run(&model);
        assert_ne!(sdedit, ddim_sdedit);
        assert_ne!(plain, ddim_plain);

        let sd = StableDiffusion::load(&model, &LoadOptions::default()).unwrap();
        let request = GenerateRequest {
            width: m.config.width as usize,
            height: m.config.height as usize,
            num_inference_steps: 3,
            guidance_scale: args.baseline_guidance,
            scheduler: SchedulerKind::Euler,
            ..GenerateRequest::new(m.samples[0].prompt.clone())
        };
        let noise = &mut Noise::seeded(args.seed.wrapping_mul(1_000_003));
        let expected = generate(&sd, &request, noise, &mut NoProgress).unwrap();
        assert_eq!(plain, tensor_to_image(&expected, 0).unwrap());
        std::fs::remove_dir_all(&model).unwrap();
    }

    #[test]
    fn a_kept_session_is_reused_and_gives_the_same_edits() {
        let dir =
            std::env::temp_dir().join(format!("unitune-bench-sessions-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let args = BenchEditsConfig {
            tune_steps: 2,
            sessions: Some(dir.clone()),
            ..tiny_run(&tiny_sd1())
        };
        let first = measure(&args).unwrap();
        // One file per recipe: the paper's tune at lr 1e-4 and 2 steps, and the model's defaults.
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 2);
        assert_eq!(first.tunes[0].seconds.len(), 1);
        let second = measure(&args).unwrap();
        assert!(
            second.tunes.iter().all(|t| t.seconds.is_empty()),
            "no tune ran again"
        );
        let unitune = |m: &Measurement| {
            m.rows
                .iter()
                .find(|r| r.method == "unitune")
                .unwrap()
                .images[0]
                .clone()
        };
        assert_eq!(unitune(&first), unitune(&second));
        assert_eq!(
            first.tunes[0].reconstruction,
            second.tunes[0].reconstruction
        );
        assert_eq!(first.tunes[0].final_loss, second.tunes[0].final_loss);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
