//! The networks of a Stable Diffusion pipeline, each in its own file, each built from a `Config`
//! read from the component's `config.json` and a `VarBuilder` whose names match the safetensors keys.
//!
//! Everything here must stay differentiable: candle's fused `softmax_last_dim` and `LayerNorm`
//! have no backward, so the networks use the ops in [`ops`] and the layers in [`norm`] instead.

pub mod activations;
pub mod clip;
pub mod conv;
pub mod linear;
pub mod norm;
pub mod ops;
pub mod unet;
pub mod vae;
