//! What can go wrong when the engine is asked to do something.

use kiln_agent_proto::{ClientError, ErrorCode};
use kiln_api::{ApiErrorCode, RequestError};
use kiln_spec::Problems;
use kiln_store::{ArtifactError, Limit, StoreError};

/// An engine failure. The CLI prints it; the server maps it to a status and an API code
/// in one place.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The spec is invalid; every problem is listed.
    #[error("invalid spec:\n{0}")]
    Invalid(Problems),
    /// A request failed its checks before anything was done.
    #[error("{0}")]
    Request(#[from] RequestError),
    /// The store refused or failed (not found, conflict, limits, database).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// An artifact on disk is missing or corrupt.
    #[error("template artifact is unusable")]
    Artifact(#[from] ArtifactError),
    /// The template has no ready build to start sandboxes from.
    #[error("template {name} is not ready (status {status})")]
    NotReady {
        /// Template name.
        name: String,
        /// Its status.
        status: String,
    },
    /// The snapshot is not ready to start sandboxes from (still being made, or failed).
    #[error("snapshot {id} is {status}, not ready")]
    SnapshotNotReady {
        /// The snapshot.
        id: String,
        /// Its status.
        status: String,
    },
    /// The object's state does not allow the request (pausing a paused sandbox, resuming
    /// a running one, capturing a failed one).
    #[error("{0}")]
    Conflict(String),
    /// The host is not provisioned for VMs (`kiln setup` has not run).
    #[error("kiln is not set up for VMs; run `kiln setup`")]
    Setup(#[source] kiln_vm::Error),
    /// The image store could not be opened.
    #[error("image store unavailable")]
    Images(#[source] kiln_oci::OciError),
    /// A snapshot failed its checksum check: no VM was started from it.
    #[error("the snapshot is corrupt")]
    CorruptArtifact(#[source] kiln_vm::Error),
    /// Restoring a sandbox from its template's snapshot failed.
    #[error("restoring the sandbox failed")]
    Restore(#[source] kiln_vm::Error),
    /// The sandbox's VM is not running.
    #[error("sandbox {0} is not running")]
    NotRunning(String),
    /// The sandbox's VM is run by a `kiln serve` process, which keeps its agent channel.
    #[error("sandbox {sandbox} is run by kiln serve (pid {pid}); use the API")]
    OwnedByServer {
        /// The sandbox.
        sandbox: String,
        /// The server's pid.
        pid: u32,
    },
    /// The sandbox is paused (or on its way there or back); resume it to use it.
    #[error("sandbox {0} is paused; resume or activate it")]
    Unavailable(String),
    /// Pausing a sandbox failed while taking its snapshot; the sandbox is lost.
    #[error("pausing the sandbox failed")]
    Snapshot(#[source] kiln_vm::Error),
    /// Taking a snapshot of a sandbox failed; the sandbox runs on (or stays paused) and
    /// the snapshot is `failed`.
    #[error("capturing the sandbox failed")]
    Capture(#[source] kiln_vm::Error),
    /// The access token is not the sandbox's (it rotates on resume).
    #[error("the access token is not this sandbox's (it rotates on resume)")]
    WrongToken,
    /// The guest refused an operation (a missing file, a bad path, a command that could
    /// not start).
    #[error("{message}")]
    Guest {
        /// What kind of refusal.
        kind: GuestError,
        /// The guest's message.
        message: String,
    },
    /// The guest's agent could not be reached, or the connection broke.
    #[error("guest agent unreachable")]
    Agent(#[source] ClientError),
    /// The step cache could not be pruned.
    #[error("step cache")]
    StepCache(#[source] kiln_build::StepCacheError),
    /// A body or a result is larger than allowed.
    #[error("{0}")]
    TooLarge(String),
    /// The secrets key could not be used, or a sealed value did not open.
    #[error("secrets key")]
    Seal(#[from] kiln_net::seal::SealError),
    /// kiln's egress CA could not be made or read.
    #[error("egress CA")]
    Ca(#[from] kiln_net::ca::CaError),
    /// A setting of the operator's is unusable (named, with why).
    #[error("{0}")]
    Config(String),
    /// Host I/O.
    #[error("{what} {path}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// On which path.
        path: std::path::PathBuf,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
}

/// Kinds of [`EngineError::Guest`], as a caller acts on them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestError {
    /// No such file or directory.
    FileNotFound,
    /// The guest user may not do this.
    PermissionDenied,
    /// The caller asked for something the guest cannot do with this input (a directory
    /// where a file was expected, an unknown user, a command that did not start).
    BadRequest,
    /// The guest failed for its own reasons.
    Failed,
}

impl From<ClientError> for EngineError {
    /// What the caller did wrong is a [`EngineError::Guest`]; a lost connection is
    /// [`EngineError::Agent`].
    fn from(e: ClientError) -> Self {
        match e {
            ClientError::Agent { code, message } => {
                let kind = match code {
                    ErrorCode::NotFound => GuestError::FileNotFound,
                    ErrorCode::PermissionDenied => GuestError::PermissionDenied,
                    ErrorCode::FrameTooLarge => return Self::TooLarge(message),
                    ErrorCode::IsADirectory
                    | ErrorCode::NotADirectory
                    | ErrorCode::AlreadyExists
                    | ErrorCode::DirectoryNotEmpty
                    | ErrorCode::InvalidRequest
                    | ErrorCode::UserNotFound
                    | ErrorCode::SpawnFailed => GuestError::BadRequest,
                    _ => GuestError::Failed,
                };
                Self::Guest { kind, message }
            }
            other => Self::Agent(other),
        }
    }
}

impl EngineError {
    /// A failed restore: a bundle that failed verification is told apart, since
    /// retrying cannot help (the template needs a rebuild).
    pub(crate) fn restore(e: kiln_vm::Error) -> Self {
        match e {
            kiln_vm::Error::Bundle { .. } => Self::CorruptArtifact(e),
            e => Self::Restore(e),
        }
    }

    pub(crate) fn io(
        what: &'static str,
        path: &std::path::Path,
    ) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.to_owned();
        move |source| Self::Io { what, path, source }
    }

    /// The error and its causes on one line (`a: b: c`), for logs and terminals.
    pub fn chain(&self) -> String {
        kiln_vm::error_chain(self)
    }

    /// The API's stable code for this failure (its HTTP status follows from it).
    pub fn code(&self) -> ApiErrorCode {
        use ApiErrorCode as C;
        match self {
            Self::Invalid(_) => C::InvalidRequest,
            Self::Request(r) => r.code,
            Self::Store(s) => match s {
                StoreError::NotFound { .. } => C::NotFound,
                StoreError::Conflict(_) | StoreError::InvalidTransition { .. } => C::Conflict,
                StoreError::Invalid(_) => C::InvalidRequest,
                StoreError::LimitReached { which, .. } => match which {
                    Limit::Templates => C::TooManyTemplates,
                    Limit::Builds => C::TooManyBuilds,
                    Limit::Sandboxes => C::TooManySandboxes,
                    Limit::Snapshots => C::TooManySnapshots,
                },
                _ => C::Internal,
            },
            Self::NotReady { .. } | Self::SnapshotNotReady { .. } => C::NotReady,
            Self::Conflict(_) => C::Conflict,
            Self::NotRunning(_) | Self::OwnedByServer { .. } => C::NotRunning,
            // The SDKs resume the sandbox (POST /activate) and retry on this one.
            Self::Unavailable(_) => C::SandboxUnavailable,
            Self::Snapshot(_) | Self::Capture(_) => C::SnapshotFailed,
            Self::CorruptArtifact(_) | Self::Restore(_) => C::RestoreFailed,
            Self::WrongToken => C::Unauthorized,
            Self::Guest { kind, .. } => match kind {
                GuestError::FileNotFound => C::FileNotFound,
                GuestError::PermissionDenied => C::PermissionDenied,
                GuestError::BadRequest => C::InvalidRequest,
                GuestError::Failed => C::AgentError,
            },
            Self::Agent(_) => C::AgentUnreachable,
            Self::TooLarge(_) => C::PayloadTooLarge,
            Self::Artifact(_)
            | Self::Setup(_)
            | Self::Images(_)
            | Self::StepCache(_)
            | Self::Seal(_)
            | Self::Ca(_)
            | Self::Config(_)
            | Self::Io { .. } => C::Internal,
        }
    }

    /// What a client may be told. A failure of the caller's making says what it is; a
    /// failure of kiln's own says what it means for the caller, and its detail (paths,
    /// QEMU's words) is for the server's log only.
    pub fn public_message(&self) -> String {
        match self {
            Self::Snapshot(_) => "pausing the sandbox failed; it could not be saved".into(),
            Self::Capture(_) => "the snapshot could not be taken (it is failed); the sandbox \
                                is as it was"
                .into(),
            Self::CorruptArtifact(_) => "the template's snapshot failed its checksum check \
                                        (corrupt on disk): rebuild the template"
                .into(),
            Self::Restore(_) => "the sandbox could not be started from its snapshot".into(),
            Self::Agent(_) => "the sandbox's guest agent did not answer".into(),
            Self::Store(StoreError::NotFound { .. }) => self.to_string(),
            e if e.code() == ApiErrorCode::Internal => "internal error".into(),
            e => e.to_string(),
        }
    }
}

/// Engine results.
pub type Result<T, E = EngineError> = std::result::Result<T, E>;
