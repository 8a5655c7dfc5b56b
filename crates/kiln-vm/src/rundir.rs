//! VM run directories, and sweeping the ones a dead process left behind.
//!
//! A run directory holds a VM's sockets, console log, disk overlay and (for a booted VM)
//! its memory file: up to gigabytes of apparent size. Its [`Vm`](crate::Vm) removes it on
//! drop, but a host process killed with SIGKILL (or the machine losing power) drops
//! nothing: QEMU dies with its owner (`PR_SET_PDEATHSIG`), the directory stays.
//!
//! So the owner holds an exclusive `flock` on `owner.lock` inside the directory for as
//! long as it lives, and the kernel releases it whatever way the owner ends. A sweep
//! removes the directories whose lock it can take. Several processes may share one
//! parent (a server, CLI keepers, a CLI build), and a lock tells a live owner from a dead
//! one without trusting pids, which are reused.

use std::fs::File;
use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The lock file an owner holds.
pub(crate) const LOCK_FILE: &str = "owner.lock";

/// A VM's run directory (or any scratch directory under a VM run parent), removed on
/// drop; `owner.lock` in it is held until then, so a dead owner's is swept.
#[derive(Debug)]
pub struct RunDir {
    dir: tempfile::TempDir,
    /// Holds the `flock`; closed after the directory is removed.
    _lock: Option<File>,
}

impl RunDir {
    /// A fresh `<name>-XXXXXX` directory under `parent` (created if missing). `name` is
    /// cut to 16 safe characters; the agent socket's path must fit a unix socket address.
    pub fn create(parent: &Path, name: &str) -> Result<Self> {
        std::fs::create_dir_all(parent).map_err(Error::io("create", parent))?;
        let prefix: String = name
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
            .take(16)
            .collect();
        let dir = tempfile::Builder::new()
            .prefix(&format!("{prefix}-"))
            .tempdir_in(parent)
            .map_err(Error::io("create run dir in", parent))?;
        if dir.path().join("agent.sock").as_os_str().len() > 107 {
            return Err(Error::Config(format!(
                "run dir path too long for unix sockets: {}",
                dir.path().display()
            )));
        }
        let lock = match lock_owner(dir.path()) {
            Ok(lock) => Some(lock),
            Err(e) => {
                // A filesystem without flock: the VM works, its directory is just not
                // swept if this process is killed.
                tracing::warn!(dir = %dir.path().display(), error = %e, "no owner lock on the run dir");
                None
            }
        };
        Ok(Self { dir, _lock: lock })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Removes the directory now, reporting a failure (drop ignores it).
    pub fn close(self) -> std::io::Result<()> {
        self.dir.close()
    }
}

/// Creates `dir/owner.lock` locked. It is locked under a temporary name and then renamed:
/// a sweep never sees an unlocked `owner.lock` of a live owner (the lock belongs to the
/// open file, not to its name).
fn lock_owner(dir: &Path) -> std::io::Result<File> {
    let tmp = dir.join(".owner.lock.new");
    let lock = File::create(&tmp)?;
    if !try_lock(&lock) {
        let e = std::io::Error::last_os_error();
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, dir.join(LOCK_FILE))?;
    Ok(lock)
}

/// An exclusive, non-blocking `flock`.
fn try_lock(f: &File) -> bool {
    // SAFETY: flock on a descriptor owned by `f`, which outlives the call.
    unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

/// Removes the run directories under `parent` whose owner is gone (see the module docs)
/// and returns them. Directories without a lock file are left alone: they are someone
/// else's, or being created.
pub fn sweep_stale_run_dirs(parent: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let dir = entry.path();
        if !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let Ok(lock) = File::open(dir.join(LOCK_FILE)) else {
            continue;
        };
        if !try_lock(&lock) {
            continue;
        }
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => removed.push(dir),
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot remove a stale run dir");
            }
        }
    }
    if !removed.is_empty() {
        tracing::info!(count = removed.len(), parent = %parent.display(), "stale VM run dirs removed");
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_directories_of_dead_owners_are_swept() {
        let parent = tempfile::tempdir().unwrap();
        let live = RunDir::create(parent.path(), "live").unwrap();
        // A dead owner's directory: its lock file exists and nobody holds it.
        let RunDir { dir, _lock } = RunDir::create(parent.path(), "dead").unwrap();
        drop(_lock);
        let dead_path = dir.keep();
        assert!(dead_path.join(LOCK_FILE).exists());
        // Not a run dir (or one being created): no lock file.
        let other = parent.path().join("other");
        std::fs::create_dir(&other).unwrap();

        let removed = sweep_stale_run_dirs(parent.path());
        assert_eq!(removed, vec![dead_path.clone()]);
        assert!(!dead_path.exists());
        assert!(live.path().exists() && other.exists());
        // The owner's own drop still works after a sweep passed it by.
        let live_path = live.path().to_owned();
        live.close().unwrap();
        assert!(!live_path.exists());
    }

    #[test]
    fn a_missing_parent_sweeps_nothing() {
        assert!(sweep_stale_run_dirs(Path::new("/nonexistent/kiln-vms")).is_empty());
    }
}
