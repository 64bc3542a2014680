//! Single-file checkpoints end to end: the tiny fixtures as single files (written and checked
//! against diffusers' `from_single_file` by dev/make_single_file.py) give the folders' pictures,
//! a session tuned on a file applies to it and to its folder, and a file's tuned model exports
//! as a diffusers folder.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use unitune::image_io;
use unitune::noise::Noise;
use unitune::pipelines::{
    generate, GenerateRequest, LoadOptions, ModelSource, NoProgress, StableDiffusion,
};
use unitune::schedulers::SchedulerKind;
use unitune::session::DeltaEncoding;
use unitune::train::tune::{tune, TrainableLayers, TuneSettings};
use unitune::weights::single_file::SingleFileOptions;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// `file` read with the configs of the fixture folder `folder`.
fn options(folder: &str) -> LoadOptions {
    LoadOptions {
        single_file: SingleFileOptions {
            config: Some(fixtures().join(folder)),
            ..Default::default()
        },
        ..LoadOptions::default()
    }
}

fn picture(sd: &StableDiffusion, scheduler: SchedulerKind) -> Vec<f32> {
    let mut r = GenerateRequest::new("a photo of a red circle on a blue background");
    (r.width, r.height, r.num_inference_steps, r.guidance_scale) = (64, 48, 6, 7.5);
    r.scheduler = scheduler;
    let image = generate(sd, &r, &mut Noise::seeded(7), &mut NoProgress).unwrap();
    image.flatten_all().unwrap().to_vec1().unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn single_files_give_the_folders_pictures() {
    for (file, folder) in [
        ("tiny-sd1.safetensors", "tiny-sd1"),
        ("tiny-sd2.safetensors", "tiny-sd2"),
    ] {
        let from_folder =
            StableDiffusion::load(&fixtures().join(folder), &LoadOptions::default()).unwrap();
        let from_file = StableDiffusion::load(&fixtures().join(file), &options(folder)).unwrap();
        assert!(matches!(from_file.source, ModelSource::SingleFile(_)));
        for scheduler in [SchedulerKind::Ddim, SchedulerKind::EulerAncestral] {
            let (a, b) = (
                picture(&from_folder, scheduler),
                picture(&from_file, scheduler),
            );
            // The same weights, configs and tokenizer: the same picture, bit for bit.
            assert!(
                a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
                "{file} {scheduler:?}: differs by {}",
                max_diff(&a, &b)
            );
        }
    }
    // The f16 file holds the folder's weights rounded to f16; computed in f32, its picture is
    // the folder's within the rounding's effect (diffusers: 9.5e-4 on its own test picture).
    let folder = StableDiffusion::load(&fixtures().join("tiny-sd1"), &LoadOptions::default());
    let half = StableDiffusion::load(
        &fixtures().join("tiny-sd1-fp16.safetensors"),
        &options("tiny-sd1"),
    );
    let diff = max_diff(
        &picture(&folder.unwrap(), SchedulerKind::Ddim),
        &picture(&half.unwrap(), SchedulerKind::Ddim),
    );
    eprintln!("fp16 file: picture within {diff:.1e} of the folder's (range [-1, 1])");
    assert!(diff > 0.0 && diff < 5e-3, "{diff}");
}

#[test]
fn a_session_tuned_on_a_file_applies_to_it_and_exports_as_a_folder() {
    let file = fixtures().join("tiny-sd1.safetensors");
    let trainable = LoadOptions {
        trainable: Some(TrainableLayers::Most.filter()),
        ..options("tiny-sd1")
    };
    let sd = StableDiffusion::load(&file, &trainable).unwrap();
    let image = image_io::load_image(&fixtures().join("ref/tune-input.png")).unwrap();
    let settings = TuneSettings {
        steps: 2,
        batch_size: 1,
        learning_rate: 1e-3,
        delta_encoding: DeltaEncoding::F32,
        ..TuneSettings::new("beikkpic", 5)
    };
    let session = tune(
        &sd,
        &image,
        settings,
        &mut Noise::seeded(5),
        &mut NoProgress,
        &mut |_, _| Ok(()),
    )
    .unwrap();
    assert!(!session.deltas.is_empty());

    // The tuned UNet (its vars) on one input, against the session applied to a fresh load of the
    // file, and of the folder the file was made from (the same tensors, so the same fingerprint).
    let sample = Noise::seeded(11).randn((1, 4, 8, 8), &Device::Cpu).unwrap();
    let t = Tensor::new(&[700f32], &Device::Cpu).unwrap();
    let (text, _) = sd.encode_prompt("beikkpic a photo").unwrap();
    let tuned = sd.unet.forward(&sample, &t, &text).unwrap();
    let out = |sd: &StableDiffusion| -> Vec<f32> {
        let y = sd.unet.forward(&sample, &t, &text).unwrap();
        y.flatten_all().unwrap().to_vec1().unwrap()
    };
    let want: Vec<f32> = tuned.flatten_all().unwrap().to_vec1().unwrap();
    let mut from_file = StableDiffusion::load(&file, &options("tiny-sd1")).unwrap();
    let base = out(&from_file);
    let effect = max_diff(&base, &want);
    from_file.apply_session(&session).unwrap();
    let mut from_folder =
        StableDiffusion::load(&fixtures().join("tiny-sd1"), &LoadOptions::default()).unwrap();
    from_folder.apply_session(&session).unwrap();
    assert!(effect > 1e-4, "the tune hardly changed the UNet ({effect})");
    // The session (exact deltas) reproduces the tune up to f32 rounding.
    assert!(max_diff(&out(&from_file), &want) < 0.01 * effect);
    assert_eq!(out(&from_file), out(&from_folder));
    // Another model is refused.
    let mut other = StableDiffusion::load(
        &fixtures().join("tiny-sd2.safetensors"),
        &options("tiny-sd2"),
    )
    .unwrap();
    let err = other.apply_session(&session).unwrap_err().to_string();
    assert!(
        err.contains("tiny-sd2.safetensors") && err.contains("another model"),
        "{err}"
    );

    // Exported, the file's tuned model is a diffusers folder that loads like any other and holds
    // the session applied, exactly.
    let dir = std::env::temp_dir().join(format!("unitune-single-export-{}", std::process::id()));
    from_file.export_tuned(&session, &dir).unwrap();
    let exported = StableDiffusion::load(&dir, &LoadOptions::default()).unwrap();
    assert_eq!(exported.source, ModelSource::Folder);
    assert_eq!(out(&exported), out(&from_file));
    assert_eq!(exported.unet_config, from_file.unet_config);
    assert_eq!(
        picture(&exported, SchedulerKind::Ddim),
        picture(&from_file, SchedulerKind::Ddim)
    );
    for file in [
        "model_index.json",
        "tokenizer/vocab.json",
        "scheduler/scheduler_config.json",
    ] {
        assert!(dir.join(file).is_file(), "{file}");
    }
    let dtype = exported
        .unet_store
        .tensors()
        .values()
        .next()
        .unwrap()
        .dtype();
    assert_eq!(dtype, DType::F32);
    std::fs::remove_dir_all(&dir).unwrap();
}
