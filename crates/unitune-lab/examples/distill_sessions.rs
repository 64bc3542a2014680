//! Distils the cached sessions of a `bench-edits` run into a coarse grid (BENCHMARKS.md,
//! "Distilling the tune into the ±1 grid"), for a second run to edit with.
//!
//! A tune trained through the grid learns to denoise its picture under the token alone; the
//! edits sample it under other prompts. Here a student (the base weights plus a delta on the
//! grid, trained through it with the straight-through estimator, starting from the tuned delta)
//! learns to predict what the tuned model (the teacher, the session at full precision) predicts
//! on the picture's noised latents under several prompts: the token, the empty prompt and the
//! token followed by CAPTIONS captions of another world seed, each sample's prompt drawn in turn.
//!
//!     cargo run --release -p unitune-lab --example distill_sessions -- \
//!         MODEL TEACHERS OUT STEPS LR LEVELS CAPTIONS
//!
//! TEACHERS holds the `scene<i>-<hash>.unitune` files of a `bench-edits --sessions` run; each
//! is written to OUT under the name that `bench-edits --tune-delta-encoding f32
//! --delta-encoding q2 --sessions OUT` looks for (its settings say `f32`, its deltas are on the
//! grid, so the `q2` file holds them exactly).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use rand::{Rng, SeedableRng};
use unitune::noise::Noise;
use unitune::pipelines::{LoadOptions, StableDiffusion};
use unitune::schedulers::NoiseSchedule;
use unitune::session::{on_grid, DeltaEncoding, Session};
use unitune::train::OptimizerKind;
use unitune_lab::bench_edits::session_name;
use unitune_lab::world::{SceneConfig, World};

const USAGE: &str = "usage: distill_sessions MODEL TEACHERS OUT STEPS LR LEVELS CAPTIONS";

fn main() -> unitune::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [model, teachers, out, steps, lr, levels, captions] = args.as_slice() else {
        eprintln!("{USAGE}");
        std::process::exit(2);
    };
    let number = |s: &str| -> f64 {
        s.parse().unwrap_or_else(|_| {
            eprintln!("{USAGE}: `{s}` is not a number");
            std::process::exit(2)
        })
    };
    let (steps, lr) = (number(steps) as usize, number(lr));
    let (levels, captions) = (number(levels) as i32, number(captions) as u64);
    let (model, out) = (PathBuf::from(model), PathBuf::from(out));
    std::fs::create_dir_all(&out).map_err(|e| unitune::Error::io(&out, e))?;
    let world = World::new(SceneConfig::default(), 0x0d15_7111)?;
    let teachers = Path::new(teachers);
    let mut files: Vec<PathBuf> = std::fs::read_dir(teachers)
        .map_err(|e| unitune::Error::io(teachers, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "unitune"))
        .collect();
    files.sort();
    for path in files {
        let Some(scene) = path.file_name().and_then(|n| {
            n.to_str()?
                .strip_prefix("scene")?
                .split('-')
                .next()?
                .parse()
                .ok()
        }) else {
            continue;
        };
        let session = Session::load(&path)?;
        let mut teacher = StableDiffusion::load(&model, &LoadOptions::default())?;
        teacher.apply_session(&session)?;
        let trainable = Some(session.settings.layers.filter());
        let student = StableDiffusion::load(
            &model,
            &LoadOptions {
                trainable,
                ..Default::default()
            },
        )?;
        let token = &session.token;
        let mut prompts = vec![token.clone(), String::new()];
        prompts.extend((0..captions).map(|k| format!("{token} {}", world.sample(k).2)));
        let t0 = std::time::Instant::now();
        let (deltas, losses) = distill(
            &student, &teacher, &session, &prompts, steps, lr, levels, scene,
        )?;
        let mut distilled = Session { deltas, ..session };
        distilled.settings.delta_encoding = DeltaEncoding::F32;
        let target = out.join(session_name(scene as usize, &distilled.settings));
        distilled.save(&target, DeltaEncoding::F32)?;
        // The loss against the teacher, the mean of each eighth of the steps.
        let eighths: Vec<String> = losses
            .chunks(steps.div_ceil(8).max(1))
            .map(|c| format!("{:.5}", c.iter().sum::<f32>() / c.len() as f32))
            .collect();
        println!(
            "scene {scene}: {:.0} s, loss {} -> {}",
            t0.elapsed().as_secs_f64(),
            eighths.join(" "),
            target.display()
        );
    }
    Ok(())
}

/// The student's deltas on the grid after `steps` steps of batch 4, and the loss of each step;
/// `seed` seeds the noise.
#[allow(clippy::too_many_arguments)]
fn distill(
    student: &StableDiffusion,
    teacher: &StableDiffusion,
    session: &Session,
    prompts: &[String],
    steps: usize,
    lr: f64,
    levels: i32,
    seed: u64,
) -> unitune::Result<(BTreeMap<String, Tensor>, Vec<f32>)> {
    let base = student.unet_store.tensors();
    let vars = student.unet_store.trainable_vars();
    for (name, var) in &vars {
        let b = base[name].to_dtype(DType::F32)?;
        let w = match session.deltas.get(name) {
            Some(d) => (b + d)?,
            None => b,
        };
        var.set(&w)?;
    }
    let mut optimizer =
        OptimizerKind::Adafactor.build(vars.iter().map(|(_, v)| v.clone()).collect(), lr)?;
    let device = &student.device;
    let pixels = unitune::image_io::image_to_tensor(&session.image, device)?;
    let latents = student.scale_latents(&student.vae.encode(&pixels)?.mean)?;
    let latents = latents.detach().repeat((4, 1, 1, 1))?;
    let texts = prompts
        .iter()
        .map(|p| Ok(student.encode_prompt(p)?.0.detach()))
        .collect::<unitune::Result<Vec<_>>>()?;
    let schedule = NoiseSchedule::new(&student.scheduler_config)?;
    // The draws of the runs in BENCHMARKS.md.
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(session.settings.seed ^ 0x0d15_7111);
    let mut noise = Noise::seeded(seed);
    let mut losses = Vec::with_capacity(steps);
    for step in 0..steps {
        let n = schedule.num_train_timesteps() as u32;
        let t: Vec<u32> = (0..4).map(|_| rng.gen_range(0..n)).collect();
        let t = Tensor::new(t, device)?;
        let text: Vec<Tensor> = (0..4)
            .map(|i| texts[(step * 4 + i) % texts.len()].clone())
            .collect();
        let text = Tensor::cat(&text, 0)?;
        let eps = noise.randn(latents.shape(), device)?;
        let noisy = schedule.add_noise(&latents, &eps, &t)?;
        let t = t.to_dtype(DType::F32)?;
        let target = teacher.unet.forward(&noisy, &t, &text)?.detach();
        // The forward pass sees the delta on the grid; the gradient updates the unrounded one.
        let mut unrounded = Vec::with_capacity(vars.len());
        for (name, var) in &vars {
            let w = var.as_tensor().copy()?;
            var.set(&(&base[name] + on_grid(&(&w - &base[name])?, levels)?)?)?;
            unrounded.push(w);
        }
        let (pred, backward) = student.unet.forward_train(&noisy, &t, &text)?;
        let loss = (pred - &target)?.sqr()?.mean_all()?;
        let grads = backward.backward(&loss)?;
        for ((_, var), w) in vars.iter().zip(unrounded) {
            var.set(&w)?;
        }
        optimizer.step(&grads)?;
        losses.push(loss.to_scalar::<f32>()?);
    }
    let mut deltas = BTreeMap::new();
    for (name, var) in &vars {
        let d = on_grid(&(var.as_tensor() - &base[name])?, levels)?;
        if d.abs()?.max_all()?.to_scalar::<f32>()? > 0.0 {
            deltas.insert(name.clone(), d);
        }
    }
    Ok((deltas, losses))
}
