//! CLIP text encoder, as transformers' `CLIPTextModel`: token ids -> per-token hidden states
//! (`last_hidden_state`) that condition the UNet through cross-attention.
//!
//! Pre-LayerNorm transformer with a causal mask. Built from the differentiable ops in
//! [`super::ops`] so that gradients reach the token embeddings (Imagic-style embedding
//! optimisation) even though UniTune keeps the encoder frozen.
//!
//! Checkpoints name the tensors either `text_model.embeddings...` (transformers 4.x, i.e. every
//! published Stable Diffusion) or `embeddings...` (files saved by transformers 5); both load.

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Embedding, VarBuilder};

use super::activations::Activation;
use super::linear::{self, Linear};
use super::norm::LayerNorm;
use super::ops::{attention, merge_heads, split_heads};
use crate::error::{from_json_value, read_json, Error, Result};
use crate::weights::WeightStore;

/// The fields of `text_encoder/config.json` the network needs (transformers' `CLIPTextConfig`).
#[derive(Debug, Clone, PartialEq)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    /// `quick_gelu` (SD 1.x, OpenAI CLIP) or `gelu` (SD 2.x, OpenCLIP).
    pub hidden_act: Activation,
    pub layer_norm_eps: f64,
}

impl Default for ClipTextConfig {
    /// transformers' defaults (openai/clip-vit-base-patch32's text tower).
    fn default() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 512,
            intermediate_size: 2048,
            num_hidden_layers: 12,
            num_attention_heads: 8,
            max_position_embeddings: 77,
            hidden_act: Activation::QuickGelu,
            layer_norm_eps: 1e-5,
        }
    }
}

/// `config.json` as written; fields absent from the file take transformers' defaults.
#[derive(serde::Deserialize)]
#[serde(default)]
struct RawConfig {
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    max_position_embeddings: usize,
    hidden_act: String,
    layer_norm_eps: f64,
}

impl Default for RawConfig {
    fn default() -> Self {
        let d = ClipTextConfig::default();
        Self {
            vocab_size: d.vocab_size,
            hidden_size: d.hidden_size,
            intermediate_size: d.intermediate_size,
            num_hidden_layers: d.num_hidden_layers,
            num_attention_heads: d.num_attention_heads,
            max_position_embeddings: d.max_position_embeddings,
            hidden_act: "quick_gelu".to_string(),
            layer_norm_eps: d.layer_norm_eps,
        }
    }
}

impl ClipTextConfig {
    /// Reads and validates a text encoder's `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        Self::check(path, read_json(path)?)
    }

    /// Validates a config given as JSON (e.g. one inferred from a single-file checkpoint);
    /// `path` names where it came from in errors.
    pub fn from_json(path: &Path, json: serde_json::Value) -> Result<Self> {
        Self::check(path, from_json_value(path, json)?)
    }

    fn check(path: &Path, raw: RawConfig) -> Result<Self> {
        let hidden_act = match raw.hidden_act.as_str() {
            "quick_gelu" => Activation::QuickGelu,
            "gelu" => Activation::Gelu,
            other => {
                return Err(Error::config(
                    path,
                    "hidden_act",
                    format!("unsupported activation `{other}` (expected `quick_gelu` or `gelu`)"),
                ))
            }
        };
        let positive = [
            ("vocab_size", raw.vocab_size),
            ("hidden_size", raw.hidden_size),
            ("intermediate_size", raw.intermediate_size),
            ("num_hidden_layers", raw.num_hidden_layers),
            ("num_attention_heads", raw.num_attention_heads),
            ("max_position_embeddings", raw.max_position_embeddings),
        ];
        for (field, value) in positive {
            if value == 0 {
                return Err(Error::config(path, field, "must be at least 1"));
            }
        }
        if !raw.hidden_size.is_multiple_of(raw.num_attention_heads) {
            return Err(Error::config(
                path,
                "num_attention_heads",
                format!(
                    "hidden_size {} is not a multiple of {} heads",
                    raw.hidden_size, raw.num_attention_heads
                ),
            ));
        }
        if !(raw.layer_norm_eps.is_finite() && raw.layer_norm_eps > 0.0) {
            return Err(Error::config(
                path,
                "layer_norm_eps",
                format!("must be positive, got {}", raw.layer_norm_eps),
            ));
        }
        Ok(Self {
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: raw.num_attention_heads,
            max_position_embeddings: raw.max_position_embeddings,
            hidden_act,
            layer_norm_eps: raw.layer_norm_eps,
        })
    }
}

/// `CLIPAttention`: multi-head self-attention.
#[derive(Debug, Clone)]
struct ClipAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    heads: usize,
}

impl ClipAttention {
    fn new(vb: VarBuilder, cfg: &ClipTextConfig) -> candle_core::Result<Self> {
        let c = cfg.hidden_size;
        Ok(Self {
            q_proj: linear::linear(c, c, vb.pp("q_proj"))?,
            k_proj: linear::linear(c, c, vb.pp("k_proj"))?,
            v_proj: linear::linear(c, c, vb.pp("v_proj"))?,
            out_proj: linear::linear(c, c, vb.pp("out_proj"))?,
            heads: cfg.num_attention_heads,
        })
    }

    /// `xs`: [b, n, c]; `mask`: [n, n], added to the attention scores.
    fn forward(&self, xs: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
        let q = split_heads(&self.q_proj.forward(xs)?, self.heads)?; // [b, heads, n, d]
        let k = split_heads(&self.k_proj.forward(xs)?, self.heads)?;
        let v = split_heads(&self.v_proj.forward(xs)?, self.heads)?;
        let out = attention(&q, &k, &v, Some(mask))?; // [b, heads, n, d]
        self.out_proj.forward(&merge_heads(&out)?) // [b, n, c]
    }
}

/// `CLIPMLP`: fc1 -> activation -> fc2.
#[derive(Debug, Clone)]
struct ClipMlp {
    fc1: Linear,
    fc2: Linear,
    act: Activation,
}

impl ClipMlp {
    fn new(vb: VarBuilder, cfg: &ClipTextConfig) -> candle_core::Result<Self> {
        Ok(Self {
            fc1: linear::linear(cfg.hidden_size, cfg.intermediate_size, vb.pp("fc1"))?,
            fc2: linear::linear(cfg.intermediate_size, cfg.hidden_size, vb.pp("fc2"))?,
            act: cfg.hidden_act,
        })
    }

    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        self.fc2.forward(&self.act.forward(&self.fc1.forward(xs)?)?)
    }
}

/// `CLIPEncoderLayer`: pre-norm attention and MLP blocks, each with a residual.
#[derive(Debug, Clone)]
struct ClipEncoderLayer {
    self_attn: ClipAttention,
    layer_norm1: LayerNorm,
    mlp: ClipMlp,
    layer_norm2: LayerNorm,
}

impl ClipEncoderLayer {
    fn new(vb: VarBuilder, cfg: &ClipTextConfig) -> candle_core::Result<Self> {
        let (c, eps) = (cfg.hidden_size, cfg.layer_norm_eps);
        Ok(Self {
            self_attn: ClipAttention::new(vb.pp("self_attn"), cfg)?,
            layer_norm1: LayerNorm::new(c, eps, vb.pp("layer_norm1"))?,
            mlp: ClipMlp::new(vb.pp("mlp"), cfg)?,
            layer_norm2: LayerNorm::new(c, eps, vb.pp("layer_norm2"))?,
        })
    }

    fn forward(&self, xs: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
        let xs = (xs
            + self
                .self_attn
                .forward(&self.layer_norm1.forward(xs)?, mask)?)?;
        &xs + self.mlp.forward(&self.layer_norm2.forward(&xs)?)?
    }
}

/// transformers' `CLIPTextModel` (without the pooled output, which Stable Diffusion does not use).
#[derive(Debug, Clone)]
pub struct ClipTextModel {
    token_embedding: Embedding,
    position_embedding: Tensor, // [max_positions, c]
    layers: Vec<ClipEncoderLayer>,
    final_layer_norm: LayerNorm,
    vocab_size: usize,
}

impl ClipTextModel {
    /// Builds the network from `vb` at the root of the weights file; tensors may be prefixed with
    /// `text_model.` or not (see the module doc).
    pub fn new(vb: VarBuilder, cfg: &ClipTextConfig) -> candle_core::Result<Self> {
        let vb = if vb.contains_tensor("text_model.embeddings.token_embedding.weight") {
            vb.pp("text_model")
        } else {
            vb
        };
        let c = cfg.hidden_size;
        let emb = vb.pp("embeddings");
        // Older files also store the non-persistent buffer `position_ids` (always 0..n); it carries
        // no information, but taking it keeps `ensure_all_used` from reporting it.
        if emb.contains_tensor("position_ids") {
            emb.get_unchecked_dtype("position_ids", DType::I64)?;
        }
        let token_embedding = candle_nn::embedding(cfg.vocab_size, c, emb.pp("token_embedding"))?;
        // From scratch: N(0, 0.02), CLIP's own initialisation.
        let init = candle_nn::Init::Randn {
            mean: 0.0,
            stdev: 0.02,
        };
        let position_embedding = emb.pp("position_embedding").get_with_hints(
            (cfg.max_position_embeddings, c),
            "weight",
            init,
        )?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| ClipEncoderLayer::new(vb.pp(format!("encoder.layers.{i}")), cfg))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let final_layer_norm = LayerNorm::new(c, cfg.layer_norm_eps, vb.pp("final_layer_norm"))?;
        Ok(Self {
            token_embedding,
            position_embedding,
            layers,
            final_layer_norm,
            vocab_size: cfg.vocab_size,
        })
    }

    /// Reads `dir/config.json` and the weights in `dir` (a pipeline's `text_encoder/` folder),
    /// builds the network in `dtype` on `device`, and fails if the file holds tensors it does not use.
    pub fn load(
        dir: &Path,
        variant: Option<&str>,
        dtype: DType,
        device: &Device,
    ) -> Result<(Self, ClipTextConfig)> {
        let cfg = ClipTextConfig::from_file(&dir.join("config.json"))?;
        let model = WeightStore::open(dir, variant, device)?
            .build(dtype, device, |vb| Self::new(vb, &cfg))?;
        Ok((model, cfg))
    }

    /// `last_hidden_state`: [b, n, c] for `input_ids` [b, n] (u32, n <= max_position_embeddings).
    pub fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        self.forward_with_skip(input_ids, 0)
    }

    /// What diffusers' `StableDiffusionPipeline` feeds the UNet for `clip_skip`: the hidden states
    /// `clip_skip` layers before the last (`hidden_states[-(clip_skip + 1)]`) through
    /// `final_layer_norm`. `clip_skip = 0` is the plain `last_hidden_state`.
    pub fn forward_with_skip(&self, input_ids: &Tensor, clip_skip: usize) -> Result<Tensor> {
        let layers = self.layers.len();
        if clip_skip > layers {
            return Err(Error::argument(
                "clip_skip",
                format!("{clip_skip} exceeds the text encoder's {layers} layers"),
            ));
        }
        let mut xs = self.embed(input_ids)?; // [b, n, c]
        let mask = causal_mask(xs.dim(1)?, xs.dtype(), xs.device())?; // [n, n]

        // Layers after the requested one cannot affect it: skip them.
        for layer in &self.layers[..layers - clip_skip] {
            xs = layer.forward(&xs, &mask)?;
        }
        Ok(self.final_layer_norm.forward(&xs)?)
    }

    /// Token plus position embeddings: [b, n, c].
    fn embed(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (_, n) = input_ids.dims2().map_err(|_| {
            Error::argument(
                "input_ids",
                format!("expected [batch, tokens], got {:?}", input_ids.dims()),
            )
        })?;
        if input_ids.dtype() != DType::U32 {
            return Err(Error::argument(
                "input_ids",
                format!("expected u32 token ids, got {:?}", input_ids.dtype()),
            ));
        }
        let max_positions = self.position_embedding.dim(0)?;
        if n == 0 || n > max_positions {
            return Err(Error::argument(
                "input_ids",
                format!("{n} tokens; the text encoder takes 1 to {max_positions} (max_position_embeddings)"),
            ));
        }
        // An id past the table would be an error on CPU but undefined on GPU: check it here.
        let max_id = input_ids.flatten_all()?.max(0)?.to_scalar::<u32>()? as usize;
        if max_id >= self.vocab_size {
            return Err(Error::argument(
                "input_ids",
                format!(
                    "token id {max_id} is outside the vocabulary of {} tokens",
                    self.vocab_size
                ),
            ));
        }
        let tokens = self.token_embedding.forward(input_ids)?; // [b, n, c]
        Ok(tokens.broadcast_add(&self.position_embedding.narrow(0, 0, n)?)?)
    }
}

/// Additive causal mask [n, n]: 0 on and below the diagonal, -inf above (a token sees only
/// itself and the tokens before it).
fn causal_mask(n: usize, dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
    let mask: Vec<f32> = (0..n)
        .flat_map(|i| (0..n).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(mask, (n, n), device)?.to_dtype(dtype)
}

/// A candle error raised while building from `store`, as our weights error for its file. The
/// store's own messages already start with the file name; it is not repeated.
#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::path::PathBuf;
    use std::sync::Arc;

    use super::*;

    fn fixture(rel: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures")
            .join(rel)
    }

    fn reference() -> HashMap<String, Tensor> {
        candle_core::safetensors::load(fixture("ref/clip.safetensors"), &Device::Cpu).unwrap()
    }

    fn input_ids(reference: &HashMap<String, Tensor>) -> Tensor {
        reference["input_ids"].to_dtype(DType::U32).unwrap()
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        assert_eq!(a.dims(), b.dims());
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    fn max_abs(a: &Tensor) -> f32 {
        a.abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    fn tempdir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("unitune-clip-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn reads_both_fixture_configs() {
        let sd1 = ClipTextConfig::from_file(&fixture("tiny-sd1/text_encoder/config.json")).unwrap();
        let sd2 = ClipTextConfig::from_file(&fixture("tiny-sd2/text_encoder/config.json")).unwrap();
        let expected = ClipTextConfig {
            vocab_size: 4514,
            hidden_size: 32,
            intermediate_size: 37,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            max_position_embeddings: 77,
            hidden_act: Activation::QuickGelu,
            layer_norm_eps: 1e-5,
        };
        assert_eq!(sd1, expected);
        assert_eq!(
            sd2,
            ClipTextConfig {
                hidden_act: Activation::Gelu,
                ..expected
            }
        );
    }

    #[test]
    fn matches_transformers_last_hidden_state_and_clip_skip() {
        let r = reference();
        let ids = input_ids(&r);
        for name in ["sd1", "sd2"] {
            let (model, _) = ClipTextModel::load(
                &fixture(&format!("tiny-{name}/text_encoder")),
                None,
                DType::F32,
                &Device::Cpu,
            )
            .unwrap();
            let last = model.forward(&ids).unwrap();
            let skip1 = model.forward_with_skip(&ids, 1).unwrap();
            let d_last = max_abs_diff(&last, &r[&format!("{name}.last_hidden_state")]);
            let d_skip = max_abs_diff(&skip1, &r[&format!("{name}.clip_skip1")]);
            eprintln!("{name}: max |diff| last_hidden_state {d_last:e}, clip_skip=1 {d_skip:e}");
            assert!(
                d_last <= 1e-4 && d_skip <= 1e-4,
                "{name}: {d_last} {d_skip}"
            );
            // clip_skip must change the result, or the comparison above proves nothing about it.
            assert!(max_abs_diff(&last, &skip1) > 1e-2);
        }
    }

    #[test]
    fn token_embedding_gradient_matches_torch() {
        let r = reference();
        let ids = input_ids(&r);
        let grad_ids = r["grad_ids"].to_dtype(DType::U32).unwrap();
        for name in ["sd1", "sd2"] {
            let dir = fixture(&format!("tiny-{name}/text_encoder"));
            let cfg = ClipTextConfig::from_file(&dir.join("config.json")).unwrap();
            let store = WeightStore::open(&dir, None, &Device::Cpu)
                .unwrap()
                .with_trainable(Arc::new(|n: &str| n == "embeddings.token_embedding.weight"));
            let model =
                ClipTextModel::new(store.var_builder(DType::F32, &Device::Cpu), &cfg).unwrap();
            let loss = (model.forward(&ids).unwrap() * &r["loss_weight"])
                .unwrap()
                .sum_all()
                .unwrap();
            let vars = store.trainable_vars();
            assert_eq!(vars.len(), 1);
            let grad = loss
                .backward()
                .unwrap()
                .get(vars[0].1.as_tensor())
                .expect("no gradient")
                .clone();
            let rows = grad.index_select(&grad_ids, 0).unwrap();
            let expected = &r[&format!("{name}.grad_rows")];
            let rel = max_abs_diff(&rows, expected) / max_abs(expected);
            eprintln!("{name}: token embedding gradient, max |diff| / max |grad| {rel:e}");
            assert!(rel <= 1e-3, "{name}: {rel}");
            // Rows of tokens not in the prompt get nothing (torch checked the same in dev/ref_clip.py).
            let used: Vec<u32> = grad_ids.to_vec1().unwrap();
            let unused: Vec<u32> = (0..cfg.vocab_size as u32)
                .filter(|i| !used.contains(i))
                .collect();
            let unused = Tensor::new(unused, &Device::Cpu).unwrap();
            assert_eq!(max_abs(&grad.index_select(&unused, 0).unwrap()), 0.0);
        }
    }

    #[test]
    fn every_parameter_gets_a_gradient() {
        let dir = fixture("tiny-sd1/text_encoder");
        let cfg = ClipTextConfig::from_file(&dir.join("config.json")).unwrap();
        let store = WeightStore::open(&dir, None, &Device::Cpu)
            .unwrap()
            .with_trainable(Arc::new(|_: &str| true));
        let model = ClipTextModel::new(store.var_builder(DType::F32, &Device::Cpu), &cfg).unwrap();
        store.ensure_all_used().unwrap();
        let r = reference();
        let loss = (model.forward(&input_ids(&r)).unwrap() * &r["loss_weight"])
            .unwrap()
            .sum_all()
            .unwrap();
        let grads = loss.backward().unwrap();
        let vars = store.trainable_vars();
        assert_eq!(vars.len(), store.tensors().len());
        for (name, var) in vars {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("no gradient for `{name}`"));
            assert!(max_abs(g) > 0.0, "zero gradient for `{name}`");
        }
    }

    #[test]
    fn loads_text_model_prefixed_keys_with_position_ids() {
        // The layout of published SD checkpoints (transformers 4.x), with the position_ids buffer.
        let r = reference();
        let dir = fixture("tiny-sd2/text_encoder");
        let cfg = ClipTextConfig::from_file(&dir.join("config.json")).unwrap();
        let plain = WeightStore::open(&dir, None, &Device::Cpu).unwrap();
        let mut tensors: HashMap<String, Tensor> = plain
            .tensors()
            .iter()
            .map(|(k, v)| (format!("text_model.{k}"), v.clone()))
            .collect();
        let position_ids = Tensor::arange(0i64, 77, &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        tensors.insert(
            "text_model.embeddings.position_ids".to_string(),
            position_ids,
        );
        let store = WeightStore::from_tensors("old.safetensors", tensors);
        let model = ClipTextModel::new(store.var_builder(DType::F32, &Device::Cpu), &cfg).unwrap();
        store.ensure_all_used().unwrap();
        let out = model.forward(&input_ids(&r)).unwrap();
        assert!(max_abs_diff(&out, &r["sd2.last_hidden_state"]) <= 1e-4);
    }

    #[test]
    fn half_precision_stays_close_to_f32() {
        let r = reference();
        let (model, _) = ClipTextModel::load(
            &fixture("tiny-sd1/text_encoder"),
            None,
            DType::F16,
            &Device::Cpu,
        )
        .unwrap();
        let out = model.forward(&input_ids(&r)).unwrap();
        assert_eq!(out.dtype(), DType::F16);
        let diff = max_abs_diff(
            &out.to_dtype(DType::F32).unwrap(),
            &r["sd1.last_hidden_state"],
        );
        assert!(diff.is_finite() && diff < 2e-2, "{diff}");
    }

    #[test]
    fn unsupported_activation_and_bad_head_count_name_the_field() {
        let dir = tempdir("config");
        let base: serde_json::Value =
            read_json(&fixture("tiny-sd1/text_encoder/config.json")).unwrap();
        let write = |key: &str, value: serde_json::Value| {
            let mut cfg = base.clone();
            cfg[key] = value;
            let path = dir.join(format!("{key}.json"));
            std::fs::write(&path, cfg.to_string()).unwrap();
            path
        };
        let path = write("hidden_act", "relu".into());
        let err = ClipTextConfig::from_file(&path).unwrap_err().to_string();
        assert!(
            err.contains(&path.display().to_string())
                && err.contains("`hidden_act`")
                && err.contains("relu"),
            "{err}"
        );
        let err = ClipTextConfig::from_file(&write("num_attention_heads", 5.into()))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`num_attention_heads`") && err.contains("multiple"),
            "{err}"
        );
        let err = ClipTextConfig::from_file(&write("hidden_size", 0.into()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("`hidden_size`"), "{err}");
        // Absent fields take transformers' defaults; unrelated ones are ignored.
        let path = dir.join("minimal.json");
        std::fs::write(
            &path,
            r#"{"hidden_act": "gelu", "projection_dim": 1024, "torch_dtype": "float16"}"#,
        )
        .unwrap();
        let cfg = ClipTextConfig::from_file(&path).unwrap();
        assert_eq!(
            cfg,
            ClipTextConfig {
                hidden_act: Activation::Gelu,
                ..ClipTextConfig::default()
            }
        );
    }

    #[test]
    fn missing_and_unexpected_tensors_are_errors_naming_file_and_key() {
        let src = fixture("tiny-sd1/text_encoder");
        let full = WeightStore::open(&src, None, &Device::Cpu)
            .unwrap()
            .tensors()
            .clone();
        let write_folder = |name: &str, tensors: &HashMap<String, Tensor>| {
            let dir = tempdir(name);
            std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
            candle_core::safetensors::save(tensors, dir.join("model.safetensors")).unwrap();
            dir
        };
        let key = "encoder.layers.1.mlp.fc2.bias";
        let mut missing = full.clone();
        missing.remove(key);
        let dir = write_folder("missing", &missing);
        let err = ClipTextModel::load(&dir, None, DType::F32, &Device::Cpu)
            .err()
            .unwrap();
        assert!(matches!(err, Error::Weights { .. }), "{err:?}");
        let err = err.to_string();
        let file = dir.join("model.safetensors").display().to_string();
        assert!(
            err.contains(&file) && err.contains(&format!("`{key}`")),
            "{err}"
        );
        assert_eq!(err.matches(&file).count(), 1, "{err}");

        let mut extra = full;
        extra.insert(
            "text_projection.weight".to_string(),
            Tensor::zeros((32, 32), DType::F32, &Device::Cpu).unwrap(),
        );
        let dir = write_folder("extra", &extra);
        let err = ClipTextModel::load(&dir, None, DType::F32, &Device::Cpu)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("`text_projection.weight`") && err.contains("unexpected"),
            "{err}"
        );
    }

    #[test]
    fn bad_inputs_are_argument_errors() {
        let (model, _) = ClipTextModel::load(
            &fixture("tiny-sd1/text_encoder"),
            None,
            DType::F32,
            &Device::Cpu,
        )
        .unwrap();
        let ids = |v: Vec<u32>| Tensor::new(v, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let err = model
            .forward_with_skip(&ids(vec![4512, 4513]), 3)
            .unwrap_err()
            .to_string();
        assert!(err.contains("clip_skip"), "{err}");
        // clip_skip = number of layers is the embeddings themselves, through final_layer_norm.
        model.forward_with_skip(&ids(vec![4512, 4513]), 2).unwrap();
        let err = model.forward(&ids(vec![4514])).unwrap_err().to_string();
        assert!(err.contains("input_ids") && err.contains("4514"), "{err}");
        let err = model.forward(&ids(vec![1; 78])).unwrap_err().to_string();
        assert!(err.contains("78 tokens"), "{err}");
        let err = model
            .forward(&Tensor::new(&[[1i64, 2]], &Device::Cpu).unwrap())
            .unwrap_err()
            .to_string();
        assert!(err.contains("u32"), "{err}");
    }

    #[test]
    fn causal_mask_hides_later_tokens() {
        let r = reference();
        let (model, _) = ClipTextModel::load(
            &fixture("tiny-sd1/text_encoder"),
            None,
            DType::F32,
            &Device::Cpu,
        )
        .unwrap();
        let ids = input_ids(&r).narrow(0, 1, 1).unwrap(); // [1, 77]
        let prefix = model.forward(&ids.narrow(1, 0, 10).unwrap()).unwrap();
        let full = model.forward(&ids).unwrap().narrow(1, 0, 10).unwrap();
        assert!(max_abs_diff(&prefix, &full) < 1e-5);
        let mask: Vec<Vec<f32>> = causal_mask(3, DType::F32, &Device::Cpu)
            .unwrap()
            .to_vec2()
            .unwrap();
        assert_eq!(mask[1], vec![0.0, 0.0, f32::NEG_INFINITY]);
    }
}
