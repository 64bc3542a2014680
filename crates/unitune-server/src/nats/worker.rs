//! `unitune worker --nats URL`: pulls jobs from JetStream and runs them through the same
//! [`Worker`] as `unitune serve` does in-process.
//!
//! A job message is acknowledged only after its result is stored and its record says so; while
//! it runs the worker sends in-progress acks, so a long tune is not redelivered, and if the
//! worker dies JetStream hands the job to another worker after the ack deadline. The job's id is
//! fixed when it is queued, so a rerun writes the same session, not a second one. A job that
//! fails (bad input) is acknowledged with its error: it fails once and is not retried; one that
//! was started [`MAX_ATTEMPTS`] times without finishing (it kills its workers) is given up.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::consumer::{pull, PullConsumer};
use async_nats::jetstream::message::{Acker, Message};
use async_nats::jetstream::AckKind;
use async_nats::HeaderMap;
use futures_util::StreamExt;
use serde_json::{json, Value};
use unitune::{Error, Result};

use super::store::NatsStore;
use super::{
    cancel_subject, worker_subject, JobMessage, Nats, WorkerInfo, ANY_CONSUMER, ANY_SUBJECT,
    HEARTBEAT, JOBS_STREAM,
};
use crate::config::WorkerConfig;
use crate::queue::JobState;
use crate::store::{new_id, Records};
use crate::worker::{outcome, Running, Worker};

/// Starts of one job after which it is given up.
pub const MAX_ATTEMPTS: i64 = 3;

/// How the worker talks to NATS.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    pub url: String,
    /// How long JetStream waits for an ack (or an in-progress ack) before it hands a job to
    /// another worker. The workers' consumers are created with it.
    pub ack_wait: Duration,
}

/// The job being run, as the heartbeat and the cancel listener see it.
#[derive(Default)]
struct Current {
    job: Option<String>,
    cancel: Arc<AtomicBool>,
}

/// Runs jobs until `stop` is set (then the running job goes back to the queue at once).
pub fn run(
    config: WorkerConfig,
    options: WorkerOptions,
    stop: Arc<AtomicBool>,
) -> Result<(), String> {
    let nats = Arc::new(Nats::connect(&options.url)?);
    let store = Arc::new(NatsStore::new(nats.clone()));
    let limits = config.limits.clone();
    let model = config.model.display().to_string();
    let mut worker =
        Worker::new(config, store.clone()).map_err(|e| format!("--model {model}: {e}"))?;
    let id = new_id();
    let current = Arc::new(Mutex::new(Current::default()));
    let loaded = Arc::new(Mutex::new(vec![]));
    // The heartbeat goes first: another worker's reaper takes a consumer without a live worker
    // entry for a dead worker's.
    nats.block(beat(&nats, &id, &current, &loaded))?;
    let (any, own) = nats.block(consumers(&nats, &id, options.ack_wait))?;
    nats.spawn(heartbeat(
        nats.clone(),
        id.clone(),
        current.clone(),
        loaded.clone(),
    ));
    nats.spawn(cancel_listener(nats.clone(), current.clone()));
    eprintln!("unitune worker {id} is taking jobs from {}", options.url);
    while !stop.load(Ordering::SeqCst) {
        let Some(message) = nats.block(next(&own, &any)) else {
            continue;
        };
        let cancel = Arc::new(AtomicBool::new(false));
        let job = Handling {
            nats: &nats,
            store: &store,
            worker_id: &id,
            ack_wait: options.ack_wait,
            limits: &limits,
            stop: &stop,
            cancel: cancel.clone(),
            current: &current,
            loaded: &loaded,
        };
        job.handle(&mut worker, message);
    }
    // Gone from the registry first, so that no more edits are routed here; then whatever was
    // routed here in the meantime goes to the other workers.
    let _ = nats.block(nats.workers.purge(&id));
    let handed = nats.block(async {
        let stream = nats.js.get_stream(JOBS_STREAM).await?;
        hand_over(&nats, &stream, &format!("worker-{id}")).await
    });
    if let Err(e) = handed {
        eprintln!("warning: jobs sent to this worker wait for another worker's clean-up: {e}");
    }
    Ok(())
}

async fn consumers(
    nats: &Nats,
    id: &str,
    ack_wait: Duration,
) -> Result<(PullConsumer, PullConsumer), String> {
    let stream = (nats.js.get_stream(JOBS_STREAM).await).map_err(|e| e.to_string())?;
    let config = |name: &str, subject: String| pull::Config {
        durable_name: Some(name.to_string()),
        filter_subject: subject,
        ack_wait,
        ..Default::default()
    };
    let any = stream
        .get_or_create_consumer(ANY_CONSUMER, config(ANY_CONSUMER, ANY_SUBJECT.into()))
        .await
        .map_err(|e| format!("consumer {ANY_CONSUMER}: {e}"))?;
    let name = format!("worker-{id}");
    let own = stream
        .get_or_create_consumer(&name, config(&name, worker_subject(id)))
        .await
        .map_err(|e| format!("consumer {name}: {e}"))?;
    Ok((any, own))
}

/// The next job: one meant for this worker first, else one for any worker (waiting up to a
/// second, so that this worker's own subject is looked at again soon).
async fn next(own: &PullConsumer, any: &PullConsumer) -> Option<Message> {
    if let Ok(mut batch) = own.fetch().max_messages(1).messages().await {
        if let Some(Ok(message)) = batch.next().await {
            return Some(message);
        }
    }
    let batch = any
        .batch()
        .max_messages(1)
        .expires(Duration::from_secs(1))
        .messages()
        .await;
    match batch {
        Ok(mut batch) => batch.next().await?.ok(),
        Err(_) => {
            // The server is away (restarting): the client reconnects by itself.
            tokio::time::sleep(Duration::from_millis(500)).await;
            None
        }
    }
}

/// One job message being handled.
struct Handling<'a> {
    nats: &'a Arc<Nats>,
    store: &'a NatsStore,
    worker_id: &'a str,
    ack_wait: Duration,
    limits: &'a crate::Limits,
    stop: &'a AtomicBool,
    cancel: Arc<AtomicBool>,
    current: &'a Mutex<Current>,
    loaded: &'a Mutex<Vec<String>>,
}

/// The job's events go to its subject; it is cancelled by the user, or by the worker stopping.
struct NatsRunning<'a> {
    nats: &'a Nats,
    id: String,
    cancel: Arc<AtomicBool>,
    stop: &'a AtomicBool,
}

impl Running for NatsRunning<'_> {
    fn emit(&self, kind: &'static str, data: Value) {
        if let Err(e) = self.nats.block(self.nats.emit(&self.id, kind, data)) {
            eprintln!("warning: job {}: event {kind} not published: {e}", self.id);
        }
    }

    fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst) || self.stop.load(Ordering::SeqCst)
    }
}

impl Handling<'_> {
    fn handle(&self, worker: &mut Worker, message: Message) {
        let subject = message.subject.to_string();
        let delivered = message.info().map_or(1, |i| i.delivered);
        let (message, acker) = message.split();
        let acker = Arc::new(acker);
        let job = match self.nats.block(self.parse(&message.payload)) {
            Ok(job) => job,
            Err(e) => {
                eprintln!("warning: dropped a job message on {subject}: {e}");
                self.finish_ack(&acker, AckKind::Ack);
                return;
            }
        };
        let running = NatsRunning {
            nats: self.nats,
            id: job.id.clone(),
            cancel: self.cancel.clone(),
            stop: self.stop,
        };
        let worker_id = self.worker_id.to_string();
        let started = self.nats.block(self.nats.update_job(&job.id, |r| {
            if r.state.finished() {
                return false;
            }
            r.state = JobState::Running;
            r.worker = Some(worker_id.clone());
            r.attempts += 1;
            true
        }));
        let record = match started {
            Ok(Some(record)) => record,
            // Cancelled while it waited, finished by an earlier delivery, or unknown.
            Ok(None) => return self.finish_ack(&acker, AckKind::Ack),
            Err(e) => {
                eprintln!("warning: job {}: {e}; leaving it for redelivery", job.id);
                return;
            }
        };
        if delivered > MAX_ATTEMPTS {
            let why = format!(
                "gave up after {} starts: the worker running it stopped each time",
                delivered - 1
            );
            self.end(&running, &Err(Error::argument("job", why)), &acker);
            return;
        }
        running.emit(
            "started",
            json!({ "kind": job.kind, "worker": self.worker_id, "attempt": record.attempts }),
        );
        {
            let mut current = lock(self.current);
            current.job = Some(job.id.clone());
            current.cancel = self.cancel.clone();
        }
        let keep_alive = self.keep_alive(acker.clone());
        let result = self.run(worker, &running, &job);
        keep_alive.store(true, Ordering::SeqCst);
        lock(self.current).job = None;
        // The registry says this worker is idle with the session loaded before the job's last
        // event: a client that then asks for an edit of it gets it routed here.
        *lock(self.loaded) = worker.loaded();
        if let Err(e) = self
            .nats
            .block(beat(self.nats, self.worker_id, self.current, self.loaded))
        {
            eprintln!("warning: {e}");
        }
        let by_stop =
            matches!(result, Err(Error::Interrupted)) && !self.cancel.load(Ordering::SeqCst);
        if by_stop {
            // The worker is stopping: the job goes back to the queue for another worker.
            let _ = self.nats.block(self.nats.update_job(&job.id, |r| {
                r.state = JobState::Queued;
                true
            }));
            running.emit("requeued", json!({ "worker": self.worker_id }));
            self.finish_ack(&acker, AckKind::Nak(None));
            return;
        }
        if job.kind == "tune" && result.is_ok() {
            let upload = format!("{}/upload.png", job.session);
            let _ = self.nats.block(self.nats.files.delete(&upload));
        }
        self.end(&running, &result, &acker);
    }

    /// Stores the outcome in the job's record, sends the last event, then acknowledges.
    fn end(&self, running: &NatsRunning, result: &Result<()>, acker: &Acker) {
        let (kind, data, state) = outcome(result);
        let error = result.as_ref().err().map(|e| e.to_string());
        let stored = self.nats.block(self.nats.update_job(&running.id, |r| {
            r.state = state;
            r.error = error.clone();
            true
        }));
        if let Err(e) = stored {
            eprintln!(
                "warning: job {}: {e}; leaving it for redelivery",
                running.id
            );
            return;
        }
        running.emit(kind, data);
        self.finish_ack(acker, AckKind::Ack);
    }

    fn finish_ack(&self, acker: &Acker, kind: AckKind) {
        let acked = self.nats.block(async {
            match kind {
                AckKind::Ack => acker.double_ack().await,
                other => acker.ack_with(other).await,
            }
        });
        if let Err(e) = acked {
            eprintln!("warning: acknowledgement not confirmed: {e}");
        }
    }

    /// Sends in-progress acks every third of the ack deadline until the returned flag is set.
    fn keep_alive(&self, acker: Arc<Acker>) -> Arc<AtomicBool> {
        let done = Arc::new(AtomicBool::new(false));
        let (flag, every) = (done.clone(), self.ack_wait / 3);
        self.nats.spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                if flag.load(Ordering::SeqCst) {
                    return;
                }
                let _ = acker.ack_with(AckKind::Progress).await;
            }
        });
        done
    }

    /// The job message (from the object store when it was too large to travel inline).
    async fn parse(&self, payload: &[u8]) -> Result<JobMessage, String> {
        let value: Value = serde_json::from_slice(payload).map_err(|e| format!("not JSON: {e}"))?;
        let value = match value["object"].as_str() {
            Some(name) => {
                let bytes = self.store.get_file(name).await.map_err(|e| e.to_string())?;
                serde_json::from_slice(&bytes).map_err(|e| format!("{name}: {e}"))?
            }
            None => value,
        };
        serde_json::from_value(value).map_err(|e| format!("not a job: {e}"))
    }

    fn run(&self, worker: &mut Worker, running: &NatsRunning, job: &JobMessage) -> Result<()> {
        let bad = |e: String| Error::argument("job", e);
        match (job.kind.as_str(), &job.tune, &job.edit_params, &job.edit) {
            ("tune", Some(params), _, _) => {
                let upload = format!("{}/upload.png", job.session);
                let bytes = self.nats.block(self.store.get_file(&upload))?;
                let image = image::load_from_memory(&bytes)
                    .map_err(|e| bad(format!("{upload}: {e}")))?
                    .to_rgb8();
                let tune = params.clone().job(self.limits).map_err(bad)?;
                worker.tune(running, &job.session, image, &job.name, &tune)
            }
            ("edit", _, Some(params), Some(edit)) => {
                let session = self
                    .store
                    .session(&job.session)
                    .ok_or_else(|| Error::argument("session", "does not exist (deleted?)"))?;
                let mut params = params.clone();
                params.mask = job.mask.clone();
                let edits = params
                    .job(self.limits, session.width, session.height)
                    .map_err(bad)?;
                worker.edit(running, &job.session, edit, &edits, params)
            }
            (kind, ..) => Err(bad(format!("`{kind}` job without its settings"))),
        }
    }
}

async fn beat(
    nats: &Nats,
    id: &str,
    current: &Mutex<Current>,
    loaded: &Mutex<Vec<String>>,
) -> Result<(), String> {
    let info = WorkerInfo {
        sessions: lock(loaded).clone(),
        job: lock(current).job.clone(),
    };
    let value = serde_json::to_vec(&info).expect("worker info serializes");
    nats.workers
        .put(id, value.into())
        .await
        .map(|_| ())
        .map_err(|e| format!("worker registry: {e}"))
}

/// Refreshes this worker's entry, and now and then moves the jobs of dead workers back to the
/// shared subject.
async fn heartbeat(
    nats: Arc<Nats>,
    id: String,
    current: Arc<Mutex<Current>>,
    loaded: Arc<Mutex<Vec<String>>>,
) {
    for beats in 0u64.. {
        if let Err(e) = beat(&nats, &id, &current, &loaded).await {
            eprintln!("warning: {e}");
        }
        if beats % 5 == 4 {
            if let Err(e) = reap(&nats, &id).await {
                eprintln!("warning: moving a stopped worker's jobs: {e}");
            }
        }
        tokio::time::sleep(HEARTBEAT).await;
    }
}

/// Jobs routed to a worker that is gone (its registry entry expired) go back to any worker;
/// its consumer is removed once it holds nothing.
async fn reap(nats: &Nats, me: &str) -> Result<(), async_nats::Error> {
    let stream = nats.js.get_stream(JOBS_STREAM).await?;
    let names: Vec<String> = stream
        .consumer_names()
        .filter_map(|n| async { n.ok() })
        .collect()
        .await;
    for name in names {
        let Some(worker) = name.strip_prefix("worker-") else {
            continue;
        };
        if worker == me || nats.workers.get(worker).await?.is_some() {
            continue;
        }
        hand_over(nats, &stream, &name).await?;
    }
    Ok(())
}

/// Moves the jobs waiting on the worker consumer `name` to the shared subject, and removes the
/// consumer once it holds nothing (a job its worker had taken waits for its ack deadline).
async fn hand_over(
    nats: &Nats,
    stream: &async_nats::jetstream::stream::Stream,
    name: &str,
) -> Result<(), async_nats::Error> {
    let mut consumer: PullConsumer = stream.get_consumer(name).await?;
    let mut batch = consumer.fetch().max_messages(16).messages().await?;
    while let Some(Ok(message)) = batch.next().await {
        let id = message.info().map(|i| i.stream_sequence).unwrap_or(0);
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", format!("moved-{id}").as_str());
        nats.js
            .publish_with_headers(ANY_SUBJECT, headers, message.payload.clone())
            .await?
            .await?;
        message.double_ack().await?;
    }
    let info = consumer.info().await?;
    if info.num_pending == 0 && info.num_ack_pending == 0 {
        stream.delete_consumer(name).await?;
    }
    Ok(())
}

/// Sets the running job's cancel flag when a front end asks.
async fn cancel_listener(nats: Arc<Nats>, current: Arc<Mutex<Current>>) {
    let Ok(mut requests) = nats.client.subscribe(cancel_subject("*")).await else {
        eprintln!("warning: cannot listen for cancel requests");
        return;
    };
    while let Some(request) = requests.next().await {
        let job = request
            .subject
            .as_str()
            .rsplit('.')
            .next()
            .unwrap_or_default();
        let current = lock(&current);
        if current.job.as_deref() == Some(job) {
            current.cancel.store(true, Ordering::SeqCst);
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
