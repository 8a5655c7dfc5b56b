//! The data plane: commands and files inside one sandbox, on the API's own origin.
//!
//! A request names its sandbox with `X-Superserve-Sandbox-Id` (or a `boxd-<id>.` host, the
//! SDK's per-sandbox subdomain form) and is authorised by that sandbox's `X-Access-Token`
//! (or, for scripts, an `X-API-Key` of the sandbox's team). Another team's key, like an
//! unknown id, gets 404; a wrong token gets 401, which the SDK answers by calling
//! `/activate` for a fresh one. A paused sandbox answers 503 `sandbox_unavailable`, which
//! the SDK answers by resuming it.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::io::Write as _;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{FromRequestParts, Query, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::{Stream, TryStreamExt as _};
use kiln_agent_proto::{
    AgentClient, ClientError, ExecEvent, ExecRequest, ExitStatus, FileKind, WriteFileRequest,
};
use kiln_store::{Sandbox, SandboxAccess, SandboxStatus};
use serde::Deserialize;

use crate::{json_body, ApiError, AppState};

/// Combined stdout and stderr kept for a non-streaming `/exec`; the rest is dropped and
/// the result says `truncated`.
pub const MAX_EXEC_OUTPUT: usize = 16 * 1024 * 1024;
/// Largest file accepted by `POST /files`.
pub const MAX_UPLOAD_BYTES: u64 = 512 * 1024 * 1024;
/// Largest directory archive built by `GET /files` (it is assembled in memory).
pub const MAX_ZIP_BYTES: u64 = 512 * 1024 * 1024;
/// Most entries in a directory archive.
const MAX_ZIP_ENTRIES: usize = 100_000;
/// Longest command or path accepted.
const MAX_COMMAND: usize = 256 * 1024;
const MAX_PATH: usize = 4096;
/// Longest `timeout_s` accepted (a day).
const MAX_TIMEOUT_S: u64 = 86_400;

/// The sandbox a data-plane request is for, authorised, with its agent.
#[derive(Debug)]
pub(crate) struct Target {
    pub(crate) sandbox: Sandbox,
    pub(crate) agent: AgentClient,
}

impl FromRequestParts<AppState> for Target {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let id = sandbox_id(&parts.headers)?;
        let sandbox = authorise(&parts.headers, state, &id).await?;
        if sandbox.status == SandboxStatus::Deleted {
            return Err(kiln_store::StoreError::not_found("sandbox", &id).into());
        }
        let agent = state.engine.live_agent(&sandbox)?;
        Ok(Target { sandbox, agent })
    }
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
}

fn sandbox_id(headers: &HeaderMap) -> Result<String, ApiError> {
    let id = header_str(headers, "x-superserve-sandbox-id")
        .map(str::to_owned)
        .or_else(|| {
            let host = header_str(headers, "host")?;
            let rest = host.strip_prefix("boxd-")?;
            Some(rest.split('.').next()?.to_owned())
        })
        .ok_or_else(|| {
            ApiError::bad_request("the X-Superserve-Sandbox-Id header names the sandbox")
        })?;
    // Ids are UUIDs; anything else cannot exist, and must not reach a query or a log.
    if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-') {
        return Err(kiln_store::StoreError::not_found("sandbox", "(invalid id)").into());
    }
    Ok(id)
}

/// The access token: the header, or the WebSocket subprotocol `token.<value>` (browsers
/// cannot set headers on an upgrade).
fn access_token(headers: &HeaderMap) -> Option<String> {
    if let Some(t) = header_str(headers, "x-access-token") {
        return Some(t.to_owned());
    }
    headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .find_map(|p| p.trim().strip_prefix("token.").map(str::to_owned))
}

async fn authorise(headers: &HeaderMap, state: &AppState, id: &str) -> Result<Sandbox, ApiError> {
    let store = state.engine.store();
    if let Some(token) = access_token(headers) {
        state.check_rate(&token)?;
        return match store.sandbox_access(id, &token).await? {
            SandboxAccess::Granted(s) => Ok(*s),
            SandboxAccess::Denied => Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "the access token is not this sandbox's (it rotates on resume)",
            )),
            SandboxAccess::NotFound => Err(kiln_store::StoreError::not_found("sandbox", id).into()),
        };
    }
    if let Some(key) = header_str(headers, "x-api-key") {
        let team = store
            .authenticate(key)
            .await?
            .ok_or_else(ApiError::unauthorized)?;
        state.check_rate(key)?;
        return Ok(store.sandbox_by_id(&team.id, id).await?);
    }
    Err(ApiError::new(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "an X-Access-Token (or X-API-Key) header is required",
    ))
}

// ------------------------------------------------------------------------------------ exec

/// `POST /exec`, `POST /exec/stream` and the WebSocket start frame.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ExecBody {
    command: String,
    working_dir: Option<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    timeout_s: Option<u64>,
}

impl ExecBody {
    /// Validates and becomes the agent's request (`sh -c command`, the template's user and
    /// defaults unless overridden).
    pub(crate) fn into_request(self, stdin: bool) -> Result<ExecRequest, ApiError> {
        if self.command.trim().is_empty() || self.command.len() > MAX_COMMAND {
            return Err(ApiError::bad_request(format!(
                "command: must be non-empty and at most {MAX_COMMAND} bytes"
            )));
        }
        if let Some(dir) = &self.working_dir {
            validate_path(dir).map_err(|m| ApiError::bad_request(format!("working_dir: {m}")))?;
        }
        for key in self.env.keys() {
            if key.is_empty() || key.contains('=') || key.contains('\0') {
                return Err(ApiError::bad_request(format!("env: invalid name {key:?}")));
            }
        }
        let timeout_ms = match self.timeout_s {
            Some(0) | None => None,
            Some(s) if s > MAX_TIMEOUT_S => {
                return Err(ApiError::bad_request(format!(
                    "timeout_s: at most {MAX_TIMEOUT_S}"
                )))
            }
            Some(s) => Some(s * 1000),
        };
        Ok(ExecRequest {
            command: self.command,
            env: self.env,
            cwd: self.working_dir,
            user: None,
            stdin,
            timeout_ms,
            background: None,
        })
    }
}

/// The exit code the SDK shows: the process's, `128 + signal` when killed, 124 on
/// timeout (as `timeout(1)` reports it).
pub(crate) fn exit_code(st: &ExitStatus) -> i32 {
    if st.timed_out {
        return 124;
    }
    st.code.or(st.signal.map(|s| 128 + s)).unwrap_or(-1)
}

/// The one wording of a timeout, on every exec path.
pub(crate) fn timeout_notice(req_timeout_ms: Option<u64>) -> String {
    format!(
        "command timed out after {} s and was killed",
        req_timeout_ms.unwrap_or(0) / 1000
    )
}

pub(crate) async fn exec(
    State(_state): State<AppState>,
    target: Target,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let req: ExecBody = parse(&body)?;
    let req = req.into_request(false)?;
    let timeout_ms = req.timeout_ms;
    let mut handle = target.agent.exec(req).await.map_err(ApiError::from)?;
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    let mut truncated = false;
    let status = loop {
        match handle.next_event().await.map_err(ApiError::from)? {
            Some(ExecEvent::Stdout(b)) => keep(&mut stdout, stderr.len(), &b, &mut truncated),
            Some(ExecEvent::Stderr(b)) => keep(&mut stderr, stdout.len(), &b, &mut truncated),
            Some(ExecEvent::Exit(st)) => break st,
            None => return Err(ClientError::StreamClosed.into()),
        }
    };
    let mut stderr = String::from_utf8_lossy(&stderr).into_owned();
    if truncated {
        stderr.push_str(&format!(
            "\n[kiln] output exceeded {MAX_EXEC_OUTPUT} bytes and was truncated; stream it \
             (exec/stream) or redirect it to a file\n"
        ));
    }
    if status.timed_out {
        if !stderr.is_empty() && !stderr.ends_with('\n') {
            stderr.push('\n');
        }
        stderr.push_str(&timeout_notice(timeout_ms));
    }
    Ok(Json(serde_json::json!({
        "stdout": String::from_utf8_lossy(&stdout),
        "stderr": stderr,
        "exit_code": exit_code(&status),
        "truncated": truncated,
    }))
    .into_response())
}

fn keep(buf: &mut Vec<u8>, other: usize, data: &[u8], truncated: &mut bool) {
    let room = MAX_EXEC_OUTPUT.saturating_sub(buf.len() + other);
    if data.len() > room {
        *truncated = true;
    }
    buf.extend_from_slice(&data[..data.len().min(room)]);
}

fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_value(json_body(body)?)
        .map_err(|e| ApiError::bad_request(format!("invalid request body: {e}")))
}

/// Turns byte chunks into text without splitting a UTF-8 sequence across two events.
#[derive(Debug, Default)]
pub(crate) struct Utf8Chunks {
    pending: Vec<u8>,
}

impl Utf8Chunks {
    /// The text complete so far; an incomplete trailing sequence waits for the next chunk.
    pub(crate) fn push(&mut self, data: &[u8]) -> String {
        self.pending.extend_from_slice(data);
        let valid = match std::str::from_utf8(&self.pending) {
            Ok(_) => self.pending.len(),
            Err(e) if e.error_len().is_none() => e.valid_up_to(),
            // Invalid bytes (not just incomplete): emit everything, replaced.
            Err(_) => self.pending.len(),
        };
        let rest = self.pending.split_off(valid);
        let text = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending = rest;
        text
    }

    /// Whatever is left, replaced if incomplete.
    pub(crate) fn finish(&mut self) -> String {
        let text = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        text
    }
}

/// `POST /exec/stream`: output as it comes, then a `finished` event with the exit code.
pub(crate) async fn exec_stream(
    State(_state): State<AppState>,
    target: Target,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let req: ExecBody = parse(&body)?;
    let req = req.into_request(false)?;
    let timeout_ms = req.timeout_ms;
    // Started before answering, so a failure to start is a status code, not an event.
    let handle = target.agent.exec(req).await.map_err(ApiError::from)?;
    struct St {
        handle: kiln_agent_proto::ExecHandle,
        out: Utf8Chunks,
        err: Utf8Chunks,
        done: bool,
    }
    let st = St {
        handle,
        out: Utf8Chunks::default(),
        err: Utf8Chunks::default(),
        done: false,
    };
    let events = futures::stream::unfold(st, move |mut st| async move {
        loop {
            if st.done {
                return None;
            }
            let data = match st.handle.next_event().await {
                Ok(Some(ExecEvent::Stdout(b))) => {
                    let text = st.out.push(&b);
                    if text.is_empty() {
                        continue;
                    }
                    serde_json::json!({ "stdout": text })
                }
                Ok(Some(ExecEvent::Stderr(b))) => {
                    let text = st.err.push(&b);
                    if text.is_empty() {
                        continue;
                    }
                    serde_json::json!({ "stderr": text })
                }
                Ok(Some(ExecEvent::Exit(status))) => {
                    st.done = true;
                    let mut ev = serde_json::json!({
                        "finished": true, "exit_code": exit_code(&status),
                    });
                    let (out, err) = (st.out.finish(), st.err.finish());
                    if !out.is_empty() {
                        ev["stdout"] = out.into();
                    }
                    if !err.is_empty() {
                        ev["stderr"] = err.into();
                    }
                    if status.timed_out {
                        ev["error"] = timeout_notice(timeout_ms).into();
                    }
                    ev
                }
                Ok(None) | Err(_) => {
                    st.done = true;
                    serde_json::json!({
                        "finished": true, "exit_code": -1,
                        "error": "the connection to the sandbox's agent was lost",
                    })
                }
            };
            let event = Event::default().data(data.to_string());
            return Some((Ok::<_, Infallible>(event), st));
        }
    });
    Ok(sse(events))
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

// ----------------------------------------------------------------------------------- files

/// Absolute, no `..` segment, no NUL, bounded.
pub(crate) fn validate_path(path: &str) -> Result<(), &'static str> {
    if !path.starts_with('/') {
        return Err("must be an absolute path");
    }
    if path.split('/').any(|seg| seg == "..") {
        return Err("must not contain \"..\" segments");
    }
    if path.contains('\0') {
        return Err("must not contain NUL");
    }
    if path.len() > MAX_PATH {
        return Err("is too long");
    }
    Ok(())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FilesQuery {
    path: String,
    format: Option<String>,
}

impl FilesQuery {
    fn path(&self) -> Result<&str, ApiError> {
        validate_path(&self.path).map_err(|m| ApiError::bad_request(format!("path: {m}")))?;
        Ok(&self.path)
    }
}

fn files_query(
    q: Result<Query<FilesQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<FilesQuery, ApiError> {
    q.map(|Query(q)| q)
        .map_err(|e| ApiError::bad_request(format!("query: {}", e.body_text())))
}

/// `GET /files?path=`: a file's bytes, or a directory as a zip whose entries start with the
/// directory's base name. Symlinks inside a directory are skipped.
pub(crate) async fn read_file(
    target: Target,
    q: Result<Query<FilesQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let q = files_query(q)?;
    let path = q.path()?.to_owned();
    if let Some(f) = q.format.as_deref().filter(|f| *f != "zip") {
        return Err(ApiError::bad_request(format!(
            "format: unknown format {f:?}"
        )));
    }
    let st = target.agent.stat(&path).await.map_err(ApiError::from)?;
    match st.kind {
        FileKind::Dir => {
            let zip = zip_dir(&target.agent, &path).await?;
            Ok((
                [
                    (header::CONTENT_TYPE, "application/zip".to_owned()),
                    (header::CONTENT_LENGTH, zip.len().to_string()),
                ],
                zip,
            )
                .into_response())
        }
        FileKind::File | FileKind::Symlink => {
            let (reader, writer) = tokio::io::duplex(256 * 1024);
            let agent = target.agent.clone();
            tokio::spawn(async move {
                if let Err(e) = agent.read_file_to(&path, writer).await {
                    tracing::debug!(error = %e, "file download ended early");
                }
            });
            let body = Body::from_stream(tokio_util::io::ReaderStream::new(reader));
            Ok(([(header::CONTENT_TYPE, "application/octet-stream")], body).into_response())
        }
        FileKind::Other => Err(ApiError::bad_request(
            "path: not a regular file or directory",
        )),
    }
}

async fn zip_dir(agent: &AgentClient, root: &str) -> Result<Vec<u8>, ApiError> {
    let base = root
        .trim_end_matches('/')
        .rsplit('/')
        .next()
        .filter(|b| !b.is_empty())
        .unwrap_or("root")
        .to_owned();
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let opts = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated)
        .large_file(false);
    let too_big = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!(
                "the directory is larger than {MAX_ZIP_BYTES} bytes or {MAX_ZIP_ENTRIES} entries"
            ),
        )
    };
    let zip_err = |e: &dyn std::fmt::Display| {
        tracing::warn!(error = %e, "building a zip");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "could not build the archive",
        )
    };
    let mut total = 0u64;
    let mut entries = 0usize;
    // Depth-first over (guest path, name inside the archive).
    let mut todo = vec![(root.trim_end_matches('/').to_owned(), base)];
    while let Some((dir, name)) = todo.pop() {
        zip.add_directory(format!("{name}/"), opts)
            .map_err(|e| zip_err(&e))?;
        let dir = if dir.is_empty() { "/".to_owned() } else { dir };
        for entry in target_list(agent, &dir).await? {
            entries += 1;
            if entries > MAX_ZIP_ENTRIES {
                return Err(too_big());
            }
            let child = format!("{}/{}", dir.trim_end_matches('/'), entry.name);
            let inner = format!("{name}/{}", entry.name);
            match entry.stat.kind {
                FileKind::Dir => todo.push((child, inner)),
                FileKind::File => {
                    total += entry.stat.size;
                    if total > MAX_ZIP_BYTES {
                        return Err(too_big());
                    }
                    let data = agent.read_file(&child).await.map_err(ApiError::from)?;
                    zip.start_file(inner, opts.unix_permissions(entry.stat.mode))
                        .map_err(|e| zip_err(&e))?;
                    zip.write_all(&data).map_err(|e| zip_err(&e))?;
                }
                FileKind::Symlink | FileKind::Other => {}
            }
        }
    }
    Ok(zip.finish().map_err(|e| zip_err(&e))?.into_inner())
}

async fn target_list(
    agent: &AgentClient,
    dir: &str,
) -> Result<Vec<kiln_agent_proto::DirEntry>, ApiError> {
    agent.list(dir).await.map_err(ApiError::from)
}

/// `POST /files?path=`: the body becomes the file (parents created), owned by the
/// sandbox's default user, like a file its own commands would write.
pub(crate) async fn write_file(
    target: Target,
    q: Result<Query<FilesQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let q = files_query(q)?;
    let path = q.path()?.to_owned();
    if q.format.is_some() {
        return Err(ApiError::bad_request("format: only for downloads"));
    }
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_UPLOAD_BYTES) {
        return Err(upload_too_large());
    }
    let defaults = target.agent.get_defaults().await.map_err(ApiError::from)?;
    let req = WriteFileRequest {
        path: path.clone(),
        mode: None,
        owner: defaults.user,
        create_parents: true,
        append: false,
    };
    let limited = http_body_util::Limited::new(body, MAX_UPLOAD_BYTES as usize);
    let stream = Body::new(limited)
        .into_data_stream()
        .map_err(std::io::Error::other);
    let reader = tokio_util::io::StreamReader::new(stream);
    match target.agent.write_file_with(req, reader).await {
        Ok(_) => Ok(StatusCode::NO_CONTENT.into_response()),
        Err(e) => {
            // Don't leave half a file behind.
            let _ = target.agent.remove(&path, false).await;
            match e {
                ClientError::Io(io) if io.to_string().contains("length limit") => {
                    Err(upload_too_large())
                }
                ClientError::Io(io) => Err(ApiError::bad_request(format!(
                    "reading the request body: {io}"
                ))),
                other => Err(other.into()),
            }
        }
    }
}

fn upload_too_large() -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        format!("files are limited to {MAX_UPLOAD_BYTES} bytes"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_absolute_without_dotdot() {
        assert!(validate_path("/tmp/x").is_ok());
        assert!(validate_path("/a/..b/c").is_ok());
        assert!(validate_path("tmp/x").is_err());
        assert!(validate_path("/tmp/../etc/passwd").is_err());
        assert!(validate_path("/tmp/..").is_err());
        assert!(validate_path("/tmp/a\0b").is_err());
        assert!(validate_path(&format!("/{}", "a".repeat(5000))).is_err());
    }

    #[test]
    fn utf8_sequences_are_not_split() {
        let mut c = Utf8Chunks::default();
        let s = "h\u{e9}llo \u{1f600}".as_bytes();
        let mut out = String::new();
        for b in s {
            out.push_str(&c.push(&[*b]));
        }
        out.push_str(&c.finish());
        assert_eq!(out, "h\u{e9}llo \u{1f600}");
        // Invalid bytes come out replaced, not stuck.
        assert_eq!(c.push(&[0xff, b'a']), "\u{fffd}a");
    }

    #[test]
    fn exit_codes() {
        let st = |code, signal, timed_out| ExitStatus {
            code,
            signal,
            timed_out,
        };
        assert_eq!(exit_code(&st(Some(3), None, false)), 3);
        assert_eq!(exit_code(&st(None, Some(9), false)), 137);
        assert_eq!(exit_code(&st(None, Some(9), true)), 124);
    }
}
