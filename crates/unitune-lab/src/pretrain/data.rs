//! Training pictures and their captions: scenes of the procedural [`crate::world`], or a folder of
//! images each with a same-name `.txt` caption.
//!
//! World scenes are rendered on demand from their index (rendering is cheap and deterministic);
//! a folder is read once, every image scaled to cover the training size and centre-cropped.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use image::RgbImage;
use rand::seq::SliceRandom;
use rand::Rng;

use crate::world::{SceneConfig, World};
use unitune::image_io;
use unitune::{Error, Result};

const IMAGE_EXTENSIONS: [&str; 4] = ["png", "jpg", "jpeg", "webp"];

/// Where the training pictures come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataSource {
    /// Scenes `0..world_scenes` of the world seeded with the training seed, with 1 to
    /// `world_max_objects` objects.
    World,
    /// `name.png` (or .jpg, .jpeg, .webp) with its caption in `name.txt`.
    Folder(PathBuf),
}

impl DataSource {
    /// `world`, or a folder path: as the CLI's `--data` takes it and `training_state.json` keeps it.
    pub fn parse(text: &str) -> Self {
        match text {
            "world" => DataSource::World,
            path => DataSource::Folder(PathBuf::from(path)),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            DataSource::World => "world".into(),
            DataSource::Folder(path) => path.display().to_string(),
        }
    }
}

/// The training set: `len()` pictures at `size`x`size` with captions.
pub(super) enum Dataset {
    World { world: World, len: usize },
    Folder(Vec<(RgbImage, String)>),
}

impl Dataset {
    pub fn open(
        source: &DataSource,
        size: usize,
        seed: u64,
        world_scenes: usize,
        max_objects: usize,
    ) -> Result<Self> {
        match source {
            DataSource::World => {
                if world_scenes == 0 {
                    return Err(Error::argument("world-scenes", "must be at least 1"));
                }
                let config = SceneConfig {
                    width: size as u32,
                    height: size as u32,
                    max_objects,
                    ..SceneConfig::default()
                };
                Ok(Dataset::World {
                    world: World::new(config, seed)?,
                    len: world_scenes,
                })
            }
            DataSource::Folder(dir) => Ok(Dataset::Folder(read_folder(dir, size)?)),
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Dataset::World { len, .. } => *len,
            Dataset::Folder(items) => items.len(),
        }
    }

    pub fn image(&self, index: usize) -> RgbImage {
        match self {
            Dataset::World { world, .. } => world.scene(index as u64).render(world.config()),
            Dataset::Folder(items) => items[index].0.clone(),
        }
    }

    pub fn caption(&self, index: usize) -> String {
        match self {
            Dataset::World { world, .. } => world.scene(index as u64).caption(),
            Dataset::Folder(items) => items[index].1.clone(),
        }
    }

    /// The share of each pixel of picture `index` that an object covers (0 to 255), where the
    /// data knows its objects (world scenes); `None` for a folder.
    pub fn objects(&self, index: usize) -> Option<image::GrayImage> {
        let Dataset::World { world, .. } = self else {
            return None;
        };
        let config = world.config();
        let scene = world.scene(index as u64);
        let mut union = image::GrayImage::new(config.width, config.height);
        for object in &scene.objects {
            for (u, m) in union.pixels_mut().zip(object.mask(config).pixels()) {
                u.0[0] = u.0[0].max(m.0[0]);
            }
        }
        Some(union)
    }

    /// Pictures `indices` as one batch `[b, 3, size, size]` in `[-1, 1]`.
    pub fn images(&self, indices: &[usize], device: &Device) -> Result<Tensor> {
        let images = indices
            .iter()
            .map(|&i| image_io::image_to_tensor(&self.image(i), device))
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::cat(&images, 0)?)
    }
}

impl Dataset {
    /// One `side`x`side` crop of each picture `indices`, as a batch `[b, 3, side, side]` in
    /// `[-1, 1]` (whole pictures if `side` is 0 or the picture size). World crops are centred,
    /// three times in four, on one of the scene's objects (give or take a quarter of the crop),
    /// so the autoencoder sees shapes and edges more often than plain background; other crops
    /// are uniform.
    pub fn crops(
        &self,
        indices: &[usize],
        side: usize,
        rng: &mut impl Rng,
        device: &Device,
    ) -> Result<Tensor> {
        let crops = indices
            .iter()
            .map(|&i| {
                let image = image_io::image_to_tensor(&self.image(i), device)?; // [1, 3, h, w]
                let (_, _, h, w) = image.dims4()?;
                if side == 0 || (side >= h && side >= w) {
                    return Ok(image);
                }
                let centre = match self {
                    Dataset::World { world, .. } if rng.gen_bool(0.75) => {
                        let scene = world.scene(i as u64);
                        let object = scene.objects.choose(rng).map(|o| (o.x, o.y));
                        object.map(|(x, y)| {
                            let jitter = side as f32 / 4.0;
                            (
                                x * w as f32 + rng.gen_range(-jitter..=jitter),
                                y * h as f32 + rng.gen_range(-jitter..=jitter),
                            )
                        })
                    }
                    _ => None,
                };
                let (x, y) = match centre {
                    Some((cx, cy)) => (
                        (cx - side as f32 / 2.0)
                            .round()
                            .clamp(0.0, (w - side) as f32) as usize,
                        (cy - side as f32 / 2.0)
                            .round()
                            .clamp(0.0, (h - side) as f32) as usize,
                    ),
                    None => (rng.gen_range(0..=w - side), rng.gen_range(0..=h - side)),
                };
                Ok(image.narrow(2, y, side)?.narrow(3, x, side)?)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::cat(&crops, 0)?)
    }
}

/// Every image of `dir` with a caption file, sorted by name, at `size`x`size`.
fn read_folder(dir: &Path, size: usize) -> Result<Vec<(RgbImage, String)>> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension()
                .and_then(|x| x.to_str())
                .is_some_and(|x| IMAGE_EXTENSIONS.contains(&x.to_ascii_lowercase().as_str()))
        })
        .collect();
    paths.sort();
    if paths.is_empty() {
        return Err(Error::argument(
            "data",
            format!(
                "{} holds no images ({})",
                dir.display(),
                IMAGE_EXTENSIONS.join(", ")
            ),
        ));
    }
    paths
        .into_iter()
        .map(|path| {
            let caption_path = path.with_extension("txt");
            let caption =
                std::fs::read_to_string(&caption_path).map_err(|e| Error::io(&caption_path, e))?;
            let image = image_io::resize_and_center_crop(
                image_io::load_image(&path)?,
                size as u32,
                size as u32,
            );
            Ok((image, caption.trim().to_string()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;

    #[test]
    fn folder_pairs_images_with_captions_and_names_a_missing_caption() {
        let dir =
            std::env::temp_dir().join(format!("unitune-pretrain-data-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let image = RgbImage::from_pixel(20, 10, image::Rgb([255, 0, 0]));
        image.save(dir.join("b.png")).unwrap();
        image.save(dir.join("a.png")).unwrap();
        std::fs::write(dir.join("a.txt"), "a red picture\n").unwrap();
        std::fs::write(dir.join("b.txt"), "another").unwrap();
        let data = Dataset::open(&DataSource::Folder(dir.clone()), 8, 0, 0, 1).unwrap();
        assert_eq!(data.len(), 2);
        assert_eq!(data.caption(0), "a red picture");
        assert_eq!(data.image(1).dimensions(), (8, 8));
        let batch = data.images(&[0, 1], &Device::Cpu).unwrap();
        assert_eq!(batch.dims(), &[2, 3, 8, 8]);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
        let crops = data.crops(&[0, 1, 0], 4, &mut rng, &Device::Cpu).unwrap();
        assert_eq!(crops.dims(), &[3, 3, 4, 4]);
        std::fs::remove_file(dir.join("b.txt")).unwrap();
        let err = Dataset::open(&DataSource::Folder(dir.clone()), 8, 0, 0, 1)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("b.txt"), "{err}");
    }

    #[test]
    fn world_crops_mostly_show_an_object() {
        // One object per scene; a crop shows it when some pixel has its colour. Uniform 16x16
        // crops of 64x64 pictures would show it about one time in five.
        let data = Dataset::open(&DataSource::World, 64, 5, 40, 1).unwrap();
        let Dataset::World { world, .. } = &data else {
            unreachable!()
        };
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let indices: Vec<usize> = (0..40).collect();
        let crops = data.crops(&indices, 16, &mut rng, &Device::Cpu).unwrap(); // [40, 3, 16, 16]
        let shown = indices
            .iter()
            .filter(|&&i| {
                let rgb = world.scene(i as u64).objects[0].desc.colour.rgb();
                let colour = Tensor::new(&rgb.map(|c| c as f32 / 127.5 - 1.0), &Device::Cpu)
                    .unwrap()
                    .reshape((3, 1, 1))
                    .unwrap();
                let distance = crops
                    .get(i)
                    .unwrap()
                    .broadcast_sub(&colour)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max(0)
                    .unwrap();
                distance.min_all().unwrap().to_scalar::<f32>().unwrap() < 0.05
            })
            .count();
        assert!(shown >= 24, "{shown} of 40 crops show the object");
    }

    #[test]
    fn world_scenes_are_captioned_pictures() {
        let data = Dataset::open(&DataSource::World, 32, 3, 10, 3).unwrap();
        assert_eq!(data.len(), 10);
        assert_eq!(data.image(4).dimensions(), (32, 32));
        assert_eq!(data.image(4), data.image(4));
        assert!(
            data.caption(4).contains("background"),
            "{}",
            data.caption(4)
        );
        assert_eq!(DataSource::parse("world"), DataSource::World);
        assert_eq!(DataSource::parse("some/dir").describe(), "some/dir");
    }
}
