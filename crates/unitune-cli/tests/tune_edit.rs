//! The real binary, tune then edit: a short tune writes a session, an edit sweep over it writes
//! every image and a labelled contact sheet, and the input image is untouched.

use std::path::{Path, PathBuf};
use std::process::Command;

fn unitune(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_unitune"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn tune_then_sweep_edits() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
    let dir: PathBuf =
        std::env::temp_dir().join(format!("unitune-cli-tune-edit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let input = dir.join("photo.png");
    std::fs::copy(fixtures.join("ref/img2img-input.png"), &input).unwrap();
    let before = std::fs::read(&input).unwrap();
    let model = fixtures.join("tiny-sd1");
    let (model, input) = (model.to_str().unwrap(), input.to_str().unwrap());
    let session = dir.join("photo.session");
    let log = dir.join("steps.jsonl");

    let (ok, err) = unitune(&[
        "tune",
        "--model",
        model,
        "--image",
        input,
        "--steps",
        "3",
        "--batch",
        "2",
        "--seed",
        "1",
        "--log-json",
        log.to_str().unwrap(),
        "--output",
        session.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    assert!(lines
        .iter()
        .all(|l| l["loss"].as_f64().is_some_and(|v| v > 0.0)));
    // Seconds since the tune started, rising step by step.
    let seconds: Vec<f64> = lines
        .iter()
        .map(|l| l["seconds"].as_f64().unwrap())
        .collect();
    assert!(
        seconds[0] >= 0.0 && seconds.windows(2).all(|w| w[0] <= w[1]),
        "{seconds:?}"
    );

    let out = dir.join("edit.png");
    let (ok, err) = unitune(&[
        "edit",
        "--model",
        model,
        "--session",
        session.to_str().unwrap(),
        "--prompt",
        "a blue square",
        "--steps",
        "4",
        "--seed",
        "2",
        "--sweep-guidance",
        "3,6",
        "--sweep-start",
        "0.5,1.0",
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    for name in [
        "edit-g3-t0.5.png",
        "edit-g3-t1.png",
        "edit-g6-t0.5.png",
        "edit-g6-t1.png",
        "edit-sheet.png",
    ] {
        let path = dir.join(name);
        assert!(
            path.exists(),
            "{name} missing; files: {:?}",
            std::fs::read_dir(&dir)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect::<Vec<_>>()
        );
    }
    let cell = image::open(dir.join("edit-g3-t1.png")).unwrap();
    let sheet = image::open(dir.join("edit-sheet.png")).unwrap();
    assert!(sheet.width() > 2 * cell.width() && sheet.height() > 2 * cell.height());
    assert_eq!(std::fs::read(input).unwrap(), before, "input image changed");

    // A session applied to another model is refused by name.
    let other = fixtures.join("tiny-sd2");
    let (ok, err) = unitune(&[
        "edit",
        "--model",
        other.to_str().unwrap(),
        "--session",
        session.to_str().unwrap(),
        "--prompt",
        "x",
        "--output",
        dir.join("x.png").to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("another model"), "{err}");
}

/// A model folder's `unitune.json` gives `tune` and `edit` their defaults; flags still win, and
/// a typo in it is an error naming the file.
#[test]
fn a_model_folder_s_unitune_json_sets_the_defaults() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
    let dir = std::env::temp_dir().join(format!("unitune-cli-defaults-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let model = dir.join("model");
    unitune::weights::export::copy_tree(&fixtures.join("tiny-sd1"), &model, &|_| true).unwrap();
    std::fs::write(
        model.join("unitune.json"),
        r#"{"tune": {"steps": 2, "batch_size": 1, "learning_rate": 0.0005},
            "edit": {"num_inference_steps": 3, "start": 0.5, "auto_mask": true}}"#,
    )
    .unwrap();
    let input = fixtures.join("ref/img2img-input.png");
    let (model_arg, input) = (model.to_str().unwrap(), input.to_str().unwrap());
    let session = dir.join("photo.session");
    let log = dir.join("steps.jsonl");
    let (ok, err) = unitune(&[
        "tune",
        "--model",
        model_arg,
        "--image",
        input,
        "--seed",
        "1",
        "--log-json",
        log.to_str().unwrap(),
        "--output",
        session.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert_eq!(std::fs::read_to_string(&log).unwrap().lines().count(), 2);
    let tuned = unitune::session::Session::load(&session).unwrap();
    assert_eq!(
        (
            tuned.settings.steps,
            tuned.settings.batch_size,
            tuned.settings.learning_rate
        ),
        (2, 1, 5e-4)
    );

    let edit = |extra: &[&str], out: &Path| {
        let mut args = vec![
            "edit",
            "--model",
            model_arg,
            "--session",
            session.to_str().unwrap(),
            "--prompt",
            "a cat",
            "--seed",
            "3",
            "--output",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        unitune(&args)
    };
    let out = dir.join("edit.png");
    let (ok, err) = edit(&[], &out);
    assert!(ok, "{err}");
    assert!(err.contains("ddim 3 steps"), "{err}");
    assert!(
        dir.join("edit.mask.png").is_file(),
        "the model's auto mask was not used"
    );
    let plain = dir.join("plain.png");
    let (ok, err) = edit(&["--no-auto-mask", "--steps", "4"], &plain);
    assert!(ok, "{err}");
    assert!(err.contains("ddim 4 steps"), "{err}");
    assert!(!dir.join("plain.mask.png").exists());

    std::fs::write(model.join("unitune.json"), r#"{"edit": {"guidance": 3}}"#).unwrap();
    let (ok, err) = edit(&[], &dir.join("typo.png"));
    assert!(!ok);
    assert!(
        err.contains("unitune.json") && err.contains("guidance"),
        "{err}"
    );
}

/// A model whose `unitune.json` recommends a LoRA tune: `tune` writes the factors (the `lora`
/// code, a fraction of a whole-weight session's file), `--layers most` still tunes whole
/// weights despite the model's rank, and `export --format lora` writes the tune's own rank,
/// exactly.
#[test]
fn a_lora_tune_from_the_model_s_defaults_exports_exactly() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
    let dir = std::env::temp_dir().join(format!("unitune-cli-lora-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let model = dir.join("model");
    unitune::weights::export::copy_tree(&fixtures.join("tiny-sd1"), &model, &|_| true).unwrap();
    std::fs::write(
        model.join("unitune.json"),
        r#"{"tune": {"steps": 2, "batch_size": 1, "learning_rate": 0.01, "layers": "lora", "lora_rank": 3}}"#,
    )
    .unwrap();
    let input = fixtures.join("ref/img2img-input.png");
    let (model_arg, input) = (model.to_str().unwrap(), input.to_str().unwrap());
    let tune = |extra: &[&str], out: &Path| {
        let mut args = vec![
            "tune", "--model", model_arg, "--image", input, "--seed", "1",
        ];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["-o", out.to_str().unwrap()]);
        let (ok, err) = unitune(&args);
        assert!(ok, "{err}");
        unitune::session::Session::load(out).unwrap()
    };
    let (lora_path, whole_path) = (dir.join("lora.session"), dir.join("whole.session"));
    let lora = tune(&[], &lora_path);
    let whole = tune(&["--layers", "most"], &whole_path);
    assert_eq!(lora.settings.lora_rank, Some(3));
    assert_eq!(lora.settings.delta_encoding.name(), "lora");
    assert_eq!(
        (
            whole.settings.lora_rank,
            whole.settings.delta_encoding.name()
        ),
        (None, "q8")
    );
    let size = |p: &Path| std::fs::metadata(p).unwrap().len();
    assert!(
        size(&lora_path) < size(&whole_path),
        "{} vs {}",
        size(&lora_path),
        size(&whole_path)
    );

    let exported = dir.join("lora.safetensors");
    let (ok, err) = unitune(&[
        "export",
        "--model",
        model_arg,
        "--session",
        lora_path.to_str().unwrap(),
        "--format",
        "lora",
        "--output",
        exported.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(
        err.contains("rank-3 LoRA") && err.contains(" 0.0% relative error"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
