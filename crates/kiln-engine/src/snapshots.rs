//! Snapshots of sandboxes: taken while the sandbox runs on, kept by the team until
//! deleted, and what forks (`from_snapshot`) start from.
//!
//! Taking one has two halves. Under the sandbox's op lock (so that no pause, resume or
//! kill runs meanwhile), the capture: a running sandbox's VM is checkpointed
//! ([`kiln_vm::Machine::checkpoint`]: the guest stopped only while its RAM and devices
//! are streamed out, its disk frozen onto a layer over the template's disk), a paused
//! sandbox's pause snapshot is linked. Then, in the background, the capture is made
//! forkable ([`kiln_vm::Hypervisor::make_forkable`]: its RAM becomes a memory file that
//! forks map copy-on-write, like a template's) and published under `snapshots/<id>/`;
//! the snapshot is `creating` until then. Everything is assembled under
//! `snapshots/.<id>.partial/`, so a capture cut short (a full disk, a killed server)
//! leaves nothing that looks like a snapshot, and the snapshot is marked `failed`.
//!
//! On disk a snapshot's disk is a qcow2 layer over its template build's `disk.raw`, which
//! is why a template with snapshots cannot be deleted (the store refuses). A fork runs on
//! hard links to the snapshot's files (see `sandboxes.rs`), so deleting a snapshot never
//! takes anything from a fork.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use kiln_api::{CreateSnapshot, SandboxStatus, SnapshotInfo, SnapshotPage, SnapshotStatus};
use kiln_spec::{BuildErrorCode, CodedMessage};
use kiln_store::{NewSnapshot, Sandbox, Snapshot};
use tracing::Instrument as _;

use crate::error::{EngineError, Result};
use crate::sandboxes::remove_dir_quiet;
use crate::{wire, Engine};

/// Inside a snapshot's staging directory: the capture, RAM in its migration stream.
const CAPTURE: &str = "capture";
/// Inside a snapshot's staging directory: the forkable bundle, renamed into place whole.
const BUNDLE: &str = "bundle";

/// What [`Engine::create_snapshot`] did.
#[derive(Debug, Clone)]
pub struct SnapshotTaken {
    /// The snapshot: `creating` while it is made forkable, then `ready`.
    pub snapshot: SnapshotInfo,
    /// `false` when an earlier request with the same idempotency key made it.
    pub created: bool,
    /// How long the sandbox's guest was stopped for the capture (none for a paused
    /// sandbox, or a repeated request).
    pub frozen_time: Option<Duration>,
}

impl Engine {
    /// Takes a snapshot of a sandbox (`POST /sandboxes/{id}/snapshot`).
    ///
    /// A running sandbox is captured and runs on; a paused one is captured from its
    /// pause snapshot and stays paused; a deleted one is not found; a failed one, or one
    /// another process runs, is a conflict. A repeated request with the same idempotency
    /// key answers the first one's snapshot. The capture is done when this returns; the
    /// snapshot is then `creating` until it is forkable (see
    /// [`Engine::wait_snapshot`]). A failed capture leaves the snapshot `failed` and the
    /// sandbox as it was, and is [`EngineError::Capture`].
    pub async fn create_snapshot(
        self: &Arc<Self>,
        team_id: &str,
        sandbox_id: &str,
        req: &CreateSnapshot,
    ) -> Result<SnapshotTaken> {
        req.validate()?;
        let new = NewSnapshot {
            name: req.name.clone(),
            idempotency_key: req.idempotency_key.clone(),
        };
        let op = self.live.op_lock(sandbox_id).lock_owned().await;
        let sandbox = self.store.sandbox_by_id(team_id, sandbox_id).await?;
        let live = self.live_running(sandbox_id);
        match sandbox.status {
            SandboxStatus::Deleted => {
                return Err(kiln_store::StoreError::not_found("sandbox", sandbox_id).into())
            }
            SandboxStatus::Active if live.is_some() => {}
            SandboxStatus::Paused => {}
            SandboxStatus::Failed => {
                return Err(EngineError::Conflict(format!(
                    "sandbox {sandbox_id} failed: there is nothing to capture"
                )))
            }
            _ => return Err(EngineError::NotRunning(sandbox_id.to_owned())),
        }
        let (row, created) = self
            .store
            .create_snapshot(&sandbox, &new, std::process::id(), &self.cfg.limits)
            .await?;
        if !created {
            return Ok(SnapshotTaken {
                snapshot: wire::snapshot(&row),
                created,
                frozen_time: None,
            });
        }
        let span = tracing::info_span!("snapshot", snapshot = %row.id, sandbox = %sandbox_id);
        let captured = self
            .capture(&sandbox, &row, live)
            .instrument(span.clone())
            .await;
        drop(op);
        let frozen_time = match captured {
            Ok(frozen) => frozen,
            Err(e) => {
                tracing::warn!(parent: &span, error = %kiln_vm::error_chain(&e), "capture failed");
                self.fail_snapshot(&row.id, &e).await;
                return Err(e);
            }
        };
        let engine = self.clone();
        let id = row.id.clone();
        tokio::spawn(async move { engine.make_ready(&id).await }.instrument(span));
        Ok(SnapshotTaken {
            snapshot: wire::snapshot(&row),
            created,
            frozen_time,
        })
    }

    /// The capture, into the snapshot's staging directory, under the sandbox's op lock.
    /// Returns how long the guest was stopped.
    async fn capture(
        &self,
        sandbox: &Sandbox,
        row: &Snapshot,
        live: Option<Arc<crate::live::Running>>,
    ) -> Result<Option<Duration>> {
        let staging = self.layout.snapshot_staging_dir(&row.id)?;
        remove_dir_quiet(&staging);
        std::fs::create_dir_all(&staging).map_err(EngineError::io("creating", &staging))?;
        let capture = staging.join(CAPTURE);
        let Some(running) = live.filter(|_| sandbox.status == SandboxStatus::Active) else {
            // Paused: its pause snapshot is a capture already (its files never change).
            let paused = crate::live::paused_bundle(&self.layout.sandbox_dir(&sandbox.id)?)
                .ok_or_else(|| EngineError::NotRunning(sandbox.id.clone()))?;
            kiln_vm::snapshot::link_bundle(&paused, &capture).map_err(EngineError::Capture)?;
            return Ok(None);
        };
        let info = {
            let mut vm = running.vm.lock().await;
            let vm = vm
                .as_mut()
                .ok_or_else(|| EngineError::NotRunning(sandbox.id.clone()))?;
            vm.checkpoint(&capture).await
        };
        // The guest's clock stood still while it was stopped.
        if let Err(e) = running.agent.set_clock(SystemTime::now()).await {
            tracing::warn!(error = %e, "could not set the guest clock after the capture");
        }
        let info = info.map_err(EngineError::Capture)?;
        tracing::info!(
            frozen_ms = info.frozen_time.as_millis() as u64,
            total_ms = info.total_time.as_millis() as u64,
            "sandbox captured; it runs on"
        );
        Ok(Some(info.frozen_time))
    }

    /// The background half: the capture made forkable, published, and the snapshot
    /// marked `ready` (or `failed`).
    async fn make_ready(&self, id: &str) {
        let started = Instant::now();
        let outcome = self.publish_snapshot(id).await;
        let row = match outcome {
            Ok(size) => match self.store.finish_snapshot(id, Ok(size)).await {
                Ok(row) => Some(row),
                Err(e) => {
                    // Deleted (or failed by another process) meanwhile: nobody owns it.
                    tracing::info!(error = %e, "snapshot gone before it was ready");
                    if let Ok(dir) = self.layout.snapshot_dir(id) {
                        remove_dir_quiet(&dir);
                    }
                    None
                }
            },
            Err(e) => {
                tracing::warn!(error = %kiln_vm::error_chain(&e), "making the snapshot forkable failed");
                self.fail_snapshot(id, &e).await;
                None
            }
        };
        if let Some(row) = row {
            tracing::info!(
                ms = started.elapsed().as_millis() as u64,
                size = row.size_bytes,
                "snapshot ready"
            );
        }
        self.snapshots_settled.send_modify(|n| *n += 1);
    }

    /// Makes the capture forkable and publishes it; returns the bytes it takes.
    async fn publish_snapshot(&self, id: &str) -> Result<u64> {
        let staging = self.layout.snapshot_staging_dir(id)?;
        let capture = staging.join(CAPTURE);
        let bundle = staging.join(BUNDLE);
        remove_dir_quiet(&bundle);
        let manifest = kiln_vm::snapshot::read_manifest(&capture).map_err(EngineError::Capture)?;
        if manifest.ram == kiln_vm::RamMode::Stream {
            self.hypervisor()
                .make_forkable(&capture, &bundle, &self.vm_dir())
                .await
                .map_err(EngineError::Capture)?;
        } else {
            // A pause snapshot of a resumed sandbox keeps its RAM in a file already.
            std::fs::rename(&capture, &bundle).map_err(EngineError::io("renaming", &capture))?;
        }
        let dest = self.layout.snapshot_dir(id)?;
        kiln_store::publish_dir(&bundle, &dest)?;
        remove_dir_quiet(&staging);
        Ok(allocated(&dest))
    }

    /// Marks a snapshot `failed` with why (for the client: what failed, not QEMU's words,
    /// which the log has) and removes whatever it had on disk.
    async fn fail_snapshot(&self, id: &str, e: &EngineError) {
        let why = CodedMessage::new(BuildErrorCode::SnapshotFailed, e.public_message());
        if let Err(e) = self.store.finish_snapshot(id, Err(&why)).await {
            tracing::debug!(error = %e, "snapshot already settled");
        }
        for dir in [
            self.layout.snapshot_staging_dir(id),
            self.layout.snapshot_dir(id),
        ]
        .into_iter()
        .flatten()
        {
            remove_dir_quiet(&dir);
        }
        self.snapshots_settled.send_modify(|n| *n += 1);
    }

    /// A snapshot once it is no longer `creating`, or as it is after `timeout`.
    pub async fn wait_snapshot(
        &self,
        team_id: &str,
        snapshot_id: &str,
        timeout: Duration,
    ) -> Result<SnapshotInfo> {
        let mut settled = self.snapshots_settled.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let s = self.store.snapshot_by_id(team_id, snapshot_id).await?;
            if s.status != SnapshotStatus::Creating {
                return Ok(wire::snapshot(&s));
            }
            // Another process may be making it: look again now and then.
            let wake = tokio::time::Instant::now() + Duration::from_millis(500);
            if tokio::time::timeout_at(wake.min(deadline), settled.changed())
                .await
                .is_err()
                && tokio::time::Instant::now() >= deadline
            {
                return Ok(wire::snapshot(&s));
            }
        }
    }

    /// One of the team's snapshots.
    pub async fn snapshot(&self, team_id: &str, snapshot_id: &str) -> Result<SnapshotInfo> {
        Ok(wire::snapshot(
            &self.store.snapshot_by_id(team_id, snapshot_id).await?,
        ))
    }

    /// The team's snapshots, newest first; only those of `sandbox_id` when given (also
    /// after that sandbox was deleted: its snapshots outlive it).
    pub async fn list_snapshots(
        &self,
        team_id: &str,
        sandbox_id: Option<&str>,
        page: &SnapshotPage,
    ) -> Result<Vec<SnapshotInfo>> {
        if let Some(id) = sandbox_id {
            // Another team's sandbox (or none) is not found, rather than an empty list.
            self.store.sandbox_by_id(team_id, id).await?;
        }
        Ok(self
            .store
            .list_snapshots(team_id, sandbox_id, page.limit, page.offset)
            .await?
            .iter()
            .map(wire::snapshot)
            .collect())
    }

    /// Renames a snapshot (`PATCH /snapshots/{id}`).
    pub async fn rename_snapshot(
        &self,
        team_id: &str,
        snapshot_id: &str,
        update: &kiln_api::UpdateSnapshot,
    ) -> Result<SnapshotInfo> {
        update.validate()?;
        Ok(wire::snapshot(
            &self
                .store
                .rename_snapshot(team_id, snapshot_id, &update.name)
                .await?,
        ))
    }

    /// Deletes a snapshot and its files. Forks made from it keep running on their links to
    /// its files; a capture still in progress is abandoned (its files go when it ends).
    pub async fn delete_snapshot(&self, team_id: &str, snapshot_id: &str) -> Result<()> {
        let s = self.store.delete_snapshot(team_id, snapshot_id).await?;
        if s.status != SnapshotStatus::Creating {
            if let Ok(dir) = self.layout.snapshot_dir(&s.id) {
                remove_dir_quiet(&dir);
            }
        }
        Ok(())
    }

    /// Removes what `snapshots/` holds that no snapshot row owns: bundles of snapshots
    /// deleted while the process that deleted them died, staging directories of captures
    /// no process runs. Run at start, after interrupted captures were failed.
    pub(crate) async fn sweep_snapshot_dirs(&self) -> Result<()> {
        let known: std::collections::HashSet<String> =
            self.store.snapshot_ids().await?.into_iter().collect();
        let creating: std::collections::HashSet<String> =
            self.store.snapshots_creating().await?.into_iter().collect();
        let Ok(entries) = std::fs::read_dir(self.layout.snapshots_dir()) else {
            return Ok(());
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let keep = match name
                .strip_prefix('.')
                .and_then(|n| n.strip_suffix(".partial"))
            {
                Some(id) => creating.contains(id),
                None => known.contains(&name),
            };
            if !keep {
                tracing::info!(path = %e.path().display(), "removing an orphaned snapshot directory");
                remove_dir_quiet(&e.path());
            }
        }
        Ok(())
    }

    /// The VM of a sandbox this process runs (for a capture).
    fn live_running(&self, sandbox_id: &str) -> Option<Arc<crate::live::Running>> {
        self.live.running(sandbox_id)
    }
}

/// Bytes the files of a directory take on disk (sparse files count their data only).
fn allocated(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.blocks() * 512)
                .sum()
        })
        .unwrap_or(0)
}
