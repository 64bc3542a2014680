//! Scale-out on a real NATS server (Debian's `nats-server`, JetStream on, on a loopback port;
//! without it a developer's run skips these tests and says so, CI installs it):
//! `unitune serve --nats` front ends and `unitune worker` processes, as a user deploys them.
//! Workers are killed with SIGKILL, the NATS server is restarted, poison jobs are published by
//! hand, and sixty jobs come from twenty clients at once.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{
    events, fixtures, free_port, get_json, http, http_with, sessions, tune, tune_with,
    wait_for_port, Events,
};
use serde_json::{json, Value};

/// Seconds after which JetStream hands a silent worker's job to another.
const ACK_WAIT: &str = "2";

struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Nats {
    process: Process,
    port: u16,
    dir: PathBuf,
}

impl Nats {
    /// A server on a free port; `None` (the test says it is skipped) when `nats-server` is not
    /// installed on a developer's machine. Under CI (`CI` set) it must be: `.ci/run` installs it.
    fn start(dir: &Path) -> Option<Self> {
        if Command::new("nats-server")
            .arg("--version")
            .output()
            .is_err()
        {
            assert!(
                std::env::var_os("CI").is_none(),
                "nats-server is missing: .ci/run installs Debian's nats-server"
            );
            eprintln!("skipped: no nats-server (apt-get install nats-server)");
            return None;
        }
        Some(Self::start_on(dir, free_port()))
    }

    fn start_on(dir: &Path, port: u16) -> Self {
        let child = Command::new("nats-server")
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server starts");
        wait_for_port(&format!("127.0.0.1:{port}"), "nats-server");
        Self {
            process: Process(child),
            port,
            dir: dir.to_path_buf(),
        }
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Stops the server (SIGTERM, as a service manager does) and starts it again on the same
    /// port and storage.
    fn restart(&mut self) {
        // SAFETY: signals our own child.
        unsafe { libc::kill(self.process.0.id() as i32, libc::SIGTERM) };
        let _ = self.process.0.wait();
        *self = Self::start_on(&self.dir.clone(), self.port);
    }

    /// A plain NATS request (the text protocol): publishes `payload` to `subject` and returns
    /// the reply.
    fn request(&self, subject: &str, payload: &[u8]) -> Value {
        let stream = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut line = String::new();
        reader.read_line(&mut line).unwrap(); // INFO
        let mut writer = stream;
        write!(
            writer,
            "CONNECT {{\"verbose\":false}}\r\nSUB _INBOX.test 1\r\nPUB {subject} _INBOX.test {}\r\n",
            payload.len()
        )
        .unwrap();
        writer.write_all(payload).unwrap();
        writer.write_all(b"\r\n").unwrap();
        loop {
            line.clear();
            reader.read_line(&mut line).unwrap();
            if line.starts_with("PING") {
                writer.write_all(b"PONG\r\n").unwrap();
            }
            if let Some(head) = line.strip_prefix("MSG ") {
                let size: usize = head.trim().rsplit(' ').next().unwrap().parse().unwrap();
                let mut body = vec![0; size + 2];
                reader.read_exact(&mut body).unwrap();
                return serde_json::from_slice(&body[..size]).unwrap_or(Value::Null);
            }
        }
    }

    /// Messages waiting in the job queue (delivered ones not yet acknowledged included); waits
    /// for JetStream to answer after a (re)start.
    fn queued_messages(&self) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let info = self.request("$JS.API.STREAM.INFO.UNITUNE_JOBS", b"");
            if let Some(n) = info["state"]["messages"].as_u64() {
                return n;
            }
            assert!(Instant::now() < deadline, "no stream info: {info}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// Waits (up to 10 s) for the job stream to be empty: a job's record says `done` a moment
/// before its message is acknowledged.
fn until_empty(nats: &Nats) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = nats.queued_messages();
        if left == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{left} job messages left in the stream"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("unitune-nats-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn model() -> PathBuf {
    fixtures().join("tiny-sd1")
}

/// `unitune worker`, its log in `log`.
fn worker(nats: &Nats, log: &Path) -> Process {
    let log = std::fs::File::create(log).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_unitune"))
        .args([
            "worker",
            "--nats",
            &nats.url(),
            "--ack-wait",
            ACK_WAIT,
            "--model",
        ])
        .arg(model())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    Process(child)
}

/// `unitune serve --nats`; returns it and its address.
fn front_end(nats: &Nats) -> (Process, String) {
    let addr = format!("127.0.0.1:{}", free_port());
    let child = Command::new(env!("CARGO_BIN_EXE_unitune"))
        .args([
            "serve",
            "--nats",
            &nats.url(),
            "--queue",
            "100",
            "--listen",
            &addr,
        ])
        .arg("--model")
        .arg(model())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_port(&addr, "serve --nats");
    (Process(child), addr)
}

/// Waits until the job's state is final; returns its summary.
fn until_finished(addr: &str, job: &str, seconds: u64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    loop {
        let (status, body) = http(addr, "GET", &format!("/api/jobs/{job}"), "text/plain", b"");
        if status == 200 {
            let summary: Value = serde_json::from_str(&body).unwrap();
            if ["done", "failed", "cancelled"].contains(&summary["state"].as_str().unwrap()) {
                return summary;
            }
        }
        assert!(
            Instant::now() < deadline,
            "job {job} did not finish: {body}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn kinds(events: &[(u64, String, Value)]) -> Vec<&str> {
    events.iter().map(|(_, k, _)| k.as_str()).collect()
}

fn count(events: &[(u64, String, Value)], kind: &str) -> usize {
    events.iter().filter(|(_, k, _)| k == kind).count()
}

#[test]
fn a_killed_worker_s_tune_is_redelivered_and_finishes_once_elsewhere() {
    let dir = temp_dir("kill");
    let Some(nats) = Nats::start(&dir.join("js")) else {
        return;
    };
    let (_front, addr) = front_end(&nats);
    let first = worker(&nats, &dir.join("first.log"));
    let job = tune(&addr, 400);
    common::until_running(&addr, &job);
    drop(first); // SIGKILL in the middle of the tune
    let _second = worker(&nats, &dir.join("second.log"));
    let summary = until_finished(&addr, &job, 240);
    assert_eq!(summary["state"], "done", "{summary}");
    let events = events(&addr, &job);
    let starts: Vec<&Value> = events
        .iter()
        .filter(|(_, k, _)| k == "started")
        .map(|(_, _, d)| d)
        .collect();
    assert_eq!(starts.len(), 2, "{:?}", kinds(&events));
    assert_ne!(starts[0]["worker"], starts[1]["worker"]);
    assert_eq!(starts[1]["attempt"], 2);
    assert_eq!(count(&events, "done"), 1);
    assert_eq!(count(&events, "session"), 1);
    let listed = sessions(&addr);
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    assert_eq!(listed[0]["id"], summary["session"]);
    until_empty(&nats);
}

#[test]
fn a_restarted_nats_server_loses_no_acknowledged_job() {
    let dir = temp_dir("restart");
    let Some(mut nats) = Nats::start(&dir.join("js")) else {
        return;
    };
    let (_front, addr) = front_end(&nats);
    // Accepted (202) while no worker runs: the jobs wait in JetStream's file store.
    let jobs: Vec<String> = (0..3).map(|_| tune(&addr, 2)).collect();
    assert_eq!(nats.queued_messages(), 3);
    nats.restart();
    assert_eq!(nats.queued_messages(), 3, "the restart lost queued jobs");
    // The front end reconnects by itself.
    let deadline = Instant::now() + Duration::from_secs(30);
    while http(
        &addr,
        "GET",
        &format!("/api/jobs/{}", jobs[0]),
        "text/plain",
        b"",
    )
    .0 != 200
    {
        assert!(Instant::now() < deadline, "the front end did not reconnect");
        std::thread::sleep(Duration::from_millis(200));
    }
    let _worker = worker(&nats, &dir.join("worker.log"));
    for job in &jobs {
        let summary = until_finished(&addr, job, 120);
        assert_eq!(summary["state"], "done", "{summary}");
    }
    assert_eq!(sessions(&addr).as_array().unwrap().len(), 3);
    // And the front end, reconnected, still queues.
    let after = tune(&addr, 2);
    assert_eq!(until_finished(&addr, &after, 120)["state"], "done");
    until_empty(&nats);
}

#[test]
fn poison_jobs_fail_once_with_a_clear_error_and_duplicates_run_once() {
    let dir = temp_dir("poison");
    let Some(nats) = Nats::start(&dir.join("js")) else {
        return;
    };
    let (_front, addr) = front_end(&nats);
    let log = dir.join("worker.log");
    let _worker = worker(&nats, &log);

    // Not a job at all, published by hand: dropped, said so, not redelivered.
    nats.request("unitune.jobs.any", b"{not json");
    // A well-formed tune whose upload is missing: its record fails with the reason.
    let id = "00000000000000aa";
    let record = json!({
        "id": id, "kind": "tune", "session": "00000000000000bb", "edit": null,
        "state": "queued", "created": 0, "worker": null, "attempts": 0, "error": null
    });
    nats.request(
        &format!("$KV.unitune-jobs.{id}"),
        record.to_string().as_bytes(),
    );
    let message = json!({
        "id": id, "kind": "tune", "session": "00000000000000bb", "edit": null,
        "name": "x.png", "tune": {}
    });
    nats.request("unitune.jobs.any", message.to_string().as_bytes());
    let summary = until_finished(&addr, id, 60);
    assert_eq!(summary["state"], "failed", "{summary}");
    // Several ack deadlines later, it was started once and never again.
    std::thread::sleep(Duration::from_secs(3 * ACK_WAIT.parse::<u64>().unwrap()));
    let poison = events(&addr, id);
    assert_eq!(count(&poison, "started"), 1, "{:?}", kinds(&poison));
    let error = &poison.last().unwrap();
    assert_eq!(error.1, "error");
    let message = error.2["message"].as_str().unwrap();
    assert!(message.contains("upload.png"), "{message}");
    until_empty(&nats);
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(logged.contains("dropped a job message"), "{logged}");

    // The same submission twice with one Idempotency-Key: one job, one session.
    let key = "Idempotency-Key: upload-7f3a\r\n";
    let a = tune_with(&addr, 2, key);
    let b = tune_with(&addr, 2, key);
    assert_eq!(a["job"]["id"], b["job"]["id"]);
    assert_eq!(a["session"], b["session"]);
    let job = a["job"]["id"].as_str().unwrap();
    assert_eq!(until_finished(&addr, job, 60)["state"], "done");
    let other = tune_with(&addr, 2, "Idempotency-Key: another\r\n");
    assert_ne!(other["job"]["id"], a["job"]["id"]);
    until_finished(&addr, other["job"]["id"].as_str().unwrap(), 60);
    assert_eq!(sessions(&addr).as_array().unwrap().len(), 2);
    // An edit with a key, twice: one edit record.
    let session = a["session"].as_str().unwrap();
    let edit = |key: &str| {
        let (status, body) = http_with(
            &addr,
            "POST",
            &format!("/api/sessions/{session}/edits"),
            key,
            "application/json",
            br#"{"prompt": "a red circle", "steps": 2}"#,
        );
        assert_eq!(status, 202, "{body}");
        serde_json::from_str::<Value>(&body).unwrap()
    };
    let (e1, e2) = (
        edit("Idempotency-Key: edit-1\r\n"),
        edit("Idempotency-Key: edit-1\r\n"),
    );
    assert_eq!(e1["edit"], e2["edit"]);
    until_finished(&addr, e1["job"]["id"].as_str().unwrap(), 60);
    let edits = get_json(&addr, &format!("/api/sessions/{session}/edits"));
    assert_eq!(edits.as_array().unwrap().len(), 1, "{edits}");
}

/// Sixty jobs (a tune and two edits of it from each of twenty clients at once) over three
/// workers and one front end: each finishes exactly once, each job's events come in order.
/// Prints throughput and latency (BENCHMARKS.md has them from a release build).
#[test]
fn sixty_jobs_from_twenty_clients_over_three_workers() {
    let dir = temp_dir("load");
    let Some(nats) = Nats::start(&dir.join("js")) else {
        return;
    };
    let (_front, addr) = front_end(&nats);
    let _workers: Vec<Process> = (0..3)
        .map(|i| worker(&nats, &dir.join(format!("worker-{i}.log"))))
        .collect();
    let started = Instant::now();
    let clients: Vec<_> = (0..20)
        .map(|_| {
            let addr = addr.clone();
            std::thread::spawn(move || client(&addr))
        })
        .collect();
    let mut latencies: Vec<f64> = vec![];
    let mut workers = std::collections::BTreeSet::new();
    for client in clients {
        for (seconds, events) in client.join().unwrap() {
            latencies.push(seconds);
            let ids: Vec<u64> = events.iter().map(|e| e.0).collect();
            assert!(ids.windows(2).all(|w| w[0] < w[1]), "out of order: {ids:?}");
            let kinds = kinds(&events);
            assert_eq!(kinds.first(), Some(&"queued"), "{kinds:?}");
            assert_eq!(kinds.last(), Some(&"done"), "{kinds:?}");
            assert_eq!(count(&events, "started"), 1, "{kinds:?}");
            assert_eq!(count(&events, "done"), 1, "{kinds:?}");
            let start = events.iter().find(|e| e.1 == "started").unwrap();
            workers.insert(start.2["worker"].as_str().unwrap().to_string());
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    assert_eq!(latencies.len(), 60);
    assert_eq!(workers.len(), 3, "not every worker took jobs: {workers:?}");
    let listed = sessions(&addr);
    assert_eq!(listed.as_array().unwrap().len(), 20);
    for session in listed.as_array().unwrap() {
        let id = session["id"].as_str().unwrap();
        let edits = get_json(&addr, &format!("/api/sessions/{id}/edits"));
        assert_eq!(edits.as_array().unwrap().len(), 2, "{edits}");
        for edit in edits.as_array().unwrap() {
            assert_eq!(edit["status"], "done");
            assert_eq!(edit["images"].as_array().unwrap().len(), 1);
        }
    }
    assert!(get_json(&addr, "/api/jobs").as_array().unwrap().is_empty());
    until_empty(&nats);
    latencies.sort_by(f64::total_cmp);
    eprintln!(
        "60 jobs in {seconds:.1} s: {:.2} jobs/s; latency (submit to done) median {:.2} s, p90 {:.2} s, max {:.2} s",
        60.0 / seconds,
        latencies[29],
        latencies[53],
        latencies[59]
    );
}

/// One client: a tune, then two edits of its session, each followed to its last event.
fn client(addr: &str) -> Vec<(f64, Events)> {
    let mut done = vec![];
    let submitted = Instant::now();
    let answer = tune_with(addr, 2, "");
    let job = answer["job"]["id"].as_str().unwrap().to_string();
    let session = answer["session"].as_str().unwrap().to_string();
    let tune_events = events(addr, &job);
    done.push((submitted.elapsed().as_secs_f64(), tune_events));
    for prompt in ["a red circle", "a blue square"] {
        let submitted = Instant::now();
        let body = json!({ "prompt": prompt, "steps": 2 }).to_string();
        let (status, text) = http(
            addr,
            "POST",
            &format!("/api/sessions/{session}/edits"),
            "application/json",
            body.as_bytes(),
        );
        assert_eq!(status, 202, "{text}");
        let answer: Value = serde_json::from_str(&text).unwrap();
        let job = answer["job"]["id"].as_str().unwrap();
        done.push((submitted.elapsed().as_secs_f64(), events(addr, job)));
    }
    done
}

/// With two idle workers, the edits of a session go to the one that tuned it, which has its
/// UNet loaded (`loaded {cached: true}`), every time.
#[test]
fn edits_go_to_the_worker_that_has_their_session_loaded() {
    let dir = temp_dir("affinity");
    let Some(nats) = Nats::start(&dir.join("js")) else {
        return;
    };
    let (_front, addr) = front_end(&nats);
    let _workers: Vec<Process> = (0..2)
        .map(|i| worker(&nats, &dir.join(format!("worker-{i}.log"))))
        .collect();
    let answer = tune_with(&addr, 2, "");
    let tune_events = events(&addr, answer["job"]["id"].as_str().unwrap());
    let started = |events: &Events| {
        let (_, _, data) = events.iter().find(|e| e.1 == "started").unwrap();
        data["worker"].as_str().unwrap().to_string()
    };
    let tuner = started(&tune_events);
    let session = answer["session"].as_str().unwrap();
    for prompt in ["a red circle", "a blue square", "a green star"] {
        let body = json!({ "prompt": prompt, "steps": 2 }).to_string();
        let (status, text) = http(
            &addr,
            "POST",
            &format!("/api/sessions/{session}/edits"),
            "application/json",
            body.as_bytes(),
        );
        assert_eq!(status, 202, "{text}");
        let job: Value = serde_json::from_str(&text).unwrap();
        let edit_events = events(&addr, job["job"]["id"].as_str().unwrap());
        assert_eq!(started(&edit_events), tuner, "{:?}", kinds(&edit_events));
        let loaded = edit_events.iter().find(|e| e.1 == "loaded").unwrap();
        assert_eq!(loaded.2["cached"], true);
    }
}

/// A worker stopped with SIGTERM mid-tune gives the job back at once (`requeued`), and another
/// worker finishes it; no session is written twice.
#[test]
fn a_stopped_worker_gives_its_job_back() {
    let dir = temp_dir("stop");
    let Some(nats) = Nats::start(&dir.join("js")) else {
        return;
    };
    let (_front, addr) = front_end(&nats);
    let mut first = worker(&nats, &dir.join("first.log"));
    let job = tune(&addr, 400);
    common::until_running(&addr, &job);
    // SAFETY: signals our own child.
    unsafe { libc::kill(first.0.id() as i32, libc::SIGTERM) };
    let status = first.0.wait().unwrap();
    assert!(status.success(), "{status:?}");
    let _second = worker(&nats, &dir.join("second.log"));
    assert_eq!(until_finished(&addr, &job, 240)["state"], "done");
    let events = events(&addr, &job);
    assert_eq!(count(&events, "requeued"), 1, "{:?}", kinds(&events));
    assert_eq!(count(&events, "started"), 2);
    assert_eq!(sessions(&addr).as_array().unwrap().len(), 1);
}

/// An edit routed to a worker that has just died (its registry entry not yet expired) is moved
/// back to the shared subject by another worker once the entry expires, and finishes there.
#[test]
fn an_edit_routed_to_a_dead_worker_is_moved_to_a_live_one() {
    let dir = temp_dir("reap");
    let Some(nats) = Nats::start(&dir.join("js")) else {
        return;
    };
    let (_front, addr) = front_end(&nats);
    let mut workers: Vec<Option<Process>> = (0..2)
        .map(|i| Some(worker(&nats, &dir.join(format!("worker-{i}.log")))))
        .collect();
    let answer = tune_with(&addr, 2, "");
    let tune_events = events(&addr, answer["job"]["id"].as_str().unwrap());
    let (_, _, data) = tune_events.iter().find(|e| e.1 == "started").unwrap();
    let tuner = data["worker"].as_str().unwrap().to_string();
    let session = answer["session"].as_str().unwrap().to_string();
    // Kill the worker that tuned: which process it is, its log says.
    let index = (0..2)
        .find(|i| {
            std::fs::read_to_string(dir.join(format!("worker-{i}.log")))
                .unwrap()
                .contains(&tuner)
        })
        .unwrap();
    // Once its registry entry says it is idle with the session loaded, SIGKILL: the entry
    // outlives it (until it expires), so the front end still routes the edit to it.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let entry = nats.request(
            "$JS.API.STREAM.MSG.GET.KV_unitune-workers",
            json!({ "last_by_subj": format!("$KV.unitune-workers.{tuner}") })
                .to_string()
                .as_bytes(),
        );
        let info = entry["message"]["data"].as_str().map(|data| {
            use base64::Engine;
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(data)
                .unwrap();
            serde_json::from_slice::<Value>(&bytes).unwrap()
        });
        if info.is_some_and(|i| i["job"].is_null() && i["sessions"].to_string().contains(&session))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the tuner never said it was idle: {entry}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(workers[index].take());
    let (status, text) = http(
        &addr,
        "POST",
        &format!("/api/sessions/{session}/edits"),
        "application/json",
        br#"{"prompt": "a red circle", "steps": 2}"#,
    );
    assert_eq!(status, 202, "{text}");
    let job: Value = serde_json::from_str(&text).unwrap();
    let job = job["job"]["id"].as_str().unwrap();
    let routed = Instant::now();
    assert_eq!(until_finished(&addr, job, 90)["state"], "done");
    // It waited for the dead worker's entry to expire (10 s after its last heartbeat).
    assert!(
        routed.elapsed() > Duration::from_secs(3),
        "{:?}",
        routed.elapsed()
    );
    let events = events(&addr, job);
    let (_, _, data) = events.iter().find(|e| e.1 == "started").unwrap();
    assert_ne!(data["worker"].as_str().unwrap(), tuner);
    until_empty(&nats);
}
