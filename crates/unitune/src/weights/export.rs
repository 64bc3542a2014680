//! Writing a Stable Diffusion pipeline as a diffusers-layout folder: `model_index.json`, each
//! component's `config.json` as diffusers (UNet, VAE, scheduler) and transformers (text encoder)
//! write them, and weights as safetensors under the names those libraries use, so that both
//! [`crate::pipelines::StableDiffusion::load`] and diffusers' `from_pretrained` read the folder.
//!
//! The text encoder's tensors are written with transformers 4.x's `text_model.` prefix, the
//! layout of every published SD checkpoint, which transformers 5 reads as well. Weights are
//! written in the dtype asked for (f32, or f16 to halve the folder) under the plain file names,
//! not as a `fp16` variant, so that loaders find them without being told a variant.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Tensor};
use serde_json::{json, Value};

use crate::models::activations::Activation;
use crate::models::clip::ClipTextConfig;
use crate::models::unet::{DownBlockType, UNet2DConditionConfig, UpBlockType};
use crate::models::vae::VaeConfig;
use crate::schedulers::{BetaSchedule, PredictionType, SchedulerConfig, TimestepSpacing};
use crate::{Error, Result};

/// The diffusers release whose folder layout and config fields this module writes.
const DIFFUSERS_VERSION: &str = "0.42.1";
/// The prefix transformers 4.x gives `CLIPTextModel` tensors (see the module doc).
const TEXT_MODEL_PREFIX: &str = "text_model.";

/// One network's weights by safetensors name (as the network's `VarBuilder` names them).
pub type Tensors = HashMap<String, Tensor>;

/// The special token ids a text encoder's config records (transformers uses the eos id to find
/// the pooled token).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpecialTokenIds {
    pub bos: u32,
    pub eos: u32,
    pub pad: u32,
}

/// Everything a pipeline folder holds.
pub struct PipelineParts<'a> {
    pub text_encoder: (&'a ClipTextConfig, &'a Tensors),
    pub special_tokens: SpecialTokenIds,
    pub vae: (&'a VaeConfig, &'a Tensors),
    pub unet: (&'a UNet2DConditionConfig, &'a Tensors),
    /// Written as a `DDIMScheduler` config.
    pub scheduler: &'a SchedulerConfig,
    /// The tokenizer folder's files (`vocab.json`, `merges.txt`, ...), by file name.
    pub tokenizer: &'a TokenizerFiles,
}

/// A tokenizer folder's files, held in memory so they can be written again at every checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizerFiles(pub Vec<(String, Vec<u8>)>);

impl TokenizerFiles {
    /// Reads every file of `dir` (a `tokenizer/` folder; subfolders are not expected).
    pub fn read(dir: &Path) -> Result<Self> {
        let mut files = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
            let path = entry.map_err(|e| Error::io(dir, e))?.path();
            if path.is_file() {
                let name = path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                files.push((name, std::fs::read(&path).map_err(|e| Error::io(&path, e))?));
            }
        }
        files.sort();
        Ok(Self(files))
    }

    pub fn write(&self, dir: &Path) -> Result<()> {
        create_dir(dir)?;
        for (name, bytes) in &self.0 {
            let path = dir.join(name);
            std::fs::write(&path, bytes).map_err(|e| Error::io(&path, e))?;
        }
        Ok(())
    }
}

/// Writes the whole pipeline into `dir` (created if needed; files already there are
/// overwritten), weights in `dtype` (F32, F16 or BF16).
pub fn write_pipeline(dir: &Path, parts: &PipelineParts, dtype: DType) -> Result<()> {
    create_dir(dir)?;
    write_json(&dir.join("model_index.json"), &model_index())?;
    let (text_cfg, text) = parts.text_encoder;
    write_text_encoder(
        &dir.join("text_encoder"),
        text_cfg,
        parts.special_tokens,
        text,
        dtype,
    )?;
    write_vae(&dir.join("vae"), parts.vae.0, parts.vae.1, dtype)?;
    write_unet(&dir.join("unet"), parts.unet.0, parts.unet.1, dtype)?;
    let scheduler = dir.join("scheduler");
    create_dir(&scheduler)?;
    write_json(
        &scheduler.join("scheduler_config.json"),
        &ddim_config_json(parts.scheduler),
    )?;
    parts.tokenizer.write(&dir.join("tokenizer"))
}

/// `model_index.json` of a `StableDiffusionPipeline` without safety checker.
pub fn model_index() -> Value {
    json!({
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": DIFFUSERS_VERSION,
        "feature_extractor": [null, null],
        "image_encoder": [null, null],
        "requires_safety_checker": false,
        "safety_checker": [null, null],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    })
}

/// `text_encoder/`: transformers' config and `model.safetensors` with `text_model.` names.
pub fn write_text_encoder(
    dir: &Path,
    cfg: &ClipTextConfig,
    ids: SpecialTokenIds,
    tensors: &Tensors,
    dtype: DType,
) -> Result<()> {
    create_dir(dir)?;
    write_json(&dir.join("config.json"), &clip_text_config_json(cfg, ids))?;
    let prefixed: Tensors = tensors
        .iter()
        .map(|(name, t)| match name.starts_with(TEXT_MODEL_PREFIX) {
            true => (name.clone(), t.clone()),
            false => (format!("{TEXT_MODEL_PREFIX}{name}"), t.clone()),
        })
        .collect();
    write_safetensors(&dir.join("model.safetensors"), &prefixed, dtype)
}

/// `vae/`: config and `diffusion_pytorch_model.safetensors`.
pub fn write_vae(dir: &Path, cfg: &VaeConfig, tensors: &Tensors, dtype: DType) -> Result<()> {
    create_dir(dir)?;
    write_json(&dir.join("config.json"), &vae_config_json(cfg))?;
    write_safetensors(
        &dir.join("diffusion_pytorch_model.safetensors"),
        tensors,
        dtype,
    )
}

/// `unet/`: config and `diffusion_pytorch_model.safetensors`.
pub fn write_unet(
    dir: &Path,
    cfg: &UNet2DConditionConfig,
    tensors: &Tensors,
    dtype: DType,
) -> Result<()> {
    create_dir(dir)?;
    write_json(&dir.join("config.json"), &unet_config_json(cfg))?;
    write_safetensors(
        &dir.join("diffusion_pytorch_model.safetensors"),
        tensors,
        dtype,
    )
}

/// transformers' `CLIPTextConfig` as `save_pretrained` writes it. Its `dtype` is float32 whatever
/// the dtype of the stored weights: transformers 5 loads a model in its config's dtype, while
/// diffusers loads the UNet and VAE in float32, and a pipeline with an f16 text encoder and an
/// f32 UNet fails on its first matmul.
pub fn clip_text_config_json(cfg: &ClipTextConfig, ids: SpecialTokenIds) -> Value {
    let hidden_act = match cfg.hidden_act {
        Activation::QuickGelu => "quick_gelu",
        Activation::Gelu => "gelu",
        Activation::Silu => "silu",
    };
    json!({
        "architectures": ["CLIPTextModel"],
        "attention_dropout": 0.0,
        "bos_token_id": ids.bos,
        "dtype": "float32",
        "eos_token_id": ids.eos,
        "hidden_act": hidden_act,
        "hidden_size": cfg.hidden_size,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "intermediate_size": cfg.intermediate_size,
        "layer_norm_eps": cfg.layer_norm_eps,
        "max_position_embeddings": cfg.max_position_embeddings,
        "model_type": "clip_text_model",
        "num_attention_heads": cfg.num_attention_heads,
        "num_hidden_layers": cfg.num_hidden_layers,
        "pad_token_id": ids.pad,
        "projection_dim": cfg.hidden_size,
        "vocab_size": cfg.vocab_size,
    })
}

/// diffusers' `AutoencoderKL` config.
pub fn vae_config_json(cfg: &VaeConfig) -> Value {
    json!({
        "_class_name": "AutoencoderKL",
        "_diffusers_version": DIFFUSERS_VERSION,
        "act_fn": cfg.act_fn,
        "block_out_channels": cfg.block_out_channels,
        "down_block_types": cfg.down_block_types,
        "force_upcast": true,
        "in_channels": cfg.in_channels,
        "latent_channels": cfg.latent_channels,
        "latents_mean": null,
        "latents_std": null,
        "layers_per_block": cfg.layers_per_block,
        "mid_block_add_attention": cfg.mid_block_add_attention,
        "norm_num_groups": cfg.norm_num_groups,
        "out_channels": cfg.out_channels,
        "sample_size": cfg.sample_size,
        "scaling_factor": cfg.scaling_factor,
        "shift_factor": cfg.shift_factor,
        "up_block_types": cfg.up_block_types,
        "use_post_quant_conv": cfg.use_post_quant_conv,
        "use_quant_conv": cfg.use_quant_conv,
    })
}

/// diffusers' `UNet2DConditionModel` config, every field `save_pretrained` writes, with the
/// defaults for the features we do not support. Per-block values are one number when all blocks
/// agree, as SD 1.x configs have them.
pub fn unet_config_json(cfg: &UNet2DConditionConfig) -> Value {
    let down: Vec<&str> = cfg
        .down_block_types
        .iter()
        .map(|t| match t {
            DownBlockType::DownBlock2D => "DownBlock2D",
            DownBlockType::CrossAttnDownBlock2D => "CrossAttnDownBlock2D",
        })
        .collect();
    let up: Vec<&str> = cfg
        .up_block_types
        .iter()
        .map(|t| match t {
            UpBlockType::UpBlock2D => "UpBlock2D",
            UpBlockType::CrossAttnUpBlock2D => "CrossAttnUpBlock2D",
        })
        .collect();
    let act_fn = match cfg.act_fn {
        Activation::Silu => "silu",
        Activation::Gelu => "gelu",
        Activation::QuickGelu => "quick_gelu",
    };
    let mut config = json!({
        "_class_name": "UNet2DConditionModel",
        "_diffusers_version": DIFFUSERS_VERSION,
        "act_fn": act_fn,
        "attention_head_dim": per_block(&cfg.num_attention_heads),
        "block_out_channels": cfg.block_out_channels,
        "center_input_sample": cfg.center_input_sample,
        "cross_attention_dim": cfg.cross_attention_dim,
        "down_block_types": down,
        "downsample_padding": cfg.downsample_padding,
        "flip_sin_to_cos": cfg.flip_sin_to_cos,
        "freq_shift": cfg.freq_shift,
        "in_channels": cfg.in_channels,
        "layers_per_block": per_block(&cfg.layers_per_block),
        "mid_block_scale_factor": cfg.mid_block_scale_factor,
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "norm_eps": cfg.norm_eps,
        "norm_num_groups": cfg.norm_num_groups,
        "out_channels": cfg.out_channels,
        "sample_size": cfg.sample_size,
        "transformer_layers_per_block": per_block(&cfg.transformer_layers_per_block),
        "up_block_types": up,
        "upcast_attention": cfg.upcast_attention,
        "use_linear_projection": cfg.use_linear_projection,
    });
    // Features of other UNets, at the values that turn them off.
    let unsupported = json!({
        "addition_embed_type": null,
        "addition_embed_type_num_heads": 64,
        "addition_time_embed_dim": null,
        "attention_type": "default",
        "class_embed_type": null,
        "class_embeddings_concat": false,
        "conv_in_kernel": 3,
        "conv_out_kernel": 3,
        "cross_attention_norm": null,
        "dropout": 0.0,
        "dual_cross_attention": false,
        "encoder_hid_dim": null,
        "encoder_hid_dim_type": null,
        "mid_block_only_cross_attention": null,
        "num_attention_heads": null,
        "num_class_embeds": null,
        "only_cross_attention": false,
        "projection_class_embeddings_input_dim": null,
        "resnet_out_scale_factor": 1.0,
        "resnet_skip_time_act": false,
        "resnet_time_scale_shift": "default",
        "reverse_transformer_layers_per_block": null,
        "time_cond_proj_dim": null,
        "time_embedding_act_fn": null,
        "time_embedding_dim": null,
        "time_embedding_type": "positional",
        "timestep_post_act": null,
    });
    let map = config.as_object_mut().expect("a JSON object");
    map.extend(unsupported.as_object().expect("a JSON object").clone());
    map.sort_keys();
    config
}

/// `scheduler_config.json` of a `DDIMScheduler` with `config`'s training schedule and sampling
/// options.
pub fn ddim_config_json(config: &SchedulerConfig) -> Value {
    let beta_schedule = match config.beta_schedule {
        BetaSchedule::Linear => "linear",
        BetaSchedule::ScaledLinear => "scaled_linear",
        BetaSchedule::SquaredcosCapV2 => "squaredcos_cap_v2",
    };
    let prediction_type = match config.prediction_type {
        PredictionType::Epsilon => "epsilon",
        PredictionType::VPrediction => "v_prediction",
        PredictionType::Sample => "sample",
    };
    let timestep_spacing = match config.timestep_spacing.unwrap_or(TimestepSpacing::Leading) {
        TimestepSpacing::Leading => "leading",
        TimestepSpacing::Trailing => "trailing",
        TimestepSpacing::Linspace => "linspace",
    };
    json!({
        "_class_name": "DDIMScheduler",
        "_diffusers_version": DIFFUSERS_VERSION,
        "beta_end": config.beta_end,
        "beta_schedule": beta_schedule,
        "beta_start": config.beta_start,
        "clip_sample": config.clip_sample,
        "clip_sample_range": config.clip_sample_range,
        "dynamic_thresholding_ratio": config.dynamic_thresholding_ratio,
        "num_train_timesteps": config.num_train_timesteps,
        "prediction_type": prediction_type,
        "rescale_betas_zero_snr": config.rescale_betas_zero_snr,
        "sample_max_value": config.sample_max_value,
        "set_alpha_to_one": config.set_alpha_to_one,
        "steps_offset": config.steps_offset,
        "thresholding": config.thresholding,
        "timestep_spacing": timestep_spacing,
        "trained_betas": config.trained_betas,
    })
}

/// One number when every block has the same value, else the list.
fn per_block(values: &[usize]) -> Value {
    match values {
        [first, rest @ ..] if rest.iter().all(|v| v == first) => json!(first),
        _ => json!(values),
    }
}

/// A tensor's bytes as safetensors stores them (little endian, row major).
struct RawTensor {
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl safetensors::View for RawTensor {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

impl RawTensor {
    fn new(tensor: &Tensor, dtype: DType) -> Result<Self> {
        let flat = tensor.to_dtype(dtype)?.flatten_all()?;
        let (st_dtype, bytes): (_, Vec<u8>) = match dtype {
            DType::F32 => (
                safetensors::Dtype::F32,
                flat.to_vec1::<f32>()?
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
            ),
            DType::F16 => (
                safetensors::Dtype::F16,
                flat.to_vec1::<half::f16>()?
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
            ),
            DType::BF16 => (
                safetensors::Dtype::BF16,
                flat.to_vec1::<half::bf16>()?
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
            ),
            other => {
                return Err(Error::argument(
                    "dtype",
                    format!("weights are written as f32, f16 or bf16, not {other:?}"),
                ))
            }
        };
        Ok(Self {
            dtype: st_dtype,
            shape: tensor.dims().to_vec(),
            bytes,
        })
    }
}

/// Writes `tensors` converted to `dtype` as a safetensors file with the `{"format": "pt"}`
/// metadata transformers checks for.
pub fn write_safetensors(path: &Path, tensors: &Tensors, dtype: DType) -> Result<()> {
    write_safetensors_with(path, tensors, dtype, HashMap::new())
}

/// [`write_safetensors`] with more metadata (e.g. a LoRA's rank for the tools that list it).
pub fn write_safetensors_with(
    path: &Path,
    tensors: &Tensors,
    dtype: DType,
    mut metadata: HashMap<String, String>,
) -> Result<()> {
    let mut raw: Vec<(String, RawTensor)> = tensors
        .iter()
        .map(|(name, t)| Ok((name.clone(), RawTensor::new(t, dtype)?)))
        .collect::<Result<_>>()?;
    raw.sort_by(|a, b| a.0.cmp(&b.0));
    metadata.insert("format".to_string(), "pt".to_string());
    safetensors::serialize_to_file(raw, Some(metadata), path)
        .map_err(|e| Error::weights(path, format!("cannot write safetensors: {e}")))
}

/// Writes a copy of the model folder `model` into `out` with the UNet's weights replaced by
/// `unet` (one safetensors file, in the dtype of the weights given), so that diffusers'
/// `from_pretrained` loads the tuned model. Every other file is copied as it is; the UNet's old
/// weight files (full precision, variants, shards) are left out, so no loader can pick up the
/// untuned weights. `out` appears whole or not at all.
pub fn write_with_unet(model: &Path, unet: &Tensors, out: &Path) -> Result<()> {
    let dtype = unet.values().next().map_or(DType::F32, |t| t.dtype());
    crate::atomic::replace_dir(out, |tmp| {
        copy_tree(model, tmp, &|rel: &Path| {
            let in_unet = rel.starts_with("unet");
            let name = rel.to_string_lossy();
            let weights =
                name.ends_with(".safetensors") || name.ends_with(".safetensors.index.json");
            !(in_unet && weights)
        })?;
        write_safetensors(
            &tmp.join("unet/diffusion_pytorch_model.safetensors"),
            unet,
            dtype,
        )
    })
}

/// Copies the files of `from` under `to` whose path relative to `from` passes `keep`.
pub fn copy_tree(from: &Path, to: &Path, keep: &dyn Fn(&Path) -> bool) -> Result<()> {
    fn walk(root: &Path, dir: &Path, to: &Path, keep: &dyn Fn(&Path) -> bool) -> Result<()> {
        for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
            let path = entry.map_err(|e| Error::io(dir, e))?.path();
            let rel = path.strip_prefix(root).expect("walked from the root");
            if path.is_dir() {
                walk(root, &path, to, keep)?;
            } else if keep(rel) {
                let target = to.join(rel);
                create_dir(target.parent().expect("a file in a folder"))?;
                std::fs::copy(&path, &target).map_err(|e| Error::io(&path, e))?;
            }
        }
        Ok(())
    }
    walk(from, from, to, keep)
}

fn create_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))
}

fn write_json(path: &Path, value: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).expect("JSON values serialize") + "\n";
    std::fs::write(path, text).map_err(|e| Error::io(path, e))
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use candle_core::Device;

    use super::*;
    use crate::pipelines::{LoadOptions, StableDiffusion};
    use crate::weights::WeightStore;

    fn fixture(rel: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures")
            .join(rel)
    }

    fn tempdir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("unitune-export-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    fn tensors(dir: &Path) -> Tensors {
        WeightStore::open(dir, None, &Device::Cpu)
            .unwrap()
            .tensors()
            .clone()
    }

    #[test]
    fn configs_read_back_equal() {
        let sd = StableDiffusion::load(&fixture("tiny-sd2"), &LoadOptions::default()).unwrap();
        let dir = tempdir("configs");
        create_dir(&dir).unwrap();
        let path = dir.join("unet.json");
        write_json(&path, &unet_config_json(&sd.unet_config)).unwrap();
        assert_eq!(
            UNet2DConditionConfig::from_file(&path).unwrap(),
            sd.unet_config
        );
        let path = dir.join("vae.json");
        write_json(&path, &vae_config_json(&sd.vae_config)).unwrap();
        assert_eq!(VaeConfig::from_file(&path).unwrap(), sd.vae_config);
        let clip =
            ClipTextConfig::from_file(&fixture("tiny-sd2/text_encoder/config.json")).unwrap();
        let path = dir.join("clip.json");
        let ids = SpecialTokenIds {
            bos: 1,
            eos: 2,
            pad: 3,
        };
        let json = clip_text_config_json(&clip, ids);
        write_json(&path, &json).unwrap();
        assert_eq!(ClipTextConfig::from_file(&path).unwrap(), clip);
        // transformers loads in this dtype; diffusers loads the UNet in f32 (see the function).
        assert_eq!(
            (&json["dtype"], &json["eos_token_id"]),
            (&json!("float32"), &json!(2))
        );
        let path = dir.join("scheduler.json");
        write_json(&path, &ddim_config_json(&sd.scheduler_config)).unwrap();
        let back = SchedulerConfig::from_file(&path).unwrap();
        let expected = SchedulerConfig {
            path: path.clone(),
            class_name: Some("DDIMScheduler".into()),
            ..sd.scheduler_config
        };
        assert_eq!(back, expected);
    }

    #[test]
    fn fixture_pipeline_round_trips_through_export() {
        // Re-export tiny-sd1 in f32 and f16: the f32 folder's tensors are bit-equal, the f16
        // folder's within f16 rounding, and both load as pipelines.
        let src = fixture("tiny-sd1");
        let sd = StableDiffusion::load(&src, &LoadOptions::default()).unwrap();
        let text = tensors(&src.join("text_encoder"));
        let vae = tensors(&src.join("vae"));
        let unet = tensors(&src.join("unet"));
        let text_cfg = ClipTextConfig::from_file(&src.join("text_encoder/config.json")).unwrap();
        let tokenizer = TokenizerFiles::read(&src.join("tokenizer")).unwrap();
        let parts = PipelineParts {
            text_encoder: (&text_cfg, &text),
            special_tokens: SpecialTokenIds {
                bos: sd.tokenizer.bos_id(),
                eos: sd.tokenizer.eos_id(),
                pad: sd.tokenizer.pad_id(),
            },
            vae: (&sd.vae_config, &vae),
            unet: (&sd.unet_config, &unet),
            scheduler: &sd.scheduler_config,
            tokenizer: &tokenizer,
        };
        for dtype in [DType::F32, DType::F16] {
            let dir = tempdir(&format!("pipeline-{dtype:?}"));
            write_pipeline(&dir, &parts, dtype).unwrap();
            let back = StableDiffusion::load(&dir, &LoadOptions::default()).unwrap();
            assert_eq!(
                TokenizerFiles::read(&dir.join("tokenizer")).unwrap(),
                tokenizer
            );
            let written = tensors(&dir.join("text_encoder"));
            assert!(
                written.keys().all(|k| k.starts_with("text_model.")),
                "{:?}",
                written.keys()
            );
            let tolerance = if dtype == DType::F32 { 0.0 } else { 1e-2 };
            let (a, _) = sd.encode_prompt("a photo of a cat").unwrap();
            let (b, _) = back.encode_prompt("a photo of a cat").unwrap();
            let diff = (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(
                diff <= tolerance,
                "{dtype:?}: text embeddings differ by {diff}"
            );
            for (name, t) in &unet {
                let w = tensors(&dir.join("unet"))[name]
                    .to_dtype(DType::F32)
                    .unwrap();
                assert_eq!(w.dtype(), DType::F32);
                let diff = (t - w)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert!(diff <= tolerance * 1e-1, "{name}: {diff}");
            }
        }
    }
}
