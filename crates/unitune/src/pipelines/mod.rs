//! Pipelines: a loaded Stable Diffusion model ([`StableDiffusion`], from a diffusers folder or a
//! single-file checkpoint) and the pipelines built on it: [`generate`] (txt2img, img2img) and [`edit`] (UniTune's editing stage), both made of the
//! stages in [`denoising`], named as in diffusers (`encode_prompt`, `prepare_latents`, the
//! denoising loop, `decode_latents`).

pub mod denoising;
mod edit;
mod generate;
mod mask;
mod progress;

pub use denoising::{Guidance, GuidanceMode};
pub use edit::{edit, prompt_with_token, EditBase, EditMask, EditOutput, EditRequest};
pub use generate::{generate, read_init_noise, GenerateRequest};
pub use mask::{AutoMask, Mask};
pub use progress::{NoProgress, Progress};

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::models::clip::{ClipTextConfig, ClipTextModel};
use crate::models::unet::{UNet2DConditionConfig, UNet2DConditionModel};
use crate::models::vae::{AutoencoderKl, VaeConfig};
use crate::noise::Noise;
use crate::schedulers::SchedulerConfig;
use crate::session::Session;
use crate::tokenizer::ClipTokenizer;
use crate::weights::export::{write_pipeline, PipelineParts, SpecialTokenIds};
use crate::weights::folder::check_model_index;
use crate::weights::single_file::convert::Component;
use crate::weights::single_file::{is_single_file, SingleFile, SingleFileOptions};
use crate::weights::{TrainableFilter, WeightStore};

/// How to load a model.
#[derive(Clone)]
pub struct LoadOptions {
    pub device: Device,
    /// The dtype networks compute in (f32 on CPU).
    pub dtype: DType,
    /// Weights variant to require, e.g. `fp16` for `*.fp16.safetensors`; `None` takes the
    /// full-precision files, or the fp16 ones when they are all the folder has.
    pub variant: Option<String>,
    /// UNet tensors to load as trainable `Var`s (for tuning); `None` loads all frozen.
    pub trainable: Option<TrainableFilter>,
    /// How to read a single-file checkpoint (refused for a folder when any is set).
    pub single_file: SingleFileOptions,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            dtype: DType::F32,
            variant: None,
            trainable: None,
            single_file: SingleFileOptions::default(),
        }
    }
}

/// What a model was loaded from.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelSource {
    /// A diffusers-layout folder.
    Folder,
    /// A single-file checkpoint, read with these options.
    SingleFile(SingleFileOptions),
}

/// A Stable Diffusion 1.x / 2.x model loaded from a diffusers-layout folder or a single file.
pub struct StableDiffusion {
    /// The folder, or the single file, the model was loaded from.
    pub dir: PathBuf,
    pub source: ModelSource,
    pub tokenizer: ClipTokenizer,
    pub text_encoder: ClipTextModel,
    pub vae: AutoencoderKl,
    pub vae_config: VaeConfig,
    pub unet: UNet2DConditionModel,
    pub unet_config: UNet2DConditionConfig,
    /// The UNet's weights as stored (the base a session's deltas apply to) and its trainable vars.
    pub unet_store: WeightStore,
    pub scheduler_config: SchedulerConfig,
    pub device: Device,
    pub dtype: DType,
}

/// The largest picture sampled or tuned, 4096 x 4096: eight times SD's training size on each
/// side, where the VAE alone already needs tens of GB.
pub const MAX_WORK_PIXELS: usize = 4096 * 4096;

impl StableDiffusion {
    /// Loads every component of the folder `dir`, checking `model_index.json` first so that a
    /// folder of another pipeline (SDXL, SD3, ...) is refused by name rather than by a missing
    /// tensor; or, when `dir` is a file, the single-file checkpoint it is.
    pub fn load(dir: &Path, options: &LoadOptions) -> Result<Self> {
        if is_single_file(dir) {
            return Self::load_single_file(dir, options);
        }
        options.single_file.refuse_for(dir)?;
        check_model_index(dir)?;
        let variant = options.variant.as_deref();
        let (device, dtype) = (&options.device, options.dtype);
        let tokenizer = ClipTokenizer::from_dir(&dir.join("tokenizer"))?;
        let (text_encoder, text_config) =
            ClipTextModel::load(&dir.join("text_encoder"), variant, dtype, device)?;
        let (vae, vae_config) = AutoencoderKl::load(&dir.join("vae"), variant, dtype, device)?;
        let unet_config = UNet2DConditionConfig::from_file(&dir.join("unet/config.json"))?;
        let config_paths = (
            dir.join("text_encoder/config.json"),
            dir.join("unet/config.json"),
        );
        check_components_fit(
            &config_paths,
            &tokenizer,
            &text_config,
            &vae_config,
            &unet_config,
        )?;
        let mut unet_store = WeightStore::open(&dir.join("unet"), variant, device)?;
        if let Some(filter) = &options.trainable {
            unet_store = unet_store.with_trainable(filter.clone());
        }
        let unet = UNet2DConditionModel::from_store(&unet_store, &unet_config, dtype, device)?;
        let scheduler_config =
            SchedulerConfig::from_file(&dir.join("scheduler/scheduler_config.json"))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            source: ModelSource::Folder,
            tokenizer,
            text_encoder,
            vae,
            vae_config,
            unet,
            unet_config,
            unet_store,
            scheduler_config,
            device: device.clone(),
            dtype,
        })
    }

    /// The single-file checkpoint `path`: its networks converted in memory (see
    /// [`crate::weights::single_file`]).
    fn load_single_file(path: &Path, options: &LoadOptions) -> Result<Self> {
        if options.variant.is_some() {
            return Err(Error::argument(
                "variant",
                "applies to model folders; a single file holds one set of weights",
            ));
        }
        let (device, dtype) = (&options.device, options.dtype);
        let SingleFile {
            configs: c,
            unet: mut unet_store,
            vae,
            text_encoder,
        } = SingleFile::open(path, &options.single_file, device)?;
        let tokenizer = ClipTokenizer::from_files(&c.tokenizer_source, &c.tokenizer)?;
        let text_encoder =
            text_encoder.build(dtype, device, |vb| ClipTextModel::new(vb, &c.text_encoder))?;
        let vae = vae.build(dtype, device, |vb| AutoencoderKl::new(vb, &c.vae))?;
        let config_paths = (c.text_encoder_source.clone(), c.unet_source.clone());
        check_components_fit(&config_paths, &tokenizer, &c.text_encoder, &c.vae, &c.unet)?;
        if let Some(filter) = &options.trainable {
            unet_store = unet_store.with_trainable(filter.clone());
        }
        let unet = UNet2DConditionModel::from_store(&unet_store, &c.unet, dtype, device)?;
        Ok(Self {
            dir: path.to_path_buf(),
            source: ModelSource::SingleFile(options.single_file.clone()),
            tokenizer,
            text_encoder,
            vae,
            vae_config: c.vae,
            unet,
            unet_config: c.unet,
            unet_store,
            scheduler_config: c.scheduler,
            device: device.clone(),
            dtype,
        })
    }

    /// Pixels per latent along each side (8 for Stable Diffusion).
    pub fn vae_scale_factor(&self) -> usize {
        self.vae_config.scale_factor()
    }

    /// The size to work at: `width` and `height` if given, else the image's size (`image`, when
    /// there is one) rounded down to a multiple of the VAE factor, as diffusers does, else the
    /// model's native size (`unet.sample_size * 8`).
    pub fn default_size(
        &self,
        width: Option<usize>,
        height: Option<usize>,
        image: Option<(u32, u32)>,
    ) -> Result<(usize, usize)> {
        let f = self.vae_scale_factor();
        let native = self.unet_config.sample_size.map(|s| s * f);
        let pick = |given: Option<usize>, from_image: Option<u32>, name: &str| match (
            given, from_image, native,
        ) {
            (Some(v), _, _) => Ok(v),
            (None, Some(v), _) => Ok(v as usize / f * f),
            (None, None, Some(v)) => Ok(v),
            (None, None, None) => Err(Error::argument(
                name,
                "the model's unet/config.json has no sample_size: give the size",
            )),
        };
        Ok((
            pick(width, image.map(|d| d.0), "width")?,
            pick(height, image.map(|d| d.1), "height")?,
        ))
    }

    /// Checks a size to sample or tune at: positive multiples of the VAE factor on each side, and
    /// at most [`MAX_WORK_PIXELS`] in all, so that an absurd size is an error naming the flag
    /// rather than an out-of-memory kill (`name` is how the caller calls width; height alike).
    pub fn check_size(&self, width: usize, height: usize) -> Result<()> {
        let f = self.vae_scale_factor();
        for (name, value) in [("width", width), ("height", height)] {
            if value == 0 || value % f != 0 {
                return Err(Error::argument(
                    name,
                    format!("{value} is not a positive multiple of {f}"),
                ));
            }
        }
        if width.saturating_mul(height) > MAX_WORK_PIXELS {
            return Err(Error::argument(
                "width",
                format!(
                    "{width}x{height} is more than the {} megapixels unitune works at (4096x4096)",
                    MAX_WORK_PIXELS / 1_000_000
                ),
            ));
        }
        Ok(())
    }

    /// Text embeddings `[1, 77, d]` for `prompt`, and the part of the prompt that did not fit.
    pub fn encode_prompt(&self, prompt: &str) -> Result<(Tensor, Option<String>)> {
        let encoding = self.tokenizer.encode(prompt);
        let ids = Tensor::new(encoding.ids.as_slice(), &self.device)?.unsqueeze(0)?;
        Ok((self.text_encoder.forward(&ids)?, encoding.truncated))
    }

    /// Scaled latents `[1, c, h/8, w/8]` of an image tensor in `[-1, 1]`, sampled from the VAE's
    /// posterior as diffusers' img2img does (one noise draw).
    pub fn encode_image(&self, image: &Tensor, noise: &mut Noise) -> Result<Tensor> {
        let posterior = self.vae.encode(&image.to_dtype(self.dtype)?)?;
        let z = posterior.sample(noise)?;
        self.scale_latents(&z)
    }

    /// VAE latents to the scale the UNet works in: `(z - shift) * scaling_factor`.
    pub fn scale_latents(&self, z: &Tensor) -> Result<Tensor> {
        Ok(self.vae_config.scale_latents(z)?)
    }

    /// Image tensor `[b, 3, h, w]` in `[-1, 1]` from scaled latents.
    pub fn decode_latents(&self, latents: &Tensor) -> Result<Tensor> {
        self.vae.decode(&self.vae_config.unscale_latents(latents)?)
    }

    /// Writes the model with `session` applied as a diffusers folder at `out`: the tuned model,
    /// for the tools people already use. A folder is copied with its UNet's weights replaced (see
    /// [`crate::weights::export::write_with_unet`]); a single file's networks are written whole,
    /// in the UNet's dtype, its text encoder and VAE read from the file again rather than kept in
    /// memory for an export.
    pub fn export_tuned(&self, session: &Session, out: &Path) -> Result<()> {
        let tuned = session.apply(self.unet_store.tensors(), self.unet_store.origin())?;
        let ModelSource::SingleFile(options) = &self.source else {
            return crate::weights::export::write_with_unet(&self.dir, &tuned, out);
        };
        let others = [Component::Vae, Component::TextEncoder];
        let file = SingleFile::open_only(&self.dir, options, &Device::Cpu, &others)?;
        let c = &file.configs;
        let parts = PipelineParts {
            text_encoder: (&c.text_encoder, file.text_encoder.tensors()),
            special_tokens: SpecialTokenIds {
                bos: self.tokenizer.bos_id(),
                eos: self.tokenizer.eos_id(),
                pad: self.tokenizer.pad_id(),
            },
            vae: (&self.vae_config, file.vae.tensors()),
            unet: (&self.unet_config, &tuned),
            scheduler: &self.scheduler_config,
            tokenizer: &c.tokenizer,
        };
        let dtype = tuned.values().next().map_or(DType::F32, |t| t.dtype());
        crate::atomic::replace_dir(out, |tmp| write_pipeline(tmp, &parts, dtype))
    }

    /// Replaces the UNet with `base + deltas` of a tuned session (tune once, edit many).
    pub fn apply_session(&mut self, session: &Session) -> Result<()> {
        let tuned = session.apply(self.unet_store.tensors(), self.unet_store.origin())?;
        let store = WeightStore::from_tensors(self.unet_store.origin(), tuned);
        self.unet =
            UNet2DConditionModel::from_store(&store, &self.unet_config, self.dtype, &self.device)?;
        Ok(())
    }
}

/// Components of different models in one folder (a text encoder from SD 2 beside an SD 1 UNet,
/// an inpainting UNet) each load fine on their own; this names the mismatch before the first
/// step fails deep inside a layer with a bare shape error. `config_paths` are where the text
/// encoder's and the UNet's configs came from.
fn check_components_fit(
    (text_path, unet_path): &(PathBuf, PathBuf),
    tokenizer: &ClipTokenizer,
    text: &ClipTextConfig,
    vae: &VaeConfig,
    unet: &UNet2DConditionConfig,
) -> Result<()> {
    let mismatch =
        |path: &Path, field: &str, message: String| Err(Error::config(path, field, message));
    if tokenizer.max_id() as usize >= text.vocab_size {
        return mismatch(
            text_path,
            "vocab_size",
            format!(
                "{} is too small for tokenizer/vocab.json (ids up to {}): the tokenizer and text encoder come from different models",
                text.vocab_size,
                tokenizer.max_id()
            ),
        );
    }
    if tokenizer.max_length() > text.max_position_embeddings {
        return mismatch(
            text_path,
            "max_position_embeddings",
            format!(
                "{} is less than the tokenizer's model_max_length {}",
                text.max_position_embeddings,
                tokenizer.max_length()
            ),
        );
    }
    if unet.cross_attention_dim != text.hidden_size {
        return mismatch(
            unet_path,
            "cross_attention_dim",
            format!(
                "{} does not match the text encoder's hidden_size {} ({}): the components come from different models",
                unet.cross_attention_dim,
                text.hidden_size,
                text_path.display()
            ),
        );
    }
    for (field, channels) in [
        ("in_channels", unet.in_channels),
        ("out_channels", unet.out_channels),
    ] {
        if channels != vae.latent_channels {
            return mismatch(
                unet_path,
                field,
                format!(
                    "{channels} does not match the VAE's latent_channels {} (an inpainting or \
                     foreign UNet?); unitune loads text-to-image UNets",
                    vae.latent_channels
                ),
            );
        }
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn fixture(rel: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures")
            .join(rel)
    }

    #[test]
    fn loads_both_fixture_styles() {
        for name in ["tiny-sd1", "tiny-sd2"] {
            let sd = StableDiffusion::load(&fixture(name), &LoadOptions::default()).unwrap();
            assert_eq!(sd.vae_scale_factor(), 8);
            let (emb, cut) = sd.encode_prompt("a photo of a cat").unwrap();
            assert_eq!(emb.dims(), &[1, 77, 32]);
            assert!(cut.is_none());
        }
    }

    #[test]
    fn other_pipelines_are_refused_by_name() {
        let dir = std::env::temp_dir().join(format!("unitune-index-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("model_index.json"),
            r#"{"_class_name": "StableDiffusionXLPipeline"}"#,
        )
        .unwrap();
        let err = StableDiffusion::load(&dir, &LoadOptions::default())
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("_class_name") && err.contains("StableDiffusionXLPipeline"),
            "{err}"
        );
        let err = StableDiffusion::load(&dir.join("nowhere"), &LoadOptions::default())
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("model_index.json"), "{err}");
    }
}
