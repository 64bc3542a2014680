//! Adafactor's parameter update for f32 CPU parameters, fused into three reads of the gradient.
//!
//! unitune's `train::adafactor` composes the update from candle ops: the factored means go through
//! candle's single-threaded strided `ReduceSum`, and each of some fifteen elementwise steps writes
//! a full-size tensor. Here, for each parameter:
//! 1. factored: one read of the gradient sums `g²` over each factored dim; unfactored: one read
//!    updates the running mean `v` in place and sums `u²` on the way (`u = g / sqrt(v)`);
//! 2. factored: a second read sums `u²` with `u = g * rsqrt(row / mean(row)) * rsqrt(col)`, for
//!    the update's RMS;
//! 3. a last read writes the parameter, and the momentum when there is one, in place.
//!
//! The arithmetic is the composite's, in the same order, so that the two agree to the rounding of
//! the sums (accumulated in f64 here, in sequential f32 by candle). Work is split with rayon over
//! parameters and over pieces of about [`GRAIN`] elements of the large ones; the pieces follow from
//! the shape alone, so that the result does not depend on the number of threads.

use std::cell::Cell;
use std::collections::HashSet;
use std::ops::Range;

use candle_core::{bail, CpuStorage, DType, InplaceOp1, InplaceOp2, Layout, Result, Tensor};
use rayon::prelude::*;

/// Elements of a parameter per piece of parallel work.
const GRAIN: usize = 1 << 16;

/// The hyper-parameters every parameter of a step shares; the fields of unitune's
/// `AdafactorConfig`, less `decay_rate` (see [`ParamStep::beta2t`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Hyper {
    pub lr: f64,
    pub eps1: f64,
    pub clip_threshold: f64,
    pub beta1: Option<f64>,
    pub weight_decay: f64,
}

/// The running mean of `g² + eps1` of one parameter: `None` before its first step, which sets it.
/// The tensors are f32 on the CPU.
pub enum SecondMoment<'a> {
    /// Factored over dims `lo < hi`: `row` is the mean over `hi` and `col` the mean over `lo`,
    /// each keeping the reduced dim with size 1. Replaced by new tensors each step (they are small).
    Factored {
        lo: usize,
        hi: usize,
        row_col: &'a mut Option<(Tensor, Tensor)>,
    },
    /// Of the parameter's shape, updated in place.
    Full(&'a mut Option<Tensor>),
}

/// One parameter's update.
pub struct ParamStep<'a> {
    /// The parameter (a `Var`'s tensor), written in place.
    pub param: &'a Tensor,
    pub grad: &'a Tensor,
    /// `1 - t^decay_rate` at this parameter's step `t`.
    pub beta2t: f64,
    pub second_moment: SecondMoment<'a>,
    /// Running mean of the lr-scaled updates, used when [`Hyper::beta1`] is set: zeros before the
    /// first step (which gives the first update, as starting without one), then updated in place.
    pub exp_avg: &'a mut Option<Tensor>,
}

/// Whether [`step`] takes this parameter: a non-empty contiguous f32 CPU tensor, and a gradient
/// of its shape, dtype and device (of any layout).
pub fn supports(param: &Tensor, grad: &Tensor) -> bool {
    let cpu_f32 = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
    cpu_f32(param)
        && cpu_f32(grad)
        && param.is_contiguous()
        && param.elem_count() > 0
        && grad.shape() == param.shape()
}

/// Updates every parameter of `params`, in parallel; each must be [`supports`]ed, and none may
/// appear twice.
pub fn step(params: &mut [ParamStep<'_>], hyper: &Hyper) -> Result<()> {
    // A parameter's storage stays locked while its update runs, pieces of it on other threads:
    // a second update of the same parameter would wait for it forever.
    let mut ids = HashSet::new();
    if !params.iter().all(|p| ids.insert(p.param.id())) {
        bail!("adafactor: a parameter is listed twice")
    }
    params.par_iter_mut().try_for_each(|p| p.run(hyper))
}

impl ParamStep<'_> {
    fn run(&mut self, hyper: &Hyper) -> Result<()> {
        if !supports(self.param, self.grad) {
            bail!(
                "adafactor: expected a non-empty contiguous f32 CPU parameter and a gradient of its \
                 shape, got {:?} {:?} {:?} and {:?} {:?} {:?}",
                self.param.shape(),
                self.param.dtype(),
                self.param.device(),
                self.grad.shape(),
                self.grad.dtype(),
                self.grad.device()
            )
        }
        let k = Consts::new(hyper, self.beta2t, self.param.elem_count());
        let grad = self.grad.contiguous()?;
        let shape = self.param.shape();
        if hyper.beta1.is_some() {
            ensure_writable(self.exp_avg, self.param)?;
        }
        let exp_avg = self.exp_avg.as_ref().filter(|_| hyper.beta1.is_some());
        match &mut self.second_moment {
            SecondMoment::Factored { lo, hi, row_col } => {
                let blocks = Blocks::new(shape.dims(), *lo, *hi)?;
                let prev = match row_col.as_ref() {
                    Some((row, col)) => Some((read_f32(row)?, read_f32(col)?)),
                    None => None,
                };
                let mut new_state = None;
                write_with_grad(self.param, &grad, |p, g| {
                    let (row_sums, col_sums) = blocks.sums(g);
                    let prev = prev.as_ref().map(|(r, c)| (r.as_slice(), c.as_slice()));
                    let row = running_mean(&row_sums, blocks.c, prev.map(|p| p.0), &k)?;
                    let col = running_mean(&col_sums, blocks.r, prev.map(|p| p.1), &k)?;
                    let factors = blocks.factors(&row, &col);
                    let scale = k.scale(blocks.sum_sq(g, &factors));
                    with_momentum(exp_avg, |m| {
                        blocks.apply(p, m, g, &factors, &k.apply(scale));
                        Ok(())
                    })?;
                    new_state = Some((row, col));
                    Ok(())
                })?;
                let Some((row, col)) = new_state else {
                    bail!("adafactor: the update did not run")
                };
                let (mut row_dims, mut col_dims) = (shape.dims().to_vec(), shape.dims().to_vec());
                row_dims[*hi] = 1;
                col_dims[*lo] = 1;
                let device = self.param.device();
                **row_col = Some((
                    Tensor::from_vec(row, row_dims, device)?,
                    Tensor::from_vec(col, col_dims, device)?,
                ));
                Ok(())
            }
            SecondMoment::Full(v) => {
                ensure_writable(v, self.param)?;
                let Some(v) = v.as_ref() else {
                    bail!("adafactor: no second moment")
                };
                write_with_grad(self.param, &grad, |p, g| {
                    write_f32(v, |v| {
                        let scale = k.scale(full_moment(v, g, &k));
                        with_momentum(exp_avg, |m| {
                            full_apply(p, m, g, v, &k.apply(scale));
                            Ok(())
                        })
                    })
                })
            }
        }
    }
}

/// The step's constants in f32, rounded as candle rounds the scalars of its `affine`.
struct Consts {
    /// `beta2_t`: weight of the previous running mean.
    keep: f32,
    /// `1 - beta2_t`: weight of this step's mean.
    fresh: f32,
    /// `(1 - beta2_t) * eps1`.
    fresh_eps: f32,
    /// `1 / (n * clip_threshold²)`: turns the sum of `u²` into `(rms(u) / clip_threshold)²`.
    inv_count: f32,
    /// `lr`, times `1 - beta1` when there is momentum.
    lr: f32,
    beta1: f32,
    /// `1 - weight_decay * lr`.
    decay: f32,
}

impl Consts {
    fn new(h: &Hyper, beta2t: f64, n: usize) -> Self {
        let momentum_scale = h.beta1.map_or(1.0, |b1| 1.0 - b1);
        Self {
            keep: beta2t as f32,
            fresh: (1.0 - beta2t) as f32,
            fresh_eps: ((1.0 - beta2t) * h.eps1) as f32,
            inv_count: (1.0 / (n as f64 * h.clip_threshold * h.clip_threshold)) as f32,
            lr: (h.lr * momentum_scale) as f32,
            beta1: h.beta1.unwrap_or(0.0) as f32,
            decay: (1.0 - h.weight_decay * h.lr) as f32,
        }
    }

    /// `lr / max(1, rms(u) / clip_threshold)` from the sum of `u²`.
    fn scale(&self, sum_sq: f64) -> f32 {
        let ms = sum_sq as f32 * self.inv_count;
        (1.0 / ms.sqrt().max(1.0)) * self.lr
    }

    fn apply(&self, scale: f32) -> Apply {
        Apply {
            scale,
            beta1: self.beta1,
            decay: self.decay,
        }
    }
}

/// What the last pass needs, per element: `step = u * scale`, with momentum
/// `m = m * beta1 + step; step = m`, then `p = p * decay - step`.
struct Apply {
    scale: f32,
    beta1: f32,
    decay: f32,
}

impl Apply {
    /// The last pass over a run of elements, `u(i)` the unscaled update of element `i`.
    #[inline(always)]
    fn run(&self, p: &mut [f32], m: Option<&mut [f32]>, u: impl Fn(usize) -> f32) {
        match m {
            Some(m) => {
                for (i, (p, m)) in p.iter_mut().zip(m).enumerate() {
                    *m = *m * self.beta1 + u(i) * self.scale;
                    *p = *p * self.decay - *m;
                }
            }
            None => {
                for (i, p) in p.iter_mut().enumerate() {
                    *p = *p * self.decay - u(i) * self.scale;
                }
            }
        }
    }
}

/// `Σ u(i)²` over `0..n`, in f64 over 8 lanes (which vectorise, where one running sum would not).
#[inline(always)]
fn sum_sq(n: usize, u: impl Fn(usize) -> f32) -> f64 {
    let mut lanes = [0f64; 8];
    for j in 0..n / 8 {
        for (l, lane) in lanes.iter_mut().enumerate() {
            let x = u(8 * j + l);
            *lane += f64::from(x * x);
        }
    }
    let tail: f64 = (n / 8 * 8..n)
        .map(|i| {
            let x = u(i);
            f64::from(x * x)
        })
        .sum();
    lanes.iter().sum::<f64>() + tail
}

/// `beta2_t * prev + (1 - beta2_t) * (sum / count + eps1)` of each sum, as the composite rounds it.
fn running_mean(sums: &[f64], count: usize, prev: Option<&[f32]>, k: &Consts) -> Result<Vec<f32>> {
    let inv = (1.0 / count as f64) as f32;
    let fresh = |s: f64| (s as f32 * inv) * k.fresh + k.fresh_eps;
    match prev {
        Some(prev) if prev.len() != sums.len() => bail!(
            "adafactor: second moment of {} elements, expected {}",
            prev.len(),
            sums.len()
        ),
        Some(prev) => Ok(sums
            .iter()
            .zip(prev)
            .map(|(&s, &p)| p * k.keep + fresh(s))
            .collect()),
        None => Ok(sums.iter().map(|&s| fresh(s)).collect()),
    }
}

/// A parameter factored over dims `lo < hi`, seen as `[a, r, b, c, d]`: `r` and `c` are the sizes
/// of `lo` and `hi`, and `a`, `b`, `d` the products of the dims before, between and after them.
/// Each `(a, r, b)` indexes a contiguous block `[c, d]`. The mean over `hi` ("row") is then
/// `[a, r, b, d]` and the mean over `lo` ("col") `[a, b, c, d]`, which is also how the state
/// tensors (the reduced dim kept as 1) lie in memory.
#[derive(Clone, Copy, Debug)]
struct Blocks {
    a: usize,
    r: usize,
    b: usize,
    c: usize,
    d: usize,
}

/// `1 / sqrt(row / mean(row))` (`[a, r, b, d]`, the mean over `r`) and `1 / sqrt(col)`
/// (`[a, b, c, d]`): `u = g * row * col`.
struct Factors {
    row: Vec<f32>,
    col: Vec<f32>,
}

impl Blocks {
    fn new(dims: &[usize], lo: usize, hi: usize) -> Result<Self> {
        if lo >= hi || hi >= dims.len() {
            bail!("adafactor: cannot factor dims {lo} and {hi} of {dims:?}")
        }
        Ok(Self {
            a: dims[..lo].iter().product(),
            r: dims[lo],
            b: dims[lo + 1..hi].iter().product(),
            c: dims[hi],
            d: dims[hi + 1..].iter().product(),
        })
    }

    /// Elements of a block `[c, d]`.
    fn block(&self) -> usize {
        self.c * self.d
    }

    /// Elements per "row" `(a, r)`: `b` blocks.
    fn row_len(&self) -> usize {
        self.b * self.block()
    }

    /// The pieces of parallel work, as ranges of rows `(a, r)` (flattened): whole `[r, b, c, d]`
    /// slabs when these are small, else runs of rows within one slab, so that every piece adds
    /// to the col sums of a single slab or of whole ones.
    fn units(&self) -> Vec<Range<usize>> {
        let rows = self.a * self.r;
        let slab = self.r * self.row_len();
        let per = if slab <= GRAIN {
            (GRAIN / slab.max(1)).max(1) * self.r
        } else {
            (GRAIN / self.row_len().max(1)).max(1)
        };
        let slabs = if slab <= GRAIN { 1 } else { self.a };
        let rows_per_slab = rows / slabs;
        (0..slabs)
            .flat_map(|s| {
                let (start, end) = (s * rows_per_slab, (s + 1) * rows_per_slab);
                (start..end)
                    .step_by(per)
                    .map(move |i| i..(i + per).min(end))
            })
            .collect()
    }

    /// Sums of `g²` over `hi` (`[a, r, b, d]`) and over `lo` (`[a, b, c, d]`), in f64.
    fn sums(&self, g: &[f32]) -> (Vec<f64>, Vec<f64>) {
        let units = self.units();
        let parts: Vec<(Vec<f64>, Vec<f32>)> = units
            .par_iter()
            .map(|rows| self.unit_sums(g, rows.clone()))
            .collect();
        let mut row = Vec::with_capacity(self.a * self.r * self.b * self.d);
        let mut col = vec![0f64; self.a * self.row_len()];
        for (rows, (row_part, col_part)) in units.iter().zip(parts) {
            row.extend(row_part);
            let start = rows.start / self.r * self.row_len();
            for (c, p) in col[start..].iter_mut().zip(col_part) {
                *c += f64::from(p);
            }
        }
        (row, col)
    }

    /// The row sums of `rows` and their parts of the col sums of the slabs they lie in (f32: a
    /// piece holds few rows).
    fn unit_sums(&self, g: &[f32], rows: Range<usize>) -> (Vec<f64>, Vec<f32>) {
        let (bl, d) = (self.block(), self.d);
        let a0 = rows.start / self.r;
        let slabs = (rows.end - 1) / self.r + 1 - a0;
        let mut row = vec![0f64; rows.len() * self.b * d];
        let mut col = vec![0f32; slabs * self.row_len()];
        for (i, row_idx) in rows.clone().enumerate() {
            let slab = row_idx / self.r - a0;
            let g_row = &g[row_idx * self.row_len()..][..self.row_len()];
            let blocks = g_row.chunks_exact(bl).enumerate();
            for (bi, g) in blocks {
                let col = &mut col[(slab * self.b + bi) * bl..][..bl];
                let row = &mut row[(i * self.b + bi) * d..][..d];
                block_sums(g, col, row);
            }
        }
        (row, col)
    }

    fn factors(&self, row: &[f32], col: &[f32]) -> Factors {
        let bd = self.b * self.d;
        let inv_r = (1.0 / self.r as f64) as f32;
        let mut row_factor = vec![0f32; row.len()];
        let slabs = row.chunks_exact(self.r * bd);
        for (slab, out) in slabs.zip(row_factor.chunks_exact_mut(self.r * bd)) {
            let mut sums = vec![0f64; bd];
            for row in slab.chunks_exact(bd) {
                sums.iter_mut()
                    .zip(row)
                    .for_each(|(s, &x)| *s += f64::from(x));
            }
            let means: Vec<f32> = sums.iter().map(|&s| s as f32 * inv_r).collect();
            for (row, out) in slab.chunks_exact(bd).zip(out.chunks_exact_mut(bd)) {
                for ((o, &x), &mean) in out.iter_mut().zip(row).zip(&means) {
                    *o = 1.0 / (x / mean).sqrt();
                }
            }
        }
        Factors {
            row: row_factor,
            col: col.iter().map(|&c| 1.0 / c.sqrt()).collect(),
        }
    }

    /// Calls `f(rf, cf, range)` for each block `[c, d]` of the rows `rows`: `rf` its row factors
    /// (`[d]`), `cf` the col factors of its slab and `b` (`[c, d]`), `range` its elements
    /// relative to the first of `rows`.
    #[inline(always)]
    fn for_each_block<'f>(
        &self,
        rows: Range<usize>,
        factors: &'f Factors,
        mut f: impl FnMut(&'f [f32], &'f [f32], Range<usize>),
    ) {
        let (bl, d) = (self.block(), self.d);
        for (i, row_idx) in rows.clone().enumerate() {
            let slab = row_idx / self.r;
            for bi in 0..self.b {
                let block = row_idx * self.b + bi;
                let rf = &factors.row[block * d..][..d];
                let cf = &factors.col[(slab * self.b + bi) * bl..][..bl];
                let start = (i * self.b + bi) * bl;
                f(rf, cf, start..start + bl);
            }
        }
    }

    /// `Σ u²` over the parameter, `u = g * row * col`.
    fn sum_sq(&self, g: &[f32], factors: &Factors) -> f64 {
        let units = self.units();
        let parts: Vec<f64> = units
            .par_iter()
            .map(|rows| {
                let g = &g[rows.start * self.row_len()..rows.end * self.row_len()];
                let mut sum = 0f64;
                self.for_each_block(rows.clone(), factors, |rf, cf, range| {
                    sum += block_sum_sq(&g[range], rf, cf);
                });
                sum
            })
            .collect();
        parts.iter().sum()
    }

    /// The last pass: writes `p` and, with momentum, `m`.
    fn apply(&self, p: &mut [f32], m: Option<&mut [f32]>, g: &[f32], factors: &Factors, k: &Apply) {
        let units = self.units();
        let lens: Vec<usize> = units.iter().map(|r| r.len() * self.row_len()).collect();
        let p_parts = split(p, &lens);
        let m_parts: Vec<Option<&mut [f32]>> = match m {
            Some(m) => split(m, &lens).into_iter().map(Some).collect(),
            None => lens.iter().map(|_| None).collect(),
        };
        p_parts
            .into_par_iter()
            .zip(m_parts)
            .zip(&units)
            .for_each(|((p, mut m), rows)| {
                let g = &g[rows.start * self.row_len()..][..p.len()];
                self.for_each_block(rows.clone(), factors, |rf, cf, range| {
                    let m = m.as_deref_mut().map(|m| &mut m[range.clone()]);
                    block_apply(&mut p[range.clone()], m, &g[range], rf, cf, k);
                });
            });
    }
}

/// Adds the block's `g²` (`[c, d]`) to `col` (`[c, d]`) and its sums over `c` to `row` (`[d]`).
#[inline(always)]
fn block_sums(g: &[f32], col: &mut [f32], row: &mut [f64]) {
    if let [row] = row {
        // One row sum: over 8 lanes, so that the loop vectorises.
        let mut lanes = [0f64; 8];
        let mut g8 = g.chunks_exact(8);
        let mut col8 = col.chunks_exact_mut(8);
        for (g, col) in (&mut g8).zip(&mut col8) {
            for ((lane, c), &x) in lanes.iter_mut().zip(col).zip(g) {
                let s = x * x;
                *c += s;
                *lane += f64::from(s);
            }
        }
        for (c, &x) in col8.into_remainder().iter_mut().zip(g8.remainder()) {
            let s = x * x;
            *c += s;
            *row += f64::from(s);
        }
        *row += lanes.iter().sum::<f64>();
    } else {
        let d = row.len();
        for (g, col) in g.chunks_exact(d).zip(col.chunks_exact_mut(d)) {
            for ((r, c), &x) in row.iter_mut().zip(col).zip(g) {
                let s = x * x;
                *c += s;
                *r += f64::from(s);
            }
        }
    }
}

/// `Σ u²` over a block `[c, d]`, `u = g * rf * cf` (`rf`: `[d]`, `cf`: `[c, d]`).
#[inline(always)]
fn block_sum_sq(g: &[f32], rf: &[f32], cf: &[f32]) -> f64 {
    let n = g.len();
    let (g, cf) = (&g[..n], &cf[..n]);
    if let [rf] = rf {
        sum_sq(n, |i| (g[i] * rf) * cf[i])
    } else {
        let d = rf.len();
        let rows = g.chunks_exact(d).zip(cf.chunks_exact(d));
        rows.map(|(g, cf)| sum_sq(d, |i| (g[i] * rf[i]) * cf[i]))
            .sum()
    }
}

/// The last pass over a block `[c, d]`.
#[inline(always)]
fn block_apply(p: &mut [f32], m: Option<&mut [f32]>, g: &[f32], rf: &[f32], cf: &[f32], k: &Apply) {
    let n = p.len();
    let (g, cf) = (&g[..n], &cf[..n]);
    if let [rf] = rf {
        k.run(p, m, |i| (g[i] * rf) * cf[i]);
    } else {
        let d = rf.len();
        let inputs = g.chunks_exact(d).zip(cf.chunks_exact(d));
        match m {
            Some(m) => {
                let rows = p.chunks_exact_mut(d).zip(m.chunks_exact_mut(d)).zip(inputs);
                for ((p, m), (g, cf)) in rows {
                    k.run(p, Some(m), |i| (g[i] * rf[i]) * cf[i]);
                }
            }
            None => {
                for (p, (g, cf)) in p.chunks_exact_mut(d).zip(inputs) {
                    k.run(p, None, |i| (g[i] * rf[i]) * cf[i]);
                }
            }
        }
    }
}

/// The unfactored moment's first pass: `v = beta2_t * v + (1 - beta2_t) * (g² + eps1)` in place,
/// returning `Σ u²` with `u = g / sqrt(v)`.
fn full_moment(v: &mut [f32], g: &[f32], k: &Consts) -> f64 {
    let parts: Vec<f64> = v
        .par_chunks_mut(GRAIN)
        .zip(g.par_chunks(GRAIN))
        .map(|(v, g)| {
            for (v, &x) in v.iter_mut().zip(g) {
                *v = *v * k.keep + ((x * x) * k.fresh + k.fresh_eps);
            }
            let (v, g) = (&v[..], &g[..v.len()]);
            sum_sq(v.len(), |i| g[i] / v[i].sqrt())
        })
        .collect();
    parts.iter().sum()
}

/// The unfactored moment's last pass.
fn full_apply(p: &mut [f32], m: Option<&mut [f32]>, g: &[f32], v: &[f32], k: &Apply) {
    let lens: Vec<usize> = p.chunks(GRAIN).map(<[f32]>::len).collect();
    let m_parts: Vec<Option<&mut [f32]>> = match m {
        Some(m) => split(m, &lens).into_iter().map(Some).collect(),
        None => lens.iter().map(|_| None).collect(),
    };
    p.par_chunks_mut(GRAIN)
        .zip(m_parts)
        .zip(g.par_chunks(GRAIN).zip(v.par_chunks(GRAIN)))
        .for_each(|((p, m), (g, v))| {
            let (g, v) = (&g[..p.len()], &v[..p.len()]);
            k.run(p, m, |i| g[i] / v[i].sqrt());
        });
}

/// `data` cut into consecutive pieces of the given lengths.
fn split<'a>(mut data: &'a mut [f32], lens: &[usize]) -> Vec<&'a mut [f32]> {
    lens.iter()
        .map(|&len| {
            let (head, tail) = std::mem::take(&mut data).split_at_mut(len);
            data = tail;
            head
        })
        .collect()
}

/// `with_momentum(m, f)` runs `f` with the momentum's elements for writing, or with `None`.
fn with_momentum(
    m: Option<&Tensor>,
    f: impl FnOnce(Option<&mut [f32]>) -> Result<()>,
) -> Result<()> {
    match m {
        Some(m) => write_f32(m, |m| f(Some(m))),
        None => f(None),
    }
}

/// Makes `slot` a contiguous f32 tensor of `like`'s shape that this module may write in place:
/// zeros when empty.
fn ensure_writable(slot: &mut Option<Tensor>, like: &Tensor) -> Result<()> {
    match slot {
        Some(t) if t.shape() != like.shape() || t.dtype() != DType::F32 => bail!(
            "adafactor: state of shape {:?} ({:?}) for a parameter of shape {:?}",
            t.shape(),
            t.dtype(),
            like.shape()
        ),
        Some(t) if !t.is_contiguous() => *t = t.contiguous()?,
        Some(_) => {}
        None => *slot = Some(Tensor::zeros(like.shape(), DType::F32, like.device())?),
    }
    Ok(())
}

/// The elements of a small f32 CPU tensor, copied.
fn read_f32(t: &Tensor) -> Result<Vec<f32>> {
    t.flatten_all()?.to_vec1()
}

/// The contiguous f32 elements of a CPU storage.
fn elements<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(data), Some((start, end))) => Ok(&data[start..end]),
        _ => bail!("adafactor: expected a contiguous f32 tensor"),
    }
}

fn elements_mut<'a>(s: &'a mut CpuStorage, l: &Layout) -> Result<&'a mut [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(data), Some((start, end))) => Ok(&mut data[start..end]),
        _ => bail!("adafactor: expected a contiguous f32 tensor"),
    }
}

/// Runs `f` on the elements of `t` for writing. Through candle's in-place ops, the one safe way
/// to write a tensor's storage: they lock it for the call.
fn write_f32(t: &Tensor, f: impl FnOnce(&mut [f32]) -> Result<()>) -> Result<()> {
    t.inplace_op1(&InPlace(Cell::new(Some(f))))
}

/// Runs `f` on the elements of `param` for writing and of `grad` for reading. candle refuses
/// (rather than deadlocks on) a gradient that shares the parameter's storage.
fn write_with_grad(
    param: &Tensor,
    grad: &Tensor,
    f: impl FnOnce(&mut [f32], &[f32]) -> Result<()>,
) -> Result<()> {
    param.inplace_op2(grad, &InPlace(Cell::new(Some(f))))
}

/// An in-place op that hands the storages to a closure, once.
struct InPlace<F>(Cell<Option<F>>);

impl<F> InPlace<F> {
    fn take(&self) -> Result<F> {
        match self.0.take() {
            Some(f) => Ok(f),
            None => bail!("adafactor: in-place op run twice"),
        }
    }
}

impl<F: FnOnce(&mut [f32]) -> Result<()>> InplaceOp1 for InPlace<F> {
    fn name(&self) -> &'static str {
        "adafactor"
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> Result<()> {
        (self.take()?)(elements_mut(s, l)?)
    }
}

impl<F: FnOnce(&mut [f32], &[f32]) -> Result<()>> InplaceOp2 for InPlace<F> {
    fn name(&self) -> &'static str {
        "adafactor"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        (self.take()?)(elements_mut(s1, l1)?, elements(s2, l2)?)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use super::*;

    #[test]
    fn units_cover_the_rows_and_stay_in_their_slab() {
        for dims in [
            [1, 1, 1, 1, 1],
            [3, 5, 1, 7, 1],
            [2, 64, 3, 200, 5],
            [1, 512, 1, 512, 9],
            [1000, 3, 1, 3, 1],
            [2, 7, 1, 100_000, 1],
        ] {
            let blocks = Blocks::new(&dims, 1, 3).unwrap();
            let units = blocks.units();
            let mut next = 0;
            for rows in &units {
                assert_eq!(rows.start, next, "{dims:?}: {units:?}");
                assert!(!rows.is_empty());
                let (first, last) = (rows.start / blocks.r, (rows.end - 1) / blocks.r);
                // Either within one slab or whole slabs.
                assert!(
                    first == last || (rows.start % blocks.r == 0 && rows.end % blocks.r == 0),
                    "{dims:?}: {rows:?}"
                );
                next = rows.end;
            }
            assert_eq!(next, blocks.a * blocks.r, "{dims:?}");
        }
    }

    /// One Adafactor step in f64 with plain index loops: the reference for the kernels.
    fn naive_step(
        dims: [usize; 5],
        p: &[f32],
        g: &[f32],
        m: Option<&[f32]>,
        h: &Hyper,
    ) -> (Vec<f64>, Vec<f64>) {
        let [a, r, b, c, d] = dims;
        let at = |ia: usize, ir: usize, ib: usize, ic: usize, id: usize| {
            (((ia * r + ir) * b + ib) * c + ic) * d + id
        };
        let sq = |i: usize| f64::from(g[i]) * f64::from(g[i]) + h.eps1;
        let mut row = vec![0f64; a * r * b * d];
        let mut col = vec![0f64; a * b * c * d];
        for ia in 0..a {
            for ir in 0..r {
                for ib in 0..b {
                    for ic in 0..c {
                        for id in 0..d {
                            let s = sq(at(ia, ir, ib, ic, id));
                            row[((ia * r + ir) * b + ib) * d + id] += s / c as f64;
                            col[((ia * b + ib) * c + ic) * d + id] += s / r as f64;
                        }
                    }
                }
            }
        }
        let mut u = vec![0f64; p.len()];
        for ia in 0..a {
            for ib in 0..b {
                for id in 0..d {
                    let rows = |ir: usize| row[((ia * r + ir) * b + ib) * d + id];
                    let mean = (0..r).map(rows).sum::<f64>() / r as f64;
                    for ir in 0..r {
                        for ic in 0..c {
                            let i = at(ia, ir, ib, ic, id);
                            let v = rows(ir) * col[((ia * b + ib) * c + ic) * d + id] / mean;
                            u[i] = f64::from(g[i]) / v.sqrt();
                        }
                    }
                }
            }
        }
        let rms = (u.iter().map(|x| x * x).sum::<f64>() / u.len() as f64).sqrt();
        let scale = h.lr / (rms / h.clip_threshold).max(1.0);
        let mut new_m = vec![0f64; p.len()];
        let new_p = (0..p.len())
            .map(|i| {
                let mut s = u[i] * scale;
                if let (Some(b1), Some(m)) = (h.beta1, m) {
                    new_m[i] = f64::from(m[i]) * b1 + (1.0 - b1) * s;
                    s = new_m[i];
                }
                f64::from(p[i]) * (1.0 - h.weight_decay * h.lr) - s
            })
            .collect();
        (new_p, new_m)
    }

    /// `max |a - b| / max |b|`.
    fn rel_to_max(a: &[f64], b: &[f64]) -> f64 {
        let diff = a.iter().zip(b).map(|(x, y)| (x - y).abs());
        diff.fold(0f64, f64::max) / b.iter().map(|y| y.abs()).fold(0f64, f64::max)
    }

    /// Deterministic values in about [-scale, scale].
    fn values(n: usize, seed: u32, scale: f32) -> Vec<f32> {
        (0..n)
            .map(|i| ((i as f32 * 0.618 + seed as f32).sin() * 1.7 + 0.3) * scale)
            .collect()
    }

    #[test]
    fn factored_step_matches_a_naive_reference_on_strided_dims() {
        // [a, r, b, c, d] = [2, 64, 3, 200, 5]: slabs beyond GRAIN (pieces within a slab), rows
        // and cols both strided.
        let dims = [2, 64, 3, 200, 5];
        let n: usize = dims.iter().product();
        let dev = Device::Cpu;
        for (beta1, weight_decay) in [(None, 0.0), (Some(0.9), 0.1)] {
            let h = Hyper {
                lr: 0.1,
                eps1: 1e-30,
                clip_threshold: 1.0,
                beta1,
                weight_decay,
            };
            // Small weights, whose rounding does not hide that of the updates.
            let p0 = values(n, 1, 1e-3);
            // Larger in some rows: the row factors differ.
            let g: Vec<f32> = values(n, 2, 1.0)
                .iter()
                .enumerate()
                .map(|(i, x)| x * (1 + i / 5000 % 4) as f32)
                .collect();
            let m0 = values(n, 3, 0.01);
            let param = Var::from_vec(p0.clone(), &dims, &dev).unwrap();
            let grad = Tensor::from_vec(g.clone(), &dims, &dev).unwrap();
            let mut row_col = None;
            let mut exp_avg = beta1.map(|_| Tensor::from_vec(m0.clone(), &dims, &dev).unwrap());
            let mut steps = [ParamStep {
                param: param.as_tensor(),
                grad: &grad,
                beta2t: 0.0,
                second_moment: SecondMoment::Factored {
                    lo: 1,
                    hi: 3,
                    row_col: &mut row_col,
                },
                exp_avg: &mut exp_avg,
            }];
            step(&mut steps, &h).unwrap();
            let (want_p, want_m) = naive_step(dims, &p0, &g, beta1.map(|_| &m0[..]), &h);
            let got_p = param
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            // The change of each weight, relative to the largest change.
            let change = |p: &[f64]| -> Vec<f64> {
                p.iter()
                    .zip(&p0)
                    .map(|(p, &p0)| p - f64::from(p0))
                    .collect()
            };
            let got_p: Vec<f64> = got_p.iter().map(|&x| f64::from(x)).collect();
            let err = rel_to_max(&change(&got_p), &change(&want_p));
            println!("{beta1:?}: update error {err:.1e}");
            assert!(err < 1e-6, "{beta1:?}: updates differ by {err:e}");
            if let Some(m) = &exp_avg {
                let got_m = m.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let got_m: Vec<f64> = got_m.iter().map(|&x| f64::from(x)).collect();
                let err = rel_to_max(&got_m, &want_m);
                println!("momentum error {err:.1e}");
                assert!(err < 1e-6, "momenta differ by {err:e}");
            }
            let (row, col) = row_col.unwrap();
            assert_eq!(row.dims(), [2, 64, 3, 1, 5]);
            assert_eq!(col.dims(), [2, 1, 3, 200, 5]);
        }
    }

    #[test]
    fn rejects_what_it_does_not_support() {
        let dev = Device::Cpu;
        let param = Var::zeros((2, 3), DType::F32, &dev).unwrap();
        let grad = Tensor::zeros((2, 3), DType::F16, &dev).unwrap();
        assert!(!supports(param.as_tensor(), &grad));
        let grad = Tensor::zeros((3, 2), DType::F32, &dev)
            .unwrap()
            .t()
            .unwrap();
        assert!(supports(param.as_tensor(), &grad), "any gradient layout");
        let h = Hyper {
            lr: 0.1,
            eps1: 1e-30,
            clip_threshold: 1.0,
            beta1: None,
            weight_decay: 0.0,
        };
        let (mut v1, mut v2, mut m1, mut m2) = (None, None, None, None);
        let mut twice = [&mut v1, &mut v2]
            .into_iter()
            .zip([&mut m1, &mut m2])
            .map(|(v, m)| ParamStep {
                param: param.as_tensor(),
                grad: &grad,
                beta2t: 0.0,
                second_moment: SecondMoment::Full(v),
                exp_avg: m,
            })
            .collect::<Vec<_>>();
        let err = step(&mut twice, &h).unwrap_err();
        assert!(err.to_string().contains("twice"), "{err}");
    }
}
