//! Test helpers shared by the kernels' tests: deterministic inputs and a relative error.

use candle_core::{DType, Device, Tensor};

/// Deterministic values uniform in [-1, 1) (xorshift64*).
pub(crate) fn values(len: usize, seed: u64) -> Vec<f64> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            let bits = state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11;
            bits as f64 / (1u64 << 52) as f64 - 1.0
        })
        .collect()
}

pub(crate) fn sample(dims: &[usize], seed: u64, dtype: DType) -> Tensor {
    let len = dims.iter().product();
    Tensor::from_vec(values(len, seed), dims, &Device::Cpu)
        .and_then(|t| t.to_dtype(dtype))
        .expect("sample tensor")
}

/// `max |a - b| / max |b|`.
pub(crate) fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims());
    let flat = |t: &Tensor| -> Vec<f64> {
        t.to_dtype(DType::F64)
            .and_then(|t| t.flatten_all()?.to_vec1())
            .expect("to_vec")
    };
    let (a, b) = (flat(a), flat(b));
    let diff = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max);
    let scale = b.iter().map(|y| y.abs()).fold(0.0, f64::max);
    assert!(scale > 0.0, "a reference of zeros proves nothing");
    diff / scale
}
