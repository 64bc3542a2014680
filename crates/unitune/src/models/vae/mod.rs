//! Stable Diffusion's VAE, diffusers' `AutoencoderKL`: images in `[-1, 1]` to a diagonal Gaussian
//! over latents 8x smaller (for SD), and latents back to images.
//!
//! Frozen in UniTune, but every op is differentiable all the same, so that losses in image space can
//! reach the latents through [`AutoencoderKl::decode`]. Tiled and sliced decoding are not provided.

mod blocks;
mod coders;
mod config;

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;

use self::coders::{Decoder, Encoder};
pub use self::config::VaeConfig;
use crate::models::conv::Conv2d;
use crate::noise::Noise;
use crate::weights::WeightStore;
use crate::Result;

/// The encoder's output: a Gaussian with diagonal covariance per latent element.
#[derive(Debug, Clone)]
pub struct DiagonalGaussian {
    /// `[b, latent_channels, h/f, w/f]`
    pub mean: Tensor,
    /// Log-variance clamped to `[-30, 20]` as diffusers does; same shape as `mean`.
    pub logvar: Tensor,
}

impl DiagonalGaussian {
    /// `[b, 2c, h, w]` (mean then log-variance along channels) -> the distribution.
    fn from_moments(moments: &Tensor) -> candle_core::Result<Self> {
        let c = moments.dim(1)? / 2;
        Ok(Self {
            mean: moments.narrow(1, 0, c)?,
            logvar: moments.narrow(1, c, c)?.clamp(-30f32, 20f32)?,
        })
    }

    pub fn std(&self) -> candle_core::Result<Tensor> {
        (&self.logvar * 0.5)?.exp()
    }

    /// `mean + std * n` with `n` standard normal from `noise`, in the dtype of `mean`.
    pub fn sample(&self, noise: &mut Noise) -> Result<Tensor> {
        let n = noise
            .randn(self.mean.shape(), self.mean.device())?
            .to_dtype(self.mean.dtype())?;
        Ok((&self.mean + self.std()?.mul(&n)?)?)
    }

    /// The most likely latents: the mean.
    pub fn mode(&self) -> Tensor {
        self.mean.clone()
    }
}

#[derive(Debug, Clone)]
pub struct AutoencoderKl {
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
    config: VaeConfig,
}

impl AutoencoderKl {
    /// Builds the network from `vb`, whose names are those of diffusers' safetensors files.
    pub fn new(vb: VarBuilder, cfg: &VaeConfig) -> candle_core::Result<Self> {
        let moments = 2 * cfg.latent_channels;
        let latents = cfg.latent_channels;
        let quant_conv = if cfg.use_quant_conv {
            Some(blocks::conv2d(moments, moments, 1, vb.pp("quant_conv"))?)
        } else {
            None
        };
        let post_quant_conv = if cfg.use_post_quant_conv {
            Some(blocks::conv2d(
                latents,
                latents,
                1,
                vb.pp("post_quant_conv"),
            )?)
        } else {
            None
        };
        Ok(Self {
            encoder: Encoder::new(cfg, vb.pp("encoder"))?,
            decoder: Decoder::new(cfg, vb.pp("decoder"))?,
            quant_conv,
            post_quant_conv,
            config: cfg.clone(),
        })
    }

    /// Reads `dir/config.json` and the weights in `dir` (see [`WeightStore::open`]), and checks that
    /// the weights hold nothing the config does not account for.
    pub fn load(
        dir: &Path,
        variant: Option<&str>,
        dtype: DType,
        device: &Device,
    ) -> Result<(Self, VaeConfig)> {
        let cfg = VaeConfig::from_file(&dir.join("config.json"))?;
        let vae = WeightStore::open(dir, variant, device)?
            .build(dtype, device, |vb| Self::new(vb, &cfg))?;
        Ok((vae, cfg))
    }

    /// `x`: `[b, in_channels, h, w]` in `[-1, 1]`; the latents are `[b, latent_channels, h/f, w/f]`
    /// with `f` = [`Self::scale_factor`] (each downsampling rounds down).
    pub fn encode(&self, x: &Tensor) -> Result<DiagonalGaussian> {
        let moments = self.encoder.forward(x)?; // [b, 2c, h/f, w/f]
        let moments = match &self.quant_conv {
            Some(conv) => conv.forward(&moments)?,
            None => moments,
        };
        Ok(DiagonalGaussian::from_moments(&moments)?)
    }

    /// `z`: unscaled latents `[b, latent_channels, h/f, w/f]` -> images `[b, out_channels, h, w]`,
    /// nominally in `[-1, 1]` (not clamped).
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let z = match &self.post_quant_conv {
            Some(conv) => conv.forward(z)?,
            None => z.clone(),
        };
        Ok(self.decoder.forward(&z)?)
    }

    /// How much smaller the latents are than the image (8 for SD).
    pub fn scale_factor(&self) -> usize {
        self.config.scale_factor()
    }

    pub fn config(&self) -> &VaeConfig {
        &self.config
    }
}

#[cfg(test)]
mod tests;
