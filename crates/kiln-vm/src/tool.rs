//! Small typed wrappers around the external tools kiln-vm drives.
//!
//! Every tool failure carries the full command line, the exit status and the tail of
//! stderr, so a `boot_failed` or `snapshot_failed` in a build log is diagnosable without
//! re-running anything.

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::path::Path;
use std::process::{ExitStatus, Output, Stdio};

/// How much of a failing tool's stderr is kept in the error (the end is what matters).
const STDERR_TAIL: usize = 4096;

/// An external tool that failed to start or exited unsuccessfully.
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    /// The program could not be started (missing binary, permissions).
    #[error("cannot run `{command}`")]
    Spawn {
        /// The command line.
        command: String,
        /// Why the spawn failed.
        #[source]
        source: std::io::Error,
    },
    /// The program ran and exited unsuccessfully.
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        /// The command line.
        command: String,
        /// How it exited.
        status: ExitStatus,
        /// The tail of what it wrote to stderr (trimmed).
        stderr: String,
    },
}

impl ToolError {
    /// The stderr of a failed run (empty for a spawn failure).
    pub fn stderr(&self) -> &str {
        match self {
            Self::Spawn { .. } => "",
            Self::Failed { stderr, .. } => stderr,
        }
    }
}

/// A command line for an external tool, built up and then run to completion.
pub struct Tool {
    program: OsString,
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
}

impl fmt::Debug for Tool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.display())
    }
}

impl Tool {
    /// A new command for `program` (looked up on `PATH`).
    pub fn new(program: impl AsRef<OsStr>) -> Self {
        Self {
            program: program.as_ref().to_owned(),
            args: Vec::new(),
            env: Vec::new(),
        }
    }

    /// Appends one argument.
    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    /// Appends several arguments.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    /// Sets an environment variable for the child.
    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.env
            .push((key.as_ref().to_owned(), value.as_ref().to_owned()));
        self
    }

    /// The command line as a shell-ish string, for errors and logs.
    pub fn display(&self) -> String {
        let mut s = self.program.to_string_lossy().into_owned();
        for a in &self.args {
            s.push(' ');
            let a = a.to_string_lossy();
            if a.contains([' ', '"', '\'']) || a.is_empty() {
                s.push_str(&format!("{a:?}"));
            } else {
                s.push_str(&a);
            }
        }
        s
    }

    fn command(&self) -> std::process::Command {
        let mut cmd = std::process::Command::new(&self.program);
        cmd.args(&self.args).stdin(Stdio::null());
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd
    }

    /// Runs to completion (blocking) and returns stdout; fails on a non-zero exit.
    pub fn run(&self) -> Result<Vec<u8>, ToolError> {
        self.run_in(None)
    }

    /// Like [`Tool::run`] with a working directory.
    pub fn run_in(&self, cwd: Option<&Path>) -> Result<Vec<u8>, ToolError> {
        let mut cmd = self.command();
        if let Some(cwd) = cwd {
            cmd.current_dir(cwd);
        }
        tracing::debug!(command = %self.display(), "running tool");
        let out = cmd.output().map_err(|source| ToolError::Spawn {
            command: self.display(),
            source,
        })?;
        self.check(out)
    }

    /// Runs to completion on tokio's blocking pool.
    pub async fn run_async(self) -> Result<Vec<u8>, ToolError> {
        let display = self.display();
        match tokio::task::spawn_blocking(move || self.run()).await {
            Ok(r) => r,
            Err(e) => Err(ToolError::Spawn {
                command: display,
                source: std::io::Error::other(e),
            }),
        }
    }

    fn check(&self, out: Output) -> Result<Vec<u8>, ToolError> {
        if out.status.success() {
            return Ok(out.stdout);
        }
        Err(ToolError::Failed {
            command: self.display(),
            status: out.status,
            stderr: tail(&out.stderr),
        })
    }
}

/// The last [`STDERR_TAIL`] bytes of `bytes` as trimmed text.
fn tail(bytes: &[u8]) -> String {
    let start = bytes.len().saturating_sub(STDERR_TAIL);
    String::from_utf8_lossy(&bytes[start..]).trim().to_owned()
}

/// Whether `program` is on `PATH` (or is an existing path).
pub fn which(program: &str) -> Option<std::path::PathBuf> {
    if program.contains('/') {
        let p = Path::new(program);
        return p.is_file().then(|| p.to_owned());
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}
