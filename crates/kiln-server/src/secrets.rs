//! `/secrets`, `/providers` and a sandbox's `/secrets`: team secrets, their audit and the
//! sandboxes they are bound to, and binding them. Each handler is one engine call; no
//! response carries a secret's value.

use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use kiln_api::{AttachSecret, AuditQuery, CreateSecret, RotateSecret};

use crate::{parse_body, query_pairs, ApiError, AppState, Auth};

/// `GET /providers`: the shortcuts `provider` takes.
pub(crate) async fn providers(State(state): State<AppState>, Auth(_): Auth) -> impl IntoResponse {
    Json(state.engine.providers())
}

pub(crate) async fn create(
    State(state): State<AppState>,
    Auth(team): Auth,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let req: CreateSecret = parse_body(&body, "secret")?;
    let secret = state.engine.create_secret(&team.id, &req).await?;
    Ok((StatusCode::CREATED, Json(secret)).into_response())
}

pub(crate) async fn list(
    State(state): State<AppState>,
    Auth(team): Auth,
) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(state.engine.list_secrets(&team.id).await?))
}

pub(crate) async fn get(
    State(state): State<AppState>,
    Auth(team): Auth,
    Path(name): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(state.engine.secret(&team.id, &name).await?))
}

/// `PATCH /secrets/{name}`: a new value (the SDKs' `rotate`).
pub(crate) async fn rotate(
    State(state): State<AppState>,
    Auth(team): Auth,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Result<impl IntoResponse, ApiError> {
    let req: RotateSecret = parse_body(&body, "secret update")?;
    Ok(Json(
        state.engine.rotate_secret(&team.id, &name, &req).await?,
    ))
}

pub(crate) async fn delete(
    State(state): State<AppState>,
    Auth(team): Auth,
    Path(name): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    state.engine.delete_secret(&team.id, &name).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /secrets/{name}/audit`: requests made with it, newest first (`limit`, `before`,
/// `status`).
pub(crate) async fn audit(
    State(state): State<AppState>,
    Auth(team): Auth,
    Path(name): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<impl IntoResponse, ApiError> {
    let q = AuditQuery::from_query(&query_pairs(query.as_deref()))?;
    Ok(Json(state.engine.secret_audit(&team.id, &name, &q).await?))
}

pub(crate) async fn sandboxes(
    State(state): State<AppState>,
    Auth(team): Auth,
    Path(name): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(state.engine.secret_sandboxes(&team.id, &name).await?))
}

/// `POST /sandboxes/{id}/secrets`: bind a secret under an environment variable.
pub(crate) async fn attach(
    State(state): State<AppState>,
    Auth(team): Auth,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<impl IntoResponse, ApiError> {
    let req: AttachSecret = parse_body(&body, "secret binding")?;
    state.engine.attach_secret(&team.id, &id, &req).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `DELETE /sandboxes/{id}/secrets/{env}`: remove a binding; its stand-in is revoked.
pub(crate) async fn detach(
    State(state): State<AppState>,
    Auth(team): Auth,
    Path((id, env)): Path<(String, String)>,
) -> Result<impl IntoResponse, ApiError> {
    state.engine.detach_secret(&team.id, &id, &env).await?;
    Ok(StatusCode::NO_CONTENT)
}
