//! The edit pipeline on the tiny SD1 fixture: guided steps and whole edits against the hand-written
//! diffusers loops of dev/ref_edit.py, and the guarantees of late start, interpolation and masks.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use image::RgbImage;
use unitune::image_io::{self, tensor_to_image};
use unitune::noise::Noise;
use unitune::pipelines::{
    edit, AutoMask, EditBase, EditMask, EditRequest, Guidance, GuidanceMode, LoadOptions, Mask,
    NoProgress, StableDiffusion,
};
use unitune::schedulers::{self, SchedulerKind};
use unitune::session::Session;
use unitune::train::tune::{tune, TrainableLayers, TuneSettings};

const TOKEN: &str = "beikkpic";

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn reference() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join("ref/edit.safetensors"), &Device::Cpu).unwrap()
}

fn tiny_sd1(options: &LoadOptions) -> StableDiffusion {
    StableDiffusion::load(&fixtures().join("tiny-sd1"), options).unwrap()
}

/// The 64x48 picture of dev/ref_pipelines.py.
fn base_image() -> RgbImage {
    image_io::load_image(&fixtures().join("ref/img2img-input.png")).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap()
}

/// The largest per-channel difference in 8-bit levels over the pixels where `select` holds.
fn max_level_diff(a: &RgbImage, b: &RgbImage, select: impl Fn(usize, usize) -> bool) -> u8 {
    let mut worst = 0;
    for (x, y, p) in a.enumerate_pixels() {
        if select(x as usize, y as usize) {
            let q = b.get_pixel(x, y);
            worst = (0..3).map(|c| p[c].abs_diff(q[c])).fold(worst, u8::max);
        }
    }
    worst
}

/// The edit of dev/ref_edit.py: "a red circle on a blue background", baseline "a photo",
/// negative "blurry", DDIM.
fn request(steps: usize) -> EditRequest {
    let mut r = EditRequest::new(TOKEN, "a red circle on a blue background");
    r.negative_prompt = "blurry".into();
    r.baseline_prompt = Some("a photo".into());
    r.num_inference_steps = steps;
    r.scheduler = SchedulerKind::Ddim;
    r
}

/// The rectangle x in 16..40, y in 8..32 of the 64x48 base.
fn rectangle() -> Mask {
    Mask::from_fn(64, 48, |x, y| {
        ((16..40).contains(&x) && (8..32).contains(&y)) as u8 as f32
    })
}

#[test]
fn one_guided_step_matches_diffusers() {
    let refs = reference();
    let sd = tiny_sd1(&LoadOptions::default());
    let prompts = request(10).prompts();
    assert_eq!(
        prompts,
        [
            "blurry",
            "beikkpic a photo",
            "beikkpic a red circle on a blue background"
        ]
    );
    let [u, b, e] = [0, 1, 2].map(|i| sd.encode_prompt(&prompts[i]).unwrap().0);

    let mut scheduler = schedulers::build(SchedulerKind::Ddim, &sd.scheduler_config).unwrap();
    scheduler.set_timesteps(10).unwrap();
    let t = scheduler.timesteps()[3];
    assert_eq!(t as f32, refs["step_timestep"].to_vec1::<f32>().unwrap()[0]);
    let x = &refs["step_latents"];

    for (emb, key) in [(&u, "uncond"), (&b, "baseline"), (&e, "edit")] {
        let single = Guidance::new(GuidanceMode::Conditional, std::slice::from_ref(emb)).unwrap();
        let eps = single.noise_pred(&sd, scheduler.as_ref(), x, t).unwrap();
        let diff = max_diff(&eps, &refs[&format!("step_eps_{key}")]);
        assert!(diff <= 1e-5, "eps {key}: {diff}");
    }
    let cases = [
        (
            "cfg",
            GuidanceMode::ClassifierFree { scale: 7.5 },
            vec![u.clone(), e.clone()],
        ),
        (
            "prompt",
            GuidanceMode::Prompt { weight: 9.0 },
            vec![b.clone(), e.clone()],
        ),
        (
            "both",
            GuidanceMode::Combined {
                scale: 6.0,
                weight: 9.0,
            },
            vec![u, b, e],
        ),
    ];
    for (key, mode, embeddings) in cases {
        let guidance = Guidance::new(mode, &embeddings).unwrap();
        let guided = guidance.noise_pred(&sd, scheduler.as_ref(), x, t).unwrap();
        let diff = max_diff(&guided, &refs[&format!("step_guided_{key}")]);
        eprintln!("{key}: guided max abs diff {diff:e}");
        assert!(diff <= 1e-4, "guided {key}: {diff}");
        let prev = scheduler
            .step(&guided, t, x, &mut Noise::replay([]))
            .unwrap();
        let diff = max_diff(&prev, &refs[&format!("step_prev_{key}")]);
        eprintln!("{key}: DDIM step max abs diff {diff:e}");
        assert!(diff <= 1e-4, "step {key}: {diff}");
    }
    assert!(Guidance::new(
        GuidanceMode::Prompt { weight: 2.0 },
        std::slice::from_ref(x)
    )
    .is_err());
}

#[test]
fn whole_edits_match_the_reference_and_masks_keep_the_base() {
    let refs = reference();
    let sd = tiny_sd1(&LoadOptions::default());
    let base = EditBase::new(&sd, base_image()).unwrap();

    // Late start, both guidances, a mask and a per-step latent blend.
    let mut r = request(6);
    (r.start, r.guidance_scale, r.prompt_guidance, r.latent_blend) = (0.7, 6.0, 9.0, 0.1);
    r.mask = EditMask::Given(rectangle());
    r.feather = 8;
    let out = edit(
        &sd,
        &base,
        &r,
        &mut Noise::replay([refs["late_noise"].clone()]),
        &mut NoProgress,
    )
    .unwrap();
    let diff = max_diff(&out.sample, &refs["late_sample"]);
    eprintln!("late start + mask: sample max abs diff {diff:e}");
    assert!(diff <= 1e-4, "late start: {diff}");

    // Pixels past the feather are the base's; inside the mask, the sample's.
    let (image, sample) = (
        tensor_to_image(&out.image, 0).unwrap(),
        tensor_to_image(&out.sample, 0).unwrap(),
    );
    let outside = |x: usize, y: usize| !((8..48).contains(&x) && (0..40).contains(&y));
    assert_eq!(max_level_diff(&image, base.image(), outside), 0);
    let inside = |x: usize, y: usize| (16..40).contains(&x) && (8..32).contains(&y);
    assert_eq!(max_level_diff(&image, &sample, inside), 0);
    assert!(
        max_level_diff(&image, base.image(), inside) > 10,
        "the edit changed nothing in the mask"
    );
    assert_eq!(out.mask.unwrap(), rectangle().feathered(8));

    // From pure noise, prompt guidance alone.
    let mut r = request(3);
    (r.guidance_scale, r.prompt_guidance) = (1.0, 9.0);
    let out = edit(
        &sd,
        &base,
        &r,
        &mut Noise::replay([refs["noise_noise"].clone()]),
        &mut NoProgress,
    )
    .unwrap();
    let diff = max_diff(&out.sample, &refs["noise_sample"]);
    eprintln!("pure noise, prompt guidance: sample max abs diff {diff:e}");
    assert!(diff <= 1e-4, "pure noise: {diff}");
    assert_eq!(
        max_diff(&out.image, &out.sample),
        0.0,
        "no mask, no interpolation: the sample"
    );
}

/// Compared in latents: this fixture's random VAE has latents of about 0.05 and a decoder that
/// turns a 0.001 latent change into 18/255 (measured with diffusers), so no pixel tolerance is
/// meaningful here. With 50 DDIM steps, start 0.02 is one step from t = 1, whose noise std
/// sqrt(1 - alpha_cumprod) is 0.041, to the final alpha (0.029 is left, as set_alpha_to_one is
/// false): a mean distance of a few hundredths is the floor any start near 0 can reach.
#[test]
fn late_start_near_zero_returns_the_base_latents() {
    let sd = tiny_sd1(&LoadOptions::default());
    let base = EditBase::new(&sd, base_image()).unwrap();
    let distance = |start: f64| {
        let mut r = request(50);
        r.start = start;
        let out = edit(&sd, &base, &r, &mut Noise::seeded(3), &mut NoProgress).unwrap();
        let d = (&out.latents - base.latents()).unwrap().abs().unwrap();
        (
            d.mean_all().unwrap().to_scalar::<f32>().unwrap(),
            d.max_all().unwrap().to_scalar::<f32>().unwrap(),
        )
    };
    let (mean, max) = distance(0.02);
    eprintln!("start 0.02: latents from the base's: mean {mean:.4}, max {max:.4}");
    assert!(
        mean <= 0.05 && max <= 0.2,
        "start 0.02: mean {mean}, max {max}"
    );
    let (farther, _) = distance(0.1);
    let (farthest, _) = distance(1.0);
    assert!(
        mean < farther && farther < farthest,
        "{mean} {farther} {farthest}"
    );

    // A start that leaves no step is refused by name.
    let mut r = request(50);
    r.start = 0.01;
    let err = edit(&sd, &base, &r, &mut Noise::seeded(3), &mut NoProgress)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("start") && err.contains("no denoising step"),
        "{err}"
    );
}

#[test]
fn interpolation_and_latent_blend_of_one_return_the_base() {
    let sd = tiny_sd1(&LoadOptions::default());
    let base = EditBase::new(&sd, base_image()).unwrap();
    let mut r = request(4);
    r.interpolation = 1.0;
    let out = edit(&sd, &base, &r, &mut Noise::seeded(1), &mut NoProgress).unwrap();
    assert_eq!(tensor_to_image(&out.image, 0).unwrap(), *base.image());

    // Half way: the average of base and sample.
    r.interpolation = 0.5;
    let half = edit(&sd, &base, &r, &mut Noise::seeded(1), &mut NoProgress).unwrap();
    assert_eq!(
        max_diff(&half.sample, &out.sample),
        0.0,
        "same seed, same sample"
    );
    let mean = ((base.pixels() + &half.sample).unwrap() * 0.5).unwrap();
    assert!(max_diff(&half.image, &mean) <= 1e-6);

    // The per-step latent blend at 1 keeps the base's latents: the VAE round trip comes out.
    r.interpolation = 0.0;
    r.latent_blend = 1.0;
    let kept = edit(&sd, &base, &r, &mut Noise::seeded(1), &mut NoProgress).unwrap();
    assert_eq!(
        max_diff(&kept.sample, &sd.decode_latents(base.latents()).unwrap()),
        0.0
    );
}

#[test]
fn auto_mask_resamples_inside_the_region_the_edit_changed() {
    let sd = tiny_sd1(&LoadOptions::default());
    let base = EditBase::new(&sd, base_image()).unwrap();
    let params = AutoMask {
        threshold: 0.25,
        blur: 2,
        dilate: 2,
    };
    let mut r = request(4);
    (r.start, r.feather) = (0.5, 4);
    r.mask = EditMask::Auto(params);
    let auto = edit(&sd, &base, &r, &mut Noise::seeded(9), &mut NoProgress).unwrap();

    // The same by hand: an unmasked edit, its difference mask, a masked edit from the same seed.
    r.mask = EditMask::None;
    let unmasked = edit(&sd, &base, &r, &mut Noise::seeded(9), &mut NoProgress).unwrap();
    let found = Mask::from_difference(
        &tensor_to_image(&unmasked.sample, 0).unwrap(),
        base.image(),
        &params,
    )
    .unwrap();
    r.mask = EditMask::Given(found.clone());
    let by_hand = edit(&sd, &base, &r, &mut Noise::seeded(9), &mut NoProgress).unwrap();
    assert_eq!(max_diff(&auto.image, &by_hand.image), 0.0);
    let mask = auto.mask.unwrap();
    assert_eq!(mask, found.feathered(4));

    let changed = found.weights().iter().filter(|&&w| w == 1.0).count();
    eprintln!("auto mask: {changed} of {} pixels", found.weights().len());
    assert!(
        changed > 0 && changed < found.weights().len(),
        "the mask should be partial: {changed}"
    );
    let image = tensor_to_image(&auto.image, 0).unwrap();
    let untouched = |x: usize, y: usize| mask.weights()[y * 64 + x] == 0.0;
    assert!(max_level_diff(&image, base.image(), untouched) <= 2);
}

#[test]
fn edits_a_saved_tuned_session_and_refuses_bad_requests() {
    // Tune two steps, save, load into a fresh model: the session's deltas change the edit.
    let trainable = LoadOptions {
        trainable: Some(TrainableLayers::Most.filter()),
        ..LoadOptions::default()
    };
    let image = base_image();
    let session = {
        let sd = tiny_sd1(&trainable);
        let mut settings = TuneSettings::new(TOKEN, 0);
        (settings.steps, settings.batch_size, settings.learning_rate) = (2, 1, 1e-2);
        tune(
            &sd,
            &image,
            settings,
            &mut Noise::seeded(0),
            &mut NoProgress,
            &mut |_, _| Ok(()),
        )
        .unwrap()
    };
    let path = std::env::temp_dir().join(format!("unitune-edit-{}.session", std::process::id()));
    session
        .save(&path, unitune::session::DeltaEncoding::F32)
        .unwrap();
    let loaded = Session::load(&path).unwrap();
    std::fs::remove_file(&path).unwrap();

    let mut sd = tiny_sd1(&LoadOptions::default());
    let r = request(3);
    let before = edit(
        &sd,
        &EditBase::new(&sd, loaded.image.clone()).unwrap(),
        &r,
        &mut Noise::seeded(4),
        &mut NoProgress,
    )
    .unwrap();
    sd.apply_session(&loaded).unwrap();
    let base = EditBase::new(&sd, loaded.image.clone()).unwrap();
    let after = edit(&sd, &base, &r, &mut Noise::seeded(4), &mut NoProgress).unwrap();
    let again = edit(&sd, &base, &r, &mut Noise::seeded(4), &mut NoProgress).unwrap();
    assert!(
        max_diff(&before.image, &after.image) > 1e-3,
        "the tune did not change the edit"
    );
    assert_eq!(
        max_diff(&after.image, &again.image),
        0.0,
        "edits of one base are independent"
    );

    let refused = |change: &dyn Fn(&mut EditRequest), name: &str| {
        let mut bad = request(3);
        change(&mut bad);
        let err = edit(&sd, &base, &bad, &mut Noise::seeded(0), &mut NoProgress)
            .unwrap_err()
            .to_string();
        assert!(err.contains(name), "{name}: {err}");
    };
    refused(&|r| r.start = 0.0, "start");
    refused(&|r| r.start = 1.5, "start");
    refused(&|r| r.interpolation = -0.1, "interpolate");
    refused(&|r| r.latent_blend = 2.0, "latent-blend");
    refused(&|r| r.prompt_guidance = f64::NAN, "prompt-guidance");
    refused(
        &|r| r.mask = EditMask::Given(Mask::from_fn(32, 48, |_, _| 1.0)),
        "does not match",
    );
    refused(
        &|r| r.mask = EditMask::Given(Mask::from_fn(64, 48, |_, _| 0.0)),
        "no white pixel",
    );
    refused(
        &|r| {
            r.mask = EditMask::Auto(AutoMask {
                threshold: 0.0,
                ..AutoMask::default()
            })
        },
        "mask-threshold",
    );
    let odd = RgbImage::new(60, 48);
    assert!(EditBase::new(&sd, odd)
        .err()
        .unwrap()
        .to_string()
        .contains("multiple of 8"));
}
