//! 100 concurrent clients on one server (loopback only, bounded in time): each lists the
//! sessions, submits an edit (retrying after a 429 as its Retry-After says) and follows its events
//! to the end. Nothing may be lost: no 5xx, every accepted job finishes, each once. The latency
//! percentiles are printed (`--nocapture`) for BENCHMARKS.md; they are not asserted.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const CLIENTS: usize = 100;

struct Timings {
    list: f64,
    submit: f64,
    done: f64,
    retries: usize,
}

async fn client_run(client: reqwest::Client, base: String, session: String, i: usize) -> Timings {
    let t0 = Instant::now();
    let list = client
        .get(format!("{base}/api/sessions"))
        .send()
        .await
        .unwrap();
    assert_eq!(list.status(), 200);
    let list_s = t0.elapsed().as_secs_f64();

    let body = json!({"prompt": format!("edit {i}"), "steps": 1, "seed": i});
    let mut retries = 0;
    let t1 = Instant::now();
    let answer: Value = loop {
        let response = client
            .post(format!("{base}/api/sessions/{session}/edits"))
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        assert!(status < 500, "client {i}: {status}");
        if status == 429 {
            let after: u64 = response.headers()["retry-after"]
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            retries += 1;
            assert!(retries < 200, "client {i} never got in");
            // Waits as told, at most a second, so that the test stays short.
            tokio::time::sleep(Duration::from_millis((after * 1000).min(1000))).await;
            continue;
        }
        assert_eq!(status, 202, "client {i}");
        break response.json().await.unwrap();
    };
    let submit_s = t1.elapsed().as_secs_f64();
    let job = answer["job"]["id"].as_str().unwrap();
    let text = client
        .get(format!("{base}/api/jobs/{job}/events"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let events = parse_events(&text);
    let kinds: Vec<&str> = events.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(kinds.last(), Some(&"done"), "client {i}: {kinds:?}");
    assert_eq!(
        kinds.iter().filter(|k| **k == "image").count(),
        1,
        "client {i}"
    );
    let seqs_in_order = text
        .lines()
        .filter_map(|l| l.strip_prefix("id:"))
        .map(|n| n.trim().parse::<usize>().unwrap())
        .collect::<Vec<_>>()
        .windows(2)
        .all(|w| w[0] < w[1]);
    assert!(seqs_in_order, "client {i}: events out of order");
    Timings {
        list: list_s,
        submit: submit_s,
        done: t1.elapsed().as_secs_f64(),
        retries,
    }
}

fn percentiles(mut xs: Vec<f64>) -> String {
    xs.sort_by(f64::total_cmp);
    let at = |p: f64| xs[((xs.len() - 1) as f64 * p).round() as usize] * 1000.0;
    format!(
        "p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        at(0.5),
        at(0.9),
        at(0.99),
        at(1.0)
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hundred_concurrent_clients_lose_nothing() {
    let data = data_dir("load");
    let server = start(&data);
    let client = reqwest::Client::new();
    let session = tuned(&client, &server).await;
    let base = format!("http://{}", server.addr);
    let started = Instant::now();
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|i| tokio::spawn(client_run(client.clone(), base.clone(), session.clone(), i)))
        .collect();
    let mut timings = vec![];
    for task in tasks {
        timings.push(
            tokio::time::timeout(Duration::from_secs(600), task)
                .await
                .expect("the load test is bounded in time")
                .unwrap(),
        );
    }
    let wall = started.elapsed().as_secs_f64();
    // Every accepted job made exactly one edit record, each with its one image.
    let edits: Value = client
        .get(format!("{base}/api/sessions/{session}/edits"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let edits = edits.as_array().unwrap();
    assert_eq!(edits.len(), CLIENTS);
    assert!(edits
        .iter()
        .all(|e| e["status"] == "done" && e["images"].as_array().unwrap().len() == 1));
    let mut prompts: Vec<&str> = edits
        .iter()
        .map(|e| e["params"]["prompt"].as_str().unwrap())
        .collect();
    prompts.sort();
    prompts.dedup();
    assert_eq!(prompts.len(), CLIENTS);

    let retries: usize = timings.iter().map(|t| t.retries).sum();
    println!("{CLIENTS} clients, {wall:.1} s in all, {retries} answers 429 then retried");
    println!(
        "list sessions:            {}",
        percentiles(timings.iter().map(|t| t.list).collect())
    );
    println!(
        "submit (incl. retries):   {}",
        percentiles(timings.iter().map(|t| t.submit).collect())
    );
    println!(
        "submit to done:           {}",
        percentiles(timings.iter().map(|t| t.done).collect())
    );
}
