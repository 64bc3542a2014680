//! Fresh trainable weights for a network built from scratch, drawn from the training seed.
//!
//! candle's `VarMap` draws its initial values from an unseeded thread RNG, so two runs with the
//! same `--seed` would start from different weights. [`SeededInit`] is a `VarBuilder` backend
//! that creates each tensor as a `Var` from the network's own init hint (kaiming normal for
//! linear and conv weights, ones and zeros for norms, ...) with a ChaCha8 stream keyed by the
//! seed, the network's name and the tensor's name, so a weight's start does not depend on
//! construction order and two networks' `conv_in.weight` differ.

use std::sync::Mutex;

use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::init::{Init, NormalOrUniform};
use candle_nn::VarBuilder;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

/// Creates the tensors a network asks for as `Var`s; see the module doc.
pub struct SeededInit {
    seed: u64,
    network: String,
    vars: Mutex<Vec<(String, Var)>>,
}

impl SeededInit {
    pub fn new(seed: u64, network: &str) -> Self {
        Self {
            seed,
            network: network.to_string(),
            vars: Mutex::default(),
        }
    }

    /// A builder creating f32 vars on `device` through this backend.
    pub fn var_builder(self: &std::sync::Arc<Self>, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(Shared(self.clone())), DType::F32, device.clone())
    }

    /// The vars created so far, by name, in creation order.
    pub fn vars(&self) -> Vec<(String, Var)> {
        self.vars.lock().expect("init lock").clone()
    }

    /// `n` f32 values for `name` following `init`.
    fn values(&self, name: &str, shape: &Shape, init: Init) -> Vec<f32> {
        let n = shape.elem_count();
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        rng.set_stream(fnv1a(&format!("{}/{name}", self.network)));
        let normal = |rng: &mut ChaCha8Rng, mean: f64, std: f64| {
            let z: f64 = StandardNormal.sample(rng);
            (mean + std * z) as f32
        };
        match init {
            Init::Const(c) => vec![c as f32; n],
            Init::Uniform { lo, up } => (0..n).map(|_| rng.gen_range(lo..up) as f32).collect(),
            Init::Randn { mean, stdev } => (0..n).map(|_| normal(&mut rng, mean, stdev)).collect(),
            Init::Kaiming {
                dist,
                fan,
                non_linearity,
            } => {
                let std = non_linearity.gain() / (fan.for_shape(shape) as f64).sqrt();
                match dist {
                    NormalOrUniform::Normal => (0..n).map(|_| normal(&mut rng, 0.0, std)).collect(),
                    NormalOrUniform::Uniform => {
                        let bound = 3f64.sqrt() * std;
                        (0..n)
                            .map(|_| rng.gen_range(-bound..bound) as f32)
                            .collect()
                    }
                }
            }
        }
    }
}

/// 64-bit FNV-1a: a stable hash of a tensor name (std's hasher may change between releases).
fn fnv1a(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The backend itself, shared with the caller who reads the vars afterwards.
struct Shared(std::sync::Arc<SeededInit>);

impl candle_nn::var_builder::SimpleBackend for Shared {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        init: Init,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let mut vars = self.0.vars.lock().expect("init lock");
        if let Some((_, var)) = vars.iter().find(|(n, _)| n == name) {
            if var.shape() != &shape {
                candle_core::bail!(
                    "tensor `{name}` requested with shapes {:?} and {:?}",
                    var.dims(),
                    shape.dims()
                );
            }
            return var.as_tensor().to_dtype(dtype);
        }
        let values = self.0.values(name, &shape, init);
        let var = Var::from_tensor(&Tensor::from_vec(values, shape, device)?)?;
        vars.push((name.to_string(), var.clone()));
        var.as_tensor().to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("tensor `{name}` has no shape to initialise it with")
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0
            .vars
            .lock()
            .expect("init lock")
            .iter()
            .any(|(n, _)| n == name)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn same_seed_same_weights_whatever_the_order() {
        let draw = |seed: u64, names: &[&str]| {
            let init = Arc::new(SeededInit::new(seed, "net"));
            let vb = init.var_builder(&Device::Cpu);
            for name in names {
                candle_nn::linear(64, 32, vb.pp(*name)).unwrap();
            }
            let mut vars = init.vars();
            vars.sort_by(|a, b| a.0.cmp(&b.0));
            vars.into_iter()
                .map(|(n, v)| {
                    (
                        n,
                        v.as_tensor()
                            .flatten_all()
                            .unwrap()
                            .to_vec1::<f32>()
                            .unwrap(),
                    )
                })
                .collect::<Vec<_>>()
        };
        let a = draw(1, &["x", "y"]);
        assert_eq!(a, draw(1, &["y", "x"]));
        assert_ne!(a, draw(2, &["x", "y"]));
        assert_ne!(a[1].1, a[3].1, "x and y weights must differ");
        // candle's kaiming normal for a linear layer: std sqrt(2 / fan_in).
        let w = &a[1].1;
        let std = (w.iter().map(|v| v * v).sum::<f32>() / w.len() as f32).sqrt();
        assert!((std - (2f32 / 64.0).sqrt()).abs() < 0.01, "{std}");
    }
}
