//! The floor: plain QEMU loading the same snapshot bundle with `-incoming`, as
//! `crates/kiln-vm/examples/bench_vm.rs` does, with the machine shape read from the
//! bundle's manifest. No kiln code runs on this path: no overlay created by `qemu-img`
//! (`snapshot=on` instead), no run-dir bookkeeping, no clock sync, no store.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use kiln_vm::qmp::Qmp;
use kiln_vm::{AgentClient, ExecRequest, Manifest, RamMode, Resolved};

/// One bare restore.
#[derive(Debug, Clone, Copy)]
pub struct BareSample {
    /// Launch -> QEMU reports `running`.
    pub running: Duration,
    /// Launch -> `true` ran through the guest agent (connecting to its socket directly).
    pub first_exec: Duration,
    /// A second `true` right after the first (its own round trip): what the first exec
    /// costs beyond it is the guest warming up after the restore (under TCG, an empty
    /// translation cache in the new QEMU).
    pub second_exec: Duration,
}

fn args(bundle: &Path, run: &Path, m: &Manifest) -> Vec<String> {
    let b = bundle.display();
    let d = run.display();
    let s = &m.shape;
    let mut a: Vec<String> = vec![
        "-name".into(),
        "kiln-bench-bare".into(),
        "-accel".into(),
        s.accel.qemu_accel().into(),
        "-machine".into(),
        format!("{},memory-backend=ram0", s.machine),
        "-cpu".into(),
        if s.accel == Resolved::Kvm {
            "host"
        } else {
            "max"
        }
        .into(),
        "-smp".into(),
        s.vcpus.to_string(),
        "-m".into(),
        format!("{}M", s.memory_mib),
        "-object".into(),
        format!(
            "memory-backend-file,id=ram0,size={}M,mem-path={b}/memory,share=off,prealloc=off",
            s.memory_mib
        ),
        "-nodefaults".into(),
        "-no-user-config".into(),
        "-display".into(),
        "none".into(),
        "-no-reboot".into(),
        "-kernel".into(),
        format!("{b}/vmlinuz"),
        "-initrd".into(),
        format!("{b}/initramfs.cpio"),
        "-append".into(),
        "x".into(),
        "-serial".into(),
        "null".into(),
        "-qmp".into(),
        format!("unix:{d}/qmp.sock,server=on,wait=off"),
        "-device".into(),
        "virtio-serial-pci,id=vser0".into(),
        "-chardev".into(),
        format!("socket,id=agent,path={d}/a.sock,server=on,wait=off"),
        "-device".into(),
        format!("virtserialport,chardev=agent,name={}", kiln_vm::AGENT_PORT),
        "-drive".into(),
        format!("file={b}/disk.raw,format=raw,if=none,id=root,snapshot=on"),
        "-device".into(),
        "virtio-blk-pci,drive=root".into(),
    ];
    if s.network {
        a.extend([
            "-netdev".into(),
            "user,id=net0".into(),
            "-device".into(),
            "virtio-net-pci,netdev=net0".into(),
        ]);
    }
    a.extend(["-incoming".into(), "defer".into()]);
    a
}

/// Reads a bundle's manifest; only `file`-mode bundles (every template build's) apply.
pub fn manifest(bundle: &Path) -> anyhow::Result<Manifest> {
    let m: Manifest = serde_json::from_slice(
        &std::fs::read(bundle.join("manifest.json"))
            .with_context(|| format!("reading {}/manifest.json", bundle.display()))?,
    )?;
    if m.ram != RamMode::File {
        bail!("{}: not a file-mode bundle", bundle.display());
    }
    Ok(m)
}

/// Restores `bundle` in a plain QEMU (run files in a temp dir under `parent`), waits for
/// `running`, then runs `true` through the agent socket; QEMU is killed afterwards.
pub async fn restore(bundle: &Path, m: &Manifest, parent: &Path) -> anyhow::Result<BareSample> {
    let dir = tempfile::Builder::new()
        .prefix("b-")
        .tempdir_in(parent)
        .context("bare run dir")?;
    let b = bundle.display();
    let t = Instant::now();
    let mut child = crate::procs::command("qemu-system-x86_64")
        .args(args(bundle, dir.path(), m))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("starting qemu-system-x86_64")?;
    let result = async {
        let mut qmp = Qmp::connect(&dir.path().join("qmp.sock"), Duration::from_secs(10)).await?;
        qmp.migrate_set_capabilities(&[("x-ignore-shared", true)])
            .await?;
        qmp.migrate_incoming(&format!("exec:cat {b}/state")).await?;
        qmp.wait_migration(Duration::from_secs(30)).await?;
        qmp.cont().await?;
        qmp.wait_status("running", Duration::from_secs(10)).await?;
        let running = t.elapsed();
        let agent =
            AgentClient::connect_unix(dir.path().join("a.sock"), Duration::from_secs(10)).await?;
        let out = agent
            .exec_collect(ExecRequest {
                command: "true".into(),
                ..Default::default()
            })
            .await?;
        if out.status.code != Some(0) {
            bail!("`true` in the bare restore ended with {:?}", out.status);
        }
        let first_exec = t.elapsed();
        let t2 = Instant::now();
        agent
            .exec_collect(ExecRequest {
                command: "true".into(),
                ..Default::default()
            })
            .await?;
        let second_exec = t2.elapsed();
        Ok(BareSample {
            running,
            first_exec,
            second_exec,
        })
    }
    .await;
    let _ = child.start_kill();
    let waited = tokio::time::timeout(Duration::from_secs(5), child.wait_with_output()).await;
    match (result, waited) {
        (Ok(s), _) => Ok(s),
        (Err(e), Ok(Ok(out))) => Err(e.context(format!(
            "bare qemu -incoming of {b}; qemu stderr: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))),
        (Err(e), _) => Err(e.context(format!("bare qemu -incoming of {b}"))),
    }
}
