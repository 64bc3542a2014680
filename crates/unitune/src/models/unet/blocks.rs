//! The UNet's stages: diffusers' `DownBlock2D` / `CrossAttnDownBlock2D`, `UNetMidBlock2DCrossAttn`
//! and `UpBlock2D` / `CrossAttnUpBlock2D`. A plain block is the cross-attention one without its
//! `attentions`, so each pair shares one type here.

use std::sync::Arc;

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::checkpoint::{checkpoint, CheckpointGrads};
use super::config::{DownBlockType, UNet2DConditionConfig, UpBlockType};
use super::resnet::{Downsample2D, ResnetBlock2D, ResnetSettings, Upsample2D};
use super::transformer::{Transformer2DModel, TransformerSettings};

fn resnet_settings(cfg: &UNet2DConditionConfig) -> ResnetSettings {
    ResnetSettings {
        temb_channels: cfg.time_embed_dim(),
        groups: cfg.norm_num_groups,
        eps: cfg.norm_eps,
        act: cfg.act_fn,
    }
}

/// The settings of the transformers at down-block level `level` (the mid block is the last level).
fn transformer_settings(cfg: &UNet2DConditionConfig, level: usize) -> TransformerSettings {
    TransformerSettings {
        heads: cfg.num_attention_heads[level],
        num_layers: cfg.transformer_layers_per_block[level],
        cross_attention_dim: cfg.cross_attention_dim,
        norm_num_groups: cfg.norm_num_groups,
        use_linear_projection: cfg.use_linear_projection,
    }
}

fn transformers(
    count: usize,
    channels: usize,
    s: TransformerSettings,
    vb: VarBuilder,
) -> Result<Vec<Transformer2DModel>> {
    (0..count)
        .map(|j| Transformer2DModel::new(channels, s, vb.pp(format!("attentions.{j}"))))
        .collect()
}

/// `resnet(xs, temb)`, checkpointed into `ckpt` when given.
fn run_resnet(
    resnet: &ResnetBlock2D,
    xs: &Tensor,
    temb: &Tensor,
    ckpt: Option<&CheckpointGrads>,
) -> Result<Tensor> {
    match ckpt {
        None => resnet.forward(xs, temb),
        Some(grads) => {
            let resnet = resnet.clone();
            let unit = Arc::new(move |xs: &Tensor, temb: &Tensor| resnet.forward(xs, temb));
            checkpoint(grads, unit, xs, temb)
        }
    }
}

/// `attention(xs, context)`, checkpointed into `ckpt` when given.
fn run_attention(
    attention: &Transformer2DModel,
    xs: &Tensor,
    context: &Tensor,
    ckpt: Option<&CheckpointGrads>,
) -> Result<Tensor> {
    match ckpt {
        None => attention.forward(xs, context),
        Some(grads) => {
            let attention = attention.clone();
            let unit =
                Arc::new(move |xs: &Tensor, context: &Tensor| attention.forward(xs, context));
            checkpoint(grads, unit, xs, context)
        }
    }
}

/// Down block `i`: resnets (each followed by a transformer in the cross-attention variant), then a
/// stride-2 downsampler except in the last block.
#[derive(Debug, Clone)]
pub struct DownBlock {
    resnets: Vec<ResnetBlock2D>,
    /// Empty for `DownBlock2D`.
    attentions: Vec<Transformer2DModel>,
    downsampler: Option<Downsample2D>,
}

impl DownBlock {
    pub fn new(cfg: &UNet2DConditionConfig, i: usize, vb: VarBuilder) -> Result<Self> {
        let channels = &cfg.block_out_channels;
        let out = channels[i];
        let layers = cfg.layers_per_block[i];
        let resnets = (0..layers)
            .map(|j| {
                let in_channels = if j > 0 {
                    out
                } else {
                    channels[i.saturating_sub(1)]
                };
                ResnetBlock2D::new(
                    in_channels,
                    out,
                    1.0,
                    resnet_settings(cfg),
                    vb.pp(format!("resnets.{j}")),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let attentions = match cfg.down_block_types[i] {
            DownBlockType::CrossAttnDownBlock2D => {
                transformers(layers, out, transformer_settings(cfg, i), vb.clone())?
            }
            DownBlockType::DownBlock2D => Vec::new(),
        };
        let downsampler = if i + 1 < channels.len() {
            Some(Downsample2D::new(
                out,
                cfg.downsample_padding,
                vb.pp("downsamplers.0"),
            )?)
        } else {
            None
        };
        Ok(Self {
            resnets,
            attentions,
            downsampler,
        })
    }

    /// `xs`: [b, c_in, h, w] -> the block's output and every intermediate state kept for the skip
    /// connections (one per resnet, plus the downsampled output). With `ckpt`, each resnet and
    /// transformer is checkpointed.
    pub fn forward(
        &self,
        xs: &Tensor,
        temb: &Tensor,
        context: &Tensor,
        ckpt: Option<&CheckpointGrads>,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let mut xs = xs.clone();
        let mut states = Vec::with_capacity(self.resnets.len() + 1);
        for (j, resnet) in self.resnets.iter().enumerate() {
            xs = run_resnet(resnet, &xs, temb, ckpt)?;
            if let Some(attention) = self.attentions.get(j) {
                xs = run_attention(attention, &xs, context, ckpt)?;
            }
            states.push(xs.clone());
        }
        if let Some(downsampler) = &self.downsampler {
            xs = downsampler.forward(&xs)?;
            states.push(xs.clone());
        }
        Ok((xs, states))
    }
}

/// `UNetMidBlock2DCrossAttn`: resnet, transformer, resnet at the lowest resolution.
#[derive(Debug, Clone)]
pub struct MidBlock {
    resnets: [ResnetBlock2D; 2],
    attention: Transformer2DModel,
}

impl MidBlock {
    pub fn new(cfg: &UNet2DConditionConfig, vb: VarBuilder) -> Result<Self> {
        let level = cfg.block_out_channels.len() - 1;
        let c = cfg.block_out_channels[level];
        let resnet = |j: usize| {
            ResnetBlock2D::new(
                c,
                c,
                cfg.mid_block_scale_factor,
                resnet_settings(cfg),
                vb.pp(format!("resnets.{j}")),
            )
        };
        let settings = transformer_settings(cfg, level);
        Ok(Self {
            resnets: [resnet(0)?, resnet(1)?],
            attention: Transformer2DModel::new(c, settings, vb.pp("attentions.0"))?,
        })
    }

    pub fn forward(
        &self,
        xs: &Tensor,
        temb: &Tensor,
        context: &Tensor,
        ckpt: Option<&CheckpointGrads>,
    ) -> Result<Tensor> {
        let xs = run_resnet(&self.resnets[0], xs, temb, ckpt)?;
        let xs = run_attention(&self.attention, &xs, context, ckpt)?;
        run_resnet(&self.resnets[1], &xs, temb, ckpt)
    }
}

/// Up block `i` (counted from the lowest resolution): each resnet takes the previous output
/// concatenated with one skip connection; an upsampler follows except in the last block.
#[derive(Debug, Clone)]
pub struct UpBlock {
    resnets: Vec<ResnetBlock2D>,
    /// Empty for `UpBlock2D`.
    attentions: Vec<Transformer2DModel>,
    upsampler: Option<Upsample2D>,
}

impl UpBlock {
    pub fn new(cfg: &UNet2DConditionConfig, i: usize, vb: VarBuilder) -> Result<Self> {
        let n = cfg.block_out_channels.len();
        // The down-block level this block mirrors, and the levels around it.
        let level = n - 1 - i;
        let out = cfg.block_out_channels[level];
        let prev_output = cfg.block_out_channels[(level + 1).min(n - 1)];
        let skip_in = cfg.block_out_channels[level.saturating_sub(1)];
        let layers = cfg.layers_per_block[level] + 1;
        let resnets = (0..layers)
            .map(|j| {
                let resnet_in = if j == 0 { prev_output } else { out };
                // The last resnet takes the skip from before the mirrored down block.
                let skip = if j + 1 == layers { skip_in } else { out };
                let vb = vb.pp(format!("resnets.{j}"));
                ResnetBlock2D::new(resnet_in + skip, out, 1.0, resnet_settings(cfg), vb)
            })
            .collect::<Result<Vec<_>>>()?;
        let attentions = match cfg.up_block_types[i] {
            UpBlockType::CrossAttnUpBlock2D => {
                transformers(layers, out, transformer_settings(cfg, level), vb.clone())?
            }
            UpBlockType::UpBlock2D => Vec::new(),
        };
        let upsampler = if i + 1 < n {
            Some(Upsample2D::new(out, vb.pp("upsamplers.0"))?)
        } else {
            None
        };
        Ok(Self {
            resnets,
            attentions,
            upsampler,
        })
    }

    /// How many skip connections the block consumes.
    pub fn num_skips(&self) -> usize {
        self.resnets.len()
    }

    /// `skips`: this block's skip connections in the order the down path made them (used from the
    /// last); `upsample_size`: the spatial size to upsample to, by default twice the input's. With
    /// `ckpt`, each resnet and transformer is checkpointed.
    pub fn forward(
        &self,
        xs: &Tensor,
        skips: &[Tensor],
        temb: &Tensor,
        context: &Tensor,
        upsample_size: Option<(usize, usize)>,
        ckpt: Option<&CheckpointGrads>,
    ) -> Result<Tensor> {
        let mut xs = xs.clone();
        for (j, (resnet, skip)) in self.resnets.iter().zip(skips.iter().rev()).enumerate() {
            xs = run_resnet(resnet, &Tensor::cat(&[&xs, skip], 1)?, temb, ckpt)?;
            if let Some(attention) = self.attentions.get(j) {
                xs = run_attention(attention, &xs, context, ckpt)?;
            }
        }
        match &self.upsampler {
            Some(upsampler) => upsampler.forward(&xs, upsample_size),
            None => Ok(xs),
        }
    }
}
