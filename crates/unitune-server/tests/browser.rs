//! The page in a real headless Chromium (Debian's `chromium` and `chromium-driver`, which
//! `.ci/run` installs): upload the example scene, tune, edit, see the live preview and the result,
//! reload the page and find the session again.
//!
//! Without Chromium the test says so and passes on a developer's machine; under CI (`CI` set) a
//! missing browser is a failure. `UNITUNE_SCREENSHOT=path.png` saves the final page (the README's
//! screenshot: `UNITUNE_SCREENSHOT=docs/serve.png UNITUNE_SCREENSHOT_MODEL=<model folder>`).

mod common;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::json;
use unitune_server::{Limits, Server};

/// chromedriver on a free loopback port, killed on drop.
struct Driver {
    child: Child,
    port: u16,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn driver() -> Option<Driver> {
    let found = ["chromedriver", "/usr/lib/chromium/chromedriver"]
        .into_iter()
        .find(|d| Command::new(d).arg("--version").output().is_ok());
    let Some(binary) = found else {
        assert!(
            std::env::var_os("CI").is_none(),
            "chromedriver is missing: .ci/run installs Debian's chromium and chromium-driver"
        );
        eprintln!("skipped: no chromedriver (apt-get install chromium chromium-driver)");
        return None;
    };
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(binary)
        .args([format!("--port={port}"), "--allowed-ips=127.0.0.1".into()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    Some(Driver { child, port })
}

async fn connect(driver: &Driver) -> Client {
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({"args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1000"]}),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        match ClientBuilder::new(connector)
            .capabilities(caps.clone())
            .connect(&format!("http://127.0.0.1:{}", driver.port))
            .await
        {
            Ok(client) => return client,
            Err(e) if Instant::now() > deadline => panic!("chromedriver: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// Waits until `script` (a JavaScript expression) is true in the page.
async fn until(client: &Client, what: &str, script: &str) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let value = client
            .execute(&format!("return !!({script});"), vec![])
            .await
            .unwrap();
        if value == json!(true) {
            return;
        }
        let error = client
            .execute("return document.getElementById('error').hidden ? '' : document.getElementById('error-text').textContent;", vec![])
            .await
            .unwrap();
        assert!(
            error == json!(""),
            "while waiting for {what}, the page shows: {error}"
        );
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Picks `photo` in the page's file input, as a user does, and waits for the crop preview.
async fn pick_photo(client: &Client, photo: &Path) {
    let input = client.find(Locator::Id("file-input")).await.unwrap();
    input.send_keys(photo.to_str().unwrap()).await.unwrap();
    until(
        client,
        "the crop preview",
        "!document.getElementById('crop').hidden",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn upload_tune_edit_and_find_the_session_after_a_reload() {
    let Some(driver) = driver() else { return };
    let data = data_dir("browser");
    let mut config = config(
        &data,
        None,
        Limits {
            preview_every: 1,
            ..Limits::default()
        },
    );
    if let Some(model) = std::env::var_os("UNITUNE_SCREENSHOT_MODEL") {
        config.model = PathBuf::from(model);
        config.model_name = "the built-in shapes-64".into();
    }
    let server = Server::start(config).unwrap();
    let client = connect(&driver).await;
    client.goto(&url(&server, "/")).await.unwrap();
    until(
        &client,
        "the page",
        "document.getElementById('app').hidden === false",
    )
    .await;

    let scene = repo().join("examples/scene.png").canonicalize().unwrap();
    pick_photo(&client, &scene).await;
    // The form starts from the model's tune (whole-weight `most` here, so no rank to give);
    // this tune is a rank-4 LoRA.
    let layers = client
        .execute("return [document.getElementById('tune-layers').value, document.getElementById('tune-lora-rank').disabled, document.getElementById('tune-encoding').value, document.getElementById('tune-encoding').disabled];", vec![])
        .await
        .unwrap();
    assert_eq!(layers, json!(["most", true, "q8", false]));
    client.execute("document.getElementById('tune-steps').value = 8; document.getElementById('tune-batch').value = 1; const layers = document.getElementById('tune-layers'); layers.value = 'lora'; layers.dispatchEvent(new Event('change')); document.getElementById('tune-lora-rank').value = 4;", vec![]).await.unwrap();
    assert_eq!(
        client
            .execute(
                "return [document.getElementById('tune-lora-rank').disabled, document.getElementById('tune-encoding').disabled];",
                vec![]
            )
            .await
            .unwrap(),
        json!([false, true])
    );
    client
        .find(Locator::Id("tune-button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    until(&client, "the tuned session", "document.querySelector('#session-list li.selected') && !document.getElementById('edit-panel').hidden").await;

    let prompt = client.find(Locator::Id("prompt")).await.unwrap();
    prompt
        .send_keys("a small purple circle above a large black square on a blue background")
        .await
        .unwrap();
    client.execute("document.getElementById('steps').value = 12; document.getElementById('guidance').value = 3; document.getElementById('seed').value = 2; document.getElementById('sweep-guidance').value = '3,6';", vec![]).await.unwrap();
    // The edit waits behind a long tune until the page shows its place in the queue, so that the
    // page follows it from its start (a tiny edit can end before, and its previews with it).
    let http = reqwest::Client::new();
    let blocker = Blocker::start(&http, &server).await;
    // Every src the preview gets, even one replaced before the next poll.
    client.execute("window.previews = []; new MutationObserver((records) => { const img = document.getElementById('preview-image'); for (const r of records) window.previews.push(r.oldValue || ''); window.previews.push(img.src); }).observe(document.getElementById('preview-image'), {attributes: true, attributeFilter: ['src'], attributeOldValue: true});", vec![]).await.unwrap();
    client
        .find(Locator::Id("edit-button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    until(
        &client,
        "the edit's place in the queue",
        "document.getElementById('edit-status').textContent === 'queued, place 1'",
    )
    .await;
    blocker.release(&http, &server).await;
    // A live preview of the denoising shows up before the result does.
    until(
        &client,
        "a live preview",
        "window.previews.some((src) => src.startsWith('data:image/png'))",
    )
    .await;
    until(&client, "the result in the gallery", "document.querySelector('#gallery img.result') && document.querySelector('#gallery img.result').naturalWidth > 0").await;
    until(
        &client,
        "the edit to finish",
        "document.getElementById('edit-status').textContent === 'done'",
    )
    .await;
    let settings = client
        .find(Locator::Css("#gallery .settings"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        settings.contains("purple circle")
            && settings.contains("guidance 3/6")
            && settings.contains("seed 2"),
        "{settings}"
    );
    // The sweep's two images, side by side as in its contact sheet.
    until(
        &client,
        "both images of the sweep",
        "document.querySelectorAll('#gallery img.result').length === 2",
    )
    .await;

    if let Some(path) = std::env::var_os("UNITUNE_SCREENSHOT") {
        std::fs::write(path, client.screenshot().await.unwrap()).unwrap();
    }

    client.refresh().await.unwrap();
    until(
        &client,
        "the session list after a reload",
        "document.querySelectorAll('#session-list li.session').length === 1",
    )
    .await;
    let listed = client
        .find(Locator::Css("#session-list li.session"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        listed.contains("scene.png")
            && listed.contains("beikkpic")
            && listed.contains("LoRA rank 4"),
        "{listed}"
    );
    client
        .find(Locator::Css("#session-list li.session"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    until(
        &client,
        "the gallery of the session",
        "document.querySelectorAll('#gallery .card').length === 1",
    )
    .await;

    // A whole-weight tune stored in q2: the page shows its distillation, then lists its code.
    pick_photo(&client, &scene).await;
    client.execute("window.statuses = []; const status = document.getElementById('tune-status'); new MutationObserver(() => window.statuses.push(status.textContent)).observe(status, {childList: true, characterData: true, subtree: true}); document.getElementById('tune-steps').value = 4; document.getElementById('tune-batch').value = 1; const layers = document.getElementById('tune-layers'); layers.value = 'most'; layers.dispatchEvent(new Event('change')); document.getElementById('tune-encoding').value = 'q2'; document.getElementById('tune-button').click();", vec![]).await.unwrap();
    until(
        &client,
        "the q2 session",
        "document.querySelectorAll('#session-list li.session').length === 2",
    )
    .await;
    let listed = client
        .execute("return [...document.querySelectorAll('#session-list li.session')].map((li) => li.textContent);", vec![])
        .await
        .unwrap();
    assert!(listed.to_string().contains("most layers, q2"), "{listed}");
    let statuses = client
        .execute("return window.statuses;", vec![])
        .await
        .unwrap();
    assert!(statuses.to_string().contains("distilling"), "{statuses}");
    client.close().await.unwrap();
}
