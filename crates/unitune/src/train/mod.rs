//! Training: the optimizers UniTune tunes the UNet with. [`adafactor`] is the paper's choice (fixed
//! lr 1e-4); AdamW comes from candle-nn. [`OptimizerKind`] picks one by name and builds a
//! [`TrainOptimizer`], an enum because `candle_nn::Optimizer` is not object safe (it requires
//! `Sized` and has an associated `Config` type and constructors).

pub mod adafactor;
pub mod distill;
pub mod lora;
pub mod master;
pub mod tune;

use std::fmt;
use std::str::FromStr;

use candle_core::{backprop::GradStore, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};

use crate::{Error, Result};
use adafactor::{Adafactor, AdafactorConfig};

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    /// [`Adafactor`] with [`AdafactorConfig::default`] apart from the lr.
    Adafactor,
    /// `candle_nn::AdamW` with the defaults of diffusers' train scripts: betas (0.9, 0.999),
    /// weight decay 1e-2, eps 1e-8.
    AdamW,
}

impl FromStr for OptimizerKind {
    type Err = Error;

    /// `"adafactor"` or `"adamw"`, in any case.
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "adafactor" => Ok(OptimizerKind::Adafactor),
            "adamw" => Ok(OptimizerKind::AdamW),
            _ => Err(Error::argument(
                "optimizer",
                format!("`{s}` is not one of: adafactor, adamw"),
            )),
        }
    }
}

impl fmt::Display for OptimizerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OptimizerKind::Adafactor => "adafactor",
            OptimizerKind::AdamW => "adamw",
        })
    }
}

impl OptimizerKind {
    /// An optimizer of this kind over `vars` with learning rate `lr`.
    pub fn build(self, vars: Vec<Var>, lr: f64) -> Result<TrainOptimizer> {
        Ok(match self {
            OptimizerKind::Adafactor => TrainOptimizer::Adafactor(Adafactor::new(
                vars,
                AdafactorConfig {
                    lr,
                    ..Default::default()
                },
            )?),
            OptimizerKind::AdamW => {
                let params = ParamsAdamW {
                    lr,
                    beta1: 0.9,
                    beta2: 0.999,
                    eps: 1e-8,
                    weight_decay: 1e-2,
                };
                TrainOptimizer::AdamW(AdamW::new(vars, params)?)
            }
        })
    }
}

/// One of the supported optimizers, chosen at run time.
#[derive(Debug)]
pub enum TrainOptimizer {
    Adafactor(Adafactor),
    AdamW(AdamW),
}

impl TrainOptimizer {
    /// Applies one update from `grads`; vars without a gradient are left as they are.
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        match self {
            TrainOptimizer::Adafactor(opt) => opt.step(grads)?,
            TrainOptimizer::AdamW(opt) => opt.step(grads)?,
        }
        Ok(())
    }

    /// Back-propagates `loss` and applies one update.
    pub fn backward_step(&mut self, loss: &Tensor) -> Result<()> {
        self.step(&loss.backward()?)
    }

    pub fn learning_rate(&self) -> f64 {
        match self {
            TrainOptimizer::Adafactor(opt) => opt.learning_rate(),
            TrainOptimizer::AdamW(opt) => opt.learning_rate(),
        }
    }

    pub fn set_learning_rate(&mut self, lr: f64) {
        match self {
            TrainOptimizer::Adafactor(opt) => opt.set_learning_rate(lr),
            TrainOptimizer::AdamW(opt) => opt.set_learning_rate(lr),
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};

    use super::*;

    #[test]
    fn parses_names_and_rejects_others() {
        assert_eq!(
            "adafactor".parse::<OptimizerKind>().unwrap(),
            OptimizerKind::Adafactor
        );
        assert_eq!(
            "AdamW".parse::<OptimizerKind>().unwrap(),
            OptimizerKind::AdamW
        );
        assert_eq!(
            OptimizerKind::AdamW
                .to_string()
                .parse::<OptimizerKind>()
                .unwrap(),
            OptimizerKind::AdamW
        );
        let err = "sgd".parse::<OptimizerKind>().unwrap_err();
        assert!(
            err.to_string().contains("sgd") && err.to_string().contains("optimizer"),
            "{err}"
        );
    }

    #[test]
    fn both_kinds_descend_a_quadratic() {
        // loss = sum((w - 1)²) from w = 0: the first update moves every weight up by about lr
        // (Adam and Adafactor both normalise the gradient), and the loss keeps falling.
        for kind in [OptimizerKind::Adafactor, OptimizerKind::AdamW] {
            let w = Var::zeros((4, 3), DType::F32, &Device::Cpu).unwrap();
            let mut opt = kind.build(vec![w.clone()], 0.05).unwrap();
            assert_eq!(opt.learning_rate(), 0.05);
            let loss = |w: &Var| {
                (w.as_tensor() - 1.0)
                    .unwrap()
                    .sqr()
                    .unwrap()
                    .sum_all()
                    .unwrap()
            };
            opt.backward_step(&loss(&w)).unwrap();
            let first = w
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            assert!(
                first.iter().all(|x| (x - 0.05).abs() < 1e-3),
                "{kind}: {first:?}"
            );
            let mut last = loss(&w).to_scalar::<f32>().unwrap();
            for _ in 0..5 {
                opt.backward_step(&loss(&w)).unwrap();
                let now = loss(&w).to_scalar::<f32>().unwrap();
                assert!(now < last, "{kind}: loss {now} after {last}");
                last = now;
            }
            opt.set_learning_rate(1e-4);
            assert_eq!(opt.learning_rate(), 1e-4);
        }
    }
}
