//! kiln's HTTP API, in Superserve's wire format (snake_case JSON, its statuses and error
//! body), over [`kiln_engine::Engine`]. Handlers only translate: a request becomes an
//! engine call, a typed result becomes a response, and errors are mapped in one place
//! ([`error`]).
//!
//! The control plane (`/templates`, `/sandboxes`, `/snapshots`, `/secrets`) is authorised
//! by a team's `X-API-Key`; the data plane (`/exec`, `/files`) by a sandbox's access token
//! ([`data`]). The server process owns the VMs of the sandboxes it starts. Requests for a
//! preview host (`{port}-{sandbox}.{domain}`) never reach the API: [`proxy`] serves them
//! from the sandbox.

pub mod console;
mod data;
pub mod error;
pub mod metrics;
pub mod observe;
mod previews;
pub mod proxy;
pub mod ratelimit;
mod sandboxes;
mod secrets;
mod serve;
mod templates;
mod ws;

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, FromRequestParts, State};
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use kiln_api::ApiErrorCode;
use kiln_engine::{Engine, Team};

pub use error::ApiError;
pub use metrics::Metrics;
pub use proxy::PreviewClient;
pub use ratelimit::RateLimiter;
pub use serve::{serve, ServeConfig};

/// Largest JSON request body accepted; a BuildSpec is far smaller. File uploads have
/// their own bound ([`kiln_engine::MAX_UPLOAD_BYTES`]).
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// The OpenAPI document of this API, served at `/openapi.json`.
pub const OPENAPI: &str = include_str!("../openapi.json");

/// Every route the server answers, as `(method, path)` with axum's `{param}` syntax. The
/// OpenAPI document (`openapi.json`) must describe exactly these; a test checks both that
/// and that the router answers each of them.
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/health"),
    ("GET", "/openapi.json"),
    ("GET", "/metrics"),
    ("GET", "/console"),
    ("GET", "/console/{asset}"),
    ("POST", "/validate"),
    ("GET", "/templates"),
    ("POST", "/templates"),
    ("GET", "/templates/{template}"),
    ("DELETE", "/templates/{template}"),
    ("GET", "/templates/{template}/builds"),
    ("POST", "/templates/{template}/builds"),
    ("GET", "/templates/{template}/builds/{build}"),
    ("DELETE", "/templates/{template}/builds/{build}"),
    ("GET", "/templates/{template}/builds/{build}/logs"),
    ("GET", "/sandboxes"),
    ("POST", "/sandboxes"),
    ("GET", "/sandboxes/{sandbox}"),
    ("PATCH", "/sandboxes/{sandbox}"),
    ("DELETE", "/sandboxes/{sandbox}"),
    ("POST", "/sandboxes/{sandbox}/pause"),
    ("POST", "/sandboxes/{sandbox}/resume"),
    ("POST", "/sandboxes/{sandbox}/activate"),
    ("GET", "/sandboxes/{sandbox}/network"),
    ("GET", "/sandboxes/{sandbox}/preview-ports"),
    ("POST", "/sandboxes/{sandbox}/preview-ports"),
    ("DELETE", "/sandboxes/{sandbox}/preview-ports/{port}"),
    ("POST", "/sandboxes/{sandbox}/preview-ports/{port}/token"),
    (
        "POST",
        "/sandboxes/{sandbox}/preview-ports/{port}/token/rotate",
    ),
    ("POST", "/sandboxes/{sandbox}/snapshot"),
    ("GET", "/sandboxes/{sandbox}/snapshots"),
    ("GET", "/snapshots"),
    ("GET", "/snapshots/{snapshot}"),
    ("PATCH", "/snapshots/{snapshot}"),
    ("DELETE", "/snapshots/{snapshot}"),
    ("POST", "/sandboxes/{sandbox}/secrets"),
    ("DELETE", "/sandboxes/{sandbox}/secrets/{env}"),
    ("GET", "/secrets"),
    ("POST", "/secrets"),
    ("GET", "/secrets/{name}"),
    ("PATCH", "/secrets/{name}"),
    ("DELETE", "/secrets/{name}"),
    ("GET", "/secrets/{name}/audit"),
    ("GET", "/secrets/{name}/sandboxes"),
    ("GET", "/providers"),
    ("POST", "/exec"),
    ("POST", "/exec/stream"),
    ("GET", "/exec/connect"),
    ("GET", "/files"),
    ("POST", "/files"),
];

/// What every handler shares.
#[derive(Debug, Clone)]
pub struct AppState {
    /// The core.
    pub engine: Arc<Engine>,
    /// What `/metrics` reports.
    pub metrics: Metrics,
    /// Requests per API key (and per sandbox token on the data plane).
    pub limiter: Arc<RateLimiter>,
    /// Carries preview requests into sandboxes (its connections are pooled).
    pub preview: PreviewClient,
    /// When set, `/metrics` answers only requests with `Authorization: Bearer <token>`
    /// (`KILN_METRICS_TOKEN`): its series name sandboxes and routes, which not everyone who
    /// reaches the port should see.
    pub metrics_token: Option<Arc<str>>,
}

impl AppState {
    /// A state with fresh metrics and no rate limit.
    pub fn new(engine: Arc<Engine>) -> Self {
        Self {
            preview: PreviewClient::new(engine.clone()),
            engine,
            metrics: Metrics::new(),
            limiter: Arc::new(RateLimiter::disabled()),
            metrics_token: None,
        }
    }

    /// Counts a request against the rate of `secret` (an API key or access token, hashed
    /// before it is used as the limiter's key).
    pub(crate) fn check_rate(&self, secret: &str) -> Result<(), ApiError> {
        self.limiter
            .check(&kiln_engine::hash_secret(secret))
            .map_err(ApiError::from)
    }
}

/// The API's routes, wrapped in request ids, request logs and metrics, behind the preview
/// proxy (which takes every request for a preview host before any of that).
pub fn router(state: AppState) -> Router {
    let metrics = state.metrics.clone();
    let proxy_state = state.clone();
    let files_limit = usize::try_from(kiln_engine::MAX_UPLOAD_BYTES).unwrap_or(usize::MAX);
    let app = Router::new()
        .route("/health", get(health))
        .route("/openapi.json", get(openapi))
        .route("/metrics", get(metrics_text))
        .route("/console", get(console::index))
        .route("/console/{asset}", get(console::asset))
        .route("/validate", post(templates::validate))
        .route(
            "/templates",
            get(templates::list_templates).post(templates::create_template),
        )
        .route(
            "/templates/{template}",
            get(templates::get_template).delete(templates::delete_template),
        )
        .route(
            "/templates/{template}/builds",
            get(templates::list_builds).post(templates::rebuild),
        )
        .route(
            "/templates/{template}/builds/{build}",
            get(templates::get_build).delete(templates::cancel_build),
        )
        .route(
            "/templates/{template}/builds/{build}/logs",
            get(templates::build_logs),
        )
        .route("/sandboxes", get(sandboxes::list).post(sandboxes::create))
        .route(
            "/sandboxes/{sandbox}",
            get(sandboxes::get)
                .patch(sandboxes::update)
                .delete(sandboxes::delete),
        )
        .route("/sandboxes/{sandbox}/pause", post(sandboxes::pause))
        .route("/sandboxes/{sandbox}/resume", post(sandboxes::resume))
        .route("/sandboxes/{sandbox}/activate", post(sandboxes::activate))
        .route("/sandboxes/{sandbox}/network", get(sandboxes::network_log))
        .route(
            "/sandboxes/{sandbox}/preview-ports",
            get(previews::list).post(previews::publish),
        )
        .route(
            "/sandboxes/{sandbox}/preview-ports/{port}",
            axum::routing::delete(previews::unpublish),
        )
        .route(
            "/sandboxes/{sandbox}/preview-ports/{port}/token",
            post(previews::token),
        )
        .route(
            "/sandboxes/{sandbox}/preview-ports/{port}/token/rotate",
            post(previews::rotate),
        )
        .route("/sandboxes/{sandbox}/snapshot", post(sandboxes::snapshot))
        .route(
            "/sandboxes/{sandbox}/snapshots",
            get(sandboxes::snapshots_of),
        )
        .route("/snapshots", get(sandboxes::list_snapshots))
        .route(
            "/snapshots/{snapshot}",
            get(sandboxes::get_snapshot)
                .patch(sandboxes::rename_snapshot)
                .delete(sandboxes::delete_snapshot),
        )
        .route("/sandboxes/{sandbox}/secrets", post(secrets::attach))
        .route(
            "/sandboxes/{sandbox}/secrets/{env}",
            axum::routing::delete(secrets::detach),
        )
        .route("/secrets", get(secrets::list).post(secrets::create))
        .route(
            "/secrets/{name}",
            get(secrets::get)
                .patch(secrets::rotate)
                .delete(secrets::delete),
        )
        .route("/secrets/{name}/audit", get(secrets::audit))
        .route("/secrets/{name}/sandboxes", get(secrets::sandboxes))
        .route("/providers", get(secrets::providers))
        .route("/exec", post(data::exec))
        .route("/exec/stream", post(data::exec_stream))
        .route("/exec/connect", get(ws::exec_connect))
        .route(
            "/files",
            get(data::read_file)
                .post(data::write_file)
                .layer(DefaultBodyLimit::max(files_limit)),
        )
        .fallback(no_route)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::map_response(json_errors))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state);
    // Before routing (a layer of an outer router whose one service is the API).
    Router::new()
        .fallback_service(observe::layers(app, metrics))
        .layer(axum::middleware::map_request(system_template_paths))
        // Outermost: a preview host's request never reaches the API.
        .layer(axum::middleware::from_fn_with_state(
            proxy_state,
            proxy::intercept,
        ))
}

/// The official SDKs put a template's name in the path as it is (`Template.connect(
/// "superserve/base")` asks for `GET /templates/superserve/base`), so a path naming a
/// system template that way is routed as if its slash were escaped. Only the system
/// templates' own names are: no team template can take them.
async fn system_template_paths(mut req: axum::extract::Request) -> axum::extract::Request {
    let Some(rest) = req.uri().path().strip_prefix("/templates/") else {
        return req;
    };
    let named = kiln_engine::SYSTEM_TEMPLATES.iter().find(|t| {
        rest.strip_prefix(t.name)
            .is_some_and(|after| after.is_empty() || after.starts_with('/'))
    });
    let Some(t) = named else {
        return req;
    };
    let escaped = t.name.replace('/', "%2F");
    let mut path = format!("/templates/{escaped}{}", &rest[t.name.len()..]);
    if let Some(q) = req.uri().query() {
        path.push('?');
        path.push_str(q);
    }
    let mut parts = req.uri().clone().into_parts();
    if let Ok(pq) = path.parse() {
        parts.path_and_query = Some(pq);
        if let Ok(uri) = axum::http::Uri::from_parts(parts) {
            *req.uri_mut() = uri;
        }
    }
    req
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
        Ok(Auth(state.team_of_key(key).await?))
    }
}

impl AppState {
    /// The team of an API key, counted against its rate; 401 for a key that is none.
    pub(crate) async fn team_of_key(&self, key: &str) -> Result<Team, ApiError> {
        let team = self
            .engine
            .authenticate(key)
            .await?
            .ok_or_else(ApiError::unauthorized)?;
        self.check_rate(key)?;
        Ok(team)
    }
}

/// Unknown paths get the API's error shape with a code of their own, distinct from a
/// missing object's `not_found`.
async fn no_route() -> ApiError {
    ApiError::new(ApiErrorCode::NoRoute, "no such endpoint")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        ApiErrorCode::MethodNotAllowed,
        "method not allowed on this endpoint",
    )
}

/// axum's own rejections (a body over the limit, a path segment that is not UTF-8, a
/// missing content type) are plain text; the API promises its JSON error shape on every
/// failure, so they are rewritten here with a code for their status.
async fn json_errors(resp: Response) -> Response {
    let status = resp.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return resp;
    }
    let is_json = resp
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/json"));
    if is_json {
        return resp;
    }
    let text = axum::body::to_bytes(resp.into_body(), 64 * 1024)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_owned())
        .unwrap_or_default();
    let message = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_owned()
    } else {
        text
    };
    let mut resp =
        ApiError::new(ApiErrorCode::for_status(status.as_u16()), message).into_response();
    // The framework chose the status; the body only explains it.
    *resp.status_mut() = status;
    resp
}

async fn health() -> impl IntoResponse {
    Json(serde_json::json!({"status": "ok"}))
}

async fn openapi() -> Response {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        OPENAPI,
    )
        .into_response()
}

async fn metrics_text(
    State(state): State<AppState>,
    headers: axum::http::HeaderMap,
) -> Result<Response, ApiError> {
    if let Some(token) = &state.metrics_token {
        check_bearer(&headers, token)?;
    }
    let stats = state.engine.stats().await?;
    let mut text = state.metrics.render(&stats);
    metrics::render_pool(&mut text, state.engine.restore_pool_stats());
    metrics::render_capacity(&mut text, state.engine.config());
    Ok(metrics::render_response(text))
}

/// 401 unless `headers` carry `Authorization: Bearer <token>`. Both sides are hashed to
/// the same length and compared in constant time, so neither the length nor a prefix of
/// the token can be learnt from how long a refusal takes.
fn check_bearer(headers: &axum::http::HeaderMap, token: &str) -> Result<(), ApiError> {
    use subtle::ConstantTimeEq as _;
    let given = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    let expected = kiln_engine::hash_secret(token);
    let matches = kiln_engine::hash_secret(given)
        .as_bytes()
        .ct_eq(expected.as_bytes());
    if bool::from(matches) {
        Ok(())
    } else {
        Err(ApiError::new(
            ApiErrorCode::Unauthorized,
            "a valid Authorization: Bearer <metrics token> header is required",
        ))
    }
}

/// Parses a JSON body ourselves so that bad JSON gets the API's error shape.
pub(crate) fn json_body(body: &[u8]) -> Result<serde_json::Value, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
}

/// Parses a JSON body into a request type; a body that does not fit is a 400 saying
/// `what` it should have been.
pub(crate) fn parse_body<T: serde::de::DeserializeOwned>(
    body: &[u8],
    what: &str,
) -> Result<T, ApiError> {
    serde_json::from_value(json_body(body)?)
        .map_err(|e| ApiError::bad_request(format!("invalid {what}: {e}")))
}

/// The pairs of a raw query string (keys such as `metadata.<key>` kept as they are).
pub(crate) fn query_pairs(query: Option<&str>) -> Vec<(String, String)> {
    kiln_api::request::query_pairs(query.unwrap_or(""))
}
