//! `sandbox.commands()`: shell commands in a sandbox (`/exec`, `/exec/stream`,
//! `/exec/connect`).

use std::collections::BTreeMap;
use std::time::Duration;

use kiln_api::{ExecEvent, ExecRequest, TerminalSize};
use reqwest::Method;

use crate::client::STREAM_IDLE_TIMEOUT;
use crate::error::{Error, Result};
use crate::sandbox::Sandbox;
use crate::session::CommandSession;

/// Time allowed, beyond a command's own `timeout_s`, for its answer to arrive.
const EXEC_SLACK: Duration = Duration::from_secs(30);

/// How a command runs. The defaults are the template's (working directory, user,
/// environment) and no timeout.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunOptions {
    /// Working directory (absolute).
    pub cwd: Option<String>,
    /// Variables over the sandbox's environment, for this command only.
    pub env: BTreeMap<String, String>,
    /// Kill the command after this many seconds (it then exits 124). `None` or 0: no
    /// timeout, and the SDK waits for the command as long as it runs.
    pub timeout_s: Option<u64>,
}

impl RunOptions {
    /// The body of `/exec`, `/exec/stream` and a session's start frame.
    pub(crate) fn request(&self, command: &str) -> ExecRequest {
        ExecRequest {
            command: command.to_owned(),
            working_dir: self.cwd.clone(),
            env: self.env.clone(),
            timeout_s: self.timeout_s,
            pty: None,
        }
    }
}

/// A finished command (`kiln-api`'s exec result). A non-zero exit is not an error: check
/// `exit_code`, which is 128 + n when killed by signal n, 124 on timeout, and -1 when the
/// command could not start or the connection to the sandbox was lost; `truncated` says
/// the output exceeded the server's retention cap (16 MiB; only [`Commands::run`]
/// truncates).
pub type CommandResult = kiln_api::ExecResult;

/// Commands in one sandbox; from [`Sandbox::commands`].
///
/// ```no_run
/// # async fn demo(sandbox: kiln_sdk::Sandbox) -> kiln_sdk::Result<()> {
/// use kiln_sdk::RunOptions;
/// let r = sandbox
///     .commands()
///     .run("echo $GREETING", RunOptions {
///         env: [("GREETING".into(), "hi".into())].into(),
///         ..RunOptions::default()
///     })
///     .await?;
/// assert_eq!((r.stdout.as_str(), r.exit_code), ("hi\n", 0));
///
/// // Output as it comes:
/// let r = sandbox
///     .commands()
///     .run_streaming(
///         "for i in 1 2 3; do echo $i; sleep 1; done",
///         RunOptions::default(),
///         |out| print!("{out}"),
///         |err| eprint!("{err}"),
///     )
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Copy)]
pub struct Commands<'a> {
    sandbox: &'a Sandbox,
}

impl<'a> Commands<'a> {
    pub(crate) fn new(sandbox: &'a Sandbox) -> Self {
        Self { sandbox }
    }

    /// Runs `command` (`/bin/sh -c`) to completion and returns its output (`POST /exec`).
    /// Output beyond 16 MiB is dropped (`truncated`); use [`Commands::run_streaming`]
    /// for more.
    pub async fn run(&self, command: &str, options: RunOptions) -> Result<CommandResult> {
        let body = options.request(command);
        let timeout = http_timeout(&options);
        let sb = self.sandbox;
        sb.with_token_retry(|token| {
            let body = &body;
            async move {
                let req = sb
                    .data_request(Method::POST, &["exec"], &token)?
                    .json(body)
                    .timeout(timeout);
                sb.client.json::<CommandResult>(req).await
            }
        })
        .await
    }

    /// Runs `command` to completion, giving its output to `on_stdout` and `on_stderr` as
    /// it comes (`POST /exec/stream`, Server-Sent Events). The result holds all of it.
    pub async fn run_streaming(
        &self,
        command: &str,
        options: RunOptions,
        mut on_stdout: impl FnMut(&str) + Send,
        mut on_stderr: impl FnMut(&str) + Send,
    ) -> Result<CommandResult> {
        let body = options.request(command);
        let sb = self.sandbox;
        // A failure activation can fix is a status, answered before any event: the retry
        // cannot repeat output.
        let resp = sb
            .with_token_retry(|token| {
                let body = &body;
                async move {
                    let req = sb
                        .data_request(Method::POST, &["exec", "stream"], &token)?
                        .json(body)
                        .timeout(None);
                    sb.client.send(req).await
                }
            })
            .await?;
        let mut result = CommandResult::default();
        let mut finished = false;
        crate::sse::read_json_events(resp, STREAM_IDLE_TIMEOUT, |ev: ExecEvent| {
            if let Some(s) = ev.stdout.as_deref().filter(|s| !s.is_empty()) {
                result.stdout.push_str(s);
                on_stdout(s);
            }
            if let Some(s) = ev.stderr.as_deref().filter(|s| !s.is_empty()) {
                result.stderr.push_str(s);
                on_stderr(s);
            }
            if ev.finished {
                finished = true;
                result.exit_code = ev.exit_code.unwrap_or(-1);
                if let Some(e) = &ev.error {
                    result.stderr.push_str(e);
                }
                return false;
            }
            true
        })
        .await?;
        if !finished {
            return Err(Error::Protocol(
                "the command's stream ended without a finished event (connection lost?)".into(),
            ));
        }
        Ok(result)
    }

    /// Starts `command` and returns a live session on it (`GET /exec/connect`, a
    /// WebSocket): write to its stdin, signal it, read its output as it comes, and
    /// [`CommandSession::wait`] for its result. Leave `timeout_s` unset for a
    /// long-lived process. Dropping the session kills the process.
    pub async fn spawn(&self, command: &str, options: RunOptions) -> Result<CommandSession> {
        CommandSession::start(self.sandbox, options.request(command)).await
    }

    /// Starts `command` on a terminal of `size` (kiln's extension of `/exec/connect`;
    /// Superserve's servers do not have it): its output comes as the terminal's raw bytes
    /// ([`crate::Output::Terminal`], stderr included), its stdin goes through the
    /// terminal (`\x03` is Ctrl-C, `\x04` at a line start end-of-file), and
    /// [`CommandSession::resize`] follows the user's window. What a shell needs:
    ///
    /// ```no_run
    /// # async fn demo(sandbox: kiln_sdk::Sandbox) -> kiln_sdk::Result<()> {
    /// use kiln_sdk::{Output, RunOptions, TerminalSize};
    /// let size = TerminalSize { cols: 120, rows: 40 };
    /// let mut shell = sandbox.commands().spawn_terminal("bash -l", size, RunOptions::default()).await?;
    /// shell.write_stdin(b"stty size; exit\n").await?;
    /// while let Some(Output::Terminal(bytes)) = shell.next_output().await {
    ///     print!("{}", String::from_utf8_lossy(&bytes));
    /// }
    /// println!("exit code {}", shell.wait().await?.exit_code);
    /// # Ok(()) }
    /// ```
    ///
    /// The result of [`CommandSession::wait`] has the exit code only: a terminal's output
    /// is a screen, which the session does not keep.
    pub async fn spawn_terminal(
        &self,
        command: &str,
        size: TerminalSize,
        options: RunOptions,
    ) -> Result<CommandSession> {
        let mut req = options.request(command);
        req.pty = Some(size);
        CommandSession::start(self.sandbox, req).await
    }
}

/// The HTTP timeout of a non-streamed exec: the command's own plus some slack, or none.
fn http_timeout(options: &RunOptions) -> Option<Duration> {
    options
        .timeout_s
        .filter(|s| *s > 0)
        .map(|s| Duration::from_secs(s) + EXEC_SLACK)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_body_omits_defaults() {
        let o = RunOptions::default();
        assert_eq!(
            serde_json::to_value(o.request("ls")).unwrap(),
            serde_json::json!({"command": "ls"})
        );
        let o = RunOptions {
            cwd: Some("/tmp".into()),
            env: [("A".into(), "1".into())].into(),
            timeout_s: Some(5),
        };
        assert_eq!(
            serde_json::to_value(o.request("ls")).unwrap(),
            serde_json::json!({"command": "ls", "working_dir": "/tmp", "env": {"A": "1"}, "timeout_s": 5})
        );
    }
}
