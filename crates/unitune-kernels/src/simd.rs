//! Pieces the kernels share: a vectorisable `exp` and `erf`, and run-time dispatch to AVX2 builds
//! of the hot loops. The crate is built for baseline x86-64, where loops vectorise 4 lanes wide;
//! the kernels compile their loops a second time with `#[target_feature(enable = "avx2")]`
//! (8 lanes) and pick that version when [`has_avx2`] says the CPU has it.

/// Whether the CPU runs AVX2 code (always false off x86-64).
#[inline]
pub fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    return std::arch::is_x86_feature_detected!("avx2");
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Helpers of the kernels' hand-written AVX2 + FMA loops (attention's softmax rows, layer norm's
/// row sums), which take rows of any length with a masked last vector.
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use std::arch::x86_64::*;

    /// Whether the CPU runs AVX2 + FMA code.
    pub(crate) fn available() -> bool {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }

    /// The sum of the 8 lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(crate) fn sum_lanes(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps::<1>(s, s)))
    }

    /// A row of `len` elements: its whole vectors, and the mask of the elements after them
    /// (lanes `0..len % 8`).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(crate) fn split(len: usize) -> (usize, __m256i) {
        let whole = len / 8 * 8;
        let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        let mask = _mm256_cmpgt_epi32(_mm256_set1_epi32((len - whole) as i32), lanes);
        (whole, mask)
    }
}

/// `eˣ` to about 1e-7 relative, in branch-free arithmetic that vectorises: `x = n·ln2 + r` with
/// `|r| ≤ ln2/2` (ln 2 split in two so that `n·ln2_hi` is exact), `eʳ` by Cephes' `expf`
/// polynomial, `2ⁿ` built in the exponent bits. Inputs below −86 give e⁻⁸⁶ ≈ 4e-38 (no subnormals;
/// negligible next to the row maximum's 1), above 88 give e⁸⁸; NaN stays NaN.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 355.0 / 512.0; // 9 significant bits
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding 1.5·2²³ rounds to an integer, which then sits in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let x = if x < -86.0 { -86.0 } else { x };
    let x = if x > 88.0 { 88.0 } else { x };
    let shifted = x * LOG2_E + ROUND;
    let n = shifted - ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = 1.987_569_1e-4;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let er = p * r * r + r + 1.0;
    let n = shifted.to_bits().wrapping_sub(ROUND.to_bits()) as i32;
    er * f32::from_bits(((n + 127) << 23) as u32)
}

/// `erf(x)` to about 1e-7 absolute (f32 rounding; the approximations themselves are within 4e-9),
/// in branch-free arithmetic that vectorises, where libm's `erff` is a scalar call with branches.
/// Both pieces are computed and one is selected (coefficients fitted by `dev/fit_erf.py`):
/// - `|x| < 0.875`: `x·P(x²)`, P of degree 5;
/// - above: `1 − e^(−x²)·N(|x|)/D(|x|)` with [`exp`], the rational approximating the smooth
///   `erfc(|x|)·e^(x²)`; `|x|` is capped at 4, where `erfc` (2e-8) no longer shows in f32.
///
/// NaN stays NaN, ±∞ gives ±1, and the sign of zero is kept.
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    let a = x.abs();
    let s = a * a;
    let p = -6.055_863_3e-4;
    let p = p * s + 5.000_88e-3;
    let p = p * s - 2.676_723_7e-2;
    let p = p * s + 1.128_163_3e-1;
    let p = p * s - 3.761_243_5e-1;
    // Fitted with the rest, one f32 step below 2/√π: the exact slope would more than double
    // the worst error.
    #[allow(clippy::approx_constant)]
    let p = p * s + 1.128_379_1;
    let small = a * p;
    let a = if a > 4.0 { 4.0 } else { a };
    let num = (2.349_363_4e-1 * a + 7.455_019_4e-1) * a + 1.000_680_4;
    let den = ((4.149_225_4e-1 * a + 1.339_812_4) * a + 1.878_555) * a + 1.0;
    let large = 1.0 - exp(-(a * a)) * (num / den);
    let y = if x.abs() < 0.875 { small } else { large };
    y.copysign(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_exp_is_accurate() {
        let mut worst = 0f64;
        for i in 0..=200_000 {
            let x = -86.0 + 174.0 * i as f32 / 200_000.0;
            let rel = ((exp(x) as f64 - (x as f64).exp()) / (x as f64).exp()).abs();
            worst = worst.max(rel);
        }
        println!("fast exp: max relative error {worst:.2e} on [-86, 88]");
        assert!(worst < 2e-7, "{worst}");
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(f32::NAN).is_nan());
        assert!(exp(f32::NEG_INFINITY) < 1e-37);
    }

    #[test]
    fn fast_erf_is_accurate() {
        use candle_core::cpu::erf::{erf_f32, erf_f64};
        // Reference: candle's f64 erf (a port of Boost's, accurate to about 1e-16), at f32 inputs.
        let (mut worst, mut worst_libm) = (0f64, 0f64);
        for i in 0..=1_200_000 {
            let x = -6.0 + 12.0 * i as f32 / 1_200_000.0;
            let exact = erf_f64(x as f64);
            worst = worst.max((erf(x) as f64 - exact).abs());
            worst_libm = worst_libm.max((erf_f32(x) as f64 - exact).abs());
        }
        println!(
            "fast erf: max absolute error {worst:.2e} on [-6, 6] (libm erff {worst_libm:.2e})"
        );
        assert!(worst < 1e-7, "{worst}");
        // Exact values at the ends, and the special values.
        assert_eq!(erf(6.0), 1.0);
        assert_eq!(erf(-1e30), -1.0);
        assert_eq!(erf(f32::INFINITY), 1.0);
        assert_eq!(erf(f32::NEG_INFINITY), -1.0);
        assert!(erf(f32::NAN).is_nan());
        assert_eq!(erf(-0.0).to_bits(), (-0.0f32).to_bits());
        // Odd, and accurate in relative terms near zero where erf(x) ~ 2x/sqrt(pi).
        for x in [1e-30f32, 1e-6, 0.3, 0.875, 2.0] {
            assert_eq!(erf(-x), -erf(x));
        }
        let tiny = 1e-6f32;
        let rel = (erf(tiny) as f64 / erf_f64(tiny as f64) - 1.0).abs();
        assert!(rel < 2e-7, "{rel}");
    }

    #[test]
    fn silu_saturates_cleanly() {
        let silu = |y: f32| y / (1.0 + exp(-y));
        assert_eq!(silu(200.0), 200.0);
        assert!(silu(-200.0).abs() < 1e-30);
    }
}
