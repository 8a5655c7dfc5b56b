//! kiln's HTTP wire format, in one place: the request and response types of every route,
//! the statuses of templates, builds, sandboxes and snapshots, log, exec and network events,
//! team secrets and their audit, and the API's error codes. The server produces these, the
//! Rust SDK and the CLI's remote mode consume them, and the engine converts its records into
//! them, so the format is written once.
//!
//! The format is Superserve's (snake_case JSON, its statuses and error body): ground truth
//! is the official Python SDK `superserve==0.11.4` (`types.py`, `sandbox.py`) and
//! `reference/` in the shared design folder. Nothing here does I/O.

pub mod codes;
pub mod exec;
pub mod files;
pub mod network;
pub mod preview;
pub mod request;
pub mod sandboxes;
pub mod secrets;
pub mod snapshots;
pub mod status;
pub mod templates;
pub mod time;

pub use codes::{ApiErrorCode, ErrorBody, ErrorDetail};
pub use exec::{
    ExecEvent, ExecRequest, ExecResult, SessionControl, TerminalSize, Utf8Chunks, EXEC_SUBPROTOCOL,
};
pub use files::FilesQuery;
pub use network::{
    Before, NetworkConfig, NetworkEvent, NetworkLogPage, NetworkLogQuery, NetworkVerdict,
};
pub use preview::{
    PortAccess, PreviewAccess, PreviewPortList, PreviewSite, PreviewToken, PreviewTokenRequest,
    PublishPreviewPort, PublishedPreviewPort,
};
pub use request::RequestError;
pub use sandboxes::{CreateSandbox, SandboxFilter, SandboxInfo, SandboxWithToken, UpdateSandbox};
pub use secrets::{
    AttachSecret, AuditQuery, AuthRule, AuthType, CreateSecret, HostPattern, Provider,
    ProviderShortcut, ProxyAuditEvent, RotateSecret, SandboxSecretBinding, SecretAuth, SecretInfo,
    SecretSandboxBinding, SecretSpec, TokenShape,
};
pub use snapshots::{
    CreateSnapshot, SnapshotInfo, SnapshotPage, SnapshotResources, UpdateSnapshot,
};
pub use status::{BuildStatus, LogStream, SandboxStatus, SnapshotStatus, TemplateStatus};
pub use templates::{
    BuildInfo, BuildLogEvent, CreatedTemplate, SpecValidation, TemplateInfo, DEFAULT_TEMPLATE,
    SYSTEM_PREFIX,
};

/// The BuildSpec types, re-exported: a template's spec is part of the wire format.
pub use kiln_spec::{
    error_chain, BuildErrorCode, BuildSpec, CodedMessage, Form, ResourceRequest, Resources, Step,
    TemplateRequest,
};
