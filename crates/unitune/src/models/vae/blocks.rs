//! The layers of the VAE's encoder and decoder, as diffusers builds them for `AutoencoderKL`:
//! `ResnetBlock2D` without a time embedding, `Downsample2D`/`Upsample2D` with a convolution, the
//! single-head self-attention of the mid block, and `UNetMidBlock2D` (resnet, attention, resnet).

use candle_core::{Module, Result, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};

use crate::models::conv::{self, Conv2d};
use crate::models::linear::{self, Linear};
use crate::models::norm::{self, GroupNorm};
use crate::models::ops;

/// diffusers builds every norm of the VAE with this epsilon.
pub(super) const EPS: f64 = 1e-6;

pub(super) fn conv2d(c_in: usize, c_out: usize, kernel: usize, vb: VarBuilder) -> Result<Conv2d> {
    let padding = kernel / 2;
    conv::conv2d(
        c_in,
        c_out,
        kernel,
        Conv2dConfig {
            padding,
            ..Default::default()
        },
        vb,
    )
}

/// `ResnetBlock2D` with `temb_channels=None` and `output_scale_factor=1`; its `act_fn` is SiLU, the
/// only one [`super::VaeConfig`] accepts.
#[derive(Debug, Clone)]
pub(super) struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    norm2: GroupNorm,
    conv2: Conv2d,
    /// A 1x1 convolution when the block changes the channel count.
    conv_shortcut: Option<Conv2d>,
}

impl ResnetBlock2D {
    pub fn new(c_in: usize, c_out: usize, groups: usize, vb: VarBuilder) -> Result<Self> {
        let conv_shortcut = if c_in != c_out {
            Some(conv2d(c_in, c_out, 1, vb.pp("conv_shortcut"))?)
        } else {
            None
        };
        Ok(Self {
            norm1: norm::group_norm(groups, c_in, EPS, vb.pp("norm1"))?,
            conv1: conv2d(c_in, c_out, 3, vb.pp("conv1"))?,
            norm2: norm::group_norm(groups, c_out, EPS, vb.pp("norm2"))?,
            conv2: conv2d(c_out, c_out, 3, vb.pp("conv2"))?,
            conv_shortcut,
        })
    }
}

impl Module for ResnetBlock2D {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        // [b, c_in, h, w] -> [b, c_out, h, w]
        let hs = self.conv1.forward(&self.norm1.forward_silu(xs)?)?;
        let hs = self.conv2.forward(&self.norm2.forward_silu(&hs)?)?;
        let shortcut = match &self.conv_shortcut {
            Some(conv) => conv.forward(xs)?,
            None => xs.clone(),
        };
        shortcut + hs
    }
}

/// The encoder's `Downsample2D(padding=0)`: zero-pad one row at the bottom and one column at the
/// right (not all around: the original LDM code did so and the weights were trained that way), then
/// a stride-2 3x3 convolution; `h` becomes `floor(h / 2)`.
#[derive(Debug, Clone)]
pub(super) struct Downsample2D {
    conv: Conv2d,
}

impl Downsample2D {
    pub fn new(channels: usize, vb: VarBuilder) -> Result<Self> {
        let cfg = Conv2dConfig {
            stride: 2,
            ..Default::default()
        };
        Ok(Self {
            conv: conv::conv2d(channels, channels, 3, cfg, vb.pp("conv"))?,
        })
    }
}

impl Module for Downsample2D {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        // [b, c, h, w] -> [b, c, h + 1, w + 1] -> [b, c, h / 2, w / 2]
        let padded = xs.pad_with_zeros(3, 0, 1)?.pad_with_zeros(2, 0, 1)?;
        self.conv.forward(&padded)
    }
}

/// `Upsample2D(use_conv=True)`: nearest-neighbour x2, then a 3x3 convolution.
#[derive(Debug, Clone)]
pub(super) struct Upsample2D {
    conv: Conv2d,
}

impl Upsample2D {
    pub fn new(channels: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            conv: conv2d(channels, channels, 3, vb.pp("conv"))?,
        })
    }
}

impl Module for Upsample2D {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = xs.dims4()?;
        self.conv.forward(&ops::upsample_nearest(xs, 2 * h, 2 * w)?) // [b, c, 2h, 2w]
    }
}

/// The mid block's `Attention`: group norm, one head as wide as the channels, a residual
/// connection (`rescale_output_factor` is 1 in the VAE).
///
/// Weights come under diffusers' current names (`to_q`, `to_k`, `to_v`, `to_out.0`) or, in old
/// SD 1.x conversions, `query`, `key`, `value`, `proj_attn`, which diffusers renames on load.
#[derive(Debug, Clone)]
pub(super) struct Attention {
    group_norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
}

impl Attention {
    pub fn new(channels: usize, groups: usize, vb: VarBuilder) -> Result<Self> {
        let old_names = !vb.contains_tensor("to_q.weight") && vb.contains_tensor("query.weight");
        let [q, k, v, out] = if old_names {
            ["query", "key", "value", "proj_attn"]
        } else {
            ["to_q", "to_k", "to_v", "to_out.0"]
        };
        let linear = |name: &str| linear::linear(channels, channels, vb.pp(name));
        Ok(Self {
            group_norm: norm::group_norm(groups, channels, EPS, vb.pp("group_norm"))?,
            to_q: linear(q)?,
            to_k: linear(k)?,
            to_v: linear(v)?,
            to_out: linear(out)?,
        })
    }
}

impl Module for Attention {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = xs.dims4()?;
        // [b, c, h, w] -> [b, h * w, c]
        let hs = self
            .group_norm
            .forward(xs)?
            .flatten_from(2)?
            .transpose(1, 2)?;
        // One head: [b, 1, h * w, c]
        let heads = |proj: &Linear| proj.forward(&hs)?.unsqueeze(1);
        let attn = ops::attention(
            &heads(&self.to_q)?,
            &heads(&self.to_k)?,
            &heads(&self.to_v)?,
            None,
        )?;
        let out = self.to_out.forward(&attn.squeeze(1)?)?; // [b, h * w, c]
        out.transpose(1, 2)?.reshape((b, c, h, w))? + xs
    }
}

/// `UNetMidBlock2D` with one layer: resnet, (attention,) resnet, all at the same width.
#[derive(Debug, Clone)]
pub(super) struct MidBlock {
    resnets: [ResnetBlock2D; 2],
    attention: Option<Attention>,
}

impl MidBlock {
    pub fn new(
        channels: usize,
        groups: usize,
        add_attention: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let resnet =
            |i: usize| ResnetBlock2D::new(channels, channels, groups, vb.pp("resnets").pp(i));
        let attention = if add_attention {
            Some(Attention::new(channels, groups, vb.pp("attentions.0"))?)
        } else {
            None
        };
        Ok(Self {
            resnets: [resnet(0)?, resnet(1)?],
            attention,
        })
    }
}

impl Module for MidBlock {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut hs = self.resnets[0].forward(xs)?;
        if let Some(attention) = &self.attention {
            hs = attention.forward(&hs)?;
        }
        self.resnets[1].forward(&hs)
    }
}
