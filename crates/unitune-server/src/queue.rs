//! The job queue: one worker per device takes jobs in order; the queue is bounded, so a full one
//! answers "try again later" (HTTP 429 with Retry-After) instead of growing without end.
//!
//! Each job keeps its events in order (queued, started, progress, preview, image, done / error /
//! cancelled), numbered from 0, so that a client that connects late, or reconnects with
//! `Last-Event-ID`, reads every event it missed; a client that goes away leaves the job running
//! and holds nothing. A job is cancelled in the queue at once, or while running at the next step.
//! Finished jobs are remembered (the last [`KEPT_FINISHED`]) so their events can still be read.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

use futures_util::stream::{self, BoxStream, StreamExt};
use image::RgbImage;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::watch;
use unitune::jobs::{EditJob, TuneJob};

use crate::params::{EditParams, TuneParams};

/// Finished jobs whose events stay readable.
const KEPT_FINISHED: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Queued,
    Running,
    Done,
    Failed,
    Cancelled,
}

impl JobState {
    pub fn finished(self) -> bool {
        matches!(self, Self::Done | Self::Failed | Self::Cancelled)
    }
}

/// What a job does.
pub enum Work {
    Tune {
        image: RgbImage,
        name: String,
        job: Box<TuneJob>,
        /// What `job` was made from, with its seed drawn: another machine makes the same job.
        params: Box<TuneParams>,
    },
    Edit {
        job: Box<EditJob>,
        params: Box<EditParams>,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Event {
    /// Increases along a job's events (`Last-Event-ID`).
    pub seq: u64,
    pub kind: String,
    pub data: Value,
}

impl Event {
    /// The kinds after which a job sends nothing more.
    pub fn is_last(&self) -> bool {
        matches!(self.kind.as_str(), "done" | "error" | "cancelled")
    }
}

pub struct Job {
    pub id: String,
    /// `tune` or `edit`.
    pub kind: &'static str,
    pub session: String,
    /// The edit record an edit job writes.
    pub edit: Option<String>,
    work: Mutex<Option<Work>>,
    state: Mutex<JobState>,
    events: Mutex<Vec<Event>>,
    changed: watch::Sender<u64>,
    cancel: AtomicBool,
}

impl Job {
    pub fn new(kind: &'static str, session: &str, edit: Option<String>, work: Work) -> Self {
        Self {
            id: crate::store::new_id(),
            kind,
            session: session.to_string(),
            edit,
            work: Mutex::new(Some(work)),
            state: Mutex::new(JobState::Queued),
            events: Mutex::new(vec![]),
            changed: watch::Sender::new(0),
            cancel: AtomicBool::new(false),
        }
    }

    /// Appends an event and wakes the clients that follow the job.
    pub fn emit(&self, kind: &'static str, data: Value) {
        let mut events = lock(&self.events);
        let seq = events.last().map_or(0, |e| e.seq + 1);
        events.push(Event {
            seq,
            kind: kind.into(),
            data,
        });
        self.changed.send_replace(seq + 1);
    }

    /// The events numbered `from` on.
    pub fn events_from(&self, from: u64) -> Vec<Event> {
        lock(&self.events)
            .iter()
            .filter(|e| e.seq >= from)
            .cloned()
            .collect()
    }

    pub fn state(&self) -> JobState {
        *lock(&self.state)
    }

    pub fn cancel_requested(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }

    pub fn take_work(&self) -> Option<Work> {
        lock(&self.work).take()
    }

    /// The job as the API lists it.
    pub fn summary(&self, position: Option<usize>) -> Value {
        summary(
            &self.id,
            self.kind,
            self.state(),
            position,
            &self.session,
            self.edit.as_deref(),
        )
    }

    fn set_state(&self, state: JobState) {
        *lock(&self.state) = state;
    }

    /// Previews are for watching a job run; once it is over they are dropped to free memory.
    fn drop_previews(&self) {
        lock(&self.events).retain(|e| e.kind != "preview");
    }
}

/// A job as the API hands it to the queue.
pub struct NewJob {
    pub job: Job,
    /// The client's `Idempotency-Key`: a second submission with the same key gets the first
    /// one's job instead of a new one.
    pub key: Option<String>,
}

/// Why a job was not queued.
pub enum SubmitError {
    /// The queue is full: retry after this many seconds.
    Full { retry_after: u64 },
    /// The queue cannot be reached.
    Unavailable(String),
}

/// A job's events, ending after its last.
pub type EventStream = BoxStream<'static, Event>;

/// Where the API's jobs go: this process's own worker ([`Queue`]), or NATS JetStream and the
/// workers behind it (`crate::nats::NatsQueue`).
pub trait JobQueue: Send + Sync {
    /// Queues a job; returns its summary (for a repeated idempotency key, the first job's).
    fn submit(&self, job: NewJob) -> Result<Value, SubmitError>;
    /// The job's summary, with its place in the queue while it waits.
    fn get(&self, id: &str) -> Option<Value>;
    /// The running jobs and the queued ones, in order.
    fn active(&self) -> Vec<Value>;
    /// Whether a job of `session` waits or runs (it must not be deleted under it).
    fn busy_with(&self, session: &str) -> bool;
    /// Cancels a queued job at once, a running one at its next step; returns the state after.
    fn cancel(&self, id: &str) -> Option<JobState>;
    /// The job's events numbered above `after` (all when `None`).
    fn events(&self, id: &str, after: Option<u64>) -> Option<EventStream>;
    /// Stops taking jobs and cancels the ones not finished.
    fn close(&self);
}

/// A job as the API lists it.
pub fn summary(
    id: &str,
    kind: &str,
    state: JobState,
    position: Option<usize>,
    session: &str,
    edit: Option<&str>,
) -> Value {
    json!({
        "id": id,
        "kind": kind,
        "state": state,
        "position": position,
        "session": session,
        "edit": edit,
        "events": format!("/api/jobs/{id}/events"),
    })
}

/// The queue was full.
pub struct Full {
    /// Seconds after which a retry is likely to be taken.
    pub retry_after: u64,
}

/// Idempotency keys remembered.
const KEPT_KEYS: usize = 4096;

/// This process's queue, for its own worker thread.
pub struct Queue {
    inner: Mutex<Inner>,
    ready: Condvar,
    capacity: usize,
}

struct Inner {
    pending: VecDeque<Arc<Job>>,
    running: Option<Arc<Job>>,
    all: HashMap<String, Arc<Job>>,
    finished: VecDeque<String>,
    /// Idempotency key -> job id, oldest first.
    keys: VecDeque<(String, String)>,
    /// Mean seconds of the jobs run so far, for Retry-After.
    mean_seconds: f64,
    runs: u32,
    closed: bool,
}

impl Queue {
    pub fn new(capacity: usize) -> Self {
        Self {
            inner: Mutex::new(Inner {
                pending: VecDeque::new(),
                running: None,
                all: HashMap::new(),
                finished: VecDeque::new(),
                keys: VecDeque::new(),
                mean_seconds: 5.0,
                runs: 0,
                closed: false,
            }),
            ready: Condvar::new(),
            capacity,
        }
    }

    /// Queues `job`, or refuses it when `capacity` jobs already wait.
    pub fn push(&self, job: Job) -> Result<Arc<Job>, Full> {
        self.push_locked(&mut lock(&self.inner), job)
    }

    fn push_locked(&self, inner: &mut Inner, job: Job) -> Result<Arc<Job>, Full> {
        if inner.pending.len() >= self.capacity {
            let waiting = inner.pending.len() as f64 + 1.0;
            return Err(Full {
                retry_after: (inner.mean_seconds * waiting).ceil().clamp(1.0, 3600.0) as u64,
            });
        }
        let job = Arc::new(job);
        inner.pending.push_back(job.clone());
        inner.all.insert(job.id.clone(), job.clone());
        job.emit("queued", json!({ "position": inner.pending.len() }));
        self.ready.notify_one();
        Ok(job)
    }

    pub fn job(&self, id: &str) -> Option<Arc<Job>> {
        lock(&self.inner).all.get(id).cloned()
    }

    fn position(inner: &Inner, id: &str) -> Option<usize> {
        inner.pending.iter().position(|j| j.id == id).map(|i| i + 1)
    }

    /// Cancels a queued job at once, a running one at its next step; returns the state after.
    pub fn cancel_job(&self, id: &str) -> Option<JobState> {
        let mut inner = lock(&self.inner);
        let job = inner.all.get(id)?.clone();
        match job.state() {
            JobState::Queued => {
                inner.pending.retain(|j| j.id != job.id);
                job.take_work();
                Self::close_job(&mut inner, &job, JobState::Cancelled);
                job.emit("cancelled", json!({}));
                Self::announce_positions(&inner);
            }
            JobState::Running => job.cancel.store(true, Ordering::SeqCst),
            _ => {}
        }
        Some(job.state())
    }

    /// The next job to run, waiting for one; `None` once the queue is closed.
    pub fn next(&self) -> Option<Arc<Job>> {
        let mut inner = lock(&self.inner);
        loop {
            if inner.closed {
                return None;
            }
            if let Some(job) = inner.pending.pop_front() {
                job.set_state(JobState::Running);
                inner.running = Some(job.clone());
                Self::announce_positions(&inner);
                return Some(job);
            }
            inner = self
                .ready
                .wait(inner)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
    }

    /// Records the end of the running job.
    pub fn finish(&self, job: &Arc<Job>, state: JobState, started: Instant) {
        let mut inner = lock(&self.inner);
        inner.running = None;
        let seconds = started.elapsed().as_secs_f64();
        inner.runs += 1;
        inner.mean_seconds += (seconds - inner.mean_seconds) / inner.runs.min(20) as f64;
        Self::close_job(&mut inner, job, state);
    }

    /// Stops the worker after its current job.
    pub fn close_queue(&self) {
        lock(&self.inner).closed = true;
        self.ready.notify_all();
    }

    fn close_job(inner: &mut Inner, job: &Arc<Job>, state: JobState) {
        job.set_state(state);
        job.drop_previews();
        inner.finished.push_back(job.id.clone());
        while inner.finished.len() > KEPT_FINISHED {
            if let Some(old) = inner.finished.pop_front() {
                inner.all.remove(&old);
            }
        }
    }

    /// Tells every waiting job its new place.
    fn announce_positions(inner: &Inner) {
        for (i, job) in inner.pending.iter().enumerate() {
            job.emit("queued", json!({ "position": i + 1 }));
        }
    }
}

impl JobQueue for Queue {
    fn submit(&self, new: NewJob) -> Result<Value, SubmitError> {
        let mut inner = lock(&self.inner);
        if let Some(key) = &new.key {
            let earlier = inner.keys.iter().find(|(k, _)| k == key);
            if let Some(job) = earlier.and_then(|(_, id)| inner.all.get(id)) {
                return Ok(job.summary(Self::position(&inner, &job.id)));
            }
        }
        let job = self
            .push_locked(&mut inner, new.job)
            .map_err(|full| SubmitError::Full {
                retry_after: full.retry_after,
            })?;
        if let Some(key) = new.key {
            inner.keys.push_back((key, job.id.clone()));
            if inner.keys.len() > KEPT_KEYS {
                inner.keys.pop_front();
            }
        }
        Ok(job.summary(Self::position(&inner, &job.id)))
    }

    fn get(&self, id: &str) -> Option<Value> {
        let inner = lock(&self.inner);
        let job = inner.all.get(id)?;
        Some(job.summary(Self::position(&inner, id)))
    }

    fn active(&self) -> Vec<Value> {
        let inner = lock(&self.inner);
        let running = inner.running.iter().map(|j| j.summary(None));
        let queued = inner
            .pending
            .iter()
            .enumerate()
            .map(|(i, j)| j.summary(Some(i + 1)));
        running.chain(queued).collect()
    }

    fn busy_with(&self, session: &str) -> bool {
        let inner = lock(&self.inner);
        let mut active = inner.pending.iter().chain(inner.running.iter());
        active.any(|j| j.session == session)
    }

    fn cancel(&self, id: &str) -> Option<JobState> {
        self.cancel_job(id)
    }

    fn events(&self, id: &str, after: Option<u64>) -> Option<EventStream> {
        let job = self.job(id)?;
        let from = after.map_or(0, |last| last + 1);
        let changed = job.changed.subscribe();
        let batches = stream::unfold(
            (job, changed, from, false),
            |(job, mut changed, from, ended)| async move {
                if ended {
                    return None;
                }
                loop {
                    let events = job.events_from(from);
                    if let Some(last) = events.last() {
                        let (next, ended) = (last.seq + 1, last.is_last());
                        return Some((events, (job, changed, next, ended)));
                    }
                    if job.state().finished() || changed.changed().await.is_err() {
                        return None;
                    }
                }
            },
        );
        Some(batches.flat_map(stream::iter).boxed())
    }

    fn close(&self) {
        self.close_queue();
        let ids: Vec<String> = {
            let inner = lock(&self.inner);
            let active = inner.pending.iter().chain(inner.running.iter());
            active.map(|j| j.id.clone()).collect()
        };
        for id in ids {
            self.cancel_job(&id);
        }
    }
}

/// Locks, carrying on past a panic elsewhere: the data behind these locks stays consistent.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn edit_job() -> Job {
        let work = Work::Edit {
            job: Box::new(EditJob::new(vec!["x".into()])),
            params: Box::default(),
        };
        Job::new("edit", "0000000000000000", None, work)
    }

    #[test]
    fn a_full_queue_refuses_and_cancelling_frees_a_place() {
        let queue = Queue::new(2);
        let a = queue.push(edit_job()).ok().unwrap();
        let b = queue.push(edit_job()).ok().unwrap();
        let full = queue.push(edit_job()).err().unwrap();
        assert!(full.retry_after >= 1);
        assert_eq!(queue.cancel(&a.id), Some(JobState::Cancelled));
        assert!(a.take_work().is_none());
        // b moved up to the first place and was told so.
        let kinds: Vec<(String, Value)> = b
            .events_from(0)
            .into_iter()
            .map(|e| (e.kind, e.data))
            .collect();
        assert_eq!(
            kinds.last().unwrap(),
            &("queued".into(), json!({"position": 1}))
        );
        assert!(queue.push(edit_job()).is_ok());
        let next = queue.next().unwrap();
        assert_eq!(next.id, b.id);
        assert_eq!(next.state(), JobState::Running);
        // A running job is only flagged; the worker stops it at its next step.
        assert_eq!(queue.cancel(&b.id), Some(JobState::Running));
        assert!(b.cancel_requested());
        queue.finish(&b, JobState::Cancelled, Instant::now());
        assert_eq!(b.state(), JobState::Cancelled);
        assert_eq!(queue.active().len(), 1);
    }

    #[test]
    fn a_repeated_idempotency_key_gets_the_first_job() {
        let queue = Queue::new(4);
        let keyed = |key: &str| NewJob {
            job: edit_job(),
            key: Some(key.into()),
        };
        let first = queue.submit(keyed("k1")).ok().unwrap();
        let again = queue.submit(keyed("k1")).ok().unwrap();
        let other = queue.submit(keyed("k2")).ok().unwrap();
        assert_eq!(first["id"], again["id"]);
        assert_ne!(first["id"], other["id"]);
        assert_eq!(queue.active().len(), 2);
        assert_eq!(again["position"], 1);
    }

    #[test]
    fn events_are_numbered_in_order_and_previews_go_when_the_job_ends() {
        let queue = Queue::new(4);
        let submitted = queue.push(edit_job()).ok().unwrap();
        let job = queue.next().unwrap();
        assert_eq!(
            (job.id.as_str(), job.state()),
            (submitted.id.as_str(), JobState::Running)
        );
        job.emit("preview", json!({}));
        job.emit("done", json!({}));
        let seqs: Vec<u64> = job.events_from(0).iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [0, 1, 2]);
        assert_eq!(job.events_from(2).len(), 1);
        queue.finish(&job, JobState::Done, Instant::now());
        let events = job.events_from(0);
        let kinds: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
        assert_eq!(kinds, ["queued", "done"]);
    }
}
