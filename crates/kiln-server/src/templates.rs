//! `/templates`: create, list, inspect and delete templates; queue, inspect, cancel and
//! follow builds. Each handler is one engine call.

use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::sse::Event;
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::StreamExt as _;
use kiln_api::{CreatedTemplate, Form, SpecValidation, TemplateRequest};
use kiln_engine::{Engine, Rebuilt, Team};
use serde::Deserialize;

use crate::{json_body, ApiError, AppState, Auth};

/// Runs a queued build in the background; its outcome lands in the store.
fn start_build(engine: &Arc<Engine>, build_id: String) {
    let engine = engine.clone();
    tokio::spawn(async move {
        if let Err(e) = engine.run_build(&build_id, None).await {
            tracing::error!(build = %build_id, error = %e.chain(), "build could not run");
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

/// A template request in the HTTP body's form, with every problem listed.
fn template_request(doc: &serde_json::Value) -> Result<TemplateRequest, ApiError> {
    TemplateRequest::parse_and_validate_as(doc, Form::Wire)
        .map_err(|p| ApiError::bad_request(p.to_string()))
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
    let req = template_request(&doc)?;
    if req.name.is_none() {
        return Err(ApiError::bad_request("name: is required"));
    }
    let (template, build) = state.engine.submit_with(&team.id, &req, force).await?;
    start_build(&state.engine, build.id.clone());
    let out = CreatedTemplate {
        template,
        build_id: build.id,
    };
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
    let prefix = q.name_prefix.unwrap_or_default();
    Ok(Json(state.engine.list_templates(&team.id, &prefix).await?))
}

pub(crate) async fn get_template(
    State(state): State<AppState>,
    Auth(team): Auth,
    Path(template): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(state.engine.template(&team.id, &template).await?))
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
    let builds = state.engine.list_builds(&team.id, &template).await?;
    let page: Vec<_> = builds
        .into_iter()
        .skip(q.offset)
        .take(q.limit.unwrap_or(usize::MAX))
        .collect();
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
) -> Result<Response, ApiError> {
    let Query(q) = q.map_err(query_error)?;
    let mut force = q.force;
    let mut spec = None;
    if !body.iter().all(u8::is_ascii_whitespace) {
        let mut doc = json_body(&body)?;
        force = take_force(&mut doc, force)?;
        // `{"force": true}` alone rebuilds the stored spec from scratch.
        if !doc.as_object().is_some_and(|o| o.is_empty()) {
            spec = Some(template_request(&doc)?);
        }
    }
    let r = state
        .engine
        .rebuild_with(&team.id, &template, spec.as_ref(), force)
        .await?;
    Ok(answer_rebuild(&state, r))
}

/// 201 for a new build (dispatched now), 200 when an in-flight build of the same spec is
/// returned.
fn answer_rebuild(state: &AppState, r: Rebuilt) -> Response {
    let status = if r.created {
        start_build(&state.engine, r.build.id.clone());
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    (status, Json(r.build)).into_response()
}

pub(crate) async fn get_build(
    State(state): State<AppState>,
    Auth(team): Auth,
    Path((template, build)): Path<(String, String)>,
) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(
        state
            .engine
            .template_build(&team.id, &template, &build)
            .await?,
    ))
}

pub(crate) async fn cancel_build(
    State(state): State<AppState>,
    Auth(team): Auth,
    Path((template, build)): Path<(String, String)>,
) -> Result<impl IntoResponse, ApiError> {
    let b = build_of(&state, &team, &template, &build).await?;
    state.engine.cancel_build(&team.id, &b).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The id of a build of the template named in the path.
async fn build_of(
    state: &AppState,
    team: &Team,
    template: &str,
    build: &str,
) -> Result<String, ApiError> {
    Ok(state
        .engine
        .template_build(&team.id, template, build)
        .await?
        .id)
}

/// `GET /templates/{t}/builds/{b}/logs` as Server-Sent Events: the stored history, then
/// lines as they are written, then a last event with `finished` and the build's status.
pub(crate) async fn build_logs(
    State(state): State<AppState>,
    Auth(team): Auth,
    Path((template, build)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let b = build_of(&state, &team, &template, &build).await?;
    let events = state.engine.follow_build_log(&team.id, &b).await?;
    Ok(crate::data::sse(events.map(|e| {
        Ok(Event::default().data(serde_json::to_string(&e).unwrap_or_default()))
    })))
}

/// `POST /validate` (kiln's own): the body of `POST /templates` checked as that route
/// will check it, every problem worded as `kiln validate` words it. Validating is a
/// successful call whatever the verdict, so it answers 200 either way.
pub(crate) async fn validate(Auth(_team): Auth, body: axum::body::Bytes) -> Json<SpecValidation> {
    Json(SpecValidation::of(&body))
}
