//! Fused scaled-dot-product attention, `softmax(q·kᵀ·scale)·v`, with a backward that recomputes.
//!
//! Composed of candle ops, attention materialises the `[b, heads, n_q, n_k]` scores several times
//! over (product, scaled, shifted, exponentiated, normalised) and autograd keeps every one of them
//! for the backward: 5 x 128 MB per call at 1024 tokens, 8 heads, batch 4. Here, as in
//! FlashAttention, each task works on a block of query rows of one head, whose scores fit in cache:
//! - forward: scores of the block (gemm), row max, a vectorised polynomial `exp` with the row sums
//!   in the same pass, probabilities·v (gemm), and only the per-row log-sum-exp is kept;
//! - backward: the block's probabilities are recomputed from q, k and the log-sum-exp, then
//!   dV += Pᵀ·dO, dP = dO·Vᵀ, dS = P ∘ (dP − rowsum(dO ∘ O)), dQ = dS·K·scale, dK += dSᵀ·Q·scale.
//!
//! Tasks are spread over rayon's pool: (head, query block) pairs forward, heads backward (a head's
//! dK and dV add up over its query blocks). Inputs are f32 CPU tensors; callers fall back to
//! composite ops on other devices and dtypes.

use std::sync::{Arc, Mutex};

use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::cpu::{contiguous, cpu_f32};
use crate::matmul::{gemm_into, Mat};
use crate::simd::exp;

/// The name in the errors.
const OP: &str = "fused attention";

/// `softmax(q·kᵀ·scale)·v` over the last two dimensions of `q: [b, heads, n_q, d]`,
/// `k: [b, heads, n_k, d]` and `v: [b, heads, n_k, d_v]`, giving `[b, heads, n_q, d_v]`.
/// Differentiable with respect to `q`, `k` and `v` (first order). f32 CPU tensors only; any
/// layout (non-contiguous inputs are copied first); every dimension must be non-zero.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let dims = Dims::new(q, k, v)?;
    let op = FusedAttention {
        dims,
        scale: scale as f32,
        lse: Mutex::new(None),
    };
    q.contiguous()?
        .apply_op3_arc(&k.contiguous()?, &v.contiguous()?, Arc::new(Box::new(op)))
}

/// Sizes of one call: `bh` independent heads (batch x heads).
#[derive(Debug, Clone, Copy)]
struct Dims {
    b: usize,
    heads: usize,
    nq: usize,
    nk: usize,
    d: usize,
    dv: usize,
}

impl Dims {
    fn new(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Self> {
        let (b, heads, nq, d) = q.dims4()?;
        let (kb, kh, nk, kd) = k.dims4()?;
        let (vb, vh, vn, dv) = v.dims4()?;
        if (kb, kh, kd) != (b, heads, d) || (vb, vh, vn) != (b, heads, nk) {
            bail!(
                "fused attention: shapes do not match, q {:?}, k {:?}, v {:?}",
                q.dims(),
                k.dims(),
                v.dims()
            )
        }
        if [b, heads, nq, nk, d, dv].contains(&0) {
            bail!(
                "fused attention: empty dimension in q {:?}, k {:?}, v {:?}",
                q.dims(),
                k.dims(),
                v.dims()
            )
        }
        Ok(Self {
            b,
            heads,
            nq,
            nk,
            d,
            dv,
        })
    }

    fn bh(&self) -> usize {
        self.b * self.heads
    }
}

/// Query rows per task: enough for the gemms to run at speed (larger blocks measured faster on the
/// medium UNet's shapes), few enough that a block's scores (backward: and their gradients), about
/// 256 KB each, stay in a core's L2.
fn query_block(nk: usize) -> usize {
    (64 * 1024 / nk).clamp(32, 256)
}

/// The op; the forward leaves the per-row log-sum-exp here for the backward.
struct FusedAttention {
    dims: Dims,
    scale: f32,
    lse: Mutex<Option<Vec<f32>>>, // [bh, nq]
}

impl CustomOp3 for FusedAttention {
    fn name(&self) -> &'static str {
        "fused-attention"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        q_l: &Layout,
        k: &CpuStorage,
        k_l: &Layout,
        v: &CpuStorage,
        v_l: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (q, k, v) = (
            contiguous(OP, (q, q_l), "q")?,
            contiguous(OP, (k, k_l), "k")?,
            contiguous(OP, (v, v_l), "v")?,
        );
        let Dims {
            b, heads, nq, dv, ..
        } = self.dims;
        let mut out = vec![0f32; self.dims.bh() * nq * dv];
        let mut lse = vec![0f32; self.dims.bh() * nq];
        forward(&self.dims, self.scale, q, k, v, &mut out, &mut lse);
        *self.lse.lock().map_err(|_| poisoned())? = Some(lse);
        Ok((CpuStorage::F32(out), Shape::from((b, heads, nq, dv))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        grad_out: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let lse = self.lse.lock().map_err(|_| poisoned())?;
        let Some(lse) = lse.as_ref() else {
            bail!("fused attention: backward without a CPU forward")
        };
        let grad_out = grad_out.contiguous()?;
        let tensors = [q, k, v, out, &grad_out].map(|t| t.storage_and_layout());
        let mut slices = Vec::with_capacity(tensors.len());
        for ((storage, layout), name) in tensors.iter().zip(["q", "k", "v", "out", "grad"]) {
            slices.push(cpu_f32(OP, storage, layout, name)?);
        }
        let Dims { nq, nk, d, dv, .. } = self.dims;
        let bh = self.dims.bh();
        let (mut dq, mut dk, mut dvv) = (
            vec![0f32; bh * nq * d],
            vec![0f32; bh * nk * d],
            vec![0f32; bh * nk * dv],
        );
        let grads = Grads {
            dq: &mut dq,
            dk: &mut dk,
            dv: &mut dvv,
        };
        let [q_s, k_s, v_s, o_s, do_s] = slices[..] else {
            unreachable!("five tensors were read")
        };
        backward(
            &self.dims,
            self.scale,
            [q_s, k_s, v_s, o_s, do_s],
            lse,
            grads,
        );
        drop(tensors);
        let dev = q.device();
        Ok((
            Some(Tensor::from_vec(dq, q.shape(), dev)?),
            Some(Tensor::from_vec(dk, k.shape(), dev)?),
            Some(Tensor::from_vec(dvv, v.shape(), dev)?),
        ))
    }
}

fn poisoned() -> candle_core::Error {
    candle_core::Error::Msg("fused attention: lock poisoned".into())
}

/// out: [bh, nq, dv], lse: [bh, nq].
fn forward(
    dims: &Dims,
    scale: f32,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
    lse: &mut [f32],
) {
    let Dims { nq, nk, d, dv, .. } = *dims;
    let bq = query_block(nk);
    out.par_chunks_mut(nq * dv)
        .zip(lse.par_chunks_mut(nq))
        .enumerate()
        .for_each(|(h, (out_h, lse_h))| {
            let q_h = &q[h * nq * d..(h + 1) * nq * d];
            let k_h = Matrix::rows(&k[h * nk * d..(h + 1) * nk * d], nk, d);
            let v_h = Matrix::rows(&v[h * nk * dv..(h + 1) * nk * dv], nk, dv);
            out_h
                .par_chunks_mut(bq * dv)
                .zip(lse_h.par_chunks_mut(bq))
                .enumerate()
                .for_each_init(
                    || (vec![0f32; bq * nk], vec![0f32; bq]),
                    |(scores, inv_sum), (block, (out_b, lse_b))| {
                        let rows = lse_b.len();
                        let q_b = Matrix::rows(&q_h[block * bq * d..][..rows * d], rows, d);
                        let scores = &mut scores[..rows * nk]; // [rows, nk]
                        gemm(scores, false, q_b, k_h.t(), scale);
                        softmax_rows(scores, nk, lse_b, &mut inv_sum[..rows]);
                        gemm(out_b, false, Matrix::rows(scores, rows, nk), v_h, 1.0);
                        for (row, &inv) in out_b.chunks_exact_mut(dv).zip(inv_sum.iter()) {
                            row.iter_mut().for_each(|o| *o *= inv);
                        }
                    },
                );
        });
}

/// Gradients with respect to q [bh, nq, d], k [bh, nk, d] and v [bh, nk, dv].
struct Grads<'a> {
    dq: &'a mut [f32],
    dk: &'a mut [f32],
    dv: &'a mut [f32],
}

/// `inputs`: q, k, v, out and the gradient of out; `grads` must come zeroed (dK and dV add up).
fn backward(dims: &Dims, scale: f32, inputs: [&[f32]; 5], lse: &[f32], grads: Grads) {
    let Dims { nq, nk, d, dv, .. } = *dims;
    let [q, k, v, out, grad_out] = inputs;
    let bq = query_block(nk);
    grads
        .dq
        .par_chunks_mut(nq * d)
        .zip(grads.dk.par_chunks_mut(nk * d))
        .zip(grads.dv.par_chunks_mut(nk * dv))
        .enumerate()
        .for_each_init(
            || (vec![0f32; bq * nk], vec![0f32; bq * nk], vec![0f32; bq]),
            |(probs, dscores, delta), (h, ((dq_h, dk_h), dv_h))| {
                let k_h = Matrix::rows(&k[h * nk * d..(h + 1) * nk * d], nk, d);
                let v_h = Matrix::rows(&v[h * nk * dv..(h + 1) * nk * dv], nk, dv);
                for start in (0..nq).step_by(bq) {
                    let rows = bq.min(nq - start);
                    let row = h * nq + start; // first row of the block among all bh * nq
                    let q_b = Matrix::rows(&q[row * d..(row + rows) * d], rows, d);
                    let o_b = &out[row * dv..(row + rows) * dv];
                    let do_b = &grad_out[row * dv..(row + rows) * dv];
                    // rowsum(dO ∘ O) = rowsum(P ∘ dP): the softmax Jacobian's shift.
                    for ((dl, o), g) in delta
                        .iter_mut()
                        .zip(o_b.chunks_exact(dv))
                        .zip(do_b.chunks_exact(dv))
                    {
                        *dl = o.iter().zip(g).map(|(o, g)| o * g).sum();
                    }
                    let do_b = Matrix::rows(do_b, rows, dv);
                    let probs = &mut probs[..rows * nk]; // [rows, nk]
                    let dscores = &mut dscores[..rows * nk];
                    gemm(probs, false, q_b, k_h.t(), scale);
                    gemm(dscores, false, do_b, v_h.t(), 1.0);
                    probs_and_score_grads(
                        probs,
                        dscores,
                        nk,
                        &lse[row..row + rows],
                        &delta[..rows],
                    );
                    let p = Matrix::rows(probs, rows, nk);
                    let ds = Matrix::rows(dscores, rows, nk);
                    gemm(dv_h, true, p.t(), do_b, 1.0);
                    gemm(
                        &mut dq_h[start * d..(start + rows) * d],
                        false,
                        ds,
                        k_h,
                        scale,
                    );
                    gemm(dk_h, true, ds.t(), q_b, scale);
                }
            },
        );
}

/// A strided matrix with its sizes, so that the products below read their sizes off their
/// operands.
#[derive(Clone, Copy)]
struct Matrix<'a> {
    mat: Mat<'a, f32>,
    rows: usize,
    cols: usize,
}

impl<'a> Matrix<'a> {
    /// Row-major `[rows, cols]`.
    fn rows(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self {
            mat: Mat::new(data, cols, 1),
            rows,
            cols,
        }
    }

    fn t(self) -> Self {
        Self {
            mat: self.mat.t(),
            rows: self.cols,
            cols: self.rows,
        }
    }
}

/// `dst = beta·lhs·rhs`, or `dst += beta·lhs·rhs` when `accumulate`; `dst` row-major
/// `[lhs.rows, rhs.cols]`. Single-threaded: the callers already run one task per core.
fn gemm(dst: &mut [f32], accumulate: bool, lhs: Matrix, rhs: Matrix, beta: f32) {
    assert_eq!(
        lhs.cols, rhs.rows,
        "fused attention: product of mismatched matrices"
    );
    let mnk = (lhs.rows, rhs.cols, lhs.cols);
    gemm_into(dst, rhs.cols, mnk, lhs.mat, rhs.mat, accumulate, beta);
}

/// Forward softmax of each `nk`-long row of `scores`, unnormalised: the rows become
/// `exp(s − max)`, `lse` gets `max + ln(sum)` and `inv_sum` `1/sum`.
fn softmax_rows(scores: &mut [f32], nk: usize, lse: &mut [f32], inv_sum: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::simd::has_avx2() {
        // SAFETY: the CPU supports AVX2, just checked.
        return unsafe { softmax_rows_avx2(scores, nk, lse, inv_sum) };
    }
    softmax_rows_portable(scores, nk, lse, inv_sum)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn softmax_rows_avx2(scores: &mut [f32], nk: usize, lse: &mut [f32], inv_sum: &mut [f32]) {
    softmax_rows_portable(scores, nk, lse, inv_sum)
}

#[inline(always)]
fn softmax_rows_portable(scores: &mut [f32], nk: usize, lse: &mut [f32], inv_sum: &mut [f32]) {
    for ((row, lse), inv) in scores.chunks_exact_mut(nk).zip(lse).zip(inv_sum) {
        let max = row_max(row);
        let sum = exp_shifted_sum(row, max);
        *lse = max + sum.ln();
        *inv = 1.0 / sum;
    }
}

/// Backward, given the scores `s` in `probs` and `dP = dO·Vᵀ` in `dscores`: `probs` becomes
/// `P = exp(s − lse)` and `dscores` `dS = P ∘ (dP − delta)`, row by row.
fn probs_and_score_grads(
    probs: &mut [f32],
    dscores: &mut [f32],
    nk: usize,
    lse: &[f32],
    delta: &[f32],
) {
    #[cfg(target_arch = "x86_64")]
    if crate::simd::has_avx2() {
        // SAFETY: the CPU supports AVX2, just checked.
        return unsafe { probs_and_score_grads_avx2(probs, dscores, nk, lse, delta) };
    }
    probs_and_score_grads_portable(probs, dscores, nk, lse, delta)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn probs_and_score_grads_avx2(
    probs: &mut [f32],
    dscores: &mut [f32],
    nk: usize,
    lse: &[f32],
    delta: &[f32],
) {
    probs_and_score_grads_portable(probs, dscores, nk, lse, delta)
}

#[inline(always)]
fn probs_and_score_grads_portable(
    probs: &mut [f32],
    dscores: &mut [f32],
    nk: usize,
    lse: &[f32],
    delta: &[f32],
) {
    let rows = probs.chunks_exact_mut(nk).zip(dscores.chunks_exact_mut(nk));
    for ((p_row, ds_row), (&lse, &delta)) in rows.zip(lse.iter().zip(delta)) {
        for (p, ds) in p_row.iter_mut().zip(ds_row.iter_mut()) {
            *p = exp(*p - lse);
            *ds = *p * (*ds - delta);
        }
    }
}

/// Lanes of the reductions below: independent accumulators the compiler keeps in vector registers
/// (a single running max or sum would be a serial chain).
const LANES: usize = 16;

#[inline(always)]
fn row_max(row: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let chunks = row.chunks_exact(LANES);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (m, &x) in lanes.iter_mut().zip(chunk) {
            *m = if x > *m { x } else { *m };
        }
    }
    lanes
        .iter()
        .chain(tail)
        .fold(f32::NEG_INFINITY, |m, &x| m.max(x))
}

/// `row[i] = exp(row[i] − shift)`, returning the sum of the new values.
#[inline(always)]
fn exp_shifted_sum(row: &mut [f32], shift: f32) -> f32 {
    let mut lanes = [0f32; LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    for chunk in &mut chunks {
        for (s, x) in lanes.iter_mut().zip(chunk) {
            *x = exp(*x - shift);
            *s += *x;
        }
    }
    let mut sum = 0.0;
    for x in chunks.into_remainder() {
        *x = exp(*x - shift);
        sum += *x;
    }
    lanes.iter().sum::<f32>() + sum
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var, D};

    /// The composite attention (differentiable candle ops), as the reference.
    fn naive(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
        let scores = (q.contiguous()?.matmul(&k.t()?)? * scale)?;
        let max = scores.max_keepdim(D::Minus1)?.detach();
        let num = scores.broadcast_sub(&max)?.exp()?;
        let den = num.sum_keepdim(D::Minus1)?;
        num.broadcast_div(&den)?.matmul(v)
    }

    fn max_rel_diff(a: &Tensor, b: &Tensor) -> f32 {
        let (a, b) = (
            a.to_dtype(DType::F64).unwrap(),
            b.to_dtype(DType::F64).unwrap(),
        );
        let diff = (&a - &b).unwrap().abs().unwrap();
        let denom = (b.abs().unwrap() + 1.0).unwrap();
        (diff / denom)
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap() as f32
    }

    fn fmt(errors: &[f32]) -> String {
        errors
            .iter()
            .map(|e| format!("{e:.1e}"))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Seeded Gaussian samples (Box-Muller on splitmix64), so that the tolerances hold every run.
    fn randn(shape: (usize, usize, usize, usize), std: f32, seed: u64) -> Tensor {
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let mut uniform = move || {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
        };
        let n = shape.0 * shape.1 * shape.2 * shape.3;
        let data: Vec<f32> = (0..n)
            .map(|_| {
                let (u, v) = (1.0 - uniform(), uniform());
                let g = (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos();
                g as f32 * std
            })
            .collect();
        Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
    }

    struct Errors {
        out: f32,
        grads: [f32; 3],
    }

    /// Forward and input gradients of `sum(attention · w)`, fused (f32) against the composite
    /// reference in f64 and, for comparison, the composite in f32.
    fn compare(shape: (usize, usize, usize, usize, usize, usize), std: f32) -> (Errors, Errors) {
        let (b, h, nq, nk, d, dv) = shape;
        let scale = 1.0 / (d as f64).sqrt();
        let q = randn((b, h, nq, d), std, 1);
        let k = randn((b, h, nk, d), std, 2);
        let v = randn((b, h, nk, dv), 1.0, 3);
        let w = randn((b, h, nq, dv), 1.0, 4);
        let run = |dtype: DType, fused: bool| {
            let vars = [&q, &k, &v].map(|t| Var::from_tensor(&t.to_dtype(dtype).unwrap()).unwrap());
            let [q, k, v] = [0, 1, 2].map(|i| vars[i].as_tensor());
            let out = if fused {
                attention(q, k, v, scale)
            } else {
                naive(q, k, v, scale)
            }
            .unwrap();
            let loss = (&out * w.to_dtype(dtype).unwrap())
                .unwrap()
                .sum_all()
                .unwrap();
            let grads = loss.backward().unwrap();
            let g = [q, k, v].map(|t| grads.get(t).expect("missing gradient").clone());
            (out, g)
        };
        let (reference, ref_grads) = run(DType::F64, false);
        let errors = |(out, grads): (Tensor, [Tensor; 3])| Errors {
            out: max_rel_diff(&out, &reference),
            grads: [0, 1, 2].map(|i| max_rel_diff(&grads[i], &ref_grads[i])),
        };
        (
            errors(run(DType::F32, true)),
            errors(run(DType::F32, false)),
        )
    }

    #[test]
    fn matches_the_composite_forward_and_gradients() {
        // (b, heads, n_q, n_k, d, d_v): n_q != n_k, sizes off the block size, several row blocks.
        let shapes = [
            (2, 3, 37, 29, 8, 8),
            (1, 2, 300, 77, 40, 40),
            (2, 1, 70, 130, 64, 64),
            (1, 2, 33, 1100, 16, 16),
            (1, 1, 5, 3, 8, 5),
        ];
        for shape in shapes {
            // std 3 gives scores of std 9, nearly one-hot rows: the f32 composite's own error
            // reaches 1e-5 there.
            for (std, tolerance) in [(1.0, 1e-5), (3.0, 3e-5)] {
                let (fused, composite) = compare(shape, std);
                let worst = fused.grads.iter().fold(fused.out, |a, &b| a.max(b));
                println!(
                    "{shape:?} std {std}: fused out {:.1e} grads {}; f32 composite out {:.1e} grads {}",
                    fused.out,
                    fmt(&fused.grads),
                    composite.out,
                    fmt(&composite.grads)
                );
                assert!(worst < tolerance, "{shape:?} std {std}: {worst}");
            }
        }
    }

    #[test]
    fn reads_non_contiguous_inputs_and_honours_scale() {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (2, 9, 3, 8), &dev)
            .unwrap()
            .transpose(1, 2)
            .unwrap();
        let k = Tensor::randn(0f32, 1.0, (2, 3, 8, 11), &dev)
            .unwrap()
            .transpose(2, 3)
            .unwrap();
        let v = Tensor::randn(0f32, 1.0, (2, 3, 11, 6), &dev).unwrap();
        let fused = attention(&q, &k, &v, 0.7).unwrap();
        assert_eq!(fused.dims(), &[2, 3, 9, 6]);
        assert!(max_rel_diff(&fused, &naive(&q, &k, &v, 0.7).unwrap()) < 1e-6);
    }

    #[test]
    fn rejects_other_dtypes_and_mismatched_shapes() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((1, 2, 3, 4), DType::F64, &dev).unwrap();
        assert!(attention(&x, &x, &x, 1.0).is_err());
        let q = Tensor::zeros((1, 2, 3, 4), DType::F32, &dev).unwrap();
        let k = Tensor::zeros((1, 2, 3, 5), DType::F32, &dev).unwrap();
        assert!(attention(&q, &k, &k, 1.0).is_err());
    }

    #[test]
    fn nan_propagates() {
        let dev = Device::Cpu;
        let q = Tensor::new(&[1f32, f32::NAN, 0.5, 2.0], &dev)
            .unwrap()
            .reshape((1, 1, 2, 2))
            .unwrap();
        let out: Vec<f32> = attention(&q, &q, &q, 1.0)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(out.iter().all(|x| x.is_nan()), "{out:?}");
    }

    #[test]
    fn vector_and_portable_row_kernels_agree() {
        let nk = 37;
        let scores: Vec<f32> = (0..3 * nk)
            .map(|i| ((i * 7919) % 101) as f32 / 10.0 - 5.0)
            .collect();
        let dp: Vec<f32> = scores.iter().map(|s| s.sin()).collect();
        let (lse, delta) = ([0.3f32, 4.0, 7.5], [0.1f32, -0.2, 0.0]);
        let mut results = Vec::new();
        for portable in [true, false] {
            let (mut s, mut l, mut inv) = (scores.clone(), [0f32; 3], [0f32; 3]);
            let (mut p, mut ds) = (scores.clone(), dp.clone());
            if portable {
                softmax_rows_portable(&mut s, nk, &mut l, &mut inv);
                probs_and_score_grads_portable(&mut p, &mut ds, nk, &lse, &delta);
            } else {
                softmax_rows(&mut s, nk, &mut l, &mut inv);
                probs_and_score_grads(&mut p, &mut ds, nk, &lse, &delta);
            }
            results.push([s, l.to_vec(), inv.to_vec(), p, ds].concat());
        }
        for (a, b) in results[0].iter().zip(&results[1]) {
            assert!((a - b).abs() <= 1e-6 * b.abs().max(1.0), "{a} vs {b}");
        }
    }
}
