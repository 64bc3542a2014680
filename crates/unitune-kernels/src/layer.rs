//! The custom ops of a layer `f(x, weight) + bias` whose gradients are ops of their own, shared by
//! [`crate::conv`] and [`crate::linear`]: the op without a bias (a `CustomOp2`) and with one (a
//! `CustomOp3`), whose backwards compute only the gradients that some variable depends on.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

#[cfg(feature = "cudnn")]
use crate::conv::CudaArg;
use crate::cpu::Arg;
#[cfg(feature = "cudnn")]
use candle_core::CudaStorage;

/// A layer: its forward on CPU storages and its three gradients as tensor ops.
pub(crate) trait Layer: Send + Sync + 'static {
    /// The op's names, without and with a bias.
    const NAMES: [&'static str; 2];

    fn cpu(&self, x: Arg, w: Arg, bias: Option<Arg>) -> Result<(CpuStorage, Shape)>;

    /// Its forward on CUDA storages, for the layers that have one (the convolution, on cuDNN).
    #[cfg(feature = "cudnn")]
    fn cuda(&self, x: CudaArg, w: CudaArg, bias: Option<CudaArg>) -> Result<(CudaStorage, Shape)> {
        let _ = (x, w, bias);
        candle_core::bail!("{}: no CUDA kernel", Self::NAMES[0])
    }

    /// The input's gradient from that of the output `dy` (contiguous).
    fn input_grad(&self, x: &Tensor, w: &Tensor, dy: &Tensor) -> Result<Tensor>;

    /// The weight's gradient from that of the output `dy` (contiguous).
    fn weight_grad(&self, x: &Tensor, w: &Tensor, dy: &Tensor) -> Result<Tensor>;

    /// The bias's gradient from that of the output `dy` (contiguous).
    fn bias_grad(&self, dy: &Tensor) -> Result<Tensor>;
}

/// `layer(x, weight) (+ bias)` with the backward recorded; the inputs are made contiguous first
/// (callers check the bias's shape).
pub(crate) fn apply<L: Layer>(
    layer: L,
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
) -> Result<Tensor> {
    let (x, weight) = (x.contiguous()?, weight.contiguous()?);
    let op = LayerOp(layer);
    match bias {
        None => x.apply_op2_arc(&weight, Arc::new(Box::new(op))),
        Some(bias) => x.apply_op3_arc(&weight, &bias.contiguous()?, Arc::new(Box::new(op))),
    }
}

/// A [`Layer`] as a candle op.
struct LayerOp<L>(L);

impl<L: Layer> LayerOp<L> {
    /// The gradients of the input and the weight, of those that some variable depends on.
    fn grads(
        &self,
        x: &Tensor,
        w: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dx = x
            .track_op()
            .then(|| self.0.input_grad(x, w, dy))
            .transpose()?;
        let dw = w
            .track_op()
            .then(|| self.0.weight_grad(x, w, dy))
            .transpose()?;
        Ok((dx, dw))
    }
}

impl<L: Layer> CustomOp2 for LayerOp<L> {
    fn name(&self) -> &'static str {
        L::NAMES[0]
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.0.cpu((xs, xl), (ws, wl), None)
    }

    #[cfg(feature = "cudnn")]
    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        ws: &CudaStorage,
        wl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        self.0.cuda((xs, xl), (ws, wl), None)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _out: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // The incoming gradient may be strided (a broadcast from a sum, for one).
        self.grads(x, w, &dy.contiguous()?)
    }
}

impl<L: Layer> CustomOp3 for LayerOp<L> {
    fn name(&self) -> &'static str {
        L::NAMES[1]
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.0.cpu((xs, xl), (ws, wl), Some((bs, bl)))
    }

    #[cfg(feature = "cudnn")]
    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        ws: &CudaStorage,
        wl: &Layout,
        bs: &CudaStorage,
        bl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        self.0.cuda((xs, xl), (ws, wl), Some((bs, bl)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _out: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let (dx, dw) = self.grads(x, w, &dy)?;
        let db = b.track_op().then(|| self.0.bias_grad(&dy)).transpose()?;
        Ok((dx, dw, db))
    }
}
