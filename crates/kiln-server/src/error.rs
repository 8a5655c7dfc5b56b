//! Every failure as the SDKs expect it: a status and `{"error": {"code", "message"}}`,
//! mapped from the engine's typed errors in one place.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use kiln_agent_proto::{ClientError, ErrorCode};
use kiln_engine::EngineError;
use kiln_spec::RateLimitCode;
use kiln_store::StoreError;

/// An error response.
#[derive(Debug)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable machine-readable code.
    pub code: &'static str,
    /// For humans. Never internal detail: that goes to the log.
    pub message: String,
    /// Seconds for a `Retry-After` header.
    pub retry_after: Option<u64>,
}

impl ApiError {
    /// A response with this status, code and message.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    /// 400 `invalid_request`.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }

    /// 401 `unauthorized`.
    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "a valid X-API-Key header is required",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({"error": {"code": self.code, "message": self.message}});
        let mut resp = (self.status, axum::Json(body)).into_response();
        if let Some(secs) = self.retry_after {
            resp.headers_mut()
                .insert(axum::http::header::RETRY_AFTER, secs.into());
        }
        resp
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::Invalid(problems) => Self::bad_request(problems.to_string()),
            EngineError::NotReady { .. } => {
                Self::new(StatusCode::CONFLICT, "not_ready", e.to_string())
            }
            EngineError::NotRunning(_) | EngineError::OwnedByServer { .. } => {
                Self::new(StatusCode::CONFLICT, "not_running", e.to_string())
            }
            // The SDK resumes the sandbox (POST /activate) and retries on this one.
            EngineError::Unavailable(_) => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "sandbox_unavailable",
                e.to_string(),
            ),
            EngineError::Snapshot(_) => {
                tracing::warn!(error = %e, "pause failed");
                Self::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "snapshot_failed",
                    "pausing the sandbox failed; it could not be saved",
                )
            }
            EngineError::CorruptArtifact(_) => {
                tracing::error!(error = %e, "template artifact failed verification");
                Self::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "restore_failed",
                    "the template's snapshot failed its checksum check (corrupt on disk): \
                     rebuild the template",
                )
            }
            EngineError::Restore(_) => {
                tracing::warn!(error = %e, "restore failed");
                Self::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "restore_failed",
                    "the sandbox could not be started from its snapshot",
                )
            }
            EngineError::Store(store) => store.into(),
            EngineError::Agent(agent) => agent.into(),
            other => internal(&other),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match &e {
            StoreError::NotFound { .. } => {
                Self::new(StatusCode::NOT_FOUND, "not_found", e.to_string())
            }
            StoreError::Conflict(m) => Self::new(StatusCode::CONFLICT, "conflict", m.clone()),
            StoreError::InvalidTransition { .. } => {
                Self::new(StatusCode::CONFLICT, "conflict", e.to_string())
            }
            StoreError::Invalid(m) => Self::bad_request(m.clone()),
            // The code is the machine-readable part; the message says it for people once.
            StoreError::LimitReached { code, limit } => {
                let what = match code {
                    RateLimitCode::TooManyTemplates => "templates",
                    RateLimitCode::TooManyBuilds => "builds queued or running",
                    RateLimitCode::TooManySandboxes => "live sandboxes",
                    _ => "requests",
                };
                Self::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    code.as_str(),
                    format!("the team's limit of {limit} {what} is reached"),
                )
            }
            _ => internal(&e),
        }
    }
}

impl From<crate::ratelimit::RateLimited> for ApiError {
    fn from(r: crate::ratelimit::RateLimited) -> Self {
        let secs = r.retry_after_secs();
        let mut e = Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            kiln_spec::RateLimitCode::RateLimited.as_str(),
            format!("too many requests; retry in {secs}s"),
        );
        e.retry_after = Some(secs);
        e
    }
}

/// An agent failure as a response: what the caller did wrong is a 4xx with a code, a lost
/// connection to the guest is a 502.
impl From<ClientError> for ApiError {
    fn from(e: ClientError) -> Self {
        match e {
            ClientError::Agent { code, message } => {
                let (status, code) = match code {
                    ErrorCode::NotFound => (StatusCode::NOT_FOUND, "file_not_found"),
                    ErrorCode::PermissionDenied => (StatusCode::BAD_REQUEST, "permission_denied"),
                    ErrorCode::FrameTooLarge => {
                        (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large")
                    }
                    ErrorCode::IsADirectory
                    | ErrorCode::NotADirectory
                    | ErrorCode::AlreadyExists
                    | ErrorCode::DirectoryNotEmpty
                    | ErrorCode::InvalidRequest
                    | ErrorCode::UserNotFound
                    | ErrorCode::SpawnFailed => (StatusCode::BAD_REQUEST, "invalid_request"),
                    _ => (StatusCode::BAD_GATEWAY, "agent_error"),
                };
                ApiError::new(status, code, message)
            }
            other => {
                tracing::warn!(error = %other, "guest agent unreachable");
                ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    "agent_unreachable",
                    "the sandbox's guest agent did not answer",
                )
            }
        }
    }
}

/// 500 with the detail logged, not sent.
fn internal(e: &(dyn std::error::Error + 'static)) -> ApiError {
    let mut chain = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        chain.push_str(": ");
        chain.push_str(&s.to_string());
        cur = s.source();
    }
    tracing::error!(error = %chain, "internal error");
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        "internal error",
    )
}
