//! Control messages (JSON payloads of `FrameKind::Control` frames).
//!
//! Conversation shapes, all on one host-chosen stream id (>= 1; 0 is the connection):
//!
//! | request | agent replies |
//! |---|---|
//! | `hello` (stream 0, after SYNC) | `hello_ack` (after SYNC) |
//! | `health`, `set_clock`, `set_defaults`, `get_defaults`, `wait_pid`, `kill_pid`, `stat`, `mkdir`, `remove` | one final message |
//! | `exec` (foreground) | `exec_started`, data on channels 1/2, eof 1/2, `exit` (final) |
//! | `exec` with `pty` | `exec_started` (`pty: true`), the terminal's bytes on channel 1, eof 1, `exit` (final) |
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
//!
//! On an exec's stream the host may also send `signal` (to its process group) and, for a
//! terminal, `resize`; neither gets a reply.
//!
//! **Versions.** [`PROTOCOL_VERSION`] changes only when a message an older peer relies on
//! changes meaning; the client refuses an agent of another version. Additions are
//! optional fields (absent = the old behaviour) or new messages, and the agent confirms a
//! feature the host asked for where ignoring it would be silent (an old agent ignores
//! `exec.pty` and answers `exec_started` without `pty: true`, which the client turns into
//! an `unsupported` error instead of a session without a terminal). Templates snapshot the
//! agent of their build, so a sandbox may run an agent older than its host.

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
    /// Resize the terminal of a running exec started with `pty` (TIOCSWINSZ; the process
    /// group gets SIGWINCH). Ignored for an exec without a terminal.
    Resize {
        cols: u16,
        rows: u16,
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
        /// The process runs on a pseudo-terminal (the request asked for `pty`). Absent
        /// from agents that predate terminals.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        pty: bool,
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
    /// Run on a new pseudo-terminal of this size (its controlling terminal, stdin,
    /// stdout and stderr): output comes as raw bytes on channel 1 only, stdin goes to the
    /// terminal, and `resize` changes its size. `TERM` defaults to `xterm-256color`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pty: Option<PtySize>,
}

/// A terminal's size in character cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PtySize {
    pub cols: u16,
    pub rows: u16,
}

impl PtySize {
    /// The size when a client gives none (the VT100's).
    pub const DEFAULT: PtySize = PtySize { cols: 80, rows: 24 };

    /// Zero cells in either direction means "unknown" to the kernel; a client that sends
    /// it gets the default instead, and sizes beyond what any screen has are clamped.
    pub fn sanitized(self) -> Self {
        let fix = |v: u16, d: u16| if v == 0 { d } else { v.min(1000) };
        Self {
            cols: fix(self.cols, Self::DEFAULT.cols),
            rows: fix(self.rows, Self::DEFAULT.rows),
        }
    }
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

    #[test]
    fn terminal_messages_are_additions_an_old_peer_reads() {
        // Without pty the exec request is what protocol 1 agents always read.
        let plain = serde_json::to_value(HostMsg::Exec(ExecRequest {
            command: "sh".into(),
            ..Default::default()
        }))
        .unwrap();
        assert!(plain.get("pty").is_none(), "{plain}");
        let with = serde_json::to_value(HostMsg::Exec(ExecRequest {
            command: "sh".into(),
            pty: Some(PtySize {
                cols: 100,
                rows: 30,
            }),
            ..Default::default()
        }))
        .unwrap();
        assert_eq!(with["pty"], serde_json::json!({"cols": 100, "rows": 30}));
        assert_eq!(
            serde_json::to_value(HostMsg::Resize { cols: 1, rows: 2 }).unwrap(),
            serde_json::json!({"type": "resize", "cols": 1, "rows": 2})
        );
        // An old agent's exec_started has no pty flag: read as "no terminal".
        let old: AgentMsg = serde_json::from_str(r#"{"type":"exec_started","pid":7}"#).unwrap();
        assert_eq!(old, AgentMsg::ExecStarted { pid: 7, pty: false });
        assert_eq!(
            serde_json::to_string(&AgentMsg::ExecStarted { pid: 7, pty: false }).unwrap(),
            r#"{"type":"exec_started","pid":7}"#
        );
    }

    #[test]
    fn terminal_sizes_are_sanitized() {
        let s = PtySize {
            cols: 0,
            rows: 5000,
        }
        .sanitized();
        assert_eq!(
            s,
            PtySize {
                cols: 80,
                rows: 1000
            }
        );
        assert_eq!(
            PtySize {
                cols: 120,
                rows: 40
            }
            .sanitized(),
            PtySize {
                cols: 120,
                rows: 40
            }
        );
    }
}
