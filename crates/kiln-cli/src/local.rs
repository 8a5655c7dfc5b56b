//! The local side of [`Backend`]: templates and sandboxes on this machine's state dir,
//! through the engine, no server needed (the way podman works without a daemon).
//!
//! A sandbox must outlive the command that created it, so `create` starts a detached
//! keeper process (`kiln sandbox keep ID`, the way podman uses conmon) that restores the
//! VM and owns it until `kill`; other commands reach the guest agent through the socket
//! the keeper publishes ([`kiln_engine::Engine::connect_sandbox`]).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use async_trait::async_trait;
use futures::StreamExt as _;
use kiln_api::{
    ApiErrorCode, AttachSecret, AuditQuery, BuildInfo, BuildStatus, CreateSandbox, CreateSecret,
    NetworkConfig, PortAccess, PreviewPortList, PreviewToken, ProxyAuditEvent,
    PublishedPreviewPort, RotateSecret, SandboxFilter, SandboxInfo, SandboxStatus, SecretInfo,
    SnapshotInfo, SnapshotPage, TemplateInfo, TemplateRequest, TerminalSize, UpdateSnapshot,
};
use kiln_engine::{Engine, FileContent, SessionEvent, SessionOptions};
use tokio::sync::mpsc;

use crate::backend::{Backend, Command, OnLog, OnOutput, OnTerminal, Output, ShellInput, R};

/// How long `create` waits for the keeper to bring the sandbox up.
const START_TIMEOUT: Duration = Duration::from_secs(120);

/// The engine on the local state dir, as the local team.
pub(crate) struct Local {
    pub(crate) engine: Arc<Engine>,
    pub(crate) team: String,
}

impl Local {
    /// The engine on the state dir.
    pub(crate) async fn open() -> anyhow::Result<Self> {
        let engine = crate::engine().await?;
        let team = engine.local_team().await?.id;
        Ok(Self { engine, team })
    }

    fn logs_dir(&self) -> std::path::PathBuf {
        self.engine.layout().root().join("logs")
    }

    /// Waits until the keeper reports the sandbox active, or failed.
    async fn wait_started(&self, id: &str) -> anyhow::Result<()> {
        let started = Instant::now();
        loop {
            match self.engine.sandbox(&self.team, id).await?.status {
                SandboxStatus::Active => return Ok(()),
                SandboxStatus::Starting if started.elapsed() < START_TIMEOUT => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                SandboxStatus::Starting => {
                    let _ = self
                        .engine
                        .finish_sandbox(&self.team, id, SandboxStatus::Failed)
                        .await;
                    bail!(
                        "the sandbox did not start within {}s",
                        START_TIMEOUT.as_secs()
                    );
                }
                other => {
                    let log = self.logs_dir().join(format!("{id}.log"));
                    let tail = std::fs::read_to_string(&log).unwrap_or_default();
                    let tail: Vec<&str> = tail.lines().rev().take(5).collect();
                    bail!(
                        "the sandbox failed to start ({other}); keeper log {}:\n{}",
                        log.display(),
                        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                    );
                }
            }
        }
    }

    /// The keeper: restores the VM, hands the agent channel to other processes, and owns
    /// the VM until SIGTERM (kill) or until it dies.
    pub(crate) async fn keep(&self, id: &str) -> anyhow::Result<()> {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut live = self.engine.start_sandbox(&self.team, id).await?;
        drop(live.vm.release_agent());
        let died = loop {
            tokio::select! {
                _ = term.recv() => break false,
                _ = int.recv() => break false,
                () = tokio::time::sleep(Duration::from_millis(500)) => {
                    if live.vm.exit_status().is_some() {
                        break true;
                    }
                }
            }
        };
        let status = if died {
            tracing::warn!(sandbox = %id, exit = ?live.vm.exit_status(), "sandbox VM died");
            SandboxStatus::Failed
        } else {
            SandboxStatus::Deleted
        };
        live.vm.kill().await;
        self.engine.finish_sandbox(&self.team, id, status).await?;
        Ok(())
    }
}

#[async_trait]
impl Backend for Local {
    async fn submit(&self, req: &TemplateRequest, no_cache: bool) -> R<(TemplateInfo, BuildInfo)> {
        match self.engine.submit_with(&self.team, req, no_cache).await {
            Ok(created) => Ok(created),
            Err(e) if e.code() == ApiErrorCode::Conflict => {
                let name = req.name.as_deref().unwrap_or_default();
                let rebuild = self
                    .engine
                    .rebuild_with(&self.team, name, Some(req), no_cache)
                    .await?;
                if !rebuild.created {
                    eprintln!(
                        "--> a build of this spec is already running: {}",
                        rebuild.build.id
                    );
                }
                Ok((self.engine.template(&self.team, name).await?, rebuild.build))
            }
            Err(e) => Err(e.into()),
        }
    }

    fn detach(&self, b: &BuildInfo) -> R<()> {
        if b.status == BuildStatus::Pending {
            crate::spawn_detached(&["template", "run-build", &b.id], &self.logs_dir(), &b.id)?;
        }
        Ok(())
    }

    async fn run_build(&self, b: &BuildInfo, on_log: OnLog<'_>) -> R<BuildInfo> {
        if b.status != BuildStatus::Pending {
            // Another process runs it: follow its log.
            self.logs(b, true, on_log).await?;
            return Ok(self.engine.build(&self.team, &b.id).await?);
        }
        // This process runs it, its lines given to `on_log` as they come.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let run = self.engine.run_build(&b.id, Some(tx));
        tokio::pin!(run);
        loop {
            tokio::select! {
                r = &mut run => {
                    while let Ok(line) = rx.try_recv() {
                        on_log(&line);
                    }
                    return Ok(r?);
                }
                Some(line) = rx.recv() => on_log(&line),
            }
        }
    }

    async fn cancel_build(&self, b: &BuildInfo) -> R<()> {
        self.engine.cancel_build(&self.team, &b.id).await?;
        Ok(())
    }

    async fn templates(&self) -> R<Vec<TemplateInfo>> {
        Ok(self.engine.list_templates(&self.team, "").await?)
    }

    async fn template(&self, name: &str) -> R<TemplateInfo> {
        Ok(self.engine.template(&self.team, name).await?)
    }

    async fn builds(&self, t: &TemplateInfo) -> R<Vec<BuildInfo>> {
        Ok(self.engine.list_builds(&self.team, &t.id).await?)
    }

    async fn build(&self, t: &TemplateInfo, build_id: &str) -> R<BuildInfo> {
        Ok(self
            .engine
            .template_build(&self.team, &t.id, build_id)
            .await?)
    }

    async fn logs(&self, b: &BuildInfo, follow: bool, on_log: OnLog<'_>) -> R<()> {
        if !follow || b.status.is_terminal() {
            for line in self.engine.build_log(&self.team, &b.id).await? {
                on_log(&line);
            }
            return Ok(());
        }
        let events = self.engine.follow_build_log(&self.team, &b.id).await?;
        tokio::pin!(events);
        while let Some(e) = events.next().await {
            on_log(&e);
        }
        Ok(())
    }

    async fn delete_template(&self, t: &TemplateInfo) -> R<()> {
        self.engine.delete_template(&self.team, &t.id).await?;
        Ok(())
    }

    async fn create_sandbox(&self, req: CreateSandbox) -> R<String> {
        if req.timeout_seconds.is_some() || req.auto_delete_seconds.is_some() {
            bail!(
                "--timeout and --auto-delete need `kiln serve` (its timers pause and delete \
                 sandboxes; the local state dir has no process to run them): use a server \
                 (KILN_URL, `kiln login`)"
            );
        }
        let (sandbox, _token) = self.engine.create_sandbox_record(&self.team, &req).await?;
        crate::spawn_detached(
            &["sandbox", "keep", &sandbox.id],
            &self.logs_dir(),
            &sandbox.id,
        )?;
        self.wait_started(&sandbox.id).await?;
        Ok(sandbox.id)
    }

    async fn snapshot_sandbox(&self, id: &str, _name: Option<String>) -> R<SnapshotInfo> {
        // The sandbox's VM belongs to its keeper process, which takes no requests.
        self.engine.sandbox(&self.team, id).await?;
        bail!(
            "taking a snapshot needs `kiln serve`, which owns its sandboxes' VMs (a local \
             sandbox's VM belongs to its keeper process): use a server (KILN_URL, `kiln login`)"
        )
    }

    async fn snapshots(&self, sandbox: Option<&str>) -> R<Vec<SnapshotInfo>> {
        Ok(self
            .engine
            .list_snapshots(&self.team, sandbox, &SnapshotPage::default())
            .await?)
    }

    async fn snapshot(&self, id: &str) -> R<SnapshotInfo> {
        Ok(self.engine.snapshot(&self.team, id).await?)
    }

    async fn rename_snapshot(&self, id: &str, name: &str) -> R<SnapshotInfo> {
        let update = UpdateSnapshot { name: name.into() };
        Ok(self.engine.rename_snapshot(&self.team, id, &update).await?)
    }

    async fn delete_snapshot(&self, id: &str) -> R<()> {
        Ok(self.engine.delete_snapshot(&self.team, id).await?)
    }

    async fn sandboxes(&self) -> R<Vec<SandboxInfo>> {
        self.engine.reap_orphaned_sandboxes(&self.team).await?;
        Ok(self
            .engine
            .list_sandboxes(&self.team, &SandboxFilter::default())
            .await?)
    }

    async fn set_network(&self, id: &str, rules: Option<NetworkConfig>) -> R<()> {
        Ok(self
            .engine
            .set_network_rules(&self.team, id, rules.as_ref())
            .await?)
    }

    async fn kill_sandbox(&self, id: &str) -> R<()> {
        // Stops the keeper (or whichever process owns the VM) and marks it deleted.
        self.engine.kill_sandbox(&self.team, id).await?;
        Ok(())
    }

    async fn exec(&self, id: &str, cmd: &Command, out: OnOutput<'_>) -> R<i32> {
        let sandbox = self.engine.connect_sandbox(&self.team, id).await?;
        let opts = SessionOptions {
            stdin: false,
            user: cmd.user.clone(),
        };
        let mut session = sandbox.session(&cmd.req, opts).await?;
        loop {
            match session.next_event().await? {
                SessionEvent::Stdout(b) => out(Output::Stdout, &b),
                SessionEvent::Stderr(b) => out(Output::Stderr, &b),
                SessionEvent::Exit { exit_code, error } => {
                    if let Some(e) = error {
                        out(Output::Stderr, e.as_bytes());
                    }
                    return Ok(exit_code);
                }
            }
        }
    }

    async fn shell(
        &self,
        id: &str,
        cmd: &Command,
        size: TerminalSize,
        mut input: mpsc::Receiver<ShellInput>,
        out: OnTerminal<'_>,
    ) -> R<i32> {
        let sandbox = self.engine.connect_sandbox(&self.team, id).await?;
        let opts = SessionOptions {
            stdin: true,
            user: cmd.user.clone(),
        };
        let mut req = cmd.req.clone();
        req.pty = Some(size);
        let mut session = sandbox.session(&req, opts).await?;
        let mut keys = session.input().context("a new session has its input")?;
        let mut typing = true;
        loop {
            tokio::select! {
                ev = session.next_event() => match ev? {
                    SessionEvent::Stdout(b) | SessionEvent::Stderr(b) => out(&b),
                    SessionEvent::Exit { exit_code, error } => {
                        if let Some(e) = error {
                            out(format!("\r\n{e}\r\n").as_bytes());
                        }
                        return Ok(exit_code);
                    }
                },
                key = input.recv(), if typing => match key {
                    Some(ShellInput::Data(b)) => {
                        keys.write_stdin(&b).await;
                    }
                    Some(ShellInput::Resize(size)) => keys.resize(size),
                    Some(ShellInput::Eof) | None => {
                        keys.close_stdin();
                        typing = false;
                    }
                },
            }
        }
    }

    async fn download(&self, id: &str, path: &str, dst: &Path) -> R<u64> {
        let sandbox = self.engine.connect_sandbox(&self.team, id).await?;
        let mut file = tokio::fs::File::create(dst)
            .await
            .with_context(|| format!("creating {}", dst.display()))?;
        Ok(match sandbox.read_file(path).await? {
            FileContent::File(mut reader) | FileContent::Zip { mut reader, .. } => {
                tokio::io::copy(&mut reader, &mut file).await?
            }
        })
    }

    async fn upload(&self, id: &str, src: &Path, path: &str) -> R<u64> {
        let sandbox = self.engine.connect_sandbox(&self.team, id).await?;
        let file = tokio::fs::File::open(src)
            .await
            .with_context(|| format!("opening {}", src.display()))?;
        let mode =
            std::os::unix::fs::PermissionsExt::mode(&file.metadata().await?.permissions()) & 0o7777;
        Ok(sandbox.write_file(path, file, Some(mode)).await?)
    }

    async fn create_secret(&self, req: &CreateSecret) -> R<SecretInfo> {
        Ok(self.engine.create_secret(&self.team, req).await?)
    }

    async fn secrets(&self) -> R<Vec<SecretInfo>> {
        Ok(self.engine.list_secrets(&self.team).await?)
    }

    async fn rotate_secret(&self, name: &str, value: &str) -> R<SecretInfo> {
        let req = RotateSecret {
            value: value.to_owned(),
        };
        Ok(self.engine.rotate_secret(&self.team, name, &req).await?)
    }

    async fn delete_secret(&self, name: &str) -> R<()> {
        Ok(self.engine.delete_secret(&self.team, name).await?)
    }

    async fn secret_audit(&self, name: &str, q: &AuditQuery) -> R<Vec<ProxyAuditEvent>> {
        Ok(self.engine.secret_audit(&self.team, name, q).await?)
    }

    async fn attach_secret(&self, id: &str, env_key: &str, secret: &str) -> R<()> {
        let req = AttachSecret {
            env_key: env_key.to_owned(),
            secret_name: secret.to_owned(),
        };
        Ok(self.engine.attach_secret(&self.team, id, &req).await?)
    }

    async fn detach_secret(&self, id: &str, env_key: &str) -> R<()> {
        Ok(self.engine.detach_secret(&self.team, id, env_key).await?)
    }

    async fn preview_ports(&self, _id: &str) -> R<PreviewPortList> {
        Err(previews_need_a_server())
    }

    async fn publish_port(
        &self,
        _id: &str,
        _port: u16,
        _access: Option<PortAccess>,
    ) -> R<PublishedPreviewPort> {
        Err(previews_need_a_server())
    }

    async fn unpublish_port(&self, _id: &str, _port: u16) -> R<()> {
        Err(previews_need_a_server())
    }

    async fn preview_token(
        &self,
        _id: &str,
        _port: u16,
        _expires_in_seconds: Option<u64>,
        _rotate: bool,
    ) -> R<PreviewToken> {
        Err(previews_need_a_server())
    }
}

/// Preview URLs are served by `kiln serve` (its listener proxies them into the sandboxes
/// it runs); a sandbox a CLI keeper runs has no such front door.
fn previews_need_a_server() -> anyhow::Error {
    anyhow::anyhow!(
        "preview URLs are served by `kiln serve`: start it, and point the CLI at it \
         (KILN_URL and KILN_API_KEY, or `kiln login`)"
    )
}
