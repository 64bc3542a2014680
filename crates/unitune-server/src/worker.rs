//! The worker: one thread per device that runs jobs through the library's job layer, turning
//! progress into job events. It keeps the base model loaded, and the UNets of the last few
//! sessions used (an LRU), so that an edit of a session just tuned or just edited starts at
//! once. In `unitune serve` it takes jobs from this process's [`Queue`]; in `unitune worker` from
//! NATS (`crate::nats::worker`), through the same [`Worker::tune`] and [`Worker::edit`].

use std::cell::Cell;
use std::sync::Arc;
use std::time::Instant;

use base64::Engine;
use image::RgbImage;
use serde_json::{json, Value};
use unitune::jobs::{EditEvent, EditJob, Editor, TuneJob};
use unitune::models::unet::UNet2DConditionModel;
use unitune::pipelines::{LoadOptions, Progress, StableDiffusion};
use unitune::session::Session;
use unitune::{Error, Result};

use crate::config::WorkerConfig;
use crate::params::EditParams;
use crate::queue::{Job, JobState, Queue, Work};
use crate::store::{now, png_bytes, EditImage, EditMeta, Records, SessionMeta};

/// Longest side of a preview image sent to the page.
const PREVIEW_SIDE: u32 = 256;

/// A job as the worker running it sees it: where its events go, and whether it was cancelled.
pub trait Running {
    fn emit(&self, kind: &'static str, data: Value);
    fn cancelled(&self) -> bool;
}

impl Running for Job {
    fn emit(&self, kind: &'static str, data: Value) {
        Job::emit(self, kind, data)
    }

    fn cancelled(&self) -> bool {
        self.cancel_requested()
    }
}

/// How a job ended, as its last event says.
pub fn outcome(result: &Result<()>) -> (&'static str, Value, JobState) {
    match result {
        Ok(()) => ("done", json!({}), JobState::Done),
        Err(Error::Interrupted) => ("cancelled", json!({}), JobState::Cancelled),
        Err(e) => (
            "error",
            json!({ "message": e.to_string() }),
            JobState::Failed,
        ),
    }
}

pub struct Worker {
    config: WorkerConfig,
    store: Arc<dyn Records>,
    /// The base model; its UNet is swapped for the session's before each edit.
    sd: StableDiffusion,
    /// Tuned UNets (and pictures) by session id, least recently used first.
    loaded: Vec<(String, UNet2DConditionModel, RgbImage)>,
}

impl Worker {
    /// Loads the base model (so that a bad `--model` fails before the server starts).
    pub fn new(config: WorkerConfig, store: Arc<dyn Records>) -> Result<Self> {
        let sd = StableDiffusion::load(&config.model, &load_options(&config, None))?;
        Ok(Self {
            config,
            store,
            sd,
            loaded: vec![],
        })
    }

    /// The size sessions are tuned at: the model's own.
    pub fn native_size(&self) -> Result<(usize, usize)> {
        self.sd.default_size(None, None, None)
    }

    /// The sessions whose UNets are loaded, most recently used last.
    pub fn loaded(&self) -> Vec<String> {
        self.loaded.iter().map(|(id, _, _)| id.clone()).collect()
    }

    /// Runs jobs until the queue is closed.
    pub fn run(mut self, queue: Arc<Queue>) {
        while let Some(job) = queue.next() {
            let started = Instant::now();
            job.emit("started", json!({ "kind": job.kind }));
            let result = match job.take_work() {
                Some(Work::Tune {
                    image,
                    name,
                    job: tune,
                    ..
                }) => self.tune(&*job, &job.session, image, &name, &tune),
                Some(Work::Edit { job: edits, params }) => {
                    let edit = job.edit.clone().expect("edit jobs have a record");
                    self.edit(&*job, &job.session, &edit, &edits, *params)
                }
                None => Err(Error::Interrupted),
            };
            let (kind, data, state) = outcome(&result);
            job.emit(kind, data);
            queue.finish(&job, state, started);
        }
    }

    /// Tunes `image` into the session `id` and stores it.
    pub fn tune(
        &mut self,
        job: &dyn Running,
        id: &str,
        image: RgbImage,
        name: &str,
        tune: &TuneJob,
    ) -> Result<()> {
        let options = load_options(&self.config, Some(tune));
        let mut sd = StableDiffusion::load(&self.config.model, &options)?;
        let prepared = tune.prepare(&sd, image)?;
        let loss = Cell::new(None);
        let mut progress = JobProgress::new(job, &loss, None);
        let session = prepared.run(&mut sd, &mut progress, &mut |_, l| {
            loss.set(Some(l));
            Ok(())
        })?;
        let (width, height) = session.image.dimensions();
        let meta = SessionMeta {
            id: id.to_string(),
            created: now(),
            name: name.to_string(),
            token: session.token.clone(),
            width,
            height,
            settings: session.settings.clone(),
            losses: session.losses.clone(),
        };
        self.store.save_session(&meta, &session)?;
        self.remember(&meta.id, sd.unet, session.image.clone());
        job.emit("session", json!(meta));
        Ok(())
    }

    /// Makes the edits of the record `edit` of session `id`, storing each image as it comes.
    pub fn edit(
        &mut self,
        job: &dyn Running,
        id: &str,
        edit: &str,
        edits: &EditJob,
        params: EditParams,
    ) -> Result<()> {
        let session = self
            .store
            .session(id)
            .ok_or_else(|| Error::argument("session", "was deleted"))?;
        let mut record = EditMeta {
            id: edit.to_string(),
            session: session.id.clone(),
            created: now(),
            status: "running".into(),
            params,
            images: vec![],
            sheets: vec![],
            error: None,
        };
        self.store.write_edit(&record)?;
        let result = self.run_edits(job, edits, &session, &mut record);
        record.status = match &result {
            Ok(()) => "done",
            Err(Error::Interrupted) => "cancelled",
            Err(_) => "failed",
        }
        .into();
        record.error = result.as_ref().err().map(|e| e.to_string());
        self.store.write_edit(&record)?;
        result
    }

    fn run_edits(
        &mut self,
        job: &dyn Running,
        edits: &EditJob,
        session: &SessionMeta,
        record: &mut EditMeta,
    ) -> Result<()> {
        let (cached, picture) = self.load_session(&session.id)?;
        job.emit("loaded", json!({ "cached": cached }));
        let groups = edits.plan(edits.seed.unwrap_or(0))?;
        let editor = Editor::new(&self.sd, &session.token, picture)?;
        let loss = Cell::new(None);
        let mut progress = JobProgress::new(job, &loss, Some(self.config.limits.preview_every));
        let base = format!("/api/sessions/{}/edits/{}", record.session, record.id);
        let store = &self.store;
        editor.run(edits, &groups, &mut progress, &mut |event| {
            match event {
                EditEvent::Started {
                    index,
                    total,
                    prompt,
                    ..
                } => job.emit(
                    "edit",
                    json!({ "index": index, "total": total, "prompt": prompt }),
                ),
                EditEvent::Finished { item, image, .. } => {
                    let n = record.images.len();
                    let file = format!("{n}.png");
                    store.save_edit_image(record, &file, image)?;
                    record.images.push(EditImage {
                        suffix: item.suffix.clone(),
                        prompt: edits.prompts[item.prompt].clone(),
                        seed: item.seed,
                        guidance: item.guidance,
                        start: item.start,
                        file,
                    });
                    store.write_edit(record)?;
                    let url = format!("{base}/images/{n}");
                    job.emit(
                        "image",
                        json!({ "index": n, "url": url, "image": record.images[n] }),
                    );
                }
                EditEvent::Sheet { image, .. } => {
                    let n = record.sheets.len();
                    let file = format!("sheet-{n}.png");
                    store.save_edit_image(record, &file, image)?;
                    record.sheets.push(file);
                    store.write_edit(record)?;
                    job.emit(
                        "sheet",
                        json!({ "index": n, "url": format!("{base}/sheets/{n}") }),
                    );
                }
            }
            Ok(())
        })
    }

    /// Puts the session's tuned UNet into the model; returns whether it was still loaded, and
    /// the session's picture.
    fn load_session(&mut self, id: &str) -> Result<(bool, RgbImage)> {
        if let Some(i) = self.loaded.iter().position(|(s, _, _)| s == id) {
            let entry = self.loaded.remove(i);
            self.sd.unet = entry.1.clone();
            let picture = entry.2.clone();
            self.loaded.push(entry);
            return Ok((true, picture));
        }
        let session: Session = self.store.load_session(id)?;
        self.sd.apply_session(&session)?;
        self.remember(id, self.sd.unet.clone(), session.image.clone());
        Ok((false, session.image))
    }

    fn remember(&mut self, id: &str, unet: UNet2DConditionModel, picture: RgbImage) {
        self.loaded.retain(|(s, _, _)| s != id);
        self.loaded.push((id.to_string(), unet, picture));
        let keep = self.config.limits.loaded_sessions.max(1);
        if self.loaded.len() > keep {
            self.loaded.drain(..self.loaded.len() - keep);
        }
    }
}

fn load_options(config: &WorkerConfig, tune: Option<&TuneJob>) -> LoadOptions {
    LoadOptions {
        device: config.device.clone(),
        dtype: config.dtype,
        variant: None,
        trainable: tune.map(TuneJob::trainable),
        single_file: config.single_file.clone(),
    }
}

/// A job's progress as events: `progress` (phase, step, total, loss, ETA), `preview`, `warning`;
/// cancelled when the job is.
struct JobProgress<'a> {
    job: &'a dyn Running,
    loss: &'a Cell<Option<f32>>,
    preview_every: Option<usize>,
    phase: String,
    step: usize,
    total: usize,
    started: Instant,
}

impl<'a> JobProgress<'a> {
    fn new(
        job: &'a dyn Running,
        loss: &'a Cell<Option<f32>>,
        preview_every: Option<usize>,
    ) -> Self {
        Self {
            job,
            loss,
            preview_every,
            phase: String::new(),
            step: 0,
            total: 0,
            started: Instant::now(),
        }
    }

    fn report(&self) {
        let elapsed = self.started.elapsed().as_secs_f64();
        let eta =
            (self.step > 0).then(|| elapsed / self.step as f64 * (self.total - self.step) as f64);
        self.job.emit(
            "progress",
            json!({
                "phase": self.phase,
                "step": self.step,
                "total": self.total,
                "loss": self.loss.get(),
                "eta_s": eta,
            }),
        );
    }
}

impl Progress for JobProgress<'_> {
    fn start(&mut self, label: &str, total: usize) {
        (self.phase, self.total, self.step) = (label.to_string(), total, 0);
        self.started = Instant::now();
        self.report();
    }

    fn step(&mut self, _: Option<&str>) {
        self.step += 1;
        self.report();
    }

    fn finish(&mut self) {}

    fn warn(&mut self, text: &str) {
        self.job.emit("warning", json!({ "message": text }));
    }

    fn cancelled(&self) -> bool {
        self.job.cancelled()
    }

    fn preview_every(&self) -> Option<usize> {
        self.preview_every
    }

    fn preview(&mut self, step: usize, image: &RgbImage) {
        self.job.emit(
            "preview",
            json!({ "phase": self.phase, "step": step, "image": data_url(image) }),
        );
    }
}

/// A small PNG of `image` as a data URL.
fn data_url(image: &RgbImage) -> String {
    let (w, h) = image.dimensions();
    let scale = (PREVIEW_SIDE as f64 / w.max(h) as f64).min(1.0);
    let small = image::imageops::thumbnail(
        image,
        ((w as f64 * scale) as u32).max(1),
        ((h as f64 * scale) as u32).max(1),
    );
    format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(png_bytes(&small))
    )
}
