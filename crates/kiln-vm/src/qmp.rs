//! A small typed QMP client over QEMU's unix socket.
//!
//! One command in flight at a time (QMP answers in order); asynchronous events that
//! arrive between are logged and skipped.

use std::os::fd::{AsFd as _, AsRawFd as _, BorrowedFd};
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

/// The name migration descriptors are handed to QEMU under.
const MIGRATION_FD: &str = "kiln-migration";

/// A QMP failure.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// Socket I/O failed (usually: QEMU exited).
    #[error("qmp i/o")]
    Io(#[from] std::io::Error),
    /// QEMU closed the connection.
    #[error("qmp connection closed")]
    Closed,
    /// A reply was not valid QMP JSON.
    #[error("bad qmp reply: {0}")]
    Protocol(String),
    /// QEMU answered a command with an error.
    #[error("qmp `{command}` failed: {class}: {desc}")]
    Command {
        /// The command.
        command: String,
        /// QMP error class.
        class: String,
        /// QMP error description.
        desc: String,
    },
    /// A migration ended in `failed` or `cancelled`.
    #[error("migration {status}: {error}")]
    Migration {
        /// Final status.
        status: String,
        /// QEMU's error description, if any.
        error: String,
    },
    /// Waiting for QEMU took too long.
    #[error("qmp timed out waiting for {0}")]
    Timeout(&'static str),
}

/// The run state reported by `query-status`.
#[derive(Debug, Clone, Deserialize)]
pub struct Status {
    /// e.g. `running`, `paused`, `inmigrate`, `postmigrate`.
    pub status: String,
    /// Whether vCPUs are running.
    pub running: bool,
}

/// The progress of a migration (`query-migrate`).
#[derive(Debug, Clone, Deserialize, Default)]
pub struct MigrationInfo {
    /// `none`, `setup`, `active`, `completed`, `failed`, `cancelled`, ...
    #[serde(default)]
    pub status: Option<String>,
    /// Error text when failed.
    #[serde(rename = "error-desc", default)]
    pub error_desc: Option<String>,
    /// Total migration time in ms (when completed).
    #[serde(rename = "total-time", default)]
    pub total_time: Option<u64>,
}

/// A connected, negotiated QMP session.
#[derive(Debug)]
pub struct Qmp {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

impl Qmp {
    /// Connects to `path` (retrying until it exists, up to `timeout`) and negotiates
    /// capabilities.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<Self, QmpError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path).await {
                Ok(s) => break s,
                Err(e) if tokio::time::Instant::now() >= deadline => return Err(e.into()),
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        };
        let (r, w) = stream.into_split();
        let mut qmp = Self {
            reader: BufReader::new(r),
            writer: w,
        };
        let greeting = qmp.read_msg().await?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Protocol(format!("no greeting: {greeting}")));
        }
        qmp.execute("qmp_capabilities", None).await?;
        Ok(qmp)
    }

    async fn read_msg(&mut self) -> Result<Value, QmpError> {
        let mut line = String::new();
        loop {
            line.clear();
            if self.reader.read_line(&mut line).await? == 0 {
                return Err(QmpError::Closed);
            }
            if !line.trim().is_empty() {
                return serde_json::from_str(&line)
                    .map_err(|e| QmpError::Protocol(format!("{e}: {line}")));
            }
        }
    }

    /// Runs one command and returns its `return` value.
    pub async fn execute(
        &mut self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, QmpError> {
        self.execute_with_fd(command, arguments, None).await
    }

    /// [`Qmp::execute`], passing `fd` along with the command (`SCM_RIGHTS`), as `getfd`
    /// wants it.
    async fn execute_with_fd(
        &mut self,
        command: &str,
        arguments: Option<Value>,
        fd: Option<BorrowedFd<'_>>,
    ) -> Result<Value, QmpError> {
        let mut msg = json!({ "execute": command });
        if let Some(a) = arguments {
            msg["arguments"] = a;
        }
        let mut bytes = serde_json::to_vec(&msg).map_err(|e| QmpError::Protocol(e.to_string()))?;
        bytes.push(b'\n');
        match fd {
            None => self.writer.write_all(&bytes).await?,
            Some(fd) => {
                let stream: &UnixStream = self.writer.as_ref();
                let fds = [fd.as_raw_fd()];
                let cmsg = [nix::sys::socket::ControlMessage::ScmRights(&fds)];
                let iov = [std::io::IoSlice::new(&bytes)];
                loop {
                    stream.writable().await?;
                    let sent = stream.try_io(tokio::io::Interest::WRITABLE, || {
                        nix::sys::socket::sendmsg::<()>(
                            stream.as_raw_fd(),
                            &iov,
                            &cmsg,
                            nix::sys::socket::MsgFlags::empty(),
                            None,
                        )
                        .map_err(std::io::Error::from)
                    });
                    match sent {
                        // A command line is far smaller than the socket's buffer.
                        Ok(n) if n == bytes.len() => break,
                        Ok(n) => {
                            self.writer.write_all(&bytes[n..]).await?;
                            break;
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                        Err(e) => return Err(e.into()),
                    }
                }
            }
        }
        loop {
            let reply = self.read_msg().await?;
            if let Some(ev) = reply.get("event") {
                tracing::debug!(event = %ev, "qmp event");
                continue;
            }
            if let Some(r) = reply.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = reply.get("error") {
                return Err(QmpError::Command {
                    command: command.to_owned(),
                    class: e["class"].as_str().unwrap_or_default().to_owned(),
                    desc: e["desc"].as_str().unwrap_or_default().to_owned(),
                });
            }
            return Err(QmpError::Protocol(format!("unexpected reply: {reply}")));
        }
    }

    /// Pauses the vCPUs.
    pub async fn stop(&mut self) -> Result<(), QmpError> {
        self.execute("stop", None).await.map(drop)
    }

    /// Resumes the vCPUs.
    pub async fn cont(&mut self) -> Result<(), QmpError> {
        self.execute("cont", None).await.map(drop)
    }

    /// Current run state.
    pub async fn query_status(&mut self) -> Result<Status, QmpError> {
        let v = self.execute("query-status", None).await?;
        serde_json::from_value(v).map_err(|e| QmpError::Protocol(e.to_string()))
    }

    /// Sets migration capabilities, e.g. `[("x-ignore-shared", true)]`.
    pub async fn migrate_set_capabilities(
        &mut self,
        caps: &[(&str, bool)],
    ) -> Result<(), QmpError> {
        let caps: Vec<Value> = caps
            .iter()
            .map(|(c, s)| json!({"capability": c, "state": s}))
            .collect();
        self.execute(
            "migrate-set-capabilities",
            Some(json!({ "capabilities": caps })),
        )
        .await
        .map(drop)
    }

    /// Hands QEMU a descriptor under `name` (`getfd`), for a `fd:NAME` URI.
    async fn getfd(&mut self, name: &str, fd: BorrowedFd<'_>) -> Result<(), QmpError> {
        self.execute_with_fd("getfd", Some(json!({ "fdname": name })), Some(fd))
            .await
            .map(drop)
    }

    /// Starts an outgoing migration into `file` (opened for writing by kiln: QEMU runs
    /// jailed and never sees where its snapshot goes, and spawns no helper to write it).
    pub async fn migrate_to(&mut self, file: &std::fs::File) -> Result<(), QmpError> {
        self.getfd(MIGRATION_FD, file.as_fd()).await?;
        self.execute(
            "migrate",
            Some(json!({ "uri": format!("fd:{MIGRATION_FD}") })),
        )
        .await
        .map(drop)
    }

    /// Starts an incoming migration from `file` (QEMU must run with `-incoming defer`).
    pub async fn migrate_from(&mut self, file: &std::fs::File) -> Result<(), QmpError> {
        self.getfd(MIGRATION_FD, file.as_fd()).await?;
        self.execute(
            "migrate-incoming",
            Some(json!({ "uri": format!("fd:{MIGRATION_FD}") })),
        )
        .await
        .map(drop)
    }

    /// Migration progress.
    pub async fn query_migrate(&mut self) -> Result<MigrationInfo, QmpError> {
        let v = self.execute("query-migrate", None).await?;
        serde_json::from_value(v).map_err(|e| QmpError::Protocol(e.to_string()))
    }

    /// Polls `query-migrate` until it completes; fails on `failed`/`cancelled`/timeout.
    pub async fn wait_migration(&mut self, timeout: Duration) -> Result<MigrationInfo, QmpError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut delay = Duration::from_millis(2);
        loop {
            let info = self.query_migrate().await?;
            match info.status.as_deref() {
                Some("completed") => return Ok(info),
                Some(s @ ("failed" | "cancelled")) => {
                    return Err(QmpError::Migration {
                        status: s.to_owned(),
                        error: info.error_desc.unwrap_or_default(),
                    })
                }
                _ => {}
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(QmpError::Timeout("migration"));
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(50));
        }
    }

    /// Polls `query-status` until the VM reports `status` (e.g. `running` after an
    /// incoming migration).
    pub async fn wait_status(&mut self, status: &str, timeout: Duration) -> Result<(), QmpError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.query_status().await?.status == status {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(QmpError::Timeout("vm status"));
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Asks QEMU to exit. The connection closing before the reply counts as success.
    pub async fn quit(&mut self) -> Result<(), QmpError> {
        match self.execute("quit", None).await {
            Ok(_) | Err(QmpError::Closed) | Err(QmpError::Io(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }
}
