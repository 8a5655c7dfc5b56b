//! Provisioning: the host packages, guest kernel and initramfs a VM needs.
//!
//! Layout under the state directory (everything written to a temp name and renamed, so a
//! killed `setup` never leaves a half-written artifact that a later run would trust):
//!
//! ```text
//! <state>/kernel/<ver>/vmlinuz                    the guest kernel (Debian cloud flavour)
//! <state>/kernel/<ver>/modules/<name>.ko          the virtio modules, in MODULES order
//! <state>/kernel/<ver>/initramfs-<agent12>.cpio   agent as /init + modules, per agent build
//! <state>/agent/kiln-agent-<agent12>              an embedded agent, written out (see AgentSource)
//! <state>/accel.json                              cached accelerator verdict
//! <state>/vms/                                    per-VM run dirs (default parent)
//! ```

use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::initramfs::Cpio;
use crate::tool::{which, Tool};

/// The Debian packages the host needs.
pub const HOST_PACKAGES: &[&str] = &["qemu-system-x86", "qemu-utils", "e2fsprogs"];

/// The metapackage that names the current cloud kernel.
pub const KERNEL_METAPACKAGE: &str = "linux-image-cloud-amd64";

/// The modules the initramfs loads, in load order (dependencies first). Debian's cloud
/// kernel builds ext4 in but virtio as modules.
pub const MODULES: &[&str] = &[
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "virtio_blk",
    "virtio_console",
    "failover",
    "net_failover",
    "virtio_net",
];

/// Host tools kiln-vm runs, with the package that provides each.
pub const TOOLS: &[(&str, &str)] = &[
    ("qemu-system-x86_64", "qemu-system-x86"),
    ("qemu-img", "qemu-utils"),
    ("mke2fs", "e2fsprogs"),
    ("debugfs", "e2fsprogs"),
];

/// Paths inside a kiln state directory that kiln-vm uses.
#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    /// Wraps a state directory (not created here).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }
    /// The state directory itself.
    pub fn root(&self) -> &Path {
        &self.root
    }
    /// `<state>/kernel`.
    pub fn kernel_dir(&self) -> PathBuf {
        self.root.join("kernel")
    }
    /// `<state>/vms`: default parent of per-VM run directories.
    pub fn vms_dir(&self) -> PathBuf {
        self.root.join("vms")
    }
    /// `<state>/accel.json`: the cached accelerator verdict.
    pub fn accel_cache(&self) -> PathBuf {
        self.root.join("accel.json")
    }
    /// `<state>/agent`: embedded agents written out, one file per build.
    pub fn agent_dir(&self) -> PathBuf {
        self.root.join("agent")
    }
}

/// Where the guest agent comes from.
#[derive(Clone, Default)]
pub enum AgentSource {
    /// This file (`kiln setup --agent`); `$KILN_AGENT_BIN` does not override it.
    Path(PathBuf),
    /// An agent built into the calling binary (kiln's build embeds one, so an installed
    /// `kiln` needs no file beside it). `$KILN_AGENT_BIN` still wins; otherwise it is
    /// written once to `<state>/agent/kiln-agent-<sha12>`, because QEMU's disk tools and
    /// the initramfs builder take a path, and the sha keys the initramfs like any agent.
    Embedded(&'static [u8]),
    /// [`find_agent_binary`]: `$KILN_AGENT_BIN`, else the workspace build (tests, benches
    /// and examples, which carry no agent of their own).
    #[default]
    Search,
}

impl std::fmt::Debug for AgentSource {
    /// Not the embedded bytes: megabytes in every log line that prints a config.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Path(p) => f.debug_tuple("Path").field(p).finish(),
            Self::Embedded(data) => write!(f, "Embedded({} bytes)", data.len()),
            Self::Search => f.write_str("Search"),
        }
    }
}

impl AgentSource {
    /// The agent's path, writing an embedded agent out first if needed.
    pub fn resolve(&self, state: &StateDir) -> Result<PathBuf> {
        match self {
            Self::Path(p) => Ok(p.clone()),
            Self::Embedded(data) => match agent_from_env()? {
                Some(p) => Ok(p),
                None => write_embedded_agent(state, data),
            },
            Self::Search => find_agent_binary(),
        }
    }
}

/// Writes `data` to `<state>/agent/kiln-agent-<sha12>` (mode 0755) unless that file
/// already holds it, and returns the path. Compared byte for byte rather than trusted by
/// name: a damaged file would otherwise key a new initramfs under a new sha.
fn write_embedded_agent(state: &StateDir, data: &[u8]) -> Result<PathBuf> {
    let sha = hex::encode(Sha256::digest(data));
    let dir = state.agent_dir();
    let path = dir.join(format!("kiln-agent-{}", &sha[..12]));
    if std::fs::read(&path).is_ok_and(|on_disk| on_disk == data) {
        return Ok(path);
    }
    std::fs::create_dir_all(&dir).map_err(Error::io("create", &dir))?;
    write_atomic_mode(&path, data, 0o755)?;
    tracing::info!(path = %path.display(), "embedded agent written");
    Ok(path)
}

/// A provisioned guest kernel with the initramfs for one agent build.
#[derive(Debug, Clone)]
pub struct KernelAssets {
    /// Kernel release, e.g. `6.1.0-56-cloud-amd64`.
    pub version: String,
    /// The kernel image.
    pub vmlinuz: PathBuf,
    /// The initramfs (agent + modules).
    pub initramfs: PathBuf,
}

/// What [`setup`] should do.
#[derive(Debug, Clone)]
pub struct SetupOptions {
    /// Where state lives.
    pub state: StateDir,
    /// The agent to put in the initramfs.
    pub agent: AgentSource,
    /// Install missing host packages with apt-get (needs root).
    pub install_packages: bool,
}

/// What [`setup`] did.
#[derive(Debug, Clone)]
pub struct SetupReport {
    /// Packages installed by this run (empty when all were present).
    pub installed: Vec<String>,
    /// Whether the kernel package was downloaded by this run.
    pub kernel_downloaded: bool,
    /// Whether the initramfs was (re)built by this run.
    pub initramfs_built: bool,
    /// The agent binary used.
    pub agent_bin: PathBuf,
    /// The resulting assets.
    pub kernel: KernelAssets,
}

/// Makes the host ready to run VMs. Idempotent: every step checks before acting.
///
/// Blocking (runs apt-get); call it from `spawn_blocking` in async code.
pub fn setup(opts: &SetupOptions) -> Result<SetupReport> {
    let installed = if opts.install_packages {
        install_host_packages()?
    } else {
        Vec::new()
    };
    let agent_bin = opts.agent.resolve(&opts.state)?;
    check_static(&agent_bin)?;
    let (version, kernel_downloaded) = ensure_kernel(&opts.state)?;
    let (initramfs, initramfs_built) = ensure_initramfs(&opts.state, &version, &agent_bin)?;
    let dir = opts.state.kernel_dir().join(&version);
    Ok(SetupReport {
        installed,
        kernel_downloaded,
        initramfs_built,
        agent_bin,
        kernel: KernelAssets {
            version,
            vmlinuz: dir.join("vmlinuz"),
            initramfs,
        },
    })
}

/// Finds already-provisioned assets for this agent without changing anything.
///
/// Picks the newest provisioned kernel that has an initramfs for this agent binary.
pub fn locate(state: &StateDir, agent: &Path) -> Result<KernelAssets> {
    let sha = file_sha256(agent)?;
    let name = format!("initramfs-{}.cpio", &sha[..12]);
    let mut versions = provisioned_kernels(state);
    versions.sort();
    for v in versions.iter().rev() {
        let dir = state.kernel_dir().join(v);
        if dir.join(&name).is_file() {
            return Ok(KernelAssets {
                version: v.clone(),
                vmlinuz: dir.join("vmlinuz"),
                initramfs: dir.join(&name),
            });
        }
    }
    Err(Error::NotProvisioned(if versions.is_empty() {
        format!("no guest kernel under {}", state.kernel_dir().display())
    } else {
        format!(
            "no initramfs for agent {} ({})",
            agent.display(),
            &sha[..12]
        )
    }))
}

/// Like [`locate`], but builds the initramfs for this agent if the kernel is provisioned
/// and only the initramfs is missing (a rebuilt agent): local, no network, under a second.
pub fn prepare(state: &StateDir, agent: &Path) -> Result<KernelAssets> {
    if let Ok(a) = locate(state, agent) {
        return Ok(a);
    }
    check_static(agent)?;
    let mut versions = provisioned_kernels(state);
    versions.sort();
    let version = versions.pop().ok_or_else(|| {
        Error::NotProvisioned(format!(
            "no guest kernel under {}",
            state.kernel_dir().display()
        ))
    })?;
    let (initramfs, _) = ensure_initramfs(state, &version, agent)?;
    let vmlinuz = state.kernel_dir().join(&version).join("vmlinuz");
    Ok(KernelAssets {
        version,
        vmlinuz,
        initramfs,
    })
}

/// Kernel versions fully unpacked under `<state>/kernel`.
pub fn provisioned_kernels(state: &StateDir) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(state.kernel_dir()) else {
        return Vec::new();
    };
    rd.filter_map(|e| e.ok())
        .filter(|e| e.path().join("vmlinuz").is_file())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| !n.starts_with('.'))
        .collect()
}

fn package_installed(pkg: &str) -> bool {
    Tool::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .run()
        .map(|out| String::from_utf8_lossy(&out).contains("install ok installed"))
        .unwrap_or(false)
}

/// Installs the missing [`HOST_PACKAGES`]; returns what it installed.
///
/// Installing one package can remove another: a backported `qemu-utils` conflicts with
/// Debian's `qemu-system-x86`, and apt resolves that by removing it. So this checks again
/// after installing, and installs what went missing (now in the matching version).
pub fn install_host_packages() -> Result<Vec<String>> {
    let mut installed: Vec<String> = Vec::new();
    for pass in 0..3 {
        let missing: Vec<String> = HOST_PACKAGES
            .iter()
            .filter(|p| !package_installed(p))
            .map(|p| p.to_string())
            .collect();
        if missing.is_empty() {
            return Ok(installed);
        }
        if pass == 2 {
            return Err(Error::NotProvisioned(format!(
                "host packages still missing after installing them: {}",
                missing.join(" ")
            )));
        }
        tracing::info!(packages = ?missing, "installing host packages");
        let install = || {
            Tool::new("apt-get")
                .env("DEBIAN_FRONTEND", "noninteractive")
                .args(["install", "-y", "-q", "--no-install-recommends"])
                .args(&missing)
                .run()
        };
        if install().is_err() {
            // Stale or absent package lists are the usual cause: refresh once and retry.
            Tool::new("apt-get").args(["update", "-q"]).run()?;
            install()?;
        }
        installed.extend(missing);
    }
    Ok(installed)
}

/// Resolves `linux-image-cloud-amd64` to the versioned package's kernel release.
fn resolve_kernel_version() -> Result<String> {
    let out = Tool::new("apt-cache")
        .args(["depends", KERNEL_METAPACKAGE])
        .run()?;
    let text = String::from_utf8_lossy(&out);
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("Depends:"))
        .map(str::trim)
        .find_map(|d| {
            d.strip_prefix("linux-image-")
                .filter(|v| v.ends_with("-cloud-amd64"))
        })
        .map(str::to_owned)
        .ok_or_else(|| {
            Error::NotProvisioned(format!("cannot resolve {KERNEL_METAPACKAGE}: {text}"))
        })
}

/// Makes sure `<state>/kernel/<ver>/` holds vmlinuz and the modules; returns the version
/// and whether it had to download.
fn ensure_kernel(state: &StateDir) -> Result<(String, bool)> {
    let version = match resolve_kernel_version() {
        Ok(v) => v,
        Err(e) => {
            // Offline with a kernel already provisioned: keep using it.
            let mut have = provisioned_kernels(state);
            have.sort();
            match have.pop() {
                Some(v) => {
                    tracing::warn!(error = %e, version = %v, "cannot resolve kernel; using provisioned");
                    v
                }
                None => return Err(e),
            }
        }
    };
    let dir = state.kernel_dir().join(&version);
    if dir.join("vmlinuz").is_file() && MODULES.iter().all(|m| module_path(&dir, m).is_file()) {
        return Ok((version, false));
    }
    let kernel_dir = state.kernel_dir();
    std::fs::create_dir_all(&kernel_dir).map_err(Error::io("create", &kernel_dir))?;
    let work = tempfile::Builder::new()
        .prefix(".download-")
        .tempdir_in(&kernel_dir)
        .map_err(Error::io("create temp dir in", &kernel_dir))?;
    let pkg = format!("linux-image-{version}");
    let download = || {
        Tool::new("apt-get")
            .args(["download", "-q", &pkg])
            .run_in(Some(work.path()))
    };
    if download().is_err() {
        Tool::new("apt-get").args(["update", "-q"]).run()?;
        download()?;
    }
    let deb = std::fs::read_dir(work.path())
        .map_err(Error::io("read", work.path()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .ok_or_else(|| Error::NotProvisioned(format!("apt-get download {pkg} produced no .deb")))?;
    let root = work.path().join("root");
    Tool::new("dpkg-deb").arg("-x").arg(&deb).arg(&root).run()?;

    let staged = work.path().join("staged");
    let staged_mods = staged.join("modules");
    std::fs::create_dir_all(&staged_mods).map_err(Error::io("create", &staged_mods))?;
    let vmlinuz = root.join(format!("boot/vmlinuz-{version}"));
    copy(&vmlinuz, &staged.join("vmlinuz"))?;
    let mut found = std::collections::HashMap::new();
    for base in [
        root.join("lib/modules").join(&version),
        root.join("usr/lib/modules").join(&version),
    ] {
        find_modules(&base, &mut found);
    }
    for m in MODULES {
        let src = found
            .get(*m)
            .ok_or_else(|| Error::NotProvisioned(format!("module {m}.ko not in {pkg}")))?;
        copy(src, &module_path(&staged, m))?;
    }
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(Error::io("remove", &dir))?;
    }
    std::fs::rename(&staged, &dir).map_err(Error::io("rename to", &dir))?;
    tracing::info!(%version, "guest kernel provisioned");
    Ok((version, true))
}

fn module_path(kernel_dir: &Path, name: &str) -> PathBuf {
    kernel_dir.join("modules").join(format!("{name}.ko"))
}

fn find_modules(dir: &Path, found: &mut std::collections::HashMap<String, PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            find_modules(&p, found);
        } else if let Some(stem) = p
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".ko"))
        {
            found.entry(stem.replace('-', "_")).or_insert(p);
        }
    }
}

fn copy(from: &Path, to: &Path) -> Result<()> {
    std::fs::copy(from, to).map_err(Error::io("copy", from))?;
    Ok(())
}

/// Builds `initramfs-<agent sha12>.cpio` for `version` unless it exists.
fn ensure_initramfs(state: &StateDir, version: &str, agent: &Path) -> Result<(PathBuf, bool)> {
    let dir = state.kernel_dir().join(version);
    let sha = file_sha256(agent)?;
    let out = dir.join(format!("initramfs-{}.cpio", &sha[..12]));
    if out.is_file() {
        return Ok((out, false));
    }
    let agent_bytes = std::fs::read(agent).map_err(Error::io("read", agent))?;
    let mut c = Cpio::new();
    for d in [
        "dev",
        "proc",
        "sys",
        "run",
        "tmp",
        "mnt",
        "lib",
        "lib/modules",
        "lib/modules/kiln",
        "kiln",
    ] {
        c.dir(d);
    }
    // The kernel opens /dev/console for init's stdio before anything is mounted.
    c.char_dev("dev/console", 0o600, 5, 1);
    c.char_dev("dev/null", 0o666, 1, 3);
    c.file("init", 0o755, &agent_bytes);
    let mut list = String::new();
    for m in MODULES {
        let p = module_path(&dir, m);
        let data = std::fs::read(&p).map_err(Error::io("read", &p))?;
        c.file(&format!("lib/modules/kiln/{m}.ko"), 0o644, &data);
        list.push_str(&format!("{m}.ko\n"));
    }
    c.file("kiln/modules", 0o644, list.as_bytes());
    write_atomic(&out, &c.finish())?;
    tracing::info!(path = %out.display(), "initramfs built");
    Ok((out, true))
}

/// Writes `data` to `path` via a temp file in the same directory, fsync and rename.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    write_atomic_mode(path, data, 0o600)
}

/// [`write_atomic`] with the file's mode, set on the temp file (no umask applies), so the
/// renamed file never shows another one.
fn write_atomic_mode(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(Error::io("create temp in", dir))?;
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(Error::io("chmod", tmp.path().to_owned()))?;
    tmp.write_all(data)
        .map_err(Error::io("write", tmp.path().to_owned()))?;
    tmp.as_file()
        .sync_all()
        .map_err(Error::io("sync", tmp.path().to_owned()))?;
    tmp.persist(path).map_err(|e| Error::Io {
        what: "rename to",
        path: path.to_owned(),
        source: e.error,
    })?;
    Ok(())
}

/// Hex sha256 of a whole file (the agent binary; version 1 snapshot manifests).
pub fn file_sha256(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(Error::io("open", path))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = std::io::Read::read(&mut f, &mut buf).map_err(Error::io("read", path))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// `$KILN_AGENT_BIN`, when set: an explicit choice, so a path that is not a file is an
/// error rather than a reason to look elsewhere.
fn agent_from_env() -> Result<Option<PathBuf>> {
    let Some(p) = std::env::var_os("KILN_AGENT_BIN").filter(|v| !v.is_empty()) else {
        return Ok(None);
    };
    let p = PathBuf::from(p);
    if !p.is_file() {
        return Err(Error::AgentBinary(format!(
            "KILN_AGENT_BIN={} does not exist",
            p.display()
        )));
    }
    Ok(Some(p))
}

/// The agent for a program that carries none ([`AgentSource::Search`]), in order:
///
/// 1. `$KILN_AGENT_BIN` (explicit always wins; an unusable value is an error, not a fallback);
/// 2. `target/x86_64-unknown-linux-gnu/release/kiln-agent` in the workspace: searched up
///    from the current executable (tests and `cargo run` live under `target/`), then from
///    this crate's source directory (compile-time), so it works from any cwd.
pub fn find_agent_binary() -> Result<PathBuf> {
    if let Some(p) = agent_from_env()? {
        return Ok(p);
    }
    const REL: &str = "target/x86_64-unknown-linux-gnu/release/kiln-agent";
    let exe = std::env::current_exe().ok();
    let roots = exe
        .iter()
        .flat_map(|e| {
            e.ancestors()
                .skip(1)
                .map(Path::to_path_buf)
                .collect::<Vec<_>>()
        })
        .chain(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .ancestors()
                .map(Path::to_path_buf),
        );
    for root in roots {
        let cand = root.join(REL);
        if cand.is_file() {
            return Ok(cand);
        }
    }
    Err(Error::AgentBinary(format!(
        "kiln-agent not found: set KILN_AGENT_BIN or run scripts/build-agent.sh (builds {REL})"
    )))
}

/// Refuses a dynamically linked agent: it runs as /init with no libc in the initramfs.
fn check_static(agent: &Path) -> Result<()> {
    match is_static_elf(agent) {
        Ok(true) => Ok(()),
        Ok(false) => Err(Error::AgentBinary(format!(
            "{} is not a static executable",
            agent.display()
        ))),
        Err(e) => Err(Error::AgentBinary(format!("{}: {e}", agent.display()))),
    }
}

/// Whether the file at `path` is an ELF64 executable with no `PT_INTERP` (i.e. needs no
/// dynamic loader).
pub fn is_static_elf(path: &Path) -> std::io::Result<bool> {
    crate::elf::is_static(&std::fs::read(path)?)
}

/// One line of `kiln doctor`.
#[derive(Debug, Clone)]
pub struct Check {
    /// What was checked.
    pub what: String,
    /// Whether it is fine.
    pub ok: bool,
    /// Detail (path, version, reason, remedy).
    pub detail: String,
}

/// Everything `kiln doctor` reports.
#[derive(Debug, Clone)]
pub struct DoctorReport {
    /// One entry per check.
    pub checks: Vec<Check>,
    /// The accelerator that VMs will use, and why.
    pub accel: crate::accel::AccelChoice,
}

impl DoctorReport {
    /// Whether every check passed.
    pub fn ok(&self) -> bool {
        self.checks.iter().all(|c| c.ok)
    }
}

/// Reports what is present and which accelerator will be used (may run a short probe boot
/// under KVM the first time; the verdict is cached). An embedded agent is written out,
/// as any command that boots a VM would.
pub async fn doctor(state: &StateDir, agent: &AgentSource) -> DoctorReport {
    let mut checks = Vec::new();
    for (tool, pkg) in TOOLS {
        let found = which(tool);
        checks.push(Check {
            what: format!("tool {tool}"),
            ok: found.is_some(),
            detail: match found {
                Some(p) => p.display().to_string(),
                None => format!("missing (package {pkg}; run `kiln setup`)"),
            },
        });
    }
    let agent = agent.resolve(state);
    checks.push(match &agent {
        Ok(p) => match check_static(p) {
            Ok(()) => Check {
                what: "agent binary".into(),
                ok: true,
                detail: p.display().to_string(),
            },
            Err(e) => Check {
                what: "agent binary".into(),
                ok: false,
                detail: e.to_string(),
            },
        },
        Err(e) => Check {
            what: "agent binary".into(),
            ok: false,
            // With the cause: writing out an embedded agent fails on I/O.
            detail: crate::error_chain(e),
        },
    });
    let kernels = provisioned_kernels(state);
    checks.push(Check {
        what: "guest kernel".into(),
        ok: !kernels.is_empty(),
        detail: if kernels.is_empty() {
            format!(
                "none under {} (run `kiln setup`)",
                state.kernel_dir().display()
            )
        } else {
            kernels.join(", ")
        },
    });
    let assets = agent.as_ref().ok().map(|p| locate(state, p));
    checks.push(match &assets {
        Some(Ok(a)) => Check {
            what: "initramfs".into(),
            ok: true,
            detail: a.initramfs.display().to_string(),
        },
        Some(Err(e)) => Check {
            what: "initramfs".into(),
            ok: false,
            detail: e.to_string(),
        },
        None => Check {
            what: "initramfs".into(),
            ok: false,
            detail: "unknown: it is built for the agent binary, which failed above".into(),
        },
    });
    let assets = assets.and_then(Result::ok);
    let accel = crate::accel::choose(crate::accel::Accel::from_env(), state, assets.as_ref()).await;
    DoctorReport { checks, accel }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_detection() {
        // The test binary itself is dynamically linked (PT_INTERP present).
        let exe = std::env::current_exe().unwrap();
        assert!(!is_static_elf(&exe).unwrap());
        let dir = tempfile::tempdir().unwrap();
        let not_elf = dir.path().join("x");
        std::fs::write(&not_elf, b"#!/bin/sh\n").unwrap();
        assert!(is_static_elf(&not_elf).is_err());
    }

    #[test]
    fn embedded_agent_is_written_once_per_build_and_repaired() {
        use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path());
        static ONE: &[u8] = b"agent build one";
        static TWO: &[u8] = b"agent build two";

        let one = write_embedded_agent(&state, ONE).unwrap();
        assert_eq!(one.parent().unwrap(), state.agent_dir());
        assert_eq!(std::fs::read(&one).unwrap(), ONE);
        let meta = std::fs::metadata(&one).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o755);
        // Present and intact: left alone (same inode, not rewritten).
        assert_eq!(write_embedded_agent(&state, ONE).unwrap(), one);
        assert_eq!(std::fs::metadata(&one).unwrap().ino(), meta.ino());
        // Damaged: written again under the same name.
        std::fs::write(&one, b"agent build on").unwrap();
        assert_eq!(write_embedded_agent(&state, ONE).unwrap(), one);
        assert_eq!(std::fs::read(&one).unwrap(), ONE);
        // Another build gets its own file, so its initramfs gets its own key.
        let two = write_embedded_agent(&state, TWO).unwrap();
        assert_ne!(two, one);
        assert_eq!(std::fs::read(&two).unwrap(), TWO);
        assert_eq!(std::fs::read(&one).unwrap(), ONE);
    }

    #[test]
    fn agent_source_debug_leaves_the_bytes_out() {
        static AGENT: &[u8] = &[0xAB; 4096];
        assert_eq!(
            format!("{:?}", AgentSource::Embedded(AGENT)),
            "Embedded(4096 bytes)"
        );
    }

    #[test]
    fn write_atomic_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
