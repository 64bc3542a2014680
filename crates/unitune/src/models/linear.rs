//! A drop-in for `candle_nn::Linear` that runs f32 CPU layers on the custom op of
//! [`unitune_kernels::linear`]: candle's matmul plus broadcast add spends its backward in a
//! single-threaded strided sum for the bias and in copies for the transposes and broadcasts; the
//! custom op runs forward, input and weight gradients as one gemm each and sums the bias gradient
//! on every thread. Weights are created and named exactly as `candle_nn::linear` does, so
//! checkpoints load unchanged.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::ops;

/// A linear layer `x·weightᵀ + bias`, as `candle_nn::Linear`.
#[derive(Debug, Clone)]
pub struct Linear {
    inner: candle_nn::Linear,
}

/// `candle_nn::linear`: weight `[out_dim, in_dim]` and bias `[out_dim]` under the names `weight`
/// and `bias`, with the same initialisation.
pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    let inner = candle_nn::linear(in_dim, out_dim, vb)?;
    Ok(Linear { inner })
}

/// `candle_nn::linear_no_bias`: weight `[out_dim, in_dim]` named `weight`, no bias.
pub fn linear_no_bias(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    let inner = candle_nn::linear_no_bias(in_dim, out_dim, vb)?;
    Ok(Linear { inner })
}

impl Linear {
    pub fn weight(&self) -> &Tensor {
        self.inner.weight()
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.inner.bias()
    }
}

impl Module for Linear {
    /// `[.., in_dim]` -> `[.., out_dim]`.
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let custom = xs.rank() >= 2
            && ops::kernel_ready(&[xs, self.weight()])
            && self.bias().is_none_or(|b| ops::kernel_ready(&[b]));
        if custom {
            unitune_kernels::linear::linear(xs, self.weight(), self.bias())
        } else {
            // The custom op has only a CPU kernel: CUDA (and f16/bf16, or a single vector) take
            // candle's own matmul plus bias, which work everywhere.
            self.inner.forward(xs)
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Var};
    use candle_nn::VarMap;

    use super::*;

    /// Ours and candle_nn's layer (with or without bias) on the same variables.
    fn layers(bias: bool, dtype: DType) -> Result<(Linear, candle_nn::Linear, VarMap)> {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, dtype, &Device::Cpu);
        let (ours, theirs) = if bias {
            (
                linear(6, 5, vb.pp("proj"))?,
                candle_nn::linear(6, 5, vb.pp("proj"))?,
            )
        } else {
            (
                linear_no_bias(6, 5, vb.pp("proj"))?,
                candle_nn::linear_no_bias(6, 5, vb.pp("proj"))?,
            )
        };
        Ok((ours, theirs, varmap))
    }

    fn names(varmap: &VarMap) -> Vec<String> {
        let mut names: Vec<_> = varmap
            .data()
            .lock()
            .expect("varmap")
            .keys()
            .cloned()
            .collect();
        names.sort();
        names
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        (a - b)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_dtype(DType::F32)?
            .to_scalar()
    }

    #[test]
    fn same_weights_and_values_as_candle_nn() -> Result<()> {
        for bias in [true, false] {
            let (ours, theirs, varmap) = layers(bias, DType::F32)?;
            let expected: &[&str] = if bias {
                &["proj.bias", "proj.weight"]
            } else {
                &["proj.weight"]
            };
            assert_eq!(names(&varmap), expected);
            assert_eq!(ours.weight().dims(), [5, 6]);
            assert_eq!(ours.bias().is_some(), bias);
            let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 7, 6), &Device::Cpu)?)?;
            let (y_ours, y_theirs) = (ours.forward(x.as_tensor())?, theirs.forward(x.as_tensor())?);
            assert_eq!(y_ours.dims(), [2, 7, 5]);
            assert!(max_diff(&y_ours, &y_theirs)? < 1e-5);
            // The custom op records its backward: every variable gets a gradient, equal to
            // candle's.
            let (g_ours, g_theirs) = (
                y_ours.sqr()?.sum_all()?.backward()?,
                y_theirs.sqr()?.sum_all()?.backward()?,
            );
            for t in [x.as_tensor(), ours.weight()]
                .into_iter()
                .chain(ours.bias())
            {
                let (a, b) = (
                    g_ours.get(t).expect("ours"),
                    g_theirs.get(t).expect("candle"),
                );
                assert!(max_diff(a, b)? < 1e-4);
            }
        }
        Ok(())
    }

    #[test]
    fn half_precision_falls_back_to_candle() -> Result<()> {
        let (ours, theirs, _) = layers(true, DType::F16)?;
        let x = Tensor::randn(0f32, 1.0, (3, 6), &Device::Cpu)?.to_dtype(DType::F16)?;
        let (y_ours, y_theirs) = (ours.forward(&x)?, theirs.forward(&x)?);
        assert_eq!(y_ours.dtype(), DType::F16);
        assert_eq!(max_diff(&y_ours, &y_theirs)?, 0.0);
        Ok(())
    }
}
