//! The one error type of kiln-vm, with the build error code each failure maps to.

use std::path::PathBuf;

use kiln_spec::BuildErrorCode;

use crate::tool::ToolError;

/// Everything that can go wrong driving a VM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or directory operation failed.
    #[error("{what} {}", path.display())]
    Io {
        /// What was being done ("create", "read", ...).
        what: &'static str,
        /// On which path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// An external tool (qemu-img, mke2fs, debugfs, apt-get, ...) failed.
    #[error("tool failed")]
    Tool(#[from] ToolError),
    /// Provisioning is incomplete: a kernel, initramfs or tool is missing.
    #[error("not provisioned: {0} (run `kiln setup`)")]
    NotProvisioned(String),
    /// The agent binary could not be found or is unusable.
    #[error("agent binary: {0}")]
    AgentBinary(String),
    /// The rootfs does not fit in the requested disk size.
    #[error("rootfs does not fit in a {disk_mib} MiB disk")]
    DiskTooSmall {
        /// The requested size.
        disk_mib: u64,
        /// mke2fs's complaint.
        #[source]
        source: ToolError,
    },
    /// QEMU could not be started.
    #[error("cannot start qemu")]
    Spawn(#[source] std::io::Error),
    /// A VM's process could not be jailed (or started in its jail).
    #[error("jail")]
    Jail(#[from] crate::jail::JailError),
    /// The guest did not reach the agent in time, or QEMU died while booting.
    #[error("guest did not become ready: {reason}; console tail:\n{console}")]
    Boot {
        /// Why (timeout, exit status).
        reason: String,
        /// The last lines of the serial console.
        console: String,
    },
    /// QEMU exited (crashed or was killed) while a call was pending.
    #[error("qemu exited ({status}); console tail:\n{console}")]
    Exited {
        /// How it exited.
        status: String,
        /// The last lines of the serial console.
        console: String,
    },
    /// A QMP exchange failed.
    #[error("qmp")]
    Qmp(#[from] crate::qmp::QmpError),
    /// Talking to the guest agent failed.
    #[error("agent")]
    Agent(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// Capturing the VM failed.
    #[error("snapshot failed: {0}")]
    Snapshot(String),
    /// Writing the snapshot's files failed (a full disk, a failed copy): the cause below.
    #[error("snapshot failed while writing its files")]
    SnapshotFiles(#[source] Box<Error>),
    /// A snapshot bundle is unusable (missing file, bad manifest, checksum mismatch).
    #[error("snapshot bundle {}: {reason}", path.display())]
    Bundle {
        /// The bundle directory.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Restoring a snapshot failed.
    #[error("restore failed: {0}")]
    Restore(String),
    /// A configuration value is invalid.
    #[error("invalid config: {0}")]
    Config(String),
}

impl Error {
    /// The build error code this failure is reported as.
    pub fn code(&self) -> BuildErrorCode {
        match self {
            Self::DiskTooSmall { .. } => BuildErrorCode::ImageTooLarge,
            Self::Boot { .. }
            | Self::Spawn(_)
            | Self::Jail(_)
            | Self::NotProvisioned(_)
            | Self::AgentBinary(_) => BuildErrorCode::BootFailed,
            Self::Snapshot(_) | Self::SnapshotFiles(_) => BuildErrorCode::SnapshotFailed,
            _ => BuildErrorCode::BuildFailed,
        }
    }

    pub(crate) fn io(
        what: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| Self::Io { what, path, source }
    }
}

/// kiln-vm's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
