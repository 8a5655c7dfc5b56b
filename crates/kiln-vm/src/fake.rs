//! A recording fake of [`Hypervisor`] (feature `fake`), for testing lifecycle logic
//! (the engine's create, pause, resume, kill, restore pool and restart recovery) without
//! QEMU, KVM or root, the way youki tests its logic against a recording `Syscall`.
//!
//! Machines are real enough for the code around them: each has a run directory made with
//! [`RunDir`] (so sweeps and leak checks see it), a console log, and a
//! [`kiln_agent_proto::fake::FakeAgent`] on its agent socket, so an
//! [`AgentClient`] talks to it over the real protocol. Nothing runs in them. A snapshot or
//! a checkpoint writes a bundle of small files with a real manifest ([`write_bundle`]),
//! and restoring a bundle that has no manifest fails like a corrupt one would. Tests can
//! make restores, checkpoints and conversions fail and machines die.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use kiln_agent_proto::fake::FakeAgent;
use kiln_agent_proto::{AgentClient, ExecHandle, ExecOutput, ExecRequest, RuntimeDefaults};

use crate::error::{Error, Result};
use crate::hypervisor::{Hypervisor, Machine, PendingRestore};
use crate::rundir::RunDir;
use crate::snapshot::{CheckpointInfo, FileEntry, Manifest, RamMode, RestoreConfig, SnapshotInfo};
use crate::vm::{Shape, VmConfig};

/// What the fake was asked to do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    /// A boot of a VM named so.
    Boot(String),
    /// A restore was started for this bundle (machine pid).
    Prepare(PathBuf, u32),
    /// The restore of this pid was pointed at a sandbox's egress files (a pool claim).
    AssignEgress(u32, kiln_net::FileSet),
    /// The restore of this pid was finished (snapshot loaded, guest running).
    Finish(u32),
    /// This pid was captured into this bundle.
    Snapshot(u32, PathBuf),
    /// This pid was stopped by `kill`.
    Kill(u32),
    /// This pid was checkpointed into this bundle (and ran on).
    Checkpoint(u32, PathBuf),
    /// This stream bundle was made forkable into that bundle.
    MakeForkable(PathBuf, PathBuf),
}

#[derive(Debug, Default)]
struct Shared {
    calls: Mutex<Vec<Call>>,
    /// Bundles whose restores fail.
    failing: Mutex<HashSet<PathBuf>>,
    /// Exit statuses of machines that "died", by pid.
    dead: Mutex<BTreeMap<u32, String>>,
    /// Machines alive now (handles not yet dropped).
    alive: Mutex<HashSet<u32>>,
    /// Why checkpoints fail, while they do.
    failing_checkpoints: Mutex<Option<String>>,
    /// Why conversions to forkable bundles fail, while they do.
    failing_forkable: Mutex<Option<String>>,
    next_pid: AtomicU32,
}

impl Shared {
    fn record(&self, call: Call) {
        self.calls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(call);
    }
}

/// See the module docs. Clones share their record.
#[derive(Debug, Clone, Default)]
pub struct FakeHypervisor {
    shared: Arc<Shared>,
}

impl FakeHypervisor {
    /// A fake with nothing recorded.
    pub fn new() -> Self {
        Self::default()
    }

    /// Every call so far.
    pub fn calls(&self) -> Vec<Call> {
        self.shared
            .calls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Restores of `bundle` fail from now on (with [`Error::Restore`]).
    pub fn fail_restores_of(&self, bundle: &Path) {
        self.shared
            .failing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(canonical(bundle));
    }

    /// Checkpoints fail with `reason` from now on (`None`: they work again), after
    /// leaving a partial file behind, the way a full disk fails a capture.
    pub fn fail_checkpoints(&self, reason: Option<&str>) {
        *self
            .shared
            .failing_checkpoints
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = reason.map(str::to_owned);
    }

    /// Conversions to forkable bundles fail with `reason` from now on (`None`: they work
    /// again).
    pub fn fail_make_forkable(&self, reason: Option<&str>) {
        *self
            .shared
            .failing_forkable
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = reason.map(str::to_owned);
    }

    /// The machine with this pid dies: its process "exits" with `status`.
    pub fn crash(&self, pid: u32, status: &str) {
        self.shared
            .dead
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(pid, status.to_owned());
    }

    /// Pids of the machines (and pending restores) whose handles are alive.
    pub fn alive(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self
            .shared
            .alive
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .copied()
            .collect();
        v.sort_unstable();
        v
    }

    fn start(&self, run_parent: &Path, name: &str) -> Result<FakeMachine> {
        let pid = 10_000 + self.shared.next_pid.fetch_add(1, Ordering::Relaxed);
        let dir = RunDir::create(run_parent, name)?;
        let console = dir.path().join("console.log");
        std::fs::write(&console, format!("fake machine {pid}\n"))
            .map_err(Error::io("write", &console))?;
        let socket = dir.path().join("agent.sock");
        let agent = FakeAgent::serve(&socket, RuntimeDefaults::default())
            .map_err(Error::io("listen", &socket))?;
        self.shared
            .alive
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(pid);
        Ok(FakeMachine {
            pid,
            dir: Some(dir),
            console,
            socket,
            _agent: agent,
            client: None,
            shared: self.shared.clone(),
        })
    }
}

fn canonical(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_owned())
}

#[async_trait]
impl Hypervisor for FakeHypervisor {
    fn name(&self) -> &'static str {
        "fake"
    }

    async fn boot(&self, config: VmConfig) -> Result<Box<dyn Machine>> {
        self.shared.record(Call::Boot(config.name.clone()));
        let mut m = self.start(&config.run_parent, &config.name)?;
        m.connect().await?;
        Ok(Box::new(m))
    }

    async fn prepare_restore(
        &self,
        bundle: &Path,
        config: &RestoreConfig,
    ) -> Result<Box<dyn PendingRestore>> {
        let bundle = canonical(bundle);
        if !bundle.join("manifest.json").is_file() {
            return Err(Error::Bundle {
                path: bundle,
                reason: "manifest.json: missing".into(),
            });
        }
        let machine = self.start(&config.run_parent, &config.name)?;
        self.shared
            .record(Call::Prepare(bundle.clone(), machine.pid));
        Ok(Box::new(FakePending { machine, bundle }))
    }

    async fn make_forkable(
        &self,
        stream: &Path,
        bundle: &Path,
        _run_parent: &Path,
    ) -> Result<SnapshotInfo> {
        let m = crate::snapshot::read_manifest(stream)?;
        if m.ram != RamMode::Stream {
            return Err(Error::Config("fake: not a stream bundle".into()));
        }
        self.shared
            .record(Call::MakeForkable(stream.to_owned(), bundle.to_owned()));
        let failing = self
            .shared
            .failing_forkable
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(reason) = failing {
            return Err(Error::Snapshot(format!("fake: {reason}")));
        }
        let manifest = write_bundle(bundle, RamMode::File, m.disk_file())?;
        Ok(snapshot_info(bundle, manifest))
    }
}

/// Writes a small but complete bundle at `bundle` (which must not exist): `state`, the
/// disk (`disk.raw` or `disk.qcow2`), the boot files, `memory` in file mode, and a
/// manifest with their real digests, so that everything that reads bundles (manifests,
/// links, verification) works on it. For the fake and for tests that seed templates.
pub fn write_bundle(bundle: &Path, ram: RamMode, disk: &str) -> Result<Manifest> {
    std::fs::create_dir(bundle).map_err(Error::io("create", bundle))?;
    let mut names = vec!["state", disk, "vmlinuz", "initramfs.cpio"];
    if ram == RamMode::File {
        names.push("memory");
    }
    let mut files = BTreeMap::new();
    for name in names {
        let path = bundle.join(name);
        let content = format!("fake {name}\n");
        std::fs::write(&path, &content).map_err(Error::io("write", &path))?;
        files.insert(
            name.to_owned(),
            FileEntry {
                digest: crate::digest::chunked_sha256(&path)?,
                size: content.len() as u64,
            },
        );
    }
    let manifest = Manifest {
        version: crate::snapshot::MANIFEST_VERSION,
        created_unix: 0,
        shape: Shape::sample(crate::Resolved::Tcg, false),
        kernel_version: "fake".into(),
        ram,
        files,
    };
    let json = serde_json::to_vec(&manifest).map_err(|e| Error::Snapshot(e.to_string()))?;
    let path = bundle.join("manifest.json");
    std::fs::write(&path, json).map_err(Error::io("write", &path))?;
    Ok(manifest)
}

fn snapshot_info(bundle: &Path, manifest: Manifest) -> SnapshotInfo {
    SnapshotInfo {
        bundle: bundle.to_owned(),
        manifest,
        save_time: Duration::ZERO,
        files_time: Duration::ZERO,
        digest_time: Duration::ZERO,
        sync_time: Duration::ZERO,
        total_time: Duration::ZERO,
        allocated: 0,
    }
}

/// A fake restore waiting for [`PendingRestore::finish`].
#[derive(Debug)]
pub struct FakePending {
    machine: FakeMachine,
    bundle: PathBuf,
}

#[async_trait]
impl PendingRestore for FakePending {
    fn run_dir(&self) -> &Path {
        self.machine.run_dir()
    }

    fn is_alive(&self) -> bool {
        self.machine.exit_status().is_none()
    }

    fn claimed_by(&self, _who: &str) {}

    fn assign_egress(&self, files: kiln_net::FileSet) {
        self.machine
            .shared
            .record(Call::AssignEgress(self.machine.pid, files));
    }

    async fn finish(self: Box<Self>, _timeout: Duration) -> Result<Box<dyn Machine>> {
        let Self {
            mut machine,
            bundle,
        } = *self;
        machine.shared.record(Call::Finish(machine.pid));
        let failing = machine
            .shared
            .failing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&bundle);
        if failing {
            return Err(Error::Restore(format!(
                "fake: restoring {} fails",
                bundle.display()
            )));
        }
        machine.connect().await?;
        Ok(Box::new(machine))
    }
}

/// A fake running VM.
#[derive(Debug)]
pub struct FakeMachine {
    pid: u32,
    dir: Option<RunDir>,
    console: PathBuf,
    socket: PathBuf,
    _agent: FakeAgent,
    client: Option<AgentClient>,
    shared: Arc<Shared>,
}

impl FakeMachine {
    async fn connect(&mut self) -> Result<()> {
        let client = AgentClient::connect_unix(&self.socket, Duration::from_secs(5))
            .await
            .map_err(|e| Error::Agent(Box::new(e)))?;
        self.client = Some(client);
        Ok(())
    }

    fn dead(&self) -> Option<String> {
        self.shared
            .dead
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&self.pid)
            .cloned()
    }
}

impl Drop for FakeMachine {
    fn drop(&mut self) {
        self.shared
            .alive
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.pid);
        if let Some(d) = self.dir.take() {
            let _ = d.close();
        }
    }
}

#[async_trait]
impl Machine for FakeMachine {
    fn pid(&self) -> u32 {
        self.pid
    }

    fn run_dir(&self) -> &Path {
        self.dir
            .as_ref()
            .map_or(Path::new("/nonexistent"), |d| d.path())
    }

    fn console_log(&self) -> &Path {
        &self.console
    }

    fn agent_socket(&self) -> &Path {
        &self.socket
    }

    fn agent(&self) -> &AgentClient {
        self.client
            .as_ref()
            .expect("a machine has an agent until it is released")
    }

    fn release_agent(&mut self) -> Option<AgentClient> {
        self.client.take()
    }

    fn exit_status(&self) -> Option<String> {
        self.dead()
    }

    async fn exec_collect(&self, req: ExecRequest) -> Result<ExecOutput> {
        self.agent()
            .exec_collect(req)
            .await
            .map_err(|e| Error::Agent(Box::new(e)))
    }

    async fn exec(&self, req: ExecRequest) -> Result<ExecHandle> {
        self.agent()
            .exec(req)
            .await
            .map_err(|e| Error::Agent(Box::new(e)))
    }

    async fn sync_clock(&self) -> Result<()> {
        Ok(())
    }

    async fn freeze_disk(&mut self, new_top: &Path) -> Result<PathBuf> {
        Ok(new_top.with_extension("frozen"))
    }

    async fn snapshot(self: Box<Self>, bundle: &Path) -> Result<SnapshotInfo> {
        if let Some(status) = self.dead() {
            return Err(Error::Snapshot(format!("fake: the VM exited ({status})")));
        }
        self.shared
            .record(Call::Snapshot(self.pid, bundle.to_owned()));
        let manifest = write_bundle(bundle, RamMode::Stream, "disk.raw")?;
        Ok(snapshot_info(bundle, manifest))
    }

    async fn checkpoint(&mut self, bundle: &Path) -> Result<CheckpointInfo> {
        if let Some(status) = self.dead() {
            return Err(Error::Snapshot(format!("fake: the VM exited ({status})")));
        }
        self.shared
            .record(Call::Checkpoint(self.pid, bundle.to_owned()));
        let failing = self
            .shared
            .failing_checkpoints
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(reason) = failing {
            return Err(Error::Snapshot(format!("fake: {reason}")));
        }
        let manifest = write_bundle(bundle, RamMode::Stream, "disk.qcow2")?;
        Ok(CheckpointInfo {
            bundle: bundle.to_owned(),
            manifest,
            frozen_time: Duration::ZERO,
            total_time: Duration::ZERO,
            allocated: 0,
        })
    }

    async fn kill(self: Box<Self>) {
        self.shared.record(Call::Kill(self.pid));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn restore_snapshot_and_failures_are_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let hv = FakeHypervisor::new();
        let src = dir.path().join("src");
        write_bundle(&src, RamMode::File, "disk.raw").unwrap();
        let cfg = RestoreConfig::new("t", dir.path().join("vms"));
        let m = hv.restore(&src, cfg.clone()).await.unwrap();
        assert!(m.agent().is_connected());
        assert!(m.run_dir().join("owner.lock").is_file());
        let pid = m.pid();
        let bundle = dir.path().join("snap");
        m.snapshot(&bundle).await.unwrap();
        assert!(bundle.join("manifest.json").is_file());
        assert!(hv.alive().is_empty(), "a snapshot consumes the machine");

        hv.fail_restores_of(&bundle);
        let err = hv.restore(&bundle, cfg.clone()).await.unwrap_err();
        assert!(matches!(err, Error::Restore(_)), "{err}");
        assert!(
            hv.alive().is_empty(),
            "a failed restore leaves nothing running"
        );
        let err = hv
            .restore(&dir.path().join("nothing"), cfg)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Bundle { .. }), "{err}");
        let calls = hv.calls();
        assert_eq!(calls[1], Call::Finish(pid));
        assert!(matches!(&calls[2], Call::Snapshot(p, b) if *p == pid && *b == bundle));
        assert!(std::fs::read_dir(dir.path().join("vms"))
            .unwrap()
            .next()
            .is_none());
    }

    #[tokio::test]
    async fn checkpoints_run_on_and_their_bundles_become_forkable() {
        let dir = tempfile::tempdir().unwrap();
        let hv = FakeHypervisor::new();
        let src = dir.path().join("src");
        write_bundle(&src, RamMode::File, "disk.raw").unwrap();
        let cfg = RestoreConfig::new("t", dir.path().join("vms"));
        let mut m = hv.restore(&src, cfg).await.unwrap();
        let stream = dir.path().join("stream");
        let info = m.checkpoint(&stream).await.unwrap();
        assert_eq!(info.manifest.ram, RamMode::Stream);
        assert_eq!(
            hv.alive(),
            [m.pid()],
            "a checkpoint leaves the machine running"
        );
        hv.fail_checkpoints(Some("disk full"));
        let err = m.checkpoint(&dir.path().join("again")).await.unwrap_err();
        assert!(err.to_string().contains("disk full"), "{err}");
        hv.fail_checkpoints(None);
        let forkable = dir.path().join("forkable");
        let f = hv
            .make_forkable(&stream, &forkable, dir.path())
            .await
            .unwrap();
        assert_eq!(f.manifest.ram, RamMode::File);
        assert_eq!(f.manifest.disk_file(), "disk.qcow2");
        let linked = dir.path().join("linked");
        crate::snapshot::link_bundle(&forkable, &linked).unwrap();
        crate::snapshot::verify_bundle(&linked).await.unwrap();
        assert!(
            matches!(hv.calls().last(), Some(Call::MakeForkable(s, b)) if *s == stream && *b == forkable)
        );
    }
}
