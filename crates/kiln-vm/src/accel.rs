//! Accelerator choice: KVM only where a stock guest really boots, else TCG.
//!
//! `/dev/kvm` existing is not enough: on PVM hosts (`kvm_pvm`, nested paravirtualisation)
//! a stock guest kernel hangs. So `Auto` refuses KVM when `kvm_pvm` is loaded and otherwise
//! runs a short probe boot of the guest kernel; the verdict is cached in
//! `<state>/accel.json`, keyed by host kernel release and guest kernel version.

use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::provision::{KernelAssets, StateDir};

/// What the caller asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Accel {
    /// KVM if a guest really boots with it, else TCG.
    #[default]
    Auto,
    /// Force KVM.
    Kvm,
    /// Force TCG (software emulation).
    Tcg,
}

impl Accel {
    /// `KILN_ACCEL=kvm|tcg|auto` (anything else, or unset: `Auto`).
    pub fn from_env() -> Self {
        match std::env::var("KILN_ACCEL")
            .unwrap_or_default()
            .to_ascii_lowercase()
            .as_str()
        {
            "kvm" => Self::Kvm,
            "tcg" => Self::Tcg,
            _ => Self::Auto,
        }
    }
}

/// A concrete accelerator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Resolved {
    /// Hardware virtualisation.
    Kvm,
    /// Software emulation.
    Tcg,
}

impl Resolved {
    /// The `-accel` value.
    pub fn qemu_accel(self) -> &'static str {
        match self {
            // One translation thread per vCPU: with 2+ vCPUs TCG is otherwise serialised.
            Self::Tcg => "tcg,thread=multi",
            Self::Kvm => "kvm",
        }
    }

    /// The machine type: `microvm` stalls in timer calibration under TCG, so TCG gets `pc`;
    /// KVM gets `microvm` with a PCIe host bridge so the same virtio-pci devices work.
    pub fn machine(self) -> &'static str {
        match self {
            Self::Tcg => "pc",
            Self::Kvm => "microvm,pcie=on,rtc=on",
        }
    }

    /// A sensible default boot bound: TCG boots take several seconds on a loaded host.
    pub fn default_boot_timeout(self) -> Duration {
        match self {
            Self::Tcg => Duration::from_secs(60),
            Self::Kvm => Duration::from_secs(20),
        }
    }
}

/// The accelerator VMs will use, and why.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AccelChoice {
    /// The verdict.
    pub accel: Resolved,
    /// Human-readable reason (for `kiln doctor` and logs).
    pub reason: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct Cached {
    key: String,
    kvm_boots: bool,
    reason: String,
}

fn host_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned()
}

/// Resolves `requested` to a concrete accelerator.
///
/// `assets` is the guest kernel used for the probe boot; without it `Auto` cannot probe
/// and picks TCG.
pub async fn choose(
    requested: Accel,
    state: &StateDir,
    assets: Option<&KernelAssets>,
) -> AccelChoice {
    match requested {
        Accel::Kvm => {
            return AccelChoice {
                accel: Resolved::Kvm,
                reason: "forced (KILN_ACCEL=kvm)".into(),
            }
        }
        Accel::Tcg => {
            return AccelChoice {
                accel: Resolved::Tcg,
                reason: "forced (KILN_ACCEL=tcg)".into(),
            }
        }
        Accel::Auto => {}
    }
    let tcg = |reason: String| AccelChoice {
        accel: Resolved::Tcg,
        reason,
    };
    if !Path::new("/dev/kvm").exists() {
        return tcg("/dev/kvm absent".into());
    }
    if Path::new("/sys/module/kvm_pvm").exists() {
        return tcg("host KVM is kvm_pvm (PVM): stock guest kernels hang under it".into());
    }
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        return tcg("/dev/kvm not accessible".into());
    }
    let Some(assets) = assets else {
        return tcg("no guest kernel to probe KVM with (run `kiln setup`)".into());
    };
    let key = format!("{} / {}", host_release(), assets.version);
    let cache = state.accel_cache();
    if let Ok(text) = std::fs::read_to_string(&cache) {
        if let Ok(c) = serde_json::from_str::<Cached>(&text) {
            if c.key == key {
                let accel = if c.kvm_boots {
                    Resolved::Kvm
                } else {
                    Resolved::Tcg
                };
                return AccelChoice {
                    accel,
                    reason: format!("{} (cached)", c.reason),
                };
            }
        }
    }
    let (kvm_boots, reason) = match probe_kvm(&assets.vmlinuz).await {
        Ok(()) => (true, "KVM probe boot reached the guest kernel".to_owned()),
        Err(why) => (false, format!("KVM probe boot failed: {why}")),
    };
    let c = Cached {
        key,
        kvm_boots,
        reason: reason.clone(),
    };
    if let Ok(json) = serde_json::to_vec_pretty(&c) {
        let _ = std::fs::create_dir_all(state.root());
        let _ = crate::provision::write_atomic(&cache, &json);
    }
    AccelChoice {
        accel: if kvm_boots {
            Resolved::Kvm
        } else {
            Resolved::Tcg
        },
        reason,
    }
}

/// Boots the bare kernel (no initramfs, no root) under KVM: a working guest prints its
/// banner and panics on the missing root within a second or two; a broken one prints
/// nothing.
async fn probe_kvm(vmlinuz: &Path) -> Result<(), String> {
    let mut cmd = tokio::process::Command::new("qemu-system-x86_64");
    cmd.args([
        "-accel",
        "kvm",
        "-machine",
        Resolved::Kvm.machine(),
        "-m",
        "256",
        "-nodefaults",
    ])
    .args([
        "-display",
        "none",
        "-serial",
        "stdio",
        "-no-reboot",
        "-kernel",
    ])
    .arg(vmlinuz)
    .args(["-append", "console=ttyS0 panic=-1"])
    .stdin(std::process::Stdio::null())
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped())
    .kill_on_drop(true);
    let child = cmd.spawn().map_err(|e| format!("cannot start qemu: {e}"))?;
    match tokio::time::timeout(Duration::from_secs(20), child.wait_with_output()).await {
        Err(_) => Err("no guest output within 20 s".into()),
        Ok(Err(e)) => Err(e.to_string()),
        Ok(Ok(out)) => {
            let text = String::from_utf8_lossy(&out.stdout);
            if text.contains("Linux version")
                && (text.contains("Kernel panic") || text.contains("VFS"))
            {
                Ok(())
            } else {
                Err(format!(
                    "unexpected output: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ))
            }
        }
    }
}
