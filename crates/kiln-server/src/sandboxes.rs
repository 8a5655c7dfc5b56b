//! `/sandboxes`: create, list, inspect, update, pause, resume and kill sandboxes, read
//! their network logs, and take and manage their snapshots (`/snapshots`). Each handler is
//! one engine call.

use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use kiln_api::{
    CreateSandbox, CreateSnapshot, NetworkLogQuery, SandboxFilter, SandboxStatus, SnapshotPage,
    SnapshotStatus, UpdateSandbox, UpdateSnapshot,
};
use kiln_engine::SandboxUp;

use crate::{parse_body, query_pairs, ApiError, AppState, Auth};

/// The answer to create, resume and activate, with the restore time observed.
fn up(state: &AppState, up: SandboxUp) -> Json<kiln_api::SandboxWithToken> {
    if let Some(t) = up.restore_time {
        state.metrics.observe_restore(t);
    }
    Json(up.sandbox)
}

pub(crate) async fn create(
    State(state): State<AppState>,
    Auth(team): Auth,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let req: CreateSandbox = parse_body(&body, "sandbox request")?;
    let created = state.engine.create_sandbox(&team.id, &req).await?;
    Ok((StatusCode::CREATED, up(&state, created)).into_response())
}

/// `metadata.<key>=<value>` (all must match), `status=a,b` (any), `limit`, `offset`.
pub(crate) async fn list(
    State(state): State<AppState>,
    Auth(team): Auth,
    RawQuery(query): RawQuery,
) -> Result<impl IntoResponse, ApiError> {
    let filter = SandboxFilter::from_query(&query_pairs(query.as_deref()))?;
    Ok(Json(state.engine.list_sandboxes(&team.id, &filter).await?))
}

pub(crate) async fn get(
    State(state): State<AppState>,
    Auth(team): Auth,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(state.engine.sandbox(&team.id, &id).await?))
}

pub(crate) async fn update(
    State(state): State<AppState>,
    Auth(team): Auth,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<impl IntoResponse, ApiError> {
    let req: UpdateSandbox = parse_body(&body, "sandbox update")?;
    state.engine.update_sandbox(&team.id, &id, &req).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub(crate) async fn delete(
    State(state): State<AppState>,
    Auth(team): Auth,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    state.engine.kill_sandbox(&team.id, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /sandboxes/{id}/pause`: answers when the pause has landed (204), or at once with
/// `Prefer: respond-async` (202, the pause continues in the background).
pub(crate) async fn pause(
    State(state): State<AppState>,
    Auth(team): Auth,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let respond_async = headers
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim().eq_ignore_ascii_case("respond-async"));
    if respond_async {
        let s = state.engine.pause_sandbox_detached(&team.id, &id).await?;
        if s.status != SandboxStatus::Paused {
            let body = serde_json::json!({"status": SandboxStatus::Pausing});
            return Ok((StatusCode::ACCEPTED, Json(body)).into_response());
        }
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    state.engine.pause_sandbox(&team.id, &id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `POST /sandboxes/{id}/resume`: the sandbox running again, with a new access token.
pub(crate) async fn resume(
    State(state): State<AppState>,
    Auth(team): Auth,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let resumed = state.engine.resume_sandbox(&team.id, &id).await?;
    Ok(up(&state, resumed))
}

/// `POST /sandboxes/{id}/activate`: the sandbox running (resumed if paused) and a token
/// that works; a running sandbox keeps its token.
pub(crate) async fn activate(
    State(state): State<AppState>,
    Auth(team): Auth,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let activated = state.engine.activate_sandbox(&team.id, &id).await?;
    Ok(up(&state, activated))
}

/// `GET /sandboxes/{id}/network`: the connections the sandbox made, newest first, with
/// the SDKs' `get_network_log` filters.
pub(crate) async fn network_log(
    State(state): State<AppState>,
    Auth(team): Auth,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<impl IntoResponse, ApiError> {
    let q = NetworkLogQuery::from_query(&query_pairs(query.as_deref()))?;
    Ok(Json(state.engine.network_log(&team.id, &id, &q).await?))
}

/// How long `POST /sandboxes/{id}/snapshot` waits for the snapshot to be ready after the
/// capture before it answers `202 creating` (under the SDKs' 30 s inactivity timeout).
const SNAPSHOT_WAIT: std::time::Duration = std::time::Duration::from_secs(20);

/// `POST /sandboxes/{id}/snapshot`: 201 with the snapshot once it is ready, 202 while it
/// is still `creating` (made forkable in the background), 200 for a repeated
/// idempotency key.
pub(crate) async fn snapshot(
    State(state): State<AppState>,
    Auth(team): Auth,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let req: CreateSnapshot = if body.iter().all(u8::is_ascii_whitespace) {
        CreateSnapshot::default()
    } else {
        parse_body(&body, "snapshot request")?
    };
    let taken = state.engine.create_snapshot(&team.id, &id, &req).await?;
    if !taken.created {
        return Ok((StatusCode::OK, Json(taken.snapshot)).into_response());
    }
    let s = state
        .engine
        .wait_snapshot(&team.id, &taken.snapshot.id, SNAPSHOT_WAIT)
        .await?;
    let status = if s.status == SnapshotStatus::Creating {
        StatusCode::ACCEPTED
    } else {
        StatusCode::CREATED
    };
    Ok((status, Json(s)).into_response())
}

/// `GET /sandboxes/{id}/snapshots`: the sandbox's snapshots, newest first (also once
/// it is deleted), `limit` / `offset`.
pub(crate) async fn snapshots_of(
    State(state): State<AppState>,
    Auth(team): Auth,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<impl IntoResponse, ApiError> {
    let page = SnapshotPage::from_query(&query_pairs(query.as_deref()))?;
    Ok(Json(
        state
            .engine
            .list_snapshots(&team.id, Some(&id), &page)
            .await?,
    ))
}

/// `GET /snapshots`: the team's snapshots, newest first, `limit` / `offset`.
pub(crate) async fn list_snapshots(
    State(state): State<AppState>,
    Auth(team): Auth,
    RawQuery(query): RawQuery,
) -> Result<impl IntoResponse, ApiError> {
    let page = SnapshotPage::from_query(&query_pairs(query.as_deref()))?;
    Ok(Json(
        state.engine.list_snapshots(&team.id, None, &page).await?,
    ))
}

pub(crate) async fn get_snapshot(
    State(state): State<AppState>,
    Auth(team): Auth,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(state.engine.snapshot(&team.id, &id).await?))
}

/// `PATCH /snapshots/{id}`: renames it; answers the renamed snapshot.
pub(crate) async fn rename_snapshot(
    State(state): State<AppState>,
    Auth(team): Auth,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<impl IntoResponse, ApiError> {
    let req: UpdateSnapshot = parse_body(&body, "snapshot update")?;
    Ok(Json(
        state.engine.rename_snapshot(&team.id, &id, &req).await?,
    ))
}

/// `DELETE /snapshots/{id}`: 204; sandboxes created from it are not affected.
pub(crate) async fn delete_snapshot(
    State(state): State<AppState>,
    Auth(team): Auth,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    state.engine.delete_snapshot(&team.id, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}
