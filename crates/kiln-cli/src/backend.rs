//! One interface for `kiln template ...` and `kiln sandbox ...`, with two sides: the local
//! state dir through the engine ([`crate::local`]) and a server through the SDK
//! ([`crate::remote`]). Each command is written once, over [`Backend`], and printed by
//! [`crate::print`], so the two modes cannot drift apart in output or exit codes.

use std::path::Path;

use async_trait::async_trait;
use kiln_api::{
    BuildInfo, BuildLogEvent, CreateSandbox, ExecRequest, NetworkConfig, SandboxInfo, TemplateInfo,
    TemplateRequest,
};

/// Which stream a piece of command output came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Output {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// A log line callback.
pub(crate) type OnLog<'a> = &'a mut (dyn FnMut(&BuildLogEvent) + Send);
/// A command output callback.
pub(crate) type OnOutput<'a> = &'a mut (dyn FnMut(Output, &[u8]) + Send);

/// Where templates and sandboxes live: this machine's state dir, or a server.
#[async_trait]
pub(crate) trait Backend: Send + Sync {
    /// Creates the template, or rebuilds it with this spec when the name exists. Returns
    /// the template and the build to follow (an in-flight build of the same spec is
    /// returned rather than a new one).
    async fn submit(
        &self,
        req: &TemplateRequest,
        no_cache: bool,
    ) -> anyhow::Result<(TemplateInfo, BuildInfo)>;

    /// Makes sure a queued build runs without this process (`build --detach`).
    fn detach(&self, build: &BuildInfo) -> anyhow::Result<()>;

    /// Runs or follows a build to its end, giving its log lines to `on_log`; returns the
    /// build as its record says it ended.
    async fn run_build(
        &self,
        template: &TemplateInfo,
        build: &BuildInfo,
        on_log: OnLog<'_>,
    ) -> anyhow::Result<BuildInfo>;

    /// Asks for a build to stop.
    async fn cancel_build(&self, template: &TemplateInfo, build_id: &str) -> anyhow::Result<()>;

    /// The team's templates.
    async fn templates(&self) -> anyhow::Result<Vec<TemplateInfo>>;

    /// One template.
    async fn template(&self, name: &str) -> anyhow::Result<TemplateInfo>;

    /// A template's builds, newest first.
    async fn builds(&self, template: &TemplateInfo) -> anyhow::Result<Vec<BuildInfo>>;

    /// One build of a template.
    async fn build(&self, template: &TemplateInfo, build_id: &str) -> anyhow::Result<BuildInfo>;

    /// A build's log: its history, and with `follow` the lines still to come until it
    /// ends (a server's stream always follows).
    async fn logs(
        &self,
        template: &TemplateInfo,
        build: &BuildInfo,
        follow: bool,
        on_log: OnLog<'_>,
    ) -> anyhow::Result<()>;

    /// Deletes a template (refused while sandboxes use it).
    async fn delete_template(&self, template: &TemplateInfo) -> anyhow::Result<()>;

    /// Starts a sandbox; returns its id once it runs.
    async fn create_sandbox(&self, req: CreateSandbox) -> anyhow::Result<String>;

    /// The team's sandboxes.
    async fn sandboxes(&self) -> anyhow::Result<Vec<SandboxInfo>>;

    /// Replaces (or with `None` clears) a sandbox's egress rules.
    async fn set_network(&self, id: &str, rules: Option<NetworkConfig>) -> anyhow::Result<()>;

    /// Stops a sandbox and removes everything it had.
    async fn kill_sandbox(&self, id: &str) -> anyhow::Result<()>;

    /// Runs a command, giving its output as it comes; returns its exit code.
    async fn exec(
        &self,
        id: &str,
        req: &ExecRequest,
        user: Option<String>,
        on_output: OnOutput<'_>,
    ) -> anyhow::Result<i32>;

    /// Copies a file (a directory: a zip of it) out of a sandbox; returns the bytes.
    async fn download(&self, id: &str, path: &str, dst: &Path) -> anyhow::Result<u64>;

    /// Copies a file into a sandbox; returns the bytes.
    async fn upload(&self, id: &str, src: &Path, path: &str) -> anyhow::Result<u64>;
}

/// The server of `KILN_URL` / `kiln login` when there is one, else the local state dir.
pub(crate) async fn backend() -> anyhow::Result<Box<dyn Backend>> {
    Ok(match crate::remote::client()? {
        Some(client) => Box::new(crate::remote::Remote { client }),
        None => Box::new(crate::local::Local::open().await?),
    })
}
