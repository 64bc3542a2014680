//! A LoRA tune (`--layers lora`): every matrix and convolution weight that a `most` tune changes
//! becomes `base + up·down` (a convolution `[out, in, kh, kw]` taken as `[out, in·kh·kw]`), with
//! `up [out, r]` and `down [r, in·kh·kw]` the only trained tensors. Its delta has rank `r` by
//! construction, so the session stores the two factors: a few percent of the UNet's size
//! (BENCHMARKS.md, "Session size"), and `export --format lora` gives exactly the tuned model.
//!
//! The UNet is not rebuilt around the factors: the model's weight stays one var, set to
//! `base + up·down` after each update, and the factors' gradients come from the weight's by
//! the chain rule, `dL/d up = dL/dW · downᵀ` and `dL/d down = upᵀ · dL/dW` (`tests/tune.rs`
//! checks them against candle's autograd through the product). As in PEFT and kohya's scripts,
//! `up` starts at zero (the tune starts from the base model) and `down` from a Kaiming-uniform
//! draw, scale 1 (alpha = rank).

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};

use crate::{Error, Result};

/// The rank of `--layers lora` when none is given.
pub const DEFAULT_LORA_RANK: usize = 8;

/// One factored weight.
struct Layer {
    name: String,
    /// The model's var that the forward pass reads.
    weight: Var,
    /// `[out, n]`, f32.
    base: Tensor,
    up: Var,
    down: Var,
}

/// The factors of every weight a LoRA tune trains.
pub struct LoraFactors {
    layers: Vec<Layer>,
}

impl LoraFactors {
    /// Factors for each var of rank 2 or more (vectors stay at their base value); `base`
    /// gives each var's base weight by name.
    pub fn new(
        vars: &[(String, Var)],
        base: &std::collections::HashMap<String, Tensor>,
        rank: usize,
        seed: u64,
    ) -> Result<Self> {
        if rank == 0 {
            return Err(Error::argument("lora-rank", "must be at least 1"));
        }
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 0x104a_5eed);
        let mut layers = vec![];
        for (name, weight) in vars {
            if weight.rank() < 2 {
                continue;
            }
            let out = weight.dim(0)?;
            let n = weight.elem_count() / out;
            let device = weight.device();
            let base = base[name].to_dtype(DType::F32)?.reshape((out, n))?;
            let bound = 1.0 / (n as f32).sqrt();
            let down: Vec<f32> = (0..rank * n)
                .map(|_| rng.gen_range(-bound..bound))
                .collect();
            let down = Var::from_tensor(&Tensor::from_vec(down, (rank, n), device)?)?;
            let up = Var::from_tensor(&Tensor::zeros((out, rank), DType::F32, device)?)?;
            layers.push(Layer {
                name: name.clone(),
                weight: weight.clone(),
                base,
                up,
                down,
            });
        }
        if layers.is_empty() {
            return Err(Error::argument(
                "layers",
                "lora: no trainable matrix or convolution weight",
            ));
        }
        Ok(Self { layers })
    }

    /// The tensors the optimizer updates: every layer's `up` and `down`.
    pub fn vars(&self) -> Vec<Var> {
        (self.layers.iter())
            .flat_map(|l| [l.up.clone(), l.down.clone()])
            .collect()
    }

    /// Adds the factors' gradients to `grads`, from the weights' gradients there (each under
    /// the tensor that `updated` gives for a weight var: itself or its f32 master copy).
    pub fn add_grads(&self, grads: &mut GradStore, updated: impl Fn(&Var) -> Var) -> Result<()> {
        for l in &self.layers {
            let Some(g) = grads.get(updated(&l.weight).as_tensor()) else {
                continue;
            };
            let g = g.to_dtype(DType::F32)?.reshape(l.base.shape())?;
            let (g_up, g_down) = (g.matmul(&l.down.t()?)?, l.up.t()?.matmul(&g)?);
            grads.insert(l.up.as_tensor(), g_up);
            grads.insert(l.down.as_tensor(), g_down);
        }
        Ok(())
    }

    /// `(weight var, base + up·down)` for each layer, the weight in f32 and its own shape.
    pub fn weights(&self) -> Result<Vec<(Var, Tensor)>> {
        (self.layers.iter())
            .map(|l| {
                let w = (&l.base + l.up.matmul(&l.down)?)?.reshape(l.weight.shape())?;
                Ok((l.weight.clone(), w))
            })
            .collect()
    }

    /// `(name, up·down)` in the weight's shape, on the CPU: the tune's deltas.
    pub fn deltas(&self) -> Result<Vec<(String, Tensor)>> {
        (self.layers.iter())
            .map(|l| {
                let d = l.up.matmul(&l.down)?.reshape(l.weight.shape())?;
                Ok((l.name.clone(), d.to_device(&Device::Cpu)?))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    /// The factors' gradients from the weight's equal candle's autograd through
    /// `base + up·down`, for a matrix and a convolution, with `up` away from its zero start.
    #[test]
    fn factor_gradients_follow_the_chain_rule() {
        let dev = Device::Cpu;
        let shapes: [&[usize]; 2] = [&[6, 5], &[4, 3, 2, 2]];
        for (i, shape) in shapes.into_iter().enumerate() {
            let name = format!("w{i}.weight");
            let base = Tensor::randn(0f32, 1.0, shape, &dev).unwrap();
            let weight = Var::from_tensor(&base).unwrap();
            let vars = vec![(name.clone(), weight.clone())];
            let factors =
                LoraFactors::new(&vars, &HashMap::from([(name, base.clone())]), 3, 1).unwrap();
            let layer = &factors.layers[0];
            layer
                .up
                .set(&Tensor::randn(0f32, 1.0, layer.up.shape(), &dev).unwrap())
                .unwrap();
            let probe = Tensor::randn(0f32, 1.0, shape, &dev).unwrap();
            // A loss that is not linear in the weight.
            let loss = |w: &Tensor| (w.sin().unwrap() * &probe).unwrap().sum_all().unwrap();

            let product = layer
                .up
                .matmul(&layer.down)
                .unwrap()
                .reshape(shape)
                .unwrap();
            let autograd = loss(&(&base + product).unwrap()).backward().unwrap();

            let (_, w) = factors.weights().unwrap().remove(0);
            weight.set(&w).unwrap();
            let mut grads = loss(weight.as_tensor()).backward().unwrap();
            factors.add_grads(&mut grads, |v| v.clone()).unwrap();
            for factor in [&layer.up, &layer.down] {
                let expected = autograd.get(factor.as_tensor()).unwrap();
                let got = grads.get(factor.as_tensor()).unwrap();
                let err = (expected - got)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert!(err < 1e-4, "{shape:?}: gradient off by {err}");
            }
        }
    }

    #[test]
    fn vectors_get_no_factors_and_rank_zero_is_refused() {
        let dev = Device::Cpu;
        let bias = Tensor::zeros(4, DType::F32, &dev).unwrap();
        let vars = vec![("b.bias".to_string(), Var::from_tensor(&bias).unwrap())];
        let base = HashMap::from([("b.bias".to_string(), bias)]);
        let err = LoraFactors::new(&vars, &base, 4, 0)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("no trainable matrix"), "{err}");
        let err = LoraFactors::new(&vars, &base, 0, 0)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("lora-rank"), "{err}");
    }
}
