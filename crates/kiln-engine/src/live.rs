//! Sandboxes owned by this process: the server's model.
//!
//! The server holds each sandbox's VM ([`Machine`]) itself (so the VM lives exactly as long as the
//! server, `PDEATHSIG` included) and shares one multiplexed agent connection among every
//! data-plane call. Pause snapshots the running VM into the sandbox's directory and stops
//! it; resume restores that snapshot with the processes live. Operations on one sandbox
//! (pause, resume, kill) are serialised by a per-sandbox lock, so a resume that arrives
//! while a pause runs waits for it instead of failing.
//!
//! On disk, a paused sandbox is `sandboxes/<id>/paused/` (a snapshot bundle). A resumed VM
//! runs on that bundle (its overlay's backing file and, for a stream-mode bundle, nothing
//! else), so the bundle is kept until the next pause has written its successor to
//! `paused-next/` and the VM that used it has quit.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kiln_agent_proto::AgentClient;
use kiln_api::{CreateSandbox, SandboxInfo, SandboxWithToken};
use kiln_store::{Sandbox, SandboxStatus};
use kiln_vm::Machine;
use tracing::Instrument as _;

use crate::error::{EngineError, Result};
use crate::sandboxes::remove_dir_quiet;
use crate::Engine;

const PAUSED: &str = "paused";
const PAUSED_NEXT: &str = "paused-next";

/// The sandboxes whose VMs this process owns.
#[derive(Debug, Default)]
pub(crate) struct LiveSandboxes {
    running: Mutex<HashMap<String, Arc<Running>>>,
    /// One lock per sandbox for pause, resume and kill.
    ops: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

#[derive(Debug)]
pub(crate) struct Running {
    team_id: String,
    /// The multiplexed agent connection every data-plane call shares.
    pub(crate) agent: AgentClient,
    /// The current access token, so that `activate` on a running sandbox can hand it out
    /// without rotating it (which would cut off every other client of the sandbox).
    token: Mutex<String>,
    /// The VM, taken out by a pause or a kill.
    pub(crate) vm: tokio::sync::Mutex<Option<Box<dyn Machine>>>,
}

impl LiveSandboxes {
    pub(crate) fn op_lock(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut ops = self.ops.lock().unwrap_or_else(|e| e.into_inner());
        ops.entry(id.to_owned()).or_default().clone()
    }

    fn insert(
        &self,
        team_id: &str,
        id: &str,
        vm: Box<dyn Machine>,
        token: &str,
    ) -> Result<AgentClient> {
        let mut vm = vm;
        let agent = vm
            .release_agent()
            .ok_or_else(|| EngineError::NotRunning(id.to_owned()))?;
        let running = Arc::new(Running {
            team_id: team_id.to_owned(),
            agent: agent.clone(),
            token: Mutex::new(token.to_owned()),
            vm: tokio::sync::Mutex::new(Some(vm)),
        });
        self.lock().insert(id.to_owned(), running);
        Ok(agent)
    }

    fn take(&self, id: &str) -> Option<Arc<Running>> {
        self.lock().remove(id)
    }

    pub(crate) fn running(&self, id: &str) -> Option<Arc<Running>> {
        self.lock().get(id).cloned()
    }

    pub(crate) fn agent(&self, id: &str) -> Option<AgentClient> {
        self.lock().get(id).map(|r| r.agent.clone())
    }

    fn token(&self, id: &str) -> Option<String> {
        let running = self.lock().get(id).cloned()?;
        let token = running
            .token
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        Some(token)
    }

    fn set_token(&self, id: &str, token: &str) {
        if let Some(running) = self.lock().get(id).cloned() {
            *running.token.lock().unwrap_or_else(|e| e.into_inner()) = token.to_owned();
        }
    }

    fn ids(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Running>>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A sandbox brought up (created, resumed or activated) and the token that opens its data
/// plane, as the API answers.
#[derive(Debug, Clone)]
pub struct SandboxUp {
    /// The sandbox with its current access token.
    pub sandbox: SandboxWithToken,
    /// How long bringing its VM up took, when this call did.
    pub restore_time: Option<Duration>,
}

/// The outcome of [`Engine::pause_sandbox`].
#[derive(Debug, Clone)]
pub struct Paused {
    /// The sandbox, now `paused`.
    pub sandbox: SandboxInfo,
    /// How long the snapshot took (`None` when it was already paused).
    pub snapshot_time: Option<Duration>,
}

impl Engine {
    /// Creates a sandbox from a template and brings it up in this process, which owns its
    /// VM from now on (`POST /sandboxes`).
    pub async fn create_sandbox(&self, team_id: &str, req: &CreateSandbox) -> Result<SandboxUp> {
        let (record, access_token) = self.new_sandbox_record(team_id, req).await?;
        let started = Instant::now();
        let live = self.start_sandbox(team_id, &record.id).await?;
        let restore_time = started.elapsed();
        if let Err(e) = self
            .live
            .insert(team_id, &record.id, live.vm, &access_token)
        {
            self.finish_sandbox(team_id, &record.id, SandboxStatus::Failed)
                .await?;
            return Err(e);
        }
        Ok(SandboxUp {
            sandbox: SandboxWithToken {
                sandbox: live.info,
                access_token,
            },
            restore_time: Some(restore_time),
        })
    }

    /// The agent of a sandbox this process runs. A paused (or pausing, or resuming)
    /// sandbox is [`EngineError::Unavailable`]: resuming it makes it available again.
    pub(crate) fn live_agent(&self, sandbox: &Sandbox) -> Result<AgentClient> {
        if let Some(agent) = self.live.agent(&sandbox.id) {
            return Ok(agent);
        }
        match sandbox.status {
            SandboxStatus::Paused | SandboxStatus::Pausing | SandboxStatus::Resuming => {
                Err(EngineError::Unavailable(sandbox.id.clone()))
            }
            _ => Err(EngineError::NotRunning(sandbox.id.clone())),
        }
    }

    /// Snapshots a running sandbox and stops its VM. Pausing a paused sandbox is a
    /// conflict (409, as Superserve's `errors.mdx` lists it); a pause in progress is
    /// waited for first, so a second pause finds the sandbox paused. If the snapshot fails
    /// the VM is gone, so the sandbox is marked `failed`.
    pub async fn pause_sandbox(&self, team_id: &str, sandbox_id: &str) -> Result<Paused> {
        let _op = self.live.op_lock(sandbox_id).lock_owned().await;
        let vm = self.begin_pause(team_id, sandbox_id).await?;
        self.snapshot_paused(team_id, sandbox_id, vm).await
    }

    /// Starts a pause and returns once the sandbox is `pausing`; the snapshot continues
    /// in the background. Any resume or kill that follows waits for it.
    pub async fn pause_sandbox_detached(
        self: &Arc<Self>,
        team_id: &str,
        sandbox_id: &str,
    ) -> Result<SandboxInfo> {
        let op = self.live.op_lock(sandbox_id).lock_owned().await;
        let vm = self.begin_pause(team_id, sandbox_id).await?;
        let pausing = self.store.sandbox_by_id(team_id, sandbox_id).await;
        let engine = self.clone();
        let (team_id, sandbox_id) = (team_id.to_owned(), sandbox_id.to_owned());
        tokio::spawn(async move {
            let _op = op;
            if let Err(e) = engine.snapshot_paused(&team_id, &sandbox_id, vm).await {
                tracing::warn!(sandbox = %sandbox_id, error = %e, "background pause failed");
            }
        });
        Ok(self.sandbox_info(&pausing?))
    }

    /// The auto-pause timer's pause: under the op lock, and only if the sandbox is still
    /// running here with its deadline passed at `now` (a resume, a pause or a new timeout
    /// that came first wins). True when it paused the sandbox.
    pub(crate) async fn auto_pause(
        &self,
        team_id: &str,
        sandbox_id: &str,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Result<bool> {
        let _op = self.live.op_lock(sandbox_id).lock_owned().await;
        let s = self.store.sandbox_by_id(team_id, sandbox_id).await?;
        let due = s.status == SandboxStatus::Active && s.pause_at.is_some_and(|at| at <= now);
        if !due || self.live.agent(sandbox_id).is_none() {
            return Ok(false);
        }
        tracing::info!(sandbox = %sandbox_id, "auto-pause: the timeout passed");
        let vm = self.begin_pause(team_id, sandbox_id).await?;
        self.snapshot_paused(team_id, sandbox_id, vm).await?;
        Ok(true)
    }

    /// Under the sandbox's op lock: takes its VM out of service and marks it `pausing`.
    async fn begin_pause(&self, team_id: &str, sandbox_id: &str) -> Result<Box<dyn Machine>> {
        let record = self.store.sandbox_by_id(team_id, sandbox_id).await?;
        match record.status {
            SandboxStatus::Paused => {
                return Err(EngineError::Conflict(format!(
                    "sandbox {sandbox_id} is already paused"
                )))
            }
            SandboxStatus::Deleted => {
                return Err(kiln_store::StoreError::not_found("sandbox", sandbox_id).into())
            }
            _ => {}
        }
        let Some(running) = self.live.take(sandbox_id) else {
            // Not ours to pause (another process runs it, or nothing does); its status is
            // left as it is.
            return Err(EngineError::NotRunning(sandbox_id.to_owned()));
        };
        if let Err(e) = self
            .set_status(team_id, sandbox_id, SandboxStatus::Pausing)
            .await
        {
            self.live.lock().insert(sandbox_id.to_owned(), running);
            return Err(e);
        }
        let vm = running.vm.lock().await.take();
        vm.ok_or_else(|| EngineError::NotRunning(sandbox_id.to_owned()))
    }

    async fn snapshot_paused(
        &self,
        team_id: &str,
        sandbox_id: &str,
        vm: Box<dyn Machine>,
    ) -> Result<Paused> {
        let span = tracing::info_span!("pause", sandbox = %sandbox_id);
        self.snapshot_paused_inner(team_id, sandbox_id, vm)
            .instrument(span)
            .await
    }

    async fn snapshot_paused_inner(
        &self,
        team_id: &str,
        sandbox_id: &str,
        vm: Box<dyn Machine>,
    ) -> Result<Paused> {
        let dir = self.layout.sandbox_dir(sandbox_id)?;
        let next = dir.join(PAUSED_NEXT);
        remove_dir_quiet(&next);
        let started = Instant::now();
        match vm.snapshot(&next).await {
            Ok(info) => {
                // The VM has quit: the bundle it ran on (if any) is free.
                let current = dir.join(PAUSED);
                remove_dir_quiet(&current);
                std::fs::rename(&next, &current)
                    .map_err(EngineError::io("publishing the pause snapshot", &current))?;
                if let Err(e) = kiln_store::fsync_dir(&dir) {
                    tracing::warn!(error = %e, "could not sync the sandbox directory");
                }
                let snapshot_time = started.elapsed();
                tracing::info!(
                    ms = snapshot_time.as_millis() as u64,
                    save_ms = info.save_time.as_millis() as u64,
                    "sandbox paused"
                );
                let sandbox = self
                    .set_status(team_id, sandbox_id, SandboxStatus::Paused)
                    .await?;
                Ok(Paused {
                    sandbox: self.sandbox_info(&sandbox),
                    snapshot_time: Some(snapshot_time),
                })
            }
            Err(e) => {
                tracing::warn!(error = %kiln_vm::error_chain(&e), "pause snapshot failed");
                self.finish_sandbox(team_id, sandbox_id, SandboxStatus::Failed)
                    .await?;
                Err(EngineError::Snapshot(e))
            }
        }
    }

    /// Brings a paused sandbox back with its processes live (a pause in progress is waited
    /// out first) and rotates its access token: the SDK's `resume`.
    pub async fn resume_sandbox(&self, team_id: &str, sandbox_id: &str) -> Result<SandboxUp> {
        self.bring_up(team_id, sandbox_id, true).await
    }

    /// The SDK's `activate` (what `Sandbox.connect` calls): a paused sandbox is resumed with
    /// a new token; a running one keeps its token, which is handed out again, so that one
    /// client connecting does not cut off the others.
    pub async fn activate_sandbox(&self, team_id: &str, sandbox_id: &str) -> Result<SandboxUp> {
        self.bring_up(team_id, sandbox_id, false).await
    }

    async fn bring_up(
        &self,
        team_id: &str,
        sandbox_id: &str,
        always_rotate: bool,
    ) -> Result<SandboxUp> {
        let _op = self.live.op_lock(sandbox_id).lock_owned().await;
        let record = self.store.sandbox_by_id(team_id, sandbox_id).await?;
        let mut restore_time = None;
        let sandbox = match record.status {
            // Resuming a running sandbox is a conflict (the SDK's `resume` answers it by
            // looking at the status); activating it hands out its token.
            SandboxStatus::Active if always_rotate => {
                return Err(EngineError::Conflict(format!(
                    "sandbox {sandbox_id} is not paused"
                )))
            }
            SandboxStatus::Active if self.live.agent(sandbox_id).is_some() => {
                if let Some(token) = self.live.token(sandbox_id).filter(|t| !t.is_empty()) {
                    return Ok(SandboxUp {
                        sandbox: SandboxWithToken {
                            sandbox: self.sandbox_info(&record),
                            access_token: token,
                        },
                        restore_time: None,
                    });
                }
                record
            }
            SandboxStatus::Paused => {
                let started = Instant::now();
                let sandbox = self
                    .restore_paused(team_id, &record)
                    .instrument(tracing::info_span!(parent: None, "sandbox", sandbox = %sandbox_id))
                    .await?;
                restore_time = Some(started.elapsed());
                sandbox
            }
            // Gone is gone: the same answer as for an id that never existed.
            SandboxStatus::Deleted => {
                return Err(kiln_store::StoreError::not_found("sandbox", sandbox_id).into())
            }
            SandboxStatus::Active => return Err(EngineError::NotRunning(sandbox_id.to_owned())),
            _ => {
                // Let the store name the refused transition.
                self.set_status(team_id, sandbox_id, SandboxStatus::Resuming)
                    .await?;
                return Err(EngineError::NotRunning(sandbox_id.to_owned()));
            }
        };
        let access_token = self.store.rotate_sandbox_token(team_id, sandbox_id).await?;
        self.live.set_token(sandbox_id, &access_token);
        Ok(SandboxUp {
            sandbox: SandboxWithToken {
                sandbox: self.sandbox_info(&sandbox),
                access_token,
            },
            restore_time,
        })
    }

    async fn restore_paused(&self, team_id: &str, record: &Sandbox) -> Result<Sandbox> {
        let dir = self.layout.sandbox_dir(&record.id)?;
        let bundle =
            paused_bundle(&dir).ok_or_else(|| EngineError::NotRunning(record.id.clone()))?;
        self.set_status(team_id, &record.id, SandboxStatus::Resuming)
            .await?;
        let cfg = self.restore_config(record, &dir)?;
        match self.hypervisor().restore(&bundle, cfg).await {
            Ok(vm) => {
                self.write_endpoint(&dir, vm.as_ref())?;
                let agent = self.live.insert(team_id, &record.id, vm, "")?;
                // Bindings attached or detached while it was paused.
                self.apply_secret_env(record, &agent).await?;
                tracing::info!("sandbox resumed");
                Ok(self
                    .set_status(team_id, &record.id, SandboxStatus::Active)
                    .await?)
            }
            Err(e) => {
                // The snapshot is untouched: the sandbox stays paused and can be retried.
                tracing::warn!(error = %kiln_vm::error_chain(&e), "resume failed");
                self.set_status(team_id, &record.id, SandboxStatus::Paused)
                    .await?;
                Err(EngineError::restore(e))
            }
        }
    }

    /// Stops a sandbox's VM (this process's, or its other owner's) and marks it
    /// `deleted`, removing its directory and any pause snapshot. Idempotent.
    pub async fn kill_sandbox(&self, team_id: &str, sandbox_id: &str) -> Result<SandboxInfo> {
        let lock = self.live.op_lock(sandbox_id);
        let _op = lock.lock().await;
        let record = self.store.sandbox_by_id(team_id, sandbox_id).await?;
        if record.status == SandboxStatus::Deleted {
            return Ok(self.sandbox_info(&record));
        }
        self.kill_locked(team_id, sandbox_id).await
    }

    /// The auto-delete timer's kill: under the op lock, and only if the sandbox is still
    /// paused with its deadline passed at `now` (a resume or a disarm that came first
    /// wins). True when it deleted the sandbox.
    pub(crate) async fn auto_delete(
        &self,
        team_id: &str,
        sandbox_id: &str,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Result<bool> {
        let lock = self.live.op_lock(sandbox_id);
        let _op = lock.lock().await;
        let s = self.store.sandbox_by_id(team_id, sandbox_id).await?;
        if s.status != SandboxStatus::Paused || s.delete_at.is_none_or(|at| at > now) {
            return Ok(false);
        }
        tracing::info!(sandbox = %sandbox_id, "auto-delete: paused for its whole window");
        self.kill_locked(team_id, sandbox_id).await?;
        Ok(true)
    }

    /// [`Engine::kill_sandbox`]'s work, under the op lock.
    async fn kill_locked(&self, team_id: &str, sandbox_id: &str) -> Result<SandboxInfo> {
        match self.live.take(sandbox_id) {
            Some(running) => {
                if let Some(vm) = running.vm.lock().await.take() {
                    vm.kill().await;
                }
            }
            None => self.stop_other_owner(sandbox_id).await,
        }
        let sandbox = self
            .finish_sandbox(team_id, sandbox_id, SandboxStatus::Deleted)
            .await?;
        self.live
            .ops
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(sandbox_id);
        Ok(sandbox)
    }

    /// Stops every VM this process owns and marks those sandboxes `failed` (their memory
    /// is lost with the VM). Paused sandboxes are on disk and stay paused. The restore
    /// pool is emptied and closed too. Called on shutdown.
    pub async fn stop_live_sandboxes(&self) {
        self.pool.close();
        for id in self.live.ids() {
            let Some(running) = self.live.take(&id) else {
                continue;
            };
            if let Some(vm) = running.vm.lock().await.take() {
                vm.kill().await;
            }
            let _ = self
                .finish_sandbox(&running.team_id, &id, SandboxStatus::Failed)
                .await;
        }
    }

    /// After a crash: builds that were running are marked failed and their staging files
    /// removed, and so are snapshots being captured; sandboxes whose owner process is gone
    /// are marked failed and their directories removed; VM run directories (disk
    /// overlays, memory files) whose owner is gone are removed. Paused sandboxes keep
    /// their snapshot and stay paused (and their auto-delete deadlines, which the timer
    /// picks up).
    pub async fn recover_after_restart(&self) -> Result<Recovered> {
        let mut out = Recovered {
            run_dirs: self.sweep_run_dirs().await,
            ..Recovered::default()
        };
        // Our own pid in the table is a previous process's that happened to get it again.
        let me = std::process::id();
        let alive = |pid: u32| pid != me && crate::pid_alive(pid);
        for b in self.store.mark_interrupted_builds(alive).await? {
            if let Ok(staging) = self.layout.staging_dir(&b.template_id, &b.id) {
                remove_dir_quiet(&staging);
            }
            out.builds.push(b.id);
        }
        // A capture cut short leaves its snapshot `failed` and nothing of it on disk (it
        // is published only whole); its source, if it was running here, went with us.
        for s in self.store.mark_interrupted_snapshots(alive).await? {
            if let Ok(staging) = self.layout.snapshot_staging_dir(&s.id) {
                remove_dir_quiet(&staging);
            }
            out.snapshots.push(s.id);
        }
        self.sweep_snapshot_dirs().await?;
        for s in self
            .store
            .sandboxes_with_status(&SandboxStatus::owned())
            .await?
        {
            if self.live.agent(&s.id).is_some() || self.owner_alive(&s.id) {
                continue;
            }
            // A pause that was under way may have finished its snapshot; if so, keep it.
            let dir = self.layout.sandbox_dir(&s.id)?;
            if s.status == SandboxStatus::Pausing
                && dir.join(PAUSED_NEXT).join("manifest.json").is_file()
            {
                remove_dir_quiet(&dir.join(PAUSED));
                if std::fs::rename(dir.join(PAUSED_NEXT), dir.join(PAUSED)).is_ok() {
                    self.set_status(&s.team_id, &s.id, SandboxStatus::Paused)
                        .await?;
                    continue;
                }
            }
            if s.status == SandboxStatus::Resuming && paused_bundle(&dir).is_some() {
                self.set_status(&s.team_id, &s.id, SandboxStatus::Paused)
                    .await?;
                continue;
            }
            self.finish_sandbox(&s.team_id, &s.id, SandboxStatus::Failed)
                .await?;
            out.sandboxes.push(s.id);
        }
        Ok(out)
    }
}

/// What [`Engine::recover_after_restart`] cleaned up.
#[derive(Debug, Clone, Default)]
pub struct Recovered {
    /// Builds marked failed.
    pub builds: Vec<String>,
    /// Sandboxes marked failed.
    pub sandboxes: Vec<String>,
    /// Snapshots whose capture was cut short, marked failed.
    pub snapshots: Vec<String>,
    /// VM run directories of dead processes removed.
    pub run_dirs: usize,
}

/// A paused sandbox's pause snapshot (the one being replaced, while a pause publishes its
/// successor).
pub(crate) fn paused_bundle(dir: &Path) -> Option<PathBuf> {
    [PAUSED, PAUSED_NEXT]
        .iter()
        .map(|n| dir.join(n))
        .find(|b| b.join("manifest.json").is_file())
}
