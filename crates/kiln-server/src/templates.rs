//! `/templates`: create, list, inspect and delete templates; queue, inspect, cancel and
//! follow builds.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::sse::Event;
use axum::response::{IntoResponse, Response};
use axum::Json;
use kiln_engine::Engine;
use kiln_spec::{Form, TemplateRequest};
use kiln_store::{BuildStatus, LogLine, LogStream, Team};
use serde::Deserialize;

use crate::{json_body, ApiError, AppState, Auth};

/// How often a queued build's log stream says it is still waiting.
const QUEUED_HEARTBEAT: Duration = Duration::from_secs(2);

/// Runs a queued build in the background; its outcome lands in the store.
fn start_build(engine: &Arc<Engine>, build_id: String) {
    let engine = engine.clone();
    tokio::spawn(async move {
        if let Err(e) = engine.run_build(&build_id, None).await {
            tracing::error!(build = %build_id, error = %e, "build could not run");
        }
    });
}

/// `?force=true`, or `"force": true` in the body: build from scratch, bypassing the build
/// cache (kiln's extension).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ForceQuery {
    #[serde(default)]
    force: bool,
}

/// Takes kiln's `force` flag out of a template body (it is not part of the spec).
fn take_force(doc: &mut serde_json::Value, query: bool) -> Result<bool, ApiError> {
    let body = match doc.as_object_mut().and_then(|o| o.remove("force")) {
        None => false,
        Some(serde_json::Value::Bool(b)) => b,
        Some(_) => return Err(ApiError::bad_request("force: must be a boolean")),
    };
    Ok(query || body)
}

pub(crate) async fn create_template(
    State(state): State<AppState>,
    Auth(team): Auth,
    q: Result<Query<ForceQuery>, QueryRejection>,
    body: axum::body::Bytes,
) -> Result<impl IntoResponse, ApiError> {
    let Query(q) = q.map_err(query_error)?;
    let mut doc = json_body(&body)?;
    let force = take_force(&mut doc, q.force)?;
    let req = TemplateRequest::parse_and_validate_as(&doc, Form::Wire)
        .map_err(|p| ApiError::bad_request(p.to_string()))?;
    if req.name.is_none() {
        return Err(ApiError::bad_request("name: is required"));
    }
    let (template, build) = state.engine.submit_with(&team.id, &req, force).await?;
    start_build(&state.engine, build.id.clone());
    let mut out = template.to_wire();
    out["build_id"] = build.id.into();
    Ok((StatusCode::ACCEPTED, Json(out)))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ListQuery {
    name_prefix: Option<String>,
}

/// A query string that does not fit, in the API's error shape.
pub(crate) fn query_error(e: QueryRejection) -> ApiError {
    ApiError::bad_request(format!("invalid query: {}", e.body_text()))
}

pub(crate) async fn list_templates(
    State(state): State<AppState>,
    Auth(team): Auth,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let Query(q) = q.map_err(query_error)?;
    let all = state.engine.store().list_templates(&team.id).await?;
    let prefix = q.name_prefix.unwrap_or_default();
    let out: Vec<_> = all
        .iter()
        .filter(|t| t.name.starts_with(&prefix))
        .map(|t| t.to_wire())
        .collect();
    Ok(Json(out))
}

pub(crate) async fn get_template(
    State(state): State<AppState>,
    Auth(team): Auth,
    Path(template): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let t = state
        .engine
        .store()
        .template_by_id_or_name(&team.id, &template)
        .await?;
    Ok(Json(t.to_wire()))
}

pub(crate) async fn delete_template(
    State(state): State<AppState>,
    Auth(team): Auth,
    Path(template): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    state.engine.delete_template(&team.id, &template).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct BuildsQuery {
    limit: Option<usize>,
    #[serde(default)]
    offset: usize,
}

/// Newest first; `limit` and `offset` page through them.
pub(crate) async fn list_builds(
    State(state): State<AppState>,
    Auth(team): Auth,
    Path(template): Path<String>,
    q: Result<Query<BuildsQuery>, QueryRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let Query(q) = q.map_err(query_error)?;
    let builds = state
        .engine
        .store()
        .list_builds(&team.id, &template)
        .await?;
    let page = builds
        .iter()
        .skip(q.offset)
        .take(q.limit.unwrap_or(usize::MAX))
        .map(|b| b.to_wire())
        .collect::<Vec<_>>();
    Ok(Json(page))
}

/// `POST /templates/{t}/builds`. Without a body (what the SDKs send) it rebuilds the
/// stored spec; with one (the body of `POST /templates`, kiln's extension, which the CLI's
/// remote mode uses) the spec is replaced first.
pub(crate) async fn rebuild(
    State(state): State<AppState>,
    Auth(team): Auth,
    Path(template): Path<String>,
    q: Result<Query<ForceQuery>, QueryRejection>,
    body: axum::body::Bytes,
) -> Result<axum::response::Response, ApiError> {
    let Query(q) = q.map_err(query_error)?;
    let mut force = q.force;
    let spec = if body.iter().all(u8::is_ascii_whitespace) {
        None
    } else {
        let mut doc = json_body(&body)?;
        force = take_force(&mut doc, force)?;
        // `{"force": true}` alone rebuilds the stored spec from scratch.
        if doc.as_object().is_some_and(|o| o.is_empty()) {
            return rebuild_stored(state, team, template, force).await;
        }
        let req = TemplateRequest::parse_and_validate_as(&doc, Form::Wire)
            .map_err(|p| ApiError::bad_request(p.to_string()))?;
        if let Some(name) = &req.name {
            let t = state
                .engine
                .store()
                .template_by_id_or_name(&team.id, &template)
                .await?;
            if *name != t.name {
                return Err(ApiError::bad_request(format!(
                    "name: {name:?} is not this template's name ({:?})",
                    t.name
                )));
            }
        }
        Some(req)
    };
    let r = state
        .engine
        .rebuild_with(&team.id, &template, spec.as_ref(), force)
        .await?;
    Ok(answer_rebuild(&state, r))
}

async fn rebuild_stored(
    state: AppState,
    team: Team,
    template: String,
    force: bool,
) -> Result<axum::response::Response, ApiError> {
    let r = state
        .engine
        .rebuild_with(&team.id, &template, None, force)
        .await?;
    Ok(answer_rebuild(&state, r))
}

/// 201 for a new build (dispatched now), 200 when an in-flight build of the same spec is
/// returned.
fn answer_rebuild(state: &AppState, r: kiln_store::Rebuild) -> axum::response::Response {
    let status = if r.created {
        start_build(&state.engine, r.build.id.clone());
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    (status, Json(r.build.to_wire())).into_response()
}

/// A build, checked to belong to the template named in the path.
async fn build_of(
    state: &AppState,
    team: &Team,
    template: &str,
    build: &str,
) -> Result<kiln_store::Build, ApiError> {
    let t = state
        .engine
        .store()
        .template_by_id_or_name(&team.id, template)
        .await?;
    let b = state.engine.store().build_by_id(&team.id, build).await?;
    if b.template_id != t.id {
        return Err(kiln_store::StoreError::NotFound {
            kind: "build",
            id: build.to_owned(),
        }
        .into());
    }
    Ok(b)
}

pub(crate) async fn get_build(
    State(state): State<AppState>,
    Auth(team): Auth,
    Path((template, build)): Path<(String, String)>,
) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(
        build_of(&state, &team, &template, &build).await?.to_wire(),
    ))
}

pub(crate) async fn cancel_build(
    State(state): State<AppState>,
    Auth(team): Auth,
    Path((template, build)): Path<(String, String)>,
) -> Result<impl IntoResponse, ApiError> {
    let b = build_of(&state, &team, &template, &build).await?;
    state.engine.cancel_build(&team.id, &b.id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /templates/{t}/builds/{b}/logs` as Server-Sent Events: the stored history, then
/// lines as they are written, then a last event with `finished` and the build's status.
/// While the build waits for a builder, a `system` line says so every two seconds.
pub(crate) async fn build_logs(
    State(state): State<AppState>,
    Auth(team): Auth,
    Path((template, build)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let b = build_of(&state, &team, &template, &build).await?;
    let follower = state.engine.store().follow_logs(&b.id, 0).await?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Event>(64);
    tokio::spawn(pump_logs(state.engine.clone(), b.id, follower, tx));
    let events = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|e| (Ok::<_, Infallible>(e), rx))
    });
    Ok(crate::data::sse(events))
}

fn log_event(line: &serde_json::Value) -> Event {
    Event::default().data(line.to_string())
}

fn wire_line(l: &LogLine) -> serde_json::Value {
    serde_json::json!({
        "timestamp": l.timestamp.to_rfc3339(), "stream": l.stream, "text": l.text,
    })
}

/// Feeds one client's log stream; returns when the build has ended or the client left.
async fn pump_logs(
    engine: Arc<Engine>,
    build_id: String,
    mut follower: kiln_store::LogFollower,
    tx: tokio::sync::mpsc::Sender<Event>,
) {
    let mut heartbeat = tokio::time::interval(QUEUED_HEARTBEAT);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            batch = follower.next_batch() => match batch {
                Ok(Some(lines)) => {
                    for l in &lines {
                        if tx.send(log_event(&wire_line(l))).await.is_err() {
                            return;
                        }
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(build = %build_id, error = %e, "reading build logs");
                    break;
                }
            },
            _ = heartbeat.tick() => {
                let queued = engine
                    .store()
                    .get_build(&build_id)
                    .await
                    .is_ok_and(|b| b.status == BuildStatus::Pending);
                if queued {
                    let line = serde_json::json!({
                        "timestamp": chrono::Utc::now().to_rfc3339(),
                        "stream": LogStream::System,
                        "text": "build queued, waiting for dispatch",
                    });
                    if tx.send(log_event(&line)).await.is_err() {
                        return;
                    }
                }
            }
        }
    }
    // The last event says how it ended (`ready`, `failed` or `cancelled`).
    let Ok(b) = engine.store().get_build(&build_id).await else {
        return;
    };
    let mut text = format!("build {}", b.status);
    if let Some(err) = &b.error_message {
        text = format!("{text}: {err}");
    }
    let last = serde_json::json!({
        "timestamp": chrono::Utc::now().to_rfc3339(),
        "stream": LogStream::System,
        "text": text,
        "finished": true,
        "status": b.status,
    });
    let _ = tx.send(log_event(&last)).await;
}
