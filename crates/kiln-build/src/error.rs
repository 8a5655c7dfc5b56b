//! A failed build: a stable code and a detail for the user.

use kiln_spec::{BuildErrorCode, CodedMessage};

/// Why a build failed. Displays as `"<code>: <detail>"`, the build's `error_message`.
#[derive(Debug, thiserror::Error)]
#[error("{code}: {detail}")]
pub struct BuildError {
    /// The stable code.
    pub code: BuildErrorCode,
    /// What happened, for the user; internal detail goes to the logs via `source`.
    pub detail: String,
    /// The underlying error, for logs.
    #[source]
    pub source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl BuildError {
    /// A failure with a code and a detail.
    pub fn new(code: BuildErrorCode, detail: impl Into<String>) -> Self {
        Self {
            code,
            detail: detail.into(),
            source: None,
        }
    }

    /// Attaches the underlying error.
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    /// The `"<code>: <detail>"` message.
    pub fn message(&self) -> CodedMessage {
        CodedMessage::new(self.code, self.detail.clone())
    }
}
