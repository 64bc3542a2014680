//! A drop-in for `candle_nn::Conv2d` that runs f32 CPU convolutions on the gemm custom op of
//! [`unitune_kernels::conv`]: candle's own CPU conv2d spends a training step in scalar loops
//! (its backward above all), the custom op runs forward, input and weight gradients as large
//! gemms. With the `cudnn` feature the same op takes CUDA convolutions too (f32, f16, bf16), all
//! three passes on cuDNN, where candle's CUDA backward would run its generic transposed
//! convolution. Weights are created and named exactly as `candle_nn::conv2d` does, so
//! checkpoints load unchanged.

use candle_core::{bail, Module, Result, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};

use super::ops;

/// A 2D convolution with bias, as `candle_nn::Conv2d`.
#[derive(Debug, Clone)]
pub struct Conv2d {
    inner: candle_nn::Conv2d,
}

/// `candle_nn::conv2d`: weight `[out_channels, in_channels / groups, k, k]` and bias
/// `[out_channels]` under the names `weight` and `bias`, with the same initialisation.
pub fn conv2d(
    in_channels: usize,
    out_channels: usize,
    kernel_size: usize,
    cfg: Conv2dConfig,
    vb: VarBuilder,
) -> Result<Conv2d> {
    let inner = candle_nn::conv2d(in_channels, out_channels, kernel_size, cfg, vb)?;
    Ok(Conv2d { inner })
}

impl Conv2d {
    pub fn weight(&self) -> &Tensor {
        self.inner.weight()
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.inner.bias()
    }

    /// Whether the custom op takes this convolution of `xs` (and of the other tensors): on the
    /// CPU's gemm kernels, or on cuDNN.
    fn custom(&self, xs: &Tensor, others: &[&Tensor]) -> bool {
        let cfg = self.inner.config();
        let weight = self.inner.weight();
        let rest: Vec<&Tensor> = others.iter().copied().chain(self.inner.bias()).collect();
        let on_cpu = ops::kernel_ready(&[xs, weight]) && ops::kernel_ready(&rest);
        let on_gpu =
            unitune_kernels::conv::cuda_supports(xs, weight, None, cfg.padding, cfg.stride)
                && rest
                    .iter()
                    .all(|t| t.dtype() == xs.dtype() && t.device().same_device(xs.device()));
        cfg.groups == 1 && cfg.dilation == 1 && (on_cpu || on_gpu)
    }

    /// `forward(xs) + extra[:, :, None, None]` for `xs: [b, c_in, h, w]` and `extra: [b, c_out]`
    /// (a resnet's time embedding): the custom op adds `bias + extra` as a bias per image, so
    /// that the sum costs no pass over the output, forward or backward.
    pub fn forward_with_added_bias(&self, xs: &Tensor, extra: &Tensor) -> Result<Tensor> {
        let (b, out_channels) = (xs.dim(0)?, self.inner.weight().dim(0)?);
        if extra.dims() != [b, out_channels] {
            bail!(
                "conv2d: added bias of shape {:?} for {b} images of {out_channels} channels",
                extra.dims()
            )
        }
        if self.custom(xs, &[extra]) {
            let cfg = self.inner.config();
            let bias = match self.inner.bias() {
                Some(bias) => bias.unsqueeze(0)?.broadcast_add(extra)?, // [b, c_out]
                None => extra.clone(),
            };
            unitune_kernels::conv::conv2d(
                xs,
                self.inner.weight(),
                Some(&bias),
                cfg.padding,
                cfg.stride,
            )
        } else {
            // Off the custom op (CUDA without cuDNN, f16/bf16 on the CPU): the convolution plus
            // its bias, then `extra`.
            self.forward(xs)?
                .broadcast_add(&extra.unsqueeze(2)?.unsqueeze(3)?)
        }
    }
}

impl Module for Conv2d {
    /// `[b, c_in, h, w]` -> `[b, c_out, h_out, w_out]`.
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let cfg = self.inner.config();
        let weight = self.inner.weight();
        if self.custom(xs, &[]) {
            unitune_kernels::conv::conv2d(xs, weight, self.inner.bias(), cfg.padding, cfg.stride)
        } else {
            // Off the custom op (CUDA without cuDNN, f16/bf16 on the CPU, grouped or dilated
            // convolutions): candle's own conv2d plus bias, which work everywhere.
            self.inner.forward(xs)
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Var};
    use candle_nn::VarMap;

    use super::*;

    /// Ours and candle_nn's layer on the same variables.
    fn layers(cfg: Conv2dConfig, dtype: DType) -> Result<(Conv2d, candle_nn::Conv2d, VarMap)> {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, dtype, &Device::Cpu);
        let ours = conv2d(6, 5, 3, cfg, vb.pp("conv"))?;
        let theirs = candle_nn::conv2d(6, 5, 3, cfg, vb.pp("conv"))?;
        Ok((ours, theirs, varmap))
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
        let cfg = Conv2dConfig {
            padding: 1,
            stride: 2,
            ..Default::default()
        };
        let (ours, theirs, varmap) = layers(cfg, DType::F32)?;
        let mut names: Vec<_> = varmap
            .data()
            .lock()
            .expect("varmap")
            .keys()
            .cloned()
            .collect();
        names.sort();
        assert_eq!(names, ["conv.bias", "conv.weight"]);
        assert_eq!(ours.weight().dims(), [5, 6, 3, 3]);
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 6, 8, 10), &Device::Cpu)?)?;
        let (y_ours, y_theirs) = (ours.forward(x.as_tensor())?, theirs.forward(x.as_tensor())?);
        assert_eq!(y_ours.dims(), [2, 5, 4, 5]);
        assert!(max_diff(&y_ours, &y_theirs)? < 1e-5);
        // The custom op records its backward: every variable gets a gradient, equal to candle's.
        let (g_ours, g_theirs) = (
            y_ours.sum_all()?.backward()?,
            y_theirs.sum_all()?.backward()?,
        );
        for t in [x.as_tensor(), ours.weight(), ours.bias().expect("bias")] {
            let (a, b) = (
                g_ours.get(t).expect("ours"),
                g_theirs.get(t).expect("candle"),
            );
            assert!(max_diff(a, b)? < 1e-4);
        }
        Ok(())
    }

    #[test]
    fn added_bias_matches_candle_nn_plus_broadcast() -> Result<()> {
        let cfg = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let (ours, theirs, _) = layers(cfg, DType::F32)?;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (3, 6, 7, 5), &Device::Cpu)?)?;
        let extra = Var::from_tensor(&Tensor::randn(0f32, 1.0, (3, 5), &Device::Cpu)?)?;
        let r = Tensor::randn(0f32, 1.0, (3, 5, 7, 5), &Device::Cpu)?;
        let y_ours = ours.forward_with_added_bias(x.as_tensor(), extra.as_tensor())?;
        let y_theirs = theirs
            .forward(x.as_tensor())?
            .broadcast_add(&extra.as_tensor().unsqueeze(2)?.unsqueeze(3)?)?;
        assert_eq!(y_ours.dims(), [3, 5, 7, 5]);
        assert!(max_diff(&y_ours, &y_theirs)? < 1e-5);
        let (g_ours, g_theirs) = (
            (y_ours * &r)?.sum_all()?.backward()?,
            (y_theirs * &r)?.sum_all()?.backward()?,
        );
        let vars = [x.as_tensor(), extra.as_tensor(), ours.weight()];
        for t in vars.into_iter().chain(ours.bias()) {
            let (a, b) = (
                g_ours.get(t).expect("ours"),
                g_theirs.get(t).expect("candle"),
            );
            assert_eq!(a.dims(), t.dims());
            assert!(max_diff(a, b)? < 1e-4);
        }
        // The same sum off the custom op (f16), and a mis-shaped `extra` is refused.
        let (ours, theirs, _) = layers(cfg, DType::F16)?;
        let (x, extra) = (x.to_dtype(DType::F16)?, extra.to_dtype(DType::F16)?);
        let y_ours = ours.forward_with_added_bias(&x, &extra)?;
        let y_theirs = theirs
            .forward(&x)?
            .broadcast_add(&extra.unsqueeze(2)?.unsqueeze(3)?)?;
        assert_eq!(max_diff(&y_ours, &y_theirs)?, 0.0);
        assert!(ours
            .forward_with_added_bias(&x, &extra.narrow(0, 0, 1)?)
            .is_err());
        Ok(())
    }

    #[test]
    fn half_precision_falls_back_to_candle() -> Result<()> {
        let (ours, theirs, _) = layers(Default::default(), DType::F16)?;
        let x = Tensor::randn(0f32, 1.0, (1, 6, 5, 5), &Device::Cpu)?.to_dtype(DType::F16)?;
        let (y_ours, y_theirs) = (ours.forward(&x)?, theirs.forward(&x)?);
        assert_eq!(y_ours.dtype(), DType::F16);
        assert_eq!(max_diff(&y_ours, &y_theirs)?, 0.0);
        Ok(())
    }
}
