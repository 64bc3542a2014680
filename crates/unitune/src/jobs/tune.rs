//! A tune as front ends ask for it: the photo, and settings whose defaults are the paper's.

use image::RgbImage;

use crate::image_io::resize_and_center_crop;
use crate::noise::{random_seed, Noise};
use crate::pipelines::{Progress, StableDiffusion};
use crate::session::{DeltaEncoding, Session};
use crate::train::distill::{Distillation, DEFAULT_DIFFERENCE_WEIGHT, DEFAULT_PROMPTS};
use crate::train::lora::DEFAULT_LORA_RANK;
use crate::train::tune::{default_token, tune, TrainableLayers, TuneSettings};
use crate::train::OptimizerKind;
use crate::weights::TrainableFilter;
use crate::{Error, Result};

/// Everything a front end may set for a tune. [`Default`] is the paper's recipe
/// ([`TuneSettings::new`]): batch 4, 128 steps, Adafactor at lr 1e-4, most UNet layers.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct TuneJob {
    /// The rare token; `None`: the first made-up word the model's tokenizer splits
    /// ([`default_token`]).
    pub token: Option<String>,
    pub steps: usize,
    pub batch_size: usize,
    pub learning_rate: f64,
    pub optimizer: OptimizerKind,
    /// Which UNet tensors change; the model must be loaded with [`TuneJob::trainable`].
    pub layers: TrainableLayers,
    /// Training size; the photo is scaled to cover it and centre-cropped. `None`: the model's.
    pub width: Option<usize>,
    pub height: Option<usize>,
    /// `None`: a random seed, recorded in the session.
    pub seed: Option<u64>,
    /// Recompute each UNet block in the backward pass instead of keeping its activations.
    pub gradient_checkpointing: bool,
    /// The rank of a `lora` tune (ignored for other layers, so that a model's recommended
    /// rank does not stand in the way of choosing other layers); `None`: [`DEFAULT_LORA_RANK`].
    pub lora_rank: Option<usize>,
    /// How the session will be stored (a coarse grid is distilled into after the tune:
    /// [`crate::train::distill`]); `None`: `lora` for a LoRA tune, else q8.
    pub delta_encoding: Option<DeltaEncoding>,
    /// The distillation's steps; `None`: as many as the tune's.
    pub distill_steps: Option<usize>,
    /// The distillation's learning rate; `None`: a tenth of the tune's.
    pub distill_learning_rate: Option<f64>,
    /// Prompts the distillation matches the tuned model under, besides the token and the empty
    /// prompt; `None`: [`DEFAULT_PROMPTS`].
    pub distill_prompts: Option<Vec<String>>,
    /// [`Distillation::difference_weight`]; `None`: [`DEFAULT_DIFFERENCE_WEIGHT`].
    pub distill_difference_weight: Option<f64>,
}

impl Default for TuneJob {
    fn default() -> Self {
        let paper = TuneSettings::new("", 0);
        Self {
            token: None,
            steps: paper.steps,
            batch_size: paper.batch_size,
            learning_rate: paper.learning_rate,
            optimizer: paper.optimizer,
            layers: paper.layers,
            width: None,
            height: None,
            seed: None,
            gradient_checkpointing: false,
            lora_rank: None,
            delta_encoding: None,
            distill_steps: None,
            distill_learning_rate: None,
            distill_prompts: None,
            distill_difference_weight: None,
        }
    }
}

impl TuneJob {
    /// The UNet tensors to load as trainable (`LoadOptions::trainable`).
    pub fn trainable(&self) -> TrainableFilter {
        self.layers.filter()
    }

    /// Checks what can be checked without the model (counts, the learning rate).
    pub fn check(&self) -> Result<()> {
        for (name, value) in [("steps", self.steps), ("batch", self.batch_size)] {
            if value == 0 {
                return Err(Error::argument(name, "must be at least 1"));
            }
        }
        let rates = [
            ("lr", Some(self.learning_rate)),
            ("distill-lr", self.distill_learning_rate),
        ];
        for (name, lr) in rates {
            if let Some(lr) = lr.filter(|lr| !(lr.is_finite() && *lr > 0.0)) {
                return Err(Error::argument(
                    name,
                    format!("{lr} must be a finite number > 0"),
                ));
            }
        }
        if let Some(w) = self
            .distill_difference_weight
            .filter(|w| !(w.is_finite() && *w >= 0.0))
        {
            return Err(Error::argument(
                "distill-difference-weight",
                format!("{w} must be a finite number >= 0"),
            ));
        }
        self.settings(String::new(), 0).check()
    }

    /// The settings a tune with this token and seed records, every default resolved.
    pub fn settings(&self, token: String, seed: u64) -> TuneSettings {
        let lora = self.layers == TrainableLayers::Lora;
        let lora_rank = lora.then(|| self.lora_rank.unwrap_or(DEFAULT_LORA_RANK));
        let delta_encoding = match self.delta_encoding {
            None if lora => DeltaEncoding::Lora,
            encoding => encoding.unwrap_or_default(),
        };
        let distillation = delta_encoding.coarse_levels().map(|_| Distillation {
            steps: self.distill_steps.unwrap_or(self.steps),
            learning_rate: self
                .distill_learning_rate
                .unwrap_or(self.learning_rate / 10.0),
            prompts: self
                .distill_prompts
                .clone()
                .unwrap_or_else(|| DEFAULT_PROMPTS.map(String::from).to_vec()),
            difference_weight: self
                .distill_difference_weight
                .unwrap_or(DEFAULT_DIFFERENCE_WEIGHT),
        });
        TuneSettings {
            token,
            steps: self.steps,
            batch_size: self.batch_size,
            learning_rate: self.learning_rate,
            optimizer: self.optimizer,
            layers: self.layers,
            seed,
            delta_encoding,
            distillation,
            lora_rank,
        }
    }

    /// Checks the settings, resolves every default against `sd` and crops `image` to the
    /// training size; nothing is tuned yet, so a front end can report the plan or refuse it.
    pub fn prepare(&self, sd: &StableDiffusion, image: RgbImage) -> Result<PreparedTune> {
        self.check()?;
        let (width, height) = sd.default_size(self.width, self.height, None)?;
        sd.check_size(width, height)?;
        let token = self
            .token
            .clone()
            .unwrap_or_else(|| default_token(&sd.tokenizer));
        let settings = self.settings(token, self.seed.unwrap_or_else(random_seed));
        Ok(PreparedTune {
            image: resize_and_center_crop(image, width as u32, height as u32),
            settings,
            gradient_checkpointing: self.gradient_checkpointing,
        })
    }
}

/// A tune with every default resolved: the picture as the tune sees it and the settings the
/// session will record.
#[derive(Debug, Clone)]
pub struct PreparedTune {
    pub image: RgbImage,
    pub settings: TuneSettings,
    gradient_checkpointing: bool,
}

impl PreparedTune {
    /// Tunes `sd`, which must have been loaded with the job's trainable tensors; afterwards its
    /// UNet holds the tuned weights, ready for edits. `on_step(step, loss)` follows every step
    /// (e.g. a JSON log or a loss curve).
    pub fn run(
        self,
        sd: &mut StableDiffusion,
        progress: &mut dyn Progress,
        on_step: &mut dyn FnMut(usize, f32) -> Result<()>,
    ) -> Result<Session> {
        sd.unet
            .set_gradient_checkpointing(self.gradient_checkpointing);
        let mut noise = Noise::seeded(self.settings.seed);
        tune(
            sd,
            &self.image,
            self.settings,
            &mut noise,
            progress,
            on_step,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A LoRA tune gets a rank and its own session code unless told otherwise; other tunes get
    /// neither, whatever rank a model recommends for its LoRA.
    #[test]
    fn a_lora_job_resolves_its_rank_and_code() {
        let lora = TuneJob {
            layers: TrainableLayers::Lora,
            ..TuneJob::default()
        };
        let s = lora.settings("t".into(), 1);
        assert_eq!(
            (s.lora_rank, s.delta_encoding),
            (Some(8), DeltaEncoding::Lora)
        );
        let s = TuneJob {
            lora_rank: Some(4),
            delta_encoding: Some(DeltaEncoding::F32),
            ..lora.clone()
        }
        .settings("t".into(), 1);
        assert_eq!(
            (s.lora_rank, s.delta_encoding),
            (Some(4), DeltaEncoding::F32)
        );
        let s = TuneJob {
            lora_rank: Some(4),
            ..TuneJob::default()
        }
        .settings("t".into(), 1);
        assert_eq!((s.lora_rank, s.delta_encoding), (None, DeltaEncoding::Q8));

        let q2 = TuneJob {
            delta_encoding: Some(DeltaEncoding::Q2),
            ..lora
        };
        assert!(q2
            .check()
            .unwrap_err()
            .to_string()
            .contains("delta-encoding"));
    }

    /// A tune stored in a coarse code is distilled into it: as many steps as the tune at a
    /// tenth of its lr under the generic prompts, unless told otherwise; other codes are not,
    /// and a bad distillation lr is refused whatever the code.
    #[test]
    fn a_coarse_job_resolves_its_distillation() {
        let q3 = TuneJob {
            steps: 300,
            learning_rate: 2e-4,
            delta_encoding: Some(DeltaEncoding::Q3),
            ..TuneJob::default()
        };
        let d = q3.settings("t".into(), 1).distillation.unwrap();
        assert_eq!(d.steps, 300);
        assert!(
            (d.learning_rate - 2e-5).abs() < 1e-12,
            "{}",
            d.learning_rate
        );
        assert_eq!(d.prompts, DEFAULT_PROMPTS.map(String::from));
        let told = TuneJob {
            distill_steps: Some(7),
            distill_learning_rate: Some(3e-6),
            distill_prompts: Some(vec!["a cat".into()]),
            distill_difference_weight: Some(15.0),
            ..q3.clone()
        };
        let d = told.settings("t".into(), 1).distillation.unwrap();
        assert_eq!(
            (d.steps, d.learning_rate, d.prompts, d.difference_weight),
            (7, 3e-6, vec!["a cat".into()], 15.0)
        );
        let q8 = TuneJob {
            delta_encoding: Some(DeltaEncoding::Q8),
            ..told.clone()
        };
        assert_eq!(q8.settings("t".into(), 1).distillation, None);
        for job in [q8, told] {
            let bad = TuneJob {
                distill_learning_rate: Some(f64::NAN),
                ..job
            };
            assert!(bad.check().unwrap_err().to_string().contains("distill-lr"));
        }
        let negative = TuneJob {
            distill_difference_weight: Some(-1.0),
            ..q3
        };
        let err = negative.check().unwrap_err().to_string();
        assert!(err.contains("distill-difference-weight"), "{err}");
    }
}
