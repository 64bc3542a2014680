//! A linear layer, `y = x·Wᵀ + b`, forward and backward, as a candle custom op.
//!
//! candle_nn's `Linear` is a matmul and a broadcast add. Its backward sums the output gradient
//! over every row for the bias with candle's single-threaded strided `sum_keepdim`, and goes
//! through the transposes, broadcasts and reshapes of the composite, some of which copy. Here
//! `x: [.., c]` is a `[rows, c]` matrix and the three passes are one gemm each:
//! - forward: `y[rows, o] = x·Wᵀ`, each output row starting from the bias (no second pass);
//! - input gradient: `dx[rows, c] = dy·W`;
//! - weight gradient: `dW[o, c] = dyᵀ·x`; bias gradient: the columns of `dy` summed, each thread
//!   over its own block of rows, and the blocks then added.
//!
//! As in [`crate::conv`], each gemm is cut into independent tiles of its output that rayon spreads
//! over its threads, each tile a single-threaded gemm: the tiles follow the rows when there are
//! many (training: thousands of tokens), the columns when there are few (the timestep embedding's
//! batch of one or two).

use std::mem::MaybeUninit;

use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor, WithDType,
};
use rayon::prelude::*;

use crate::cpu::{contiguous, uninit_vec, unsupported, zeroed, Arg};
use crate::layer::{self, Layer};
use crate::matmul::{chunks, pieces, zero, Mat, Shared};

/// The name in the errors.
const OP: &str = "linear";

/// `x·weightᵀ + bias` for `x: [.., c]` (any rank from 2), `weight: [o, c]` (PyTorch's layout) and
/// `bias: [o]`, giving `[.., o]` as `candle_nn::Linear`. Differentiable with respect to all three
/// (first order; only tracked inputs get a gradient). CPU tensors of dtype f32 (or f64), any
/// layout (non-contiguous ones are copied first); on another device the op returns candle's "no
/// cuda implementation" error.
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    // Checked here too, so that a bad call fails before any work with a clear message.
    let sizes = Sizes::new(x.dims(), weight.dims())?;
    if let Some(bias) = bias {
        if bias.dims() != [sizes.o] {
            bail!(
                "linear: bias of shape {:?} for {} outputs",
                bias.dims(),
                sizes.o
            )
        }
    }
    layer::apply(LinearOp, x, weight, bias)
}

/// The sizes of one linear layer: `rows` of `c` inputs, `o` outputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Sizes {
    rows: usize,
    c: usize,
    o: usize,
}

impl Sizes {
    /// From the dims of `x: [.., c]` and `weight: [o, c]`.
    fn new(x: &[usize], weight: &[usize]) -> Result<Self> {
        let (&[.., _, c], &[o, c_w]) = (x, weight) else {
            bail!("linear: input {x:?} needs at least 2 dims, weight {weight:?} exactly 2")
        };
        if c != c_w {
            bail!("linear: input {x:?} has {c} features, weight {weight:?} expects {c_w}")
        }
        if c == 0 || o == 0 {
            bail!("linear: empty weight {weight:?}")
        }
        Ok(Self {
            rows: x.iter().product::<usize>() / c,
            c,
            o,
        })
    }

    /// The output's dims: those of `x` with `o` features.
    fn output(&self, x: &[usize]) -> Shape {
        let mut dims = x.to_vec();
        if let Some(last) = dims.last_mut() {
            *last = self.o;
        }
        Shape::from(dims)
    }
}

/// Below this many multiply-adds a gemm runs whole on the calling thread: handing it out would
/// cost more than it saves.
const SMALL_GEMM: usize = 1 << 16;

/// Tiles narrower than this (in rows or columns) waste most of gemm's register blocks.
const MIN_TILE: usize = 16;

/// How many blocks of rows and of columns to cut an `m x n` output into for `pieces` tiles: the
/// split whose tiles repack the least of the operands (each tile packs its rows of `lhs` and its
/// columns of `rhs`), among those whose tiles are not too thin.
fn tiling(m: usize, n: usize, pieces: usize) -> (usize, usize) {
    (1..=pieces)
        .filter(|rb| pieces.is_multiple_of(*rb))
        .map(|rb| (rb, pieces / rb))
        .filter(|&(rb, cb)| {
            (rb == 1 || m.div_ceil(rb) >= MIN_TILE) && (cb == 1 || n.div_ceil(cb) >= MIN_TILE)
        })
        .min_by_key(|&(rb, cb)| cb * m + rb * n)
        .unwrap_or((1, 1))
}

/// `lhs·rhs` (`m x k` by `k x n`) as a row-major `m x n` matrix, each row starting from `bias`
/// (`[n]`) when given; cut into `pieces` tiles run in parallel, single-threaded gemms each.
fn matmul<T: WithDType>(
    (m, n, k): (usize, usize, usize),
    lhs: Mat<'_, T>,
    rhs: Mat<'_, T>,
    bias: Option<&[T]>,
    pieces: usize,
) -> Vec<T> {
    lhs.check(m, k);
    rhs.check(k, n);
    assert!(bias.is_none_or(|b| b.len() == n), "linear: bias length");
    let (rb, cb) = tiling(m, n, if m * n * k < SMALL_GEMM { 1 } else { pieces });
    let (rows_per, cols_per) = (m.div_ceil(rb).max(1), n.div_ceil(cb).max(1));
    let tiles: Vec<_> = chunks(m, rows_per)
        .flat_map(|rows| chunks(n, cols_per).map(move |cols| (rows.clone(), cols)))
        .collect();
    let fill = |out: &mut [MaybeUninit<T>]| {
        let shared = Shared::new(out);
        tiles.into_par_iter().for_each(|(rows, cols)| {
            // Tile (rows, cols) of the `m x n` output, which no other tile touches.
            let offset = rows.start * n + cols.start;
            let rows_of_tile = (0..rows.len()).map(|r| offset + r * n..offset + r * n + cols.len());
            match bias {
                Some(bias) => rows_of_tile.for_each(|row| {
                    // SAFETY: one row of this tile.
                    unsafe { shared.uninit(row) }.write_copy_of_slice(&bias[cols.clone()]);
                }),
                None if k == 0 => rows_of_tile.for_each(|row| {
                    // SAFETY: one row of this tile.
                    zeroed(unsafe { shared.uninit(row) });
                }),
                None => {}
            }
            if k == 0 {
                return;
            }
            let (lhs, rhs) = (lhs.from(rows.start, 0), rhs.from(0, cols.start));
            let mnk = (rows.len(), cols.len(), k);
            // SAFETY: this tile's, initialised above when accumulating onto the bias.
            unsafe { shared.gemm(offset, n, mnk, lhs, rhs, bias.is_some()) }
        });
    };
    // SAFETY: the tiles cover the output, and each writes all of its elements: the gemm, or the
    // bias (`k = 0`), or zeros (neither).
    unsafe { uninit_vec(m * n, fill) }
}

/// `x: [rows, c]`, `w: [o, c]`, `bias: [o]` -> `y: [rows, o] = x·Wᵀ + bias`.
fn forward<T: WithDType>(x: &[T], w: &[T], bias: Option<&[T]>, s: Sizes) -> Vec<T> {
    let (x, w_t) = (Mat::new(x, s.c, 1), Mat::new(w, 1, s.c));
    matmul((s.rows, s.o, s.c), x, w_t, bias, pieces())
}

/// `dy: [rows, o]`, `w: [o, c]` -> `dx: [rows, c] = dy·W`.
fn input_grad<T: WithDType>(dy: &[T], w: &[T], s: Sizes) -> Vec<T> {
    let (dy, w) = (Mat::new(dy, s.o, 1), Mat::new(w, s.c, 1));
    matmul((s.rows, s.c, s.o), dy, w, None, pieces())
}

/// `dy: [rows, o]`, `x: [rows, c]` -> `dW: [o, c] = dyᵀ·x`.
fn weight_grad<T: WithDType>(dy: &[T], x: &[T], s: Sizes) -> Vec<T> {
    let (dy_t, x) = (Mat::new(dy, 1, s.o), Mat::new(x, s.c, 1));
    matmul((s.o, s.c, s.rows), dy_t, x, None, pieces())
}

/// `dy: [rows, o]` summed over its rows -> `[o]`: each piece of work sums a block of rows
/// (contiguous memory, a vectorised add per row), then the blocks' sums are added.
fn bias_grad<T: WithDType>(dy: &[T], o: usize) -> Vec<T> {
    let rows = dy.len() / o;
    let rows_per = rows.div_ceil(pieces()).max(MIN_TILE);
    dy.par_chunks(rows_per * o)
        .map(|block| {
            let mut sums = vec![zero::<T>(); o];
            for row in block.chunks_exact(o) {
                for (s, &v) in sums.iter_mut().zip(row) {
                    *s += v;
                }
            }
            sums
        })
        .reduce(
            || vec![zero(); o],
            |mut a, b| {
                for (a, b) in a.iter_mut().zip(b) {
                    *a += b;
                }
                a
            },
        )
}

/// The linear layer; its backward runs [`InputGrad`], [`WeightGrad`] and [`BiasGrad`], computing
/// only the gradients that some variable depends on.
#[derive(Clone, Copy, Debug)]
struct LinearOp;

impl LinearOp {
    fn run<T: WithDType>(s: Sizes, x: Arg, w: Arg, bias: Option<Arg>) -> Result<CpuStorage> {
        let x = contiguous::<T>(OP, x, "input")?;
        let w = contiguous::<T>(OP, w, "weight")?;
        let bias = bias
            .map(|(st, l)| contiguous::<T>(OP, (st, l), "bias"))
            .transpose()?;
        Ok(T::to_cpu_storage_owned(forward(x, w, bias, s)))
    }
}

impl Layer for LinearOp {
    const NAMES: [&'static str; 2] = ["unitune-linear", "unitune-linear-bias"];

    fn cpu(&self, x: Arg, w: Arg, bias: Option<Arg>) -> Result<(CpuStorage, Shape)> {
        let s = Sizes::new(x.1.dims(), w.1.dims())?;
        let storage = match x.0.dtype() {
            DType::F32 => Self::run::<f32>(s, x, w, bias)?,
            DType::F64 => Self::run::<f64>(s, x, w, bias)?,
            dtype => unsupported(OP, dtype)?,
        };
        Ok((storage, s.output(x.1.dims())))
    }

    fn input_grad(&self, _x: &Tensor, w: &Tensor, dy: &Tensor) -> Result<Tensor> {
        dy.apply_op2_no_bwd(w, &InputGrad)
    }

    fn weight_grad(&self, x: &Tensor, _w: &Tensor, dy: &Tensor) -> Result<Tensor> {
        dy.apply_op2_no_bwd(x, &WeightGrad)
    }

    fn bias_grad(&self, dy: &Tensor) -> Result<Tensor> {
        dy.apply_op1_no_bwd(&BiasGrad)
    }
}

/// Errors unless `dy` has the output shape of the layer of sizes `s` on an input of dims `x`.
fn check_output(s: Sizes, x: &[usize], dy: &Layout) -> Result<()> {
    let expected = s.output(x);
    if dy.shape() != &expected {
        bail!(
            "linear backward: output gradient {:?} for the output shape {:?}",
            dy.dims(),
            expected.dims()
        )
    }
    Ok(())
}

/// `(dy, weight)` -> the input's gradient.
struct InputGrad;

impl InputGrad {
    fn run<T: WithDType>(s: Sizes, dy: Arg, w: Arg) -> Result<CpuStorage> {
        let dy = contiguous::<T>(OP, dy, "output gradient")?;
        let w = contiguous::<T>(OP, w, "weight")?;
        Ok(T::to_cpu_storage_owned(input_grad(dy, w, s)))
    }
}

impl CustomOp2 for InputGrad {
    fn name(&self) -> &'static str {
        "unitune-linear-input-grad"
    }

    fn cpu_fwd(
        &self,
        dys: &CpuStorage,
        dyl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        // The input's dims: those of `dy` with the weight's `c` features.
        let (_, c) = wl.shape().dims2()?;
        let mut x_dims = dyl.dims().to_vec();
        if let Some(last) = x_dims.last_mut() {
            *last = c;
        }
        let s = Sizes::new(&x_dims, wl.dims())?;
        check_output(s, &x_dims, dyl)?;
        let storage = match dys.dtype() {
            DType::F32 => Self::run::<f32>(s, (dys, dyl), (ws, wl))?,
            DType::F64 => Self::run::<f64>(s, (dys, dyl), (ws, wl))?,
            dtype => unsupported(OP, dtype)?,
        };
        Ok((storage, Shape::from(x_dims)))
    }
}

/// `(dy, input)` -> the weight's gradient.
struct WeightGrad;

impl WeightGrad {
    fn run<T: WithDType>(s: Sizes, dy: Arg, x: Arg) -> Result<CpuStorage> {
        let dy = contiguous::<T>(OP, dy, "output gradient")?;
        let x = contiguous::<T>(OP, x, "input")?;
        Ok(T::to_cpu_storage_owned(weight_grad(dy, x, s)))
    }
}

impl CustomOp2 for WeightGrad {
    fn name(&self) -> &'static str {
        "unitune-linear-weight-grad"
    }

    fn cpu_fwd(
        &self,
        dys: &CpuStorage,
        dyl: &Layout,
        xs: &CpuStorage,
        xl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (Some(&o), Some(&c)) = (dyl.dims().last(), xl.dims().last()) else {
            bail!("linear backward: scalar output gradient or input")
        };
        let s = Sizes::new(xl.dims(), &[o, c])?;
        check_output(s, xl.dims(), dyl)?;
        let storage = match dys.dtype() {
            DType::F32 => Self::run::<f32>(s, (dys, dyl), (xs, xl))?,
            DType::F64 => Self::run::<f64>(s, (dys, dyl), (xs, xl))?,
            dtype => unsupported(OP, dtype)?,
        };
        Ok((storage, Shape::from((s.o, s.c))))
    }
}

/// `dy` -> the bias's gradient, `dy` summed over all but its last dimension.
struct BiasGrad;

impl BiasGrad {
    fn run<T: WithDType>(dy: Arg, o: usize) -> Result<CpuStorage> {
        let dy = contiguous::<T>(OP, dy, "output gradient")?;
        Ok(T::to_cpu_storage_owned(bias_grad(dy, o)))
    }
}

impl CustomOp1 for BiasGrad {
    fn name(&self) -> &'static str {
        "unitune-linear-bias-grad"
    }

    fn cpu_fwd(&self, dys: &CpuStorage, dyl: &Layout) -> Result<(CpuStorage, Shape)> {
        let o = match dyl.dims() {
            &[.., o] if o > 0 => o,
            dims => bail!("linear backward: output gradient of shape {dims:?}"),
        };
        let storage = match dys.dtype() {
            DType::F32 => Self::run::<f32>((dys, dyl), o)?,
            DType::F64 => Self::run::<f64>((dys, dyl), o)?,
            dtype => unsupported(OP, dtype)?,
        };
        Ok((storage, Shape::from(o)))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor, Var};

    use super::*;
    use crate::testing::{rel_err, sample, values};

    /// A layer to test: the input's dims (features last) and the output features.
    type Case = (&'static [usize], usize);

    const CASES: [Case; 5] = [
        (&[2, 5, 7], 6),    // [b, n, c] tokens, as in the UNet's transformers
        (&[9, 4], 3),       // a plain batch of vectors
        (&[2, 3, 4, 6], 5), // rank 4
        (&[3, 40, 24], 48), // large enough to run in parallel tiles
        (&[2, 33], 70),     // few rows, more outputs than inputs (timestep embedding)
    ];

    /// The inputs of a case: `x`, `weight`, `bias` and a weighting `r` of the output for the loss.
    fn inputs((x_dims, o): Case, dtype: DType) -> [Tensor; 4] {
        let c = x_dims[x_dims.len() - 1];
        let mut out_dims = x_dims.to_vec();
        out_dims[x_dims.len() - 1] = o;
        [
            sample(x_dims, 1, dtype),
            sample(&[o, c], 2, dtype),
            sample(&[o], 3, dtype),
            sample(&out_dims, 4, dtype),
        ]
    }

    /// candle's matmul plus bias, as `candle_nn::Linear` computes it.
    fn reference(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Tensor {
        let y = x.broadcast_matmul(&w.t().expect("t")).expect("matmul");
        match b {
            Some(b) => y.broadcast_add(b).expect("add"),
            None => y,
        }
    }

    #[test]
    fn forward_matches_candle() {
        let mut worst = 0.0f64;
        for case in CASES {
            let [x, w, b, _] = inputs(case, DType::F32);
            for bias in [Some(&b), None] {
                let got = linear(&x, &w, bias).expect("linear");
                let err = rel_err(&got, &reference(&x, &w, bias));
                assert!(
                    err < 1e-6,
                    "{case:?}, bias {}: off by {err:e}",
                    bias.is_some()
                );
                worst = worst.max(err);
            }
        }
        eprintln!("worst relative forward error against candle: {worst:e}");
    }

    #[test]
    fn forward_takes_strided_inputs_and_f64() {
        let [x, w, b, _] = inputs(CASES[0], DType::F64);
        // The same values stored with the first two dims swapped: a non-contiguous layout.
        let x_t = x
            .transpose(0, 1)
            .and_then(|t| t.contiguous()?.transpose(0, 1))
            .expect("t");
        assert!(!x_t.is_contiguous());
        // A transposed weight too: [c, o] stored, [o, c] seen.
        let w_t = w.t().and_then(|t| t.contiguous()?.t()).expect("t");
        let got = linear(&x_t, &w_t, Some(&b)).expect("linear");
        assert_eq!(got.dtype(), DType::F64);
        assert!(rel_err(&got, &reference(&x, &w, Some(&b))) < 1e-14);
    }

    #[test]
    fn rejects_bad_shapes_and_dtypes() {
        let [x, w, b, _] = inputs(CASES[0], DType::F32);
        assert!(linear(&x, &sample(&[6, 8], 5, DType::F32), None).is_err());
        assert!(linear(&x, &w, Some(&sample(&[5], 6, DType::F32))).is_err());
        assert!(linear(&sample(&[7], 7, DType::F32), &w, None).is_err());
        assert!(linear(&x, &w.unsqueeze(0).expect("u"), None).is_err());
        let half = |t: &Tensor| t.to_dtype(DType::F16).expect("f16");
        assert!(linear(&half(&x), &half(&w), None).is_err());
        assert!(linear(&x, &w, Some(&b.to_dtype(DType::F64).expect("f64"))).is_err());
    }

    /// The gradients of `sum(linear(x, w, b) ∘ r)` with respect to `x`, `w` and (when `with_bias`)
    /// `b`.
    fn grads(
        f: impl Fn(&Tensor, &Tensor, Option<&Tensor>) -> Tensor,
        [x, w, b, r]: &[Tensor; 4],
        with_bias: bool,
    ) -> Vec<Tensor> {
        let vars = [x, w, b].map(|t| Var::from_tensor(t).expect("var"));
        let bias = with_bias.then(|| vars[2].as_tensor());
        let out = f(vars[0].as_tensor(), vars[1].as_tensor(), bias);
        let loss = out.mul(r).and_then(|t| t.sum_all()).expect("loss");
        let store = loss.backward().expect("backward");
        let n = if with_bias { 3 } else { 2 };
        vars[..n]
            .iter()
            .map(|v| store.get(v.as_tensor()).expect("gradient").clone())
            .collect()
    }

    fn ours(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Tensor {
        linear(x, w, b).expect("linear")
    }

    #[test]
    fn gradients_match_candle() {
        let mut worst = 0.0f64;
        for (case, with_bias) in CASES.iter().flat_map(|&c| [(c, true), (c, false)]) {
            let inputs = inputs(case, DType::F32);
            let got = grads(ours, &inputs, with_bias);
            let expected = grads(reference, &inputs, with_bias);
            for (name, (a, b)) in ["x", "weight", "bias"]
                .iter()
                .zip(got.iter().zip(&expected))
            {
                let err = rel_err(a, b);
                assert!(err < 1e-5, "{case:?}: gradient of {name} off by {err:e}");
                worst = worst.max(err);
            }
        }
        eprintln!("worst relative gradient error against candle: {worst:e}");
    }

    #[test]
    fn gradients_match_finite_differences() {
        // The loss is linear in each input, so central differences are exact up to rounding.
        let eps = 1e-3;
        let mut worst = 0.0f64;
        for case in &CASES[..3] {
            let inputs = inputs(*case, DType::F64);
            let got = grads(ours, &inputs, true);
            for (arg, grad) in got.iter().enumerate() {
                let base: Vec<f64> = inputs[arg]
                    .flatten_all()
                    .and_then(|t| t.to_vec1())
                    .expect("v");
                let numeric: Vec<f64> = (0..base.len())
                    .map(|i| {
                        let at = |delta: f64| {
                            let mut v = base.clone();
                            v[i] += delta;
                            let mut args = inputs.clone();
                            args[arg] = Tensor::from_vec(v, inputs[arg].dims(), &Device::Cpu)
                                .expect("perturbed");
                            let [x, w, b, r] = &args;
                            linear(x, w, Some(b))
                                .and_then(|y| y.mul(r)?.sum_all()?.to_scalar::<f64>())
                                .expect("loss")
                        };
                        (at(eps) - at(-eps)) / (2.0 * eps)
                    })
                    .collect();
                let numeric = Tensor::from_vec(numeric, grad.dims(), &Device::Cpu).expect("t");
                let err = rel_err(grad, &numeric);
                assert!(
                    err < 1e-10,
                    "{case:?}: gradient of argument {arg} off by {err:e}"
                );
                worst = worst.max(err);
            }
        }
        eprintln!("worst relative gradient error against finite differences: {worst:e}");
    }

    #[test]
    fn strided_output_gradient_and_frozen_inputs() {
        let [x, w, b, _] = inputs(CASES[0], DType::F32);
        let (x_var, w_var, b_var) = (
            Var::from_tensor(&x).expect("v"),
            Var::from_tensor(&w).expect("v"),
            Var::from_tensor(&b).expect("v"),
        );
        // `sum_all` hands back a broadcast (stride 0) gradient; x is a variable, w and b constants.
        let out = linear(x_var.as_tensor(), &w, Some(&b)).expect("linear");
        let store = out.sum_all().and_then(|l| l.backward()).expect("backward");
        assert!(store.get(&w).is_none() && store.get(&b).is_none());
        let dx = store.get(x_var.as_tensor()).expect("dx");
        let ones = out.ones_like().expect("ones");
        let expected = grads(reference, &[x.clone(), w.clone(), b.clone(), ones], true);
        assert!(rel_err(dx, &expected[0]) < 1e-5);
        // Frozen input, trainable weight and bias: no input gradient.
        let x_frozen = x_var.as_tensor().detach();
        let out = linear(&x_frozen, w_var.as_tensor(), Some(b_var.as_tensor()));
        let store = out.and_then(|o| o.sum_all()?.backward()).expect("backward");
        assert!(store.get(w_var.as_tensor()).is_some());
        assert_eq!(store.get_ids().count(), 2);
        // Only the bias trainable: its gradient is the row count, 2 * 5.
        let out = linear(&x_frozen, &w, Some(b_var.as_tensor()));
        let store = out.and_then(|o| o.sum_all()?.backward()).expect("backward");
        assert_eq!(store.get_ids().count(), 1);
        let db: Vec<f32> = store
            .get(b_var.as_tensor())
            .expect("db")
            .to_vec1()
            .expect("v");
        assert_eq!(db, vec![10.0; 6]);
    }

    /// `lhs·rhs (+ bias)` by the definition, in f64.
    fn naive(m: usize, n: usize, k: usize, lhs: &[f64], rhs: &[f64], bias: &[f64]) -> Vec<f64> {
        (0..m * n)
            .map(|i| {
                let (r, c) = (i / n, i % n);
                bias[c] + (0..k).map(|j| lhs[r * k + j] * rhs[j * n + c]).sum::<f64>()
            })
            .collect()
    }

    #[test]
    fn tiles_cover_the_output() {
        // Above `SMALL_GEMM`: cut into row blocks, column blocks or both, evenly or not.
        for (m, n, k) in [(200, 20, 40), (2, 300, 120), (64, 70, 33), (37, 1000, 9)] {
            assert!(m * n * k >= SMALL_GEMM);
            let (lhs, rhs, bias) = (values(m * k, 1), values(k * n, 2), values(n, 3));
            let expected = naive(m, n, k, &lhs, &rhs, &bias);
            let (lhs, rhs) = (Mat::new(&lhs[..], k, 1), Mat::new(&rhs[..], n, 1));
            for pieces in [1, 2, 3, 4, 6, 8, 16] {
                let got = matmul((m, n, k), lhs, rhs, Some(&bias), pieces);
                let diff = got
                    .iter()
                    .zip(&expected)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0, f64::max);
                assert!(
                    diff < 1e-12,
                    "{m}x{n}x{k} in {pieces} pieces: off by {diff:e}"
                );
            }
        }
        // The splits chosen at the UNet's sizes on 2 threads: rows for tokens, columns for the
        // timestep embedding, both for a square weight gradient.
        assert_eq!(tiling(4096, 128, 4), (4, 1));
        assert_eq!(tiling(2, 1280, 4), (1, 4));
        assert_eq!(tiling(128, 128, 4), (2, 2));
        assert_eq!(tiling(3, 5, 4), (1, 1));
    }
}
