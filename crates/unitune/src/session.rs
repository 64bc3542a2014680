//! A tuned session, the contract between tuning and editing: what `unitune tune` writes and
//! `unitune edit` (and every other front end) reads.
//!
//! A session is not a copy of the model but the difference the tune made to it, in one
//! safetensors file:
//! - `delta.<unet tensor name>`: tuned minus base weight, for every tensor the tune changed.
//!   Encoded per [`DeltaEncoding`]: `q8` (default) stores 2+-D deltas as int8 with one f32 scale
//!   per output row (`delta.<name>.scale`, symmetric, `scale = max|row| / 127`) and 1-D ones as
//!   f16; `f16` and `f32` store every delta in that float type.
//! - `source_image`: the image the tune saw (u8, `[height, width, 3]`, after resizing and
//!   cropping), so edits start from exactly that picture.
//! - metadata (`__metadata__`, strings): `format` = `unitune-session`, `version`, `token`,
//!   `base_fingerprint`, `image_sha256`, `settings` (JSON), `losses` (JSON), `delta_encoding`.
//!
//! The base fingerprint hashes every UNet tensor's name, shape and 64 evenly spaced values
//! rounded to f16 (so the fp16 and fp32 files of one model agree); applying a session to another
//! model is refused.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use image::RgbImage;
use safetensors::tensor::{Dtype, TensorView};
use sha2::{Digest, Sha256};

use crate::atomic::write_atomic;
use crate::train::tune::TuneSettings;
use crate::{Error, Result};

const FORMAT: &str = "unitune-session";
const VERSION: &str = "1";
const DELTA_PREFIX: &str = "delta.";
const SCALE_SUFFIX: &str = ".scale";
const SOURCE_IMAGE: &str = "source_image";

/// How weight deltas are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeltaEncoding {
    /// int8 with a per-row scale: a quarter of f32, half of f16.
    #[default]
    Q8,
    F16,
    /// Exact.
    F32,
}

impl std::str::FromStr for DeltaEncoding {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "q8" => Ok(Self::Q8),
            "f16" => Ok(Self::F16),
            "f32" => Ok(Self::F32),
            _ => Err(Error::argument(
                "delta-encoding",
                format!("`{s}` is not one of: q8, f16, f32"),
            )),
        }
    }
}

impl DeltaEncoding {
    fn name(self) -> &'static str {
        match self {
            Self::Q8 => "q8",
            Self::F16 => "f16",
            Self::F32 => "f32",
        }
    }
}

/// A tuned session in memory.
#[derive(Debug, Clone)]
pub struct Session {
    pub token: String,
    pub base_fingerprint: String,
    pub image: RgbImage,
    /// Everything that decided the tune (metadata `settings`, JSON).
    pub settings: TuneSettings,
    /// Loss of every tune step.
    pub losses: Vec<f32>,
    /// Tuned minus base, f32, by UNet tensor name.
    pub deltas: BTreeMap<String, Tensor>,
}

impl Session {
    /// sha256 of the source image's pixels.
    pub fn image_sha256(&self) -> String {
        hex(&Sha256::digest(self.image.as_raw()))
    }

    /// Writes the session to `path` atomically.
    pub fn save(&self, path: &Path, encoding: DeltaEncoding) -> Result<()> {
        let bytes = self.to_bytes(path, encoding)?;
        write_atomic(path, |tmp| {
            std::fs::write(tmp, &bytes).map_err(|e| Error::io(path, e))
        })
    }

    /// The session file's bytes, as [`Session::save`] writes them (`path` names it in errors).
    pub fn to_bytes(&self, path: &Path, encoding: DeltaEncoding) -> Result<Vec<u8>> {
        let mut buffers: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
        for (name, delta) in &self.deltas {
            let key = format!("{DELTA_PREFIX}{name}");
            let dims = delta.dims().to_vec();
            let delta = delta.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
            match encoding {
                DeltaEncoding::Q8 if dims.len() >= 2 => {
                    let (q, scales) = quantize_rows(&delta)?;
                    buffers.push((
                        format!("{key}{SCALE_SUFFIX}"),
                        Dtype::F32,
                        vec![dims[0]],
                        f32_bytes(&scales),
                    ));
                    buffers.push((
                        key,
                        Dtype::I8,
                        dims,
                        q.into_iter().map(|v| v as u8).collect(),
                    ));
                }
                DeltaEncoding::Q8 | DeltaEncoding::F16 => {
                    let v: Vec<half::f16> = delta.to_dtype(DType::F16)?.flatten_all()?.to_vec1()?;
                    buffers.push((
                        key,
                        Dtype::F16,
                        dims,
                        v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                    ));
                }
                DeltaEncoding::F32 => {
                    let v: Vec<f32> = delta.flatten_all()?.to_vec1()?;
                    buffers.push((key, Dtype::F32, dims, f32_bytes(&v)));
                }
            }
        }
        let (w, h) = self.image.dimensions();
        buffers.push((
            SOURCE_IMAGE.into(),
            Dtype::U8,
            vec![h as usize, w as usize, 3],
            self.image.as_raw().clone(),
        ));

        let metadata = HashMap::from([
            ("format".to_string(), FORMAT.to_string()),
            ("version".to_string(), VERSION.to_string()),
            ("token".to_string(), self.token.clone()),
            (
                "base_fingerprint".to_string(),
                self.base_fingerprint.clone(),
            ),
            ("image_sha256".to_string(), self.image_sha256()),
            (
                "settings".to_string(),
                serde_json::to_string(&self.settings).expect("settings serialize"),
            ),
            (
                "losses".to_string(),
                serde_json::to_string(&self.losses).expect("floats serialize"),
            ),
            ("delta_encoding".to_string(), encoding.name().to_string()),
        ]);
        let views = buffers
            .iter()
            .map(|(name, dtype, dims, bytes)| {
                let view = TensorView::new(*dtype, dims.clone(), bytes)
                    .map_err(|e| Error::weights(path, format!("tensor `{name}`: {e}")))?;
                Ok((name.as_str(), view))
            })
            .collect::<Result<Vec<_>>>()?;
        safetensors::serialize(views, Some(metadata))
            .map_err(|e| Error::weights(path, format!("cannot serialize session: {e}")))
    }

    /// Reads a session written by [`Session::save`].
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::from_bytes(&bytes, path)
    }

    /// Reads a session file's bytes (`path` names them in errors).
    pub fn from_bytes(bytes: &[u8], path: &Path) -> Result<Self> {
        let bad = |message: String| Error::weights(path, message);
        let (_, header) = safetensors::SafeTensors::read_metadata(bytes).map_err(|e| {
            bad(format!(
                "not a session file, or a truncated one (not safetensors: {e})"
            ))
        })?;
        let meta = header.metadata().clone().unwrap_or_default();
        let field = |key: &str| {
            meta.get(key).cloned().ok_or_else(|| {
                bad(format!(
                    "not a unitune session (no `{key}` in its metadata)"
                ))
            })
        };
        if field("format")? != FORMAT {
            return Err(bad("not a unitune session file".into()));
        }
        let version = field("version")?;
        if version != VERSION {
            return Err(bad(format!(
                "session format version {version} is not supported (this unitune reads {VERSION})"
            )));
        }
        let tensors = safetensors::SafeTensors::deserialize(bytes)
            .map_err(|e| bad(format!("corrupt session: {e}")))?;

        let image = tensors
            .tensor(SOURCE_IMAGE)
            .map_err(|_| bad("no `source_image` tensor".into()))?;
        let (h, w) = match image.shape() {
            [h, w, 3] if image.dtype() == Dtype::U8 => (*h, *w),
            other => {
                return Err(bad(format!(
                    "`source_image` has shape {other:?}, expected [h, w, 3] u8"
                )))
            }
        };
        let pixels = (h as u64).saturating_mul(w as u64);
        if pixels == 0 || pixels > crate::image_io::MAX_PIXELS {
            return Err(bad(format!(
                "`source_image` is {w}x{h}: not a picture unitune can edit"
            )));
        }
        // Both sides fit in u32: their product is at most MAX_PIXELS and neither is 0.
        let image = RgbImage::from_raw(w as u32, h as u32, image.data().to_vec())
            .expect("safetensors checked the data length against the shape");

        let mut deltas = BTreeMap::new();
        for (key, view) in tensors.tensors() {
            let Some(name) = key.strip_prefix(DELTA_PREFIX) else {
                continue;
            };
            if name.ends_with(SCALE_SUFFIX) {
                continue;
            }
            let dims = view.shape().to_vec();
            let values: Vec<f32> = match view.dtype() {
                Dtype::F32 => bytes_f32(view.data()),
                Dtype::F16 => view
                    .data()
                    .chunks_exact(2)
                    .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                    .collect(),
                Dtype::I8 => {
                    let scale_key = format!("{key}{SCALE_SUFFIX}");
                    let rows = match dims[..] {
                        [rows, _, ..] => rows,
                        _ => return Err(bad(format!("`{key}` is int8 but not 2+-D: {dims:?}"))),
                    };
                    let scales = tensors
                        .tensor(&scale_key)
                        .map_err(|_| bad(format!("`{key}` has no `{scale_key}`")))?;
                    if scales.dtype() != Dtype::F32 || scales.shape() != [rows] {
                        return Err(bad(format!(
                            "`{scale_key}` is {:?} {:?}, expected F32 [{rows}]",
                            scales.dtype(),
                            scales.shape()
                        )));
                    }
                    let scales = bytes_f32(scales.data());
                    let row = view.data().len() / rows.max(1);
                    view.data()
                        .iter()
                        .enumerate()
                        .map(|(i, &q)| q as i8 as f32 * scales[i / row])
                        .collect()
                }
                other => return Err(bad(format!("`{key}` has unsupported dtype {other:?}"))),
            };
            if values.iter().any(|v| !v.is_finite()) {
                return Err(bad(format!(
                    "`{key}` holds a NaN or infinity: the session is corrupt"
                )));
            }
            deltas.insert(
                name.to_string(),
                Tensor::from_vec(values, dims, &Device::Cpu)?,
            );
        }
        let settings = serde_json::from_str(&field("settings")?)
            .map_err(|e| bad(format!("bad `settings` metadata: {e}")))?;
        let losses = serde_json::from_str(&field("losses")?)
            .map_err(|e| bad(format!("bad `losses` metadata: {e}")))?;
        let session = Self {
            token: field("token")?,
            base_fingerprint: field("base_fingerprint")?,
            image,
            settings,
            losses,
            deltas,
        };
        if session.image_sha256() != field("image_sha256")? {
            return Err(bad(
                "source image does not match its recorded hash (corrupt file?)".into(),
            ));
        }
        Ok(session)
    }

    /// The tuned weights: `base` plus the deltas, in each base tensor's dtype and device.
    /// Refuses a base whose fingerprint differs from the one the session was tuned on.
    pub fn apply(
        &self,
        base: &HashMap<String, Tensor>,
        base_origin: &Path,
    ) -> Result<HashMap<String, Tensor>> {
        let found = fingerprint(base)?;
        if found != self.base_fingerprint {
            return Err(Error::weights(
                base_origin,
                format!(
                    "this session was tuned on another model (fingerprint {}…, this model {}…); use the --model it was tuned with",
                    &self.base_fingerprint[..12.min(self.base_fingerprint.len())],
                    &found[..12]
                ),
            ));
        }
        let mut tuned = base.clone();
        for (name, delta) in &self.deltas {
            let weight = tuned.get_mut(name).ok_or_else(|| {
                Error::weights(
                    base_origin,
                    format!("session changes `{name}`, which the model lacks"),
                )
            })?;
            if weight.dims() != delta.dims() {
                return Err(Error::weights(
                    base_origin,
                    format!(
                        "session's delta for `{name}` has shape {:?}, the model's tensor {:?}",
                        delta.dims(),
                        weight.dims()
                    ),
                ));
            }
            let sum = (weight.to_dtype(DType::F32)? + delta.to_device(weight.device())?)?;
            *weight = sum.to_dtype(weight.dtype())?;
        }
        Ok(tuned)
    }
}

/// Fingerprint of a set of weights (see the module doc).
pub fn fingerprint(tensors: &HashMap<String, Tensor>) -> Result<String> {
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let mut hasher = Sha256::new();
    for name in names {
        let t = &tensors[name];
        hasher.update(name.as_bytes());
        hasher.update(format!("{:?}", t.dims()).as_bytes());
        let flat = t.flatten_all()?;
        let n = flat.elem_count();
        let picks: Vec<u32> = (0..64.min(n)).map(|i| (i * n / 64.min(n)) as u32).collect();
        let sample = flat
            .index_select(&Tensor::new(picks, t.device())?, 0)?
            .to_dtype(DType::F16)?;
        for v in sample.to_vec1::<half::f16>()? {
            hasher.update(v.to_le_bytes());
        }
    }
    Ok(hex(&hasher.finalize()))
}

/// Symmetric int8 quantization with one scale per row (dim 0).
fn quantize_rows(delta: &Tensor) -> Result<(Vec<i8>, Vec<f32>)> {
    let rows = delta.dim(0)?;
    let flat: Vec<f32> = delta.flatten_all()?.to_vec1()?;
    let row_len = flat.len() / rows.max(1);
    let mut q = Vec::with_capacity(flat.len());
    let mut scales = Vec::with_capacity(rows);
    for row in flat.chunks(row_len.max(1)) {
        let max = row.iter().fold(0f32, |m, v| m.max(v.abs()));
        let scale = max / 127.0;
        scales.push(scale);
        q.extend(row.iter().map(|v| {
            if scale == 0.0 {
                0
            } else {
                (v / scale).round().clamp(-127.0, 127.0) as i8
            }
        }));
    }
    Ok((q, scales))
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn bytes_f32(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session() -> (Session, HashMap<String, Tensor>) {
        let dev = Device::Cpu;
        let base = HashMap::from([
            (
                "a.weight".to_string(),
                Tensor::randn(0f32, 1.0, (64, 16, 3, 3), &dev).unwrap(),
            ),
            (
                "a.bias".to_string(),
                Tensor::randn(0f32, 1.0, 8, &dev).unwrap(),
            ),
            (
                "b.weight".to_string(),
                Tensor::randn(0f32, 1.0, (4, 5), &dev).unwrap(),
            ),
        ]);
        let deltas = BTreeMap::from([
            (
                "a.weight".to_string(),
                (Tensor::randn(0f32, 1e-3, (64, 16, 3, 3), &dev).unwrap()),
            ),
            (
                "a.bias".to_string(),
                Tensor::randn(0f32, 1e-3, 8, &dev).unwrap(),
            ),
        ]);
        let image = RgbImage::from_fn(6, 4, |x, y| image::Rgb([x as u8 * 40, y as u8 * 60, 7]));
        let s = Session {
            token: "beikkpic".into(),
            base_fingerprint: fingerprint(&base).unwrap(),
            image,
            settings: TuneSettings::new("beikkpic", 7),
            losses: vec![0.5, 0.25],
            deltas,
        };
        (s, base)
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    #[test]
    fn round_trips_in_every_encoding() {
        let (s, base) = session();
        let dir = std::env::temp_dir().join(format!("unitune-session-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (encoding, tol) in [
            (DeltaEncoding::F32, 0.0),
            (DeltaEncoding::F16, 2e-6),
            (DeltaEncoding::Q8, 3e-5),
        ] {
            let path = dir.join(format!("{encoding:?}.session"));
            s.save(&path, encoding).unwrap();
            let back = Session::load(&path).unwrap();
            assert_eq!(
                (back.token.as_str(), back.losses.as_slice()),
                ("beikkpic", [0.5f32, 0.25].as_slice())
            );
            assert_eq!(back.image, s.image);
            assert_eq!(back.settings, s.settings);
            for (name, d) in &s.deltas {
                let err = max_diff(d, &back.deltas[name]);
                assert!(err <= tol, "{encoding:?} {name}: {err}");
            }
            let tuned = back.apply(&base, Path::new("unet")).unwrap();
            let expect = (&base["a.weight"] + &s.deltas["a.weight"]).unwrap();
            assert!(max_diff(&tuned["a.weight"], &expect) <= tol + 1e-6);
            assert_eq!(max_diff(&tuned["b.weight"], &base["b.weight"]), 0.0);
        }
        let q8 = std::fs::metadata(dir.join("Q8.session")).unwrap().len();
        let f32 = std::fs::metadata(dir.join("F32.session")).unwrap().len();
        assert!(q8 * 2 < f32, "q8 {q8} bytes, f32 {f32}");
    }

    #[test]
    fn another_base_model_is_refused() {
        let (s, mut base) = session();
        base.insert(
            "b.weight".into(),
            Tensor::zeros((4, 5), DType::F32, &Device::Cpu).unwrap(),
        );
        let err = s
            .apply(&base, Path::new("/models/other/unet"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("/models/other/unet") && err.contains("another model"),
            "{err}"
        );
    }

    #[test]
    fn fingerprint_ignores_precision_but_not_values() {
        let (_, base) = session();
        let half: HashMap<String, Tensor> = base
            .iter()
            .map(|(k, v)| (k.clone(), v.to_dtype(DType::F16).unwrap()))
            .collect();
        assert_eq!(fingerprint(&base).unwrap(), fingerprint(&half).unwrap());
        let mut other = base.clone();
        other.insert("a.bias".into(), (&base["a.bias"] + 1.0).unwrap());
        assert_ne!(fingerprint(&base).unwrap(), fingerprint(&other).unwrap());
    }

    #[test]
    fn other_files_are_refused_by_name() {
        let dir = std::env::temp_dir().join(format!("unitune-session-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("weights.safetensors");
        let t = Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap();
        candle_core::safetensors::save(&HashMap::from([("x".to_string(), t)]), &path).unwrap();
        let err = Session::load(&path).unwrap_err().to_string();
        assert!(
            err.contains("weights.safetensors") && err.contains("not a unitune session"),
            "{err}"
        );
    }
}
