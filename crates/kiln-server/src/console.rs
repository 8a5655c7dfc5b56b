//! The web console at `/console`: static files built into the binary (no Node.js, no
//! CDN, nothing fetched at run time), served with a strict Content-Security-Policy. The
//! console holds no secret of the server's: the user signs in with an API key that stays
//! in the browser's session storage and rides on every call as `X-API-Key`, so everything
//! it shows or does is an API call any client could make.
//!
//! The terminal is xterm.js 5.5.0 (MIT, `console/vendor/`, from the npm package
//! `@xterm/xterm`, with `@xterm/addon-fit` 0.10.0), unmodified but for its source-map
//! comment.

use axum::extract::Path;
use axum::http::{header, HeaderName, HeaderValue};
use axum::response::{IntoResponse, Response};
use kiln_api::ApiErrorCode;

use crate::ApiError;

/// Scripts and styles only from the console itself, no inline script, no plugin, no
/// framing, and calls (the API, the terminal's WebSocket) to this origin only. Inline
/// styles are allowed because xterm.js sizes and colours its DOM renderer through
/// `<style>` elements it creates; no script can be injected through them.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self' 'unsafe-inline'; img-src 'self' data:; connect-src 'self'; \
     font-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// The console's files: `(name, content type, bytes)`.
const ASSETS: &[(&str, &str, &[u8])] = &[
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../console/app.js"),
    ),
    (
        "app.css",
        "text/css; charset=utf-8",
        include_bytes!("../console/app.css"),
    ),
    (
        "xterm.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../console/vendor/xterm.js"),
    ),
    (
        "xterm-addon-fit.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../console/vendor/xterm-addon-fit.js"),
    ),
    (
        "xterm.css",
        "text/css; charset=utf-8",
        include_bytes!("../console/vendor/xterm.css"),
    ),
];

const INDEX: &[u8] = include_bytes!("../console/index.html");

/// `GET /console`: the page.
pub(crate) async fn index() -> Response {
    serve("text/html; charset=utf-8", INDEX)
}

/// `GET /console/{asset}`: one of its scripts or stylesheets.
pub(crate) async fn asset(Path(name): Path<String>) -> Result<Response, ApiError> {
    let (_, content_type, bytes) = ASSETS
        .iter()
        .find(|(n, _, _)| *n == name)
        .ok_or_else(|| ApiError::new(ApiErrorCode::NotFound, "no such console file"))?;
    Ok(serve(content_type, bytes))
}

fn serve(content_type: &'static str, bytes: &'static [u8]) -> Response {
    let headers = [
        (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
        (
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CONTENT_SECURITY_POLICY),
        ),
        (
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ),
        (header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY")),
        (
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        ),
        (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        (
            HeaderName::from_static("cross-origin-opener-policy"),
            HeaderValue::from_static("same-origin"),
        ),
    ];
    (headers, bytes).into_response()
}
