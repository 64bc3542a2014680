//! What the tests of `unitune serve` and `unitune worker` share: a free port, plain HTTP/1.1
//! requests, the upload of a tune.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits until something listens on `addr`.
pub fn wait_for_port(addr: &str, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "{what} did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One HTTP/1.1 request with extra header lines; returns the status and the body.
pub fn http_with(
    addr: &str,
    method: &str,
    path: &str,
    headers: &str,
    content_type: &str,
    body: &[u8],
) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{headers}Content-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(body).unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).unwrap();
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text[9..12].parse().unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    (
        status,
        if chunked {
            dechunk(body)
        } else {
            body.to_string()
        },
    )
}

/// The body of a chunked transfer: each chunk is its size in hex, CRLF, the bytes, CRLF.
fn dechunk(mut rest: &str) -> String {
    let mut body = String::new();
    while let Some((size, after)) = rest.split_once("\r\n") {
        let size = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if size == 0 || after.len() < size {
            break;
        }
        body.push_str(&after[..size]);
        rest = after[size..].trim_start_matches("\r\n");
    }
    body
}

pub fn http(
    addr: &str,
    method: &str,
    path: &str,
    content_type: &str,
    body: &[u8],
) -> (u16, String) {
    http_with(addr, method, path, "", content_type, body)
}

pub fn get_json(addr: &str, path: &str) -> serde_json::Value {
    let (status, body) = http(addr, "GET", path, "text/plain", b"");
    assert_eq!(status, 200, "GET {path}: {body}");
    serde_json::from_str(&body).unwrap()
}

/// Queues a tune of the example scene with `steps` steps (and `headers`); returns the answer.
pub fn tune_with(addr: &str, steps: usize, headers: &str) -> serde_json::Value {
    let image = std::fs::read(fixtures().join("../../examples/scene.png")).unwrap();
    let boundary = "unitune-test-boundary";
    let mut body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"settings\"\r\n\r\n{{\"steps\": {steps}, \"batch\": 1}}\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"scene.png\"\r\nContent-Type: image/png\r\n\r\n"
    )
    .into_bytes();
    body.extend_from_slice(&image);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    let (status, text) = http_with(
        addr,
        "POST",
        "/api/sessions",
        headers,
        &format!("multipart/form-data; boundary={boundary}"),
        &body,
    );
    assert_eq!(status, 202, "{text}");
    serde_json::from_str(&text).unwrap()
}

/// Queues a tune; returns the job id.
pub fn tune(addr: &str, steps: usize) -> String {
    tune_with(addr, steps, "")["job"]["id"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Waits until `job` has taken a few steps of its work.
pub fn until_running(addr: &str, job: &str) {
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

pub fn sessions(addr: &str) -> serde_json::Value {
    get_json(addr, "/api/sessions")
}

/// A job's server-sent events: (id, kind, data) each.
pub type Events = Vec<(u64, String, serde_json::Value)>;

/// A job's server-sent events, read to the end.
pub fn events(addr: &str, job: &str) -> Events {
    let (status, body) = http(
        addr,
        "GET",
        &format!("/api/jobs/{job}/events"),
        "text/plain",
        b"",
    );
    assert_eq!(status, 200, "{body}");
    let mut all = vec![];
    for block in body.split("\n\n") {
        let field = |name: &str| {
            block
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(str::to_string)
        };
        if let (Some(id), Some(kind), Some(data)) =
            (field("id: "), field("event: "), field("data: "))
        {
            // Chunked transfer framing can sit between blocks; the fields themselves are whole.
            let id = id.trim().parse().unwrap();
            let data = serde_json::from_str(data.trim()).unwrap_or(serde_json::Value::Null);
            all.push((id, kind.trim().to_string(), data));
        }
    }
    all
}
