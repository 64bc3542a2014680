//! `pretrain` end to end at the tiny preset (16x16 world scenes, a few steps): the folder it writes
//! is a pipeline that loads and generates, exported weights load back to the same networks, and
//! an interrupted run resumes from its checkpoint.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use unitune::models::clip::ClipTextModel;
use unitune::models::unet::UNet2DConditionModel;
use unitune::models::vae::AutoencoderKl;
use unitune::noise::Noise;
use unitune::pipelines::{
    generate, GenerateRequest, LoadOptions, NoProgress, Progress, StableDiffusion,
};
use unitune::tokenizer::ClipTokenizer;
use unitune::weights::export::{write_pipeline, PipelineParts, SpecialTokenIds, TokenizerFiles};
use unitune::weights::WeightStore;
use unitune::Error;
use unitune_lab::pretrain::{
    self, pretrain, DataSource, Phase, Preset, PretrainSettings, TrainingState,
};

fn tempdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("unitune-pretrain-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn settings() -> PretrainSettings {
    PretrainSettings {
        size: 16,
        world_scenes: 16,
        vae_steps: 4,
        vae_batch_size: 2,
        vae_crop: 8,
        steps: 6,
        batch_size: 4,
        warmup_steps: 2,
        checkpoint_every: 3,
        ..PretrainSettings::new(Preset::Tiny)
    }
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn tensors(dir: &Path) -> HashMap<String, Tensor> {
    WeightStore::open(dir, None, &Device::Cpu)
        .unwrap()
        .tensors()
        .clone()
}

#[test]
fn tiny_pretrain_writes_a_pipeline_that_loads_and_generates() {
    let dir = tempdir("tiny");
    let state = pretrain(
        &dir,
        &DataSource::World,
        settings(),
        false,
        &Device::Cpu,
        &mut NoProgress,
    )
    .unwrap();
    assert_eq!(
        (state.phase, state.vae_step, state.step),
        (Phase::Done, 4, 6)
    );
    // The file holds the returned state (floats up to JSON's last-digit rounding).
    let saved = TrainingState::read(&dir).unwrap();
    assert_eq!(
        (saved.phase, saved.step, saved.loss.pending.1),
        (state.phase, state.step, 6)
    );
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-12 * b.abs();
    assert!(close(saved.loss.pending.0, state.loss.pending.0));
    assert!(close(
        saved.scaling_factor.unwrap(),
        state.scaling_factor.unwrap()
    ));
    let scale = state.scaling_factor.unwrap();
    assert!(scale.is_finite() && scale > 0.0, "{scale}");
    assert_eq!(state.loss.pending.1, 6);
    assert!(state.loss.latest(1).is_finite() && state.vae_l1.latest(1).is_finite());

    let sd = StableDiffusion::load(&dir, &LoadOptions::default()).unwrap();
    assert_eq!(sd.vae_config.scaling_factor, scale);
    assert_eq!(sd.vae_scale_factor(), 2);
    assert_eq!(sd.tokenizer.max_length(), 32);
    // The world's tokenizer: one token per grammar word.
    assert_eq!(
        sd.tokenizer
            .tokenize("a red circle on a blue background")
            .len(),
        7
    );
    let mut request = GenerateRequest::new("a red circle on a blue background");
    (
        request.width,
        request.height,
        request.num_inference_steps,
        request.guidance_scale,
    ) = (16, 16, 3, 3.0);
    let image = generate(&sd, &request, &mut Noise::seeded(1), &mut NoProgress).unwrap();
    assert_eq!(image.dims(), &[1, 3, 16, 16]);
    let values = image.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(values.iter().all(|v| v.is_finite()));
    let spread = values.iter().cloned().fold(f32::MIN, f32::max)
        - values.iter().cloned().fold(f32::MAX, f32::min);
    assert!(spread > 1e-3, "a constant image: {spread}");

    // A new run does not write over a training.
    let err = pretrain(
        &dir,
        &DataSource::World,
        settings(),
        false,
        &Device::Cpu,
        &mut NoProgress,
    )
    .unwrap_err();
    assert!(err.to_string().contains("--resume"), "{err}");
}

#[test]
fn exported_weights_load_back_to_the_same_networks() {
    let dir = tempdir("export");
    let tokenizer_dir = dir.with_extension("tokenizer");
    unitune_lab::world::write_tokenizer_files(&tokenizer_dir).unwrap();
    let tokenizer = ClipTokenizer::from_dir(&tokenizer_dir).unwrap();
    let mut arch = Preset::Tiny
        .architecture(16, tokenizer.vocab_size(), tokenizer.max_length())
        .unwrap();
    arch.vae.scaling_factor = 0.7;
    let device = Device::Cpu;
    let build = |new: &dyn Fn(VarBuilder) -> candle_core::Result<()>| {
        let varmap = VarMap::new();
        new(VarBuilder::from_varmap(&varmap, DType::F32, &device)).unwrap();
        let tensors: HashMap<String, Tensor> = varmap
            .data()
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect();
        tensors
    };
    let text = build(&|vb| ClipTextModel::new(vb, &arch.text_encoder).map(|_| ()));
    let vae = build(&|vb| AutoencoderKl::new(vb, &arch.vae).map(|_| ()));
    let unet = build(&|vb| UNet2DConditionModel::new(vb, &arch.unet).map(|_| ()));
    // The networks in memory, from those same tensors.
    let from = |t: &HashMap<String, Tensor>| {
        WeightStore::from_tensors("memory", t.clone()).var_builder(DType::F32, &device)
    };
    let text_model = ClipTextModel::new(from(&text), &arch.text_encoder).unwrap();
    let vae_model = AutoencoderKl::new(from(&vae), &arch.vae).unwrap();
    let unet_model = UNet2DConditionModel::new(from(&unet), &arch.unet).unwrap();

    let tokenizer_files = TokenizerFiles::read(&tokenizer_dir).unwrap();
    let scheduler = pretrain::scheduler_config();
    let parts = PipelineParts {
        text_encoder: (&arch.text_encoder, &text),
        special_tokens: SpecialTokenIds {
            bos: tokenizer.bos_id(),
            eos: tokenizer.eos_id(),
            pad: tokenizer.pad_id(),
        },
        vae: (&arch.vae, &vae),
        unet: (&arch.unet, &unet),
        scheduler: &scheduler,
        tokenizer: &tokenizer_files,
    };
    let prompt = "a small green star above a red ring on a dotted white background";
    let ids = Tensor::new(tokenizer.encode(prompt).ids, &device)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let expected_text = text_model.forward(&ids).unwrap();
    let latents = Noise::seeded(3).randn((2, 4, 8, 8), &device).unwrap();
    let timesteps = Tensor::new(&[10f32, 700.0], &device).unwrap();
    let context = expected_text.repeat((2, 1, 1)).unwrap();
    let expected_unet = unet_model.forward(&latents, &timesteps, &context).unwrap();
    let expected_image = vae_model.decode(&latents).unwrap();

    for (dtype, tolerance) in [(DType::F32, 0.0), (DType::F16, 2e-2)] {
        let out = dir.join(format!("{dtype:?}"));
        write_pipeline(&out, &parts, dtype).unwrap();
        let sd = StableDiffusion::load(&out, &LoadOptions::default()).unwrap();
        assert_eq!(sd.vae_config, arch.vae);
        assert_eq!(sd.unet_config, arch.unet);
        assert_eq!(sd.tokenizer.encode(prompt), tokenizer.encode(prompt));
        let (text_out, _) = sd.encode_prompt(prompt).unwrap();
        let unet_out = sd.unet.forward(&latents, &timesteps, &context).unwrap();
        let image = sd.vae.decode(&latents).unwrap();
        let diffs = [
            max_abs_diff(&text_out, &expected_text),
            max_abs_diff(&unet_out, &expected_unet),
            max_abs_diff(&image, &expected_image),
        ];
        assert!(
            diffs.iter().all(|d| *d <= tolerance),
            "{dtype:?}: text, unet, vae differ by {diffs:?}"
        );
        let stored = tensors(&out.join("unet"))["conv_in.weight"].dtype();
        assert_eq!(stored, dtype);
    }
}

/// Asks to stop once `after` steps (of any phase) are done.
struct StopAfter {
    after: usize,
    done: usize,
}

impl Progress for StopAfter {
    fn start(&mut self, _: &str, _: usize) {}
    fn step(&mut self, _: Option<&str>) {
        self.done += 1;
    }
    fn finish(&mut self) {}
    fn warn(&mut self, _: &str) {}
    fn cancelled(&self) -> bool {
        self.done >= self.after
    }
}

/// A run of `settings()` at its end: both phases done, every UNet step in its loss curve.
fn assert_finished(state: &TrainingState) {
    assert_eq!(
        (
            state.phase,
            state.vae_step,
            state.step,
            state.loss.pending.1
        ),
        (Phase::Done, 4, 6, 6)
    );
}

#[test]
fn an_interrupted_run_resumes_from_its_checkpoint() {
    let dir = tempdir("resume");
    let run = |settings: PretrainSettings, resume: bool, progress: &mut dyn Progress| {
        pretrain(
            &dir,
            &DataSource::World,
            settings,
            resume,
            &Device::Cpu,
            progress,
        )
    };
    // Stopped in the autoencoder phase: its checkpoint has no pipeline yet.
    let err = run(settings(), false, &mut StopAfter { after: 2, done: 0 }).unwrap_err();
    assert!(matches!(err, Error::Interrupted), "{err}");
    let saved = TrainingState::read(&dir).unwrap();
    assert_eq!(
        (saved.phase, saved.vae_step, saved.step),
        (Phase::Vae, 2, 0)
    );
    assert!(dir.join("vae/config.json").is_file() && !dir.join("model_index.json").exists());

    // Resumed, then stopped after 2 more autoencoder steps and 3 UNet steps.
    let err = run(settings(), true, &mut StopAfter { after: 5, done: 0 }).unwrap_err();
    assert!(matches!(err, Error::Interrupted), "{err}");
    let saved = TrainingState::read(&dir).unwrap();
    assert_eq!(
        (saved.phase, saved.vae_step, saved.step),
        (Phase::Denoiser, 4, 3)
    );
    assert_eq!((saved.vae_loss.pending.1, saved.loss.pending.1), (4, 3));
    let vae_before = tensors(&dir.join("vae"));

    // Another seed is another run.
    let err = run(
        PretrainSettings {
            seed: 9,
            ..settings()
        },
        true,
        &mut NoProgress,
    )
    .unwrap_err();
    assert!(err.to_string().contains("seed"), "{err}");

    // Resumed to the end, then extended by two steps.
    assert_finished(&run(settings(), true, &mut NoProgress).unwrap());
    let vae_after = tensors(&dir.join("vae"));
    for (name, t) in &vae_before {
        assert_eq!(
            max_abs_diff(t, &vae_after[name]),
            0.0,
            "the frozen autoencoder changed: {name}"
        );
    }
    let state = run(
        PretrainSettings {
            steps: 8,
            ..settings()
        },
        true,
        &mut NoProgress,
    )
    .unwrap();
    assert_eq!(
        (state.phase, state.step, state.loss.pending.1),
        (Phase::Done, 8, 8)
    );
    StableDiffusion::load(&dir, &LoadOptions::default()).unwrap();
}

/// The decoder's refinement, added with `--resume` to a finished run: the encoder (so every
/// latent the denoiser learnt) and the denoiser stay bit for bit, the decoder changes.
#[test]
fn refining_the_decoder_keeps_the_encoder_and_the_denoiser() {
    let dir = tempdir("decoder");
    let run = |settings: PretrainSettings, resume: bool| {
        pretrain(
            &dir,
            &DataSource::World,
            settings,
            resume,
            &Device::Cpu,
            &mut NoProgress,
        )
        .unwrap()
    };
    run(settings(), false);
    let (vae_before, unet_before) = (tensors(&dir.join("vae")), tensors(&dir.join("unet")));
    let state = run(
        PretrainSettings {
            decoder_steps: 5,
            ..settings()
        },
        true,
    );
    assert_eq!(
        (state.phase, state.step, state.decoder_step),
        (Phase::Done, 6, 5)
    );
    assert_eq!(state.decoder_loss.pending.1, 5);
    assert!(state.decoder_loss.latest(1).is_finite());
    assert_eq!(TrainingState::read(&dir).unwrap().decoder_step, 5);
    let vae_after = tensors(&dir.join("vae"));
    let mut decoder_changed = 0;
    for (name, before) in &vae_before {
        let diff = max_abs_diff(before, &vae_after[name]);
        if name.starts_with("decoder.") || name.starts_with("post_quant_conv.") {
            decoder_changed += usize::from(diff > 0.0);
        } else {
            assert_eq!(diff, 0.0, "{name} changed");
        }
    }
    assert!(decoder_changed > 0, "no decoder tensor changed");
    let unet_after = tensors(&dir.join("unet"));
    for (name, before) in &unet_before {
        assert_eq!(
            max_abs_diff(before, &unet_after[name]),
            0.0,
            "{name} changed"
        );
    }
    // The folder still loads as a pipeline.
    StableDiffusion::load(&dir, &LoadOptions::default()).unwrap();
}

/// `vae_from`: a new denoiser on another run's finished autoencoder, which it keeps bit for bit
/// along with that run's curves; it checkpoints and resumes as any run; an autoencoder still in
/// training or of other latents is refused.
#[test]
fn a_new_denoiser_trains_on_another_runs_autoencoder() {
    let (source, dir) = (tempdir("vae-source"), tempdir("vae-from"));
    let run =
        |out: &Path, settings: PretrainSettings, resume: bool, progress: &mut dyn Progress| {
            pretrain(
                out,
                &DataSource::World,
                settings,
                resume,
                &Device::Cpu,
                progress,
            )
        };
    let first = run(&source, settings(), false, &mut NoProgress).unwrap();
    let from = PretrainSettings {
        seed: 9,
        vae_from: Some(source.clone()),
        ..settings()
    };
    let err = run(
        &dir,
        from.clone(),
        false,
        &mut StopAfter { after: 2, done: 0 },
    )
    .unwrap_err();
    assert!(matches!(err, Error::Interrupted), "{err}");
    let saved = TrainingState::read(&dir).unwrap();
    assert_eq!(
        (saved.phase, saved.vae_step, saved.step),
        (Phase::Denoiser, 4, 2)
    );
    let state = run(&dir, from, true, &mut NoProgress).unwrap();
    assert_finished(&state);
    assert_eq!(state.vae_l1, first.vae_l1);
    assert_eq!(state.scaling_factor, first.scaling_factor);
    let (vae, vae_source) = (tensors(&dir.join("vae")), tensors(&source.join("vae")));
    assert_eq!(vae.len(), vae_source.len());
    for (name, t) in &vae_source {
        assert_eq!(max_abs_diff(t, &vae[name]), 0.0, "{name} changed");
    }
    let (unet, unet_source) = (tensors(&dir.join("unet")), tensors(&source.join("unet")));
    let differ = unet_source
        .iter()
        .filter(|(name, t)| max_abs_diff(t, &unet[*name]) > 0.0)
        .count();
    assert!(differ > unet.len() / 2, "{differ} of {} differ", unet.len());
    StableDiffusion::load(&dir, &LoadOptions::default()).unwrap();

    // The small preset's UNet works on 4x latents; the tiny autoencoder makes 2x ones.
    let other = tempdir("vae-from-other");
    let err = run(
        &other,
        PretrainSettings {
            preset: Preset::Small,
            vae_from: Some(source.clone()),
            ..settings()
        },
        false,
        &mut NoProgress,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("vae-from") && err.contains("1/2") && err.contains("1/4"),
        "{err}"
    );

    // A run stopped in its autoencoder phase has no autoencoder to give.
    let unfinished = tempdir("vae-unfinished");
    run(
        &unfinished,
        settings(),
        false,
        &mut StopAfter { after: 2, done: 0 },
    )
    .unwrap_err();
    let err = run(
        &other,
        PretrainSettings {
            vae_from: Some(unfinished.clone()),
            ..settings()
        },
        false,
        &mut NoProgress,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("still in training"), "{err}");
    assert!(!other.join("unet").exists());
}
