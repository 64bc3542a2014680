//! unitune: text-driven editing of a single photo (UniTune) on Stable Diffusion, in Rust.
//!
//! Laid out like diffusers: [`models`] holds the networks (one file each), [`schedulers`] one file
//! per sampling algorithm, [`pipelines`] the stages that tie them together (txt2img, img2img,
//! UniTune's edit), [`train`] the tuning stage. [`weights`] opens and writes diffusers-layout
//! folders, [`tokenizer`] is CLIP's BPE, and a [`session`] (what a tune changed, plus its picture)
//! is the contract between tuning and editing. [`jobs`] is what front ends call: tune an image,
//! run a batch of edits on a session, with the defaults, progress and cancellation in one place.

pub mod atomic;
pub mod error;
pub mod image_io;
pub mod jobs;
pub mod models;
pub mod noise;
pub mod pipelines;
pub mod schedulers;
pub mod session;
pub mod tokenizer;
pub mod train;
pub mod weights;

pub use error::{Error, Result};
