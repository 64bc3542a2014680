//! The JSON the API takes for a tune and for edits: the CLI's flag names (`--lr` is `lr`,
//! `--sweep-guidance` is `sweep_guidance`), the library's defaults for whatever is left out, and
//! unknown fields refused so that a typo is an error rather than a silent default.

use base64::Engine;
use image::RgbImage;
use serde::{Deserialize, Serialize};
use unitune::jobs::{EditJob, ModelDefaults, TuneJob};
use unitune::pipelines::{AutoMask, EditMask, EditRequest, Mask};
use unitune::schedulers::SchedulerKind;
use unitune::session::DeltaEncoding;
use unitune::train::tune::TrainableLayers;
use unitune::train::OptimizerKind;

use crate::config::Limits;

/// A tune's settings (`POST /api/sessions`, the multipart field `settings`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TuneParams {
    pub token: Option<String>,
    pub steps: usize,
    pub batch: usize,
    pub lr: f64,
    pub optimizer: OptimizerKind,
    pub layers: TrainableLayers,
    /// The rank of a `lora` tune (`null`: the model's, else 8); ignored for other layers.
    pub lora_rank: Option<usize>,
    /// How the session is stored (`null`: lora for a LoRA tune, else q8).
    pub delta_encoding: Option<DeltaEncoding>,
    /// The distillation into a q2-q4 grid: steps, learning rate and prompts (`null`: the
    /// model's, else the tune's steps, a tenth of its lr, and a generic pair of captions).
    pub distill_steps: Option<usize>,
    pub distill_lr: Option<f64>,
    pub distill_prompts: Option<Vec<String>>,
    /// How much more the distillation weighs its error in the differences between prompts
    /// (`null`: the model's, else the library's).
    pub distill_difference_weight: Option<f64>,
    /// A seed, or `null` / -1 for a random one.
    pub seed: Option<i64>,
}

impl Default for TuneParams {
    /// The library's defaults (the paper's recipe).
    fn default() -> Self {
        Self::defaults(&ModelDefaults::default())
    }
}

impl TuneParams {
    /// The defaults for a model: its `unitune.json` over the library's.
    pub fn defaults(model: &ModelDefaults) -> Self {
        let job = model.tune_job();
        Self {
            token: None,
            steps: job.steps,
            batch: job.batch_size,
            lr: job.learning_rate,
            optimizer: job.optimizer,
            layers: job.layers,
            lora_rank: job.lora_rank,
            delta_encoding: job.delta_encoding,
            distill_steps: job.distill_steps,
            distill_lr: job.distill_learning_rate,
            distill_prompts: job.distill_prompts,
            distill_difference_weight: job.distill_difference_weight,
            seed: None,
        }
    }

    /// The tune these settings ask for; a random seed is drawn here and kept in `seed`, so that
    /// the same settings make the same tune on any machine.
    pub fn job(&mut self, limits: &Limits) -> Result<TuneJob, String> {
        if self.steps > limits.max_steps {
            return Err(format!(
                "steps: {} is above the limit {}",
                self.steps, limits.max_steps
            ));
        }
        if let Some(steps) = self.distill_steps.filter(|&s| s > limits.max_steps) {
            return Err(format!(
                "distill_steps: {steps} is above the limit {}",
                limits.max_steps
            ));
        }
        if let Some(prompts) = &self.distill_prompts {
            if prompts.len() > 16 || prompts.iter().any(|p| p.chars().count() > 300) {
                return Err("distill_prompts: at most 16 prompts of 300 characters".into());
            }
        }
        if self.batch > 64 {
            return Err(format!("batch: {} is above the limit 64", self.batch));
        }
        if let Some(token) = &self.token {
            if token.trim().is_empty() || token.chars().count() > 64 {
                return Err("token: give a made-up word of 1 to 64 characters".into());
            }
        }
        let seed = seed(self.seed).unwrap_or_else(unitune::noise::random_seed) & (i64::MAX as u64);
        self.seed = Some(seed as i64);
        let job = TuneJob {
            token: self.token.clone(),
            steps: self.steps,
            batch_size: self.batch,
            learning_rate: self.lr,
            optimizer: self.optimizer,
            layers: self.layers,
            lora_rank: self.lora_rank,
            delta_encoding: self.delta_encoding,
            distill_steps: self.distill_steps,
            distill_learning_rate: self.distill_lr,
            distill_prompts: self.distill_prompts.clone(),
            distill_difference_weight: self.distill_difference_weight,
            seed: Some(seed),
            ..TuneJob::default()
        };
        job.check().map_err(|e| e.to_string())?;
        Ok(job)
    }
}

/// One edit job's settings (`POST /api/sessions/{id}/edits`). Where AUTOMATIC1111's
/// `/sdapi/v1/img2img` has a field of the same meaning: `start` is its `denoising_strength`
/// (the fraction of the schedule run from the noised photo), `feather` its `mask_blur` (the
/// mask's soft edge in pixels), `seed` its `seed` (-1: random), `guidance` its `cfg_scale`,
/// `steps` its `steps`, `negative_prompt` the same.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EditParams {
    /// The edit; the session's token is put in front.
    pub prompt: String,
    /// More edit prompts, after `prompt` (each gets its own images).
    pub prompts: Vec<String>,
    pub negative_prompt: String,
    pub guidance: f64,
    /// Prompt guidance against this prompt (e.g. a caption of the photo).
    pub baseline_prompt: Option<String>,
    pub prompt_guidance: f64,
    pub start: f64,
    pub interpolate: f64,
    pub latent_blend: f64,
    /// A painted mask as a PNG data URL (`data:image/png;base64,...`), white where the edit may
    /// change the photo; resized to the photo. Not kept in the record (it may be large).
    #[serde(skip_serializing)]
    pub mask: Option<String>,
    pub auto_mask: bool,
    pub mask_threshold: f64,
    pub mask_blur: usize,
    pub mask_dilate: usize,
    pub feather: usize,
    pub steps: usize,
    pub scheduler: SchedulerKind,
    /// A seed, or `null` / -1 for a random one.
    pub seed: Option<i64>,
    pub seeds: usize,
    pub sweep_guidance: Vec<f64>,
    pub sweep_start: Vec<f64>,
}

impl Default for EditParams {
    /// The library's defaults.
    fn default() -> Self {
        Self::defaults(&ModelDefaults::default())
    }
}

impl EditParams {
    /// The defaults for a model: its `unitune.json` over the library's.
    pub fn defaults(model: &ModelDefaults) -> Self {
        let r = model.edit_request("", "");
        let auto = model.auto_mask();
        Self {
            prompt: String::new(),
            prompts: vec![],
            negative_prompt: r.negative_prompt,
            guidance: r.guidance_scale,
            baseline_prompt: r.baseline_prompt,
            prompt_guidance: r.prompt_guidance,
            start: r.start,
            interpolate: r.interpolation,
            latent_blend: r.latent_blend,
            mask: None,
            auto_mask: matches!(r.mask, EditMask::Auto(_)),
            mask_threshold: auto.threshold,
            mask_blur: auto.blur,
            mask_dilate: auto.dilate,
            feather: r.feather,
            steps: r.num_inference_steps,
            scheduler: r.scheduler,
            seed: None,
            seeds: 1,
            sweep_guidance: vec![],
            sweep_start: vec![],
        }
    }

    /// The job, checked against `limits` and a session picture of `width` x `height`; the seed
    /// is drawn here when none is given, so that the record holds the one used.
    pub fn job(&mut self, limits: &Limits, width: u32, height: u32) -> Result<EditJob, String> {
        let mut prompts = vec![self.prompt.clone()];
        prompts.extend(self.prompts.iter().cloned());
        prompts.retain(|p| !p.trim().is_empty());
        if prompts.is_empty() {
            return Err("prompt: give the edit, e.g. \"a dog in a restaurant\"".into());
        }
        let texts = prompts
            .iter()
            .chain([&self.negative_prompt])
            .chain(self.baseline_prompt.as_ref());
        for text in texts {
            if text.chars().count() > limits.max_prompt_chars {
                return Err(format!(
                    "prompt: {} characters is above the limit {}",
                    text.chars().count(),
                    limits.max_prompt_chars
                ));
            }
        }
        if self.steps > limits.max_steps {
            return Err(format!(
                "steps: {} is above the limit {}",
                self.steps, limits.max_steps
            ));
        }
        let edits = prompts.len()
            * self.seeds
            * self.sweep_guidance.len().max(1)
            * self.sweep_start.len().max(1);
        if edits > limits.max_edits_per_job {
            return Err(format!(
                "{edits} edits (prompts x seeds x sweeps) is above the limit {}",
                limits.max_edits_per_job
            ));
        }
        let mask = match (&self.mask, self.auto_mask) {
            (Some(_), true) => return Err("mask: give a mask or auto_mask, not both".into()),
            (Some(url), false) => EditMask::Given(Mask::from_image(
                &decode_data_url(url)?,
                width as usize,
                height as usize,
            )),
            (None, true) => EditMask::Auto(AutoMask {
                threshold: self.mask_threshold,
                blur: self.mask_blur,
                dilate: self.mask_dilate,
            }),
            (None, false) => EditMask::None,
        };
        let seed = seed(self.seed).unwrap_or_else(unitune::noise::random_seed) & (i64::MAX as u64);
        self.seed = Some(seed as i64);
        let request = EditRequest {
            negative_prompt: self.negative_prompt.clone(),
            guidance_scale: self.guidance,
            baseline_prompt: self.baseline_prompt.clone(),
            prompt_guidance: self.prompt_guidance,
            start: self.start,
            interpolation: self.interpolate,
            latent_blend: self.latent_blend,
            mask,
            feather: self.feather,
            num_inference_steps: self.steps,
            scheduler: self.scheduler,
            ..EditRequest::new("", "")
        };
        let job = EditJob {
            request,
            prompts,
            seed: Some(seed),
            seeds: self.seeds,
            sweep_guidance: self.sweep_guidance.clone(),
            sweep_start: self.sweep_start.clone(),
        };
        let groups = job.plan(seed).map_err(|e| e.to_string())?;
        job.check(&groups, width as usize, height as usize)
            .map_err(|e| e.to_string())?;
        Ok(job)
    }
}

/// `None` and -1 mean "random", as in AUTOMATIC1111.
fn seed(seed: Option<i64>) -> Option<u64> {
    seed.filter(|&s| s >= 0).map(|s| s as u64)
}

/// A `data:image/png;base64,...` URL (or bare base64) decoded to a picture.
fn decode_data_url(url: &str) -> Result<RgbImage, String> {
    let data = url.split_once(',').map_or(url, |(_, data)| data);
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(data.trim())
        .map_err(|e| format!("mask: not base64 image data ({e})"))?;
    crate::upload::decode_image(&bytes, 16_000_000).map_err(|e| format!("mask: {e}"))
}

/// `given` (a JSON object of some of `T`'s fields) over `defaults`: what a request leaves out
/// takes the model's default, an unknown field is still an error.
pub fn overlay<T: Serialize + serde::de::DeserializeOwned>(
    defaults: &T,
    given: serde_json::Value,
) -> Result<T, String> {
    let serde_json::Value::Object(given) = given else {
        return Err("expected a JSON object of settings".into());
    };
    let mut merged = serde_json::to_value(defaults).expect("settings serialize");
    let fields = merged.as_object_mut().expect("settings are an object");
    fields.extend(given);
    serde_path_to_error::deserialize(merged).map_err(|e| match e.path().to_string().as_str() {
        "." => e.inner().to_string(),
        path => format!("{path}: {}", e.inner()),
    })
}
