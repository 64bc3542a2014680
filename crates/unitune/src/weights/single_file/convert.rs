//! From the original Stable Diffusion tensor names to diffusers', in memory: the mapping of
//! diffusers' `convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`,
//! `convert_ldm_clip_checkpoint` and `convert_open_clip_checkpoint`, one name at a time.
//!
//! A tensor under a network's prefix that has no place in that network is an error naming it
//! (another architecture, or an extension's tensors merged in); tensors outside the three
//! networks (EMA copies, the training code's buffers) and the few inside them that diffusers'
//! networks do not have are left out, as diffusers leaves them out.

use std::collections::HashMap;
use std::path::Path;

use candle_core::Tensor;

use super::detect::{Family, CLIP, OPEN_CLIP, UNET, VAE};
use crate::weights::export::Tensors;
use crate::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Component {
    Unet,
    Vae,
    TextEncoder,
}

/// What becomes of one tensor of the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// The same values under a diffusers name.
    Rename(Component, String),
    /// A 1x1 convolution kernel `[o, i, 1, 1]` that diffusers keeps as a linear weight `[o, i]`
    /// (the VAE's attention).
    Squeeze(Component, String),
    /// OpenCLIP's packed attention input projection `[3c, ..]`, split into query, key, value.
    SplitQkv(Component, [String; 3]),
}

impl Target {
    pub fn component(&self) -> Component {
        match self {
            Target::Rename(c, _) | Target::Squeeze(c, _) | Target::SplitQkv(c, _) => *c,
        }
    }
}

/// The layout facts the names depend on.
pub struct Layout {
    pub family: Family,
    /// Resnets per UNet level (each level has one more block slot, its downsampler).
    pub unet_layers_per_block: usize,
    /// VAE levels: the decoder numbers its blocks in the reverse order of diffusers.
    pub vae_levels: usize,
    /// SD 2.x text encoder layers; a file may hold one more, OpenCLIP's unused last layer.
    pub text_layers: usize,
}

/// The target of the file's tensor `key`, `None` for a tensor Stable Diffusion does not use.
pub fn target(path: &Path, layout: &Layout, key: &str) -> Result<Option<Target>> {
    let unknown = |network: &str| {
        Error::weights(
            path,
            format!(
                "tensor `{key}` has no place in a Stable Diffusion {} {network} of this layout: \
                 another architecture, a --config of another model, or other networks merged \
                 into the file?",
                match layout.family {
                    Family::Sd1 => "1.x",
                    Family::Sd2 => "2.x",
                }
            ),
        )
    };
    if let Some(rest) = key.strip_prefix(UNET) {
        let name = unet(rest, layout.unet_layers_per_block).ok_or_else(|| unknown("UNet"))?;
        return Ok(Some(Target::Rename(Component::Unet, name)));
    }
    if let Some(rest) = key.strip_prefix(VAE) {
        // The autoencoder's training loss (LPIPS, discriminator) is not part of the model.
        if rest.starts_with("loss.") {
            return Ok(None);
        }
        return vae(rest, layout.vae_levels)
            .map(Some)
            .ok_or_else(|| unknown("VAE"));
    }
    let text = |name: String| Ok(Some(Target::Rename(Component::TextEncoder, name)));
    match layout.family {
        Family::Sd1 => match key.strip_prefix(CLIP) {
            // A buffer (always 0..77) that transformers no longer saves.
            Some(rest) if rest.ends_with("position_ids") => Ok(None),
            // transformers' own names, which the text encoder reads with or without `text_model.`.
            Some(rest) => text(rest.to_string()),
            None if key.starts_with("cond_stage_model.") => Err(unknown("text encoder")),
            None => Ok(None),
        },
        Family::Sd2 => match key.strip_prefix(OPEN_CLIP) {
            Some(rest) => {
                open_clip(rest, layout.text_layers).ok_or_else(|| unknown("text encoder"))
            }
            None if key.starts_with("cond_stage_model.") => Err(unknown("text encoder")),
            None => Ok(None),
        },
    }
}

/// Converted tensors of one network by diffusers name, and the name each had in the file.
#[derive(Default)]
pub struct Converted {
    pub tensors: Tensors,
    pub file_names: HashMap<String, String>,
}

/// Applies `targets` to the tensors `load` reads from the file, by network.
pub fn apply(
    path: &Path,
    targets: &[(String, Target)],
    mut load: impl FnMut(&str) -> Result<Tensor>,
) -> Result<HashMap<Component, Converted>> {
    let mut out: HashMap<Component, Converted> = HashMap::new();
    for (key, target) in targets {
        let tensor = load(key)?;
        let odd = |message: String| Error::weights(path, format!("tensor `{key}` {message}"));
        let (component, named) = match target {
            Target::Rename(c, name) => (c, vec![(name.clone(), tensor)]),
            Target::Squeeze(c, name) => match tensor.dims() {
                [o, i, 1, 1] => (c, vec![(name.clone(), tensor.reshape((*o, *i))?)]),
                [_, _] => (c, vec![(name.clone(), tensor)]),
                dims => return Err(odd(format!("has shape {dims:?}, expected [c, c, 1, 1]"))),
            },
            Target::SplitQkv(c, names) => {
                let rows = tensor.dim(0)?;
                if rows % 3 != 0 {
                    return Err(odd(format!(
                        "has {rows} rows, not query, key and value alike"
                    )));
                }
                let parts = (0..3).map(|i| tensor.narrow(0, i * rows / 3, rows / 3));
                let named = names.iter().cloned().zip(parts);
                (
                    c,
                    named
                        .map(|(n, t)| Ok((n, t?)))
                        .collect::<Result<Vec<_>>>()?,
                )
            }
        };
        let converted = out.entry(*component).or_default();
        for (name, tensor) in named {
            converted.file_names.insert(name.clone(), key.clone());
            if converted.tensors.insert(name.clone(), tensor).is_some() {
                return Err(odd(format!("and another tensor both become `{name}`")));
            }
        }
    }
    Ok(out)
}

/// A UNet name after `model.diffusion_model.`, in diffusers' naming, for `r` resnets per level.
fn unet(rest: &str, r: usize) -> Option<String> {
    const FIXED: [(&str, &str); 5] = [
        ("time_embed.0.", "time_embedding.linear_1."),
        ("time_embed.2.", "time_embedding.linear_2."),
        ("input_blocks.0.0.", "conv_in."),
        ("out.0.", "conv_norm_out."),
        ("out.2.", "conv_out."),
    ];
    for (from, to) in FIXED {
        if let Some(tail) = rest.strip_prefix(from) {
            return Some(format!("{to}{tail}"));
        }
    }
    let (block, rest) = rest.split_once('.')?;
    let (i, rest) = numbered(rest)?;
    if block == "middle_block" {
        return match i {
            0 | 2 => Some(format!("mid_block.resnets.{}.{}", i / 2, resnet(rest)?)),
            1 => Some(format!("mid_block.attentions.0.{rest}")),
            _ => None,
        };
    }
    let (j, tail) = numbered(rest)?;
    let per_level = r + 1;
    match (block, j) {
        ("input_blocks", _) if i == 0 => None,
        ("input_blocks", 0) => {
            let (b, l) = ((i - 1) / per_level, (i - 1) % per_level);
            match tail.strip_prefix("op.") {
                Some(p) if l == r => Some(format!("down_blocks.{b}.downsamplers.0.conv.{p}")),
                None if l < r => Some(format!("down_blocks.{b}.resnets.{l}.{}", resnet(tail)?)),
                _ => None,
            }
        }
        ("input_blocks", 1) => {
            let (b, l) = ((i - 1) / per_level, (i - 1) % per_level);
            (l < r).then(|| format!("down_blocks.{b}.attentions.{l}.{tail}"))
        }
        ("output_blocks", _) => {
            let (b, l) = (i / per_level, i % per_level);
            match (j, tail.strip_prefix("conv.")) {
                (0, _) => Some(format!("up_blocks.{b}.resnets.{l}.{}", resnet(tail)?)),
                // The upsampler follows the level's last resnet, or its transformer.
                (1 | 2, Some(p)) if l == r => Some(format!("up_blocks.{b}.upsamplers.0.conv.{p}")),
                (1, None) => Some(format!("up_blocks.{b}.attentions.{l}.{tail}")),
                _ => None,
            }
        }
        _ => None,
    }
}

/// A UNet resnet's tensor name (after the block) in diffusers' naming.
fn resnet(tail: &str) -> Option<String> {
    const NAMES: [(&str, &str); 6] = [
        ("in_layers.0.", "norm1."),
        ("in_layers.2.", "conv1."),
        ("emb_layers.1.", "time_emb_proj."),
        ("out_layers.0.", "norm2."),
        ("out_layers.3.", "conv2."),
        ("skip_connection.", "conv_shortcut."),
    ];
    NAMES
        .iter()
        .find_map(|(from, to)| tail.strip_prefix(from).map(|p| format!("{to}{p}")))
}

/// A VAE name after `first_stage_model.`, in diffusers' naming, for `levels` levels.
fn vae(rest: &str, levels: usize) -> Option<Target> {
    let rename = |name: String| Some(Target::Rename(Component::Vae, name));
    const SAME: [&str; 6] = [
        "encoder.conv_in.",
        "encoder.conv_out.",
        "decoder.conv_in.",
        "decoder.conv_out.",
        "quant_conv.",
        "post_quant_conv.",
    ];
    if SAME.iter().any(|p| rest.starts_with(p)) {
        return rename(rest.to_string());
    }
    let (coder, rest) = rest.split_once('.')?;
    if !matches!(coder, "encoder" | "decoder") {
        return None;
    }
    if let Some(p) = rest.strip_prefix("norm_out.") {
        return rename(format!("{coder}.conv_norm_out.{p}"));
    }
    if let Some(tail) = rest.strip_prefix("mid.attn_1.") {
        const ATTENTION: [(&str, &str); 5] = [
            ("norm.", "group_norm."),
            ("q.", "to_q."),
            ("k.", "to_k."),
            ("v.", "to_v."),
            ("proj_out.", "to_out.0."),
        ];
        let (from, to) = ATTENTION.iter().find(|(from, _)| tail.starts_with(from))?;
        let p = &tail[from.len()..];
        let name = format!("{coder}.mid_block.attentions.0.{to}{p}");
        return Some(match (*from, p) {
            ("norm.", _) | (_, "bias") => Target::Rename(Component::Vae, name),
            _ => Target::Squeeze(Component::Vae, name),
        });
    }
    if let Some(rest) = rest.strip_prefix("mid.block_") {
        let (k, tail) = numbered(rest)?;
        return (1..=2)
            .contains(&k)
            .then(|| vae_resnet(tail))
            .flatten()
            .and_then(|t| rename(format!("{coder}.mid_block.resnets.{}.{t}", k - 1)));
    }
    // The encoder's `down.i` is diffusers' `down_blocks.i`; the decoder's `up.i` counts from the
    // smallest picture, diffusers' `up_blocks` from the largest.
    let (kind, rest) = match coder {
        "encoder" => ("down", rest.strip_prefix("down.")?),
        _ => ("up", rest.strip_prefix("up.")?),
    };
    let (i, tail) = numbered(rest)?;
    let b = match kind {
        "down" => i,
        _ => levels.checked_sub(i + 1)?,
    };
    if let Some(rest) = tail.strip_prefix("block.") {
        let (j, tail) = numbered(rest)?;
        return rename(format!(
            "{coder}.{kind}_blocks.{b}.resnets.{j}.{}",
            vae_resnet(tail)?
        ));
    }
    let sampler = match kind {
        "down" => "downsample.conv.",
        _ => "upsample.conv.",
    };
    let p = tail.strip_prefix(sampler)?;
    rename(format!(
        "{coder}.{kind}_blocks.{b}.{kind}samplers.0.conv.{p}"
    ))
}

/// A VAE resnet's tensor name (after the block) in diffusers' naming.
fn vae_resnet(tail: &str) -> Option<String> {
    if let Some(p) = tail.strip_prefix("nin_shortcut.") {
        return Some(format!("conv_shortcut.{p}"));
    }
    ["norm1.", "conv1.", "norm2.", "conv2."]
        .iter()
        .any(|p| tail.starts_with(p))
        .then(|| tail.to_string())
}

/// An OpenCLIP text tower name after `cond_stage_model.model.`, in transformers' `CLIPTextModel`
/// naming; `None` inside the `Option` for the tensors SD 2.x does not use.
fn open_clip(rest: &str, layers: usize) -> Option<Option<Target>> {
    let text = |name: String| Some(Some(Target::Rename(Component::TextEncoder, name)));
    match rest {
        // CLIP's image-text projection and temperature: contrastive training only.
        "text_projection" | "logit_scale" => return Some(None),
        "token_embedding.weight" => {
            return text("text_model.embeddings.token_embedding.weight".into())
        }
        "positional_embedding" => {
            return text("text_model.embeddings.position_embedding.weight".into())
        }
        _ => {}
    }
    if let Some(p) = rest.strip_prefix("ln_final.") {
        return text(format!("text_model.final_layer_norm.{p}"));
    }
    let (i, tail) = numbered(rest.strip_prefix("transformer.resblocks.")?)?;
    if i == layers {
        // The last layer, which SD 2.x conditions past (it uses the penultimate one).
        return Some(None);
    }
    if i > layers {
        return None;
    }
    let layer = format!("text_model.encoder.layers.{i}");
    const NAMES: [(&str, &str); 5] = [
        ("ln_1.", "layer_norm1."),
        ("ln_2.", "layer_norm2."),
        ("mlp.c_fc.", "mlp.fc1."),
        ("mlp.c_proj.", "mlp.fc2."),
        ("attn.out_proj.", "self_attn.out_proj."),
    ];
    if let Some(name) = NAMES
        .iter()
        .find_map(|(from, to)| tail.strip_prefix(from).map(|p| format!("{layer}.{to}{p}")))
    {
        return text(name);
    }
    let kind = match tail {
        "attn.in_proj_weight" => "weight",
        "attn.in_proj_bias" => "bias",
        _ => return None,
    };
    let names = ["q", "k", "v"].map(|x| format!("{layer}.self_attn.{x}_proj.{kind}"));
    Some(Some(Target::SplitQkv(Component::TextEncoder, names)))
}

/// `n.rest` as `(n, rest)`.
fn numbered(s: &str) -> Option<(usize, &str)> {
    let (n, rest) = s.split_once('.')?;
    Some((n.parse().ok()?, rest))
}
