//! The front end's side of the NATS queue: jobs published to JetStream, their state read from
//! the jobs bucket, their events relayed from the events stream.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::{pull, DeliverPolicy};
use async_nats::HeaderMap;
use futures_util::stream::{self, StreamExt};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::store::NatsStore;
use super::{
    events_subject, worker_subject, JobMessage, JobRecord, Nats, WorkerInfo, ANY_SUBJECT,
    EVENTS_STREAM, JOBS_STREAM, MAX_INLINE_MESSAGE,
};
use crate::queue::{summary, Event, EventStream, JobQueue, JobState, NewJob, SubmitError, Work};
use crate::store::{now, png_bytes};

pub struct NatsQueue {
    nats: Arc<Nats>,
    files: NatsStore,
    /// Jobs that may wait (or run) in the queue; more are refused, as a full local queue
    /// refuses them.
    capacity: usize,
}

impl NatsQueue {
    pub fn new(nats: Arc<Nats>, capacity: usize) -> Self {
        let files = NatsStore::new(nats.clone());
        Self {
            nats,
            files,
            capacity,
        }
    }

    /// Messages in the job stream: waiting, or running and not yet acknowledged.
    async fn queued(&self) -> Result<usize, String> {
        let mut stream = (self.nats.js.get_stream(JOBS_STREAM).await).map_err(|e| e.to_string())?;
        let info = stream.info().await.map_err(|e| e.to_string())?;
        Ok(info.state.messages as usize)
    }

    fn record_summary(record: &JobRecord) -> Value {
        summary(
            &record.id,
            &record.kind,
            record.state,
            None,
            &record.session,
            record.edit.as_deref(),
        )
    }

    /// Every job record that is not finished.
    async fn unfinished(&self) -> Vec<JobRecord> {
        let Ok(keys) = self.nats.jobs.keys().await else {
            return vec![];
        };
        let keys: Vec<String> = keys.filter_map(|k| async { k.ok() }).collect().await;
        let mut records = vec![];
        for key in keys.iter().filter(|k| !k.starts_with("key-")) {
            if let Some((record, _)) = self.nats.job(key).await {
                if !record.state.finished() {
                    records.push(record);
                }
            }
        }
        records.sort_by_key(|r| r.created);
        records
    }

    /// A live worker that has `session` loaded and runs nothing, if any: an edit sent to it
    /// starts at once. (A busy one would hold the edit while others are free.)
    async fn worker_with(&self, session: &str) -> Option<String> {
        let keys = self.nats.workers.keys().await.ok()?;
        let keys: Vec<String> = keys.filter_map(|k| async { k.ok() }).collect().await;
        for key in keys {
            let Ok(Some(value)) = self.nats.workers.get(&key).await else {
                continue;
            };
            let Ok(info) = serde_json::from_slice::<WorkerInfo>(&value) else {
                continue;
            };
            if info.job.is_none() && info.sessions.iter().any(|s| s == session) {
                return Some(key);
            }
        }
        None
    }

    async fn submit_async(&self, new: NewJob) -> Result<Value, SubmitError> {
        let unavailable = |e: String| SubmitError::Unavailable(e);
        let job = new.job;
        let key = new
            .key
            .map(|k| format!("key-{:x}", Sha256::digest(k.as_bytes())));
        if let Some(key) = &key {
            if let Err(e) = self.nats.jobs.create(key, job.id.clone().into()).await {
                if e.kind() != async_nats::jetstream::kv::CreateErrorKind::AlreadyExists {
                    return Err(unavailable(e.to_string()));
                }
                let first = self.nats.jobs.get(key).await.ok().flatten();
                let first = first.map(|v| String::from_utf8_lossy(&v).into_owned());
                if let Some((record, _)) = match first {
                    Some(id) => self.nats.job(&id).await,
                    None => None,
                } {
                    return Ok(Self::record_summary(&record));
                }
                // The first submission did not get through: this one takes the key.
                let put = self.nats.jobs.put(key, job.id.clone().into()).await;
                put.map_err(|e| unavailable(e.to_string()))?;
            }
        }
        // After the key: a repeated submission gets its job even when the queue is full.
        if self.queued().await.map_err(unavailable)? >= self.capacity {
            if let Some(key) = &key {
                let _ = self.nats.jobs.purge(key).await;
            }
            return Err(SubmitError::Full { retry_after: 5 });
        }
        let mut message = JobMessage {
            id: job.id.clone(),
            kind: job.kind.to_string(),
            session: job.session.clone(),
            edit: job.edit.clone(),
            name: String::new(),
            tune: None,
            edit_params: None,
            mask: None,
        };
        let mut subject = ANY_SUBJECT.to_string();
        match job.take_work() {
            Some(Work::Tune {
                image,
                name,
                params,
                ..
            }) => {
                let upload = format!("{}/upload.png", job.session);
                (self.files.put_file(&upload, &png_bytes(&image)).await)
                    .map_err(|e| unavailable(e.to_string()))?;
                message.name = name;
                message.tune = Some(*params);
            }
            Some(Work::Edit { params, .. }) => {
                message.mask = params.mask.clone();
                message.edit_params = Some(*params);
                if let Some(worker) = self.worker_with(&job.session).await {
                    subject = worker_subject(&worker);
                }
            }
            None => return Err(unavailable("the job has no work".into())),
        }
        let record = JobRecord {
            id: job.id.clone(),
            kind: job.kind.to_string(),
            session: job.session.clone(),
            edit: job.edit.clone(),
            state: JobState::Queued,
            created: now(),
            worker: None,
            attempts: 0,
            error: None,
        };
        let value = serde_json::to_vec(&record).expect("records serialize");
        (self.nats.jobs.put(&job.id, value.into()).await)
            .map_err(|e| unavailable(e.to_string()))?;
        let mut payload = serde_json::to_vec(&message).expect("jobs serialize");
        if payload.len() > MAX_INLINE_MESSAGE {
            let name = format!("jobs/{}.json", job.id);
            (self.files.put_file(&name, &payload).await).map_err(|e| unavailable(e.to_string()))?;
            payload = serde_json::to_vec(&json!({ "id": job.id, "object": name })).unwrap();
        }
        // Before the job can start, so that it is each job's first event.
        (self
            .nats
            .emit(&job.id, "queued", json!({ "position": null }))
            .await)
            .map_err(unavailable)?;
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", job.id.as_str());
        let published = match self
            .nats
            .js
            .publish_with_headers(subject, headers, payload.into())
            .await
        {
            Ok(ack) => ack.await.map(|_| ()),
            Err(e) => Err(e),
        };
        if let Err(e) = published {
            let _ = self.nats.jobs.purge(&job.id).await;
            if let Some(key) = &key {
                let _ = self.nats.jobs.purge(key).await;
            }
            return Err(unavailable(e.to_string()));
        }
        Ok(Self::record_summary(&record))
    }

    async fn cancel_async(&self, id: &str) -> Option<JobState> {
        let queued = self
            .nats
            .update_job(id, |r| {
                let queued = r.state == JobState::Queued;
                if queued {
                    r.state = JobState::Cancelled;
                }
                queued
            })
            .await
            .ok()
            .flatten();
        if queued.is_some() {
            // The worker that gets the message reads the record and drops it.
            let _ = self.nats.emit(id, "cancelled", json!({})).await;
            return Some(JobState::Cancelled);
        }
        let (record, _) = self.nats.job(id).await?;
        if record.state == JobState::Running {
            let _ = self
                .nats
                .client
                .publish(super::cancel_subject(id), "".into())
                .await;
        }
        Some(record.state)
    }
}

impl JobQueue for NatsQueue {
    fn submit(&self, new: NewJob) -> Result<Value, SubmitError> {
        self.nats.block(self.submit_async(new))
    }

    fn get(&self, id: &str) -> Option<Value> {
        let (record, _) = self.nats.block(self.nats.job(id))?;
        Some(Self::record_summary(&record))
    }

    fn active(&self) -> Vec<Value> {
        let records = self.nats.block(self.unfinished());
        records.iter().map(Self::record_summary).collect()
    }

    fn busy_with(&self, session: &str) -> bool {
        let records = self.nats.block(self.unfinished());
        records.iter().any(|r| r.session == session)
    }

    fn cancel(&self, id: &str) -> Option<JobState> {
        self.nats.block(self.cancel_async(id))
    }

    fn events(&self, id: &str, after: Option<u64>) -> Option<EventStream> {
        self.nats.block(self.nats.job(id))?;
        let nats = self.nats.clone();
        let id = id.to_string();
        let messages = self.nats.block(async {
            let stream = nats.js.get_stream(EVENTS_STREAM).await.ok()?;
            let consumer = stream
                .create_consumer(pull::OrderedConfig {
                    filter_subject: events_subject(&id),
                    deliver_policy: match after {
                        Some(last) => DeliverPolicy::ByStartSequence {
                            start_sequence: last + 1,
                        },
                        None => DeliverPolicy::All,
                    },
                    ..Default::default()
                })
                .await
                .ok()?;
            consumer.messages().await.ok()
        })?;
        let events = stream::unfold(
            (messages, nats, id, false),
            |(mut messages, nats, id, ended)| async move {
                if ended {
                    return None;
                }
                loop {
                    match tokio::time::timeout(Duration::from_secs(5), messages.next()).await {
                        Ok(Some(Ok(message))) => {
                            let Ok(info) = message.info() else { continue };
                            let seq = info.stream_sequence;
                            let Ok(body) = serde_json::from_slice::<Value>(&message.payload) else {
                                continue;
                            };
                            let event = Event {
                                seq,
                                kind: body["kind"].as_str().unwrap_or("message").to_string(),
                                data: body["data"].clone(),
                            };
                            let last = event.is_last();
                            return Some((event, (messages, nats, id, last)));
                        }
                        Ok(Some(Err(_))) => continue,
                        Ok(None) => return None,
                        // Nothing for a while: end if the job is over (its events expired).
                        Err(_) => match nats.job(&id).await {
                            Some((record, _)) if !record.state.finished() => continue,
                            _ => return None,
                        },
                    }
                }
            },
        );
        Some(events.boxed())
    }

    fn close(&self) {}
}
