//! The API's error codes and error body.
//!
//! Every failure the HTTP API answers is `{"error": {"code", "message"}}` with one of these
//! codes. They are a public contract (the official SDKs and scripts match on them), so
//! each is spelled in exactly one place, here, and each goes with exactly one HTTP status
//! ([`ApiErrorCode::http_status`]): the server derives the status from the code instead
//! of keeping a second table.

use serde::{Deserialize, Serialize};

kiln_spec::string_enum! {
    /// A stable, machine-readable reason for a failed request.
    pub enum ApiErrorCode {
        /// The request is malformed or a field is invalid (400).
        InvalidRequest => "invalid_request",
        /// A field the SDKs send that kiln does not implement was set (400).
        Unsupported => "unsupported",
        /// The guest refused a file operation for lack of permission (400).
        PermissionDenied => "permission_denied",
        /// No valid API key or access token (401).
        Unauthorized => "unauthorized",
        /// No such object, or another team's (404).
        NotFound => "not_found",
        /// No such file in the sandbox (404).
        FileNotFound => "file_not_found",
        /// No such endpoint (404).
        NoRoute => "no_route",
        /// The endpoint exists but not for this method (405).
        MethodNotAllowed => "method_not_allowed",
        /// The object's state does not allow this now (409).
        Conflict => "conflict",
        /// The template has no ready build (409).
        NotReady => "not_ready",
        /// The sandbox's VM is not running here (409).
        NotRunning => "not_running",
        /// The body or the result is larger than allowed (413).
        PayloadTooLarge => "payload_too_large",
        /// The body's content type is not accepted (415).
        UnsupportedMediaType => "unsupported_media_type",
        /// Too many requests for this key or token (429).
        RateLimited => "rate_limited",
        /// The team's limit of concurrent builds is reached (429).
        TooManyBuilds => "too_many_builds",
        /// The team's limit of templates is reached (429).
        TooManyTemplates => "too_many_templates",
        /// The team's limit of live sandboxes is reached (429).
        TooManySandboxes => "too_many_sandboxes",
        /// The team's limit of snapshots is reached (429).
        TooManySnapshots => "too_many_snapshots",
        /// Anything unexpected; the detail is in the server's log, not the response (500).
        Internal => "internal",
        /// A running sandbox could not be captured (500).
        SnapshotFailed => "snapshot_failed",
        /// A sandbox could not be started from its snapshot (500).
        RestoreFailed => "restore_failed",
        /// The guest agent failed the operation (502).
        AgentError => "agent_error",
        /// The guest agent did not answer (502).
        AgentUnreachable => "agent_unreachable",
        /// The sandbox is paused (or pausing, resuming): the SDKs resume it and retry (503).
        SandboxUnavailable => "sandbox_unavailable",
    }
}

impl ApiErrorCode {
    /// The HTTP status that goes with the code.
    pub const fn http_status(self) -> u16 {
        use ApiErrorCode::*;
        match self {
            InvalidRequest | Unsupported | PermissionDenied => 400,
            Unauthorized => 401,
            NotFound | FileNotFound | NoRoute => 404,
            MethodNotAllowed => 405,
            Conflict | NotReady | NotRunning => 409,
            PayloadTooLarge => 413,
            UnsupportedMediaType => 415,
            RateLimited | TooManyBuilds | TooManyTemplates | TooManySandboxes
            | TooManySnapshots => 429,
            Internal | SnapshotFailed | RestoreFailed => 500,
            AgentError | AgentUnreachable => 502,
            SandboxUnavailable => 503,
        }
    }

    /// The code for a bare HTTP status that carries none (a framework's own rejection,
    /// or a proxy in between): the generic code of that status class.
    pub const fn for_status(status: u16) -> Self {
        match status {
            401 | 403 => Self::Unauthorized,
            404 => Self::NotFound,
            405 => Self::MethodNotAllowed,
            409 => Self::Conflict,
            413 => Self::PayloadTooLarge,
            415 => Self::UnsupportedMediaType,
            429 => Self::RateLimited,
            s if s >= 500 => Self::Internal,
            _ => Self::InvalidRequest,
        }
    }
}

/// The body of every failed request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong.
    pub error: ErrorDetail,
}

/// The inside of [`ErrorBody`]. `code` is a string rather than [`ApiErrorCode`] so that a
/// client reads codes it does not know yet (from a newer server) instead of failing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// Stable machine-readable code, one of [`ApiErrorCode`] from this server.
    pub code: String,
    /// For people. Never internal detail.
    pub message: String,
}

impl ErrorBody {
    /// A body with this code and message.
    pub fn new(code: ApiErrorCode, message: impl Into<String>) -> Self {
        Self {
            error: ErrorDetail {
                code: code.as_str().to_owned(),
                message: message.into(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The strings are a contract with every client: changing one is a breaking change.
    #[test]
    fn stable_strings_and_statuses() {
        let all: Vec<_> = ApiErrorCode::ALL
            .iter()
            .map(|c| (c.as_str(), c.http_status()))
            .collect();
        assert_eq!(
            all,
            [
                ("invalid_request", 400),
                ("unsupported", 400),
                ("permission_denied", 400),
                ("unauthorized", 401),
                ("not_found", 404),
                ("file_not_found", 404),
                ("no_route", 404),
                ("method_not_allowed", 405),
                ("conflict", 409),
                ("not_ready", 409),
                ("not_running", 409),
                ("payload_too_large", 413),
                ("unsupported_media_type", 415),
                ("rate_limited", 429),
                ("too_many_builds", 429),
                ("too_many_templates", 429),
                ("too_many_sandboxes", 429),
                ("too_many_snapshots", 429),
                ("internal", 500),
                ("snapshot_failed", 500),
                ("restore_failed", 500),
                ("agent_error", 502),
                ("agent_unreachable", 502),
                ("sandbox_unavailable", 503),
            ]
        );
    }

    #[test]
    fn every_code_round_trips() {
        for code in ApiErrorCode::ALL {
            assert_eq!(code.as_str().parse::<ApiErrorCode>().unwrap(), *code);
            // A bare status maps back into its own class (4xx stays 4xx, 5xx stays 5xx).
            assert_eq!(
                ApiErrorCode::for_status(code.http_status()).http_status() / 100,
                code.http_status() / 100
            );
        }
    }

    #[test]
    fn error_body_shape() {
        let body = ErrorBody::new(ApiErrorCode::NotFound, "no such sandbox");
        assert_eq!(
            serde_json::to_value(&body).unwrap(),
            serde_json::json!({"error": {"code": "not_found", "message": "no such sandbox"}})
        );
    }
}
