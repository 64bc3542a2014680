//! Scores an edited picture against a world edit's ground truth: PSNR inside the edit's region
//! (did the pixels become the truth's) and outside it (was the rest of the scene kept), and a
//! check of whether the asked change happened at all, read off the picture's colours.
//!
//! The checks classify pixels by their nearest palette colour ([`Colour::rgb`], and for
//! backgrounds also [`Colour::pattern_rgb`]), so they tolerate the blur and colour noise of a
//! small model, and look only at pixels an object fully covers (its mask at 255) so that
//! anti-aliased edges do not count:
//! - colour change: most of the object's pixels have the new colour;
//! - add: most of the new object's pixels have its colour;
//! - remove: most of the removed object's pixels have the background's colour (either shade);
//! - background change: most of the pixels no object covers have the new background's colour
//!   (either shade), and the share of the pattern's second shade among them is within
//!   [`PATTERN_TOLERANCE`] of the truth's (so plain and patterned backgrounds differ; patterns of
//!   similar shares, striped and checkered, are not told apart);
//! - shape change: the pixels of the object's colour in the edit region overlap the new shape's
//!   mask with an IoU of at least one half, and more than they overlap the old shape's.

use image::{GrayImage, RgbImage};

use super::{Colour, Edit, EditSample, Scene, SceneConfig};
use unitune::{Error, Result};

/// PSNR reported for identical pixels (and the cap for near-identical ones), so means stay finite.
pub const PSNR_MAX: f64 = 60.0;

/// Largest difference in the share of a background's second shade that still counts as the
/// asked pattern.
pub const PATTERN_TOLERANCE: f64 = 0.15;

/// Which pixels of an edit region a score covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// Pixels the edit may change (region > 0).
    Inside,
    /// Pixels the edit must keep (region = 0).
    Outside,
    All,
}

impl Part {
    fn covers(self, region: u8) -> bool {
        match self {
            Part::Inside => region > 0,
            Part::Outside => region == 0,
            Part::All => true,
        }
    }
}

/// A short name of the edit's kind, for tables: colour, shape, add, remove or background.
pub fn edit_kind(edit: &Edit) -> &'static str {
    match edit {
        Edit::ColourChange { .. } => "colour",
        Edit::ShapeChange { .. } => "shape",
        Edit::AddObject(_) => "add",
        Edit::RemoveObject { .. } => "remove",
        Edit::BackgroundChange(_) => "background",
    }
}

/// PSNR in dB (peak 255, capped at [`PSNR_MAX`]) of `image` against `truth` over the `part` of
/// `region`; `None` when that part has no pixels (e.g. outside a background change).
pub fn psnr(
    image: &RgbImage,
    truth: &RgbImage,
    region: &GrayImage,
    part: Part,
) -> Result<Option<f64>> {
    if image.dimensions() != truth.dimensions() || region.dimensions() != truth.dimensions() {
        return Err(Error::argument(
            "score",
            format!(
                "image {:?}, truth {:?} and region {:?} differ in size",
                image.dimensions(),
                truth.dimensions(),
                region.dimensions()
            ),
        ));
    }
    let (mut sum, mut count) = (0.0f64, 0usize);
    for ((a, b), r) in image.pixels().zip(truth.pixels()).zip(region.pixels()) {
        if part.covers(r.0[0]) {
            for c in 0..3 {
                let d = a.0[c] as f64 - b.0[c] as f64;
                sum += d * d;
            }
            count += 3;
        }
    }
    if count == 0 {
        return Ok(None);
    }
    let mse = sum / count as f64;
    Ok(Some(if mse == 0.0 {
        PSNR_MAX
    } else {
        (10.0 * (255.0 * 255.0 / mse).log10()).min(PSNR_MAX)
    }))
}

/// The palette colour nearest to `rgb`; with `shades`, a pattern's second shade counts as its
/// colour too (for backgrounds). The second value says whether the nearest was that shade.
pub fn nearest_colour(rgb: [u8; 3], shades: bool) -> (Colour, bool) {
    let distance = |p: [u8; 3]| -> u32 {
        (0..3)
            .map(|c| (rgb[c] as i32 - p[c] as i32).pow(2) as u32)
            .sum()
    };
    let mut best = (Colour::ALL[0], false, u32::MAX);
    for colour in Colour::ALL {
        let mut candidates = vec![(colour.rgb(), false)];
        if shades {
            candidates.push((colour.pattern_rgb(), true));
        }
        for (p, is_shade) in candidates {
            let d = distance(p);
            if d < best.2 {
                best = (colour, is_shade, d);
            }
        }
    }
    (best.0, best.1)
}

/// Pixels (as indices) a mask fully covers, or at least half covers when none is full (a very
/// small object).
fn core(mask: &GrayImage) -> Vec<usize> {
    let full: Vec<usize> = mask
        .pixels()
        .enumerate()
        .filter(|(_, p)| p.0[0] == 255)
        .map(|(i, _)| i)
        .collect();
    if !full.is_empty() {
        return full;
    }
    mask.pixels()
        .enumerate()
        .filter(|(_, p)| p.0[0] >= 128)
        .map(|(i, _)| i)
        .collect()
}

fn pixel(image: &RgbImage, i: usize) -> [u8; 3] {
    let w = image.width() as usize;
    image.get_pixel((i % w) as u32, (i / w) as u32).0
}

/// Share of `pixels` of `image` whose nearest colour is `colour`.
fn share(image: &RgbImage, pixels: &[usize], colour: Colour, shades: bool) -> f64 {
    if pixels.is_empty() {
        return 0.0;
    }
    let hits = pixels
        .iter()
        .filter(|&&i| nearest_colour(pixel(image, i), shades).0 == colour)
        .count();
    hits as f64 / pixels.len() as f64
}

/// Pixels no object of `scene` touches (where its background shows whole).
fn background_pixels(scene: &Scene, config: &SceneConfig) -> Result<Vec<usize>> {
    let n = (config.width * config.height) as usize;
    let mut free = vec![true; n];
    for index in 0..scene.objects.len() {
        for (i, p) in scene.object_mask(index, config)?.pixels().enumerate() {
            if p.0[0] > 0 {
                free[i] = false;
            }
        }
    }
    Ok((0..n).filter(|&i| free[i]).collect())
}

/// Share of the background's second shade among `pixels` showing the colour `colour`.
fn second_shade_share(image: &RgbImage, pixels: &[usize], colour: Colour) -> f64 {
    let classes: Vec<bool> = pixels
        .iter()
        .map(|&i| nearest_colour(pixel(image, i), true))
        .filter(|(c, _)| *c == colour)
        .map(|(_, shade)| shade)
        .collect();
    if classes.is_empty() {
        return 0.0;
    }
    classes.iter().filter(|&&s| s).count() as f64 / classes.len() as f64
}

/// Intersection over union of two pixel sets given as flags.
fn iou(a: &[bool], b: &[bool]) -> f64 {
    let inter = a.iter().zip(b).filter(|(x, y)| **x && **y).count();
    let union = a.iter().zip(b).filter(|(x, y)| **x || **y).count();
    if union == 0 {
        0.0
    } else {
        inter as f64 / union as f64
    }
}

/// Refuses a picture of another size than the world's.
pub(super) fn check_size(image: &RgbImage, config: &SceneConfig) -> Result<()> {
    if image.dimensions() != (config.width, config.height) {
        return Err(Error::argument(
            "score",
            format!(
                "image {:?} is not the world's {}x{}",
                image.dimensions(),
                config.width,
                config.height
            ),
        ));
    }
    Ok(())
}

/// Whether `image` shows the change `sample.edit` asks for (see the module doc for each kind).
pub fn edit_happened(sample: &EditSample, image: &RgbImage, config: &SceneConfig) -> Result<bool> {
    check_size(image, config)?;
    let (scene, edited) = (&sample.scene, &sample.edited);
    Ok(match sample.edit {
        Edit::ColourChange { object, to } => {
            share(image, &core(&scene.object_mask(object, config)?), to, false) > 0.5
        }
        Edit::AddObject(object) => {
            share(
                image,
                &core(&object.mask(config)),
                object.desc.colour,
                false,
            ) > 0.5
        }
        Edit::RemoveObject { object } => {
            let pixels = core(&scene.object_mask(object, config)?);
            share(image, &pixels, scene.background.colour, true) > 0.5
        }
        Edit::BackgroundChange(background) => {
            let pixels = background_pixels(edited, config)?;
            let expected = second_shade_share(&sample.after, &pixels, background.colour);
            let found = second_shade_share(image, &pixels, background.colour);
            share(image, &pixels, background.colour, true) > 0.5
                && (found - expected).abs() <= PATTERN_TOLERANCE
        }
        Edit::ShapeChange { object, .. } => {
            let colour = scene.object(object)?.desc.colour;
            let flags =
                |mask: &GrayImage| -> Vec<bool> { mask.pixels().map(|p| p.0[0] >= 128).collect() };
            let painted: Vec<bool> = image
                .pixels()
                .zip(sample.region.pixels())
                .map(|(p, r)| r.0[0] > 0 && nearest_colour(p.0, false).0 == colour)
                .collect();
            let new = iou(&painted, &flags(&edited.object_mask(object, config)?));
            let old = iou(&painted, &flags(&scene.object_mask(object, config)?));
            new >= 0.5 && new > old
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::world::World;

    fn world() -> World {
        World::new(SceneConfig::default(), 7).unwrap()
    }

    #[test]
    fn psnr_of_identical_pixels_is_the_cap_and_drops_with_error() {
        let sample = world().edit_sample(0);
        let all = GrayImage::from_pixel(64, 64, image::Luma([255]));
        let same = psnr(&sample.before, &sample.before, &all, Part::All).unwrap();
        assert_eq!(same, Some(PSNR_MAX));
        // Every channel off by 16: MSE 256, PSNR = 10 log10(255² / 256) = 24.05 dB.
        let mut off = sample.before.clone();
        off.pixels_mut()
            .for_each(|p| p.0 = p.0.map(|c| if c >= 128 { c - 16 } else { c + 16 }));
        let db = psnr(&off, &sample.before, &all, Part::All)
            .unwrap()
            .unwrap();
        assert!((db - 24.048).abs() < 1e-3, "{db}");
        assert_eq!(
            psnr(&off, &sample.before, &all, Part::Outside).unwrap(),
            None
        );
        let small = RgbImage::new(8, 8);
        assert!(psnr(&small, &sample.before, &all, Part::All).is_err());
    }

    #[test]
    fn outside_the_region_truth_and_base_agree_exactly() {
        let w = world();
        for index in 0..20 {
            let s = w.edit_sample(index);
            if let Some(db) = psnr(&s.before, &s.after, &s.region, Part::Outside).unwrap() {
                assert_eq!(db, PSNR_MAX, "scene {index}: {}", s.instruction);
            }
            let inside = psnr(&s.before, &s.after, &s.region, Part::Inside)
                .unwrap()
                .unwrap();
            assert!(inside < 30.0, "scene {index}: {} {inside}", s.instruction);
        }
    }

    #[test]
    fn the_truth_passes_the_check_and_the_base_fails_it() {
        let w = world();
        let config = w.config().clone();
        let mut kinds = std::collections::HashSet::new();
        for index in 0..60 {
            let s = w.edit_sample(index);
            kinds.insert(std::mem::discriminant(&s.edit));
            assert!(
                edit_happened(&s, &s.after, &config).unwrap(),
                "truth of {index}: {}",
                s.instruction
            );
            // Striped <-> checkered in the same colour is the one change the check cannot see.
            let same_share = matches!(s.edit, Edit::BackgroundChange(b)
                if b.colour == s.scene.background.colour
                    && b.pattern != crate::world::Pattern::Plain
                    && s.scene.background.pattern != crate::world::Pattern::Plain);
            if !same_share {
                assert!(
                    !edit_happened(&s, &s.before, &config).unwrap(),
                    "base of {index}: {}",
                    s.instruction
                );
            }
        }
        assert_eq!(kinds.len(), 5, "every kind of edit was checked");
    }
}
