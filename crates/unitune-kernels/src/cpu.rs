//! Access to the CPU storages that candle hands to the custom ops, shared by every kernel: the
//! contiguous elements of an argument in the dtype the kernel runs on, or an error naming the op
//! and the argument (the callers make their inputs contiguous, so that these errors only catch a
//! misuse of the op).

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, DType, Layout, Result, Storage, WithDType};

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
