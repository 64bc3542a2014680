//! The diffusers folder layout as a whole: `model_index.json` names the pipeline class and each
//! component's class. [`check_model_index`] is the reading side; [`super::export`] writes the same
//! layout.

use std::collections::HashMap;
use std::path::Path;

use crate::error::{read_json, Error, Result};

/// Pipeline classes whose folders hold exactly the SD 1.x/2.x components we load.
const PIPELINE_CLASSES: [&str; 3] = [
    "StableDiffusionPipeline",
    "StableDiffusionImg2ImgPipeline",
    "StableDiffusionInpaintPipeline",
];
/// The class each component must have, as `model_index.json` names it.
const COMPONENTS: [(&str, &str); 5] = [
    ("unet", "UNet2DConditionModel"),
    ("vae", "AutoencoderKL"),
    ("text_encoder", "CLIPTextModel"),
    ("tokenizer", "CLIPTokenizer"),
    ("scheduler", ""),
];

#[derive(serde::Deserialize)]
struct ModelIndex {
    #[serde(rename = "_class_name")]
    class_name: Option<String>,
    #[serde(flatten)]
    components: HashMap<String, serde_json::Value>,
}

/// Checks `dir/model_index.json`: a Stable Diffusion 1.x/2.x pipeline class whose components
/// have the classes unitune loads, so that a folder of another pipeline (SDXL, SD3, ...) is
/// refused by name rather than by a missing tensor.
pub fn check_model_index(dir: &Path) -> Result<()> {
    let path = dir.join("model_index.json");
    if !path.is_file() {
        return Err(Error::weights(
            dir,
            "not a diffusers model folder (no model_index.json); expected unet/, vae/, text_encoder/, tokenizer/, scheduler/",
        ));
    }
    let index: ModelIndex = read_json(&path)?;
    let class = index.class_name.unwrap_or_default();
    if !PIPELINE_CLASSES.contains(&class.as_str()) {
        return Err(Error::config(
            &path,
            "_class_name",
            format!(
                "`{class}` is not supported; unitune loads Stable Diffusion 1.x/2.x folders ({})",
                PIPELINE_CLASSES.join(", ")
            ),
        ));
    }
    for (name, expected) in COMPONENTS {
        // Each entry is ["library", "ClassName"].
        let found = index
            .components
            .get(name)
            .and_then(|v| v.get(1))
            .and_then(|c| c.as_str());
        match found {
            None => return Err(Error::config(&path, name, "component missing")),
            Some(found) if !expected.is_empty() && found != expected => {
                return Err(Error::config(
                    &path,
                    name,
                    format!("class `{found}` is not supported (expected `{expected}`)"),
                ))
            }
            Some(_) => {}
        }
    }
    Ok(())
}
