//! The retry policy against a tiny local server: GET and DELETE are retried on
//! 429/502/503/504 and connection errors (3 attempts, backoff, `Retry-After`); POST and
//! PATCH never are.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, patch, post};
use axum::{Json, Router};
use kiln_sdk::{Client, Error, RetryPolicy, Sandbox, Template, TemplateCreateOptions};
use serde_json::json;

/// Serves `app` on a free local port; returns its base URL.
async fn serve(app: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}")
}

fn error(status: StatusCode, code: &str) -> Response {
    (
        status,
        Json(json!({"error": {"code": code, "message": format!("{code} (test)")}})),
    )
        .into_response()
}

fn template_json() -> serde_json::Value {
    json!({
        "id": "7d0c6f0e-0000-4000-8000-000000000001", "name": "web", "team_id": "t",
        "status": "ready", "vcpu": 1, "memory_mib": 256, "disk_mib": 1024,
        "size_bytes": 1, "error_message": null, "created_at": "2025-01-01T00:00:00Z",
        "built_at": "2025-01-01T00:00:00Z", "latest_build_id": "b1",
    })
}

/// A route answering `statuses[n]` to its n-th call (the last one after that), counting
/// calls; a success is `ok`.
fn scripted(
    statuses: &'static [u16],
    ok: serde_json::Value,
    calls: Arc<AtomicUsize>,
) -> impl Fn() -> std::future::Ready<Response> + Clone + Send + 'static {
    move || {
        let n = calls.fetch_add(1, Ordering::SeqCst);
        let s = statuses[n.min(statuses.len() - 1)];
        let resp = match s {
            200 => Json(ok.clone()).into_response(),
            204 => StatusCode::NO_CONTENT.into_response(),
            s => error(StatusCode::from_u16(s).unwrap(), "flaky"),
        };
        std::future::ready(resp)
    }
}

fn client(base: &str) -> Client {
    Client::new(base, "test-key").unwrap()
}

// The paused clock moves only when every task waits on a timer: the exchanges with the
// local server take no time on it, so what a test measures is the client's own waits.
#[tokio::test(start_paused = true)]
async fn get_is_retried_on_503_then_succeeds_with_backoff() {
    let calls = Arc::new(AtomicUsize::new(0));
    let app = Router::new().route(
        "/templates",
        get(scripted(
            &[503, 502, 200],
            json!([template_json()]),
            calls.clone(),
        )),
    );
    let c = client(&serve(app).await);
    let started = tokio::time::Instant::now();
    let list = Template::list(&c, None).await.unwrap();
    let took = started.elapsed();
    assert_eq!(list.len(), 1);
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    // 100 ms then 200 ms, each with at most 20% jitter off (timers round up to the ms).
    assert!(took >= Duration::from_millis(240), "{took:?}");
    assert!(took <= Duration::from_millis(362), "{took:?}");
}

#[tokio::test]
async fn get_gives_up_after_three_attempts() {
    let calls = Arc::new(AtomicUsize::new(0));
    let app = Router::new().route(
        "/templates/{t}",
        get(scripted(&[504], json!({}), calls.clone())),
    );
    let c = client(&serve(app).await);
    let err = Template::connect(&c, "web").await.unwrap_err();
    assert!(
        matches!(&err, Error::Server { status: 504, code, .. } if code == "flaky"),
        "{err:?}"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn get_is_not_retried_on_a_client_error() {
    let calls = Arc::new(AtomicUsize::new(0));
    let app = Router::new().route(
        "/templates/{t}",
        get(scripted(&[404], json!({}), calls.clone())),
    );
    let c = client(&serve(app).await);
    let err = Template::connect(&c, "web").await.unwrap_err();
    assert!(matches!(&err, Error::NotFound { .. }), "{err:?}");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn post_is_not_retried() {
    let calls = Arc::new(AtomicUsize::new(0));
    let app = Router::new().route(
        "/templates",
        post(scripted(&[503, 200], json!({}), calls.clone())),
    );
    let c = client(&serve(app).await);
    let err = Template::create(&c, TemplateCreateOptions::new("web", "python:3.11"))
        .await
        .unwrap_err();
    assert!(matches!(&err, Error::Server { status: 503, .. }), "{err:?}");
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    // Nor on 429 with a Retry-After.
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let app = Router::new().route(
        "/templates",
        post(move || {
            counted.fetch_add(1, Ordering::SeqCst);
            let mut r = error(StatusCode::TOO_MANY_REQUESTS, "rate_limited");
            r.headers_mut().insert("retry-after", "1".parse().unwrap());
            std::future::ready(r)
        }),
    );
    let c = client(&serve(app).await);
    let err = Template::create(&c, TemplateCreateOptions::new("web", "python:3.11"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::RateLimit { code, retry_after: Some(d), .. }
            if code == "rate_limited" && *d == Duration::from_secs(1)),
        "{err:?}"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn patch_is_not_retried() {
    let calls = Arc::new(AtomicUsize::new(0));
    let sandbox_calls = Arc::new(AtomicUsize::new(0));
    let app = Router::new()
        .route(
            "/sandboxes/{id}/activate",
            post(scripted(&[200], sandbox_json("tok"), sandbox_calls)),
        )
        .route(
            "/sandboxes/{id}",
            patch(scripted(&[502, 204], json!({}), calls.clone())),
        );
    let c = client(&serve(app).await);
    let sb = Sandbox::connect(&c, SANDBOX_ID).await.unwrap();
    let err = sb
        .update([("k".into(), "v".into())].into())
        .await
        .unwrap_err();
    assert!(matches!(&err, Error::Server { status: 502, .. }), "{err:?}");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn delete_is_retried() {
    let calls = Arc::new(AtomicUsize::new(0));
    let app = Router::new().route(
        "/templates/{t}",
        delete(scripted(&[502, 204], json!({}), calls.clone())),
    );
    let c = client(&serve(app).await);
    Template::delete_by_id(&c, "web").await.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn retry_after_is_honoured() {
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let app = Router::new().route(
        "/templates",
        get(move || {
            let n = counted.fetch_add(1, Ordering::SeqCst);
            let r = if n == 0 {
                let mut r = error(StatusCode::TOO_MANY_REQUESTS, "rate_limited");
                r.headers_mut().insert("retry-after", "1".parse().unwrap());
                r
            } else {
                Json(json!([])).into_response()
            };
            std::future::ready(r)
        }),
    );
    let c = client(&serve(app).await);
    let started = tokio::time::Instant::now();
    Template::list(&c, None).await.unwrap();
    let took = started.elapsed();
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    // The server's second, not the policy's 100 ms backoff (on the paused clock).
    assert!(took >= Duration::from_secs(1), "{took:?}");
    assert!(took <= Duration::from_millis(1001), "{took:?}");
}

/// A server that accepts connections and drops them unanswered, counting them.
fn dropping_server() -> (String, Arc<AtomicUsize>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let counted = count.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { break };
            counted.fetch_add(1, Ordering::SeqCst);
            // Read the request, then hang up without answering.
            let mut buf = [0u8; 4096];
            let _ = std::io::Read::read(&mut conn, &mut buf);
            drop(conn);
        }
    });
    (format!("http://{addr}"), count)
}

#[tokio::test]
async fn connection_errors_are_retried_for_get_only() {
    let (base, count) = dropping_server();
    let c = client(&base);
    let err = Template::list(&c, None).await.unwrap_err();
    assert!(matches!(&err, Error::Network { .. }), "{err:?}");
    assert_eq!(count.load(Ordering::SeqCst), 3);

    let (base, count) = dropping_server();
    let c = client(&base);
    let err = Template::create(&c, TemplateCreateOptions::new("web", "python:3.11"))
        .await
        .unwrap_err();
    assert!(matches!(&err, Error::Network { .. }), "{err:?}");
    assert_eq!(count.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_refused_connection_is_a_network_error() {
    // A port nobody listens on (bound, then released).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let c = client(&format!("http://127.0.0.1:{port}"));
    let err = Template::list(&c, None).await.unwrap_err();
    assert!(matches!(&err, Error::Network { .. }), "{err:?}");
    assert_eq!(err.code(), "network");
}

#[tokio::test]
async fn the_policy_is_configurable_and_kill_waits_out_a_conflict() {
    let calls = Arc::new(AtomicUsize::new(0));
    let app = Router::new().route(
        "/sandboxes/{id}",
        delete(scripted(
            &[409, 409, 409, 409, 204],
            json!({}),
            calls.clone(),
        )),
    );
    let base = serve(app).await;
    let c = Client::builder()
        .base_url(&base)
        .api_key("k")
        .retry_policy(RetryPolicy {
            max_attempts: 3,
            initial_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(5),
        })
        .build()
        .unwrap();
    // A transition in progress (409) clears by itself: kill retries it past 3 attempts.
    Sandbox::kill_by_id(&c, SANDBOX_ID).await.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 5);

    // One attempt only.
    let calls = Arc::new(AtomicUsize::new(0));
    let app = Router::new().route(
        "/templates",
        get(scripted(&[503, 200], json!([]), calls.clone())),
    );
    let c = Client::builder()
        .base_url(serve(app).await)
        .api_key("k")
        .retry_policy(RetryPolicy {
            max_attempts: 1,
            ..RetryPolicy::default()
        })
        .build()
        .unwrap();
    assert!(Template::list(&c, None).await.is_err());
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn the_api_key_is_sent() {
    let app = Router::new().route(
        "/templates",
        get(|headers: HeaderMap| async move {
            if headers.get("x-api-key").and_then(|v| v.to_str().ok()) == Some("test-key") {
                Json(json!([])).into_response()
            } else {
                error(StatusCode::UNAUTHORIZED, "unauthorized")
            }
        }),
    );
    let base = serve(app).await;
    Template::list(&client(&base), None).await.unwrap();
    let err = Template::list(&Client::new(&base, "wrong").unwrap(), None)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::Authentication { code, .. } if code == "unauthorized"),
        "{err:?}"
    );
}

const SANDBOX_ID: &str = "0b5e2c1a-0000-4000-8000-000000000002";

fn sandbox_json(token: &str) -> serde_json::Value {
    json!({
        "id": SANDBOX_ID, "name": "sb", "status": "active", "vcpu_count": 1,
        "memory_mib": 256, "created_at": "2025-01-01T00:00:00Z",
        "updated_at": "2025-01-01T00:00:00Z", "template_id": "t", "build_id": "b",
        "metadata": {}, "timeout_seconds": null, "auto_delete_seconds": null,
        "network": null, "preview_access": "legacy_public", "access_token": token,
    })
}
