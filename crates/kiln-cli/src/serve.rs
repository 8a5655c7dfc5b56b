//! `kiln serve` and `kiln admin`: the HTTP API on the same state dir as the CLI.

use std::process::ExitCode;

use anyhow::Context as _;

use crate::engine;

/// Pooled QEMU processes per template build in use (about 40 MiB each while waiting).
const DEFAULT_RESTORE_POOL: usize = 1;

/// `kiln serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Address to listen on [env: KILN_LISTEN; config: server.listen; default 127.0.0.1:8080].
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
}

/// The `server` section of kiln's config file (`<state>/config.json` or `KILN_CONFIG`).
/// Environment variables override it; both are optional.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ServerConfig {
    listen: Option<std::net::SocketAddr>,
    /// Templates a team may own (`KILN_MAX_TEMPLATES`).
    max_templates: Option<u32>,
    /// Builds a team may have queued or running (`KILN_MAX_CONCURRENT_BUILDS`).
    max_concurrent_builds: Option<u32>,
    /// Sandboxes a team may have that are neither failed nor deleted (`KILN_MAX_SANDBOXES`).
    max_sandboxes: Option<u32>,
    /// Snapshots a team may keep, failed ones not counted (`KILN_MAX_SNAPSHOTS`).
    max_snapshots: Option<u32>,
    /// The system templates to build when the server starts: `all`, `none`, or a
    /// comma-separated list (`base,python-3.11`) (`KILN_SYSTEM_TEMPLATES`).
    system_templates: Option<String>,
    /// Requests per second per API key or sandbox token; 0 turns the limit off
    /// (`KILN_RATE_LIMIT_PER_SEC`).
    rate_limit_per_sec: Option<u32>,
    /// Requests a key may send at once before the rate applies (`KILN_RATE_LIMIT_BURST`).
    rate_limit_burst: Option<u32>,
    /// Builds run at once on this host; more queue (`KILN_MAX_PARALLEL_BUILDS`).
    max_parallel_builds: Option<usize>,
    /// QEMU processes kept started per template build in use, so that creating a
    /// sandbox skips process start-up; 0 turns it off (`KILN_RESTORE_POOL`).
    restore_pool: Option<usize>,
    /// The domain preview URLs are served under, `{port}-{sandbox}.{domain}`
    /// (`KILN_PREVIEW_DOMAIN`; default `preview.localhost`).
    preview_domain: Option<String>,
    /// How preview URLs are written when they are not `http://...:<listen port>` for a
    /// `*.localhost` domain nor `https://...` for any other: `http(s)://DOMAIN[:PORT]`
    /// (`KILN_PREVIEW_URL`).
    preview_url: Option<String>,
    /// Seconds a client may take to send a request's headers before its connection is
    /// closed (`KILN_HEADER_TIMEOUT_SECS`; default 30).
    header_timeout_secs: Option<u64>,
}

#[derive(Debug, serde::Deserialize)]
struct ConfigFile {
    #[serde(default)]
    server: ServerConfig,
}

impl ServerConfig {
    fn load(path: &std::path::Path) -> anyhow::Result<Self> {
        let mut cfg = match std::fs::read(path) {
            Ok(bytes) => {
                serde_json::from_slice::<ConfigFile>(&bytes)
                    .with_context(|| format!("{} is invalid", path.display()))?
                    .server
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Self::default(),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        fn env<T: std::str::FromStr>(var: &str, slot: &mut Option<T>) -> anyhow::Result<()> {
            if let Some(v) = std::env::var(var).ok().filter(|v| !v.is_empty()) {
                *slot = Some(
                    v.parse()
                        .map_err(|_| anyhow::anyhow!("{var}={v:?} is invalid"))?,
                );
            }
            Ok(())
        }
        env("KILN_LISTEN", &mut cfg.listen)?;
        env("KILN_MAX_TEMPLATES", &mut cfg.max_templates)?;
        env("KILN_MAX_CONCURRENT_BUILDS", &mut cfg.max_concurrent_builds)?;
        env("KILN_MAX_SANDBOXES", &mut cfg.max_sandboxes)?;
        env("KILN_MAX_SNAPSHOTS", &mut cfg.max_snapshots)?;
        env("KILN_SYSTEM_TEMPLATES", &mut cfg.system_templates)?;
        env("KILN_RATE_LIMIT_PER_SEC", &mut cfg.rate_limit_per_sec)?;
        env("KILN_RATE_LIMIT_BURST", &mut cfg.rate_limit_burst)?;
        env("KILN_MAX_PARALLEL_BUILDS", &mut cfg.max_parallel_builds)?;
        env("KILN_RESTORE_POOL", &mut cfg.restore_pool)?;
        env("KILN_PREVIEW_DOMAIN", &mut cfg.preview_domain)?;
        env("KILN_PREVIEW_URL", &mut cfg.preview_url)?;
        env("KILN_HEADER_TIMEOUT_SECS", &mut cfg.header_timeout_secs)?;
        Ok(cfg)
    }

    /// How the HTTP server treats its connections.
    fn serve_config(&self) -> anyhow::Result<kiln_server::ServeConfig> {
        let mut serve = kiln_server::ServeConfig::default();
        match self.header_timeout_secs {
            // hyper would close every connection before its first byte.
            Some(0) => anyhow::bail!("KILN_HEADER_TIMEOUT_SECS must be at least 1"),
            Some(secs) => serve.header_read_timeout = std::time::Duration::from_secs(secs),
            None => {}
        }
        Ok(serve)
    }

    /// Where preview URLs point, for a server listening on `listen_port`.
    fn preview_site(&self, listen_port: u16) -> anyhow::Result<kiln_api::PreviewSite> {
        let domain = self.preview_domain.as_deref();
        match &self.preview_url {
            Some(url) => {
                let site = kiln_api::PreviewSite::parse(url)
                    .map_err(|e| anyhow::anyhow!("KILN_PREVIEW_URL: {e}"))?;
                if let Some(d) = domain.filter(|d| !d.eq_ignore_ascii_case(&site.domain)) {
                    anyhow::bail!(
                        "KILN_PREVIEW_URL names {:?} but KILN_PREVIEW_DOMAIN is {d:?}",
                        site.domain
                    );
                }
                Ok(site)
            }
            None => Ok(kiln_api::PreviewSite::for_domain(
                domain.unwrap_or(kiln_api::preview::DEFAULT_PREVIEW_DOMAIN),
                listen_port,
            )),
        }
    }
}

/// Per-team limits when nothing is configured: generous for one host, finite so that one
/// team cannot take it all.
const DEFAULT_LIMITS: kiln_engine::Limits = kiln_engine::Limits {
    max_templates: 100,
    max_concurrent_builds: 4,
    max_live_sandboxes: 50,
    max_snapshots: 100,
};
/// How long open connections get to finish once the server is asked to stop.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// Requests per second per key, and burst, when nothing is configured.
const DEFAULT_RATE: (u32, u32) = (50, 100);

/// `kiln admin`.
#[derive(Debug, clap::Args)]
pub struct AdminArgs {
    #[command(subcommand)]
    command: AdminCmd,
}

#[derive(Debug, clap::Subcommand)]
enum AdminCmd {
    /// Create an API key for a team (created if needed); prints the key alone.
    CreateApiKey {
        /// Team name.
        #[arg(long)]
        team: String,
    },
    /// List a team's API keys (id, name, prefix, created, last used); never the keys.
    ListApiKeys {
        /// Team name.
        #[arg(long)]
        team: String,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Revoke an API key by id: it stops working at once.
    RevokeApiKey {
        /// Team name.
        #[arg(long)]
        team: String,
        /// The key's id (from `list-api-keys`).
        id: String,
    },
    /// Seal every team secret under a new secrets key and drop the old one (online: a
    /// running server and its sandboxes keep working throughout).
    RotateSecretsKey,
}

pub async fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let state_dir = crate::state::state_dir();
    let conf = ServerConfig::load(&kiln_engine::registry_config_path(&state_dir))?;
    let mut cfg = crate::engine_config(state_dir);
    cfg.owner = kiln_engine::Owner::Server;
    // Tenants choose `from`: registries on private addresses only when the operator says.
    cfg.private_registries = kiln_oci::PrivateRegistries::from_env()?;
    cfg.limits = kiln_engine::Limits {
        max_templates: conf.max_templates.unwrap_or(DEFAULT_LIMITS.max_templates),
        max_concurrent_builds: conf
            .max_concurrent_builds
            .unwrap_or(DEFAULT_LIMITS.max_concurrent_builds),
        max_live_sandboxes: conf
            .max_sandboxes
            .unwrap_or(DEFAULT_LIMITS.max_live_sandboxes),
        max_snapshots: conf.max_snapshots.unwrap_or(DEFAULT_LIMITS.max_snapshots),
    };
    let system = kiln_engine::SystemTemplate::selected(conf.system_templates.as_deref())
        .map_err(anyhow::Error::msg)?;
    if let Some(n) = conf.max_parallel_builds {
        cfg.max_parallel_builds = n.max(1);
    }
    cfg.restore_pool = conf.restore_pool.unwrap_or(DEFAULT_RESTORE_POOL);
    let serve_config = conf.serve_config()?;
    let listen = args
        .listen
        .or(conf.listen)
        .unwrap_or_else(|| std::net::SocketAddr::from(([127, 0, 0, 1], 8080)));
    // Bound first: preview URLs carry the port actually bound (`--listen ...:0`).
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("listening on {listen}"))?;
    cfg.preview = conf.preview_site(listener.local_addr()?.port())?;
    let limits = cfg.limits;
    let engine = kiln_engine::Engine::open(cfg).await?;
    // Builds and sandboxes a previous server left behind when it died.
    let recovered = engine.recover_after_restart().await?;
    for b in &recovered.builds {
        tracing::warn!(build = %b, "build interrupted by server restart marked failed");
    }
    for s in &recovered.sandboxes {
        tracing::warn!(sandbox = %s, "sandbox whose VM is gone marked failed");
    }
    for s in &recovered.snapshots {
        tracing::warn!(snapshot = %s, "snapshot whose capture was cut short marked failed");
    }
    if recovered.run_dirs > 0 {
        tracing::warn!(
            count = recovered.run_dirs,
            "VM run dirs of dead processes removed"
        );
    }
    // Auto-pause and auto-delete, from the deadlines in the store (a restart keeps them).
    tokio::spawn(engine.clone().run_timers());
    // The system templates build in the background; a create that needs one waits for it.
    for b in engine.queue_system_templates(&system).await? {
        let engine = engine.clone();
        tokio::spawn(async move {
            if let Err(e) = engine.run_build(&b.id, None).await {
                tracing::error!(build = %b.id, error = %e.chain(), "system template build could not run");
            }
        });
    }
    let rate = conf.rate_limit_per_sec.unwrap_or(DEFAULT_RATE.0);
    let limiter = if rate == 0 {
        kiln_server::RateLimiter::disabled()
    } else {
        kiln_server::RateLimiter::new(rate, conf.rate_limit_burst.unwrap_or(DEFAULT_RATE.1))
    };
    let mut state = kiln_server::AppState::new(engine.clone());
    state.limiter = std::sync::Arc::new(limiter);
    // From the environment only: a secret has no place in the config file.
    state.metrics_token = std::env::var("KILN_METRICS_TOKEN")
        .ok()
        .filter(|t| !t.is_empty())
        .map(Into::into);
    let app = kiln_server::router(state);
    tracing::info!(?limits, rate_per_sec = rate, "limits");
    eprintln!("kiln API listening on http://{}", listener.local_addr()?);
    eprintln!(
        "kiln previews at {}",
        engine
            .preview_site()
            .url("<sandbox>", 0)
            .replacen("0-", "<port>-", 1)
    );
    let stopping = std::sync::Arc::new(tokio::sync::Notify::new());
    let signalled = stopping.clone();
    let server = kiln_server::serve(listener, app, serve_config, async move {
        shutdown_signal().await;
        signalled.notify_one();
    });
    // Open log streams and interactive sessions would hold a graceful shutdown forever:
    // they get a short grace period, then the server stops regardless.
    tokio::select! {
        () = server => {}
        () = async {
            stopping.notified().await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        } => {
            eprintln!("kiln API: connections still open after {SHUTDOWN_GRACE:?}; closing them");
        }
    }
    // Running sandboxes die with their VMs; say so rather than leave them `active`.
    engine.stop_live_sandboxes().await;
    Ok(ExitCode::SUCCESS)
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = async {
            match term.as_mut() {
                Some(t) => { t.recv().await; }
                None => std::future::pending::<()>().await,
            }
        } => {}
    }
    eprintln!("kiln API shutting down");
}

pub async fn admin(args: AdminArgs) -> anyhow::Result<ExitCode> {
    let engine = engine().await?;
    match args.command {
        AdminCmd::CreateApiKey { team } => {
            println!("{}", engine.create_api_key(&team).await?);
        }
        AdminCmd::ListApiKeys { team, json } => {
            let keys = engine.list_api_keys(&team).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&keys)?);
                return Ok(ExitCode::SUCCESS);
            }
            println!(
                "{:<36}  {:<12}  {:<14}  {:<32}  LAST USED",
                "ID", "NAME", "PREFIX", "CREATED"
            );
            for k in &keys {
                let used = k
                    .last_used_at
                    .map_or_else(|| "-".to_owned(), |t| kiln_api::time::format(&t));
                println!(
                    "{:<36}  {:<12}  {:<14}  {:<32}  {used}",
                    k.id,
                    k.name,
                    k.prefix,
                    kiln_api::time::format(&k.created_at)
                );
            }
        }
        AdminCmd::RevokeApiKey { team, id } => {
            engine.revoke_api_key(&team, &id).await?;
            println!("{id}");
        }
        AdminCmd::RotateSecretsKey => {
            let n = engine.rotate_secrets_key().await?;
            eprintln!("--> {n} secret(s) sealed under the new key; the old key is gone");
        }
    }
    Ok(ExitCode::SUCCESS)
}
