//! unitune: text-driven editing of a single photo (UniTune) on Stable Diffusion, in Rust.
//!
//! Laid out like diffusers: [`models`] holds the networks (one file each), [`schedulers`] one file
//! per sampling algorithm, [`pipelines`] the stages that tie them together; [`weights`] opens
//! diffusers-layout folders and [`tokenizer`] is CLIP's BPE.

pub mod error;
pub mod image_io;
pub mod models;
pub mod noise;
pub mod pipelines;
pub mod schedulers;
pub mod tokenizer;
pub mod train;
pub mod weights;
pub mod world;

pub use error::{Error, Result};
