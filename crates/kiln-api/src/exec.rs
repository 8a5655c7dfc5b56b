//! Commands in a sandbox (the data plane): `POST /exec`, `POST /exec/stream` (SSE) and
//! the WebSocket session at `GET /exec/connect`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::files::validate_path;
use crate::request::RequestError;

/// Longest command accepted.
pub const MAX_COMMAND: usize = 256 * 1024;
/// Longest `timeout_s` accepted (a day).
pub const MAX_TIMEOUT_S: u64 = 86_400;
/// The exit code of a command killed by its timeout, as `timeout(1)` reports it.
pub const TIMEOUT_EXIT_CODE: i32 = 124;

/// The body of `POST /exec` and `/exec/stream`, and the start frame of a session.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    /// Run with `/bin/sh -c`, as the template's user unless the template says otherwise.
    pub command: String,
    /// Working directory (absolute); default: the template's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    /// Variables over the sandbox's environment.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Kill the command after this many seconds (0 or none: no limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_s: Option<u64>,
    /// kiln's extension, for sessions (`/exec/connect`) only: run the command on a
    /// pseudo-terminal of this size. Its output then comes as the terminal's raw bytes on
    /// the stdout channel (stderr is the terminal too), its input goes through the
    /// terminal (so `\x03` is Ctrl-C), and `resize` control frames change the size. The
    /// official SDKs never send it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pty: Option<TerminalSize>,
}

/// A terminal's size in character cells (kiln's extension of the session protocol).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TerminalSize {
    /// Columns (1 to [`MAX_TERMINAL_CELLS`]).
    pub cols: u16,
    /// Rows (1 to [`MAX_TERMINAL_CELLS`]).
    pub rows: u16,
}

/// Most columns or rows of a terminal.
pub const MAX_TERMINAL_CELLS: u16 = 1000;

impl TerminalSize {
    /// Checks both dimensions.
    pub fn validate(&self) -> Result<(), RequestError> {
        let ok = |v: u16| (1..=MAX_TERMINAL_CELLS).contains(&v);
        if ok(self.cols) && ok(self.rows) {
            Ok(())
        } else {
            Err(RequestError::invalid(format!(
                "pty: cols and rows must be between 1 and {MAX_TERMINAL_CELLS}"
            )))
        }
    }
}

impl ExecRequest {
    /// A request to run `command` with the sandbox's defaults.
    pub fn new(command: impl Into<String>) -> Self {
        Self {
            command: command.into(),
            ..Self::default()
        }
    }

    /// Checks the request; `Ok` carries the timeout in milliseconds (none: no limit).
    pub fn validate(&self) -> Result<Option<u64>, RequestError> {
        if self.command.trim().is_empty() || self.command.len() > MAX_COMMAND {
            return Err(RequestError::invalid(format!(
                "command: must be non-empty and at most {MAX_COMMAND} bytes"
            )));
        }
        if let Some(dir) = &self.working_dir {
            validate_path(dir).map_err(|m| RequestError::invalid(format!("working_dir: {m}")))?;
        }
        if let Some(key) = self
            .env
            .keys()
            .find(|k| k.is_empty() || k.contains('=') || k.contains('\0'))
        {
            return Err(RequestError::invalid(format!("env: invalid name {key:?}")));
        }
        if let Some(size) = &self.pty {
            size.validate()?;
        }
        match self.timeout_s {
            Some(0) | None => Ok(None),
            Some(s) if s > MAX_TIMEOUT_S => Err(RequestError::invalid(format!(
                "timeout_s: at most {MAX_TIMEOUT_S}"
            ))),
            Some(s) => Ok(Some(s * 1000)),
        }
    }
}

/// The one wording of a timeout, on every exec path.
pub fn timeout_notice(timeout_ms: Option<u64>) -> String {
    format!(
        "command timed out after {} s and was killed",
        timeout_ms.unwrap_or(0) / 1000
    )
}

/// What `POST /exec` answers (the SDK's `CommandResult`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecResult {
    /// Standard output (UTF-8, invalid bytes replaced).
    #[serde(default)]
    pub stdout: String,
    /// Standard error, with kiln's notes (truncation, timeout) at its end.
    #[serde(default)]
    pub stderr: String,
    /// The process's code, `128 + signal` when killed, 124 on timeout.
    #[serde(default)]
    pub exit_code: i32,
    /// Output beyond the server's cap was dropped.
    #[serde(default)]
    pub truncated: bool,
}

/// One Server-Sent Event of `POST /exec/stream`: output as it comes, then a last event
/// with `finished` and the exit code (and whatever output was still pending). Also the
/// last text frame of a session.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecEvent {
    /// Standard output text (never a split UTF-8 sequence).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdout: Option<String>,
    /// Standard error text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stderr: Option<String>,
    /// Set on the last event only.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub finished: bool,
    /// On the last event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// Why the command ended abnormally (timeout, lost connection), on the last event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl ExecEvent {
    /// The last event.
    pub fn finished(exit_code: i32, error: Option<String>) -> Self {
        Self {
            finished: true,
            exit_code: Some(exit_code),
            error,
            ..Self::default()
        }
    }
}

/// The WebSocket subprotocol of `/exec/connect`.
pub const EXEC_SUBPROTOCOL: &str = "superserve.exec.v1";

/// Channels of a session's binary frames (first byte; the rest is data).
pub mod channel {
    /// Client to server: standard input.
    pub const STDIN: u8 = 0;
    /// Server to client: standard output.
    pub const STDOUT: u8 = 1;
    /// Server to client: standard error.
    pub const STDERR: u8 = 2;
}

/// A session's text frames from the client, after the start frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum SessionControl {
    /// No more standard input.
    StdinClose,
    /// Send a signal to the command's process group (`SIGTERM`, `TERM` or a number).
    Signal {
        /// The signal.
        name: String,
    },
    /// kiln's extension: resize the terminal of a session started with `pty` (ignored
    /// otherwise).
    Resize {
        /// Columns.
        cols: u16,
        /// Rows.
        rows: u16,
    },
}

/// POSIX signal numbers of the names the SDKs send (`SIGTERM`, `TERM`, or a number).
pub fn signal_number(name: &str) -> Option<i32> {
    let n = name.trim().to_ascii_uppercase();
    let n = n.strip_prefix("SIG").unwrap_or(&n);
    Some(match n {
        "HUP" => 1,
        "INT" => 2,
        "QUIT" => 3,
        "KILL" => 9,
        "USR1" => 10,
        "USR2" => 12,
        "PIPE" => 13,
        "ALRM" => 14,
        "TERM" => 15,
        "CONT" => 18,
        "STOP" => 19,
        "TSTP" => 20,
        "WINCH" => 28,
        other => other.parse().ok().filter(|n| (1..=64).contains(n))?,
    })
}

/// Turns byte chunks into text without splitting a UTF-8 sequence across two events: how
/// the server turns a command's output into `/exec/stream` events and how a client turns a
/// session's raw frames into text.
#[derive(Debug, Default)]
pub struct Utf8Chunks {
    pending: Vec<u8>,
}

impl Utf8Chunks {
    /// The text complete so far; an incomplete trailing sequence waits for the next chunk.
    pub fn push(&mut self, data: &[u8]) -> String {
        self.pending.extend_from_slice(data);
        let valid = match std::str::from_utf8(&self.pending) {
            Ok(_) => self.pending.len(),
            Err(e) if e.error_len().is_none() => e.valid_up_to(),
            // Invalid bytes (not just incomplete): emit everything, replaced.
            Err(_) => self.pending.len(),
        };
        let rest = self.pending.split_off(valid);
        let text = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending = rest;
        text
    }

    /// Whatever is left, replaced if incomplete.
    pub fn finish(&mut self) -> String {
        let text = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf8_sequences_are_not_split() {
        let mut c = Utf8Chunks::default();
        let s = "h\u{e9}llo \u{1f600}".as_bytes();
        let mut out = String::new();
        for b in s {
            out.push_str(&c.push(&[*b]));
        }
        out.push_str(&c.finish());
        assert_eq!(out, "h\u{e9}llo \u{1f600}");
        // Invalid bytes come out replaced, not stuck.
        assert_eq!(c.push(&[0xff, b'a']), "\u{fffd}a");
    }

    #[test]
    fn signal_names() {
        assert_eq!(signal_number("SIGTERM"), Some(15));
        assert_eq!(signal_number("kill"), Some(9));
        assert_eq!(signal_number("2"), Some(2));
        assert_eq!(signal_number("SIGNOPE"), None);
        assert_eq!(signal_number("0"), None);
    }

    #[test]
    fn control_frames() {
        assert_eq!(
            serde_json::from_str::<SessionControl>(r#"{"type":"stdin_close"}"#).unwrap(),
            SessionControl::StdinClose
        );
        assert_eq!(
            serde_json::from_str::<SessionControl>(r#"{"type":"signal","name":"SIGINT"}"#).unwrap(),
            SessionControl::Signal {
                name: "SIGINT".into()
            }
        );
    }

    #[test]
    fn terminal_sessions_are_kilns_extension() {
        let start: ExecRequest =
            serde_json::from_str(r#"{"command":"bash","pty":{"cols":120,"rows":40}}"#).unwrap();
        assert_eq!(
            start.pty,
            Some(TerminalSize {
                cols: 120,
                rows: 40
            })
        );
        assert_eq!(start.validate(), Ok(None));
        // What the official SDKs send has no pty, and serialises without one.
        let plain = serde_json::to_value(ExecRequest::new("ls")).unwrap();
        assert_eq!(plain, serde_json::json!({"command": "ls"}));
        let mut bad = ExecRequest::new("bash");
        bad.pty = Some(TerminalSize { cols: 0, rows: 40 });
        assert!(bad.validate().unwrap_err().message.starts_with("pty:"));
        assert_eq!(
            serde_json::from_str::<SessionControl>(r#"{"type":"resize","cols":90,"rows":20}"#)
                .unwrap(),
            SessionControl::Resize { cols: 90, rows: 20 }
        );
    }

    #[test]
    fn requests_are_checked() {
        assert_eq!(ExecRequest::new("true").validate(), Ok(None));
        let mut r = ExecRequest::new("true");
        r.timeout_s = Some(2);
        assert_eq!(r.validate(), Ok(Some(2000)));
        r.timeout_s = Some(MAX_TIMEOUT_S + 1);
        assert!(r.validate().is_err());
        assert!(ExecRequest::new("  ").validate().is_err());
        let mut r = ExecRequest::new("true");
        r.working_dir = Some("tmp".into());
        assert!(r
            .validate()
            .unwrap_err()
            .message
            .starts_with("working_dir:"));
        let mut r = ExecRequest::new("true");
        r.env.insert("A=B".into(), "x".into());
        assert!(r.validate().is_err());
    }

    #[test]
    fn last_event_shape() {
        let e = ExecEvent::finished(3, None);
        assert_eq!(
            serde_json::to_value(&e).unwrap(),
            serde_json::json!({"finished": true, "exit_code": 3})
        );
    }
}
