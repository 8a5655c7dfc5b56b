//! The data plane: commands and files inside one sandbox, on the API's own origin.
//!
//! A request names its sandbox with `X-Superserve-Sandbox-Id` (or a `boxd-<id>.` host, the
//! SDK's per-sandbox subdomain form) and is authorised by that sandbox's `X-Access-Token`
//! (or, for scripts, an `X-API-Key` of the sandbox's team). Another team's key, like an
//! unknown id, gets 404; a wrong token gets 401, which the SDK answers by calling
//! `/activate` for a fresh one. A paused sandbox answers 503 `sandbox_unavailable`, which
//! the SDK answers by resuming it. The work itself is the engine's
//! ([`kiln_engine::SandboxHandle`]); these handlers only translate.

use std::convert::Infallible;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{FromRequestParts, Query, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::{Stream, StreamExt as _, TryStreamExt as _};
use kiln_api::{ApiErrorCode, ExecRequest, FilesQuery};
use kiln_engine::{FileContent, SandboxHandle, MAX_UPLOAD_BYTES};

use crate::{parse_body, ApiError, AppState};

/// The sandbox a data-plane request is for, authorised.
#[derive(Debug)]
pub(crate) struct Target(pub(crate) SandboxHandle);

impl FromRequestParts<AppState> for Target {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let id = sandbox_id(&parts.headers)?;
        if let Some(token) = access_token(&parts.headers) {
            state.check_rate(&token)?;
            return Ok(Target(state.engine.sandbox_by_token(&id, &token).await?));
        }
        if let Some(key) = header_str(&parts.headers, "x-api-key") {
            let team = state.team_of_key(key).await?;
            return Ok(Target(state.engine.sandbox_for_team(&team.id, &id).await?));
        }
        Err(ApiError::new(
            ApiErrorCode::Unauthorized,
            "an X-Access-Token (or X-API-Key) header is required",
        ))
    }
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
}

/// The sandbox: the header, a `boxd-<id>.` host, or (for a browser's WebSocket, which
/// can set neither) the subprotocol `sandbox.<id>`.
fn sandbox_id(headers: &HeaderMap) -> Result<String, ApiError> {
    let id = header_str(headers, "x-superserve-sandbox-id")
        .map(str::to_owned)
        .or_else(|| {
            let host = header_str(headers, "host")?;
            let rest = host.strip_prefix("boxd-")?;
            Some(rest.split('.').next()?.to_owned())
        })
        .or_else(|| subprotocol(headers, "sandbox."))
        .ok_or_else(|| {
            ApiError::bad_request("the X-Superserve-Sandbox-Id header names the sandbox")
        })?;
    // Ids are UUIDs; anything else cannot exist, and must not reach a query or a log.
    if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-') {
        return Err(ApiError::new(
            ApiErrorCode::NotFound,
            "sandbox \"(invalid id)\" not found",
        ));
    }
    Ok(id)
}

/// The access token: the header, or the WebSocket subprotocol `token.<value>` (browsers
/// cannot set headers on an upgrade).
fn access_token(headers: &HeaderMap) -> Option<String> {
    if let Some(t) = header_str(headers, "x-access-token") {
        return Some(t.to_owned());
    }
    subprotocol(headers, "token.")
}

/// The value of the WebSocket subprotocol `<prefix><value>`, if one was offered.
fn subprotocol(headers: &HeaderMap, prefix: &str) -> Option<String> {
    headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .find_map(|p| p.trim().strip_prefix(prefix).map(str::to_owned))
}

/// `POST /exec`: the command's output once it has exited.
pub(crate) async fn exec(
    State(_state): State<AppState>,
    Target(sandbox): Target,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let req: ExecRequest = parse_body(&body, "request body")?;
    Ok(Json(sandbox.exec(&req).await?).into_response())
}

/// `POST /exec/stream`: output as it comes, then a `finished` event with the exit code.
pub(crate) async fn exec_stream(
    State(_state): State<AppState>,
    Target(sandbox): Target,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let req: ExecRequest = parse_body(&body, "request body")?;
    // Started before answering, so a failure to start is a status code, not an event.
    let events = sandbox.exec_stream(&req).await?;
    Ok(sse(events.map(|e| Ok(Event::default().data(json(&e))))))
}

fn json(v: &impl serde::Serialize) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

/// An SSE response with keep-alive comments, so idle streams survive proxies.
pub(crate) fn sse<S>(events: S) -> Response
where
    S: Stream<Item = Result<Event, Infallible>> + Send + 'static,
{
    Sse::new(events)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

fn files_query(
    q: Result<Query<FilesQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<FilesQuery, ApiError> {
    q.map(|Query(q)| q)
        .map_err(|e| ApiError::bad_request(format!("query: {}", e.body_text())))
}

/// `GET /files?path=`: a file's bytes, or a directory as a zip.
pub(crate) async fn read_file(
    Target(sandbox): Target,
    q: Result<Query<FilesQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let q = files_query(q)?;
    match sandbox.read_file(q.download_path()?).await? {
        FileContent::Zip { len, reader } => Ok((
            [
                (header::CONTENT_TYPE, "application/zip".to_owned()),
                (header::CONTENT_LENGTH, len.to_string()),
            ],
            Body::from_stream(tokio_util::io::ReaderStream::new(reader)),
        )
            .into_response()),
        FileContent::File(reader) => {
            let body = Body::from_stream(tokio_util::io::ReaderStream::new(reader));
            Ok(([(header::CONTENT_TYPE, "application/octet-stream")], body).into_response())
        }
    }
}

/// `POST /files?path=`: the body becomes the file.
pub(crate) async fn write_file(
    Target(sandbox): Target,
    q: Result<Query<FilesQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let q = files_query(q)?;
    let path = q.upload_path()?;
    // Refused before a byte is read when the client says how much it will send.
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_UPLOAD_BYTES) {
        return Err(ApiError::new(
            ApiErrorCode::PayloadTooLarge,
            format!("files are limited to {MAX_UPLOAD_BYTES} bytes"),
        ));
    }
    let stream = body.into_data_stream().map_err(std::io::Error::other);
    let reader = tokio_util::io::StreamReader::new(stream);
    sandbox.write_file(path, reader, None).await?;
    Ok(axum::http::StatusCode::NO_CONTENT.into_response())
}
