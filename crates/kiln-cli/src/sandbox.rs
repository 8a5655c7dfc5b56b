//! `kiln sandbox ...`: sandboxes on the local state dir, no server needed.
//!
//! A sandbox must outlive the command that created it, so `create` starts a detached
//! keeper process (`kiln sandbox keep ID`, the way podman uses conmon) that restores the
//! VM and owns it until `kill`. Other commands reach the guest agent through the socket
//! the keeper publishes.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use kiln_agent_proto::{ExecEvent, ExecRequest};
use kiln_engine::Engine;
use kiln_store::{NewSandbox, Sandbox, SandboxFilter, SandboxStatus};

use crate::engine;

/// How long `create` waits for the keeper to bring the sandbox up.
const START_TIMEOUT: Duration = Duration::from_secs(120);

/// `kiln sandbox`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, clap::Subcommand)]
pub(crate) enum Cmd {
    /// Start a sandbox from a template (name or id); prints the sandbox id.
    Create {
        /// Template name or id.
        template: String,
        /// Environment variable over the template's defaults (repeatable).
        #[arg(long = "env", value_name = "K=V")]
        env: Vec<String>,
        /// Metadata label (repeatable).
        #[arg(long = "metadata", value_name = "K=V")]
        metadata: Vec<String>,
        /// Sandbox name.
        #[arg(long)]
        name: Option<String>,
        /// Egress: a CIDR, address or domain (`*.example.com`) it may reach even where a
        /// `--deny-out` covers it (repeatable). The host and private ranges stay closed.
        #[arg(long = "allow-out", value_name = "CIDR|DOMAIN")]
        allow_out: Vec<String>,
        /// Egress: a CIDR it may not reach (repeatable; `0.0.0.0/0` for an allowlist).
        #[arg(long = "deny-out", value_name = "CIDR")]
        deny_out: Vec<String>,
    },
    /// List live sandboxes.
    Ls {
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Replace a sandbox's egress rules; they apply to its next connection.
    Network {
        /// Sandbox id.
        id: String,
        /// A CIDR, address or domain (`*.example.com`) it may reach even where a
        /// `--deny-out` covers it (repeatable).
        #[arg(long = "allow-out", value_name = "CIDR|DOMAIN")]
        allow_out: Vec<String>,
        /// A CIDR it may not reach (repeatable; `0.0.0.0/0` for an allowlist).
        #[arg(long = "deny-out", value_name = "CIDR")]
        deny_out: Vec<String>,
        /// Remove every rule (the public internet, never the host or private ranges).
        #[arg(long, conflicts_with_all = ["allow_out", "deny_out"])]
        clear: bool,
    },
    /// Stop a sandbox and remove everything it had.
    Kill {
        /// Sandbox id.
        id: String,
    },
    /// Run a command in a sandbox, streaming its output; exits with its exit code.
    Exec {
        /// Working directory (default: the template's).
        #[arg(long)]
        cwd: Option<String>,
        /// Environment variable (repeatable).
        #[arg(long = "env", value_name = "K=V")]
        env: Vec<String>,
        /// User (default: the template's).
        #[arg(long)]
        user: Option<String>,
        /// Sandbox id.
        id: String,
        /// The command, run with `/bin/sh -c`.
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
    },
    /// Copy a file in or out: `kiln sandbox cp LOCAL ID:/path` or `kiln sandbox cp ID:/path LOCAL`.
    Cp {
        /// Source.
        src: String,
        /// Destination.
        dst: String,
    },
    /// Own a sandbox's VM until it is killed (started by `create`).
    #[command(hide = true)]
    Keep {
        /// Sandbox id.
        id: String,
    },
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    if let Some(client) = crate::remote::client()? {
        return crate::remote::sandbox(args.command, client).await;
    }
    let engine = engine().await?;
    let team = engine.local_team().await?;
    let team_id = team.id.as_str();
    match args.command {
        Cmd::Create {
            template,
            env,
            metadata,
            name,
            allow_out,
            deny_out,
        } => {
            let network = network_rules(allow_out, deny_out)?;
            let new = NewSandbox {
                template,
                name,
                metadata: pairs(&metadata)?,
                env: pairs(&env)?,
            };
            let (sandbox, _token) = engine.create_sandbox_record(team_id, &new).await?;
            if network.is_some() {
                engine
                    .set_network_rules(team_id, &sandbox.id, network.as_ref())
                    .await?;
            }
            let logs = engine.layout().root().join("logs");
            crate::spawn_detached(&["sandbox", "keep", &sandbox.id], &logs, &sandbox.id)?;
            let up = wait_started(&engine, team_id, &sandbox.id).await?;
            println!("{}", up.id);
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Ls { json } => {
            engine.reap_orphaned_sandboxes(team_id).await?;
            let all = engine
                .store()
                .list_sandboxes(team_id, &SandboxFilter::default())
                .await?;
            let docs: Vec<_> = all.iter().map(Sandbox::to_wire).collect();
            print_sandboxes(&docs, json)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Network {
            id,
            allow_out,
            deny_out,
            clear,
        } => {
            let rules = network_update(allow_out, deny_out, clear)?;
            engine
                .set_network_rules(team_id, &id, rules.as_ref())
                .await?;
            println!("{id}");
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Kill { id } => {
            kill(&engine, team_id, &id).await?;
            println!("{id}");
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Exec {
            cwd,
            env,
            user,
            id,
            cmd,
        } => {
            let agent = engine.connect_sandbox(team_id, &id).await?;
            let req = ExecRequest {
                command: shell_join(&cmd),
                env: pairs(&env)?,
                cwd,
                user,
                ..ExecRequest::default()
            };
            let mut handle = agent.exec(req).await?;
            let (mut out, mut err) = (std::io::stdout(), std::io::stderr());
            loop {
                match handle.next_event().await? {
                    Some(ExecEvent::Stdout(b)) => {
                        out.write_all(&b)?;
                        out.flush()?;
                    }
                    Some(ExecEvent::Stderr(b)) => {
                        err.write_all(&b)?;
                        err.flush()?;
                    }
                    Some(ExecEvent::Exit(status)) => {
                        let code = status
                            .code
                            .unwrap_or_else(|| 128 + status.signal.unwrap_or(0));
                        return Ok(ExitCode::from(u8::try_from(code & 0xff).unwrap_or(1)));
                    }
                    None => bail!("the sandbox closed the command's stream without an exit status"),
                }
            }
        }
        Cmd::Cp { src, dst } => {
            match (split_remote(&src), split_remote(&dst)) {
                (Some((id, path)), None) => {
                    let agent = engine.connect_sandbox(team_id, id).await?;
                    let file = tokio::fs::File::create(&dst)
                        .await
                        .with_context(|| format!("creating {dst}"))?;
                    let n = agent.read_file_to(path, file).await?;
                    eprintln!("{n} bytes");
                }
                (None, Some((id, path))) => {
                    let agent = engine.connect_sandbox(team_id, id).await?;
                    let file = tokio::fs::File::open(&src)
                        .await
                        .with_context(|| format!("opening {src}"))?;
                    let mode = std::os::unix::fs::PermissionsExt::mode(
                        &file.metadata().await?.permissions(),
                    ) & 0o7777;
                    let n = agent.write_file_from(path, file, Some(mode)).await?;
                    eprintln!("{n} bytes");
                }
                _ => bail!("exactly one side must be a sandbox path, as ID:/absolute/path"),
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Keep { id } => keep(&engine, team_id, &id).await,
    }
}

/// Waits until the keeper reports the sandbox active, or failed.
async fn wait_started(engine: &Engine, team_id: &str, id: &str) -> anyhow::Result<Sandbox> {
    let started = Instant::now();
    loop {
        let s = engine.store().sandbox_by_id(team_id, id).await?;
        match s.status {
            SandboxStatus::Active => return Ok(s),
            SandboxStatus::Starting if started.elapsed() < START_TIMEOUT => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            SandboxStatus::Starting => {
                let _ = engine
                    .finish_sandbox(team_id, id, SandboxStatus::Failed)
                    .await;
                bail!(
                    "the sandbox did not start within {}s",
                    START_TIMEOUT.as_secs()
                );
            }
            other => {
                let log = engine
                    .layout()
                    .root()
                    .join("logs")
                    .join(format!("{id}.log"));
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

/// The keeper: restores the VM, hands the agent channel to other processes, and owns the
/// VM until SIGTERM (kill) or until QEMU dies.
async fn keep(engine: &Engine, team_id: &str, id: &str) -> anyhow::Result<ExitCode> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut live = engine.start_sandbox(team_id, id).await?;
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
        SandboxStatus::Failed
    } else {
        SandboxStatus::Deleted
    };
    if died {
        tracing::warn!(sandbox = %id, exit = ?live.vm.exit_status(), "sandbox VM died");
    }
    live.vm.kill().await;
    engine.finish_sandbox(team_id, id, status).await?;
    Ok(ExitCode::SUCCESS)
}

async fn kill(engine: &Engine, team_id: &str, id: &str) -> anyhow::Result<()> {
    // Stops the keeper (or whichever process owns the VM) and marks the sandbox deleted.
    engine.kill_live_sandbox(team_id, id).await?;
    Ok(())
}

/// `sandbox ls`: a table, or the wire JSON.
pub(crate) fn print_sandboxes(all: &[serde_json::Value], json: bool) -> anyhow::Result<()> {
    use crate::template::field;
    if json {
        println!("{}", serde_json::to_string_pretty(all)?);
        return Ok(());
    }
    println!(
        "{:<36}  {:<10}  {:<36}  CREATED",
        "ID", "STATUS", "TEMPLATE"
    );
    for s in all {
        println!(
            "{:<36}  {:<10}  {:<36}  {}",
            field(s, "id"),
            field(s, "status"),
            field(s, "template_id"),
            field(s, "created_at")
        );
    }
    Ok(())
}

pub fn pairs(items: &[String]) -> anyhow::Result<BTreeMap<String, String>> {
    items
        .iter()
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
            _ => bail!("expected K=V, got {kv:?}"),
        })
        .collect()
}

pub(crate) fn split_remote(s: &str) -> Option<(&str, &str)> {
    let (id, path) = s.split_once(':')?;
    (!id.is_empty() && !id.contains('/') && path.starts_with('/')).then_some((id, path))
}

/// Joins argv for `/bin/sh -c`: one argument is taken as a script; several are quoted.
pub fn shell_join(cmd: &[String]) -> String {
    if let [one] = cmd {
        return one.clone();
    }
    cmd.iter()
        .map(|a| kiln_build::steps::shell_quote(a))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The egress rules of `--allow-out` / `--deny-out`, checked here so that a typo is an
/// error before anything starts; `None` when neither was given.
pub(crate) fn network_rules(
    allow_out: Vec<String>,
    deny_out: Vec<String>,
) -> anyhow::Result<Option<kiln_net::NetworkRules>> {
    if allow_out.is_empty() && deny_out.is_empty() {
        return Ok(None);
    }
    let rules = kiln_net::NetworkRules {
        allow_out,
        deny_out,
    };
    if let Err(errs) = rules.compile() {
        anyhow::bail!("invalid egress rules: {errs}");
    }
    Ok(Some(rules))
}

/// The rules `kiln sandbox network` sets: `None` with `--clear`; at least one rule
/// otherwise, so that a bare call cannot wipe the rules by accident.
pub(crate) fn network_update(
    allow_out: Vec<String>,
    deny_out: Vec<String>,
    clear: bool,
) -> anyhow::Result<Option<kiln_net::NetworkRules>> {
    if clear {
        return Ok(None);
    }
    match network_rules(allow_out, deny_out)? {
        Some(r) => Ok(Some(r)),
        None => anyhow::bail!("give --allow-out / --deny-out rules, or --clear to remove them"),
    }
}
