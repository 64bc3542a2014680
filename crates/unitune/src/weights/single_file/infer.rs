//! The configs of a single file's networks, inferred from its tensors' names and shapes: what
//! diffusers' `create_*_diffusers_config_from_ldm` read from the original YAML, which a single file
//! does not carry, recovered from the weights. Each config comes out as the JSON diffusers would
//! write, to be checked by the same code as a folder's `config.json`.
//!
//! What shapes cannot tell is Stable Diffusion's fixed choice for the family: 32 groups per
//! normalisation, SiLU, a VAE scaling factor of 0.18215, CLIP's 64-wide attention heads in the text
//! encoder, and in the UNet 8 heads per attention (SD 1.x) or 64-wide heads (SD 2.x, diffusers'
//! `attention_head_dim` [5, 10, 20, 20]).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde_json::{json, Value};

use super::detect::{Family, CLIP, OPEN_CLIP, UNET, VAE};
use crate::{Error, Result};

/// A checkpoint's tensors: name -> shape.
pub type Shapes = BTreeMap<String, Vec<usize>>;

/// Heads per UNet attention in SD 1.x (`num_heads: 8` in its YAML).
const SD1_UNET_HEADS: usize = 8;
/// Width of one attention head in SD 2.x's UNet (`num_head_channels: 64`) and in CLIP.
const HEAD_WIDTH: usize = 64;
/// OpenCLIP ViT-H/14's text tower has 24 layers; SD 2.x conditions on the penultimate one, so
/// diffusers' text encoder has 23 and leaves out resblock 23.
const OPEN_CLIP_LAYERS: usize = 24;

/// Shape lookups that fail with an error naming the file and the tensor.
struct Lookup<'a> {
    path: &'a Path,
    shapes: &'a Shapes,
}

impl Lookup<'_> {
    fn shape(&self, name: &str) -> Result<&[usize]> {
        self.shapes.get(name).map(Vec::as_slice).ok_or_else(|| {
            Error::weights(
                self.path,
                format!(
                    "missing tensor `{name}`, which every Stable Diffusion 1.x/2.x checkpoint has"
                ),
            )
        })
    }

    /// Dimension `dim` of tensor `name`, which must have at least `rank` dimensions.
    fn dim(&self, name: &str, rank: usize, dim: usize) -> Result<usize> {
        let shape = self.shape(name)?;
        if shape.len() < rank {
            return Err(Error::weights(
                self.path,
                format!("tensor `{name}` has shape {shape:?}, expected {rank} dimensions"),
            ));
        }
        Ok(shape[dim])
    }

    fn has(&self, name: &str) -> bool {
        self.shapes.contains_key(name)
    }

    /// The distinct numbers `n` in names `{prefix}{n}.…`: the blocks or layers of a list.
    fn indices(&self, prefix: &str) -> BTreeSet<usize> {
        self.shapes
            .range(prefix.to_string()..)
            .take_while(|(name, _)| name.starts_with(prefix))
            .filter_map(|(name, _)| name[prefix.len()..].split('.').next()?.parse().ok())
            .collect()
    }

    fn odd(&self, message: String) -> Error {
        Error::weights(self.path, message)
    }
}

/// The UNet's `config.json`; `sample_size` is the latent size, `upcast_attention` what diffusers'
/// config of the same model says (it changes nothing here: our attention always computes in f32).
pub fn unet(
    path: &Path,
    shapes: &Shapes,
    family: Family,
    sample_size: usize,
    upcast_attention: bool,
) -> Result<Value> {
    let s = Lookup { path, shapes };
    let name = |rest: &str| format!("{UNET}{rest}");
    // The original `input_blocks`: conv_in, then per level `r` resnets (each followed by a
    // transformer where the level has attention) and a downsampler but on the last level, so
    // `r + 1` blocks per level; `output_blocks` has `r + 1` resnets per level (plus transformers
    // and upsamplers inside them).
    let inputs = s.indices(&name("input_blocks.")).len();
    let downsamplers = (1..inputs)
        .filter(|i| s.has(&name(&format!("input_blocks.{i}.0.op.weight"))))
        .count();
    let levels = downsamplers + 1;
    let per_level = inputs / levels;
    let outputs = s.indices(&name("output_blocks.")).len();
    if per_level < 2 || inputs != levels * per_level || outputs != levels * per_level {
        return Err(s.odd(format!(
            "unexpected UNet layout: {inputs} input blocks, {outputs} output blocks and \
             {downsamplers} downsamplers do not make levels of equal depth"
        )));
    }
    let first = |level: usize| 1 + level * per_level;
    let mut channels = Vec::new();
    let mut down = Vec::new();
    let mut up = Vec::new();
    let mut depth = Vec::new();
    for level in 0..levels {
        let block = format!("input_blocks.{}", first(level));
        channels.push(s.dim(&name(&format!("{block}.0.out_layers.3.weight")), 1, 0)?);
        let attention = s.has(&name(&format!("{block}.1.proj_in.weight")));
        down.push(if attention {
            "CrossAttnDownBlock2D"
        } else {
            "DownBlock2D"
        });
        // Up block `level` (diffusers' numbering, deepest first) starts at this output block.
        let up_attention = s.has(&name(&format!(
            "output_blocks.{}.1.proj_in.weight",
            level * per_level
        )));
        up.push(if up_attention {
            "CrossAttnUpBlock2D"
        } else {
            "UpBlock2D"
        });
        // Transformer blocks per attention; the last entry is also the mid block's.
        let transformer = match (attention, level + 1 == levels) {
            (true, _) => format!("{block}.1.transformer_blocks."),
            (false, true) => "middle_block.1.transformer_blocks.".into(),
            (false, false) => String::new(),
        };
        depth.push(match transformer.is_empty() {
            true => 1,
            false => s.indices(&name(&transformer)).len(),
        });
    }
    let heads = match family {
        Family::Sd1 => vec![SD1_UNET_HEADS; levels],
        Family::Sd2 => channels
            .iter()
            .map(|&c| match c % HEAD_WIDTH {
                0 => Ok(c / HEAD_WIDTH),
                _ => Err(s.odd(format!(
                    "cannot infer the UNet's attention heads: {c} channels are not a multiple of \
                     SD 2.x's {HEAD_WIDTH}-wide heads; give the model's diffusers folder with --config"
                ))),
            })
            .collect::<Result<_>>()?,
    };
    let proj_in = name("middle_block.1.proj_in.weight");
    Ok(json!({
        "_class_name": "UNet2DConditionModel",
        "sample_size": sample_size,
        "in_channels": s.dim(&name("input_blocks.0.0.weight"), 2, 1)?,
        "out_channels": s.dim(&name("out.2.weight"), 1, 0)?,
        "block_out_channels": channels,
        "down_block_types": down,
        "up_block_types": up,
        "layers_per_block": per_level - 1,
        "transformer_layers_per_block": depth,
        "attention_head_dim": heads,
        "cross_attention_dim": s.dim(&name("middle_block.1.transformer_blocks.0.attn2.to_k.weight"), 2, 1)?,
        // SD 2.x projects into its transformers with linear layers, SD 1.x with 1x1 convolutions.
        "use_linear_projection": s.shape(&proj_in)?.len() == 2,
        "upcast_attention": upcast_attention,
    }))
}

/// The VAE's `config.json`, for pictures of `sample_size` pixels.
pub fn vae(path: &Path, shapes: &Shapes, sample_size: usize) -> Result<Value> {
    let s = Lookup { path, shapes };
    let name = |rest: &str| format!("{VAE}{rest}");
    let levels = s.indices(&name("encoder.down.")).len();
    let channels = (0..levels)
        .map(|i| {
            s.dim(
                &name(&format!("encoder.down.{i}.block.0.conv2.weight")),
                1,
                0,
            )
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(json!({
        "_class_name": "AutoencoderKL",
        "in_channels": s.dim(&name("encoder.conv_in.weight"), 2, 1)?,
        "out_channels": s.dim(&name("decoder.conv_out.weight"), 1, 0)?,
        "block_out_channels": channels,
        "down_block_types": vec!["DownEncoderBlock2D"; levels],
        "up_block_types": vec!["UpDecoderBlock2D"; levels],
        "layers_per_block": s.indices(&name("encoder.down.0.block.")).len(),
        "latent_channels": s.dim(&name("decoder.conv_in.weight"), 2, 1)?,
        "sample_size": sample_size,
        "scaling_factor": 0.18215,
        "use_quant_conv": s.has(&name("quant_conv.weight")),
        "use_post_quant_conv": s.has(&name("post_quant_conv.weight")),
        "mid_block_add_attention": s.has(&name("encoder.mid.attn_1.q.weight")),
    }))
}

/// The text encoder's `config.json` (transformers' `CLIPTextConfig`).
pub fn text_encoder(path: &Path, shapes: &Shapes, family: Family) -> Result<Value> {
    let s = Lookup { path, shapes };
    let (token, position, layers, fc1, act) = match family {
        Family::Sd1 => {
            // transformers 4 saved CLIPTextModel under `text_model.`; older files lack it.
            let p = match s.has(&format!(
                "{CLIP}text_model.embeddings.token_embedding.weight"
            )) {
                true => format!("{CLIP}text_model."),
                false => CLIP.to_string(),
            };
            let layers = s.indices(&format!("{p}encoder.layers.")).len();
            (
                format!("{p}embeddings.token_embedding.weight"),
                format!("{p}embeddings.position_embedding.weight"),
                layers,
                format!("{p}encoder.layers.0.mlp.fc1.weight"),
                "quick_gelu",
            )
        }
        Family::Sd2 => (
            format!("{OPEN_CLIP}token_embedding.weight"),
            format!("{OPEN_CLIP}positional_embedding"),
            sd2_text_layers(
                s.indices(&format!("{OPEN_CLIP}transformer.resblocks."))
                    .len(),
            ),
            format!("{OPEN_CLIP}transformer.resblocks.0.mlp.c_fc.weight"),
            "gelu",
        ),
    };
    let hidden = s.dim(&token, 2, 1)?;
    if hidden % HEAD_WIDTH != 0 {
        return Err(s.odd(format!(
            "cannot infer the text encoder's attention heads: width {hidden} is not a multiple of \
             CLIP's {HEAD_WIDTH}-wide heads; give the model's diffusers folder with --config"
        )));
    }
    Ok(json!({
        "vocab_size": s.dim(&token, 2, 0)?,
        "hidden_size": hidden,
        "intermediate_size": s.dim(&fc1, 2, 0)?,
        "num_hidden_layers": layers,
        "num_attention_heads": hidden / HEAD_WIDTH,
        "max_position_embeddings": s.dim(&position, 2, 0)?,
        "hidden_act": act,
        "layer_norm_eps": 1e-5,
    }))
}

/// The text encoder layers SD 2.x uses of `resblocks` in the file: all but OpenCLIP ViT-H's
/// unused last one when the file has it, all of them in a file written without it (as diffusers'
/// conversion script writes SD 2.x).
pub fn sd2_text_layers(resblocks: usize) -> usize {
    match resblocks {
        OPEN_CLIP_LAYERS => OPEN_CLIP_LAYERS - 1,
        n => n,
    }
}
