//! Pixels from a scene: each pixel averages an n x n grid of point samples (anti-aliasing), each
//! sample taking the colour of the topmost object covering it or of the background pattern there.
//!
//! The scene's unit square is scaled to the image's shorter side and centred; a wider image shows
//! more background on both sides. Patterns repeat every 1/8 of the square (8 pixels at 64x64), so
//! at sizes that are multiples of 16 stripes and checks fall on pixel edges and stay crisp.

use std::f32::consts::PI;

use image::{GrayImage, RgbImage};

use super::scene::{Object, Pattern, Scene, Shape, BOUND};
use super::SceneConfig;
use unitune::Result;

/// Pattern cells per scene unit: the period of stripes, checks and dots.
const CELLS: f32 = 8.0;
/// Radius of a dot, in cells.
const DOT_RADIUS: f32 = 0.3;

/// Where a sample coordinate falls in the pattern's cells, along one axis. Every pattern is a
/// function of the two axes' cells, so a pixel needs n of these per axis rather than n².
#[derive(Clone, Copy)]
struct Cell {
    odd: bool,
    /// In the cell's second half.
    late: bool,
    /// Squared distance from the cell's middle, in cells.
    off2: f32,
}

impl Cell {
    fn new(t: f32) -> Self {
        let c = t * CELLS;
        let f = c - c.floor();
        Self {
            odd: c.floor().rem_euclid(2.0) == 1.0,
            late: f >= 0.5,
            off2: (f - 0.5) * (f - 0.5),
        }
    }
}

impl Pattern {
    /// Whether the sample in cells (x, y) shows the pattern's second colour.
    fn is_second(self, x: Cell, y: Cell) -> bool {
        match self {
            Pattern::Plain => false,
            Pattern::Striped => x.late,
            Pattern::Checkered => x.odd != y.odd,
            Pattern::Dotted => x.off2 + y.off2 <= DOT_RADIUS * DOT_RADIUS,
        }
    }
}

/// Maps pixels' sample points to scene coordinates.
struct Frame {
    width: u32,
    height: u32,
    /// Pixels per scene unit, and the pixel offset of the scene's corner.
    scale: f32,
    offset: (f32, f32),
    supersample: u32,
}

impl Frame {
    fn new(config: &SceneConfig) -> Self {
        let scale = config.width.min(config.height) as f32;
        Self {
            width: config.width,
            height: config.height,
            scale,
            offset: (
                (config.width as f32 - scale) / 2.0,
                (config.height as f32 - scale) / 2.0,
            ),
            // `SceneConfig::validate` rejects 0; rendering takes it as 1 rather than divide by 0.
            supersample: config.supersample.max(1),
        }
    }

    /// The scene coordinates of the n sample columns of pixel column `p` (or rows, with the
    /// vertical offset): evenly spaced inside the pixel.
    fn samples(&self, p: u32, offset: f32) -> Vec<f32> {
        let n = self.supersample;
        (0..n)
            .map(|i| (p as f32 + (i as f32 + 0.5) / n as f32 - offset) / self.scale)
            .collect()
    }

    /// Whether pixel (px, py) meets the object's bounding box: pixels that do not are untouched
    /// by it and need not be sampled for it.
    fn near(&self, object: &Object, px: u32, py: u32) -> bool {
        let b = object.bound();
        let meets = |p: u32, offset: f32, centre: f32| {
            let (lo, hi) = (
                (p as f32 - offset) / self.scale,
                (p as f32 + 1.0 - offset) / self.scale,
            );
            hi >= centre - b && lo <= centre + b
        };
        meets(px, self.offset.0, object.x) && meets(py, self.offset.1, object.y)
    }

    /// Raw pixels, each mixing `palette` entries in proportion to its samples' votes: `vote(x,
    /// y)` names the entry a sample shows (x and y with their pattern cells). `skip` names the
    /// entry of a pixel whose samples are known to agree, which spares sampling it.
    fn mix<const C: usize>(
        &self,
        palette: &[[u8; C]],
        skip: impl Fn(u32, u32) -> Option<usize>,
        vote: impl Fn((f32, Cell), (f32, Cell)) -> usize,
    ) -> Vec<u8> {
        let n = self.supersample * self.supersample;
        let axis = |p, offset| -> Vec<(f32, Cell)> {
            self.samples(p, offset)
                .into_iter()
                .map(|t| (t, Cell::new(t)))
                .collect()
        };
        let columns: Vec<_> = (0..self.width).map(|px| axis(px, self.offset.0)).collect();
        let mut raw = Vec::with_capacity((self.width * self.height) as usize * C);
        let mut votes = vec![0u32; palette.len()];
        for py in 0..self.height {
            let rows = axis(py, self.offset.1);
            for (px, columns) in columns.iter().enumerate() {
                if let Some(entry) = skip(px as u32, py) {
                    raw.extend(palette[entry]);
                    continue;
                }
                votes.fill(0);
                for &y in &rows {
                    for &x in columns {
                        votes[vote(x, y)] += 1;
                    }
                }
                for c in 0..C {
                    let sum: u32 = votes
                        .iter()
                        .zip(palette)
                        .map(|(&v, p)| v * p[c] as u32)
                        .sum();
                    raw.push(((sum + n / 2) / n) as u8);
                }
            }
        }
        raw
    }
}

pub(super) fn render(scene: &Scene, config: &SceneConfig) -> RgbImage {
    let frame = Frame::new(config);
    let background = scene.background;
    // The objects' colours, then the background's two.
    let mut palette: Vec<[u8; 3]> = scene.objects.iter().map(|o| o.desc.colour.rgb()).collect();
    let first = palette.len();
    palette.extend([background.colour.rgb(), background.colour.pattern_rgb()]);
    let plain = background.pattern == Pattern::Plain;
    let raw = frame.mix(
        &palette,
        |px, py| (plain && !scene.objects.iter().any(|o| frame.near(o, px, py))).then_some(first),
        |(x, cx), (y, cy)| match scene.objects.iter().rposition(|o| o.contains(x, y)) {
            Some(i) => i,
            None => first + background.pattern.is_second(cx, cy) as usize,
        },
    );
    RgbImage::from_raw(config.width, config.height, raw).expect("one RGB triple per pixel")
}

impl Object {
    /// Whether the scene point (x, y) is inside the object.
    pub fn contains(&self, x: f32, y: f32) -> bool {
        let r = self.desc.size.radius();
        // In radii from the centre; every shape lies within BOUND.
        let (u, v) = ((x - self.x) / r, (y - self.y) / r);
        if u.abs() > BOUND || v.abs() > BOUND {
            return false;
        }
        let d2 = u * u + v * v;
        match self.desc.shape {
            Shape::Circle => d2 <= 1.0,
            Shape::Ring => (0.55 * 0.55..=1.0).contains(&d2),
            Shape::Square => u.abs().max(v.abs()) <= 0.8,
            Shape::Triangle => in_triangle(u, v),
            Shape::Star => in_star(u, v),
        }
    }

    /// The share of each pixel the object covers (0 to 255).
    pub fn mask(&self, config: &SceneConfig) -> GrayImage {
        let frame = Frame::new(config);
        let raw = frame.mix(
            &[[0], [255]],
            |px, py| (!frame.near(self, px, py)).then_some(0),
            |(x, _), (y, _)| self.contains(x, y) as usize,
        );
        GrayImage::from_raw(config.width, config.height, raw).expect("one value per pixel")
    }
}

impl Scene {
    pub fn render(&self, config: &SceneConfig) -> RgbImage {
        render(self, config)
    }

    /// The share of each pixel that object `index` covers (0 to 255); objects never overlap, so
    /// this is also the share of the pixel showing it.
    pub fn object_mask(&self, index: usize, config: &SceneConfig) -> Result<GrayImage> {
        Ok(self.object(index)?.mask(config))
    }
}

/// An equilateral triangle pointing up, its centroid at the origin, circumradius BOUND: inside
/// its three edges, whose outward normals point down, up-left and up-right at the inradius
/// BOUND / 2.
fn in_triangle(u: f32, v: f32) -> bool {
    const HALF_SQRT3: f32 = 0.866_025_4;
    [(0.0, 1.0), (-HALF_SQRT3, -0.5), (HALF_SQRT3, -0.5)]
        .iter()
        .all(|(nx, ny)| u * nx + v * ny <= BOUND / 2.0)
}

/// A five-pointed star, one point up, outer radius BOUND and inner radius 0.5.
fn in_star(u: f32, v: f32) -> bool {
    const INNER: f32 = 0.5;
    let sector = 2.0 * PI / 5.0;
    // Angle from "up" (y is down), folded into the half-sector between a point and a notch.
    let mut phi = u.atan2(-v).rem_euclid(sector);
    if phi > sector / 2.0 {
        phi = sector - phi;
    }
    let d = u.hypot(v);
    let (qx, qy) = (d * phi.cos(), d * phi.sin());
    // Inside when on the origin's side of the edge from the point (BOUND, 0) to the notch.
    let (ex, ey) = (
        INNER * (sector / 2.0).cos() - BOUND,
        INNER * (sector / 2.0).sin(),
    );
    ex * qy - ey * (qx - BOUND) >= 0.0
}
