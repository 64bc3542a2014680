//! Parity with diffusers 0.42.1 on the runs dumped by dev/ref_schedulers.py, plus the API's
//! error paths.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use candle_core::{DType, Device, IndexOp, Tensor};
use serde::Deserialize;

use super::*;

fn fixture_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/ref")
        .join(name)
}

#[derive(Deserialize)]
struct Case {
    name: String,
    kind: String,
    config: String,
    steps: usize,
    start: Option<usize>,
    eta: f64,
    noise_draws: usize,
}

struct Fixture {
    cases: Vec<Case>,
    tensors: HashMap<String, Tensor>,
}

impl Fixture {
    fn load() -> Self {
        let cases = crate::error::read_json(&fixture_path("schedulers.json")).unwrap();
        let tensors =
            candle_core::safetensors::load(fixture_path("schedulers.safetensors"), &Device::Cpu)
                .unwrap();
        Fixture { cases, tensors }
    }

    fn get(&self, key: &str) -> &Tensor {
        self.tensors
            .get(key)
            .unwrap_or_else(|| panic!("fixture has no {key}"))
    }
}

/// Max abs difference within 1e-5, or 1e-6 of the reference's largest value where that is above
/// 10 (Euler samples start at sigma ~15; float32's spacing there is 1e-6).
fn assert_close(ours: &Tensor, reference: &Tensor, what: &str) -> f32 {
    assert_eq!(ours.shape(), reference.shape(), "{what}: shape");
    let ours = ours.to_dtype(DType::F32).unwrap();
    let diff = (&ours - reference)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap();
    let diff = diff.to_scalar::<f32>().unwrap();
    let scale = reference
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let tolerance = (1e-6 * scale).max(1e-5);
    assert!(
        diff <= tolerance,
        "{what}: max abs diff {diff} > {tolerance} (scale {scale})"
    );
    diff / tolerance
}

/// Runs one fixture case as a diffusers pipeline would and checks every intermediate; returns the
/// worst difference as a fraction of its tolerance.
fn run_case(fx: &Fixture, case: &Case) -> f32 {
    let name = &case.name;
    let config = SchedulerConfig::from_json_str(&case.config, Path::new(name)).unwrap();
    // DDIM's eta is a step argument in diffusers, a config override here.
    let config = config
        .with_overrides(&[("eta", &case.eta.to_string())])
        .unwrap();
    let kind = SchedulerKind::from_str(&case.kind).unwrap();
    let mut scheduler = build(kind, &config).unwrap();
    assert_eq!(scheduler.kind(), kind);
    scheduler.set_timesteps(case.steps).unwrap();
    let timesteps = scheduler.timesteps().to_vec();
    assert_eq!(
        timesteps,
        fx.get(&format!("{name}.timesteps"))
            .to_vec1::<f64>()
            .unwrap(),
        "{name}: timesteps"
    );
    let init_noise_sigma = fx
        .get(&format!("{name}.init_noise_sigma"))
        .to_vec1::<f64>()
        .unwrap()[0];
    assert_eq!(
        scheduler.init_noise_sigma() as f32,
        init_noise_sigma as f32,
        "{name}: init_noise_sigma"
    );

    let first = case.start.unwrap_or(0);
    let (x0, init_noise) = (fx.get("x0"), fx.get("init_noise"));
    let noised = scheduler
        .add_noise(x0, init_noise, timesteps[first])
        .unwrap();
    let mut worst = assert_close(
        &noised,
        fx.get(&format!("{name}.add_noise")),
        &format!("{name}: add_noise"),
    );
    let mut sample = match case.start {
        None => (init_noise * scheduler.init_noise_sigma()).unwrap(),
        Some(start) => {
            scheduler.set_begin_index(start);
            noised
        }
    };

    let step_noise = fx.get("step_noise");
    let mut noise =
        crate::noise::Noise::replay((0..case.noise_draws).map(|i| step_noise.i(i).unwrap()));
    let prev = fx.get(&format!("{name}.prev"));
    let scaled_ref = fx.tensors.get(&format!("{name}.scaled"));
    for (i, &t) in timesteps[first..].iter().enumerate() {
        let scaled = scheduler.scale_model_input(&sample, t).unwrap();
        let diff = match scaled_ref {
            Some(r) => assert_close(&scaled, &r.i(i).unwrap(), &format!("{name}: scaled {i}")),
            None => assert_close(
                &scaled,
                &sample,
                &format!("{name}: scale_model_input is the identity"),
            ),
        };
        worst = worst.max(diff);
        let model_output = fx.get("model_outputs").i(i).unwrap();
        sample = scheduler
            .step(&model_output, t, &sample, &mut noise)
            .unwrap();
        worst = worst.max(assert_close(
            &sample,
            &prev.i(i).unwrap(),
            &format!("{name}: step {i} (t = {t})"),
        ));
    }
    assert_eq!(
        prev.dim(0).unwrap(),
        timesteps.len() - first,
        "{name}: step count"
    );
    match noise {
        crate::noise::Noise::Replay(left) => {
            assert!(left.is_empty(), "{name}: {} noise draws unused", left.len())
        }
        crate::noise::Noise::Seeded(_) => unreachable!(),
    }
    worst
}

fn check_kind(kind: SchedulerKind) {
    let fx = Fixture::load();
    let cases: Vec<_> = fx.cases.iter().filter(|c| c.kind == kind.name()).collect();
    assert!(
        cases.len() >= 3,
        "{kind}: only {} fixture cases",
        cases.len()
    );
    for case in cases {
        let worst = run_case(&fx, case);
        eprintln!("{kind} {}: worst diff {worst:.2} of tolerance", case.name);
    }
}

#[test]
fn ddim_matches_diffusers() {
    check_kind(SchedulerKind::Ddim);
}

#[test]
fn ddpm_matches_diffusers() {
    check_kind(SchedulerKind::Ddpm);
}

#[test]
fn euler_matches_diffusers() {
    check_kind(SchedulerKind::Euler);
}

#[test]
fn euler_ancestral_matches_diffusers() {
    check_kind(SchedulerKind::EulerAncestral);
}

#[test]
fn dpm_solver_matches_diffusers() {
    check_kind(SchedulerKind::DpmSolverMultistep);
}

/// set_timesteps(n) for many n, each spacing. Where numpy's float arange gives diffusers one
/// timestep too many (trailing, n = 61: a last timestep of -1), we keep the n asked for.
#[test]
fn timesteps_match_diffusers_for_many_step_counts() {
    let fx = Fixture::load();
    let steps = fx.get("table.steps").to_vec1::<i64>().unwrap();
    for kind in [
        SchedulerKind::Ddim,
        SchedulerKind::Euler,
        SchedulerKind::DpmSolverMultistep,
    ] {
        for (spacing, key) in [
            (TimestepSpacing::Leading, "leading"),
            (TimestepSpacing::Trailing, "trailing"),
            (TimestepSpacing::Linspace, "linspace"),
        ] {
            let config = SchedulerConfig {
                beta_start: 0.00085,
                beta_end: 0.012,
                beta_schedule: BetaSchedule::ScaledLinear,
                steps_offset: 1,
                timestep_spacing: Some(spacing),
                ..Default::default()
            };
            let mut scheduler = build(kind, &config).unwrap();
            let table = fx
                .get(&format!("table.{}.{key}", kind.name()))
                .to_vec1::<f32>()
                .unwrap();
            let lengths = fx
                .get(&format!("table.{}.{key}.lengths", kind.name()))
                .to_vec1::<i64>()
                .unwrap();
            let mut offset = 0;
            for (&n, &len) in steps.iter().zip(&lengths) {
                let reference = &table[offset..offset + len as usize];
                offset += len as usize;
                scheduler.set_timesteps(n as usize).unwrap();
                let ours: Vec<f32> = scheduler.timesteps().iter().map(|&t| t as f32).collect();
                assert_eq!(ours.len(), n as usize, "{kind} {key} n={n}");
                assert_eq!(ours, reference[..n as usize], "{kind} {key} n={n}");
                if len != n {
                    assert_eq!(
                        (len, reference[n as usize..].to_vec()),
                        (n + 1, vec![-1.0]),
                        "{kind} {key} n={n}"
                    );
                }
            }
        }
    }
}

fn schedule(beta_schedule: BetaSchedule) -> NoiseSchedule {
    let (beta_start, beta_end) = match beta_schedule {
        BetaSchedule::ScaledLinear => (0.00085, 0.012),
        _ => (0.0001, 0.02),
    };
    NoiseSchedule::new(&SchedulerConfig {
        beta_schedule,
        beta_start,
        beta_end,
        ..Default::default()
    })
    .unwrap()
}

const SCHEDULES: [(BetaSchedule, &str); 3] = [
    (BetaSchedule::Linear, "linear"),
    (BetaSchedule::ScaledLinear, "scaled_linear"),
    (BetaSchedule::SquaredcosCapV2, "squaredcos_cap_v2"),
];

#[test]
fn alphas_cumprod_are_diffusers_float32_values_exactly() {
    let fx = Fixture::load();
    for (beta_schedule, key) in SCHEDULES {
        let reference = fx
            .get(&format!("alphas_cumprod.{key}"))
            .to_vec1::<f32>()
            .unwrap();
        let ours: Vec<f32> = schedule(beta_schedule)
            .alphas_cumprod()
            .iter()
            .map(|&a| a as f32)
            .collect();
        assert_eq!(ours, reference, "{key}");
    }
}

#[test]
fn squaredcos_betas_are_right_and_non_zero() {
    let fx = Fixture::load();
    let reference = fx.get("betas.squaredcos_cap_v2").to_vec1::<f32>().unwrap();
    let s = schedule(BetaSchedule::SquaredcosCapV2);
    let ours: Vec<f32> = s.betas().iter().map(|&b| b as f32).collect();
    assert_eq!(ours, reference);
    // The cosine schedule starts tiny, grows, and is capped at 0.999 at the very end.
    assert!(ours.iter().all(|&b| b > 0.0));
    assert!(
        ours[0] < 1e-4 && ours[500] > 1e-3,
        "{} {}",
        ours[0],
        ours[500]
    );
    assert_eq!(ours[999], 0.999);
    assert_eq!(s.num_train_timesteps(), 1000);
    assert_eq!(s.alphas()[10] as f32, 1.0 - s.betas()[10] as f32);
}

#[test]
fn training_add_noise_and_velocity_use_per_sample_timesteps() {
    let fx = Fixture::load();
    let (x0, noise) = (fx.get("train.x0"), fx.get("train.noise"));
    let timesteps_i64 = fx.get("train.timesteps");
    let timesteps_u32 = timesteps_i64.to_dtype(DType::U32).unwrap();
    for (beta_schedule, key) in SCHEDULES {
        let s = schedule(beta_schedule);
        for timesteps in [timesteps_i64, &timesteps_u32] {
            let noisy = s.add_noise(x0, noise, timesteps).unwrap();
            assert_close(
                &noisy,
                fx.get(&format!("train.{key}.noisy")),
                &format!("{key}: add_noise"),
            );
            let velocity = s.get_velocity(x0, noise, timesteps).unwrap();
            assert_close(
                &velocity,
                fx.get(&format!("train.{key}.velocity")),
                &format!("{key}: get_velocity"),
            );
        }
    }
    let s = schedule(BetaSchedule::Linear);
    let bad = Tensor::new(&[0i64, 1000, 3], &Device::Cpu).unwrap();
    assert!(matches!(
        s.add_noise(x0, noise, &bad),
        Err(Error::Argument { .. })
    ));
    let wrong_batch = Tensor::new(&[0i64, 1], &Device::Cpu).unwrap();
    assert!(matches!(
        s.add_noise(x0, noise, &wrong_batch),
        Err(Error::Argument { .. })
    ));
    let float = Tensor::new(&[0f32, 1., 2.], &Device::Cpu).unwrap();
    assert!(matches!(
        s.get_velocity(x0, noise, &float),
        Err(Error::Argument { .. })
    ));
}

#[test]
fn pred_original_sample_inverts_the_forward_process() {
    let fx = Fixture::load();
    let (x0, noise) = (fx.get("train.x0"), fx.get("train.noise"));
    let s = schedule(BetaSchedule::ScaledLinear);
    let batch = x0.dim(0).unwrap();
    for t in [1u32, 400, 999] {
        let timesteps = Tensor::new(vec![t; batch], &Device::Cpu).unwrap();
        let noisy = s.add_noise(x0, noise, &timesteps).unwrap();
        let velocity = s.get_velocity(x0, noise, &timesteps).unwrap();
        for (output, prediction) in [
            (noise, PredictionType::Epsilon),
            (&velocity, PredictionType::VPrediction),
            (x0, PredictionType::Sample),
        ] {
            let back = s
                .pred_original_sample(output, t as f64, &noisy, prediction)
                .unwrap();
            let err = (back - x0)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            // 1 / sqrt(alphas_cumprod) at t = 999 is about 15: f32 rounding grows with it.
            assert!(err < 2e-4, "t={t} {prediction:?}: {err}");
        }
    }
}

#[test]
fn kinds_parse_cli_and_class_names() {
    for (name, kind) in [
        ("ddim", SchedulerKind::Ddim),
        ("ddpm", SchedulerKind::Ddpm),
        ("euler", SchedulerKind::Euler),
        ("euler-a", SchedulerKind::EulerAncestral),
        ("dpm++", SchedulerKind::DpmSolverMultistep),
    ] {
        assert_eq!(SchedulerKind::from_str(name).unwrap(), kind);
        assert_eq!(kind.to_string(), name);
        // JSON (the server's API) spells them as the command line does.
        assert_eq!(serde_json::to_value(kind).unwrap(), name);
        assert_eq!(
            serde_json::from_value::<SchedulerKind>(name.into()).unwrap(),
            kind
        );
        assert_eq!(
            SchedulerKind::from_class_name(kind.class_name()),
            Some(kind)
        );
    }
    assert_eq!(
        SchedulerKind::from_class_name("EulerDiscreteScheduler"),
        Some(SchedulerKind::Euler)
    );
    assert_eq!(SchedulerKind::from_class_name("PNDMScheduler"), None);
    assert_eq!(SchedulerKind::from_class_name("LMSDiscreteScheduler"), None);
    assert!(
        matches!(SchedulerKind::from_str("pndm"), Err(Error::Argument { name, .. }) if name == "scheduler")
    );
}

fn config_field(err: Error) -> String {
    match err {
        Error::Config { field, .. } => field,
        other => panic!("expected a config error, got {other}"),
    }
}

#[test]
fn unsupported_options_are_config_errors_naming_the_field() {
    let d = SchedulerConfig::default();
    let cases: [(SchedulerKind, SchedulerConfig, &str); 10] = [
        (
            SchedulerKind::Ddim,
            SchedulerConfig {
                thresholding: true,
                ..d.clone()
            },
            "thresholding",
        ),
        (
            SchedulerKind::Ddpm,
            SchedulerConfig {
                variance_type: Some("learned_range".into()),
                ..d.clone()
            },
            "variance_type",
        ),
        (
            SchedulerKind::Euler,
            SchedulerConfig {
                use_karras_sigmas: true,
                ..d.clone()
            },
            "use_karras_sigmas",
        ),
        (
            SchedulerKind::Euler,
            SchedulerConfig {
                interpolation_type: "log_linear".into(),
                ..d.clone()
            },
            "interpolation_type",
        ),
        (
            SchedulerKind::EulerAncestral,
            SchedulerConfig {
                prediction_type: PredictionType::Sample,
                ..d.clone()
            },
            "prediction_type",
        ),
        (
            SchedulerKind::DpmSolverMultistep,
            SchedulerConfig {
                algorithm_type: "sde-dpmsolver++".into(),
                ..d.clone()
            },
            "algorithm_type",
        ),
        (
            SchedulerKind::DpmSolverMultistep,
            SchedulerConfig {
                solver_order: 3,
                ..d.clone()
            },
            "solver_order",
        ),
        (
            SchedulerKind::DpmSolverMultistep,
            SchedulerConfig {
                use_lu_lambdas: true,
                ..d.clone()
            },
            "use_lu_lambdas",
        ),
        (
            SchedulerKind::Ddim,
            SchedulerConfig {
                rescale_betas_zero_snr: true,
                ..d.clone()
            },
            "rescale_betas_zero_snr",
        ),
        (
            SchedulerKind::Ddpm,
            SchedulerConfig {
                trained_betas: Some(vec![0.1; 10]),
                ..d.clone()
            },
            "trained_betas",
        ),
    ];
    for (kind, config, field) in cases {
        assert_eq!(
            config_field(build(kind, &config).err().unwrap()),
            field,
            "{kind}"
        );
    }
    for kind in SchedulerKind::ALL {
        assert!(build(kind, &d).is_ok(), "{kind} with diffusers defaults");
    }
}

#[test]
fn bad_step_counts_and_timesteps_are_argument_errors() {
    let config = SchedulerConfig {
        num_train_timesteps: 50,
        ..Default::default()
    };
    let x = Tensor::zeros((1, 4, 2, 2), DType::F32, &Device::Cpu).unwrap();
    for kind in SchedulerKind::ALL {
        let mut s = build(kind, &config).unwrap();
        for steps in [0, 51] {
            let err = s.set_timesteps(steps).unwrap_err();
            assert!(
                matches!(&err, Error::Argument { name, .. } if name == "steps"),
                "{kind}: {err}"
            );
        }
        s.set_timesteps(50).unwrap();
        assert_eq!(s.timesteps().len(), 50, "{kind}");
        // 12.5 is in no schedule here: the integer schedulers reject it, Euler finds no index
        // (DPM-Solver, as diffusers, takes an unknown timestep for the last step).
        let mut noise = crate::noise::Noise::seeded(0);
        if kind != SchedulerKind::DpmSolverMultistep {
            let err = s.step(&x, 12.5, &x, &mut noise).unwrap_err();
            assert!(
                matches!(&err, Error::Argument { name, .. } if name == "timestep"),
                "{kind}: {err}"
            );
        }
        // A begin index past the end is an error, not a panic (DDIM and DDPM ignore it).
        s.set_begin_index(50);
        let t = s.timesteps()[0];
        let past_end = [
            s.scale_model_input(&x, t).err(),
            s.add_noise(&x, &x, t).err(),
            s.step(&x, t, &x, &mut noise).err(),
        ];
        let sigma_based = !matches!(kind, SchedulerKind::Ddim | SchedulerKind::Ddpm);
        let dpm = kind == SchedulerKind::DpmSolverMultistep;
        let expected = [sigma_based && !dpm, sigma_based, sigma_based];
        let got: Vec<bool> = past_end
            .iter()
            .map(|e| matches!(e, Some(Error::Argument { .. })))
            .collect();
        assert_eq!(got, expected, "{kind}: {past_end:?}");
    }
    let eta = SchedulerConfig {
        eta: -1.0,
        ..Default::default()
    };
    assert_eq!(
        config_field(build(SchedulerKind::Ddim, &eta).err().unwrap()),
        "eta"
    );
}
