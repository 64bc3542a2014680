//! Differentiable building blocks shared by the networks.
//!
//! candle's `softmax_last_dim` is registered without a backward: gradients through it silently
//! come out missing. Everything here is composed of ops that have one, or is a kernel of
//! `unitune_kernels` with its own backward, and the tests below check the gradients against finite
//! differences. The layers with weights of their own live beside: [`super::norm`] (GroupNorm,
//! LayerNorm), [`super::linear`], [`super::conv`]; the activations in [`super::activations`].

use candle_core::{DType, Result, Tensor, D};

/// Half-precision inputs are normalised in f32, as torch does inside its fused kernels.
pub(crate) fn compute_dtype(dtype: DType) -> DType {
    match dtype {
        DType::F16 | DType::BF16 => DType::F32,
        other => other,
    }
}

/// Softmax over the last dimension.
pub fn softmax_last_dim(xs: &Tensor) -> Result<Tensor> {
    let dtype = xs.dtype();
    let xs = xs.to_dtype(compute_dtype(dtype))?;
    // The max only keeps exp() in range; softmax does not depend on it, so no gradient is needed.
    let max = xs.max_keepdim(D::Minus1)?.detach();
    let num = xs.broadcast_sub(&max)?.exp()?;
    let den = num.sum_keepdim(D::Minus1)?;
    num.broadcast_div(&den)?.to_dtype(dtype)
}

/// Nearest-neighbour upsampling of `[b, c, h, w]` to `[b, c, out_h, out_w]`, as
/// `F.interpolate(mode="nearest")`. The factor-2 case is a custom op on the CPU kernels, elsewhere
/// a broadcast (cheap, and its backward sums correctly; candle's `upsample_nearest2d` backward
/// overwrites rather than accumulates).
pub fn upsample_nearest(xs: &Tensor, out_h: usize, out_w: usize) -> Result<Tensor> {
    let (b, c, h, w) = xs.dims4()?;
    if out_h == 2 * h && out_w == 2 * w {
        // The broadcast's backward is a single-threaded strided sum: the kernel sums the 2x2
        // blocks in parallel. CUDA and f16/bf16 keep the broadcast, which runs everywhere.
        if kernel_ready(&[xs]) {
            return unitune_kernels::upsample::upsample_nearest2x(xs);
        }
        return xs
            .reshape((b, c, h, 1, w, 1))?
            .broadcast_as((b, c, h, 2, w, 2))?
            .reshape((b, c, out_h, out_w));
    }
    // torch's legacy "nearest": source index floor(dst * in / out).
    let index = |out: usize, len: usize| {
        let idx: Vec<u32> = (0..out).map(|i| ((i * len) / out) as u32).collect();
        Tensor::new(idx, xs.device())
    };
    xs.index_select(&index(out_h, h)?, 2)?
        .index_select(&index(out_w, w)?, 3)
}

/// `[b, n, heads * d]` -> `[b, heads, n, d]`.
pub fn split_heads(xs: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, n, hd) = xs.dims3()?;
    xs.reshape((b, n, heads, hd / heads))?
        .transpose(1, 2)?
        .contiguous()
}

/// `[b, heads, n, d]` -> `[b, n, heads * d]`.
pub fn merge_heads(xs: &Tensor) -> Result<Tensor> {
    let (b, heads, n, d) = xs.dims4()?;
    xs.transpose(1, 2)?.reshape((b, n, heads * d))
}

/// Whether the CPU training kernels of `unitune_kernels` take these tensors: all f32 on the CPU.
/// Every other device and dtype (CUDA, f16, bf16) uses candle's own ops, which run everywhere.
pub fn kernel_ready(tensors: &[&Tensor]) -> bool {
    tensors
        .iter()
        .all(|t| t.device().is_cpu() && t.dtype() == DType::F32)
}

/// Scaled dot-product attention on `[b, heads, n, d]` tensors; `mask` is added to the scores
/// (e.g. `-inf` above the diagonal for CLIP's causal mask).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    let scale = 1.0 / (q.dim(D::Minus1)? as f64).sqrt();
    // Unmasked f32 on the CPU, or on CUDA (the VAE's attention; the UNet's takes
    // `attention_heads`): the fused kernel, which keeps no [b, heads, n_q, n_k] tensor for the
    // backward. Everything else (CLIP's causal mask, f64, f16 on the CPU, heads wider than the
    // CUDA kernel's, empty tensors) takes the composite ops below, which run on every device.
    let empty = [q, k, v].iter().any(|t| t.elem_count() == 0);
    let fused =
        kernel_ready(&[q, k, v]) || unitune_kernels::attention::cuda_supports(q, k, v, None);
    if mask.is_none() && !empty && fused {
        return unitune_kernels::attention::attention(q, k, v, scale);
    }
    let scores = (q.matmul(&k.t()?)? * scale)?; // [b, heads, n_q, n_k]
    let scores = match mask {
        Some(mask) => scores.broadcast_add(mask)?,
        None => scores,
    };
    softmax_last_dim(&scores)?.matmul(v)
}

/// Unmasked scaled dot-product attention on q, k, v as the projections give them,
/// `[b, n, heads * d]`, giving `[b, n_q, heads * d]`: [`attention`] between [`split_heads`] and
/// [`merge_heads`].
pub fn attention_heads(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Result<Tensor> {
    // f32 on the CPU, f32/f16/bf16 on CUDA: the fused kernel reads and writes this layout in
    // place, so that neither the copies into [b, heads, n, d] and back nor their backward are
    // needed, and on the GPU no [b, heads, n_q, n_k] scores exist (4096² per head at 512 px).
    // Everything else (f64, f16 on the CPU, heads wider than the CUDA kernel's, empty tensors)
    // splits the heads and takes the composite ops, which run on every device.
    let empty = [q, k, v].iter().any(|t| t.elem_count() == 0);
    let fused =
        kernel_ready(&[q, k, v]) || unitune_kernels::attention::cuda_supports(q, k, v, Some(heads));
    if !empty && fused {
        let scale = 1.0 / ((q.dim(D::Minus1)? / heads) as f64).sqrt();
        return unitune_kernels::attention::attention_heads(q, k, v, heads, scale);
    }
    let [q, k, v] = [q, k, v].map(|t| split_heads(t, heads));
    merge_heads(&attention(&q?, &k?, &v?, None)?)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Checks the autograd gradient of `sum(f(x) * w)` (w fixed random) against central finite
    /// differences, in f64.
    pub(crate) fn check_grad(f: impl Fn(&Tensor) -> Result<Tensor>, shape: &[usize]) {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f64, 1.0, shape, &dev).unwrap()).unwrap();
        let out_shape = f(x.as_tensor()).unwrap().dims().to_vec();
        let w = Tensor::randn(0f64, 1.0, out_shape, &dev).unwrap();
        let loss = |x: &Tensor| (f(x).unwrap() * &w).unwrap().sum_all().unwrap();
        let grads = loss(x.as_tensor()).backward().unwrap();
        let g = grads
            .get(x.as_tensor())
            .expect("no gradient reached the input")
            .flatten_all()
            .unwrap();
        let g: Vec<f64> = g.to_vec1().unwrap();
        let base: Vec<f64> = x.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        let eps = 1e-6;
        for (i, &gi) in g.iter().enumerate() {
            let probe = |delta: f64| {
                let mut v = base.clone();
                v[i] += delta;
                let t = Tensor::from_vec(v, shape, &dev).unwrap();
                loss(&t).to_scalar::<f64>().unwrap()
            };
            let fd = (probe(eps) - probe(-eps)) / (2.0 * eps);
            assert!(
                (fd - gi).abs() <= 1e-5 * (1.0 + fd.abs()),
                "element {i}: autograd {gi}, finite differences {fd}"
            );
        }
    }

    #[test]
    fn softmax_matches_candle_and_has_gradient() {
        let x = Tensor::randn(0f32, 3.0, (2, 5, 7), &Device::Cpu).unwrap();
        let ours = softmax_last_dim(&x).unwrap();
        let fused = candle_nn::ops::softmax_last_dim(&x).unwrap();
        let diff = (ours - fused)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-6, "{diff}");
        check_grad(softmax_last_dim, &[3, 6]);
    }

    #[test]
    fn upsample_matches_torch_nearest_and_has_gradient() {
        let x = Tensor::arange(0f64, 6.0, &Device::Cpu)
            .unwrap()
            .reshape((1, 1, 2, 3))
            .unwrap();
        let up: Vec<Vec<f64>> = upsample_nearest(&x, 4, 6)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec2()
            .unwrap();
        assert_eq!(up[1], vec![0., 0., 1., 1., 2., 2.]);
        assert_eq!(up[3], vec![3., 3., 4., 4., 5., 5.]);
        // Odd target size (diffusers' forward_upsample_size): torch gives rows [0, 0, 1] for 2 -> 3.
        let odd: Vec<Vec<f64>> = upsample_nearest(&x, 3, 3)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec2()
            .unwrap();
        assert_eq!(
            odd,
            vec![vec![0., 1., 2.], vec![0., 1., 2.], vec![3., 4., 5.]]
        );
        check_grad(|x| upsample_nearest(x, 4, 6), &[1, 2, 2, 3]);
        check_grad(|x| upsample_nearest(x, 3, 5), &[1, 1, 2, 3]);
    }

    #[test]
    fn attention_has_gradient_through_q_k_and_v() {
        let dev = Device::Cpu;
        let k = Tensor::randn(0f64, 1.0, (1, 2, 4, 3), &dev).unwrap();
        let v = Tensor::randn(0f64, 1.0, (1, 2, 4, 3), &dev).unwrap();
        check_grad(|q| attention(q, &k, &v, None), &[1, 2, 3, 3]);
        let q = Tensor::randn(0f64, 1.0, (1, 2, 3, 3), &dev).unwrap();
        check_grad(|k| attention(&q, k, &v, None), &[1, 2, 4, 3]);
    }

    /// Asserts that `attn(q, k, v)` in f32 (the fused kernel) gives the output and the gradients
    /// of q, k and v of `sum(out * w)` that it gives in f64 (the composite ops), within 1e-5.
    fn f32_attention_matches_f64(
        attn: impl Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>,
        [q, k, v, w]: [&Tensor; 4],
    ) {
        let run = |dtype: DType| {
            let vars = [q, k, v].map(|x| Var::from_tensor(&x.to_dtype(dtype).unwrap()).unwrap());
            let [q, k, v] = [0, 1, 2].map(|i| vars[i].as_tensor());
            let out = attn(q, k, v).unwrap();
            let loss = (&out * w.to_dtype(dtype).unwrap())
                .unwrap()
                .sum_all()
                .unwrap();
            let grads = loss.backward().unwrap();
            let mut all = vec![out];
            all.extend([q, k, v].map(|x| grads.get(x).expect("missing gradient").clone()));
            all.into_iter()
                .map(|x| x.to_dtype(DType::F64).unwrap())
                .collect::<Vec<_>>()
        };
        for (fused, reference) in run(DType::F32).iter().zip(run(DType::F64)) {
            assert_eq!(fused.dims(), reference.dims());
            let diff = (fused - &reference).unwrap().abs().unwrap().max_all();
            assert!(diff.unwrap().to_scalar::<f64>().unwrap() < 1e-5);
        }
    }

    #[test]
    fn fused_f32_attention_matches_the_composite_in_f64() {
        // f32 without mask takes the fused kernel, f64 the composite ops (checked just above).
        let dev = Device::Cpu;
        let t =
            |shape: (usize, usize, usize, usize)| Tensor::randn(0f32, 1.0, shape, &dev).unwrap();
        let (q, k, v, w) = (
            t((2, 3, 40, 8)),
            t((2, 3, 19, 8)),
            t((2, 3, 19, 8)),
            t((2, 3, 40, 8)),
        );
        f32_attention_matches_f64(|q, k, v| attention(q, k, v, None), [&q, &k, &v, &w]);
    }

    #[test]
    fn attention_on_packed_heads_matches_split_heads() {
        // f32 takes the kernel on [b, n, heads * d] in place, f64 the split -> composite -> merge
        // fallback, whose gradient is checked against finite differences.
        let dev = Device::Cpu;
        let (heads, d) = (3, 5);
        let t = |n: usize| Tensor::randn(0f64, 1.0, (2, n, heads * d), &dev).unwrap();
        let (q, k, v, w) = (t(11), t(7), t(7), t(11));
        check_grad(|q| attention_heads(q, &k, &v, heads), &[2, 4, heads * d]);
        f32_attention_matches_f64(|q, k, v| attention_heads(q, k, v, heads), [&q, &k, &v, &w]);
    }

    #[test]
    fn masked_f32_attention_applies_the_mask() {
        // With everything but key 0 masked, each query reads v[0] exactly.
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (1, 2, 3, 4), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (1, 2, 3, 4), &dev).unwrap();
        let mask = Tensor::new(&[0f32, f32::NEG_INFINITY, f32::NEG_INFINITY], &dev).unwrap();
        let out = attention(&q, &q, &v, Some(&mask)).unwrap();
        let expect = v
            .narrow(2, 0, 1)
            .unwrap()
            .broadcast_as((1, 2, 3, 4))
            .unwrap();
        let diff = (out - expect).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-6);
    }
}
