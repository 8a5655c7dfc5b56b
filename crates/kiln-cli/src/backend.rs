//! One interface for `kiln template ...` and `kiln sandbox ...`, with two sides: the local
//! state dir through the engine ([`crate::local`]) and a server through the SDK
//! ([`crate::remote`]). Each command is written once, over [`Backend`], and printed by
//! [`crate::print`], so the two modes cannot drift apart in output or exit codes.

use std::path::Path;

use async_trait::async_trait;
use kiln_api::{
    AuditQuery, BuildInfo, BuildLogEvent, CreateSandbox, CreateSecret, ExecRequest, NetworkConfig,
    PortAccess, PreviewPortList, PreviewToken, ProxyAuditEvent, PublishedPreviewPort, SandboxInfo,
    SecretInfo, SnapshotInfo, TemplateInfo, TemplateRequest, TerminalSize,
};
use tokio::sync::mpsc;

/// Which stream a piece of command output came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Output {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// What every backend call returns.
pub(crate) type R<T> = anyhow::Result<T>;

/// A command to run in a sandbox.
#[derive(Debug, Clone)]
pub(crate) struct Command {
    /// The command and its options, as the API takes them.
    pub req: ExecRequest,
    /// Run as this user instead of the template's (the local state dir only).
    pub user: Option<String>,
}

/// What a user's terminal sends to a shell in a sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ShellInput {
    /// Keystrokes (raw bytes).
    Data(Vec<u8>),
    /// The window changed size.
    Resize(TerminalSize),
    /// The input ended (not a terminal, and its pipe or file is at its end).
    Eof,
}

/// A log line callback.
pub(crate) type OnLog<'a> = &'a mut (dyn FnMut(&BuildLogEvent) + Send);
/// A terminal's output callback (raw bytes).
pub(crate) type OnTerminal<'a> = &'a mut (dyn FnMut(&[u8]) + Send);
/// A command output callback.
pub(crate) type OnOutput<'a> = &'a mut (dyn FnMut(Output, &[u8]) + Send);

/// Where templates and sandboxes live: this machine's state dir, or a server.
#[async_trait]
pub(crate) trait Backend: Send + Sync {
    /// Creates the template, or rebuilds it with this spec when the name exists. Returns
    /// the template and the build to follow (an in-flight build of the same spec is
    /// returned rather than a new one).
    async fn submit(&self, req: &TemplateRequest, no_cache: bool) -> R<(TemplateInfo, BuildInfo)>;

    /// Makes sure a queued build runs without this process (`build --detach`).
    fn detach(&self, b: &BuildInfo) -> R<()>;

    /// Runs or follows a build to its end, giving its log lines to `on_log`; returns the
    /// build as its record says it ended.
    async fn run_build(&self, b: &BuildInfo, on_log: OnLog<'_>) -> R<BuildInfo>;

    /// Asks for a build to stop.
    async fn cancel_build(&self, b: &BuildInfo) -> R<()>;

    /// The team's templates.
    async fn templates(&self) -> R<Vec<TemplateInfo>>;

    /// One template.
    async fn template(&self, name: &str) -> R<TemplateInfo>;

    /// A template's builds, newest first.
    async fn builds(&self, t: &TemplateInfo) -> R<Vec<BuildInfo>>;

    /// One build of a template.
    async fn build(&self, t: &TemplateInfo, build_id: &str) -> R<BuildInfo>;

    /// A build's log: its history, and with `follow` the lines still to come until it
    /// ends (a server's stream always follows).
    async fn logs(&self, b: &BuildInfo, follow: bool, on_log: OnLog<'_>) -> R<()>;

    /// Deletes a template (refused while sandboxes use it).
    async fn delete_template(&self, t: &TemplateInfo) -> R<()>;

    /// Starts a sandbox (from a template, or a snapshot); returns its id once it runs.
    async fn create_sandbox(&self, req: CreateSandbox) -> R<String>;

    /// Takes a snapshot of a sandbox; returns it once it is ready.
    async fn snapshot_sandbox(&self, id: &str, name: Option<String>) -> R<SnapshotInfo>;

    /// The team's snapshots (of one sandbox, when given), newest first.
    async fn snapshots(&self, sandbox: Option<&str>) -> R<Vec<SnapshotInfo>>;

    /// One snapshot.
    async fn snapshot(&self, id: &str) -> R<SnapshotInfo>;

    /// Renames a snapshot.
    async fn rename_snapshot(&self, id: &str, name: &str) -> R<SnapshotInfo>;

    /// Deletes a snapshot (sandboxes created from it are not affected).
    async fn delete_snapshot(&self, id: &str) -> R<()>;

    /// The team's sandboxes.
    async fn sandboxes(&self) -> R<Vec<SandboxInfo>>;

    /// Replaces (or with `None` clears) a sandbox's egress rules.
    async fn set_network(&self, id: &str, rules: Option<NetworkConfig>) -> R<()>;

    /// Stops a sandbox and removes everything it had.
    async fn kill_sandbox(&self, id: &str) -> R<()>;

    /// Runs a command, giving its output as it comes; returns its exit code.
    async fn exec(&self, id: &str, cmd: &Command, out: OnOutput<'_>) -> R<i32>;

    /// Runs a command on a terminal of `size` in a sandbox (`cmd.req.pty` is set from it),
    /// feeding it `input` and giving what the terminal shows to `out` as raw bytes;
    /// returns its exit code.
    async fn shell(
        &self,
        id: &str,
        cmd: &Command,
        size: TerminalSize,
        input: mpsc::Receiver<ShellInput>,
        out: OnTerminal<'_>,
    ) -> R<i32>;

    /// Copies a file (a directory: a zip of it) out of a sandbox; returns the bytes.
    async fn download(&self, id: &str, path: &str, dst: &Path) -> R<u64>;

    /// Copies a file into a sandbox; returns the bytes.
    async fn upload(&self, id: &str, src: &Path, path: &str) -> R<u64>;

    /// A sandbox's preview policy and published ports.
    async fn preview_ports(&self, id: &str) -> R<PreviewPortList>;

    /// Publishes a port (`access` none: keep a published port's, or the sandbox's default).
    async fn publish_port(
        &self,
        id: &str,
        port: u16,
        access: Option<PortAccess>,
    ) -> R<PublishedPreviewPort>;

    /// Unpublishes a port and revokes its tokens.
    async fn unpublish_port(&self, id: &str, port: u16) -> R<()>;

    /// A token for a published port (with `rotate`, after revoking all the others).
    async fn preview_token(
        &self,
        id: &str,
        port: u16,
        expires_in_seconds: Option<u64>,
        rotate: bool,
    ) -> R<PreviewToken>;
    /// Stores a team secret.
    async fn create_secret(&self, req: &CreateSecret) -> R<SecretInfo>;

    /// The team's secrets.
    async fn secrets(&self) -> R<Vec<SecretInfo>>;

    /// Replaces a secret's value.
    async fn rotate_secret(&self, name: &str, value: &str) -> R<SecretInfo>;

    /// Deletes a secret (its bindings are revoked).
    async fn delete_secret(&self, name: &str) -> R<()>;

    /// Requests made with a secret, newest first.
    async fn secret_audit(&self, name: &str, q: &AuditQuery) -> R<Vec<ProxyAuditEvent>>;

    /// Binds a secret to a sandbox under `env_key`.
    async fn attach_secret(&self, id: &str, env_key: &str, secret: &str) -> R<()>;

    /// Removes a sandbox's binding of `env_key`.
    async fn detach_secret(&self, id: &str, env_key: &str) -> R<()>;
}

/// The server of `KILN_URL` / `kiln login` when there is one, else the local state dir.
pub(crate) async fn backend() -> anyhow::Result<Box<dyn Backend>> {
    Ok(match crate::remote::client()? {
        Some(client) => Box::new(crate::remote::Remote { client }),
        None => Box::new(crate::local::Local::open().await?),
    })
}
