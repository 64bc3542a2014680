//! The lab of unitune: what makes and measures the built-in model, apart from the library users
//! edit with.
//!
//! - [`world`]: the procedural scene world (seeded scenes of shapes with captions and
//!   ground-truth edits) and its scoring.
//! - [`pretrain`]: training a small text-to-image model from scratch on it (`unitune pretrain`).
//! - [`bench_edits`]: edit quality on held-out scenes against ground truth, for UniTune, SDEdit
//!   and plain generation (`unitune bench-edits`).
//! - [`quality`]: a model's autoencoder round trip and caption-following on held-out scenes.
//! - [`speed`]: timing the UNet and a tune step on random weights (`unitune bench`).
//!
//! Every entry point takes a plain config struct; the `unitune` binary maps its flags onto them.

pub mod bench_edits;
pub mod pretrain;
pub mod quality;
pub mod speed;
pub mod world;
