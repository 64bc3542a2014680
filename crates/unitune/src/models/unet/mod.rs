//! The denoiser of Stable Diffusion 1.x / 2.x: diffusers' `UNet2DConditionModel`, predicting the
//! noise (or velocity) of a latent at a timestep, conditioned on text embeddings.
//!
//! Weight names, block layout and numerics follow diffusers 0.42.1, so a `unet/` folder of any
//! SD 1.x / 2.x pipeline loads as is ([`config`] says what is refused). The network is plain
//! candle ops with a backward, so building it from a [`WeightStore`] with a trainable filter makes
//! it fine-tunable; [`checkpoint`] trades compute for training memory.

pub mod blocks;
pub mod checkpoint;
pub mod config;
pub mod embeddings;
pub mod resnet;
pub mod transformer;

#[cfg(test)]
mod tests;

use std::path::Path;

use candle_core::{bail, DType, Device, Module, Result, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};

pub use checkpoint::CheckpointGrads;
pub use config::{DownBlockType, UNet2DConditionConfig, UpBlockType};

use self::blocks::{DownBlock, MidBlock, UpBlock};
use self::embeddings::{timestep_embedding, TimestepEmbedding};
use crate::models::activations::Activation;
use crate::models::conv::{self, Conv2d};
use crate::models::norm::{self, GroupNorm};
use crate::weights::WeightStore;

#[derive(Debug, Clone)]
pub struct UNet2DConditionModel {
    conv_in: Conv2d,
    time_embedding: TimestepEmbedding,
    down_blocks: Vec<DownBlock>,
    mid_block: MidBlock,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_act: Activation,
    conv_out: Conv2d,
    in_channels: usize,
    cross_attention_dim: usize,
    /// Sinusoid settings of the timestep projection (`time_proj`, which has no weights).
    time_proj_dim: usize,
    flip_sin_to_cos: bool,
    freq_shift: f64,
    center_input_sample: bool,
    /// Whether [`Self::forward_train`] checkpoints each resnet and transformer.
    gradient_checkpointing: bool,
}

impl UNet2DConditionModel {
    /// Builds the network from `vb`, whose names are diffusers' (`conv_in.weight`,
    /// `down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight`, ...).
    pub fn new(vb: VarBuilder, cfg: &UNet2DConditionConfig) -> Result<Self> {
        let c0 = cfg.block_out_channels[0];
        let conv3x3 = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let n = cfg.block_out_channels.len();
        Ok(Self {
            conv_in: conv::conv2d(cfg.in_channels, c0, 3, conv3x3, vb.pp("conv_in"))?,
            time_embedding: TimestepEmbedding::new(
                c0,
                cfg.time_embed_dim(),
                cfg.act_fn,
                vb.pp("time_embedding"),
            )?,
            down_blocks: (0..n)
                .map(|i| DownBlock::new(cfg, i, vb.pp(format!("down_blocks.{i}"))))
                .collect::<Result<_>>()?,
            mid_block: MidBlock::new(cfg, vb.pp("mid_block"))?,
            up_blocks: (0..n)
                .map(|i| UpBlock::new(cfg, i, vb.pp(format!("up_blocks.{i}"))))
                .collect::<Result<_>>()?,
            conv_norm_out: norm::group_norm(
                cfg.norm_num_groups,
                c0,
                cfg.norm_eps,
                vb.pp("conv_norm_out"),
            )?,
            conv_act: cfg.act_fn,
            conv_out: conv::conv2d(c0, cfg.out_channels, 3, conv3x3, vb.pp("conv_out"))?,
            in_channels: cfg.in_channels,
            cross_attention_dim: cfg.cross_attention_dim,
            time_proj_dim: c0,
            flip_sin_to_cos: cfg.flip_sin_to_cos,
            freq_shift: cfg.freq_shift,
            center_input_sample: cfg.center_input_sample,
            gradient_checkpointing: false,
        })
    }

    /// Reads `dir/config.json` and the weights in `dir` (see [`WeightStore::open`] for `variant`),
    /// builds the network in `dtype` on `device`, and checks that every stored tensor was used.
    pub fn load(
        dir: &Path,
        variant: Option<&str>,
        dtype: DType,
        device: &Device,
    ) -> crate::Result<(Self, UNet2DConditionConfig)> {
        let cfg = UNet2DConditionConfig::from_file(&dir.join("config.json"))?;
        let store = WeightStore::open(dir, variant, device)?;
        let unet = Self::from_store(&store, &cfg, dtype, device)?;
        Ok((unet, cfg))
    }

    /// Builds the network from an opened store (e.g. one with a trainable filter, whose `Var`s are
    /// then in `store.trainable_vars()`), and checks that every stored tensor was used.
    pub fn from_store(
        store: &WeightStore,
        cfg: &UNet2DConditionConfig,
        dtype: DType,
        device: &Device,
    ) -> crate::Result<Self> {
        store.build(dtype, device, |vb| Self::new(vb, cfg))
    }

    /// Predicts the model output (noise or velocity, per the scheduler's `prediction_type`).
    ///
    /// `sample`: the noisy latents [b, in_channels, h, w] in the network's dtype, any `h`, `w`;
    /// `timesteps`: [b] (one per sample, as in training) or [1] / a scalar for all, any float
    /// dtype; `encoder_hidden_states`: [b, n, cross_attention_dim]. Returns [b, out_channels, h, w].
    ///
    /// Never checkpoints: to train with gradient checkpointing use [`Self::forward_train`].
    pub fn forward(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
    ) -> Result<Tensor> {
        self.run(sample, timesteps, encoder_hidden_states, None)
    }

    /// Turns gradient checkpointing of [`Self::forward_train`] on or off (diffusers'
    /// `enable_gradient_checkpointing`): each resnet and transformer then keeps only its inputs and
    /// output and is recomputed in the backward pass: one more forward pass of compute per step
    /// for about a third of the activation memory (measured on a 74 M-weight UNet at 32x32).
    pub fn set_gradient_checkpointing(&mut self, on: bool) {
        self.gradient_checkpointing = on;
    }

    pub fn gradient_checkpointing(&self) -> bool {
        self.gradient_checkpointing
    }

    /// [`Self::forward`] for a training step, checkpointed if enabled. Back-propagate a loss
    /// computed from the output with the returned [`CheckpointGrads::backward`] rather than
    /// `loss.backward()`, which misses the weights inside checkpointed units.
    pub fn forward_train(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
    ) -> Result<(Tensor, CheckpointGrads)> {
        let grads = CheckpointGrads::default();
        let ckpt = self.gradient_checkpointing.then_some(&grads);
        let out = self.run(sample, timesteps, encoder_hidden_states, ckpt)?;
        Ok((out, grads))
    }

    fn run(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
        ckpt: Option<&CheckpointGrads>,
    ) -> Result<Tensor> {
        let (b, c, _, _) = sample.dims4()?;
        if c != self.in_channels {
            bail!(
                "UNet: sample has {c} channels, the model takes {}",
                self.in_channels
            );
        }
        let (b_ctx, _, d_ctx) = encoder_hidden_states.dims3()?;
        if b_ctx != b || d_ctx != self.cross_attention_dim {
            bail!(
                "UNet: encoder_hidden_states is {:?}, expected [{b}, n, {}]",
                encoder_hidden_states.dims(),
                self.cross_attention_dim
            );
        }
        let timesteps = match timesteps.elem_count() {
            1 => timesteps.flatten_all()?.broadcast_as(b)?,
            n if n == b => timesteps.flatten_all()?,
            n => bail!("UNet: {n} timesteps for a batch of {b}"),
        };
        let sample = if self.center_input_sample {
            sample.affine(2.0, -1.0)?
        } else {
            sample.clone()
        };

        let t_emb = timestep_embedding(
            &timesteps,
            self.time_proj_dim,
            self.flip_sin_to_cos,
            self.freq_shift,
        )?;
        let emb = self
            .time_embedding
            .forward(&t_emb.to_dtype(sample.dtype())?)?; // [b, time_embed_dim]

        let mut xs = self.conv_in.forward(&sample)?;
        // Every state the down path keeps for the skip connections, in order.
        let mut skips = vec![xs.clone()];
        for block in &self.down_blocks {
            let (out, states) = block.forward(&xs, &emb, encoder_hidden_states, ckpt)?;
            xs = out;
            skips.extend(states);
        }
        xs = self
            .mid_block
            .forward(&xs, &emb, encoder_hidden_states, ckpt)?;
        for block in &self.up_blocks {
            let block_skips = skips.split_off(skips.len() - block.num_skips());
            // Upsample to the size of the next skip connection: twice the input when the latent
            // size is divisible by 2^(number of upsamplers), else what the down path produced
            // (diffusers' `forward_upsample_size`).
            let upsample_size = match skips.last() {
                Some(next) => Some((next.dim(2)?, next.dim(3)?)),
                None => None,
            };
            xs = block.forward(
                &xs,
                &block_skips,
                &emb,
                encoder_hidden_states,
                upsample_size,
                ckpt,
            )?;
        }
        let xs = self.conv_norm_out.forward_act(&xs, self.conv_act)?;
        self.conv_out.forward(&xs)
    }
}
