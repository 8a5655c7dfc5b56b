//! Slowloris against the accept loop `kiln serve` runs ([`kiln_server::serve`]), on real
//! loopback sockets: connections that send half a request line, or nothing, neither keep
//! `/health` from answering nor stay open past the header timeout.

use std::time::Duration;

use kiln_engine::testing::TestEngine;
use kiln_engine::Limits;
use kiln_server::{router, serve, AppState, ServeConfig};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// Connections that send the start of a request line and then nothing.
const HALF_SENT: usize = 400;
/// Connections that send nothing at all (they never reach a request line).
const SILENT: usize = 8;
/// Generous: the server closes them after `HEADER_TIMEOUT`; this only bounds a failure.
const DEADLINE: Duration = Duration::from_secs(60);
const HEADER_TIMEOUT: Duration = Duration::from_secs(2);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_sent_requests_are_closed_and_health_still_answers() {
    let t = TestEngine::new(Limits::UNLIMITED, 0).await.unwrap();
    let app = router(AppState::new(t.engine.clone()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let config = ServeConfig {
        header_read_timeout: HEADER_TIMEOUT,
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(listener, app, config, async {
        let _ = stopped.await;
    }));

    let mut attackers = Vec::with_capacity(HALF_SENT + SILENT);
    for i in 0..HALF_SENT + SILENT {
        let mut s = TcpStream::connect(addr).await.unwrap();
        if i < HALF_SENT {
            s.write_all(b"GET /health HTT").await.unwrap();
        }
        attackers.push(s);
    }

    // A fresh client is served while they hang.
    let health = tokio::time::timeout(DEADLINE, reqwest::get(format!("http://{addr}/health")))
        .await
        .expect("/health did not answer under slowloris")
        .unwrap();
    assert_eq!(health.status(), reqwest::StatusCode::OK);

    // Every attacker's connection is closed by the server: its read ends (EOF, a reset,
    // or a 408 and then EOF). A socket still in the listen backlog would never see this,
    // so it also shows each was accepted.
    let closed = futures::future::join_all(attackers.into_iter().map(|mut s| async move {
        let mut buf = [0u8; 512];
        while let Ok(n) = s.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    }));
    tokio::time::timeout(DEADLINE, closed)
        .await
        .expect("half-sent connections still open after the deadline");

    // Graceful shutdown still ends the server.
    stop.send(()).unwrap();
    tokio::time::timeout(DEADLINE, server)
        .await
        .expect("server did not stop")
        .unwrap();
}
