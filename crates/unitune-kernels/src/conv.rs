//! 2D convolution as gemm, forward and backward, as a candle custom op.
//!
//! candle 0.11's CPU conv2d repacks the input to NHWC and builds its column matrix in serial
//! scalar loops around the gemm; its backward runs the input gradient as `conv_transpose2d` (a
//! dot product per pixel, no gemm) and the weight gradient as one small gemm per input channel
//! (a gemv for 1x1 kernels). Here all three passes are large gemms on the column matrix
//! `col[K, P]` of an image, with `K = C·kh·kw` rows (input channel, kernel row, kernel column) and
//! `P = OH·OW` columns (output pixels):
//! - forward: `out[O, P] = W[O, K]·col` (+ bias) per image, written straight into the NCHW output;
//! - input gradient: `dcol = Wᵀ·dy[O, P]`, added back onto the input pixels it came from (col2im);
//! - weight gradient: `dW[O, K] = dy·colᵀ`; bias gradient: `dy` summed per channel.
//!
//! The bias may differ per image (`[N, O]`): a resnet's time embedding, added to its first
//! convolution's output, then costs no pass over the output of its own, forward or backward.
//!
//! The two gradients put the images side by side (`P` becomes `N·P` columns), so that small
//! images still make large gemms. A 1x1 convolution without stride or padding has `col = x`: its
//! forward and input gradient need no column matrix at all.
//!
//! The work is cut into independent pieces (an image's block of output rows forward, a block of
//! input channels backward) that rayon spreads over its threads, each piece running a
//! single-threaded gemm: threads never wait on a nested parallel gemm, and batches smaller than
//! the thread count still use every thread. Column matrices live in per-thread scratch buffers
//! reused across calls, so that a training step does not fault in fresh pages for them.
//!
//! With the `cudnn` feature the same op, and the same gradient ops, run on CUDA tensors through
//! cuDNN ([`cuda_supports`]; `conv/cudnn.rs`): the backward then never reaches candle's CUDA
//! conv2d backward (a generic transposed-convolution kernel for the input gradient, a convolution
//! of transposed copies for the weight's).

use std::cell::RefCell;
use std::mem::MaybeUninit;
use std::ops::Range;

use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor, WithDType,
};
use rayon::prelude::*;

use crate::cpu::{contiguous, uninit_vec, unsupported, zeroed, Arg};
use crate::layer::{self, Layer};
use crate::matmul::{chunks, gemm_into, gemm_uninit, pieces, zero, Mat, Shared};
#[cfg(feature = "cudnn")]
mod cudnn;
#[cfg(feature = "cudnn")]
use candle_core::CudaStorage;
#[cfg(feature = "cudnn")]
pub(crate) use cudnn::CudaArg;

/// The name in the errors.
const OP: &str = "conv2d";

/// The most elements of a column matrix one piece of work builds at a time (16 MB in f32): it
/// bounds the scratch memory at large image sizes (a VAE at 512 px) and is far above what the
/// training sizes need, whose gemms therefore stay whole.
const SCRATCH_LIMIT: usize = 1 << 22;

/// `conv2d(x, weight) + bias` for `x: [n, c, h, w]`, `weight: [o, c, kh, kw]`, with the same
/// zero `padding` on every side and the same `stride` in both directions (groups 1, dilation 1),
/// giving `[n, o, oh, ow]` as `Tensor::conv2d`. The bias is `[o]`, or `[n, o]` for a bias per
/// image (added over each image's pixels as `bias[:, :, None, None]`). Differentiable with
/// respect to all three inputs (first order). CPU tensors of dtype f32 (or f64), or with the
/// `cudnn` feature CUDA tensors that [`cuda_supports`]; any layout (non-contiguous ones are copied
/// first). Elsewhere the op returns candle's "no cuda implementation" error or a dtype error.
pub fn conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    padding: usize,
    stride: usize,
) -> Result<Tensor> {
    // Checked here too, so that a bad call fails before any work with a clear message.
    let g = Geometry::new(x.dims(), weight.dims(), padding, stride)?;
    let per_image_bias = match bias.map(Tensor::dims) {
        None => false,
        Some(&[o]) if o == g.o => false,
        Some(&[n, o]) if n == g.n && o == g.o => true,
        Some(dims) => bail!(
            "conv2d: bias of shape {dims:?}, expected [{o}] or, per image, [{n}, {o}]",
            o = g.o,
            n = g.n
        ),
    };
    let op = Conv2dOp {
        padding,
        stride,
        per_image_bias,
    };
    layer::apply(op, x, weight, bias)
}

/// Whether [`conv2d`] runs `conv2d(x, weight) + bias` on the GPU: with the `cudnn` feature, f32,
/// f16 or bf16 tensors of one dtype on one CUDA device, of valid shapes, each under cuDNN's 2³¹
/// elements. Always false without the feature.
pub fn cuda_supports(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    padding: usize,
    stride: usize,
) -> bool {
    #[cfg(feature = "cudnn")]
    {
        let tensors = std::iter::once(weight).chain(bias);
        let same = tensors
            .into_iter()
            .all(|t| t.device().same_device(x.device()) && t.dtype() == x.dtype());
        x.device().is_cuda()
            && same
            && matches!(x.dtype(), DType::F32 | DType::F16 | DType::BF16)
            && Geometry::new(x.dims(), weight.dims(), padding, stride).is_ok_and(|g| g.fits_cudnn())
    }
    #[cfg(not(feature = "cudnn"))]
    {
        let _ = (x, weight, bias, padding, stride);
        false
    }
}

/// The element types the kernels run on, each with its own per-thread scratch buffer.
trait Element: WithDType {
    /// Runs `f` on this thread's scratch buffer of at least `len` elements (contents unspecified).
    /// Not re-entrant: `f` must not call it again, which holds as no piece of work nests another.
    fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [Self]) -> R) -> R;
}

macro_rules! element {
    ($t:ty) => {
        impl Element for $t {
            fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [Self]) -> R) -> R {
                thread_local! {
                    static SCRATCH: RefCell<Vec<$t>> = const { RefCell::new(Vec::new()) };
                }
                SCRATCH.with(|scratch| {
                    let mut scratch = scratch.borrow_mut();
                    if scratch.len() < len {
                        scratch.resize(len, 0.0);
                    }
                    f(&mut scratch[..len])
                })
            }
        }
    };
}
element!(f32);
element!(f64);

/// The sizes of one convolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Geometry {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    o: usize,
    kh: usize,
    kw: usize,
    oh: usize,
    ow: usize,
    padding: usize,
    stride: usize,
    /// [`SCRATCH_LIMIT`], lowered by tests to reach the chunked paths at small sizes.
    scratch_limit: usize,
}

impl Geometry {
    /// From the dims of `x: [n, c, h, w]` and `weight: [o, c, kh, kw]`.
    fn new(x: &[usize], weight: &[usize], padding: usize, stride: usize) -> Result<Self> {
        let (&[n, c, h, w], &[o, c_w, kh, kw]) = (x, weight) else {
            bail!("conv2d: input {x:?} and weight {weight:?} must both have 4 dims")
        };
        if c != c_w {
            bail!("conv2d: input {x:?} has {c} channels, weight {weight:?} expects {c_w}")
        }
        if stride == 0 || [n, c, o, kh, kw].contains(&0) {
            bail!("conv2d: empty input {x:?}, weight {weight:?} or zero stride")
        }
        if h + 2 * padding < kh || w + 2 * padding < kw {
            bail!("conv2d: input {x:?} padded by {padding} is smaller than the kernel {weight:?}")
        }
        Ok(Self {
            n,
            c,
            h,
            w,
            o,
            kh,
            kw,
            oh: (h + 2 * padding - kh) / stride + 1,
            ow: (w + 2 * padding - kw) / stride + 1,
            padding,
            stride,
            scratch_limit: SCRATCH_LIMIT,
        })
    }

    /// Rows of the column matrix.
    fn k(&self) -> usize {
        self.c * self.kh * self.kw
    }

    /// Output pixels of one image, the columns of the column matrix.
    fn p(&self) -> usize {
        self.oh * self.ow
    }

    /// Input pixels of one image.
    fn hw(&self) -> usize {
        self.h * self.w
    }

    /// 1x1, stride 1, no padding: the input of an image is its own column matrix.
    fn pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == 1 && self.padding == 0
    }

    /// The output positions (along a side of `out_len` outputs and `in_len` inputs) whose window
    /// puts kernel offset `offset` inside the input: `0 <= pos·stride + offset - padding < in_len`.
    fn inside(&self, offset: usize, in_len: usize, out_len: usize) -> Range<usize> {
        let s = self.stride;
        let lo = self.padding.saturating_sub(offset).div_ceil(s);
        let hi = if in_len + self.padding > offset {
            ((in_len + self.padding - offset - 1) / s + 1).min(out_len)
        } else {
            0
        };
        lo..hi.max(lo)
    }

    /// Whether input, weight and output each have fewer than 2³¹ elements, the most cuDNN's
    /// legacy convolution API takes (an SD VAE decoder reaches it at 4096 x 4096 pixels).
    #[cfg(any(test, feature = "cudnn"))]
    fn fits_cudnn(&self) -> bool {
        let limit = i32::MAX as usize;
        let sizes = [
            [self.n, self.c, self.h, self.w],
            [self.o, self.c, self.kh, self.kw],
            [self.n, self.o, self.oh, self.ow],
        ];
        sizes.iter().all(|dims| {
            dims.iter()
                .try_fold(1usize, |acc, &d| acc.checked_mul(d))
                .is_some_and(|len| len <= limit)
        })
    }

    /// How many output rows fit in the scratch buffer when each takes `rows_of_k` rows of the
    /// column matrix (at least one).
    fn rows_fitting(&self, rows_of_k: usize) -> usize {
        (self.scratch_limit / (rows_of_k * self.ow)).max(1)
    }
}

/// Writes the column matrix of input channels `chans` and output rows `rows` of `x: [n, c, h, w]`,
/// counting the rows of all images in a row (image `b`'s row `r` is `b·oh + r`):
/// `col[((c - chans.start)·kh + i)·kw + j, (b·oh + r - rows.start)·ow + q]` is
/// `x[b, c, r·stride + i - padding, q·stride + j - padding]`, or 0 in the padding.
fn im2col<T: WithDType>(
    x: &[T],
    g: &Geometry,
    chans: Range<usize>,
    rows: Range<usize>,
    col: &mut [T],
) {
    let taps = chans.flat_map(|c| (0..g.kh).flat_map(move |i| (0..g.kw).map(move |j| (c, i, j))));
    for ((c, i, j), col_row) in taps.zip(col.chunks_exact_mut(rows.len() * g.ow)) {
        let (rows_in, cols_in) = (g.inside(i, g.h, g.oh), g.inside(j, g.w, g.ow));
        for (row, seg) in rows.clone().zip(col_row.chunks_exact_mut(g.ow)) {
            let (b, r) = (row / g.oh, row % g.oh);
            if !rows_in.contains(&r) || cols_in.is_empty() {
                seg.fill(zero());
                continue;
            }
            let plane = &x[(b * g.c + c) * g.hw()..][..g.hw()];
            let src = &plane[(r * g.stride + i - g.padding) * g.w..][..g.w];
            let src = &src[cols_in.start * g.stride + j - g.padding..];
            seg[..cols_in.start].fill(zero());
            seg[cols_in.end..].fill(zero());
            let seg = &mut seg[cols_in.clone()];
            if g.stride == 1 {
                seg.copy_from_slice(&src[..seg.len()]);
            } else {
                for (d, &s) in seg.iter_mut().zip(src.iter().step_by(g.stride)) {
                    *d = s;
                }
            }
        }
    }
}

/// The reverse of [`im2col`] for one image: adds each element of `dcol` (laid out as `im2col`
/// writes it for the channels of `dx: [n_chans, h, w]` and output rows `rows` of this image, but
/// with row stride `dcol_rs`) onto the input pixel it was read from.
fn col2im<T: WithDType>(
    dcol: &[T],
    dcol_rs: usize,
    g: &Geometry,
    rows: Range<usize>,
    dx: &mut [T],
) {
    let n_chans = dx.len() / g.hw();
    let taps =
        (0..n_chans).flat_map(|c| (0..g.kh).flat_map(move |i| (0..g.kw).map(move |j| (c, i, j))));
    for (t, (c, i, j)) in taps.enumerate() {
        let col_row = &dcol[t * dcol_rs..][..rows.len() * g.ow];
        let plane = &mut dx[c * g.hw()..][..g.hw()];
        let (rows_in, cols_in) = (g.inside(i, g.h, g.oh), g.inside(j, g.w, g.ow));
        if cols_in.is_empty() {
            continue;
        }
        for (r, seg) in rows.clone().zip(col_row.chunks_exact(g.ow)) {
            if !rows_in.contains(&r) {
                continue;
            }
            let dst = &mut plane[(r * g.stride + i - g.padding) * g.w..][..g.w];
            let dst = &mut dst[cols_in.start * g.stride + j - g.padding..];
            let seg = &seg[cols_in.clone()];
            if g.stride == 1 {
                for (d, &s) in dst.iter_mut().zip(seg) {
                    *d += s;
                }
            } else {
                for (d, &s) in dst.iter_mut().step_by(g.stride).zip(seg) {
                    *d += s;
                }
            }
        }
    }
}

/// `x: [n, c, h, w]`, `w: [o, k]`, `bias: [o]` or `[n, o]` (told apart by its length) ->
/// `[n, o, oh, ow]`; one piece of work per block of output rows of an image.
fn forward<T: Element>(x: &[T], w: &[T], bias: Option<&[T]>, g: &Geometry) -> Vec<T> {
    let (k, p) = (g.k(), g.p());
    let rows_per_piece = g.oh.div_ceil(pieces().div_ceil(g.n)).min(g.rows_fitting(k));
    let work: Vec<_> = (0..g.n)
        .flat_map(|i| chunks(g.oh, rows_per_piece).map(move |rows| (i, rows)))
        .collect();
    let weight = Mat::new(w, k, 1);
    let fill = |out: &mut [MaybeUninit<T>]| {
        let shared = Shared::new(out);
        work.into_par_iter().for_each(|(i, rows)| {
            let cols = rows.start * g.ow..rows.end * g.ow;
            // The piece's output: columns `cols` of the [o, p] matrix of image i.
            let offset = i * g.o * p + cols.start;
            if let Some(bias) = bias {
                // The gemm adds onto the bias: a bias per image costs nothing more than a shared
                // one.
                let bias = if bias.len() == g.o {
                    bias
                } else {
                    &bias[i * g.o..][..g.o]
                };
                for (c, &b) in bias.iter().enumerate() {
                    let start = offset + c * p;
                    // SAFETY: within this piece's output, which no other piece touches.
                    unsafe { shared.uninit(start..start + cols.len()) }.fill(MaybeUninit::new(b));
                }
            }
            let mnk = (g.o, cols.len(), k);
            // SAFETY (both): this piece's output, which no other piece touches, initialised above
            // when accumulating onto the bias.
            if g.pointwise() {
                let x_i = Mat::new(&x[i * g.c * p + cols.start..], p, 1);
                unsafe { shared.gemm(offset, p, mnk, weight, x_i, bias.is_some()) }
            } else {
                T::with_scratch(k * cols.len(), |col| {
                    im2col(
                        x,
                        g,
                        0..g.c,
                        i * g.oh + rows.start..i * g.oh + rows.end,
                        col,
                    );
                    let col = Mat::new(col, cols.len(), 1);
                    unsafe { shared.gemm(offset, p, mnk, weight, col, bias.is_some()) }
                })
            }
        });
    };
    // SAFETY: the pieces cover the output (every image's rows), each writing all of its elements
    // in its gemm.
    unsafe { uninit_vec(g.n * g.o * p, fill) }
}

/// `dy: [n, o, oh, ow]`, `w: [o, k]` -> `dx: [n, c, h, w]`; one piece of work per block of input
/// channels (their gradients depend on no other channel). The images go side by side into one
/// gemm (`dcol = Wᵀ·dy` with `n·p` columns), so that `Wᵀ` is packed once rather than per image
/// (a third of the time at 8x8). A 1x1 convolution, whose gemm writes `dx` directly, runs one
/// piece per image and block of channels instead (measured faster).
fn input_grad<T: Element>(dy: &[T], w: &[T], g: &Geometry) -> Vec<T> {
    let (k, kk, np) = (g.k(), g.kh * g.kw, g.n * g.p());
    let len = g.n * g.c * g.hw();
    if g.pointwise() {
        // SAFETY: `pointwise_input_grad` writes all of `dx`.
        return unsafe { uninit_vec(len, |dx| pointwise_input_grad(dy, w, g, dx)) };
    }
    let dy_side = side_by_side(dy, g);
    let dy_side = dy_side.as_deref().unwrap_or(dy);
    let work: Vec<_> = chunks(g.c, g.c.div_ceil(pieces())).collect();
    let fill = |dx: &mut [MaybeUninit<T>]| {
        let shared = Shared::new(dx);
        work.into_par_iter().for_each(|chans| {
            // The rows of Wᵀ [k, o] for these channels.
            let w_t = Mat::new(&w[chans.start * kk..], 1, k);
            let rows_of_k = chans.len() * kk;
            for rows in chunks(g.n * g.oh, g.rows_fitting(rows_of_k)) {
                let cols = rows.start * g.ow..rows.end * g.ow;
                T::with_scratch(rows_of_k * cols.len(), |dcol| {
                    let dy_cols = Mat::new(&dy_side[cols.start..], np, 1);
                    let mnk = (rows_of_k, cols.len(), g.o);
                    gemm_into(dcol, cols.len(), mnk, w_t, dy_cols, false, T::from_f64(1.0));
                    // Back onto each image the block of rows covers.
                    for i in rows.start / g.oh..rows.end.div_ceil(g.oh) {
                        let start = (i * g.c + chans.start) * g.hw();
                        let part = start..start + chans.len() * g.hw();
                        let local = rows.start.max(i * g.oh)..rows.end.min((i + 1) * g.oh);
                        // SAFETY (both): channels `chans` of every image belong to this piece
                        // alone; zeroed by the block of the image's first row (blocks run in
                        // order), so written before any later block adds into them.
                        let dx_i = if local.start == i * g.oh {
                            zeroed(unsafe { shared.uninit(part) })
                        } else {
                            unsafe { shared.slice(part) }
                        };
                        let dcol_i = &dcol[(local.start - rows.start) * g.ow..];
                        let local = local.start - i * g.oh..local.end - i * g.oh;
                        col2im(dcol_i, cols.len(), g, local, dx_i);
                    }
                });
            }
        });
    };
    // SAFETY: the pieces cover the channels of every image, and the blocks of rows of a piece
    // cover every image's rows (`oh >= 1`), so that each image's part is zeroed once, before the
    // blocks add into it.
    unsafe { uninit_vec(len, fill) }
}

/// [`input_grad`] of a 1x1 convolution without stride or padding: `dx = Wᵀ·dy` for each image,
/// writing all of `dx`.
fn pointwise_input_grad<T: Element>(dy: &[T], w: &[T], g: &Geometry, dx: &mut [MaybeUninit<T>]) {
    let p = g.p();
    let chans_per_piece = g.c.div_ceil(pieces().div_ceil(g.n));
    let work: Vec<_> = dx
        .chunks_mut(g.c * p)
        .enumerate()
        .flat_map(|(i, dx_i)| {
            let parts = dx_i.chunks_mut(chans_per_piece * p).enumerate();
            parts.map(move |(j, part)| (i, j * chans_per_piece, part))
        })
        .collect();
    work.into_par_iter().for_each(|(i, first_chan, dx_part)| {
        // The rows of Wᵀ [c, o] for these channels.
        let w_t = Mat::new(&w[first_chan..], 1, g.c);
        let dy_i = Mat::new(&dy[i * g.o * p..], p, 1);
        let mnk = (dx_part.len() / p, p, g.o);
        gemm_uninit(dx_part, p, mnk, w_t, dy_i, T::from_f64(1.0));
    });
}

/// `dy: [n, o, p]` as `[o, n·p]` (the images side by side), or `None` for a single image, which
/// is that already.
fn side_by_side<T: WithDType>(dy: &[T], g: &Geometry) -> Option<Vec<T>> {
    if g.n == 1 {
        return None;
    }
    let (p, np) = (g.p(), g.n * g.p());
    let fill = |side: &mut [MaybeUninit<T>]| {
        side.par_chunks_mut(np).enumerate().for_each(|(c, row)| {
            for (i, dst) in row.chunks_exact_mut(p).enumerate() {
                dst.write_copy_of_slice(&dy[(i * g.o + c) * p..][..p]);
            }
        })
    };
    // SAFETY: the `o` rows of `n·p` are each written whole, image by image.
    Some(unsafe { uninit_vec(g.o * np, fill) })
}

/// `dy: [n, o, oh, ow]`, `x: [n, c, h, w]` -> `dW: [o, k]`; one piece of work per block of input
/// channels. The images go side by side into one gemm (`dW = dy·colᵀ` with `n·p` columns), which
/// then sums over them: at 8x8 a gemm per image would spend its time reading and writing `dW`.
/// For the same reason a 1x1 convolution copies its input into a column matrix here too.
fn weight_grad<T: Element>(dy: &[T], x: &[T], g: &Geometry) -> Vec<T> {
    let (k, kk, np) = (g.k(), g.kh * g.kw, g.n * g.p());
    let dy_side = side_by_side(dy, g);
    let dy_side = dy_side.as_deref().unwrap_or(dy);
    let work: Vec<_> = chunks(g.c, g.c.div_ceil(pieces())).collect();
    let fill = |dw: &mut [MaybeUninit<T>]| {
        let shared = Shared::new(dw);
        work.into_par_iter().for_each(|chans| {
            let rows_of_k = chans.len() * kk;
            let mut accumulate = false;
            for rows in chunks(g.n * g.oh, g.rows_fitting(rows_of_k)) {
                let cols = rows.start * g.ow..rows.end * g.ow;
                T::with_scratch(rows_of_k * cols.len(), |col| {
                    im2col(x, g, chans.clone(), rows, col);
                    let dy_cols = Mat::new(&dy_side[cols.start..], np, 1);
                    let col_t = Mat::new(col, 1, cols.len());
                    let mnk = (g.o, rows_of_k, cols.len());
                    // SAFETY: the piece's output, columns `chans.start·kk..` of the [o, k] matrix,
                    // which no other piece touches; the first block of rows writes it, the others
                    // add into it.
                    unsafe { shared.gemm(chans.start * kk, k, mnk, dy_cols, col_t, accumulate) };
                });
                accumulate = true;
            }
        });
    };
    // SAFETY: the pieces cover the channels, and each writes its columns of every output row in
    // the gemm of its first block of rows (there is one: `n·oh >= 1`).
    unsafe { uninit_vec(g.o * k, fill) }
}

/// `dy: [n, o, p]` summed over images and pixels -> `[o]`, or over pixels only -> `[n, o]` for
/// a bias per image.
fn bias_grad<T: WithDType>(dy: &[T], n: usize, o: usize, p: usize, per_image: bool) -> Vec<T> {
    if per_image {
        return dy.par_chunks(p).map(sum).collect();
    }
    (0..o)
        .into_par_iter()
        .map(|c| {
            (0..n)
                .map(|i| sum(&dy[(i * o + c) * p..][..p]))
                .fold(zero(), |a, b| a + b)
        })
        .collect()
}

/// A sum in eight independent lanes, which the compiler can vectorise.
fn sum<T: WithDType>(xs: &[T]) -> T {
    let mut lanes = [zero::<T>(); 8];
    let blocks = xs.chunks_exact(8);
    let rest = blocks.remainder();
    for block in blocks {
        for (lane, &v) in lanes.iter_mut().zip(block) {
            *lane += v;
        }
    }
    lanes.iter().chain(rest).fold(zero(), |a, &b| a + b)
}

/// The convolution; its backward runs [`InputGrad`], [`WeightGrad`] and [`BiasGrad`], computing
/// only the gradients that some variable depends on.
#[derive(Clone, Copy, Debug)]
struct Conv2dOp {
    padding: usize,
    stride: usize,
    /// Whether the bias is `[n, o]` rather than `[o]`.
    per_image_bias: bool,
}

impl Conv2dOp {
    /// The sizes of a call, after checking the bias's shape.
    fn geometry(&self, x: &Layout, w: &Layout, bias: Option<&Layout>) -> Result<Geometry> {
        let g = Geometry::new(x.dims(), w.dims(), self.padding, self.stride)?;
        if let Some(bias) = bias {
            let expected: &[usize] = if self.per_image_bias {
                &[g.n, g.o]
            } else {
                &[g.o]
            };
            if bias.dims() != expected {
                bail!(
                    "conv2d: bias of shape {:?}, expected {expected:?}",
                    bias.dims()
                )
            }
        }
        Ok(g)
    }

    fn run<T: Element>(g: &Geometry, x: Arg, w: Arg, bias: Option<Arg>) -> Result<CpuStorage> {
        let x = contiguous::<T>(OP, x, "input")?;
        let w = contiguous::<T>(OP, w, "weight")?;
        let bias = bias
            .map(|(s, l)| contiguous::<T>(OP, (s, l), "bias"))
            .transpose()?;
        Ok(T::to_cpu_storage_owned(forward(x, w, bias, g)))
    }
}

impl Layer for Conv2dOp {
    const NAMES: [&'static str; 2] = ["unitune-conv2d", "unitune-conv2d-bias"];

    fn cpu(&self, x: Arg, w: Arg, bias: Option<Arg>) -> Result<(CpuStorage, Shape)> {
        let g = self.geometry(x.1, w.1, bias.map(|b| b.1))?;
        let storage = match x.0.dtype() {
            DType::F32 => Self::run::<f32>(&g, x, w, bias)?,
            DType::F64 => Self::run::<f64>(&g, x, w, bias)?,
            dtype => unsupported(OP, dtype)?,
        };
        Ok((storage, Shape::from((g.n, g.o, g.oh, g.ow))))
    }

    #[cfg(feature = "cudnn")]
    fn cuda(&self, x: CudaArg, w: CudaArg, bias: Option<CudaArg>) -> Result<(CudaStorage, Shape)> {
        let g = self.geometry(x.1, w.1, bias.map(|b| b.1))?;
        let out = cudnn::forward(&g, x, w, bias, self.per_image_bias)?;
        Ok((out, Shape::from((g.n, g.o, g.oh, g.ow))))
    }

    fn input_grad(&self, x: &Tensor, w: &Tensor, dy: &Tensor) -> Result<Tensor> {
        let (_, _, h, width) = x.dims4()?;
        let (padding, stride) = (self.padding, self.stride);
        let op = InputGrad {
            padding,
            stride,
            h,
            w: width,
        };
        dy.apply_op2_no_bwd(w, &op)
    }

    fn weight_grad(&self, x: &Tensor, w: &Tensor, dy: &Tensor) -> Result<Tensor> {
        let (_, _, kh, kw) = w.dims4()?;
        let (padding, stride) = (self.padding, self.stride);
        let op = WeightGrad {
            padding,
            stride,
            kh,
            kw,
        };
        dy.apply_op2_no_bwd(x, &op)
    }

    fn bias_grad(&self, dy: &Tensor) -> Result<Tensor> {
        let op = BiasGrad {
            per_image: self.per_image_bias,
        };
        dy.apply_op1_no_bwd(&op)
    }
}

/// Errors unless `dy`'s layout is the output shape of `g`.
fn check_output(g: &Geometry, dy: &Layout) -> Result<()> {
    if dy.dims() != [g.n, g.o, g.oh, g.ow] {
        bail!(
            "conv2d backward: output gradient {:?} for the output shape {:?}",
            dy.dims(),
            [g.n, g.o, g.oh, g.ow]
        )
    }
    Ok(())
}

/// `(dy, weight)` -> the input's gradient. The input size is a parameter: a strided convolution
/// maps several input sizes to one output size (which candle's own backward gets wrong).
struct InputGrad {
    padding: usize,
    stride: usize,
    h: usize,
    w: usize,
}

impl InputGrad {
    /// The sizes of the convolution whose input gradient this is, from `dy` and the weight.
    fn geometry(&self, dy: &Layout, w: &Layout) -> Result<Geometry> {
        let (n, _, _, _) = dy.shape().dims4()?;
        let (_, c, _, _) = w.shape().dims4()?;
        let g = Geometry::new(&[n, c, self.h, self.w], w.dims(), self.padding, self.stride)?;
        check_output(&g, dy)?;
        Ok(g)
    }

    fn run<T: Element>(g: &Geometry, dy: Arg, w: Arg) -> Result<CpuStorage> {
        let dy = contiguous::<T>(OP, dy, "output gradient")?;
        let w = contiguous::<T>(OP, w, "weight")?;
        Ok(T::to_cpu_storage_owned(input_grad(dy, w, g)))
    }
}

impl CustomOp2 for InputGrad {
    fn name(&self) -> &'static str {
        "unitune-conv2d-input-grad"
    }

    fn cpu_fwd(
        &self,
        dys: &CpuStorage,
        dyl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = self.geometry(dyl, wl)?;
        let storage = match dys.dtype() {
            DType::F32 => Self::run::<f32>(&g, (dys, dyl), (ws, wl))?,
            DType::F64 => Self::run::<f64>(&g, (dys, dyl), (ws, wl))?,
            dtype => unsupported(OP, dtype)?,
        };
        Ok((storage, Shape::from((g.n, g.c, g.h, g.w))))
    }

    #[cfg(feature = "cudnn")]
    fn cuda_fwd(
        &self,
        dys: &CudaStorage,
        dyl: &Layout,
        ws: &CudaStorage,
        wl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let g = self.geometry(dyl, wl)?;
        let dx = cudnn::input_grad(&g, (dys, dyl), (ws, wl))?;
        Ok((dx, Shape::from((g.n, g.c, g.h, g.w))))
    }
}

/// `(dy, input)` -> the weight's gradient.
struct WeightGrad {
    padding: usize,
    stride: usize,
    kh: usize,
    kw: usize,
}

impl WeightGrad {
    /// The sizes of the convolution whose weight gradient this is, from `dy` and the input.
    fn geometry(&self, dy: &Layout, x: &Layout) -> Result<Geometry> {
        let (_, o, _, _) = dy.shape().dims4()?;
        let (_, c, _, _) = x.shape().dims4()?;
        let g = Geometry::new(
            x.dims(),
            &[o, c, self.kh, self.kw],
            self.padding,
            self.stride,
        )?;
        check_output(&g, dy)?;
        Ok(g)
    }

    fn run<T: Element>(g: &Geometry, dy: Arg, x: Arg) -> Result<CpuStorage> {
        let dy = contiguous::<T>(OP, dy, "output gradient")?;
        let x = contiguous::<T>(OP, x, "input")?;
        Ok(T::to_cpu_storage_owned(weight_grad(dy, x, g)))
    }
}

impl CustomOp2 for WeightGrad {
    fn name(&self) -> &'static str {
        "unitune-conv2d-weight-grad"
    }

    fn cpu_fwd(
        &self,
        dys: &CpuStorage,
        dyl: &Layout,
        xs: &CpuStorage,
        xl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = self.geometry(dyl, xl)?;
        let storage = match dys.dtype() {
            DType::F32 => Self::run::<f32>(&g, (dys, dyl), (xs, xl))?,
            DType::F64 => Self::run::<f64>(&g, (dys, dyl), (xs, xl))?,
            dtype => unsupported(OP, dtype)?,
        };
        Ok((storage, Shape::from((g.o, g.c, g.kh, g.kw))))
    }

    #[cfg(feature = "cudnn")]
    fn cuda_fwd(
        &self,
        dys: &CudaStorage,
        dyl: &Layout,
        xs: &CudaStorage,
        xl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let g = self.geometry(dyl, xl)?;
        let dw = cudnn::weight_grad(&g, (dys, dyl), (xs, xl))?;
        Ok((dw, Shape::from((g.o, g.c, g.kh, g.kw))))
    }
}

/// `dy` -> the bias's gradient, `dy` summed over all but the channel dimension, or over the
/// pixels only (`[n, o]`) for a bias per image.
struct BiasGrad {
    per_image: bool,
}

impl BiasGrad {
    /// `[o]`, or `[n, o]` per image, for `dy: [n, o, oh, ow]`.
    fn shape(&self, dy: &Layout) -> Result<Shape> {
        let (n, o, _, _) = dy.shape().dims4()?;
        Ok(if self.per_image {
            Shape::from((n, o))
        } else {
            Shape::from(o)
        })
    }

    fn run<T: WithDType>(&self, dy: Arg) -> Result<CpuStorage> {
        let (n, o, oh, ow) = dy.1.shape().dims4()?;
        let dy = contiguous::<T>(OP, dy, "output gradient")?;
        let db = bias_grad(dy, n, o, oh * ow, self.per_image);
        Ok(T::to_cpu_storage_owned(db))
    }
}

impl CustomOp1 for BiasGrad {
    fn name(&self) -> &'static str {
        "unitune-conv2d-bias-grad"
    }

    fn cpu_fwd(&self, dys: &CpuStorage, dyl: &Layout) -> Result<(CpuStorage, Shape)> {
        let storage = match dys.dtype() {
            DType::F32 => self.run::<f32>((dys, dyl))?,
            DType::F64 => self.run::<f64>((dys, dyl))?,
            dtype => unsupported(OP, dtype)?,
        };
        Ok((storage, self.shape(dyl)?))
    }

    #[cfg(feature = "cudnn")]
    fn cuda_fwd(&self, dys: &CudaStorage, dyl: &Layout) -> Result<(CudaStorage, Shape)> {
        let shape = self.shape(dyl)?;
        Ok((cudnn::bias_grad((dys, dyl), self.per_image)?, shape))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor, Var, D};

    use super::*;
    use crate::testing::{rel_err, sample, values};

    /// A convolution to test: `(n, c, h, w, o, kernel, padding, stride)`.
    type Case = (usize, usize, usize, usize, usize, usize, usize, usize);

    const CASES: [Case; 10] = [
        (2, 3, 8, 8, 5, 3, 1, 1),  // 3x3 keeping the size, as most of the UNet
        (3, 4, 7, 9, 6, 3, 1, 1),  // odd sizes, a batch not a multiple of the threads
        (2, 4, 8, 10, 4, 3, 1, 2), // stride-2 downsample, even sizes
        (2, 4, 9, 7, 6, 3, 1, 2),  // stride 2, odd sizes
        (1, 5, 9, 8, 3, 3, 1, 2),  // stride 2, odd height, even width
        (2, 3, 9, 9, 5, 3, 0, 2),  // the VAE's downsample (padded by hand beforehand)
        (2, 3, 8, 9, 5, 3, 0, 2),  // same, even height, odd width
        (2, 6, 5, 7, 4, 1, 0, 1),  // 1x1, C_in > C_out
        (1, 3, 6, 6, 7, 3, 0, 1),  // 3x3 without padding
        (3, 3, 5, 6, 4, 1, 1, 2),  // 1x1 with padding and stride: the general path
    ];

    /// The inputs of a case: `x`, `weight`, `bias` (`[o]`, or `[n, o]` when `per_image`) and a
    /// weighting `r` of the output for the loss.
    fn inputs(case: Case, dtype: DType, per_image: bool) -> [Tensor; 4] {
        let (n, c, h, w, o, k, padding, stride) = case;
        let (oh, ow) = (
            (h + 2 * padding - k) / stride + 1,
            (w + 2 * padding - k) / stride + 1,
        );
        let bias: &[usize] = if per_image { &[n, o] } else { &[o] };
        [
            sample(&[n, c, h, w], 1, dtype),
            sample(&[o, c, k, k], 2, dtype),
            sample(bias, 3, dtype),
            sample(&[n, o, oh, ow], 4, dtype),
        ]
    }

    /// candle's convolution plus bias, as `candle_nn::Conv2d` computes it (or, for a bias
    /// `[n, o]`, as a resnet adds its time embedding: `bias[:, :, None, None]`).
    fn reference(x: &Tensor, w: &Tensor, b: &Tensor, padding: usize, stride: usize) -> Tensor {
        x.conv2d(w, padding, stride, 1, 1)
            .and_then(|y| y.broadcast_add(&b.unsqueeze(D::Minus1)?.unsqueeze(D::Minus1)?))
            .expect("candle conv2d")
    }

    #[test]
    fn forward_matches_candle() {
        let mut worst = 0.0f64;
        for (case, per_image) in CASES.iter().flat_map(|&c| [(c, false), (c, true)]) {
            let (padding, stride) = (case.6, case.7);
            let [x, w, b, _] = inputs(case, DType::F32, per_image);
            let expected = reference(&x, &w, &b, padding, stride);
            let with_bias = conv2d(&x, &w, Some(&b), padding, stride).expect("conv2d");
            let no_bias = conv2d(&x, &w, None, padding, stride).expect("conv2d");
            let expected_no_bias = x.conv2d(&w, padding, stride, 1, 1).expect("candle");
            for err in [
                rel_err(&with_bias, &expected),
                rel_err(&no_bias, &expected_no_bias),
            ] {
                assert!(
                    err < 1e-6,
                    "{case:?} (bias per image {per_image}): off by {err:e}"
                );
                worst = worst.max(err);
            }
        }
        eprintln!("worst relative forward error against candle: {worst:e}");
    }

    #[test]
    fn forward_takes_strided_inputs_and_f64() {
        let case = CASES[3];
        let [x, w, b, _] = inputs(case, DType::F64, false);
        // The same values with height and width swapped twice: a non-contiguous layout.
        let x_t = x
            .transpose(2, 3)
            .and_then(|t| t.contiguous()?.transpose(2, 3))
            .expect("t");
        assert!(!x_t.is_contiguous());
        let expected = reference(&x, &w, &b, case.6, case.7);
        let got = conv2d(&x_t, &w, Some(&b), case.6, case.7).expect("conv2d");
        assert_eq!(got.dtype(), DType::F64);
        assert!(rel_err(&got, &expected) < 1e-13);
    }

    #[test]
    fn rejects_bad_shapes_and_dtypes() {
        // CASES[0] has 2 images of 5 output channels.
        let [x, w, b, _] = inputs(CASES[0], DType::F32, false);
        let w_bad = sample(&[5, 4, 3, 3], 5, DType::F32);
        assert!(conv2d(&x, &w_bad, None, 1, 1).is_err());
        for bias in [
            &[4][..],
            &[],
            &[1, 5],
            &[3, 5],
            &[5, 2],
            &[2, 5, 1],
            &[1, 2, 5],
        ] {
            let err = conv2d(&x, &w, Some(&sample(bias, 6, DType::F32)), 1, 1)
                .expect_err("a bias of the wrong shape");
            assert!(
                err.to_string()
                    .contains("expected [5] or, per image, [2, 5]"),
                "{err}"
            );
        }
        assert!(conv2d(&x, &w, Some(&b), 1, 0).is_err());
        let small = sample(&[1, 3, 2, 2], 7, DType::F32);
        assert!(conv2d(&small, &w, Some(&b), 0, 1).is_err());
        let half = x.to_dtype(DType::F16).expect("f16");
        assert!(conv2d(&half, &w.to_dtype(DType::F16).expect("f16"), None, 1, 1).is_err());
    }

    /// The gradients of `sum(conv2d(x, w, b) ∘ r)` with respect to `x`, `w` and `b`.
    fn grads(
        f: impl Fn(&Tensor, &Tensor, &Tensor) -> Tensor,
        [x, w, b, r]: &[Tensor; 4],
    ) -> [Tensor; 3] {
        let vars = [x, w, b].map(|t| Var::from_tensor(t).expect("var"));
        let out = f(
            vars[0].as_tensor(),
            vars[1].as_tensor(),
            vars[2].as_tensor(),
        );
        let loss = out.mul(r).and_then(|t| t.sum_all()).expect("loss");
        let store = loss.backward().expect("backward");
        vars.map(|v| store.get(v.as_tensor()).expect("gradient").clone())
    }

    #[test]
    fn gradients_match_candle() {
        // candle's backward derives the input size of both sides from the height alone, so it
        // is only right when height and width have the same parity (or stride 1);
        // `gradients_match_finite_differences` covers the other cases.
        let cases = CASES.iter().filter(|c| c.7 == 1 || c.2 % 2 == c.3 % 2);
        let mut worst = 0.0f64;
        for (case, per_image) in cases.flat_map(|&c| [(c, false), (c, true)]) {
            let (padding, stride) = (case.6, case.7);
            let inputs = inputs(case, DType::F32, per_image);
            let ours = grads(
                |x, w, b| conv2d(x, w, Some(b), padding, stride).expect("ours"),
                &inputs,
            );
            let theirs = grads(|x, w, b| reference(x, w, b, padding, stride), &inputs);
            for (name, (a, b)) in ["x", "weight", "bias"].iter().zip(ours.iter().zip(&theirs)) {
                let err = rel_err(a, b);
                assert!(
                    err < 1e-5,
                    "{case:?} (bias per image {per_image}): gradient of {name} off by {err:e}"
                );
                worst = worst.max(err);
            }
        }
        eprintln!("worst relative gradient error against candle: {worst:e}");
    }

    /// The loss `sum(conv2d(x, w, b) ∘ r)` in f64.
    fn loss(x: &Tensor, w: &Tensor, b: &Tensor, r: &Tensor, padding: usize, stride: usize) -> f64 {
        conv2d(x, w, Some(b), padding, stride)
            .and_then(|y| y.mul(r)?.sum_all()?.to_scalar::<f64>())
            .expect("loss")
    }

    #[test]
    fn gradients_match_finite_differences() {
        // The loss is linear in each input, so central differences are exact up to rounding.
        let eps = 1e-3;
        let mut worst = 0.0f64;
        for (case, per_image) in CASES.iter().flat_map(|&c| [(c, false), (c, true)]) {
            let (padding, stride) = (case.6, case.7);
            let inputs = inputs(case, DType::F64, per_image);
            let ours = grads(
                |x, w, b| conv2d(x, w, Some(b), padding, stride).expect("ours"),
                &inputs,
            );
            for (arg, grad) in ours.iter().enumerate() {
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
                            loss(x, w, b, r, padding, stride)
                        };
                        (at(eps) - at(-eps)) / (2.0 * eps)
                    })
                    .collect();
                let numeric = Tensor::from_vec(numeric, grad.dims(), &Device::Cpu).expect("t");
                let err = rel_err(grad, &numeric);
                assert!(
                    err < 1e-10,
                    "{case:?} (bias per image {per_image}): gradient of argument {arg} off by {err:e}"
                );
                worst = worst.max(err);
            }
        }
        eprintln!("worst relative gradient error against finite differences: {worst:e}");
    }

    #[test]
    fn strided_output_gradient_and_frozen_inputs() {
        let case = CASES[1];
        let (padding, stride) = (case.6, case.7);
        let [x, w, b, _] = inputs(case, DType::F32, false);
        let (x_var, w_var) = (
            Var::from_tensor(&x).expect("v"),
            Var::from_tensor(&w).expect("v"),
        );
        // `sum_all` hands back a broadcast (stride 0) gradient; x is a variable, w and b constants.
        let out = conv2d(x_var.as_tensor(), &w, Some(&b), padding, stride).expect("conv2d");
        let store = out.sum_all().and_then(|l| l.backward()).expect("backward");
        assert!(store.get(&w).is_none() && store.get(&b).is_none());
        let dx = store.get(x_var.as_tensor()).expect("dx");
        let ones = out.ones_like().expect("ones");
        let [expected, _, _] = grads(
            |x, w, b| reference(x, w, b, padding, stride),
            &[x, w.clone(), b.clone(), ones],
        );
        assert!(rel_err(dx, &expected) < 1e-5);
        // Frozen input, trainable weight: only the weight gets a gradient.
        let out = conv2d(
            &x_var.as_tensor().detach(),
            w_var.as_tensor(),
            Some(&b),
            padding,
            stride,
        );
        let store = out.and_then(|o| o.sum_all()?.backward()).expect("backward");
        assert!(store.get(w_var.as_tensor()).is_some());
        assert_eq!(store.get_ids().count(), 1);
    }

    #[test]
    fn cuda_path_takes_only_what_cudnn_can() {
        // CPU tensors stay on the gemm kernels, with or without the `cudnn` feature.
        let [x, w, b, _] = inputs(CASES[0], DType::F32, false);
        assert!(!cuda_supports(&x, &w, Some(&b), 1, 1));
        // cuDNN takes fewer than 2³¹ elements per tensor: a VAE decoder's last 3x3 convolution
        // (128 channels) fits at 2048 x 2048 pixels, not at 4096 x 4096 (exactly 2³¹ outputs),
        // where the model falls back to candle's convolution.
        let g = |side: usize| Geometry::new(&[1, 128, side, side], &[128, 128, 3, 3], 1, 1);
        assert!(g(2048).expect("g").fits_cudnn());
        assert!(!g(4096).expect("g").fits_cudnn());
        // SD 1.5's largest training convolutions, and sizes whose product overflows usize.
        let sd = Geometry::new(&[4, 320, 64, 64], &[320, 320, 3, 3], 1, 1).expect("g");
        assert!(sd.fits_cudnn());
        let huge = Geometry::new(&[1 << 40, 1 << 30, 1, 1], &[1, 1 << 30, 1, 1], 0, 1);
        assert!(!huge.expect("g").fits_cudnn());
    }

    #[test]
    fn chunked_paths_agree() {
        // With a low scratch limit pieces of work take one, or a few, output rows at a time (the
        // weight gradient's blocks then straddle images): the paths that bound memory at large
        // image sizes.
        for (case, rows) in CASES.iter().flat_map(|&case| [(case, 1), (case, 3)]) {
            let (n, c, h, w, o, k, padding, stride) = case;
            let g = Geometry::new(&[n, c, h, w], &[o, c, k, k], padding, stride).expect("g");
            let tiny = Geometry {
                scratch_limit: rows * g.k() * g.ow,
                ..g
            };
            let [x, wt, b, r] = [
                values(n * c * h * w, 1),
                values(o * g.k(), 2),
                values(o, 3),
                values(n * o * g.p(), 4),
            ];
            let close = |a: Vec<f64>, b: Vec<f64>| {
                assert_eq!(a.len(), b.len());
                let diff = a
                    .iter()
                    .zip(&b)
                    .map(|(x, y)| (x - y).abs())
                    .fold(0.0, f64::max);
                assert!(diff < 1e-12, "{case:?}: {diff:e}");
            };
            close(
                forward(&x, &wt, Some(&b), &tiny),
                forward(&x, &wt, Some(&b), &g),
            );
            let b_per_image = values(n * o, 5);
            close(
                forward(&x, &wt, Some(&b_per_image), &tiny),
                forward(&x, &wt, Some(&b_per_image), &g),
            );
            close(input_grad(&r, &wt, &tiny), input_grad(&r, &wt, &g));
            close(weight_grad(&r, &x, &tiny), weight_grad(&r, &x, &g));
        }
    }
}
