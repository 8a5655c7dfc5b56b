//! kiln-vm: the QEMU driver.
//!
//! - [`provision`]: host packages, guest kernel, initramfs with the agent (`kiln setup`).
//! - [`accel`]: KVM only where a guest really boots, else TCG.
//! - [`disk`]: ext4 image from a rootfs dir, qcow2 overlays.
//! - [`digest`]: content digests of sparse files (snapshot manifests).
//! - [`Vm`]: boot, exec through the agent, snapshot into a bundle, restore, kill.
//! - [`QemuArgs`]: the QEMU command line every [`Vm`] runs (and the benchmark's floor).
//! - [`qmp`]: the small QMP client underneath.
//! - [`jail`]: every VM process (QEMU, its egress proxy) jailed: its own uid, mount and
//!   network namespaces, cgroup, seccomp, no new privileges.
//! - [`trust`]: the certificates every guest trusts besides its own.
//!
//! The build pipeline's path: [`provision::locate`] (or [`provision::setup`]) ->
//! [`accel::choose`] -> [`Vm::boot`] with [`RootDisk::Ext4`] -> [`Vm::exec_collect`] ...
//! -> [`Vm::snapshot`]; a sandbox is [`Vm::restore`].

pub mod accel;
pub mod digest;
pub mod disk;
mod elf;
mod error;
#[cfg(any(test, feature = "fake"))]
pub mod fake;
pub mod floor;
mod hypervisor;
pub mod initramfs;
pub mod jail;
mod launch;
pub mod provision;
pub mod qmp;
mod rundir;
pub mod snapshot;
pub mod tool;
pub mod trust;
mod vm;

pub use accel::{Accel, AccelChoice, Resolved};
pub use error::{Error, Result};
pub use hypervisor::{Hypervisor, Machine, PendingRestore, Qemu};
pub use jail::{Jail, JailMode};
pub use kiln_agent_proto::{
    AgentClient, ExecEvent, ExecHandle, ExecOutput, ExecRequest, ExitStatus,
};
pub use launch::Egress;
pub use provision::{KernelAssets, StateDir};
pub use rundir::{sweep_stale_run_dirs, RunDir};
pub use snapshot::{CheckpointInfo, Incoming, Manifest, RamMode, RestoreConfig, SnapshotInfo};
pub use trust::GuestTrust;
pub use vm::{
    error_chain, Console, DiskFormat, Drive, NetConfig, PortForward, QemuArgs, RamFile, RootDisk,
    Shape, Vm, VmConfig, AGENT_PORT, READY_MARKER, SANDBOX,
};
