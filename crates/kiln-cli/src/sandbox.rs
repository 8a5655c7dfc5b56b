//! `kiln sandbox ...`: create, list, use and kill sandboxes, on the local state dir (a
//! keeper process owns each VM: see [`crate::local`]) or a server (see [`crate::backend`]).

use std::collections::BTreeMap;
use std::io::Write;
use std::process::ExitCode;

use anyhow::bail;
use kiln_api::{CreateSandbox, ExecRequest, NetworkConfig, PortAccess, PreviewAccess};

use crate::backend::{backend, Command, Output};
use crate::print;

#[derive(Debug, clap::Subcommand)]
pub(crate) enum Cmd {
    /// Start a sandbox from a template (name or id) or a snapshot; prints the sandbox id.
    Create {
        /// Template name or id (default: the system template `superserve/base`).
        #[arg(conflicts_with = "from_snapshot")]
        template: Option<String>,
        /// Continue from this snapshot instead (its processes live, its files as they were).
        #[arg(long, value_name = "SNAPSHOT_ID")]
        from_snapshot: Option<String>,
        /// Pause it after this many seconds of active time (a server's timer; each resume
        /// starts a fresh window).
        #[arg(long, value_name = "SECONDS")]
        timeout: Option<u64>,
        /// Delete it after this many seconds continuously paused (0: as soon as it pauses).
        #[arg(long, value_name = "SECONDS")]
        auto_delete: Option<u64>,
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
        /// Ports published for preview URLs need a token by default (else: public).
        #[arg(long)]
        private_previews: bool,
        /// Bind a team secret: the variable holds a stand-in that the egress proxy swaps
        /// for the secret on its hosts (repeatable).
        #[arg(long = "secret", value_name = "ENV=NAME")]
        secrets: Vec<String>,
    },
    /// Bind or unbind team secrets.
    #[command(subcommand)]
    Secret(SecretCmd),
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
    /// Take a snapshot of a sandbox (it runs on); prints the snapshot id once it is ready.
    Snapshot {
        /// Sandbox id.
        id: String,
        /// A name for the snapshot.
        #[arg(long)]
        name: Option<String>,
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
    /// An interactive shell (or CMD) on a terminal in a sandbox; exits with its exit code.
    ///
    /// The local terminal is in raw mode while it runs (Ctrl-C goes to the sandbox), and
    /// the sandbox's terminal follows its size.
    Shell {
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
        /// The command, run with `/bin/sh -c` (default: bash if the sandbox has it,
        /// else sh, as a login shell).
        #[arg(last = true)]
        cmd: Vec<String>,
    },
    /// Preview URLs: `preview ID PORT` publishes a port and prints its URL (and, for a
    /// private port, a signed URL a browser can open); `preview ls|rm|token`.
    ///
    /// They are served by `kiln serve`, at `{port}-{id}.{KILN_PREVIEW_DOMAIN}`.
    #[command(args_conflicts_with_subcommands = true)]
    Preview {
        #[command(subcommand)]
        cmd: Option<PreviewCmd>,
        #[command(flatten)]
        publish: PublishArgs,
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

/// `kiln sandbox preview ID PORT`.
#[derive(Debug, clap::Args)]
pub(crate) struct PublishArgs {
    /// Sandbox id.
    id: Option<String>,
    /// The port inside the sandbox (1024-65535).
    port: Option<u16>,
    /// Anyone with the URL may open it.
    #[arg(long, conflicts_with = "private")]
    public: bool,
    /// It needs a token (a signed URL is printed).
    #[arg(long)]
    private: bool,
    /// How long the printed signed URL works, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = DEFAULT_SIGNED_URL_SECS)]
    expires: u64,
}

/// How long `kiln sandbox preview` makes a private port's signed URL work by default (the
/// Superserve MCP tool's default).
const DEFAULT_SIGNED_URL_SECS: u64 = 3600;

#[derive(Debug, clap::Subcommand)]
pub(crate) enum PreviewCmd {
    /// A sandbox's preview policy and published ports, with their URLs.
    Ls {
        /// Sandbox id.
        id: String,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Unpublish a port: its URL closes and its tokens stop working.
    Rm {
        /// Sandbox id.
        id: String,
        /// The port.
        port: u16,
    },
    /// Print a token for a published port (and its signed URL).
    Token {
        /// Sandbox id.
        id: String,
        /// The port.
        port: u16,
        /// It works for this many seconds (default: until rotated or unpublished).
        #[arg(long, value_name = "SECS")]
        expires: Option<u64>,
        /// Revoke every earlier token, signed URL and cookie of the port first.
        #[arg(long, conflicts_with = "expires")]
        rotate: bool,
        /// JSON output (holds the token).
        #[arg(long)]
        json: bool,
    },
}

async fn preview(
    backend: &dyn crate::backend::Backend,
    cmd: Option<PreviewCmd>,
    publish: PublishArgs,
) -> anyhow::Result<()> {
    match cmd {
        Some(PreviewCmd::Ls { id, json }) => {
            print::preview_ports(&backend.preview_ports(&id).await?, json)
        }
        Some(PreviewCmd::Rm { id, port }) => {
            backend.unpublish_port(&id, port).await?;
            println!("{port}");
            Ok(())
        }
        Some(PreviewCmd::Token {
            id,
            port,
            expires,
            rotate,
            json,
        }) => print::preview_token(
            &backend.preview_token(&id, port, expires, rotate).await?,
            json,
        ),
        None => {
            let (Some(id), Some(port)) = (publish.id, publish.port) else {
                bail!("usage: kiln sandbox preview ID PORT [--public|--private], or preview ls|rm|token");
            };
            let access = match (publish.public, publish.private) {
                (true, _) => Some(PortAccess::Public),
                (_, true) => Some(PortAccess::Private),
                _ => None,
            };
            let published = backend.publish_port(&id, port, access).await?;
            println!("{}", published.url.as_deref().unwrap_or("-"));
            if published.access == PortAccess::Private {
                let token = backend
                    .preview_token(&id, port, Some(publish.expires), false)
                    .await?;
                if let Some(url) = token.signed_url() {
                    println!("{url}");
                }
                eprintln!(
                    "--> port {port} is private: the second URL carries a token for {}s; \
                     `kiln sandbox preview token {id} {port}` mints others",
                    publish.expires
                );
            }
            Ok(())
        }
    }
}

#[derive(Debug, clap::Subcommand)]
pub(crate) enum SecretCmd {
    /// Bind a team secret under a variable; processes started from now on see its
    /// stand-in (a paused sandbox gets it on resume).
    Attach {
        /// Sandbox id.
        id: String,
        /// The variable and the secret.
        #[arg(value_name = "ENV=NAME")]
        binding: String,
    },
    /// Remove a binding: its stand-in is refused from the next request on.
    Detach {
        /// Sandbox id.
        id: String,
        /// The variable.
        env: String,
    },
}

pub async fn run(command: Cmd) -> anyhow::Result<ExitCode> {
    if let Cmd::Keep { id } = &command {
        // The keeper that `create` starts: this machine only.
        crate::local::Local::open().await?.keep(id).await?;
        return Ok(ExitCode::SUCCESS);
    }
    let backend = backend().await?;
    let backend = backend.as_ref();
    match command {
        Cmd::Create {
            template,
            from_snapshot,
            timeout,
            auto_delete,
            env,
            metadata,
            name,
            allow_out,
            deny_out,
            private_previews,
            secrets,
        } => {
            // The API wants a name; what it starts from and a random suffix stand in.
            let name = name.unwrap_or_else(|| {
                let tail = uuid::Uuid::new_v4().simple().to_string();
                let from = template
                    .as_deref()
                    .or(from_snapshot.as_deref().map(|_| "fork"))
                    .unwrap_or("sandbox");
                format!("{}-{}", from.replace('/', "-"), &tail[..8])
            });
            let req = CreateSandbox {
                name,
                from_template: template,
                from_snapshot,
                timeout_seconds: timeout,
                auto_delete_seconds: auto_delete,
                env_vars: pairs(&env)?,
                metadata: pairs(&metadata)?,
                network: network_rules(allow_out, deny_out)?,
                secrets: pairs(&secrets)?,
                preview_access: private_previews.then_some(PreviewAccess::Private),
            };
            req.validate()?;
            println!("{}", backend.create_sandbox(req).await?);
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Secret(SecretCmd::Attach { id, binding }) => {
            let Some((env, secret)) = binding.split_once('=') else {
                bail!("expected ENV=NAME, got {binding:?}");
            };
            backend.attach_secret(&id, env, secret).await?;
            println!("{id}");
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Secret(SecretCmd::Detach { id, env }) => {
            backend.detach_secret(&id, &env).await?;
            println!("{id}");
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Ls { json } => {
            print::sandboxes(&backend.sandboxes().await?, json)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Network {
            id,
            allow_out,
            deny_out,
            clear,
        } => {
            let rules = network_update(allow_out, deny_out, clear)?;
            backend.set_network(&id, rules).await?;
            println!("{id}");
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Kill { id } => {
            backend.kill_sandbox(&id).await?;
            println!("{id}");
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Snapshot { id, name } => {
            let s = backend.snapshot_sandbox(&id, name).await?;
            println!("{}", s.id);
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Exec {
            cwd,
            env,
            user,
            id,
            cmd,
        } => {
            let command = Command {
                req: ExecRequest {
                    command: shell_join(&cmd),
                    working_dir: cwd,
                    env: pairs(&env)?,
                    ..ExecRequest::default()
                },
                user,
            };
            let (mut out, mut err) = (std::io::stdout(), std::io::stderr());
            let code = backend
                .exec(&id, &command, &mut |o, data| {
                    let w: &mut dyn Write = match o {
                        Output::Stdout => &mut out,
                        Output::Stderr => &mut err,
                    };
                    let _ = w.write_all(data);
                    let _ = w.flush();
                })
                .await?;
            Ok(ExitCode::from(u8::try_from(code & 0xff).unwrap_or(1)))
        }
        Cmd::Shell {
            cwd,
            env,
            user,
            id,
            cmd,
        } => {
            let command = Command {
                req: ExecRequest {
                    command: if cmd.is_empty() {
                        DEFAULT_SHELL.to_owned()
                    } else {
                        shell_join(&cmd)
                    },
                    working_dir: cwd,
                    env: pairs(&env)?,
                    ..ExecRequest::default()
                },
                user,
            };
            let input = crate::terminal::input()?;
            let raw = crate::terminal::RawMode::enter()?;
            let mut out = std::io::stdout();
            let code = backend
                .shell(&id, &command, crate::terminal::size(), input, &mut |data| {
                    let _ = out.write_all(data);
                    let _ = out.flush();
                })
                .await;
            drop(raw);
            Ok(ExitCode::from(u8::try_from(code? & 0xff).unwrap_or(1)))
        }
        Cmd::Cp { src, dst } => {
            let n = match (split_remote(&src), split_remote(&dst)) {
                (Some((id, path)), None) => backend.download(id, path, dst.as_ref()).await?,
                (None, Some((id, path))) => backend.upload(id, src.as_ref(), path).await?,
                _ => bail!("exactly one side must be a sandbox path, as ID:/absolute/path"),
            };
            eprintln!("{n} bytes");
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Preview { cmd, publish } => {
            preview(backend, cmd, publish).await?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Keep { .. } => unreachable!("handled above"),
    }
}

/// The shell `kiln sandbox shell` runs without a command: a login shell, bash where the
/// image has it.
const DEFAULT_SHELL: &str =
    "if command -v bash >/dev/null 2>&1; then exec bash -l; else exec sh -l; fi";

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
        .map(|a| kiln_spec::shell_quote(a))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The egress rules of `--allow-out` / `--deny-out`, checked here so that a typo is an
/// error before anything starts; `None` when neither was given.
pub(crate) fn network_rules(
    allow_out: Vec<String>,
    deny_out: Vec<String>,
) -> anyhow::Result<Option<NetworkConfig>> {
    if allow_out.is_empty() && deny_out.is_empty() {
        return Ok(None);
    }
    let rules = NetworkConfig {
        allow_out,
        deny_out,
    };
    if let Err(errs) = kiln_net::Policy::compile(&rules) {
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
) -> anyhow::Result<Option<NetworkConfig>> {
    if clear {
        return Ok(None);
    }
    match network_rules(allow_out, deny_out)? {
        Some(r) => Ok(Some(r)),
        None => anyhow::bail!("give --allow-out / --deny-out rules, or --clear to remove them"),
    }
}
