//! The matrix products the kernels are built on, shared by conv, linear and attention: a strided
//! view of an operand, the single-threaded gemm of the `gemm` crate into an output tile, and the
//! splitting of a job into pieces of work for rayon.
//!
//! Every kernel runs its own pieces of work in parallel, each piece calling a single-threaded
//! gemm: threads never wait on a nested parallel gemm, and jobs smaller than the thread count
//! still use every thread.

use std::marker::PhantomData;
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
/// `dst` must be valid for reads and writes at `r·dst_rs + c` for all `r < m`, `c < n`, and no
/// other thread may access those elements during the call.
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
    Mat::new(&*dst, dst_rs, 1).check(mnk.0, mnk.1);
    // SAFETY: bounds checked just above; the exclusive borrow keeps other threads out.
    unsafe { gemm_raw(dst.as_mut_ptr(), dst_rs, mnk, lhs, rhs, accumulate, scale) }
}

/// An output buffer that parallel pieces of work fill at once, each its own elements (which may
/// interleave with those of other pieces, so that they cannot be split into sub-slices up front).
pub(crate) struct Shared<'a, T> {
    ptr: *mut T,
    len: usize,
    _buf: PhantomData<&'a mut [T]>,
}

// SAFETY: a `Shared` is only a `&mut [T]` whose users promise (in the unsafe methods) to touch
// disjoint elements.
unsafe impl<T: Send> Send for Shared<'_, T> {}
unsafe impl<T: Send> Sync for Shared<'_, T> {}

impl<'a, T: WithDType> Shared<'a, T> {
    pub(crate) fn new(buf: &'a mut [T]) -> Self {
        Self {
            ptr: buf.as_mut_ptr(),
            len: buf.len(),
            _buf: PhantomData,
        }
    }

    /// The elements `range`.
    ///
    /// # Safety
    /// No other thread may access them while the slice lives.
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn slice(&self, range: Range<usize>) -> &mut [T] {
        assert!(
            range.start <= range.end && range.end <= self.len,
            "shared output out of bounds"
        );
        // SAFETY: in bounds, and exclusive by the caller's promise.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(range.start), range.len()) }
    }

    /// `lhs·rhs` (`+=` when `accumulate`) into the row-major matrix at `offset` with row
    /// stride `rs`.
    ///
    /// # Safety
    /// No other thread may access that matrix's elements during the call.
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
        assert!(
            m == 0 || n == 0 || offset + (m - 1) * rs + n <= self.len,
            "shared output out of bounds"
        );
        let one = T::from_f64(1.0);
        // SAFETY: in bounds, and exclusive by the caller's promise.
        unsafe { gemm_raw(self.ptr.add(offset), rs, mnk, lhs, rhs, accumulate, one) }
    }
}
