//! Which model a single file holds, from its tensor names alone: Stable Diffusion 1.x and 2.x are
//! told apart by their text encoder (OpenAI CLIP under transformers' names for 1.x, OpenCLIP
//! under its own for 2.x, as diffusers' `infer_diffusers_model_type` does); files of other models
//! are refused by name before any weight is read.

use std::path::Path;

use crate::{Error, Result};

/// The prefixes of the three networks in the original Stable Diffusion layout.
pub const UNET: &str = "model.diffusion_model.";
pub const VAE: &str = "first_stage_model.";
/// SD 1.x: transformers' `CLIPTextModel` names under this prefix.
pub const CLIP: &str = "cond_stage_model.transformer.";
/// SD 2.x: OpenCLIP's text tower under its own names.
pub const OPEN_CLIP: &str = "cond_stage_model.model.";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// Stable Diffusion 1.x: OpenAI CLIP ViT-L/14 text encoder, 768-wide context.
    Sd1,
    /// Stable Diffusion 2.x: OpenCLIP ViT-H/14 text encoder, 1024-wide context.
    Sd2,
}

/// Name prefixes that only other models' files have, and what those files are. The first match
/// wins: SDXL also has `model.diffusion_model.` tensors, so this is checked first.
const OTHERS: [(&str, &str); 10] = [
    ("conditioner.embedders.", "an SDXL checkpoint"),
    (
        "model.diffusion_model.joint_blocks.",
        "a Stable Diffusion 3 checkpoint",
    ),
    ("model.diffusion_model.double_blocks.", "a FLUX checkpoint"),
    ("double_blocks.", "a FLUX checkpoint"),
    ("control_model.", "a ControlNet"),
    ("lora_unet_", "a LoRA, not a whole model"),
    ("lora_te_", "a LoRA, not a whole model"),
    (
        "down_blocks.",
        "one diffusers component (UNet or VAE), not a whole model: pass the pipeline folder",
    ),
    (
        "text_model.",
        "one diffusers component (the text encoder), not a whole model: pass the pipeline folder",
    ),
    ("encoder.down.", "a bare VAE, not a whole model"),
];

/// The family of the model whose tensors are `names`, or an error naming what the file is.
pub fn family<'a>(path: &Path, names: impl Iterator<Item = &'a str> + Clone) -> Result<Family> {
    let has = |prefix: &str| names.clone().any(|n| n.starts_with(prefix));
    let refuse = |what: &str| {
        Error::weights(
            path,
            format!("{what}; unitune loads Stable Diffusion 1.x and 2.x checkpoints"),
        )
    };
    if let Some((prefix, what)) = OTHERS.iter().find(|(prefix, _)| has(prefix)) {
        return Err(refuse(&format!("{what} (it has `{prefix}*` tensors)")));
    }
    for (prefix, network) in [(UNET, "UNet"), (VAE, "VAE")] {
        if !has(prefix) {
            return Err(refuse(&format!(
                "no `{prefix}*` tensors (the {network}): not a Stable Diffusion checkpoint in the \
                 original layout"
            )));
        }
    }
    match (has(CLIP), has(OPEN_CLIP)) {
        (true, false) => Ok(Family::Sd1),
        (false, true) => Ok(Family::Sd2),
        (true, true) => Err(refuse(&format!(
            "both an SD 1.x (`{CLIP}*`) and an SD 2.x (`{OPEN_CLIP}*`) text encoder"
        ))),
        (false, false) => Err(refuse(&format!(
            "no text encoder (`{CLIP}*` for SD 1.x, `{OPEN_CLIP}*` for SD 2.x)"
        ))),
    }
}
