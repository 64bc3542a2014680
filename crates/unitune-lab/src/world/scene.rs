//! What a scene is made of: a background and a few objects, each a shape of one palette colour and
//! one size at a position, and the rules that keep its caption true (objects apart and inside the
//! picture, visible on the background, named uniquely, arranged along a clear direction).

use rand::seq::SliceRandom;
use rand::Rng;

use super::caption::{Description, Layout, Relation};
use super::SceneConfig;
use unitune::{Error, Result};

/// The palette: eight colours far apart in RGB, so that each name means one clear colour.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Colour {
    Red,
    Green,
    Blue,
    Yellow,
    Purple,
    Orange,
    White,
    Black,
}

impl Colour {
    pub const ALL: [Colour; 8] = [
        Colour::Red,
        Colour::Green,
        Colour::Blue,
        Colour::Yellow,
        Colour::Purple,
        Colour::Orange,
        Colour::White,
        Colour::Black,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Colour::Red => "red",
            Colour::Green => "green",
            Colour::Blue => "blue",
            Colour::Yellow => "yellow",
            Colour::Purple => "purple",
            Colour::Orange => "orange",
            Colour::White => "white",
            Colour::Black => "black",
        }
    }

    pub fn from_name(word: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.name() == word)
    }

    pub fn rgb(self) -> [u8; 3] {
        match self {
            Colour::Red => [220, 40, 40],
            Colour::Green => [40, 170, 60],
            Colour::Blue => [40, 80, 220],
            Colour::Yellow => [240, 210, 40],
            Colour::Purple => [140, 60, 180],
            Colour::Orange => [245, 140, 30],
            Colour::White => [245, 245, 245],
            Colour::Black => [20, 20, 20],
        }
    }

    /// The second colour of a patterned background: this colour 30% of the way to black, or to
    /// white for dark colours, so the pattern shows but the background keeps its name.
    pub fn pattern_rgb(self) -> [u8; 3] {
        let [r, g, b] = self.rgb();
        let luma = 0.299 * r as f32 + 0.587 * g as f32 + 0.114 * b as f32;
        let target = if luma > 110.0 { 0.0 } else { 255.0 };
        [r, g, b].map(|c| (c as f32 + 0.3 * (target - c as f32)).round() as u8)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Shape {
    Circle,
    Square,
    Triangle,
    Star,
    Ring,
}

impl Shape {
    pub const ALL: [Shape; 5] = [
        Shape::Circle,
        Shape::Square,
        Shape::Triangle,
        Shape::Star,
        Shape::Ring,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Shape::Circle => "circle",
            Shape::Square => "square",
            Shape::Triangle => "triangle",
            Shape::Star => "star",
            Shape::Ring => "ring",
        }
    }

    pub fn from_name(word: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.name() == word)
    }
}

/// Object size; the caption names small and large and leaves medium unsaid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Size {
    Small,
    Medium,
    Large,
}

impl Size {
    pub const ALL: [Size; 3] = [Size::Small, Size::Medium, Size::Large];

    pub fn name(self) -> Option<&'static str> {
        match self {
            Size::Small => Some("small"),
            Size::Medium => None,
            Size::Large => Some("large"),
        }
    }

    pub fn from_name(word: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.name() == Some(word))
    }

    /// Radius in scene units (the scene is the unit square): 5, 7 and 10 pixels at 64x64.
    pub fn radius(self) -> f32 {
        match self {
            Size::Small => 0.08,
            Size::Medium => 0.11,
            Size::Large => 0.16,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Pattern {
    Plain,
    /// Vertical stripes.
    Striped,
    Checkered,
    Dotted,
}

impl Pattern {
    pub const ALL: [Pattern; 4] = [
        Pattern::Plain,
        Pattern::Striped,
        Pattern::Checkered,
        Pattern::Dotted,
    ];

    /// The adjective; captions leave "plain" unsaid, instructions say it.
    pub fn name(self) -> &'static str {
        match self {
            Pattern::Plain => "plain",
            Pattern::Striped => "striped",
            Pattern::Checkered => "checkered",
            Pattern::Dotted => "dotted",
        }
    }

    pub fn from_name(word: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.name() == word)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Background {
    pub colour: Colour,
    pub pattern: Pattern,
}

/// What the caption says about an object: everything but its position.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ObjectDesc {
    pub size: Size,
    pub colour: Colour,
    pub shape: Shape,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Object {
    pub desc: ObjectDesc,
    /// Centre in scene units: the unit square, x to the right, y down.
    pub x: f32,
    pub y: f32,
}

/// Every shape lies within `BOUND * radius` of its centre; spacing rules use this bounding circle.
pub(super) const BOUND: f32 = 1.15;
/// Least distance between a bounding circle and the scene's edge.
const MARGIN: f32 = 0.02;
/// Least distance between two bounding circles, so that no pixel is touched by two objects.
const GAP: f32 = 0.04;
/// A relation is clear when the distance along its axis is at least this many times the distance
/// across it (objects within about 27 degrees of the axis).
const CLEAR: f32 = 2.0;
/// Draws of positions for one choice of objects before the objects are drawn again.
const PLACEMENT_TRIES: usize = 500;

impl Object {
    /// Radius of the bounding circle, in scene units.
    pub fn bound(&self) -> f32 {
        BOUND * self.desc.size.radius()
    }

    /// A random position for `desc` inside the scene (not checked against other objects).
    pub fn random_at(rng: &mut impl Rng, desc: ObjectDesc) -> Self {
        let b = BOUND * desc.size.radius() + MARGIN;
        Self {
            desc,
            x: rng.gen_range(b..1.0 - b),
            y: rng.gen_range(b..1.0 - b),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Scene {
    pub background: Background,
    /// In painting order; the caption's order comes from [`Scene::arrangement`].
    pub objects: Vec<Object>,
}

impl Scene {
    /// A random valid scene with 1 to `config.max_objects` objects; plain backgrounds are drawn
    /// twice as often as each pattern. Errors only for an invalid config.
    pub fn random(rng: &mut impl Rng, config: &SceneConfig) -> Result<Self> {
        config.validate()?;
        let patterns = [
            Pattern::Plain,
            Pattern::Plain,
            Pattern::Striped,
            Pattern::Checkered,
            Pattern::Dotted,
        ];
        let background = Background {
            colour: *Colour::ALL.choose(rng).expect("palette is not empty"),
            pattern: *patterns.choose(rng).expect("patterns are not empty"),
        };
        let count = rng.gen_range(1..=config.max_objects);
        // Rejection sampling: cheap (no rendering) and keeps every valid scene possible.
        loop {
            let descs: Vec<ObjectDesc> = (0..count)
                .map(|_| random_desc(rng, background.colour))
                .collect();
            for _ in 0..PLACEMENT_TRIES {
                let objects = descs.iter().map(|&d| Object::random_at(rng, d)).collect();
                let scene = Scene {
                    background,
                    objects,
                };
                if scene.validate().is_ok() {
                    return Ok(scene);
                }
            }
        }
    }

    /// Checks the rules that make the caption true of the rendered pixels.
    pub fn validate(&self) -> Result<()> {
        let bad = |message: String| Err(Error::argument("scene", message));
        for (i, o) in self.objects.iter().enumerate() {
            let b = o.bound() + MARGIN;
            if !(b..=1.0 - b).contains(&o.x) || !(b..=1.0 - b).contains(&o.y) {
                return bad(format!(
                    "object {i} at ({}, {}) is not inside the picture",
                    o.x, o.y
                ));
            }
            if o.desc.colour == self.background.colour {
                return bad(format!("object {i} has the background's colour"));
            }
            for (j, p) in self.objects.iter().enumerate().skip(i + 1) {
                if (o.desc.colour, o.desc.shape) == (p.desc.colour, p.desc.shape) {
                    return bad(format!(
                        "objects {i} and {j} are both {} {}s",
                        o.desc.colour.name(),
                        o.desc.shape.name()
                    ));
                }
                if (o.x - p.x).hypot(o.y - p.y) < o.bound() + p.bound() + GAP {
                    return bad(format!("objects {i} and {j} are too close"));
                }
            }
        }
        if self.arrangement(CLEAR).is_none() {
            return bad("the objects are not clearly in a row or column".into());
        }
        Ok(())
    }

    /// The attributes the caption states, in the caption's order.
    pub fn describe(&self) -> Description {
        // An invalid scene still gets a caption: its dominant direction.
        let (layout, order) = self
            .arrangement(CLEAR)
            .or_else(|| self.arrangement(1.0))
            .unwrap_or_else(|| (Layout::Row, self.sorted_by(|o| o.x)));
        Description {
            objects: order.iter().map(|&i| self.objects[i].desc).collect(),
            layout,
            background: self.background,
        }
    }

    /// Object `index`, or an error naming the index.
    pub fn object(&self, index: usize) -> Result<&Object> {
        self.objects.get(index).ok_or_else(|| {
            Error::argument(
                "object",
                format!(
                    "index {index} out of range: the scene has {} objects",
                    self.objects.len()
                ),
            )
        })
    }

    pub fn caption(&self) -> String {
        self.describe().to_string()
    }

    /// The caption's layout and order of mention (indices into `objects`), when every relation it
    /// states holds with the given clearness ratio. Two objects are mentioned in painting order;
    /// three or more from left to right or from top to bottom.
    pub fn arrangement(&self, ratio: f32) -> Option<(Layout, Vec<usize>)> {
        let along = |a: &Object, b: &Object, horizontal: bool| {
            let (dx, dy) = ((b.x - a.x).abs(), (b.y - a.y).abs());
            if horizontal {
                dx >= ratio * dy
            } else {
                dy >= ratio * dx
            }
        };
        match self.objects.as_slice() {
            [] | [_] => Some((Layout::Alone, (0..self.objects.len()).collect())),
            [a, b] => {
                let relation = if along(a, b, true) {
                    if b.x >= a.x {
                        Relation::LeftOf
                    } else {
                        Relation::RightOf
                    }
                } else if along(a, b, false) {
                    if b.y >= a.y {
                        Relation::Above
                    } else {
                        Relation::Below
                    }
                } else {
                    return None;
                };
                Some((Layout::Pair(relation), vec![0, 1]))
            }
            _ => [(Layout::Row, true), (Layout::Column, false)]
                .into_iter()
                .find_map(|(layout, horizontal)| {
                    let order = self.sorted_by(|o| if horizontal { o.x } else { o.y });
                    let clear = order
                        .windows(2)
                        .all(|w| along(&self.objects[w[0]], &self.objects[w[1]], horizontal));
                    clear.then_some((layout, order))
                }),
        }
    }

    fn sorted_by(&self, key: impl Fn(&Object) -> f32) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.objects.len()).collect();
        order.sort_by(|&i, &j| key(&self.objects[i]).total_cmp(&key(&self.objects[j])));
        order
    }
}

/// A random object description whose colour differs from the background's.
pub(super) fn random_desc(rng: &mut impl Rng, background: Colour) -> ObjectDesc {
    let colours: Vec<Colour> = Colour::ALL
        .into_iter()
        .filter(|&c| c != background)
        .collect();
    ObjectDesc {
        size: *Size::ALL.choose(rng).expect("sizes are not empty"),
        colour: *colours.choose(rng).expect("seven colours are left"),
        shape: *Shape::ALL.choose(rng).expect("shapes are not empty"),
    }
}
