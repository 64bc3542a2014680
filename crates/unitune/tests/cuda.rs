//! The networks on CUDA against the CPU, on the tiny SD1 fixture: a training step (forward,
//! backward through every layer's CUDA path, including the fused CUDA attention, and Adafactor)
//! gives the CPU's loss and weight changes, half-precision tunes follow f32, and txt2img gives
//! the CPU's picture. Built only with the `cuda` feature; without a CUDA device each test says so
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
