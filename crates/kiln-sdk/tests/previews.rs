//! `sandbox.previews()` against a scripted stand-in for the API: the requests it sends,
//! the SDKs' port checks (refused before anything is sent), and the signed URL.

use std::sync::{Arc, Mutex};

use axum::extract::{Path, State};
use axum::http::Method;
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use kiln_sdk::{Client, Error, PortAccess, PreviewAccess, Previews};
use serde_json::{json, Value};

const ID: &str = "0b5e2c1a-0000-4000-8000-000000000002";

/// `(method, path, body)` of every request.
type Seen = Arc<Mutex<Vec<(String, String, Value)>>>;

fn token(port: u16, version: u32) -> Value {
    json!({
        "token": format!("kpt_{version}_0_sig"), "port": port,
        "header": "x-kiln-preview-token", "query_param": "kiln_preview_token",
        "token_version": version, "access": "private", "preview_access": "private",
        "expires_at": null, "url": format!("http://{port}-{ID}.preview.localhost:8080"),
    })
}

fn record(seen: &Seen, m: &Method, path: String, body: Value) {
    seen.lock().unwrap().push((m.to_string(), path, body));
}

async fn mock() -> (Client, Seen) {
    let seen: Seen = Arc::default();
    let app = Router::new()
        .route(
            "/sandboxes/{id}/preview-ports",
            get(|State(s): State<Seen>, Path(id): Path<String>| async move {
                record(&s, &Method::GET, format!("/sandboxes/{id}/preview-ports"), Value::Null);
                Json(json!({"preview_access": "private", "ports": [
                    {"port": 3000, "token_version": 1, "access": "private",
                     "url": format!("http://3000-{ID}.preview.localhost:8080")}
                ]}))
            })
            .post(
                |State(s): State<Seen>, Path(id): Path<String>, Json(body): Json<Value>| async move {
                    record(&s, &Method::POST, format!("/sandboxes/{id}/preview-ports"), body.clone());
                    Json(json!({"port": body["port"], "token_version": 1,
                                "access": body.get("access").cloned().unwrap_or(json!("public"))}))
                },
            ),
        )
        .route(
            "/sandboxes/{id}/preview-ports/{port}",
            delete(|State(s): State<Seen>, Path((id, port)): Path<(String, u16)>| async move {
                record(&s, &Method::DELETE, format!("/sandboxes/{id}/preview-ports/{port}"), Value::Null);
                axum::http::StatusCode::NO_CONTENT
            }),
        )
        .route(
            "/sandboxes/{id}/preview-ports/{port}/token",
            post(
                |State(s): State<Seen>, Path((id, port)): Path<(String, u16)>, Json(body): Json<Value>| async move {
                    record(&s, &Method::POST, format!("/sandboxes/{id}/preview-ports/{port}/token"), body);
                    Json(token(port, 1))
                },
            ),
        )
        .route(
            "/sandboxes/{id}/preview-ports/{port}/token/rotate",
            post(|State(s): State<Seen>, Path((id, port)): Path<(String, u16)>| async move {
                record(&s, &Method::POST, format!("/sandboxes/{id}/preview-ports/{port}/token/rotate"), Value::Null);
                Json(token(port, 2))
            }),
        )
        .with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (
        Client::new(format!("http://{addr}"), "kiln_test").unwrap(),
        seen,
    )
}

#[tokio::test]
async fn previews_send_what_the_api_expects() {
    let (client, seen) = mock().await;
    let p = Previews::of(&client, ID);

    let list = p.list().await.unwrap();
    assert_eq!(list.preview_access, PreviewAccess::Private);
    assert_eq!(list.ports[0].port, 3000);
    let port = p.publish(3000, Some(PortAccess::Private)).await.unwrap();
    assert_eq!(port.access, PortAccess::Private);
    p.publish(5173, None).await.unwrap();
    let t = p.token(3000, Some(300)).await.unwrap();
    assert_eq!(t.header, "x-kiln-preview-token");
    assert!(
        !format!("{t:?}").contains("kpt_"),
        "the token is not in Debug output"
    );
    assert_eq!(
        p.signed_url(3000, None).await.unwrap(),
        format!("http://3000-{ID}.preview.localhost:8080/?kiln_preview_token=kpt_1_0_sig")
    );
    assert_eq!(p.rotate(3000).await.unwrap().token_version, 2);
    p.unpublish(3000).await.unwrap();

    let base = format!("/sandboxes/{ID}/preview-ports");
    let got = seen.lock().unwrap().clone();
    let want = vec![
        ("GET".to_owned(), base.clone(), Value::Null),
        (
            "POST".to_owned(),
            base.clone(),
            json!({"port": 3000, "access": "private"}),
        ),
        ("POST".to_owned(), base.clone(), json!({"port": 5173})),
        (
            "POST".to_owned(),
            format!("{base}/3000/token"),
            json!({"expires_in_seconds": 300}),
        ),
        ("POST".to_owned(), format!("{base}/3000/token"), json!({})),
        (
            "POST".to_owned(),
            format!("{base}/3000/token/rotate"),
            Value::Null,
        ),
        ("DELETE".to_owned(), format!("{base}/3000"), Value::Null),
    ];
    assert_eq!(got, want);

    // The SDKs' checks, with their messages, and nothing sent.
    for (port, message) in [
        (80, "Invalid preview port 80: must be an integer between 1024 and 65535. Privileged ports (< 1024) are not proxied."),
        (49983, "Invalid preview port 49983: reserved for sandbox control traffic."),
    ] {
        match p.publish(port, None).await {
            Err(Error::Validation { message: m, .. }) => assert_eq!(m, message),
            other => panic!("{other:?}"),
        }
        assert!(p.token(port, None).await.is_err());
    }
    assert_eq!(seen.lock().unwrap().len(), want.len());
}
