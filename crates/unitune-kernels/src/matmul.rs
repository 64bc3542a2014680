//! The matrix products the kernels are built on, shared by conv, linear and attention: a strided
//! view of an operand, the single-threaded gemm of the `gemm` crate into an output tile, and the
//! splitting of a job into pieces of work for rayon.
//!
//! Every kernel runs its own pieces of work in parallel, each piece calling a single-threaded
//! gemm: threads never wait on a nested parallel gemm, and jobs smaller than the thread count
//! still use every thread.

use std::marker::PhantomData;
use std::mem::MaybeUninit;
use std::ops::Range;

use candle_core::WithDType;
use gemm::Parallelism;

pub(crate) fn zero<T: WithDType>() -> T {
    T::from_f64(0.0)
}

/// `0..len` cut into consecutive ranges of `size` (the last may be shorter).
pub(crate) fn chunks(len: usize, size: usize) -> impl Iterator<Item = Range<usize>> + Clone {
    (0..len)
        .step_by(size)
        .map(move |start| start..(start + size).min(len))
}

/// Pieces of work to cut a job into: twice the threads, so that they even out when some threads
/// are slower (shared CPU) or the piece count is not a multiple of the thread count.
pub(crate) fn pieces() -> usize {
    2 * rayon::current_num_threads()
}

/// A strided matrix: element `(r, c)` is `data[r·rs + c·cs]`.
#[derive(Clone, Copy)]
pub(crate) struct Mat<'a, T> {
    data: &'a [T],
    rs: usize,
    cs: usize,
}

impl<'a, T> Mat<'a, T> {
    pub(crate) fn new(data: &'a [T], rs: usize, cs: usize) -> Self {
        Self { data, rs, cs }
    }

    /// Panics unless every element of a `rows x cols` matrix lies in `data`.
    pub(crate) fn check(&self, rows: usize, cols: usize) {
        assert!(
            rows == 0 || cols == 0 || (rows - 1) * self.rs + (cols - 1) * self.cs < self.data.len(),
            "matrix out of bounds"
        );
    }

    /// The matrix from row `r` and column `c` on.
    pub(crate) fn from(&self, r: usize, c: usize) -> Self {
        Self::new(&self.data[r * self.rs + c * self.cs..], self.rs, self.cs)
    }

    /// The transpose (no copy).
    pub(crate) fn t(self) -> Self {
        Self::new(self.data, self.cs, self.rs)
    }
}

/// `dst = scale·lhs·rhs`, or `dst += scale·lhs·rhs` when `accumulate`, for `(m, n, k)` = (rows
/// of `dst`, columns of `dst`, the inner size); `dst` is row-major with row stride `dst_rs`.
/// Single-threaded: the callers run one piece of work per thread.
///
/// # Safety
/// `dst` must be valid for writes at `r·dst_rs + c` for all `r < m`, `c < n`, and no other thread
/// may access those elements during the call. When `accumulate`, they must be initialised; when
/// not, gemm writes them without reading them, but see [`gemm_overwrite`].
unsafe fn gemm_raw<T: WithDType>(
    dst: *mut T,
    dst_rs: usize,
    (m, n, k): (usize, usize, usize),
    lhs: Mat<'_, T>,
    rhs: Mat<'_, T>,
    accumulate: bool,
    scale: T,
) {
    lhs.check(m, k);
    rhs.check(k, n);
    if m == 0 || n == 0 {
        return;
    }
    // SAFETY: the operands were bounds-checked above, `dst` is the caller's promise.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
            T::from_f64(1.0),
            scale,
            false,
            false,
            false,
            Parallelism::None,
        )
    }
}

/// [`gemm_raw`] without accumulating, into elements that need not be initialised, which it
/// initialises. gemm reads no destination element then (`read_dst` false: its kernels take the
/// `alpha = 0` paths; with `k = 0` it writes zeros), but its matrix-vector paths (an output of one
/// row or one column) view the destination as a `&mut [T]`, which must not cover uninitialised
/// memory: such an output, a vector, is zeroed first.
///
/// # Safety
/// As [`gemm_raw`], less the initialisation.
unsafe fn gemm_overwrite<T: WithDType>(
    dst: *mut T,
    dst_rs: usize,
    mnk: (usize, usize, usize),
    lhs: Mat<'_, T>,
    rhs: Mat<'_, T>,
    scale: T,
) {
    let (m, n, _) = mnk;
    if m <= 1 || n <= 1 {
        for r in 0..m {
            for c in 0..n {
                // SAFETY: an element of the output (the caller's promise).
                unsafe { dst.add(r * dst_rs + c).write(zero()) }
            }
        }
    }
    // SAFETY: the caller's promise; the elements are initialised where gemm views them.
    unsafe { gemm_raw(dst, dst_rs, mnk, lhs, rhs, false, scale) }
}

/// Panics unless the `m x n` matrix with row stride `rs` at `offset` lies in `len` elements.
fn check_dst(offset: usize, rs: usize, (m, n): (usize, usize), len: usize) {
    assert!(
        m == 0 || n == 0 || offset + (m - 1) * rs + n <= len,
        "gemm output out of bounds"
    );
}

/// [`gemm_raw`] into a row-major slice.
pub(crate) fn gemm_into<T: WithDType>(
    dst: &mut [T],
    dst_rs: usize,
    mnk: (usize, usize, usize),
    lhs: Mat<'_, T>,
    rhs: Mat<'_, T>,
    accumulate: bool,
    scale: T,
) {
    check_dst(0, dst_rs, (mnk.0, mnk.1), dst.len());
    // SAFETY: bounds checked just above, initialised; the exclusive borrow keeps other threads
    // out.
    unsafe { gemm_raw(dst.as_mut_ptr(), dst_rs, mnk, lhs, rhs, accumulate, scale) }
}

/// `dst = scale·lhs·rhs` into a row-major slice that need not be initialised: its `m x n`
/// elements (row stride `dst_rs`) are all written.
pub(crate) fn gemm_uninit<T: WithDType>(
    dst: &mut [MaybeUninit<T>],
    dst_rs: usize,
    mnk: (usize, usize, usize),
    lhs: Mat<'_, T>,
    rhs: Mat<'_, T>,
    scale: T,
) {
    check_dst(0, dst_rs, (mnk.0, mnk.1), dst.len());
    // SAFETY: bounds checked just above; the exclusive borrow keeps other threads out.
    unsafe { gemm_overwrite(dst.as_mut_ptr().cast(), dst_rs, mnk, lhs, rhs, scale) }
}

/// An output buffer that parallel pieces of work fill at once, each its own elements (which may
/// interleave with those of other pieces, so that they cannot be split into sub-slices up front).
/// Its elements may start uninitialised (see [`crate::cpu::uninit_vec`]).
pub(crate) struct Shared<'a, T> {
    ptr: *mut T,
    len: usize,
    _buf: PhantomData<&'a mut [MaybeUninit<T>]>,
}

// SAFETY: a `Shared` is only a `&mut [MaybeUninit<T>]` whose users promise (in the unsafe methods)
// to touch disjoint elements.
unsafe impl<T: Send> Send for Shared<'_, T> {}
unsafe impl<T: Send> Sync for Shared<'_, T> {}

impl<'a, T: WithDType> Shared<'a, T> {
    /// Over elements that may be uninitialised.
    pub(crate) fn new(buf: &'a mut [MaybeUninit<T>]) -> Self {
        Self {
            ptr: buf.as_mut_ptr().cast(),
            len: buf.len(),
            _buf: PhantomData,
        }
    }

    /// Over initialised elements.
    pub(crate) fn init(buf: &'a mut [T]) -> Self {
        Self {
            ptr: buf.as_mut_ptr(),
            len: buf.len(),
            _buf: PhantomData,
        }
    }

    /// A pointer to the elements `range`.
    fn at(&self, range: Range<usize>) -> *mut T {
        assert!(
            range.start <= range.end && range.end <= self.len,
            "shared output out of bounds"
        );
        // SAFETY: in bounds.
        unsafe { self.ptr.add(range.start) }
    }

    /// The elements `range`, to write.
    ///
    /// # Safety
    /// No other thread may access them while the slice lives.
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn uninit(&self, range: Range<usize>) -> &mut [MaybeUninit<T>] {
        // SAFETY: in bounds, and exclusive by the caller's promise; any bits are a valid
        // `MaybeUninit`, and only initialised values can be written through it.
        unsafe { std::slice::from_raw_parts_mut(self.at(range.clone()).cast(), range.len()) }
    }

    /// The elements `range`, which must be initialised.
    ///
    /// # Safety
    /// No other thread may access them while the slice lives, and they must have been written.
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn slice(&self, range: Range<usize>) -> &mut [T] {
        // SAFETY: in bounds, exclusive and initialised by the caller's promise.
        unsafe { std::slice::from_raw_parts_mut(self.at(range.clone()), range.len()) }
    }

    /// `lhs·rhs` (`+=` when `accumulate`) into the row-major matrix at `offset` with row
    /// stride `rs`. Without `accumulate` the matrix need not be initialised, and is afterwards.
    ///
    /// # Safety
    /// No other thread may access that matrix's elements during the call, and when `accumulate`
    /// they must have been written.
    pub(crate) unsafe fn gemm(
        &self,
        offset: usize,
        rs: usize,
        mnk: (usize, usize, usize),
        lhs: Mat<'_, T>,
        rhs: Mat<'_, T>,
        accumulate: bool,
    ) {
        let (m, n, _) = mnk;
        check_dst(offset, rs, (m, n), self.len);
        let one = T::from_f64(1.0);
        // SAFETY: in bounds, exclusive by the caller's promise, and initialised when read.
        unsafe {
            let dst = self.ptr.wrapping_add(offset);
            if accumulate {
                gemm_raw(dst, rs, mnk, lhs, rhs, true, one)
            } else {
                gemm_overwrite(dst, rs, mnk, lhs, rhs, one)
            }
        }
    }
}
