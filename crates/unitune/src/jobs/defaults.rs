//! A model folder's own recommended settings: `unitune.json` beside `model_index.json`.
//!
//! The paper's recipe (lr 1e-4, 128 steps, strong guidance) is the default for the Stable
//! Diffusion models it was made for; a model with a different best recipe (the small built-in
//! model) carries its own, so that it works with no flags. Every field is optional and what is
//! missing keeps the library's default; a flag or an API field still overrides either. An unknown
//! field is an error naming it, so that a typo is not a silent default.
//!
//! ```json
//! { "tune": { "steps": 256, "learning_rate": 3e-4 },
//!   "edit": { "guidance_scale": 4.0, "start": 0.9, "auto_mask": true } }
//! ```

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::TuneJob;
use crate::pipelines::{AutoMask, EditMask, EditRequest};
use crate::schedulers::SchedulerKind;
use crate::train::tune::TrainableLayers;
use crate::train::OptimizerKind;
use crate::{Error, Result};

/// The file's name inside a model folder.
pub const MODEL_DEFAULTS_FILE: &str = "unitune.json";

/// The recommended settings of one model.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelDefaults {
    pub tune: TuneDefaults,
    pub edit: EditDefaults,
}

/// [`TuneJob`] fields a model may recommend.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TuneDefaults {
    pub steps: Option<usize>,
    pub batch_size: Option<usize>,
    pub learning_rate: Option<f64>,
    pub optimizer: Option<OptimizerKind>,
    pub layers: Option<TrainableLayers>,
    pub lora_rank: Option<usize>,
    pub distill_steps: Option<usize>,
    pub distill_learning_rate: Option<f64>,
    pub distill_prompts: Option<Vec<String>>,
    pub distill_difference_weight: Option<f64>,
}

/// [`EditRequest`] fields a model may recommend; `auto_mask` turns on the estimated mask with
/// `mask_threshold`, `mask_blur` and `mask_dilate` (each [`AutoMask::default`]'s when missing).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EditDefaults {
    pub guidance_scale: Option<f64>,
    pub prompt_guidance: Option<f64>,
    pub start: Option<f64>,
    pub interpolation: Option<f64>,
    pub latent_blend: Option<f64>,
    pub feather: Option<usize>,
    pub num_inference_steps: Option<usize>,
    pub scheduler: Option<SchedulerKind>,
    pub auto_mask: Option<bool>,
    pub mask_threshold: Option<f64>,
    pub mask_blur: Option<usize>,
    pub mask_dilate: Option<usize>,
}

impl ModelDefaults {
    /// Reads `model/unitune.json`; a folder without one, or a single-file checkpoint, has the
    /// library's defaults.
    pub fn read(model: &Path) -> Result<Self> {
        let path = model.join(MODEL_DEFAULTS_FILE);
        if !path.is_file() {
            return Ok(Self::default());
        }
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let defaults: Self = serde_json::from_str(&text)
            .map_err(|e| Error::argument(path.display().to_string(), e.to_string()))?;
        defaults.tune_job().check().map_err(|e| in_file(&path, e))?;
        Ok(defaults)
    }

    /// [`TuneJob::default`] with this model's recommendations.
    pub fn tune_job(&self) -> TuneJob {
        let base = TuneJob::default();
        let t = &self.tune;
        TuneJob {
            steps: t.steps.unwrap_or(base.steps),
            batch_size: t.batch_size.unwrap_or(base.batch_size),
            learning_rate: t.learning_rate.unwrap_or(base.learning_rate),
            optimizer: t.optimizer.unwrap_or(base.optimizer),
            layers: t.layers.unwrap_or(base.layers),
            lora_rank: t.lora_rank.or(base.lora_rank),
            distill_steps: t.distill_steps.or(base.distill_steps),
            distill_learning_rate: t.distill_learning_rate.or(base.distill_learning_rate),
            distill_prompts: t.distill_prompts.clone().or(base.distill_prompts),
            distill_difference_weight: t
                .distill_difference_weight
                .or(base.distill_difference_weight),
            ..base
        }
    }

    /// [`EditRequest::new`] with this model's recommendations.
    pub fn edit_request(&self, token: &str, prompt: &str) -> EditRequest {
        let base = EditRequest::new(token, prompt);
        let e = &self.edit;
        let mask = match e.auto_mask {
            Some(true) => EditMask::Auto(self.auto_mask()),
            _ => base.mask.clone(),
        };
        EditRequest {
            guidance_scale: e.guidance_scale.unwrap_or(base.guidance_scale),
            prompt_guidance: e.prompt_guidance.unwrap_or(base.prompt_guidance),
            start: e.start.unwrap_or(base.start),
            interpolation: e.interpolation.unwrap_or(base.interpolation),
            latent_blend: e.latent_blend.unwrap_or(base.latent_blend),
            feather: e.feather.unwrap_or(base.feather),
            num_inference_steps: e.num_inference_steps.unwrap_or(base.num_inference_steps),
            scheduler: e.scheduler.unwrap_or(base.scheduler),
            mask,
            ..base
        }
    }

    /// The automatic mask's settings, recommended or default.
    pub fn auto_mask(&self) -> AutoMask {
        let base = AutoMask::default();
        AutoMask {
            threshold: self.edit.mask_threshold.unwrap_or(base.threshold),
            blur: self.edit.mask_blur.unwrap_or(base.blur),
            dilate: self.edit.mask_dilate.unwrap_or(base.dilate),
        }
    }
}

fn in_file(path: &Path, e: Error) -> Error {
    Error::argument(path.display().to_string(), e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn folder(name: &str, text: Option<&str>) -> std::path::PathBuf {
        let dir =
            std::env::temp_dir().join(format!("unitune-defaults-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        if let Some(text) = text {
            std::fs::write(dir.join(MODEL_DEFAULTS_FILE), text).unwrap();
        }
        dir
    }

    #[test]
    fn a_folder_without_the_file_keeps_the_paper_s_defaults() {
        let defaults = ModelDefaults::read(&folder("none", None)).unwrap();
        assert_eq!(defaults.tune_job(), TuneJob::default());
        let request = defaults.edit_request("tok", "a cat");
        assert_eq!(
            request.guidance_scale,
            EditRequest::new("", "").guidance_scale
        );
        assert!(matches!(request.mask, EditMask::None));
    }

    #[test]
    fn recommendations_overlay_the_defaults_and_typos_are_errors() {
        let dir = folder(
            "some",
            Some(
                r#"{"tune": {"steps": 300, "learning_rate": 0.0003, "distill_prompts": ["a"]},
                "edit": {"guidance_scale": 4.5, "start": 0.9, "auto_mask": true, "mask_dilate": 3}}"#,
            ),
        );
        let defaults = ModelDefaults::read(&dir).unwrap();
        let job = defaults.tune_job();
        assert_eq!((job.steps, job.learning_rate), (300, 3e-4));
        assert_eq!(job.batch_size, TuneJob::default().batch_size);
        assert_eq!(job.distill_prompts, Some(vec!["a".to_string()]));
        let request = defaults.edit_request("tok", "a cat");
        assert_eq!((request.guidance_scale, request.start), (4.5, 0.9));
        let EditMask::Auto(mask) = request.mask else {
            panic!("no auto mask: {:?}", request.mask)
        };
        assert_eq!(mask.dilate, 3);
        assert_eq!(mask.blur, AutoMask::default().blur);

        let typo = folder("typo", Some(r#"{"tune": {"step": 300}}"#));
        let err = ModelDefaults::read(&typo).unwrap_err().to_string();
        assert!(
            err.contains("unitune.json") && err.contains("step"),
            "{err}"
        );
        let rate = folder("rate", Some(r#"{"tune": {"distill_learning_rate": -1}}"#));
        let err = ModelDefaults::read(&rate).unwrap_err().to_string();
        assert!(
            err.contains("unitune.json") && err.contains("distill-lr"),
            "{err}"
        );
        let zero = folder("zero", Some(r#"{"tune": {"steps": 0}}"#));
        let err = ModelDefaults::read(&zero).unwrap_err().to_string();
        assert!(
            err.contains("unitune.json") && err.contains("steps"),
            "{err}"
        );
    }
}
