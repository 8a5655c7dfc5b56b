//! Sandboxes: a template's snapshot (or a sandbox snapshot's, for a fork) restored into a
//! new VM, the start process live.
//!
//! Whoever holds the [`LiveSandbox`] owns the VM (the server process, or the CLI's
//! detached keeper process). It publishes an [`SandboxEndpoint`] file in the sandbox's
//! directory so other processes can reach the agent and know who owns the VM.

use std::path::{Path, PathBuf};
use std::time::Duration;

use kiln_agent_proto::AgentClient;
use kiln_api::{
    CreateSandbox, NetworkConfig, NetworkLogPage, NetworkLogQuery, SandboxFilter, SandboxInfo,
    SnapshotStatus, DEFAULT_TEMPLATE,
};
use kiln_store::{NewSandbox, Sandbox, SandboxStatus};
use kiln_vm::{Machine, PendingRestore, RestoreConfig};
use serde::{Deserialize, Serialize};

use tracing::Instrument as _;

use crate::error::{EngineError, Result};
use crate::Engine;

/// Name of the endpoint file in a sandbox's directory.
pub const ENDPOINT_FILE: &str = "endpoint.json";
/// The sandbox's egress rules ([`NetworkConfig`] as JSON), read by the egress
/// proxy on every connection; absent means the defaults (the public internet).
pub const NETWORK_RULES: &str = "network.json";
/// One line per outgoing connection of the sandbox, allowed or refused.
pub const NETWORK_LOG: &str = "network.log";
/// Bound on reaching a sandbox's agent.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Where a fork's VM finds the snapshot it was created from: the snapshot bundle's files,
/// hard-linked, so that deleting the snapshot does not take them from under the fork.
const ORIGIN: &str = "origin";
/// How long a create waits for a system template that is still building (one that
/// `kiln serve` queued at start): under the SDKs' 30 s inactivity timeout.
const SYSTEM_TEMPLATE_WAIT: Duration = Duration::from_secs(25);

/// How to reach a running sandbox, and who owns its VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxEndpoint {
    /// The agent's unix socket.
    pub agent_socket: PathBuf,
    /// QEMU's pid.
    pub qemu_pid: u32,
    /// The process that owns the VM; when it is gone, so is the VM.
    pub owner_pid: u32,
    /// Whether the owner is a CLI keeper (which hands the agent channel to other
    /// processes) or a server (which keeps it: use its API).
    #[serde(default)]
    pub owner: Owner,
}

/// What kind of process owns a sandbox's VM.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Owner {
    /// `kiln sandbox keep`, started by `kiln sandbox create`.
    #[default]
    Keeper,
    /// `kiln serve`.
    Server,
}

/// A restored sandbox and its VM. Dropping it kills the VM.
#[derive(Debug)]
pub struct LiveSandbox {
    /// The sandbox (status `active`).
    pub info: SandboxInfo,
    /// The VM.
    pub vm: Box<dyn Machine>,
    /// The sandbox's directory (endpoint file, logs).
    pub dir: PathBuf,
}

/// Finishes a pooled restore for the sandbox in `dir`: its egress proxy is pointed at the
/// sandbox's files (`egress`) before the guest runs, and its console log is linked into
/// the sandbox's directory.
async fn claim(
    incoming: Box<dyn PendingRestore>,
    sandbox_id: &str,
    dir: &Path,
    egress: kiln_net::FileSet,
    timeout: Duration,
) -> Result<Box<dyn Machine>> {
    incoming.claimed_by(sandbox_id);
    incoming.assign_egress(egress);
    let vm = incoming
        .finish(timeout)
        .await
        .map_err(EngineError::restore)?;
    let console = dir.join("console.log");
    let _ = std::fs::remove_file(&console);
    // A hard link outlives the run directory; across filesystems, a symlink must do.
    if std::fs::hard_link(vm.console_log(), &console).is_err() {
        let _ = std::os::unix::fs::symlink(vm.console_log(), &console);
    }
    tracing::info!("restored from the pool");
    Ok(vm)
}

impl Engine {
    /// Records a new sandbox (`starting`) after the request's checks and the team's limit
    /// check, with its egress rules and secret bindings; the access token is returned
    /// once, in plain text.
    /// Call [`Engine::start_sandbox`] to bring it up (or [`Engine::create_sandbox`] for
    /// both, in this process).
    pub async fn create_sandbox_record(
        &self,
        team_id: &str,
        req: &CreateSandbox,
    ) -> Result<(SandboxInfo, String)> {
        let (record, token) = self.new_sandbox_record(team_id, req).await?;
        Ok((self.sandbox_info(&record), token))
    }

    pub(crate) async fn new_sandbox_record(
        &self,
        team_id: &str,
        req: &CreateSandbox,
    ) -> Result<(Sandbox, String)> {
        req.validate()?;
        if let Some(rules) = &req.network {
            check_rules(rules)?;
        }
        let seconds = |v: Option<u64>| v.map(|v| u32::try_from(v).unwrap_or(u32::MAX));
        let new = NewSandbox {
            template: match (&req.from_template, &req.from_snapshot) {
                (Some(t), _) => t.clone(),
                (None, Some(_)) => String::new(),
                (None, None) => DEFAULT_TEMPLATE.to_owned(),
            },
            snapshot: req.from_snapshot.clone(),
            name: Some(req.name.clone()),
            metadata: req.metadata.clone(),
            env: req.env_vars.clone(),
            timeout_seconds: seconds(req.timeout_seconds),
            auto_delete_seconds: seconds(req.auto_delete_seconds),
            secrets: self.new_bindings(team_id, &req.secrets).await?,
            preview_access: req.preview_access,
        };
        let (record, token) = self.insert_sandbox(team_id, &new).await?;
        // The files the egress proxy reads exist before the VM makes a connection.
        let files = async {
            if req.network.is_some() {
                self.set_network_rules(team_id, &record.id, req.network.as_ref())
                    .await?;
            }
            match &req.from_snapshot {
                // A fork's memory holds its parent's stand-ins: it gets its own for them.
                Some(snapshot) => {
                    let parent = self.store.snapshot_by_id(team_id, snapshot).await?;
                    self.copy_secret_bindings(team_id, &parent.sandbox_id, &record.id)
                        .await
                }
                None => self.write_bindings(&record).await.map(|()| record.clone()),
            }
        };
        match files.await {
            Ok(record) => Ok((record, token)),
            Err(e) => {
                self.finish_sandbox(team_id, &record.id, SandboxStatus::Failed)
                    .await?;
                Err(e)
            }
        }
    }

    async fn insert_sandbox(&self, team_id: &str, new: &NewSandbox) -> Result<(Sandbox, String)> {
        match &new.snapshot {
            Some(id) => {
                let snapshot = self.store.snapshot_by_id(team_id, id).await?;
                if snapshot.status != SnapshotStatus::Ready {
                    return Err(EngineError::SnapshotNotReady {
                        id: snapshot.id,
                        status: snapshot.status.to_string(),
                    });
                }
            }
            None => {
                let template = self.template_to_start(team_id, &new.template).await?;
                if template.current_build_id.is_none() {
                    return Err(EngineError::NotReady {
                        name: template.name,
                        status: template.status.to_string(),
                    });
                }
            }
        }
        let (record, token) = self
            .store
            .create_sandbox(team_id, new, &self.cfg.limits)
            .await?;
        self.timers.notify_one();
        Ok((record, token))
    }

    /// The template a sandbox starts from. A system template still building (`kiln serve`
    /// builds them when it starts) is waited for, up to [`SYSTEM_TEMPLATE_WAIT`].
    async fn template_to_start(&self, team_id: &str, name: &str) -> Result<kiln_store::Template> {
        let deadline = tokio::time::Instant::now() + SYSTEM_TEMPLATE_WAIT;
        loop {
            let t = match self.store.template_by_id_or_name(team_id, name).await {
                Err(kiln_store::StoreError::NotFound { .. }) if name == DEFAULT_TEMPLATE => {
                    return Err(EngineError::NotReady {
                        name: name.to_owned(),
                        status: "not built: `kiln serve` builds it when it starts, \
                                 `kiln template build --system` ahead of time"
                            .to_owned(),
                    })
                }
                other => other?,
            };
            let building = t.current_build_id.is_none()
                && matches!(
                    t.status,
                    kiln_api::TemplateStatus::Pending | kiln_api::TemplateStatus::Building
                );
            if !(building && t.team_id == kiln_store::SYSTEM_TEAM_ID)
                || tokio::time::Instant::now() >= deadline
            {
                return Ok(t);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Restores a `starting` sandbox from its template's snapshot, applies its env on top
    /// of the template's runtime defaults, and marks it `active`. On failure it is marked
    /// `failed` and nothing is left running.
    pub async fn start_sandbox(&self, team_id: &str, sandbox_id: &str) -> Result<LiveSandbox> {
        let record = self.store.sandbox_by_id(team_id, sandbox_id).await?;
        // A root span: the VM's tasks outlive whatever request asked for it.
        let span = tracing::info_span!(parent: None, "sandbox", sandbox = %sandbox_id);
        match self.restore(&record).instrument(span).await {
            Ok((vm, dir)) => {
                let record = self
                    .set_status(team_id, sandbox_id, SandboxStatus::Active)
                    .await?;
                Ok(LiveSandbox {
                    info: self.sandbox_info(&record),
                    vm,
                    dir,
                })
            }
            Err(e) => {
                tracing::warn!(error = %e, "sandbox failed to start");
                let _ = self
                    .set_status(team_id, sandbox_id, SandboxStatus::Failed)
                    .await;
                self.remove_sandbox_dir(sandbox_id);
                Err(e)
            }
        }
    }

    async fn restore(&self, record: &Sandbox) -> Result<(Box<dyn Machine>, PathBuf)> {
        let dir = self.layout.sandbox_dir(&record.id)?;
        std::fs::create_dir_all(&dir).map_err(EngineError::io("creating", &dir))?;
        if let Some(snapshot) = &record.source_snapshot_id {
            return self.restore_fork(record, snapshot, dir).await;
        }
        let artifact = self
            .layout
            .artifact_dir(&record.template_id, &record.build_id)?;
        let bundle = artifact.join("bundle");
        let cfg = self.restore_config(record, &dir)?;
        let pooled = match self.pool.take(&record.template_id, &record.build_id) {
            Some(incoming) => match claim(
                incoming,
                &record.id,
                &dir,
                self.egress_files(&dir),
                cfg.timeout,
            )
            .await
            {
                Ok(vm) => Some(vm),
                Err(e) => {
                    tracing::warn!(error = %e, "pooled restore failed; restoring afresh");
                    None
                }
            },
            None => None,
        };
        let vm = match pooled {
            Some(vm) => vm,
            None => self
                .hypervisor()
                .restore(&bundle, cfg)
                .await
                .map_err(EngineError::restore)?,
        };
        if self.cfg.restore_pool > 0 {
            let mut pool_cfg = RestoreConfig::new(
                format!(
                    "pool-{}",
                    record.build_id.get(..8).unwrap_or(&record.build_id)
                ),
                self.vm_dir(),
            );
            pool_cfg.egress = self.egress(None);
            pool_cfg.base_disk = Some(self.template_disk(&record.template_id, &record.build_id)?);
            self.pool.refill(
                self.cfg.hypervisor.clone(),
                &record.template_id,
                &record.build_id,
                bundle,
                pool_cfg,
            );
        }
        let agent = vm.agent();
        // Trust defaults go under what the template and the sandbox set.
        let trust_env = self.refresh_trust(&artifact, agent).await;
        if !record.env.is_empty() || !trust_env.is_empty() {
            let mut defaults = agent.get_defaults().await.map_err(EngineError::Agent)?;
            for (k, v) in trust_env {
                defaults.env.entry(k).or_insert(v);
            }
            set_env(agent, defaults, &record.env).await?;
        }
        self.apply_secret_env(record, agent).await?;
        self.write_endpoint(&dir, vm.as_ref())?;
        Ok((vm, dir))
    }

    /// A fork: the snapshot's bundle linked into the sandbox's directory (the links keep
    /// it whole if the snapshot is deleted while the fork runs) and restored from there,
    /// its processes live; the agent's env, working directory and user go back to the
    /// template's, with the fork's own env and its own secret stand-ins on top (the source's env
    /// stays the source's).
    async fn restore_fork(
        &self,
        record: &Sandbox,
        snapshot: &str,
        dir: PathBuf,
    ) -> Result<(Box<dyn Machine>, PathBuf)> {
        let src = self.layout.snapshot_dir(snapshot)?;
        if !src.is_dir() {
            return Err(kiln_store::StoreError::not_found("snapshot", snapshot).into());
        }
        let origin = dir.join(ORIGIN);
        remove_dir_quiet(&origin);
        kiln_vm::snapshot::link_bundle(&src, &origin).map_err(EngineError::restore)?;
        let cfg = self.restore_config(record, &dir)?;
        let vm = self
            .hypervisor()
            .restore(&origin, cfg)
            .await
            .map_err(EngineError::restore)?;
        let artifact = self
            .layout
            .artifact_dir(&record.template_id, &record.build_id)?;
        let template = kiln_store::ArtifactManifest::read(&artifact)?;
        let mut defaults = kiln_build::agent_defaults(&template.runtime);
        for (k, v) in self.refresh_trust(&artifact, vm.agent()).await {
            defaults.env.entry(k).or_insert(v);
        }
        set_env(vm.agent(), defaults, &record.env).await?;
        self.apply_secret_env(record, vm.agent()).await?;
        self.write_endpoint(&dir, vm.as_ref())?;
        tracing::info!(snapshot, "restored a fork");
        Ok((vm, dir))
    }

    /// Stops the pooled processes waiting for `template_id`'s builds.
    pub(crate) async fn forget_pooled(&self, template_id: &str) {
        self.pool
            .forget_template(template_id, crate::builds::DELETE_WAIT)
            .await;
    }

    /// The restore pool's processes waiting now and handed out so far.
    pub fn restore_pool_stats(&self) -> crate::PoolStats {
        self.pool.stats()
    }

    /// How a sandbox's VM is restored: console log and egress rules in its directory, and
    /// its template's disk as the base its captures (pauses, snapshots) are layers over.
    pub(crate) fn restore_config(&self, record: &Sandbox, dir: &Path) -> Result<RestoreConfig> {
        let id = &record.id;
        let mut cfg =
            RestoreConfig::new(format!("sbx-{}", id.get(..8).unwrap_or(id)), self.vm_dir());
        cfg.console_log = Some(dir.join("console.log"));
        cfg.egress = self.egress(Some(self.egress_files(dir)));
        cfg.base_disk = Some(self.template_disk(&record.template_id, &record.build_id)?);
        Ok(cfg)
    }

    /// The raw disk of a template build's bundle: the bottom of the disk chain of every
    /// sandbox restored from it, its pauses, snapshots and forks.
    fn template_disk(&self, template_id: &str, build_id: &str) -> Result<PathBuf> {
        Ok(self
            .layout
            .artifact_dir(template_id, build_id)?
            .join("bundle")
            .join("disk.raw"))
    }

    /// Sets (or with `None`, clears) a sandbox's egress rules. They apply to its next
    /// connection: the proxy reads them per connection. Also valid before the sandbox's
    /// VM exists (at create) and while it is paused.
    pub async fn set_network_rules(
        &self,
        team_id: &str,
        sandbox_id: &str,
        rules: Option<&NetworkConfig>,
    ) -> Result<()> {
        if let Some(r) = rules {
            check_rules(r)?;
        }
        let record = self.store.sandbox_by_id(team_id, sandbox_id).await?;
        if record.status == SandboxStatus::Deleted {
            return Err(kiln_store::StoreError::not_found("sandbox", sandbox_id).into());
        }
        let dir = self.layout.sandbox_dir(sandbox_id)?;
        std::fs::create_dir_all(&dir).map_err(EngineError::io("creating", &dir))?;
        let path = dir.join(NETWORK_RULES);
        match rules {
            Some(r) => {
                let json = serde_json::to_vec_pretty(r).expect("rules serialize");
                kiln_store::write_atomic(&path, &json)?;
            }
            None => match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(EngineError::io("removing", &path)(e)),
            },
        }
        tracing::info!(sandbox = %sandbox_id, rules = ?rules, "network rules set");
        Ok(())
    }

    /// A page of a sandbox's network log, newest first: the connections its VMs made
    /// through the egress proxy (see `kiln egress-proxy --log`), filtered by `query`.
    /// Lines that do not parse are skipped.
    pub async fn network_log(
        &self,
        team_id: &str,
        sandbox_id: &str,
        query: &NetworkLogQuery,
    ) -> Result<NetworkLogPage> {
        // The sandbox must be the team's (any status: the log outlives a pause).
        self.store.sandbox_by_id(team_id, sandbox_id).await?;
        let path = self.layout.sandbox_dir(sandbox_id)?.join(NETWORK_LOG);
        let text = match tokio::fs::read(&path).await {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(EngineError::io("reading", &path)(e)),
        };
        let events: Vec<kiln_api::NetworkEvent> = text
            .split(|b| *b == b'\n')
            .filter_map(|l| serde_json::from_slice(l).ok())
            .collect();
        Ok(query.page(events.into_iter().rev()))
    }

    /// A sandbox's egress rules, if any were set (what [`Engine::set_network_rules`] wrote).
    pub(crate) fn network_rules(&self, sandbox_id: &str) -> Option<NetworkConfig> {
        let path = self
            .layout
            .sandbox_dir(sandbox_id)
            .ok()?
            .join(NETWORK_RULES);
        serde_json::from_slice(&std::fs::read(path).ok()?).ok()
    }

    /// The team's sandboxes under `filter` (every status but `deleted` by default).
    pub async fn list_sandboxes(
        &self,
        team_id: &str,
        filter: &SandboxFilter,
    ) -> Result<Vec<SandboxInfo>> {
        Ok(self
            .store
            .list_sandboxes(team_id, filter)
            .await?
            .iter()
            .map(|s| self.sandbox_info(s))
            .collect())
    }

    /// One of the team's sandboxes. A deleted one is not found, as the API's docs say
    /// ("further API calls return 404"); its row stays for its snapshots' sake.
    pub async fn sandbox(&self, team_id: &str, sandbox_id: &str) -> Result<SandboxInfo> {
        let s = self.store.sandbox_by_id(team_id, sandbox_id).await?;
        if s.status == SandboxStatus::Deleted {
            return Err(kiln_store::StoreError::not_found("sandbox", sandbox_id).into());
        }
        Ok(self.sandbox_info(&s))
    }

    /// Moves a sandbox to `to` (the store sets its timers' deadlines with it) and wakes
    /// the timer to look at the deadlines again.
    pub(crate) async fn set_status(
        &self,
        team_id: &str,
        sandbox_id: &str,
        to: SandboxStatus,
    ) -> Result<Sandbox> {
        let s = self
            .store
            .set_sandbox_status(team_id, sandbox_id, to)
            .await?;
        self.timers.notify_one();
        Ok(s)
    }

    /// Changes a sandbox's metadata, egress rules, timers and preview policy
    /// (`PATCH /sandboxes/{id}`).
    /// Egress rules set on a paused sandbox apply from its resume (its VM makes no
    /// connection before).
    pub async fn update_sandbox(
        &self,
        team_id: &str,
        sandbox_id: &str,
        update: &kiln_api::UpdateSandbox,
    ) -> Result<()> {
        update.validate()?;
        if let Some(Some(rules)) = &update.network {
            check_rules(rules)?;
        }
        let s = self.store.sandbox_by_id(team_id, sandbox_id).await?;
        if s.status == SandboxStatus::Deleted {
            return Err(kiln_store::StoreError::not_found("sandbox", sandbox_id).into());
        }
        if let Some(metadata) = &update.metadata {
            self.store
                .set_sandbox_metadata(team_id, sandbox_id, metadata)
                .await?;
        }
        if let Some(rules) = &update.network {
            self.set_network_rules(team_id, sandbox_id, rules.as_ref())
                .await?;
        }
        if let Some(access) = update.preview_access {
            self.set_preview_access(team_id, sandbox_id, access).await?;
        }
        if update.timeout_seconds.is_some() || update.auto_delete_seconds.is_some() {
            let seconds =
                |v: Option<Option<u64>>| v.map(|v| v.map(|v| u32::try_from(v).unwrap_or(u32::MAX)));
            self.store
                .set_sandbox_timers(
                    team_id,
                    sandbox_id,
                    seconds(update.timeout_seconds),
                    seconds(update.auto_delete_seconds),
                )
                .await?;
            self.timers.notify_one();
        }
        Ok(())
    }

    /// Publishes how to reach a sandbox's VM, naming this process as its owner.
    pub(crate) fn write_endpoint(&self, dir: &Path, vm: &dyn Machine) -> Result<()> {
        let endpoint = SandboxEndpoint {
            agent_socket: vm.agent_socket().to_owned(),
            qemu_pid: vm.pid(),
            owner_pid: std::process::id(),
            owner: self.cfg.owner,
        };
        let json = serde_json::to_vec_pretty(&endpoint).unwrap_or_default();
        kiln_store::write_atomic(&dir.join(ENDPOINT_FILE), &json)?;
        Ok(())
    }

    /// Whether another live process owns this sandbox's VM (a CLI keeper, or a server
    /// still running). This process's own sandboxes are tracked in memory, not here.
    pub(crate) fn owner_alive(&self, sandbox_id: &str) -> bool {
        self.layout
            .sandbox_dir(sandbox_id)
            .ok()
            .and_then(|d| std::fs::read(d.join(ENDPOINT_FILE)).ok())
            .and_then(|b| serde_json::from_slice::<SandboxEndpoint>(&b).ok())
            .is_some_and(|e| e.owner_pid != std::process::id() && pid_alive(e.owner_pid))
    }

    /// The endpoint of a running sandbox, if its owner is still alive.
    pub async fn sandbox_endpoint(
        &self,
        team_id: &str,
        sandbox_id: &str,
    ) -> Result<SandboxEndpoint> {
        let record = self.store.sandbox_by_id(team_id, sandbox_id).await?;
        if record.status != SandboxStatus::Active {
            return Err(EngineError::NotRunning(sandbox_id.to_owned()));
        }
        let path = self.layout.sandbox_dir(sandbox_id)?.join(ENDPOINT_FILE);
        let endpoint: SandboxEndpoint = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or_else(|| EngineError::NotRunning(sandbox_id.to_owned()))?;
        if !pid_alive(endpoint.owner_pid) || !pid_alive(endpoint.qemu_pid) {
            return Err(EngineError::NotRunning(sandbox_id.to_owned()));
        }
        Ok(endpoint)
    }

    /// Connects to a running sandbox's agent (the owner must have released its own
    /// connection: the channel takes one host connection at a time).
    pub(crate) async fn connect_agent(
        &self,
        team_id: &str,
        sandbox_id: &str,
    ) -> Result<AgentClient> {
        let endpoint = self.sandbox_endpoint(team_id, sandbox_id).await?;
        if endpoint.owner == Owner::Server {
            return Err(EngineError::OwnedByServer {
                sandbox: sandbox_id.to_owned(),
                pid: endpoint.owner_pid,
            });
        }
        AgentClient::connect_unix(&endpoint.agent_socket, CONNECT_TIMEOUT)
            .await
            .map_err(EngineError::Agent)
    }

    /// Removes the VM run directories (overlays, memory files) of processes that died
    /// without cleaning up; returns how many. Safe with other kiln processes running:
    /// see [`kiln_vm::sweep_stale_run_dirs`].
    pub(crate) async fn sweep_run_dirs(&self) -> usize {
        let vm_dir = self.vm_dir();
        tokio::task::spawn_blocking(move || kiln_vm::sweep_stale_run_dirs(&vm_dir).len())
            .await
            .unwrap_or(0)
    }

    /// Marks sandboxes whose owner process is gone as `failed` and removes their
    /// directories and VM run directories: after a crash or `kill -9`, nothing stays
    /// orphaned. Returns their ids.
    pub async fn reap_orphaned_sandboxes(&self, team_id: &str) -> Result<Vec<String>> {
        self.sweep_run_dirs().await;
        let filter =
            SandboxFilter::with_statuses(vec![SandboxStatus::Starting, SandboxStatus::Active]);
        let mut reaped = Vec::new();
        for s in self.store.list_sandboxes(team_id, &filter).await? {
            let owner_alive = self.owner_alive(&s.id);
            // A sandbox still `starting` has no endpoint yet: give it time.
            let young = s.status == SandboxStatus::Starting
                && (chrono_now_secs() - s.created_at.timestamp()) < 120;
            if !owner_alive && !young {
                self.set_status(team_id, &s.id, SandboxStatus::Failed)
                    .await?;
                self.remove_sandbox_dir(&s.id);
                reaped.push(s.id);
            }
        }
        Ok(reaped)
    }

    /// Records that a sandbox's VM is gone (`deleted` when killed on request, `failed`
    /// when it died) and removes its directory.
    pub async fn finish_sandbox(
        &self,
        team_id: &str,
        sandbox_id: &str,
        status: SandboxStatus,
    ) -> Result<SandboxInfo> {
        let s = self.set_status(team_id, sandbox_id, status).await?;
        self.remove_sandbox_dir(sandbox_id);
        Ok(self.sandbox_info(&s))
    }

    /// Stops the VM of a sandbox another process owns (a CLI keeper, or a server that is
    /// not this one): SIGTERM to the owner, SIGKILL after [`STOP_GRACE`], and QEMU itself if
    /// it outlived its owner.
    pub(crate) async fn stop_other_owner(&self, sandbox_id: &str) {
        let Some(endpoint) = self
            .layout
            .sandbox_dir(sandbox_id)
            .ok()
            .and_then(|d| std::fs::read(d.join(ENDPOINT_FILE)).ok())
            .and_then(|b| serde_json::from_slice::<SandboxEndpoint>(&b).ok())
        else {
            return;
        };
        if endpoint.owner_pid != std::process::id() && pid_alive(endpoint.owner_pid) {
            signal(endpoint.owner_pid, libc::SIGTERM);
            let started = std::time::Instant::now();
            while pid_alive(endpoint.owner_pid) && started.elapsed() < STOP_GRACE {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            if pid_alive(endpoint.owner_pid) {
                signal(endpoint.owner_pid, libc::SIGKILL);
            }
        }
        // The owner's death takes QEMU with it (PDEATHSIG); this is for a QEMU whose owner
        // died before it could arrange that.
        if pid_alive(endpoint.qemu_pid) && qemu_of(endpoint.qemu_pid, &endpoint.agent_socket) {
            signal(endpoint.qemu_pid, libc::SIGKILL);
        }
    }

    fn remove_sandbox_dir(&self, sandbox_id: &str) {
        if let Ok(dir) = self.layout.sandbox_dir(sandbox_id) {
            remove_dir_quiet(&dir);
        }
    }
}

/// Sets the agent's defaults to `defaults` with `env` over their env.
async fn set_env(
    agent: &AgentClient,
    mut defaults: kiln_agent_proto::RuntimeDefaults,
    env: &std::collections::BTreeMap<String, String>,
) -> Result<()> {
    defaults
        .env
        .extend(env.iter().map(|(k, v)| (k.clone(), v.clone())));
    agent
        .set_defaults(defaults)
        .await
        .map_err(EngineError::Agent)?;
    Ok(())
}

/// Egress rules that the proxy can compile, or every problem with them.
fn check_rules(rules: &NetworkConfig) -> Result<()> {
    kiln_net::Policy::compile(rules)
        .map(drop)
        .map_err(|errs| kiln_api::RequestError::invalid(errs.to_string()).into())
}

pub(crate) fn remove_dir_quiet(dir: &Path) {
    if let Err(e) = std::fs::remove_dir_all(dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(path = %dir.display(), error = %e, "could not remove sandbox directory");
        }
    }
}

fn chrono_now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// How long a sandbox's owner gets to stop its VM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(15);

fn signal(pid: u32, sig: i32) {
    if let Ok(pid) = i32::try_from(pid) {
        if pid > 0 {
            // SAFETY: kill(2) on a pid read from the sandbox's own endpoint file.
            unsafe { libc::kill(pid, sig) };
        }
    }
}

/// Whether `pid` is still the QEMU serving `socket` (not a recycled pid).
fn qemu_of(pid: u32, socket: &Path) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| {
            let c = String::from_utf8_lossy(&c);
            c.contains("qemu-system") && c.contains(&*socket.to_string_lossy())
        })
        .unwrap_or(false)
}

/// Whether a process exists (signal 0).
pub fn pid_alive(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    // SAFETY: kill with signal 0 only checks for existence and permission.
    pid > 0 && unsafe { libc::kill(pid, 0) } == 0
}
