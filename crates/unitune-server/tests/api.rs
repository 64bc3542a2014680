//! The HTTP API against a real server on an ephemeral loopback port (tiny SD1 fixture): tune,
//! edit, events in order, cancel, restart persistence, and the limits.

mod common;

use common::*;
use serde_json::{json, Value};
use unitune_server::Limits;

fn kinds(events: &[(String, Value)]) -> Vec<&str> {
    events.iter().map(|(k, _)| k.as_str()).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn tune_then_edit_with_events_in_order() {
    let data = data_dir("flow");
    let server = start_with(
        &data,
        Limits {
            preview_every: 2,
            ..Limits::default()
        },
    );
    let client = reqwest::Client::new();
    let info: Value = get_json(&client, &server, "/api/info").await;
    assert_eq!(info["size"], json!([64, 64]));
    assert_eq!(info["tune"]["steps"], 128);

    let (job, session) = queue_tune(&client, &server, QUICK).await;
    let events = job_events(&client, &server, &job).await;
    let names = kinds(&events);
    assert_eq!(&names[..2], ["queued", "started"], "{names:?}");
    assert_eq!(&names[names.len() - 2..], ["session", "done"]);
    let steps: Vec<u64> = events
        .iter()
        .filter(|(k, _)| k == "progress")
        .map(|(_, d)| d["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, [0, 1, 2]);
    let last_progress = &events[names.len() - 3].1;
    assert!(
        last_progress["loss"].as_f64().unwrap() > 0.0,
        "{last_progress}"
    );
    let meta = &events[names.len() - 2].1;
    assert_eq!(
        (meta["id"].as_str(), meta["token"].as_str()),
        (Some(session.as_str()), Some("beikkpic"))
    );

    let sessions: Value = get_json(&client, &server, "/api/sessions").await;
    assert_eq!(sessions.as_array().unwrap().len(), 1);
    assert_eq!(sessions[0]["settings"]["seed"], 1);
    let photo = client
        .get(url(&server, &format!("/api/sessions/{session}/image")))
        .send()
        .await
        .unwrap();
    assert_eq!(photo.headers()["content-type"], "image/png");

    // A sweep of two guidance values: the session is still loaded, previews every 2 steps.
    let blocker = Blocker::start(&client, &server).await;
    let body = json!({"prompt": "a red circle", "steps": 5, "seed": 3, "sweep_guidance": [2, 4]});
    let answer: Value = post_json(
        &client,
        &server,
        &format!("/api/sessions/{session}/edits"),
        &body,
    )
    .await;
    let (job, edit) = (
        answer["job"]["id"].as_str().unwrap(),
        answer["edit"].as_str().unwrap(),
    );
    let events = job_events_behind(&client, &server, job, blocker).await;
    // One "queued" per place the edit had behind the blocker.
    let events: Vec<_> = events
        .into_iter()
        .skip_while(|(k, _)| k == "queued")
        .collect();
    let names = kinds(&events);
    assert_eq!(&names[..2], ["started", "loaded"], "{names:?}");
    assert_eq!(events[1].1["cached"], true);
    assert_eq!(names.iter().filter(|k| **k == "image").count(), 2);
    assert_eq!(
        names.iter().filter(|k| **k == "preview").count(),
        4,
        "{names:?}"
    );
    assert_eq!(&names[names.len() - 2..], ["sheet", "done"]);
    let preview = events.iter().find(|(k, _)| k == "preview").unwrap();
    assert!(preview.1["image"]
        .as_str()
        .unwrap()
        .starts_with("data:image/png;base64,"));

    let record: Value = client
        .get(url(
            &server,
            &format!("/api/sessions/{session}/edits/{edit}"),
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(record["status"], "done");
    assert_eq!(record["params"]["seed"], 3);
    assert_eq!(record["images"][1]["guidance"], 4.0);
    assert_eq!(record["images"][1]["suffix"], "-g4");
    let png = client
        .get(url(&server, record["urls"][1].as_str().unwrap()))
        .send()
        .await
        .unwrap();
    let image = image::load_from_memory(&png.bytes().await.unwrap()).unwrap();
    assert_eq!((image.width(), image.height()), (64, 64));
    let sheet = client
        .get(url(&server, record["sheet_urls"][0].as_str().unwrap()))
        .send()
        .await
        .unwrap();
    assert_eq!(sheet.status(), 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restart_lists_sessions_and_edits_again() {
    let data = data_dir("restart");
    let client = reqwest::Client::new();
    let (session, edit) = {
        let server = start(&data);
        let session = tuned(&client, &server).await;
        let answer: Value = post_json(
            &client,
            &server,
            &format!("/api/sessions/{session}/edits"),
            &json!({"prompt": "a blue square", "steps": 2}),
        )
        .await;
        let events = job_events(&client, &server, answer["job"]["id"].as_str().unwrap()).await;
        assert_eq!(events.last().unwrap().0, "done");
        server.stop();
        (session, answer["edit"].as_str().unwrap().to_string())
    };
    let server = start(&data);
    let sessions: Value = get_json(&client, &server, "/api/sessions").await;
    assert_eq!(sessions[0]["id"], session.as_str());
    let edits: Value = get_json(&client, &server, &format!("/api/sessions/{session}/edits")).await;
    assert_eq!(edits[0]["id"], edit.as_str());
    // A fresh server loads the session from its file for the next edit.
    let answer: Value = post_json(
        &client,
        &server,
        &format!("/api/sessions/{session}/edits"),
        &json!({"prompt": "a blue square", "steps": 2}),
    )
    .await;
    let events = job_events(&client, &server, answer["job"]["id"].as_str().unwrap()).await;
    let loaded = events.iter().find(|(k, _)| k == "loaded").unwrap();
    assert_eq!(loaded.1["cached"], false);
    assert_eq!(events.last().unwrap().0, "done");
}

#[tokio::test(flavor = "multi_thread")]
async fn cancel_stops_running_and_queued_jobs_and_leaves_no_session() {
    let data = data_dir("cancel");
    let server = start(&data);
    let client = reqwest::Client::new();
    let (running, _) = queue_tune(&client, &server, LONG).await;
    let (queued, _) = queue_tune(&client, &server, QUICK).await;
    let jobs: Value = get_json(&client, &server, "/api/jobs").await;
    assert_eq!(jobs[1]["position"], 1, "{jobs}");

    assert_eq!(cancel(&client, &server, &queued).await.status(), 202);
    assert_eq!(
        kinds(&job_events(&client, &server, &queued).await),
        ["queued", "cancelled"]
    );
    // Wait until the long tune has taken a step, then cancel it.
    EventStream::open(&client, &server, &running)
        .await
        .until("progress")
        .await;
    assert_eq!(cancel(&client, &server, &running).await.status(), 202);
    let events = job_events(&client, &server, &running).await;
    assert_eq!(events.last().unwrap().0, "cancelled");
    let sessions: Value = get_json(&client, &server, "/api/sessions").await;
    assert_eq!(sessions, json!([]));
    assert_eq!(std::fs::read_dir(data.join("sessions")).unwrap().count(), 0);
}

/// The status and JSON error of a request; every error must be JSON naming what is wrong.
async fn error(response: reqwest::Response) -> (u16, String) {
    let status = response.status().as_u16();
    let body: Value = response
        .json()
        .await
        .unwrap_or_else(|e| panic!("{status}: not JSON ({e})"));
    let message = body["error"]
        .as_str()
        .unwrap_or_else(|| panic!("{status}: {body}"));
    (status, message.to_string())
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_get_the_right_4xx_and_a_clear_json_error() {
    let data = data_dir("bad");
    let server = start_with(
        &data,
        Limits {
            max_upload_bytes: 200_000,
            max_body_bytes: 20_000,
            max_edits_per_job: 8,
            ..Limits::default()
        },
    );
    let client = reqwest::Client::new();
    let session = tuned(&client, &server).await;
    let sessions = url(&server, "/api/sessions");
    let edits = url(&server, &format!("/api/sessions/{session}/edits"));

    // A PNG whose header claims 100000 x 100000 pixels: refused from the header.
    let bomb = claiming(100_000);
    let uploads: Vec<(reqwest::multipart::Form, u16, &str)> = vec![
        (tune_form(b"not a picture".to_vec(), QUICK), 400, "image"),
        (tune_form(bomb, QUICK), 413, "100000x100000"),
        (tune_form(vec![0; 300_000], QUICK), 413, ""),
        (tune_form(scene(), "{not json"), 400, "settings"),
        (tune_form(scene(), r#"{"stepz": 3}"#), 400, "stepz"),
        (tune_form(scene(), r#"{"steps": 0}"#), 400, "steps"),
        (tune_form(scene(), r#"{"lr": -1}"#), 400, "lr"),
        (tune_form(scene(), r#"{"steps": 100000}"#), 400, "limit"),
        (tune_form(scene(), r#"{"optimizer": "sgd"}"#), 400, "sgd"),
        (
            tune_form(scene(), r#"{"distill_steps": 100000}"#),
            400,
            "distill_steps",
        ),
        (
            tune_form(scene(), r#"{"delta_encoding": "q2", "distill_lr": 0}"#),
            400,
            "distill-lr",
        ),
        (
            tune_form(
                scene(),
                r#"{"delta_encoding": "q2", "distill_difference_weight": -2}"#,
            ),
            400,
            "distill-difference-weight",
        ),
        (
            tune_form(
                scene(),
                &format!(r#"{{"distill_prompts": {:?}}}"#, ["a"; 17]),
            ),
            400,
            "distill_prompts",
        ),
        (
            reqwest::multipart::Form::new().text("settings", QUICK),
            400,
            "image",
        ),
        (
            reqwest::multipart::Form::new().text("photo", "x"),
            400,
            "photo",
        ),
    ];
    for (i, (form, status, needle)) in uploads.into_iter().enumerate() {
        let response = client.post(&sessions).multipart(form).send().await.unwrap();
        let (got, message) = error(response).await;
        assert_eq!(got, status, "upload {i}: {message}");
        assert!(message.contains(needle), "upload {i}: {message}");
    }
    let response = client.post(&sessions).body("plain").send().await.unwrap();
    assert!(matches!(error(response).await.0, 400 | 415));

    let long = "a".repeat(1001);
    let bad_edits = [
        (json!({"prompt": ""}), 400, "prompt"),
        (json!({"prompt": long}), 400, "limit"),
        (json!({"prompt": "x", "guidance": -1}), 400, "guidance"),
        (json!({"prompt": "x", "start": 0}), 400, "start"),
        (json!({"prompt": "x", "start": 1.5}), 400, "start"),
        (json!({"prompt": "x", "interpolate": 2}), 400, "interpolate"),
        (json!({"prompt": "x", "steps": 0}), 400, "steps"),
        (
            json!({"prompt": "x", "seeds": 3, "sweep_guidance": [1, 2, 3]}),
            400,
            "limit",
        ),
        (
            json!({"prompt": "x", "sweep_guidance": [2, 2]}),
            400,
            "twice",
        ),
        (
            json!({"prompt": "x", "mask": "data:image/png;base64,@@@"}),
            400,
            "mask",
        ),
        (
            json!({"prompt": "x", "mask": "data:image/png;base64,aGVsbG8=", "auto_mask": false}),
            400,
            "mask",
        ),
        (
            json!({"prompt": "x", "auto_mask": true, "mask_threshold": 0}),
            400,
            "mask-threshold",
        ),
        (json!({"prompt": "x", "colour": "red"}), 422, "colour"),
        (json!({"prompt": "x", "scheduler": "plms"}), 422, "plms"),
        (json!({"prompt": "x", "steps": "many"}), 422, "steps"),
        (json!({"prompt": "x".repeat(30_000)}), 413, ""),
    ];
    for (i, (body, status, needle)) in bad_edits.into_iter().enumerate() {
        let response = client.post(&edits).json(&body).send().await.unwrap();
        let (got, message) = error(response).await;
        assert_eq!(got, status, "edit {i}: {message}");
        assert!(message.contains(needle), "edit {i}: {message}");
    }
    let response = client
        .post(&edits)
        .body("{\"prompt\": ")
        .header("content-type", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(error(response).await.0, 400);
    let response = client
        .post(&edits)
        .body("{\"prompt\": \"x\"}")
        .send()
        .await
        .unwrap();
    assert_eq!(error(response).await.0, 415);

    let not_found = [
        "/api/sessions/0123456789abcdef",
        "/api/sessions/..%2F..%2Fetc",
        "/api/sessions/0123456789abcdef/edits",
        "/api/jobs/0123456789abcdef",
        "/api/jobs/../../etc/passwd/events",
        "/api/nothing-here",
    ];
    for path in not_found {
        let (status, message) = error(client.get(url(&server, path)).send().await.unwrap()).await;
        assert_eq!(status, 404, "{path}: {message}");
    }
    let response = client
        .get(url(
            &server,
            &format!("/api/sessions/{session}/edits/0123456789abcdef/images/0"),
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(error(response).await.0, 404);
    let response = client
        .post(url(&server, "/api/jobs/0123456789abcdef/cancel"))
        .send()
        .await
        .unwrap();
    assert_eq!(error(response).await.0, 404);

    // A page on another site cannot make this server work or delete things.
    let response = client
        .post(&edits)
        .header("origin", "http://evil.example")
        .json(&json!({"prompt": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(error(response).await.0, 403);
    let response = client
        .delete(url(&server, &format!("/api/sessions/{session}")))
        .header("sec-fetch-site", "cross-site")
        .send()
        .await
        .unwrap();
    assert_eq!(error(response).await.0, 403);
    // The same origin is fine.
    let response = client
        .get(url(&server, &format!("/api/sessions/{session}")))
        .header("origin", format!("http://{}", server.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    let response = client
        .delete(url(&server, &format!("/api/sessions/{session}")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 204);
    let response = client
        .get(url(&server, &format!("/api/sessions/{session}")))
        .send()
        .await
        .unwrap();
    assert_eq!(error(response).await.0, 404);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_queue_answers_429_and_a_busy_session_cannot_be_deleted() {
    let data = data_dir("full");
    let server = start_with(
        &data,
        Limits {
            queue_capacity: 1,
            ..Limits::default()
        },
    );
    let client = reqwest::Client::new();
    let session = tuned(&client, &server).await;
    let (running, _) = queue_tune(&client, &server, LONG).await;
    // Wait until it runs, so that the queue itself is empty.
    let mut stream = EventStream::open(&client, &server, &running).await;
    stream.until("started").await;
    let edits = url(&server, &format!("/api/sessions/{session}/edits"));
    let queued = client
        .post(&edits)
        .json(&json!({"prompt": "x", "steps": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(queued.status(), 202);
    let full = client
        .post(&edits)
        .json(&json!({"prompt": "x", "steps": 2}))
        .send()
        .await
        .unwrap();
    assert!(
        full.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse::<u64>()
            .unwrap()
            >= 1
    );
    let (status, message) = error(full).await;
    assert_eq!(
        (status, message.contains("queue is full")),
        (429, true),
        "{message}"
    );
    let busy = client
        .delete(url(&server, &format!("/api/sessions/{session}")))
        .send()
        .await
        .unwrap();
    assert_eq!(error(busy).await.0, 409);
    cancel(&client, &server, &running).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn with_a_token_every_api_request_needs_it() {
    let data = data_dir("token");
    let server =
        unitune_server::Server::start(config(&data, Some("s3cret-token"), Limits::default()))
            .unwrap();
    let client = reqwest::Client::new();
    // The page loads, so that it can show its login form; the API does not.
    assert_eq!(
        client.get(url(&server, "/")).send().await.unwrap().status(),
        200
    );
    let (status, message) = error(
        client
            .get(url(&server, "/api/sessions"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 401);
    assert!(message.contains("token"), "{message}");
    let wrong = client
        .get(url(&server, "/api/sessions"))
        .bearer_auth("s3cret-tokem")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    let right = client
        .get(url(&server, "/api/sessions"))
        .bearer_auth("s3cret-token")
        .send()
        .await
        .unwrap();
    assert_eq!(right.status(), 200);

    let no_redirects = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let login = |token: &'static str| {
        no_redirects
            .post(url(&server, "/api/login"))
            .form(&[("token", token)])
            .send()
    };
    assert_eq!(login("nope").await.unwrap().status(), 401);
    let response = login("s3cret-token").await.unwrap();
    assert_eq!(response.status(), 303);
    let cookie = response.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let with_cookie = client
        .get(url(&server, "/api/sessions"))
        .header("cookie", cookie.split(';').next().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(with_cookie.status(), 200);

    // Listening beyond this machine without a token is refused before anything starts.
    let mut open = config(&data, None, Limits::default());
    open.listen = "0.0.0.0:0".parse().unwrap();
    let err = unitune_server::Server::start(open).err().unwrap();
    assert!(err.contains("--token"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_openapi_document_lists_every_route() {
    let data = data_dir("openapi");
    let server = start(&data);
    let doc: Value = reqwest::get(url(&server, "/api/openapi.json"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let paths = doc["paths"].as_object().unwrap();
    for path in [
        "/api/info",
        "/api/login",
        "/api/sessions",
        "/api/sessions/{id}",
        "/api/sessions/{id}/image",
        "/api/sessions/{id}/edits",
        "/api/sessions/{id}/edits/{edit}",
        "/api/sessions/{id}/edits/{edit}/images/{n}",
        "/api/sessions/{id}/edits/{edit}/sheets/{n}",
        "/api/jobs",
        "/api/jobs/{id}",
        "/api/jobs/{id}/events",
        "/api/jobs/{id}/cancel",
    ] {
        assert!(paths.contains_key(path), "{path} is not documented");
    }
    // Every field a tune or an edit takes is documented.
    let fields = [
        (
            "TuneParams",
            serde_json::to_value(unitune_server::params::TuneParams::default()).unwrap(),
        ),
        (
            "EditParams",
            serde_json::to_value(unitune_server::params::EditParams::default()).unwrap(),
        ),
    ];
    for (schema, defaults) in fields {
        let documented = doc["components"]["schemas"][schema]["properties"]
            .as_object()
            .unwrap();
        for field in defaults.as_object().unwrap().keys() {
            assert!(
                documented.contains_key(field),
                "{schema}.{field} is not documented"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_goes_away_leaves_its_job_running_and_readable() {
    let data = data_dir("away");
    let server = start(&data);
    let client = reqwest::Client::new();
    let (job, session) = queue_tune(&client, &server, r#"{"steps": 30, "batch": 1}"#).await;
    {
        // Read the first event, then hang up.
        let mut stream = client
            .get(url(&server, &format!("/api/jobs/{job}/events")))
            .send()
            .await
            .unwrap();
        assert!(
            String::from_utf8_lossy(&stream.chunk().await.unwrap().unwrap()).contains("queued")
        );
    }
    // Another client reads the whole story, and can resume after any event it saw.
    let events = job_events(&client, &server, &job).await;
    assert_eq!(events.last().unwrap().0, "done");
    let resumed = client
        .get(url(&server, &format!("/api/jobs/{job}/events")))
        .header("last-event-id", "2")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(parse_events(&resumed).len(), events.len() - 3);
    let sessions: Value = get_json(&client, &server, "/api/sessions").await;
    assert_eq!(sessions[0]["id"], session.as_str());
}

/// A model folder's `unitune.json` is what the API's defaults are: `/api/info` shows them, and a
/// tune or an edit that leaves a field out takes the model's value, not the library's.
#[tokio::test(flavor = "multi_thread")]
async fn a_model_folder_s_unitune_json_sets_the_api_defaults() {
    let data = data_dir("defaults");
    let model = data.with_extension("model");
    let _ = std::fs::remove_dir_all(&model);
    let fixture = repo().join("tests/fixtures/tiny-sd1");
    unitune::weights::export::copy_tree(&fixture, &model, &|_| true).unwrap();
    std::fs::write(
        model.join("unitune.json"),
        r#"{"tune": {"steps": 3, "batch_size": 1, "distill_prompts": ["a red circle"]},
            "edit": {"num_inference_steps": 2, "start": 0.5}}"#,
    )
    .unwrap();
    let mut config = config(&data, None, Limits::default());
    config.model = model;
    let server = unitune_server::Server::start(config).unwrap();
    let client = reqwest::Client::new();
    let info: Value = get_json(&client, &server, "/api/info").await;
    assert_eq!(
        (
            info["tune"]["steps"].as_u64(),
            info["tune"]["batch"].as_u64()
        ),
        (Some(3), Some(1))
    );
    assert_eq!(info["tune"]["distill_prompts"], json!(["a red circle"]));
    assert_eq!(info["edit"]["start"], 0.5);
    assert_eq!(info["edit"]["guidance"], 10.0);

    // A q2 tune is distilled into its grid after the tune, under the model's prompts.
    let settings = r#"{"seed": 2, "delta_encoding": "q2", "distill_steps": 2}"#;
    let (job, session) = queue_tune(&client, &server, settings).await;
    let events = job_events(&client, &server, &job).await;
    let phases: Vec<&str> = (events.iter())
        .filter(|(k, _)| k == "progress")
        .map(|(_, d)| d["phase"].as_str().unwrap())
        .collect();
    // Each phase reports step 0, then every step.
    assert_eq!(
        phases,
        [["tuning"; 4].as_slice(), &["distilling"; 3]].concat()
    );
    let sessions: Value = get_json(&client, &server, "/api/sessions").await;
    let distillation = &sessions[0]["settings"]["distillation"];
    assert_eq!(
        (distillation["steps"].as_u64(), &distillation["prompts"]),
        (Some(2), &json!(["a red circle"]))
    );
    let response = client
        .post(url(&server, &format!("/api/sessions/{session}/edits")))
        .json(&json!({"prompt": "a cat", "guidance": 4}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let answer: Value = response.json().await.unwrap();
    let edit = answer["edit"].as_str().unwrap();
    job_events(&client, &server, answer["job"]["id"].as_str().unwrap()).await;
    let record: Value = get_json(
        &client,
        &server,
        &format!("/api/sessions/{session}/edits/{edit}"),
    )
    .await;
    let params = &record["params"];
    assert_eq!(
        (params["steps"].as_u64(), params["start"].as_f64()),
        (Some(2), Some(0.5))
    );
    assert_eq!(params["guidance"], 4.0);
}

/// A single-file model (`--model tiny-sd1.safetensors --config tiny-sd1`): the server reports its
/// size, tunes on it, and edits the session.
#[tokio::test(flavor = "multi_thread")]
async fn a_single_file_model_serves_tunes_and_edits() {
    let data = data_dir("single-file");
    let mut config = config(&data, None, Limits::default());
    config.model = repo().join("tests/fixtures/tiny-sd1.safetensors");
    config.single_file.config = Some(repo().join("tests/fixtures/tiny-sd1"));
    config.single_file.image_size = Some(48);
    let server = unitune_server::Server::start(config).unwrap();
    let client = reqwest::Client::new();
    let info: Value = get_json(&client, &server, "/api/info").await;
    assert_eq!(info["size"], json!([48, 48]));
    let (job, session) =
        queue_tune(&client, &server, r#"{"steps": 2, "batch": 1, "seed": 2}"#).await;
    let events = job_events(&client, &server, &job).await;
    assert_eq!(events.last().unwrap().0, "done", "{:?}", kinds(&events));
    let response = client
        .post(url(&server, &format!("/api/sessions/{session}/edits")))
        .json(&json!({"prompt": "a cat", "steps": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let answer: Value = response.json().await.unwrap();
    let events = job_events(&client, &server, answer["job"]["id"].as_str().unwrap()).await;
    assert_eq!(events.last().unwrap().0, "done", "{:?}", kinds(&events));
}
