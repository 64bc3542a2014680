//! Interruption at any point loses nothing: `tune`, `edit`, `generate` and `pretrain` on the tiny
//! fixture are stopped by SIGINT (Ctrl-C) and, separately, by SIGKILL at pseudo-random points of
//! their work, several times each. After every stop the output is either the older file of the
//! same name, untouched, or a complete new one (never half a file); a SIGINT leaves no temporary
//! file, and a SIGKILL's temporary file (it cannot clean up) is hidden and removed by the next run.
//! A killed `pretrain` that saved a checkpoint resumes with `--resume` to a model that loads.
//!
//! The points are fractions of an uninterrupted run's duration, so they spread over loading,
//! working and writing on any machine; what is asserted holds wherever the signal lands.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use std::os::unix::process::ExitStatusExt;

const STOPS_PER_SIGNAL: usize = 5;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn tempdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("unitune-interrupt-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn unitune(args: &[String]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_unitune"));
    command
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    command
}

/// Runs to the end; returns how long it took.
fn run_whole(args: &[String]) -> Duration {
    let start = Instant::now();
    let out = unitune(args).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    start.elapsed()
}

#[derive(Clone, Copy, Debug)]
enum Stop {
    Int,
    Kill,
}

/// Starts the command, sends `stop` after `delay`, and returns how it ended.
fn run_stopped(args: &[String], stop: Stop, delay: Duration) -> ExitStatus {
    let mut child = unitune(args).stderr(Stdio::null()).spawn().unwrap();
    std::thread::sleep(delay);
    match stop {
        Stop::Int => {
            // Ignored if it has finished already.
            let _ = Command::new("kill")
                .args(["-INT", &child.id().to_string()])
                .status();
        }
        Stop::Kill => {
            let _ = child.kill();
        }
    }
    child.wait().unwrap()
}

/// Fractions in (0.05, 1.05) of a run's duration, from a fixed seed: early, mid-work and the
/// moment of writing all get their turn across the runs (past 1: the run may have finished).
fn fractions(seed: u64) -> impl Iterator<Item = f64> {
    let mut state = seed;
    std::iter::repeat_with(move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        0.05 + (state >> 11) as f64 / (1u64 << 53) as f64
    })
}

/// How a stopped run may end: finished, stopped by its Ctrl-C handler (130), or killed by the
/// signal itself (SIGINT before the handler is installed). Never a panic (101) or an error (1).
fn check_status(status: ExitStatus, stop: Stop, what: &str) {
    let ok = match stop {
        Stop::Int => matches!(status.code(), Some(0 | 130)) || status.signal() == Some(2),
        Stop::Kill => status.code() == Some(0) || status.signal() == Some(9),
    };
    assert!(ok, "{what}: {stop:?} ended with {status:?}");
}

/// The files in `dir` other than the expected ones; after SIGKILL a hidden temporary file of an
/// expected output is allowed (the process could not remove it).
fn stray_files(dir: &Path, expected: &[&str], stop: Stop) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| !expected.contains(&name.as_str()))
        .filter(|name| {
            let hidden_temp = expected
                .iter()
                .any(|e| name.starts_with(&format!(".{e}.")) && name.ends_with(".tmp"));
            !(matches!(stop, Stop::Kill) && hidden_temp)
        })
        .collect()
}

/// Stops `args` (which write `output` in `dir`) several times with each signal; `valid` tells a
/// complete output. Returns the number of stopped runs.
fn stop_many_times(
    what: &str,
    dir: &Path,
    args: &[String],
    output: &str,
    inputs: &[&str],
    valid: fn(&Path) -> bool,
) -> usize {
    let path = dir.join(output);
    // The second of two whole runs: the first also warms the file cache.
    run_whole(args);
    let span = run_whole(args);
    let mut expected: Vec<&str> = inputs.to_vec();
    expected.push(output);
    let mut runs = 0;
    let mut points = fractions(what.len() as u64);
    for stop in [Stop::Int, Stop::Kill] {
        for _ in 0..STOPS_PER_SIGNAL {
            // A marker older output: it must stay as it is or be replaced by a whole new file.
            std::fs::write(&path, b"older output").unwrap();
            let delay = span.mul_f64(points.next().unwrap());
            let status = run_stopped(args, stop, delay);
            check_status(status, stop, what);
            let now = std::fs::read(&path).unwrap();
            assert!(
                now == b"older output" || valid(&path),
                "{what}: {stop:?} after {delay:?} left a partial {output}"
            );
            let stray = stray_files(dir, &expected, stop);
            assert!(
                stray.is_empty(),
                "{what}: {stop:?} after {delay:?} left {stray:?}"
            );
            let kept = if now == b"older output" {
                "older output kept"
            } else {
                "new output whole"
            };
            eprintln!("{what}: {stop:?} after {delay:?} of {span:?}: {status}, {kept}");
            runs += 1;
        }
    }
    // A run after the kills removes their temporary files.
    run_whole(args);
    assert!(valid(&path));
    let stray = stray_files(dir, &expected, Stop::Int);
    assert!(
        stray.is_empty(),
        "{what}: temporary files left after a whole run: {stray:?}"
    );
    runs
}

fn is_png(path: &Path) -> bool {
    image::open(path).is_ok()
}

fn is_session(path: &Path) -> bool {
    unitune::session::Session::load(path).is_ok()
}

fn s(args: &[&str]) -> Vec<String> {
    args.iter().map(|a| a.to_string()).collect()
}

/// The tiny model and a photo in `dir`.
fn inputs(dir: &Path) -> (String, String) {
    let photo = dir.join("photo.png");
    std::fs::copy(fixtures().join("ref/tune-input.png"), &photo).unwrap();
    let model = fixtures().join("tiny-sd1");
    (
        model.to_string_lossy().into_owned(),
        photo.to_string_lossy().into_owned(),
    )
}

#[test]
fn stopped_tune_keeps_the_older_session_or_writes_a_whole_one() {
    let dir = tempdir("tune");
    let (model, photo) = inputs(&dir);
    let out = dir.join("photo.session");
    let args = s(&[
        "tune",
        "--model",
        &model,
        "--image",
        &photo,
        "--steps",
        "12",
        "--batch",
        "1",
        "--seed",
        "3",
        "-o",
        out.to_str().unwrap(),
    ]);
    let photo_before = std::fs::read(&photo).unwrap();
    let runs = stop_many_times(
        "tune",
        &dir,
        &args,
        "photo.session",
        &["photo.png"],
        is_session,
    );
    assert_eq!(runs, 2 * STOPS_PER_SIGNAL);
    assert_eq!(std::fs::read(&photo).unwrap(), photo_before);
}

#[test]
fn stopped_edit_and_generate_keep_the_older_image_or_write_a_whole_one() {
    let dir = tempdir("edit");
    let (model, photo) = inputs(&dir);
    let session = dir.join("photo.session");
    run_whole(&s(&[
        "tune",
        "--model",
        &model,
        "--image",
        &photo,
        "--steps",
        "1",
        "--batch",
        "1",
        "--seed",
        "1",
        "-o",
        session.to_str().unwrap(),
    ]));
    let out = dir.join("out.png");
    let edit = s(&[
        "edit",
        "--model",
        &model,
        "--session",
        session.to_str().unwrap(),
        "--prompt",
        "a red square",
        "--steps",
        "16",
        "--seed",
        "2",
        "-o",
        out.to_str().unwrap(),
    ]);
    let inputs = ["photo.png", "photo.session"];
    stop_many_times("edit", &dir, &edit, "out.png", &inputs, is_png);
    let generate = s(&[
        "generate",
        "--model",
        &model,
        "--prompt",
        "a red square",
        "--image",
        &photo,
        "--strength",
        "0.9",
        "--steps",
        "20",
        "--seed",
        "4",
        "-o",
        out.to_str().unwrap(),
    ]);
    stop_many_times("generate", &dir, &generate, "out.png", &inputs, is_png);
}

#[test]
fn killed_pretrain_resumes_from_its_last_checkpoint() {
    let dir = tempdir("pretrain");
    let out = dir.join("model");
    let args = |resume: bool| {
        let mut a = s(&[
            "pretrain",
            "--output",
            out.to_str().unwrap(),
            "--preset",
            "tiny",
            "--size",
            "16",
            "--world-scenes",
            "16",
            "--vae-steps",
            "4",
            "--vae-batch",
            "2",
            "--vae-crop",
            "8",
            "--steps",
            "6",
            "--batch",
            "2",
            "--warmup",
            "2",
            "--checkpoint-every",
            "2",
        ]);
        if resume {
            a.push("--resume".into());
        }
        a
    };
    run_whole(&args(false));
    let _ = std::fs::remove_dir_all(&out);
    let span = run_whole(&args(false));
    let mut points = fractions(7);
    for stop in [Stop::Int, Stop::Kill] {
        for _ in 0..STOPS_PER_SIGNAL {
            let _ = std::fs::remove_dir_all(&out);
            let delay = span.mul_f64(points.next().unwrap());
            let status = run_stopped(&args(false), stop, delay);
            check_status(status, stop, "pretrain");
            // The folder is always a whole checkpoint (or absent); resume from it, or start
            // again when it never got to one.
            let resumable = out.join("training_state.json").is_file();
            run_whole(&args(resumable));
            eprintln!(
                "pretrain: {stop:?} after {delay:?} of {span:?}: {status}, resumed: {resumable}"
            );
            let sd = unitune::pipelines::StableDiffusion::load(&out, &Default::default());
            assert!(
                sd.is_ok(),
                "pretrain {stop:?} after {delay:?}: {:?}",
                sd.err()
            );
            let leftovers: Vec<_> = std::fs::read_dir(&dir)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .filter(|n| n != "model")
                .collect();
            assert!(
                leftovers.is_empty(),
                "pretrain {stop:?}: left {leftovers:?}"
            );
        }
    }
}
