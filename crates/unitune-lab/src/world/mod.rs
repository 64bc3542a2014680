//! A procedural world of small captioned pictures, to train and evaluate unitune's built-in
//! text-to-image model on data whose every caption is exactly true of its pixels.
//!
//! A [`Scene`] is a background (one of eight colours; plain, striped, checkered or dotted) and up
//! to three objects (circle, square, triangle, star or ring; one of the colours; small, medium or
//! large) that do not touch. Its caption comes from a small grammar ([`Description`]), e.g.
//! "a small red circle left of a blue square on a striped yellow background" or "a green ring, a
//! large white star and a black triangle from left to right on a purple background". Scenes are
//! kept unambiguous: every object differs from the background's colour, no two share colour and
//! shape, and two or more objects lie clearly along one direction.
//!
//! A [`World`] draws scene `index` from its own ChaCha8 stream of a seed, so a data set is a range
//! of indices, reproducible and splittable into train and held-out parts. An [`Edit`] changes one
//! attribute, with its prompt and the region of pixels it changes, for scoring edits against ground
//! truth. [`write_tokenizer_files`] writes a CLIP tokenizer in which every grammar word is a token.

mod caption;
mod edits;
pub mod follow;
mod render;
mod scene;
pub mod score;
mod tokenizer;

#[cfg(test)]
mod tests;

use image::{GrayImage, RgbImage};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

pub use caption::{vocabulary, Description, Layout, Relation};
pub use edits::Edit;
pub use scene::{Background, Colour, Object, ObjectDesc, Pattern, Scene, Shape, Size};
pub use tokenizer::write_tokenizer_files;

use unitune::{Error, Result};

/// Most objects a random scene has: three of the smaller sizes still fit in a row.
pub const MAX_OBJECTS: usize = 3;

/// How scenes are drawn and rendered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SceneConfig {
    pub width: u32,
    pub height: u32,
    /// Scenes have 1 to `max_objects` objects (at most [`MAX_OBJECTS`]).
    pub max_objects: usize,
    /// Each pixel averages `supersample²` samples; 1 gives hard, aliased edges.
    pub supersample: u32,
}

impl Default for SceneConfig {
    fn default() -> Self {
        Self {
            width: 64,
            height: 64,
            max_objects: MAX_OBJECTS,
            supersample: 4,
        }
    }
}

impl SceneConfig {
    pub fn validate(&self) -> Result<()> {
        if self.width == 0 || self.height == 0 {
            return Err(Error::argument(
                "world size",
                format!("{}x{} has no pixels", self.width, self.height),
            ));
        }
        if !(1..=MAX_OBJECTS).contains(&self.max_objects) {
            return Err(Error::argument(
                "max_objects",
                format!("{} is not in 1..={MAX_OBJECTS}", self.max_objects),
            ));
        }
        if !(1..=16).contains(&self.supersample) {
            return Err(Error::argument(
                "supersample",
                format!("{} is not in 1..=16", self.supersample),
            ));
        }
        Ok(())
    }
}

/// An endless, seeded set of scenes, addressed by index.
#[derive(Debug, Clone)]
pub struct World {
    config: SceneConfig,
    seed: u64,
}

/// A scene, a random edit of it, and everything a benchmark scores the edit with.
#[derive(Debug, Clone)]
pub struct EditSample {
    pub scene: Scene,
    pub edit: Edit,
    pub edited: Scene,
    pub before: RgbImage,
    pub after: RgbImage,
    /// The pixels the edit may change ([`Edit::region`]).
    pub region: GrayImage,
    pub caption: String,
    /// The edited scene's caption: the UniTune edit prompt.
    pub prompt: String,
    pub instruction: String,
}

impl World {
    pub fn new(config: SceneConfig, seed: u64) -> Result<Self> {
        config.validate()?;
        Ok(Self { config, seed })
    }

    pub fn config(&self) -> &SceneConfig {
        &self.config
    }

    /// Scene `index`, without rendering it.
    pub fn scene(&self, index: u64) -> Scene {
        Scene::random(&mut self.rng(index), &self.config).expect("the config was validated")
    }

    /// Scene `index`, its picture and its caption.
    pub fn sample(&self, index: u64) -> (Scene, RgbImage, String) {
        let scene = self.scene(index);
        let image = scene.render(&self.config);
        let caption = scene.caption();
        (scene, image, caption)
    }

    /// Scene `index` (the same as [`World::scene`]) and a random edit of it, without rendering.
    pub fn edit(&self, index: u64) -> (Scene, Edit) {
        let mut rng = self.rng(index);
        let scene = Scene::random(&mut rng, &self.config).expect("the config was validated");
        let edit = scene
            .random_edit(&mut rng, &self.config)
            .expect("random scenes are valid");
        (scene, edit)
    }

    /// [`World::edit`] rendered, with its captions and region.
    pub fn edit_sample(&self, index: u64) -> EditSample {
        let (scene, edit) = self.edit(index);
        let edited = scene
            .apply(&edit)
            .expect("random_edit returns edits that apply");
        let instruction = edit.instruction(&scene).expect("the edit applies");
        let region = edit.region(&scene, &self.config).expect("the edit applies");
        EditSample {
            before: scene.render(&self.config),
            after: edited.render(&self.config),
            caption: scene.caption(),
            prompt: edited.caption(),
            scene,
            edit,
            edited,
            region,
            instruction,
        }
    }

    /// Index `index`'s own stream of the seed: indices never share random numbers.
    fn rng(&self, index: u64) -> ChaCha8Rng {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        rng.set_stream(index);
        rng
    }
}
