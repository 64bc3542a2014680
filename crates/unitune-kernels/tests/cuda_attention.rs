//! The fused attention's CUDA kernels against the composite attention in f64 on the CPU: output
//! and the gradients of q, k and v, both head layouts, f32/f16/bf16, sizes that leave partial
//! blocks and tiles. Built only with the `cuda` feature; without a CUDA device each test says so
//! and passes, unless `UNITUNE_REQUIRE_GPU=1` (as `dev/gpu-check.sh` sets), where it fails.
#![cfg(feature = "cuda")]

use candle_core::{DType, Device, Result, Tensor, Var, D};
use unitune_kernels::attention::{attention, attention_heads, cuda_supports, CUDA_MAX_HEAD_DIM};

/// The first CUDA device, or `None` (after saying why) when the tests should skip.
fn gpu() -> Option<Device> {
    match Device::new_cuda(0) {
        Ok(dev) => Some(dev),
        Err(e) if std::env::var("UNITUNE_REQUIRE_GPU").as_deref() != Ok("1") => {
            eprintln!("skipped: no CUDA device ({e})");
            None
        }
        Err(e) => panic!("UNITUNE_REQUIRE_GPU=1 but no CUDA device: {e}"),
    }
}

/// `softmax(q·kᵀ·scale)·v` on `[b, heads, n, d]`, composed of candle ops with a backward.
fn reference(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let scores = (q.matmul(&k.t()?)? * scale)?;
    let max = scores.max_keepdim(D::Minus1)?.detach();
    let num = scores.broadcast_sub(&max)?.exp()?;
    num.broadcast_div(&num.sum_keepdim(D::Minus1)?)?.matmul(v)
}

/// `[b, n, heads·d]` -> `[b, heads, n, d]` and back.
fn split(x: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, n, hd) = x.dims3()?;
    x.reshape((b, n, heads, hd / heads))?
        .transpose(1, 2)?
        .contiguous()
}
fn merge(x: &Tensor) -> Result<Tensor> {
    let (b, heads, n, d) = x.dims4()?;
    x.transpose(1, 2)?.reshape((b, n, heads * d))
}

/// Output and gradients of q, k, v of `sum(attn(q, k, v) * w)`, as f64 on the CPU.
fn run(
    attn: &dyn Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>,
    [q, k, v, w]: [&Tensor; 4],
    dtype: DType,
    dev: &Device,
) -> Vec<Tensor> {
    let vars = [q, k, v]
        .map(|x| Var::from_tensor(&x.to_dtype(dtype).unwrap().to_device(dev).unwrap()).unwrap());
    let [q, k, v] = [0, 1, 2].map(|i| vars[i].as_tensor());
    let out = attn(q, k, v).unwrap();
    let w = w.to_dtype(dtype).unwrap().to_device(dev).unwrap();
    let grads = (&out * &w).unwrap().sum_all().unwrap().backward().unwrap();
    let mut all = vec![out];
    all.extend([q, k, v].map(|x| grads.get(x).expect("missing gradient").clone()));
    all.iter()
        .map(|x| {
            x.to_device(&Device::Cpu)
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap()
        })
        .collect()
}

/// Asserts that the CUDA op in `dtype` matches the f64 reference on the same (rounded) inputs:
/// max |difference| <= tol · (1 + max |reference|) for the output and each gradient.
fn check(dev: &Device, dtype: DType, tol: f64, packed: bool, [b, heads, nq, nk, d]: [usize; 5]) {
    let cpu = Device::Cpu;
    let shape = |n: usize| {
        if packed {
            vec![b, n, heads * d]
        } else {
            vec![b, heads, n, d]
        }
    };
    let t = |n: usize| {
        // Rounded to `dtype` first, so that the reference sees exactly the GPU's inputs.
        Tensor::randn(0f32, 1.0, shape(n), &cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    };
    let (q, k, v, w) = (t(nq), t(nk), t(nk), t(nq));
    let scale = 1.0 / (d as f64).sqrt();
    let gpu_q = q.to_device(dev).unwrap();
    let gpu_k = k.to_device(dev).unwrap();
    assert!(
        cuda_supports(&gpu_q, &gpu_k, &gpu_k, packed.then_some(heads)),
        "the CUDA kernels should take {dtype:?} {:?}",
        shape(nq)
    );
    let fused = |q: &Tensor, k: &Tensor, v: &Tensor| match packed {
        true => attention_heads(q, k, v, heads, scale),
        false => attention(q, k, v, scale),
    };
    let composite = |q: &Tensor, k: &Tensor, v: &Tensor| match packed {
        true => merge(&reference(
            &split(q, heads)?,
            &split(k, heads)?,
            &split(v, heads)?,
            scale,
        )?),
        false => reference(q, k, v, scale),
    };
    let got = run(&fused, [&q, &k, &v, &w], dtype, dev);
    let want = run(&composite, [&q, &k, &v, &w], DType::F64, &cpu);
    for ((got, want), what) in got.iter().zip(&want).zip(["out", "dq", "dk", "dv"]) {
        assert_eq!(got.dims(), want.dims(), "{what}");
        let max = |x: &Tensor| {
            x.abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let diff = max(&(got - want).unwrap());
        let bound = tol * (1.0 + max(want));
        assert!(
            diff <= bound,
            "{what} of {dtype:?} {} {:?}: max difference {diff} > {bound}",
            if packed { "packed" } else { "split" },
            [b, heads, nq, nk, d]
        );
    }
}

/// Sizes: partial blocks of 16 query rows and tiles of 32 keys, a head narrower than the 8 lanes
/// that share a row, SD 1.5's head widths (40, 80, 160) and SD 2's (64), cross-attention's 77 keys.
const SIZES: [[usize; 5]; 5] = [
    [2, 3, 37, 45, 40],
    [1, 2, 70, 19, 160],
    [1, 1, 5, 3, 5],
    [2, 2, 130, 77, 64],
    [1, 4, 64, 64, 80],
];

#[test]
fn cuda_attention_matches_f64_reference_in_f32() {
    let Some(dev) = gpu() else { return };
    for packed in [false, true] {
        for size in SIZES {
            check(&dev, DType::F32, 1e-4, packed, size);
        }
    }
}

#[test]
fn cuda_attention_matches_f64_reference_in_half_precision() {
    let Some(dev) = gpu() else { return };
    // Inputs are rounded alike; what remains is the output's and gradients' rounding (f16 keeps
    // 11 bits, bf16 8) and the f32 sums.
    for (dtype, tol) in [(DType::F16, 4e-3), (DType::BF16, 3e-2)] {
        for packed in [false, true] {
            for size in SIZES {
                check(&dev, dtype, tol, packed, size);
            }
        }
    }
}

#[test]
fn cuda_attention_refuses_heads_wider_than_its_registers() {
    let Some(dev) = gpu() else { return };
    let wide = Tensor::zeros((1, 2, 3, CUDA_MAX_HEAD_DIM + 8), DType::F32, &dev).unwrap();
    assert!(!cuda_supports(&wide, &wide, &wide, None));
    let err = attention(&wide, &wide, &wide, 1.0).unwrap_err().to_string();
    assert!(err.contains("at most 160"), "{err}");
    let fits = Tensor::zeros((1, 2, 3, CUDA_MAX_HEAD_DIM), DType::F32, &dev).unwrap();
    assert!(cuda_supports(&fits, &fits, &fits, None));
}
