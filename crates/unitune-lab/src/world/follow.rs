//! Whether a picture follows a caption, attribute by attribute: a text-to-image model's
//! caption-following, read off the pixels as [`super::score`] reads edits.
//!
//! A generated picture puts its objects anywhere, so the check finds them: every pixel whose
//! nearest palette colour (either shade, or of the plain colours alone) is the background's is
//! background; the other pixels, classified by their nearest plain colour, form 4-connected blobs of one colour each, and blobs of at
//! least [`MIN_BLOB`] of the smallest object's area, with their anti-aliased rims given back
//! (pixels at least half the blob's colour mixed with the background's), and not mere edge
//! fringes, count as objects. Then:
//! - background: most of the picture's 2-pixel border is the background's colour, and the share of
//!   its pattern's second shade among the background pixels is within [`PATTERN_TOLERANCE`] of
//!   the true render's;
//! - colour: every asked object has a blob of its colour (a blob serves one object);
//! - shape: every asked object has a blob of its colour whose best-fitting shape is its shape (the
//!   fit: the highest IoU among every shape and size drawn at the blob's centroid);
//! - count: there are as many blobs as asked objects.

use std::collections::VecDeque;

use image::RgbImage;

use super::scene::BOUND;
use super::score::{check_size, nearest_colour, PATTERN_TOLERANCE};
use super::{Colour, Object, ObjectDesc, Scene, SceneConfig, Shape, Size};
use unitune::Result;

/// Least area of a blob that counts as an object, as a share of the smallest object's (a small
/// star's or triangle's).
pub const MIN_BLOB: f64 = 0.4;

/// A blob is an edge fringe, not an object, when at least this share of the pixels around it
/// belong to a larger blob: anti-aliasing mixes an object's colour with the background's along
/// its edge, and the mix can be nearest to a third colour. Objects never touch each other.
const FRINGE_CONTACT: f64 = 0.3;

/// Least share of a blob's colour in a rim pixel (mixed with the background) that gives it back
/// to the blob: a half, less a margin for pixels an edge cuts exactly in two (which the renderer's
/// masks count in).
const RIM: f32 = 0.45;

/// Largest scale of the medium size that the shape fit tries (1.5x the large size); it goes
/// down to a third of the small size in steps of 0.05.
const MAX_SCALE: f32 = 2.25;

/// Width in pixels of the border read for the background (objects keep a margin from the edge).
const BORDER: u32 = 2;

/// Which attributes of its caption a picture shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Following {
    pub background: bool,
    pub colour: bool,
    pub shape: bool,
    pub count: bool,
}

impl Following {
    pub fn all(&self) -> bool {
        self.background && self.colour && self.shape && self.count
    }
}

/// How many pictures of a set show each attribute, and all four.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FollowingCounts {
    pub pictures: usize,
    pub background: usize,
    pub colour: usize,
    pub shape: usize,
    pub count: usize,
    pub all: usize,
}

impl FollowingCounts {
    pub fn of(followings: &[Following]) -> Self {
        let hits = |p: fn(&Following) -> bool| followings.iter().filter(|f| p(f)).count();
        Self {
            pictures: followings.len(),
            background: hits(|f| f.background),
            colour: hits(|f| f.colour),
            shape: hits(|f| f.shape),
            count: hits(|f| f.count),
            all: hits(Following::all),
        }
    }

    /// `hits/pictures` of background, colour, shape, count and all four.
    pub fn cells(&self) -> [String; 5] {
        [
            self.background,
            self.colour,
            self.shape,
            self.count,
            self.all,
        ]
        .map(|hits| format!("{hits}/{}", self.pictures))
    }
}

/// A blob: its colour and pixels (indices).
struct Blob {
    colour: Colour,
    pixels: Vec<usize>,
}

/// How far `image` follows the caption of `scene` (see the module doc).
pub fn caption_followed(
    scene: &Scene,
    image: &RgbImage,
    config: &SceneConfig,
) -> Result<Following> {
    let (w, h) = (config.width as usize, config.height as usize);
    check_size(image, config)?;
    let bg = scene.background.colour;
    let classes: Vec<(Colour, bool)> = image.pixels().map(|p| nearest_colour(p.0, true)).collect();
    let is_background: Vec<bool> = classes.iter().map(|(c, _)| *c == bg).collect();

    let border: Vec<usize> = (0..w * h)
        .filter(|&i| {
            let (x, y) = ((i % w) as u32, (i / w) as u32);
            x < BORDER || y < BORDER || x >= config.width - BORDER || y >= config.height - BORDER
        })
        .collect();
    let border_share =
        border.iter().filter(|&&i| is_background[i]).count() as f64 / border.len() as f64;
    let truth = scene.render(config);
    let shade_share = |img: &RgbImage| -> f64 {
        let shades: Vec<bool> = img
            .pixels()
            .map(|p| nearest_colour(p.0, true))
            .filter(|(c, _)| *c == bg)
            .map(|(_, shade)| shade)
            .collect();
        shades.iter().filter(|&&s| s).count() as f64 / shades.len().max(1) as f64
    };
    let background =
        border_share > 0.5 && (shade_share(image) - shade_share(&truth)).abs() <= PATTERN_TOLERANCE;

    let object_colour: Vec<Option<Colour>> = image
        .pixels()
        .zip(&is_background)
        .map(|(p, &b)| Some(nearest_colour(p.0, false).0).filter(|&c| !b && c != bg))
        .collect();
    let smallest = smallest_object(config);
    let shades = [bg.rgb(), bg.pattern_rgb()];
    let all = grow(blobs(&object_colour, w, h), image, shades, w, h);
    let blobs: Vec<&Blob> = all
        .iter()
        .enumerate()
        .filter(|(i, b)| {
            b.pixels.len() as f64 >= MIN_BLOB * smallest as f64 && !is_fringe(&all, *i, w, h)
        })
        .map(|(_, b)| b)
        .collect();

    let mut unused = blobs.clone();
    let mut colour = true;
    for object in &scene.objects {
        match unused.iter().position(|b| b.colour == object.desc.colour) {
            Some(i) => {
                unused.remove(i);
            }
            None => colour = false,
        }
    }
    let shape = scene.objects.iter().all(|object| {
        blobs.iter().any(|b| {
            b.colour == object.desc.colour
                && best_shape(b, object.desc.colour, config) == object.desc.shape
        })
    });
    Ok(Following {
        background,
        colour,
        shape,
        count: blobs.len() == scene.objects.len(),
    })
}

/// Pixels the smallest object the world draws covers at least half.
fn smallest_object(config: &SceneConfig) -> usize {
    Shape::ALL
        .into_iter()
        .map(|shape| {
            let object = Object {
                desc: ObjectDesc {
                    size: Size::Small,
                    colour: Colour::Red,
                    shape,
                },
                x: 0.5,
                y: 0.5,
            };
            object
                .mask(config)
                .pixels()
                .filter(|p| p.0[0] >= 128)
                .count()
        })
        .min()
        .unwrap_or(0)
}

/// How much of `colour` a pixel mixes into the nearer of the background's `shades`: its
/// projection on the line between them (0 = the background, 1 = the colour).
fn unmix(pixel: [u8; 3], colour: [u8; 3], shades: [[u8; 3]; 2]) -> f32 {
    let along = |b: [u8; 3]| -> (f32, f32) {
        let d: Vec<f32> = (0..3).map(|c| colour[c] as f32 - b[c] as f32).collect();
        let p: Vec<f32> = (0..3).map(|c| pixel[c] as f32 - b[c] as f32).collect();
        let dd: f32 = d.iter().map(|v| v * v).sum::<f32>().max(1.0);
        let t = d.iter().zip(&p).map(|(a, b)| a * b).sum::<f32>() / dd;
        let off: f32 = (0..3).map(|c| (p[c] - t * d[c]).powi(2)).sum();
        (t, off)
    };
    let (a, b) = (along(shades[0]), along(shades[1]));
    if a.1 <= b.1 {
        a.0
    } else {
        b.0
    }
}

/// Gives every blob back its anti-aliased rim: the neighbouring pixels (background or in a smaller
/// blob) that are at least half its colour mixed with the background's (two rings).
fn grow(blobs: Vec<Blob>, image: &RgbImage, shades: [[u8; 3]; 2], w: usize, h: usize) -> Vec<Blob> {
    let mut label: Vec<Option<usize>> = vec![None; w * h];
    for (k, b) in blobs.iter().enumerate() {
        for &i in &b.pixels {
            label[i] = Some(k);
        }
    }
    let sizes: Vec<usize> = blobs.iter().map(|b| b.pixels.len()).collect();
    let mut order: Vec<usize> = (0..blobs.len()).collect();
    order.sort_by_key(|&k| std::cmp::Reverse(sizes[k]));
    let raw = image.as_raw();
    for _ in 0..2 {
        for &k in &order {
            let colour = blobs[k].colour.rgb();
            let mut claimed = vec![];
            for (i, l) in label.iter().enumerate() {
                if *l != Some(k) {
                    continue;
                }
                for j in neighbours(i, w, h) {
                    let free = label[j].is_none_or(|o| sizes[o] < sizes[k]);
                    let pixel = [raw[3 * j], raw[3 * j + 1], raw[3 * j + 2]];
                    if label[j] != Some(k) && free && unmix(pixel, colour, shades) >= RIM {
                        claimed.push(j);
                    }
                }
            }
            for j in claimed {
                label[j] = Some(k);
            }
        }
    }
    let mut grown: Vec<Blob> = blobs
        .iter()
        .map(|b| Blob {
            colour: b.colour,
            pixels: vec![],
        })
        .collect();
    for (i, l) in label.iter().enumerate() {
        if let Some(k) = l {
            grown[*k].pixels.push(i);
        }
    }
    grown.retain(|b| !b.pixels.is_empty());
    grown
}

/// The 4-neighbours of pixel `i`.
fn neighbours(i: usize, w: usize, h: usize) -> impl Iterator<Item = usize> {
    let (x, y) = (i % w, i / w);
    [
        (x > 0).then(|| i - 1),
        (x + 1 < w).then(|| i + 1),
        (y > 0).then(|| i - w),
        (y + 1 < h).then(|| i + w),
    ]
    .into_iter()
    .flatten()
}

/// Whether blob `index` of `blobs` is an edge fringe of a larger one (see [`FRINGE_CONTACT`]).
fn is_fringe(blobs: &[Blob], index: usize, w: usize, h: usize) -> bool {
    let mut owner = vec![usize::MAX; w * h];
    for (k, b) in blobs.iter().enumerate() {
        for &i in &b.pixels {
            owner[i] = k;
        }
    }
    let size = blobs[index].pixels.len();
    let (mut around, mut larger) = (0usize, 0usize);
    for &i in &blobs[index].pixels {
        for j in neighbours(i, w, h) {
            if owner[j] == index {
                continue;
            }
            around += 1;
            larger += (owner[j] != usize::MAX && blobs[owner[j]].pixels.len() > size) as usize;
        }
    }
    larger as f64 >= FRINGE_CONTACT * around.max(1) as f64
}

/// 4-connected blobs of pixels of one colour (`None`: background, in no blob).
fn blobs(colours: &[Option<Colour>], w: usize, h: usize) -> Vec<Blob> {
    let mut seen = vec![false; colours.len()];
    let mut out = vec![];
    for start in 0..colours.len() {
        let Some(colour) = colours[start] else {
            continue;
        };
        if seen[start] {
            continue;
        }
        seen[start] = true;
        let mut pixels = vec![];
        let mut queue = VecDeque::from([start]);
        while let Some(i) = queue.pop_front() {
            pixels.push(i);
            for j in neighbours(i, w, h) {
                if !seen[j] && colours[j] == Some(colour) {
                    seen[j] = true;
                    queue.push_back(j);
                }
            }
        }
        out.push(Blob { colour, pixels });
    }
    out
}

/// The shape that, drawn at the blob's centroid at its best-fitting scale, overlaps the blob
/// best (IoU of pixel centres). The scale is searched finely rather than among the three sizes:
/// a blob loses its anti-aliased rim to the fringe colours, and a shrunken small circle is
/// closer to a small square than to itself.
fn best_shape(blob: &Blob, colour: Colour, config: &SceneConfig) -> Shape {
    let (w, h) = (config.width as usize, config.height as usize);
    let n = blob.pixels.len() as f32;
    let (sx, sy) = blob.pixels.iter().fold((0.0, 0.0), |(sx, sy), &i| {
        (sx + (i % w) as f32 + 0.5, sy + (i / w) as f32 + 0.5)
    });
    // Pixels to scene units, as the renderer maps them (the unit square on the shorter side).
    let scale = config.width.min(config.height) as f32;
    let offset = (
        (config.width as f32 - scale) / 2.0,
        (config.height as f32 - scale) / 2.0,
    );
    let (cx, cy) = ((sx / n - offset.0) / scale, (sy / n - offset.1) / scale);
    let mut inside = vec![false; w * h];
    for &i in &blob.pixels {
        inside[i] = true;
    }
    // Only pixels within reach of the largest scale tried, or of the blob, can count.
    let reach = (BOUND * Size::Medium.radius() * MAX_SCALE * scale).ceil() as usize + 1;
    let (px, py) = ((sx / n) as usize, (sy / n) as usize);
    let xs = blob.pixels.iter().map(|&i| i % w);
    let ys = blob.pixels.iter().map(|&i| i / w);
    let x0 = xs.clone().min().unwrap_or(0).min(px.saturating_sub(reach));
    let x1 = xs.max().unwrap_or(0).max(px + reach).min(w - 1);
    let y0 = ys.clone().min().unwrap_or(0).min(py.saturating_sub(reach));
    let y1 = ys.max().unwrap_or(0).max(py + reach).min(h - 1);
    let window: Vec<usize> = (y0..=y1)
        .flat_map(|y| (x0..=x1).map(move |x| y * w + x))
        .collect();
    let mut best = (Shape::ALL[0], -1.0);
    for shape in Shape::ALL {
        let object = Object {
            desc: ObjectDesc {
                size: Size::Medium,
                colour,
                shape,
            },
            x: cx,
            y: cy,
        };
        for step in 0..=40 {
            let k = MAX_SCALE - 0.05 * step as f32;
            let (mut inter, mut union) = (0usize, 0usize);
            for &i in &window {
                let b = inside[i];
                let x = ((i % w) as f32 + 0.5 - offset.0) / scale;
                let y = ((i / w) as f32 + 0.5 - offset.1) / scale;
                let m = object.contains(cx + (x - cx) / k, cy + (y - cy) / k);
                inter += (m && b) as usize;
                union += (m || b) as usize;
            }
            let iou = inter as f64 / union.max(1) as f64;
            if iou > best.1 {
                best = (shape, iou);
            }
        }
    }
    best.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::world::{Edit, World};

    #[test]
    fn a_true_render_follows_its_caption_and_each_edit_breaks_its_attribute() {
        let world = World::new(SceneConfig::default(), 11).unwrap();
        let config = world.config().clone();
        let mut broken = std::collections::HashMap::new();
        for index in 0..80 {
            let s = world.edit_sample(index);
            let truth = caption_followed(&s.edited, &s.after, &config).unwrap();
            assert!(
                truth.all(),
                "truth of {index} ({}): {truth:?}",
                s.instruction
            );
            let before = caption_followed(&s.scene, &s.before, &config).unwrap();
            assert!(before.all(), "base of {index}: {before:?}");
            // The base picture against the edited caption misses exactly what the edit changes.
            let f = caption_followed(&s.edited, &s.before, &config).unwrap();
            let (kind, missed) = match s.edit {
                Edit::ColourChange { .. } => ("colour", !f.colour),
                Edit::ShapeChange { .. } => ("shape", !f.shape),
                Edit::AddObject(_) | Edit::RemoveObject { .. } => ("count", !f.count),
                Edit::BackgroundChange(b) => {
                    // Striped and checkered in one colour share their shades (see score).
                    let same = b.colour == s.scene.background.colour;
                    ("background", same || !f.background)
                }
            };
            assert!(missed, "{kind} edit {index} ({}): {f:?}", s.instruction);
            *broken.entry(kind).or_insert(0) += 1;
        }
        assert_eq!(
            broken.len(),
            4,
            "every attribute was broken once: {broken:?}"
        );
    }

    #[test]
    fn a_blank_picture_follows_only_its_background() {
        let world = World::new(SceneConfig::default(), 3).unwrap();
        let config = world.config().clone();
        let scene = (0..50)
            .map(|i| world.scene(i))
            .find(|s| s.background.pattern == crate::world::Pattern::Plain)
            .unwrap();
        let blank = RgbImage::from_pixel(64, 64, image::Rgb(scene.background.colour.rgb()));
        let f = caption_followed(&scene, &blank, &config).unwrap();
        assert_eq!(
            f,
            Following {
                background: true,
                colour: false,
                shape: false,
                count: false
            }
        );
        assert!(caption_followed(&scene, &RgbImage::new(8, 8), &config).is_err());
    }
}
