//! What the server tests share: a real server on an ephemeral loopback port over the tiny SD1
//! fixture, and a client that reads a job's server-sent events to the end.

#![allow(dead_code)] // each test file uses its own part

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use reqwest::multipart::{Form, Part};
use serde_json::Value;
use unitune_server::{Limits, ServeConfig, Server};

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A fresh data folder for `name`.
pub fn data_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("unitune-serve-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

pub fn config(data: &Path, token: Option<&str>, limits: Limits) -> ServeConfig {
    ServeConfig {
        model: repo().join("tests/fixtures/tiny-sd1"),
        single_file: Default::default(),
        model_name: "tiny-sd1".into(),
        listen: "127.0.0.1:0".parse().unwrap(),
        data: data.to_path_buf(),
        token: token.map(String::from),
        device: Device::Cpu,
        dtype: DType::F32,
        limits,
        nats: None,
    }
}

pub fn start(data: &Path) -> Server {
    start_with(data, Limits::default())
}

pub fn start_with(data: &Path, limits: Limits) -> Server {
    Server::start(config(data, None, limits)).unwrap()
}

pub fn url(server: &Server, path: &str) -> String {
    format!("http://{}{path}", server.addr)
}

pub fn scene() -> Vec<u8> {
    std::fs::read(repo().join("examples/scene.png")).unwrap()
}

/// The example scene with its PNG header claiming `side` x `side` pixels (CRC and all).
pub fn claiming(side: u32) -> Vec<u8> {
    let mut png = scene();
    png[16..20].copy_from_slice(&side.to_be_bytes());
    png[20..24].copy_from_slice(&side.to_be_bytes());
    let crc = crc32fast::hash(&png[12..29]);
    png[29..33].copy_from_slice(&crc.to_be_bytes());
    png
}

/// The multipart body of a tune of `image` with `settings`.
pub fn tune_form(image: Vec<u8>, settings: &str) -> Form {
    Form::new()
        .part("image", Part::bytes(image).file_name("scene.png"))
        .text("settings", settings.to_string())
}

/// A short tune: 2 steps of batch 1.
pub const QUICK: &str = r#"{"steps": 2, "batch": 1, "seed": 1}"#;

/// A tune long enough to be cancelled while it runs: 1000 steps of batch 1.
pub const LONG: &str = r#"{"steps": 1000, "batch": 1}"#;

/// Queues a tune of the example scene; returns (job id, session id).
pub async fn queue_tune(
    client: &reqwest::Client,
    server: &Server,
    settings: &str,
) -> (String, String) {
    let response = client
        .post(url(server, "/api/sessions"))
        .multipart(tune_form(scene(), settings))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let body: Value = response.json().await.unwrap();
    (
        body["job"]["id"].as_str().unwrap().to_string(),
        body["session"].as_str().unwrap().to_string(),
    )
}

/// Every event of a job, read from its event stream until it ends: (name, data).
pub async fn job_events(
    client: &reqwest::Client,
    server: &Server,
    job: &str,
) -> Vec<(String, Value)> {
    EventStream::open(client, server, job).await.events().await
}

/// A long tune that keeps the worker busy until it is released, so that a job queued behind it can
/// be followed from its start: a job that ends before its events are read has lost its previews.
pub struct Blocker(String);

impl Blocker {
    pub async fn start(client: &reqwest::Client, server: &Server) -> Self {
        let (job, _) = queue_tune(client, server, LONG).await;
        Self(job)
    }

    /// Cancels the long tune.
    pub async fn release(self, client: &reqwest::Client, server: &Server) {
        assert_eq!(cancel(client, server, &self.0).await.status(), 202);
    }
}

/// `POST /api/jobs/{job}/cancel`.
pub async fn cancel(client: &reqwest::Client, server: &Server, job: &str) -> reqwest::Response {
    client
        .post(url(server, &format!("/api/jobs/{job}/cancel")))
        .send()
        .await
        .unwrap()
}

/// A job's event stream, open, and what it has sent so far.
pub struct EventStream {
    response: reqwest::Response,
    text: String,
}

impl EventStream {
    pub async fn open(client: &reqwest::Client, server: &Server, job: &str) -> Self {
        let response = client
            .get(url(server, &format!("/api/jobs/{job}/events")))
            .send()
            .await
            .unwrap();
        Self {
            response,
            text: String::new(),
        }
    }

    /// Reads until the stream has sent a `kind` event.
    pub async fn until(&mut self, kind: &str) {
        while !self.text.contains(&format!("event: {kind}")) {
            let chunk = self.response.chunk().await.unwrap().unwrap();
            self.text.push_str(&String::from_utf8_lossy(&chunk));
        }
    }

    /// Reads to the end: every event, (name, data).
    pub async fn events(mut self) -> Vec<(String, Value)> {
        while let Some(chunk) = self.response.chunk().await.unwrap() {
            self.text.push_str(&String::from_utf8_lossy(&chunk));
        }
        parse_events(&self.text)
    }
}

/// Every event of `job`, queued behind `blocker`: its stream is open before the blocker goes.
pub async fn job_events_behind(
    client: &reqwest::Client,
    server: &Server,
    job: &str,
    blocker: Blocker,
) -> Vec<(String, Value)> {
    let mut stream = EventStream::open(client, server, job).await;
    stream.until("queued").await;
    blocker.release(client, server).await;
    stream.events().await
}

pub fn parse_events(text: &str) -> Vec<(String, Value)> {
    text.split("\n\n")
        .filter_map(|block| {
            let mut kind = None;
            let mut data = None;
            for line in block.lines() {
                if let Some(k) = line.strip_prefix("event:") {
                    kind = Some(k.trim().to_string());
                } else if let Some(d) = line.strip_prefix("data:") {
                    data = Some(serde_json::from_str(d.trim()).unwrap());
                }
            }
            Some((kind?, data?))
        })
        .collect()
}

/// `GET path`, its JSON.
pub async fn get_json(client: &reqwest::Client, server: &Server, path: &str) -> Value {
    let response = client.get(url(server, path)).send().await.unwrap();
    response.json().await.unwrap()
}

/// `POST path` with a JSON body, the JSON answer.
pub async fn post_json(
    client: &reqwest::Client,
    server: &Server,
    path: &str,
    body: &Value,
) -> Value {
    let response = client
        .post(url(server, path))
        .json(body)
        .send()
        .await
        .unwrap();
    response.json().await.unwrap()
}

/// Tunes the example scene quickly; returns the session id.
pub async fn tuned(client: &reqwest::Client, server: &Server) -> String {
    let (job, session) = queue_tune(client, server, QUICK).await;
    let events = job_events(client, server, &job).await;
    assert_eq!(events.last().unwrap().0, "done", "{events:?}");
    session
}
