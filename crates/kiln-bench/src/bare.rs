//! The floor: plain QEMU loading the same snapshot bundle with `-incoming`
//! ([`kiln_vm::floor`]: production's command line minus kiln's bookkeeping), timed to
//! `running` and to the first commands through its agent socket.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use kiln_vm::{AgentClient, ExecRequest, Manifest, RamMode};

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
    let floor = kiln_vm::floor::command(bundle, m, dir.path())?;
    let t = Instant::now();
    let mut child = crate::procs::command("qemu-system-x86_64")
        .args(&floor.argv)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("starting qemu-system-x86_64")?;
    let result = async {
        kiln_vm::floor::load(&floor.qmp_socket, bundle).await?;
        let running = t.elapsed();
        let agent = AgentClient::connect_unix(&floor.agent_socket, Duration::from_secs(10)).await?;
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
