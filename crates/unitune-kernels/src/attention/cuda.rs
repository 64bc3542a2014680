//! The fused attention on CUDA: launches the kernels of `cuda/attention.cu` (PTX built by
//! `build.rs`) on candle's CUDA device and stream. Same semantics and log-sum-exp as the CPU op;
//! f32, f16 and bf16 storage with f32 arithmetic; head widths up to [`MAX_HEAD_DIM`], `d_v = d`.

use candle_core::backend::BackendStorage;
use candle_core::cuda::cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda::{CudaDType, CudaStorage, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{bail, DType, Layout, Result, Shape, Storage, Tensor};
use half::{bf16, f16};

use super::{Dims, Heads};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/attention.ptx"));
const MODULE: &str = "unitune-attention";

/// The widest head the kernels hold in registers (`MAX_D` in attention.cu): SD 1.5's 1280 / 8.
pub const MAX_HEAD_DIM: usize = 160;
/// Rows per block and threads per block, as in attention.cu.
const ROWS: usize = 16;
const THREADS: u32 = 128;

/// Whether the CUDA kernels take a call of these sizes.
pub(super) fn supports(dims: &Dims) -> bool {
    dims.d == dims.dv && dims.d <= MAX_HEAD_DIM && dims.bh() <= 65_535
}

/// `(batch, head, row)` element strides of a tensor of `n` rows of `width` per head.
fn strides(dims: &Dims, n: usize, width: usize) -> [i64; 3] {
    let (heads, n, width) = (dims.heads as i64, n as i64, width as i64);
    match dims.layout {
        Heads::Split => [heads * n * width, n * width, width],
        Heads::Packed => [n * heads * width, width, heads * width],
    }
}

/// One block per `ROWS` rows of each head.
fn grid(dims: &Dims, rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows.div_ceil(ROWS) as u32, dims.bh() as u32, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn check(dims: &Dims) -> Result<()> {
    if !supports(dims) {
        bail!(
            "fused attention on CUDA: needs equal q/v head widths of at most {MAX_HEAD_DIM} and at \
             most 65535 batch x heads, got d {}, d_v {}, {} x {}",
            dims.d,
            dims.dv,
            dims.b,
            dims.heads
        )
    }
    Ok(())
}

/// The storage types the kernels exist for, with their names' suffix.
trait Element: CudaDType + DeviceRepr {
    const SUFFIX: &'static str;
}
impl Element for f32 {
    const SUFFIX: &'static str = "f32";
}
impl Element for f16 {
    const SUFFIX: &'static str = "f16";
}
impl Element for bf16 {
    const SUFFIX: &'static str = "bf16";
}

/// The kernel `attention_{stage}_{T}` of the module, loaded once per device.
macro_rules! kernel {
    ($dev:expr, $stage:literal, $t:ty) => {
        $dev.get_or_load_custom_func(
            &format!(
                concat!("attention_", $stage, "_{}"),
                <$t as Element>::SUFFIX
            ),
            MODULE,
            PTX,
        )
    };
}

/// Forward on q, k, v (contiguous, in the layout of `dims`): the output storage and the per-row
/// base-2 log-sum-exp `[bh, nq]` the backward needs.
pub(super) fn forward(
    dims: &Dims,
    scale: f32,
    [q, k, v]: [(&CudaStorage, &Layout); 3],
) -> Result<(CudaStorage, CudaSlice<f32>)> {
    check(dims)?;
    match q.0.dtype() {
        DType::F32 => forward_as::<f32>(dims, scale, [q, k, v]),
        DType::F16 => forward_as::<f16>(dims, scale, [q, k, v]),
        DType::BF16 => forward_as::<bf16>(dims, scale, [q, k, v]),
        other => bail!("fused attention on CUDA: no kernel for {other:?}"),
    }
}

fn forward_as<T: Element>(
    dims: &Dims,
    scale: f32,
    [q, k, v]: [(&CudaStorage, &Layout); 3],
) -> Result<(CudaStorage, CudaSlice<f32>)> {
    if [q, k, v].iter().any(|(_, l)| !l.is_contiguous()) {
        bail!("fused attention on CUDA: non-contiguous input")
    }
    let dev = &q.0.device;
    let [q, k, v] = [q, k, v].map(|(s, l)| s.as_cuda_slice::<T>().map(|s| (s, l.start_offset())));
    let ((q, q_at), (k, k_at), (v, v_at)) = (q?, k?, v?);
    let (q, k, v) = (q.slice(q_at..), k.slice(k_at..), v.slice(v_at..));
    let Dims {
        heads, nq, nk, d, ..
    } = *dims;
    // SAFETY (both): the forward kernel writes every element.
    let out = unsafe { dev.alloc::<T>(dims.bh() * nq * d)? };
    let lse = unsafe { dev.alloc::<f32>(dims.bh() * nq)? };
    let [qs, ks] = [strides(dims, nq, d), strides(dims, nk, d)];
    let f = kernel!(dev, "forward", T)?;
    let mut launch = f.builder();
    launch.arg(&q).arg(&k).arg(&v).arg(&out).arg(&lse);
    let (heads, nq, nk, d, scale2) = (
        heads as i32,
        nq as i32,
        nk as i32,
        d as i32,
        scale * std::f32::consts::LOG2_E,
    );
    launch.arg(&heads).arg(&nq).arg(&nk).arg(&d).arg(&scale2);
    qs.iter().chain(&ks).for_each(|s| {
        launch.arg(s);
    });
    // SAFETY: the arguments match the kernel's signature in attention.cu.
    unsafe { launch.launch(grid(dims, dims.nq)) }.w()?;
    Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), lse))
}

/// The gradients of q, k and v, from the forward's inputs, output and log-sum-exp and the
/// output's gradient (all contiguous, in the layout of `dims`).
pub(super) fn backward(
    dims: &Dims,
    scale: f32,
    lse: &CudaSlice<f32>,
    [q, k, v, out, grad_out]: [&Tensor; 5],
) -> Result<[Tensor; 3]> {
    check(dims)?;
    match q.dtype() {
        DType::F32 => backward_as::<f32>(dims, scale, lse, [q, k, v, out, grad_out]),
        DType::F16 => backward_as::<f16>(dims, scale, lse, [q, k, v, out, grad_out]),
        DType::BF16 => backward_as::<bf16>(dims, scale, lse, [q, k, v, out, grad_out]),
        other => bail!("fused attention on CUDA: no kernel for {other:?}"),
    }
}

fn backward_as<T: Element>(
    dims: &Dims,
    scale: f32,
    lse: &CudaSlice<f32>,
    tensors: [&Tensor; 5],
) -> Result<[Tensor; 3]> {
    let guards = tensors.map(|t| t.storage_and_layout());
    let mut views = Vec::with_capacity(5);
    let mut dev = None;
    for (storage, layout) in guards.iter() {
        let Storage::Cuda(storage) = &**storage else {
            bail!("fused attention: a CUDA forward with a tensor off the GPU in its backward")
        };
        if !layout.is_contiguous() {
            bail!("fused attention on CUDA: backward on a non-contiguous tensor")
        }
        dev.get_or_insert_with(|| storage.device.clone());
        views.push(storage.as_cuda_slice::<T>()?.slice(layout.start_offset()..));
    }
    let dev = dev.expect("five tensors were read");
    let [q, k, v, out, grad_out] = &views[..] else {
        unreachable!("five tensors were read")
    };
    let Dims {
        heads, nq, nk, d, ..
    } = *dims;
    let bh = dims.bh();
    // SAFETY (all four): the kernels below write every element.
    let delta = unsafe { dev.alloc::<f32>(bh * nq)? };
    let dq = unsafe { dev.alloc::<T>(bh * nq * d)? };
    let dk = unsafe { dev.alloc::<T>(bh * nk * d)? };
    let dv = unsafe { dev.alloc::<T>(bh * nk * d)? };
    let [qs, ks] = [strides(dims, nq, d), strides(dims, nk, d)];
    let (heads, nq_, nk_, d_) = (heads as i32, nq as i32, nk as i32, d as i32);
    let scale2 = scale * std::f32::consts::LOG2_E;

    let f = kernel!(dev, "delta", T)?;
    let mut launch = f.builder();
    launch.arg(out).arg(grad_out).arg(&delta);
    launch.arg(&heads).arg(&nq_).arg(&d_);
    qs.iter().for_each(|s| {
        launch.arg(s);
    });
    // SAFETY: the arguments match the kernel's signature in attention.cu.
    unsafe { launch.launch(grid(dims, nq)) }.w()?;

    let f = kernel!(dev, "dq", T)?;
    let mut launch = f.builder();
    launch
        .arg(q)
        .arg(k)
        .arg(v)
        .arg(grad_out)
        .arg(lse)
        .arg(&delta)
        .arg(&dq);
    launch
        .arg(&heads)
        .arg(&nq_)
        .arg(&nk_)
        .arg(&d_)
        .arg(&scale)
        .arg(&scale2);
    qs.iter().chain(&ks).for_each(|s| {
        launch.arg(s);
    });
    // SAFETY: as above.
    unsafe { launch.launch(grid(dims, nq)) }.w()?;

    let f = kernel!(dev, "dkv", T)?;
    let mut launch = f.builder();
    launch
        .arg(q)
        .arg(k)
        .arg(v)
        .arg(grad_out)
        .arg(lse)
        .arg(&delta)
        .arg(&dk)
        .arg(&dv);
    launch
        .arg(&heads)
        .arg(&nq_)
        .arg(&nk_)
        .arg(&d_)
        .arg(&scale)
        .arg(&scale2);
    qs.iter().chain(&ks).for_each(|s| {
        launch.arg(s);
    });
    // SAFETY: as above.
    unsafe { launch.launch(grid(dims, nk)) }.w()?;

    drop(views);
    drop(guards);
    let tensor = |slice: CudaSlice<T>, shape: Shape| {
        let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(slice, dev.clone()));
        Tensor::from_storage(storage, shape, BackpropOp::none(), false)
    };
    Ok([
        tensor(dq, dims.shape(nq, d)),
        tensor(dk, dims.shape(nk, d)),
        tensor(dv, dims.shape(nk, d)),
    ])
}
