//! Weights and model folders. This file reads the weights of one pipeline component (`unet/`,
//! `vae/`, `text_encoder/`) from safetensors files; [`folder`] checks a folder's
//! `model_index.json`, [`hub`] finds a repo id in the Hugging Face cache (offline),
//! [`single_file`] reads a whole pipeline from one checkpoint file in the original Stable
//! Diffusion layout, and [`export`] writes a whole pipeline folder (diffusers' `save_pretrained`).
//!
//! A [`WeightStore`] is handed to a network's constructor through candle's `VarBuilder`. It checks
//! every request against the file (a missing tensor or a wrong shape is an error naming the file and
//! key, never a silent random init), records which tensors were taken so that leftovers can be
//! reported as unexpected, and turns the tensors chosen for training into `Var`s on the way.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::VarBuilder;

pub mod export;
pub mod folder;
pub mod hub;
pub mod lora;
pub mod single_file;

use crate::error::{read_json, Error, Result};

/// File stems diffusers and transformers use for a component's weights.
const STEMS: [&str; 2] = ["diffusion_pytorch_model", "model"];
pub(crate) const PICKLE_EXTENSIONS: [&str; 4] = ["bin", "ckpt", "pt", "pth"];

/// The safetensors files holding one component's weights, in `dir`.
///
/// Order of preference: the full-precision file, then its sharded form (`*.safetensors.index.json`),
/// then the same for the requested or only available `variant` (e.g. `fp16`, files named
/// `model.fp16.safetensors`). With `variant` set, only that variant is accepted, as in diffusers.
pub fn find_weight_files(dir: &Path, variant: Option<&str>) -> Result<Vec<PathBuf>> {
    if !dir.is_dir() {
        return Err(Error::weights(dir, "component folder not found"));
    }
    let variants: Vec<Option<&str>> = match variant {
        Some(v) => vec![Some(v)],
        None => vec![None, Some("fp16")],
    };
    for variant in variants {
        for stem in STEMS {
            let infix = variant.map(|v| format!(".{v}")).unwrap_or_default();
            let single = dir.join(format!("{stem}{infix}.safetensors"));
            if single.is_file() {
                return Ok(vec![single]);
            }
            // diffusers writes `name.safetensors.index.fp16.json` for sharded variants.
            let index = dir.join(format!("{stem}.safetensors.index{infix}.json"));
            if index.is_file() {
                return shard_files(&index);
            }
        }
    }
    let pickles: Vec<String> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.extension()
                .and_then(|x| x.to_str())
                .is_some_and(|x| PICKLE_EXTENSIONS.contains(&x))
        })
        .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .collect();
    let wanted = match variant {
        Some(v) => format!("`model.{v}.safetensors` or `diffusion_pytorch_model.{v}.safetensors`"),
        None => "`model.safetensors` or `diffusion_pytorch_model.safetensors`".to_string(),
    };
    let message = if pickles.is_empty() {
        format!("no weights found: expected {wanted} (or a sharded `.safetensors.index.json`)")
    } else {
        format!(
            "only pickle weights found ({}): unitune requires safetensors; convert the model \
             (e.g. diffusers' `save_pretrained(..., safe_serialization=True)`)",
            pickles.join(", ")
        )
    };
    Err(Error::weights(dir, message))
}

#[derive(serde::Deserialize)]
struct ShardIndex {
    weight_map: HashMap<String, String>,
}

/// The shard files named by a `*.safetensors.index.json`, each once, in a stable order.
fn shard_files(index: &Path) -> Result<Vec<PathBuf>> {
    let parsed: ShardIndex = read_json(index)?;
    let dir = index.parent().unwrap_or(Path::new("."));
    if parsed.weight_map.is_empty() {
        return Err(Error::config(index, "weight_map", "lists no tensor"));
    }
    let mut names: Vec<&String> = parsed.weight_map.values().collect();
    names.sort();
    names.dedup();
    names
        .into_iter()
        .map(|name| {
            // A shard is a file beside the index: no folders, so an index cannot reach outside.
            if Path::new(name).file_name() != Some(std::ffi::OsStr::new(name)) {
                return Err(Error::config(
                    index,
                    "weight_map",
                    format!("shard `{name}` is not a file name in this folder"),
                ));
            }
            let path = dir.join(name);
            if path.is_file() {
                Ok(path)
            } else {
                Err(Error::weights(
                    index,
                    format!("shard `{name}` listed in weight_map is missing"),
                ))
            }
        })
        .collect()
}

/// Reads safetensors files into one map of tensors on `device`, as stored (dtype unchanged).
/// Every tensor must be a float tensor of finite values: an integer or boolean tensor in a
/// weights file means a quantized or foreign format, which converting would silently turn into
/// garbage, and a NaN or infinity would only show as a black image much later.
pub fn read_safetensors(files: &[PathBuf], device: &Device) -> Result<HashMap<String, Tensor>> {
    let mut all = HashMap::new();
    for path in files {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        // The safetensors crate bounds the header (100 MB) and checks every tensor's offsets and
        // shape (overflow included) against the file before any tensor is made.
        let file = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| {
            Error::weights(
                path,
                format!("not a readable safetensors file (corrupt or truncated?): {e}"),
            )
        })?;
        for (name, view) in file.tensors() {
            let dtype = float_dtype(path, &name, &view)?;
            let tensor = Tensor::from_raw_buffer(view.data(), dtype, view.shape(), device)
                .map_err(|e| Error::weights(path, format!("tensor `{name}`: {e}")))?;
            if all.insert(name.clone(), tensor).is_some() {
                return Err(Error::weights(
                    path,
                    format!("tensor `{name}` appears in two shards"),
                ));
            }
        }
    }
    Ok(all)
}

/// The dtype of a float tensor of finite values; any other is refused (see [`read_safetensors`]).
pub(crate) fn float_dtype(
    path: &Path,
    name: &str,
    view: &safetensors::tensor::TensorView,
) -> Result<DType> {
    use safetensors::Dtype;
    let data = view.data();
    let dtype = match view.dtype() {
        Dtype::F32 => DType::F32,
        Dtype::F16 => DType::F16,
        Dtype::BF16 => DType::BF16,
        Dtype::F64 => DType::F64,
        other => {
            return Err(Error::weights(
                path,
                format!(
                    "tensor `{name}` is stored as {other:?}; unitune reads float weights only \
                     (F32, F16, BF16, F64): is this a quantized or non-diffusers file?"
                ),
            ))
        }
    };
    let bad = match view.dtype() {
        Dtype::F32 => data
            .chunks_exact(4)
            .position(|b| !f32::from_le_bytes([b[0], b[1], b[2], b[3]]).is_finite()),
        Dtype::F16 => data
            .chunks_exact(2)
            .position(|b| !half::f16::from_le_bytes([b[0], b[1]]).is_finite()),
        Dtype::BF16 => data
            .chunks_exact(2)
            .position(|b| !half::bf16::from_le_bytes([b[0], b[1]]).is_finite()),
        _ => data
            .chunks_exact(8)
            .position(|b| !f64::from_le_bytes(b.try_into().expect("chunks of 8")).is_finite()),
    };
    match bad {
        Some(i) => Err(Error::weights(
            path,
            format!("tensor `{name}` holds a NaN or infinity (element {i}): the file is corrupt"),
        )),
        None => Ok(dtype),
    }
}

/// Which tensors become trainable `Var`s, by their full name (e.g. `down_blocks.0.attentions.0...`).
pub type TrainableFilter = Arc<dyn Fn(&str) -> bool + Send + Sync>;

/// Tensors of one component, shared by the `VarBuilder` that reads them and the loader that checks
/// afterwards that all were used.
#[derive(Clone)]
pub struct WeightStore {
    inner: Arc<Inner>,
}

struct Inner {
    /// Where the tensors came from, for error messages.
    origin: PathBuf,
    tensors: HashMap<String, Tensor>,
    /// The name a tensor has in its file, where that differs (a single-file checkpoint's names
    /// are converted to diffusers'), for error messages.
    file_names: HashMap<String, String>,
    used: Mutex<HashSet<String>>,
    trainable: Option<TrainableFilter>,
    vars: Mutex<Vec<(String, Var)>>,
}

impl WeightStore {
    /// Opens the weights in component folder `dir` (see [`find_weight_files`]).
    pub fn open(dir: &Path, variant: Option<&str>, device: &Device) -> Result<Self> {
        let files = find_weight_files(dir, variant)?;
        let origin = if files.len() == 1 {
            files[0].clone()
        } else {
            dir.to_path_buf()
        };
        Ok(Self::from_tensors(
            origin,
            read_safetensors(&files, device)?,
        ))
    }

    pub fn from_tensors(origin: impl Into<PathBuf>, tensors: HashMap<String, Tensor>) -> Self {
        Self {
            inner: Arc::new(Inner {
                origin: origin.into(),
                tensors,
                file_names: HashMap::new(),
                used: Mutex::default(),
                trainable: None,
                vars: Mutex::default(),
            }),
        }
    }

    /// Makes the tensors accepted by `filter` trainable. Call before building the network.
    pub fn with_trainable(mut self, filter: TrainableFilter) -> Self {
        Arc::get_mut(&mut self.inner)
            .expect("with_trainable is called on a fresh store, before any VarBuilder shares it")
            .trainable = Some(filter);
        self
    }

    /// Records the name each tensor has in its file (see `Inner::file_names`), for messages.
    pub fn with_file_names(mut self, names: HashMap<String, String>) -> Self {
        Arc::get_mut(&mut self.inner)
            .expect("with_file_names is called on a fresh store, before any VarBuilder shares it")
            .file_names = names;
        self
    }

    /// What the network's architecture came from, as messages name it: a component's
    /// `config.json`, or the configs of a single file (inferred, or from `--config`).
    fn config_name(&self) -> &'static str {
        match self.inner.file_names.is_empty() {
            true => "config.json",
            false => "the model's config",
        }
    }

    /// `name` as messages show it: quoted, with its name in the file when that differs.
    fn describe(&self, name: &str) -> String {
        match self.inner.file_names.get(name) {
            Some(in_file) => format!("`{name}` (`{in_file}` in the file)"),
            None => format!("`{name}`"),
        }
    }

    pub fn origin(&self) -> &Path {
        &self.inner.origin
    }

    /// All tensors as stored in the file(s).
    pub fn tensors(&self) -> &HashMap<String, Tensor> {
        &self.inner.tensors
    }

    /// A `VarBuilder` reading from this store, converting to `dtype` on `device`.
    pub fn var_builder(&self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self.clone()), dtype, device.clone())
    }

    /// Builds a network with `new` from this store, then checks that it used every stored tensor.
    /// A build failure (missing tensor, wrong shape) becomes a weights error for this store's file.
    pub fn build<M>(
        &self,
        dtype: DType,
        device: &Device,
        new: impl FnOnce(VarBuilder<'static>) -> candle_core::Result<M>,
    ) -> Result<M> {
        let model = new(self.var_builder(dtype, device)).map_err(|err| {
            // Our backend's messages already start with the path: keep it once.
            let origin = format!("{}: ", self.inner.origin.display());
            let message = err.to_string();
            let message = message
                .strip_prefix(&origin)
                .map(str::to_string)
                .unwrap_or(message);
            Error::weights(&self.inner.origin, message)
        })?;
        self.ensure_all_used()?;
        Ok(model)
    }

    /// Fails if the file holds tensors the network did not ask for: the config and the weights
    /// disagree (wrong `config.json`, or weights of another architecture).
    pub fn ensure_all_used(&self) -> Result<()> {
        let used = self.inner.used.lock().expect("weight store lock");
        let mut extra: Vec<&String> = self
            .inner
            .tensors
            .keys()
            .filter(|k| !used.contains(*k))
            .collect();
        if extra.is_empty() {
            return Ok(());
        }
        extra.sort();
        let shown: Vec<String> = extra.iter().take(5).map(|k| self.describe(k)).collect();
        Err(Error::weights(
            &self.inner.origin,
            format!(
                "{} unexpected tensor(s) the model does not use, e.g. {}: does {} match these weights?",
                extra.len(),
                shown.join(", "),
                self.config_name()
            ),
        ))
    }

    /// The trainable variables created while building, by name, in creation order.
    pub fn trainable_vars(&self) -> Vec<(String, Var)> {
        self.inner.vars.lock().expect("weight store lock").clone()
    }
}

impl candle_nn::var_builder::SimpleBackend for WeightStore {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _init: candle_nn::Init,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let tensor = self.get_unchecked(name, dtype, device)?;
        if tensor.shape() != &shape {
            candle_core::bail!(
                "{}: tensor {} has shape {:?}, but {} implies {:?}",
                self.inner.origin.display(),
                self.describe(name),
                tensor.dims(),
                self.config_name(),
                shape.dims()
            );
        }
        Ok(tensor)
    }

    fn get_unchecked(
        &self,
        name: &str,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let Some(stored) = self.inner.tensors.get(name) else {
            candle_core::bail!("{}: missing tensor `{name}`", self.inner.origin.display());
        };
        self.inner
            .used
            .lock()
            .expect("weight store lock")
            .insert(name.to_string());
        let tensor = stored.to_dtype(dtype)?.to_device(device)?;
        match &self.inner.trainable {
            Some(filter) if filter(name) => {
                let mut vars = self.inner.vars.lock().expect("weight store lock");
                // A network may ask for the same tensor twice (tied weights): share one Var.
                if let Some((_, var)) = vars.iter().find(|(n, _)| n == name) {
                    return Ok(var.as_tensor().clone());
                }
                let var = Var::from_tensor(&tensor)?;
                vars.push((name.to_string(), var.clone()));
                Ok(var.as_tensor().clone())
            }
            _ => Ok(tensor),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.inner.tensors.contains_key(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(rel: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures")
            .join(rel)
    }

    #[test]
    fn finds_single_sharded_and_fp16_files() {
        let single = find_weight_files(&fixture("tiny-sd1/unet"), None).unwrap();
        assert_eq!(
            single,
            vec![fixture("tiny-sd1/unet/diffusion_pytorch_model.safetensors")]
        );
        let sharded = find_weight_files(&fixture("tiny-sd2/unet"), None).unwrap();
        assert_eq!(sharded.len(), 4);
        assert!(sharded
            .iter()
            .all(|p| p.to_string_lossy().contains("-of-00004")));
        let fp16 = find_weight_files(&fixture("tiny-sd2/vae"), None).unwrap();
        assert!(fp16[0].ends_with("diffusion_pytorch_model.fp16.safetensors"));
        // Asking for a variant that is not there is an error, not a fallback.
        let err = find_weight_files(&fixture("tiny-sd1/unet"), Some("fp16")).unwrap_err();
        assert!(err.to_string().contains("fp16"), "{err}");
    }

    #[test]
    fn sharded_weights_load_every_tensor_once() {
        let store = WeightStore::open(&fixture("tiny-sd2/unet"), None, &Device::Cpu).unwrap();
        let index: ShardIndex = read_json(&fixture(
            "tiny-sd2/unet/diffusion_pytorch_model.safetensors.index.json",
        ))
        .unwrap();
        let mut loaded: Vec<&String> = store.tensors().keys().collect();
        let mut listed: Vec<&String> = index.weight_map.keys().collect();
        loaded.sort();
        listed.sort();
        assert_eq!(loaded, listed);
    }

    #[test]
    fn pickle_only_folder_is_refused_with_a_hint() {
        let dir = tempdir("pickle");
        std::fs::write(dir.join("diffusion_pytorch_model.bin"), b"not really").unwrap();
        let err = find_weight_files(&dir, None).unwrap_err().to_string();
        assert!(
            err.contains("diffusion_pytorch_model.bin") && err.contains("safetensors"),
            "{err}"
        );
    }

    #[test]
    fn truncated_file_is_an_error_naming_it() {
        let dir = tempdir("truncated");
        let src =
            std::fs::read(fixture("tiny-sd1/unet/diffusion_pytorch_model.safetensors")).unwrap();
        let path = dir.join("diffusion_pytorch_model.safetensors");
        std::fs::write(&path, &src[..src.len() / 2]).unwrap();
        let err = WeightStore::open(&dir, None, &Device::Cpu)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains(&path.display().to_string()) && err.contains("corrupt"),
            "{err}"
        );
    }

    #[test]
    fn missing_wrong_shape_and_unused_tensors_are_named() {
        let t = |dims: &[usize]| Tensor::zeros(dims, DType::F32, &Device::Cpu).unwrap();
        let store = WeightStore::from_tensors(
            "w.safetensors",
            HashMap::from([
                ("a.weight".to_string(), t(&[2, 3])),
                ("b".to_string(), t(&[1])),
            ]),
        );
        let vb = store.var_builder(DType::F32, &Device::Cpu);
        let err = vb.pp("a").get((3, 2), "weight").unwrap_err().to_string();
        assert!(
            err.contains("w.safetensors") && err.contains("`a.weight`") && err.contains("[3, 2]"),
            "{err}"
        );
        let err = vb.get(1, "c").unwrap_err().to_string();
        assert!(err.contains("missing tensor `c`"), "{err}");
        let err = store.ensure_all_used().unwrap_err().to_string();
        assert!(err.contains("`b`") && !err.contains("`a.weight`"), "{err}");
    }

    #[test]
    fn trainable_filter_makes_vars_and_keeps_frozen_tensors_constant() {
        let t = Tensor::ones((2, 2), DType::F16, &Device::Cpu).unwrap();
        let store = WeightStore::from_tensors(
            "w",
            HashMap::from([
                ("attn.to_q.weight".to_string(), t.clone()),
                ("conv.weight".to_string(), t),
            ]),
        )
        .with_trainable(Arc::new(|name: &str| name.starts_with("attn.")));
        let vb = store.var_builder(DType::F32, &Device::Cpu);
        let q = vb.get((2, 2), "attn.to_q.weight").unwrap();
        let c = vb.get((2, 2), "conv.weight").unwrap();
        assert_eq!(q.dtype(), DType::F32);
        let vars = store.trainable_vars();
        assert_eq!(vars.len(), 1);
        assert_eq!(vars[0].0, "attn.to_q.weight");
        let grads = (q + c).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(grads.get(vars[0].1.as_tensor()).is_some());
        store.ensure_all_used().unwrap();
    }

    fn tempdir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("unitune-weights-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
