//! The attention part of the UNet: diffusers' `Transformer2DModel` over a feature map, made of
//! `BasicTransformerBlock`s (self-attention, cross-attention to the text, GEGLU feed-forward).
//! This is where the text conditions the image, and what UniTune's fine-tuning mostly moves.

use candle_core::{Module, Result, Tensor, D};
use candle_nn::VarBuilder;

use crate::models::conv::{self, Conv2d};
use crate::models::linear::{self, Linear};
use crate::models::norm::{self, GroupNorm, LayerNorm};
use crate::models::ops;

/// diffusers' `Attention` as the UNet uses it: no bias on q/k/v, bias on the output projection,
/// scores scaled by `1/sqrt(head_dim)`, softmax in f32.
#[derive(Debug, Clone)]
pub struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
}

impl Attention {
    /// `context_dim`: width of the states attended to (`None` for self-attention).
    pub fn new(
        dim: usize,
        context_dim: Option<usize>,
        heads: usize,
        head_dim: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let inner = heads * head_dim;
        let context_dim = context_dim.unwrap_or(dim);
        Ok(Self {
            to_q: linear::linear_no_bias(dim, inner, vb.pp("to_q"))?,
            to_k: linear::linear_no_bias(context_dim, inner, vb.pp("to_k"))?,
            to_v: linear::linear_no_bias(context_dim, inner, vb.pp("to_v"))?,
            to_out: linear::linear(inner, dim, vb.pp("to_out.0"))?,
            heads,
        })
    }

    /// `xs`: [b, n, dim]; `context`: [b, m, context_dim], or `None` to attend to `xs` itself.
    pub fn forward(&self, xs: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let context = context.unwrap_or(xs);
        let q = self.to_q.forward(xs)?; // [b, n, heads * d]
        let k = self.to_k.forward(context)?; // [b, m, heads * d]
        let v = self.to_v.forward(context)?;
        let out = ops::attention_heads(&q, &k, &v, self.heads)?; // [b, n, inner]
        self.to_out.forward(&out)
    }
}

/// diffusers' `FeedForward` with `activation_fn="geglu"`: `net.0` projects to twice the inner
/// width, one half gates the other through an exact GELU, `net.2` projects back.
#[derive(Debug, Clone)]
pub struct FeedForward {
    proj: Linear,
    out: Linear,
    inner: usize,
}

impl FeedForward {
    pub fn new(dim: usize, vb: VarBuilder) -> Result<Self> {
        let inner = 4 * dim;
        Ok(Self {
            proj: linear::linear(dim, 2 * inner, vb.pp("net.0.proj"))?,
            out: linear::linear(inner, dim, vb.pp("net.2"))?,
            inner,
        })
    }
}

impl Module for FeedForward {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let projected = self.proj.forward(xs)?; // [b, n, 2 * inner]
                                                // f32 on the CPU: the fused kernel (one pass each way, vectorised erf, analytic
                                                // backward). Elsewhere (CUDA, f16/bf16) the composite below, which runs on every device.
        let gated = if ops::kernel_ready(&[&projected]) {
            unitune_kernels::geglu::geglu(&projected)?
        } else {
            let hidden = projected.narrow(D::Minus1, 0, self.inner)?;
            let gate = projected.narrow(D::Minus1, self.inner, self.inner)?;
            (hidden * gate.gelu_erf()?)?
        }; // [b, n, inner]
        self.out.forward(&gated)
    }
}

/// diffusers' `BasicTransformerBlock` (pre-LayerNorm, `norm_type="layer_norm"`).
#[derive(Debug, Clone)]
pub struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
}

/// LayerNorm epsilon of the transformer blocks (diffusers' `Transformer2DModel` default).
const LAYER_NORM_EPS: f64 = 1e-5;

impl BasicTransformerBlock {
    pub fn new(
        dim: usize,
        heads: usize,
        head_dim: usize,
        cross_attention_dim: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        Ok(Self {
            norm1: LayerNorm::new(dim, LAYER_NORM_EPS, vb.pp("norm1"))?,
            attn1: Attention::new(dim, None, heads, head_dim, vb.pp("attn1"))?,
            norm2: LayerNorm::new(dim, LAYER_NORM_EPS, vb.pp("norm2"))?,
            attn2: Attention::new(
                dim,
                Some(cross_attention_dim),
                heads,
                head_dim,
                vb.pp("attn2"),
            )?,
            norm3: LayerNorm::new(dim, LAYER_NORM_EPS, vb.pp("norm3"))?,
            ff: FeedForward::new(dim, vb.pp("ff"))?,
        })
    }

    /// `xs`: [b, n, dim], `context`: [b, m, cross_attention_dim] -> [b, n, dim].
    pub fn forward(&self, xs: &Tensor, context: &Tensor) -> Result<Tensor> {
        let xs = (self.attn1.forward(&self.norm1.forward(xs)?, None)? + xs)?;
        let xs = (self
            .attn2
            .forward(&self.norm2.forward(&xs)?, Some(context))?
            + xs)?;
        self.ff.forward(&self.norm3.forward(&xs)?)? + xs
    }
}

/// How `Transformer2DModel` moves between channels and the transformer width.
#[derive(Debug, Clone)]
enum Projection {
    /// 1x1 convolution on the feature map (SD 1.x).
    Conv(Conv2d),
    /// Linear layer on the flattened tokens (SD 2.x, `use_linear_projection`).
    Linear(Linear),
}

/// diffusers' `Transformer2DModel` on continuous input: group norm, project in, transformer blocks
/// over the `h * w` tokens, project out, add the input back.
#[derive(Debug, Clone)]
pub struct Transformer2DModel {
    norm: GroupNorm,
    proj_in: Projection,
    transformer_blocks: Vec<BasicTransformerBlock>,
    proj_out: Projection,
}

/// Settings of one `Transformer2DModel`, from the UNet config and the block it sits in.
#[derive(Debug, Clone, Copy)]
pub struct TransformerSettings {
    pub heads: usize,
    pub num_layers: usize,
    pub cross_attention_dim: usize,
    pub norm_num_groups: usize,
    pub use_linear_projection: bool,
}

/// GroupNorm epsilon of `Transformer2DModel` (fixed in diffusers, unlike the resnets' `norm_eps`).
const GROUP_NORM_EPS: f64 = 1e-6;

impl Transformer2DModel {
    pub fn new(channels: usize, s: TransformerSettings, vb: VarBuilder) -> Result<Self> {
        let head_dim = channels / s.heads;
        let inner = s.heads * head_dim;
        let projection = |from: usize, to: usize, vb: VarBuilder| -> Result<Projection> {
            Ok(if s.use_linear_projection {
                Projection::Linear(linear::linear(from, to, vb)?)
            } else {
                Projection::Conv(conv::conv2d(from, to, 1, Default::default(), vb)?)
            })
        };
        let transformer_blocks = (0..s.num_layers)
            .map(|i| {
                let vb = vb.pp(format!("transformer_blocks.{i}"));
                BasicTransformerBlock::new(inner, s.heads, head_dim, s.cross_attention_dim, vb)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            norm: norm::group_norm(s.norm_num_groups, channels, GROUP_NORM_EPS, vb.pp("norm"))?,
            proj_in: projection(channels, inner, vb.pp("proj_in"))?,
            transformer_blocks,
            proj_out: projection(inner, channels, vb.pp("proj_out"))?,
        })
    }

    /// `xs`: [b, c, h, w], `context`: [b, m, cross_attention_dim] -> [b, c, h, w].
    pub fn forward(&self, xs: &Tensor, context: &Tensor) -> Result<Tensor> {
        let (b, _, h, w) = xs.dims4()?;
        let normed = self.norm.forward(xs)?;
        let to_tokens = |t: &Tensor| -> Result<Tensor> {
            let channels = t.dim(1)?;
            t.permute((0, 2, 3, 1))?.reshape((b, h * w, channels)) // [b, h*w, channels]
        };
        let mut tokens = match &self.proj_in {
            Projection::Conv(conv) => to_tokens(&conv.forward(&normed)?)?,
            Projection::Linear(linear) => linear.forward(&to_tokens(&normed)?)?,
        };
        for block in &self.transformer_blocks {
            tokens = block.forward(&tokens, context)?;
        }
        let to_map = |t: &Tensor| -> Result<Tensor> {
            let channels = t.dim(2)?;
            t.reshape((b, h, w, channels))?.permute((0, 3, 1, 2)) // [b, channels, h, w]
        };
        let out = match &self.proj_out {
            Projection::Conv(conv) => conv.forward(&to_map(&tokens)?.contiguous()?)?,
            Projection::Linear(linear) => to_map(&linear.forward(&tokens)?)?,
        };
        out + xs
    }
}
