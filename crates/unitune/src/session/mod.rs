//! A tuned session, the contract between tuning and editing: what `unitune tune` writes and
//! `unitune edit` (and every other front end) reads.
//!
//! A session is not a copy of the model but the difference the tune made to it, in one
//! safetensors file:
//! - `delta.<unet tensor name>`: tuned minus base weight, for every tensor the tune changed.
//!   Encoded per [`DeltaEncoding`]: the grid codes store each 2+-D delta as one scale per
//!   output row (`delta.<name>.scale`) and a step of a symmetric grid per weight: `q8` as int8
//!   (`scale = max|row| / 127`); `q4`, `q3` and `q2` (±7, ±3, ±1) with f16 scales and a u8
//!   tensor holding the steps packed several to a byte and deflated (the delta's shape is in the
//!   `delta_shapes` metadata); 1-D deltas are f16. `f16` and `f32` store every delta in that
//!   float type. `lora` stores a LoRA tune's deltas as their factors, `delta.<name>.lora_up`
//!   and `.lora_down` (int8, a scale per rank component), the shape in `delta_shapes`.
//! - `source_image`: the image the tune saw (u8, `[height, width, 3]`, after resizing and
//!   cropping), so edits start from exactly that picture.
//! - metadata (`__metadata__`, strings): `format` = `unitune-session`, `version`, `token`,
//!   `base_fingerprint`, `image_sha256`, `settings` (JSON), `losses` (JSON), `delta_encoding`,
//!   `delta_shapes` (JSON, for the packed codes).
//!
//! The base fingerprint hashes every UNet tensor's name, shape and 64 evenly spaced values
//! rounded to f16 (so the fp16 and fp32 files of one model agree); applying a session to another
//! model is refused.

pub(crate) mod codec;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use image::RgbImage;
use safetensors::tensor::{Dtype, TensorView};
use sha2::{Digest, Sha256};

use crate::atomic::write_atomic;
use crate::train::tune::{TrainableLayers, TuneSettings};
use crate::{Error, Result};

const FORMAT: &str = "unitune-session";
const VERSION: &str = "2";
/// Version 1 had no packed codes; it reads the same way.
const READS: [&str; 2] = ["1", VERSION];
const DELTA_PREFIX: &str = "delta.";
const SCALE_SUFFIX: &str = ".scale";
/// A LoRA delta's factors: `delta.<name>.lora_up` (`upᵀ`, `[r, out]`) and `.lora_down`
/// (`[r, n]`), each int8 with one scale per rank component.
const LORA_UP: &str = ".lora_up";
const LORA_DOWN: &str = ".lora_down";
/// The relative error above which a delta is not the rank its LoRA tune claims.
const LORA_EXACT: f64 = 1e-3;
const SOURCE_IMAGE: &str = "source_image";
/// The most weights one packed delta may claim (Stable Diffusion's largest has 15 M): bounds
/// what a damaged file can make the reader inflate.
const MAX_DELTA: usize = 1 << 28;

/// How weight deltas are stored (sizes for a tune of the built-in model, in BENCHMARKS.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeltaEncoding {
    /// ±1 grid, a per-row scale, deflated: about 1.3 bits a weight.
    Q2,
    /// ±3 grid, deflated: about 2.8 bits a weight.
    Q3,
    /// ±7 grid, deflated: about 3.6 bits a weight.
    Q4,
    /// int8 with a per-row scale: a quarter of f32, half of f16. The default: the coarser
    /// codes, even distilled into, cost edit quality (BENCHMARKS.md, "Session size").
    #[default]
    Q8,
    F16,
    /// Exact.
    F32,
    /// The two factors of a LoRA tune's deltas (`--layers lora`), each rank component in int8
    /// with its own scale: `r (out + in)` bytes a layer.
    Lora,
}

impl std::str::FromStr for DeltaEncoding {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|e| e.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Self::ALL.iter().map(|e| e.name()).collect();
                Error::argument(
                    "delta-encoding",
                    format!("`{s}` is not one of: {}", names.join(", ")),
                )
            })
    }
}

impl std::fmt::Display for DeltaEncoding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl DeltaEncoding {
    pub const ALL: [Self; 7] = [
        Self::Q2,
        Self::Q3,
        Self::Q4,
        Self::Q8,
        Self::F16,
        Self::F32,
        Self::Lora,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Q2 => "q2",
            Self::Q3 => "q3",
            Self::Q4 => "q4",
            Self::Q8 => "q8",
            Self::F16 => "f16",
            Self::F32 => "f32",
            Self::Lora => "lora",
        }
    }

    /// The coarse grids' steps each side of zero: the codes a tune is distilled into (see
    /// [`crate::train::distill`]) because rounding to them afterwards would lose too much.
    pub(crate) fn coarse_levels(self) -> Option<i32> {
        self.levels().filter(|&l| l < 127)
    }

    /// The grid's steps each side of zero, for the grid codes.
    fn levels(self) -> Option<i32> {
        match self {
            Self::Q2 => Some(1),
            Self::Q3 => Some(3),
            Self::Q4 => Some(7),
            Self::Q8 => Some(127),
            Self::F16 | Self::F32 | Self::Lora => None,
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
    /// Loss of every tune step, then of every distillation step (against the tuned model).
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
        let lora_rank = match (encoding, self.settings.layers, self.settings.lora_rank) {
            (DeltaEncoding::Lora, TrainableLayers::Lora, Some(rank)) => Some(rank),
            (DeltaEncoding::Lora, ..) => {
                return Err(Error::argument(
                    "delta-encoding",
                    "lora stores the factors of a lora tune (layers `lora`); this session's tune changed whole weights (`unitune export --format lora` approximates them)",
                ))
            }
            _ => None,
        };
        let mut buffers: Vec<Buffer> = Vec::new();
        // Deltas stored in another shape than their own: packed grid steps and LoRA factors.
        let mut shapes = BTreeMap::new();
        for (name, delta) in &self.deltas {
            let key = format!("{DELTA_PREFIX}{name}");
            let dims = delta.dims().to_vec();
            let delta = delta.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
            match (lora_rank, encoding.levels()) {
                (Some(rank), _) if dims.len() >= 2 => {
                    let (up, down) = lora_factors(name, &delta, rank)?;
                    push_q8(&mut buffers, format!("{key}{LORA_UP}"), &up)?;
                    push_q8(&mut buffers, format!("{key}{LORA_DOWN}"), &down)?;
                    shapes.insert(name.clone(), dims);
                }
                (None, Some(127)) if dims.len() >= 2 => push_q8(&mut buffers, key, &delta)?,
                (None, Some(levels)) if dims.len() >= 2 => {
                    let (steps, scales) = codec::grid(&delta, levels)?;
                    let steps: Vec<i8> = (steps.flatten_all()?.to_vec1::<f32>()?.into_iter())
                        .map(|q| q as i8)
                        .collect();
                    let scales: Vec<f32> = scales.flatten_all()?.to_vec1()?;
                    // f16 scales: their rounding (5e-4 of a step) is far below the grid's.
                    let scale_key = format!("{key}{SCALE_SUFFIX}");
                    buffers.push((scale_key, Dtype::F16, vec![dims[0]], f16_bytes(&scales)));
                    let bytes = codec::pack(&steps, levels);
                    buffers.push((key, Dtype::U8, vec![bytes.len()], bytes));
                    shapes.insert(name.clone(), dims);
                }
                _ => {
                    let v: Vec<f32> = delta.flatten_all()?.to_vec1()?;
                    if encoding == DeltaEncoding::F32 {
                        buffers.push((key, Dtype::F32, dims, f32_bytes(&v)));
                    } else {
                        buffers.push((key, Dtype::F16, dims, f16_bytes(&v)));
                    }
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
            (
                "delta_shapes".to_string(),
                serde_json::to_string(&shapes).expect("shapes serialize"),
            ),
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
        if !READS.contains(&version.as_str()) {
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
        // Read at the first packed delta: version 1 files and unpacked codes lack it.
        let mut packed: Option<Packed> = None;
        for (key, view) in tensors.tensors() {
            let Some(name) = key.strip_prefix(DELTA_PREFIX) else {
                continue;
            };
            if name.ends_with(SCALE_SUFFIX) {
                continue;
            }
            let mut dims = view.shape().to_vec();
            let values: Vec<f32> = match view.dtype() {
                Dtype::F32 => bytes_f32(view.data()),
                Dtype::F16 => bytes_f16(view.data()),
                Dtype::I8 | Dtype::U8 => {
                    let steps: Vec<i8> = if view.dtype() == Dtype::I8 {
                        view.data().iter().map(|&q| q as i8).collect()
                    } else {
                        if packed.is_none() {
                            packed = Some(Packed::read(name, &meta).map_err(bad)?);
                        }
                        let packed = packed.as_ref().expect("read just above");
                        let (shape, steps) = packed.steps(name, view.data()).map_err(bad)?;
                        dims = shape;
                        steps
                    };
                    let rows = match dims[..] {
                        [rows, _, ..] => rows,
                        _ => {
                            return Err(bad(format!(
                                "`{key}` is a grid code but not 2+-D: {dims:?}"
                            )))
                        }
                    };
                    let scale_key = format!("{key}{SCALE_SUFFIX}");
                    let scales = tensors
                        .tensor(&scale_key)
                        .map_err(|_| bad(format!("`{key}` has no `{scale_key}`")))?;
                    let scales = match (scales.dtype(), scales.shape()) {
                        (Dtype::F32, [n]) if *n == rows => bytes_f32(scales.data()),
                        (Dtype::F16, [n]) if *n == rows => bytes_f16(scales.data()),
                        (dtype, shape) => {
                            return Err(bad(format!(
                                "`{scale_key}` is {dtype:?} {shape:?}, expected F32 or F16 [{rows}]"
                            )))
                        }
                    };
                    let row = steps.len() / rows.max(1);
                    steps
                        .iter()
                        .enumerate()
                        .map(|(i, &q)| q as f32 * scales[i / row])
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
        let deltas = join_lora_factors(deltas, &meta, path)?;
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

/// The packed deltas' grid and shapes, from the metadata's `delta_encoding` and `delta_shapes`,
/// read once per file.
struct Packed {
    levels: i32,
    shapes: BTreeMap<String, Vec<usize>>,
}

impl Packed {
    /// `name`: the first packed delta, named when the code is not a packed one.
    fn read(name: &str, meta: &HashMap<String, String>) -> std::result::Result<Self, String> {
        let encoding: DeltaEncoding = meta
            .get("delta_encoding")
            .ok_or("packed deltas but no `delta_encoding` metadata")?
            .parse()
            .map_err(|e: Error| format!("`delta_encoding` metadata: {e}"))?;
        let levels = encoding.coarse_levels().ok_or_else(|| {
            format!("`delta.{name}` is packed, but `delta_encoding` is {encoding}")
        })?;
        Ok(Self {
            levels,
            shapes: recorded_shapes(meta)?,
        })
    }

    /// The shape and grid steps of the packed delta `name`.
    fn steps(
        &self,
        name: &str,
        bytes: &[u8],
    ) -> std::result::Result<(Vec<usize>, Vec<i8>), String> {
        let dims = self
            .shapes
            .get(name)
            .ok_or_else(|| format!("`delta_shapes` metadata has no shape for `{name}`"))?;
        let count = delta_count(dims).ok_or_else(|| {
            format!("`delta_shapes` gives `{name}` the impossible shape {dims:?}")
        })?;
        let steps =
            codec::unpack(bytes, count, self.levels).map_err(|e| format!("`delta.{name}` {e}"))?;
        Ok((dims.clone(), steps))
    }
}

/// The `delta_shapes` metadata: the shapes of the deltas stored in another shape than their own
/// (packed grid steps, LoRA factors).
fn recorded_shapes(
    meta: &HashMap<String, String>,
) -> std::result::Result<BTreeMap<String, Vec<usize>>, String> {
    serde_json::from_str(meta.get("delta_shapes").map_or("", String::as_str))
        .map_err(|e| format!("bad `delta_shapes` metadata: {e}"))
}

/// The number of weights of a delta of shape `dims`, unless it overflows or exceeds
/// [`MAX_DELTA`] (a damaged file).
fn delta_count(dims: &[usize]) -> Option<usize> {
    dims.iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .filter(|&n| n <= MAX_DELTA)
}

/// A tensor as the file will hold it: name, dtype, shape, bytes.
type Buffer = (String, Dtype, Vec<usize>, Vec<u8>);

/// `t` (2+-D) as int8 steps with an f32 scale per row, under `key` and `key.scale`.
fn push_q8(buffers: &mut Vec<Buffer>, key: String, t: &Tensor) -> Result<()> {
    let (steps, scales) = codec::grid(t, 127)?;
    let bytes = (steps.flatten_all()?.to_vec1::<f32>()?.into_iter())
        .map(|q| q as i8 as u8)
        .collect();
    let scales: Vec<f32> = scales.flatten_all()?.to_vec1()?;
    buffers.push((
        format!("{key}{SCALE_SUFFIX}"),
        Dtype::F32,
        vec![t.dim(0)?],
        f32_bytes(&scales),
    ));
    buffers.push((key, Dtype::I8, t.dims().to_vec(), bytes));
    Ok(())
}

/// `(upᵀ [k, out], down [k, n])` with `upᵀᵀ·down` the delta `name` (a LoRA tune's, of rank at
/// most `rank`), balanced by the SVD so that each component quantizes alike.
fn lora_factors(name: &str, delta: &Tensor, rank: usize) -> Result<(Tensor, Tensor)> {
    let out = delta.dim(0)?;
    let matrix = delta.reshape((out, delta.elem_count() / out))?;
    let (up, down) = crate::weights::lora::factor(&matrix, rank)?;
    let norm =
        |t: &Tensor| -> Result<f64> { Ok(t.sqr()?.sum_all()?.to_scalar::<f32>()?.sqrt() as f64) };
    let residual = norm(&(&matrix - up.matmul(&down)?)?)?;
    if residual > LORA_EXACT * norm(&matrix)? {
        return Err(Error::argument(
            "delta-encoding",
            format!("the delta of `{name}` is not of rank {rank}: not a lora tune's"),
        ));
    }
    Ok((up.t()?.contiguous()?, down))
}

/// Replaces each pair of LoRA factors in `deltas` by their product, in the shape the
/// `delta_shapes` metadata gives.
fn join_lora_factors(
    mut deltas: BTreeMap<String, Tensor>,
    meta: &HashMap<String, String>,
    path: &Path,
) -> Result<BTreeMap<String, Tensor>> {
    let bad = |message: String| Error::weights(path, message);
    let names: std::collections::BTreeSet<String> = (deltas.keys())
        .filter_map(|k| {
            k.strip_suffix(LORA_DOWN)
                .or_else(|| k.strip_suffix(LORA_UP))
        })
        .map(str::to_string)
        .collect();
    if names.is_empty() {
        return Ok(deltas);
    }
    let shapes = recorded_shapes(meta).map_err(bad)?;
    for name in names {
        let mut factor = |suffix: &str| {
            deltas.remove(&format!("{name}{suffix}")).ok_or_else(|| {
                bad(format!(
                    "`{DELTA_PREFIX}{name}` has no `{DELTA_PREFIX}{name}{suffix}`"
                ))
            })
        };
        let (up, down) = (factor(LORA_UP)?, factor(LORA_DOWN)?);
        let dims = shapes
            .get(&name)
            .ok_or_else(|| bad(format!("`delta_shapes` metadata has no shape for `{name}`")))?;
        let fits = match (up.dims(), down.dims(), delta_count(dims)) {
            ([k, out], [k2, n], Some(count)) => {
                k == k2 && dims.first() == Some(out) && out.checked_mul(*n) == Some(count)
            }
            _ => false,
        };
        if !fits {
            return Err(bad(format!(
                "the LoRA factors of `{name}` are {:?} and {:?}, which do not make its shape {dims:?}",
                up.dims(),
                down.dims()
            )));
        }
        let delta = up.t()?.matmul(&down)?.reshape(dims.as_slice())?;
        deltas.insert(name, delta);
    }
    Ok(deltas)
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn f16_bytes(v: &[f32]) -> Vec<u8> {
    v.iter()
        .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
        .collect()
}

fn bytes_f32(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn bytes_f16(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(2)
        .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
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

    fn relative_error(a: &Tensor, b: &Tensor) -> f32 {
        let norm = |t: &Tensor| {
            t.sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        (norm(&(a - b).unwrap()) / norm(a)).sqrt()
    }

    #[test]
    fn round_trips_in_every_encoding() {
        let (s, base) = session();
        let dir = std::env::temp_dir().join(format!("unitune-session-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut sizes = Vec::new();
        // Relative error of the 2-D delta; the 1-D one is f16 in every code but f32. The ±1
        // grid zeroes a band (`codec`) and loses 0.263 of a Gaussian's energy (0.513 of the norm).
        for (encoding, matrix_tol, vector_tol) in [
            (DeltaEncoding::F32, 0.0, 0.0),
            (DeltaEncoding::F16, 1e-3, 1e-3),
            (DeltaEncoding::Q8, 1e-2, 1e-3),
            (DeltaEncoding::Q4, 0.12, 1e-3),
            (DeltaEncoding::Q3, 0.22, 1e-3),
            (DeltaEncoding::Q2, 0.53, 1e-3),
        ] {
            let path = dir.join(format!("{encoding}.session"));
            s.save(&path, encoding).unwrap();
            sizes.push(std::fs::metadata(&path).unwrap().len());
            let back = Session::load(&path).unwrap();
            assert_eq!(
                (back.token.as_str(), back.losses.as_slice()),
                ("beikkpic", [0.5f32, 0.25].as_slice())
            );
            assert_eq!(back.image, s.image);
            assert_eq!(back.settings, s.settings);
            for (name, tol) in [("a.weight", matrix_tol), ("a.bias", vector_tol)] {
                let err = relative_error(&s.deltas[name], &back.deltas[name]);
                assert!(err <= tol, "{encoding} {name}: {err}");
                assert_eq!(back.deltas[name].dims(), s.deltas[name].dims());
            }
            let tuned = back.apply(&base, Path::new("unet")).unwrap();
            let expect = (&base["a.weight"] + &back.deltas["a.weight"]).unwrap();
            assert!(max_diff(&tuned["a.weight"], &expect) <= 1e-6);
            assert_eq!(max_diff(&tuned["b.weight"], &base["b.weight"]), 0.0);
        }
        // Each code smaller than the one before it.
        assert!(sizes.windows(2).all(|w| w[1] < w[0]), "{sizes:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn damaged_packed_deltas_are_refused_by_name() {
        let (s, _) = session();
        let path = Path::new("/sessions/x.unitune");
        let bytes = s.to_bytes(path, DeltaEncoding::Q2).unwrap();
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        let meta = header.metadata().clone().unwrap();
        let with_meta = |key: &str, value: &str| {
            let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
            let mut meta = meta.clone();
            meta.insert(key.into(), value.into());
            let views: Vec<(String, TensorView)> = tensors.tensors();
            safetensors::serialize(views, Some(meta)).unwrap()
        };
        for (key, value, expect) in [
            ("delta_shapes", "{}", "no shape for `a.weight`"),
            (
                "delta_shapes",
                r#"{"a.weight":[64,16,3,4]}"#,
                "its shape needs",
            ),
            (
                "delta_shapes",
                r#"{"a.weight":[1000000,1000000]}"#,
                "impossible shape",
            ),
            ("delta_shapes", "[", "bad `delta_shapes`"),
            (
                "delta_encoding",
                "q8",
                "is packed, but `delta_encoding` is q8",
            ),
        ] {
            let err = Session::from_bytes(&with_meta(key, value), path)
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("/sessions/x.unitune") && err.contains(expect),
                "{err}"
            );
        }
    }

    /// A LoRA tune's session of rank 3: `a.weight`'s delta is a product of factors.
    fn lora_session() -> Session {
        let (mut s, _) = session();
        let dev = Device::Cpu;
        let up = Tensor::randn(0f32, 1e-2, (64, 3), &dev).unwrap();
        let down = Tensor::randn(0f32, 1e-2, (3, 144), &dev).unwrap();
        let delta = up.matmul(&down).unwrap().reshape((64, 16, 3, 3)).unwrap();
        s.deltas = BTreeMap::from([("a.weight".to_string(), delta)]);
        s.settings.layers = TrainableLayers::Lora;
        s.settings.lora_rank = Some(3);
        s
    }

    #[test]
    fn lora_factors_round_trip_and_damaged_ones_are_refused_by_name() {
        let s = lora_session();
        let path = Path::new("/sessions/x.unitune");
        let bytes = s.to_bytes(path, DeltaEncoding::Lora).unwrap();
        let q8 = s.to_bytes(path, DeltaEncoding::Q8).unwrap();
        // 3 (64 + 144) bytes of factors against 64 x 144 of int8.
        assert!(
            bytes.len() * 4 < q8.len(),
            "{} vs {}",
            bytes.len(),
            q8.len()
        );
        let back = Session::from_bytes(&bytes, path).unwrap();
        let err = relative_error(&s.deltas["a.weight"], &back.deltas["a.weight"]);
        assert!(err < 1e-2, "{err}");

        let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        let meta = header.metadata().clone().unwrap();
        let rebuilt = |drop: &str, meta: HashMap<String, String>| {
            let views: Vec<(String, TensorView)> = tensors
                .tensors()
                .into_iter()
                .filter(|(k, _)| k != drop)
                .collect();
            safetensors::serialize(views, Some(meta)).unwrap()
        };
        let shapes = |v: &str| {
            let mut m = meta.clone();
            m.insert("delta_shapes".into(), v.into());
            m
        };
        for (file, expect) in [
            (
                rebuilt("delta.a.weight.lora_up", meta.clone()),
                "has no `delta.a.weight.lora_up`",
            ),
            (
                rebuilt("delta.a.weight.lora_down", meta.clone()),
                "has no `delta.a.weight.lora_down`",
            ),
            (
                rebuilt("", shapes(r#"{"a.weight":[64,16,3,4]}"#)),
                "do not make its shape",
            ),
            (rebuilt("", shapes("{}")), "no shape for `a.weight`"),
        ] {
            let err = Session::from_bytes(&file, path).unwrap_err().to_string();
            assert!(
                err.contains("/sessions/x.unitune") && err.contains(expect),
                "{err}"
            );
        }
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
