//! `unitune serve` as a user starts it: killed (SIGKILL) or stopped with Ctrl-C (SIGINT) in the
//! middle of a tune, it leaves no half session, and a restart lists exactly the finished ones.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{fixtures, free_port, sessions, tune, until_running, wait_for_port};

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
    let addr = format!("127.0.0.1:{}", free_port());
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
    wait_for_port(&addr, "serve");
    Serve { child, addr }
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
