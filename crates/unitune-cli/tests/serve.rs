//! `unitune serve` as a user starts it: killed (SIGKILL) or stopped with Ctrl-C (SIGINT) in the
//! middle of a tune, it leaves no half session, and a restart lists exactly the finished ones.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

struct Serve {
    child: Child,
    addr: String,
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(data: &Path) -> Serve {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let child = Command::new(env!("CARGO_BIN_EXE_unitune"))
        .args(["serve", "--model"])
        .arg(fixtures().join("tiny-sd1"))
        .arg("--data")
        .arg(data)
        .args(["--listen", &addr])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while TcpStream::connect(&addr).is_err() {
        assert!(Instant::now() < deadline, "serve did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    Serve { child, addr }
}

/// One HTTP/1.1 request; returns the status and the body.
fn http(addr: &str, method: &str, path: &str, content_type: &str, body: &[u8]) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(body).unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).unwrap();
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text[9..12].parse().unwrap();
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    (status, body)
}

/// Queues a tune of the example scene with `steps` steps; returns the job id.
fn tune(addr: &str, steps: usize) -> String {
    let image = std::fs::read(fixtures().join("../../examples/scene.png")).unwrap();
    let boundary = "unitune-test-boundary";
    let mut body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"settings\"\r\n\r\n{{\"steps\": {steps}, \"batch\": 1}}\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"scene.png\"\r\nContent-Type: image/png\r\n\r\n"
    )
    .into_bytes();
    body.extend_from_slice(&image);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    let (status, text) = http(
        addr,
        "POST",
        "/api/sessions",
        &format!("multipart/form-data; boundary={boundary}"),
        &body,
    );
    assert_eq!(status, 202, "{text}");
    let answer: serde_json::Value = serde_json::from_str(&text).unwrap();
    answer["job"]["id"].as_str().unwrap().to_string()
}

/// Waits until `job` has taken a few steps of its work.
fn until_running(addr: &str, job: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, state) = http(addr, "GET", &format!("/api/jobs/{job}"), "text/plain", b"");
        if state.contains("\"running\"") {
            std::thread::sleep(Duration::from_millis(300));
            return;
        }
        assert!(Instant::now() < deadline, "the tune never started: {state}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn sessions(addr: &str) -> serde_json::Value {
    let (status, body) = http(addr, "GET", "/api/sessions", "text/plain", b"");
    assert_eq!(status, 200);
    serde_json::from_str(&body).unwrap()
}

/// Every file under `dir`.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut all = vec![];
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            all.extend(files(&path));
        } else {
            all.push(path);
        }
    }
    all
}

#[test]
fn killed_or_interrupted_mid_tune_leaves_no_half_session() {
    let data = std::env::temp_dir().join(format!("unitune-cli-serve-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);

    // One finished session first: it must survive everything below.
    let server = serve(&data);
    let quick = tune(&server.addr, 2);
    let deadline = Instant::now() + Duration::from_secs(60);
    while sessions(&server.addr).as_array().unwrap().is_empty() {
        assert!(Instant::now() < deadline, "job {quick} did not finish");
        std::thread::sleep(Duration::from_millis(100));
    }
    let before = files(&data);

    // SIGKILL in the middle of a long tune.
    let job = tune(&server.addr, 1000);
    until_running(&server.addr, &job);
    drop(server);
    assert_eq!(files(&data), before, "a killed tune left files behind");

    // Ctrl-C in the middle of a long tune: the server stops cleanly, writing nothing.
    let mut server = serve(&data);
    assert_eq!(sessions(&server.addr).as_array().unwrap().len(), 1);
    let job = tune(&server.addr, 1000);
    until_running(&server.addr, &job);
    let pid = server.child.id() as i32;
    // SAFETY: sends a signal to our own child process.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGINT) }, 0);
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "serve did not stop at Ctrl-C");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
    assert_eq!(
        files(&data),
        before,
        "an interrupted tune left files behind"
    );

    let server = serve(&data);
    let listed = sessions(&server.addr);
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
}
