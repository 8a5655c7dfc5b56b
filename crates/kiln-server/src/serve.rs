//! The accept loop `kiln serve` runs the router in: HTTP/1.1 through hyper, with a bound on
//! how long a client may take to send a request's headers.
//!
//! `axum::serve` has no such bound, so one connection that sends `GET / HTT` and then
//! nothing (slowloris) would hold its socket and task forever, and a few thousand would
//! exhaust the process's file descriptors. hyper's `header_read_timeout` closes it instead;
//! it runs from the connection's start (and, on keep-alive, from the end of the previous
//! response) until the request's headers are complete, so an idle or silent connection is
//! closed too. Only HTTP/1.1 is served: the version sniffing of hyper-util's auto builder
//! waits for a connection's first bytes with no bound at all, and no SDK speaks
//! prior-knowledge HTTP/2 to a plain-text port.

use std::future::Future;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;

/// How the server treats connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServeConfig {
    /// How long a client may take to send a request's headers before its connection is
    /// closed (`KILN_HEADER_TIMEOUT_SECS`).
    pub header_read_timeout: Duration,
}

impl ServeConfig {
    /// Long enough for any real client on a slow link, short enough that half-sent
    /// requests cannot pile up.
    pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            header_read_timeout: Self::DEFAULT_HEADER_READ_TIMEOUT,
        }
    }
}

/// Serves `app` on `listener` until `shutdown` completes, then stops accepting, lets every
/// open connection finish its request in flight, and returns once all have closed (a
/// caller that cannot wait for long-lived streams bounds this itself).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    config: ServeConfig,
    shutdown: impl Future<Output = ()>,
) {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(config.header_read_timeout);
    // Every connection task holds a receiver: `closed()` on the sender is "all are done".
    let (stop, stopping) = tokio::sync::watch::channel(false);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown.as_mut() => break,
        };
        let stream = match accepted {
            Ok((stream, _peer)) => stream,
            Err(e) => {
                if !is_connection_error(&e) {
                    // Out of file descriptors, most likely: accepting again at once would
                    // spin; connections that end free some.
                    tracing::error!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                continue;
            }
        };
        let conn = http
            .serve_connection(TokioIo::new(stream), TowerToHyperService::new(app.clone()))
            .with_upgrades();
        let mut stopping = stopping.clone();
        tokio::spawn(async move {
            let mut conn = std::pin::pin!(conn);
            let ended = tokio::select! {
                ended = conn.as_mut() => ended,
                // The one value ever sent is "stop" (an error: the loop is gone, as good).
                _ = stopping.changed() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = ended {
                // Header timeouts and clients that hang up: nothing for the operator.
                tracing::debug!(error = %e, "connection ended");
            }
        });
    }
    drop(listener);
    drop(stopping);
    // Receivers are only dropped, never sent to by anyone but here: the send cannot fail
    // while a connection is open, and does not matter when none is.
    let _ = stop.send(true);
    stop.closed().await;
}

/// Errors of one connection that went away before it was accepted; the listener is fine.
fn is_connection_error(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::ConnectionReset
    )
}
