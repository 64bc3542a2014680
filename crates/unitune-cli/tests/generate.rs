//! The real `unitune` binary, end to end: `generate --init-noise` reproduces diffusers' image, and
//! bad input is refused with a message naming the flag or file, without writing anything.

use std::path::{Path, PathBuf};
use std::process::Command;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

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

fn tempdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("unitune-cli-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn init_noise_reproduces_diffusers() {
    let out = tempdir("init-noise").join("out.png");
    let model = fixtures().join("tiny-sd1");
    let noise = fixtures().join("ref/sd1-init-noise.safetensors");
    let (ok, stderr) = unitune(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "a photo of a red circle on a blue background",
        "--negative-prompt",
        "blurry, low quality",
        "--steps",
        "8",
        "--guidance",
        "7.5",
        "--scheduler",
        "ddim",
        "--width",
        "64",
        "--height",
        "64",
        "--init-noise",
        noise.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    let ours = image::open(&out).unwrap().to_rgb8();
    let refs = candle_core::safetensors::load(
        fixtures().join("ref/pipelines.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let expected: Vec<f32> = refs["sd1_txt2img_image"]
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let max = ours
        .as_raw()
        .iter()
        .zip(&expected)
        .map(|(&a, &b)| (a as f32 - (b * 255.0).round()).abs())
        .fold(0.0, f32::max);
    assert!(max <= 3.0, "max diff {max}/255");
}

#[test]
fn bad_input_is_named_and_nothing_is_written() {
    let dir = tempdir("bad-input");
    let model = fixtures().join("tiny-sd1");
    let model = model.to_str().unwrap();
    let input = dir.join("in.png");
    std::fs::copy(fixtures().join("ref/img2img-input.png"), &input).unwrap();
    let before = std::fs::read(&input).unwrap();
    let input = input.to_str().unwrap();

    let (ok, err) = unitune(&[
        "generate", "--model", model, "--prompt", "x", "--image", input, "--output", input,
    ]);
    assert!(
        !ok && err.contains("--output") && err.contains("input image"),
        "{err}"
    );
    assert_eq!(std::fs::read(input).unwrap(), before, "input image changed");

    let out = dir.join("out.jpg");
    let (ok, err) = unitune(&[
        "generate",
        "--model",
        model,
        "--prompt",
        "x",
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("PNG"), "{err}");

    let out = dir.join("out.png");
    let (ok, err) = unitune(&[
        "generate",
        "--model",
        model,
        "--prompt",
        "x",
        "--width",
        "60",
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(
        !ok && err.contains("width") && err.contains("multiple of 8"),
        "{err}"
    );
    let (ok, err) = unitune(&[
        "generate",
        "--model",
        "/nonexistent/model",
        "--prompt",
        "x",
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(
        !ok && err.contains("/nonexistent/model") && err.contains("model_index.json"),
        "{err}"
    );
    let (ok, err) = unitune(&[
        "generate",
        "--model",
        model,
        "--prompt",
        "x",
        "--scheduler-option",
        "timestep_spacing=sideways",
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("timestep_spacing"), "{err}");
    let base = ["generate", "--model", model, "--prompt", "x", "--output"];
    let (ok, err) = unitune(&[&base[..], &[out.to_str().unwrap(), "--device", "gpu"]].concat());
    assert!(!ok && err.contains("--device gpu"), "{err}");
    let (ok, err) = unitune(&[&base[..], &[out.to_str().unwrap(), "--dtype", "bf16"]].concat());
    assert!(
        !ok && err.contains("--dtype bf16") && err.contains("cuda"),
        "{err}"
    );
    assert!(!out.exists(), "a failed run wrote its output");
}

/// The shipped model (used when no `--model` is given) draws what captions ask: in each picture
/// most pixels take the caption's background colour (nearest palette colour, either shade of a
/// pattern). The model is unpacked into a fresh cache folder, as on a new machine.
#[test]
fn builtin_model_draws_the_captions_background() {
    use unitune_lab::world::score::nearest_colour;
    use unitune_lab::world::Colour;
    let dir = tempdir("builtin");
    let cases = [
        ("a red circle on a blue background", Colour::Blue),
        (
            "a large green triangle on a white background",
            Colour::White,
        ),
        ("a small white star on a purple background", Colour::Purple),
        (
            "a blue circle below a red star on a yellow background",
            Colour::Yellow,
        ),
        (
            "a purple square on a checkered yellow background",
            Colour::Yellow,
        ),
    ];
    for (i, (prompt, background)) in cases.into_iter().enumerate() {
        let out = dir.join(format!("{i}.png"));
        let out_str = out.to_str().unwrap();
        let status = Command::new(env!("CARGO_BIN_EXE_unitune"))
            .env("XDG_CACHE_HOME", dir.join("cache"))
            .args([
                "generate",
                "--prompt",
                prompt,
                "--steps",
                "20",
                "--guidance",
                "4",
                "--seed",
                "0",
                "-o",
                out_str,
            ])
            .output()
            .unwrap();
        assert!(
            status.status.success(),
            "{}",
            String::from_utf8_lossy(&status.stderr)
        );
        let image = image::open(&out).unwrap().to_rgb8();
        let share = image
            .pixels()
            .filter(|p| nearest_colour(p.0, true).0 == background)
            .count() as f64
            / image.pixels().len() as f64;
        assert!(
            share > 0.5,
            "{prompt}: only {:.0}% of the pixels are {background:?}",
            100.0 * share
        );
    }
}

/// `--model` a single-file checkpoint, with `--config` the folder it was made from: the folder's
/// picture, byte for byte; a pickle, and the single-file flags with a folder, are refused by name.
#[test]
fn single_file_model_gives_the_folders_picture() {
    let dir = tempdir("single-file");
    let run = |model: &Path, extra: &[&str], out: &Path| {
        let mut args = vec!["generate", "--model", model.to_str().unwrap()];
        args.extend_from_slice(extra);
        args.extend_from_slice(&[
            "--prompt",
            "a photo of a red circle on a blue background",
            "--steps",
            "4",
            "--width",
            "64",
            "--height",
            "48",
            "--seed",
            "3",
            "--output",
            out.to_str().unwrap(),
        ]);
        unitune(&args)
    };
    for name in ["tiny-sd1", "tiny-sd2"] {
        let folder = fixtures().join(name);
        let file = fixtures().join(format!("{name}.safetensors"));
        let (a, b) = (
            dir.join(format!("{name}-folder.png")),
            dir.join(format!("{name}-file.png")),
        );
        let (ok, stderr) = run(&folder, &[], &a);
        assert!(ok, "{stderr}");
        let (ok, stderr) = run(&file, &["--config", folder.to_str().unwrap()], &b);
        assert!(ok, "{stderr}");
        let pixels = |p: &Path| image::open(p).unwrap().to_rgb8().into_raw();
        assert_eq!(pixels(&a), pixels(&b), "{name}");
    }

    let ckpt = dir.join("model.ckpt");
    std::fs::write(&ckpt, b"PK\x03\x04").unwrap();
    let (ok, stderr) = run(&ckpt, &[], &dir.join("ckpt.png"));
    assert!(
        !ok && stderr.contains("model.ckpt") && stderr.contains("safetensors only"),
        "{stderr}"
    );
    let folder = fixtures().join("tiny-sd1");
    let (ok, stderr) = run(
        &folder,
        &["--prediction-type", "epsilon"],
        &dir.join("flag.png"),
    );
    assert!(
        !ok && stderr.contains("prediction_type") && stderr.contains("single-file"),
        "{stderr}"
    );
    let (ok, stderr) = run(
        &folder,
        &["--prediction-type", "sample"],
        &dir.join("flag.png"),
    );
    assert!(
        !ok && stderr.contains("--prediction-type") && stderr.contains("v_prediction"),
        "{stderr}"
    );
    let missing = dir.join("missing.safetensors");
    let (ok, stderr) = run(&missing, &[], &dir.join("missing.png"));
    assert!(
        !ok && stderr.contains("missing.safetensors") && stderr.contains("No such file"),
        "{stderr}"
    );
    assert!(!dir.join("ckpt.png").exists() && !dir.join("flag.png").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}
