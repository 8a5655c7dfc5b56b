//! Shared setup for the real-VM tests: provisioning (the same code as `kiln setup`) into a
//! cached test state dir, and the minbase rootfs unpacked once.
//!
//! Missing prerequisites FAIL with the script to run; nothing is skipped silently.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use kiln_vm::provision::{self, AgentSource, SetupOptions, StateDir};
use kiln_vm::{KernelAssets, NetConfig, Resolved, RootDisk, VmConfig};

static PROVISION_LOCK: Mutex<()> = Mutex::new(());

/// `$KILN_TEST_ASSETS` or `/var/tmp/kiln-test-assets`.
pub fn assets() -> PathBuf {
    std::env::var_os("KILN_TEST_ASSETS")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp/kiln-test-assets"))
}

pub struct Env {
    pub state: StateDir,
    pub kernel: KernelAssets,
    pub agent: PathBuf,
    pub rootfs: PathBuf,
    pub accel: Resolved,
    /// Per-test-binary run parent; checked empty at the end.
    pub run_parent: PathBuf,
}

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KILN_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("kiln_vm=info")),
        )
        .with_test_writer()
        .try_init();
}

/// Provisions (cached) and returns the environment; panics with a remedy if it can't.
pub async fn env(test: &str) -> Env {
    init_tracing();
    let assets = assets();
    let state = StateDir::new(assets.join("state"));
    let (kernel, agent, rootfs) = {
        let _g = PROVISION_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let agent = provision::find_agent_binary().unwrap_or_else(|e| {
            panic!("{e}\n-> run scripts/build-agent.sh (or set KILN_AGENT_BIN)")
        });
        let report = provision::setup(&SetupOptions {
            state: state.clone(),
            agent: AgentSource::Path(agent.clone()),
            install_packages: true,
        })
        .unwrap_or_else(|e| panic!("provisioning failed: {}", kiln_vm::error_chain(&e)));
        (report.kernel, agent, minbase_rootfs(&assets))
    };
    let accel = kiln_vm::accel::choose(kiln_vm::Accel::from_env(), &state, Some(&kernel))
        .await
        .accel;
    let run_parent = assets
        .join("runs")
        .join(format!("{test}-{}", std::process::id()));
    std::fs::create_dir_all(&run_parent).unwrap();
    Env {
        state,
        kernel,
        agent,
        rootfs,
        accel,
        run_parent,
    }
}

/// Removes run parents of test processes that died (a failed test skips its leak check).
fn sweep_dead_runs(runs: &Path) {
    let Ok(rd) = std::fs::read_dir(runs) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.rsplit('-').next().and_then(|p| p.parse::<i32>().ok()) else {
            continue;
        };
        // SAFETY: signal 0 only probes for existence.
        if pid != std::process::id() as i32 && unsafe { libc::kill(pid, 0) } != 0 {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// The minbase rootfs, unpacked once (as root: ownership kept) next to its tarball.
fn minbase_rootfs(assets: &Path) -> PathBuf {
    let tar = assets.join("rootfs/minbase.tar");
    assert!(
        tar.is_file(),
        "{} missing -> run scripts/test-rootfs.sh minbase (KILN_TEST_ASSETS={})",
        tar.display(),
        assets.display()
    );
    let dir = assets.join("rootfs/minbase.dir");
    if dir.is_dir() {
        return dir;
    }
    let tmp = assets.join(format!("rootfs/.minbase.dir.{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).unwrap();
    let mut ar = tar::Archive::new(std::fs::File::open(&tar).unwrap());
    ar.set_preserve_permissions(true);
    ar.set_preserve_ownerships(true);
    ar.unpack(&tmp).unwrap();
    std::fs::rename(&tmp, &dir).unwrap();
    dir
}

impl Env {
    pub fn config(&self, name: &str) -> VmConfig {
        VmConfig {
            name: name.into(),
            vcpus: 1,
            memory_mib: 384,
            kernel: self.kernel.clone(),
            disk: RootDisk::Ext4 {
                rootfs: self.rootfs.clone(),
                disk_mib: 512,
                agent: Some(self.agent.clone()),
            },
            network: Some(NetConfig::default()),
            accel: self.accel,
            run_parent: self.run_parent.clone(),
            console_log: None,
            boot_timeout: Some(Duration::from_secs(120)),
        }
    }

    /// Asserts nothing of this test binary is left: no QEMU with our run dir in its
    /// command line, no files under the run parent.
    pub async fn assert_no_leaks(&self) {
        let needle = self.run_parent.display().to_string();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let left = qemu_processes_mentioning(&needle);
            if left.is_empty() {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "qemu processes left: {left:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let entries: Vec<_> = std::fs::read_dir(&self.run_parent)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .collect();
        assert!(entries.is_empty(), "left behind in run dir: {entries:?}");
        std::fs::remove_dir(&self.run_parent).unwrap();
    }
}

/// Pids of `qemu-system*` processes whose command line contains `needle`.
pub fn qemu_processes_mentioning(needle: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd);
        if cmd.starts_with("qemu-system") && cmd.contains(needle) {
            // Zombies have an empty cmdline, so anything here is alive.
            out.push(pid);
        }
    }
    out
}

pub fn req(cmd: &str) -> kiln_vm::ExecRequest {
    kiln_vm::ExecRequest {
        command: cmd.into(),
        ..Default::default()
    }
}

/// Host connections come and go (a CLI per command, a server after a restore); each new
/// one must be served. A lost reply shows as a hang here. (A reconnect used to lose the
/// reply to its hello or first request now and then, see `DISCONNECT_GRACE` in the
/// agent; this loop exercises the path but seldom hits that race, which showed when
/// restoring fresh QEMUs over and over.)
pub async fn reconnect_cycles(vm: &mut kiln_vm::Vm, cycles: usize) {
    for i in 0..cycles {
        drop(vm.release_agent());
        // Long enough for the agent to see the port closed and wait for the next host.
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let cycle = async {
            vm.reconnect_agent(std::time::Duration::from_secs(10))
                .await
                .unwrap();
            vm.exec_collect(req(&format!("echo {i}"))).await.unwrap()
        };
        let out = tokio::time::timeout(std::time::Duration::from_secs(30), cycle)
            .await
            .unwrap_or_else(|_| panic!("reconnect {i}: no reply"));
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), i.to_string());
    }
}
