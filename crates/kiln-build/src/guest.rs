//! What the build needs from a running build VM, as a trait.
//!
//! The step semantics (users, workdirs, env accumulation, the start/ready dance) are the
//! subtle part of a build and are tested against a fake guest; the real implementation
//! sits on the agent client of `kiln-agent-proto`.

use std::time::Duration;

use async_trait::async_trait;

/// A command for `/bin/sh -c` in the guest.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Command {
    /// The shell script.
    pub script: String,
    /// Environment, complete (not merged with anything by the guest).
    pub env: Vec<(String, String)>,
    /// Working directory.
    pub cwd: String,
    /// User name to run as.
    pub user: String,
    /// Killed after this long.
    pub timeout: Option<Duration>,
}

/// How a guest process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Exited with this code.
    Code(i32),
    /// Killed by this signal.
    Signal(i32),
}

impl Exit {
    /// Exit code 0.
    pub fn success(self) -> bool {
        self == Exit::Code(0)
    }
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Exit::Code(c) => write!(f, "exit code {c}"),
            Exit::Signal(s) => write!(f, "signal {s}"),
        }
    }
}

/// Which output a chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputStream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// A failure to talk to the guest (not a command failing: that is an [`Exit`]).
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct GuestError {
    /// What went wrong.
    pub message: String,
    /// The transport error below, if any.
    #[source]
    pub source: Option<Box<dyn std::error::Error + Send + Sync>>,
    /// The VM or the connection to its agent is gone (as opposed to the agent refusing
    /// one request): the build cannot go on, and it is not the step's fault.
    pub vm_gone: bool,
}

impl GuestError {
    /// An error with a message and no cause.
    pub fn msg(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            source: None,
            vm_gone: false,
        }
    }
}

/// A running build VM, reached through its agent.
#[async_trait]
pub trait Guest: Send + Sync {
    /// Runs a command to completion, handing each output chunk to `on_output` as it comes.
    async fn run(
        &self,
        cmd: &Command,
        on_output: &mut (dyn for<'b> FnMut(OutputStream, &'b [u8]) + Send),
    ) -> Result<Exit, GuestError>;

    /// Starts a command that outlives this call, its output going to `log_path` in the
    /// guest. Returns its pid.
    async fn spawn(&self, cmd: &Command, log_path: &str) -> Result<u32, GuestError>;

    /// `None` while the process runs; how it ended once it has.
    async fn exit_status(&self, pid: u32) -> Result<Option<Exit>, GuestError>;
}
