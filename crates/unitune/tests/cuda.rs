//! The networks on CUDA against the CPU, on the tiny SD1 fixture: a training step (forward,
//! backward through every layer's CUDA path, including the fused CUDA attention, and Adafactor)
//! gives the CPU's loss and weight changes, half-precision tunes follow f32, and txt2img gives
//! the CPU's picture. With the `cudnn` feature too: the convolution's cuDNN passes against the
//! CPU's gemm kernels. Built only with the `cuda` feature; without a CUDA device each test says so
//! and passes, unless `UNITUNE_REQUIRE_GPU=1` (as `dev/gpu-check.sh` sets), where it fails.
//! `UNITUNE_FIXTURES` overrides where `tests/fixtures` is (the test executable runs on another
//! machine than the one that built it).
#![cfg(feature = "cuda")]

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use candle_nn::Optimizer;
use unitune::image_io;
use unitune::noise::Noise;
use unitune::pipelines::{generate, GenerateRequest, LoadOptions, NoProgress, StableDiffusion};
use unitune::schedulers::SchedulerKind;
use unitune::train::adafactor::{Adafactor, AdafactorConfig};
use unitune::train::tune::{tune, StepInputs, TrainableLayers, TuneSettings, Tuner};
use unitune::train::TrainOptimizer;

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

fn fixtures() -> PathBuf {
    std::env::var_os("UNITUNE_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures"))
}

fn load(device: &Device, dtype: DType, layers: Option<TrainableLayers>) -> StableDiffusion {
    let options = LoadOptions {
        device: device.clone(),
        dtype,
        trainable: layers.map(TrainableLayers::filter),
        ..LoadOptions::default()
    };
    StableDiffusion::load(&fixtures().join("tiny-sd1"), &options).unwrap()
}

fn image(name: &str) -> image::RgbImage {
    image_io::load_image(&fixtures().join("ref").join(name)).unwrap()
}

fn max_abs(t: &Tensor) -> f32 {
    let t = t
        .to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    t.abs().unwrap().max_all().unwrap().to_scalar().unwrap()
}

/// One Adafactor step with the same noise and timesteps on `device`: the loss and every tuned
/// tensor's change (on the CPU, f32).
fn one_step(device: &Device) -> (f32, Vec<(String, Tensor)>) {
    let sd = load(device, DType::F32, Some(TrainableLayers::Most));
    let pixels = image_io::image_to_tensor(&image("img2img-input.png"), device).unwrap();
    let settings = TuneSettings {
        learning_rate: 1e-3,
        ..TuneSettings::new("beikkpic", 0)
    };
    let config = AdafactorConfig {
        lr: 1e-3,
        ..Default::default()
    };
    let mut tuner = Tuner::with_optimizer(&sd, &pixels, settings, |vars| {
        Ok(TrainOptimizer::Adafactor(Adafactor::new(vars, config)?))
    })
    .unwrap();
    // The noise and timesteps of the first step that tests/tune.rs checks against PyTorch.
    let refs = candle_core::safetensors::load(fixtures().join("ref/tune_step.safetensors"), device)
        .unwrap();
    let inputs = StepInputs {
        noise: refs["sd1.noise.1"].clone(),
        timesteps: refs["sd1.timesteps.1"].to_dtype(DType::U32).unwrap(),
    };
    let loss = tuner.step(&inputs).unwrap();
    let base = sd.unet_store.tensors();
    let mut deltas: Vec<(String, Tensor)> = sd
        .unet_store
        .trainable_vars()
        .into_iter()
        .map(|(name, var)| {
            let base = base[&name].to_dtype(DType::F32).unwrap();
            let delta = (var.as_tensor() - base).unwrap();
            (name, delta.to_device(&Device::Cpu).unwrap())
        })
        .collect();
    deltas.sort_by(|a, b| a.0.cmp(&b.0));
    (loss, deltas)
}

#[test]
fn a_training_step_on_cuda_matches_the_cpu() {
    let Some(dev) = gpu() else { return };
    let (cpu_loss, cpu) = one_step(&Device::Cpu);
    let (gpu_loss, gpu) = one_step(&dev);
    let gap = (gpu_loss - cpu_loss).abs() / cpu_loss;
    assert!(gap < 1e-4, "loss: CUDA {gpu_loss}, CPU {cpu_loss}");
    assert_eq!(cpu.len(), gpu.len());
    let mut worst = (0f32, String::new());
    for ((name, c), (_, g)) in cpu.iter().zip(&gpu) {
        // Adafactor normalises the update, so compare it with its own size.
        let rel = max_abs(&(c - g).unwrap()) / max_abs(c).max(1e-12);
        if rel > worst.0 {
            worst = (rel, name.clone());
        }
    }
    eprintln!(
        "CUDA step: loss gap {gap:.1e}, worst change gap {:.1e} (`{}`)",
        worst.0, worst.1
    );
    assert!(
        worst.0 < 1e-3,
        "`{}`: changes differ by {:.1e} of their size",
        worst.1,
        worst.0
    );
}

/// A 12-step tune on `device` in `dtype` (f32 master weights for f16/bf16): its session's deltas.
fn tune_in(device: &Device, dtype: DType) -> unitune::session::Session {
    let sd = load(device, dtype, Some(TrainableLayers::Most));
    let settings = TuneSettings {
        steps: 12,
        learning_rate: 1e-3,
        ..TuneSettings::new("beikkpic", 0)
    };
    let image = image("tune-input.png");
    tune(
        &sd,
        &image,
        settings,
        &mut Noise::seeded(0),
        &mut NoProgress,
        &mut |_, _| Ok(()),
    )
    .unwrap()
}

#[test]
fn half_precision_tunes_on_cuda_follow_f32() {
    let Some(dev) = gpu() else { return };
    let reference = tune_in(&dev, DType::F32);
    for (dtype, min_cosine) in [(DType::F16, 0.99), (DType::BF16, 0.97)] {
        let half = tune_in(&dev, dtype);
        assert_eq!(
            half.deltas.len(),
            reference.deltas.len(),
            "{dtype:?}: tensors changed"
        );
        let (mut dot, mut norm_half, mut norm_ref) = (0f64, 0f64, 0f64);
        let sum = |t: Tensor| t.sum_all().unwrap().to_scalar::<f64>().unwrap();
        for (name, d) in &reference.deltas {
            let h = half.deltas[name]
                .to_device(&Device::Cpu)
                .unwrap()
                .to_dtype(DType::F64);
            let d = d
                .to_device(&Device::Cpu)
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap();
            let h = h.unwrap();
            dot += sum((&h * &d).unwrap());
            norm_half += sum(h.sqr().unwrap());
            norm_ref += sum(d.sqr().unwrap());
        }
        let cosine = dot / (norm_half * norm_ref).sqrt();
        let losses_finite = half.losses.iter().all(|l| l.is_finite());
        eprintln!(
            "{dtype:?} on CUDA: delta cosine to f32 {cosine:.4}, losses {:?}",
            half.losses
        );
        assert!(losses_finite, "{dtype:?}: a loss is not finite");
        assert!(cosine > min_cosine, "{dtype:?}: cosine {cosine}");
    }
}

#[test]
fn txt2img_on_cuda_matches_the_cpu() {
    let Some(dev) = gpu() else { return };
    let picture = |device: &Device| {
        let sd = load(device, DType::F32, None);
        let r = GenerateRequest {
            width: 64,
            height: 64,
            num_inference_steps: 8,
            guidance_scale: 7.5,
            scheduler: SchedulerKind::Ddim,
            ..GenerateRequest::new("a red circle")
        };
        let image = generate(&sd, &r, &mut Noise::seeded(1), &mut NoProgress).unwrap();
        image.to_device(&Device::Cpu).unwrap()
    };
    let (cpu, gpu) = (picture(&Device::Cpu), picture(&dev));
    let diff = max_abs(&(cpu - gpu).unwrap());
    eprintln!("txt2img: CUDA and CPU differ by at most {diff:.2e} (range [-1, 1])");
    assert!(diff < 2e-3, "{diff}");
}

/// The convolution's output and the gradients of its input, weight and bias for the loss
/// `sum(conv2d(x, w, b) ∘ r)`, computed by `conv` on `dev` in `dtype`, as f64 on the CPU.
#[cfg(feature = "cudnn")]
fn conv_and_grads(
    conv: &dyn Fn(&Tensor, &Tensor, &Tensor) -> candle_core::Result<Tensor>,
    [x, w, b, r]: [&Tensor; 4],
    dtype: DType,
    dev: &Device,
) -> [Tensor; 4] {
    let on = |t: &Tensor| t.to_dtype(dtype).unwrap().to_device(dev).unwrap();
    let vars = [x, w, b].map(|t| candle_core::Var::from_tensor(&on(t)).unwrap());
    let [x, w, b] = [0, 1, 2].map(|i| vars[i].as_tensor());
    let y = conv(x, w, b).unwrap();
    let grads = (&y * on(r)).unwrap().sum_all().unwrap().backward().unwrap();
    let f64_cpu = |t: &Tensor| {
        t.to_device(&Device::Cpu)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
    };
    let grad = |t: &Tensor| f64_cpu(grads.get(t).expect("a gradient"));
    [f64_cpu(&y), grad(x), grad(w), grad(b)]
}

/// SD's convolutions, `(n, c, h, w, o, kernel, padding, stride, bias per image)`: 3x3 keeping the
/// size, a stride-2 downsampler on even and odd sizes (candle's own backward gets the odd
/// height/even width one wrong), 1x1 shortcuts, a resnet's first convolution with the time
/// embedding as a bias per image, and conv_in at 512 px.
#[cfg(feature = "cudnn")]
type ConvCase = (usize, usize, usize, usize, usize, usize, usize, usize, bool);
#[cfg(feature = "cudnn")]
const CONV_CASES: [ConvCase; 7] = [
    (2, 32, 16, 16, 64, 3, 1, 1, false),
    (2, 64, 16, 16, 64, 3, 1, 2, false),
    (1, 24, 9, 8, 40, 3, 1, 2, false),
    (4, 64, 8, 8, 32, 1, 0, 1, false),
    (2, 40, 7, 9, 24, 1, 0, 1, true),
    (3, 16, 9, 10, 48, 3, 1, 1, true),
    (1, 4, 64, 64, 320, 3, 1, 1, false),
];

#[cfg(feature = "cudnn")]
#[test]
fn cudnn_conv2d_matches_the_cpu_kernels() {
    use unitune_kernels::conv::{conv2d, cuda_supports};
    let Some(dev) = gpu() else { return };
    let cpu = Device::Cpu;
    // Tolerances on max |GPU - reference| / max |reference|, per output and gradient. The inputs
    // are rounded to `dtype` before both sides see them, so what remains is cuDNN's arithmetic
    // (f32 accumulation throughout; Winograd and FFT algorithms lose a few bits in f32) and
    // the rounding of results to f16 (11 bits) or bf16 (8 bits).
    for (dtype, tol) in [(DType::F32, 2e-4), (DType::F16, 5e-3), (DType::BF16, 4e-2)] {
        for (i, &(n, c, h, w, o, k, padding, stride, per_image)) in CONV_CASES.iter().enumerate() {
            let mut noise = Noise::seeded(i as u64);
            let mut randn = |dims: &[usize], scale: f64| {
                let t = (noise.randn(dims, &cpu).unwrap() * scale).unwrap();
                // Rounded to `dtype` first, so that the reference sees exactly the GPU's inputs.
                t.to_dtype(dtype).unwrap().to_dtype(DType::F64).unwrap()
            };
            let (oh, ow) = (
                (h + 2 * padding - k) / stride + 1,
                (w + 2 * padding - k) / stride + 1,
            );
            let bias_dims: &[usize] = if per_image { &[n, o] } else { &[o] };
            let x = randn(&[n, c, h, w], 1.0);
            let wt = randn(&[o, c, k, k], 1.0 / ((c * k * k) as f64).sqrt());
            let b = randn(bias_dims, 1.0);
            let r = randn(&[n, o, oh, ow], 1.0);
            let on_gpu = |t: &Tensor| t.to_dtype(dtype).unwrap().to_device(&dev).unwrap();
            assert!(
                cuda_supports(
                    &on_gpu(&x),
                    &on_gpu(&wt),
                    Some(&on_gpu(&b)),
                    padding,
                    stride
                ),
                "cuDNN should take {dtype:?} case {i}"
            );
            let conv = |x: &Tensor, w: &Tensor, b: &Tensor| conv2d(x, w, Some(b), padding, stride);
            let got = conv_and_grads(&conv, [&x, &wt, &b, &r], dtype, &dev);
            let want = conv_and_grads(&conv, [&x, &wt, &b, &r], DType::F64, &cpu);
            for ((got, want), what) in got.iter().zip(&want).zip(["y", "dx", "dw", "db"]) {
                assert_eq!(got.dims(), want.dims(), "{what} of case {i}");
                let max = |t: &Tensor| {
                    t.abs()
                        .unwrap()
                        .max_all()
                        .unwrap()
                        .to_scalar::<f64>()
                        .unwrap()
                };
                let rel = max(&(got - want).unwrap()) / max(want);
                assert!(
                    rel <= tol,
                    "{what} of {dtype:?} case {i} {:?}: off by {rel:.1e} > {tol:.0e}",
                    CONV_CASES[i]
                );
            }
        }
    }
}

#[cfg(feature = "cudnn")]
#[test]
fn the_conv_layer_takes_cudnn_on_cuda() {
    use candle_nn::{Conv2dConfig, Module, VarBuilder, VarMap};
    use unitune::models::conv::conv2d;
    let Some(dev) = gpu() else { return };
    // A stride-2 downsampler on an odd height and even width: candle's own CUDA backward (which
    // the layer took before cuDNN) derives the input size from the height alone and fails here,
    // so equal gradients show that the layer runs the cuDNN op, forward and backward.
    let cfg = Conv2dConfig {
        padding: 1,
        stride: 2,
        ..Default::default()
    };
    let run = |device: &Device| {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
        let layer = conv2d(8, 16, 3, cfg, vb.pp("conv")).unwrap();
        // The same weights on both devices: drawn in the order of their names.
        let mut noise = Noise::seeded(7);
        let vars = varmap.data().lock().unwrap().clone();
        let mut names: Vec<_> = vars.keys().collect();
        names.sort();
        for name in names {
            let values = noise.randn(vars[name].dims(), &Device::Cpu).unwrap();
            vars[name].set(&values.to_device(device).unwrap()).unwrap();
        }
        let x = candle_core::Var::from_tensor(
            &noise
                .randn((2, 8, 9, 8), &Device::Cpu)
                .unwrap()
                .to_device(device)
                .unwrap(),
        )
        .unwrap();
        let y = layer.forward(x.as_tensor()).unwrap();
        let grads = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let dw = grads.get(layer.weight()).expect("weight gradient").clone();
        let dx = grads.get(x.as_tensor()).expect("input gradient").clone();
        [y, dx, dw].map(|t| t.to_device(&Device::Cpu).unwrap())
    };
    let (cpu, gpu) = (run(&Device::Cpu), run(&dev));
    for ((c, g), what) in cpu.iter().zip(&gpu).zip(["y", "dx", "dw"]) {
        assert_eq!(c.dims(), g.dims(), "{what}");
        let rel = max_abs(&(c - g).unwrap()) / max_abs(c);
        assert!(rel < 1e-4, "{what}: CUDA and CPU differ by {rel:.1e}");
    }
}
