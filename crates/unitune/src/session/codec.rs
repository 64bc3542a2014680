//! Lossy codes for weight deltas: a symmetric grid `-levels..=levels` with one scale per row
//! (dim 0), and for grids coarser than int8, the grid steps packed several to a byte and
//! deflated.
//!
//! A tune's delta is close to Gaussian noise row by row (Adafactor moves every weight by about
//! its row's step size) and of high rank, so neither low rank nor sparsity shrinks it much: what
//! does is few grid steps plus entropy coding. The ±1 grid zeroes what lies within one RMS of
//! zero (68% of a Gaussian row) and gives the rest the magnitude of least squared error: about
//! 1.3 bits a weight, against 8 for int8, for 26% of a Gaussian row's energy lost (the
//! least-error ±1 grid loses 19% but takes 1.55 bits, as it zeroes only 46%). Rounding a tune's
//! delta so coarsely afterwards loses much of what the tune learnt; tunes are distilled into
//! it instead (`train::distill`).

use std::io::{Read, Write};

use candle_core::{DType, Tensor};

use crate::Result;

/// Where the ±1 grid's zero band ends, in row RMS: 68% of a Gaussian row is zeroed.
const TERNARY_ZERO_BAND: f64 = 1.0;

/// One scale per row (`[rows, 1]`) and each value's grid step (`[rows, n]`, whole numbers in
/// f32) for a 2+-D delta, on its device. int8 (`levels` 127) puts the row's largest magnitude at
/// the grid's end, so nothing clips; ±3 and ±7 clip the tails for a finer step, with the scale
/// of least squared error (Lloyd's alternation between the steps and the scale, from the best
/// step for a Gaussian row); ±1 zeroes the band [`TERNARY_ZERO_BAND`] (for fewer bits: see the
/// module doc) and fits the scale to the rest. Each rule gives a row that is already on its grid
/// back unchanged, so a session distilled into a grid is stored exactly.
pub(crate) fn grid(delta: &Tensor, levels: i32) -> Result<(Tensor, Tensor)> {
    let d = delta.to_dtype(DType::F32)?.flatten_from(1)?;
    let rms = d.sqr()?.mean_keepdim(1)?.sqrt()?;
    if levels == 1 {
        let band = (&rms * TERNARY_ZERO_BAND)?;
        let q = (d.sign()? * d.abs()?.broadcast_gt(&band)?.to_dtype(DType::F32)?)?;
        let count = q.abs()?.sum_keepdim(1)?;
        let sum = (&d * &q)?.sum_keepdim(1)?;
        let scale = (sum / count.maximum(1f64)?)?;
        return Ok((q, scale));
    }
    let steps = |scale: &Tensor| -> Result<Tensor> {
        // A zero row has scale 0: divide by the least positive number instead, giving steps 0.
        let safe = scale.maximum(f32::MIN_POSITIVE)?;
        Ok(d.broadcast_div(&safe)?
            .round()?
            .clamp(-levels as f32, levels as f32)?)
    };
    if levels >= 127 {
        let scale = (d.abs()?.max_keepdim(1)? / levels as f64)?;
        return Ok((steps(&scale)?, scale));
    }
    // The step of the uniform quantizer of least error for a unit Gaussian (Max 1960).
    let gaussian_step = if levels == 3 { 0.651 } else { 0.350 };
    let mut scale = (rms * gaussian_step)?;
    for _ in 0..4 {
        let q = steps(&scale)?;
        let num = (&d * &q)?.sum_keepdim(1)?;
        let den = q.sqr()?.sum_keepdim(1)?;
        let better = num.broadcast_div(&den.maximum(f32::MIN_POSITIVE)?)?;
        scale = den.gt(0f64)?.where_cond(&better, &scale)?;
    }
    // Lloyd's alternation can settle elsewhere from a row that is on a grid already (short
    // rows, sparse ones): such a row keeps its own scale, `max|row| / k` for its largest step k.
    let max = d.abs()?.max_keepdim(1)?;
    for k in (1..=levels).rev() {
        let own = (&max / k as f64)?;
        let off = (d.broadcast_div(&own.maximum(f32::MIN_POSITIVE)?)? - steps(&own)?)?
            .abs()?
            .max_keepdim(1)?;
        scale = off.le(1e-3)?.where_cond(&own, &scale)?;
    }
    Ok((steps(&scale)?, scale))
}

/// The delta as its grid gives it back: `scale * step`, in the delta's shape. Vectors (biases,
/// norms), which sessions keep in f16 under every grid code, come back as they are.
pub(crate) fn on_grid(delta: &Tensor, levels: i32) -> Result<Tensor> {
    if delta.rank() < 2 {
        return Ok(delta.clone());
    }
    let (steps, scale) = grid(delta, levels)?;
    Ok(steps.broadcast_mul(&scale)?.reshape(delta.shape())?)
}

/// How many grid steps share a byte: base-`2 levels + 1` digits.
fn per_byte(levels: i32) -> (u32, usize) {
    let base = (2 * levels + 1) as u32;
    let mut k = 1;
    while base.pow(k as u32 + 1) <= 256 {
        k += 1;
    }
    (base, k)
}

/// Grid steps packed `per_byte` to a byte, deflated.
pub(super) fn pack(steps: &[i8], levels: i32) -> Vec<u8> {
    let (base, k) = per_byte(levels);
    let packed: Vec<u8> = steps
        .chunks(k)
        .map(|digits| {
            digits
                .iter()
                .rev()
                .fold(0u32, |byte, &q| byte * base + (q as i32 + levels) as u32) as u8
        })
        .collect();
    let mut encoder =
        flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
    encoder
        .write_all(&packed)
        .and_then(|_| encoder.finish())
        .expect("deflating into memory cannot fail")
}

/// The `count` grid steps that [`pack`] wrote; `Err` says what is wrong with the bytes.
pub(super) fn unpack(bytes: &[u8], count: usize, levels: i32) -> Result<Vec<i8>, String> {
    let (base, k) = per_byte(levels);
    let expected = count.div_ceil(k);
    let mut packed = Vec::new();
    flate2::read::DeflateDecoder::new(bytes)
        .take(expected as u64 + 1)
        .read_to_end(&mut packed)
        .map_err(|e| format!("corrupt deflate stream ({e})"))?;
    if packed.len() != expected {
        return Err(format!(
            "holds {} packed bytes, its shape needs {expected}",
            packed.len()
        ));
    }
    let mut steps = Vec::with_capacity(expected * k);
    for &byte in &packed {
        if byte as u32 >= base.pow(k as u32) {
            return Err(format!("byte {byte} is not {k} steps of a ±{levels} grid"));
        }
        let mut rest = byte as u32;
        for _ in 0..k {
            steps.push((rest % base) as i8 - levels as i8);
            rest /= base;
        }
    }
    steps.truncate(count);
    Ok(steps)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gaussian_rows(rows: usize, len: usize) -> Vec<f32> {
        // Box-Muller on a fixed LCG: reproducible without a dependency.
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut uniform = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 11) as f64 + 0.5) / (1u64 << 53) as f64
        };
        (0..rows * len)
            .map(|i| {
                let g = (-2.0 * uniform().ln()).sqrt() * (std::f64::consts::TAU * uniform()).cos();
                (g * (1 + i / len) as f64 * 1e-3) as f32
            })
            .collect()
    }

    /// `grid` on `rows` rows of `values`, as plain vectors.
    fn quantize_rows(values: &[f32], rows: usize, levels: i32) -> (Vec<i8>, Vec<f32>) {
        let t = Tensor::from_slice(
            values,
            (rows, values.len() / rows),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let (steps, scales) = grid(&t, levels).unwrap();
        let steps = steps.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let scales = scales.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        (steps.into_iter().map(|q| q as i8).collect(), scales)
    }

    fn step(v: f32, scale: f32, levels: i32) -> i8 {
        (v / scale).round().clamp(-levels as f32, levels as f32) as i8
    }

    fn relative_error(values: &[f32], steps: &[i8], scales: &[f32]) -> f64 {
        let len = values.len() / scales.len();
        let (mut err, mut energy) = (0f64, 0f64);
        for (i, (&v, &q)) in values.iter().zip(steps).enumerate() {
            err += (v as f64 - q as f64 * scales[i / len] as f64).powi(2);
            energy += (v as f64).powi(2);
        }
        (err / energy).sqrt()
    }

    /// A row on a ±3 or ±7 grid comes back as it is, however short or sparse (Lloyd's
    /// alternation alone moves such rows, so a tune trained through the grid was not stored
    /// exactly).
    #[test]
    fn a_row_on_a_coarse_grid_keeps_its_own_scale() {
        let cpu = &candle_core::Device::Cpu;
        for levels in [3, 7] {
            // Short rows (a 4-channel 3x3 kernel's 36), and long ones of which only every
            // eighth weight moved.
            for (rows, len, every) in [(8, 36, 1), (4, 600, 8)] {
                let values: Vec<f32> = gaussian_rows(rows, len)
                    .into_iter()
                    .enumerate()
                    .map(|(i, v)| if i % every == 0 { v } else { 0.0 })
                    .collect();
                let delta = Tensor::from_vec(values, (rows, len), cpu).unwrap();
                let once = on_grid(&delta, levels).unwrap();
                let twice = on_grid(&once, levels).unwrap();
                let moved = (&twice - &once).unwrap().abs().unwrap().max_all().unwrap();
                let top = once.abs().unwrap().max_all().unwrap();
                let moved = moved.to_scalar::<f32>().unwrap() / top.to_scalar::<f32>().unwrap();
                assert!(
                    moved < 1e-5,
                    "±{levels}, {len} a row, every {every}: {moved}"
                );
            }
        }
    }

    #[test]
    fn coarse_grids_find_the_best_scale_and_round_trip() {
        let values = gaussian_rows(8, 3000);
        for (levels, bits) in [(3, 2.9), (7, 3.8)] {
            let (steps, scales) = quantize_rows(&values, 8, levels);
            let err = relative_error(&values, &steps, &scales);
            // The best scale by brute force, row by row.
            let (mut best_err, mut energy) = (0f64, 0f64);
            for row in values.chunks(3000) {
                let max = row.iter().fold(0f32, |m, v| m.max(v.abs()));
                best_err += (1..=2000)
                    .map(|i| {
                        let scale = max * i as f32 / 2000.0;
                        row.iter()
                            .map(|&v| {
                                (v as f64 - step(v, scale, levels) as f64 * scale as f64).powi(2)
                            })
                            .sum::<f64>()
                    })
                    .fold(f64::INFINITY, f64::min);
                energy += row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>();
            }
            let best = (best_err / energy).sqrt();
            assert!(err <= best * 1.005, "±{levels}: {err} (best {best})");
            let bytes = pack(&steps, levels);
            let per_weight = bytes.len() as f64 * 8.0 / values.len() as f64;
            println!("±{levels}: relative error {err:.3}, {per_weight:.2} bits a weight");
            assert!(
                per_weight <= bits,
                "±{levels}: {per_weight:.2} bits a weight"
            );
            assert_eq!(unpack(&bytes, steps.len(), levels).unwrap(), steps);
        }
    }

    #[test]
    fn the_ternary_grid_zeroes_within_one_rms_and_keeps_its_own_rows() {
        let values = gaussian_rows(8, 3000);
        let (steps, scales) = quantize_rows(&values, 8, 1);
        let zeros = steps.iter().filter(|&&q| q == 0).count() as f64 / steps.len() as f64;
        assert!((zeros - 0.683).abs() < 0.015, "{zeros}");
        // For a Gaussian: 1 - 0.317 * 1.525^2 = 0.263 of the energy is lost, the kept values'
        // mean magnitude being 1.525 sigma.
        let err = relative_error(&values, &steps, &scales);
        assert!((err * err - 0.263).abs() < 0.01, "{}", err * err);
        let bytes = pack(&steps, 1);
        let bits = bytes.len() as f64 * 8.0 / values.len() as f64;
        println!("±1: relative error {err:.3}, {bits:.2} bits a weight");
        assert!(bits < 1.33, "{bits:.2} bits a weight");
        assert_eq!(unpack(&bytes, steps.len(), 1).unwrap(), steps);
        // A row on the grid comes back as it is.
        let on: Vec<f32> = steps
            .iter()
            .enumerate()
            .map(|(i, &q)| q as f32 * scales[i / 3000])
            .collect();
        let (again, again_scales) = quantize_rows(&on, 8, 1);
        assert_eq!(again, steps);
        for (a, b) in again_scales.iter().zip(&scales) {
            assert!((a - b).abs() <= 1e-6 * b, "{a} vs {b}");
        }
    }

    #[test]
    fn int8_keeps_the_row_maximum() {
        let values = gaussian_rows(4, 100);
        let (steps, scales) = quantize_rows(&values, 4, 127);
        for (row, scale) in values.chunks(100).zip(&scales) {
            let max = row.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert_eq!(*scale, max / 127.0);
        }
        assert!(steps.iter().any(|&q| q.abs() == 127));
        assert!(relative_error(&values, &steps, &scales) < 0.02);
    }

    #[test]
    fn damaged_streams_are_refused() {
        let steps: Vec<i8> = (0..100).map(|i| (i % 3) as i8 - 1).collect();
        let bytes = pack(&steps, 1);
        assert!(unpack(&bytes, 101 + 5, 1).unwrap_err().contains("needs 22"));
        assert!(unpack(&bytes[..bytes.len() / 2], 100, 1).is_err());
        assert!(unpack(b"not deflate at all", 100, 1).is_err());
        // 255 is no 5 digits of base 3 (243 is the first that is not).
        let mut encoder = flate2::write::DeflateEncoder::new(Vec::new(), Default::default());
        encoder.write_all(&[255u8; 20]).unwrap();
        let err = unpack(&encoder.finish().unwrap(), 100, 1).unwrap_err();
        assert!(err.contains("255"), "{err}");
    }
}
