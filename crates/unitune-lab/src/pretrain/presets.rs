//! The built-in model's networks ([`Preset`]: their sizes) and the noise schedule it is trained
//! and sampled with.

use std::str::FromStr;

use serde::{Deserialize, Serialize};

use unitune::models::activations::Activation;
use unitune::models::clip::ClipTextConfig;
use unitune::models::unet::{DownBlockType, UNet2DConditionConfig, UpBlockType};
use unitune::models::vae::VaeConfig;
use unitune::schedulers::{BetaSchedule, PredictionType, SchedulerConfig, TimestepSpacing};
use unitune::{Error, Result};

/// Network sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Preset {
    /// For tests: a 2x autoencoder (8/16 channels), a two-level UNet (16/32), a one-layer
    /// 16-wide text encoder.
    Tiny,
    /// The built-in model: a 4x autoencoder (16/32/64 channels, 0.65 M weights), a three-level
    /// UNet (32/64/128 channels, cross-attention on the two coarser levels and the mid block,
    /// 4.1 M), a two-layer 64-wide text encoder (0.15 M). Sized for a CPU.
    Small,
    /// The `small` autoencoder with a wider UNet (48/96/192 channels) that cross-attends on
    /// every level, the finest included, where an object is a few latents wide and its shape is
    /// drawn, and a three-layer 128-wide text encoder: about 2x the `small` preset's compute.
    Medium,
}

impl FromStr for Preset {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "tiny" => Ok(Preset::Tiny),
            "small" => Ok(Preset::Small),
            "medium" => Ok(Preset::Medium),
            _ => Err(Error::argument(
                "preset",
                format!("`{s}` is not one of: tiny, small, medium"),
            )),
        }
    }
}

/// The three networks' configs.
#[derive(Debug, Clone, PartialEq)]
pub struct Architecture {
    pub vae: VaeConfig,
    pub text_encoder: ClipTextConfig,
    pub unet: UNet2DConditionConfig,
}

/// A preset's free parameters.
struct Sizes {
    vae_channels: Vec<usize>,
    vae_groups: usize,
    /// Hidden size, MLP size, layers, heads.
    text: (usize, usize, usize, usize),
    unet_channels: Vec<usize>,
    /// Cross-attention per UNet level, finest first (the up path mirrors it).
    unet_attention: Vec<bool>,
    unet_heads: usize,
    unet_groups: usize,
}

impl Preset {
    fn sizes(self) -> Sizes {
        match self {
            Preset::Tiny => Sizes {
                vae_channels: vec![8, 16],
                vae_groups: 8,
                text: (16, 32, 1, 2),
                unet_channels: vec![16, 32],
                unet_attention: vec![true, false],
                unet_heads: 2,
                unet_groups: 8,
            },
            Preset::Small => Sizes {
                vae_channels: vec![16, 32, 64],
                vae_groups: 8,
                text: (64, 256, 2, 4),
                unet_channels: vec![32, 64, 128],
                unet_attention: vec![false, true, true],
                unet_heads: 4,
                unet_groups: 16,
            },
            Preset::Medium => Sizes {
                vae_channels: vec![16, 32, 64],
                vae_groups: 8,
                text: (128, 512, 3, 4),
                unet_channels: vec![48, 96, 192],
                unet_attention: vec![true, true, true],
                unet_heads: 4,
                unet_groups: 16,
            },
        }
    }

    /// The networks for `size`x`size` pictures and a tokenizer of `vocab_size` tokens and
    /// `max_length` positions. The autoencoder's `scaling_factor` is 1 until measured; it has no
    /// mid-block attention, so that it works the same on training crops and whole pictures.
    pub fn architecture(
        self,
        size: usize,
        vocab_size: usize,
        max_length: usize,
    ) -> Result<Architecture> {
        let p = self.sizes();
        let levels = p.unet_channels.len();
        let vae = VaeConfig {
            down_block_types: vec!["DownEncoderBlock2D".into(); p.vae_channels.len()],
            up_block_types: vec!["UpDecoderBlock2D".into(); p.vae_channels.len()],
            block_out_channels: p.vae_channels,
            layers_per_block: 1,
            norm_num_groups: p.vae_groups,
            sample_size: size,
            scaling_factor: 1.0,
            mid_block_add_attention: false,
            ..VaeConfig::default()
        };
        let f = vae.scale_factor();
        let multiple = f << (levels - 1);
        if size == 0 || !size.is_multiple_of(multiple) {
            return Err(Error::argument(
                "size",
                format!("{size} is not a positive multiple of {multiple} for preset {self:?}"),
            ));
        }
        let (hidden_size, intermediate_size, num_hidden_layers, num_attention_heads) = p.text;
        let text_encoder = ClipTextConfig {
            vocab_size,
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            max_position_embeddings: max_length,
            hidden_act: Activation::QuickGelu,
            layer_norm_eps: 1e-5,
        };
        let down = p.unet_attention.iter().map(|&a| {
            if a {
                DownBlockType::CrossAttnDownBlock2D
            } else {
                DownBlockType::DownBlock2D
            }
        });
        let up = p.unet_attention.iter().rev().map(|&a| {
            if a {
                UpBlockType::CrossAttnUpBlock2D
            } else {
                UpBlockType::UpBlock2D
            }
        });
        let unet = UNet2DConditionConfig {
            sample_size: Some(size / f),
            in_channels: vae.latent_channels,
            out_channels: vae.latent_channels,
            center_input_sample: false,
            flip_sin_to_cos: true,
            freq_shift: 0.0,
            down_block_types: down.collect(),
            up_block_types: up.collect(),
            block_out_channels: p.unet_channels,
            layers_per_block: vec![1; levels],
            num_attention_heads: vec![p.unet_heads; levels],
            transformer_layers_per_block: vec![1; levels],
            cross_attention_dim: hidden_size,
            use_linear_projection: false,
            upcast_attention: false,
            downsample_padding: 1,
            mid_block_scale_factor: 1.0,
            act_fn: Activation::Silu,
            norm_num_groups: p.unet_groups,
            norm_eps: 1e-5,
        };
        Ok(Architecture {
            vae,
            text_encoder,
            unet,
        })
    }
}

/// The noise schedule the model is trained with and sampled by: Stable Diffusion's scaled-linear
/// betas with epsilon prediction (as SD 1.x), as a DDIM config.
pub fn scheduler_config() -> SchedulerConfig {
    SchedulerConfig {
        class_name: Some("DDIMScheduler".into()),
        num_train_timesteps: 1000,
        beta_start: 0.00085,
        beta_end: 0.012,
        beta_schedule: BetaSchedule::ScaledLinear,
        prediction_type: PredictionType::Epsilon,
        timestep_spacing: Some(TimestepSpacing::Leading),
        steps_offset: 1,
        clip_sample: false,
        set_alpha_to_one: false,
        ..SchedulerConfig::default()
    }
}
