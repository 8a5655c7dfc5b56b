//! What a jailed process sees of the filesystem: a [`MountPlan`], carried out in its own
//! mount namespace between fork and exec.
//!
//! The root is a fresh tmpfs holding nothing but the plan's paths, each bound from the
//! host at the same path (so command lines, QMP arguments and qcow2 backing paths need no
//! translation), read-only unless the plan says otherwise; then the process pivots into it
//! and the host's tree is detached. What is not in the plan does not exist for it.
//!
//! [`MountPlan::prepare`] turns the plan into [`Step`]s of plain syscall arguments ahead of
//! the fork: after a fork in a threaded process only async-signal-safe calls are allowed,
//! so [`run`] allocates nothing and formats nothing.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags};

use super::JailError;

/// One path bound into the jail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    /// The path, the same inside as outside.
    pub path: PathBuf,
    /// Read-write (else read-only).
    pub writable: bool,
}

/// What a jailed process sees.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MountPlan {
    binds: Vec<Bind>,
    /// `(link, target)`: the host's top-level links into `/usr` (merged-`/usr` systems).
    links: Vec<(PathBuf, PathBuf)>,
    /// A `/proc` showing only the process's own user's processes.
    proc: bool,
}

/// Top-level directories a dynamically linked program may load from: links into `/usr` on
/// merged systems (replicated as links), directories elsewhere (bound read-only).
const SYSTEM_DIRS: [&str; 6] = ["/lib", "/lib64", "/lib32", "/libx32", "/bin", "/sbin"];
/// Device nodes every process gets.
const DEVICES: [&str; 4] = ["/dev/null", "/dev/zero", "/dev/urandom", "/dev/random"];

impl MountPlan {
    /// What running `program` needs from the system: `/usr` (programs, libraries, QEMU's
    /// firmware) and the top-level library directories, the dynamic loader's cache, the
    /// usual character devices, and `program` itself when it lives elsewhere.
    pub fn system(program: &Path) -> Self {
        let mut plan = Self::default();
        plan.read(Path::new("/usr"));
        for dir in SYSTEM_DIRS {
            let path = Path::new(dir);
            match std::fs::symlink_metadata(path) {
                Ok(m) if m.file_type().is_symlink() => {
                    if let Ok(target) = std::fs::read_link(path) {
                        plan.links.push((path.to_owned(), target));
                    }
                }
                Ok(m) if m.is_dir() => plan.read(path),
                _ => {}
            }
        }
        if Path::new("/etc/ld.so.cache").exists() {
            plan.read(Path::new("/etc/ld.so.cache"));
        }
        for dev in DEVICES {
            plan.write(Path::new(dev));
        }
        plan.read(program);
        plan
    }

    /// Binds `path` read-only (nothing if a bound directory already holds it).
    pub fn read(&mut self, path: &Path) {
        self.add(path, false);
    }

    /// Binds `path` read-write.
    pub fn write(&mut self, path: &Path) {
        self.add(path, true);
    }

    fn add(&mut self, path: &Path, writable: bool) {
        let covered = self.binds.iter().any(|b| {
            (b.path == path || (path.starts_with(&b.path) && b.path.is_dir()))
                && (b.writable || !writable)
        });
        if covered {
            return;
        }
        self.binds.retain(|b| b.path != path);
        self.binds.push(Bind {
            path: path.to_owned(),
            writable,
        });
    }

    /// Mounts a `/proc` that shows the process's own processes only (`hidepid=2`: its uid
    /// is its own).
    pub fn with_proc(&mut self) {
        self.proc = true;
    }

    /// The paths bound, in the order they are mounted (parents first).
    pub fn binds(&self) -> Vec<&Bind> {
        let mut binds: Vec<&Bind> = self.binds.iter().collect();
        binds.sort_by_key(|b| b.path.components().count());
        binds
    }

    /// The steps that build this plan's root at `stage` (an existing empty directory).
    pub fn prepare(&self, stage: &Path) -> Result<Vec<Step>, JailError> {
        let inside = |p: &Path| stage.join(p.strip_prefix("/").unwrap_or(p));
        let mut steps = vec![Step::Tmpfs(cstr(stage)?)];
        let mut made: Vec<PathBuf> = vec![stage.to_owned()];
        let mut mkdirs = |steps: &mut Vec<Step>, dir: &Path| -> Result<(), JailError> {
            let mut parts = Vec::new();
            let mut d = dir;
            while !made.iter().any(|m| m == d) {
                parts.push(d.to_owned());
                match d.parent() {
                    Some(p) if p.starts_with(stage) => d = p,
                    _ => break,
                }
            }
            for p in parts.into_iter().rev() {
                steps.push(Step::Mkdir(cstr(&p)?));
                made.push(p);
            }
            Ok(())
        };
        for (link, target) in &self.links {
            let at = inside(link);
            if let Some(parent) = at.parent() {
                mkdirs(&mut steps, parent)?;
            }
            steps.push(Step::Symlink {
                target: cstr(target)?,
                link: cstr(&at)?,
            });
        }
        for bind in self.binds() {
            let source = &bind.path;
            let meta = std::fs::metadata(source).map_err(JailError::io("binding", source))?;
            let at = inside(source);
            if meta.is_dir() {
                mkdirs(&mut steps, &at)?;
            } else {
                if let Some(parent) = at.parent() {
                    mkdirs(&mut steps, parent)?;
                }
                steps.push(Step::Touch(cstr(&at)?));
            }
            let label = format!(
                "bind {} ({})",
                source.display(),
                if bind.writable { "rw" } else { "ro" }
            );
            steps.push(Step::Bind {
                source: cstr(source)?,
                target: cstr(&at)?,
                writable: bind.writable,
                label: cstr(Path::new(&label))?,
            });
        }
        if self.proc {
            let at = inside(Path::new("/proc"));
            mkdirs(&mut steps, &at)?;
            steps.push(Step::Proc(cstr(&at)?));
        }
        steps.push(Step::Pivot(cstr(stage)?));
        Ok(steps)
    }
}

fn cstr(p: &Path) -> Result<CString, JailError> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| JailError::Io {
        what: "a NUL byte in",
        path: p.to_owned(),
        source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
    })
}

/// One syscall-level step of building a jail's root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// A fresh tmpfs on the staging directory: the new root.
    Tmpfs(CString),
    /// A directory (if missing).
    Mkdir(CString),
    /// An empty file to bind a file onto (if missing).
    Touch(CString),
    /// A symbolic link.
    Symlink {
        /// What it points to.
        target: CString,
        /// Where it is.
        link: CString,
    },
    /// A bind mount, then made read-only unless `writable`; never setuid, and no device
    /// nodes through it unless it is one of `/dev`'s.
    Bind {
        /// The host path.
        source: CString,
        /// Where in the new root.
        target: CString,
        /// Read-write.
        writable: bool,
        /// What to report if it fails.
        label: CString,
    },
    /// `/proc` with `hidepid=2`.
    Proc(CString),
    /// Pivot into the new root at this directory, detach the old one, make the new root
    /// read-only.
    Pivot(CString),
}

impl Step {
    /// What a failure of this step is reported as.
    fn label(&self) -> &[u8] {
        match self {
            Self::Tmpfs(_) => b"mount the jail's root tmpfs",
            Self::Mkdir(p) | Self::Touch(p) => p.as_bytes(),
            Self::Symlink { link, .. } => link.as_bytes(),
            Self::Bind { label, .. } => label.as_bytes(),
            Self::Proc(_) => b"mount /proc",
            Self::Pivot(_) => b"pivot into the jail's root",
        }
    }
}

/// Runs `steps` in a child between fork and exec, after `unshare(CLONE_NEWNS)`; on failure,
/// `report` gets the failing step's label. Async-signal-safe: syscalls on prepared
/// arguments only.
pub(crate) fn run(steps: &[Step], report: &dyn Fn(&[u8])) -> nix::Result<()> {
    // Nothing done here may reach the host's mounts.
    let none: Option<&std::ffi::CStr> = None;
    nix::mount::mount(
        none,
        c"/",
        none,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        none,
    )
    .inspect_err(|_| report(b"make the mounts private"))?;
    for step in steps {
        run_step(step).inspect_err(|_| report(step.label()))?;
    }
    Ok(())
}

fn exists(p: &std::ffi::CStr) -> bool {
    nix::sys::stat::lstat(p).is_ok()
}

fn run_step(step: &Step) -> nix::Result<()> {
    let none: Option<&std::ffi::CStr> = None;
    match step {
        Step::Tmpfs(at) => nix::mount::mount(
            Some(c"tmpfs"),
            at.as_c_str(),
            Some(c"tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            Some(c"mode=0755,size=1m,nr_inodes=4096"),
        ),
        Step::Mkdir(p) => {
            if exists(p) {
                return Ok(());
            }
            nix::unistd::mkdir(
                p.as_c_str(),
                nix::sys::stat::Mode::from_bits_truncate(0o755),
            )
        }
        Step::Touch(p) => {
            if exists(p) {
                return Ok(());
            }
            let fd = nix::fcntl::open(
                p.as_c_str(),
                nix::fcntl::OFlag::O_CREAT
                    | nix::fcntl::OFlag::O_RDONLY
                    | nix::fcntl::OFlag::O_CLOEXEC,
                nix::sys::stat::Mode::from_bits_truncate(0o644),
            )?;
            nix::unistd::close(fd)
        }
        Step::Symlink { target, link } => {
            nix::unistd::symlinkat(target.as_c_str(), None, link.as_c_str())
        }
        Step::Bind {
            source,
            target,
            writable,
            ..
        } => {
            nix::mount::mount(
                Some(source.as_c_str()),
                target.as_c_str(),
                none,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                none,
            )?;
            let mut flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_NOSUID;
            if !*writable {
                flags |= MsFlags::MS_RDONLY;
            }
            if !source.as_bytes().starts_with(b"/dev/") {
                flags |= MsFlags::MS_NODEV;
            }
            nix::mount::mount(none, target.as_c_str(), none, flags, none)
        }
        Step::Proc(at) => nix::mount::mount(
            Some(c"proc"),
            at.as_c_str(),
            Some(c"proc"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            Some(c"hidepid=2"),
        ),
        Step::Pivot(root) => {
            nix::unistd::chdir(root.as_c_str())?;
            // pivot_root(".", "."): the old root ends up under the new one, at the same
            // place, and is detached right away.
            nix::unistd::pivot_root(c".", c".")?;
            nix::mount::umount2(c".", MntFlags::MNT_DETACH)?;
            nix::unistd::chdir(c"/")?;
            nix::mount::mount(
                none,
                c"/",
                none,
                MsFlags::MS_BIND
                    | MsFlags::MS_REMOUNT
                    | MsFlags::MS_RDONLY
                    | MsFlags::MS_NOSUID
                    | MsFlags::MS_NODEV
                    | MsFlags::MS_NOEXEC,
                none,
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A restore's plan: its run dir read-write, its bundle's files (not the bundle
    /// directory, not the state directory around it) read-only but for the memory image.
    #[test]
    fn a_plan_binds_the_files_given_and_nothing_around_them() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let bundle = state.join("templates/t1/b1/bundle");
        let run = state.join("vms/sbx-1-abc");
        std::fs::create_dir_all(&bundle).unwrap();
        std::fs::create_dir_all(&run).unwrap();
        std::fs::create_dir_all(state.join("sandboxes/other")).unwrap();
        for f in ["memory", "disk.raw", "vmlinuz", "initramfs.cpio", "state"] {
            std::fs::write(bundle.join(f), f).unwrap();
        }
        let mut plan = MountPlan::default();
        plan.write(&run);
        for f in ["disk.raw", "vmlinuz", "initramfs.cpio"] {
            plan.read(&bundle.join(f));
        }
        plan.write(&bundle.join("memory"));
        // Already covered: a file of the run dir; a read of a file bound writable.
        plan.write(&run.join("disk.qcow2"));
        plan.read(&bundle.join("memory"));
        let binds: Vec<(String, bool)> = plan
            .binds()
            .iter()
            .map(|b| {
                (
                    b.path.strip_prefix(&state).unwrap().display().to_string(),
                    b.writable,
                )
            })
            .collect();
        assert_eq!(
            binds,
            [
                ("vms/sbx-1-abc".to_owned(), true),
                ("templates/t1/b1/bundle/disk.raw".to_owned(), false),
                ("templates/t1/b1/bundle/vmlinuz".to_owned(), false),
                ("templates/t1/b1/bundle/initramfs.cpio".to_owned(), false),
                ("templates/t1/b1/bundle/memory".to_owned(), true),
            ]
        );
        // In the root it builds, the bundle directory exists only as the way to its
        // files: the device state and every other path are absent.
        let stage = dir.path().join("stage");
        let steps = plan.prepare(&stage).unwrap();
        let at = |p: &Path| stage.join(p.strip_prefix("/").unwrap());
        assert_eq!(steps.first(), Some(&Step::Tmpfs(cstr(&stage).unwrap())));
        assert_eq!(steps.last(), Some(&Step::Pivot(cstr(&stage).unwrap())));
        let touched: Vec<&CString> = steps
            .iter()
            .filter_map(|s| match s {
                Step::Touch(p) => Some(p),
                _ => None,
            })
            .collect();
        assert_eq!(touched.len(), 4);
        assert!(!touched.contains(&&cstr(&at(&bundle.join("state"))).unwrap()));
        let made: Vec<&CString> = steps
            .iter()
            .filter_map(|s| match s {
                Step::Mkdir(p) => Some(p),
                _ => None,
            })
            .collect();
        assert!(made.contains(&&cstr(&at(&bundle)).unwrap()));
        assert!(!made.contains(&&cstr(&at(&state.join("sandboxes"))).unwrap()));
        // Every directory is made before anything is bound in it.
        let position = |want: &Step| steps.iter().position(|s| s == want).unwrap();
        for s in &steps {
            if let Step::Bind { target, .. } = s {
                let parent = Path::new(std::ffi::OsStr::from_bytes(target.as_bytes()))
                    .parent()
                    .unwrap();
                if parent != stage {
                    assert!(position(&Step::Mkdir(cstr(parent).unwrap())) < position(s));
                }
            }
        }
    }

    #[test]
    fn the_system_plan_binds_usr_read_only_and_the_devices() {
        let plan = MountPlan::system(Path::new("/usr/bin/true"));
        let binds = plan.binds();
        assert_eq!(binds[0].path, Path::new("/usr"));
        assert!(!binds[0].writable);
        assert!(
            !binds.iter().any(|b| b.path == Path::new("/usr/bin/true")),
            "a program under /usr needs no bind of its own"
        );
        for dev in DEVICES {
            assert!(binds.iter().any(|b| b.path == Path::new(dev)), "{dev}");
        }
        assert!(!binds
            .iter()
            .any(|b| b.path.starts_with("/etc") && b.path != Path::new("/etc/ld.so.cache")));
    }
}
