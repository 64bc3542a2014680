//! Activation functions, named as in diffusers' `act_fn` and transformers' `hidden_act`; each is
//! composed of ops with a backward.

use candle_core::{Module, Result, Tensor};

/// Activation functions named as in diffusers' `act_fn` and transformers' `hidden_act`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Silu,
    /// Exact GELU (erf), torch's default.
    Gelu,
    /// CLIP's x * sigmoid(1.702 x).
    QuickGelu,
}

impl Activation {
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "silu" | "swish" => Some(Self::Silu),
            "gelu" => Some(Self::Gelu),
            "quick_gelu" => Some(Self::QuickGelu),
            _ => None,
        }
    }
}

impl Module for Activation {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Self::Silu => xs.silu(),
            Self::Gelu => xs.gelu_erf(),
            Self::QuickGelu => xs * candle_nn::ops::sigmoid(&(xs * 1.702)?)?,
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;
    use crate::models::ops::tests::check_grad;

    #[test]
    fn activations_have_gradients() {
        for act in [Activation::Silu, Activation::Gelu, Activation::QuickGelu] {
            check_grad(|x| act.forward(x), &[10]);
        }
        let x = Tensor::new(&[1.0f64], &Device::Cpu).unwrap();
        let q: Vec<f64> = Activation::QuickGelu
            .forward(&x)
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!((q[0] - 1.0 / (1.0 + (-1.702f64).exp())).abs() < 1e-12);
    }
}
