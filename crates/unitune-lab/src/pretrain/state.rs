//! `training_state.json`: where a pretraining run stands (phase, steps done, the settings it was
//! started with, the measured latent scale) and its loss curves, written with every checkpoint so
//! that `--resume` can continue from it.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::PretrainSettings;
use unitune::error::read_json;
use unitune::{Error, Result};

pub const STATE_FILE: &str = "training_state.json";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Training the autoencoder.
    Vae,
    /// Training the text encoder and UNet on the frozen autoencoder's latents.
    Denoiser,
    /// Both phases reached their step counts.
    Done,
}

/// Means of a loss over consecutive windows of `every` steps (the file stays small).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LossLog {
    pub every: usize,
    pub means: Vec<f32>,
    /// The window in progress: sum and count.
    pub pending: (f64, usize),
}

impl LossLog {
    /// Windows of 10 steps, as every curve of a run.
    pub fn default_window() -> Self {
        Self::new(10)
    }

    pub fn new(every: usize) -> Self {
        Self {
            every: every.max(1),
            means: Vec::new(),
            pending: (0.0, 0),
        }
    }

    pub fn push(&mut self, value: f32) {
        self.pending.0 += value as f64;
        self.pending.1 += 1;
        if self.pending.1 == self.every {
            self.means.push((self.pending.0 / self.every as f64) as f32);
            self.pending = (0.0, 0);
        }
    }

    /// The mean of the last `windows` complete windows (NaN when there are none).
    pub fn recent(&self, windows: usize) -> f32 {
        let tail = &self.means[self.means.len().saturating_sub(windows)..];
        tail.iter().sum::<f32>() / tail.len() as f32
    }

    /// The mean of the last `windows` complete windows, or of the window in progress when none
    /// is complete (NaN when nothing was logged).
    pub fn latest(&self, windows: usize) -> f32 {
        match self.means.is_empty() {
            true => (self.pending.0 / self.pending.1 as f64) as f32,
            false => self.recent(windows),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingState {
    pub phase: Phase,
    /// Autoencoder steps done.
    pub vae_step: usize,
    /// Text encoder + UNet steps done.
    pub step: usize,
    /// Decoder refinement steps done.
    #[serde(default)]
    pub decoder_step: usize,
    pub settings: PretrainSettings,
    /// `world` or the data folder.
    pub data: String,
    /// The autoencoder's `scaling_factor`: 1 / std of its latents, measured when its phase ended.
    pub scaling_factor: Option<f64>,
    /// Mean of the latents (before scaling), measured with the scaling factor.
    pub latent_mean: Option<f64>,
    /// Autoencoder loss (L1 + weighted KL), its L1 part and its KL per sample.
    pub vae_loss: LossLog,
    pub vae_l1: LossLog,
    pub vae_kl: LossLog,
    /// Denoising loss (min-SNR weighted MSE of the predicted noise).
    pub loss: LossLog,
    /// Decoder refinement loss (MSE + L1 per value).
    #[serde(default = "LossLog::default_window")]
    pub decoder_loss: LossLog,
    /// Wall time spent in each phase, over all runs.
    pub vae_seconds: f64,
    pub seconds: f64,
    #[serde(default)]
    pub decoder_seconds: f64,
}

impl TrainingState {
    pub fn new(settings: PretrainSettings, data: String) -> Self {
        Self {
            phase: Phase::Vae,
            vae_step: 0,
            step: 0,
            decoder_step: 0,
            settings,
            data,
            scaling_factor: None,
            latent_mean: None,
            vae_loss: LossLog::new(10),
            vae_l1: LossLog::new(10),
            vae_kl: LossLog::new(10),
            loss: LossLog::new(10),
            decoder_loss: LossLog::default_window(),
            vae_seconds: 0.0,
            seconds: 0.0,
            decoder_seconds: 0.0,
        }
    }

    /// Reads `dir/training_state.json`.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(STATE_FILE);
        if !path.is_file() {
            return Err(Error::argument(
                "resume",
                format!(
                    "{} has no {STATE_FILE}: it is not a pretraining folder",
                    dir.display()
                ),
            ));
        }
        read_json(&path)
    }

    pub fn write(&self, dir: &Path) -> Result<()> {
        let path = dir.join(STATE_FILE);
        let text = serde_json::to_string_pretty(self).expect("state serializes") + "\n";
        std::fs::write(&path, text).map_err(|e| Error::io(&path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loss_log_keeps_window_means_and_the_partial_window() {
        let mut log = LossLog::new(2);
        for v in [1.0, 3.0, 5.0] {
            log.push(v);
        }
        assert_eq!(log.means, vec![2.0]);
        assert_eq!(log.pending, (5.0, 1));
        log.push(7.0);
        assert_eq!(log.means, vec![2.0, 6.0]);
        assert_eq!(log.recent(1), 6.0);
        assert_eq!(log.recent(5), 4.0);
        assert!(LossLog::new(3).recent(1).is_nan());
        let mut short = LossLog::new(3);
        short.push(2.0);
        assert_eq!(short.latest(5), 2.0);
    }
}
