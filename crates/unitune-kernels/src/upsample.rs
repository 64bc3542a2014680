//! Nearest-neighbour upsampling by 2 (each pixel becomes a 2x2 block), forward and backward, as a
//! candle custom op.
//!
//! Composed of candle ops (a reshape to `[b, c, h, 1, w, 1]`, a broadcast to `[b, c, h, 2, w, 2]`
//! and a copy), the forward is a strided copy element by element and the backward a `sum_keepdim`
//! over the two broadcast dims: a single-threaded strided loop with a division per element. Here
//! each (image, channel) plane is a task for rayon: the forward writes each output row pair once
//! (the second row a copy of the first), the backward sums each 2x2 block of the output gradient.

use std::mem::MaybeUninit;
use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

use crate::cpu::{contiguous, uninit_vec, unsupported};

/// The name in the errors.
const OP: &str = "upsample_nearest2x";

/// Output elements per rayon task (planes are grouped up to this): enough to outweigh the
/// scheduling, small enough that the UNet's upsamplings spread over every thread.
const TASK_ELEMS: usize = 16 * 1024;

/// `x: [b, c, h, w]` -> `[b, c, 2h, 2w]` with `out[.., 2r + i, 2q + j] = x[.., r, q]` for `i, j`
/// in `{0, 1}`: `F.interpolate(x, scale_factor=2, mode="nearest")`. Differentiable (first
/// order; the gradient sums each 2x2 block). CPU tensors of dtype f32 or f64, any layout (a
/// non-contiguous input is copied first); callers fall back to composite ops elsewhere.
pub fn upsample_nearest2x(x: &Tensor) -> Result<Tensor> {
    if x.rank() != 4 {
        bail!("{OP}: expected a [b, c, h, w] input, got {:?}", x.shape())
    }
    if !x.device().is_cpu() || !matches!(x.dtype(), DType::F32 | DType::F64) {
        bail!(
            "{OP}: only f32 or f64 CPU tensors, got {:?} on {:?}",
            x.dtype(),
            x.device()
        )
    }
    x.contiguous()?
        .apply_op1_arc(Arc::new(Box::new(Upsample2x)))
}

/// Planes of `plane_out` output elements per rayon task (at least one).
fn planes_per_task(plane_out: usize) -> usize {
    (TASK_ELEMS / plane_out.max(1)).max(1)
}

/// `x: [planes, h, w]` -> `[planes, 2h, 2w]`.
fn forward<T: WithDType>(x: &[T], h: usize, w: usize) -> Vec<T> {
    let (hw, planes) = (h * w, planes_per_task(4 * h * w));
    let fill = |out: &mut [MaybeUninit<T>]| {
        if hw == 0 {
            return; // no elements
        }
        out.par_chunks_mut(planes * 4 * hw)
            .zip(x.par_chunks(planes * hw))
            .for_each(|(out, x)| {
                for (pair, row) in out.chunks_exact_mut(4 * w).zip(x.chunks_exact(w)) {
                    let (top, bottom) = pair.split_at_mut(2 * w);
                    for (dst, &v) in top.chunks_exact_mut(2).zip(row) {
                        dst.fill(MaybeUninit::new(v));
                    }
                    // SAFETY: the `w` pairs of `top` were written just above.
                    bottom.write_copy_of_slice(unsafe { top.assume_init_ref() });
                }
            })
    };
    // SAFETY: each row pair of the output is written whole, from its row of `x`.
    unsafe { uninit_vec(4 * x.len(), fill) }
}

/// `dy: [planes, 2h, 2w]` -> `dx: [planes, h, w]`, each the sum of its 2x2 block, in the order
/// candle's broadcast backward adds them (row by row), so that the two agree exactly.
fn backward<T: WithDType>(dy: &[T], h: usize, w: usize) -> Vec<T> {
    let (hw, planes) = (h * w, planes_per_task(4 * h * w));
    let fill = |dx: &mut [MaybeUninit<T>]| {
        if hw == 0 {
            return; // no elements
        }
        dx.par_chunks_mut(planes * hw)
            .zip(dy.par_chunks(planes * 4 * hw))
            .for_each(|(dx, dy)| {
                for (row, pair) in dx.chunks_exact_mut(w).zip(dy.chunks_exact(4 * w)) {
                    let (top, bottom) = pair.split_at(2 * w);
                    let blocks = top.chunks_exact(2).zip(bottom.chunks_exact(2));
                    for (d, (t, b)) in row.iter_mut().zip(blocks) {
                        d.write(t[0] + t[1] + b[0] + b[1]);
                    }
                }
            })
    };
    // SAFETY: each row of `dx` is written whole, from its row pair of `dy`.
    unsafe { uninit_vec(dy.len() / 4, fill) }
}

/// The upsampling; its backward runs [`Upsample2xGrad`].
struct Upsample2x;

impl Upsample2x {
    fn run<T: WithDType>(x: (&CpuStorage, &Layout), h: usize, w: usize) -> Result<CpuStorage> {
        let x = contiguous::<T>(OP, x, "input")?;
        Ok(T::to_cpu_storage_owned(forward(x, h, w)))
    }
}

impl CustomOp1 for Upsample2x {
    fn name(&self) -> &'static str {
        "unitune-upsample-nearest2x"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, c, h, w) = layout.shape().dims4()?;
        let x = (storage, layout);
        let out = match storage.dtype() {
            DType::F32 => Self::run::<f32>(x, h, w)?,
            DType::F64 => Self::run::<f64>(x, h, w)?,
            dtype => unsupported(OP, dtype)?,
        };
        Ok((out, Shape::from((b, c, 2 * h, 2 * w))))
    }

    fn bwd(&self, _x: &Tensor, _out: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        // The incoming gradient may be strided (a broadcast from a sum, for one).
        dy.contiguous()?.apply_op1_no_bwd(&Upsample2xGrad).map(Some)
    }
}

/// `dy: [b, c, 2h, 2w]` -> the input's gradient `[b, c, h, w]`.
struct Upsample2xGrad;

impl Upsample2xGrad {
    fn run<T: WithDType>(dy: (&CpuStorage, &Layout), h: usize, w: usize) -> Result<CpuStorage> {
        let dy = contiguous::<T>(OP, dy, "output gradient")?;
        Ok(T::to_cpu_storage_owned(backward(dy, h, w)))
    }
}

impl CustomOp1 for Upsample2xGrad {
    fn name(&self) -> &'static str {
        "unitune-upsample-nearest2x-grad"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, c, h2, w2) = layout.shape().dims4()?;
        if h2 % 2 != 0 || w2 % 2 != 0 {
            bail!(
                "{OP} backward: output gradient {:?} of odd size",
                layout.dims()
            )
        }
        let (h, w) = (h2 / 2, w2 / 2);
        let dy = (storage, layout);
        let dx = match storage.dtype() {
            DType::F32 => Self::run::<f32>(dy, h, w)?,
            DType::F64 => Self::run::<f64>(dy, h, w)?,
            dtype => unsupported(OP, dtype)?,
        };
        Ok((dx, Shape::from((b, c, h, w))))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use super::*;
    use crate::testing::{rel_err, sample};

    /// `(b, c, h, w)`: odd sides, a single pixel, and more planes than a rayon task holds.
    const CASES: [(usize, usize, usize, usize); 5] = [
        (2, 3, 4, 5),
        (1, 2, 3, 3),
        (3, 1, 1, 1),
        (2, 5, 7, 2),
        (2, 40, 16, 16),
    ];

    /// The composite ops the UNet used before (and still uses off the CPU kernels).
    fn reference(x: &Tensor) -> Tensor {
        let (b, c, h, w) = x.dims4().expect("4 dims");
        x.reshape((b, c, h, 1, w, 1))
            .and_then(|t| {
                t.broadcast_as((b, c, h, 2, w, 2))?
                    .reshape((b, c, 2 * h, 2 * w))
            })
            .expect("reference")
    }

    /// The output and the gradient of `sum(out ∘ r)` with respect to `x`.
    fn run(f: impl Fn(&Tensor) -> Tensor, x: &Tensor, r: &Tensor) -> [Tensor; 2] {
        let var = Var::from_tensor(x).expect("var");
        let out = f(var.as_tensor());
        let grads = out
            .mul(r)
            .and_then(|t| t.sum_all()?.backward())
            .expect("backward");
        let dx = grads.get(var.as_tensor()).expect("gradient").clone();
        [out, dx]
    }

    fn exactly_equal(a: &Tensor, b: &Tensor) -> bool {
        assert_eq!(a.dims(), b.dims());
        let flat = |t: &Tensor| -> Vec<f64> {
            t.to_dtype(DType::F64)
                .and_then(|t| t.flatten_all()?.to_vec1())
                .expect("values")
        };
        flat(a) == flat(b)
    }

    #[test]
    fn matches_the_broadcast_and_its_gradient_exactly() {
        for (b, c, h, w) in CASES {
            for dtype in [DType::F32, DType::F64] {
                let x = sample(&[b, c, h, w], 1, dtype);
                let r = sample(&[b, c, 2 * h, 2 * w], 2, dtype);
                let ours = run(|x| upsample_nearest2x(x).expect("ours"), &x, &r);
                let theirs = run(reference, &x, &r);
                assert_eq!(ours[0].dtype(), dtype);
                let pairs = ours.iter().zip(&theirs);
                for (name, (a, a_ref)) in ["output", "gradient"].iter().zip(pairs) {
                    assert!(
                        exactly_equal(a, a_ref),
                        "{:?} {dtype:?}: {name} differs",
                        (b, c, h, w)
                    );
                }
            }
        }
    }

    #[test]
    fn gradient_matches_finite_differences() {
        // The loss is linear in x, so central differences are exact up to rounding.
        let eps = 1e-3;
        for (b, c, h, w) in &CASES[..4] {
            let (b, c, h, w) = (*b, *c, *h, *w);
            let x = sample(&[b, c, h, w], 3, DType::F64);
            let r = sample(&[b, c, 2 * h, 2 * w], 4, DType::F64);
            let [_, dx] = run(|x| upsample_nearest2x(x).expect("ours"), &x, &r);
            let base: Vec<f64> = x.flatten_all().and_then(|t| t.to_vec1()).expect("v");
            let loss = |v: Vec<f64>| -> f64 {
                Tensor::from_vec(v, (b, c, h, w), &Device::Cpu)
                    .and_then(|x| upsample_nearest2x(&x)?.mul(&r)?.sum_all()?.to_scalar())
                    .expect("loss")
            };
            let numeric: Vec<f64> = (0..base.len())
                .map(|i| {
                    let at = |delta: f64| {
                        let mut v = base.clone();
                        v[i] += delta;
                        loss(v)
                    };
                    (at(eps) - at(-eps)) / (2.0 * eps)
                })
                .collect();
            let numeric = Tensor::from_vec(numeric, (b, c, h, w), &Device::Cpu).expect("t");
            let err = rel_err(&dx, &numeric);
            assert!(err < 1e-10, "{:?}: off by {err:e}", (b, c, h, w));
        }
    }

    #[test]
    fn takes_strided_inputs_and_gradients() {
        let x = sample(&[2, 3, 5, 4], 5, DType::F32);
        // The same values with height and width swapped twice: a non-contiguous layout.
        let x_t = x
            .transpose(2, 3)
            .and_then(|t| t.contiguous()?.transpose(2, 3))
            .expect("t");
        assert!(!x_t.is_contiguous());
        let out = upsample_nearest2x(&x_t).expect("ours");
        assert!(exactly_equal(&out, &reference(&x)));
        // `sum_all` hands back a broadcast (stride 0) gradient: every input gets 4.
        let var = Var::from_tensor(&x).expect("var");
        let grads = upsample_nearest2x(var.as_tensor())
            .and_then(|t| t.sum_all()?.backward())
            .expect("backward");
        let dx = grads.get(var.as_tensor()).expect("gradient");
        assert!(exactly_equal(
            dx,
            &(x.ones_like().expect("ones") * 4.0).expect("4")
        ));
    }

    #[test]
    fn rejects_bad_arguments_and_takes_empty_ones() {
        let dev = Device::Cpu;
        assert!(upsample_nearest2x(&sample(&[2, 3, 4], 1, DType::F32)).is_err());
        let half = sample(&[1, 1, 2, 2], 1, DType::F32).to_dtype(DType::F16);
        assert!(upsample_nearest2x(&half.expect("f16")).is_err());
        for dims in [(0, 3, 2, 2), (1, 2, 0, 3)] {
            let empty = Tensor::zeros(dims, DType::F32, &dev).expect("zeros");
            let out = upsample_nearest2x(&empty).expect("empty");
            assert_eq!(out.dims(), [dims.0, dims.1, 2 * dims.2, 2 * dims.3]);
        }
    }
}
