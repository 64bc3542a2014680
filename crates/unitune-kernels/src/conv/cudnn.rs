//! The convolution's passes on CUDA through cuDNN (`cudnn` feature): the forward
//! (`cudnnConvolutionForward`, then `cudnnAddTensor` for the bias), the input gradient
//! (`cudnnConvolutionBackwardData`), the weight gradient (`cudnnConvolutionBackwardFilter`) and the
//! bias gradient (`cudnnConvolutionBackwardBias`). candle's own CUDA backward runs the input
//! gradient through its generic conv_transpose2d kernel and the weight gradient as a convolution
//! of transposed copies; cuDNN has a tuned kernel for each pass, on tensor cores in half precision.
//!
//! cudarc's safe cuDNN layer keeps the raw handle and descriptors to itself, and the bias calls
//! need them: this module uses its `result` and `sys` layers, with owners of its own that free
//! each descriptor (`cudnn/api.rs`, which also picks each pass's algorithm). f16 and bf16 are stored as such and accumulated in f32 (cuDNN's pseudo-half
//! configurations, as PyTorch runs them); f32 stays full f32 unless candle allows its f32 gemms
//! reduced precision (`set_gemm_reduced_precision_f32`: TF32 tensor cores here too).

use std::ffi::c_void;

use candle_core::backend::BackendStorage;
use candle_core::cuda::cudarc::cudnn::{result, sys};
use candle_core::cuda::cudarc::driver::{
    CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr, SyncOnDrop,
};
use candle_core::cuda::{CudaDType, CudaDevice};
use candle_core::{bail, CudaStorage, DType, Layout, Result, WithDType};
use half::{bf16, f16};

use super::Geometry;
use api::{Descriptors, Handle, TensorDesc};

mod api;

/// A convolution argument: its storage and layout (contiguous; the callers make it so).
pub(crate) type CudaArg<'a> = (&'a CudaStorage, &'a Layout);

/// The storage types cuDNN runs the convolution on.
trait Element: CudaDType + DeviceRepr + WithDType {
    const CUDNN: sys::cudnnDataType_t;
}
impl Element for f32 {
    const CUDNN: sys::cudnnDataType_t = sys::cudnnDataType_t::CUDNN_DATA_FLOAT;
}
impl Element for f16 {
    const CUDNN: sys::cudnnDataType_t = sys::cudnnDataType_t::CUDNN_DATA_HALF;
}
impl Element for bf16 {
    const CUDNN: sys::cudnnDataType_t = sys::cudnnDataType_t::CUDNN_DATA_BFLOAT16;
}

/// Calls `$f::<T>($args)` with `T` the element type of `$dtype`.
macro_rules! by_dtype {
    ($dtype:expr, $f:ident($($arg:expr),*)) => {
        match $dtype {
            DType::F32 => $f::<f32>($($arg),*),
            DType::F16 => $f::<f16>($($arg),*),
            DType::BF16 => $f::<bf16>($($arg),*),
            other => bail!("conv2d on CUDA: f32, f16 or bf16 expected, got {other:?}"),
        }
    };
}

/// `conv2d(x, w) (+ bias)`: `[n, o, oh, ow]`, the bias `[o]`, or `[n, o]` when `per_image`.
pub(super) fn forward(
    g: &Geometry,
    x: CudaArg,
    w: CudaArg,
    bias: Option<CudaArg>,
    per_image: bool,
) -> Result<CudaStorage> {
    by_dtype!(x.0.dtype(), forward_as(g, x, w, bias, per_image))
}

/// `(dy, w)` -> `dx: [n, c, h, w]`.
pub(super) fn input_grad(g: &Geometry, dy: CudaArg, w: CudaArg) -> Result<CudaStorage> {
    by_dtype!(dy.0.dtype(), input_grad_as(g, dy, w))
}

/// `(dy, x)` -> `dw: [o, c, kh, kw]`.
pub(super) fn weight_grad(g: &Geometry, dy: CudaArg, x: CudaArg) -> Result<CudaStorage> {
    by_dtype!(dy.0.dtype(), weight_grad_as(g, dy, x))
}

/// `dy: [n, o, oh, ow]` -> its sums over all but the channels, `[o]`, or over the pixels only,
/// `[n, o]`, when `per_image`.
pub(super) fn bias_grad(dy: CudaArg, per_image: bool) -> Result<CudaStorage> {
    by_dtype!(dy.0.dtype(), bias_grad_as(dy, per_image))
}

fn forward_as<T: Element>(
    g: &Geometry,
    x: CudaArg,
    w: CudaArg,
    bias: Option<CudaArg>,
    per_image: bool,
) -> Result<CudaStorage> {
    let dev = x.0.device().clone();
    let cudnn = Handle::of(&dev)?;
    let d = Descriptors::new(g, T::CUDNN)?;
    let choice = cudnn.choose::<sys::cudnnConvolutionFwdAlgo_t>(T::DTYPE, g, &d)?;
    // SAFETY: the convolution writes every element (beta 0).
    let mut y = unsafe { dev.alloc::<T>(g.n * g.o * g.p())? };
    let mut workspace = Workspace::new(&dev, choice.workspace)?;
    let stream = &cudnn.stream;
    {
        let ((x, _x), (w, _w)) = (input::<T>(x, stream)?, input::<T>(w, stream)?);
        let (y, _y) = y.device_ptr_mut(stream);
        let y = y as usize as *mut c_void;
        let (ws, _ws) = workspace.pointer(stream);
        // SAFETY: the descriptors describe these contiguous buffers, which stay alive (and
        // ordered on cuDNN's stream, candle's) until their guards drop after the call.
        unsafe {
            result::convolution_forward(
                cudnn.raw,
                scalar(&ONE),
                d.x.0,
                x,
                d.w.0,
                w,
                d.conv.0,
                choice.algo,
                ws,
                choice.workspace,
                scalar(&ZERO),
                d.y.0,
                y,
            )?
        };
        if let Some(bias) = bias {
            let images = if per_image { g.n } else { 1 };
            let bias_desc = TensorDesc::new(T::CUDNN, [images, g.o, 1, 1])?;
            let (b, _b) = input::<T>(bias, stream)?;
            // SAFETY: as above; cudnnAddTensor broadcasts the bias's unit dimensions over y.
            unsafe {
                sys::cudnnAddTensor(
                    cudnn.raw,
                    scalar(&ONE),
                    bias_desc.0,
                    b,
                    scalar(&ONE),
                    d.y.0,
                    y,
                )
                .result()?
            };
        }
    }
    Ok(CudaStorage::wrap_cuda_slice(y, dev))
}

fn input_grad_as<T: Element>(g: &Geometry, dy: CudaArg, w: CudaArg) -> Result<CudaStorage> {
    let dev = dy.0.device().clone();
    let cudnn = Handle::of(&dev)?;
    let d = Descriptors::new(g, T::CUDNN)?;
    let choice = cudnn.choose::<sys::cudnnConvolutionBwdDataAlgo_t>(T::DTYPE, g, &d)?;
    // SAFETY: the backward writes every element (beta 0).
    let mut dx = unsafe { dev.alloc::<T>(g.n * g.c * g.hw())? };
    let mut workspace = Workspace::new(&dev, choice.workspace)?;
    let stream = &cudnn.stream;
    {
        let ((dy, _dy), (w, _w)) = (input::<T>(dy, stream)?, input::<T>(w, stream)?);
        let (dx, _dx) = dx.device_ptr_mut(stream);
        let (ws, _ws) = workspace.pointer(stream);
        // SAFETY: as in the forward.
        unsafe {
            result::convolution_backward_data(
                cudnn.raw,
                scalar(&ONE),
                d.w.0,
                w,
                d.y.0,
                dy,
                d.conv.0,
                choice.algo,
                ws,
                choice.workspace,
                scalar(&ZERO),
                d.x.0,
                dx as usize as *mut c_void,
            )?
        };
    }
    Ok(CudaStorage::wrap_cuda_slice(dx, dev))
}

fn weight_grad_as<T: Element>(g: &Geometry, dy: CudaArg, x: CudaArg) -> Result<CudaStorage> {
    let dev = dy.0.device().clone();
    let cudnn = Handle::of(&dev)?;
    let d = Descriptors::new(g, T::CUDNN)?;
    let choice = cudnn.choose::<sys::cudnnConvolutionBwdFilterAlgo_t>(T::DTYPE, g, &d)?;
    // SAFETY: the backward writes every element (beta 0).
    let mut dw = unsafe { dev.alloc::<T>(g.o * g.k())? };
    let mut workspace = Workspace::new(&dev, choice.workspace)?;
    let stream = &cudnn.stream;
    {
        let ((dy, _dy), (x, _x)) = (input::<T>(dy, stream)?, input::<T>(x, stream)?);
        let (dw, _dw) = dw.device_ptr_mut(stream);
        let (ws, _ws) = workspace.pointer(stream);
        // SAFETY: as in the forward.
        unsafe {
            result::convolution_backward_filter(
                cudnn.raw,
                scalar(&ONE),
                d.x.0,
                x,
                d.y.0,
                dy,
                d.conv.0,
                choice.algo,
                ws,
                choice.workspace,
                scalar(&ZERO),
                d.w.0,
                dw as usize as *mut c_void,
            )?
        };
    }
    Ok(CudaStorage::wrap_cuda_slice(dw, dev))
}

fn bias_grad_as<T: Element>(dy: CudaArg, per_image: bool) -> Result<CudaStorage> {
    let (n, o, oh, ow) = dy.1.shape().dims4()?;
    let dev = dy.0.device().clone();
    let cudnn = Handle::of(&dev)?;
    // Per image, the images' channels are laid side by side as the channels of one image, which
    // cuDNN then sums over the pixels alone.
    let (images, channels) = if per_image { (1, n * o) } else { (n, o) };
    let dy_desc = TensorDesc::new(T::CUDNN, [images, channels, oh, ow])?;
    let db_desc = TensorDesc::new(T::CUDNN, [1, channels, 1, 1])?;
    // SAFETY: the backward writes every element (beta 0).
    let mut db = unsafe { dev.alloc::<T>(channels)? };
    {
        let (dy, _dy) = input::<T>(dy, &cudnn.stream)?;
        let (db, _db) = db.device_ptr_mut(&cudnn.stream);
        // SAFETY: as in the forward.
        unsafe {
            sys::cudnnConvolutionBackwardBias(
                cudnn.raw,
                scalar(&ONE),
                dy_desc.0,
                dy,
                scalar(&ZERO),
                db_desc.0,
                db as usize as *mut c_void,
            )
            .result()?
        };
    }
    Ok(CudaStorage::wrap_cuda_slice(db, dev))
}

/// cuDNN's scaling factors: f32 for f32, f16 and bf16 data alike.
static ONE: f32 = 1.0;
static ZERO: f32 = 0.0;

fn scalar(x: &'static f32) -> *const c_void {
    (x as *const f32).cast()
}

/// The device pointer of a contiguous argument at its offset, with the guard that orders its
/// use on `stream` after its last write.
fn input<'a, T: Element>(
    (storage, layout): CudaArg<'a>,
    stream: &'a CudaStream,
) -> Result<(*const c_void, SyncOnDrop<'a>)> {
    if !layout.is_contiguous() {
        bail!(
            "conv2d on CUDA: non-contiguous argument {:?}",
            layout.dims()
        )
    }
    let (base, guard) = storage.as_cuda_slice::<T>()?.device_ptr(stream);
    let at = base + (layout.start_offset() * std::mem::size_of::<T>()) as u64;
    Ok((at as usize as *const c_void, guard))
}

/// Scratch memory for an algorithm, if it needs any.
struct Workspace(Option<CudaSlice<u8>>);

impl Workspace {
    fn new(dev: &CudaDevice, bytes: usize) -> Result<Self> {
        // SAFETY: cuDNN's scratch memory needs no initial contents.
        let slice = (bytes > 0).then(|| unsafe { dev.alloc::<u8>(bytes) });
        Ok(Self(slice.transpose()?))
    }

    fn pointer<'a>(&'a mut self, stream: &'a CudaStream) -> (*mut c_void, Option<SyncOnDrop<'a>>) {
        match &mut self.0 {
            Some(slice) => {
                let (ptr, guard) = slice.device_ptr_mut(stream);
                (ptr as usize as *mut c_void, Some(guard))
            }
            None => (std::ptr::null_mut(), None),
        }
    }
}
