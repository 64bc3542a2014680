//! Mixed-precision tuning: the UNet runs forward and backward in half precision (f16 or bf16,
//! half the memory and, on a GPU, several times the speed), while the optimizer updates f32
//! master copies of the trainable weights and writes them back rounded after every step.
//!
//! Without master copies, UniTune's updates would mostly vanish: at lr 1e-4 an Adafactor step
//! changes a weight by about 1e-4 of its size, below half of bf16's rounding step (2^-8) and near
//! f16's (2^-11), so the rounded weight would not move. The master copy accumulates them.
//!
//! f16 gradients can underflow to zero (below 6e-8) or overflow (above 65504), so with f16 the
//! loss is multiplied by a dynamic scale before backward and the gradients divided by it after,
//! as PyTorch's `GradScaler` does with its defaults: scale 2^16 at first, halved and the step
//! skipped when a gradient is not finite, doubled after 2000 steps without overflow. bf16 has
//! f32's exponent range and needs no scaling.

use candle_core::backprop::GradStore;
use candle_core::{DType, Var};

use crate::Result;

/// PyTorch `GradScaler` defaults.
const INITIAL_SCALE: f64 = 65536.0;
const GROWTH_INTERVAL: usize = 2000;

/// The f32 master copies of a model's half-precision trainable vars.
pub struct MasterWeights {
    /// (the model's var, its f32 master copy)
    pairs: Vec<(Var, Var)>,
    /// The loss scale; 1 for bf16 (no scaling).
    scale: f64,
    dynamic: bool,
    good_steps: usize,
    skipped: usize,
}

impl MasterWeights {
    /// Master copies of `vars` if they are f16 or bf16; `None` when they are f32 or f64 (the
    /// optimizer then updates them directly). All vars must share one dtype.
    pub fn new(vars: &[Var]) -> Result<Option<Self>> {
        let dtype = match vars.first() {
            Some(v) => v.dtype(),
            None => return Ok(None),
        };
        if let Some(other) = vars.iter().find(|v| v.dtype() != dtype) {
            return Err(crate::Error::argument(
                "dtype",
                format!("trainable weights mix {dtype:?} and {:?}", other.dtype()),
            ));
        }
        if !matches!(dtype, DType::F16 | DType::BF16) {
            return Ok(None);
        }
        let pairs = vars
            .iter()
            .map(|v| Ok((v.clone(), Var::from_tensor(&v.to_dtype(DType::F32)?)?)))
            .collect::<Result<_>>()?;
        let dynamic = dtype == DType::F16;
        Ok(Some(Self {
            pairs,
            scale: if dynamic { INITIAL_SCALE } else { 1.0 },
            dynamic,
            good_steps: 0,
            skipped: 0,
        }))
    }

    /// The vars the optimizer updates.
    pub fn masters(&self) -> Vec<Var> {
        self.pairs.iter().map(|(_, m)| m.clone()).collect()
    }

    /// What to multiply the loss by before backward.
    pub fn loss_scale(&self) -> f64 {
        self.scale
    }

    /// Steps skipped so far because a gradient overflowed.
    pub fn skipped_steps(&self) -> usize {
        self.skipped
    }

    /// Moves the model vars' gradients in `grads` onto their master copies, in f32 and divided
    /// by the loss scale. Returns `false`, and adjusts the scale, when one is not finite: the
    /// optimizer must then skip this step.
    pub fn take_grads(&mut self, grads: &mut GradStore) -> Result<bool> {
        let mut finite = true;
        for (var, master) in &self.pairs {
            if let Some(g) = grads.remove(var.as_tensor()) {
                let g = (g.to_dtype(DType::F32)? / self.scale)?;
                // A sum is NaN or infinite whenever one of its terms is.
                finite &= g.sum_all()?.to_scalar::<f32>()?.is_finite();
                grads.insert(master.as_tensor(), g);
            }
        }
        if self.dynamic {
            if finite {
                self.good_steps += 1;
                if self.good_steps == GROWTH_INTERVAL {
                    self.scale *= 2.0;
                    self.good_steps = 0;
                }
            } else {
                self.scale /= 2.0;
                self.good_steps = 0;
            }
        }
        self.skipped += !finite as usize;
        Ok(finite)
    }

    /// Writes the master copies, rounded to the model's dtype, into the model's vars.
    pub fn sync(&self) -> Result<()> {
        for (var, master) in &self.pairs {
            var.set(&master.to_dtype(var.dtype())?)?;
        }
        Ok(())
    }

    /// The master copy of each model var, by the model var's tensor id.
    pub fn master_of(&self, var: &Var) -> Option<&Var> {
        self.pairs
            .iter()
            .find(|(v, _)| v.as_tensor().id() == var.as_tensor().id())
            .map(|(_, m)| m)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;
    use crate::train::OptimizerKind;

    fn var(values: &[f32], dtype: DType) -> Var {
        Var::from_tensor(
            &Tensor::new(values, &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap(),
        )
        .unwrap()
    }

    #[test]
    fn f32_weights_need_no_master_copy() {
        assert!(MasterWeights::new(&[var(&[1.0], DType::F32)])
            .unwrap()
            .is_none());
        let mixed = [var(&[1.0], DType::F16), var(&[1.0], DType::BF16)];
        let err = MasterWeights::new(&mixed).err().unwrap().to_string();
        assert!(err.contains("dtype") && err.contains("mix"), "{err}");
    }

    /// 100 AdamW steps of lr 1e-4 on bf16 weights near 1: rounded in place, every update is
    /// lost (bf16's step at 1 is 2^-7); with a master copy the weight moves by the f32 amount.
    #[test]
    fn small_updates_accumulate_in_the_master_copy() {
        let start = [1.0f32, -1.0, 0.5];
        let run = |with_master: bool| -> Vec<f32> {
            let w = var(&start, DType::BF16);
            let mut master = with_master.then(|| {
                MasterWeights::new(std::slice::from_ref(&w))
                    .unwrap()
                    .unwrap()
            });
            let vars = master.as_ref().map_or(vec![w.clone()], |m| m.masters());
            let mut opt = OptimizerKind::AdamW.build(vars, 1e-4).unwrap();
            for _ in 0..100 {
                // d/dw of sum(w): a gradient of one for every element.
                let loss = w
                    .as_tensor()
                    .to_dtype(DType::F32)
                    .unwrap()
                    .sum_all()
                    .unwrap();
                let mut grads = loss.backward().unwrap();
                if let Some(m) = master.as_mut() {
                    assert!(m.take_grads(&mut grads).unwrap());
                }
                opt.step(&grads).unwrap();
                if let Some(m) = &master {
                    m.sync().unwrap();
                }
            }
            let out = match &master {
                Some(m) => m.masters()[0].as_tensor().clone(),
                None => w.as_tensor().to_dtype(DType::F32).unwrap(),
            };
            out.to_vec1().unwrap()
        };
        assert_eq!(
            run(false),
            start.to_vec(),
            "bf16 in place should lose every update"
        );
        // AdamW's normalised step is lr per step (plus weight decay 1e-2 * lr * w).
        for (got, w0) in run(true).into_iter().zip(start) {
            let expected = w0 - 100.0 * 1e-4 - 100.0 * 1e-4 * 1e-2 * w0;
            assert!((got - expected).abs() < 1e-5, "{got} vs {expected}");
        }
    }

    #[test]
    fn f16_overflow_skips_the_step_and_halves_the_scale() {
        let w = var(&[1.0, 2.0], DType::F16);
        let mut master = MasterWeights::new(std::slice::from_ref(&w))
            .unwrap()
            .unwrap();
        assert_eq!(master.loss_scale(), 65536.0);
        // d/dw of scale * 1.5 * sum(w), cast back to f16: 1.5 * 2^16 overflows f16 (max 65504).
        let scaled_loss = |scale: f64| {
            let sum = w
                .as_tensor()
                .to_dtype(DType::F32)
                .unwrap()
                .sum_all()
                .unwrap();
            (sum * (1.5 * scale)).unwrap()
        };
        let mut grads = scaled_loss(master.loss_scale()).backward().unwrap();
        assert!(!master.take_grads(&mut grads).unwrap());
        assert_eq!((master.loss_scale(), master.skipped_steps()), (32768.0, 1));
        // At the new scale the same gradient fits, and comes back unscaled.
        let loss = scaled_loss(master.loss_scale());
        let mut grads = loss.backward().unwrap();
        assert!(master.take_grads(&mut grads).unwrap());
        let g: Vec<f32> = grads
            .get(master.masters()[0].as_tensor())
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(g, vec![1.5, 1.5]);
        assert!(grads.get(w.as_tensor()).is_none());
    }
}
