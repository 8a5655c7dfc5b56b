//! Timing of the VM life cycle under the host's accelerator, with a bare-QEMU baseline.
//!
//! ```text
//! scripts/test-rootfs.sh minbase && scripts/build-agent.sh
//! cargo run --release -p kiln-vm --example bench_vm
//! ```
//! Uses `$KILN_TEST_ASSETS/state` (provisioned like the tests) and the minbase rootfs.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kiln_vm::provision::{self, AgentSource, SetupOptions, StateDir};
use kiln_vm::{ExecRequest, Manifest, NetConfig, RestoreConfig, RootDisk, Vm, VmConfig};

fn req(c: &str) -> ExecRequest {
    ExecRequest {
        command: c.into(),
        ..Default::default()
    }
}

fn allocated(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(p).map(|m| m.blocks() * 512).unwrap_or(0)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let assets = std::env::var_os("KILN_TEST_ASSETS")
        .map_or_else(|| PathBuf::from("/var/tmp/kiln-test-assets"), PathBuf::from);
    let rootfs = assets.join("rootfs/minbase.dir");
    anyhow::ensure!(
        rootfs.is_dir(),
        "{} missing: run the kiln-vm tests once (they unpack scripts/test-rootfs.sh minbase)",
        rootfs.display()
    );
    let state = StateDir::new(assets.join("state"));
    let report = provision::setup(&SetupOptions {
        state: state.clone(),
        agent: AgentSource::Search,
        install_packages: false,
    })
    .map_err(|e| anyhow::anyhow!(kiln_vm::error_chain(&e)))?;
    let (kernel, agent) = (report.kernel, report.agent_bin);
    let accel = kiln_vm::accel::choose(kiln_vm::Accel::from_env(), &state, Some(&kernel)).await;
    let memory_mib = 512;
    println!(
        "accelerator: {:?} ({}), guest {memory_mib} MiB, 1 vCPU",
        accel.accel, accel.reason
    );
    let run_parent = assets
        .join("runs")
        .join(format!("bench-{}", std::process::id()));
    std::fs::create_dir_all(&run_parent)?;

    let t = Instant::now();
    let vm = Vm::boot(VmConfig {
        name: "bench".into(),
        vcpus: 1,
        memory_mib,
        kernel: kernel.clone(),
        disk: RootDisk::Ext4 {
            rootfs,
            disk_mib: 512,
            agent: Some(agent),
        },
        network: Some(NetConfig::default()),
        accel: accel.accel,
        run_parent: run_parent.clone(),
        console_log: None,
        boot_timeout: None,
    })
    .await
    .map_err(|e| anyhow::anyhow!(kiln_vm::error_chain(&e)))?;
    println!(
        "cold boot to agent-ready (incl. 512 MiB ext4 build): {:?}",
        t.elapsed()
    );

    let mut rtts = Vec::new();
    for _ in 0..10 {
        let t = Instant::now();
        vm.exec_collect(req("true")).await?;
        rtts.push(t.elapsed());
    }
    rtts.sort();
    println!("exec round trip (`true`, median of 10): {:?}", rtts[5]);

    let bundle = run_parent.join("bundle");
    let info = vm
        .snapshot(&bundle)
        .await
        .map_err(|e| anyhow::anyhow!(kiln_vm::error_chain(&e)))?;
    println!(
        "snapshot: pause->state saved {:?}, bundle published {:?}; state {} KB, memory {} MiB apparent / {} MiB allocated, disk {} MiB allocated",
        info.save_time,
        info.total_time,
        info.manifest.files["state"].size / 1024,
        info.manifest.files["memory"].size >> 20,
        allocated(&bundle.join("memory")) >> 20,
        allocated(&bundle.join("disk.raw")) >> 20,
    );

    for i in 0..3 {
        let t = Instant::now();
        let vm = Vm::restore(
            &bundle,
            RestoreConfig::new(format!("bench-r{i}"), &run_parent),
        )
        .await
        .map_err(|e| anyhow::anyhow!(kiln_vm::error_chain(&e)))?;
        let restored = t.elapsed();
        vm.exec_collect(req("true")).await?;
        println!(
            "kiln restore #{i}: agent connected + clock set {restored:?}, first exec done {:?}",
            t.elapsed()
        );
        vm.kill().await;
    }
    for i in 0..3 {
        let d = bare_incoming(&bundle, &run_parent).await?;
        println!("bare qemu -incoming #{i}: launch to 'running' {d:?}");
    }
    std::fs::remove_dir_all(&run_parent)?;
    Ok(())
}

/// Plain QEMU loading the same snapshot ([`kiln_vm::floor`]), no agent connection.
async fn bare_incoming(bundle: &Path, run_parent: &Path) -> anyhow::Result<Duration> {
    let dir = tempfile::tempdir_in(run_parent)?;
    let m: Manifest = serde_json::from_slice(&std::fs::read(bundle.join("manifest.json"))?)?;
    let floor = kiln_vm::floor::command(bundle, &m, dir.path())?;
    let t = Instant::now();
    let mut child = tokio::process::Command::new("qemu-system-x86_64")
        .args(&floor.argv)
        .kill_on_drop(true)
        .spawn()?;
    kiln_vm::floor::load(&floor.qmp_socket, bundle).await?;
    let d = t.elapsed();
    child.kill().await?;
    Ok(d)
}
