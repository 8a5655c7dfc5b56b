//! Preview URLs with real VMs (TCG) behind a real `kiln serve`, driven through the Rust
//! SDK: a template whose start process is a small web server (`tests/previews/app.py`, on
//! ports 8000 and 8001), a sandbox whose private and public ports are opened through the
//! proxy, a WebSocket echo and an SSE stream through it, a 502 on a port nothing listens
//! on, a paused sandbox resumed by a request, and a killed sandbox's URL gone at once.
//! Every request reaches the guest through its agent: the host opens no port for it.
//!
//! Needs what `scripts/test.sh` sets up: the guest kernel, the test registry and the static
//! agent. A missing prerequisite fails the test with the remedy; it never skips.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{api_key, assert_no_qemu, assets, build_template, registry, repo_root, Server};
use futures::{SinkExt as _, StreamExt as _};
use kiln_sdk::{Client, PortAccess, PreviewAccess, RunOptions, Sandbox, SandboxCreateOptions};
use serde_json::json;

/// The template: `app.py` written by a build step and started on two ports.
fn spec(registry: &str) -> serde_json::Value {
    let app = std::fs::read_to_string(repo_root().join("tests/previews/app.py")).unwrap();
    json!({
        "name": "previews", "memory_mib": 512, "disk_mib": 2048,
        "build_spec": {
            "from": format!("{registry}/kiln/python:latest"),
            "steps": [{"run": format!("mkdir -p /srv && cat > /srv/app.py <<'EOF'\n{app}\nEOF")}],
            "start_cmd": "python3 /srv/app.py 8000 8001",
            "ready_cmd": "curl -fsS http://127.0.0.1:8000/ >/dev/null && curl -fsS http://127.0.0.1:8001/ >/dev/null",
        },
    })
}

#[test]
fn preview_urls_reach_a_real_sandbox() {
    let registry = registry(&assets());
    let dir = common::state_dir("kprev");
    let state = dir.path();
    let key = api_key(state, "previews");
    let server = Server::start(state, &[("KILN_READY_TIMEOUT_SECS", "300")]);
    build_template(
        &server.url,
        &[("x-api-key", key.as_str())],
        &spec(&registry),
        Duration::from_secs(900),
    );
    let addr: SocketAddr = server.url.trim_start_matches("http://").parse().unwrap();
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(scenario(&server.url, addr, &key));
    drop(server);
    assert_no_qemu(state, Duration::from_secs(30));
}

/// What a browser would do, at kiln's listener whatever the host.
struct Browser {
    addr: SocketAddr,
    id: String,
}

impl Browser {
    fn host(&self, port: u16) -> String {
        format!("{port}-{}.preview.localhost", self.id)
    }

    fn url(&self, port: u16, path: &str) -> String {
        format!("http://{}:{}{path}", self.host(port), self.addr.port())
    }

    fn client(&self, port: u16) -> reqwest::Client {
        reqwest::Client::builder()
            .resolve(&self.host(port), self.addr)
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .build()
            .unwrap()
    }

    async fn get(&self, port: u16, path: &str, token: Option<&str>) -> (u16, String) {
        let mut req = self.client(port).get(self.url(port, path));
        if let Some(t) = token {
            req = req.header("x-kiln-preview-token", t);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.text().await.unwrap())
    }
}

async fn scenario(url: &str, addr: SocketAddr, key: &str) {
    let client = Client::new(url, key).unwrap();
    let mut options = SandboxCreateOptions::new("web", "previews");
    options.preview_access = Some(PreviewAccess::Private);
    let sandbox = Sandbox::create(&client, options).await.unwrap();
    let b = Browser {
        addr,
        id: sandbox.id().to_owned(),
    };
    let previews = sandbox.previews();

    // Private by the sandbox's policy; the other port public by choice.
    let private = previews.publish(8000, None).await.unwrap();
    assert_eq!(private.access, PortAccess::Private);
    let expected_url = format!("http://8000-{}.preview.localhost:{}", b.id, addr.port());
    assert_eq!(private.url.as_deref(), Some(expected_url.as_str()));
    previews
        .publish(8001, Some(PortAccess::Public))
        .await
        .unwrap();
    let (s, page) = b.get(8001, "/", None).await;
    assert_eq!(s, 200, "{page}");
    assert!(page.contains("hello from the sandbox") && page.contains("port 8001"));
    assert_eq!(b.get(8000, "/", None).await.0, 401);
    let token = previews.token(8000, Some(600)).await.unwrap().token;
    let (s, page) = b.get(8000, "/", Some(&token)).await;
    assert_eq!(s, 200, "{page}");
    assert!(page.contains("port 8000"));
    // The app sees its Host, never kiln's credential.
    let (_, headers) = b.get(8000, "/headers", Some(&token)).await;
    let headers: serde_json::Value = serde_json::from_str(&headers).unwrap();
    assert_eq!(headers["host"], format!("{}:{}", b.host(8000), addr.port()));
    assert!(headers.get("x-kiln-preview-token").is_none(), "{headers}");

    // SSE: the first event arrives while the app holds back the second (it waits for a
    // file this test creates once it has the first), so the stream is not buffered.
    let resp = b
        .client(8000)
        .get(b.url(8000, "/sse"))
        .header("x-kiln-preview-token", &token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.bytes_stream();
    let mut got = Vec::new();
    while !got.ends_with(b"data: one\n\n") {
        got.extend_from_slice(&body.next().await.unwrap().unwrap());
    }
    let r = sandbox
        .commands()
        .run("touch /tmp/release-sse", RunOptions::default())
        .await
        .unwrap();
    assert_eq!(r.exit_code, 0);
    while let Some(chunk) = body.next().await {
        got.extend_from_slice(&chunk.unwrap());
    }
    assert_eq!(got, b"data: one\n\ndata: two\n\n");

    // A WebSocket through the proxy, both ways.
    {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
        use tokio_tungstenite::tungstenite::Message;
        let mut req = format!("ws://{}:{}/ws", b.host(8000), addr.port())
            .into_client_request()
            .unwrap();
        req.headers_mut()
            .insert("x-kiln-preview-token", token.parse().unwrap());
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut ws, _) = tokio_tungstenite::client_async(req, tcp).await.unwrap();
        for text in ["ping", "from the host"] {
            ws.send(Message::Text(text.into())).await.unwrap();
            let echo = ws.next().await.unwrap().unwrap();
            assert_eq!(echo.into_text().unwrap().as_str(), format!("echo: {text}"));
        }
        ws.close(None).await.unwrap();
    }

    // A port nothing listens on: a short page, at once.
    previews
        .publish(9000, Some(PortAccess::Public))
        .await
        .unwrap();
    let (s, page) = b.get(9000, "/", None).await;
    assert_eq!(s, 502, "{page}");
    assert!(page.contains("nothing is listening on port 9000"), "{page}");

    // Paused: a request resumes it and is answered.
    sandbox.pause().await.unwrap();
    let (s, page) = b.get(8001, "/", None).await;
    assert_eq!(s, 200, "{page}");
    assert_eq!(
        sandbox.get_info().await.unwrap().status,
        kiln_sdk::SandboxStatus::Active
    );

    // The network log has the requests, inbound.
    let (s, log) = common::http(
        "GET",
        &format!("{url}/sandboxes/{}/network?limit=1000", b.id),
        &[("x-api-key", key)],
        None,
    );
    assert_eq!(s, 200, "{log}");
    let rows = log["data"].as_array().unwrap();
    assert!(
        rows.iter()
            .any(|r| r["direction"] == "inbound" && r["path"] == "/sse" && r["status"] == 200),
        "{log}"
    );
    assert!(
        !log.to_string().contains(&token),
        "a token in the network log"
    );

    // Killed: gone at once.
    sandbox.kill().await.unwrap();
    assert_eq!(b.get(8001, "/", None).await.0, 404);
}
