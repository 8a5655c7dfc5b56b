//! Control messages (JSON payloads of `FrameKind::Control` frames).
//!
//! Conversation shapes, all on one host-chosen stream id (>= 1; 0 is the connection):
//!
//! | request | agent replies |
//! |---|---|
//! | `hello` (stream 0, after SYNC) | `hello_ack` (after SYNC) |
//! | `health`, `set_clock`, `set_defaults`, `get_defaults`, `wait_pid`, `kill_pid`, `stat`, `mkdir`, `remove` | one final message |
//! | `exec` (foreground) | `exec_started`, data on channels 1/2, eof 1/2, `exit` (final) |
//! | `exec` (background) | `background_started` (final) |
//! | `read_file` | data on channel 1, `done` (final) |
//! | `write_file` | host sends data on channel 0 then eof; agent sends `credit`s, then `done` (final) |
//! | `list_dir` | `dir_entries` batches, `done` (final) |
//!
//! Any request may instead end with `error` (final). Data is flow controlled in both
//! directions, per stream: a sender may have at most [`INITIAL_WINDOW`] unacknowledged
//! data bytes in flight; the receiver returns `credit { bytes }` (a control message on
//! the same stream) as it consumes them. So a process spewing output into a slow host
//! consumer blocks on its pipe instead of filling anyone's memory, and a process that
//! does not read stdin does not stall the connection.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Protocol version carried in hello / hello_ack.
pub const PROTOCOL_VERSION: u32 = 1;

/// Bytes of data a stream may have in flight (each direction) before the receiver
/// returns credit. Bounds buffering per stream on both sides.
pub const INITIAL_WINDOW: u32 = 1024 * 1024;

/// Maximum size of a JSON control payload either side accepts.
pub const MAX_CONTROL: usize = 256 * 1024;

/// Messages the host sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum HostMsg {
    /// Starts a connection; must follow [`crate::frame::SYNC`] on stream 0.
    Hello {
        nonce: u64,
        protocol: u32,
    },
    Health,
    /// Set the guest's realtime clock (a restored snapshot's clock is stale).
    SetClock {
        unix_nanos: i64,
    },
    SetDefaults {
        defaults: RuntimeDefaults,
    },
    GetDefaults,
    Exec(ExecRequest),
    /// Send a signal to a running foreground exec (its whole process group).
    Signal {
        signal: i32,
    },
    /// The host consumed `bytes` of this stream's agent -> host data (stdout, stderr,
    /// file contents); the agent may send that much more.
    Credit {
        bytes: u32,
    },
    /// Wait up to `timeout_ms` (0 = just look) for a process the agent started to exit.
    WaitPid {
        pid: i32,
        timeout_ms: u64,
    },
    /// Signal a process the agent started (or its process group if `group`).
    KillPid {
        pid: i32,
        signal: i32,
        group: bool,
    },
    ReadFile {
        path: String,
        #[serde(default)]
        offset: u64,
        #[serde(default)]
        limit: Option<u64>,
    },
    WriteFile(WriteFileRequest),
    Stat {
        path: String,
    },
    ListDir {
        path: String,
    },
    Mkdir {
        path: String,
        #[serde(default)]
        mode: Option<u32>,
    },
    Remove {
        path: String,
        #[serde(default)]
        recursive: bool,
    },
}

/// Messages the agent sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AgentMsg {
    HelloAck(HelloAck),
    Health(Health),
    ClockSet {
        /// False when the agent runs in dev mode and refused to touch the host clock.
        applied: bool,
    },
    Defaults {
        defaults: RuntimeDefaults,
    },
    ExecStarted {
        pid: i32,
    },
    Exit(ExitStatus),
    BackgroundStarted {
        pid: i32,
    },
    PidStatus(PidStatus),
    Stat(FileStat),
    DirEntries {
        entries: Vec<DirEntry>,
    },
    /// More host data may be sent on this stream.
    Credit {
        bytes: u32,
    },
    /// Generic successful end of a request; `bytes` counts data moved, if any.
    Done {
        #[serde(default)]
        bytes: u64,
    },
    Error(ErrorReply),
}

impl AgentMsg {
    /// Whether this message ends its stream.
    pub fn is_final(&self) -> bool {
        !matches!(
            self,
            AgentMsg::ExecStarted { .. } | AgentMsg::DirEntries { .. } | AgentMsg::Credit { .. }
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloAck {
    pub nonce: u64,
    pub protocol: u32,
    /// PID of the agent (1 in a VM). Unchanged across a snapshot/restore.
    pub pid: i32,
    /// `/proc/sys/kernel/random/boot_id` of the guest: changes only on a real reboot.
    pub boot_id: String,
    pub agent_version: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    pub pid: i32,
    pub uptime_ms: u64,
    pub agent_version: String,
    pub boot_id: String,
}

/// Defaults applied to every exec that does not override them (the template's
/// `env` / `workdir` / `user` build steps set these).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuntimeDefaults {
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub cwd: Option<String>,
    /// User name or numeric uid, optionally `user:group`.
    #[serde(default)]
    pub user: Option<String>,
}

/// Run `/bin/sh -c command` in the guest.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRequest {
    pub command: String,
    /// Merged over the runtime defaults' env.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub cwd: Option<String>,
    /// User name or numeric uid, optionally `user:group`; resolved from the guest's
    /// /etc/passwd and /etc/group.
    #[serde(default)]
    pub user: Option<String>,
    /// The host will stream stdin (channel 0, then eof). Otherwise stdin is /dev/null.
    #[serde(default)]
    pub stdin: bool,
    /// Kill the process group with SIGKILL after this long; `exit.timed_out` is set.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// Detach: new session, output to a log file, reply with the pid at once.
    #[serde(default)]
    pub background: Option<Background>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Background {
    /// Append stdout+stderr here (parent dirs created). None = /dev/null.
    #[serde(default)]
    pub log_path: Option<String>,
}

/// How a process ended.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitStatus {
    /// Exit code if it exited normally.
    pub code: Option<i32>,
    /// Terminating signal if it was killed.
    pub signal: Option<i32>,
    /// The agent killed it because `timeout_ms` passed.
    #[serde(default)]
    pub timed_out: bool,
}

impl ExitStatus {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PidStatus {
    pub pid: i32,
    pub alive: bool,
    /// Set once the process has exited (only for processes the agent started).
    pub exit: Option<ExitStatus>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteFileRequest {
    pub path: String,
    /// Permission bits for a newly created file (default 0o644).
    #[serde(default)]
    pub mode: Option<u32>,
    /// `user` or `user:group` to chown the file (and created parent dirs) to.
    #[serde(default)]
    pub owner: Option<String>,
    #[serde(default = "yes")]
    pub create_parents: bool,
    #[serde(default)]
    pub append: bool,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileKind {
    File,
    Dir,
    Symlink,
    Other,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileStat {
    pub kind: FileKind,
    pub size: u64,
    /// Permission bits (`st_mode & 0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime_unix_nanos: i64,
    /// Target of a symlink.
    #[serde(default)]
    pub link_target: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirEntry {
    pub name: String,
    pub stat: FileStat,
}

/// Stable error codes the agent returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    NotFound,
    PermissionDenied,
    AlreadyExists,
    NotADirectory,
    IsADirectory,
    DirectoryNotEmpty,
    InvalidRequest,
    BadFrame,
    FrameTooLarge,
    DuplicateStream,
    UserNotFound,
    SpawnFailed,
    NoSuchProcess,
    Io,
    Unsupported,
    #[serde(other)]
    Unknown,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    pub code: ErrorCode,
    pub message: String,
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = serde_json::to_value(self)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_else(|| "unknown".into());
        f.write_str(&s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_shapes_are_stable() {
        let m = HostMsg::Exec(ExecRequest {
            command: "true".into(),
            ..Default::default()
        });
        let s = serde_json::to_string(&m).unwrap_or_default();
        assert!(s.starts_with(r#"{"type":"exec","command":"true""#), "{s}");
        let back: HostMsg = serde_json::from_str(&s).unwrap_or(HostMsg::Health);
        assert_eq!(back, m);
        let e: AgentMsg =
            serde_json::from_str(r#"{"type":"error","code":"from_the_future","message":"x"}"#)
                .unwrap_or(AgentMsg::Done { bytes: 0 });
        assert_eq!(
            e,
            AgentMsg::Error(ErrorReply {
                code: ErrorCode::Unknown,
                message: "x".into()
            })
        );
        assert_eq!(ErrorCode::FrameTooLarge.to_string(), "frame_too_large");
    }
}
