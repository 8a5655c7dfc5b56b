//! The seam between kiln and the program that runs its VMs.
//!
//! [`Hypervisor`] starts machines (a cold boot for builds, a restore from a snapshot bundle
//! for sandboxes); [`Machine`] is one running VM; [`PendingRestore`] is a restore started
//! ahead of time that waits for its snapshot (the restore pool). kiln's engine and build
//! pipeline hold `Arc<dyn Hypervisor>` and `Box<dyn Machine>`, never QEMU types, so their
//! lifecycle logic is tested with [`crate::fake`] (no VMM, no root) and another VMM can be
//! added beside [`Qemu`] without touching them.
//!
//! What a second backend (Firecracker, Cloud Hypervisor) would need to provide:
//! - a guest with kiln's agent reachable on a host stream socket: both expose vsock as a
//!   unix socket with a `CONNECT <port>` preamble, which [`Machine::agent_socket`] would
//!   hide behind a connector (QEMU's virtio-serial socket needs none);
//! - snapshot bundles in kiln's format (see [`crate::snapshot`]): a memory file restores
//!   map privately (Firecracker's `mem_file_path` with `MAP_PRIVATE`, Cloud Hypervisor's
//!   `restore` with `memory_restore_mode=ondemand`), a device-state file in its own format
//!   (the manifest's `ram` mode would gain a VMM field), the disk as a raw base under a
//!   per-restore copy-on-write layer (both take raw disks only: a qcow2 overlay would need
//!   a device-mapper or reflink copy instead);
//! - egress: a TAP device per VM into a network namespace with kiln's proxy as its only
//!   way out, since neither has QEMU's user-mode network (QEMU's VMs already live in a
//!   namespace of their own: see [`crate::jail::netns`]);
//! - jailing: both come with a jailer of their own (Firecracker's is the model of
//!   [`crate::jail`]), which would take the place of [`crate::jail::spawn`];
//! - `-incoming defer`'s equivalent for the pool: a process started and configured, its
//!   snapshot loaded on claim (Firecracker: the API socket up before `/snapshot/load`).

use std::fmt::Debug;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use kiln_agent_proto::{AgentClient, ExecHandle, ExecOutput, ExecRequest};

use crate::error::Result;
use crate::jail::Jail;
use crate::snapshot::{CheckpointInfo, Incoming, RestoreConfig, SnapshotInfo};
use crate::vm::{Vm, VmConfig};

/// Starts virtual machines.
#[async_trait]
pub trait Hypervisor: Send + Sync + Debug {
    /// A short name for logs and `kiln doctor` (`qemu`).
    fn name(&self) -> &'static str;

    /// Boots a VM and waits until its agent answers (builds, `kiln run`).
    async fn boot(&self, config: VmConfig) -> Result<Box<dyn Machine>>;

    /// The first half of a restore: everything that does not depend on when the VM is
    /// wanted (check the bundle, create the disk layer, start the process waiting for its
    /// snapshot). [`PendingRestore::finish`] completes it.
    async fn prepare_restore(
        &self,
        bundle: &Path,
        config: &RestoreConfig,
    ) -> Result<Box<dyn PendingRestore>>;

    /// A restore in one go: the VM running with its processes live, agent connected,
    /// guest clock set. Restores of one bundle are independent and never write to it.
    async fn restore(&self, bundle: &Path, config: RestoreConfig) -> Result<Box<dyn Machine>> {
        let started = std::time::Instant::now();
        let pending = self.prepare_restore(bundle, &config).await?;
        let left = config
            .timeout
            .saturating_sub(started.elapsed())
            .max(Duration::from_secs(1));
        pending.finish(left).await
    }

    /// Turns a bundle whose RAM is in its migration stream ([`Machine::checkpoint`]'s)
    /// into one at `bundle` whose RAM is a memory file that restores map copy-on-write,
    /// the way they map a template's; the guest is never run. A VM process is started for
    /// it under `run_parent`. See [`crate::snapshot::make_forkable`].
    async fn make_forkable(
        &self,
        stream: &Path,
        bundle: &Path,
        run_parent: &Path,
    ) -> Result<SnapshotInfo>;

    /// Removes the run directories under `parent` whose owner process died (see
    /// [`crate::sweep_stale_run_dirs`]); returns them.
    fn sweep_run_dirs(&self, parent: &Path) -> Vec<PathBuf> {
        crate::sweep_stale_run_dirs(parent)
    }
}

/// A restore waiting for its snapshot. Dropping it stops the process and removes its run
/// directory.
#[async_trait]
pub trait PendingRestore: Send + Sync + Debug {
    /// The VM's run directory.
    fn run_dir(&self) -> &Path;

    /// False once the process has exited (it can no longer be finished).
    fn is_alive(&self) -> bool;

    /// Names who this VM ended up serving in its logs.
    fn claimed_by(&self, who: &str);

    /// Points the VM's egress proxy at the claiming sandbox's files (its rules, bindings
    /// and logs); before [`PendingRestore::finish`], so before the guest can connect.
    fn assign_egress(&self, files: kiln_net::FileSet);

    /// Loads the snapshot, resumes the guest, connects to its agent and sets its clock.
    async fn finish(self: Box<Self>, timeout: Duration) -> Result<Box<dyn Machine>>;
}

/// One running VM and everything it owns. Dropping it (or [`Machine::kill`]) stops the
/// VM and removes its run directory.
#[async_trait]
pub trait Machine: Send + Sync + Debug {
    /// The VMM process id.
    fn pid(&self) -> u32;

    /// The run directory (sockets, console, disk layer).
    fn run_dir(&self) -> &Path;

    /// The serial console log.
    fn console_log(&self) -> &Path;

    /// The host end of the agent channel (one host connection at a time).
    fn agent_socket(&self) -> &Path;

    /// The agent connection. Panics after [`Machine::release_agent`].
    fn agent(&self) -> &AgentClient;

    /// Hands over this handle's agent connection (the VM stays owned by the handle).
    fn release_agent(&mut self) -> Option<AgentClient>;

    /// How the VMM process exited, if it has.
    fn exit_status(&self) -> Option<String>;

    /// Runs a command to completion through the agent, failing with
    /// [`crate::Error::Exited`] if the VM dies first.
    async fn exec_collect(&self, req: ExecRequest) -> Result<ExecOutput>;

    /// Starts a command through the agent; events stream from the handle.
    async fn exec(&self, req: ExecRequest) -> Result<ExecHandle>;

    /// Sets the guest clock to the host's.
    async fn sync_clock(&self) -> Result<()>;

    /// Freezes the disk as it is now (the previous top becomes read-only and is
    /// returned; `new_top` takes every write from here on).
    async fn freeze_disk(&mut self, new_top: &Path) -> Result<PathBuf>;

    /// Captures the VM into a snapshot bundle at `bundle`; the VM is consumed.
    async fn snapshot(self: Box<Self>, bundle: &Path) -> Result<SnapshotInfo>;

    /// Captures the running VM into a bundle at `bundle` and lets it run on: the guest is
    /// stopped only for the capture. The bundle's disk lies over the restore's
    /// [`RestoreConfig::base_disk`] (its template's disk). On failure the VM runs on as it
    /// was. The guest clock lags by the frozen time afterwards: set it through the agent.
    /// See [`Vm::checkpoint`].
    async fn checkpoint(&mut self, bundle: &Path) -> Result<CheckpointInfo>;

    /// Stops the VM at once and removes its run directory.
    async fn kill(self: Box<Self>);
}

/// QEMU (`qemu-system-x86_64`): the hypervisor kiln runs today, with KVM where it really
/// boots a guest and TCG otherwise (see [`crate::accel`]), every process jailed
/// ([`crate::jail`]).
///
/// `Qemu::default()` jails as the environment says ([`Jail::from_env`]); a malformed
/// setting fails each VM's start with the reason, so making one never fails.
#[derive(Debug, Clone, Default)]
pub struct Qemu {
    jail: Option<Jail>,
}

impl Qemu {
    /// QEMU with VM processes jailed by `jail`.
    pub fn new(jail: Jail) -> Self {
        Self { jail: Some(jail) }
    }

    /// The jail its VMs run in.
    pub fn jail(&self) -> Result<Jail> {
        match &self.jail {
            Some(j) => Ok(j.clone()),
            None => Ok(Jail::from_env()?),
        }
    }
}

#[async_trait]
impl Hypervisor for Qemu {
    fn name(&self) -> &'static str {
        "qemu"
    }

    async fn boot(&self, config: VmConfig) -> Result<Box<dyn Machine>> {
        Ok(Box::new(Vm::boot_in(config, &self.jail()?).await?))
    }

    async fn prepare_restore(
        &self,
        bundle: &Path,
        config: &RestoreConfig,
    ) -> Result<Box<dyn PendingRestore>> {
        Ok(Box::new(
            Vm::prepare_restore_in(bundle, config, &self.jail()?).await?,
        ))
    }

    async fn make_forkable(
        &self,
        stream: &Path,
        bundle: &Path,
        run_parent: &Path,
    ) -> Result<SnapshotInfo> {
        crate::snapshot::make_forkable(stream, bundle, run_parent, &self.jail()?).await
    }
}

#[async_trait]
impl PendingRestore for Incoming {
    fn run_dir(&self) -> &Path {
        Incoming::run_dir(self)
    }

    fn is_alive(&self) -> bool {
        Incoming::is_alive(self)
    }

    fn claimed_by(&self, who: &str) {
        Incoming::claimed_by(self, who);
    }

    fn assign_egress(&self, files: kiln_net::FileSet) {
        Incoming::assign_egress(self, files);
    }

    async fn finish(self: Box<Self>, timeout: Duration) -> Result<Box<dyn Machine>> {
        Ok(Box::new(Incoming::finish(*self, timeout).await?))
    }
}

#[async_trait]
impl Machine for Vm {
    fn pid(&self) -> u32 {
        Vm::pid(self)
    }

    fn run_dir(&self) -> &Path {
        Vm::run_dir(self)
    }

    fn console_log(&self) -> &Path {
        Vm::console_log(self)
    }

    fn agent_socket(&self) -> &Path {
        Vm::agent_socket(self)
    }

    fn agent(&self) -> &AgentClient {
        Vm::agent(self)
    }

    fn release_agent(&mut self) -> Option<AgentClient> {
        Vm::release_agent(self)
    }

    fn exit_status(&self) -> Option<String> {
        Vm::exit_status(self)
    }

    async fn exec_collect(&self, req: ExecRequest) -> Result<ExecOutput> {
        Vm::exec_collect(self, req).await
    }

    async fn exec(&self, req: ExecRequest) -> Result<ExecHandle> {
        Vm::exec(self, req).await
    }

    async fn sync_clock(&self) -> Result<()> {
        Vm::sync_clock(self).await
    }

    async fn freeze_disk(&mut self, new_top: &Path) -> Result<PathBuf> {
        Vm::freeze_disk(self, new_top).await
    }

    async fn snapshot(self: Box<Self>, bundle: &Path) -> Result<SnapshotInfo> {
        Vm::snapshot(*self, bundle).await
    }

    async fn checkpoint(&mut self, bundle: &Path) -> Result<CheckpointInfo> {
        Vm::checkpoint(self, bundle).await
    }

    async fn kill(self: Box<Self>) {
        Vm::kill(*self).await;
    }
}
