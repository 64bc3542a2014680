//! Edit masks: where an edit may change the image, one weight per pixel in `[0, 1]` (1 = may
//! change, white in a mask file).
//!
//! A mask comes from a file (binarised at half grey after resizing to the image) or is estimated
//! from where an unmasked edit differs from the base ([`AutoMask`]). The edit pipeline then uses
//! it twice: at latent resolution during sampling ([`Mask::latent`]) and, feathered
//! ([`Mask::feathered`]), to composite the decoded sample over the base pixels, so that pixels
//! farther than the feather width from the mask are the base's exactly.

use std::path::Path;

use candle_core::{Device, Tensor};
use image::{DynamicImage, GrayImage, Luma, RgbImage};

use crate::image_io::load_image;
use crate::{Error, Result};

/// How [`Mask::from_difference`] turns an edit into a mask. Defaults: `blur` 4 px, `threshold`
/// 0.1, `dilate` 16 px.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AutoMask {
    /// A pixel is changed when its blurred difference (mean over RGB of |edit - base|, in
    /// `[0, 1]`) exceeds this. 0.1 (about 25/255) is well above the few levels a VAE round trip
    /// alone moves a pixel, and below the change of any visible edit.
    pub threshold: f64,
    /// Radius in pixels of the box blur applied to the difference before the threshold, so that
    /// isolated noisy pixels do not count and thin changes are joined.
    pub blur: usize,
    /// Radius in pixels by which the thresholded region grows, to take in the edges of the edit
    /// (shadows, outlines) that changed less than the threshold.
    pub dilate: usize,
}

impl Default for AutoMask {
    fn default() -> Self {
        Self {
            threshold: 0.1,
            blur: 4,
            dilate: 16,
        }
    }
}

impl AutoMask {
    pub fn check(&self) -> Result<()> {
        if !(self.threshold > 0.0 && self.threshold < 1.0) {
            return Err(Error::argument(
                "mask-threshold",
                format!("{} is not in (0, 1)", self.threshold),
            ));
        }
        Ok(())
    }
}

/// A per-pixel weight map, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Mask {
    width: usize,
    height: usize,
    weights: Vec<f32>,
}

impl Mask {
    /// `weights` are row-major, `width * height` of them, each in `[0, 1]`.
    pub fn new(width: usize, height: usize, weights: Vec<f32>) -> Result<Self> {
        if weights.len() != width * height {
            return Err(Error::argument(
                "mask",
                format!("{} weights for {width}x{height}", weights.len()),
            ));
        }
        if let Some(w) = weights.iter().find(|w| !(0.0..=1.0).contains(*w)) {
            return Err(Error::argument(
                "mask",
                format!("weight {w} is not in [0, 1]"),
            ));
        }
        Ok(Self {
            width,
            height,
            weights,
        })
    }

    /// The weights of `f(x, y)` (clamped to `[0, 1]`).
    pub fn from_fn(width: usize, height: usize, f: impl Fn(usize, usize) -> f32) -> Self {
        let weights = (0..height)
            .flat_map(|y| (0..width).map(move |x| (x, y)))
            .map(|(x, y)| f(x, y).clamp(0.0, 1.0))
            .collect();
        Self {
            width,
            height,
            weights,
        }
    }

    /// A mask picture resized to `width` x `height` (bilinear) and binarised: pixels whose
    /// luminance is at least half (128 of 255) may change.
    pub fn from_image(image: &RgbImage, width: usize, height: usize) -> Self {
        let gray = DynamicImage::ImageRgb8(image.clone()).to_luma8();
        let gray = if gray.dimensions() == (width as u32, height as u32) {
            gray
        } else {
            image::imageops::resize(
                &gray,
                width as u32,
                height as u32,
                image::imageops::FilterType::Triangle,
            )
        };
        Self {
            width,
            height,
            weights: gray
                .pixels()
                .map(|p| if p[0] >= 128 { 1.0 } else { 0.0 })
                .collect(),
        }
    }

    /// Reads a mask file (PNG, JPEG or WebP; white = may change) for an image of `width` x `height`.
    pub fn load(path: &Path, width: usize, height: usize) -> Result<Self> {
        Ok(Self::from_image(&load_image(path)?, width, height))
    }

    /// The region where `edit` differs from `base` (same size), as [`AutoMask`] describes.
    pub fn from_difference(edit: &RgbImage, base: &RgbImage, params: &AutoMask) -> Result<Self> {
        params.check()?;
        if edit.dimensions() != base.dimensions() {
            return Err(Error::argument(
                "image",
                format!(
                    "edit is {:?} but the base is {:?}",
                    edit.dimensions(),
                    base.dimensions()
                ),
            ));
        }
        let (width, height) = (base.width() as usize, base.height() as usize);
        let difference: Vec<f32> = edit
            .pixels()
            .zip(base.pixels())
            .map(|(e, b)| {
                (0..3)
                    .map(|c| (e[c] as f32 - b[c] as f32).abs())
                    .sum::<f32>()
                    / (3.0 * 255.0)
            })
            .collect();
        let difference = box_blur(&difference, width, height, params.blur);
        let changed: Vec<bool> = difference
            .iter()
            .map(|&d| d as f64 > params.threshold)
            .collect();
        let distance = distance_to(&changed, width, height);
        let weights = distance
            .iter()
            .map(|&d| if d <= params.dilate as f32 { 1.0 } else { 0.0 })
            .collect();
        Ok(Self {
            width,
            height,
            weights,
        })
    }

    pub fn width(&self) -> usize {
        self.width
    }

    pub fn height(&self) -> usize {
        self.height
    }

    /// Row-major weights.
    pub fn weights(&self) -> &[f32] {
        &self.weights
    }

    /// True when no pixel may change.
    pub fn is_empty(&self) -> bool {
        self.weights.iter().all(|&w| w == 0.0)
    }

    /// The mask with its edge feathered outward: the region (weights >= 0.5) keeps weight 1 and
    /// a pixel at distance `d` from it gets `1 - d / feather`, so the weight falls linearly to 0
    /// over `feather` pixels and every pixel `feather` or more pixels away is 0. `feather` 0
    /// gives the hard region.
    pub fn feathered(&self, feather: usize) -> Self {
        let region: Vec<bool> = self.weights.iter().map(|&w| w >= 0.5).collect();
        let distance = distance_to(&region, self.width, self.height);
        let weights = distance
            .iter()
            .map(|&d| {
                if feather == 0 {
                    (d == 0.0) as u8 as f32
                } else {
                    (1.0 - d / feather as f32).max(0.0)
                }
            })
            .collect();
        Self {
            width: self.width,
            height: self.height,
            weights,
        }
    }

    /// The mask at latent resolution (`factor` pixels per latent along each side, the sizes
    /// multiples of it): a latent may change (1) when any pixel of its block has a weight above
    /// 0, so that sampling is free wherever the composite will show the sample.
    pub fn latent(&self, factor: usize) -> Result<Self> {
        if factor == 0 || !self.width.is_multiple_of(factor) || !self.height.is_multiple_of(factor)
        {
            return Err(Error::argument(
                "mask",
                format!(
                    "{}x{} is not a multiple of the latent factor {factor}",
                    self.width, self.height
                ),
            ));
        }
        let (w, h) = (self.width / factor, self.height / factor);
        let mask = Self::from_fn(w, h, |lx, ly| {
            let block = (ly * factor..(ly + 1) * factor)
                .flat_map(|y| (lx * factor..(lx + 1) * factor).map(move |x| (x, y)));
            let any = block
                .into_iter()
                .any(|(x, y)| self.weights[y * self.width + x] > 0.0);
            any as u8 as f32
        });
        Ok(mask)
    }

    /// `[1, 1, h, w]` f32.
    pub fn to_tensor(&self, device: &Device) -> Result<Tensor> {
        Ok(Tensor::from_vec(
            self.weights.clone(),
            (1, 1, self.height, self.width),
            device,
        )?)
    }

    /// As an 8-bit picture (white = 1), grey in RGB so that it saves with `image_io::save_png`.
    pub fn to_image(&self) -> RgbImage {
        let gray = GrayImage::from_fn(self.width as u32, self.height as u32, |x, y| {
            Luma([(self.weights[y as usize * self.width + x as usize] * 255.0).round() as u8])
        });
        DynamicImage::ImageLuma8(gray).to_rgb8()
    }
}

/// Box blur of radius `r` (a `2r + 1` square window, edges clamped), separably.
fn box_blur(values: &[f32], width: usize, height: usize, r: usize) -> Vec<f32> {
    if r == 0 {
        return values.to_vec();
    }
    let pass = |src: &[f32], len: usize, count: usize, at: &dyn Fn(usize, usize) -> usize| {
        let mut out = vec![0f32; src.len()];
        for line in 0..count {
            for i in 0..len {
                let sum: f32 = (i as isize - r as isize..=(i + r) as isize)
                    .map(|j| src[at(line, j.clamp(0, len as isize - 1) as usize)])
                    .sum();
                out[at(line, i)] = sum / (2 * r + 1) as f32;
            }
        }
        out
    };
    let rows = pass(values, width, height, &|y, x| y * width + x);
    pass(&rows, height, width, &|x, y| y * width + x)
}

/// Euclidean distance of every pixel to the nearest `true` one (infinite when there is none),
/// exactly, in linear time: Felzenszwalb and Huttenlocher's squared distance transform ("Distance
/// Transforms of Sampled Functions", 2012) along columns, then along rows.
fn distance_to(set: &[bool], width: usize, height: usize) -> Vec<f32> {
    // A finite stand-in for infinity keeps the envelope arithmetic free of inf - inf.
    const FAR: f64 = 1e20;
    let mut squared: Vec<f64> = set.iter().map(|&s| if s { 0.0 } else { FAR }).collect();
    let mut line = Vec::new();
    for x in 0..width {
        line.clear();
        line.extend((0..height).map(|y| squared[y * width + x]));
        for (y, d) in squared_distance_1d(&line).into_iter().enumerate() {
            squared[y * width + x] = d;
        }
    }
    for y in 0..height {
        let row = &mut squared[y * width..(y + 1) * width];
        let d = squared_distance_1d(row);
        row.copy_from_slice(&d);
    }
    squared
        .iter()
        .map(|&d| {
            if d >= FAR / 2.0 {
                f32::INFINITY
            } else {
                d.sqrt() as f32
            }
        })
        .collect()
}

/// `d(q) = min_p (q - p)^2 + f(p)`: the lower envelope of parabolas rooted at each `p`.
fn squared_distance_1d(f: &[f64]) -> Vec<f64> {
    let n = f.len();
    if n == 0 {
        return Vec::new();
    }
    let mut roots = vec![0usize; n]; // v: the parabolas of the envelope
    let mut bounds = vec![0f64; n + 1]; // z: where each takes over
    let mut k = 0;
    bounds[0] = f64::NEG_INFINITY;
    bounds[1] = f64::INFINITY;
    let intersection = |p: usize, q: usize| {
        let (p2, q2) = ((p * p) as f64, (q * q) as f64);
        ((f[q] + q2) - (f[p] + p2)) / (2.0 * (q as f64 - p as f64))
    };
    for q in 1..n {
        let mut s = intersection(roots[k], q);
        while s <= bounds[k] {
            k -= 1;
            s = intersection(roots[k], q);
        }
        k += 1;
        roots[k] = q;
        bounds[k] = s;
        bounds[k + 1] = f64::INFINITY;
    }
    k = 0;
    (0..n)
        .map(|q| {
            while bounds[k + 1] < q as f64 {
                k += 1;
            }
            let d = q as f64 - roots[k] as f64;
            d * d + f[roots[k]]
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn brute_force_distance(set: &[bool], width: usize, height: usize) -> Vec<f32> {
        (0..width * height)
            .map(|i| {
                let (x, y) = ((i % width) as f32, (i / width) as f32);
                (0..width * height)
                    .filter(|&j| set[j])
                    .map(|j| {
                        (((j % width) as f32 - x).powi(2) + ((j / width) as f32 - y).powi(2)).sqrt()
                    })
                    .fold(f32::INFINITY, f32::min)
            })
            .collect()
    }

    #[test]
    fn distance_transform_is_exact() {
        let (w, h) = (13, 9);
        // A scattered, irregular set (a cheap hash picks about one pixel in seven).
        let set: Vec<bool> = (0..w * h)
            .map(|i: usize| (i.wrapping_mul(2654435761) >> 8).is_multiple_of(7))
            .collect();
        let fast = distance_to(&set, w, h);
        let slow = brute_force_distance(&set, w, h);
        for (i, (a, b)) in fast.iter().zip(&slow).enumerate() {
            assert!((a - b).abs() < 1e-5, "pixel {i}: {a} vs {b}");
        }
        assert!(distance_to(&vec![false; w * h], w, h)
            .iter()
            .all(|d| d.is_infinite()));
    }

    #[test]
    fn feather_ramps_outward_and_ends_at_its_width() {
        // A 4x4 square at (8..12, 8..12) in 24x24.
        let mask = Mask::from_fn(24, 24, |x, y| {
            ((8..12).contains(&x) && (8..12).contains(&y)) as u8 as f32
        });
        let f = mask.feathered(4);
        let at = |x: usize, y: usize| f.weights()[y * 24 + x];
        assert_eq!(at(8, 8), 1.0);
        assert_eq!(at(11, 10), 1.0);
        assert_eq!(at(12, 10), 0.75); // one pixel out
        assert_eq!(at(14, 10), 0.25);
        assert_eq!(at(15, 10), 0.0); // four pixels out: the base
        assert_eq!(at(20, 20), 0.0);
        assert_eq!(mask.feathered(0), mask);
    }

    #[test]
    fn latent_mask_frees_every_block_the_feather_reaches() {
        // The rectangle x in 16..40, y in 8..32 of 64x48 feathered by 8 reaches x in 9..=46 and
        // y in 1..=38: latent columns 1..=5, rows 0..=4. (The edit test's reference relies on it.)
        let mask = Mask::from_fn(64, 48, |x, y| {
            ((16..40).contains(&x) && (8..32).contains(&y)) as u8 as f32
        });
        let latent = mask.feathered(8).latent(8).unwrap();
        assert_eq!((latent.width(), latent.height()), (8, 6));
        let expected = Mask::from_fn(8, 6, |x, y| ((1..=5).contains(&x) && y <= 4) as u8 as f32);
        assert_eq!(latent, expected);
        assert!(mask.latent(7).is_err());
    }

    #[test]
    fn mask_images_are_resized_and_binarised() {
        // Left half white, right half dark grey, at twice the size.
        let image = RgbImage::from_fn(32, 16, |x, _| {
            if x < 16 {
                image::Rgb([255, 255, 255])
            } else {
                image::Rgb([100, 100, 100])
            }
        });
        let mask = Mask::from_image(&image, 16, 8);
        assert_eq!(mask.weights().iter().filter(|&&w| w == 1.0).count(), 8 * 8);
        assert_eq!(mask.weights()[0], 1.0);
        assert_eq!(mask.weights()[15], 0.0);
        assert_eq!(Mask::from_image(&mask.to_image(), 16, 8), mask);
    }

    #[test]
    fn auto_mask_covers_the_change_and_its_surroundings() {
        let base = RgbImage::from_pixel(40, 40, image::Rgb([100, 120, 140]));
        let mut edit = base.clone();
        for y in 10..20 {
            for x in 10..20 {
                edit.put_pixel(x, y, image::Rgb([250, 20, 20]));
            }
        }
        // Scattered small noise everywhere (a VAE round trip) must not count.
        for (i, p) in edit.pixels_mut().enumerate() {
            p[1] = p[1].saturating_add((i % 5) as u8);
        }
        let params = AutoMask {
            threshold: 0.1,
            blur: 1,
            dilate: 3,
        };
        let mask = Mask::from_difference(&edit, &base, &params).unwrap();
        let at = |x: usize, y: usize| mask.weights()[y * 40 + x];
        assert_eq!((at(15, 15), at(10, 10), at(19, 19)), (1.0, 1.0, 1.0));
        assert_eq!(at(22, 15), 1.0, "within the dilation");
        assert_eq!((at(25, 15), at(35, 35), at(0, 0)), (0.0, 0.0, 0.0));
        let bad = AutoMask {
            threshold: 1.5,
            ..params
        };
        assert!(Mask::from_difference(&edit, &base, &bad)
            .unwrap_err()
            .to_string()
            .contains("mask-threshold"));
    }
}
