//! diffusers' VAE `Encoder` (image -> mean and log-variance) and `Decoder` (latents -> image).

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::blocks::{conv2d, Downsample2D, MidBlock, ResnetBlock2D, Upsample2D, EPS};
use super::VaeConfig;
use crate::models::conv::Conv2d;
use crate::models::norm::{self, GroupNorm};

/// `DownEncoderBlock2D` (resampler `Downsample2D`) or `UpDecoderBlock2D` (`Upsample2D`): resnets,
/// then the resampler on every block but the last.
#[derive(Debug, Clone)]
struct Block<S> {
    resnets: Vec<ResnetBlock2D>,
    resampler: Option<S>,
}

/// A block's `n` resnets: the first changes the width from `c_in` to `c_out`.
fn resnets(
    n: usize,
    c_in: usize,
    c_out: usize,
    groups: usize,
    vb: &VarBuilder,
) -> Result<Vec<ResnetBlock2D>> {
    (0..n)
        .map(|j| {
            ResnetBlock2D::new(
                if j == 0 { c_in } else { c_out },
                c_out,
                groups,
                vb.pp("resnets").pp(j),
            )
        })
        .collect()
}

impl<S: Module> Module for Block<S> {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut hs = xs.clone();
        for resnet in &self.resnets {
            hs = resnet.forward(&hs)?;
        }
        match &self.resampler {
            Some(resampler) => resampler.forward(&hs),
            None => Ok(hs),
        }
    }
}

/// The output head shared by both halves: group norm, SiLU, 3x3 convolution.
#[derive(Debug, Clone)]
struct Head {
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Head {
    fn new(c_in: usize, c_out: usize, groups: usize, vb: &VarBuilder) -> Result<Self> {
        Ok(Self {
            conv_norm_out: norm::group_norm(groups, c_in, EPS, vb.pp("conv_norm_out"))?,
            conv_out: conv2d(c_in, c_out, 3, vb.pp("conv_out"))?,
        })
    }
}

impl Module for Head {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.conv_out.forward(&self.conv_norm_out.forward_silu(xs)?)
    }
}

/// `Encoder` with `double_z=True`: `[b, in_channels, h, w]` -> `[b, 2 * latent_channels, h/f, w/f]`.
#[derive(Debug, Clone)]
pub(super) struct Encoder {
    conv_in: Conv2d,
    down_blocks: Vec<Block<Downsample2D>>,
    mid_block: MidBlock,
    head: Head,
}

impl Encoder {
    pub fn new(cfg: &VaeConfig, vb: VarBuilder) -> Result<Self> {
        let channels = &cfg.block_out_channels;
        let groups = cfg.norm_num_groups;
        let last = channels.len() - 1;
        let mut down_blocks = Vec::with_capacity(channels.len());
        for (i, &c_out) in channels.iter().enumerate() {
            let vb = vb.pp("down_blocks").pp(i);
            let c_in = if i == 0 { c_out } else { channels[i - 1] };
            let resnets = resnets(cfg.layers_per_block, c_in, c_out, groups, &vb)?;
            let resampler = if i < last {
                Some(Downsample2D::new(c_out, vb.pp("downsamplers.0"))?)
            } else {
                None
            };
            down_blocks.push(Block { resnets, resampler });
        }
        Ok(Self {
            conv_in: conv2d(cfg.in_channels, channels[0], 3, vb.pp("conv_in"))?,
            down_blocks,
            mid_block: MidBlock::new(
                channels[last],
                groups,
                cfg.mid_block_add_attention,
                vb.pp("mid_block"),
            )?,
            head: Head::new(channels[last], 2 * cfg.latent_channels, groups, &vb)?,
        })
    }
}

impl Module for Encoder {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut hs = self.conv_in.forward(xs)?;
        for block in &self.down_blocks {
            hs = block.forward(&hs)?;
        }
        self.head.forward(&self.mid_block.forward(&hs)?)
    }
}

/// `Decoder`: `[b, latent_channels, h/f, w/f]` -> `[b, out_channels, h, w]`. Its blocks run from the
/// widest channel count down, each with one resnet more than the encoder's.
#[derive(Debug, Clone)]
pub(super) struct Decoder {
    conv_in: Conv2d,
    mid_block: MidBlock,
    up_blocks: Vec<Block<Upsample2D>>,
    head: Head,
}

impl Decoder {
    pub fn new(cfg: &VaeConfig, vb: VarBuilder) -> Result<Self> {
        let reversed: Vec<usize> = cfg.block_out_channels.iter().rev().copied().collect();
        let groups = cfg.norm_num_groups;
        let last = reversed.len() - 1;
        let mut up_blocks = Vec::with_capacity(reversed.len());
        for (i, &c_out) in reversed.iter().enumerate() {
            let vb = vb.pp("up_blocks").pp(i);
            let c_in = if i == 0 { c_out } else { reversed[i - 1] };
            let resnets = resnets(cfg.layers_per_block + 1, c_in, c_out, groups, &vb)?;
            let resampler = if i < last {
                Some(Upsample2D::new(c_out, vb.pp("upsamplers.0"))?)
            } else {
                None
            };
            up_blocks.push(Block { resnets, resampler });
        }
        Ok(Self {
            conv_in: conv2d(cfg.latent_channels, reversed[0], 3, vb.pp("conv_in"))?,
            mid_block: MidBlock::new(
                reversed[0],
                groups,
                cfg.mid_block_add_attention,
                vb.pp("mid_block"),
            )?,
            up_blocks,
            head: Head::new(reversed[last], cfg.out_channels, groups, &vb)?,
        })
    }
}

impl Module for Decoder {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut hs = self.mid_block.forward(&self.conv_in.forward(xs)?)?;
        for block in &self.up_blocks {
            hs = block.forward(&hs)?;
        }
        self.head.forward(&hs)
    }
}
