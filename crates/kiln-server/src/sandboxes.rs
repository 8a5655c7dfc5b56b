//! `/sandboxes`: create, list, inspect, update, pause, resume and delete sandboxes. The
//! server process owns every VM it starts ([`kiln_engine::Engine::create_live_sandbox`]).

use std::collections::BTreeMap;

use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use kiln_engine::SandboxWithToken;
use kiln_store::{NewSandbox, SandboxFilter, SandboxStatus};
use serde::Deserialize;

use crate::{json_body, ApiError, AppState, Auth};

/// `POST /sandboxes`. The SDK's optional fields that kiln does not implement are refused
/// by name rather than silently ignored.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateSandbox {
    name: String,
    from_template: Option<String>,
    #[serde(default)]
    metadata: BTreeMap<String, String>,
    #[serde(default)]
    env_vars: BTreeMap<String, String>,
    from_snapshot: Option<serde_json::Value>,
    timeout_seconds: Option<serde_json::Value>,
    auto_delete_seconds: Option<serde_json::Value>,
    secrets: Option<serde_json::Value>,
    network: Option<serde_json::Value>,
    preview_access: Option<serde_json::Value>,
}

/// `PATCH /sandboxes/{id}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateSandbox {
    metadata: Option<BTreeMap<String, String>>,
    timeout_seconds: Option<serde_json::Value>,
    auto_delete_seconds: Option<serde_json::Value>,
    network: Option<serde_json::Value>,
    preview_access: Option<serde_json::Value>,
}

/// Longest sandbox name, metadata key or value, env key or value accepted.
const MAX_FIELD: usize = 4096;
/// Most metadata or env entries accepted.
const MAX_ENTRIES: usize = 256;

fn unsupported(fields: &[(&str, bool)]) -> Result<(), ApiError> {
    let set: Vec<&str> = fields.iter().filter(|(_, s)| *s).map(|(n, _)| *n).collect();
    if set.is_empty() {
        return Ok(());
    }
    Err(ApiError::new(
        StatusCode::BAD_REQUEST,
        "unsupported",
        format!("not supported by kiln: {}", set.join(", ")),
    ))
}

fn check_map(what: &str, map: &BTreeMap<String, String>) -> Result<(), ApiError> {
    if map.len() > MAX_ENTRIES {
        return Err(ApiError::bad_request(format!(
            "{what}: at most {MAX_ENTRIES} entries"
        )));
    }
    for (k, v) in map {
        if k.is_empty() || k.len() > MAX_FIELD || v.len() > MAX_FIELD {
            return Err(ApiError::bad_request(format!(
                "{what}: keys must be 1-{MAX_FIELD} bytes and values at most {MAX_FIELD}"
            )));
        }
    }
    Ok(())
}

/// `network: {allow_out, deny_out}` as the SDKs send it (either list may be missing or
/// `null`), checked into rules the egress proxy applies.
fn network_rules(v: &serde_json::Value) -> Result<kiln_net::NetworkRules, ApiError> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Wire {
        allow_out: Option<Vec<String>>,
        deny_out: Option<Vec<String>>,
    }
    let w: Wire = serde_json::from_value(v.clone())
        .map_err(|e| ApiError::bad_request(format!("network: {e}")))?;
    let rules = kiln_net::NetworkRules {
        allow_out: w.allow_out.unwrap_or_default(),
        deny_out: w.deny_out.unwrap_or_default(),
    };
    rules
        .compile()
        .map_err(|errs| ApiError::bad_request(errs.to_string()))?;
    Ok(rules)
}

fn is_set(v: &Option<serde_json::Value>) -> bool {
    v.as_ref().is_some_and(|v| !v.is_null())
}

/// The wire form of a sandbox, with its egress rules (kept next to its VM, not in the
/// store).
fn wire(state: &AppState, s: &kiln_store::Sandbox) -> serde_json::Value {
    let mut out = s.to_wire();
    if let Some(rules) = state.engine.network_rules(&s.id) {
        out["network"] = serde_json::to_value(rules).unwrap_or_default();
    }
    out
}

fn with_token(state: &AppState, s: &SandboxWithToken) -> serde_json::Value {
    let mut out = wire(state, &s.sandbox);
    out["access_token"] = s.access_token.clone().into();
    out
}

pub(crate) async fn create(
    State(state): State<AppState>,
    Auth(team): Auth,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let req: CreateSandbox = serde_json::from_value(json_body(&body)?)
        .map_err(|e| ApiError::bad_request(format!("invalid sandbox request: {e}")))?;
    unsupported(&[
        ("from_snapshot", is_set(&req.from_snapshot)),
        ("timeout_seconds", is_set(&req.timeout_seconds)),
        ("auto_delete_seconds", is_set(&req.auto_delete_seconds)),
        ("secrets", is_set(&req.secrets)),
        ("preview_access", is_set(&req.preview_access)),
    ])?;
    let network = match &req.network {
        Some(v) if !v.is_null() => Some(network_rules(v)?),
        _ => None,
    };
    let template = req
        .from_template
        .filter(|t| !t.is_empty())
        .ok_or_else(|| ApiError::bad_request("from_template: is required"))?;
    if req.name.is_empty() || req.name.len() > 255 {
        return Err(ApiError::bad_request("name: must be 1-255 bytes"));
    }
    check_map("metadata", &req.metadata)?;
    check_map("env_vars", &req.env_vars)?;
    let new = NewSandbox {
        template,
        name: Some(req.name),
        metadata: req.metadata,
        env: req.env_vars,
    };
    let created = state
        .engine
        .create_live_sandbox(&team.id, &new, network.as_ref())
        .await?;
    if let Some(t) = created.restore_time {
        state.metrics.observe_restore(t);
    }
    Ok((StatusCode::CREATED, Json(with_token(&state, &created))).into_response())
}

pub(crate) async fn list(
    State(state): State<AppState>,
    Auth(team): Auth,
    RawQuery(query): RawQuery,
) -> Result<impl IntoResponse, ApiError> {
    let filter = parse_filter(query.as_deref().unwrap_or(""))?;
    let all = state
        .engine
        .store()
        .list_sandboxes(&team.id, &filter)
        .await?;
    Ok(Json(
        all.iter().map(|s| wire(&state, s)).collect::<Vec<_>>(),
    ))
}

/// `metadata.<key>=<value>` (all must match), `status=a,b` (any), `limit`, `offset`.
fn parse_filter(query: &str) -> Result<SandboxFilter, ApiError> {
    let mut filter = SandboxFilter::default();
    let pairs: Vec<(String, String)> = query_pairs(query)?;
    for (key, value) in pairs {
        if let Some(k) = key.strip_prefix("metadata.") {
            filter.metadata.insert(k.to_owned(), value);
            continue;
        }
        match key.as_str() {
            "status" => {
                let statuses = value
                    .split(',')
                    .map(|s| {
                        s.trim().parse::<SandboxStatus>().map_err(|_| {
                            ApiError::bad_request(format!("status: unknown status {s:?}"))
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                // `status=a,b` and `status=a&status=b` both mean either.
                filter
                    .statuses
                    .get_or_insert_with(Vec::new)
                    .extend(statuses);
            }
            "limit" => {
                filter.limit =
                    Some(value.parse().map_err(|_| {
                        ApiError::bad_request("limit: must be a non-negative integer")
                    })?);
            }
            "offset" => {
                filter.offset = value
                    .parse()
                    .map_err(|_| ApiError::bad_request("offset: must be a non-negative integer"))?;
            }
            other => {
                return Err(ApiError::bad_request(format!(
                    "unknown query parameter {other:?}"
                )))
            }
        }
    }
    Ok(filter)
}

/// Decodes `application/x-www-form-urlencoded` pairs, keeping keys that serde's struct
/// deserialisation cannot express (`metadata.<key>`).
fn query_pairs(query: &str) -> Result<Vec<(String, String)>, ApiError> {
    let parsed: Vec<(String, String)> =
        axum::extract::Query::<Vec<(String, String)>>::try_from_uri(
            &format!("/?{query}")
                .parse()
                .map_err(|_| ApiError::bad_request("invalid query string"))?,
        )
        .map_err(|e| ApiError::bad_request(format!("invalid query string: {e}")))?
        .0;
    Ok(parsed)
}

pub(crate) async fn get(
    State(state): State<AppState>,
    Auth(team): Auth,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let s = state.engine.store().sandbox_by_id(&team.id, &id).await?;
    Ok(Json(wire(&state, &s)))
}

pub(crate) async fn update(
    State(state): State<AppState>,
    Auth(team): Auth,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<impl IntoResponse, ApiError> {
    let body = json_body(&body)?;
    // Present and `null` clears the rules; absent leaves them.
    let network_given = body.get("network").is_some();
    let req: UpdateSandbox = serde_json::from_value(body)
        .map_err(|e| ApiError::bad_request(format!("invalid sandbox update: {e}")))?;
    // `null` clears these in Superserve; kiln never sets them, so clearing is a no-op.
    unsupported(&[
        ("timeout_seconds", is_set(&req.timeout_seconds)),
        ("auto_delete_seconds", is_set(&req.auto_delete_seconds)),
        ("preview_access", is_set(&req.preview_access)),
    ])?;
    let network = match &req.network {
        Some(v) if !v.is_null() => Some(network_rules(v)?),
        _ => None,
    };
    let store = state.engine.store();
    let s = store.sandbox_by_id(&team.id, &id).await?;
    if s.status == SandboxStatus::Deleted {
        return Err(kiln_store::StoreError::not_found("sandbox", &id).into());
    }
    if let Some(metadata) = req.metadata {
        check_map("metadata", &metadata)?;
        store.set_sandbox_metadata(&team.id, &id, &metadata).await?;
    }
    if network_given {
        state
            .engine
            .set_network_rules(&team.id, &id, network.as_ref())
            .await?;
    }
    Ok(StatusCode::NO_CONTENT)
}

pub(crate) async fn delete(
    State(state): State<AppState>,
    Auth(team): Auth,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    state.engine.kill_live_sandbox(&team.id, &id).await?;
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
            let body = serde_json::json!({"status": "pausing"});
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
    if let Some(t) = resumed.restore_time {
        state.metrics.observe_restore(t);
    }
    Ok(Json(with_token(&state, &resumed)))
}

/// `POST /sandboxes/{id}/activate`: the sandbox running (resumed if paused) and a token
/// that works; a running sandbox keeps its token.
pub(crate) async fn activate(
    State(state): State<AppState>,
    Auth(team): Auth,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let resumed = state.engine.activate_sandbox(&team.id, &id).await?;
    if let Some(t) = resumed.restore_time {
        state.metrics.observe_restore(t);
    }
    Ok(Json(with_token(&state, &resumed)))
}

/// `GET /sandboxes/{id}/network` query: the SDKs' `get_network_log` filters.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NetworkLogQuery {
    limit: Option<usize>,
    /// An event id (the previous page's `next_cursor`): only older events.
    before: Option<String>,
    /// An RFC 3339 time: only events at or after it.
    since: Option<String>,
    verdict: Option<String>,
}

/// Most events in one page of the network log.
const MAX_NETWORK_PAGE: usize = 1000;

/// `GET /sandboxes/{id}/network`: the connections the sandbox made, newest first.
pub(crate) async fn network_log(
    State(state): State<AppState>,
    Auth(team): Auth,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<impl IntoResponse, ApiError> {
    let q: NetworkLogQuery = axum::extract::Query::try_from_uri(
        &format!("/?{}", query.as_deref().unwrap_or(""))
            .parse()
            .map_err(|_| ApiError::bad_request("invalid query string"))?,
    )
    .map_err(|e| ApiError::bad_request(format!("invalid query string: {e}")))?
    .0;
    let limit = q.limit.unwrap_or(100).clamp(1, MAX_NETWORK_PAGE);
    let before = match q.before.as_deref() {
        Some(b) => Some(
            b.parse::<i64>()
                .map_err(|_| ApiError::bad_request("before: must be an event id"))?,
        ),
        None => None,
    };
    let since = match q.since.as_deref() {
        Some(t) => Some(
            chrono::DateTime::parse_from_rfc3339(t)
                .map_err(|_| ApiError::bad_request("since: must be an RFC 3339 time"))?,
        ),
        None => None,
    };
    if let Some(v) = q.verdict.as_deref() {
        if !matches!(v, "allowed" | "blocked" | "failed") {
            return Err(ApiError::bad_request(
                "verdict: must be allowed, blocked or failed",
            ));
        }
    }
    let events = state.engine.network_log(&team.id, &id).await?;
    let mut page: Vec<serde_json::Value> = events
        .into_iter()
        .rev()
        .filter(|e| before.is_none_or(|b| e["id"].as_i64().is_some_and(|id| id < b)))
        .filter(|e| {
            since.is_none_or(|s| {
                e["ts"]
                    .as_str()
                    .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                    .is_some_and(|t| t >= s)
            })
        })
        .filter(|e| q.verdict.as_deref().is_none_or(|v| e["verdict"] == v))
        .take(limit + 1)
        .collect();
    let has_more = page.len() > limit;
    page.truncate(limit);
    let next_cursor = has_more
        .then(|| {
            page.last()
                .and_then(|e| e["id"].as_i64())
                .map(|i| i.to_string())
        })
        .flatten();
    Ok(Json(serde_json::json!({
        "data": page,
        "has_more": has_more,
        "next_cursor": next_cursor,
    })))
}
