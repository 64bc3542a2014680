//! LayerNorm over the last dimension (`torch.nn.LayerNorm(c)` with weight and bias) as a candle
//! custom op with an analytic backward.
//!
//! Composed of candle ops (mean, subtract, square, mean, sqrt, divide, scale, shift), a LayerNorm
//! writes about nine full-size tensors that autograd keeps alive, and its backward sums the
//! weight's and the bias's gradients over every row with candle's single-threaded strided
//! `sum_keepdim`. Here the forward reads each row from memory once (its statistics and the output
//! then read it from cache), writes the output once and keeps only each row's mean and 1/std.
//! The backward reads the input and the output gradient once per row from memory and writes the
//! input gradient, while each piece of rows sums its share of the weight and bias gradients; the
//! shares are added at the end. Rows are split into pieces over rayon. The row sums of f32 run in
//! AVX2 intrinsics where the CPU has them (see [`avx2`]), in short f32 blocks gathered in f64, and
//! each few rows' statistics come before their outputs so that their dependent steps overlap.

use std::mem::MaybeUninit;
use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor, WithDType,
};
use rayon::prelude::*;

use crate::cpu::{contiguous, uninit_vec, unsupported, Arg};
use crate::matmul::{pieces, zero};

/// The name in the errors.
const OP: &str = "layer_norm";

/// `torch.nn.LayerNorm(c, eps)` applied to `x` (`[..., c]`, any rank from 1), normalising over the
/// last dimension with the biased variance, then scaling by `weight` and shifting by `bias`
/// (both `[c]`). Differentiable with respect to all three (first order; only tracked inputs get a
/// gradient). CPU tensors of dtype f32 (or f64), all of one dtype (callers fall back to composite
/// ops elsewhere); `x` is made contiguous if it is not.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let c = match x.dims().last() {
        Some(&c) if x.elem_count() > 0 => c,
        _ => bail!(
            "layer_norm: expected a non-empty input of rank 1 or more, got {:?}",
            x.shape()
        ),
    };
    for (name, t) in [("weight", weight), ("bias", bias)] {
        if t.dims() != [c] {
            bail!(
                "layer_norm: {name} has shape {:?}, expected [{c}]",
                t.shape()
            )
        }
    }
    let dtype = x.dtype();
    for t in [x, weight, bias] {
        let float = matches!(t.dtype(), DType::F32 | DType::F64);
        if !t.device().is_cpu() || !float || t.dtype() != dtype {
            bail!(
                "layer_norm: only f32 or f64 CPU tensors of one dtype, got {:?} on {:?} for an \
                 input of {dtype:?}",
                t.dtype(),
                t.device()
            )
        }
    }
    let op = LayerNormOp {
        eps,
        stats: Mutex::new(None),
    };
    x.contiguous()?
        .apply_op3(&weight.contiguous()?, &bias.contiguous()?, op)
}

struct LayerNormOp {
    eps: f64,
    /// `(mean, 1/std)` of each row, left by the forward for the backward (in f64 whatever the
    /// dtype: the values of the dtype, converted exactly).
    stats: Mutex<Option<Vec<(f64, f64)>>>,
}

/// Below this many elements a piece of work is not worth handing to another thread.
const MIN_PIECE: usize = 8192;

/// Rows per piece of work for `rows` rows of `c` elements cut into `pieces` pieces (fewer when the
/// rows are few).
fn rows_per_piece(rows: usize, c: usize, pieces: usize) -> usize {
    rows.div_ceil(pieces)
        .max(MIN_PIECE.div_ceil(c))
        .min(rows)
        .max(1)
}

impl LayerNormOp {
    fn forward<T: Element>(&self, x: Arg, w: Arg, b: Arg) -> Result<CpuStorage> {
        let x = contiguous::<T>(OP, x, "input")?;
        let w = contiguous::<T>(OP, w, "weight")?;
        let b = contiguous::<T>(OP, b, "bias")?;
        let c = w.len();
        let rows = rows_per_piece(x.len() / c, c, pieces());
        let mut stats = vec![(0.0, 0.0); x.len() / c];
        let fill = |out: &mut [MaybeUninit<T>]| {
            out.par_chunks_mut(rows * c)
                .zip(x.par_chunks(rows * c))
                .zip(stats.par_chunks_mut(rows))
                .for_each(|((out, x), stats)| T::forward_piece(x, w, b, self.eps, out, stats))
        };
        // SAFETY: the pieces cover the output, and `forward_piece` writes each whole.
        let out = unsafe { uninit_vec(x.len(), fill) };
        match self.stats.lock() {
            Ok(mut saved) => *saved = Some(stats),
            Err(_) => bail!("layer_norm: statistics lock poisoned"),
        }
        Ok(T::to_cpu_storage_owned(out))
    }

    /// The gradients of the input (when `input`) and of the weight and the bias (when `params`).
    fn backward<T: Element>(
        &self,
        x: &Tensor,
        w: &Tensor,
        dy: &Tensor,
        input: bool,
        params: bool,
    ) -> Result<(Option<Tensor>, Option<ParamGrads>)> {
        let stats = match self.stats.lock() {
            Ok(saved) => match saved.as_ref() {
                Some(stats) => stats.clone(),
                None => bail!("layer_norm: backward without a forward"),
            },
            Err(_) => bail!("layer_norm: statistics lock poisoned"),
        };
        let (xs, xl) = x.storage_and_layout();
        let (ws, wl) = w.storage_and_layout();
        let (dys, dyl) = dy.storage_and_layout();
        let xv = cpu::<T>(&xs, xl, "input")?;
        let wv = cpu::<T>(&ws, wl, "weight")?;
        let dyv = cpu::<T>(&dys, dyl, "output gradient")?;
        if dyv.len() != xv.len() || stats.len() * wv.len() != xv.len() {
            bail!(
                "layer_norm backward: output gradient {:?} for the input {:?}",
                dyl.dims(),
                xl.dims()
            )
        }
        let rows = rows_per_piece(stats.len(), wv.len(), pieces());
        let (dx, dparams) = backward(xv, dyv, wv, &stats, input, params, rows);
        let dx = dx
            .map(|dx| Tensor::from_vec(dx, x.shape(), x.device()))
            .transpose()?;
        Ok((dx, dparams))
    }
}

/// The contiguous elements of a tensor's CPU storage, of dtype `T`.
fn cpu<'a, T: WithDType>(storage: &'a Storage, layout: &Layout, what: &str) -> Result<&'a [T]> {
    match storage {
        Storage::Cpu(s) => contiguous(OP, (s, layout), what),
        _ => bail!("{OP}: {what} is not on the CPU"),
    }
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "unitune-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let c = l2.shape().elem_count();
        if l1.dims().last() != Some(&c) || l3.shape().elem_count() != c || c == 0 {
            bail!(
                "layer_norm: input {:?}, weight {:?}, bias {:?}",
                l1.dims(),
                l2.dims(),
                l3.dims()
            )
        }
        let storage = match s1.dtype() {
            DType::F32 => self.forward::<f32>((s1, l1), (s2, l2), (s3, l3))?,
            DType::F64 => self.forward::<f64>((s1, l1), (s2, l2), (s3, l3))?,
            dtype => unsupported(OP, dtype)?,
        };
        Ok((storage, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _out: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // Only what some variable depends on: the weight and the bias share one pass.
        let (input, params) = (x.track_op(), w.track_op() || b.track_op());
        // The incoming gradient may be strided (a broadcast from a sum, for one).
        let dy = dy.contiguous()?;
        let (dx, dparams) = match x.dtype() {
            DType::F32 => self.backward::<f32>(x, w, &dy, input, params)?,
            DType::F64 => self.backward::<f64>(x, w, &dy, input, params)?,
            dtype => unsupported(OP, dtype)?,
        };
        let (dw, db) = match dparams {
            Some(p) => {
                let to_tensor =
                    |v: Vec<f64>| Tensor::from_vec(v, w.shape(), w.device())?.to_dtype(w.dtype());
                let dw = w.track_op().then(|| to_tensor(p.weight)).transpose()?;
                let db = b.track_op().then(|| to_tensor(p.bias)).transpose()?;
                (dw, db)
            }
            None => (None, None),
        };
        Ok((dx, dw, db))
    }
}

/// The element types of the op: f32, whose row loops run in AVX2 intrinsics where the CPU has
/// them, and f64 (for the tests' finite differences), which runs the portable loops.
trait Element: WithDType {
    /// Normalises whole rows of `x` into all of `out` and writes each row's `(mean, rstd)` to
    /// `stats`.
    fn forward_piece(
        x: &[Self],
        w: &[Self],
        b: &[Self],
        eps: f64,
        out: &mut [MaybeUninit<Self>],
        stats: &mut [(f64, f64)],
    ) {
        forward_rows(x, w, b, eps, out, stats, row_stats)
    }

    /// [`backward`] on whole rows: writes the input's gradient to all of `dx` unless it is empty,
    /// returns the piece's share of the weight and bias gradients when `params`.
    fn backward_piece(
        x: &[Self],
        dy: &[Self],
        w: &[Self],
        stats: &[(f64, f64)],
        dx: &mut [MaybeUninit<Self>],
        params: bool,
    ) -> Option<ParamGrads> {
        backward_rows(x, dy, w, stats, dx, params, grad_sums)
    }
}

impl Element for f64 {}

impl Element for f32 {
    fn forward_piece(
        x: &[f32],
        w: &[f32],
        b: &[f32],
        eps: f64,
        out: &mut [MaybeUninit<f32>],
        stats: &mut [(f64, f64)],
    ) {
        #[cfg(target_arch = "x86_64")]
        if avx2::available() {
            // SAFETY: the CPU has the features `avx2` is compiled for.
            return unsafe { avx2::forward_piece(x, w, b, eps, out, stats) };
        }
        forward_rows(x, w, b, eps, out, stats, row_stats)
    }

    fn backward_piece(
        x: &[f32],
        dy: &[f32],
        w: &[f32],
        stats: &[(f64, f64)],
        dx: &mut [MaybeUninit<f32>],
        params: bool,
    ) -> Option<ParamGrads> {
        #[cfg(target_arch = "x86_64")]
        if avx2::available() {
            // SAFETY: the CPU has the features `avx2` is compiled for.
            return unsafe { avx2::backward_piece(x, dy, w, stats, dx, params) };
        }
        backward_rows(x, dy, w, stats, dx, params, grad_sums)
    }
}

/// Independent accumulators (and the width of the unrolled loops), so that the compiler
/// vectorises the portable sums.
const LANES: usize = 8;
/// Elements summed in `T` lanes before the lanes go into f64: 32 terms per lane keep the f32
/// rounding near 1e-6 relative while the inner loops stay f32 and full width.
const BLOCK: usize = 32 * LANES;
/// Rows whose weight and bias gradients a piece sums in `T` before adding them into f64, for the
/// same reason.
const ROW_BLOCK: usize = 32;
/// Rows whose sums (the forward's statistics, the backward's means of `g` and `g * x_hat`) come
/// before their outputs: each row's sums end in a chain of dependent steps (the lanes' total, the
/// mean, for the statistics a square root and a division) that the CPU overlaps with the next
/// row's sums, where computing the row's output right after would wait on the chain.
const STATS_ROWS: usize = 8;
const _: () = assert!(ROW_BLOCK.is_multiple_of(STATS_ROWS));

/// Sum of `f(a, b)` over the elements of `a` and `b` (of one length), accumulated as described
/// at [`BLOCK`].
#[inline(always)]
fn sum<T: WithDType>(a: &[T], b: &[T], f: impl Fn(T, T) -> T) -> f64 {
    let mut total = 0f64;
    for (a, b) in a.chunks(BLOCK).zip(b.chunks(BLOCK)) {
        let mut acc = [zero::<T>(); LANES];
        let ((a, a_rest), (b, b_rest)) = (a.as_chunks::<LANES>(), b.as_chunks::<LANES>());
        for (a, b) in a.iter().zip(b) {
            for l in 0..LANES {
                acc[l] += f(a[l], b[l]);
            }
        }
        for (&a, &b) in a_rest.iter().zip(b_rest) {
            acc[0] += f(a, b);
        }
        total += acc.iter().map(|a| a.to_f64()).sum::<f64>();
    }
    total
}

/// `(mean, 1/sqrt(var + eps))` of one row, with the biased variance as torch.
#[inline(always)]
fn row_stats<T: WithDType>(x: &[T], eps: f64) -> (T, T) {
    let n = x.len() as f64;
    let mean = T::from_f64(sum(x, x, |v, _| v) / n);
    // Two passes (squared deviations) rather than E[x^2] - mean^2, which cancels when the mean is
    // large; the row is in cache by now.
    let var = sum(x, x, |v, _| (v - mean) * (v - mean)) / n;
    (mean, T::from_f64(1.0 / (var + eps).sqrt()))
}

/// `(Σ g, Σ g * x_hat)` over one row, `x_hat = (x - mean) * rstd`.
#[inline(always)]
fn grad_sums<T: WithDType>(g: &[T], x: &[T], mean: T, rstd: T) -> (f64, f64) {
    (
        sum(g, g, |g, _| g),
        sum(g, x, |g, v| g * ((v - mean) * rstd)),
    )
}

/// [`Element::forward_piece`], with `row_stats` computing a row's `(mean, rstd)`.
#[inline(always)]
fn forward_rows<T: WithDType>(
    x: &[T],
    w: &[T],
    b: &[T],
    eps: f64,
    out: &mut [MaybeUninit<T>],
    stats: &mut [(f64, f64)],
    row_stats: impl Fn(&[T], f64) -> (T, T),
) {
    let c = w.len();
    let batches = x
        .chunks(STATS_ROWS * c)
        .zip(out.chunks_mut(STATS_ROWS * c))
        .zip(stats.chunks_mut(STATS_ROWS));
    for ((x, out), stats) in batches {
        for (x, stats) in x.chunks_exact(c).zip(stats.iter_mut()) {
            let (mean, rstd) = row_stats(x, eps);
            *stats = (mean.to_f64(), rstd.to_f64());
        }
        let rows = x.chunks_exact(c).zip(out.chunks_exact_mut(c));
        for ((x, out), &(mean, rstd)) in rows.zip(stats.iter()) {
            let (mean, rstd) = (T::from_f64(mean), T::from_f64(rstd));
            for (((o, &v), &w), &b) in out.iter_mut().zip(x).zip(w).zip(b) {
                o.write((v - mean) * rstd * w + b);
            }
        }
    }
}

/// The weight's and the bias's gradients (or a piece's share): the sums over rows of
/// `dy * x_hat` and of `dy`.
struct ParamGrads {
    weight: Vec<f64>,
    bias: Vec<f64>,
}

impl ParamGrads {
    fn zeros(c: usize) -> Self {
        Self {
            weight: vec![0.0; c],
            bias: vec![0.0; c],
        }
    }

    /// Adds `other` into `self`.
    fn add(mut self, other: Self) -> Self {
        for (a, b) in self.weight.iter_mut().zip(other.weight) {
            *a += b;
        }
        for (a, b) in self.bias.iter_mut().zip(other.bias) {
            *a += b;
        }
        self
    }
}

/// The input's gradient (when `input`) and the weight's and bias's (when `params`) from the
/// output's `dy`, the input `x`, the weight `w` and the forward's row statistics, in pieces of
/// `rows` rows run in parallel.
fn backward<T: Element>(
    x: &[T],
    dy: &[T],
    w: &[T],
    stats: &[(f64, f64)],
    input: bool,
    params: bool,
    rows: usize,
) -> (Option<Vec<T>>, Option<ParamGrads>) {
    let n = rows * w.len();
    let pieces = x
        .par_chunks(n)
        .zip(dy.par_chunks(n))
        .zip(stats.par_chunks(rows));
    let mut shares: Vec<Option<ParamGrads>> = Vec::new();
    let dx = if input {
        let fill = |dx: &mut [MaybeUninit<T>]| {
            shares = pieces
                .zip(dx.par_chunks_mut(n))
                .map(|(((x, dy), stats), dx)| T::backward_piece(x, dy, w, stats, dx, params))
                .collect()
        };
        // SAFETY: the pieces cover `dx`, and `backward_piece` writes each whole.
        Some(unsafe { uninit_vec(x.len(), fill) })
    } else {
        shares = pieces
            .map(|((x, dy), stats)| T::backward_piece(x, dy, w, stats, &mut [], params))
            .collect();
        None
    };
    let dparams = shares.into_iter().flatten().reduce(ParamGrads::add);
    (dx, dparams)
}

/// [`Element::backward_piece`], with `grad_sums` as [`grad_sums`].
#[inline(always)]
fn backward_rows<T: WithDType>(
    x: &[T],
    dy: &[T],
    w: &[T],
    stats: &[(f64, f64)],
    dx: &mut [MaybeUninit<T>],
    params: bool,
    grad_sums: impl Fn(&[T], &[T], T, T) -> (f64, f64),
) -> Option<ParamGrads> {
    match (dx.is_empty(), params) {
        (false, true) => rows::<T, true, true>(x, dy, w, stats, dx, grad_sums),
        (false, false) => rows::<T, true, false>(x, dy, w, stats, dx, grad_sums),
        (true, true) => rows::<T, false, true>(x, dy, w, stats, dx, grad_sums),
        (true, false) => None,
    }
}

/// The row loop of [`backward_rows`], for the input's gradient when `INPUT` and the weight's and
/// bias's when `PARAMS` (returned, `None` otherwise).
#[inline(always)]
fn rows<T: WithDType, const INPUT: bool, const PARAMS: bool>(
    x: &[T],
    dy: &[T],
    w: &[T],
    stats: &[(f64, f64)],
    dx: &mut [MaybeUninit<T>],
    grad_sums: impl Fn(&[T], &[T], T, T) -> (f64, f64),
) -> Option<ParamGrads> {
    let c = w.len();
    let params_len = if PARAMS { c } else { 0 };
    let mut shares = ParamGrads::zeros(params_len);
    // The sums of the rows since the last flush into `shares`, in `T`.
    let (mut dw, mut db) = (vec![zero::<T>(); params_len], vec![zero::<T>(); params_len]);
    // Each row's `(mean(g), mean(g * x_hat))`, for the input's gradient.
    let mut means = [(zero::<T>(), zero::<T>()); STATS_ROWS];
    let batch = STATS_ROWS * c;
    let batches = x
        .chunks(batch)
        .zip(dy.chunks(batch))
        .zip(stats.chunks(STATS_ROWS));
    for (i, ((x, dy), stats)) in batches.enumerate() {
        let stats = stats.iter().map(|&(m, r)| (T::from_f64(m), T::from_f64(r)));
        let dx: &mut [MaybeUninit<T>] = if INPUT {
            &mut dx[i * batch..i * batch + x.len()]
        } else {
            &mut []
        };
        // The sums of a few rows first, then their input gradients, as in the forward (see
        // `STATS_ROWS`).
        let rows = x.chunks_exact(c).zip(dy.chunks_exact(c)).zip(stats.clone());
        for (j, ((x, dy), (mean, rstd))) in rows.enumerate() {
            if PARAMS {
                param_row(x, dy, mean, rstd, &mut dw, &mut db);
            }
            if INPUT {
                let g = &mut dx[j * c..(j + 1) * c];
                means[j] = input_sums(x, dy, w, mean, rstd, g, &grad_sums);
            }
        }
        if INPUT {
            // SAFETY: `input_sums` wrote each row of the batch.
            let dx = unsafe { dx.assume_init_mut() };
            let rows = x.chunks_exact(c).zip(dx.chunks_exact_mut(c));
            for (((x, dx), (mean, rstd)), &means) in rows.zip(stats).zip(&means) {
                input_grad_row(x, mean, rstd, means, dx);
            }
        }
        if PARAMS && (i + 1) % (ROW_BLOCK / STATS_ROWS) == 0 {
            flush(&mut shares, &mut dw, &mut db);
        }
    }
    flush(&mut shares, &mut dw, &mut db);
    PARAMS.then_some(shares)
}

/// Adds the sums `dw` and `db` of a block of rows into `shares`, and zeroes them.
#[inline(always)]
fn flush<T: WithDType>(shares: &mut ParamGrads, dw: &mut [T], db: &mut [T]) {
    for (totals, parts) in [(&mut shares.weight, dw), (&mut shares.bias, db)] {
        for (total, part) in totals.iter_mut().zip(parts.iter_mut()) {
            *total += part.to_f64();
            *part = zero();
        }
    }
}

/// Adds one row's `dy * x_hat` to `dw` and `dy` to `db`.
#[inline(always)]
fn param_row<T: WithDType>(x: &[T], dy: &[T], mean: T, rstd: T, dw: &mut [T], db: &mut [T]) {
    let sums = dw.iter_mut().zip(db.iter_mut());
    for ((dw, db), (&v, &g)) in sums.zip(x.iter().zip(dy)) {
        *dw += g * ((v - mean) * rstd);
        *db += g;
    }
}

/// The first half of one row's input gradient: writes `g = dy * w` to all of `g` and returns
/// `(mean(g), mean(g * x_hat))`, the sums from `grad_sums` (as [`grad_sums`]). `g` goes through
/// memory so that each sum reads two slices: the compiler vectorises those, not one sum over `x`,
/// `dy` and `w`.
#[inline(always)]
fn input_sums<T: WithDType>(
    x: &[T],
    dy: &[T],
    w: &[T],
    mean: T,
    rstd: T,
    g: &mut [MaybeUninit<T>],
    grad_sums: impl Fn(&[T], &[T], T, T) -> (f64, f64),
) -> (T, T) {
    assert_eq!(g.len(), w.len(), "layer_norm: row lengths");
    for ((g, &d), &w) in g.iter_mut().zip(dy).zip(w) {
        g.write(d * w);
    }
    // SAFETY: written just above (`dy` is a row as long, the callers' row of `x.chunks_exact(c)`).
    let g = unsafe { g.assume_init_mut() };
    let n = x.len() as f64;
    let (sum_g, sum_g_xhat) = grad_sums(g, x, mean, rstd);
    (T::from_f64(sum_g / n), T::from_f64(sum_g_xhat / n))
}

/// The second half: turns `g` (in `dx`) into the input's gradient,
/// `dx = rstd * (g - mean(g) - x_hat * mean(g * x_hat))`.
#[inline(always)]
fn input_grad_row<T: WithDType>(
    x: &[T],
    mean: T,
    rstd: T,
    (mean_g, mean_g_xhat): (T, T),
    dx: &mut [T],
) {
    for (d, &v) in dx.iter_mut().zip(x) {
        let x_hat = (v - mean) * rstd;
        *d = rstd * (*d - mean_g - x_hat * mean_g_xhat);
    }
}

/// The row sums of f32 in AVX2 and FMA intrinsics, written out, as in [`crate::attention`],
/// because the compiler vectorises the portable sums unreliably: small changes turn their loops
/// into element-by-element loads, and their lanes' final sum into a serial chain that costs as
/// much as the loops at rows of a few hundred elements. The elementwise loops stay portable
/// (compiled here with AVX2). Each row ends with a masked vector.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use std::mem::MaybeUninit;

    use super::{backward_rows, forward_rows, ParamGrads, BLOCK};
    pub(super) use crate::simd::avx2::available;
    use crate::simd::avx2::{split, sum_lanes};

    /// [`super::Element::forward_piece`] for f32.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn forward_piece(
        x: &[f32],
        w: &[f32],
        b: &[f32],
        eps: f64,
        out: &mut [MaybeUninit<f32>],
        stats: &mut [(f64, f64)],
    ) {
        forward_rows(x, w, b, eps, out, stats, |x, eps| row_stats(x, eps))
    }

    /// [`super::Element::backward_piece`] for f32.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn backward_piece(
        x: &[f32],
        dy: &[f32],
        w: &[f32],
        stats: &[(f64, f64)],
        dx: &mut [MaybeUninit<f32>],
        params: bool,
    ) -> Option<ParamGrads> {
        let sums = |g: &[f32], x: &[f32], mean, rstd| grad_sums(g, x, mean, rstd);
        backward_rows(x, dy, w, stats, dx, params, sums)
    }

    /// The sums of the vectors `f(a, b, mask, acc)` and `h(a, b, mask, acc)` add into (`acc`
    /// their running sum) over the elements of `a` and `b` (of one length), in f32 within blocks
    /// of [`BLOCK`] elements and f64 across them. `mask` selects the lanes inside the row: all of
    /// them but in the last, masked vector, where the others load as zeros.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn sums(
        a: &[f32],
        b: &[f32],
        f: impl Fn(__m256, __m256, __m256, __m256) -> __m256,
        h: impl Fn(__m256, __m256, __m256, __m256) -> __m256,
    ) -> (f64, f64) {
        assert_eq!(a.len(), b.len(), "layer_norm: row lengths");
        let all = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
        let (mut total_f, mut total_h) = (0f64, 0f64);
        for (a, b) in a.chunks(BLOCK).zip(b.chunks(BLOCK)) {
            let (whole, mask) = split(a.len());
            // Four vectors of sums each, so that the adds do not wait on one another.
            let (mut acc_f, mut acc_h) = ([_mm256_setzero_ps(); 4], [_mm256_setzero_ps(); 4]);
            let load = |i: usize| {
                // SAFETY: the callers load vectors inside `0..whole`, `whole <= len` of both.
                unsafe {
                    (
                        _mm256_loadu_ps(a.as_ptr().add(i)),
                        _mm256_loadu_ps(b.as_ptr().add(i)),
                    )
                }
            };
            let quads = whole / 32 * 32;
            for i in (0..quads).step_by(32) {
                for k in 0..4 {
                    let (va, vb) = load(i + 8 * k);
                    acc_f[k] = f(va, vb, all, acc_f[k]);
                    acc_h[k] = h(va, vb, all, acc_h[k]);
                }
            }
            for (k, i) in (quads..whole).step_by(8).enumerate() {
                let (va, vb) = load(i);
                acc_f[k] = f(va, vb, all, acc_f[k]);
                acc_h[k] = h(va, vb, all, acc_h[k]);
            }
            if whole < a.len() {
                // SAFETY: the mask covers the elements `whole..len` of both.
                let (va, vb) = unsafe {
                    (
                        _mm256_maskload_ps(a.as_ptr().add(whole), mask),
                        _mm256_maskload_ps(b.as_ptr().add(whole), mask),
                    )
                };
                let mask = _mm256_castsi256_ps(mask);
                acc_f[3] = f(va, vb, mask, acc_f[3]);
                acc_h[3] = h(va, vb, mask, acc_h[3]);
            }
            let fold = |[a, b, c, d]: [__m256; 4]| {
                sum_lanes(_mm256_add_ps(_mm256_add_ps(a, b), _mm256_add_ps(c, d))) as f64
            };
            total_f += fold(acc_f);
            total_h += fold(acc_h);
        }
        (total_f, total_h)
    }

    /// [`super::row_stats`]: the mean, then the squared deviations from it (masked: the lanes
    /// past the row would add `mean²`).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn row_stats(x: &[f32], eps: f64) -> (f32, f32) {
        let n = x.len() as f64;
        let keep = |_, _, _, acc| acc;
        let (sum, _) = sums(x, x, |v, _, _, acc| _mm256_add_ps(acc, v), keep);
        let mean = (sum / n) as f32;
        let m = _mm256_set1_ps(mean);
        let squares = |v, _, mask, acc| {
            let d = _mm256_and_ps(_mm256_sub_ps(v, m), mask);
            _mm256_fmadd_ps(d, d, acc)
        };
        let (var, _) = sums(x, x, squares, keep);
        (mean, (1.0 / (var / n + eps).sqrt()) as f32)
    }

    /// [`super::grad_sums`]; the masked-off lanes of `g` are zeros, and so are their terms.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn grad_sums(g: &[f32], x: &[f32], mean: f32, rstd: f32) -> (f64, f64) {
        let (m, r) = (_mm256_set1_ps(mean), _mm256_set1_ps(rstd));
        sums(
            g,
            x,
            |g, _, _, acc| _mm256_add_ps(acc, g),
            |g, v, _, acc| _mm256_fmadd_ps(g, _mm256_mul_ps(_mm256_sub_ps(v, m), r), acc),
        )
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor, Var, D};

    use super::*;
    use crate::testing::{rel_err, sample};

    /// The inputs' dims (normalised over the last), from rank 1 to 4, with odd sizes, rows longer
    /// than a summation block, and enough rows (1041, odd) to run in several pieces.
    const CASES: [&[usize]; 7] = [
        &[2, 5, 7],
        &[9, 13],
        &[37],
        &[2, 3, 4, 24],
        &[2, 9, 300],
        &[3, 347, 64],
        &[1, 77, 768],
    ];

    /// `x`, `weight`, `bias` and a weighting `r` of the output for the loss `sum(out * r)`. The
    /// input has an offset mean, as real activations do, which exercises the variance's accuracy.
    fn inputs(dims: &[usize], dtype: DType) -> [Tensor; 4] {
        let c = dims[dims.len() - 1];
        let x = (sample(dims, 1, DType::F64) * 2.0).and_then(|t| t + 0.7);
        let w = (sample(&[c], 2, DType::F64) * 0.5).and_then(|t| t + 1.0);
        let cast = |t: Result<Tensor>| t.and_then(|t| t.to_dtype(dtype)).expect("input");
        [
            cast(x),
            cast(w),
            sample(&[c], 3, dtype),
            sample(dims, 4, dtype),
        ]
    }

    /// The composite LayerNorm of `unitune::models::ops::LayerNorm` (candle ops): the reference.
    fn composite(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
        let mean = x.mean_keepdim(D::Minus1)?;
        let centred = x.broadcast_sub(&mean)?;
        let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
        centred
            .broadcast_div(&(var + eps)?.sqrt()?)?
            .broadcast_mul(w)?
            .broadcast_add(b)
    }

    type Norm = fn(&Tensor, &Tensor, &Tensor, f64) -> Result<Tensor>;

    /// The output and the gradients of the loss w.r.t. `x`, `weight` and `bias`.
    fn run(norm: Norm, [x, w, b, r]: &[Tensor; 4]) -> Vec<Tensor> {
        let vars: Vec<Var> = [x, w, b]
            .iter()
            .map(|t| Var::from_tensor(t).expect("var"))
            .collect();
        let [xv, wv, bv] = [0, 1, 2].map(|i| vars[i].as_tensor());
        let out = norm(xv, wv, bv, 1e-5).expect("layer norm");
        let grads = (&out * r)
            .and_then(|l| l.sum_all()?.backward())
            .expect("backward");
        let mut all = vec![out];
        all.extend(
            vars.iter()
                .map(|v| grads.get(v.as_tensor()).expect("grad").clone()),
        );
        all
    }

    #[test]
    fn matches_composite_and_its_gradients() {
        let names = ["output", "x", "weight", "bias"];
        let (mut worst, mut worst_f64) = (0f64, 0f64);
        for dims in CASES {
            let ours = run(layer_norm, &inputs(dims, DType::F32));
            let candle = run(composite, &inputs(dims, DType::F32));
            let exact = run(composite, &inputs(dims, DType::F64));
            for (i, name) in names.iter().enumerate() {
                let err = rel_err(&ours[i], &candle[i]);
                assert!(err < 1e-5, "{dims:?}: {name} off by {err:e}");
                let (err_f64, candle_f64) =
                    (rel_err(&ours[i], &exact[i]), rel_err(&candle[i], &exact[i]));
                // Ours is at least as close to the exact values as candle's f32 composite.
                assert!(
                    err_f64 <= candle_f64.max(1e-6),
                    "{dims:?}: {name} off by {err_f64:e} from f64, candle by {candle_f64:e}"
                );
                worst = worst.max(err);
                worst_f64 = worst_f64.max(err_f64);
            }
        }
        eprintln!("worst relative error: {worst:e} against candle f32, {worst_f64:e} against f64");
    }

    #[test]
    fn gradients_match_finite_differences() {
        let delta = 1e-5;
        let mut worst = 0f64;
        for dims in [&[3, 7][..], &[2, 2, 9], &[5]] {
            let inputs = inputs(dims, DType::F64);
            let got = run(layer_norm, &inputs);
            for arg in 0..3 {
                let base: Vec<f64> = inputs[arg]
                    .flatten_all()
                    .and_then(|t| t.to_vec1())
                    .expect("values");
                let numeric: Vec<f64> = (0..base.len())
                    .map(|i| {
                        let loss = |d: f64| {
                            let mut v = base.clone();
                            v[i] += d;
                            let mut args = inputs.clone();
                            args[arg] = Tensor::from_vec(v, inputs[arg].dims(), &Device::Cpu)
                                .expect("perturbed");
                            let [x, w, b, r] = &args;
                            layer_norm(x, w, b, 1e-5)
                                .and_then(|y| y.mul(r)?.sum_all()?.to_scalar::<f64>())
                                .expect("loss")
                        };
                        (loss(delta) - loss(-delta)) / (2.0 * delta)
                    })
                    .collect();
                let numeric = Tensor::from_vec(numeric, inputs[arg].dims(), &Device::Cpu);
                let err = rel_err(&got[arg + 1], &numeric.expect("numeric"));
                assert!(
                    err < 1e-8,
                    "{dims:?}: gradient of argument {arg} off by {err:e}"
                );
                worst = worst.max(err);
            }
        }
        eprintln!("worst relative error against finite differences: {worst:e}");
    }

    #[test]
    fn frozen_inputs_get_no_gradient() {
        let inputs = inputs(&[3, 10], DType::F32);
        let [x, w, b, _] = &inputs;
        let expected = run(composite, &inputs);
        let [xv, wv, bv] = [x, w, b].map(|t| Var::from_tensor(t).expect("var"));
        // Frozen weight and bias; `sum_all` hands back a broadcast (stride 0) gradient.
        let ones = inputs.clone();
        let ones = [
            ones[0].clone(),
            ones[1].clone(),
            ones[2].clone(),
            x.ones_like().expect("1"),
        ];
        let expected_ones = run(composite, &ones);
        let out = layer_norm(xv.as_tensor(), w, b, 1e-5).expect("layer norm");
        let store = out.sum_all().and_then(|l| l.backward()).expect("backward");
        assert_eq!(store.get_ids().count(), 1);
        let dx = store.get(xv.as_tensor()).expect("dx");
        assert!(rel_err(dx, &expected_ones[1]) < 1e-5);
        // Frozen input: the weight and bias gradients only.
        let out = layer_norm(x, wv.as_tensor(), bv.as_tensor(), 1e-5).expect("layer norm");
        let loss = out.mul(&inputs[3]).and_then(|l| l.sum_all());
        let store = loss.and_then(|l| l.backward()).expect("backward");
        assert!(store.get(x).is_none());
        for (var, want) in [(&wv, &expected[2]), (&bv, &expected[3])] {
            let got = store.get(var.as_tensor()).expect("gradient");
            assert!(rel_err(got, want) < 1e-5);
        }
        // Only the bias trainable: its gradient is the row count.
        let out = layer_norm(x, w, bv.as_tensor(), 1e-5).expect("layer norm");
        let store = out.sum_all().and_then(|l| l.backward()).expect("backward");
        assert_eq!(store.get_ids().count(), 1);
        let db: Vec<f32> = store.get(bv.as_tensor()).expect("db").to_vec1().expect("v");
        assert_eq!(db, vec![3.0; 10]);
    }

    #[test]
    fn pieces_of_any_size_agree() {
        let [x, w, _, dy] = inputs(&[71, 12], DType::F64);
        let flat =
            |t: &Tensor| -> Vec<f64> { t.flatten_all().and_then(|t| t.to_vec1()).expect("v") };
        let (x, w, dy) = (flat(&x), flat(&w), flat(&dy));
        let stats: Vec<(f64, f64)> = x.chunks(12).map(|r| row_stats(r, 1e-5)).collect();
        let (dx, p) = backward(&x, &dy, &w, &stats, true, true, 71);
        let (dx, p) = (dx.expect("dx"), p.expect("params"));
        // One row per piece, a few rows, rows not dividing 71, more than a row block.
        for rows in [1, 3, 10, 33, 70] {
            let (dx_r, p_r) = backward(&x, &dy, &w, &stats, true, true, rows);
            assert_eq!(dx_r.expect("dx"), dx);
            let p_r = p_r.expect("params");
            for (a, b) in p_r
                .weight
                .iter()
                .chain(&p_r.bias)
                .zip(p.weight.iter().chain(&p.bias))
            {
                assert!((a - b).abs() < 1e-12, "{rows} rows per piece: {a} vs {b}");
            }
            // Without the input gradient: the same parameter gradients.
            let (none, p_only) = backward(&x, &dy, &w, &stats, false, true, rows);
            assert!(none.is_none());
            assert_eq!(p_only.expect("params").weight, p_r.weight);
        }
        assert_eq!(rows_per_piece(4096, 128, 4), 1024);
        assert_eq!(rows_per_piece(77, 768, 4), 20);
        assert_eq!(rows_per_piece(10, 7, 4), 10);
    }

    /// The dispatched f32 kernels (AVX2 intrinsics where the CPU has them) agree with the
    /// portable loops: rows ending in a masked vector, longer than a summation block, row counts
    /// not multiples of `STATS_ROWS` and more than a `ROW_BLOCK`.
    #[test]
    fn kernel_versions_agree() {
        let close = |a: &[f32], b: &[f32]| {
            let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
            a.iter().zip(b).all(|(a, b)| (a - b).abs() <= 1e-6 * scale)
        };
        for (rows, c) in [(11, 43), (37, 300), (3, 5), (9, 64)] {
            let [x, w, b, dy] = inputs(&[rows, c], DType::F32);
            let flat =
                |t: &Tensor| -> Vec<f32> { t.flatten_all().and_then(|t| t.to_vec1()).expect("v") };
            let (x, w, b, dy) = (flat(&x), flat(&w), flat(&b), flat(&dy));
            let (mut st_a, mut st_b) = (vec![(0.0, 0.0); rows], vec![(0.0, 0.0); rows]);
            // SAFETY (all four): each writes its whole output.
            let out_a = unsafe {
                uninit_vec(x.len(), |out| {
                    f32::forward_piece(&x, &w, &b, 1e-5, out, &mut st_a)
                })
            };
            let out_b = unsafe {
                uninit_vec(x.len(), |out| {
                    forward_rows(&x, &w, &b, 1e-5, out, &mut st_b, row_stats)
                })
            };
            assert!(close(&out_a, &out_b), "{rows}x{c}: outputs");
            for (a, b) in st_a.iter().zip(&st_b) {
                assert!(
                    (a.0 - b.0).abs() < 1e-6 && (a.1 - b.1).abs() < 1e-6 * b.1,
                    "{a:?} {b:?}"
                );
            }
            for (input, params) in [(true, true), (true, false), (false, true)] {
                let len = if input { x.len() } else { 0 };
                let (mut p_a, mut p_b) = (None, None);
                let dx_a = unsafe {
                    uninit_vec(len, |dx| {
                        p_a = f32::backward_piece(&x, &dy, &w, &st_a, dx, params)
                    })
                };
                let dx_b = unsafe {
                    uninit_vec(len, |dx| {
                        p_b = backward_rows(&x, &dy, &w, &st_b, dx, params, grad_sums)
                    })
                };
                assert!(close(&dx_a, &dx_b), "{rows}x{c}: input gradients");
                assert_eq!(p_a.is_some(), params);
                if let (Some(p_a), Some(p_b)) = (p_a, p_b) {
                    let a = p_a.weight.iter().chain(&p_a.bias);
                    for (a, b) in a.zip(p_b.weight.iter().chain(&p_b.bias)) {
                        assert!((a - b).abs() < 1e-5, "{rows}x{c}: {a} vs {b}");
                    }
                }
            }
        }
    }

    #[test]
    fn rejects_bad_arguments_and_copies_strided_input() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((2, 6), DType::F32, &dev).expect("x");
        let w = Tensor::ones(6, DType::F32, &dev).expect("w");
        let short = w.narrow(0, 0, 3).expect("narrow");
        assert!(layer_norm(&x, &short, &w, 1e-5).is_err());
        assert!(layer_norm(&x, &w, &short, 1e-5).is_err());
        assert!(layer_norm(&x.to_dtype(DType::F64).expect("f64"), &w, &w, 1e-5).is_err());
        assert!(layer_norm(&x.to_dtype(DType::F16).expect("f16"), &w, &w, 1e-5).is_err());
        let empty = Tensor::zeros((0, 6), DType::F32, &dev).expect("empty");
        assert!(layer_norm(&empty, &w, &w, 1e-5).is_err());
        let scalar = Tensor::new(1f32, &dev).expect("scalar");
        assert!(layer_norm(&scalar, &w, &w, 1e-5).is_err());
        // A transposed (non-contiguous) input is copied first, and gives the same result.
        let xt = sample(&[2, 6, 4], 5, DType::F32)
            .transpose(1, 2)
            .expect("t");
        let a = layer_norm(&xt, &w, &w, 1e-5).expect("strided");
        let b = layer_norm(&xt.contiguous().expect("c"), &w, &w, 1e-5).expect("contiguous");
        assert_eq!(rel_err(&a, &b), 0.0);
    }
}
