//! Owners of cuDNN's handle and descriptors (cudarc's safe layer keeps the raw ones to itself,
//! and the bias calls need them), and the choice of each pass's algorithm: cuDNN's heuristic
//! first choice within a workspace limit, once per dtype and shape.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::c_int;
use std::rc::Rc;
use std::sync::Arc;

use candle_core::cuda::cudarc::cudnn::{result, sys};
use candle_core::cuda::cudarc::driver::CudaStream;
use candle_core::cuda::{CudaDevice, DeviceId};
use candle_core::{bail, DType, Result};

use super::super::Geometry;

use sys::cudnnMathType_t::{
    CUDNN_FMA_MATH, CUDNN_TENSOR_OP_MATH, CUDNN_TENSOR_OP_MATH_ALLOW_CONVERSION,
};

/// The largest workspace an algorithm may ask for. cuDNN's heuristics rank by speed alone, and
/// some algorithms (FFT) want gigabytes at SD's sizes for little gain; the ranking always holds
/// one that needs little or none.
const MAX_WORKSPACE: usize = 512 << 20;

/// cuDNN's dimensions are C ints.
fn ints<const N: usize>(dims: [usize; N]) -> Result<[c_int; N]> {
    let mut out = [0; N];
    for (o, d) in out.iter_mut().zip(dims) {
        *o = c_int::try_from(d).map_err(|_| {
            candle_core::Error::Msg(format!("conv2d on CUDA: dimension {d} too large"))
        })?;
    }
    Ok(out)
}

/// A tensor descriptor, NCHW and packed, freed on drop.
pub(super) struct TensorDesc(pub(super) sys::cudnnTensorDescriptor_t);

impl TensorDesc {
    pub(super) fn new(data: sys::cudnnDataType_t, dims: [usize; 4]) -> Result<Self> {
        let desc = Self(result::create_tensor_descriptor()?);
        let format = sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW;
        // SAFETY: a descriptor just created.
        unsafe { result::set_tensor4d_descriptor(desc.0, format, data, ints(dims)?)? };
        Ok(desc)
    }
}

impl Drop for TensorDesc {
    fn drop(&mut self) {
        // SAFETY: created in `new`, destroyed only here. A failure cannot be reported from drop
        // and leaks at most the descriptor.
        let _ = unsafe { result::destroy_tensor_descriptor(self.0) };
    }
}

/// A filter descriptor `[o, c, kh, kw]`, freed on drop.
pub(super) struct FilterDesc(pub(super) sys::cudnnFilterDescriptor_t);

impl Drop for FilterDesc {
    fn drop(&mut self) {
        // SAFETY: as for TensorDesc.
        let _ = unsafe { result::destroy_filter_descriptor(self.0) };
    }
}

/// A convolution descriptor (padding, stride, f32 accumulation), freed on drop.
pub(super) struct ConvDesc(pub(super) sys::cudnnConvolutionDescriptor_t);

impl Drop for ConvDesc {
    fn drop(&mut self) {
        // SAFETY: as for TensorDesc.
        let _ = unsafe { result::destroy_convolution_descriptor(self.0) };
    }
}

/// The four descriptors of a convolution: input (or its gradient), weight, output (or its
/// gradient) and the convolution itself.
pub(super) struct Descriptors {
    pub(super) x: TensorDesc,
    pub(super) w: FilterDesc,
    pub(super) y: TensorDesc,
    pub(super) conv: ConvDesc,
}

impl Descriptors {
    pub(super) fn new(g: &Geometry, data: sys::cudnnDataType_t) -> Result<Self> {
        let x = TensorDesc::new(data, [g.n, g.c, g.h, g.w])?;
        let y = TensorDesc::new(data, [g.n, g.o, g.oh, g.ow])?;
        let w = FilterDesc(result::create_filter_descriptor()?);
        let format = sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW;
        // SAFETY: a descriptor just created.
        unsafe {
            result::set_filter4d_descriptor(w.0, data, format, ints([g.o, g.c, g.kh, g.kw])?)?
        };
        let conv = ConvDesc(result::create_convolution_descriptor()?);
        let [pad, stride] = ints([g.padding, g.stride])?;
        // SAFETY: a descriptor just created. Accumulating in f32 for f16 and bf16 too.
        unsafe {
            result::set_convolution2d_descriptor(
                conv.0,
                pad,
                pad,
                stride,
                stride,
                1,
                1,
                sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
                sys::cudnnDataType_t::CUDNN_DATA_FLOAT,
            )?
        };
        Ok(Self { x, w, y, conv })
    }
}

/// The key of a chosen algorithm: the dtype and the sizes.
type Key = (DType, Geometry);

/// A pass's algorithm, the workspace it needs and the math (tensor cores or not) it runs with.
#[derive(Clone, Copy, Debug)]
pub(super) struct Choice<A> {
    pub(super) algo: A,
    pub(super) workspace: usize,
    math: sys::cudnnMathType_t,
}

/// One of the convolution's three passes, named by the type of its algorithms: how cuDNN ranks
/// them, and where a handle keeps the choices made.
pub(super) trait Pass: Copy + 'static {
    /// cuDNN's entry of its ranking.
    type Perf: Copy;
    const NAME: &'static str;
    /// How many algorithms the pass has (the most entries of a ranking).
    const COUNT: usize;

    fn cache(handle: &Handle) -> &RefCell<HashMap<Key, Choice<Self>>>;

    /// cuDNN's ranking, fastest first, into `perf`; the number of entries written.
    fn rank(handle: &Handle, d: &Descriptors, perf: &mut [Self::Perf]) -> Result<usize>;

    /// The algorithm, status, workspace bytes and math type of an entry.
    fn entry(perf: &Self::Perf) -> (Self, sys::cudnnStatus_t, usize, sys::cudnnMathType_t);
}

impl Pass for sys::cudnnConvolutionFwdAlgo_t {
    type Perf = sys::cudnnConvolutionFwdAlgoPerf_t;
    const NAME: &'static str = "forward";
    const COUNT: usize = Self::CUDNN_CONVOLUTION_FWD_ALGO_COUNT as usize;

    fn cache(handle: &Handle) -> &RefCell<HashMap<Key, Choice<Self>>> {
        &handle.forward
    }

    fn rank(handle: &Handle, d: &Descriptors, perf: &mut [Self::Perf]) -> Result<usize> {
        let (mut count, n) = (0, perf.len() as c_int);
        let (handle, perf) = (handle.raw, perf.as_mut_ptr());
        // SAFETY: a live handle and descriptors (owned), and room for `n` entries.
        unsafe {
            result::get_convolution_forward_algorithm(
                handle, d.x.0, d.w.0, d.conv.0, d.y.0, n, &mut count, perf,
            )?
        };
        Ok(count.max(0) as usize)
    }

    fn entry(p: &Self::Perf) -> (Self, sys::cudnnStatus_t, usize, sys::cudnnMathType_t) {
        (p.algo, p.status, p.memory, p.mathType)
    }
}

impl Pass for sys::cudnnConvolutionBwdDataAlgo_t {
    type Perf = sys::cudnnConvolutionBwdDataAlgoPerf_t;
    const NAME: &'static str = "input gradient";
    const COUNT: usize = Self::CUDNN_CONVOLUTION_BWD_DATA_ALGO_COUNT as usize;

    fn cache(handle: &Handle) -> &RefCell<HashMap<Key, Choice<Self>>> {
        &handle.input_grad
    }

    fn rank(handle: &Handle, d: &Descriptors, perf: &mut [Self::Perf]) -> Result<usize> {
        let (mut count, n) = (0, perf.len() as c_int);
        let (handle, perf) = (handle.raw, perf.as_mut_ptr());
        // SAFETY: a live handle and descriptors (owned), and room for `n` entries.
        unsafe {
            result::get_convolution_backward_data_algorithm(
                handle, d.w.0, d.y.0, d.conv.0, d.x.0, n, &mut count, perf,
            )?
        };
        Ok(count.max(0) as usize)
    }

    fn entry(p: &Self::Perf) -> (Self, sys::cudnnStatus_t, usize, sys::cudnnMathType_t) {
        (p.algo, p.status, p.memory, p.mathType)
    }
}

impl Pass for sys::cudnnConvolutionBwdFilterAlgo_t {
    type Perf = sys::cudnnConvolutionBwdFilterAlgoPerf_t;
    const NAME: &'static str = "weight gradient";
    const COUNT: usize = Self::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_COUNT as usize;

    fn cache(handle: &Handle) -> &RefCell<HashMap<Key, Choice<Self>>> {
        &handle.weight_grad
    }

    fn rank(handle: &Handle, d: &Descriptors, perf: &mut [Self::Perf]) -> Result<usize> {
        let (mut count, n) = (0, perf.len() as c_int);
        let (handle, perf) = (handle.raw, perf.as_mut_ptr());
        // SAFETY: a live handle and descriptors (owned), and room for `n` entries.
        unsafe {
            result::get_convolution_backward_filter_algorithm(
                handle, d.x.0, d.y.0, d.conv.0, d.w.0, n, &mut count, perf,
            )?
        };
        Ok(count.max(0) as usize)
    }

    fn entry(p: &Self::Perf) -> (Self, sys::cudnnStatus_t, usize, sys::cudnnMathType_t) {
        (p.algo, p.status, p.memory, p.mathType)
    }
}

/// A cuDNN handle on a device's stream, with the algorithms chosen so far. cuDNN handles are not
/// thread-safe: one per thread and device, as candle keeps its own.
pub(super) struct Handle {
    pub(super) raw: sys::cudnnHandle_t,
    pub(super) stream: Arc<CudaStream>,
    forward: RefCell<HashMap<Key, Choice<sys::cudnnConvolutionFwdAlgo_t>>>,
    input_grad: RefCell<HashMap<Key, Choice<sys::cudnnConvolutionBwdDataAlgo_t>>>,
    weight_grad: RefCell<HashMap<Key, Choice<sys::cudnnConvolutionBwdFilterAlgo_t>>>,
}

thread_local! {
    static HANDLES: RefCell<HashMap<DeviceId, Rc<Handle>>> = RefCell::new(HashMap::new());
}

impl Handle {
    pub(super) fn of(dev: &CudaDevice) -> Result<Rc<Self>> {
        HANDLES.with(|handles| {
            if let Some(handle) = handles.borrow().get(&dev.id()) {
                return Ok(handle.clone());
            }
            let stream = dev.cuda_stream();
            stream.context().bind_to_thread()?;
            let handle = Rc::new(Self {
                raw: result::create_handle()?,
                stream,
                forward: RefCell::default(),
                input_grad: RefCell::default(),
                weight_grad: RefCell::default(),
            });
            let cu_stream = handle.stream.cu_stream() as sys::cudaStream_t;
            // SAFETY: a handle just created, on candle's stream of this device, which outlives
            // the handle (it holds an Arc to it).
            unsafe { result::set_stream(handle.raw, cu_stream)? };
            handles.borrow_mut().insert(dev.id(), handle.clone());
            Ok(handle)
        })
    }

    /// The algorithm of pass `P` for these descriptors, picked once per dtype and geometry, with
    /// its math type set on `d.conv`.
    pub(super) fn choose<P: Pass>(
        &self,
        dtype: DType,
        g: &Geometry,
        d: &Descriptors,
    ) -> Result<Choice<P>> {
        let cached = P::cache(self).borrow().get(&(dtype, *g)).copied();
        let choice = match cached {
            Some(choice) => choice,
            None => {
                let choice = self.pick::<P>(dtype, d)?;
                P::cache(self).borrow_mut().insert((dtype, *g), choice);
                choice
            }
        };
        // SAFETY: a live descriptor.
        unsafe { result::set_convolution_math_type(d.conv.0, choice.math)? };
        Ok(choice)
    }

    /// The first entry of cuDNN's heuristic ranking that succeeds within [`MAX_WORKSPACE`] and,
    /// for f32, keeps full precision unless candle allows TF32 (as PyTorch chooses).
    fn pick<P: Pass>(&self, dtype: DType, d: &Descriptors) -> Result<Choice<P>> {
        let strict_f32 = dtype == DType::F32 && !candle_core::cuda::gemm_reduced_precision_f32();
        // SAFETY: plain C structs that cuDNN fills; all zeros is a valid value of each field.
        let mut perf: Vec<P::Perf> = vec![unsafe { std::mem::zeroed() }; P::COUNT];
        let count = P::rank(self, d, &mut perf)?;
        let ranked = &perf[..count.min(P::COUNT)];
        let usable = ranked
            .iter()
            .map(P::entry)
            .find(|&(_, status, memory, math)| {
                let tensor_op = matches!(
                    math,
                    CUDNN_TENSOR_OP_MATH | CUDNN_TENSOR_OP_MATH_ALLOW_CONVERSION
                );
                status == sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS
                    && memory <= MAX_WORKSPACE
                    && !(strict_f32 && tensor_op)
            });
        match usable {
            Some((algo, _, workspace, math)) => Ok(Choice {
                algo,
                workspace,
                math: if strict_f32 { CUDNN_FMA_MATH } else { math },
            }),
            None => bail!(
                "conv2d on CUDA: cuDNN ranks no {} algorithm for {dtype:?} within {} MiB of \
                 workspace",
                P::NAME,
                MAX_WORKSPACE >> 20
            ),
        }
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: created in `of`, destroyed only here; as for the descriptors, a failure can
        // only be ignored.
        let _ = unsafe { result::destroy_handle(self.raw) };
    }
}
