//! Preview URLs through the real router on a real listener, with sandboxes on the fake
//! hypervisor: its agent relays `connect` to the host's loopback, where each test runs
//! the "web app in the sandbox". Routing by host, policies, tokens (header, signed URL
//! and cookie), rotation, team walls, bad ports, the lifecycle (paused, killed, nothing
//! listening), streaming, WebSockets, keep-alive, metrics and the network log.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::extract::ws::{Message as WsMessage, WebSocketUpgrade};
use axum::extract::{ConnectInfo, Request};
use axum::response::IntoResponse;
use futures::{SinkExt as _, StreamExt as _};
use kiln_engine::testing::TestEngine;
use kiln_engine::Limits;
use kiln_server::{router, AppState};
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio::sync::Notify;

/// What the app in the sandbox saw.
#[derive(Debug, Default)]
struct Seen {
    /// Peer ports of the connections it accepted (one per TCP connection).
    connections: BTreeSet<u16>,
}

/// The "web app in the sandbox": echoes what it got as JSON, streams SSE (the second
/// event only once the test says so), echoes WebSocket messages, serves a large body.
struct App {
    port: u16,
    seen: Arc<Mutex<Seen>>,
    release: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for App {
    fn drop(&mut self) {
        self.task.abort();
    }
}

const BIG: usize = 8 << 20;

async fn app() -> App {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let release = Arc::new(Notify::new());
    let (s, r) = (seen.clone(), release.clone());
    let router = axum::Router::new()
        .route(
            "/sse",
            axum::routing::get(move || {
                let r = r.clone();
                async move {
                    let events = futures::stream::unfold(0, move |n| {
                        let r = r.clone();
                        async move {
                            match n {
                                0 => Some((Ok::<_, std::io::Error>("data: one\n\n"), 1)),
                                1 => {
                                    r.notified().await;
                                    Some((Ok("data: two\n\n"), 2))
                                }
                                _ => None,
                            }
                        }
                    });
                    (
                        [("content-type", "text/event-stream")],
                        axum::body::Body::from_stream(events),
                    )
                }
            }),
        )
        .route(
            "/ws",
            axum::routing::get(|ws: WebSocketUpgrade| async move {
                ws.on_upgrade(|mut socket| async move {
                    while let Some(Ok(msg)) = socket.recv().await {
                        if let WsMessage::Text(t) = msg {
                            let _ = socket
                                .send(WsMessage::Text(format!("echo: {t}").into()))
                                .await;
                        }
                    }
                })
            }),
        )
        .route(
            "/big",
            axum::routing::get(|| async { vec![b'k'; BIG].into_response() }),
        )
        .fallback(
            move |ConnectInfo(peer): ConnectInfo<SocketAddr>, req: Request| {
                let s = s.clone();
                async move {
                    s.lock().unwrap().connections.insert(peer.port());
                    let headers: serde_json::Map<String, Value> = req
                        .headers()
                        .iter()
                        .map(|(k, v)| (k.to_string(), json!(v.to_str().unwrap_or(""))))
                        .collect();
                    let (parts, body) = req.into_parts();
                    let body = axum::body::to_bytes(body, 1 << 20).await.unwrap();
                    axum::Json(json!({
                        "method": parts.method.as_str(),
                        "path": parts.uri.path(),
                        "query": parts.uri.query(),
                        "headers": headers,
                        "body": String::from_utf8_lossy(&body),
                    }))
                    .into_response()
                }
            },
        );
    // Preview ports are 1024-65535 but for 49983: ephemeral ports fit, that one aside.
    let listener = loop {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        if l.local_addr().unwrap().port() != 49983 {
            break l;
        }
    };
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        axum::serve(
            listener,
            router.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
        .unwrap();
    });
    App {
        port,
        seen,
        release,
        task,
    }
}

/// kiln's API on a real listener.
struct Kiln {
    t: TestEngine,
    addr: SocketAddr,
    key: String,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Kiln {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn kiln() -> Kiln {
    let t = TestEngine::new(Limits::UNLIMITED, 0).await.unwrap();
    let app = router(AppState::new(t.engine.clone()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    t.ready_template("acme", "web").await.unwrap();
    let key = t.engine.create_api_key("acme").await.unwrap();
    Kiln { t, addr, key, task }
}

impl Kiln {
    fn api(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// A client that reaches `host` (any name) at kiln's listener and never follows
    /// redirects.
    fn client(&self, host: &str) -> reqwest::Client {
        reqwest::Client::builder()
            .resolve(host, self.addr)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap()
    }

    fn host(&self, id: &str, port: u16) -> String {
        format!("{port}-{id}.preview.localhost")
    }

    fn url(&self, id: &str, port: u16, path: &str) -> String {
        format!("http://{}:{}{path}", self.host(id, port), self.addr.port())
    }

    async fn call(
        &self,
        method: &str,
        path: &str,
        key: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let req = reqwest::Client::new()
            .request(method.parse().unwrap(), self.api(path))
            .header("x-api-key", key);
        let req = match body {
            Some(b) => req.json(&b),
            None => req,
        };
        let resp = req.send().await.unwrap();
        let status = resp.status();
        let text = resp.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    async fn sandbox(&self, preview_access: Option<&str>) -> String {
        let mut body = json!({"name": "s", "from_template": "web"});
        if let Some(a) = preview_access {
            body["preview_access"] = json!(a);
        }
        let (s, v) = self.call("POST", "/sandboxes", &self.key, Some(body)).await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        v["id"].as_str().unwrap().to_owned()
    }

    async fn publish(&self, id: &str, port: u16, access: Option<&str>) -> Value {
        let mut body = json!({"port": port});
        if let Some(a) = access {
            body["access"] = json!(a);
        }
        let (s, v) = self
            .call(
                "POST",
                &format!("/sandboxes/{id}/preview-ports"),
                &self.key,
                Some(body),
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{v}");
        v
    }

    async fn token(&self, id: &str, port: u16, body: Value) -> Value {
        let (s, v) = self
            .call(
                "POST",
                &format!("/sandboxes/{id}/preview-ports/{port}/token"),
                &self.key,
                Some(body),
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{v}");
        v
    }

    /// A GET of the preview with extra headers: status, headers, body.
    async fn get(
        &self,
        id: &str,
        port: u16,
        path: &str,
        headers: &[(&str, &str)],
    ) -> (StatusCode, reqwest::header::HeaderMap, String) {
        let mut req = self
            .client(&self.host(id, port))
            .get(self.url(id, port, path));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = req.send().await.unwrap();
        let (status, h) = (resp.status(), resp.headers().clone());
        (status, h, resp.text().await.unwrap())
    }
}

fn json_of(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|_| panic!("not JSON: {body}"))
}

#[tokio::test]
async fn private_ports_need_their_token_and_the_app_never_sees_it() {
    let k = kiln().await;
    let web = app().await;
    let other = app().await;
    let id = k.sandbox(Some("private")).await;

    // Strict policy: nothing before publishing, not even a hint of the sandbox.
    let (s, h, body) = k.get(&id, web.port, "/", &[]).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{body}");
    assert!(h["content-type"].to_str().unwrap().starts_with("text/html"));

    let p = k.publish(&id, web.port, None).await;
    assert_eq!(p["access"], "private", "{p}");
    assert_eq!(p["token_version"], 1);
    assert_eq!(
        p["url"],
        format!("http://{}-{id}.preview.localhost:8080", web.port)
    );
    let (s, _, body) = k.get(&id, web.port, "/", &[]).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{body}");
    assert!(body.contains("private"), "{body}");

    let t = k.token(&id, web.port, json!({})).await;
    assert_eq!(t["header"], "x-kiln-preview-token");
    assert_eq!(t["query_param"], "kiln_preview_token");
    assert_eq!(t["expires_at"], Value::Null);
    let token = t["token"].as_str().unwrap().to_owned();

    // The header form: through, with the request as it came but for kiln's credential and
    // the hop-by-hop headers.
    let (s, _, body) = k
        .get(
            &id,
            web.port,
            "/some/path?a=1&b=two",
            &[
                ("x-kiln-preview-token", &token),
                ("x-custom", "kept"),
                ("connection", "keep-alive, x-hop"),
                ("x-hop", "dropped"),
                ("cookie", "theme=dark"),
            ],
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let seen = json_of(&body);
    assert_eq!(seen["path"], "/some/path");
    assert_eq!(seen["query"], "a=1&b=two");
    let headers = &seen["headers"];
    assert_eq!(headers["x-custom"], "kept");
    assert_eq!(headers["cookie"], "theme=dark");
    assert_eq!(
        headers["host"],
        format!("{}:{}", k.host(&id, web.port), k.addr.port())
    );
    assert!(headers.get("x-kiln-preview-token").is_none(), "{headers}");
    assert!(headers.get("x-hop").is_none(), "{headers}");

    // The token opens its own port only.
    k.publish(&id, other.port, None).await;
    let (s, _, _) = k
        .get(&id, other.port, "/", &[("x-kiln-preview-token", &token)])
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);

    // The signed URL: a redirect that moves the token into a cookie of this host.
    let (s, h, _) = k
        .get(
            &id,
            web.port,
            &format!("/page?x=1&kiln_preview_token={token}"),
            &[],
        )
        .await;
    assert_eq!(s, StatusCode::FOUND);
    assert_eq!(h["location"], "/page?x=1");
    let cookie = h["set-cookie"].to_str().unwrap().to_owned();
    assert!(
        cookie.starts_with(&format!("kiln_preview_token={token};")),
        "{cookie}"
    );
    for attr in ["HttpOnly", "SameSite=Lax", "Path=/"] {
        assert!(cookie.contains(attr), "{cookie}");
    }
    assert!(!cookie.contains("Domain"), "host-only: {cookie}");
    assert!(
        !cookie.contains("Max-Age"),
        "a token without expiry: {cookie}"
    );
    assert_eq!(h["cache-control"], "no-store");
    // The browser comes back with the cookie (and its own); the app sees its own only.
    let (s, _, body) = k
        .get(
            &id,
            web.port,
            "/page?x=1",
            &[("cookie", &format!("theme=dark; kiln_preview_token={token}"))],
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(json_of(&body)["headers"]["cookie"], "theme=dark");
    // A non-GET with the token in its query is served (no redirect), the token stripped.
    let resp = k
        .client(&k.host(&id, web.port))
        .post(k.url(
            &id,
            web.port,
            &format!("/form?kiln_preview_token={token}&y=2"),
        ))
        .body("payload")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let seen = json_of(&resp.text().await.unwrap());
    assert_eq!(
        (seen["query"].as_str(), seen["body"].as_str()),
        (Some("y=2"), Some("payload"))
    );

    // An expiring token is a cookie that expires with it.
    let t = k
        .token(&id, web.port, json!({"expires_in_seconds": 300}))
        .await;
    assert!(t["expires_at"].is_string(), "{t}");
    let (_, h, _) = k
        .get(
            &id,
            web.port,
            &format!("/?kiln_preview_token={}", t["token"].as_str().unwrap()),
            &[],
        )
        .await;
    let max_age: i64 = h["set-cookie"]
        .to_str()
        .unwrap()
        .split("Max-Age=")
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    assert!((290..=300).contains(&max_age), "{max_age}");

    // Rotation revokes the header form and the cookie at once; the new token works.
    let (s, fresh) = k
        .call(
            "POST",
            &format!("/sandboxes/{id}/preview-ports/{}/token/rotate", web.port),
            &k.key,
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{fresh}");
    assert_eq!(fresh["token_version"], 2);
    let fresh = fresh["token"].as_str().unwrap().to_owned();
    for headers in [
        [("x-kiln-preview-token", token.clone())],
        [("cookie", format!("kiln_preview_token={token}"))],
    ] {
        let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        assert_eq!(
            k.get(&id, web.port, "/", &h).await.0,
            StatusCode::UNAUTHORIZED
        );
    }
    assert_eq!(
        k.get(&id, web.port, "/", &[("x-kiln-preview-token", &fresh)])
            .await
            .0,
        StatusCode::OK
    );

    // The listing never holds a token.
    let (s, list) = k
        .call(
            "GET",
            &format!("/sandboxes/{id}/preview-ports"),
            &k.key,
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(list["preview_access"], "private");
    assert_eq!(list["ports"].as_array().unwrap().len(), 2);
    assert!(!list.to_string().contains("kpt_"), "{list}");

    // Unpublishing closes the port, and publishing again does not revive old tokens.
    let (s, _) = k
        .call(
            "DELETE",
            &format!("/sandboxes/{id}/preview-ports/{}", web.port),
            &k.key,
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let again = k
        .call(
            "DELETE",
            &format!("/sandboxes/{id}/preview-ports/{}", web.port),
            &k.key,
            None,
        )
        .await;
    assert_eq!(again.0, StatusCode::NO_CONTENT, "idempotent");
    assert_eq!(
        k.get(&id, web.port, "/", &[("x-kiln-preview-token", &fresh)])
            .await
            .0,
        StatusCode::NOT_FOUND
    );
    let p = k.publish(&id, web.port, None).await;
    assert_eq!(p["token_version"], 3);
    assert_eq!(
        k.get(&id, web.port, "/", &[("x-kiln-preview-token", &fresh)])
            .await
            .0,
        StatusCode::UNAUTHORIZED
    );

    // The network log has a row per request, with no query and no token anywhere.
    let (s, log) = k
        .call(
            "GET",
            &format!("/sandboxes/{id}/network?limit=1000"),
            &k.key,
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let rows = log["data"].as_array().unwrap();
    assert!(rows
        .iter()
        .all(|r| r["kind"] == "request" && r["direction"] == "inbound"));
    assert!(rows
        .iter()
        .any(|r| r["path"] == "/some/path" && r["status"] == 200 && r["method"] == "GET"));
    assert!(rows
        .iter()
        .any(|r| r["status"] == 401 && r["verdict"] == "blocked"));
    let text = log.to_string();
    assert!(!text.contains("kpt_") && !text.contains("a=1"), "{text}");

    // Metrics: per sandbox and status.
    let metrics = reqwest::get(k.api("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(&format!(
            r#"kiln_preview_requests_total{{sandbox="{id}",status="200"}}"#
        )),
        "{metrics}"
    );
    assert!(metrics.contains(&format!(
        r#"kiln_preview_requests_total{{sandbox="{id}",status="401"}}"#
    )));
}

#[tokio::test]
async fn policies_public_ports_and_legacy_mode() {
    let k = kiln().await;
    let web = app().await;
    let unpublished = app().await;
    // No choice: strict and public.
    let id = k.sandbox(None).await;
    let (_, info) = k
        .call("GET", &format!("/sandboxes/{id}"), &k.key, None)
        .await;
    assert_eq!(info["preview_access"], "public");
    assert_eq!(k.publish(&id, web.port, None).await["access"], "public");
    let (s, _, body) = k.get(&id, web.port, "/hello", &[]).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(
        k.get(&id, unpublished.port, "/", &[]).await.0,
        StatusCode::NOT_FOUND
    );
    // A public port needs no token: one in the query is not checked, so it becomes no
    // cookie; it is removed all the same.
    let (s, h, body) = k
        .get(&id, web.port, "/hello?kiln_preview_token=whatever&a=1", &[])
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert!(h.get("set-cookie").is_none());
    assert_eq!(json_of(&body)["query"], "a=1");

    // Switching the default leaves published ports as they are; an explicit access
    // changes one port.
    let (s, v) = k
        .call(
            "PATCH",
            &format!("/sandboxes/{id}"),
            &k.key,
            Some(json!({"preview_access": "private"})),
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{v}");
    assert_eq!(k.get(&id, web.port, "/", &[]).await.0, StatusCode::OK);
    assert_eq!(k.publish(&id, web.port, None).await["access"], "public");
    assert_eq!(
        k.publish(&id, web.port, Some("private")).await["access"],
        "private"
    );
    assert_eq!(
        k.get(&id, web.port, "/", &[]).await.0,
        StatusCode::UNAUTHORIZED
    );
    for bad in ["legacy_public", "open"] {
        let (s, v) = k
            .call(
                "PATCH",
                &format!("/sandboxes/{id}"),
                &k.key,
                Some(json!({"preview_access": bad})),
            )
            .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{bad}: {v}");
    }

    // legacy_public: every listening port, no credential; published private ports
    // still need theirs.
    let legacy = k.sandbox(None).await;
    k.t.legacy_preview("acme", &legacy).await.unwrap();
    assert_eq!(
        k.get(&legacy, unpublished.port, "/", &[]).await.0,
        StatusCode::OK
    );
    k.publish(&legacy, web.port, Some("private")).await;
    assert_eq!(
        k.get(&legacy, web.port, "/", &[]).await.0,
        StatusCode::UNAUTHORIZED
    );
    let (_, list) = k
        .call(
            "GET",
            &format!("/sandboxes/{legacy}/preview-ports"),
            &k.key,
            None,
        )
        .await;
    assert_eq!(list["preview_access"], "legacy_public");
    // Leaving it closes every unpublished port at once.
    k.call(
        "PATCH",
        &format!("/sandboxes/{legacy}"),
        &k.key,
        Some(json!({"preview_access": "public"})),
    )
    .await;
    assert_eq!(
        k.get(&legacy, unpublished.port, "/", &[]).await.0,
        StatusCode::NOT_FOUND
    );

    // Hosts that are not preview hosts are the API's.
    let resp = k
        .client("preview.localhost")
        .get(format!("http://preview.localhost:{}/health", k.addr.port()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
}

#[tokio::test]
async fn bad_ports_and_team_walls() {
    let k = kiln().await;
    let id = k.sandbox(Some("private")).await;
    let ports = format!("/sandboxes/{id}/preview-ports");
    for (port, message) in [
        (
            json!(80),
            "Invalid preview port 80: must be an integer between 1024 and 65535. \
             Privileged ports (< 1024) are not proxied.",
        ),
        (
            json!(49983),
            "Invalid preview port 49983: reserved for sandbox control traffic.",
        ),
        (
            json!(65536),
            "Invalid preview port 65536: must be an integer between 1024 and 65535. \
             Privileged ports (< 1024) are not proxied.",
        ),
    ] {
        let (s, v) = k
            .call("POST", &ports, &k.key, Some(json!({"port": port})))
            .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
        assert_eq!(v["error"]["code"], "invalid_request");
        assert_eq!(v["error"]["message"], message);
        let p = port.to_string();
        for (method, path) in [
            ("DELETE", format!("{ports}/{p}")),
            ("POST", format!("{ports}/{p}/token")),
            ("POST", format!("{ports}/{p}/token/rotate")),
        ] {
            let (s, v) = k.call(method, &path, &k.key, None).await;
            assert_eq!(s, StatusCode::BAD_REQUEST, "{method} {path}: {v}");
            assert_eq!(v["error"]["message"], message);
        }
    }
    // The proxy refuses them too, before anything else.
    for port in [80u16, 49983] {
        let (s, _, body) = k.get(&id, port, "/", &[]).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{body}");
    }
    let (s, v) = k
        .call(
            "POST",
            &format!("{ports}/3000/token"),
            &k.key,
            Some(json!({"expires_in_seconds": 0})),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    // A token for a port that is not published: not found.
    let (s, _) = k
        .call("POST", &format!("{ports}/3000/token"), &k.key, None)
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    // Another team: 404 on every preview route, as for an id that does not exist.
    k.publish(&id, 3000, None).await;
    let other = k.t.engine.create_api_key("other").await.unwrap();
    for (method, path, body) in [
        ("GET", ports.clone(), None),
        ("POST", ports.clone(), Some(json!({"port": 3000}))),
        ("DELETE", format!("{ports}/3000"), None),
        ("POST", format!("{ports}/3000/token"), None),
        ("POST", format!("{ports}/3000/token/rotate"), None),
    ] {
        let (s, v) = k.call(method, &path, &other, body).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{method} {path}: {v}");
        assert_eq!(v["error"]["code"], "not_found");
    }
    let (_, list) = k.call("GET", &ports, &k.key, None).await;
    assert_eq!(list["ports"][0]["port"], 3000, "untouched: {list}");
}

#[tokio::test]
async fn lifecycle_paused_resumes_killed_is_gone_dead_port_is_502() {
    let k = kiln().await;
    let web = app().await;
    let id = k.sandbox(None).await;
    k.publish(&id, web.port, None).await;

    // Nothing listening: a short page at once.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    k.publish(&id, dead, None).await;
    let (s, h, body) = k.get(&id, dead, "/", &[]).await;
    assert_eq!(s, StatusCode::BAD_GATEWAY);
    assert!(h["content-type"].to_str().unwrap().starts_with("text/html"));
    assert!(
        body.contains(&format!("nothing is listening on port {dead}")),
        "{body}"
    );

    // Paused: the request resumes it and is answered.
    let (s, _) = k
        .call("POST", &format!("/sandboxes/{id}/pause"), &k.key, None)
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, _, body) = k.get(&id, web.port, "/after-pause", &[]).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(json_of(&body)["path"], "/after-pause");
    let (_, info) = k
        .call("GET", &format!("/sandboxes/{id}"), &k.key, None)
        .await;
    assert_eq!(info["status"], "active");

    // Killed: 404 at once.
    let (s, _) = k
        .call("DELETE", &format!("/sandboxes/{id}"), &k.key, None)
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    assert_eq!(
        k.get(&id, web.port, "/", &[]).await.0,
        StatusCode::NOT_FOUND
    );
    assert!(k.t.hypervisor.alive().is_empty(), "no VM left");
}

#[tokio::test]
async fn streams_websockets_and_keep_alive() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
    use tokio_tungstenite::tungstenite::Message;

    let k = kiln().await;
    let web = app().await;
    let id = k.sandbox(Some("private")).await;
    k.publish(&id, web.port, None).await;
    let token = k.token(&id, web.port, json!({})).await["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let client = k.client(&k.host(&id, web.port));

    // SSE: the first event arrives while the app still holds back the second, so
    // nothing in between buffers the stream.
    let resp = client
        .get(k.url(&id, web.port, "/sse"))
        .header("x-kiln-preview-token", &token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut body = resp.bytes_stream();
    let mut got = Vec::new();
    while !got.ends_with(b"data: one\n\n") {
        got.extend_from_slice(&body.next().await.unwrap().unwrap());
    }
    web.release.notify_one();
    while let Some(chunk) = body.next().await {
        got.extend_from_slice(&chunk.unwrap());
    }
    assert_eq!(got, b"data: one\n\ndata: two\n\n");

    // A large body arrives whole (many flow-control windows).
    let resp = client
        .get(k.url(&id, web.port, "/big"))
        .header("x-kiln-preview-token", &token)
        .send()
        .await
        .unwrap();
    let big = resp.bytes().await.unwrap();
    assert_eq!(big.len(), BIG);
    assert!(big.iter().all(|b| *b == b'k'));

    // Keep-alive: requests in a row go over one connection into the sandbox.
    web.seen.lock().unwrap().connections.clear();
    for i in 0..3 {
        let resp = client
            .get(k.url(&id, web.port, &format!("/n/{i}")))
            .header("x-kiln-preview-token", &token)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        resp.bytes().await.unwrap();
    }
    assert_eq!(web.seen.lock().unwrap().connections.len(), 1);

    // A WebSocket: the upgrade goes through and becomes a tunnel both ways. The token
    // rides in the query (as a browser's would, from a signed URL) and is not followed
    // by a redirect for an upgrade.
    let mut req = format!(
        "ws://{}:{}/ws?kiln_preview_token={token}",
        k.host(&id, web.port),
        k.addr.port()
    )
    .into_client_request()
    .unwrap();
    req.headers_mut()
        .insert("x-app-header", "1".parse().unwrap());
    let tcp = tokio::net::TcpStream::connect(k.addr).await.unwrap();
    let (mut ws, resp) = tokio_tungstenite::client_async(req, tcp).await.unwrap();
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    for text in ["hello", "again"] {
        ws.send(Message::Text(text.into())).await.unwrap();
        let echo = ws.next().await.unwrap().unwrap();
        assert_eq!(echo.into_text().unwrap().as_str(), format!("echo: {text}"));
    }
    ws.close(None).await.unwrap();

    // Without a token, the upgrade is refused like any request.
    let req = format!("ws://{}:{}/ws", k.host(&id, web.port), k.addr.port())
        .into_client_request()
        .unwrap();
    let tcp = tokio::net::TcpStream::connect(k.addr).await.unwrap();
    let err = tokio_tungstenite::client_async(req, tcp).await.unwrap_err();
    assert!(err.to_string().contains("401"), "{err}");
}
