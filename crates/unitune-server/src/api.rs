//! The HTTP API (documented in `openapi.json`, served at `/api/openapi.json`) and the page.
//!
//! Every error is JSON, `{"error": "..."}`, with a 4xx status that says whose fault it is: 400
//! for a bad field (named in the message), 401 without the token, 403 for a cross-site request,
//! 404 for an unknown id, 409 for a session in use, 413 for a body or picture over a limit, 415
//! for a body of the wrong type, 429 (with Retry-After) when the queue is full.

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, Multipart, Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use futures_util::stream::{Stream, StreamExt};
use serde_json::{json, Value};

use crate::config::ServeConfig;
use crate::page;
use crate::params::{overlay, EditParams, TuneParams};
use crate::queue::{Job, JobQueue, NewJob, SubmitError, Work};
use crate::store::{new_id, valid_id, Records};
use crate::upload::decode_image;

/// The cookie the login form sets.
const COOKIE: &str = "unitune_token";

pub struct App {
    pub config: Arc<ServeConfig>,
    pub store: Arc<dyn Records>,
    pub queue: Arc<dyn JobQueue>,
    /// `GET /api/info`: the model's size and every default.
    pub info: Value,
    /// What a request leaves out: the model's `unitune.json` over the library's defaults.
    pub tune_defaults: TuneParams,
    pub edit_defaults: EditParams,
}

type Shared = State<Arc<App>>;

/// An error as the API answers it.
pub struct ApiError {
    status: StatusCode,
    message: String,
    retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            retry_after: None,
        }
    }

    fn bad(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    fn not_found(what: &str) -> Self {
        Self::new(StatusCode::NOT_FOUND, format!("no such {what}"))
    }

    fn internal(e: impl std::fmt::Display) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(json!({ "error": self.message }))).into_response();
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

type ApiResult<T> = Result<T, ApiError>;

pub fn router(app: Arc<App>) -> Router {
    let limits = &app.config.limits;
    let upload_limit = DefaultBodyLimit::max(limits.max_upload_bytes + (64 << 10));
    let body_limit = DefaultBodyLimit::max(limits.max_body_bytes);
    Router::new()
        .route("/", get(|| async { page::INDEX }))
        .route("/app.js", get(|| async { page::JS }))
        .route("/style.css", get(|| async { page::CSS }))
        .route("/api/openapi.json", get(|| async { page::OPENAPI }))
        .route("/api/login", post(login))
        .route("/api/info", get(info))
        .route(
            "/api/sessions",
            get(list_sessions).post(create_session).layer(upload_limit),
        )
        .route(
            "/api/sessions/{id}",
            get(get_session).delete(delete_session),
        )
        .route("/api/sessions/{id}/image", get(session_image))
        .route(
            "/api/sessions/{id}/edits",
            get(list_edits).post(create_edits).layer(body_limit),
        )
        .route(
            "/api/sessions/{id}/edits/{edit}",
            get(get_edit).delete(delete_edit),
        )
        .route(
            "/api/sessions/{id}/edits/{edit}/images/{n}",
            get(edit_image),
        )
        .route(
            "/api/sessions/{id}/edits/{edit}/sheets/{n}",
            get(edit_sheet),
        )
        .route("/api/jobs", get(list_jobs))
        .route("/api/jobs/{id}", get(get_job))
        .route("/api/jobs/{id}/events", get(job_events))
        .route("/api/jobs/{id}/cancel", post(cancel_job))
        .fallback(|| async { ApiError::not_found("page or API route") })
        .layer(middleware::from_fn_with_state(app.clone(), guard))
        .with_state(app)
}

/// Refuses cross-site state changes, and API requests without the token when one is set; logs
/// each request without its query, headers or body (which may hold the token or prompts).
async fn guard(State(app): Shared, request: Request, next: Next) -> Response {
    let (method, path) = (request.method().clone(), request.uri().path().to_string());
    let started = std::time::Instant::now();
    let refused = if changes_state(&method) && cross_site(request.headers()) {
        Some(ApiError::new(
            StatusCode::FORBIDDEN,
            "cross-site request refused: state-changing requests must come from this server's page",
        ))
    } else if needs_token(&app, &path) && !authorized(&app, request.headers()) {
        Some(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "this server needs its token: send `Authorization: Bearer <token>` or log in on the page",
        ))
    } else {
        None
    };
    let response = match refused {
        Some(error) => error.into_response(),
        None => next.run(request).await,
    };
    if !path.ends_with("/events") {
        eprintln!(
            "{method} {path} -> {} ({} ms)",
            response.status().as_u16(),
            started.elapsed().as_millis()
        );
    }
    response
}

fn changes_state(method: &Method) -> bool {
    !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

/// A browser says where a request comes from: `Sec-Fetch-Site`, or an `Origin` whose host is
/// not the one the request was sent to.
fn cross_site(headers: &HeaderMap) -> bool {
    let text = |name| {
        headers
            .get(name)
            .and_then(|v: &HeaderValue| v.to_str().ok())
    };
    if text("sec-fetch-site") == Some("cross-site") {
        return true;
    }
    match (text("origin"), text("host")) {
        (Some("null"), _) => true,
        (Some(origin), Some(host)) => origin.split_once("://").map(|(_, h)| h) != Some(host),
        (Some(_), None) => true,
        (None, _) => false,
    }
}

fn needs_token(app: &App, path: &str) -> bool {
    app.config.token.is_some() && path.starts_with("/api/") && path != "/api/login"
}

fn authorized(app: &App, headers: &HeaderMap) -> bool {
    let Some(token) = app.config.token.as_deref() else {
        return true;
    };
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let cookies = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().strip_prefix(COOKIE)?.strip_prefix('='));
    bearer
        .into_iter()
        .chain(cookies)
        .any(|given| same(given.as_bytes(), token.as_bytes()))
}

/// Compares in time that depends on the length only, so the token cannot be guessed byte by byte.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[derive(serde::Deserialize)]
struct Login {
    token: String,
}

/// The page's login form: a right token sets the cookie and goes back to the page.
async fn login(State(app): Shared, form: Form<Login>) -> ApiResult<Response> {
    match app.config.token.as_deref() {
        Some(token) if same(form.token.as_bytes(), token.as_bytes()) => {
            let mut response = Redirect::to("/").into_response();
            let cookie = format!("{COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/");
            let value = HeaderValue::from_str(&cookie).map_err(ApiError::internal)?;
            response.headers_mut().insert(header::SET_COOKIE, value);
            Ok(response)
        }
        Some(_) => Err(ApiError::new(StatusCode::UNAUTHORIZED, "wrong token")),
        None => Ok(Redirect::to("/").into_response()),
    }
}

async fn info(State(app): Shared) -> Json<Value> {
    Json(app.info.clone())
}

fn session_json(meta: &crate::store::SessionMeta) -> Value {
    let mut value = json!(meta);
    value["image"] = json!(format!("/api/sessions/{}/image", meta.id));
    value
}

async fn list_sessions(State(app): Shared) -> ApiResult<Json<Value>> {
    let sessions = app.store.sessions().map_err(ApiError::internal)?;
    Ok(Json(json!(sessions
        .iter()
        .map(session_json)
        .collect::<Vec<_>>())))
}

fn session_id(app: &App, id: &str) -> ApiResult<crate::store::SessionMeta> {
    app.store
        .session(id)
        .ok_or_else(|| ApiError::not_found("session"))
}

async fn get_session(State(app): Shared, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    Ok(Json(session_json(&session_id(&app, &id)?)))
}

async fn delete_session(State(app): Shared, Path(id): Path<String>) -> ApiResult<StatusCode> {
    session_id(&app, &id)?;
    if app.queue.busy_with(&id) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "a job of this session waits or runs; cancel it first",
        ));
    }
    app.store.delete_session(&id).map_err(ApiError::internal)?;
    Ok(StatusCode::NO_CONTENT)
}

async fn session_image(State(app): Shared, Path(id): Path<String>) -> ApiResult<Response> {
    session_id(&app, &id)?;
    png(app.store.source_png(&id))
}

/// `POST /api/sessions`: a multipart upload of `image` (the photo) and optional `settings`
/// (JSON of [`TuneParams`]); queues the tune.
async fn create_session(
    State(app): Shared,
    headers: HeaderMap,
    multipart: Result<Multipart, axum::extract::multipart::MultipartRejection>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let mut multipart = multipart.map_err(|e| ApiError::new(e.status(), e.body_text()))?;
    let (mut photo, mut name) = (None, String::from("photo"));
    let mut settings = app.tune_defaults.clone();
    while let Some(field) = multipart.next_field().await.map_err(multipart_error)? {
        match field.name().unwrap_or_default() {
            "image" => {
                name = field.file_name().map_or(name, clean_name);
                photo = Some(field.bytes().await.map_err(multipart_error)?);
            }
            "settings" => {
                let text = field.text().await.map_err(multipart_error)?;
                settings = serde_json::from_str(&text)
                    .map_err(|e| e.to_string())
                    .and_then(|given| overlay(&app.tune_defaults, given))
                    .map_err(|e| ApiError::bad(format!("settings: {e}")))?;
            }
            other => {
                return Err(ApiError::bad(format!(
                    "unknown form field `{other}`; send `image` and optionally `settings`"
                )))
            }
        }
    }
    let photo =
        photo.ok_or_else(|| ApiError::bad("image: no photo uploaded (form field `image`)"))?;
    let job = settings.job(&app.config.limits).map_err(ApiError::bad)?;
    let max_pixels = app.config.limits.max_pixels;
    let image = tokio::task::spawn_blocking(move || decode_image(&photo, max_pixels))
        .await
        .map_err(ApiError::internal)?
        .map_err(|e| {
            let status = if e.contains("limit") {
                StatusCode::PAYLOAD_TOO_LARGE
            } else {
                StatusCode::BAD_REQUEST
            };
            ApiError::new(status, format!("image: {e}"))
        })?;
    let session = new_id();
    let work = Work::Tune {
        image,
        name,
        job: Box::new(job),
        params: Box::new(settings),
    };
    let job = submit(&app, &headers, Job::new("tune", &session, None, work))?;
    let session = job["session"].clone();
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "job": job, "session": session })),
    ))
}

fn multipart_error(e: axum::extract::multipart::MultipartError) -> ApiError {
    ApiError::new(e.status(), format!("upload: {}", e.body_text()))
}

/// The uploaded file's name without any folder, for the list.
fn clean_name(name: &str) -> String {
    let base = name.rsplit(['/', '\\']).next().unwrap_or(name);
    base.chars().filter(|c| !c.is_control()).take(120).collect()
}

/// Queues `job`; a repeated `Idempotency-Key` gets the summary of the job first sent with it.
fn submit(app: &App, headers: &HeaderMap, job: Job) -> ApiResult<Value> {
    let key = match headers.get("idempotency-key") {
        None => None,
        Some(value) => match value.to_str() {
            Ok(key) if !key.is_empty() && key.len() <= 255 => Some(key.to_string()),
            _ => {
                return Err(ApiError::bad(
                    "Idempotency-Key: give 1 to 255 visible ASCII characters",
                ))
            }
        },
    };
    app.queue.submit(NewJob { job, key }).map_err(|e| match e {
        SubmitError::Full { retry_after } => ApiError {
            status: StatusCode::TOO_MANY_REQUESTS,
            message: format!("the queue is full; try again in {retry_after} s"),
            retry_after: Some(retry_after),
        },
        SubmitError::Unavailable(why) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the job queue is unavailable: {why}"),
        ),
    })
}

async fn list_edits(State(app): Shared, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    session_id(&app, &id)?;
    let edits = app.store.edits(&id).map_err(ApiError::internal)?;
    Ok(Json(json!(edits.iter().map(edit_json).collect::<Vec<_>>())))
}

fn edit_json(meta: &crate::store::EditMeta) -> Value {
    let base = format!("/api/sessions/{}/edits/{}", meta.session, meta.id);
    let mut value = json!(meta);
    value["urls"] = json!((0..meta.images.len())
        .map(|n| format!("{base}/images/{n}"))
        .collect::<Vec<_>>());
    value["sheet_urls"] = json!((0..meta.sheets.len())
        .map(|n| format!("{base}/sheets/{n}"))
        .collect::<Vec<_>>());
    value
}

/// `POST /api/sessions/{id}/edits`: queues the edits of a JSON [`EditParams`].
async fn create_edits(
    State(app): Shared,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<Json<Value>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let session = session_id(&app, &id)?;
    let Json(given) = body.map_err(|e| ApiError::new(e.status(), e.body_text()))?;
    let mut params = overlay(&app.edit_defaults, given).map_err(|e| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("edit settings: {e}"),
        )
    })?;
    let job = params
        .job(&app.config.limits, session.width, session.height)
        .map_err(ApiError::bad)?;
    let edit = new_id();
    let work = Work::Edit {
        job: Box::new(job),
        params: Box::new(params),
    };
    let job = submit(&app, &headers, Job::new("edit", &id, Some(edit), work))?;
    let edit = job["edit"].clone();
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "job": job, "edit": edit })),
    ))
}

fn edit_meta(app: &App, id: &str, edit: &str) -> ApiResult<crate::store::EditMeta> {
    session_id(app, id)?;
    app.store
        .edit(id, edit)
        .ok_or_else(|| ApiError::not_found("edit"))
}

async fn get_edit(
    State(app): Shared,
    Path((id, edit)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    Ok(Json(edit_json(&edit_meta(&app, &id, &edit)?)))
}

async fn delete_edit(
    State(app): Shared,
    Path((id, edit)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    let meta = edit_meta(&app, &id, &edit)?;
    if meta.status == "running" {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "this edit is running; cancel its job first",
        ));
    }
    app.store
        .delete_edit(&id, &edit)
        .map_err(ApiError::internal)?;
    Ok(StatusCode::NO_CONTENT)
}

async fn edit_image(
    State(app): Shared,
    Path((id, edit, n)): Path<(String, String, String)>,
) -> ApiResult<Response> {
    let meta = edit_meta(&app, &id, &edit)?;
    let image = n.parse().ok().and_then(|n: usize| meta.images.get(n));
    let image = image.ok_or_else(|| ApiError::not_found("image"))?;
    png(app.store.edit_file(&meta, &image.file))
}

async fn edit_sheet(
    State(app): Shared,
    Path((id, edit, n)): Path<(String, String, String)>,
) -> ApiResult<Response> {
    let meta = edit_meta(&app, &id, &edit)?;
    let sheet = n.parse().ok().and_then(|n: usize| meta.sheets.get(n));
    let sheet = sheet.ok_or_else(|| ApiError::not_found("contact sheet"))?;
    png(app.store.edit_file(&meta, sheet))
}

fn png(bytes: unitune::Result<Vec<u8>>) -> ApiResult<Response> {
    let bytes = bytes.map_err(|_| ApiError::not_found("image"))?;
    Ok(([(header::CONTENT_TYPE, "image/png")], Bytes::from(bytes)).into_response())
}

async fn list_jobs(State(app): Shared) -> Json<Value> {
    Json(json!(app.queue.active()))
}

fn job(app: &App, id: &str) -> ApiResult<Value> {
    valid_id(id)
        .then(|| app.queue.get(id))
        .flatten()
        .ok_or_else(|| ApiError::not_found("job"))
}

async fn get_job(State(app): Shared, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    Ok(Json(job(&app, &id)?))
}

async fn cancel_job(
    State(app): Shared,
    Path(id): Path<String>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    job(&app, &id)?;
    let state = app
        .queue
        .cancel(&id)
        .ok_or_else(|| ApiError::not_found("job"))?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "id": id, "state": state })),
    ))
}

/// `GET /api/jobs/{id}/events`: the job's events as server-sent events, from the first (or
/// after `Last-Event-ID`), ending after the last.
async fn job_events(
    State(app): Shared,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>> {
    job(&app, &id)?;
    let after = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let events = app
        .queue
        .events(&id, after)
        .ok_or_else(|| ApiError::not_found("job"))?
        .map(|e| {
            Ok(SseEvent::default()
                .id(e.seq.to_string())
                .event(e.kind)
                .data(e.data.to_string()))
        });
    Ok(Sse::new(events).keep_alive(KeepAlive::default()))
}
