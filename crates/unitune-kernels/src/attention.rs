//! Fused scaled-dot-product attention, `softmax(q·kᵀ·scale)·v`, with a backward that recomputes.
//!
//! Composed of candle ops, attention materialises the `[b, heads, n_q, n_k]` scores several times
//! over (product, scaled, shifted, exponentiated, normalised) and autograd keeps every one of them
//! for the backward: 5 x 128 MB per call at 1024 tokens, 8 heads, batch 4. Here, as in
//! FlashAttention, each task works on a block of query rows of one head, whose scores fit in cache:
//! - forward: scores of the block (gemm), row max, a vectorised polynomial `exp` with the row sums
//!   in the same pass, probabilities·v (gemm), and only the per-row log-sum-exp is kept;
//! - backward: the block's probabilities are recomputed from q, k and the log-sum-exp, then
//!   dV += Pᵀ·dO, dP = dO·Vᵀ, dS = P ∘ (dP − rowsum(dO ∘ O))·scale, dQ = dS·K, dK += dSᵀ·Q.
//!
//! As in FlashAttention, the scores are taken in base 2 (`log₂e` folded into the scale of the
//! gemm that gives them): `eˢ` is `2^(s·log₂e)`, whose range reduction is a rounding where that of
//! `eˢ` takes three more multiply-adds. The row kernels are AVX2/FMA intrinsics where the CPU has
//! them (the compiler vectorised the plain loops poorly), plain loops elsewhere.
//!
//! Two layouts of the heads: `[b, heads, n, d]` ([`attention`]), and the projections' own
//! `[b, n, heads·d]` ([`attention_heads`]), which the gemms read and write in place through row
//! strides, so that a transformer's attention needs no copies to split the heads out of its
//! projections and merge them back (nor the copies of their backward).
//!
//! Tasks are spread over rayon's pool: (head, query block) pairs forward, heads backward (a head's
//! dK and dV add up over its query blocks). Inputs are f32 CPU tensors, or with the `cuda`
//! feature f32/f16/bf16 CUDA tensors (`attention/cuda.rs`: the same algorithm as CUDA kernels,
//! for [`cuda_supports`]' sizes); callers fall back to composite ops elsewhere.

use std::cell::RefCell;
use std::f32::consts::LOG2_E;
use std::mem::MaybeUninit;
use std::sync::{Arc, Mutex};

use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::cpu::{contiguous, cpu_f32, uninit_vec};
#[cfg(feature = "cuda")]
mod cuda;
use crate::matmul::{gemm_into, pieces, Mat, Shared};
#[cfg(feature = "cuda")]
pub use cuda::MAX_HEAD_DIM as CUDA_MAX_HEAD_DIM;

/// The name in the errors.
const OP: &str = "fused attention";

/// `softmax(q·kᵀ·scale)·v` over the last two dimensions of `q: [b, heads, n_q, d]`,
/// `k: [b, heads, n_k, d]` and `v: [b, heads, n_k, d_v]`, giving `[b, heads, n_q, d_v]`.
/// Differentiable with respect to `q`, `k` and `v` (first order). f32 CPU tensors, or CUDA
/// tensors that [`cuda_supports`]; any layout (non-contiguous inputs are copied first); every
/// dimension must be non-zero.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    apply(Dims::split(q, k, v)?, q, k, v, scale)
}

/// [`attention`] on the heads as a projection lays them out: `q: [b, n_q, heads·d]`,
/// `k: [b, n_k, heads·d]` and `v: [b, n_k, heads·d_v]` (head `h` in columns `h·d..(h + 1)·d`),
/// giving `[b, n_q, heads·d_v]`; the same as splitting the heads into `[b, heads, n, d]`, calling
/// [`attention`] and merging them back, without the copies.
pub fn attention_heads(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
) -> Result<Tensor> {
    apply(Dims::packed(q, k, v, heads)?, q, k, v, scale)
}

/// Whether the CUDA kernels take `q`, `k` and `v` (for [`attention_heads`] with `Some(heads)`,
/// for [`attention`] with `None`): all f32, f16 or bf16 on one CUDA device, equal q and v head
/// widths of at most [`CUDA_MAX_HEAD_DIM`]. Always false without the `cuda` feature.
pub fn cuda_supports(q: &Tensor, k: &Tensor, v: &Tensor, heads: Option<usize>) -> bool {
    #[cfg(feature = "cuda")]
    {
        use candle_core::DType;
        let on_gpu = [q, k, v].iter().all(|t| {
            t.device().is_cuda() && t.device().same_device(q.device()) && t.dtype() == q.dtype()
        });
        let dims = match heads {
            Some(heads) => Dims::packed(q, k, v, heads),
            None => Dims::split(q, k, v),
        };
        on_gpu
            && matches!(q.dtype(), DType::F32 | DType::F16 | DType::BF16)
            && dims.is_ok_and(|dims| cuda::supports(&dims))
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (q, k, v, heads);
        false
    }
}

fn apply(dims: Dims, q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let op = FusedAttention {
        dims,
        scale: scale as f32,
        lse: Mutex::new(None),
    };
    q.contiguous()?
        .apply_op3_arc(&k.contiguous()?, &v.contiguous()?, Arc::new(Box::new(op)))
}

/// Where the heads lie in the tensors.
#[derive(Debug, Clone, Copy)]
enum Heads {
    /// `[b, heads, n, d]`: each head's rows one after the other.
    Split,
    /// `[b, n, heads·d]`: the rows of all heads interleaved.
    Packed,
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
    layout: Heads,
}

impl Dims {
    fn split(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Self> {
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
        let layout = Heads::Split;
        Self {
            b,
            heads,
            nq,
            nk,
            d,
            dv,
            layout,
        }
        .non_empty([q, k, v])
    }

    fn packed(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Result<Self> {
        let (b, nq, width) = q.dims3()?;
        let (kb, nk, k_width) = k.dims3()?;
        let (vb, vn, v_width) = v.dims3()?;
        if (kb, k_width) != (b, width) || (vb, vn) != (b, nk) {
            bail!(
                "fused attention: shapes do not match, q {:?}, k {:?}, v {:?}",
                q.dims(),
                k.dims(),
                v.dims()
            )
        }
        if heads == 0 || width % heads != 0 || v_width % heads != 0 {
            bail!(
                "fused attention: {heads} heads do not divide the widths of q {:?} and v {:?}",
                q.dims(),
                v.dims()
            )
        }
        let (d, dv) = (width / heads, v_width / heads);
        let layout = Heads::Packed;
        Self {
            b,
            heads,
            nq,
            nk,
            d,
            dv,
            layout,
        }
        .non_empty([q, k, v])
    }

    /// These sizes, unless one is zero.
    fn non_empty(self, [q, k, v]: [&Tensor; 3]) -> Result<Self> {
        let Self {
            b,
            heads,
            nq,
            nk,
            d,
            dv,
            ..
        } = self;
        if [b, heads, nq, nk, d, dv].contains(&0) {
            bail!(
                "fused attention: empty dimension in q {:?}, k {:?}, v {:?}",
                q.dims(),
                k.dims(),
                v.dims()
            )
        }
        Ok(self)
    }

    fn bh(&self) -> usize {
        self.b * self.heads
    }

    /// In a tensor of `n` rows of `width` elements per head, laid out as this call's: the offset
    /// of head `bh`'s first row, and the distance between its rows.
    fn rows(&self, bh: usize, n: usize, width: usize) -> (usize, usize) {
        match self.layout {
            Heads::Split => (bh * n * width, width),
            Heads::Packed => {
                let (batch, head) = (bh / self.heads, bh % self.heads);
                (
                    batch * n * self.heads * width + head * width,
                    self.heads * width,
                )
            }
        }
    }

    /// Head `bh` of `data`, a tensor of `n` rows of `width` elements per head: `[n, width]`.
    fn head<'a>(&self, data: &'a [f32], bh: usize, n: usize, width: usize) -> Matrix<'a> {
        let (offset, rs) = self.rows(bh, n, width);
        Matrix::strided(&data[offset..], n, width, rs)
    }

    /// The shape of a tensor of `n` rows of `width` elements per head.
    fn shape(&self, n: usize, width: usize) -> Shape {
        match self.layout {
            Heads::Split => Shape::from((self.b, self.heads, n, width)),
            Heads::Packed => Shape::from((self.b, n, self.heads * width)),
        }
    }

    /// Query rows per task: enough for the gemms to run at speed (larger blocks measured faster on
    /// the medium UNet's shapes: 128 rows rather than 64 at 1024 keys, 5% forward and backward),
    /// few enough that a block's scores, at most 512 KB (backward: and as much for their
    /// gradients), stay in a core's L2 (1 MB on the machine measured). Forward, blocks are also cut
    /// small enough that there are pieces of work for every thread when there are few heads.
    fn query_block(&self, forward: bool) -> usize {
        let block = (128 * 1024 / self.nk).clamp(32, 256);
        if !forward {
            return block;
        }
        let blocks_per_head = pieces().div_ceil(self.bh());
        block.min(self.nq.div_ceil(blocks_per_head)).max(1)
    }
}

/// The op; the forward leaves the per-row log-sum-exp here for the backward.
struct FusedAttention {
    dims: Dims,
    scale: f32,
    lse: Mutex<Option<Lse>>,
}

/// The per-row log-sum-exp of the scores, `[bh, nq]`, base 2, where the forward ran.
enum Lse {
    Cpu(Vec<f32>),
    #[cfg(feature = "cuda")]
    Cuda(candle_core::cuda::cudarc::driver::CudaSlice<f32>),
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
        let inputs = [
            contiguous(OP, (q, q_l), "q")?,
            contiguous(OP, (k, k_l), "k")?,
            contiguous(OP, (v, v_l), "v")?,
        ];
        let Dims { nq, dv, .. } = self.dims;
        let mut lse = vec![0f32; self.dims.bh() * nq];
        let fill = |out: &mut [MaybeUninit<f32>]| {
            forward(&self.dims, self.scale, inputs, out, &mut lse);
        };
        // SAFETY: `forward` writes all of `out`.
        let out = unsafe { uninit_vec(self.dims.bh() * nq * dv, fill) };
        *self.lse.lock().map_err(|_| poisoned())? = Some(Lse::Cpu(lse));
        Ok((CpuStorage::F32(out), self.dims.shape(nq, dv)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        q: &candle_core::CudaStorage,
        q_l: &Layout,
        k: &candle_core::CudaStorage,
        k_l: &Layout,
        v: &candle_core::CudaStorage,
        v_l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (out, lse) = cuda::forward(&self.dims, self.scale, [(q, q_l), (k, k_l), (v, v_l)])?;
        *self.lse.lock().map_err(|_| poisoned())? = Some(Lse::Cuda(lse));
        Ok((out, self.dims.shape(self.dims.nq, self.dims.dv)))
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
        let grad_out = grad_out.contiguous()?;
        let lse = match lse.as_ref() {
            Some(Lse::Cpu(lse)) => lse,
            #[cfg(feature = "cuda")]
            Some(Lse::Cuda(lse)) => {
                let [dq, dk, dv] =
                    cuda::backward(&self.dims, self.scale, lse, [q, k, v, out, &grad_out])?;
                return Ok((Some(dq), Some(dk), Some(dv)));
            }
            None => bail!("fused attention: backward without a forward"),
        };
        let tensors = [q, k, v, out, &grad_out].map(|t| t.storage_and_layout());
        let mut slices = Vec::with_capacity(tensors.len());
        for ((storage, layout), name) in tensors.iter().zip(["q", "k", "v", "out", "grad"]) {
            slices.push(cpu_f32(OP, storage, layout, name)?);
        }
        let Dims { nq, nk, d, dv, .. } = self.dims;
        let bh = self.dims.bh();
        let [q_s, k_s, v_s, o_s, do_s] = slices[..] else {
            unreachable!("five tensors were read")
        };
        let inputs = [q_s, k_s, v_s, o_s, do_s];
        let (mut dk, mut dvv) = (Vec::new(), Vec::new());
        // SAFETY (all three): `backward` writes all of dq, dk and dv.
        let dq = unsafe {
            uninit_vec(bh * nq * d, |dq| {
                dk = uninit_vec(bh * nk * d, |dk| {
                    dvv = uninit_vec(bh * nk * dv, |dv| {
                        backward(&self.dims, self.scale, inputs, lse, [dq, dk, dv])
                    })
                })
            })
        };
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

/// `inputs`: q, k, v in the layout of `dims`; `out` gets the attention (same layout; all written,
/// it need not be initialised), `lse` `[bh, nq]` the log-sum-exp of each row of scores, in base
/// 2: `log₂ Σ 2^(s·log₂e)`.
fn forward(
    dims: &Dims,
    scale: f32,
    inputs: [&[f32]; 3],
    out: &mut [MaybeUninit<f32>],
    lse: &mut [f32],
) {
    let Dims { nq, nk, d, dv, .. } = *dims;
    let [q, k, v] = inputs;
    let bq = dims.query_block(true);
    let blocks = nq.div_ceil(bq);
    let (out, lse) = (Shared::new(out), Shared::init(lse));
    (0..dims.bh() * blocks).into_par_iter().for_each(|task| {
        let (bh, start) = (task / blocks, task % blocks * bq);
        let rows = bq.min(nq - start);
        with_scratch(rows * (nk + 1), |scratch| {
            let (scores, inv_sum) = scratch.split_at_mut(rows * nk); // [rows, nk], [rows]
            let q_b = dims.head(q, bh, nq, d).block(start, rows);
            let k_h = dims.head(k, bh, nk, d);
            gemm(scores, false, q_b, k_h.t(), scale * LOG2_E);
            let first = bh * nq + start;
            // SAFETY: the task's own rows of the log-sum-exp.
            let lse_b = unsafe { lse.slice(first..first + rows) };
            softmax_rows(scores, nk, lse_b, inv_sum);
            let (offset, rs) = dims.rows(bh, nq, dv);
            let offset = offset + start * rs; // the block's first output row
            let p = Matrix::rows(scores, rows, nk).mat;
            let v_h = dims.head(v, bh, nk, dv).mat;
            // SAFETY (both): the task's own output rows, which no other task touches; the gemm
            // writes them.
            unsafe { out.gemm(offset, rs, (rows, dv, nk), p, v_h, false) };
            for (i, &inv) in inv_sum.iter().enumerate() {
                let row = offset + i * rs;
                let row = unsafe { out.slice(row..row + dv) };
                row.iter_mut().for_each(|o| *o *= inv);
            }
        })
    });
}

/// `inputs`: q, k, v, out and the gradient of out, all in the layout of `dims`; `lse`: [bh, nq];
/// `grads`: those of q, k and v, all written (they need not be initialised).
fn backward(
    dims: &Dims,
    scale: f32,
    inputs: [&[f32]; 5],
    lse: &[f32],
    grads: [&mut [MaybeUninit<f32>]; 3],
) {
    let Dims { nq, nk, d, dv, .. } = *dims;
    let [q, k, v, out, grad_out] = inputs;
    let bq = dims.query_block(false);
    let [dq, dk, dvv] = grads.map(Shared::new);
    (0..dims.bh()).into_par_iter().for_each(|bh| {
        with_scratch(bq * (2 * nk + 1), |scratch| {
            let (probs, scratch) = scratch.split_at_mut(bq * nk);
            let (dscores, delta) = scratch.split_at_mut(bq * nk);
            let k_h = dims.head(k, bh, nk, d);
            let v_h = dims.head(v, bh, nk, dv);
            let (dq_at, dq_rs) = dims.rows(bh, nq, d);
            let (dk_at, dk_rs) = dims.rows(bh, nk, d);
            let (dv_at, dv_rs) = dims.rows(bh, nk, dv);
            let (o_at, o_rs) = dims.rows(bh, nq, dv); // out and its gradient
            for start in (0..nq).step_by(bq) {
                let rows = bq.min(nq - start);
                let q_b = dims.head(q, bh, nq, d).block(start, rows);
                let do_b = dims.head(grad_out, bh, nq, dv).block(start, rows);
                // rowsum(dO ∘ O) = rowsum(P ∘ dP): the softmax Jacobian's shift.
                for (i, dl) in delta[..rows].iter_mut().enumerate() {
                    let row = o_at + (start + i) * o_rs..o_at + (start + i) * o_rs + dv;
                    *dl = dot(&out[row.clone()], &grad_out[row]);
                }
                let probs = &mut probs[..rows * nk]; // [rows, nk]
                let dscores = &mut dscores[..rows * nk];
                gemm(probs, false, q_b, k_h.t(), scale * LOG2_E);
                gemm(dscores, false, do_b, v_h.t(), 1.0);
                let first = bh * nq + start;
                probs_and_score_grads(
                    probs,
                    dscores,
                    nk,
                    &lse[first..first + rows],
                    &delta[..rows],
                    scale,
                );
                let p = Matrix::rows(probs, rows, nk);
                let ds = Matrix::rows(dscores, rows, nk);
                // dK and dV add up over the query blocks, dQ is the block's own; the gradients of
                // a head are written by its task only.
                let more = start > 0;
                // SAFETY (all three): this head's gradients, which no other task touches; the first
                // query block (`start = 0`, `more` false) writes dK and dV whole, before the others
                // add into them.
                unsafe {
                    dvv.gemm(dv_at, dv_rs, (nk, dv, rows), p.t().mat, do_b.mat, more);
                    let dq_b = dq_at + start * dq_rs;
                    dq.gemm(dq_b, dq_rs, (rows, d, nk), ds.mat, k_h.mat, false);
                    dk.gemm(dk_at, dk_rs, (nk, d, rows), ds.t().mat, q_b.mat, more);
                }
            }
        })
    });
}

/// Runs `f` on this thread's scratch buffer of `len` elements (contents unspecified), kept from
/// call to call: zeroing fresh blocks of scores for every piece of work showed in profiles.
/// Not re-entrant: `f` must not call it again, which holds as no piece of work nests another.
fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    thread_local! {
        static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    }
    SCRATCH.with(|scratch| {
        let mut scratch = scratch.borrow_mut();
        if scratch.len() < len {
            scratch.resize(len, 0.0);
        }
        f(&mut scratch[..len])
    })
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
    /// `[rows, cols]` with rows `rs` apart.
    fn strided(data: &'a [f32], rows: usize, cols: usize, rs: usize) -> Self {
        Self {
            mat: Mat::new(data, rs, 1),
            rows,
            cols,
        }
    }

    /// Row-major `[rows, cols]`.
    fn rows(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self::strided(data, rows, cols, cols)
    }

    /// Rows `start..start + rows`.
    fn block(self, start: usize, rows: usize) -> Self {
        Self {
            mat: self.mat.from(start, 0),
            rows,
            cols: self.cols,
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

/// Coefficients of Cephes' `exp2f` polynomial: `2^f ≈ 1 + f·P(f)` for `|f| ≤ 1/2`, highest degree
/// first.
const EXP2_P: [f32; 6] = [
    1.535_336_2e-4,
    1.339_887_4e-3,
    9.618_437e-3,
    5.550_332_5e-2,
    2.402_264_8e-1,
    6.931_472e-1,
];

/// Where the base-2 exponent is clamped: below, `2^-124 ≈ e^-86` (no subnormals; negligible next
/// to the row maximum's 1); above, far beyond the scores' `s − max ≤ 0` and `s − lse ≤ 0` (the
/// clamp only keeps infinities from wrapping the exponent bits).
const EXP2_MIN: f32 = -124.0;
const EXP2_MAX: f32 = 64.0;

/// `1.5·2²³`: adding it rounds to an integer, which then sits in the low mantissa bits.
const ROUND: f32 = 12_582_912.0;

/// `2^y` to about 1e-7 relative, in branch-free arithmetic: `y = n + f` with `|f| ≤ 1/2`, `2^f` by
/// [`EXP2_P`], `2^n` built in the exponent bits. NaN stays NaN.
#[inline(always)]
fn exp2(y: f32) -> f32 {
    let y = if y < EXP2_MIN { EXP2_MIN } else { y };
    let y = if y > EXP2_MAX { EXP2_MAX } else { y };
    let shifted = y + ROUND;
    let f = y - (shifted - ROUND);
    let p = EXP2_P[1..].iter().fold(EXP2_P[0], |p, &c| p * f + c);
    let n = shifted.to_bits().wrapping_sub(ROUND.to_bits()) as i32;
    (p * f + 1.0) * f32::from_bits(((n + 127) << 23) as u32)
}

/// Lanes of the reductions below: independent accumulators the compiler keeps in vector registers
/// (a single running max or sum would be a serial chain).
const LANES: usize = 16;

/// `Σ aᵢ·bᵢ`.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let (a, b) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = a
        .remainder()
        .iter()
        .zip(b.remainder())
        .map(|(x, y)| x * y)
        .sum();
    let mut lanes = [0f32; LANES];
    for (a, b) in a.zip(b) {
        for ((s, x), y) in lanes.iter_mut().zip(a).zip(b) {
            *s += x * y;
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// Forward softmax of each `nk`-long row of `scores` (in base 2), unnormalised: the rows become
/// `2^(s − max)`, `lse` gets `max + log₂(sum)` and `inv_sum` `1/sum`.
fn softmax_rows(scores: &mut [f32], nk: usize, lse: &mut [f32], inv_sum: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if avx2::available() {
        // SAFETY: the CPU supports AVX2 and FMA, just checked.
        return unsafe { avx2::softmax_rows(scores, nk, lse, inv_sum) };
    }
    softmax_rows_portable(scores, nk, lse, inv_sum)
}

fn softmax_rows_portable(scores: &mut [f32], nk: usize, lse: &mut [f32], inv_sum: &mut [f32]) {
    for ((row, lse), inv) in scores.chunks_exact_mut(nk).zip(lse).zip(inv_sum) {
        let max = row_max(row);
        let sum = exp2_shifted_sum(row, max);
        *lse = max + sum.log2();
        *inv = 1.0 / sum;
    }
}

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

/// `row[i] = 2^(row[i] − shift)`, returning the sum of the new values.
fn exp2_shifted_sum(row: &mut [f32], shift: f32) -> f32 {
    let mut lanes = [0f32; LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    for chunk in &mut chunks {
        for (s, x) in lanes.iter_mut().zip(chunk) {
            *x = exp2(*x - shift);
            *s += *x;
        }
    }
    let mut sum = 0.0;
    for x in chunks.into_remainder() {
        *x = exp2(*x - shift);
        sum += *x;
    }
    lanes.iter().sum::<f32>() + sum
}

/// Backward, given the scores `s` (in base 2) in `probs` and `dP = dO·Vᵀ` in `dscores`: `probs`
/// becomes `P = 2^(s − lse)` and `dscores` `dS = P ∘ (dP − delta)·scale` (the scale of the scores
/// taken in here, so that the products giving dQ and dK need none), row by row.
fn probs_and_score_grads(
    probs: &mut [f32],
    dscores: &mut [f32],
    nk: usize,
    lse: &[f32],
    delta: &[f32],
    scale: f32,
) {
    #[cfg(target_arch = "x86_64")]
    if avx2::available() {
        // SAFETY: the CPU supports AVX2 and FMA, just checked.
        return unsafe { avx2::probs_and_score_grads(probs, dscores, nk, lse, delta, scale) };
    }
    probs_and_score_grads_portable(probs, dscores, nk, lse, delta, scale)
}

fn probs_and_score_grads_portable(
    probs: &mut [f32],
    dscores: &mut [f32],
    nk: usize,
    lse: &[f32],
    delta: &[f32],
    scale: f32,
) {
    let rows = probs.chunks_exact_mut(nk).zip(dscores.chunks_exact_mut(nk));
    for ((p_row, ds_row), (&lse, &delta)) in rows.zip(lse.iter().zip(delta)) {
        for (p, ds) in p_row.iter_mut().zip(ds_row.iter_mut()) {
            *p = exp2(*p - lse);
            *ds = (*ds - delta) * (*p * scale);
        }
    }
}

/// The row kernels in AVX2 and FMA intrinsics, written out rather than left to the compiler as the
/// other kernels' loops are: the portable loops, compiled for AVX2, measured 1.8x slower at 256
/// keys and 3x at 77, where a row is 9 vectors and 5 elements that they take one by one (here,
/// each row ends with a masked vector).
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{EXP2_MAX, EXP2_MIN, EXP2_P, ROUND};
    pub(super) use crate::simd::avx2::available;
    use crate::simd::avx2::{split, sum_lanes};

    /// 8 lanes of [`super::exp2`], with fused multiply-adds.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn exp2(y: __m256) -> __m256 {
        // max/min return their second operand when either is NaN: NaN stays NaN.
        let y = _mm256_max_ps(_mm256_set1_ps(EXP2_MIN), y);
        let y = _mm256_min_ps(_mm256_set1_ps(EXP2_MAX), y);
        let round = _mm256_set1_ps(ROUND);
        let shifted = _mm256_add_ps(y, round);
        let f = _mm256_sub_ps(y, _mm256_sub_ps(shifted, round));
        let mut p = _mm256_set1_ps(EXP2_P[0]);
        for c in &EXP2_P[1..] {
            p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(*c));
        }
        let e = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0));
        let n = _mm256_sub_epi32(_mm256_castps_si256(shifted), _mm256_castps_si256(round));
        let pow2 = _mm256_slli_epi32::<23>(_mm256_add_epi32(n, _mm256_set1_epi32(127)));
        _mm256_mul_ps(e, _mm256_castsi256_ps(pow2))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn max_lanes(v: __m256) -> f32 {
        let m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps::<1>(m, m)))
    }

    /// [`super::softmax_rows`].
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn softmax_rows(
        scores: &mut [f32],
        nk: usize,
        lse: &mut [f32],
        inv_sum: &mut [f32],
    ) {
        let (whole, mask) = split(nk);
        let tail = nk > whole;
        let fmask = _mm256_castsi256_ps(mask);
        let neg_inf = _mm256_set1_ps(f32::NEG_INFINITY);
        for ((row, lse), inv) in scores.chunks_exact_mut(nk).zip(lse).zip(inv_sum) {
            let at = row.as_mut_ptr();
            // SAFETY (the loads and stores below): vectors `i..i + 8` with `i + 8 <= whole`,
            // and the masked lanes of the tail, lie within the row.
            let (mut m0, mut m1) = (neg_inf, neg_inf);
            let mut i = 0;
            while i + 16 <= whole {
                m0 = _mm256_max_ps(m0, unsafe { _mm256_loadu_ps(at.add(i)) });
                m1 = _mm256_max_ps(m1, unsafe { _mm256_loadu_ps(at.add(i + 8)) });
                i += 16;
            }
            if i < whole {
                m0 = _mm256_max_ps(m0, unsafe { _mm256_loadu_ps(at.add(i)) });
            }
            if tail {
                let x = unsafe { _mm256_maskload_ps(at.add(whole), mask) };
                m1 = _mm256_max_ps(m1, _mm256_blendv_ps(neg_inf, x, fmask));
            }
            let max = max_lanes(_mm256_max_ps(m0, m1));
            let shift = _mm256_set1_ps(max);
            let mut sum = _mm256_setzero_ps();
            for i in (0..whole).step_by(8) {
                let e = exp2(_mm256_sub_ps(unsafe { _mm256_loadu_ps(at.add(i)) }, shift));
                unsafe { _mm256_storeu_ps(at.add(i), e) };
                sum = _mm256_add_ps(sum, e);
            }
            if tail {
                let x = unsafe { _mm256_maskload_ps(at.add(whole), mask) };
                let e = _mm256_and_ps(exp2(_mm256_sub_ps(x, shift)), fmask);
                unsafe { _mm256_maskstore_ps(at.add(whole), mask, e) };
                sum = _mm256_add_ps(sum, e);
            }
            let sum = sum_lanes(sum);
            *lse = max + sum.log2();
            *inv = 1.0 / sum;
        }
    }

    /// [`super::probs_and_score_grads`].
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn probs_and_score_grads(
        probs: &mut [f32],
        dscores: &mut [f32],
        nk: usize,
        lse: &[f32],
        delta: &[f32],
        scale: f32,
    ) {
        let (whole, mask) = split(nk);
        let scale = _mm256_set1_ps(scale);
        let rows = probs.chunks_exact_mut(nk).zip(dscores.chunks_exact_mut(nk));
        for ((p_row, ds_row), (&lse, &delta)) in rows.zip(lse.iter().zip(delta)) {
            let (p_at, ds_at) = (p_row.as_mut_ptr(), ds_row.as_mut_ptr());
            let (lse, delta) = (_mm256_set1_ps(lse), _mm256_set1_ps(delta));
            // `(P, dS)` of 8 scores and their `dP`.
            let grads = |s: __m256, dp: __m256| {
                let p = exp2(_mm256_sub_ps(s, lse));
                (
                    p,
                    _mm256_mul_ps(_mm256_sub_ps(dp, delta), _mm256_mul_ps(p, scale)),
                )
            };
            // SAFETY (the loads and stores below): as in `softmax_rows`, both rows `nk` long.
            for i in (0..whole).step_by(8) {
                let (p, ds) =
                    unsafe { grads(_mm256_loadu_ps(p_at.add(i)), _mm256_loadu_ps(ds_at.add(i))) };
                unsafe {
                    _mm256_storeu_ps(p_at.add(i), p);
                    _mm256_storeu_ps(ds_at.add(i), ds);
                }
            }
            if nk > whole {
                unsafe {
                    let (p, ds) = grads(
                        _mm256_maskload_ps(p_at.add(whole), mask),
                        _mm256_maskload_ps(ds_at.add(whole), mask),
                    );
                    _mm256_maskstore_ps(p_at.add(whole), mask, p);
                    _mm256_maskstore_ps(ds_at.add(whole), mask, ds);
                }
            }
        }
    }
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

    /// `[b, heads, n, d]` -> `[b, n, heads·d]`, contiguous.
    fn pack(x: &Tensor) -> Tensor {
        let (b, h, n, d) = x.dims4().unwrap();
        x.transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
            .reshape((b, n, h * d))
            .unwrap()
    }

    /// `[b, n, heads·d]` -> `[b, heads, n, d]`.
    fn unpack(x: &Tensor, heads: usize) -> Tensor {
        let (b, n, hd) = x.dims3().unwrap();
        x.reshape((b, n, heads, hd / heads))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
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

    /// The ways of computing attention that the tests compare.
    #[derive(Clone, Copy, PartialEq)]
    enum Way {
        /// The composite ops, as the reference.
        Composite,
        /// [`attention`] on `[b, heads, n, d]`.
        Split,
        /// [`attention_heads`] on `[b, n, heads·d]`, its output and gradients brought back to
        /// `[b, heads, n, d]`.
        Packed,
    }

    /// The output of attention and the gradients of `sum(attention · w)` with respect to q, k, v,
    /// all as `[b, heads, n, d]`.
    type Run = (Tensor, [Tensor; 3]);

    fn run(inputs: [&Tensor; 4], scale: f64, dtype: DType, way: Way) -> Run {
        let [q, k, v, w] = inputs.map(|t| t.to_dtype(dtype).unwrap());
        let heads = q.dim(1).unwrap();
        let vars = [&q, &k, &v].map(|t| {
            let t = if way == Way::Packed {
                pack(t)
            } else {
                t.clone()
            };
            Var::from_tensor(&t).unwrap()
        });
        let [q, k, v] = [0, 1, 2].map(|i| vars[i].as_tensor());
        let out = match way {
            Way::Composite => naive(q, k, v, scale).unwrap(),
            Way::Split => attention(q, k, v, scale).unwrap(),
            Way::Packed => unpack(&attention_heads(q, k, v, heads, scale).unwrap(), heads),
        };
        let grads = (&out * w).unwrap().sum_all().unwrap().backward().unwrap();
        let grads = [q, k, v].map(|t| {
            let g = grads.get(t).expect("missing gradient");
            assert_eq!(g.dims(), t.dims());
            if way == Way::Packed {
                unpack(g, heads)
            } else {
                g.clone()
            }
        });
        (out, grads)
    }

    struct Errors {
        out: f32,
        grads: [f32; 3],
    }

    impl Errors {
        fn of((out, grads): &Run, (ref_out, ref_grads): &Run) -> Self {
            Self {
                out: max_rel_diff(out, ref_out),
                grads: [0, 1, 2].map(|i| max_rel_diff(&grads[i], &ref_grads[i])),
            }
        }

        fn worst(&self) -> f32 {
            self.grads.iter().fold(self.out, |a, &b| a.max(b))
        }
    }

    /// Seeded inputs of `(b, heads, n_q, n_k, d, d_v)`: q and k of standard deviation `std`, and
    /// the weights `w` of the loss.
    fn inputs(shape: (usize, usize, usize, usize, usize, usize), std: f32) -> [Tensor; 4] {
        let (b, h, nq, nk, d, dv) = shape;
        [
            randn((b, h, nq, d), std, 1),
            randn((b, h, nk, d), std, 2),
            randn((b, h, nk, dv), 1.0, 3),
            randn((b, h, nq, dv), 1.0, 4),
        ]
    }

    // (b, heads, n_q, n_k, d, d_v): n_q != n_k, sizes off the block size and off the vector width,
    // several row blocks, d_v != d.
    const SHAPES: [(usize, usize, usize, usize, usize, usize); 6] = [
        (2, 3, 37, 29, 8, 8),
        (1, 2, 300, 77, 40, 40),
        (2, 1, 70, 130, 64, 64),
        (1, 2, 33, 1100, 16, 16),
        (1, 1, 5, 3, 8, 5),
        (2, 3, 21, 9, 5, 7),
    ];

    #[test]
    fn matches_the_composite_forward_and_gradients() {
        for shape in SHAPES {
            let scale = 1.0 / (shape.4 as f64).sqrt();
            // std 3 gives scores of std 9, nearly one-hot rows: the f32 composite's own error
            // reaches 1e-5 there.
            for (std, tolerance) in [(1.0, 1e-5), (3.0, 3e-5)] {
                let inputs = inputs(shape, std);
                let inputs = [0, 1, 2, 3].map(|i| &inputs[i]);
                let reference = run(inputs, scale, DType::F64, Way::Composite);
                let composite =
                    Errors::of(&run(inputs, scale, DType::F32, Way::Composite), &reference);
                for way in [Way::Split, Way::Packed] {
                    let fused = Errors::of(&run(inputs, scale, DType::F32, way), &reference);
                    let name = if way == Way::Split { "split" } else { "packed" };
                    println!(
                        "{shape:?} std {std}: {name} out {:.1e} grads {}; f32 composite out {:.1e} grads {}",
                        fused.out,
                        fmt(&fused.grads),
                        composite.out,
                        fmt(&composite.grads)
                    );
                    assert!(fused.worst() < tolerance, "{shape:?} std {std} {name}");
                }
            }
        }
    }

    #[test]
    fn both_layouts_agree() {
        // The same arithmetic in both layouts, only the strides differ.
        for shape in SHAPES {
            let scale = 0.3;
            let inputs = inputs(shape, 1.0);
            let inputs = [0, 1, 2, 3].map(|i| &inputs[i]);
            let split = run(inputs, scale, DType::F32, Way::Split);
            let packed = Errors::of(&run(inputs, scale, DType::F32, Way::Packed), &split);
            assert!(packed.worst() < 1e-6, "{shape:?}: {}", packed.worst());
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
        let reference = naive(&q, &k, &v, 0.7).unwrap();
        assert!(max_rel_diff(&fused, &reference) < 1e-6);
        // Packed: a transposed q, [b, heads·d, n] seen as [b, n, heads·d].
        let packed_q = pack(&q.contiguous().unwrap())
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
            .transpose(1, 2)
            .unwrap();
        assert!(!packed_q.is_contiguous());
        let fused = attention_heads(&packed_q, &pack(&k), &pack(&v), 3, 0.7).unwrap();
        assert_eq!(fused.dims(), &[2, 9, 18]);
        assert!(max_rel_diff(&unpack(&fused, 3), &reference) < 1e-6);
    }

    #[test]
    fn rejects_other_dtypes_and_mismatched_shapes() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((1, 2, 3, 4), DType::F64, &dev).unwrap();
        assert!(attention(&x, &x, &x, 1.0).is_err());
        let q = Tensor::zeros((1, 2, 3, 4), DType::F32, &dev).unwrap();
        let k = Tensor::zeros((1, 2, 3, 5), DType::F32, &dev).unwrap();
        assert!(attention(&q, &k, &k, 1.0).is_err());
        // Packed: heads that do not divide the width, mismatched widths or lengths, no heads.
        let x = Tensor::zeros((1, 3, 12), DType::F32, &dev).unwrap();
        let wide = Tensor::zeros((1, 3, 16), DType::F32, &dev).unwrap();
        let long = Tensor::zeros((1, 4, 12), DType::F32, &dev).unwrap();
        assert!(attention_heads(&x, &x, &x, 3, 1.0).is_ok());
        assert!(attention_heads(&x, &x, &x, 5, 1.0).is_err());
        assert!(attention_heads(&x, &x, &x, 0, 1.0).is_err());
        assert!(attention_heads(&x, &wide, &wide, 4, 1.0).is_err());
        assert!(attention_heads(&x, &long, &x, 3, 1.0).is_err());
        assert!(attention_heads(&x, &x, &x.to_dtype(DType::F64).unwrap(), 3, 1.0).is_err());
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
    fn exp2_is_accurate() {
        let mut worst = 0f64;
        for i in 0..=400_000 {
            let y = -124.0 + 130.0 * i as f32 / 400_000.0;
            let exact = (y as f64).exp2();
            worst = worst.max(((exp2(y) as f64 - exact) / exact).abs());
        }
        println!("exp2: max relative error {worst:.2e} on [-124, 6]");
        assert!(worst < 2e-7, "{worst}");
        assert_eq!(exp2(0.0), 1.0);
        assert_eq!(exp2(-3.0), 0.125);
        assert!(exp2(f32::NAN).is_nan());
        assert_eq!(exp2(f32::NEG_INFINITY), EXP2_MIN.exp2());
    }

    #[test]
    fn vector_and_portable_row_kernels_agree() {
        // Rows of every length modulo the vector width, with and without whole vectors.
        for nk in [1, 5, 8, 13, 16, 37, 77] {
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
                    probs_and_score_grads_portable(&mut p, &mut ds, nk, &lse, &delta, 0.7);
                } else {
                    softmax_rows(&mut s, nk, &mut l, &mut inv);
                    probs_and_score_grads(&mut p, &mut ds, nk, &lse, &delta, 0.7);
                }
                results.push([s, l.to_vec(), inv.to_vec(), p, ds].concat());
            }
            for (a, b) in results[0].iter().zip(&results[1]) {
                assert!((a - b).abs() <= 1e-6 * b.abs().max(1.0), "{nk}: {a} vs {b}");
            }
        }
    }
}
