//! `vae/config.json` of diffusers' `AutoencoderKL`, with diffusers' defaults for missing fields.
//!
//! Only the layout Stable Diffusion uses is supported (plain encoder/decoder blocks, SiLU, group
//! norm); anything else is refused up front, naming the field, rather than loading the wrong network.

use std::path::Path;

use candle_core::Tensor;
use serde::Deserialize;

use crate::error::{from_json_value, read_json, Error, Result};

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct VaeConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    /// Always `"DownEncoderBlock2D"`, one per entry of `block_out_channels`.
    pub down_block_types: Vec<String>,
    /// Always `"UpDecoderBlock2D"`, one per entry of `block_out_channels`.
    pub up_block_types: Vec<String>,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    /// Always `"silu"` (or its alias `"swish"`).
    pub act_fn: String,
    pub latent_channels: usize,
    pub norm_num_groups: usize,
    /// The training resolution; a `[h, w]` list in the file is read as its first side, as diffusers does.
    #[serde(deserialize_with = "side")]
    pub sample_size: usize,
    pub scaling_factor: f64,
    pub shift_factor: Option<f64>,
    pub use_quant_conv: bool,
    pub use_post_quant_conv: bool,
    pub mid_block_add_attention: bool,
}

impl Default for VaeConfig {
    /// diffusers' `AutoencoderKL.__init__` defaults.
    fn default() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            down_block_types: vec!["DownEncoderBlock2D".into()],
            up_block_types: vec!["UpDecoderBlock2D".into()],
            block_out_channels: vec![64],
            layers_per_block: 1,
            act_fn: "silu".into(),
            latent_channels: 4,
            norm_num_groups: 32,
            sample_size: 32,
            scaling_factor: 0.18215,
            shift_factor: None,
            use_quant_conv: true,
            use_post_quant_conv: true,
            mid_block_add_attention: true,
        }
    }
}

/// The file as written: the config plus the class it was saved from.
#[derive(Deserialize)]
struct File {
    #[serde(rename = "_class_name")]
    class_name: Option<String>,
    #[serde(flatten)]
    config: VaeConfig,
}

fn side<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<usize, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        Square(usize),
        Sides(Vec<usize>),
    }
    match Size::deserialize(d)? {
        Size::Square(s) => Ok(s),
        Size::Sides(sides) => sides
            .first()
            .copied()
            .ok_or_else(|| serde::de::Error::custom("empty sample_size")),
    }
}

impl VaeConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        Self::check(path, read_json(path)?)
    }

    /// Checks a config given as JSON (e.g. one inferred from a single-file checkpoint); `path`
    /// names where it came from in errors.
    pub fn from_json(path: &Path, json: serde_json::Value) -> Result<Self> {
        Self::check(path, from_json_value(path, json)?)
    }

    fn check(path: &Path, file: File) -> Result<Self> {
        if let Some(class) = file.class_name.filter(|c| c != "AutoencoderKL") {
            return Err(Error::config(
                path,
                "_class_name",
                format!("`{class}` is not supported, only `AutoencoderKL`"),
            ));
        }
        file.config.validate(path)?;
        Ok(file.config)
    }

    fn validate(&self, path: &Path) -> Result<()> {
        let err = |field: &str, message: String| Err(Error::config(path, field, message));
        let n = self.block_out_channels.len();
        if n == 0 || self.block_out_channels.contains(&0) {
            return err(
                "block_out_channels",
                "must be a non-empty list of positive sizes".into(),
            );
        }
        // Each block but the last halves the picture: past 16, no picture is left to encode
        // (and the scale factor 2^(n-1) would overflow).
        if n > 16 {
            return err(
                "block_out_channels",
                format!("{n} blocks; an autoencoder has at most 16"),
            );
        }
        for (field, types, wanted) in [
            (
                "down_block_types",
                &self.down_block_types,
                "DownEncoderBlock2D",
            ),
            ("up_block_types", &self.up_block_types, "UpDecoderBlock2D"),
        ] {
            if let Some(other) = types.iter().find(|t| *t != wanted) {
                return err(
                    field,
                    format!("block type `{other}` is not supported, only `{wanted}`"),
                );
            }
            if types.len() != n {
                return err(
                    field,
                    format!("has {} entries but block_out_channels has {n}", types.len()),
                );
            }
        }
        if !matches!(self.act_fn.as_str(), "silu" | "swish") {
            return err(
                "act_fn",
                format!("`{}` is not supported, only `silu`", self.act_fn),
            );
        }
        let groups = self.norm_num_groups;
        if groups == 0 || self.block_out_channels.iter().any(|c| c % groups != 0) {
            return err(
                "norm_num_groups",
                format!("{groups} must divide every entry of block_out_channels"),
            );
        }
        for (field, value) in [
            ("in_channels", self.in_channels),
            ("out_channels", self.out_channels),
            ("latent_channels", self.latent_channels),
            ("layers_per_block", self.layers_per_block),
        ] {
            if value == 0 {
                return err(field, "must be positive".into());
            }
        }
        if !(self.scaling_factor.is_finite() && self.scaling_factor > 0.0) {
            return err(
                "scaling_factor",
                format!("{} is not a positive number", self.scaling_factor),
            );
        }
        Ok(())
    }

    /// How much smaller the latents are than the image: 2^(number of blocks - 1), 8 for SD.
    pub fn scale_factor(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }

    /// The latents the UNet works on, from a VAE sample `z`: `(z - shift_factor) * scaling_factor`.
    pub fn scale_latents(&self, z: &Tensor) -> candle_core::Result<Tensor> {
        z.affine(
            self.scaling_factor,
            -self.shift_factor.unwrap_or(0.0) * self.scaling_factor,
        )
    }

    /// The inverse of [`Self::scale_latents`], to hand UNet latents to the decoder.
    pub fn unscale_latents(&self, latents: &Tensor) -> candle_core::Result<Tensor> {
        latents.affine(1.0 / self.scaling_factor, self.shift_factor.unwrap_or(0.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn write_config(name: &str, json: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("unitune-vae-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("config.json");
        std::fs::write(&path, json).unwrap();
        path
    }

    #[test]
    fn missing_fields_take_diffusers_defaults() {
        let path = write_config(
            "defaults",
            r#"{"_class_name": "AutoencoderKL", "sample_size": [96, 64]}"#,
        );
        let cfg = VaeConfig::from_file(&path).unwrap();
        assert_eq!(
            cfg,
            VaeConfig {
                sample_size: 96,
                ..VaeConfig::default()
            }
        );
        assert_eq!(cfg.scaling_factor, 0.18215);
        assert_eq!(cfg.scale_factor(), 1);
    }

    #[test]
    fn unsupported_values_name_file_and_field() {
        let path = write_config(
            "attn-block",
            r#"{"block_out_channels": [32, 64],
                "down_block_types": ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"],
                "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"]}"#,
        );
        let err = VaeConfig::from_file(&path).unwrap_err().to_string();
        assert!(
            err.contains(&path.display().to_string())
                && err.contains("`down_block_types`")
                && err.contains("AttnDownEncoderBlock2D"),
            "{err}"
        );
        let path = write_config("class", r#"{"_class_name": "AutoencoderTiny"}"#);
        let err = VaeConfig::from_file(&path).unwrap_err().to_string();
        assert!(
            err.contains("`_class_name`") && err.contains("AutoencoderTiny"),
            "{err}"
        );
        let path = write_config("count", r#"{"block_out_channels": [32, 64]}"#);
        let err = VaeConfig::from_file(&path).unwrap_err().to_string();
        assert!(
            err.contains("`down_block_types`") && err.contains("has 1 entries"),
            "{err}"
        );
        let path = write_config("act", r#"{"act_fn": "gelu"}"#);
        assert!(VaeConfig::from_file(&path)
            .unwrap_err()
            .to_string()
            .contains("`act_fn`"));
    }

    #[test]
    fn latent_scaling_applies_shift_then_scale_and_inverts() {
        let cfg = VaeConfig {
            scaling_factor: 0.5,
            shift_factor: Some(0.25),
            ..VaeConfig::default()
        };
        let z = Tensor::new(&[1.25f32, -0.75], &Device::Cpu).unwrap();
        let latents = cfg.scale_latents(&z).unwrap();
        assert_eq!(latents.to_vec1::<f32>().unwrap(), vec![0.5, -0.5]);
        assert_eq!(
            cfg.unscale_latents(&latents)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            vec![1.25, -0.75]
        );
    }
}
