//! `/sandboxes/{id}/preview-ports`: publish, list and unpublish a sandbox's preview ports,
//! and mint or rotate their tokens. Each handler is one engine call; the proxy that serves
//! the URLs is [`crate::proxy`].

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use kiln_api::{PreviewTokenRequest, PublishPreviewPort};

use crate::{parse_body, ApiError, AppState, Auth};

/// `GET /sandboxes/{id}/preview-ports`: the policy and the published ports (never a
/// token).
pub(crate) async fn list(
    State(state): State<AppState>,
    Auth(team): Auth,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(state.engine.preview_ports(&team.id, &id).await?))
}

/// `POST /sandboxes/{id}/preview-ports`: `{"port": 3000, "access": "private"}`.
pub(crate) async fn publish(
    State(state): State<AppState>,
    Auth(team): Auth,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<impl IntoResponse, ApiError> {
    let req: PublishPreviewPort = parse_body(&body, "preview port")?;
    Ok(Json(
        state
            .engine
            .publish_preview_port(&team.id, &id, &req)
            .await?,
    ))
}

/// `DELETE /sandboxes/{id}/preview-ports/{port}`: idempotent.
pub(crate) async fn unpublish(
    State(state): State<AppState>,
    Auth(team): Auth,
    Path((id, port)): Path<(String, String)>,
) -> Result<impl IntoResponse, ApiError> {
    state
        .engine
        .unpublish_preview_port(&team.id, &id, &port)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /sandboxes/{id}/preview-ports/{port}/token`: `{"expires_in_seconds": 300}` or
/// an empty body.
pub(crate) async fn token(
    State(state): State<AppState>,
    Auth(team): Auth,
    Path((id, port)): Path<(String, String)>,
    body: axum::body::Bytes,
) -> Result<impl IntoResponse, ApiError> {
    let req: PreviewTokenRequest = if body.iter().all(u8::is_ascii_whitespace) {
        PreviewTokenRequest::default()
    } else {
        parse_body(&body, "token request")?
    };
    let ttl = req.validate()?;
    Ok(Json(
        state
            .engine
            .preview_token(&team.id, &id, &port, ttl)
            .await?,
    ))
}

/// `POST /sandboxes/{id}/preview-ports/{port}/token/rotate`: revokes every token of the
/// port and answers a fresh one.
pub(crate) async fn rotate(
    State(state): State<AppState>,
    Auth(team): Auth,
    Path((id, port)): Path<(String, String)>,
) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(
        state
            .engine
            .rotate_preview_token(&team.id, &id, &port)
            .await?,
    ))
}
