//! Phase two: the text encoder and the UNet, trained together on the frozen autoencoder's latents
//! with the standard denoising objective.
//!
//! Every training picture is encoded once into its latent Gaussian (mean and std), and every
//! caption into token ids, before the first step ([`LatentCache`]); a step samples latents from
//! the cached Gaussians, so the autoencoder costs nothing per step. One step, as in diffusers'
//! text-to-image training script: latents times `scaling_factor`, per-sample noise and timestep
//! drawn uniformly from the DDPM schedule, `add_noise`, the UNet predicts the scheduler's
//! `prediction_type` target from the noisy latents and the text encoder's states of the caption.
//! 10% of captions are replaced by the empty prompt so that the model also learns the
//! unconditional prediction that classifier-free guidance needs.
//!
//! The built-in model predicts the noise (epsilon, as Stable Diffusion 1.x). v-prediction (as SD
//! 2.x) weighs the noisiest timesteps more, where the caption decides the picture, but on this
//! data and budget it did not learn the noise at all: after 1400 steps of 16 its estimate of the
//! clean latents at t = 10 was no better than the noisy input itself (mean squared error 0.010
//! against 0.0096), so its samples kept the starting noise as coloured texture. The epsilon model
//! of the same run reached 0.0038 there and 0.017 at t = 200 (input: 0.26).
//!
//! The noise has an offset (Guttenberg's "offset noise", 0.1): a random constant per sample and
//! channel added to the Gaussian. Without it, the last training timestep still shows a picture's
//! mean colour through the noise (SD's schedule keeps sqrt(alphas_cumprod) = 0.07 of the signal),
//! while sampling starts from noise with no such mean: the model learns to read the background
//! colour off the noise instead of the caption, and flat backgrounds, most of this data, come out
//! in washed-out random colours.
//!
//! The loss is the MSE weighted per sample as min-SNR-5 (Hang et al. 2023; diffusers'
//! `--snr_gamma 5`): min(SNR(t), 5) / SNR(t) for epsilon, min(SNR(t), 5) / (SNR(t) + 1) for v.
//! It stops the many nearly noise-free timesteps, whose details matter little to the picture,
//! from dominating the gradient, which makes training converge several times faster.

use candle_core::{DType, Device, Tensor, Var};
use rand::Rng;

use super::data::Dataset;
use unitune::models::clip::ClipTextModel;
use unitune::models::unet::UNet2DConditionModel;
use unitune::models::vae::AutoencoderKl;
use unitune::noise::Noise;
use unitune::schedulers::{NoiseSchedule, PredictionType, SchedulerConfig};
use unitune::tokenizer::ClipTokenizer;
use unitune::train::{OptimizerKind, TrainOptimizer};
use unitune::weights::export::Tensors;
use unitune::Result;

/// gamma of the min-SNR weighting.
const SNR_GAMMA: f64 = 5.0;

/// The training set as the denoiser sees it.
pub(super) struct LatentCache {
    /// `[n, c, h, w]` unscaled latent means and standard deviations.
    mean: Tensor,
    std: Tensor,
    /// `[n, 1, h, w]` weight of each latent in the loss: 1, plus the object weight where an
    /// object touches the latent's pixels; `None` when every latent weighs the same.
    focus: Option<Tensor>,
    /// `[n, max_length]` u32 token ids of the captions, and `[max_length]` of the empty prompt.
    ids: Tensor,
    empty_ids: Tensor,
    /// Captions longer than the tokenizer's context, cut short.
    pub truncated: usize,
}

impl LatentCache {
    /// Encodes every picture and caption of `data`, `batch` pictures at a time; with an
    /// `object_weight` above 0 and data that knows its objects, also their latents' loss weights.
    pub fn build(
        vae: &AutoencoderKl,
        tokenizer: &ClipTokenizer,
        data: &Dataset,
        batch: usize,
        object_weight: f64,
        device: &Device,
    ) -> Result<Self> {
        let (mut means, mut stds, mut ids, mut truncated) = (Vec::new(), Vec::new(), Vec::new(), 0);
        let mut focus = Vec::new();
        for start in (0..data.len()).step_by(batch.max(1)) {
            let indices: Vec<usize> = (start..(start + batch).min(data.len())).collect();
            let posterior = vae.encode(&data.images(&indices, device)?)?;
            means.push(posterior.mean.detach());
            stds.push(posterior.std()?.detach());
            let (h, w) = posterior.mean.dims4().map(|(_, _, h, w)| (h, w))?;
            for &i in &indices {
                if let Some(objects) = data.objects(i).filter(|_| object_weight > 0.0) {
                    focus.push(focus_map(&objects, h, w, object_weight, device)?);
                }
                let encoding = tokenizer.encode(&data.caption(i));
                truncated += encoding.truncated.is_some() as usize;
                ids.push(Tensor::new(encoding.ids, device)?);
            }
        }
        Ok(Self {
            // `cat` of one tensor returns it as it is: a narrow of the encoder's moments.
            mean: Tensor::cat(&means, 0)?.contiguous()?,
            std: Tensor::cat(&stds, 0)?.contiguous()?,
            focus: match focus.is_empty() {
                true => None,
                false => Some(Tensor::stack(&focus, 0)?),
            },
            ids: Tensor::stack(&ids, 0)?,
            empty_ids: Tensor::new(tokenizer.encode("").ids, device)?,
            truncated,
        })
    }

    pub fn len(&self) -> usize {
        self.ids.dims()[0]
    }
}

/// `[1, h, w]`: 1 + `weight` at each latent whose pixels an object covers (any share), else 1.
fn focus_map(
    objects: &image::GrayImage,
    h: usize,
    w: usize,
    weight: f64,
    device: &Device,
) -> Result<Tensor> {
    let (cw, ch) = (objects.width() as usize / w, objects.height() as usize / h);
    let mut values = vec![1f32; h * w];
    for (x, y, p) in objects.enumerate_pixels() {
        let (lx, ly) = ((x as usize / cw).min(w - 1), (y as usize / ch).min(h - 1));
        if p.0[0] > 0 {
            values[ly * w + lx] = 1.0 + weight as f32;
        }
    }
    Ok(Tensor::from_vec(values, (1, h, w), device)?)
}

/// What a step draws: which pictures, which captions are dropped, timesteps and noise.
pub(super) struct StepDraw {
    pub indices: Vec<u32>,
    pub dropped: Vec<bool>,
    /// `[b]` u32
    pub timesteps: Tensor,
    /// `[b, c, h, w]`: the latent sample's standard normal draw, and the diffusion noise.
    pub latent_noise: Tensor,
    pub noise: Tensor,
}

pub(super) struct DenoiserTrainer {
    pub text_encoder: ClipTextModel,
    pub unet: UNet2DConditionModel,
    pub text_vars: Vec<(String, Var)>,
    pub unet_vars: Vec<(String, Var)>,
    /// The schedule trained with, written into the model folder.
    pub scheduler: SchedulerConfig,
    optimizer: TrainOptimizer,
    schedule: NoiseSchedule,
    scaling_factor: f64,
}

impl DenoiserTrainer {
    pub fn new(
        text_encoder: ClipTextModel,
        text_vars: Vec<(String, Var)>,
        unet: UNet2DConditionModel,
        unet_vars: Vec<(String, Var)>,
        scheduler: &SchedulerConfig,
        scaling_factor: f64,
        lr: f64,
    ) -> Result<Self> {
        let vars = text_vars
            .iter()
            .chain(&unet_vars)
            .map(|(_, v)| v.clone())
            .collect();
        let optimizer = OptimizerKind::AdamW.build(vars, lr)?;
        Ok(Self {
            text_encoder,
            unet,
            text_vars,
            unet_vars,
            optimizer,
            schedule: NoiseSchedule::new(scheduler)?,
            scheduler: scheduler.clone(),
            scaling_factor,
        })
    }

    /// Draws a step's inputs: `batch` pictures uniformly, each caption dropped with probability
    /// `dropout`, timesteps uniform over the schedule, then the noise tensors from `noise`; the
    /// diffusion noise gets `offset_noise` times a per-sample, per-channel constant on top.
    pub fn draw(
        &self,
        cache: &LatentCache,
        batch: usize,
        dropout: f64,
        offset_noise: f64,
        rng: &mut impl Rng,
        noise: &mut Noise,
    ) -> Result<StepDraw> {
        let n = self.schedule.num_train_timesteps() as u32;
        let indices: Vec<u32> = (0..batch)
            .map(|_| rng.gen_range(0..cache.len() as u32))
            .collect();
        let dropped: Vec<bool> = (0..batch).map(|_| rng.gen_bool(dropout)).collect();
        let timesteps: Vec<u32> = (0..batch).map(|_| rng.gen_range(0..n)).collect();
        let (_, c, h, w) = cache.mean.dims4()?;
        let device = cache.mean.device();
        Ok(StepDraw {
            indices,
            dropped,
            timesteps: Tensor::new(timesteps, device)?,
            latent_noise: noise.randn((batch, c, h, w), device)?,
            noise: noise
                .randn((batch, c, h, w), device)?
                .broadcast_add(&(noise.randn((batch, c, 1, 1), device)? * offset_noise)?)?,
        })
    }

    /// The min-SNR weighted loss of `draw`, as a scalar that backpropagates into both networks.
    pub fn loss(&self, cache: &LatentCache, draw: &StepDraw) -> Result<Tensor> {
        let device = cache.mean.device();
        let indices = Tensor::new(draw.indices.as_slice(), device)?;
        let z = (cache.mean.index_select(&indices, 0)?
            + cache
                .std
                .index_select(&indices, 0)?
                .mul(&draw.latent_noise)?)?;
        let latents = (z * self.scaling_factor)?; // [b, c, h, w]
        let ids = draw
            .indices
            .iter()
            .zip(&draw.dropped)
            .map(|(&i, &dropped)| {
                if dropped {
                    Ok(cache.empty_ids.clone())
                } else {
                    cache.ids.get(i as usize)
                }
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let text = self.text_encoder.forward(&Tensor::stack(&ids, 0)?)?; // [b, n, d]
        let noisy = self
            .schedule
            .add_noise(&latents, &draw.noise, &draw.timesteps)?;
        let pred = self
            .unet
            .forward(&noisy, &draw.timesteps.to_dtype(DType::F32)?, &text)?;
        let target = match self.scheduler.prediction_type {
            PredictionType::Epsilon => draw.noise.clone(),
            PredictionType::VPrediction => {
                self.schedule
                    .get_velocity(&latents, &draw.noise, &draw.timesteps)?
            }
            PredictionType::Sample => latents.clone(),
        };
        let error = (pred - target)?.sqr()?; // [b, c, h, w]
        let per_sample = match &cache.focus {
            None => error.flatten_from(1)?.mean(1)?,
            // The weighted mean: objects count more, the loss keeps its scale.
            Some(focus) => {
                let focus = focus.index_select(&indices, 0)?; // [b, 1, h, w]
                let c = error.dim(1)? as f64;
                let total = error.broadcast_mul(&focus)?.flatten_from(1)?.sum(1)?;
                (total / (focus.flatten_from(1)?.sum(1)? * c)?)?
            }
        }; // [b]
        let weights = Tensor::new(self.snr_weights(&draw.timesteps)?, device)?;
        Ok((per_sample * weights)?.mean_all()?)
    }

    /// The min-SNR weight of each timestep for the prediction type, SNR = acp / (1 - acp).
    fn snr_weights(&self, timesteps: &Tensor) -> Result<Vec<f32>> {
        let acp = self.schedule.alphas_cumprod();
        Ok(timesteps
            .to_vec1::<u32>()?
            .into_iter()
            .map(|t| {
                let snr = acp[t as usize] / (1.0 - acp[t as usize]);
                let weight = match self.scheduler.prediction_type {
                    PredictionType::Epsilon => snr.min(SNR_GAMMA) / snr,
                    PredictionType::VPrediction => snr.min(SNR_GAMMA) / (snr + 1.0),
                    PredictionType::Sample => snr.min(SNR_GAMMA),
                };
                weight as f32
            })
            .collect())
    }

    /// One update from `draw` at learning rate `lr`; returns the loss before it.
    pub fn step(
        &mut self,
        cache: &LatentCache,
        draw: &StepDraw,
        lr: f64,
        max_grad_norm: f64,
    ) -> Result<f32> {
        let loss = self.loss(cache, draw)?;
        let mut grads = loss.backward()?;
        let vars: Vec<&Var> = self
            .text_vars
            .iter()
            .chain(&self.unet_vars)
            .map(|(_, v)| v)
            .collect();
        super::clip_grad_norm(&mut grads, &vars, max_grad_norm)?;
        self.optimizer.set_learning_rate(lr);
        self.optimizer.step(&grads)?;
        Ok(loss.to_scalar()?)
    }

    pub fn text_tensors(&self) -> Tensors {
        super::var_tensors(&self.text_vars)
    }

    pub fn unet_tensors(&self) -> Tensors {
        super::var_tensors(&self.unet_vars)
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::super::data::DataSource;
    use super::super::{fresh, Preset};
    use super::*;

    #[test]
    fn every_weight_of_both_networks_gets_a_gradient() {
        let device = Device::Cpu;
        let dir =
            std::env::temp_dir().join(format!("unitune-denoiser-grad-{}", std::process::id()));
        crate::world::write_tokenizer_files(&dir).unwrap();
        let tokenizer = ClipTokenizer::from_dir(&dir).unwrap();
        let arch = Preset::Tiny
            .architecture(16, tokenizer.vocab_size(), tokenizer.max_length())
            .unwrap();
        let (vae, _) = fresh(0, "vae", &device, |vb| AutoencoderKl::new(vb, &arch.vae)).unwrap();
        let (text, text_vars) = fresh(0, "text", &device, |vb| {
            ClipTextModel::new(vb, &arch.text_encoder)
        })
        .unwrap();
        let (unet, unet_vars) = fresh(0, "unet", &device, |vb| {
            UNet2DConditionModel::new(vb, &arch.unet)
        })
        .unwrap();
        let data = Dataset::open(&DataSource::World, 16, 0, 4, 2).unwrap();
        let cache = LatentCache::build(&vae, &tokenizer, &data, 4, 4.0, &device).unwrap();
        assert!(cache.focus.is_some());
        let scheduler = super::super::scheduler_config();
        let trainer =
            DenoiserTrainer::new(text, text_vars, unet, unet_vars, &scheduler, 1.0, 1e-3).unwrap();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
        let draw = trainer
            .draw(&cache, 3, 0.0, 0.1, &mut rng, &mut Noise::seeded(0))
            .unwrap();
        let grads = trainer.loss(&cache, &draw).unwrap().backward().unwrap();
        for (name, var) in trainer.text_vars.iter().chain(&trainer.unet_vars) {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("no gradient for `{name}`"));
            let max = g
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            // Rows of tokens no caption uses stay at zero; every other weight moves.
            if name != "embeddings.token_embedding.weight" {
                assert!(max > 0.0, "zero gradient for `{name}`");
            }
        }
    }

    #[test]
    fn object_latents_weigh_more_in_the_loss() {
        let mut objects = image::GrayImage::new(16, 16);
        // An object over pixels (4..8, 0..3): latent cells (1, 0) at a 4-pixel cell.
        for y in 0..3 {
            for x in 4..8 {
                objects.put_pixel(x, y, image::Luma([200]));
            }
        }
        objects.put_pixel(15, 15, image::Luma([1])); // an anti-aliased edge counts too
        let focus = focus_map(&objects, 4, 4, 4.0, &Device::Cpu).unwrap();
        let values = focus.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let mut expected = vec![1f32; 16];
        expected[1] = 5.0;
        expected[15] = 5.0;
        assert_eq!(values, expected);
    }
}
