//! Ground-truth edits: a change to one attribute of a scene, with the prompt a UniTune user would
//! type for it (the edited scene's full caption), a short instruction, and the region of pixels it
//! may change, so a benchmark can score inside (did the change happen) and outside (was the rest
//! kept) separately.

use image::GrayImage;
use rand::seq::SliceRandom;
use rand::Rng;

use super::caption::{object_words, with_article};
use super::scene::{random_desc, Background, Colour, Object, Pattern, Scene, Shape};
use super::SceneConfig;
use unitune::{Error, Result};

/// Draws of one kind of edit before another kind is tried (adding to a crowded scene often fails).
const EDIT_TRIES: usize = 500;

#[derive(Debug, Clone, PartialEq)]
pub enum Edit {
    ColourChange {
        object: usize,
        to: Colour,
    },
    ShapeChange {
        object: usize,
        to: Shape,
    },
    /// Adds the object on top; it must fit where it is.
    AddObject(Object),
    RemoveObject {
        object: usize,
    },
    BackgroundChange(Background),
}

impl Scene {
    /// The edited scene. Errors when the edit changes nothing, names a missing object, or leaves
    /// a scene whose caption would not be true (see [`Scene::validate`]).
    pub fn apply(&self, edit: &Edit) -> Result<Scene> {
        let mut scene = self.clone();
        let same = |what: &str| {
            Err(Error::argument(
                "edit",
                format!("{what} is already as asked"),
            ))
        };
        match *edit {
            Edit::ColourChange { object, to } => {
                if self.object(object)?.desc.colour == to {
                    return same("the object's colour");
                }
                scene.objects[object].desc.colour = to;
            }
            Edit::ShapeChange { object, to } => {
                if self.object(object)?.desc.shape == to {
                    return same("the object's shape");
                }
                scene.objects[object].desc.shape = to;
            }
            Edit::AddObject(object) => scene.objects.push(object),
            Edit::RemoveObject { object } => {
                self.object(object)?;
                scene.objects.remove(object);
            }
            Edit::BackgroundChange(background) => {
                if background == self.background {
                    return same("the background");
                }
                scene.background = background;
            }
        }
        scene.validate()?;
        Ok(scene)
    }

    /// A random edit that [`Scene::apply`] accepts, its kind drawn uniformly among those possible
    /// (no object edits on an empty scene, no addition beyond `config.max_objects`). Errors for
    /// an invalid scene, which no edit can make valid.
    pub fn random_edit(&self, rng: &mut impl Rng, config: &SceneConfig) -> Result<Edit> {
        // A valid scene always has one: a new background pattern.
        self.validate()?;
        loop {
            let kind = rng.gen_range(0..5);
            for _ in 0..EDIT_TRIES {
                let Some(edit) = self.draw_edit(kind, rng, config) else {
                    break;
                };
                if self.apply(&edit).is_ok() {
                    return Ok(edit);
                }
            }
        }
    }

    /// One candidate edit of the given kind, or None when the scene allows none of that kind.
    fn draw_edit(&self, kind: u32, rng: &mut impl Rng, config: &SceneConfig) -> Option<Edit> {
        let n = self.objects.len();
        let object = (n > 0).then(|| rng.gen_range(0..n));
        Some(match kind {
            0 => Edit::ColourChange {
                object: object?,
                to: *Colour::ALL.choose(rng)?,
            },
            1 => Edit::ShapeChange {
                object: object?,
                to: *Shape::ALL.choose(rng)?,
            },
            2 if n >= config.max_objects => return None,
            2 => {
                let desc = random_desc(rng, self.background.colour);
                Edit::AddObject(Object::random_at(rng, desc))
            }
            3 => Edit::RemoveObject { object: object? },
            _ => Edit::BackgroundChange(Background {
                colour: *Colour::ALL.choose(rng)?,
                pattern: *Pattern::ALL.choose(rng)?,
            }),
        })
    }
}

impl Edit {
    /// The UniTune edit prompt: the caption of the edited scene.
    pub fn prompt(&self, scene: &Scene) -> Result<String> {
        Ok(scene.apply(self)?.caption())
    }

    /// A short instruction, e.g. "make the red circle blue"; an object is named by colour and
    /// shape, which are unique in a valid scene.
    pub fn instruction(&self, scene: &Scene) -> Result<String> {
        scene.apply(self)?;
        let name = |index: usize| -> Result<String> {
            let desc = scene.object(index)?.desc;
            Ok(format!("the {} {}", desc.colour.name(), desc.shape.name()))
        };
        Ok(match self {
            Edit::ColourChange { object, to } => format!("make {} {}", name(*object)?, to.name()),
            Edit::ShapeChange { object, to } => {
                format!("turn {} into {}", name(*object)?, with_article(to.name()))
            }
            Edit::AddObject(object) => format!("add {}", with_article(&object_words(&object.desc))),
            Edit::RemoveObject { object } => format!("remove {}", name(*object)?),
            Edit::BackgroundChange(b) => {
                format!(
                    "make the background {} {}",
                    b.pattern.name(),
                    b.colour.name()
                )
            }
        })
    }

    /// The pixels the edit may change (0 to 255, the larger coverage of before and after): the
    /// object's old and new footprint, or every pixel for a background change. Pixels where it is
    /// 0 are identical in the renders before and after.
    pub fn region(&self, scene: &Scene, config: &SceneConfig) -> Result<GrayImage> {
        let edited = scene.apply(self)?;
        Ok(match *self {
            Edit::ColourChange { object, .. } | Edit::RemoveObject { object } => {
                scene.object_mask(object, config)?
            }
            Edit::ShapeChange { object, .. } => {
                let mut mask = scene.object_mask(object, config)?;
                let after = edited.object_mask(object, config)?;
                for (m, a) in mask.pixels_mut().zip(after.pixels()) {
                    m.0[0] = m.0[0].max(a.0[0]);
                }
                mask
            }
            Edit::AddObject(object) => object.mask(config),
            Edit::BackgroundChange(_) => {
                GrayImage::from_pixel(config.width, config.height, image::Luma([255]))
            }
        })
    }
}
