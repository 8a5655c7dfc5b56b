//! The preview proxy: a request on the API's listener whose `Host` is
//! `{port}-{sandbox_id}.{preview domain}` goes to that port inside the sandbox; every
//! other request is the API's, untouched.
//!
//! - **Access** is the engine's ([`kiln_engine::Engine::authorize_preview`]): the token
//!   comes from the `x-kiln-preview-token` header, the `kiln_preview_token` query
//!   parameter or the cookie of that name. A token in the query of a `GET` is traded for
//!   an HttpOnly, SameSite cookie of that preview host alone, and the browser is
//!   redirected to the same URL without it. The header, the parameter and the cookie
//!   never reach the sandbox; nothing else of the request or the response changes but
//!   the hop-by-hop headers.
//! - **The way in** is a connection through the sandbox's agent
//!   ([`kiln_engine::Engine::preview_connect`]), kept alive in a pool per sandbox and
//!   port for the next request, as a browser keeps its own to kiln. Bodies stream both
//!   ways as they come (SSE, chunked, large downloads); an `Upgrade` (a WebSocket)
//!   becomes a tunnel of raw bytes both ways.
//! - **Answers of its own** are short HTML pages: 404 for no such preview, 401 without a
//!   valid token, 502 when nothing listens on the port, 503 when the sandbox is not
//!   running here. A paused sandbox is resumed by the request and then answers it.
//! - Each request is counted in `/metrics` (by sandbox and status) and appended to the
//!   sandbox's network log (`kind: request`, `direction: inbound`), without its query.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, Response, StatusCode, Uri};
use axum::middleware::Next;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use kiln_api::preview::{PREVIEW_TOKEN_COOKIE, PREVIEW_TOKEN_HEADER, PREVIEW_TOKEN_QUERY};
use kiln_api::PortAccess;
use kiln_engine::{Engine, InboundRequest, PreviewError, PreviewGrant, PreviewStream};

use crate::AppState;

/// The authority of the pool's URIs: `{port}-{sandbox}.` under this never-resolved name,
/// one pool per sandbox and port.
const POOL_DOMAIN: &str = "kiln-preview.invalid";

/// Idle connections into sandboxes kept for reuse, per sandbox and port.
const POOL_IDLE_PER_HOST: usize = 8;
/// How long an idle connection is kept.
const POOL_IDLE: std::time::Duration = std::time::Duration::from_secs(30);

/// Headers that belong to one hop (RFC 9110 section 7.6.1) and are never forwarded
/// either way; `Connection` may name more.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// The client that carries preview requests into sandboxes.
#[derive(Debug, Clone)]
pub struct PreviewClient {
    client: Client<Connector, Body>,
}

impl PreviewClient {
    /// A client whose connections go through `engine`.
    pub fn new(engine: std::sync::Arc<Engine>) -> Self {
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE)
            .pool_max_idle_per_host(POOL_IDLE_PER_HOST)
            // Requests go out as they came: their own Host header, nothing added.
            .set_host(false)
            .build(Connector { engine });
        Self { client }
    }
}

/// Connects the pool's URIs through the sandbox's agent.
#[derive(Debug, Clone)]
struct Connector {
    engine: std::sync::Arc<Engine>,
}

impl tower::Service<Uri> for Connector {
    type Response = Conn;
    type Error = PreviewError;
    type Future = Pin<Box<dyn Future<Output = Result<Conn, PreviewError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let engine = self.engine.clone();
        Box::pin(async move {
            let (port, id) = uri
                .host()
                .and_then(|h| h.strip_suffix(POOL_DOMAIN)?.strip_suffix('.'))
                .and_then(|label| label.split_once('-'))
                .and_then(|(p, id)| Some((p.parse::<u16>().ok()?, id.to_owned())))
                .ok_or(PreviewError::NotFound)?;
            let stream = engine.preview_connect(&id, port).await?;
            Ok(Conn(TokioIo::new(stream)))
        })
    }
}

/// One connection into a sandbox, for hyper.
#[derive(Debug)]
struct Conn(TokioIo<PreviewStream>);

impl Connection for Conn {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl hyper::rt::Read for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// The request's host: `Host`, or the authority of an absolute-form target.
fn host_of(req: &Request) -> Option<&str> {
    req.headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()))
}

/// The first layer every request meets: preview hosts are served here, everything else
/// goes on to the API.
pub(crate) async fn intercept(
    State(state): State<AppState>,
    req: Request,
    next: Next,
) -> Response<Body> {
    let target = host_of(&req)
        .and_then(|h| state.engine.preview_site().target(h))
        .map(|(port, id)| (port, id.to_owned()));
    match target {
        Some((port, id)) => serve(&state, req, port, &id).await,
        None => next.run(req).await,
    }
}

/// Where the request's token came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Header,
    Query,
    Cookie,
}

/// The request's preview token, if any: the header, else the query, else the cookie.
fn credential(req: &Request) -> Option<(String, Source)> {
    if let Some(t) = req
        .headers()
        .get(PREVIEW_TOKEN_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|t| !t.trim().is_empty())
    {
        return Some((t.trim().to_owned(), Source::Header));
    }
    if let Some(t) = crate::query_pairs(req.uri().query())
        .into_iter()
        .find_map(|(k, v)| (k == PREVIEW_TOKEN_QUERY && !v.is_empty()).then_some(v))
    {
        return Some((t, Source::Query));
    }
    cookies(req.headers())
        .find_map(|(k, v)| (k == PREVIEW_TOKEN_COOKIE && !v.is_empty()).then(|| v.to_owned()))
        .map(|t| (t, Source::Cookie))
}

/// The `name=value` pairs of every `Cookie` header.
fn cookies(headers: &HeaderMap) -> impl Iterator<Item = (&str, &str)> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| {
            let (k, v) = c.trim().split_once('=')?;
            Some((k.trim(), v.trim()))
        })
}

async fn serve(state: &AppState, req: Request, port: u32, sandbox_id: &str) -> Response<Body> {
    let started = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let token = credential(&req);
    let outcome = match state
        .engine
        .authorize_preview(sandbox_id, port, token.as_ref().map(|(t, _)| t.as_str()))
        .await
    {
        Err(e) => Err(e),
        Ok(grant) => forward(state, req, &grant, token).await,
    };
    let resp = outcome.unwrap_or_else(|e| refusal(&e));
    let status = resp.status().as_u16();
    // A 404 or a 400 (refused before the sandbox was looked up) may name any id at all:
    // counted, but not under that id.
    let known = !matches!(status, 400 | 404);
    state
        .metrics
        .observe_preview(known.then_some(sandbox_id), status);
    if let Ok(port) = u16::try_from(port) {
        state.engine.log_preview_request(
            sandbox_id,
            &InboundRequest {
                method: method.as_str(),
                path: &path,
                port,
                status,
                latency: started.elapsed(),
            },
        );
    }
    // The id came from the client: into the log only if it can be a sandbox's.
    let plausible = sandbox_id.len() <= 64
        && sandbox_id
            .bytes()
            .all(|b| b.is_ascii_hexdigit() || b == b'-');
    tracing::info!(
        sandbox = if plausible { sandbox_id } else { "(invalid)" },
        port,
        method = %method,
        status,
        latency_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        "preview request"
    );
    resp
}

/// The rest of a granted request: the cookie redirect, the resume, the forwarding.
async fn forward(
    state: &AppState,
    mut req: Request,
    grant: &PreviewGrant,
    token: Option<(String, Source)>,
) -> Result<Response<Body>, PreviewError> {
    let upgrade = is_upgrade(req.headers());
    if let Some((token, Source::Query)) = &token {
        // Only a token that was checked (a private port's) becomes a cookie.
        let private = grant.access != PortAccess::Public;
        if private && matches!(*req.method(), Method::GET | Method::HEAD) && !upgrade {
            return Ok(cookie_redirect(state, &req, grant, token));
        }
    }
    state.engine.prepare_preview(grant).await?;
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let req = outgoing(req, grant, upgrade);
    let mut resp = match state.preview.client.request(req).await {
        Ok(r) => r,
        Err(e) => return Err(connect_failure(e, grant.port)),
    };
    let resp_upgrade =
        (resp.status() == StatusCode::SWITCHING_PROTOCOLS).then(|| hyper::upgrade::on(&mut resp));
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers, resp_upgrade.is_some());
    if let (Some(client), Some(upstream)) = (client_upgrade, resp_upgrade) {
        tokio::spawn(tunnel(client, upstream));
    }
    Ok(Response::from_parts(parts, Body::new(body)))
}

/// A WebSocket (or any upgraded protocol): bytes both ways until either side ends.
async fn tunnel(client: hyper::upgrade::OnUpgrade, upstream: hyper::upgrade::OnUpgrade) {
    let (client, upstream) = match tokio::try_join!(client, upstream) {
        Ok(pair) => pair,
        Err(e) => {
            tracing::debug!(error = %e, "preview upgrade failed");
            return;
        }
    };
    let (mut client, mut upstream) = (TokioIo::new(client), TokioIo::new(upstream));
    if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        tracing::debug!(error = %e, "preview tunnel ended");
    }
}

fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && connection_tokens(headers).any(|t| t.eq_ignore_ascii_case("upgrade"))
}

fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
}

/// Removes hop-by-hop headers (and those `Connection` names); an upgrade keeps its
/// `Connection: upgrade` and `Upgrade`.
fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    let named: Vec<String> = connection_tokens(headers)
        .map(str::to_ascii_lowercase)
        .collect();
    let upgrade = headers.get(header::UPGRADE).cloned();
    for name in HOP_BY_HOP
        .iter()
        .copied()
        .chain(named.iter().map(String::as_str))
    {
        headers.remove(name);
    }
    if keep_upgrade {
        if let Some(u) = upgrade {
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            headers.insert(header::UPGRADE, u);
        }
    }
}

/// The request as it goes into the sandbox: the pool's URI (its path and query, without
/// the token parameter), its own headers without hop-by-hop ones and kiln's credential.
fn outgoing(req: Request, grant: &PreviewGrant, upgrade: bool) -> Request {
    let (mut parts, body) = req.into_parts();
    // An HTTP/2 request names its host in the URI only: the app still needs a Host.
    if !parts.headers.contains_key(header::HOST) {
        if let Some(v) = parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        {
            parts.headers.insert(header::HOST, v);
        }
    }
    let query = parts
        .uri
        .query()
        .map(without_token)
        .filter(|q| !q.is_empty());
    let path_and_query = match query {
        Some(q) => format!("{}?{q}", parts.uri.path()),
        None => parts.uri.path().to_owned(),
    };
    parts.uri = format!(
        "http://{}-{}.{POOL_DOMAIN}{path_and_query}",
        grant.port, grant.sandbox_id
    )
    .parse()
    .unwrap_or_else(|_| Uri::from_static("/"));
    strip_hop_by_hop(&mut parts.headers, upgrade);
    parts.headers.remove(PREVIEW_TOKEN_HEADER);
    strip_token_cookie(&mut parts.headers);
    parts.version = axum::http::Version::HTTP_11;
    Request::from_parts(parts, body)
}

/// The query without the token parameter; every other pair is kept as it was written.
fn without_token(query: &str) -> String {
    query
        .split('&')
        .filter(|pair| {
            let key = pair.split('=').next().unwrap_or("");
            key != PREVIEW_TOKEN_QUERY
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// Removes the token cookie from the `Cookie` headers, keeping the app's own cookies.
fn strip_token_cookie(headers: &mut HeaderMap) {
    let kept: Vec<String> = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .map(str::trim)
                .filter(|c| {
                    c.split_once('=')
                        .is_none_or(|(k, _)| k.trim() != PREVIEW_TOKEN_COOKIE)
                })
                .collect::<Vec<_>>()
                .join("; ")
        })
        .filter(|v| !v.is_empty())
        .collect();
    headers.remove(header::COOKIE);
    for v in kept {
        if let Ok(v) = HeaderValue::from_str(&v) {
            headers.append(header::COOKIE, v);
        }
    }
}

/// The answer to a signed URL: the token moves into a cookie of this preview host
/// (HttpOnly, SameSite=Lax, Secure behind TLS, as long-lived as the token) and the
/// browser goes to the same URL without it.
fn cookie_redirect(
    state: &AppState,
    req: &Request,
    grant: &PreviewGrant,
    token: &str,
) -> Response<Body> {
    let query = req
        .uri()
        .query()
        .map(without_token)
        .filter(|q| !q.is_empty());
    let location = match query {
        Some(q) => format!("{}?{q}", req.uri().path()),
        None => req.uri().path().to_owned(),
    };
    let mut cookie = format!("{PREVIEW_TOKEN_COOKIE}={token}; Path=/; HttpOnly; SameSite=Lax");
    let forwarded_https = req
        .headers()
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|p| p.eq_ignore_ascii_case("https"));
    if state.engine.preview_site().scheme == "https" || forwarded_https {
        cookie.push_str("; Secure");
    }
    if let Some(at) = grant.token_expires {
        let secs = (at - chrono::Utc::now()).num_seconds().max(0);
        cookie.push_str(&format!("; Max-Age={secs}"));
    }
    let mut resp = Response::new(Body::empty());
    *resp.status_mut() = StatusCode::FOUND;
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&location) {
        h.insert(header::LOCATION, v);
    }
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        h.insert(header::SET_COOKIE, v);
    }
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    resp
}

/// What a failed request to the sandbox means: the engine's reason when the connection
/// could not be made, else the connection broke.
fn connect_failure(e: hyper_util::client::legacy::Error, port: u16) -> PreviewError {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&e);
    while let Some(c) = cause {
        if let Some(p) = c.downcast_ref::<PreviewError>() {
            return match p {
                PreviewError::NothingListening(p) => PreviewError::NothingListening(*p),
                PreviewError::AgentTooOld => PreviewError::AgentTooOld,
                PreviewError::NotFound => PreviewError::NotFound,
                _ => PreviewError::NotRunning,
            };
        }
        cause = c.source();
    }
    tracing::debug!(error = %e, port, "preview request failed");
    PreviewError::ConnectionLost(port)
}

/// A short page for a request the proxy answers itself.
fn refusal(e: &PreviewError) -> Response<Body> {
    let status = StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::BAD_GATEWAY);
    let reason = status.canonical_reason().unwrap_or("Error");
    let message = html_escape(&e.public_message());
    let page = format!(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{code} {reason}</title></head>\n\
         <body style=\"font-family: sans-serif; margin: 3em\"><h1>{code} {reason}</h1>\n\
         <p>{message}</p>\n<p><small>kiln preview</small></p></body></html>\n",
        code = status.as_u16(),
    );
    let mut resp = Response::new(Body::from(page));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_go_and_others_stay() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, x-secret-hop"),
        );
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("x-app", HeaderValue::from_static("kept"));
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!(h["x-app"], "kept");

        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("Upgrade"));
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        assert!(is_upgrade(&h));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h["connection"], "upgrade");
        assert_eq!(h["upgrade"], "websocket");
    }

    #[test]
    fn the_token_leaves_query_and_cookies_alone_otherwise() {
        assert_eq!(without_token("a=1&kiln_preview_token=x&b=2"), "a=1&b=2");
        assert_eq!(without_token("kiln_preview_token=x"), "");
        assert_eq!(
            without_token("kiln_preview_tokens=1"),
            "kiln_preview_tokens=1"
        );
        let mut h = HeaderMap::new();
        h.append(
            header::COOKIE,
            HeaderValue::from_static("theme=dark; kiln_preview_token=kpt_1; sid=abc"),
        );
        h.append(
            header::COOKIE,
            HeaderValue::from_static("kiln_preview_token=kpt_2"),
        );
        strip_token_cookie(&mut h);
        let all: Vec<_> = h.get_all(header::COOKIE).iter().collect();
        assert_eq!(all, ["theme=dark; sid=abc"]);
    }
}
