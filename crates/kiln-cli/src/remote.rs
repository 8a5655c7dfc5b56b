//! Remote mode: `kiln template ...` and `kiln sandbox ...` against a kiln server, through
//! `kiln-sdk` (the [`Remote`] side of [`Backend`]), with the same output and exit codes as
//! on the local state dir.
//!
//! The server comes from `KILN_URL` and `KILN_API_KEY`, else from the profile `kiln login`
//! saved; without either the CLI works locally. Differences that follow from the API:
//! `sandbox exec` has no `--user` (commands run as the template's user), and `template
//! logs` of a running build always follows it (the log stream has no "history only").

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context as _};
use async_trait::async_trait;
use kiln_api::{
    ApiErrorCode, AuditQuery, BuildInfo, BuildLogEvent, CreateSandbox, CreateSecret, NetworkConfig,
    PortAccess, PreviewPortList, PreviewToken, ProxyAuditEvent, PublishedPreviewPort, SandboxInfo,
    SecretInfo, SnapshotInfo, SnapshotPage, TemplateInfo, TemplateRequest, TerminalSize,
};
use kiln_sdk::{
    Client, ListOptions, Previews, RunOptions, Sandbox, SandboxCreateOptions, Secret, Snapshot,
    SnapshotOptions, Template, TemplateCreateOptions,
};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::backend::{Backend, Command, OnLog, OnOutput, OnTerminal, Output, ShellInput, R};

/// A saved server: `kiln login` writes it, `kiln logout` removes it.
#[derive(Debug, Serialize, Deserialize)]
pub struct Profile {
    /// The server's base URL.
    pub url: String,
    /// A team's API key.
    pub api_key: String,
}

/// Where the profile lives: `$XDG_CONFIG_HOME/kiln/profile.json` or
/// `~/.config/kiln/profile.json`.
pub fn profile_path() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("kiln").join("profile.json"))
}

/// The server to talk to, if any: the environment first, then the saved profile.
pub fn client() -> anyhow::Result<Option<Client>> {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
    let (url, key) = match (env("KILN_URL"), env("KILN_API_KEY")) {
        (Some(url), Some(key)) => (url, key),
        (Some(_), None) => bail!("KILN_URL is set but KILN_API_KEY is not"),
        _ => match load_profile()? {
            Some(p) => (p.url, p.api_key),
            None => return Ok(None),
        },
    };
    let client = Client::new(url.trim(), key.trim()).context("configuring the kiln client")?;
    Ok(Some(client))
}

fn load_profile() -> anyhow::Result<Option<Profile>> {
    let Some(path) = profile_path() else {
        return Ok(None);
    };
    match std::fs::read(&path) {
        Ok(bytes) => {
            Ok(Some(serde_json::from_slice(&bytes).with_context(|| {
                format!("{} is invalid", path.display())
            })?))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// `kiln login URL`: checks the key against the server, then saves both (mode 0600).
pub async fn login(url: &str, api_key: &str) -> anyhow::Result<ExitCode> {
    let client = Client::new(url, api_key)?;
    Template::list(&client, None)
        .await
        .with_context(|| format!("checking the key against {url}"))?;
    let path = profile_path().context("no home directory for the profile")?;
    let dir = path.parent().expect("profile path has a parent");
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let json = serde_json::to_vec_pretty(&Profile {
        url: url.to_owned(),
        api_key: api_key.to_owned(),
    })?;
    let mut f = {
        use std::os::unix::fs::OpenOptionsExt as _;
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("writing {}", path.display()))?
    };
    f.write_all(&json)?;
    eprintln!("--> logged in to {url}; saved in {}", path.display());
    Ok(ExitCode::SUCCESS)
}

/// `kiln logout`: back to the local state dir.
pub fn logout() -> anyhow::Result<ExitCode> {
    if let Some(path) = profile_path() {
        match std::fs::remove_file(&path) {
            Ok(()) => eprintln!("--> removed {}", path.display()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A validated request as the SDK's options.
fn create_options(req: &TemplateRequest, force: bool) -> anyhow::Result<TemplateCreateOptions> {
    let spec = &req.build_spec;
    Ok(TemplateCreateOptions {
        name: req.name.clone().unwrap_or_default(),
        from: spec.from.clone(),
        steps: spec.steps.clone(),
        start_cmd: spec.start_cmd.clone(),
        ready_cmd: spec.ready_cmd.clone(),
        vcpu: req.resources.vcpu,
        memory_mib: req.resources.memory_mib,
        disk_mib: req.resources.disk_mib,
        force,
    })
}

/// The server side of [`Backend`]: the same commands through the Rust SDK.
pub(crate) struct Remote {
    pub(crate) client: Client,
}

impl Remote {
    async fn template_of(&self, template_id: &str) -> R<Template> {
        Ok(Template::connect(&self.client, template_id).await?)
    }
}

#[async_trait]
impl Backend for Remote {
    async fn submit(&self, req: &TemplateRequest, no_cache: bool) -> R<(TemplateInfo, BuildInfo)> {
        let options = create_options(req, no_cache)?;
        let mut template = match Template::create(&self.client, options.clone()).await {
            Ok(t) => t,
            Err(e) if e.code() == ApiErrorCode::Conflict.as_str() => {
                let mut t = Template::connect(&self.client, &options.name).await?;
                t.rebuild_with(&options).await?;
                t
            }
            Err(e) => return Err(e.into()),
        };
        let build_id = template.info().latest_build_id.clone().unwrap_or_default();
        let build = template.get_build(&build_id).await?;
        Ok((template.get_info().await?, build))
    }

    fn detach(&self, _b: &BuildInfo) -> R<()> {
        // The server runs it.
        Ok(())
    }

    async fn run_build(&self, b: &BuildInfo, on_log: OnLog<'_>) -> R<BuildInfo> {
        let mut t = self.template_of(&b.template_id).await?;
        // A failed or cancelled build is an error of the wait; the build's own record says
        // how it ended, whichever way the wait did.
        let _ = t.wait_until_ready(Some(on_log)).await;
        Ok(t.get_build(&b.id).await?)
    }

    async fn cancel_build(&self, b: &BuildInfo) -> R<()> {
        Ok(self
            .template_of(&b.template_id)
            .await?
            .cancel_build(&b.id)
            .await?)
    }

    async fn templates(&self) -> R<Vec<TemplateInfo>> {
        Ok(Template::list(&self.client, None).await?)
    }

    async fn template(&self, name: &str) -> R<TemplateInfo> {
        Ok(Template::connect(&self.client, name).await?.info().clone())
    }

    async fn builds(&self, t: &TemplateInfo) -> R<Vec<BuildInfo>> {
        Ok(self.template_of(&t.id).await?.list_builds(None).await?)
    }

    async fn build(&self, t: &TemplateInfo, build_id: &str) -> R<BuildInfo> {
        Ok(self.template_of(&t.id).await?.get_build(build_id).await?)
    }

    async fn logs(&self, b: &BuildInfo, _follow: bool, on_log: OnLog<'_>) -> R<()> {
        // The server's log stream always follows a running build.
        let t = self.template_of(&b.template_id).await?;
        t.stream_build_logs(Some(&b.id), |e: &BuildLogEvent| on_log(e))
            .await?;
        Ok(())
    }

    async fn delete_template(&self, t: &TemplateInfo) -> R<()> {
        Ok(Template::delete_by_id(&self.client, &t.id).await?)
    }

    async fn create_sandbox(&self, req: CreateSandbox) -> R<String> {
        let options = SandboxCreateOptions {
            name: req.name,
            from_template: req.from_template.unwrap_or_default(),
            from_snapshot: req.from_snapshot,
            timeout_seconds: req.timeout_seconds,
            auto_delete_seconds: req.auto_delete_seconds,
            env_vars: req.env_vars,
            metadata: req.metadata,
            network: req.network,
            secrets: req.secrets,
            preview_access: req.preview_access,
        };
        Ok(Sandbox::create(&self.client, options)
            .await?
            .id()
            .to_owned())
    }

    async fn snapshot_sandbox(&self, id: &str, name: Option<String>) -> R<SnapshotInfo> {
        let options = SnapshotOptions {
            name,
            idempotency_key: None,
        };
        let mut s = Snapshot::take(&self.client, id, options).await?;
        Ok(s.wait_until_ready().await?.clone())
    }

    async fn snapshots(&self, sandbox: Option<&str>) -> R<Vec<SnapshotInfo>> {
        Ok(Snapshot::list(&self.client, sandbox, SnapshotPage::default()).await?)
    }

    async fn snapshot(&self, id: &str) -> R<SnapshotInfo> {
        Ok(Snapshot::get(&self.client, id).await?.info().clone())
    }

    async fn rename_snapshot(&self, id: &str, name: &str) -> R<SnapshotInfo> {
        let mut s = Snapshot::get(&self.client, id).await?;
        Ok(s.rename(name).await?.clone())
    }

    async fn delete_snapshot(&self, id: &str) -> R<()> {
        // Unlike the SDK's idempotent delete, a command names one snapshot: not finding it
        // is an error to show.
        Snapshot::get(&self.client, id).await?;
        Ok(Snapshot::delete_by_id(&self.client, id).await?)
    }

    async fn sandboxes(&self) -> R<Vec<SandboxInfo>> {
        Ok(Sandbox::list(&self.client, ListOptions::default()).await?)
    }

    async fn set_network(&self, id: &str, rules: Option<NetworkConfig>) -> R<()> {
        Ok(Sandbox::set_network_by_id(&self.client, id, rules.as_ref()).await?)
    }

    async fn kill_sandbox(&self, id: &str) -> R<()> {
        Ok(Sandbox::kill_by_id(&self.client, id).await?)
    }

    async fn exec(&self, id: &str, cmd: &Command, out: OnOutput<'_>) -> R<i32> {
        if cmd.user.is_some() {
            bail!("--user is not available against a server: commands run as the template's user");
        }
        let s = Sandbox::connect(&self.client, id).await?;
        let options = RunOptions {
            cwd: cmd.req.working_dir.clone(),
            env: cmd.req.env.clone(),
            timeout_s: cmd.req.timeout_s,
        };
        // Both callbacks need the one output sink, one at a time.
        let sink = std::sync::Mutex::new(out);
        let put = |o: Output, text: &str| {
            (sink.lock().unwrap_or_else(|e| e.into_inner()))(o, text.as_bytes());
        };
        let result = s
            .commands()
            .run_streaming(
                &cmd.req.command,
                options,
                |out: &str| put(Output::Stdout, out),
                |err: &str| put(Output::Stderr, err),
            )
            .await?;
        Ok(result.exit_code)
    }

    async fn shell(
        &self,
        id: &str,
        cmd: &Command,
        size: TerminalSize,
        mut input: mpsc::Receiver<ShellInput>,
        out: OnTerminal<'_>,
    ) -> R<i32> {
        if cmd.user.is_some() {
            bail!("--user is not available against a server: commands run as the template's user");
        }
        let s = Sandbox::connect(&self.client, id).await?;
        let options = RunOptions {
            cwd: cmd.req.working_dir.clone(),
            env: cmd.req.env.clone(),
            timeout_s: cmd.req.timeout_s,
        };
        let mut session = s
            .commands()
            .spawn_terminal(&cmd.req.command, size, options)
            .await?;
        let mut typing = true;
        loop {
            tokio::select! {
                o = session.next_output() => match o {
                    Some(kiln_sdk::Output::Terminal(b)) => out(&b),
                    Some(_) => {}
                    None => break,
                },
                key = input.recv(), if typing => match key {
                    Some(ShellInput::Data(b)) => session.write_stdin(&b).await?,
                    Some(ShellInput::Resize(size)) => session.resize(size).await?,
                    Some(ShellInput::Eof) | None => {
                        session.close_stdin().await?;
                        typing = false;
                    }
                },
            }
        }
        let result = session.wait().await?;
        if !result.stderr.is_empty() {
            out(format!("\r\n{}\r\n", result.stderr.trim_end()).as_bytes());
        }
        Ok(result.exit_code)
    }

    async fn download(&self, id: &str, path: &str, dst: &Path) -> R<u64> {
        let s = Sandbox::connect(&self.client, id).await?;
        let data = s.files().read(path).await?;
        std::fs::write(dst, &data).with_context(|| format!("writing {}", dst.display()))?;
        Ok(data.len() as u64)
    }

    async fn upload(&self, id: &str, src: &Path, path: &str) -> R<u64> {
        let data = std::fs::read(src).with_context(|| format!("reading {}", src.display()))?;
        let s = Sandbox::connect(&self.client, id).await?;
        s.files().write(path, &data).await?;
        Ok(data.len() as u64)
    }

    async fn create_secret(&self, req: &CreateSecret) -> R<SecretInfo> {
        Ok(Secret::create(&self.client, req).await?)
    }

    async fn secrets(&self) -> R<Vec<SecretInfo>> {
        Ok(Secret::list(&self.client).await?)
    }

    async fn rotate_secret(&self, name: &str, value: &str) -> R<SecretInfo> {
        Ok(Secret::rotate(&self.client, name, value).await?)
    }

    async fn delete_secret(&self, name: &str) -> R<()> {
        // Unlike the SDK's idempotent delete, a missing secret is an error here, as on
        // the local state dir.
        Secret::get(&self.client, name).await?;
        Ok(Secret::delete(&self.client, name).await?)
    }

    async fn secret_audit(&self, name: &str, q: &AuditQuery) -> R<Vec<ProxyAuditEvent>> {
        Ok(Secret::audit(&self.client, name, q).await?)
    }

    async fn attach_secret(&self, id: &str, env_key: &str, secret: &str) -> R<()> {
        Ok(Sandbox::attach_secret_by_id(&self.client, id, env_key, secret).await?)
    }

    async fn detach_secret(&self, id: &str, env_key: &str) -> R<()> {
        Ok(Sandbox::detach_secret_by_id(&self.client, id, env_key).await?)
    }

    async fn preview_ports(&self, id: &str) -> R<PreviewPortList> {
        Ok(Previews::of(&self.client, id).list().await?)
    }

    async fn publish_port(
        &self,
        id: &str,
        port: u16,
        access: Option<PortAccess>,
    ) -> R<PublishedPreviewPort> {
        Ok(Previews::of(&self.client, id).publish(port, access).await?)
    }

    async fn unpublish_port(&self, id: &str, port: u16) -> R<()> {
        Ok(Previews::of(&self.client, id).unpublish(port).await?)
    }

    async fn preview_token(
        &self,
        id: &str,
        port: u16,
        expires_in_seconds: Option<u64>,
        rotate: bool,
    ) -> R<PreviewToken> {
        let p = Previews::of(&self.client, id);
        Ok(if rotate {
            p.rotate(port).await?
        } else {
            p.token(port, expires_in_seconds).await?
        })
    }
}
