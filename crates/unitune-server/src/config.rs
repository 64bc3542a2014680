//! What `unitune serve` is started with, and the limits every request is held to.

use std::net::SocketAddr;
use std::path::PathBuf;

use candle_core::{DType, Device};
use unitune::weights::single_file::SingleFileOptions;

/// The server's settings. [`ServeConfig::check`] refuses a setting that would expose the
/// server without a token.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// The model every session is tuned on: a diffusers-layout folder or a single-file checkpoint.
    pub model: PathBuf,
    /// How to read `model` when it is a single file.
    pub single_file: SingleFileOptions,
    /// The model's name on the page.
    pub model_name: String,
    pub listen: SocketAddr,
    /// Where sessions, edits and their settings are kept.
    pub data: PathBuf,
    /// Bearer token every API request must carry (header or login cookie); required off loopback.
    pub token: Option<String>,
    pub device: Device,
    pub dtype: DType,
    pub limits: Limits,
    /// A NATS server (`nats://host:port`): jobs go to JetStream for `unitune worker`s, and
    /// sessions and edits are kept there instead of under `data`. `None`: this process runs its
    /// jobs itself.
    pub nats: Option<String>,
}

/// What a worker runs jobs with.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// The model every session is tuned on: a diffusers-layout folder or a single-file checkpoint.
    pub model: PathBuf,
    /// How to read `model` when it is a single file.
    pub single_file: SingleFileOptions,
    pub device: Device,
    pub dtype: DType,
    pub limits: Limits,
}

/// Bounds on what one request may ask for, checked before any work.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Limits {
    /// Bytes of an uploaded photo.
    pub max_upload_bytes: usize,
    /// Pixels of an uploaded photo, read from its header before decoding.
    pub max_pixels: u64,
    /// Bytes of a JSON request body (an edit with a painted mask).
    pub max_body_bytes: usize,
    /// Characters of one prompt.
    pub max_prompt_chars: usize,
    /// Edits one edit job may make (prompts x seeds x guidance x start).
    pub max_edits_per_job: usize,
    /// Denoising or tuning steps one job may ask for.
    pub max_steps: usize,
    /// Jobs waiting in the queue; a full queue answers 429 with Retry-After.
    pub queue_capacity: usize,
    /// Tuned sessions kept loaded, so that their edits start at once.
    pub loaded_sessions: usize,
    /// A preview of the denoising every this many steps.
    pub preview_every: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_upload_bytes: 25 << 20,
            max_pixels: 50_000_000,
            max_body_bytes: 8 << 20,
            max_prompt_chars: 1000,
            max_edits_per_job: 64,
            max_steps: 1000,
            queue_capacity: 16,
            loaded_sessions: 3,
            preview_every: 5,
        }
    }
}

impl ServeConfig {
    pub fn worker(&self) -> WorkerConfig {
        WorkerConfig {
            model: self.model.clone(),
            single_file: self.single_file.clone(),
            device: self.device.clone(),
            dtype: self.dtype,
            limits: self.limits.clone(),
        }
    }

    /// Refuses to listen beyond this machine without a token: anyone who reaches the port could
    /// otherwise use the GPU and read every photo.
    pub fn check(&self) -> Result<(), String> {
        if !self.listen.ip().is_loopback() && self.token.is_none() {
            return Err(format!(
                "--listen {}: listening beyond this machine needs --token (every API request must then carry it)",
                self.listen
            ));
        }
        if self.token.as_deref().is_some_and(|t| t.len() < 8) {
            return Err("--token: use at least 8 characters".into());
        }
        Ok(())
    }
}
