//! Router tests: each endpoint's success and error paths, team walls and limits under
//! concurrency, through `tower::ServiceExt::oneshot` (no VM is booted: builds here fail
//! early, which is all these tests need).

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt as _;
use kiln_api::SandboxStatus;
use kiln_engine::testing::TestEngine;
use kiln_engine::Engine;
use kiln_engine::Limits;
use kiln_server::{router, AppState};
use serde_json::{json, Value};
use tower::ServiceExt as _;

struct Api {
    app: axum::Router,
    engine: Arc<Engine>,
    t: TestEngine,
}

async fn api(limits: Limits) -> Api {
    api_with(limits, |s| s).await
}

/// An API over an engine whose VMs are the fake hypervisor's, with `state` adjusted.
async fn api_with(limits: Limits, state: impl FnOnce(AppState) -> AppState) -> Api {
    let t = TestEngine::new(limits, 0).await.unwrap();
    let app = router(state(AppState::new(t.engine.clone())));
    Api {
        app,
        engine: t.engine.clone(),
        t,
    }
}

impl Api {
    async fn key(&self, team: &str) -> String {
        self.engine.create_api_key(team).await.unwrap()
    }

    async fn call(
        &self,
        method: &str,
        uri: &str,
        key: Option<&str>,
        body: Option<Vec<u8>>,
    ) -> (StatusCode, Value) {
        let headers: Vec<(&str, &str)> = key.map(|k| ("x-api-key", k)).into_iter().collect();
        let (s, _, v) = self.call_with(method, uri, &headers, body).await;
        (s, v)
    }

    /// Any request; the body is parsed as JSON when it is JSON.
    async fn call_with(
        &self,
        method: &str,
        uri: &str,
        headers: &[(&str, &str)],
        body: Option<Vec<u8>>,
    ) -> (StatusCode, axum::http::HeaderMap, Value) {
        let mut req = Request::builder().method(method).uri(uri);
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        let req = req
            .header("content-type", "application/json")
            .body(Body::from(body.unwrap_or_default()))
            .unwrap();
        let resp = self.app.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or(Value::String(String::from_utf8_lossy(&bytes).into_owned()))
        };
        (status, headers, value)
    }

    /// A template whose build is `ready`, made without the API so that no build runs in
    /// the background.
    async fn ready_template(&self, team: &str, name: &str) -> String {
        self.t.ready_template(team, name).await.unwrap()
    }

    /// A sandbox row in `status` with no VM behind it, with its access token.
    async fn sandbox(
        &self,
        team: &str,
        template: &str,
        metadata: &[(&str, &str)],
        status: SandboxStatus,
    ) -> (String, String) {
        self.t
            .seed_sandbox(team, template, metadata, status)
            .await
            .unwrap()
    }

    async fn create(&self, key: &str, name: &str) -> (StatusCode, Value) {
        let body = json!({"name": name, "memory_mib": 512, "build_spec": {"from": "127.0.0.1:9/kiln/none:1"}});
        self.call(
            "POST",
            "/templates",
            Some(key),
            Some(body.to_string().into_bytes()),
        )
        .await
    }
}

fn error_code(v: &Value) -> &str {
    v["error"]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("no error body: {v}"))
}

#[tokio::test]
async fn health_and_auth() {
    let a = api(Limits::UNLIMITED).await;
    assert_eq!(a.call("GET", "/health", None, None).await.0, StatusCode::OK);
    let (s, v) = a.call("GET", "/templates", None, None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_eq!(error_code(&v), "unauthorized");
    let (s, _) = a
        .call("GET", "/templates", Some("kiln_not-a-key"), None)
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn templates_create_get_list_builds_delete() {
    let a = api(Limits::UNLIMITED).await;
    let key = a.key("acme").await;
    let (s, t) = a.create(&key, "web").await;
    assert_eq!(s, StatusCode::ACCEPTED, "{t}");
    assert!(t["build_id"].is_string(), "{t}");
    assert_eq!(t["name"], "web");
    assert_eq!(t["memory_mib"], 512);
    assert_eq!(t["vcpu"], 1);
    let id = t["id"].as_str().unwrap().to_owned();

    for path in [format!("/templates/{id}"), "/templates/web".to_owned()] {
        let (s, got) = a.call("GET", &path, Some(&key), None).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(got["id"], id.as_str());
    }
    a.create(&key, "api").await;
    let (_, list) = a
        .call("GET", "/templates?name_prefix=we", Some(&key), None)
        .await;
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");

    let (s, builds) = a
        .call("GET", &format!("/templates/{id}/builds"), Some(&key), None)
        .await;
    assert_eq!(s, StatusCode::OK);
    let build_id = t["build_id"].as_str().unwrap();
    assert_eq!(builds[0]["id"], build_id);
    assert!(builds[0]["build_spec_hash"]
        .as_str()
        .unwrap()
        .starts_with("sha256:"));
    let (s, b) = a
        .call(
            "GET",
            &format!("/templates/{id}/builds/{build_id}"),
            Some(&key),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    // A build is only found under its own template.
    let (s, _) = a
        .call(
            "GET",
            &format!("/templates/api/builds/{build_id}"),
            Some(&key),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    // Cancel is a no-op on a finished build, and always 204.
    let (s, _) = a
        .call(
            "DELETE",
            &format!("/templates/{id}/builds/{build_id}"),
            Some(&key),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);

    // Duplicate names conflict.
    assert_eq!(a.create(&key, "web").await.0, StatusCode::CONFLICT);

    let (s, _) = a.call("DELETE", "/templates/web", Some(&key), None).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, v) = a.call("GET", "/templates/web", Some(&key), None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(error_code(&v), "not_found");
}

#[tokio::test]
async fn bad_input_gets_400_with_a_code_never_500() {
    let a = api(Limits::UNLIMITED).await;
    let key = a.key("acme").await;
    let (s, v) = a
        .call(
            "POST",
            "/templates",
            Some(&key),
            Some(b"{not json".to_vec()),
        )
        .await;
    assert_eq!(
        (s, error_code(&v)),
        (StatusCode::BAD_REQUEST, "invalid_request")
    );
    let body =
        json!({"name": "Bad Name", "vcpu": 99, "build_spec": {"from": "alpine:3.19", "bogus": 1}});
    let (s, v) = a
        .call(
            "POST",
            "/templates",
            Some(&key),
            Some(body.to_string().into_bytes()),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let msg = v["error"]["message"].as_str().unwrap();
    for path in ["name:", "vcpu:", "build_spec.from:", "build_spec.bogus:"] {
        assert!(msg.contains(path), "{path} missing in {msg}");
    }
    let (s, _) = a
        .call(
            "POST",
            "/templates",
            Some(&key),
            Some(
                json!({"build_spec": {"from": "debian"}})
                    .to_string()
                    .into_bytes(),
            ),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let huge = vec![b' '; kiln_server::MAX_BODY_BYTES + 10];
    let (s, v) = a.call("POST", "/templates", Some(&key), Some(huge)).await;
    assert_eq!(
        (s, error_code(&v)),
        (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large")
    );
    // axum's own rejections come in the API's shape too.
    for (method, uri) in [
        ("GET", "/templates?name_prefix=a&name_prefix=b"),
        ("GET", "/templates/%FF"),
        ("GET", "/templates/web/builds?limit=x"),
        ("GET", "/templates?bogus=1"),
    ] {
        let (s, v) = a.call(method, uri, Some(&key), None).await;
        assert_eq!(
            (s, error_code(&v)),
            (StatusCode::BAD_REQUEST, "invalid_request"),
            "{uri}"
        );
    }
    let (s, v) = a.call("PUT", "/templates", Some(&key), None).await;
    assert_eq!(
        (s, error_code(&v)),
        (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed")
    );
    let (s, v) = a.call("GET", "/nope", Some(&key), None).await;
    assert_eq!((s, error_code(&v)), (StatusCode::NOT_FOUND, "no_route"));
}

#[tokio::test]
async fn teams_are_walls() {
    let a = api(Limits::UNLIMITED).await;
    let (ka, kb) = (a.key("a").await, a.key("b").await);
    let (_, t) = a.create(&ka, "web").await;
    let id = t["id"].as_str().unwrap();
    let build = t["build_id"].as_str().unwrap();
    for (method, path) in [
        ("GET", format!("/templates/{id}")),
        ("GET", "/templates/web".to_owned()),
        ("DELETE", format!("/templates/{id}")),
        ("GET", format!("/templates/{id}/builds")),
        ("POST", format!("/templates/{id}/builds")),
        ("GET", format!("/templates/{id}/builds/{build}")),
        ("DELETE", format!("/templates/{id}/builds/{build}")),
    ] {
        let (s, _) = a.call(method, &path, Some(&kb), None).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{method} {path}");
    }
    let (_, list) = a.call("GET", "/templates", Some(&kb), None).await;
    assert_eq!(list, json!([]));
    // B may use the same name: names are per team.
    assert_eq!(a.create(&kb, "web").await.0, StatusCode::ACCEPTED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_template_limit_holds_under_concurrency() {
    let a = Arc::new(
        api(Limits {
            max_templates: 3,
            ..Limits::UNLIMITED
        })
        .await,
    );
    let key = a.key("acme").await;
    let mut set = tokio::task::JoinSet::new();
    for i in 0..12 {
        let (a, key) = (a.clone(), key.clone());
        set.spawn(async move { a.create(&key, &format!("t{i}")).await });
    }
    let (mut ok, mut limited) = (0, 0);
    while let Some(r) = set.join_next().await {
        let (s, v) = r.unwrap();
        match s {
            StatusCode::ACCEPTED => ok += 1,
            StatusCode::TOO_MANY_REQUESTS => {
                assert_eq!(error_code(&v), "too_many_templates");
                limited += 1;
            }
            other => panic!("unexpected {other}: {v}"),
        }
    }
    assert_eq!((ok, limited), (3, 9));
}

#[tokio::test]
async fn sandboxes_list_filter_get_patch_and_refusals() {
    let a = api(Limits::UNLIMITED).await;
    let key = a.key("acme").await;
    a.ready_template("acme", "web").await;
    let (s1, _) = a
        .sandbox("acme", "web", &[("env", "dev")], SandboxStatus::Active)
        .await;
    let (s2, _) = a
        .sandbox("acme", "web", &[("env", "prod")], SandboxStatus::Paused)
        .await;
    a.sandbox(
        "acme",
        "web",
        &[("env", "dev"), ("x", "1")],
        SandboxStatus::Starting,
    )
    .await;

    let ids = |v: &Value| -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|s| s["id"].as_str().unwrap().to_owned())
            .collect()
    };
    let (s, all) = a.call("GET", "/sandboxes", Some(&key), None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(all.as_array().unwrap().len(), 3);
    for field in [
        "id",
        "name",
        "status",
        "vcpu_count",
        "memory_mib",
        "created_at",
        "metadata",
    ] {
        assert!(!all[0][field].is_null(), "{field} missing in {}", all[0]);
    }
    assert!(
        all[0].get("access_token").is_none(),
        "tokens are shown once"
    );
    let (_, dev) = a
        .call("GET", "/sandboxes?metadata.env=dev", Some(&key), None)
        .await;
    assert_eq!(dev.as_array().unwrap().len(), 2);
    let (_, both) = a
        .call(
            "GET",
            "/sandboxes?metadata.env=dev&metadata.x=1",
            Some(&key),
            None,
        )
        .await;
    assert_eq!(both.as_array().unwrap().len(), 1);
    let (_, st) = a
        .call("GET", "/sandboxes?status=active,paused", Some(&key), None)
        .await;
    assert_eq!(ids(&st), vec![s1.clone(), s2.clone()]);
    let (_, page) = a
        .call("GET", "/sandboxes?limit=1&offset=1", Some(&key), None)
        .await;
    assert_eq!(ids(&page), vec![s2.clone()]);
    for bad in [
        "/sandboxes?status=sleeping",
        "/sandboxes?limit=-1",
        "/sandboxes?bogus=1",
    ] {
        let (s, v) = a.call("GET", bad, Some(&key), None).await;
        assert_eq!(
            (s, error_code(&v)),
            (StatusCode::BAD_REQUEST, "invalid_request"),
            "{bad}"
        );
    }

    let (s, got) = a
        .call("GET", &format!("/sandboxes/{s1}"), Some(&key), None)
        .await;
    assert_eq!(
        (s, got["status"].as_str()),
        (StatusCode::OK, Some("active"))
    );
    let patch = json!({"metadata": {"env": "staging"}})
        .to_string()
        .into_bytes();
    let (s, _) = a
        .call(
            "PATCH",
            &format!("/sandboxes/{s1}"),
            Some(&key),
            Some(patch),
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (_, got) = a
        .call("GET", &format!("/sandboxes/{s1}"), Some(&key), None)
        .await;
    assert_eq!(got["metadata"], json!({"env": "staging"}));
    // Egress rules: set, shown, refused when invalid, cleared with null.
    let patch = |body: serde_json::Value| body.to_string().into_bytes();
    let rules = json!({"allow_out": ["1.1.1.1", "*.example.com"], "deny_out": ["0.0.0.0/0"]});
    let (s, _) = a
        .call(
            "PATCH",
            &format!("/sandboxes/{s1}"),
            Some(&key),
            Some(patch(json!({ "network": rules }))),
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (_, got) = a
        .call("GET", &format!("/sandboxes/{s1}"), Some(&key), None)
        .await;
    assert_eq!(got["network"], rules);
    let (s, v) = a
        .call(
            "PATCH",
            &format!("/sandboxes/{s1}"),
            Some(&key),
            Some(patch(json!({"network": {"deny_out": ["example.com"]}}))),
        )
        .await;
    assert_eq!(
        (s, error_code(&v)),
        (StatusCode::BAD_REQUEST, "invalid_request")
    );
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("network.deny_out[0]"));
    let (_, got) = a
        .call("GET", &format!("/sandboxes/{s1}"), Some(&key), None)
        .await;
    assert_eq!(got["network"], rules, "a refused update changes nothing");
    let (s, _) = a
        .call(
            "PATCH",
            &format!("/sandboxes/{s1}"),
            Some(&key),
            Some(patch(json!({ "network": null }))),
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (_, got) = a
        .call("GET", &format!("/sandboxes/{s1}"), Some(&key), None)
        .await;
    assert_eq!(got["network"], serde_json::Value::Null);

    // Creation refusals, each with its code; nothing is created.
    for (body, status, code) in [
        // No template: the system template, which this server has not built.
        (json!({"name": "x"}), StatusCode::CONFLICT, "not_ready"),
        (
            json!({"name": "x", "from_template": "web", "from_snapshot": "s"}),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            json!({"name": "x", "from_template": "web", "timeout_seconds": 0}),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            json!({"name": "x", "from_snapshot": "nope"}),
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            json!({"name": "x", "from_template": "web", "bogus": 1}),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            json!({"name": "x", "from_template": "web", "preview_access": "legacy_public"}),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            json!({"name": "x", "from_template": "nope"}),
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            json!({"name": "", "from_template": "web"}),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
    ] {
        let (s, v) = a
            .call(
                "POST",
                "/sandboxes",
                Some(&key),
                Some(body.to_string().into_bytes()),
            )
            .await;
        assert_eq!((s, error_code(&v)), (status, code), "{body}");
    }
    let (_, all) = a.call("GET", "/sandboxes", Some(&key), None).await;
    assert_eq!(all.as_array().unwrap().len(), 3);
    // A template whose build has not finished has nothing to start from.
    let (_, t) = a.create(&key, "pending").await;
    let body = json!({"name": "x", "from_template": t["id"]})
        .to_string()
        .into_bytes();
    let (s, v) = a.call("POST", "/sandboxes", Some(&key), Some(body)).await;
    assert_eq!(
        (s, error_code(&v)),
        (StatusCode::CONFLICT, "not_ready"),
        "{v}"
    );

    // Delete is idempotent; a deleted sandbox is no longer listed.
    for _ in 0..2 {
        let (s, _) = a
            .call("DELETE", &format!("/sandboxes/{s2}"), Some(&key), None)
            .await;
        assert_eq!(s, StatusCode::NO_CONTENT);
    }
    let (_, all) = a.call("GET", "/sandboxes", Some(&key), None).await;
    assert!(!ids(&all).contains(&s2));
    // A sandbox this server does not run cannot be paused or resumed.
    let (s, v) = a
        .call("POST", &format!("/sandboxes/{s1}/pause"), Some(&key), None)
        .await;
    assert_eq!((s, error_code(&v)), (StatusCode::CONFLICT, "not_running"));
}

#[tokio::test]
async fn the_data_plane_checks_sandbox_token_and_team() {
    let a = api(Limits::UNLIMITED).await;
    let (ka, kb) = (a.key("a").await, a.key("b").await);
    a.ready_template("a", "web").await;
    a.ready_template("b", "web").await;
    let (active, token) = a.sandbox("a", "web", &[], SandboxStatus::Active).await;
    let (paused, paused_token) = a.sandbox("a", "web", &[], SandboxStatus::Paused).await;
    let (_, other_token) = a.sandbox("b", "web", &[], SandboxStatus::Active).await;
    let exec = || Some(json!({"command": "true"}).to_string().into_bytes());
    let code = |v: &Value| error_code(v).to_owned();

    let (s, _, v) = a
        .call_with("POST", "/exec", &[("x-access-token", &token)], exec())
        .await;
    assert_eq!(
        (s, code(&v)),
        (StatusCode::BAD_REQUEST, "invalid_request".into())
    );
    type Case<'a> = (Vec<(&'a str, &'a str)>, StatusCode, &'a str);
    let cases: Vec<Case<'_>> = vec![
        (
            vec![("x-superserve-sandbox-id", &active)],
            StatusCode::UNAUTHORIZED,
            "unauthorized",
        ),
        (
            vec![
                ("x-superserve-sandbox-id", &active),
                ("x-access-token", &other_token),
            ],
            StatusCode::UNAUTHORIZED,
            "unauthorized",
        ),
        (
            vec![
                ("x-superserve-sandbox-id", &active),
                ("x-access-token", &paused_token),
            ],
            StatusCode::UNAUTHORIZED,
            "unauthorized",
        ),
        (
            vec![
                ("x-superserve-sandbox-id", "../../etc"),
                ("x-access-token", &token),
            ],
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            vec![
                (
                    "x-superserve-sandbox-id",
                    "00000000-0000-0000-0000-000000000000",
                ),
                ("x-access-token", &token),
            ],
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        // Another team's key does not see the sandbox at all.
        (
            vec![("x-superserve-sandbox-id", &active), ("x-api-key", &kb)],
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        // The right token, but this server runs no VM for it (no VM in these tests).
        (
            vec![
                ("x-superserve-sandbox-id", &active),
                ("x-access-token", &token),
            ],
            StatusCode::CONFLICT,
            "not_running",
        ),
        (
            vec![("x-superserve-sandbox-id", &active), ("x-api-key", &ka)],
            StatusCode::CONFLICT,
            "not_running",
        ),
        // Paused: the SDK resumes on 503 and retries.
        (
            vec![
                ("x-superserve-sandbox-id", &paused),
                ("x-access-token", &paused_token),
            ],
            StatusCode::SERVICE_UNAVAILABLE,
            "sandbox_unavailable",
        ),
    ];
    for (headers, status, want) in &cases {
        for (method, path, body) in [
            ("POST", "/exec", exec()),
            ("POST", "/exec/stream", exec()),
            ("GET", "/files?path=/etc/hostname", None),
            ("POST", "/files?path=/tmp/x", Some(b"data".to_vec())),
        ] {
            let (s, _, v) = a.call_with(method, path, headers, body).await;
            assert_eq!(
                (s, code(&v).as_str()),
                (*status, *want),
                "{method} {path} {headers:?}"
            );
        }
    }
    // The per-sandbox host form names the sandbox too.
    let host = format!("boxd-{paused}.sandbox.example");
    let (s, _, _) = a
        .call_with(
            "POST",
            "/exec",
            &[("host", &host), ("x-access-token", &paused_token)],
            exec(),
        )
        .await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);

    // Control plane walls for sandboxes.
    for (method, path) in [
        ("GET", format!("/sandboxes/{active}")),
        ("PATCH", format!("/sandboxes/{active}")),
        ("DELETE", format!("/sandboxes/{active}")),
        ("POST", format!("/sandboxes/{active}/pause")),
        ("POST", format!("/sandboxes/{active}/resume")),
        ("POST", format!("/sandboxes/{active}/activate")),
    ] {
        let (s, _) = a.call(method, &path, Some(&kb), Some(b"{}".to_vec())).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{method} {path}");
    }
    let (_, list) = a.call("GET", "/sandboxes", Some(&kb), None).await;
    assert_eq!(list.as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn the_request_rate_is_limited_per_key() {
    let a = api_with(Limits::UNLIMITED, |mut state| {
        state.limiter = Arc::new(kiln_server::RateLimiter::new(1, 3));
        state
    })
    .await;
    let (k1, k2) = (a.key("a").await, a.key("b").await);
    for _ in 0..3 {
        assert_eq!(
            a.call("GET", "/templates", Some(&k1), None).await.0,
            StatusCode::OK
        );
    }
    let (s, headers, v) = a
        .call_with("GET", "/templates", &[("x-api-key", &k1)], None)
        .await;
    assert_eq!(
        (s, error_code(&v)),
        (StatusCode::TOO_MANY_REQUESTS, "rate_limited")
    );
    assert!(headers.contains_key("retry-after"), "{headers:?}");
    // Another key is unaffected.
    assert_eq!(
        a.call("GET", "/templates", Some(&k2), None).await.0,
        StatusCode::OK
    );
}

/// The events of an SSE body.
fn sse_events(body: &Value) -> Vec<Value> {
    body.as_str()
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(|d| serde_json::from_str(d.trim()).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn build_logs_stream_history_then_a_finished_event() {
    let a = api(Limits::UNLIMITED).await;
    let key = a.key("acme").await;
    // Its build fails at once.
    let (_, t) = a.create(&key, "web").await;
    let (id, build) = (t["id"].as_str().unwrap(), t["build_id"].as_str().unwrap());
    let (s, _, body) = a
        .call_with(
            "GET",
            &format!("/templates/{id}/builds/{build}/logs"),
            &[("x-api-key", &key)],
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let events = sse_events(&body);
    let last = events.last().unwrap();
    assert_eq!(last["finished"], true, "{events:#?}");
    assert_eq!(last["status"], "failed");
    // No kernel in these tests: the build fails before it boots, and says why.
    assert!(
        last["text"].as_str().unwrap().contains("boot_failed"),
        "{events:#?}"
    );
    for e in &events {
        assert!(e["timestamp"].is_string() && e["stream"].is_string(), "{e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_build_says_so_until_it_ends() {
    let a = api(Limits::UNLIMITED).await;
    let key = a.key("acme").await;
    // Made without the API, so nothing dispatches it: it stays queued.
    let (t, b) = a.t.queued_build("acme", "q").await.unwrap();
    let team_id = a.t.team("acme").await.unwrap();
    let (engine, build_id) = (a.engine.clone(), b.clone());
    tokio::spawn(async move {
        tokio::time::sleep(std::time::Duration::from_millis(4500)).await;
        engine.cancel_build(&team_id, &build_id).await.unwrap();
    });
    let (s, _, body) = a
        .call_with(
            "GET",
            &format!("/templates/{t}/builds/{b}/logs"),
            &[("x-api-key", &key)],
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let events = sse_events(&body);
    let beats = events
        .iter()
        .filter(|e| e["text"] == "build queued, waiting for dispatch" && e["stream"] == "system")
        .count();
    assert!(beats >= 2, "{events:#?}");
    let last = events.last().unwrap();
    assert_eq!(
        (&last["finished"], &last["status"]),
        (&json!(true), &json!("cancelled"))
    );
}

#[tokio::test]
async fn metrics_and_request_ids() {
    let a = api(Limits::UNLIMITED).await;
    let key = a.key("acme").await;
    a.ready_template("acme", "web").await;
    a.call("GET", "/templates", Some(&key), None).await;
    let (s, headers, body) = a.call_with("GET", "/metrics", &[], None).await;
    assert_eq!(s, StatusCode::OK);
    assert!(
        headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain"),
        "{headers:?}"
    );
    let text = body.as_str().unwrap();
    for line in [
        "kiln_templates 1",
        r#"kiln_builds{status="ready"} 1"#,
        r#"kiln_http_requests_total{method="GET",route="/templates",status="200"} 1"#,
        "kiln_live_sandboxes 0",
    ] {
        assert!(text.contains(line), "{line} missing from\n{text}");
    }
    // Secrets never become labels or values.
    assert!(!text.contains(&key), "the API key is in /metrics");
    // Every response carries a request id; a sane one from the client is kept.
    let (_, headers, _) = a
        .call_with("GET", "/health", &[("x-request-id", "req-123")], None)
        .await;
    assert_eq!(headers["x-request-id"], "req-123");
    let (_, headers, _) = a.call_with("GET", "/health", &[], None).await;
    assert!(!headers["x-request-id"].is_empty());
}

/// `KILN_METRICS_TOKEN`: with a token, `/metrics` answers only its bearer (anything else,
/// a near miss included, is a 401 in the API's error shape); the rest stays open.
#[tokio::test]
async fn metrics_token_guards_metrics_only() {
    let a = api_with(Limits::UNLIMITED, |mut s| {
        s.metrics_token = Some("s3cret-metrics".into());
        s
    })
    .await;
    for headers in [
        &[][..],
        &[("authorization", "Bearer wrong")],
        &[("authorization", "Bearer s3cret-metric")],
        &[("authorization", "Bearer s3cret-metrics2")],
        &[("authorization", "s3cret-metrics")],
        &[("authorization", "Basic s3cret-metrics")],
    ] {
        let (s, _, v) = a.call_with("GET", "/metrics", headers, None).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{headers:?}");
        assert_eq!(error_code(&v), "unauthorized", "{headers:?}");
    }
    let (s, _, body) = a
        .call_with(
            "GET",
            "/metrics",
            &[("authorization", "Bearer s3cret-metrics")],
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert!(body.as_str().unwrap().contains("kiln_live_sandboxes 0"));
    // The token guards /metrics alone: /health stays open. (Without a token /metrics is
    // open: `metrics_and_request_ids`.)
    assert_eq!(a.call("GET", "/health", None, None).await.0, StatusCode::OK);
}

#[tokio::test]
async fn force_bypasses_the_build_cache_and_is_checked() {
    let a = api(Limits::UNLIMITED).await;
    let key = a.key("acme").await;
    let spec = |force: Value| {
        json!({"name": "f", "force": force, "build_spec": {"from": "127.0.0.1:9/kiln/none:1"}})
            .to_string()
            .into_bytes()
    };
    let (s, v) = a
        .call("POST", "/templates", Some(&key), Some(spec(json!("yes"))))
        .await;
    assert_eq!(
        (s, error_code(&v)),
        (StatusCode::BAD_REQUEST, "invalid_request")
    );
    let (s, t) = a
        .call("POST", "/templates", Some(&key), Some(spec(json!(true))))
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{t}");
    let build = t["build_id"].as_str().unwrap();
    assert!(a.t.build_no_cache(build).await.unwrap(), "{t}");
    let (s, _) = a
        .call("POST", "/templates/f/builds?force=maybe", Some(&key), None)
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
}

/// A log sink for [`secrets_stay_out_of_logs_errors_and_metrics`].
#[derive(Clone, Default)]
struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "current_thread")]
async fn secrets_stay_out_of_logs_errors_and_metrics() {
    // Every log line of the server, at the most verbose level, with span fields.
    let sink = Captured::default();
    let writer = sink.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let a = api(Limits::UNLIMITED).await;
    let key = a.key("acme").await;
    let other = a.key("evil").await;
    a.ready_template("acme", "web").await;
    let (sid, token) = a.sandbox("acme", "web", &[], SandboxStatus::Active).await;
    let wrong_key = format!("{key}x");
    let wrong_token = format!("{token}x");
    let mut bodies = Vec::new();
    for (method, uri, headers) in [
        (
            "GET",
            "/templates".to_owned(),
            vec![("x-api-key", key.as_str())],
        ),
        (
            "GET",
            "/templates".to_owned(),
            vec![("x-api-key", wrong_key.as_str())],
        ),
        (
            "GET",
            format!("/sandboxes/{sid}"),
            vec![("x-api-key", other.as_str())],
        ),
        (
            "POST",
            "/exec".to_owned(),
            vec![
                ("x-superserve-sandbox-id", sid.as_str()),
                ("x-access-token", token.as_str()),
            ],
        ),
        (
            "POST",
            "/exec".to_owned(),
            vec![
                ("x-superserve-sandbox-id", sid.as_str()),
                ("x-access-token", wrong_token.as_str()),
            ],
        ),
        (
            "GET",
            format!("/files?path=/etc/{token}"),
            vec![
                ("x-superserve-sandbox-id", sid.as_str()),
                ("x-access-token", token.as_str()),
            ],
        ),
        (
            "POST",
            format!("/sandboxes/{sid}/resume"),
            vec![("x-api-key", key.as_str())],
        ),
    ] {
        let body = json!({"command": "true"}).to_string().into_bytes();
        let (_, _, v) = a.call_with(method, &uri, &headers, Some(body)).await;
        bodies.push(v.to_string());
    }
    let (_, _, metrics) = a.call_with("GET", "/metrics", &[], None).await;
    let logs = String::from_utf8_lossy(&sink.0.lock().unwrap()).into_owned();
    assert!(!logs.is_empty(), "the capture saw no log line");
    for secret in [&key, &other, &wrong_key, &token, &wrong_token] {
        // A prefix long enough to be the secret, short enough to catch a truncation.
        let probe = &secret[..secret.len().min(24)];
        assert!(!logs.contains(probe), "a secret is in the logs:\n{logs}");
        assert!(
            !metrics.to_string().contains(probe),
            "a secret is in /metrics"
        );
        for b in &bodies {
            assert!(!b.contains(probe), "a secret is in an error: {b}");
        }
    }
}

#[tokio::test]
async fn the_network_log_pages_newest_first_with_filters_and_stays_in_its_team() {
    let a = api(Limits::UNLIMITED).await;
    let key = a.key("acme").await;
    let other = a.key("evil").await;
    a.ready_template("acme", "web").await;
    let (sid, _) = a.sandbox("acme", "web", &[], SandboxStatus::Active).await;
    // What `kiln egress-proxy --log` appends, one JSON line per connection.
    let dir = a.engine.layout().sandbox_dir(&sid).unwrap();
    std::fs::create_dir_all(&dir).unwrap();
    let mut lines = String::new();
    for i in 1..=5 {
        let verdict = if i % 2 == 0 { "blocked" } else { "allowed" };
        lines += &format!(
            "{}\n",
            json!({"id": i, "kind": "connection", "ts": format!("2026-11-29T10:00:0{i}Z"),
                   "host": "example.com", "verdict": verdict})
        );
    }
    lines += "not json\n";
    std::fs::write(dir.join("network.log"), lines).unwrap();

    let ids = |v: &Value| -> Vec<i64> {
        v["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["id"].as_i64().unwrap())
            .collect()
    };
    let uri = format!("/sandboxes/{sid}/network");
    let (s, v) = a
        .call("GET", &format!("{uri}?limit=2"), Some(&key), None)
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(ids(&v), [5, 4]);
    assert_eq!(
        (&v["has_more"], &v["next_cursor"]),
        (&json!(true), &json!("4"))
    );
    let (_, v) = a
        .call("GET", &format!("{uri}?limit=2&before=4"), Some(&key), None)
        .await;
    assert_eq!(ids(&v), [3, 2]);
    let (_, v) = a
        .call("GET", &format!("{uri}?verdict=blocked"), Some(&key), None)
        .await;
    assert_eq!(ids(&v), [4, 2]);
    assert_eq!(v["has_more"], json!(false));
    let (_, v) = a
        .call(
            "GET",
            &format!("{uri}?since=2026-11-29T10:00:04Z"),
            Some(&key),
            None,
        )
        .await;
    assert_eq!(ids(&v), [5, 4]);
    for bad in ["verdict=maybe", "before=x", "since=yesterday", "nope=1"] {
        let (s, v) = a
            .call("GET", &format!("{uri}?{bad}"), Some(&key), None)
            .await;
        assert_eq!(
            (s, error_code(&v)),
            (StatusCode::BAD_REQUEST, "invalid_request"),
            "{bad}"
        );
    }
    let (s, v) = a.call("GET", &uri, Some(&other), None).await;
    assert_eq!((s, error_code(&v)), (StatusCode::NOT_FOUND, "not_found"));
}

/// The data plane of a running sandbox, end to end through the router, on the fake
/// hypervisor (whose agent answers a command with its own text, and `exit N` with N).
#[tokio::test]
async fn a_running_sandbox_answers_commands_until_paused_and_after_resume() {
    let a = api(Limits::UNLIMITED).await;
    let key = a.key("acme").await;
    a.ready_template("acme", "web").await;
    let body = json!({"name": "s", "from_template": "web"})
        .to_string()
        .into_bytes();
    let (s, created) = a.call("POST", "/sandboxes", Some(&key), Some(body)).await;
    assert_eq!(s, StatusCode::CREATED, "{created}");
    assert_eq!(created["status"], "active");
    let id = created["id"].as_str().unwrap().to_owned();
    let token = created["access_token"].as_str().unwrap().to_owned();
    let exec = |token: String| {
        let a = &a;
        let id = id.clone();
        async move {
            let headers = [
                ("x-superserve-sandbox-id", id.as_str()),
                ("x-access-token", token.as_str()),
            ];
            let body = json!({"command": "exit 7"}).to_string().into_bytes();
            a.call_with("POST", "/exec", &headers, Some(body)).await
        }
    };
    let (s, _, out) = exec(token.clone()).await;
    assert_eq!(s, StatusCode::OK, "{out}");
    assert_eq!(
        out,
        json!({"stdout": "exit 7", "stderr": "", "exit_code": 7, "truncated": false})
    );
    let (s, _, body) = a
        .call_with(
            "POST",
            "/exec/stream",
            &[("x-superserve-sandbox-id", &id), ("x-access-token", &token)],
            Some(json!({"command": "echo hi"}).to_string().into_bytes()),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        sse_events(&body),
        [
            json!({"stdout": "echo hi"}),
            json!({"finished": true, "exit_code": 0})
        ]
    );

    let (s, _) = a
        .call("POST", &format!("/sandboxes/{id}/pause"), Some(&key), None)
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, _, v) = exec(token.clone()).await;
    assert_eq!(
        (s, error_code(&v)),
        (StatusCode::SERVICE_UNAVAILABLE, "sandbox_unavailable")
    );
    let (s, resumed) = a
        .call("POST", &format!("/sandboxes/{id}/resume"), Some(&key), None)
        .await;
    assert_eq!(s, StatusCode::OK, "{resumed}");
    let fresh = resumed["access_token"].as_str().unwrap().to_owned();
    assert_ne!(fresh, token);
    assert_eq!(
        exec(token).await.0,
        StatusCode::UNAUTHORIZED,
        "the old token rotated out"
    );
    assert_eq!(exec(fresh.clone()).await.2["exit_code"], 7);

    let (s, _) = a
        .call("DELETE", &format!("/sandboxes/{id}"), Some(&key), None)
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, _, v) = exec(fresh).await;
    assert_eq!((s, error_code(&v)), (StatusCode::NOT_FOUND, "not_found"));
    assert!(a.t.hypervisor.alive().is_empty(), "no VM left");
}

impl Api {
    async fn post_json(&self, key: &str, uri: &str, body: Value) -> (StatusCode, Value) {
        self.call("POST", uri, Some(key), Some(body.to_string().into_bytes()))
            .await
    }

    /// A sandbox of `template` created through the API (on the fake hypervisor); its id.
    async fn running(&self, key: &str, template: &str) -> String {
        let (s, v) = self
            .post_json(
                key,
                "/sandboxes",
                json!({"name": "s", "from_template": template}),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        v["id"].as_str().unwrap().to_owned()
    }
}

/// Every RFC 3339 time in `v` (at any depth) has at most six fractional digits: Python
/// 3.9 and 3.10's `fromisoformat`, which the official SDK parses times with, refuses more.
fn assert_micros(v: &Value, at: &str) {
    match v {
        Value::String(s) if kiln_api::time::parse(s).is_ok() => {
            let frac = s.split_once('.').map_or(0, |(_, f)| {
                f.chars().take_while(char::is_ascii_digit).count()
            });
            assert!(frac <= 6, "{at}: {s} has {frac} fractional digits");
        }
        Value::Array(items) => items
            .iter()
            .enumerate()
            .for_each(|(i, x)| assert_micros(x, &format!("{at}[{i}]"))),
        Value::Object(map) => map
            .iter()
            .for_each(|(k, x)| assert_micros(x, &format!("{at}.{k}"))),
        _ => {}
    }
}

#[tokio::test]
async fn snapshots_forks_and_their_refusals_through_the_api() {
    let limits = Limits {
        max_snapshots: 2,
        ..Limits::UNLIMITED
    };
    let a = api(limits).await;
    let key = a.key("acme").await;
    let other = a.key("evil").await;
    a.ready_template("acme", "web").await;
    let src = a.running(&key, "web").await;

    // What the SDK sends; 201 with the snapshot once it is ready.
    let body = json!({"kind": "mem+fs", "name": "before", "idempotency_key": "k1"});
    let (s, snap) = a
        .post_json(&key, &format!("/sandboxes/{src}/snapshot"), body.clone())
        .await;
    assert_eq!(s, StatusCode::CREATED, "{snap}");
    assert_eq!(
        (
            &snap["status"],
            &snap["sandbox_id"],
            &snap["kind"],
            &snap["name"]
        ),
        (
            &json!("ready"),
            &json!(src),
            &json!("mem+fs"),
            &json!("before")
        )
    );
    for field in ["template_id", "created_at", "ready_at", "size_bytes"] {
        assert!(!snap[field].is_null(), "{field} missing in {snap}");
    }
    assert_eq!(snap["resources"]["memory_mib"], 1024);
    let id = snap["id"].as_str().unwrap().to_owned();
    // The same key: 200 with the first snapshot.
    let (s, again) = a
        .post_json(&key, &format!("/sandboxes/{src}/snapshot"), body)
        .await;
    assert_eq!((s, &again["id"]), (StatusCode::OK, &snap["id"]));
    // An empty body is a default snapshot; the limit (2) then refuses a third.
    let (s, second) = a
        .call(
            "POST",
            &format!("/sandboxes/{src}/snapshot"),
            Some(&key),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{second}");
    let (s, v) = a
        .post_json(&key, &format!("/sandboxes/{src}/snapshot"), json!({}))
        .await;
    assert_eq!(
        (s, error_code(&v)),
        (StatusCode::TOO_MANY_REQUESTS, "too_many_snapshots")
    );

    // Listings, newest first, paged; the team's only.
    let (s, list) = a
        .call(
            "GET",
            &format!("/sandboxes/{src}/snapshots"),
            Some(&key),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(list[0]["id"], second["id"]);
    assert_eq!(list[1]["id"], snap["id"]);
    let (_, page) = a
        .call("GET", "/snapshots?limit=1&offset=1", Some(&key), None)
        .await;
    assert_eq!(page.as_array().unwrap().len(), 1);
    assert_eq!(page[0]["id"], snap["id"]);
    let (_, none) = a.call("GET", "/snapshots", Some(&other), None).await;
    assert_eq!(none, json!([]));
    for (method, uri) in [
        ("GET", format!("/snapshots/{id}")),
        ("DELETE", format!("/snapshots/{id}")),
        ("GET", format!("/sandboxes/{src}/snapshots")),
        ("POST", format!("/sandboxes/{src}/snapshot")),
        ("GET", "/snapshots/no-such-snapshot".to_owned()),
    ] {
        let (s, v) = a.call(method, &uri, Some(&other), None).await;
        assert_eq!(
            (s, error_code(&v)),
            (StatusCode::NOT_FOUND, "not_found"),
            "{method} {uri}"
        );
    }
    let (s, v) = a
        .call("GET", "/snapshots?status=ready", Some(&key), None)
        .await;
    assert_eq!(
        (s, error_code(&v)),
        (StatusCode::BAD_REQUEST, "invalid_request")
    );

    // Rename answers the renamed snapshot.
    let (s, renamed) = a
        .call(
            "PATCH",
            &format!("/snapshots/{id}"),
            Some(&key),
            Some(json!({"name": "renamed"}).to_string().into_bytes()),
        )
        .await;
    assert_eq!((s, &renamed["name"]), (StatusCode::OK, &json!("renamed")));
    let (s, v) = a
        .call(
            "PATCH",
            &format!("/snapshots/{id}"),
            Some(&key),
            Some(json!({"name": ""}).to_string().into_bytes()),
        )
        .await;
    assert_eq!(
        (s, error_code(&v)),
        (StatusCode::BAD_REQUEST, "invalid_request")
    );

    // A fork: where it came from is in its info; another team cannot fork it.
    let (s, fork) = a
        .post_json(
            &key,
            "/sandboxes",
            json!({"name": "fork", "from_snapshot": id}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{fork}");
    assert_eq!(fork["source_snapshot_id"], json!(id));
    assert_eq!(fork["status"], "active");
    let (s, v) = a
        .post_json(
            &other,
            "/sandboxes",
            json!({"name": "f", "from_snapshot": id}),
        )
        .await;
    assert_eq!((s, error_code(&v)), (StatusCode::NOT_FOUND, "not_found"));

    // The source killed: GET is 404, a snapshot of it too; its snapshots are still listed.
    let (s, _) = a
        .call("DELETE", &format!("/sandboxes/{src}"), Some(&key), None)
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, v) = a
        .call("GET", &format!("/sandboxes/{src}"), Some(&key), None)
        .await;
    assert_eq!((s, error_code(&v)), (StatusCode::NOT_FOUND, "not_found"));
    let (s, v) = a
        .post_json(&key, &format!("/sandboxes/{src}/snapshot"), json!({}))
        .await;
    assert_eq!((s, error_code(&v)), (StatusCode::NOT_FOUND, "not_found"));
    let (s, list) = a
        .call(
            "GET",
            &format!("/sandboxes/{src}/snapshots"),
            Some(&key),
            None,
        )
        .await;
    assert_eq!((s, list.as_array().unwrap().len()), (StatusCode::OK, 2));
    // The template is kept while snapshots lie over it.
    let (s, v) = a.call("DELETE", "/templates/web", Some(&key), None).await;
    assert_eq!(
        (s, error_code(&v)),
        (StatusCode::CONFLICT, "conflict"),
        "{v}"
    );

    // Delete: 204, then gone (and deleting again is a 404 the SDK treats as done).
    let (s, _) = a
        .call("DELETE", &format!("/snapshots/{id}"), Some(&key), None)
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, v) = a
        .call("GET", &format!("/snapshots/{id}"), Some(&key), None)
        .await;
    assert_eq!((s, error_code(&v)), (StatusCode::NOT_FOUND, "not_found"));
    let (s, _) = a
        .call("DELETE", &format!("/snapshots/{id}"), Some(&key), None)
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn pause_resume_conflicts_timers_and_network_while_paused() {
    let a = api(Limits::UNLIMITED).await;
    let key = a.key("acme").await;
    a.ready_template("acme", "web").await;
    let (s, created) = a
        .post_json(
            &key,
            "/sandboxes",
            json!({"name": "t", "from_template": "web", "timeout_seconds": 3600, "auto_delete_seconds": 60}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{created}");
    assert_eq!(
        (
            &created["timeout_seconds"],
            &created["auto_delete_seconds"],
            &created["auto_delete_at"]
        ),
        (&json!(3600), &json!(60), &Value::Null)
    );
    let id = created["id"].as_str().unwrap().to_owned();
    let uri = format!("/sandboxes/{id}");
    let (s, v) = a
        .call("POST", &format!("{uri}/resume"), Some(&key), None)
        .await;
    assert_eq!(
        (s, error_code(&v)),
        (StatusCode::CONFLICT, "conflict"),
        "resume of a running one"
    );
    let (s, _) = a
        .call("POST", &format!("{uri}/pause"), Some(&key), None)
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, v) = a
        .call("POST", &format!("{uri}/pause"), Some(&key), None)
        .await;
    assert_eq!(
        (s, error_code(&v)),
        (StatusCode::CONFLICT, "conflict"),
        "pause of a paused one"
    );
    let (_, paused) = a.call("GET", &uri, Some(&key), None).await;
    assert!(paused["auto_delete_at"].is_string(), "{paused}");

    // PATCH on the paused sandbox: egress rules (in force from the resume) and timers.
    let rules = json!({"allow_out": [], "deny_out": ["0.0.0.0/0"]});
    let (s, v) = a
        .call(
            "PATCH",
            &uri,
            Some(&key),
            Some(
                json!({"network": rules, "auto_delete_seconds": null, "timeout_seconds": 5})
                    .to_string()
                    .into_bytes(),
            ),
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{v}");
    let (_, got) = a.call("GET", &uri, Some(&key), None).await;
    assert_eq!(got["network"], rules);
    assert_eq!(
        (
            &got["timeout_seconds"],
            &got["auto_delete_seconds"],
            &got["auto_delete_at"]
        ),
        (&json!(5), &Value::Null, &Value::Null)
    );
    let (s, _) = a
        .call("POST", &format!("{uri}/resume"), Some(&key), None)
        .await;
    assert_eq!(s, StatusCode::OK);
    let (_, got) = a.call("GET", &uri, Some(&key), None).await;
    assert_eq!(got["network"], rules);
    for bad in [
        json!({"timeout_seconds": 0}),
        json!({"auto_delete_seconds": 2_592_001}),
    ] {
        let (s, v) = a
            .call(
                "PATCH",
                &uri,
                Some(&key),
                Some(bad.to_string().into_bytes()),
            )
            .await;
        assert_eq!(
            (s, error_code(&v)),
            (StatusCode::BAD_REQUEST, "invalid_request"),
            "{bad}"
        );
    }
}

#[tokio::test]
async fn system_templates_are_listed_for_every_team_and_theirs_alone() {
    let a = api(Limits::UNLIMITED).await;
    let key = a.key("acme").await;
    a.t.ready_system_template("superserve/base").await.unwrap();
    let (_, list) = a.call("GET", "/templates", Some(&key), None).await;
    assert_eq!(list[0]["name"], "superserve/base");
    // The official SDKs put the name in the path unescaped.
    for uri in ["/templates/superserve/base", "/templates/superserve%2Fbase"] {
        let (s, t) = a.call("GET", uri, Some(&key), None).await;
        assert_eq!((s, &t["id"]), (StatusCode::OK, &list[0]["id"]), "{uri}");
    }
    let (s, builds) = a
        .call(
            "GET",
            "/templates/superserve/base/builds?limit=5",
            Some(&key),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{builds}");
    let (s, v) = a
        .call("DELETE", "/templates/superserve%2Fbase", Some(&key), None)
        .await;
    assert_eq!(
        (s, error_code(&v)),
        (StatusCode::CONFLICT, "conflict"),
        "{v}"
    );
    let (s, v) = a.create(&key, "superserve/mine").await;
    assert_eq!(
        (s, error_code(&v)),
        (StatusCode::BAD_REQUEST, "invalid_request"),
        "{v}"
    );
    // A sandbox without a template starts from it.
    let (s, created) = a
        .post_json(&key, "/sandboxes", json!({"name": "quickstart"}))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{created}");
    assert_eq!(created["template_id"], list[0]["id"]);
}

#[tokio::test]
async fn every_time_the_api_writes_has_at_most_six_fractional_digits() {
    let a = api(Limits::UNLIMITED).await;
    let key = a.key("acme").await;
    a.ready_template("acme", "web").await;
    let (_, queued) = a.create(&key, "queued").await;
    let id = a.running(&key, "web").await;
    let (s, snap) = a
        .post_json(&key, &format!("/sandboxes/{id}/snapshot"), json!({}))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{snap}");
    let (s, _) = a
        .call(
            "PATCH",
            &format!("/sandboxes/{id}"),
            Some(&key),
            Some(json!({"auto_delete_seconds": 600}).to_string().into_bytes()),
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    a.call("POST", &format!("/sandboxes/{id}/pause"), Some(&key), None)
        .await;
    // A network log line with nine digits, as any writer could leave one.
    let dir = a.engine.layout().sandbox_dir(&id).unwrap();
    std::fs::write(
        dir.join("network.log"),
        format!(
            "{}\n",
            json!({"id": 1, "kind": "connection", "ts": "2026-11-29T10:00:01.123456789Z", "verdict": "allowed"})
        ),
    )
    .unwrap();
    let tid = queued["id"].as_str().unwrap();
    let bid = queued["build_id"].as_str().unwrap();
    a.engine
        .cancel_build(&a.t.team("acme").await.unwrap(), bid)
        .await
        .unwrap();
    for uri in [
        "/templates".to_owned(),
        format!("/templates/{tid}"),
        format!("/templates/{tid}/builds"),
        format!("/templates/{tid}/builds/{bid}"),
        format!("/templates/{tid}/builds/{bid}/logs"),
        "/sandboxes".to_owned(),
        format!("/sandboxes/{id}"),
        format!("/sandboxes/{id}/snapshots"),
        format!("/sandboxes/{id}/network"),
        "/snapshots".to_owned(),
        format!("/snapshots/{}", snap["id"].as_str().unwrap()),
    ] {
        let (s, v) = a.call("GET", &uri, Some(&key), None).await;
        assert_eq!(s, StatusCode::OK, "{uri}: {v}");
        let events = match &v {
            Value::String(_) => Value::Array(sse_events(&v)),
            other => other.clone(),
        };
        assert_micros(&events, &uri);
    }
    let (_, up) = a
        .call("POST", &format!("/sandboxes/{id}/resume"), Some(&key), None)
        .await;
    assert_micros(&up, "resume");
    let (_, net) = a
        .call(
            "GET",
            &format!("/sandboxes/{id}/network?before=2026-11-29T10:00:02Z"),
            Some(&key),
            None,
        )
        .await;
    assert_eq!(net["data"][0]["ts"], "2026-11-29T10:00:01.123456+00:00");
}

/// kiln's terminal sessions: a start frame with `pty` runs the command on a terminal, a
/// browser names the sandbox and its token in subprotocols (it cannot set headers), and
/// the other exec routes refuse a terminal.
#[tokio::test]
async fn terminal_sessions_over_the_websocket() {
    use futures::{SinkExt as _, StreamExt as _};
    use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
    use tokio_tungstenite::tungstenite::Message;

    let a = api(Limits::UNLIMITED).await;
    let key = a.key("acme").await;
    a.ready_template("acme", "web").await;
    let body = json!({"name": "s", "from_template": "web"})
        .to_string()
        .into_bytes();
    let (_, created) = a.call("POST", "/sandboxes", Some(&key), Some(body)).await;
    let id = created["id"].as_str().unwrap().to_owned();
    let token = created["access_token"].as_str().unwrap().to_owned();

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    // The accept loop `kiln serve` runs: upgrades must pass through it.
    let server = tokio::spawn(kiln_server::serve(
        listener,
        a.app.clone(),
        kiln_server::ServeConfig::default(),
        std::future::pending(),
    ));

    let mut req = format!("ws://{addr}/exec/connect")
        .into_client_request()
        .unwrap();
    req.headers_mut().insert(
        "sec-websocket-protocol",
        format!("superserve.exec.v1, sandbox.{id}, token.{token}")
            .parse()
            .unwrap(),
    );
    let (mut ws, resp) = tokio_tungstenite::connect_async(req).await.unwrap();
    // Only the session's own subprotocol is echoed: never the token.
    assert_eq!(
        resp.headers()["sec-websocket-protocol"],
        "superserve.exec.v1"
    );
    let start = json!({"command": "exit 3", "pty": {"cols": 100, "rows": 30}});
    ws.send(Message::Text(start.to_string().into()))
        .await
        .unwrap();
    ws.send(Message::Text(
        json!({"type": "resize", "cols": 120, "rows": 40})
            .to_string()
            .into(),
    ))
    .await
    .unwrap();
    let mut stdout = Vec::new();
    let mut last = Value::Null;
    while let Some(Ok(m)) = ws.next().await {
        match m {
            Message::Binary(b) if b.first() == Some(&1) => stdout.extend_from_slice(&b[1..]),
            Message::Text(t) => last = serde_json::from_str(t.as_str()).unwrap(),
            Message::Close(_) => break,
            _ => {}
        }
    }
    // The fake agent echoes the command; the exit code comes back as from a real one.
    assert_eq!(stdout, b"exit 3");
    assert_eq!(last, json!({"finished": true, "exit_code": 3}));

    // A bad size is refused in the session, with the reason.
    let mut req = format!("ws://{addr}/exec/connect")
        .into_client_request()
        .unwrap();
    req.headers_mut().insert(
        "sec-websocket-protocol",
        format!("superserve.exec.v1, sandbox.{id}, token.{token}")
            .parse()
            .unwrap(),
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    let start = json!({"command": "sh", "pty": {"cols": 0, "rows": 30}});
    ws.send(Message::Text(start.to_string().into()))
        .await
        .unwrap();
    match ws.next().await {
        Some(Ok(Message::Text(t))) => {
            let v: Value = serde_json::from_str(t.as_str()).unwrap();
            assert!(v["error"].as_str().unwrap().contains("pty:"), "{v}");
        }
        other => panic!("{other:?}"),
    }

    // `/exec` and `/exec/stream` have no terminal.
    for route in ["/exec", "/exec/stream"] {
        let (s, _, v) = a
            .call_with(
                "POST",
                route,
                &[("x-superserve-sandbox-id", &id), ("x-access-token", &token)],
                Some(
                    json!({"command": "sh", "pty": {"cols": 80, "rows": 24}})
                        .to_string()
                        .into_bytes(),
                ),
            )
            .await;
        assert_eq!(
            (s, error_code(&v)),
            (StatusCode::BAD_REQUEST, "invalid_request"),
            "{route}"
        );
    }
    server.abort();
}

/// The console is static and locked down: its page and files carry the Content-Security
/// Policy; unknown files are a 404 in the API's shape; `/validate` words problems as
/// `kiln validate` does and needs a key like every other call.
#[tokio::test]
async fn the_console_and_spec_validation() {
    let a = api(Limits::UNLIMITED).await;
    for path in [
        "/console",
        "/console/app.js",
        "/console/xterm.js",
        "/console/app.css",
    ] {
        let (s, headers, _) = a.call_with("GET", path, &[], None).await;
        assert_eq!(s, StatusCode::OK, "{path}");
        let csp = headers["content-security-policy"].to_str().unwrap();
        assert!(csp.contains("script-src 'self';"), "{path}: {csp}");
        assert!(csp.contains("frame-ancestors 'none'"), "{path}: {csp}");
        assert_eq!(headers["x-content-type-options"], "nosniff");
    }
    let (s, _, v) = a.call_with("GET", "/console/nope.js", &[], None).await;
    assert_eq!((s, error_code(&v)), (StatusCode::NOT_FOUND, "not_found"));

    let body = json!({"name": "x", "build_spec": {"from": ""}}).to_string();
    let (s, v) = a
        .call("POST", "/validate", None, Some(body.clone().into_bytes()))
        .await;
    assert_eq!(
        (s, error_code(&v)),
        (StatusCode::UNAUTHORIZED, "unauthorized")
    );
    let key = a.key("acme").await;
    let (s, v) = a
        .call("POST", "/validate", Some(&key), Some(body.into_bytes()))
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["valid"], false);
    assert!(
        v["problems"][0]
            .as_str()
            .unwrap()
            .starts_with("build_spec.from: "),
        "{v}"
    );
    let good = json!({"name": "x", "build_spec": {"from": "python:3.11"}}).to_string();
    let (_, v) = a
        .call("POST", "/validate", Some(&key), Some(good.into_bytes()))
        .await;
    assert_eq!(
        (v["valid"].as_bool(), v["problems"].as_array().map(Vec::len)),
        (Some(true), Some(0))
    );
}

#[tokio::test(flavor = "current_thread")]
async fn team_secrets_bind_to_sandboxes_and_their_values_never_come_back() {
    // Every log line, as in `secrets_stay_out_of_logs_errors_and_metrics`.
    let sink = Captured::default();
    let writer = sink.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let a = api(Limits::UNLIMITED).await;
    let key = a.key("acme").await;
    let evil = a.key("evil").await;
    a.ready_template("acme", "web").await;
    let value = "sk-live-ROUTER-TEST-VALUE-000111222333";
    let body = |v: Value| Some(v.to_string().into_bytes());

    let (s, providers) = a.call("GET", "/providers", Some(&key), None).await;
    assert_eq!(s, StatusCode::OK);
    let names: Vec<&str> = providers
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["openai", "anthropic", "github"]);

    let (s, created) = a
        .call(
            "POST",
            "/secrets",
            Some(&key),
            body(json!({"name": "anthropic-prod", "value": value, "provider": "anthropic"})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{created}");
    assert_eq!(created["auth_type"], "api-key");
    assert_eq!(created["auth_config"], json!({"header": "x-api-key"}));
    assert_eq!(created["hosts"], json!(["api.anthropic.com"]));
    assert_eq!(created["provider_shortcut"], "anthropic");
    let (s, custom) = a
        .call(
            "POST",
            "/secrets",
            Some(&key),
            body(json!({"name": "internal", "value": value,
                        "auth": {"type": "basic", "username": "svc"}, "hosts": ["*.corp.example"]})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{custom}");
    for (bad, code) in [
        (
            json!({"name": "anthropic-prod", "value": "x", "provider": "openai"}),
            "conflict",
        ),
        (
            json!({"name": "n", "value": "x", "provider": "nope"}),
            "invalid_request",
        ),
        (json!({"name": "n", "value": "x"}), "invalid_request"),
        (
            json!({"name": "n", "value": "x", "auth": {"type": "bearer"}, "hosts": ["a b"]}),
            "invalid_request",
        ),
        (
            json!({"name": "n", "value": "x", "provider": "openai", "extra": 1}),
            "invalid_request",
        ),
    ] {
        let (s, v) = a
            .call("POST", "/secrets", Some(&key), body(bad.clone()))
            .await;
        assert_eq!(error_code(&v), code, "{bad} -> {s} {v}");
    }
    let (_, list) = a.call("GET", "/secrets", Some(&key), None).await;
    assert_eq!(list.as_array().unwrap().len(), 2);
    let (s, _) = a
        .call("GET", "/secrets/anthropic-prod", Some(&evil), None)
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "another team's secret");
    let (_, theirs) = a.call("GET", "/secrets", Some(&evil), None).await;
    assert_eq!(theirs, json!([]));

    // A sandbox with the secret bound at create, another bound later.
    let (s, up) = a
        .call(
            "POST",
            "/sandboxes",
            Some(&key),
            body(json!({"name": "box", "from_template": "web",
                        "secrets": {"ANTHROPIC_API_KEY": "anthropic-prod"}})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{up}");
    let id = up["id"].as_str().unwrap().to_owned();
    assert_eq!(
        up["secrets"],
        json!([{"env_key": "ANTHROPIC_API_KEY", "secret_name": "anthropic-prod"}])
    );
    let (s, v) = a
        .call(
            "POST",
            "/sandboxes",
            Some(&key),
            body(json!({"name": "x", "from_template": "web", "secrets": {"K": "missing"}})),
        )
        .await;
    assert_eq!((s, error_code(&v)), (StatusCode::NOT_FOUND, "not_found"));
    let attach = |env: &str, secret: &str| body(json!({"env_key": env, "secret_name": secret}));
    let uri = format!("/sandboxes/{id}/secrets");
    let (s, _) = a
        .call("POST", &uri, Some(&key), attach("CORP", "internal"))
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, v) = a
        .call("POST", &uri, Some(&key), attach("CORP", "internal"))
        .await;
    assert_eq!((s, error_code(&v)), (StatusCode::CONFLICT, "conflict"));
    let (s, v) = a
        .call("POST", &uri, Some(&key), attach("1BAD", "internal"))
        .await;
    assert_eq!(
        (s, error_code(&v)),
        (StatusCode::BAD_REQUEST, "invalid_request")
    );
    let (s, _) = a
        .call("POST", &uri, Some(&evil), attach("X", "internal"))
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "another team's sandbox");
    let (_, bound) = a
        .call("GET", "/secrets/internal/sandboxes", Some(&key), None)
        .await;
    assert_eq!(
        bound,
        json!([{"sandbox_id": id, "sandbox_name": "box", "env_key": "CORP", "status": "active"}])
    );
    let (s, _) = a
        .call("DELETE", &format!("{uri}/CORP"), Some(&key), None)
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, _) = a
        .call("DELETE", &format!("{uri}/CORP"), Some(&key), None)
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    // Rotate, audit (empty: no request went out), delete: the binding is revoked.
    let (s, rotated) = a
        .call(
            "PATCH",
            "/secrets/anthropic-prod",
            Some(&key),
            body(json!({"value": format!("{value}-2")})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{rotated}");
    let (s, audit) = a
        .call(
            "GET",
            "/secrets/anthropic-prod/audit?limit=5&status=4xx",
            Some(&key),
            None,
        )
        .await;
    assert_eq!((s, audit), (StatusCode::OK, json!([])));
    let (s, v) = a
        .call(
            "GET",
            "/secrets/anthropic-prod/audit?status=teapot",
            Some(&key),
            None,
        )
        .await;
    assert_eq!(
        (s, error_code(&v)),
        (StatusCode::BAD_REQUEST, "invalid_request")
    );
    let (s, _) = a
        .call("DELETE", "/secrets/anthropic-prod", Some(&key), None)
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, _) = a
        .call("DELETE", "/secrets/anthropic-prod", Some(&key), None)
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (_, info) = a
        .call("GET", &format!("/sandboxes/{id}"), Some(&key), None)
        .await;
    assert_eq!(
        info["secrets"],
        json!([{"env_key": "ANTHROPIC_API_KEY", "secret_name": "anthropic-prod", "revoked": true}])
    );

    // No answer, log line or metric carries the value.
    let (_, _, metrics) = a.call_with("GET", "/metrics", &[], None).await;
    let logs = String::from_utf8_lossy(&sink.0.lock().unwrap()).into_owned();
    for text in [
        logs,
        metrics.to_string(),
        created.to_string(),
        custom.to_string(),
        rotated.to_string(),
        info.to_string(),
    ] {
        assert!(!text.contains("sk-live-ROUTER"), "the value is out: {text}");
    }
}
