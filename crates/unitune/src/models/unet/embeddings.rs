//! The timestep embedding: diffusers' `Timesteps` (fixed sinusoids) followed by
//! `TimestepEmbedding` (two linear layers), giving the vector every resnet is conditioned on.

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::VarBuilder;

use crate::models::activations::Activation;
use crate::models::linear::{self, Linear};

/// The period of the slowest sinusoid, as in DDPM.
const MAX_PERIOD: f64 = 10_000.0;

/// Sinusoidal embedding of `timesteps` ([b], any float dtype, may be fractional) to `[b, dim]` f32,
/// as diffusers' `get_timestep_embedding`: frequencies `exp(-ln(10000) i / (dim/2 - shift))`,
/// `[sin | cos]` or, with `flip_sin_to_cos`, `[cos | sin]`; an odd `dim` gets a zero last column.
pub fn timestep_embedding(
    timesteps: &Tensor,
    dim: usize,
    flip_sin_to_cos: bool,
    freq_shift: f64,
) -> Result<Tensor> {
    let half = dim / 2;
    // Computed in f32 step by step, as torch does, so the phases of large timesteps agree.
    let scale = -(MAX_PERIOD.ln()) as f32;
    let denominator = (half as f64 - freq_shift) as f32;
    let freqs: Vec<f32> = (0..half)
        .map(|i| (scale * i as f32 / denominator).exp())
        .collect();
    let freqs = Tensor::from_vec(freqs, (1, half), timesteps.device())?;
    let args = timesteps
        .to_dtype(DType::F32)?
        .unsqueeze(1)?
        .broadcast_mul(&freqs)?; // [b, half]
    let (sin, cos) = (args.sin()?, args.cos()?);
    let emb = if flip_sin_to_cos {
        Tensor::cat(&[cos, sin], D::Minus1)?
    } else {
        Tensor::cat(&[sin, cos], D::Minus1)?
    };
    if dim % 2 == 1 {
        emb.pad_with_zeros(D::Minus1, 0, 1)
    } else {
        Ok(emb)
    }
}

/// diffusers' `TimestepEmbedding`: `linear_2(act(linear_1(x)))`.
#[derive(Debug, Clone)]
pub struct TimestepEmbedding {
    linear_1: Linear,
    linear_2: Linear,
    act: Activation,
}

impl TimestepEmbedding {
    pub fn new(
        in_channels: usize,
        time_embed_dim: usize,
        act: Activation,
        vb: VarBuilder,
    ) -> Result<Self> {
        Ok(Self {
            linear_1: linear::linear(in_channels, time_embed_dim, vb.pp("linear_1"))?,
            linear_2: linear::linear(time_embed_dim, time_embed_dim, vb.pp("linear_2"))?,
            act,
        })
    }
}

impl Module for TimestepEmbedding {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.linear_2
            .forward(&self.act.forward(&self.linear_1.forward(xs)?)?)
    }
}
