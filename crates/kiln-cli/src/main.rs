//! `kiln`: build sandbox templates and run sandboxes from them.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

mod backend;
mod egress;
mod image;
mod local;
mod print;
mod remote;
mod sandbox;
mod secret;
mod serve;
mod snapshot;
mod state;
mod template;
mod terminal;
mod validate;
mod vm;

#[derive(Debug, Parser)]
#[command(
    name = "kiln",
    version,
    about = "Build sandbox templates and run sandboxes from them"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check a BuildSpec (either JSON form) and print it normalized, as wire JSON.
    Validate(validate::Args),
    /// Install host packages, fetch the guest kernel and build the initramfs (idempotent).
    Setup(vm::SetupArgs),
    /// Report what is provisioned and which accelerator VMs will use, and why.
    Doctor(vm::DoctorArgs),
    /// Boot a throwaway VM from an image, run one command in it, exit with its code.
    Run(vm::RunArgs),
    /// Pull, inspect, list and prune base images.
    Image(image::Args),
    /// Build, list, inspect and delete templates.
    #[command(subcommand)]
    Template(template::Cmd),
    /// Create, list, use, snapshot and kill sandboxes.
    #[command(subcommand)]
    Sandbox(sandbox::Cmd),
    /// List, inspect, rename and delete snapshots of sandboxes.
    #[command(subcommand)]
    Snapshot(snapshot::Cmd),
    /// Store team secrets that sandboxes use without holding them.
    #[command(subcommand)]
    Secret(secret::Cmd),
    /// Serve the HTTP API (Superserve's wire format) on this state dir.
    Serve(serve::ServeArgs),
    /// Administration: API keys, the secrets key.
    Admin(serve::AdminArgs),
    /// Save a server and API key: `kiln template` and `kiln sandbox` then go to it
    /// (`KILN_URL` / `KILN_API_KEY` do the same for one shell).
    Login {
        /// The server's base URL, e.g. `http://kiln.internal:8080`.
        url: String,
        /// The API key (default: read from standard input, so it stays out of the shell
        /// history).
        #[arg(long, env = "KILN_API_KEY", hide_env_values = true)]
        api_key: Option<String>,
    },
    /// Forget the saved server: back to the local state dir.
    Logout,
    /// Print a shell completion script (`kiln completions bash > /etc/bash_completion.d/kiln`).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// A VM's egress proxy, started jailed by the VM's owner.
    #[command(hide = true)]
    EgressProxy(egress::Args),
}

fn block_on(
    f: impl std::future::Future<Output = anyhow::Result<ExitCode>>,
) -> anyhow::Result<ExitCode> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?
        .block_on(f)
}

/// The guest agent, built for the guest by `build.rs` and carried inside `kiln`, so the
/// binary alone can start VMs wherever it is installed (`$KILN_AGENT_BIN` overrides it).
static AGENT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/kiln-agent"));

/// [`AGENT`] as the VM layer takes it.
fn embedded_agent() -> kiln_vm::provision::AgentSource {
    kiln_vm::provision::AgentSource::Embedded(AGENT)
}

/// The engine on the local state dir.
async fn engine() -> anyhow::Result<std::sync::Arc<kiln_engine::Engine>> {
    Ok(kiln_engine::Engine::open(engine_config(state::state_dir())).await?)
}

/// The engine's configuration for a state dir, with this binary as the egress proxy
/// VMs reach the outside through and its embedded agent.
fn engine_config(state_dir: std::path::PathBuf) -> kiln_engine::EngineConfig {
    let mut cfg = kiln_engine::EngineConfig::new(state_dir);
    cfg.egress_helper = std::env::current_exe().ok();
    cfg.agent = embedded_agent();
    cfg
}

/// Starts `kiln ARGS...` in its own session, detached from this terminal, with its output
/// in `LOG_DIR/NAME.log`: work that must outlive this command (a sandbox's keeper, a
/// detached build).
fn spawn_detached(args: &[&str], log_dir: &std::path::Path, name: &str) -> anyhow::Result<u32> {
    use std::os::unix::process::CommandExt as _;
    std::fs::create_dir_all(log_dir).with_context(|| format!("creating {}", log_dir.display()))?;
    let log_path = log_dir.join(format!("{name}.log"));
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("creating {}", log_path.display()))?;
    let exe = std::env::current_exe().context("locating the kiln binary")?;
    let mut cmd = std::process::Command::new(exe);
    cmd.args(args)
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .env(
            "KILN_LOG",
            std::env::var("KILN_LOG").unwrap_or_else(|_| "info".into()),
        );
    // SAFETY: setsid is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().context("starting a detached kiln process")?;
    Ok(child.id())
}

/// Logs go to stderr, filtered by `KILN_LOG` (default: `info` for the server, whose request
/// log is its record, `warn` for commands, whose output is their own). `KILN_LOG_FORMAT=json`
/// gives one JSON object per line for log collectors.
fn init_logs(server: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KILN_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(if server { "info" } else { "warn" })
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if std::env::var("KILN_LOG_FORMAT").is_ok_and(|f| f == "json") {
        builder.json().init();
    } else {
        builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init();
    }
}

fn main() -> ExitCode {
    // Like any Unix filter: a closed pipe (`kiln ... | head`) ends the process quietly
    // instead of making println! panic.
    // SAFETY: resetting a signal disposition before any thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    init_logs(matches!(cli.command, Command::Serve(_)));
    let result = match cli.command {
        Command::Validate(args) => validate::run(args),
        Command::Setup(args) => vm::setup(args),
        Command::Doctor(args) => vm::doctor(args),
        Command::Run(args) => vm::run(args),
        Command::Image(args) => image::run(args, &state::state_dir()),
        Command::Template(args) => block_on(template::run(args)),
        Command::Sandbox(args) => block_on(sandbox::run(args)),
        Command::Snapshot(args) => block_on(snapshot::run(args)),
        Command::Secret(args) => block_on(secret::run(args)),
        Command::Serve(args) => block_on(serve::serve(args)),
        Command::Admin(args) => block_on(serve::admin(args)),
        Command::Login { url, api_key } => {
            let key = match api_key {
                Some(k) => Ok(k),
                None => {
                    let mut line = String::new();
                    std::io::stdin()
                        .read_line(&mut line)
                        .map(|_| line.trim().to_owned())
                        .map_err(anyhow::Error::from)
                }
            };
            key.and_then(|k| block_on(remote::login(&url, &k)))
        }
        Command::Logout => remote::logout(),
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "kiln", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
        Command::EgressProxy(args) => egress::run(args),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            // The last line of stderr is what scripts read: keep it `<code>: <detail>` when
            // the error carries a code, the plain chain otherwise.
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
