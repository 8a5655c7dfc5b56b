//! Typed errors with the server's stable codes.

use std::time::Duration;

/// What every SDK call returns.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An SDK failure. Variants follow the HTTP status of the server's answer (and the Python
/// SDK's error classes); each carries the server's stable machine-readable `code` (see
/// [`Error::code`]) and its human-readable message.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A template build ended `failed`. `code` is the stable prefix of the build's
    /// `error_message` (`step_failed`, `image_pull_failed`, `boot_failed`,
    /// `start_cmd_failed`, `ready_cmd_failed`, ..., or `build_failed` when it has none).
    #[error("build {build_id} failed ({code}): {message}")]
    Build {
        /// Stable failure code.
        code: String,
        /// The detail after the code.
        message: String,
        /// The failed build.
        build_id: String,
        /// Its template.
        template_id: String,
    },
    /// 429: too many requests (`rate_limited`), or a team limit (`too_many_builds`,
    /// `too_many_templates`, `too_many_sandboxes`).
    #[error("rate limited ({code}): {message}")]
    RateLimit {
        /// Stable code.
        code: String,
        /// For humans.
        message: String,
        /// The server's `Retry-After`, when it sent one.
        retry_after: Option<Duration>,
    },
    /// 400 from the server (`invalid_request`, `unsupported`, `permission_denied`), or a
    /// request the SDK refused to send (`invalid_request`, e.g. a relative file path).
    #[error("invalid request ({code}): {message}")]
    Validation {
        /// Stable code.
        code: String,
        /// For humans.
        message: String,
    },
    /// 401 or 403, or no API key configured (`missing_api_key`).
    #[error("authentication failed ({code}): {message}")]
    Authentication {
        /// Stable code (`unauthorized`, `missing_api_key`).
        code: String,
        /// For humans.
        message: String,
    },
    /// 404: no such object (`not_found`), file (`file_not_found`) or endpoint (`no_route`).
    #[error("not found ({code}): {message}")]
    NotFound {
        /// Stable code.
        code: String,
        /// For humans.
        message: String,
    },
    /// 409: the object's state does not allow this now (`conflict`, `not_ready`,
    /// `not_running`), or a build was `cancelled` while waited for.
    #[error("conflict ({code}): {message}")]
    Conflict {
        /// Stable code.
        code: String,
        /// For humans.
        message: String,
    },
    /// The request (or a stream's idle period) took longer than allowed.
    #[error("timed out: {message}")]
    Timeout {
        /// What timed out.
        message: String,
    },
    /// 5xx: `internal`, `snapshot_failed`, `restore_failed` (500), `agent_error`,
    /// `agent_unreachable` (502), `sandbox_unavailable` (503)...
    #[error("server error {status} ({code}): {message}")]
    Server {
        /// HTTP status.
        status: u16,
        /// Stable code (`unknown` when the body had none).
        code: String,
        /// For humans.
        message: String,
    },
    /// Any other non-success status (405 `method_not_allowed`, 413 `payload_too_large`...).
    #[error("HTTP {status} ({code}): {message}")]
    Api {
        /// HTTP status.
        status: u16,
        /// Stable code (`unknown` when the body had none).
        code: String,
        /// For humans.
        message: String,
    },
    /// The connection failed or dropped (after the retries allowed for the method).
    #[error("network error: {message}")]
    Network {
        /// What failed.
        message: String,
        /// The transport's error.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
    /// The server answered something the SDK does not understand (a malformed body, a
    /// stream or session that ended without its `finished` event...).
    #[error("protocol error: {0}")]
    Protocol(String),
}

impl Error {
    /// The stable machine-readable code: the server's `error.code`, the build's failure
    /// code, or the SDK's own (`missing_api_key`, `invalid_request`, `timeout`,
    /// `network`, `protocol`).
    pub fn code(&self) -> &str {
        match self {
            Error::Build { code, .. }
            | Error::RateLimit { code, .. }
            | Error::Validation { code, .. }
            | Error::Authentication { code, .. }
            | Error::NotFound { code, .. }
            | Error::Conflict { code, .. }
            | Error::Server { code, .. }
            | Error::Api { code, .. } => code,
            Error::Timeout { .. } => "timeout",
            Error::Network { .. } => "network",
            Error::Protocol(_) => "protocol",
        }
    }

    /// The HTTP status the server answered with, for errors that come from one (an
    /// [`Error::Authentication`] from the server is reported as 401, 403 included).
    pub fn status(&self) -> Option<u16> {
        match self {
            Error::RateLimit { .. } => Some(429),
            Error::Validation { .. } => Some(400),
            Error::NotFound { .. } => Some(404),
            Error::Conflict { code, .. } if code != "cancelled" => Some(409),
            Error::Server { status, .. } | Error::Api { status, .. } => Some(*status),
            Error::Authentication { code, .. } if code != "missing_api_key" => Some(401),
            _ => None,
        }
    }

    /// A data-plane failure that activating the sandbox (resume, current token) can fix: a
    /// 401 (the token rotated) or a 503 `sandbox_unavailable` (the VM is not running).
    pub(crate) fn is_resumable(&self) -> bool {
        match self {
            Error::Authentication { code, .. } => code != "missing_api_key",
            Error::Server { status, code, .. } => {
                *status == 503 && code == kiln_api::ApiErrorCode::SandboxUnavailable.as_str()
            }
            _ => false,
        }
    }

    pub(crate) fn validation(message: impl Into<String>) -> Self {
        Error::Validation {
            code: "invalid_request".into(),
            message: message.into(),
        }
    }

    pub(crate) fn network(
        message: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Error::Network {
            message: message.into(),
            source: Some(Box::new(source)),
        }
    }

    /// A transport error from reqwest.
    pub(crate) fn from_reqwest(e: reqwest::Error) -> Self {
        if e.is_timeout() {
            return Error::Timeout {
                message: e.to_string(),
            };
        }
        if e.is_decode() {
            return Error::Protocol(format!("invalid response body: {e}"));
        }
        let message = match e.url() {
            Some(u) => format!("{} {}", u.as_str(), kiln_api::error_chain(&e)),
            None => kiln_api::error_chain(&e),
        };
        Error::Network {
            message,
            source: Some(Box::new(e)),
        }
    }

    /// The error for a non-success response: status, body (`{"error": {"code",
    /// "message"}}`, or anything else) and `Retry-After`.
    pub(crate) fn from_response(status: u16, body: &[u8], retry_after: Option<Duration>) -> Self {
        let (code, message) = parse_error_body(status, body);
        match status {
            400 => Error::Validation { code, message },
            401 | 403 => Error::Authentication { code, message },
            404 => Error::NotFound { code, message },
            409 => Error::Conflict { code, message },
            429 => Error::RateLimit {
                code,
                message,
                retry_after,
            },
            s if s >= 500 => Error::Server {
                status: s,
                code,
                message,
            },
            s => Error::Api {
                status: s,
                code,
                message,
            },
        }
    }
}

/// `(code, message)` from an error body. Superserve's data plane sometimes answers a
/// bare `{"error": "text"}` or plain text; the code is then `unknown`.
fn parse_error_body(status: u16, body: &[u8]) -> (String, String) {
    let fallback_message = || {
        let text = String::from_utf8_lossy(body);
        let text = text.trim();
        if text.is_empty() {
            format!("HTTP {status}")
        } else {
            text.chars().take(500).collect()
        }
    };
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else {
        return ("unknown".into(), fallback_message());
    };
    let err = v.get("error");
    let obj = match err {
        Some(serde_json::Value::Object(o)) => Some(o),
        // Connect-style flat errors: {"code", "message"}.
        None if v.get("message").is_some() => v.as_object(),
        _ => None,
    };
    if let Some(o) = obj {
        let code = o
            .get("code")
            .and_then(|c| c.as_str())
            .unwrap_or("unknown")
            .to_owned();
        let message = o
            .get("message")
            .and_then(|m| m.as_str())
            .map(str::to_owned)
            .unwrap_or_else(fallback_message);
        return (code, message);
    }
    match err.and_then(|e| e.as_str()) {
        Some(text) => ("unknown".into(), text.to_owned()),
        None => ("unknown".into(), fallback_message()),
    }
}

/// A build's `error_message` (`"<code>: <detail>"`) as a stable code and the detail, as
/// the Python SDK splits it: a message without a `word:` prefix is `build_failed`.
pub(crate) fn split_build_error(message: Option<&str>) -> (String, String) {
    let Some(msg) = message.filter(|m| !m.is_empty()) else {
        return ("build_failed".into(), "template build failed".into());
    };
    if let Some((code, detail)) = msg.split_once(':') {
        let is_word = !code.is_empty() && code.chars().all(|c| c.is_alphanumeric() || c == '_');
        let detail = detail.trim();
        if is_word && !detail.is_empty() {
            return (code.to_owned(), detail.to_owned());
        }
    }
    ("build_failed".into(), msg.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_bodies_map_to_variants_with_codes() {
        let body = br#"{"error":{"code":"not_ready","message":"template web has no ready build"}}"#;
        let e = Error::from_response(409, body, None);
        assert!(
            matches!(&e, Error::Conflict { code, .. } if code == "not_ready"),
            "{e:?}"
        );
        assert_eq!(e.code(), "not_ready");
        assert_eq!(e.status(), Some(409));

        let e = Error::from_response(
            429,
            br#"{"error":{"code":"rate_limited","message":"slow down"}}"#,
            Some(Duration::from_secs(2)),
        );
        assert!(
            matches!(&e, Error::RateLimit { code, retry_after: Some(d), .. }
                if code == "rate_limited" && *d == Duration::from_secs(2)),
            "{e:?}"
        );

        let e = Error::from_response(
            503,
            br#"{"error":{"code":"sandbox_unavailable","message":"paused"}}"#,
            None,
        );
        assert!(e.is_resumable());
        let e = Error::from_response(503, br#"{"error":{"code":"internal","message":"x"}}"#, None);
        assert!(!e.is_resumable());
        let e = Error::from_response(
            401,
            br#"{"error":{"code":"unauthorized","message":"x"}}"#,
            None,
        );
        assert!(e.is_resumable());

        // Bare string and plain-text bodies.
        let e = Error::from_response(502, br#"{"error":"boom"}"#, None);
        assert!(
            matches!(&e, Error::Server { status: 502, code, message } if code == "unknown" && message == "boom")
        );
        let e = Error::from_response(413, b"too big", None);
        assert!(matches!(&e, Error::Api { status: 413, message, .. } if message == "too big"));
        let e = Error::from_response(500, b"", None);
        assert!(matches!(&e, Error::Server { message, .. } if message == "HTTP 500"));
    }

    #[test]
    fn build_errors_split_into_code_and_detail() {
        assert_eq!(
            split_build_error(Some("step_failed: step 2 (`false`) exited 1")),
            ("step_failed".into(), "step 2 (`false`) exited 1".into())
        );
        assert_eq!(
            split_build_error(Some("something odd happened")),
            ("build_failed".into(), "something odd happened".into())
        );
        assert_eq!(
            split_build_error(Some("image pull: bad")),
            ("build_failed".into(), "image pull: bad".into())
        );
        assert_eq!(split_build_error(None).0, "build_failed");
        assert_eq!(
            split_build_error(Some("boot_failed:")),
            ("build_failed".into(), "boot_failed:".into())
        );
    }
}
