//! The jailer: every process kiln starts for a VM (QEMU and its egress proxy) runs walled
//! off from the host and from every other VM, in the spirit of Firecracker's jailer.
//!
//! Each process gets, before it runs a single instruction of its own:
//!
//! - **its own user**: an unprivileged uid leased for the VM ([`ids`]: a range of ids, one
//!   pair per VM, held by a lock file), no supplementary groups but the VM group where a
//!   file it maps needs it, and `PR_SET_NO_NEW_PRIVS`; so it holds no capability, cannot
//!   signal or trace another VM's processes and cannot gain privileges by exec;
//! - **its own mount namespace** ([`mounts`]) whose root is an empty tmpfs holding only
//!   what it needs, bound at the same paths as on the host: the system's `/usr` read-only,
//!   its run directory, the files it maps (kernel, initramfs, disk layers, a bundle's
//!   memory), `/dev/null`, `/dev/urandom`, `/dev/kvm` where KVM is used, and a `/proc`
//!   that shows its own processes only. The state directory and other VMs' files are not
//!   there at all;
//! - **its own network namespace** for QEMU ([`netns`]): nothing in it but loopback and,
//!   when the VM has egress, the egress proxy's listening socket, so a guest (or a QEMU
//!   taken over by one) reaches nothing but the proxy;
//! - new IPC and UTS namespaces, a session of its own, and resource limits: a cgroup
//!   ([`cgroup`]: cpu, memory for the shape plus overhead, pids, io; v2, or v1 where that is
//!   all the host has) and rlimits (no core dumps, bounded descriptors and threads);
//! - for QEMU, its own seccomp policy: `-sandbox on` with spawning, privilege elevation,
//!   resource control and obsolete calls denied (see `QemuArgs`).
//!
//! The egress proxy runs with the host's network (it connects upstream for the guest)
//! and reads the sandbox's files through its owner ([`kiln_net::broker`]), so its mount
//! namespace holds no state at all.
//!
//! What stays root: the kiln process itself (the server or a CLI keeper), which creates
//! the namespaces, cgroups and run directories, sets file ownership, and serves the
//! proxy's files. See `docs/security.md`.
//!
//! [`JailMode::Off`] (`KILN_JAIL=off`) runs the processes as the caller with none of this:
//! for development on a host that cannot jail, and to measure what jailing costs.
//!
//! kiln not running as root (a developer running the CLI as themselves) cannot give a
//! process another uid, a mount namespace or a cgroup. It then jails as far as an
//! unprivileged process can ([`Level::Unprivileged`], said once in a log line): QEMU keeps
//! its seccomp policy, `PR_SET_NO_NEW_PRIVS`, its own session and no core dumps, and its
//! network namespace (made inside a user namespace, see [`netns`]), so the guest still
//! reaches nothing but its proxy.

pub mod cgroup;
pub mod ids;
pub mod mounts;
pub mod netns;
mod spawn;

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

pub use cgroup::{Cgroup, CgroupSupport, Limits};
pub use ids::{IdRange, Lease};
pub use mounts::MountPlan;
pub use netns::NetNs;
pub use spawn::{spawn, Jailed, ProcessSpec};

/// Whether kiln jails the processes of its VMs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JailMode {
    /// Jailed (the default; needs root).
    On,
    /// Not jailed: the processes run as kiln does (`KILN_JAIL=off`).
    Off,
}

/// How far this process can jail a VM's processes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// Everything the module describes (kiln is root).
    Full,
    /// kiln is not root: no uid, mount namespace or cgroup of their own; seccomp, no new
    /// privileges, rlimits and the network namespace (in a user namespace) still apply.
    Unprivileged,
    /// Not jailed ([`JailMode::Off`]).
    Off,
}

/// Why a process could not be jailed (or started).
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    /// Every id pair of the range is leased.
    #[error("no free id pair in KILN_JAIL_IDS {0} (every one is leased to a running VM)")]
    NoSlot(IdRange),
    /// A setting is malformed.
    #[error("{name}: {reason}")]
    Config {
        /// The variable.
        name: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// A file operation in preparing the jail failed.
    #[error("{what} {}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// On which path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The process failed inside the jail's setup, before it ran (`step`, as the child
    /// reported it on its stderr).
    #[error("jail setup failed at: {step}")]
    Setup {
        /// The step that failed, e.g. `bind /usr`.
        step: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The process could not be started.
    #[error("cannot start {program}")]
    Spawn {
        /// The program.
        program: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

impl JailError {
    pub(crate) fn io(
        what: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| Self::Io { what, path, source }
    }
}

/// How this host jails VM processes: the settings, and what the host was found to offer.
/// Cheap to clone.
#[derive(Debug, Clone)]
pub struct Jail(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    mode: JailMode,
    ids: IdRange,
    /// Slot locks and the staging root live here (`KILN_JAIL_DIR`, `/run/kiln/jail`).
    dir: PathBuf,
    /// Where per-process cgroups go, below each hierarchy's root (`KILN_CGROUP_PARENT`).
    cgroup_parent: String,
    /// The `io.max` limits of a VM's disk I/O, without the device (`KILN_VM_IO_MAX`).
    io_max: cgroup::IoMax,
    /// Found on first use: the cgroup hierarchy, or why there is none.
    cgroups: OnceLock<CgroupSupport>,
}

impl Jail {
    /// A jail with these settings.
    pub fn new(
        mode: JailMode,
        ids: IdRange,
        dir: PathBuf,
        cgroup_parent: String,
        io_max: cgroup::IoMax,
    ) -> Self {
        Self(Arc::new(Inner {
            mode,
            ids,
            dir,
            cgroup_parent,
            io_max,
            cgroups: OnceLock::new(),
        }))
    }

    /// The settings from the environment (`KILN_JAIL`, `KILN_JAIL_IDS`, `KILN_JAIL_DIR`,
    /// `KILN_CGROUP_PARENT`, `KILN_VM_IO_MAX`), read once per process; a malformed value
    /// is reported when a VM starts ([`Jail::check`]).
    pub fn from_env() -> Result<Self, JailError> {
        static ENV: OnceLock<Result<Jail, String>> = OnceLock::new();
        let parsed = ENV
            .get_or_init(|| Self::parse_env(|k| std::env::var(k).ok()).map_err(|e| e.to_string()));
        parsed.clone().map_err(|reason| JailError::Config {
            name: "KILN_JAIL*",
            reason,
        })
    }

    fn parse_env(var: impl Fn(&str) -> Option<String>) -> Result<Self, JailError> {
        let set = |k: &str| var(k).filter(|v| !v.trim().is_empty());
        let mode = match set("KILN_JAIL").as_deref().map(str::trim) {
            None | Some("on") | Some("1") | Some("true") => JailMode::On,
            Some("off") | Some("0") | Some("false") => JailMode::Off,
            Some(other) => {
                return Err(JailError::Config {
                    name: "KILN_JAIL",
                    reason: format!("{other:?}: expected on or off"),
                })
            }
        };
        let ids = match set("KILN_JAIL_IDS") {
            Some(v) => v.parse().map_err(|reason| JailError::Config {
                name: "KILN_JAIL_IDS",
                reason,
            })?,
            None => IdRange::DEFAULT,
        };
        let io_max = match set("KILN_VM_IO_MAX") {
            Some(v) => v.parse().map_err(|reason| JailError::Config {
                name: "KILN_VM_IO_MAX",
                reason,
            })?,
            None => cgroup::IoMax::default(),
        };
        let parent = set("KILN_CGROUP_PARENT").unwrap_or_else(|| "kiln".into());
        if parent
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..")
        {
            return Err(JailError::Config {
                name: "KILN_CGROUP_PARENT",
                reason: format!("{parent:?}: a relative cgroup path like kiln or kiln.slice/vms"),
            });
        }
        Ok(Self::new(
            mode,
            ids,
            set("KILN_JAIL_DIR").map_or_else(|| PathBuf::from("/run/kiln/jail"), PathBuf::from),
            parent,
            io_max,
        ))
    }

    /// Not jailed (for tools and benchmarks that compare).
    pub fn off() -> Self {
        Self::new(
            JailMode::Off,
            IdRange::DEFAULT,
            PathBuf::from("/run/kiln/jail"),
            "kiln".into(),
            cgroup::IoMax::default(),
        )
    }

    /// Whether processes are jailed.
    pub fn mode(&self) -> JailMode {
        self.0.mode
    }

    /// The id range VMs lease from.
    pub fn ids(&self) -> IdRange {
        self.0.ids
    }

    /// The group of every jailed QEMU: files a VM maps from outside its run directory
    /// (a bundle's memory, which QEMU opens read-write even to map it privately) are
    /// given to it.
    pub fn vm_group(&self) -> u32 {
        self.0.ids.group()
    }

    /// What the host offers for cgroups (found once).
    pub fn cgroups(&self) -> &CgroupSupport {
        self.0.cgroups.get_or_init(|| {
            let support = CgroupSupport::detect(&self.0.cgroup_parent);
            // What a stopped owner's VMs left (their uid's slot is no longer leased).
            let (ids, slots) = (self.0.ids, self.0.dir.join("slots"));
            support.sweep(|uid| ids.slot_of(uid).is_some_and(|n| ids::is_free(&slots, n)));
            if let CgroupSupport::None(why) = &support {
                tracing::warn!(
                    reason = %why,
                    "VM processes run without cgroup limits (rlimits still apply); see `kiln doctor`"
                );
            }
            support
        })
    }

    /// How far VM processes are jailed here: fully as root; as far as an unprivileged
    /// process can otherwise (logged once per process, with what is left out).
    pub fn level(&self) -> Level {
        static WARNED: std::sync::Once = std::sync::Once::new();
        if self.0.mode == JailMode::Off {
            return Level::Off;
        }
        let uid = nix::unistd::geteuid().as_raw();
        if uid == 0 {
            return Level::Full;
        }
        WARNED.call_once(|| {
            tracing::warn!(
                uid,
                "kiln is not root: VM processes run as uid {uid}, without a uid, mount \
                 namespace or cgroup of their own; they keep QEMU's seccomp policy, \
                 PR_SET_NO_NEW_PRIVS, rlimits and a network namespace of their own (run kiln \
                 as root for the whole jail, see docs/security.md)"
            );
        });
        Level::Unprivileged
    }

    /// Leases an id pair for a VM.
    pub fn lease(&self) -> Result<Lease, JailError> {
        ids::lease(&self.0.dir.join("slots"), self.0.ids)
    }

    /// The empty directory each jail's root is mounted on (in its own namespace).
    pub(crate) fn staging_root(&self) -> Result<PathBuf, JailError> {
        let root = self.0.dir.join("root");
        std::fs::create_dir_all(&root).map_err(JailError::io("creating", &root))?;
        Ok(root)
    }

    /// The limits of a VM's disk I/O (the device is the one `dir` is on).
    pub(crate) fn io_max(&self) -> cgroup::IoMax {
        self.0.io_max
    }
}

/// Makes `path` (a regular file, not followed if a link) readable, or readable and
/// writable, by `gid`, keeping its owner: a file a jailed VM maps from outside its run
/// directory. Nothing changes when the file already allows it.
pub(crate) fn grant_group(path: &Path, gid: u32, write: bool) -> Result<(), JailError> {
    use std::os::unix::fs::MetadataExt as _;
    let meta = std::fs::symlink_metadata(path).map_err(JailError::io("inspecting", path))?;
    if !meta.file_type().is_file() {
        return Err(JailError::Io {
            what: "granting access to (not a regular file)",
            path: path.to_owned(),
            source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
        });
    }
    let need = if write { 0o060 } else { 0o040 };
    let other = if write { 0o006 } else { 0o004 };
    let mode = meta.mode() & 0o7777;
    if mode & other == other || (meta.gid() == gid && mode & need == need) {
        return Ok(());
    }
    nix::unistd::fchownat(
        None,
        path,
        None,
        Some(nix::unistd::Gid::from_raw(gid)),
        nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .map_err(|e| JailError::io("changing the group of", path)(e.into()))?;
    std::fs::set_permissions(
        path,
        std::os::unix::fs::PermissionsExt::from_mode(mode | need),
    )
    .map_err(JailError::io("changing the mode of", path))
}

/// Gives `path` (not followed if a link) to `uid:gid`: what a jailed process creates and
/// writes in.
pub(crate) fn give(path: &Path, uid: u32, gid: u32) -> Result<(), JailError> {
    nix::unistd::fchownat(
        None,
        path,
        Some(nix::unistd::Uid::from_raw(uid)),
        Some(nix::unistd::Gid::from_raw(gid)),
        nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .map_err(|e| JailError::io("changing the owner of", path)(e.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Result<Jail, JailError> {
        let map: std::collections::HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Jail::parse_env(|k| map.get(k).cloned())
    }

    #[test]
    fn settings_come_from_the_environment_with_safe_defaults() {
        let j = env(&[]).unwrap();
        assert_eq!(j.mode(), JailMode::On, "jailed unless said otherwise");
        assert_eq!(j.ids(), IdRange::DEFAULT);
        assert_eq!(j.0.dir, Path::new("/run/kiln/jail"));
        assert_eq!(j.0.cgroup_parent, "kiln");
        let j = env(&[
            ("KILN_JAIL", "off"),
            ("KILN_JAIL_IDS", "200000:1001"),
            ("KILN_CGROUP_PARENT", "kiln.slice/vms"),
            ("KILN_JAIL_DIR", "/var/run/k"),
        ])
        .unwrap();
        assert_eq!(j.mode(), JailMode::Off);
        assert_eq!(j.ids().group(), 200000);
        assert_eq!(j.0.cgroup_parent, "kiln.slice/vms");
        for bad in [
            ("KILN_JAIL", "maybe"),
            ("KILN_JAIL_IDS", "0:100"),
            ("KILN_CGROUP_PARENT", "../escape"),
            ("KILN_VM_IO_MAX", "rbps=fast"),
        ] {
            let err = env(&[bad]).expect_err(bad.0).to_string();
            assert!(err.starts_with(bad.0), "{err}");
        }
    }

    #[test]
    fn access_is_granted_to_the_vm_group_only_where_needed() {
        use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("memory");
        std::fs::write(&f, b"ram").unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().mode() & 0o777;
        // World-readable already: reading needs nothing.
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        let gid = std::fs::metadata(&f).unwrap().gid();
        grant_group(&f, gid, false).unwrap();
        assert_eq!(mode(&f), 0o644);
        // Writing by the group: its bit is added.
        grant_group(&f, gid, true).unwrap();
        assert_eq!(mode(&f), 0o664);
        // A link is never followed.
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&f, &link).unwrap();
        assert!(grant_group(&link, gid, true).is_err());
    }
}
