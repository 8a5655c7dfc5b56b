//! The benchmarks' floor: a snapshot bundle restored by plain QEMU, with production's
//! command line ([`QemuArgs`]) minus what kiln adds around it (no run-dir bookkeeping, no
//! `qemu-img` overlay: `snapshot=on`; no console log; no clock sync, no store). kiln's
//! restores are measured against this, so it lives beside them: one definition that
//! `kiln-bench` and the `bench_vm` example both launch.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::Result;
use crate::provision::KernelAssets;
use crate::qmp::Qmp;
use crate::snapshot::Manifest;
use crate::vm::{Console, DiskFormat, Drive, NetConfig, QemuArgs, RamFile};

/// A floor restore's command line and the sockets it serves.
#[derive(Debug, Clone)]
pub struct FloorCommand {
    /// Arguments of `qemu-system-x86_64`.
    pub argv: Vec<String>,
    /// QMP.
    pub qmp_socket: PathBuf,
    /// The agent channel.
    pub agent_socket: PathBuf,
}

/// The floor's QEMU for restoring a file-mode `bundle` (manifest `m`), its sockets in
/// `run_dir`. No egress proxy and no forwards: the floor is QEMU alone.
pub fn command(bundle: &Path, m: &Manifest, run_dir: &Path) -> Result<FloorCommand> {
    let kernel = KernelAssets {
        version: m.kernel_version.clone(),
        vmlinuz: bundle.join("vmlinuz"),
        initramfs: bundle.join("initramfs.cpio"),
    };
    let (memory, disk) = (bundle.join("memory"), bundle.join("disk.raw"));
    let net = NetConfig::default();
    let qemu = QemuArgs {
        shape: &m.shape,
        kernel: &kernel,
        run_dir,
        console: Console::Discard,
        ram: RamFile {
            path: &memory,
            shared: false,
        },
        disk: Drive {
            path: &disk,
            format: DiskFormat::Raw,
            snapshot: true,
        },
        net: &net,
        incoming: true,
    };
    Ok(FloorCommand {
        argv: qemu.argv(),
        qmp_socket: qemu.qmp_socket(),
        agent_socket: qemu.agent_socket(),
    })
}

/// Loads `bundle`'s device state into a floor QEMU waiting on `qmp_socket` and runs the
/// guest: what a restore does between launch and `running`.
pub async fn load(qmp_socket: &Path, bundle: &Path) -> Result<()> {
    let mut qmp = Qmp::connect(qmp_socket, Duration::from_secs(10)).await?;
    qmp.migrate_set_capabilities(&[("x-ignore-shared", true)])
        .await?;
    let state = bundle.join("state");
    let state = std::fs::File::open(&state).map_err(crate::Error::io("open", &state))?;
    qmp.migrate_from(&state).await?;
    qmp.wait_migration(Duration::from_secs(30)).await?;
    qmp.cont().await?;
    qmp.wait_status("running", Duration::from_secs(10)).await?;
    Ok(())
}
