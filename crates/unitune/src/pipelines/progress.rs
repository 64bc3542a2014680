//! How long-running work reports progress and learns that the user wants it to stop. The CLI
//! implements it with a progress bar and a Ctrl-C flag, the server with job events and a cancel
//! button; tests use [`NoProgress`].

use image::RgbImage;

pub trait Progress {
    /// A new phase of `total` steps begins (e.g. "denoising").
    fn start(&mut self, label: &str, total: usize);
    /// One step of the current phase is done; `message` carries extra state (e.g. the loss).
    fn step(&mut self, message: Option<&str>);
    /// The current phase is over.
    fn finish(&mut self);
    /// Something the user should know that is not an error (a truncated prompt, a fallback).
    fn warn(&mut self, text: &str);
    /// True once the user asked to stop; loops check it between steps.
    fn cancelled(&self) -> bool {
        false
    }
    /// Every how many denoising steps the caller wants to see the picture the model predicts
    /// so far ([`Progress::preview`]); `None` (the default) costs nothing.
    fn preview_every(&self) -> Option<usize> {
        None
    }
    /// The clean picture the model predicts after denoising step `step` (from 0), decoded.
    fn preview(&mut self, _step: usize, _image: &RgbImage) {}
}

/// Reports nothing and never cancels.
pub struct NoProgress;

impl Progress for NoProgress {
    fn start(&mut self, _: &str, _: usize) {}
    fn step(&mut self, _: Option<&str>) {}
    fn finish(&mut self) {}
    fn warn(&mut self, _: &str) {}
}
