//! End-to-end parity with diffusers: txt2img and img2img on the tiny fixture pipelines, compared
//! after 8-bit rounding (mean abs diff <= 0.5/255, max <= 3/255). References come from
//! dev/ref_pipelines.py.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use unitune::image_io;
use unitune::noise::Noise;
use unitune::pipelines::{generate, GenerateRequest, LoadOptions, NoProgress, StableDiffusion};
use unitune::schedulers::SchedulerKind;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn reference() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join("ref/pipelines.safetensors"), &Device::Cpu)
        .unwrap()
}

/// Our `[1, 3, h, w]` image in [-1, 1] against diffusers' `[h, w, 3]` in [0, 1], both rounded to 8 bits.
fn assert_matches(ours: &Tensor, expected: &Tensor, what: &str) {
    let ours = image_io::tensor_to_image(ours, 0).unwrap();
    let expected: Vec<f32> = expected.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(ours.as_raw().len(), expected.len(), "{what}: size");
    let diffs: Vec<f32> = ours
        .as_raw()
        .iter()
        .zip(&expected)
        .map(|(&a, &b)| (a as f32 - (b * 255.0).round()).abs())
        .collect();
    let mean = diffs.iter().sum::<f32>() / diffs.len() as f32;
    let max = diffs.iter().cloned().fold(0.0, f32::max);
    eprintln!("{what}: mean abs diff {mean:.4}/255, max {max}/255");
    assert!(
        mean <= 0.5 && max <= 3.0,
        "{what}: mean {mean}/255, max {max}/255"
    );
}

fn request(width: usize, height: usize, steps: usize, guidance: f64) -> GenerateRequest {
    let mut r = GenerateRequest::new("a photo of a red circle on a blue background");
    r.negative_prompt = "blurry, low quality".into();
    (r.width, r.height, r.num_inference_steps, r.guidance_scale) = (width, height, steps, guidance);
    r.scheduler = SchedulerKind::Ddim;
    r
}

#[test]
fn txt2img_matches_diffusers() {
    let refs = reference();
    let cases = [
        ("tiny-sd1", "sd1_txt2img", 64, 64, 8, 7.5),
        ("tiny-sd1", "sd1_noguide", 64, 64, 4, 1.0),
        ("tiny-sd2", "sd2_txt2img", 72, 40, 6, 5.0),
    ];
    for (model, key, w, h, steps, guidance) in cases {
        let sd = StableDiffusion::load(&fixtures().join(model), &LoadOptions::default()).unwrap();
        let mut r = request(w, h, steps, guidance);
        r.latents = Some(refs[&format!("{key}_latents")].clone());
        let image = generate(&sd, &r, &mut Noise::seeded(0), &mut NoProgress).unwrap();
        assert_matches(&image, &refs[&format!("{key}_image")], key);
    }
}

#[test]
fn img2img_matches_diffusers() {
    let refs = reference();
    let input = image_io::load_image(&fixtures().join("ref/img2img-input.png")).unwrap();
    for (model, key, strength, steps, guidance) in [
        ("tiny-sd1", "sd1", 0.6, 10, 7.5),
        ("tiny-sd2", "sd2", 0.75, 8, 4.0),
    ] {
        let sd = StableDiffusion::load(&fixtures().join(model), &LoadOptions::default()).unwrap();
        let mut r = request(64, 48, steps, guidance);
        r.image = Some(image_io::image_to_tensor(&input, &Device::Cpu).unwrap());
        r.strength = strength;
        // diffusers draws the VAE posterior sample, then the noise it adds.
        let mut noise = Noise::replay([
            refs[&format!("{key}_img2img_sample_noise")].clone(),
            refs[&format!("{key}_img2img_noise")].clone(),
        ]);
        let image = generate(&sd, &r, &mut noise, &mut NoProgress).unwrap();
        assert_matches(
            &image,
            &refs[&format!("{key}_img2img_image")],
            &format!("{key} img2img"),
        );
    }
}

#[test]
fn same_seed_same_image_and_bad_sizes_are_refused() {
    let sd = StableDiffusion::load(&fixtures().join("tiny-sd1"), &LoadOptions::default()).unwrap();
    let r = request(32, 32, 3, 3.0);
    let a = generate(&sd, &r, &mut Noise::seeded(5), &mut NoProgress).unwrap();
    let b = generate(&sd, &r, &mut Noise::seeded(5), &mut NoProgress).unwrap();
    let c = generate(&sd, &r, &mut Noise::seeded(6), &mut NoProgress).unwrap();
    let diff = |x: &Tensor, y: &Tensor| {
        (x - y)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    assert_eq!(diff(&a, &b), 0.0);
    assert!(diff(&a, &c) > 1e-3);

    let err = generate(
        &sd,
        &request(60, 64, 3, 3.0),
        &mut Noise::seeded(0),
        &mut NoProgress,
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("width") && err.to_string().contains("multiple of 8"),
        "{err}"
    );
    let mut r = request(32, 32, 3, 3.0);
    r.image = Some(Tensor::zeros((1, 3, 32, 32), DType::F32, &Device::Cpu).unwrap());
    r.strength = 0.1;
    let err = generate(&sd, &r, &mut Noise::seeded(0), &mut NoProgress).unwrap_err();
    assert!(err.to_string().contains("strength"), "{err}");
}
