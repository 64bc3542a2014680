//! `torch.nn.GroupNorm` for the networks, with the SiLU that follows it in every resnet
//! optionally fused in.
//!
//! On f32 CPU tensors it runs `unitune_kernels::group_norm`, a custom op with an analytic
//! backward: candle_nn's composite GroupNorm allocates about ten full-size intermediates per call
//! (all kept for the backward) and was a sizeable part of a CPU training step. On any other device
//! or dtype (CUDA, f16 weights) it falls back to candle_nn's GroupNorm and candle's `silu`, which
//! are differentiable and run everywhere, so the `cuda` build keeps working.

use candle_core::{Module, Result, Tensor};

use super::ops::{self, Activation};

/// Group normalisation over `[b, c, ...]` with per-channel `weight` and `bias` ([c]).
#[derive(Debug, Clone)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

impl GroupNorm {
    /// `weight` and `bias` are [channels]; `groups` must divide the channels.
    pub fn new(weight: Tensor, bias: Tensor, groups: usize, eps: f64) -> Result<Self> {
        let channels = weight.dim(0)?;
        if groups == 0 || !channels.is_multiple_of(groups) {
            candle_core::bail!("GroupNorm: {groups} groups do not divide {channels} channels")
        }
        Ok(Self {
            weight,
            bias,
            groups,
            eps,
        })
    }

    /// `silu(group_norm(xs))`, as diffusers' resnets apply them.
    pub fn forward_silu(&self, xs: &Tensor) -> Result<Tensor> {
        if self.fused(xs) {
            self.kernel(xs, true)
        } else {
            self.composite(xs)?.silu()
        }
    }

    /// `act(group_norm(xs))`, fused when `act` is SiLU.
    pub fn forward_act(&self, xs: &Tensor, act: Activation) -> Result<Tensor> {
        match act {
            Activation::Silu => self.forward_silu(xs),
            other => other.forward(&self.forward(xs)?),
        }
    }

    /// Whether the CPU kernel takes this input (the rank as candle_nn requires it, so that every
    /// path accepts the same shapes).
    fn fused(&self, xs: &Tensor) -> bool {
        xs.rank() >= 3 && ops::kernel_ready(&[xs, &self.weight, &self.bias])
    }

    fn kernel(&self, xs: &Tensor, silu: bool) -> Result<Tensor> {
        unitune_kernels::group_norm::group_norm(
            xs,
            &self.weight,
            &self.bias,
            self.groups,
            self.eps,
            silu,
        )
    }

    /// candle_nn's GroupNorm: composed of differentiable ops on any device.
    fn composite(&self, xs: &Tensor) -> Result<Tensor> {
        let channels = self.weight.dim(0)?;
        candle_nn::GroupNorm::new(
            self.weight.clone(),
            self.bias.clone(),
            channels,
            self.groups,
            self.eps,
        )?
        .forward(xs)
    }
}

impl Module for GroupNorm {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if self.fused(xs) {
            self.kernel(xs, false)
        } else {
            self.composite(xs)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::ops::tests::check_grad;
    use candle_core::{DType, Device, Var};

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        let d = (a - b).unwrap().abs().unwrap().flatten_all().unwrap();
        let d = d.to_dtype(DType::F32).unwrap();
        d.max(0).unwrap().to_scalar().unwrap()
    }

    /// A norm with random parameters in `dtype`, and candle_nn's version of it.
    fn norms(channels: usize, groups: usize, dtype: DType) -> (GroupNorm, candle_nn::GroupNorm) {
        let dev = Device::Cpu;
        let weight = (Tensor::randn(0f32, 0.3, channels, &dev).unwrap() + 1.0).unwrap();
        let bias = Tensor::randn(0f32, 0.3, channels, &dev).unwrap();
        // Variables, so that their gradients are kept.
        let var = |t: Tensor| {
            Var::from_tensor(&t.to_dtype(dtype).unwrap())
                .unwrap()
                .as_tensor()
                .clone()
        };
        let (weight, bias) = (var(weight), var(bias));
        let candle =
            candle_nn::GroupNorm::new(weight.clone(), bias.clone(), channels, groups, 1e-5)
                .unwrap();
        (GroupNorm::new(weight, bias, groups, 1e-5).unwrap(), candle)
    }

    #[test]
    fn matches_candle_group_norm_on_the_fused_and_fallback_paths() {
        for dtype in [DType::F32, DType::F64] {
            let (ours, candle) = norms(64, 32, dtype);
            let x = (Tensor::randn(0f32, 2.0, (2, 64, 5, 6), &Device::Cpu).unwrap() + 0.5).unwrap();
            let x = x.to_dtype(dtype).unwrap();
            let reference = candle.forward(&x).unwrap();
            let plain = max_diff(&ours.forward(&x).unwrap(), &reference);
            let silu = max_diff(&ours.forward_silu(&x).unwrap(), &reference.silu().unwrap());
            let gelu = max_diff(
                &ours.forward_act(&x, Activation::Gelu).unwrap(),
                &reference.gelu_erf().unwrap(),
            );
            assert!(
                plain < 1e-5 && silu < 1e-5 && gelu < 1e-5,
                "{dtype:?}: {plain:e} {silu:e} {gelu:e}"
            );
        }
        assert!(GroupNorm::new(
            Tensor::ones(6, DType::F32, &Device::Cpu).unwrap(),
            Tensor::zeros(6, DType::F32, &Device::Cpu).unwrap(),
            4,
            1e-5
        )
        .is_err());
    }

    #[test]
    fn fused_gradients_match_candle_autograd() {
        let dev = Device::Cpu;
        let (ours, candle) = norms(32, 8, DType::F32);
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.5, (2, 32, 4, 5), &dev).unwrap()).unwrap();
        let w = Tensor::randn(0f32, 1.0, (2, 32, 4, 5), &dev).unwrap();
        let grads = |out: Tensor| {
            let g = (out * &w).unwrap().sum_all().unwrap().backward().unwrap();
            [x.as_tensor(), &ours.weight, &ours.bias]
                .map(|t| g.get(t).expect("no gradient").clone())
        };
        let fused = grads(ours.forward_silu(x.as_tensor()).unwrap());
        let reference = grads(candle.forward(x.as_tensor()).unwrap().silu().unwrap());
        for (f, r) in fused.iter().zip(&reference) {
            let scale = r
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(
                max_diff(f, r) <= 1e-5 * scale,
                "{} vs {}",
                max_diff(f, r),
                scale
            );
        }
    }

    #[test]
    fn fallback_is_differentiable() {
        let (ours, _) = norms(8, 4, DType::F64);
        check_grad(|x| ours.forward_silu(x), &[2, 8, 2, 3]);
        check_grad(|x| ours.forward_act(x, Activation::Gelu), &[1, 8, 3]);
    }
}
