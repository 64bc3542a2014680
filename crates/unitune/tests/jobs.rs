//! The job layer on the tiny SD1 fixture, as a front end uses it: a tune job resolves its defaults
//! and returns the session; an edit job reports its edits in order, equal to the pipeline's own
//! result; a cancelled job stops between steps having handed out only finished results.

use std::path::{Path, PathBuf};

use image::RgbImage;
use unitune::image_io::{self, tensor_to_image};
use unitune::jobs::{EditEvent, EditJob, Editor, TuneJob};
use unitune::noise::Noise;
use unitune::pipelines::{edit, EditBase, LoadOptions, NoProgress, Progress, StableDiffusion};
use unitune::Error;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn photo() -> RgbImage {
    image_io::load_image(&fixtures().join("ref/img2img-input.png")).unwrap()
}

/// A short tune of the 64x48 picture at 32x32.
fn tuned() -> (StableDiffusion, unitune::session::Session) {
    let job = TuneJob {
        steps: 2,
        batch_size: 1,
        width: Some(32),
        height: Some(32),
        seed: Some(3),
        ..TuneJob::default()
    };
    let options = LoadOptions {
        trainable: Some(job.trainable()),
        ..LoadOptions::default()
    };
    let mut sd = StableDiffusion::load(&fixtures().join("tiny-sd1"), &options).unwrap();
    let prepared = job.prepare(&sd, photo()).unwrap();
    assert_eq!(prepared.image.dimensions(), (32, 32));
    let mut steps = vec![];
    let session = prepared
        .run(&mut sd, &mut NoProgress, &mut |step, loss| {
            steps.push((step, loss));
            Ok(())
        })
        .unwrap();
    assert_eq!(steps.iter().map(|s| s.0).collect::<Vec<_>>(), [0, 1]);
    assert_eq!(
        session.losses,
        steps.iter().map(|s| s.1).collect::<Vec<_>>()
    );
    (sd, session)
}

#[test]
fn tune_job_resolves_defaults_and_checks_before_work() {
    let paper = TuneJob::default();
    assert_eq!(
        (paper.steps, paper.batch_size, paper.learning_rate),
        (128, 4, 1e-4)
    );
    let (sd, session) = tuned();
    // The default token is a made-up word of the model's tokenizer, and the seed is recorded.
    assert_eq!(session.token, "beikkpic");
    assert_eq!((session.settings.seed, session.settings.steps), (3, 2));
    assert_eq!(session.image.dimensions(), (32, 32));
    assert!(!session.deltas.is_empty());

    for (job, name) in [
        (
            TuneJob {
                learning_rate: f64::NAN,
                ..TuneJob::default()
            },
            "lr",
        ),
        (
            TuneJob {
                steps: 0,
                ..TuneJob::default()
            },
            "steps",
        ),
        (
            TuneJob {
                width: Some(12),
                ..TuneJob::default()
            },
            "width",
        ),
    ] {
        let err = job.prepare(&sd, photo()).unwrap_err().to_string();
        assert!(err.contains(name), "{name}: {err}");
    }
}

/// Records the events of a run as (kind, suffix) and the finished images.
#[derive(Default)]
struct Recorder {
    events: Vec<(&'static str, String)>,
    images: Vec<RgbImage>,
}

impl Recorder {
    fn on(&mut self, event: EditEvent) -> unitune::Result<()> {
        match event {
            EditEvent::Started {
                item, index, total, ..
            } => {
                assert!(index <= total);
                self.events.push(("started", item.suffix.clone()));
            }
            EditEvent::Finished { item, image, .. } => {
                self.events.push(("finished", item.suffix.clone()));
                self.images.push(image.clone());
            }
            EditEvent::Sheet { group, .. } => {
                self.events.push(("sheet", group.sheet.clone().unwrap()));
            }
        }
        Ok(())
    }
}

#[test]
fn edit_job_runs_its_plan_in_order_and_equals_the_pipeline() {
    let (sd, session) = tuned();
    let mut job = EditJob {
        seed: Some(11),
        sweep_start: vec![0.5, 1.0],
        ..EditJob::new(vec!["a red circle".into()])
    };
    job.request.num_inference_steps = 3;
    job.request.guidance_scale = 4.0;
    let groups = job.plan(11).unwrap();
    let editor = Editor::new(&sd, &session.token, session.image.clone()).unwrap();
    let mut recorder = Recorder::default();
    editor
        .run(&job, &groups, &mut NoProgress, &mut |e| recorder.on(e))
        .unwrap();
    let events: Vec<(&str, &str)> = recorder
        .events
        .iter()
        .map(|(k, s)| (*k, s.as_str()))
        .collect();
    assert_eq!(
        events,
        [
            ("started", "-t0.5"),
            ("finished", "-t0.5"),
            ("started", "-t1"),
            ("finished", "-t1"),
            ("sheet", "-sheet")
        ]
    );

    // The second edit is exactly the pipeline's edit with the same request and seed.
    let base = EditBase::new(&sd, session.image.clone()).unwrap();
    let request = job.request(&groups[0].items[1], &session.token);
    assert_eq!(request.prompt, "a red circle");
    let out = edit(
        &sd,
        &base,
        &request,
        &mut Noise::seeded(11),
        &mut NoProgress,
    )
    .unwrap();
    assert_eq!(recorder.images[1], tensor_to_image(&out.image, 0).unwrap());

    // A bad knob is refused before any edit runs.
    job.request.interpolation = 2.0;
    let mut recorder = Recorder::default();
    let err = editor
        .run(&job, &groups, &mut NoProgress, &mut |e| recorder.on(e))
        .unwrap_err();
    assert!(err.to_string().contains("interpolate"), "{err}");
    assert!(recorder.events.is_empty());
}

/// Asks to stop once `steps` denoising steps have been taken.
struct StopAfter {
    steps: usize,
}

impl Progress for StopAfter {
    fn start(&mut self, _: &str, _: usize) {}
    fn step(&mut self, _: Option<&str>) {
        self.steps = self.steps.saturating_sub(1);
    }
    fn finish(&mut self) {}
    fn warn(&mut self, _: &str) {}
    fn cancelled(&self) -> bool {
        self.steps == 0
    }
}

#[test]
fn a_cancelled_job_hands_out_only_finished_edits() {
    let (sd, session) = tuned();
    let mut job = EditJob {
        seeds: 2,
        ..EditJob::new(vec!["a red circle".into()])
    };
    job.request.num_inference_steps = 3;
    let groups = job.plan(1).unwrap();
    let editor = Editor::new(&sd, &session.token, session.image.clone()).unwrap();
    let mut recorder = Recorder::default();
    // Cancelled during the second edit: the first is handed out, the second never finishes.
    let err = editor
        .run(&job, &groups, &mut StopAfter { steps: 4 }, &mut |e| {
            recorder.on(e)
        })
        .unwrap_err();
    assert!(matches!(err, Error::Interrupted), "{err}");
    let finished: Vec<&str> = recorder
        .events
        .iter()
        .filter(|(k, _)| *k == "finished")
        .map(|(_, s)| s.as_str())
        .collect();
    assert_eq!(finished, ["-seed1"]);
}

/// Collects the previews a run shows.
struct Previews {
    every: usize,
    seen: Vec<(usize, (u32, u32))>,
}

impl Progress for Previews {
    fn start(&mut self, _: &str, _: usize) {}
    fn step(&mut self, _: Option<&str>) {}
    fn finish(&mut self) {}
    fn warn(&mut self, _: &str) {}
    fn preview_every(&self) -> Option<usize> {
        Some(self.every)
    }
    fn preview(&mut self, step: usize, image: &RgbImage) {
        self.seen.push((step, image.dimensions()));
    }
}

#[test]
fn previews_come_every_few_steps_at_the_pictures_size() {
    let (sd, session) = tuned();
    let mut job = EditJob::new(vec!["a red circle".into()]);
    job.request.num_inference_steps = 5;
    let groups = job.plan(2).unwrap();
    let editor = Editor::new(&sd, &session.token, session.image.clone()).unwrap();
    let mut previews = Previews {
        every: 2,
        seen: vec![],
    };
    let mut recorder = Recorder::default();
    editor
        .run(&job, &groups, &mut previews, &mut |e| recorder.on(e))
        .unwrap();
    // Steps 1 and 3 of 0..5; none at the last step, whose result follows.
    assert_eq!(previews.seen, [(1, (32, 32)), (3, (32, 32))]);
    // Asking for previews changes nothing in the result.
    let mut plain = Recorder::default();
    editor
        .run(&job, &groups, &mut NoProgress, &mut |e| plain.on(e))
        .unwrap();
    assert_eq!(plain.images, recorder.images);
}
