//! The convolutional pieces of the UNet: diffusers' `ResnetBlock2D` (with the time embedding added
//! between its two convolutions), `Downsample2D` (strided convolution) and `Upsample2D` (nearest
//! upsampling then convolution).

use candle_core::{Module, Result, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};

use crate::models::activations::Activation;
use crate::models::conv::{self, Conv2d};
use crate::models::linear::{self, Linear};
use crate::models::norm::{self, GroupNorm};
use crate::models::ops;

/// A 3x3 convolution keeping the spatial size.
fn conv3x3(in_channels: usize, out_channels: usize, vb: VarBuilder) -> Result<Conv2d> {
    let cfg = Conv2dConfig {
        padding: 1,
        ..Default::default()
    };
    conv::conv2d(in_channels, out_channels, 3, cfg, vb)
}

/// Settings shared by every resnet of the UNet.
#[derive(Debug, Clone, Copy)]
pub struct ResnetSettings {
    pub temb_channels: usize,
    pub groups: usize,
    pub eps: f64,
    pub act: Activation,
}

/// diffusers' `ResnetBlock2D` with `time_embedding_norm="default"`.
#[derive(Debug, Clone)]
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Linear,
    norm2: GroupNorm,
    conv2: Conv2d,
    /// 1x1 convolution on the skip path when the channel count changes.
    conv_shortcut: Option<Conv2d>,
    act: Activation,
    output_scale_factor: f64,
}

impl ResnetBlock2D {
    pub fn new(
        in_channels: usize,
        out_channels: usize,
        output_scale_factor: f64,
        s: ResnetSettings,
        vb: VarBuilder,
    ) -> Result<Self> {
        let conv_shortcut = if in_channels != out_channels {
            Some(conv::conv2d(
                in_channels,
                out_channels,
                1,
                Default::default(),
                vb.pp("conv_shortcut"),
            )?)
        } else {
            None
        };
        Ok(Self {
            norm1: norm::group_norm(s.groups, in_channels, s.eps, vb.pp("norm1"))?,
            conv1: conv3x3(in_channels, out_channels, vb.pp("conv1"))?,
            time_emb_proj: linear::linear(s.temb_channels, out_channels, vb.pp("time_emb_proj"))?,
            norm2: norm::group_norm(s.groups, out_channels, s.eps, vb.pp("norm2"))?,
            conv2: conv3x3(out_channels, out_channels, vb.pp("conv2"))?,
            conv_shortcut,
            act: s.act,
            output_scale_factor,
        })
    }

    /// `xs`: [b, c_in, h, w], `temb`: [b, temb_channels] -> [b, c_out, h, w].
    pub fn forward(&self, xs: &Tensor, temb: &Tensor) -> Result<Tensor> {
        // [b, c_out], added as `temb[:, :, None, None]`: folded into conv1's bias.
        let temb = self.time_emb_proj.forward(&self.act.forward(temb)?)?;
        let hs = self
            .conv1
            .forward_with_added_bias(&self.norm1.forward_act(xs, self.act)?, &temb)?;
        let hs = self
            .conv2
            .forward(&self.norm2.forward_act(&hs, self.act)?)?;
        let skip = match &self.conv_shortcut {
            Some(conv) => conv.forward(xs)?,
            None => xs.clone(),
        };
        let out = (skip + hs)?;
        if self.output_scale_factor == 1.0 {
            Ok(out)
        } else {
            out / self.output_scale_factor
        }
    }
}

/// diffusers' `Downsample2D` with a convolution: halves the size with a stride-2 3x3 convolution.
#[derive(Debug, Clone)]
pub struct Downsample2D {
    conv: Conv2d,
    /// `downsample_padding = 0` pads one zero column/row on the right/bottom only, as diffusers.
    pad_end: bool,
}

impl Downsample2D {
    pub fn new(channels: usize, padding: usize, vb: VarBuilder) -> Result<Self> {
        let cfg = Conv2dConfig {
            padding,
            stride: 2,
            ..Default::default()
        };
        Ok(Self {
            conv: conv::conv2d(channels, channels, 3, cfg, vb.pp("conv"))?,
            pad_end: padding == 0,
        })
    }
}

impl Module for Downsample2D {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let xs = if self.pad_end {
            xs.pad_with_zeros(2, 0, 1)?.pad_with_zeros(3, 0, 1)?
        } else {
            xs.clone()
        };
        // candle 0.11's conv2d backward derives the output padding of both sides from the height,
        // so the input gradient gets the wrong width when height and width differ in parity (e.g.
        // a 16x17 latent). A trailing zero on an odd side changes nothing in the output (the last
        // stride-2 window ends before it) and makes both sides even.
        let (_, _, h, w) = xs.dims4()?;
        self.conv.forward(
            &xs.pad_with_zeros(2, 0, h % 2)?
                .pad_with_zeros(3, 0, w % 2)?,
        )
    }
}

/// diffusers' `Upsample2D` with a convolution: nearest upsampling, then a 3x3 convolution.
#[derive(Debug, Clone)]
pub struct Upsample2D {
    conv: Conv2d,
}

impl Upsample2D {
    pub fn new(channels: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            conv: conv3x3(channels, channels, vb.pp("conv"))?,
        })
    }

    /// `[b, c, h, w]` -> `[b, c, out_h, out_w]`; `size` is `(out_h, out_w)`, twice the input's by
    /// default (diffusers passes the skip connection's size when the latent is not divisible).
    pub fn forward(&self, xs: &Tensor, size: Option<(usize, usize)>) -> Result<Tensor> {
        let (_, _, h, w) = xs.dims4()?;
        let (out_h, out_w) = size.unwrap_or((2 * h, 2 * w));
        self.conv.forward(&ops::upsample_nearest(xs, out_h, out_w)?)
    }
}
