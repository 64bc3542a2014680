//! Scale-out on NATS JetStream: front ends (`unitune serve --nats URL`) queue jobs, workers
//! (`unitune worker --nats URL`) on any number of GPU machines run them. Everything lives in one
//! NATS server or cluster:
//!
//! ```text
//! stream UNITUNE_JOBS    work queue, subjects unitune.jobs.any (any worker) and
//!                        unitune.jobs.worker.<id> (the worker that has the session loaded);
//!                        a job stays until a worker acknowledges it, after its result is stored
//! stream UNITUNE_EVENTS  unitune.events.<job>: every job's events in order (an hour kept), so
//!                        any front end can relay them, from any point (Last-Event-ID)
//! kv unitune-jobs        <job> -> JobRecord (state, worker, attempts); key-<sha256> -> <job>
//!                        for idempotency keys
//! kv unitune-records     session.<id> -> SessionMeta, edit.<session>.<edit> -> EditMeta
//! kv unitune-workers     <worker> -> the sessions it has loaded (expires unless refreshed)
//! objects unitune-files  <session>/upload.png, session.safetensors, source.png,
//!                        edits/<edit>/<n>.png
//! subject unitune.cancel.<job>  asks the worker running the job to stop
//! ```
//!
//! The pieces are JetStream's own: redelivery after the ack deadline when a worker dies (a
//! running worker sends in-progress acks), deduplication of publishes by job id, file storage
//! that survives a server restart.

mod queue;
mod store;
pub mod worker;

use std::future::Future;
use std::time::Duration;

use async_nats::jetstream::{self, kv, object_store, stream};
use serde::{Deserialize, Serialize};

pub use queue::NatsQueue;
pub use store::NatsStore;

use crate::queue::JobState;

pub const JOBS_STREAM: &str = "UNITUNE_JOBS";
pub const EVENTS_STREAM: &str = "UNITUNE_EVENTS";
pub const JOBS_BUCKET: &str = "unitune-jobs";
pub const RECORDS_BUCKET: &str = "unitune-records";
pub const WORKERS_BUCKET: &str = "unitune-workers";
pub const FILES_BUCKET: &str = "unitune-files";
/// Subject of jobs any worker may take.
pub const ANY_SUBJECT: &str = "unitune.jobs.any";
/// The durable consumer that all workers share on [`ANY_SUBJECT`].
pub const ANY_CONSUMER: &str = "workers";

/// Subject of the jobs meant for one worker.
pub fn worker_subject(worker: &str) -> String {
    format!("unitune.jobs.worker.{worker}")
}

pub fn events_subject(job: &str) -> String {
    format!("unitune.events.{job}")
}

pub fn cancel_subject(job: &str) -> String {
    format!("unitune.cancel.{job}")
}

/// A worker's entry in [`WORKERS_BUCKET`], refreshed every [`HEARTBEAT`]; it expires after
/// [`WORKER_TTL`] once the worker stops.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerInfo {
    /// Sessions whose tuned UNets it holds, most recently used last.
    pub sessions: Vec<String>,
    /// The job it runs.
    pub job: Option<String>,
}

pub const HEARTBEAT: Duration = Duration::from_secs(2);
pub const WORKER_TTL: Duration = Duration::from_secs(10);

/// A job's state, shared by the front ends and the workers ([`JOBS_BUCKET`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobRecord {
    pub id: String,
    pub kind: String,
    pub session: String,
    pub edit: Option<String>,
    pub state: JobState,
    /// Seconds since the Unix epoch.
    pub created: u64,
    /// The worker that runs or ran it.
    pub worker: Option<String>,
    /// Times a worker started it (more than one: a worker died while running it).
    pub attempts: u32,
    pub error: Option<String>,
}

/// What a job message carries: enough for any worker to make the same job.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobMessage {
    pub id: String,
    pub kind: String,
    pub session: String,
    pub edit: Option<String>,
    /// The uploaded file's name (tunes).
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub tune: Option<crate::params::TuneParams>,
    #[serde(default)]
    pub edit_params: Option<crate::params::EditParams>,
    /// The edit's painted mask, which its record (and so `EditParams`' JSON) leaves out.
    #[serde(default)]
    pub mask: Option<String>,
}

/// A job message above this size travels in the object store (`jobs/<id>.json`), the message
/// naming it: NATS messages are limited to 1 MB by default, and an edit's painted mask can be
/// larger.
pub const MAX_INLINE_MESSAGE: usize = 512 << 10;

/// A connection and the handles of every stream and bucket. It has its own runtime, so that
/// both async (the API) and plain threads (the worker) can use it.
pub struct Nats {
    runtime: Option<tokio::runtime::Runtime>,
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    pub jobs: kv::Store,
    pub records: kv::Store,
    pub workers: kv::Store,
    pub files: object_store::ObjectStore,
}

impl Nats {
    /// Connects to `url` and creates whatever stream or bucket is missing.
    pub fn connect(url: &str) -> Result<Self, String> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("nats")
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the NATS client's runtime: {e}"))?;
        let (client, js, jobs, records, workers, files) = runtime
            .block_on(setup(url))
            .map_err(|e| format!("--nats {url}: {e}"))?;
        Ok(Self {
            runtime: Some(runtime),
            client,
            js,
            jobs,
            records,
            workers,
            files,
        })
    }

    /// Runs `f` to completion on the client's runtime, from a plain thread or from inside
    /// another (multi-threaded) runtime.
    pub fn block<F: Future>(&self, f: F) -> F::Output {
        let handle = self.runtime.as_ref().expect("runtime until drop").handle();
        match tokio::runtime::Handle::try_current() {
            Ok(_) => tokio::task::block_in_place(|| handle.block_on(f)),
            Err(_) => handle.block_on(f),
        }
    }

    pub fn spawn<F>(&self, f: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let runtime = self.runtime.as_ref().expect("runtime until drop");
        runtime.spawn(f);
    }

    /// Reads a job's record.
    pub async fn job(&self, id: &str) -> Option<(JobRecord, u64)> {
        let entry = self.jobs.entry(id).await.ok()??;
        if entry.operation != kv::Operation::Put {
            return None;
        }
        Some((serde_json::from_slice(&entry.value).ok()?, entry.revision))
    }

    /// Changes a job's record with `change` (compare-and-set, retried on a concurrent change);
    /// returns the record after, or `None` when there is none or `change` declines.
    pub async fn update_job(
        &self,
        id: &str,
        change: impl Fn(&mut JobRecord) -> bool,
    ) -> Result<Option<JobRecord>, String> {
        for _ in 0..16 {
            let Some((mut record, revision)) = self.job(id).await else {
                return Ok(None);
            };
            if !change(&mut record) {
                return Ok(None);
            }
            let value = serde_json::to_vec(&record).expect("records serialize");
            match self.jobs.update(id, value.into(), revision).await {
                Ok(_) => return Ok(Some(record)),
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => continue,
                Err(e) => return Err(format!("job record {id}: {e}")),
            }
        }
        Err(format!("job record {id}: changed too often to update"))
    }

    /// Publishes one event of a job to its subject in [`EVENTS_STREAM`], waiting until it is
    /// stored.
    pub async fn emit(&self, job: &str, kind: &str, data: serde_json::Value) -> Result<(), String> {
        let payload = serde_json::to_vec(&serde_json::json!({ "kind": kind, "data": data }))
            .expect("events serialize");
        let ack = self
            .js
            .publish(events_subject(job), payload.into())
            .await
            .map_err(|e| e.to_string())?;
        ack.await.map(|_| ()).map_err(|e| e.to_string())
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

type Handles = (
    async_nats::Client,
    jetstream::Context,
    kv::Store,
    kv::Store,
    kv::Store,
    object_store::ObjectStore,
);

async fn setup(url: &str) -> Result<Handles, String> {
    let client = async_nats::ConnectOptions::new()
        .name("unitune")
        .retry_on_initial_connect()
        .connect(url);
    let client = tokio::time::timeout(Duration::from_secs(10), client)
        .await
        .map_err(|_| "no NATS server answered within 10 s".to_string())?
        .map_err(|e| e.to_string())?;
    let js = jetstream::new(client.clone());
    let fail = |what: &str, e: &dyn std::fmt::Display| {
        format!("{what}: {e} (is JetStream on? start nats-server with -js)")
    };
    js.get_or_create_stream(stream::Config {
        name: JOBS_STREAM.into(),
        subjects: vec!["unitune.jobs.>".into()],
        retention: stream::RetentionPolicy::WorkQueue,
        storage: stream::StorageType::File,
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    })
    .await
    .map_err(|e| fail(JOBS_STREAM, &e))?;
    js.get_or_create_stream(stream::Config {
        name: EVENTS_STREAM.into(),
        subjects: vec!["unitune.events.>".into()],
        retention: stream::RetentionPolicy::Limits,
        storage: stream::StorageType::File,
        max_age: Duration::from_secs(3600),
        max_bytes: 1 << 30,
        ..Default::default()
    })
    .await
    .map_err(|e| fail(EVENTS_STREAM, &e))?;
    let jobs = key_value(&js, JOBS_BUCKET, Duration::from_secs(7 * 86400)).await?;
    let records = key_value(&js, RECORDS_BUCKET, Duration::ZERO).await?;
    let workers = key_value(&js, WORKERS_BUCKET, WORKER_TTL).await?;
    let files = match js.get_object_store(FILES_BUCKET).await {
        Ok(store) => store,
        Err(_) => js
            .create_object_store(object_store::Config {
                bucket: FILES_BUCKET.into(),
                storage: stream::StorageType::File,
                ..Default::default()
            })
            .await
            .map_err(|e| fail(FILES_BUCKET, &e))?,
    };
    Ok((client, js, jobs, records, workers, files))
}

/// Opens (creating) a key-value bucket. Its stream is made here with the settings the client
/// library gives a bucket, because the library's own `create_key_value` first asks for the
/// account's limits in a form that NATS 2.9 (Debian's) does not answer in.
async fn key_value(
    js: &jetstream::Context,
    name: &str,
    max_age: Duration,
) -> Result<kv::Store, String> {
    js.get_or_create_stream(stream::Config {
        name: format!("KV_{name}"),
        subjects: vec![format!("$KV.{name}.>")],
        max_messages_per_subject: 1,
        max_age,
        storage: stream::StorageType::File,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        discard: stream::DiscardPolicy::New,
        ..Default::default()
    })
    .await
    .map_err(|e| format!("bucket {name}: {e}"))?;
    js.get_key_value(name)
        .await
        .map_err(|e| format!("bucket {name}: {e}"))
}
