//! kiln's core: templates and sandboxes over the store, the build pipeline and the VMM.
//!
//! The CLI (embedded, daemonless) and the server call the same [`Engine`]; nothing here
//! knows about HTTP or terminals. The store holds every decision that must be atomic
//! (limits, names, status transitions); the engine does the work that follows from them.

mod admin;
mod builds;
mod data;
mod error;
mod images;
#[cfg(test)]
mod lifecycle_tests;
mod live;
mod logs;
mod pool;
mod preview;
mod sandboxes;
mod secrets;
#[cfg(test)]
mod secrets_tests;
#[cfg(test)]
mod snapshot_tests;
mod snapshots;
mod system;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
mod timers;
mod wire;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use kiln_build::{BuildEnv, Timing};
use kiln_oci::{ImageStore, RegistryConfig};
use kiln_store::Store;
use kiln_vm::{Accel, Hypervisor, StateDir};
use tokio::sync::{OnceCell, Semaphore};

pub use admin::ApiKeyInfo;
pub use builds::{build_failure, Rebuilt};
pub use data::{
    FileContent, SandboxHandle, Session, SessionEvent, SessionInput, SessionOptions,
    MAX_EXEC_OUTPUT, MAX_UPLOAD_BYTES, MAX_ZIP_BYTES,
};
pub use error::{EngineError, GuestError, Result};
pub use images::Pruned;
/// A connection into a sandbox's port, through its agent ([`Engine::preview_connect`]).
pub use kiln_agent_proto::PortStream as PreviewStream;
/// The store's figures for `/metrics`, the team record requests are authorised as, and
/// the one-way hash kiln keys secrets by (the rate limiter's keys).
pub use kiln_store::{
    hash_secret, DurationHistogram, Layout, Limits, StoreStats, Team, BUILD_DURATION_BUCKETS_SECS,
};
pub use live::{Paused, Recovered, SandboxUp};
pub use pool::PoolStats;
pub use preview::{InboundRequest, PreviewError, PreviewGrant, TOKEN_KEY_FILE};
pub use sandboxes::{pid_alive, LiveSandbox, Owner, SandboxEndpoint, ENDPOINT_FILE};
pub use snapshots::SnapshotTaken;
pub use system::{SystemTemplate, SYSTEM_TEMPLATES};

/// Output a build's log keeps by default: a build printing without end must not fill the
/// state database.
pub const DEFAULT_BUILD_LOG_MAX_BYTES: u64 = 16 * 1024 * 1024;

/// The team the CLI's embedded mode works as.
pub const LOCAL_TEAM: &str = "local";

/// How the engine runs.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// The state directory.
    pub state_dir: PathBuf,
    /// Accelerator request (`KILN_ACCEL`).
    pub accel: Accel,
    /// Team limits.
    pub limits: Limits,
    /// Step and readiness time limits.
    pub timing: Timing,
    /// Bound on a whole build.
    pub build_timeout: Duration,
    /// Output a build's log keeps (`KILN_BUILD_LOG_MAX_BYTES`, default
    /// [`DEFAULT_BUILD_LOG_MAX_BYTES`]); past it the log says it was truncated.
    pub build_log_max_bytes: u64,
    /// Builds run at once on this host; more wait in `pending`.
    pub max_parallel_builds: usize,
    /// kiln's registry config file (see [`registry_config_path`]).
    pub registry_config: Option<PathBuf>,
    /// Which private registry addresses builds may pull from: any for the local CLI (the
    /// default), `KILN_PRIVATE_REGISTRIES` only for a server, whose tenants choose `from`.
    pub private_registries: kiln_oci::PrivateRegistries,
    /// What kind of process this is, as recorded in the endpoints of the sandboxes it runs.
    pub owner: sandboxes::Owner,
    /// The `kiln` binary, run by QEMU as `kiln egress-proxy` for every connection a VM
    /// makes to the outside (see `kiln_net::proxy`). `None`: VMs have no way out at all
    /// (they never reach the host either way).
    pub egress_helper: Option<PathBuf>,
    /// QEMU processes kept started per template build in use, waiting for its snapshot
    /// (see `pool.rs`); 0 turns the pool off. Only a long-lived process (the server)
    /// gains from it.
    pub restore_pool: usize,
    /// How long a pooled process may wait unclaimed before it is stopped.
    pub restore_pool_idle: Duration,
    /// What runs the VMs: QEMU, or a fake in tests.
    pub hypervisor: Arc<dyn Hypervisor>,
    /// The guest agent (default: `$KILN_AGENT_BIN`, else the workspace build); the `kiln`
    /// binary hands down the one built into it.
    pub agent: kiln_vm::provision::AgentSource,
    /// Where preview URLs point (`KILN_PREVIEW_DOMAIN`; by default
    /// `http://{port}-{id}.preview.localhost:8080`).
    pub preview: kiln_api::PreviewSite,
    /// The key team secrets are sealed with, made on first start (`KILN_SECRETS_KEY`,
    /// default `<state>/keys/secrets.key`).
    pub secrets_key: PathBuf,
    /// Private destinations every VM may reach (`KILN_EGRESS_ALLOW_PRIVATE`: `host:port`
    /// or `cidr:port`, comma-separated), checked when the engine opens.
    pub egress_allow_private: String,
    /// More roots the egress proxy verifies upstreams against when it opens a
    /// connection up for a secret (`KILN_EGRESS_TRUST_CA`, a PEM bundle).
    pub egress_trust_ca: Option<PathBuf>,
    /// A PEM bundle every guest trusts besides kiln's egress CA (`KILN_GUEST_TRUST_CA`):
    /// the CA of a network that intercepts TLS, a company's own.
    pub guest_trust_ca: Option<PathBuf>,
}

impl EngineConfig {
    /// Defaults for a state directory, honouring `KILN_ACCEL` and `KILN_READY_TIMEOUT_SECS`.
    pub fn new(state_dir: impl Into<PathBuf>) -> Self {
        let mut timing = Timing::default();
        if let Some(secs) = env_secs("KILN_READY_TIMEOUT_SECS") {
            timing.ready_timeout = secs;
        }
        if let Some(secs) = env_secs("KILN_STEP_TIMEOUT_SECS") {
            timing.step_timeout = secs;
        }
        let state_dir = state_dir.into();
        let registry_config = Some(registry_config_path(&state_dir));
        let path_var = |k: &str| {
            std::env::var_os(k)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        Self {
            secrets_key: path_var("KILN_SECRETS_KEY")
                .unwrap_or_else(|| Layout::new(&state_dir).keys_dir().join("secrets.key")),
            egress_allow_private: std::env::var("KILN_EGRESS_ALLOW_PRIVATE").unwrap_or_default(),
            egress_trust_ca: path_var("KILN_EGRESS_TRUST_CA"),
            guest_trust_ca: path_var("KILN_GUEST_TRUST_CA"),
            state_dir,
            accel: Accel::from_env(),
            limits: Limits::UNLIMITED,
            timing,
            build_timeout: env_secs("KILN_BUILD_TIMEOUT_SECS").unwrap_or(Duration::from_secs(3600)),
            build_log_max_bytes: env_u64("KILN_BUILD_LOG_MAX_BYTES")
                .unwrap_or(DEFAULT_BUILD_LOG_MAX_BYTES),
            max_parallel_builds: 2,
            registry_config,
            private_registries: kiln_oci::PrivateRegistries::Any,
            owner: sandboxes::Owner::Keeper,
            egress_helper: None,
            restore_pool: 0,
            restore_pool_idle: Duration::from_secs(600),
            hypervisor: Arc::new(kiln_vm::Qemu::default()),
            agent: Default::default(),
            preview: kiln_api::PreviewSite::for_domain(
                kiln_api::preview::DEFAULT_PREVIEW_DOMAIN,
                8080,
            ),
        }
    }
}

/// kiln's registry config file: `KILN_CONFIG`, else `<state>/config.json` (a missing file
/// means no settings).
pub fn registry_config_path(state_dir: &Path) -> PathBuf {
    std::env::var_os("KILN_CONFIG")
        .filter(|v| !v.is_empty())
        .map_or_else(|| state_dir.join("config.json"), PathBuf::from)
}

fn env_secs(var: &str) -> Option<Duration> {
    env_u64(var).map(Duration::from_secs)
}

fn env_u64(var: &str) -> Option<u64> {
    std::env::var(var).ok()?.parse().ok()
}

/// Templates and sandboxes of one state directory.
#[derive(Debug)]
pub struct Engine {
    cfg: EngineConfig,
    store: Store,
    layout: Layout,
    images: Arc<ImageStore>,
    /// Located on first use: listing templates must not need a provisioned kernel.
    build_env: OnceCell<BuildEnv>,
    build_slots: Semaphore,
    /// Sandboxes whose VMs this process owns (the server's).
    live: live::LiveSandboxes,
    /// Builds this process is running.
    running_builds: builds::RunningBuilds,
    /// QEMU processes waiting for a snapshot to load.
    pool: pool::RestorePool,
    /// What preview tokens are signed with.
    preview_key: preview::TokenKey,
    /// Wakes the auto-pause/auto-delete timer when a deadline may have changed.
    timers: tokio::sync::Notify,
    /// Bumped whenever a snapshot this process makes settles (ready or failed).
    snapshots_settled: tokio::sync::watch::Sender<u64>,
    /// What the egress proxy is run with, and the certificates guests trust.
    egress: secrets::Egress,
    /// Where directory downloads are assembled, a few at a time.
    zips: data::ZipSpool,
}

impl Engine {
    /// Opens (creating if needed) the state directory and its database.
    pub async fn open(cfg: EngineConfig) -> Result<Arc<Self>> {
        let layout = Layout::new(&cfg.state_dir);
        layout.ensure()?;
        let store = Store::open(layout.db_path()).await?;
        let mut registries =
            RegistryConfig::load(cfg.registry_config.as_deref()).map_err(EngineError::Images)?;
        registries.private = cfg.private_registries.clone();
        let images = ImageStore::open(layout.root(), registries).map_err(EngineError::Images)?;
        let slots = cfg.max_parallel_builds.max(1);
        let pool = pool::RestorePool::new(cfg.restore_pool, cfg.restore_pool_idle);
        let preview_key = preview::TokenKey::load_or_create(layout.root())?;
        let egress = secrets::Egress::open(&cfg, &layout)?;
        let zips = data::ZipSpool::new(layout.root().to_owned());
        Ok(Arc::new(Self {
            cfg,
            store,
            layout,
            images: Arc::new(images),
            build_env: OnceCell::new(),
            build_slots: Semaphore::new(slots),
            live: live::LiveSandboxes::default(),
            running_builds: builds::RunningBuilds::default(),
            pool,
            preview_key,
            timers: tokio::sync::Notify::new(),
            snapshots_settled: tokio::sync::watch::Sender::new(0),
            egress,
            zips,
        }))
    }

    /// The store's figures for `/metrics`: builds and sandboxes by status, failures by
    /// code, build durations, templates.
    pub async fn stats(&self) -> Result<StoreStats> {
        Ok(self.store.stats().await?)
    }

    /// What runs this engine's VMs.
    pub(crate) fn hypervisor(&self) -> &dyn Hypervisor {
        self.cfg.hypervisor.as_ref()
    }

    /// The state directory layout.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The image cache.
    pub fn images(&self) -> &ImageStore {
        &self.images
    }

    /// The configuration.
    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    /// The team the CLI works as, created on first use.
    pub async fn local_team(&self) -> Result<Team> {
        match self.store.team_by_name(LOCAL_TEAM).await? {
            Some(team) => Ok(team),
            None => match self.store.create_team(LOCAL_TEAM).await {
                Ok(team) => Ok(team),
                // Another process created it first.
                Err(_) => self
                    .store
                    .team_by_name(LOCAL_TEAM)
                    .await?
                    .ok_or_else(|| EngineError::NotRunning("local team".into())),
            },
        }
    }

    /// Kernel, agent and accelerator, found once.
    pub async fn build_env(&self) -> Result<&BuildEnv> {
        self.build_env
            .get_or_try_init(|| async {
                let state = StateDir::new(self.layout.root());
                let agent = self.cfg.agent.resolve(&state).map_err(EngineError::Setup)?;
                let kernel =
                    kiln_vm::provision::prepare(&state, &agent).map_err(EngineError::Setup)?;
                let choice = kiln_vm::accel::choose(self.cfg.accel, &state, Some(&kernel)).await;
                tracing::info!(accel = ?choice.accel, reason = %choice.reason, "accelerator");
                Ok(BuildEnv {
                    hypervisor: self.cfg.hypervisor.clone(),
                    images: self.images.clone(),
                    kernel,
                    agent: Some(agent),
                    accel: choice.accel,
                    vm_dir: self.vm_dir(),
                    timing: self.cfg.timing,
                    build_timeout: self.cfg.build_timeout,
                    egress: self.egress(Some(kiln_net::FileSet::default())),
                    step_cache: Some(kiln_build::StepCache::new(self.layout.step_cache_dir())),
                    trust: Some(self.egress.trust.clone()),
                })
            })
            .await
    }

    /// A VM's egress proxy: the proxy with the private destinations the operator opened,
    /// serving `files` (read per connection, so updates apply at once). A sandbox's are
    /// [`Engine::egress_files`]; a build's are none (the public internet, nothing else); a
    /// pooled VM's (`None`) are assigned when a sandbox claims it.
    pub(crate) fn egress(&self, files: Option<kiln_net::FileSet>) -> Option<kiln_vm::Egress> {
        let helper = self.cfg.egress_helper.as_ref()?;
        let mut command = vec![helper.display().to_string(), "egress-proxy".to_owned()];
        for dest in &self.egress.allow_private {
            command.extend(["--allow-private".to_owned(), dest.to_string()]);
        }
        Some(kiln_vm::Egress {
            command,
            limits: kiln_net::Limits::default(),
            files,
        })
    }

    /// What the egress proxy of the sandbox in `dir` reads and logs to: its rules file and
    /// secret bindings, its connection log next to them, and what swapping secrets needs
    /// (the key, the CA, the audit).
    pub(crate) fn egress_files(&self, dir: &Path) -> kiln_net::FileSet {
        kiln_net::FileSet {
            rules: Some(dir.join(sandboxes::NETWORK_RULES)),
            secrets: Some(dir.join(kiln_net::secrets::SECRETS_FILE)),
            key: Some(self.cfg.secrets_key.clone()),
            ca_dir: Some(self.layout.keys_dir()),
            trust_ca: self.cfg.egress_trust_ca.clone(),
            log: Some(dir.join(sandboxes::NETWORK_LOG)),
            audit_dir: Some(self.layout.secret_audit_dir()),
        }
    }

    /// Parent of VM run directories: short, because unix socket paths are limited to 107
    /// bytes and state directories can be deep.
    pub(crate) fn vm_dir(&self) -> PathBuf {
        let root = self.layout.root();
        if root.as_os_str().len() <= 60 {
            root.join("vms")
        } else {
            std::env::temp_dir().join(format!("kiln-vms-{}", short_hash(root)))
        }
    }
}

fn short_hash(p: &Path) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    p.hash(&mut h);
    format!("{:08x}", h.finish() as u32)
}
