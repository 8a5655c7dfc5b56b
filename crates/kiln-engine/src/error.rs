//! What can go wrong when the engine is asked to do something.

use kiln_spec::Problems;
use kiln_store::{ArtifactError, StoreError};

/// An engine failure. The CLI prints it; the server maps it to a status in one place.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The spec is invalid; every problem is listed.
    #[error("invalid spec:\n{0}")]
    Invalid(Problems),
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
    /// The host is not provisioned for VMs (`kiln setup` has not run).
    #[error("kiln is not set up for VMs; run `kiln setup`")]
    Setup(#[source] kiln_vm::Error),
    /// The image store could not be opened.
    #[error("image store unavailable")]
    Images(#[source] kiln_oci::OciError),
    /// A snapshot failed its checksum check: no VM was started from it.
    #[error("the snapshot is corrupt: {}", kiln_vm::error_chain(.0))]
    CorruptArtifact(#[source] kiln_vm::Error),
    /// Restoring a sandbox from its template's snapshot failed.
    #[error("restoring the sandbox failed: {}", kiln_vm::error_chain(.0))]
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
    #[error("pausing the sandbox failed: {}", kiln_vm::error_chain(.0))]
    Snapshot(#[source] kiln_vm::Error),
    /// Talking to a guest agent failed.
    #[error("guest agent: {0}")]
    Agent(#[source] kiln_agent_proto::ClientError),
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
}

/// Engine results.
pub type Result<T, E = EngineError> = std::result::Result<T, E>;
