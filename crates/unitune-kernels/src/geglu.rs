//! diffusers' GEGLU activation, `hidden * gelu(gate)` with `hidden, gate = proj.chunk(2, -1)` and
//! the exact (erf) GELU, as a candle custom op with an analytic backward.
//!
//! Composed of candle ops, the GEGLU of every transformer feed-forward copies both halves out of
//! the projection, runs libm's scalar `erff` per element, multiplies, and keeps each of those
//! tensors for a backward of more full-size elementwise ops (candle's `gelu_erf` gradient alone
//! is a dozen: a square, an exp, an erf, scalings, sums and products). Here the forward reads the
//! projection once and writes the output once; the backward reads the projection and the
//! gradient once, recomputes GELU and its derivative from the gate, and writes the projection's
//! gradient once. Both use the vectorised `erf` and `exp` of `simd` (AVX2 where the CPU has it)
//! and split the rows over rayon.

use std::f32::consts::{FRAC_1_SQRT_2, FRAC_2_SQRT_PI};
use std::mem::MaybeUninit;
use std::sync::Arc;

use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::cpu::{contiguous, uninit_vec};
use crate::simd::{erf, exp};

/// The name in the errors.
const OP: &str = "geglu";

/// `proj[..., :inner] * gelu(proj[..., inner:])` for `proj` of shape `[..., 2 * inner]`, giving
/// `[..., inner]`: diffusers' `GEGLU.forward` after its Linear, with the exact GELU (torch's
/// `approximate="none"`, candle's `gelu_erf`). Differentiable with respect to `proj` (first
/// order). f32 CPU tensors only (callers fall back to composite ops elsewhere); any layout (a
/// non-contiguous input is copied first).
pub fn geglu(proj: &Tensor) -> Result<Tensor> {
    let width = match proj.dims().last() {
        Some(&w) if w > 0 && w % 2 == 0 => w,
        _ => bail!(
            "geglu: the last dimension must be even and non-zero, got {:?}",
            proj.shape()
        ),
    };
    if !proj.device().is_cpu() || proj.dtype() != DType::F32 {
        bail!(
            "geglu: only f32 CPU tensors, got {:?} on {:?}",
            proj.dtype(),
            proj.device()
        )
    }
    let op = Geglu { inner: width / 2 };
    proj.contiguous()?.apply_op1_arc(Arc::new(Box::new(op)))
}

/// `1/sqrt(2·pi)`, the standard normal density at 0.
const FRAC_1_SQRT_2PI: f32 = 0.5 * FRAC_2_SQRT_PI * FRAC_1_SQRT_2;

/// Output elements per rayon task: enough to outweigh the scheduling, small enough that the
/// UNet's GEGLUs (a few million elements) spread over every thread.
const TASK_ELEMS: usize = 16 * 1024;

/// The forward op; `inner` is the width of each half.
struct Geglu {
    inner: usize,
}

/// The backward op on `(grad [..., inner], proj [..., 2 * inner])`, giving `d proj`.
struct GegluGrad {
    inner: usize,
}

/// Rows of the projection handled by one rayon task.
fn rows_per_task(inner: usize) -> usize {
    (TASK_ELEMS / inner).max(1)
}

impl CustomOp1 for Geglu {
    fn name(&self) -> &'static str {
        "unitune-geglu"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let proj = contiguous(OP, (storage, layout), "input")?;
        let inner = self.inner;
        let rows = rows_per_task(inner);
        let fill = |out: &mut [MaybeUninit<f32>]| {
            out.par_chunks_mut(rows * inner)
                .zip(proj.par_chunks(rows * 2 * inner))
                .for_each(|(out, proj)| forward(proj, out, inner))
        };
        // SAFETY: `forward` writes each chunk whole (`inner` outputs per row of `proj`).
        let out = unsafe { uninit_vec(proj.len() / 2, fill) };
        let mut dims = layout.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = inner;
        }
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }

    fn bwd(&self, proj: &Tensor, _out: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        // The incoming gradient may be strided (a broadcast from a sum, for one).
        let op = GegluGrad { inner: self.inner };
        grad.contiguous()?.apply_op2_no_bwd(proj, &op).map(Some)
    }
}

impl CustomOp2 for GegluGrad {
    fn name(&self) -> &'static str {
        "unitune-geglu-grad"
    }

    fn cpu_fwd(
        &self,
        grad_s: &CpuStorage,
        grad_l: &Layout,
        proj_s: &CpuStorage,
        proj_l: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let grad = contiguous(OP, (grad_s, grad_l), "output gradient")?;
        let proj = contiguous(OP, (proj_s, proj_l), "input")?;
        if 2 * grad.len() != proj.len() {
            bail!(
                "geglu backward: output gradient {:?} for the input {:?}",
                grad_l.dims(),
                proj_l.dims()
            )
        }
        let inner = self.inner;
        let rows = rows_per_task(inner);
        let fill = |dproj: &mut [MaybeUninit<f32>]| {
            dproj
                .par_chunks_mut(rows * 2 * inner)
                .zip(proj.par_chunks(rows * 2 * inner))
                .zip(grad.par_chunks(rows * inner))
                .for_each(|((dproj, proj), grad)| backward(proj, grad, dproj, inner))
        };
        // SAFETY: `backward` writes each chunk whole (the rows of `proj`).
        let dproj = unsafe { uninit_vec(proj.len(), fill) };
        Ok((CpuStorage::F32(dproj), proj_l.shape().clone()))
    }
}

/// The exact GELU, `x·Φ(x)` with `Φ(x) = (1 + erf(x/√2))/2`, as torch and candle compute it.
#[inline(always)]
fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * FRAC_1_SQRT_2))
}

/// `out = hidden * gelu(gate)` row by row, writing all of `out`; `proj` holds whole rows
/// `[hidden | gate]`.
fn forward(proj: &[f32], out: &mut [MaybeUninit<f32>], inner: usize) {
    #[cfg(target_arch = "x86_64")]
    if crate::simd::has_avx2() {
        // Safety: the CPU has the features `forward_avx2` is compiled for.
        return unsafe { forward_avx2(proj, out, inner) };
    }
    forward_impl(proj, out, inner)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn forward_avx2(proj: &[f32], out: &mut [MaybeUninit<f32>], inner: usize) {
    forward_impl(proj, out, inner)
}

#[inline(always)]
fn forward_impl(proj: &[f32], out: &mut [MaybeUninit<f32>], inner: usize) {
    for (row, out) in proj
        .chunks_exact(2 * inner)
        .zip(out.chunks_exact_mut(inner))
    {
        let (hidden, gate) = row.split_at(inner);
        for ((o, &h), &g) in out.iter_mut().zip(hidden).zip(gate) {
            o.write(h * gelu(g));
        }
    }
}

/// The gradient of the projection, row by row, from that of the output (`grad`):
/// `d hidden = grad * gelu(gate)`, `d gate = grad * hidden * gelu'(gate)` with
/// `gelu'(x) = Φ(x) + x·φ(x)` (φ the standard normal density); writes all of `dproj`.
fn backward(proj: &[f32], grad: &[f32], dproj: &mut [MaybeUninit<f32>], inner: usize) {
    #[cfg(target_arch = "x86_64")]
    if crate::simd::has_avx2() {
        // Safety: the CPU has the features `backward_avx2` is compiled for.
        return unsafe { backward_avx2(proj, grad, dproj, inner) };
    }
    backward_impl(proj, grad, dproj, inner)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn backward_avx2(proj: &[f32], grad: &[f32], dproj: &mut [MaybeUninit<f32>], inner: usize) {
    backward_impl(proj, grad, dproj, inner)
}

#[inline(always)]
fn backward_impl(proj: &[f32], grad: &[f32], dproj: &mut [MaybeUninit<f32>], inner: usize) {
    let rows = proj
        .chunks_exact(2 * inner)
        .zip(grad.chunks_exact(inner))
        .zip(dproj.chunks_exact_mut(2 * inner));
    for ((row, grad), drow) in rows {
        let (hidden, gate) = row.split_at(inner);
        let (d_hidden, d_gate) = drow.split_at_mut(inner);
        let outputs = d_hidden.iter_mut().zip(d_gate.iter_mut());
        let inputs = hidden.iter().zip(gate).zip(grad);
        for ((dh, dg), ((&h, &g), &go)) in outputs.zip(inputs) {
            let cdf = 0.5 * (1.0 + erf(g * FRAC_1_SQRT_2));
            let pdf = FRAC_1_SQRT_2PI * exp(-0.5 * g * g);
            dh.write(go * g * cdf);
            dg.write(go * h * (cdf + g * pdf));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var, D};

    /// diffusers' GEGLU in candle ops, as the UNet composes it off the CPU: `gelu_erf` in f32 or,
    /// for the f64 reference, `x·(1 + erf(x/√2))/2` (candle's `gelu_erf` backward rounds
    /// 1/sqrt(2·pi) to 0.398942, a 7e-7 relative error that would blur the comparison).
    fn composite(proj: &Tensor, exact: bool) -> Tensor {
        let inner = proj.dim(D::Minus1).unwrap() / 2;
        let hidden = proj.narrow(D::Minus1, 0, inner).unwrap();
        let gate = proj.narrow(D::Minus1, inner, inner).unwrap();
        let gelu = if exact {
            let cdf = ((gate.clone() * std::f64::consts::FRAC_1_SQRT_2)
                .unwrap()
                .erf()
                .unwrap()
                + 1.0)
                .unwrap();
            ((gate * cdf).unwrap() * 0.5).unwrap()
        } else {
            gate.gelu_erf().unwrap()
        };
        (hidden * gelu).unwrap()
    }

    fn max_abs(t: &Tensor) -> f64 {
        let t = t.to_dtype(DType::F64).unwrap().abs().unwrap();
        t.flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    /// The output and the gradient of `sum(out * w)` (w fixed random) w.r.t. the projection.
    fn run(proj: &Tensor, w: &Tensor, dtype: DType, ours: bool) -> [Tensor; 2] {
        let var = Var::from_tensor(&proj.to_dtype(dtype).unwrap()).unwrap();
        let out = if ours {
            geglu(var.as_tensor()).unwrap()
        } else {
            composite(var.as_tensor(), dtype == DType::F64)
        };
        let loss = (&out * w.to_dtype(dtype).unwrap())
            .unwrap()
            .sum_all()
            .unwrap();
        let grads = loss.backward().unwrap();
        let grad = grads.get(var.as_tensor()).expect("no gradient").clone();
        [out, grad]
    }

    /// Worst errors of (output, gradient) against the f64 reference, relative to the largest
    /// value of each: ours, and candle's f32 composite.
    fn compare(shape: &[usize], scale: f64) -> ([f64; 2], [f64; 2]) {
        let dev = Device::Cpu;
        // Values exact in f32, so that the errors are those of the computation alone.
        let proj = Tensor::randn(0f32, scale as f32, shape, &dev).unwrap();
        let proj = proj.to_dtype(DType::F64).unwrap();
        let mut out_shape = shape.to_vec();
        *out_shape.last_mut().unwrap() /= 2;
        let w = Tensor::randn(0f64, 1.0, out_shape.as_slice(), &dev).unwrap();
        let reference = run(&proj, &w, DType::F64, false);
        let errors = |other: [Tensor; 2]| {
            let mut errs = [0f64; 2];
            for ((e, r), o) in errs.iter_mut().zip(&reference).zip(&other) {
                assert_eq!(r.dims(), o.dims());
                let diff = (r - o.to_dtype(DType::F64).unwrap()).unwrap();
                *e = max_abs(&diff) / max_abs(r);
            }
            errs
        };
        (
            errors(run(&proj, &w, DType::F32, true)),
            errors(run(&proj, &w, DType::F32, false)),
        )
    }

    #[test]
    fn matches_composite_geglu_and_its_gradient() {
        let cases: &[&[usize]] = &[
            &[5, 2 * 7],
            // inner = 1, with rows enough that some output is large: errors are relative to the
            // largest, and with every gate deep in the negative tail (1 + erf cancelling in f32,
            // in torch and candle alike) all outputs would be tiny.
            &[40, 2],
            &[2, 3, 2 * 33],
            &[2, 17, 2 * 40],
            // Several rayon tasks, and rows longer than a task.
            &[2, 300, 2 * 256],
            &[3, 2 * 20_000],
        ];
        for &shape in cases {
            // Scale 4 reaches the tails, where erf saturates and the density underflows.
            for scale in [1.0, 4.0] {
                let (ours, candle) = compare(shape, scale);
                println!(
                    "{shape:?} x{scale}: ours {:.1e}/{:.1e}, candle f32 {:.1e}/{:.1e} (out/grad)",
                    ours[0], ours[1], candle[0], candle[1]
                );
                assert!(
                    ours.iter().all(|&e| e < 5e-7),
                    "{shape:?} scale {scale}: ours {ours:?}, candle {candle:?}"
                );
            }
        }
    }

    /// The dispatched kernels (AVX2 where the CPU has it) agree with the baseline build.
    #[test]
    fn kernel_versions_agree() {
        let randn = |n: usize| -> Vec<f32> {
            Tensor::randn(0f32, 2.0, n, &Device::Cpu)
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        let (rows, inner) = (3, 37);
        let (proj, grad) = (randn(rows * 2 * inner), randn(rows * inner));
        let close = |a: &[f32], b: &[f32]| {
            a.iter()
                .zip(b)
                .all(|(a, b)| (a - b).abs() <= 1e-6 * (1.0 + b.abs()))
        };
        // SAFETY (all four): each writes its whole output.
        let a = unsafe { uninit_vec(rows * inner, |out| forward(&proj, out, inner)) };
        let b = unsafe { uninit_vec(rows * inner, |out| forward_impl(&proj, out, inner)) };
        assert!(close(&a, &b));
        let a = unsafe { uninit_vec(proj.len(), |d| backward(&proj, &grad, d, inner)) };
        let b = unsafe { uninit_vec(proj.len(), |d| backward_impl(&proj, &grad, d, inner)) };
        assert!(close(&a, &b));
        assert!(a.iter().any(|&v| v != 0.0));
    }

    #[test]
    fn rejects_bad_arguments_and_copies_strided_input() {
        let dev = Device::Cpu;
        let odd = Tensor::zeros((2, 5), DType::F32, &dev).unwrap();
        assert!(geglu(&odd).is_err());
        assert!(geglu(&Tensor::zeros((2, 0), DType::F32, &dev).unwrap()).is_err());
        assert!(geglu(&Tensor::new(1f32, &dev).unwrap()).is_err());
        assert!(geglu(&Tensor::zeros((2, 4), DType::F64, &dev).unwrap()).is_err());
        // Empty batch: an empty output of the right shape.
        let empty = geglu(&Tensor::zeros((0, 3, 4), DType::F32, &dev).unwrap()).unwrap();
        assert_eq!(empty.dims(), [0, 3, 2]);
        // A transposed (non-contiguous) input gives the same as its contiguous copy.
        let t = Tensor::randn(0f32, 1.0, (2, 6, 3), &dev)
            .unwrap()
            .transpose(1, 2)
            .unwrap();
        let a = geglu(&t).unwrap();
        let b = geglu(&t.contiguous().unwrap()).unwrap();
        assert_eq!(a.dims(), [2, 3, 3]);
        assert_eq!(max_abs(&(a - b).unwrap()), 0.0);
    }
}
