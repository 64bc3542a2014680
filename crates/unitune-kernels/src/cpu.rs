//! Access to the CPU storages that candle hands to the custom ops, shared by every kernel: the
//! contiguous elements of an argument in the dtype the kernel runs on, or an error naming the op
//! and the argument (the callers make their inputs contiguous, so that these errors only catch a
//! misuse of the op); and the kernels' outputs, built without a serial pre-fill.
//!
//! The `unitune` binary keeps freed memory in the heap, so that `vec![0.0; len]` (calloc) gets
//! reused memory which it must clear, on the calling thread alone while rayon's workers wait, only
//! for the kernel to overwrite every element. [`uninit_vec`] hands the kernel the unused capacity
//! of a `Vec` instead, as `MaybeUninit` elements that its parallel pieces of work write
//! themselves: through `MaybeUninit::write` (or `write_copy_of_slice`), a gemm that does not read
//! its destination ([`crate::matmul::gemm_uninit`], [`crate::matmul::Shared::gemm`]), or
//! [`zeroed`] where a piece adds into its output. A piece views its elements as `&mut [T]` only
//! once it has written them (`assume_init_mut`): a reference to uninitialised floats is undefined
//! behaviour even if never read.

use std::mem::MaybeUninit;

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, DType, Layout, Result, Storage, WithDType};

use crate::matmul::zero;

/// An argument of a custom op's CPU forward: its storage and layout.
pub(crate) type Arg<'a> = (&'a CpuStorage, &'a Layout);

/// The contiguous elements of `arg`, of dtype `T`; `op` and `what` name the op and the argument
/// in the errors.
pub(crate) fn contiguous<'a, T: WithDType>(
    op: &str,
    (storage, layout): (&'a CpuStorage, &Layout),
    what: &str,
) -> Result<&'a [T]> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        bail!("{op}: {what} must be contiguous")
    };
    match T::cpu_storage_as_slice(storage) {
        Ok(data) => Ok(&data[start..end]),
        Err(_) => bail!("{op}: {what} is {:?}, not {:?}", storage.dtype(), T::DTYPE),
    }
}

/// [`contiguous`] f32 elements of a tensor's storage, which must be on the CPU: for the
/// backwards that read their inputs' storages themselves.
pub(crate) fn cpu_f32<'a>(
    op: &str,
    storage: &'a Storage,
    layout: &Layout,
    what: &str,
) -> Result<&'a [f32]> {
    let Storage::Cpu(cpu) = storage else {
        bail!("{op}: {what} is not on the CPU")
    };
    contiguous(op, (cpu, layout), what)
}

/// The error of an op that runs on f32 and f64 only.
pub(crate) fn unsupported<R>(op: &str, dtype: DType) -> Result<R> {
    bail!("{op}: f32 or f64 expected, got {dtype:?}")
}

/// A `Vec` of `len` elements that `fill` writes into its unused capacity (see the module doc).
///
/// # Safety
/// `fill` must initialise all `len` elements before it returns.
pub(crate) unsafe fn uninit_vec<T>(len: usize, fill: impl FnOnce(&mut [MaybeUninit<T>])) -> Vec<T> {
    let mut buf = Vec::with_capacity(len);
    fill(&mut buf.spare_capacity_mut()[..len]);
    // SAFETY: the capacity is at least `len`, and `fill` initialised the first `len` elements (the
    // caller's promise). Should `fill` panic, `buf` is dropped empty: no element is read.
    unsafe { buf.set_len(len) };
    buf
}

/// `part` set to zeros, for a piece of work that adds into its output: done by the piece itself,
/// in parallel and just before use.
pub(crate) fn zeroed<T: WithDType>(part: &mut [MaybeUninit<T>]) -> &mut [T] {
    part.fill(MaybeUninit::new(zero()));
    // SAFETY: every element was just written.
    unsafe { part.assume_init_mut() }
}
