//! Every failure as the SDKs expect it: a status and `{"error": {"code", "message"}}`.
//!
//! The engine says which [`ApiErrorCode`] a failure is and what a client may be told
//! ([`EngineError::code`], [`EngineError::public_message`]); the code fixes the status
//! ([`ApiErrorCode::http_status`]). This file only turns that into a response, and logs
//! the detail of failures that are kiln's own.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use kiln_api::{ApiErrorCode, ErrorBody, RequestError};
use kiln_engine::EngineError;

/// An error response.
#[derive(Debug)]
pub struct ApiError {
    /// Stable machine-readable code; the status follows from it.
    pub code: ApiErrorCode,
    /// For humans. Never internal detail: that goes to the log.
    pub message: String,
    /// Seconds for a `Retry-After` header.
    pub retry_after: Option<u64>,
}

impl ApiError {
    /// A response with this code and message.
    pub fn new(code: ApiErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    /// 400 `invalid_request`.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ApiErrorCode::InvalidRequest, message)
    }

    /// 401 `unauthorized`.
    pub fn unauthorized() -> Self {
        Self::new(
            ApiErrorCode::Unauthorized,
            "a valid X-API-Key header is required",
        )
    }

    /// The response's status.
    pub fn status(&self) -> StatusCode {
        StatusCode::from_u16(self.code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let mut resp =
            (status, axum::Json(ErrorBody::new(self.code, self.message))).into_response();
        if let Some(secs) = self.retry_after {
            resp.headers_mut()
                .insert(axum::http::header::RETRY_AFTER, secs.into());
        }
        resp
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        let code = e.code();
        if code.http_status() >= 500 {
            tracing::warn!(%code, error = %e.chain(), "request failed");
        }
        Self::new(code, e.public_message())
    }
}

impl From<RequestError> for ApiError {
    fn from(e: RequestError) -> Self {
        Self::new(e.code, e.message)
    }
}

impl From<crate::ratelimit::RateLimited> for ApiError {
    fn from(r: crate::ratelimit::RateLimited) -> Self {
        let secs = r.retry_after_secs();
        let mut e = Self::new(
            ApiErrorCode::RateLimited,
            format!("too many requests; retry in {secs}s"),
        );
        e.retry_after = Some(secs);
        e
    }
}
