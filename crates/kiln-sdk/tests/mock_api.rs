//! The SDK against a scripted stand-in for the API: request shapes, the data plane's
//! headers and its activate-and-retry, SSE streams, the WebSocket session, and waiting
//! for builds. (`tests/live.rs` runs the same calls against a real `kiln serve`.)

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use kiln_sdk::{
    BuildLogEvent, BuildStatus, Client, Error, ListOptions, Output, RunOptions, Sandbox,
    SandboxCreateOptions, SandboxStatus, Step, Template, TemplateCreateOptions, TerminalSize,
};
use serde_json::json;

const SANDBOX_ID: &str = "0b5e2c1a-0000-4000-8000-000000000002";
const TEMPLATE_ID: &str = "7d0c6f0e-0000-4000-8000-000000000001";

/// What the stand-in saw and how it behaves.
#[derive(Debug, Default)]
struct Mock {
    /// The token the data plane accepts now.
    token: String,
    /// Tokens handed out so far (activate and resume hand out the next).
    issued: usize,
    activations: usize,
    /// Data-plane calls seen, as `(path, token)`.
    data_calls: Vec<(String, String)>,
    /// The next data-plane call answers 503 `sandbox_unavailable` (a paused sandbox).
    paused: bool,
    /// Bodies of control-plane requests, by path.
    bodies: BTreeMap<String, serde_json::Value>,
    /// Query strings seen, by path.
    queries: BTreeMap<String, String>,
    /// Build polls so far.
    build_polls: usize,
    /// Snapshot polls so far (the snapshot is ready from the second).
    snapshot_polls: usize,
    files: BTreeMap<String, Vec<u8>>,
}

type Shared = Arc<Mutex<Mock>>;

fn error(status: StatusCode, code: &str) -> Response {
    (
        status,
        Json(json!({"error": {"code": code, "message": format!("{code} (mock)")}})),
    )
        .into_response()
}

fn sandbox_json(token: Option<&str>, status: &str) -> serde_json::Value {
    let mut v = json!({
        "id": SANDBOX_ID, "name": "sb", "status": status, "vcpu_count": 1,
        "memory_mib": 256, "created_at": "2025-01-01T00:00:00Z",
        "updated_at": "2025-01-01T00:00:00Z", "template_id": TEMPLATE_ID, "build_id": "b1",
        "metadata": {"team": "a"}, "timeout_seconds": null, "auto_delete_seconds": null,
        "network": null, "preview_access": "legacy_public",
    });
    if let Some(t) = token {
        v["access_token"] = t.into();
    }
    v
}

fn snapshot_json(status: &str, name: &str) -> serde_json::Value {
    json!({
        "id": "s1", "sandbox_id": SANDBOX_ID, "template_id": TEMPLATE_ID, "kind": "mem+fs",
        "status": status, "name": name, "size_bytes": 0,
        "resources": {"vcpu_count": 1, "memory_mib": 256, "disk_mib": 1024},
        "created_at": "2025-01-01T00:00:00Z", "ready_at": null,
    })
}

fn template_json(status: &str) -> serde_json::Value {
    json!({
        "id": TEMPLATE_ID, "name": "org/web", "team_id": "t", "status": status, "vcpu": 1,
        "memory_mib": 256, "disk_mib": 1024, "size_bytes": null, "error_message": null,
        "created_at": "2025-01-01T00:00:00Z", "built_at": null, "latest_build_id": "b1",
    })
}

fn build_json(status: &str, error_message: Option<&str>) -> serde_json::Value {
    json!({
        "id": "b1", "template_id": TEMPLATE_ID, "status": status,
        "build_spec_hash": format!("sha256:{}", "0".repeat(64)), "image_digest": null,
        "error_message": error_message, "created_at": "2025-01-01T00:00:00Z",
        "started_at": null, "finalized_at": null,
    })
}

impl Mock {
    fn rotate(&mut self) -> String {
        self.issued += 1;
        self.token = format!("tok{}", self.issued);
        self.token.clone()
    }

    /// Authorises a data-plane call like the server: the sandbox header, then the token.
    /// `Some` is the refusal.
    fn data_plane(&mut self, path: &str, headers: &HeaderMap) -> Option<Response> {
        let token = headers
            .get("x-access-token")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .or_else(|| {
                let protos = headers.get("sec-websocket-protocol")?.to_str().ok()?;
                protos
                    .split(',')
                    .find_map(|p| p.trim().strip_prefix("token.").map(str::to_owned))
            })
            .unwrap_or_default();
        self.data_calls.push((path.to_owned(), token.clone()));
        if headers
            .get("x-superserve-sandbox-id")
            .and_then(|v| v.to_str().ok())
            != Some(SANDBOX_ID)
        {
            return Some(error(StatusCode::BAD_REQUEST, "invalid_request"));
        }
        if headers.contains_key("x-api-key") {
            return Some(error(StatusCode::BAD_REQUEST, "unexpected_api_key"));
        }
        if self.paused {
            return Some(error(
                StatusCode::SERVICE_UNAVAILABLE,
                "sandbox_unavailable",
            ));
        }
        if token != self.token {
            return Some(error(StatusCode::UNAUTHORIZED, "unauthorized"));
        }
        None
    }
}

fn secret_json() -> serde_json::Value {
    json!({
        "id": "5ec2e700-0000-4000-8000-000000000003", "name": "openai-prod",
        "auth_type": "bearer", "auth_config": {}, "provider_shortcut": "openai",
        "hosts": ["api.openai.com"], "created_at": "2025-01-01T00:00:00Z",
        "updated_at": "2025-01-01T00:00:00Z", "last_used_at": null,
    })
}

/// `/secrets`, `/providers` and a sandbox's `/secrets`: each request's body or query is
/// recorded under `METHOD path`.
fn secret_routes() -> Router<Shared> {
    use axum::extract::{OriginalUri, RawQuery};
    use axum::http::Method;
    async fn record(
        State(s): State<Shared>,
        method: Method,
        OriginalUri(uri): OriginalUri,
        RawQuery(q): RawQuery,
        body: axum::body::Bytes,
    ) -> Response {
        let key = format!("{method} {}", uri.path());
        let mut m = s.lock().unwrap();
        if let Ok(v) = serde_json::from_slice(&body) {
            m.bodies.insert(key.clone(), v);
        }
        m.queries.insert(key.clone(), q.unwrap_or_default());
        match key.as_str() {
            "GET /secrets" => Json(json!([secret_json()])).into_response(),
            "POST /secrets" => (StatusCode::CREATED, Json(secret_json())).into_response(),
            "GET /secrets/openai-prod" | "PATCH /secrets/openai-prod" => {
                Json(secret_json()).into_response()
            }
            "DELETE /secrets/gone" => error(StatusCode::NOT_FOUND, "not_found"),
            "GET /secrets/openai-prod/audit" => Json(json!([{
                "id": 7, "ts": "2025-01-01T00:00:00Z", "sandbox_id": SANDBOX_ID,
                "sandbox_name": "sb", "secret_id": "s", "method": "POST",
                "host": "api.openai.com", "path": "/v1/chat/completions", "status": 200,
                "upstream_status": 200, "latency_ms": 120, "error_code": null,
            }]))
            .into_response(),
            "GET /secrets/openai-prod/sandboxes" => Json(json!([{
                "sandbox_id": SANDBOX_ID, "sandbox_name": "sb",
                "env_key": "OPENAI_API_KEY", "status": "active",
            }]))
            .into_response(),
            "GET /providers" => Json(json!([{
                "name": "openai", "display": "OpenAI", "auth_type": "bearer",
                "auth_config": {}, "hosts": ["api.openai.com"], "token_shape": "sk-proj-...",
            }]))
            .into_response(),
            _ => StatusCode::NO_CONTENT.into_response(),
        }
    }
    Router::new()
        .route("/secrets", get(record).post(record))
        .route("/secrets/{name}", get(record).patch(record).delete(record))
        .route("/secrets/{name}/audit", get(record))
        .route("/secrets/{name}/sandboxes", get(record))
        .route("/providers", get(record))
        .route("/sandboxes/{id}/secrets", post(record))
        .route(
            "/sandboxes/{id}/secrets/{env}",
            axum::routing::delete(record),
        )
}

fn app(state: Shared) -> Router {
    Router::new()
        .merge(secret_routes())
        .route(
            "/sandboxes/{id}/snapshot",
            post(
                |State(s): State<Shared>, Json(body): Json<serde_json::Value>| async move {
                    s.lock().unwrap().bodies.insert("/snapshot".into(), body);
                    (StatusCode::ACCEPTED, Json(snapshot_json("creating", "n")))
                },
            ),
        )
        .route(
            "/sandboxes/{id}/snapshots",
            get(|| async { Json(json!([snapshot_json("ready", "n")])) }),
        )
        .route(
            "/snapshots/{id}",
            get(|State(s): State<Shared>| async move {
                let mut m = s.lock().unwrap();
                m.snapshot_polls += 1;
                let status = if m.snapshot_polls > 1 { "ready" } else { "creating" };
                Json(snapshot_json(status, "n"))
            })
            .patch(|Json(body): Json<serde_json::Value>| async move {
                Json(snapshot_json("ready", body["name"].as_str().unwrap()))
            })
            .delete(|| async { error(StatusCode::NOT_FOUND, "not_found") }),
        )
        .route(
            "/templates",
            post(
                |State(s): State<Shared>, Json(body): Json<serde_json::Value>| async move {
                    s.lock().unwrap().bodies.insert("/templates".into(), body);
                    let mut t = template_json("pending");
                    t["latest_build_id"] = serde_json::Value::Null;
                    t["build_id"] = "b1".into();
                    (StatusCode::ACCEPTED, Json(t))
                },
            )
            .get(
                |State(s): State<Shared>, q: axum::extract::RawQuery| async move {
                    s.lock()
                        .unwrap()
                        .queries
                        .insert("/templates".into(), q.0.unwrap_or_default());
                    Json(json!([template_json("ready")]))
                },
            ),
        )
        .route(
            "/templates/{t}",
            get(|axum::extract::Path(t): axum::extract::Path<String>| async move {
                if t == "org/web" || t == TEMPLATE_ID {
                    Json(template_json("ready")).into_response()
                } else {
                    error(StatusCode::NOT_FOUND, "not_found")
                }
            }),
        )
        .route(
            "/templates/{t}/builds/{b}",
            get(|State(s): State<Shared>| async move {
                let mut m = s.lock().unwrap();
                m.build_polls += 1;
                if m.build_polls < 2 {
                    Json(build_json("building", None))
                } else {
                    Json(build_json(
                        "failed",
                        Some("step_failed: step 1 (`false`) exited 1"),
                    ))
                }
            }),
        )
        .route(
            "/templates/{t}/builds/{b}/logs",
            get(|| async {
                let events = [
                    json!({"timestamp": "2025-01-01T00:00:00Z", "stream": "system", "text": "booting build VM"}),
                    json!({"timestamp": "2025-01-01T00:00:01Z", "stream": "stderr", "text": "oops"}),
                    json!({"timestamp": "2025-01-01T00:00:02Z", "stream": "system",
                           "text": "build failed: step_failed: step 1", "finished": true, "status": "failed"}),
                ];
                let stream = futures::stream::iter(
                    events.map(|e| Ok::<_, Infallible>(Event::default().data(e.to_string()))),
                );
                Sse::new(stream)
            }),
        )
        .route(
            "/sandboxes",
            post(
                |State(s): State<Shared>, Json(body): Json<serde_json::Value>| async move {
                    let mut m = s.lock().unwrap();
                    m.bodies.insert("/sandboxes".into(), body);
                    let t = m.rotate();
                    (StatusCode::CREATED, Json(sandbox_json(Some(&t), "active")))
                },
            )
            .get(
                |State(s): State<Shared>, q: axum::extract::RawQuery| async move {
                    s.lock()
                        .unwrap()
                        .queries
                        .insert("/sandboxes".into(), q.0.unwrap_or_default());
                    Json(json!([sandbox_json(None, "active")]))
                },
            ),
        )
        .route(
            "/sandboxes/{id}/activate",
            post(|State(s): State<Shared>| async move {
                let mut m = s.lock().unwrap();
                m.activations += 1;
                m.paused = false;
                let t = m.rotate();
                Json(sandbox_json(Some(&t), "active"))
            }),
        )
        .route(
            "/sandboxes/{id}/resume",
            post(|State(s): State<Shared>| async move {
                let mut m = s.lock().unwrap();
                m.paused = false;
                let t = m.rotate();
                Json(sandbox_json(Some(&t), "active"))
            }),
        )
        .route(
            "/sandboxes/{id}/pause",
            post(|State(s): State<Shared>, headers: HeaderMap| async move {
                if headers.contains_key("prefer") {
                    return error(StatusCode::BAD_REQUEST, "unexpected_prefer");
                }
                s.lock().unwrap().paused = true;
                StatusCode::NO_CONTENT.into_response()
            }),
        )
        .route(
            "/exec",
            post(
                |State(s): State<Shared>, headers: HeaderMap, Json(body): Json<serde_json::Value>| async move {
                    if let Some(r) = s.lock().unwrap().data_plane("/exec", &headers) {
                        return r;
                    }
                    let cmd = body["command"].as_str().unwrap_or_default().to_owned();
                    Json(json!({
                        "stdout": format!("ran {cmd} in {}\n", body["working_dir"].as_str().unwrap_or("-")),
                        "stderr": "", "exit_code": 3, "truncated": false,
                    }))
                    .into_response()
                },
            ),
        )
        .route(
            "/exec/stream",
            post(|State(s): State<Shared>, headers: HeaderMap| async move {
                if let Some(r) = s.lock().unwrap().data_plane("/exec/stream", &headers) {
                    return r;
                }
                let events = [
                    json!({"stdout": "one\n"}),
                    json!({"stderr": "warn\n"}),
                    json!({"stdout": "two\n"}),
                    json!({"finished": true, "exit_code": 124, "stdout": "tail",
                           "error": "command timed out after 1 s and was killed"}),
                ];
                let stream = futures::stream::iter(
                    events.map(|e| Ok::<_, Infallible>(Event::default().data(e.to_string()))),
                );
                Sse::new(stream).into_response()
            }),
        )
        .route(
            "/exec/connect",
            get(
                |State(s): State<Shared>, headers: HeaderMap, ws: WebSocketUpgrade| async move {
                    if let Some(r) = s.lock().unwrap().data_plane("/exec/connect", &headers) {
                        return r;
                    }
                    ws.protocols(["superserve.exec.v1"]).on_upgrade(echo_session)
                },
            ),
        )
        .route(
            "/files",
            get(
                |State(s): State<Shared>, headers: HeaderMap, Query(q): Query<BTreeMap<String, String>>| async move {
                    let mut m = s.lock().unwrap();
                    if let Some(r) = m.data_plane("/files", &headers) {
                        return r;
                    }
                    let path = q.get("path").cloned().unwrap_or_default();
                    if q.get("format").map(String::as_str) == Some("zip") {
                        return b"PK\x05\x06zip".to_vec().into_response();
                    }
                    match m.files.get(&path) {
                        Some(b) => b.clone().into_response(),
                        None => error(StatusCode::NOT_FOUND, "file_not_found"),
                    }
                },
            )
            .post(
                |State(s): State<Shared>, headers: HeaderMap, Query(q): Query<BTreeMap<String, String>>, body: axum::body::Bytes| async move {
                    let mut m = s.lock().unwrap();
                    if let Some(r) = m.data_plane("/files", &headers) {
                        return r;
                    }
                    m.files.insert(q["path"].clone(), body.to_vec());
                    StatusCode::NO_CONTENT.into_response()
                },
            ),
        )
        .with_state(state)
}

/// The server side of an exec session running `cat`: stdin comes back on stdout, a
/// signal ends it with 128 + 15.
async fn echo_session(mut ws: WebSocket) {
    let Some(Ok(Message::Text(start))) = ws.recv().await else {
        return;
    };
    let start: serde_json::Value = serde_json::from_str(start.as_str()).unwrap();
    assert_eq!(start["command"], "cat");
    if !start["pty"].is_null() {
        return terminal_session(ws, &start).await;
    }
    // Half of a two-byte character first: the client keeps it whole.
    let e_acute = "\u{e9}".as_bytes();
    let _ = ws
        .send(Message::Binary(vec![2, b'h', e_acute[0]].into()))
        .await;
    let _ = ws.send(Message::Binary(vec![2, e_acute[1]].into())).await;
    let mut code = 0;
    while let Some(Ok(msg)) = ws.recv().await {
        match msg {
            Message::Binary(b) if b.first() == Some(&0) => {
                let mut out = b.to_vec();
                out[0] = 1;
                let _ = ws.send(Message::Binary(out.into())).await;
            }
            Message::Text(t) => {
                let v: serde_json::Value = serde_json::from_str(t.as_str()).unwrap();
                match v["type"].as_str() {
                    Some("stdin_close") => break,
                    Some("signal") => {
                        assert_eq!(v["name"], "SIGTERM");
                        code = 143;
                        break;
                    }
                    _ => {}
                }
            }
            _ => {}
        }
    }
    let _ = ws
        .send(Message::Text(
            json!({"finished": true, "exit_code": code})
                .to_string()
                .into(),
        ))
        .await;
    let _ = ws.send(Message::Close(None)).await;
}

/// A terminal session: its size and every resize are written back on stdout as raw
/// bytes (one of them not UTF-8), stdin is echoed; stdin_close ends it with 0.
async fn terminal_session(mut ws: WebSocket, start: &serde_json::Value) {
    let size = format!("size {}x{}?", start["pty"]["cols"], start["pty"]["rows"]);
    let mut first = vec![1];
    first.extend_from_slice(size.as_bytes());
    *first.last_mut().unwrap() = 0xff;
    let _ = ws.send(Message::Binary(first.into())).await;
    while let Some(Ok(msg)) = ws.recv().await {
        match msg {
            Message::Binary(b) if b.first() == Some(&0) => {
                let mut out = b.to_vec();
                out[0] = 1;
                let _ = ws.send(Message::Binary(out.into())).await;
            }
            Message::Text(t) => {
                let v: serde_json::Value = serde_json::from_str(t.as_str()).unwrap();
                match v["type"].as_str() {
                    Some("resize") => {
                        let out = format!("\x01resized {}x{}", v["cols"], v["rows"]);
                        let _ = ws.send(Message::Binary(out.into_bytes().into())).await;
                    }
                    Some("stdin_close") => break,
                    _ => {}
                }
            }
            _ => {}
        }
    }
    let _ = ws
        .send(Message::Text(
            json!({"finished": true, "exit_code": 0}).to_string().into(),
        ))
        .await;
    let _ = ws.send(Message::Close(None)).await;
}

async fn start() -> (Client, Shared) {
    let state: Shared = Arc::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = app(state.clone());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (Client::new(format!("http://{addr}"), "key").unwrap(), state)
}

async fn sandbox(c: &Client) -> Sandbox {
    Sandbox::create(
        c,
        SandboxCreateOptions {
            env_vars: [("A".into(), "1".into())].into(),
            ..SandboxCreateOptions::new("sb", "org/web")
        },
    )
    .await
    .unwrap()
}

#[tokio::test]
async fn template_create_sends_the_wire_body_and_names_are_path_encoded() {
    let (c, state) = start().await;
    let t = Template::create(
        &c,
        TemplateCreateOptions {
            steps: vec![Step::env("A", "b"), Step::run("true")],
            start_cmd: Some("sleep infinity".into()),
            ready_cmd: Some("true".into()),
            memory_mib: Some(256),
            ..TemplateCreateOptions::new("org/web", "img:1")
        },
    )
    .await
    .unwrap();
    assert_eq!(t.info().latest_build_id.as_deref(), Some("b1"));
    assert_eq!(
        state.lock().unwrap().bodies["/templates"],
        json!({
            "name": "org/web", "memory_mib": 256,
            "build_spec": {
                "from": "img:1",
                "steps": [{"env": {"key": "A", "value": "b"}}, {"run": "true"}],
                "start_cmd": "sleep infinity", "ready_cmd": "true",
            }
        })
    );
    // `/` in a name is one path segment (%2F), decoded by the server.
    let t = Template::connect(&c, "org/web").await.unwrap();
    assert_eq!(t.id(), TEMPLATE_ID);
    Template::list(&c, Some("org/")).await.unwrap();
    assert_eq!(
        state.lock().unwrap().queries["/templates"],
        "name_prefix=org%2F"
    );
}

#[tokio::test]
async fn a_failed_build_is_a_typed_error_and_logs_are_streamed() {
    let (c, state) = start().await;
    let mut t = Template::connect(&c, "org/web").await.unwrap();
    let mut lines = Vec::new();
    let err = t
        .wait_until_ready(Some(&mut |e: &BuildLogEvent| lines.push(e.clone())))
        .await
        .unwrap_err();
    match &err {
        Error::Build {
            code,
            message,
            build_id,
            template_id,
        } => {
            assert_eq!(code, "step_failed");
            assert_eq!(message, "step 1 (`false`) exited 1");
            assert_eq!(build_id, "b1");
            assert_eq!(template_id, TEMPLATE_ID);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(err.code(), "step_failed");
    assert_eq!(state.lock().unwrap().build_polls, 2);
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert!(lines[2].finished);
    assert_eq!(lines[2].status, Some(BuildStatus::Failed));

    let mut seen = 0;
    t.stream_build_logs(Some("b1"), |_| seen += 1)
        .await
        .unwrap();
    assert_eq!(seen, 3);
}

#[tokio::test]
async fn data_plane_headers_and_activation_on_a_stale_token() {
    let (c, state) = start().await;
    let sb = sandbox(&c).await;
    assert_eq!(
        state.lock().unwrap().bodies["/sandboxes"],
        json!({"name": "sb", "from_template": "org/web", "env_vars": {"A": "1"}})
    );
    assert_eq!(sb.access_token(), "tok1");
    let r = sb
        .commands()
        .run(
            "ls",
            RunOptions {
                cwd: Some("/srv".into()),
                ..RunOptions::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(r.stdout, "ran ls in /srv\n");
    assert_eq!(r.exit_code, 3);

    // The token rotates behind the handle's back (another client resumed it): 401,
    // activate once, retry with the fresh token.
    state.lock().unwrap().rotate();
    let r = sb
        .commands()
        .run("ls", RunOptions::default())
        .await
        .unwrap();
    assert_eq!(r.exit_code, 3);
    {
        let m = state.lock().unwrap();
        assert_eq!(m.activations, 1);
        let tokens: Vec<&str> = m.data_calls.iter().map(|(_, t)| t.as_str()).collect();
        assert_eq!(tokens, ["tok1", "tok1", "tok3"]);
    }
    assert_eq!(sb.access_token(), "tok3");
}

#[tokio::test]
async fn a_paused_sandbox_is_activated_once_and_the_call_retried() {
    let (c, state) = start().await;
    let sb = sandbox(&c).await;
    sb.files().write("/tmp/a.txt", "hello").await.unwrap();
    sb.pause().await.unwrap();
    assert_eq!(sb.status(), SandboxStatus::Paused);
    // GET /files answers 503 sandbox_unavailable: no blind retries, one activation.
    assert_eq!(sb.files().read("/tmp/a.txt").await.unwrap(), b"hello");
    {
        let m = state.lock().unwrap();
        assert_eq!(m.activations, 1);
        assert_eq!(m.data_calls.len(), 3, "{:?}", m.data_calls);
    }
    assert_eq!(sb.status(), SandboxStatus::Active);
    assert_eq!(sb.files().read_text("/tmp/a.txt").await.unwrap(), "hello");
    assert!(sb
        .files()
        .download_dir("/tmp")
        .await
        .unwrap()
        .starts_with(b"PK"));
    let err = sb.files().read("/tmp/missing").await.unwrap_err();
    assert!(
        matches!(&err, Error::NotFound { code, .. } if code == "file_not_found"),
        "{err:?}"
    );
    // Refused before sending.
    let before = state.lock().unwrap().data_calls.len();
    for bad in ["relative", "/tmp/../etc/passwd"] {
        let err = sb.files().read(bad).await.unwrap_err();
        assert!(matches!(&err, Error::Validation { .. }), "{err:?}");
        let err = sb.files().write(bad, "x").await.unwrap_err();
        assert!(matches!(&err, Error::Validation { .. }), "{err:?}");
    }
    assert_eq!(state.lock().unwrap().data_calls.len(), before);

    // Resume rotates the token; the handle follows.
    sb.pause().await.unwrap();
    sb.resume().await.unwrap();
    let t = state.lock().unwrap().token.clone();
    assert_eq!(sb.access_token(), t);
    assert_eq!(state.lock().unwrap().activations, 1);
}

#[tokio::test]
async fn streamed_output_comes_as_it_is_sent() {
    let (c, _state) = start().await;
    let sb = sandbox(&c).await;
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let r = sb
        .commands()
        .run_streaming(
            "x",
            RunOptions::default(),
            |s| out.push(s.to_owned()),
            |s| err.push(s.to_owned()),
        )
        .await
        .unwrap();
    assert_eq!(out, ["one\n", "two\n", "tail"]);
    assert_eq!(err, ["warn\n"]);
    assert_eq!(r.stdout, "one\ntwo\ntail");
    assert_eq!(r.exit_code, 124);
    assert!(r.stderr.starts_with("warn\ncommand timed out"), "{r:?}");
}

#[tokio::test]
async fn spawn_writes_stdin_reads_output_and_waits() {
    let (c, state) = start().await;
    let sb = sandbox(&c).await;
    // A stale token on the upgrade is answered by activation too.
    state.lock().unwrap().rotate();
    let mut s = sb
        .commands()
        .spawn("cat", RunOptions::default())
        .await
        .unwrap();
    assert_eq!(state.lock().unwrap().activations, 1);
    assert_eq!(s.next_output().await, Some(Output::Stderr("h".into())));
    assert_eq!(s.next_output().await, Some(Output::Stderr("\u{e9}".into())));
    s.write_stdin(b"hello\n").await.unwrap();
    assert_eq!(
        s.next_output().await,
        Some(Output::Stdout("hello\n".into()))
    );
    // Larger than one frame: split into 32 KiB frames.
    let big = vec![b'x'; 70 * 1024];
    s.write_stdin(&big).await.unwrap();
    s.close_stdin().await.unwrap();
    let r = tokio::time::timeout(Duration::from_secs(10), s.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r.exit_code, 0);
    assert_eq!(r.stdout.len(), 6 + 70 * 1024);
    assert_eq!(r.stderr, "h\u{e9}");

    let s = sb
        .commands()
        .spawn("cat", RunOptions::default())
        .await
        .unwrap();
    s.signal("SIGTERM").await.unwrap();
    let r = s.wait().await.unwrap();
    assert_eq!(r.exit_code, 143);
    // The process is over: stdin and signals are no-ops, not errors.
}

#[tokio::test]
async fn a_terminal_session_sends_its_size_and_resizes_and_gives_raw_bytes() {
    let (c, _state) = start().await;
    let sb = sandbox(&c).await;
    let size = TerminalSize {
        cols: 100,
        rows: 30,
    };
    let mut s = sb
        .commands()
        .spawn_terminal("cat", size, RunOptions::default())
        .await
        .unwrap();
    // Bytes as they were sent, not text: the last byte is not UTF-8.
    assert_eq!(
        s.next_output().await,
        Some(Output::Terminal(b"size 100x30\xff"[..].into()))
    );
    s.resize(TerminalSize {
        cols: 120,
        rows: 40,
    })
    .await
    .unwrap();
    assert_eq!(
        s.next_output().await,
        Some(Output::Terminal(b"resized 120x40"[..].into()))
    );
    s.write_stdin(b"\x03").await.unwrap();
    assert_eq!(
        s.next_output().await,
        Some(Output::Terminal(b"\x03"[..].into()))
    );
    s.close_stdin().await.unwrap();
    let r = s.wait().await.unwrap();
    assert_eq!(r.exit_code, 0);
    assert!(r.stdout.is_empty(), "a terminal's screen is not kept");
}

#[tokio::test]
async fn list_filters_and_lifecycle() {
    let (c, state) = start().await;
    let list = Sandbox::list(
        &c,
        ListOptions {
            metadata: [("team".into(), "a b".into())].into(),
            status: vec![SandboxStatus::Active, SandboxStatus::Paused],
            limit: Some(2),
            offset: Some(1),
        },
    )
    .await
    .unwrap();
    assert_eq!(list[0].metadata["team"], "a");
    assert_eq!(
        state.lock().unwrap().queries["/sandboxes"],
        "metadata.team=a+b&status=active%2Cpaused&limit=2&offset=1"
    );
    let sb = Sandbox::connect(&c, SANDBOX_ID).await.unwrap();
    assert_eq!(sb.id(), SANDBOX_ID);
    assert_eq!(sb.access_token(), "tok1");
    let err = Template::connect(&c, "nope").await.unwrap_err();
    assert!(matches!(&err, Error::NotFound { code, .. } if code == "not_found"));
}

/// The SDK's futures can be spawned, and its handles shared across tasks.
#[allow(dead_code)]
fn futures_are_send(c: Client, mut t: Template, sb: Sandbox, s: kiln_sdk::CommandSession) {
    fn send<T: Send>(_: T) {}
    fn sync<T: Send + Sync>(_: &T) {}
    sync(&c);
    sync(&sb);
    sync(&s);
    send(Template::create(&c, TemplateCreateOptions::new("a", "b")));
    send(t.wait_until_ready(None));
    send(Sandbox::create(&c, SandboxCreateOptions::new("a", "b")));
    send(sb.commands().run("true", RunOptions::default()));
    send(
        sb.commands()
            .run_streaming("true", RunOptions::default(), |_| {}, |_| {}),
    );
    send(sb.commands().spawn("true", RunOptions::default()));
    send(sb.files().read("/x"));
    send(sb.files().write("/x", b"y"));
    send(sb.pause());
    send(s.wait());
}

#[tokio::test]
async fn a_snapshot_is_waited_for_renamed_forked_and_deleted() {
    let (c, state) = start().await;
    let sb = sandbox(&c).await;
    let mut snap = sb
        .snapshot(kiln_sdk::SnapshotOptions {
            name: Some("n".into()),
            idempotency_key: None,
        })
        .await
        .unwrap();
    assert_eq!(snap.info().status, kiln_sdk::SnapshotStatus::Ready);
    {
        let m = state.lock().unwrap();
        let body = &m.bodies["/snapshot"];
        assert_eq!(
            (&body["kind"], &body["name"]),
            (&json!("mem+fs"), &json!("n"))
        );
        // Always keyed, so that a retried request cannot take a second snapshot.
        assert!(body["idempotency_key"]
            .as_str()
            .is_some_and(|k| !k.is_empty()));
        assert_eq!(m.snapshot_polls, 2, "polled until ready");
    }
    assert_eq!(
        snap.rename("other").await.unwrap().name.as_deref(),
        Some("other")
    );
    assert_eq!(sb.snapshots().await.unwrap()[0].id, "s1");
    // Deleting one already gone is fine.
    snap.delete().await.unwrap();
    let fork = SandboxCreateOptions {
        timeout_seconds: Some(60),
        ..SandboxCreateOptions::from_snapshot("fork", snap.id())
    };
    Sandbox::create(&c, fork).await.unwrap();
    let body = state.lock().unwrap().bodies["/sandboxes"].clone();
    assert_eq!(
        body,
        json!({"name": "fork", "from_snapshot": "s1", "timeout_seconds": 60})
    );
}

#[tokio::test]
async fn secrets_stay_out_of_debug_output() {
    let (c, _state) = start().await;
    let sb = sandbox(&c).await;
    let text = format!("{c:?} {sb:?} {:?}", Client::builder().api_key("key"));
    assert!(!text.contains("tok1"), "{text}");
    assert!(!text.contains("\"key\""), "{text}");
    assert!(text.contains(SANDBOX_ID), "{text}");
}

#[tokio::test]
async fn secrets_calls_send_the_wire_shapes() {
    use kiln_sdk::{AuditQuery, CreateSecret, Secret};
    let (c, state) = start().await;
    let created = Secret::create(
        &c,
        &CreateSecret {
            name: "openai-prod".into(),
            value: "sk-real".into(),
            provider: Some("openai".into()),
            ..CreateSecret::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(created.hosts, ["api.openai.com"]);
    assert_eq!(
        state.lock().unwrap().bodies["POST /secrets"],
        json!({"name": "openai-prod", "value": "sk-real", "provider": "openai"})
    );
    assert_eq!(Secret::list(&c).await.unwrap().len(), 1);
    Secret::get(&c, "openai-prod").await.unwrap();
    Secret::rotate(&c, "openai-prod", "sk-new").await.unwrap();
    assert_eq!(
        state.lock().unwrap().bodies["PATCH /secrets/openai-prod"],
        json!({"value": "sk-new"})
    );
    let q = AuditQuery::from_query(&[("status".into(), "4xx".into())]).unwrap();
    let audit = Secret::audit(&c, "openai-prod", &q).await.unwrap();
    assert_eq!((audit[0].status, audit[0].latency_ms), (200, Some(120)));
    assert_eq!(
        state.lock().unwrap().queries["GET /secrets/openai-prod/audit"],
        "limit=100&status=4xx"
    );
    let bound = Secret::sandboxes(&c, "openai-prod").await.unwrap();
    assert_eq!(bound[0].env_key, "OPENAI_API_KEY");
    assert_eq!(
        Secret::providers(&c).await.unwrap()[0].token_shape,
        "sk-proj-..."
    );
    Secret::delete(&c, "openai-prod").await.unwrap();
    // Deleting what is gone is fine, as in the official SDKs.
    Secret::delete(&c, "gone").await.unwrap();

    let mut options = SandboxCreateOptions::new("sb", "org/web");
    options
        .secrets
        .insert("OPENAI_API_KEY".into(), "openai-prod".into());
    let sb = Sandbox::create(&c, options).await.unwrap();
    assert_eq!(
        state.lock().unwrap().bodies["/sandboxes"]["secrets"],
        json!({"OPENAI_API_KEY": "openai-prod"})
    );
    sb.attach_secret("SECOND", "openai-prod").await.unwrap();
    assert_eq!(
        state.lock().unwrap().bodies[&format!("POST /sandboxes/{SANDBOX_ID}/secrets")],
        json!({"env_key": "SECOND", "secret_name": "openai-prod"})
    );
    sb.detach_secret("SECOND").await.unwrap();
    assert!(state
        .lock()
        .unwrap()
        .queries
        .contains_key(&format!("DELETE /sandboxes/{SANDBOX_ID}/secrets/SECOND")));
}
