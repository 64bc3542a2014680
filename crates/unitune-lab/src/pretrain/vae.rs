//! Phase one: the autoencoder, trained to reconstruct the training pictures through a latent
//! `f` times smaller per side.
//!
//! Loss per picture, as Stable Diffusion's autoencoder without its perceptual and adversarial
//! terms: the L1 distance between the picture and the decoding of a latent *sampled* from the
//! encoder's Gaussian (the reparameterisation trick, so the encoder learns its variance too),
//! plus `KL_WEIGHT` times the KL divergence from a standard normal, summed over latent elements.
//! Both are divided by the number of pixel values so the logged loss reads as a per-value L1.
//! L1 rather than MSE: on flat-coloured pictures MSE settles for blurred edges (a trial of
//! L1 + MSE learnt no faster).
//!
//! It trains on crops (`vae_crop`, 32x32 of the 64x64 pictures: a quarter of the compute), which
//! a convolutional network without attention carries over to whole pictures; world crops are
//! mostly centred on objects ([`super::data::Dataset::crops`]), since shapes and edges, not the
//! flat background, are what a small autoencoder is slow to learn.
//!
//! When the phase ends, `scaling_factor` is set to 1 / std of sampled latents over the training
//! set, as Stable Diffusion's 0.18215 was measured, so the UNet sees latents of unit variance.

use candle_core::{DType, Device, Tensor, Var};

use super::data::Dataset;
use unitune::models::vae::{AutoencoderKl, DiagonalGaussian};
use unitune::noise::Noise;
use unitune::train::{OptimizerKind, TrainOptimizer};
use unitune::weights::export::Tensors;
use unitune::Result;

/// Weight of the KL term, as in Stable Diffusion's KL-f8 autoencoder.
pub const KL_WEIGHT: f64 = 1e-6;

/// The losses of one step.
#[derive(Debug, Clone, Copy)]
pub struct VaeLosses {
    /// `l1 + KL_WEIGHT * kl / values per picture`: what is minimised.
    pub loss: f32,
    pub l1: f32,
    /// KL divergence per picture (summed over its latent elements).
    pub kl: f32,
}

pub(super) struct VaeTrainer {
    pub vae: AutoencoderKl,
    pub vars: Vec<(String, Var)>,
    optimizer: TrainOptimizer,
}

impl VaeTrainer {
    pub fn new(vae: AutoencoderKl, vars: Vec<(String, Var)>, lr: f64) -> Result<Self> {
        let optimizer =
            OptimizerKind::AdamW.build(vars.iter().map(|(_, v)| v.clone()).collect(), lr)?;
        Ok(Self {
            vae,
            vars,
            optimizer,
        })
    }

    /// One update on `images` `[b, 3, h, w]` in `[-1, 1]` at learning rate `lr`.
    pub fn step(
        &mut self,
        images: &Tensor,
        noise: &mut Noise,
        lr: f64,
        max_grad_norm: f64,
    ) -> Result<VaeLosses> {
        let (loss, l1, kl) = losses(&self.vae, images, noise)?;
        let mut grads = loss.backward()?;
        let vars: Vec<&Var> = self.vars.iter().map(|(_, v)| v).collect();
        super::clip_grad_norm(&mut grads, &vars, max_grad_norm)?;
        self.optimizer.set_learning_rate(lr);
        self.optimizer.step(&grads)?;
        Ok(VaeLosses {
            loss: loss.to_scalar()?,
            l1: l1.to_scalar()?,
            kl: kl.to_scalar()?,
        })
    }

    pub fn tensors(&self) -> Tensors {
        super::var_tensors(&self.vars)
    }
}

/// (loss, L1, KL per picture) for `images`, as scalars that backpropagate into the autoencoder.
fn losses(
    vae: &AutoencoderKl,
    images: &Tensor,
    noise: &mut Noise,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (b, c, h, w) = images.dims4()?;
    let posterior = vae.encode(images)?;
    let z = posterior.sample(noise)?; // [b, latent_channels, h/f, w/f]
    let reconstruction = vae.decode(&z)?; // [b, 3, h, w]
    let l1 = (reconstruction - images)?.abs()?.mean_all()?;
    let kl = (kl_divergence(&posterior)?.sum_all()? / b as f64)?;
    let loss = (&l1 + (&kl * (KL_WEIGHT / (c * h * w) as f64))?)?;
    Ok((loss, l1, kl))
}

/// The decoder's refinement loss for `images`: MSE + L1 per value between each picture and the
/// decoding of its latent mean (the encoder is not trained: its output is detached).
pub(super) fn decoder_loss(vae: &AutoencoderKl, images: &Tensor) -> Result<Tensor> {
    let latents = vae.encode(images)?.mode().detach();
    let error = (vae.decode(&latents)? - images)?;
    Ok((error.sqr()?.mean_all()? + error.abs()?.mean_all()?)?)
}

/// Whether a tensor of the autoencoder belongs to the decoding path.
pub(super) fn is_decoder(name: &str) -> bool {
    name.starts_with("decoder.") || name.starts_with("post_quant_conv.")
}

/// KL(N(mean, var) || N(0, 1)) per latent element: `(mean² + var - 1 - logvar) / 2`.
fn kl_divergence(posterior: &DiagonalGaussian) -> Result<Tensor> {
    let var = posterior.logvar.exp()?;
    Ok(((posterior.mean.sqr()? + var)? - 1.0 - &posterior.logvar)?.affine(0.5, 0.0)?)
}

/// Mean and standard deviation of latents sampled for the first `count` training pictures (all
/// of them if fewer), encoded `batch` at a time.
pub(super) fn measure_latents(
    vae: &AutoencoderKl,
    data: &Dataset,
    count: usize,
    batch: usize,
    noise: &mut Noise,
    device: &Device,
) -> Result<(f64, f64)> {
    let count = count.min(data.len());
    let (mut sum, mut sum_sq, mut n) = (0f64, 0f64, 0usize);
    for start in (0..count).step_by(batch.max(1)) {
        let indices: Vec<usize> = (start..(start + batch).min(count)).collect();
        let z = vae
            .encode(&data.images(&indices, device)?)?
            .sample(noise)?
            .to_dtype(DType::F64)?;
        sum += z.sum_all()?.to_scalar::<f64>()?;
        sum_sq += z.sqr()?.sum_all()?.to_scalar::<f64>()?;
        n += z.elem_count();
    }
    let mean = sum / n as f64;
    Ok((mean, (sum_sq / n as f64 - mean * mean).max(0.0).sqrt()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kl_is_zero_for_the_standard_normal_and_matches_the_formula() {
        let t = |v: &[f32]| Tensor::new(v, &Device::Cpu).unwrap();
        let standard = DiagonalGaussian {
            mean: t(&[0.0, 0.0]),
            logvar: t(&[0.0, 0.0]),
        };
        let kl = kl_divergence(&standard).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(kl, vec![0.0, 0.0]);
        // mean 1, var e: (1 + e - 1 - 1) / 2.
        let other = DiagonalGaussian {
            mean: t(&[1.0]),
            logvar: t(&[1.0]),
        };
        let kl = kl_divergence(&other).unwrap().to_vec1::<f32>().unwrap()[0];
        assert!(
            (kl - (std::f32::consts::E - 1.0) / 2.0).abs() < 1e-6,
            "{kl}"
        );
    }
}
