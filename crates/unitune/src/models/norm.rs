//! Normalisation layers of the networks: `torch.nn.GroupNorm` (with the SiLU that follows it in
//! every resnet optionally fused in) and `torch.nn.LayerNorm`.
//!
//! On f32 CPU tensors GroupNorm runs `unitune_kernels::group_norm`, a custom op with an analytic
//! backward: candle_nn's composite GroupNorm allocates about ten full-size intermediates per call
//! (all kept for the backward) and was a sizeable part of a CPU training step. On any other device
//! or dtype (CUDA, f16 weights) it falls back to candle_nn's GroupNorm and candle's `silu`, which
//! are differentiable and run everywhere, so the `cuda` build keeps working.

use candle_core::{Module, Result, Tensor, D};
use candle_nn::VarBuilder;

use super::activations::Activation;
use super::ops::{compute_dtype, kernel_ready};

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
        xs.rank() >= 3 && kernel_ready(&[xs, &self.weight, &self.bias])
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

/// Layer normalisation over the last dimension, as `torch.nn.LayerNorm`.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    /// Loads `weight` and `bias`; when built from scratch (a `VarMap`), they start at 1 and 0.
    pub fn new(size: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get_with_hints(size, "weight", candle_nn::Init::Const(1.0))?;
        let bias = vb.get_with_hints(size, "bias", candle_nn::Init::Const(0.0))?;
        Ok(Self { weight, bias, eps })
    }
}

impl Module for LayerNorm {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        // f32 on the CPU: the fused kernel, which keeps only each row's statistics for its
        // analytic backward and sums the weight and bias gradients in parallel (candle's
        // composite below sums them on one thread). Everything else (CUDA, f16/bf16, f64, empty
        // tensors) takes the composite ops, which run on every device.
        if xs.elem_count() > 0 && kernel_ready(&[xs, &self.weight, &self.bias]) {
            return unitune_kernels::layer_norm::layer_norm(xs, &self.weight, &self.bias, self.eps);
        }
        let dtype = xs.dtype();
        let xs = xs.to_dtype(compute_dtype(dtype))?;
        let mean = xs.mean_keepdim(D::Minus1)?;
        let centered = xs.broadcast_sub(&mean)?;
        let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centered
            .broadcast_div(&(var + self.eps)?.sqrt()?)?
            .to_dtype(dtype)?;
        normed
            .broadcast_mul(&self.weight)?
            .broadcast_add(&self.bias)
    }
}

/// `torch.nn.GroupNorm`, loading `weight` and `bias` ([channels]); when built from scratch (a
/// `VarMap`), they start at 1 and 0.
pub fn group_norm(groups: usize, channels: usize, eps: f64, vb: VarBuilder) -> Result<GroupNorm> {
    let weight = vb.get_with_hints(channels, "weight", candle_nn::Init::Const(1.0))?;
    let bias = vb.get_with_hints(channels, "bias", candle_nn::Init::Const(0.0))?;
    GroupNorm::new(weight, bias, groups, eps)
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

    #[test]
    fn layer_norm_from_scratch_is_the_identity_norm() {
        let varmap = candle_nn::VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let ln = LayerNorm::new(4, 1e-5, vb).unwrap();
        let w: Vec<f32> = ln.weight.to_vec1().unwrap();
        let b: Vec<f32> = ln.bias.to_vec1().unwrap();
        assert_eq!((w, b), (vec![1.0; 4], vec![0.0; 4]));
    }

    #[test]
    fn group_norm_from_scratch_is_the_identity_norm() {
        let varmap = candle_nn::VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let gn = group_norm(2, 4, 1e-5, vb.pp("norm1")).unwrap();
        let x = Tensor::new(
            &[[[1f32, 3.0], [5.0, 7.0], [2.0, 2.0], [0.0, 4.0]]],
            &Device::Cpu,
        )
        .unwrap();
        let y: Vec<Vec<Vec<f32>>> = gn.forward(&x).unwrap().to_vec3().unwrap();
        // Group 1 is [1, 3, 5, 7] (mean 4, variance 5), group 2 is [2, 2, 0, 4] (mean 2, variance 2).
        let (s1, s2) = ((5f32 + 1e-5).sqrt(), (2f32 + 1e-5).sqrt());
        let expect = [
            [-3.0 / s1, -1.0 / s1],
            [1.0 / s1, 3.0 / s1],
            [0.0, 0.0],
            [-2.0 / s2, 2.0 / s2],
        ];
        for (row, want) in y[0].iter().zip(expect) {
            for (a, b) in row.iter().zip(want) {
                assert!((a - b).abs() < 1e-5, "{y:?}");
            }
        }
        let mut names: Vec<String> = varmap.data().lock().unwrap().keys().cloned().collect();
        names.sort();
        assert_eq!(names, ["norm1.bias", "norm1.weight"]);
        assert!(group_norm(3, 4, 1e-5, vb.pp("bad")).is_err());
    }

    #[test]
    fn layer_norm_matches_candle_and_has_gradient() {
        let dev = Device::Cpu;
        let weight = Tensor::randn(0f32, 1.0, 6, &dev).unwrap();
        let bias = Tensor::randn(0f32, 1.0, 6, &dev).unwrap();
        let ln = LayerNorm {
            weight: weight.clone(),
            bias: bias.clone(),
            eps: 1e-5,
        };
        let x = Tensor::randn(0f32, 2.0, (3, 6), &dev).unwrap();
        let fused = candle_nn::LayerNorm::new(weight, bias, 1e-5)
            .forward(&x)
            .unwrap();
        let diff = (ln.forward(&x).unwrap() - fused)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-5);
        let to64 = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
        let ln = LayerNorm {
            weight: to64(&ln.weight),
            bias: to64(&ln.bias),
            eps: 1e-5,
        };
        check_grad(|x| ln.forward(x), &[2, 6]);
    }
}
