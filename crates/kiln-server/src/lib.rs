//! kiln's HTTP API, in Superserve's wire format (snake_case JSON, its statuses and error
//! body), over [`kiln_engine::Engine`]. Handlers only translate: a request becomes an
//! engine call, a typed result becomes a response, and errors are mapped in one place
//! ([`error`]).
//!
//! This first part serves the control plane for templates and builds; build logs over
//! SSE, sandboxes and the data plane come next.

pub mod error;

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use kiln_engine::Engine;
use kiln_spec::{Form, TemplateRequest};
use kiln_store::Team;
use serde::Deserialize;

pub use error::ApiError;

/// Largest request body accepted; a BuildSpec is far smaller.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// What every handler shares.
#[derive(Debug, Clone)]
pub struct AppState {
    /// The core.
    pub engine: Arc<Engine>,
}

/// The API's routes.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/templates", get(list_templates).post(create_template))
        .route(
            "/templates/{template}",
            get(get_template).delete(delete_template),
        )
        .route(
            "/templates/{template}/builds",
            get(list_builds).post(rebuild),
        )
        .route(
            "/templates/{template}/builds/{build}",
            get(get_build).delete(cancel_build),
        )
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

/// The team of the request's `X-API-Key`.
#[derive(Debug)]
pub struct Auth(pub Team);

impl FromRequestParts<AppState> for Auth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let key = parts
            .headers
            .get("x-api-key")
            .and_then(|v| v.to_str().ok())
            .ok_or_else(ApiError::unauthorized)?;
        match state.engine.store().authenticate(key).await? {
            Some(team) => Ok(Auth(team)),
            None => Err(ApiError::unauthorized()),
        }
    }
}

async fn health() -> impl IntoResponse {
    Json(serde_json::json!({"status": "ok"}))
}

/// Parses a JSON body ourselves so that bad JSON gets the API's error shape.
fn json_body(body: &[u8]) -> Result<serde_json::Value, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
}

/// Runs a queued build in the background; its outcome lands in the store.
fn start_build(engine: &Arc<Engine>, build_id: String) {
    let engine = engine.clone();
    tokio::spawn(async move {
        if let Err(e) = engine.run_build(&build_id, None).await {
            tracing::error!(build = %build_id, error = %e, "build could not run");
        }
    });
}

async fn create_template(
    State(state): State<AppState>,
    Auth(team): Auth,
    body: axum::body::Bytes,
) -> Result<impl IntoResponse, ApiError> {
    let doc = json_body(&body)?;
    let req = TemplateRequest::parse_and_validate_as(&doc, Form::Wire)
        .map_err(|p| ApiError::bad_request(p.to_string()))?;
    if req.name.is_none() {
        return Err(ApiError::bad_request("name: is required"));
    }
    let (template, build) = state.engine.submit(&team.id, &req).await?;
    start_build(&state.engine, build.id.clone());
    let mut out = template.to_wire();
    out["build_id"] = build.id.into();
    Ok((StatusCode::ACCEPTED, Json(out)))
}

#[derive(Debug, Deserialize)]
struct ListQuery {
    name_prefix: Option<String>,
}

async fn list_templates(
    State(state): State<AppState>,
    Auth(team): Auth,
    Query(q): Query<ListQuery>,
) -> Result<impl IntoResponse, ApiError> {
    let all = state.engine.store().list_templates(&team.id).await?;
    let prefix = q.name_prefix.unwrap_or_default();
    let out: Vec<_> = all
        .iter()
        .filter(|t| t.name.starts_with(&prefix))
        .map(|t| t.to_wire())
        .collect();
    Ok(Json(out))
}

async fn get_template(
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

async fn delete_template(
    State(state): State<AppState>,
    Auth(team): Auth,
    Path(template): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    state.engine.delete_template(&team.id, &template).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn list_builds(
    State(state): State<AppState>,
    Auth(team): Auth,
    Path(template): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let builds = state
        .engine
        .store()
        .list_builds(&team.id, &template)
        .await?;
    Ok(Json(builds.iter().map(|b| b.to_wire()).collect::<Vec<_>>()))
}

async fn rebuild(
    State(state): State<AppState>,
    Auth(team): Auth,
    Path(template): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let r = state.engine.rebuild(&team.id, &template).await?;
    if r.created {
        start_build(&state.engine, r.build.id.clone());
    }
    Ok((StatusCode::ACCEPTED, Json(r.build.to_wire())))
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

async fn get_build(
    State(state): State<AppState>,
    Auth(team): Auth,
    Path((template, build)): Path<(String, String)>,
) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(
        build_of(&state, &team, &template, &build).await?.to_wire(),
    ))
}

async fn cancel_build(
    State(state): State<AppState>,
    Auth(team): Auth,
    Path((template, build)): Path<(String, String)>,
) -> Result<impl IntoResponse, ApiError> {
    let b = build_of(&state, &team, &template, &build).await?;
    state.engine.cancel_build(&team.id, &b.id).await?;
    Ok(StatusCode::NO_CONTENT)
}
