//! A recording fake of [`Hypervisor`] (feature `fake`), for testing lifecycle logic
//! (the engine's create, pause, resume, kill, restore pool and restart recovery) without
//! QEMU, KVM or root, the way youki tests its logic against a recording `Syscall`.
//!
//! Machines are real enough for the code around them: each has a run directory made with
//! [`RunDir`] (so sweeps and leak checks see it), a console log, and a
//! [`kiln_agent_proto::fake::FakeAgent`] on its agent socket, so an
//! [`AgentClient`] talks to it over the real protocol. Nothing runs in them. A snapshot
//! writes a bundle directory with a `manifest.json` naming the machine it came from, and
//! restoring a bundle that has no manifest fails like a corrupt one would. Tests can make
//! restores fail and machines die.

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
use crate::snapshot::{Manifest, RamMode, RestoreConfig, SnapshotInfo};
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
        std::fs::create_dir(bundle).map_err(Error::io("create", bundle))?;
        let manifest = Manifest {
            version: crate::snapshot::MANIFEST_VERSION,
            created_unix: 0,
            shape: Shape::sample(crate::Resolved::Tcg, false),
            kernel_version: "fake".into(),
            ram: RamMode::Stream,
            files: BTreeMap::new(),
        };
        let json = serde_json::to_vec(&manifest).map_err(|e| Error::Snapshot(e.to_string()))?;
        let path = bundle.join("manifest.json");
        std::fs::write(&path, json).map_err(Error::io("write", &path))?;
        Ok(SnapshotInfo {
            bundle: bundle.to_owned(),
            manifest,
            save_time: Duration::ZERO,
            files_time: Duration::ZERO,
            digest_time: Duration::ZERO,
            sync_time: Duration::ZERO,
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
        std::fs::create_dir(&src).unwrap();
        std::fs::write(src.join("manifest.json"), "{}").unwrap();
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
}
