//! Gaussian noise for sampling and training, drawn from a seeded generator so that the same seed
//! gives the same image on every machine. Tests can instead replay tensors dumped from PyTorch,
//! since torch's generator cannot be reproduced bit for bit.

use std::collections::VecDeque;

use candle_core::{Device, Shape, Tensor};
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};

use crate::Result;

/// A seed for when the user gives none, from the clock and the process id; front ends print it
/// (and the session records it) so the result can be made again.
pub fn random_seed() -> u64 {
    use std::time::{SystemTime, UNIX_EPOCH};
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    (nanos as u64) ^ (std::process::id() as u64).rotate_left(32)
}

pub enum Noise {
    /// Standard normal draws from ChaCha8 seeded with the user's seed (boxed: the generator's
    /// state is larger than a queue).
    Seeded(Box<rand_chacha::ChaCha8Rng>),
    /// Tensors handed out in order; running out is an error.
    Replay(VecDeque<Tensor>),
}

impl Noise {
    pub fn seeded(seed: u64) -> Self {
        Self::from_rng(rand_chacha::ChaCha8Rng::seed_from_u64(seed))
    }

    /// Draws from `rng`, e.g. one of several streams of a seed.
    pub fn from_rng(rng: rand_chacha::ChaCha8Rng) -> Self {
        Noise::Seeded(Box::new(rng))
    }

    pub fn replay(tensors: impl IntoIterator<Item = Tensor>) -> Self {
        Noise::Replay(tensors.into_iter().collect())
    }

    /// An f32 tensor of standard normal samples with the given shape.
    pub fn randn(&mut self, shape: impl Into<Shape>, device: &Device) -> Result<Tensor> {
        let shape = shape.into();
        match self {
            Noise::Seeded(rng) => {
                let data: Vec<f32> = (0..shape.elem_count())
                    .map(|_| StandardNormal.sample(rng))
                    .collect();
                Ok(Tensor::from_vec(data, shape, device)?)
            }
            Noise::Replay(queue) => {
                let t = queue.pop_front().ok_or_else(|| {
                    candle_core::Error::Msg("noise replay: no tensors left".into())
                })?;
                if t.shape() != &shape {
                    return Err(candle_core::Error::Msg(format!(
                        "noise replay: expected shape {shape:?}, next tensor has {:?}",
                        t.shape()
                    ))
                    .into());
                }
                Ok(t.to_device(device)?)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_noise_and_unit_variance() {
        let a = Noise::seeded(7).randn((4, 1000), &Device::Cpu).unwrap();
        let b = Noise::seeded(7).randn((4, 1000), &Device::Cpu).unwrap();
        let c = Noise::seeded(8).randn((4, 1000), &Device::Cpu).unwrap();
        let diff = |x: &Tensor, y: &Tensor| {
            (x - y)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        assert_eq!(diff(&a, &b), 0.0);
        assert!(diff(&a, &c) > 0.1);
        let var = a
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!((var - 1.0).abs() < 0.05, "variance {var}");
    }

    #[test]
    fn replay_checks_shape_and_count() {
        let t = Tensor::zeros((2, 3), candle_core::DType::F32, &Device::Cpu).unwrap();
        let mut n = Noise::replay([t]);
        assert!(n.randn((3, 2), &Device::Cpu).is_err());
        assert!(
            n.randn((2, 3), &Device::Cpu).is_err(),
            "queue is empty after one pop"
        );
    }
}
