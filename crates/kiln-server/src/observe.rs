//! Request ids, one log line per response, and request metrics.
//!
//! Every request gets an `x-request-id` (the client's, when it is a sane one, else a fresh
//! UUID), echoed on the response so that a user's bug report can be matched to the server's
//! log. Each request runs in an `http_request` span with the method, the *route template*
//! and the request id.
//!
//! Headers, paths and query strings are never logged: `x-api-key`, `x-access-token` and the
//! `token.` WebSocket subprotocol carry secrets, and paths carry ids that belong in the
//! handlers' own, deliberate log lines rather than in every line.

use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderName, Response};
use axum::middleware::Next;
use axum::Router;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;
use tracing::Span;

use crate::metrics::{Metrics, UNMATCHED_ROUTE};

/// The request id header, on requests and responses.
pub const REQUEST_ID_HEADER: HeaderName = HeaderName::from_static("x-request-id");

/// The longest client-supplied request id kept. Longer ones are replaced: an id is copied
/// into every log line of the request, so a client must not be able to make it large.
pub const MAX_REQUEST_ID_LEN: usize = 128;

/// Wraps every route of `router` with request ids, the request span and log, and request
/// metrics.
///
/// Call it after the last `.route(...)`, `.fallback(...)` and `.nest(...)`: `Router::layer`
/// only wraps what the router already has. Layering per route (rather than around the
/// whole router as a service) is what lets the span and the metrics see [`MatchedPath`].
pub fn layers<S>(router: Router<S>, metrics: Metrics) -> Router<S>
where
    S: Clone + Send + Sync + 'static,
{
    // The last layer added runs first: sanitize, set, propagate, span, then metrics.
    router
        .layer(axum::middleware::from_fn_with_state(metrics, record))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(make_span)
                .on_response(on_response)
                // Every response is logged once above; real server faults are logged with
                // their cause where they happen (`error::internal`).
                .on_failure(()),
        )
        .layer(PropagateRequestIdLayer::new(REQUEST_ID_HEADER))
        .layer(SetRequestIdLayer::new(REQUEST_ID_HEADER, MakeRequestUuid))
        .layer(axum::middleware::map_request(drop_bad_request_id))
}

/// Whether a client-supplied request id may be kept: short, and visible ASCII other than
/// `"` and `\`, so it can go into a log line or JSON without escaping and cannot forge
/// another field with a space.
pub fn is_valid_request_id(id: &[u8]) -> bool {
    !id.is_empty()
        && id.len() <= MAX_REQUEST_ID_LEN
        && id
            .iter()
            .all(|b| b.is_ascii_graphic() && !matches!(b, b'"' | b'\\'))
}

/// Removes an unacceptable (or repeated) `x-request-id` so that [`SetRequestIdLayer`],
/// which keeps any id already present, generates a fresh one.
async fn drop_bad_request_id(mut req: Request) -> Request {
    let keep = {
        let mut values = req.headers().get_all(&REQUEST_ID_HEADER).iter();
        match (values.next(), values.next()) {
            (None, _) => true,
            (Some(v), None) => is_valid_request_id(v.as_bytes()),
            (Some(_), Some(_)) => false,
        }
    };
    if !keep {
        req.headers_mut().remove(&REQUEST_ID_HEADER);
    }
    req
}

fn make_span(req: &Request<Body>) -> Span {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or(UNMATCHED_ROUTE, MatchedPath::as_str);
    let request_id = req
        .headers()
        .get(&REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    tracing::info_span!(
        "http_request",
        method = %req.method(),
        route,
        request_id,
    )
}

fn on_response(resp: &Response<Body>, latency: Duration, _span: &Span) {
    tracing::info!(
        status = resp.status().as_u16(),
        latency_ms = u64::try_from(latency.as_millis()).unwrap_or(u64::MAX),
        "response"
    );
}

async fn record(
    State(metrics): State<Metrics>,
    req: Request,
    next: Next,
) -> axum::response::Response {
    let method = req.method().clone();
    let route = req.extensions().get::<MatchedPath>().cloned();
    let start = Instant::now();
    let resp = next.run(req).await;
    metrics.observe_request(
        &method,
        route.as_ref().map(MatchedPath::as_str),
        resp.status(),
        start.elapsed(),
    );
    resp
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};

    use axum::http::{HeaderValue, StatusCode};
    use axum::routing::get;
    use tower::ServiceExt as _;
    use tracing::field::{Field, Visit};
    use tracing::span::{Attributes, Id, Record};
    use tracing::{Event, Metadata, Subscriber};

    use super::*;

    fn app(metrics: Metrics) -> Router {
        let router = Router::new()
            .route("/things/{id}", get(|| async { "ok" }))
            .route(
                "/boom",
                get(|| async { (StatusCode::INTERNAL_SERVER_ERROR, "no") }),
            );
        layers(router, metrics)
    }

    async fn send(app: &Router, uri: &str, headers: &[(&str, HeaderValue)]) -> Response<Body> {
        let mut req = Request::builder().uri(uri);
        for (k, v) in headers {
            req = req.header(*k, v.clone());
        }
        app.clone()
            .oneshot(req.body(Body::empty()).unwrap())
            .await
            .unwrap()
    }

    fn id_of(resp: &Response<Body>) -> &str {
        let all: Vec<_> = resp.headers().get_all(&REQUEST_ID_HEADER).iter().collect();
        assert_eq!(all.len(), 1, "exactly one x-request-id");
        all[0].to_str().unwrap()
    }

    fn is_uuid(s: &str) -> bool {
        uuid::Uuid::parse_str(s).is_ok()
    }

    #[tokio::test]
    async fn responses_carry_a_generated_request_id() {
        let app = app(Metrics::new());
        let a = send(&app, "/things/1", &[]).await;
        let b = send(&app, "/nowhere", &[]).await;
        assert_eq!(a.status(), StatusCode::OK);
        assert_eq!(b.status(), StatusCode::NOT_FOUND);
        assert!(is_uuid(id_of(&a)), "{}", id_of(&a));
        assert!(is_uuid(id_of(&b)));
        assert_ne!(id_of(&a), id_of(&b));
    }

    #[tokio::test]
    async fn a_valid_client_id_is_echoed() {
        let app = app(Metrics::new());
        for id in [
            "abc-123",
            "Root=1-5759e988-bd862e3fe1be46a994272793;Parent=53995c3f",
        ] {
            let resp = send(
                &app,
                "/things/1",
                &[("x-request-id", HeaderValue::from_static(id))],
            )
            .await;
            assert_eq!(id_of(&resp), id);
        }
        let longest = "a".repeat(MAX_REQUEST_ID_LEN);
        let resp = send(
            &app,
            "/things/1",
            &[("x-request-id", longest.parse().unwrap())],
        )
        .await;
        assert_eq!(id_of(&resp), longest);
    }

    #[tokio::test]
    async fn a_bogus_client_id_is_replaced() {
        let app = app(Metrics::new());
        let bogus = [
            HeaderValue::from_str(&"a".repeat(500)).unwrap(),
            HeaderValue::from_str(&"a".repeat(MAX_REQUEST_ID_LEN + 1)).unwrap(),
            HeaderValue::from_bytes(b"a\tb").unwrap(),
            HeaderValue::from_bytes(b"a\xffb").unwrap(),
            HeaderValue::from_static("a b"),
            HeaderValue::from_static("a\"b"),
            HeaderValue::from_static(""),
        ];
        for v in bogus {
            let resp = send(&app, "/things/1", &[("x-request-id", v.clone())]).await;
            assert!(is_uuid(id_of(&resp)), "{v:?} kept as {:?}", id_of(&resp));
        }
        // Two ids: neither is trusted.
        let two = [
            ("x-request-id", HeaderValue::from_static("one")),
            ("x-request-id", HeaderValue::from_static("two")),
        ];
        let resp = send(&app, "/things/1", &two).await;
        assert!(is_uuid(id_of(&resp)));
    }

    #[tokio::test]
    async fn metrics_use_the_route_template() {
        let metrics = Metrics::new();
        let app = app(metrics.clone());
        send(&app, "/things/secret-id-1", &[]).await;
        send(&app, "/things/secret-id-2", &[]).await;
        send(&app, "/boom", &[]).await;
        send(&app, "/no/such/secret-path", &[]).await;
        let text = metrics.render(&kiln_engine::StoreStats::default());
        assert!(
            text.contains(
                r#"kiln_http_requests_total{method="GET",route="/things/{id}",status="200"} 2"#
            ),
            "{text}"
        );
        assert!(text.contains(r#"route="/boom",status="500"} 1"#));
        assert!(text.contains(r#"route="unmatched",status="404"} 1"#));
        assert!(!text.contains("secret"));
    }

    /// Records the name and fields of every span and event, as text.
    #[derive(Clone, Default)]
    struct Capture(Arc<Captured>);

    #[derive(Default)]
    struct Captured {
        lines: Mutex<Vec<String>>,
        next_id: AtomicU64,
    }

    struct Fields<'a>(&'a mut String);

    impl Visit for Fields<'_> {
        fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
            self.0.push_str(&format!(" {}={:?}", field.name(), value));
        }
        fn record_str(&mut self, field: &Field, value: &str) {
            self.0.push_str(&format!(" {}={}", field.name(), value));
        }
    }

    impl Subscriber for Capture {
        fn enabled(&self, _: &Metadata<'_>) -> bool {
            true
        }
        fn new_span(&self, span: &Attributes<'_>) -> Id {
            let mut line = format!("span {}", span.metadata().name());
            span.record(&mut Fields(&mut line));
            self.0.lines.lock().unwrap().push(line);
            Id::from_u64(self.0.next_id.fetch_add(1, Ordering::Relaxed) + 1)
        }
        fn record(&self, _: &Id, values: &Record<'_>) {
            let mut line = "record".to_owned();
            values.record(&mut Fields(&mut line));
            self.0.lines.lock().unwrap().push(line);
        }
        fn record_follows_from(&self, _: &Id, _: &Id) {}
        fn event(&self, event: &Event<'_>) {
            let mut line = "event".to_owned();
            event.record(&mut Fields(&mut line));
            self.0.lines.lock().unwrap().push(line);
        }
        fn enter(&self, _: &Id) {}
        fn exit(&self, _: &Id) {}
    }

    #[tokio::test]
    async fn the_span_has_route_and_id_and_secrets_are_not_logged() {
        let capture = Capture::default();
        let _guard = tracing::subscriber::set_default(capture.clone());
        let app = app(Metrics::new());
        let headers = [
            ("x-request-id", HeaderValue::from_static("req-42")),
            ("x-api-key", HeaderValue::from_static("kiln_SECRETKEY")),
            (
                "x-access-token",
                HeaderValue::from_static("kiln_sbx_SECRETTOKEN"),
            ),
            (
                "sec-websocket-protocol",
                HeaderValue::from_static("token.SECRETPROTO"),
            ),
        ];
        send(&app, "/things/SECRETID?access_token=SECRETQUERY", &headers).await;
        let lines = capture.0.lines.lock().unwrap().clone();
        let text = lines.join("\n");
        assert!(
            lines
                .iter()
                .any(|l| l == "span http_request method=GET route=/things/{id} request_id=req-42"),
            "{text}"
        );
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("event message=response status=200 latency_ms=")),
            "{text}"
        );
        assert!(!text.contains("SECRET"), "{text}");
    }
}
