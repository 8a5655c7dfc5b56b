//! Router tests: each endpoint's success and error paths, team walls and limits under
//! concurrency, through `tower::ServiceExt::oneshot` (no VM is booted: builds here fail
//! early, which is all these tests need).

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt as _;
use kiln_engine::{Engine, EngineConfig};
use kiln_server::{router, AppState};
use kiln_store::Limits;
use serde_json::{json, Value};
use tower::ServiceExt as _;

struct Api {
    app: axum::Router,
    engine: Arc<Engine>,
    _dir: tempfile::TempDir,
}

async fn api(limits: Limits) -> Api {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = EngineConfig::new(dir.path());
    cfg.limits = limits;
    let engine = Engine::open(cfg).await.unwrap();
    let app = router(AppState {
        engine: engine.clone(),
    });
    Api {
        app,
        engine,
        _dir: dir,
    }
}

impl Api {
    async fn key(&self, team: &str) -> String {
        self.engine.store().create_api_key(team).await.unwrap().1
    }

    async fn call(
        &self,
        method: &str,
        uri: &str,
        key: Option<&str>,
        body: Option<Vec<u8>>,
    ) -> (StatusCode, Value) {
        let mut req = Request::builder().method(method).uri(uri);
        if let Some(key) = key {
            req = req.header("x-api-key", key);
        }
        let req = req
            .header("content-type", "application/json")
            .body(Body::from(body.unwrap_or_default()))
            .unwrap();
        let resp = self.app.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or(Value::String(String::from_utf8_lossy(&bytes).into_owned()))
        };
        (status, value)
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
    let (s, _) = a.call("POST", "/templates", Some(&key), Some(huge)).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
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
