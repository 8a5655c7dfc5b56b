//! Starting a VM's process, jailed: everything [`super`] describes happens in the child
//! between fork and exec, in an order that keeps root only as long as it is needed (join
//! the cgroup, set the rlimits, join the network namespace, build the mount namespace),
//! then drops it for good (`setresuid`/`setresgid` to the leased ids, no supplementary
//! groups but the given ones, `PR_SET_NO_NEW_PRIVS`) right before exec.

use std::ffi::CString;
use std::os::fd::{AsRawFd as _, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt as _;
use std::path::PathBuf;
use std::process::Stdio;

use nix::sched::CloneFlags;
use nix::sys::resource::Resource;

use super::mounts::{self, Step};
use super::{Jail, JailError, MountPlan};

/// A process to start for a VM.
#[derive(Debug)]
pub struct ProcessSpec {
    /// The program, an absolute path (the same inside the jail).
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<String>,
    /// Its whole environment.
    pub env: Vec<(String, String)>,
    /// Its working directory.
    pub workdir: PathBuf,
    /// Where its standard error goes (created; its first line names a jail step that
    /// failed).
    pub stderr: PathBuf,
    /// Descriptors it inherits, as 3, 4, ...
    pub inherit: Vec<OwnedFd>,
    /// The network namespace it joins (QEMU's own), jailed or not.
    pub netns: Option<RawFd>,
    /// The user namespace it joins first (the network namespace's owner when kiln is not
    /// root).
    pub userns: Option<RawFd>,
    /// `PR_SET_NO_NEW_PRIVS` (always when [`ProcessSpec::jailed`]).
    pub no_new_privs: bool,
    /// How it is jailed; `None`: it runs as kiln does.
    pub jailed: Option<Jailed>,
}

/// How one process is jailed.
#[derive(Debug)]
pub struct Jailed {
    /// Its uid.
    pub uid: u32,
    /// Its gid.
    pub gid: u32,
    /// Its supplementary groups.
    pub groups: Vec<u32>,
    /// What it sees.
    pub mounts: MountPlan,
    /// The `cgroup.procs` files it joins (its cgroup in each hierarchy).
    pub cgroup_procs: Vec<RawFd>,
    /// Open descriptors it may hold.
    pub nofile: u64,
    /// Threads its uid may have.
    pub nproc: u64,
}

/// Everything the child needs, as plain syscall arguments.
struct Prepared {
    netns: Option<RawFd>,
    userns: Option<RawFd>,
    no_new_privs: bool,
    inherit: Vec<RawFd>,
    workdir: CString,
    jail: Option<PreparedJail>,
}

struct PreparedJail {
    uid: u32,
    gid: u32,
    groups: Vec<nix::unistd::Gid>,
    steps: Vec<Step>,
    cgroup_procs: Vec<RawFd>,
    nofile: u64,
    nproc: u64,
}

/// Writes `kiln-jail: <what>` on the child's stderr: the parent reads it back to name the
/// step that failed. Async-signal-safe.
fn report(what: &[u8]) {
    for part in [&b"kiln-jail: "[..], what, b"\n"] {
        // SAFETY: write(2) of a borrowed buffer to fd 2.
        unsafe {
            libc::write(2, part.as_ptr().cast(), part.len());
        }
    }
}

fn checked<T>(r: nix::Result<T>, what: &[u8]) -> std::io::Result<T> {
    r.map_err(|e| {
        report(what);
        std::io::Error::from(e)
    })
}

impl Prepared {
    /// The child's side. Only async-signal-safe calls on what was prepared.
    fn enter(&self) -> std::io::Result<()> {
        checked(
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL),
            b"set the parent-death signal",
        )?;
        checked(nix::unistd::setsid().map(drop), b"start a session")?;
        checked(
            nix::sys::resource::setrlimit(Resource::RLIMIT_CORE, 0, 0),
            b"forbid core dumps",
        )?;
        if let Some(j) = &self.jail {
            for fd in &j.cgroup_procs {
                // SAFETY: the descriptor was opened by the parent for this write.
                let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(*fd) };
                checked(nix::unistd::write(fd, b"0").map(drop), b"join the cgroup")?;
            }
            checked(
                nix::sys::resource::setrlimit(Resource::RLIMIT_NOFILE, j.nofile, j.nofile),
                b"limit descriptors",
            )?;
            checked(
                nix::sys::resource::setrlimit(Resource::RLIMIT_NPROC, j.nproc, j.nproc),
                b"limit threads",
            )?;
        }
        if let Some(ns) = self.userns {
            // SAFETY: as for the network namespace below.
            let ns = unsafe { std::os::fd::BorrowedFd::borrow_raw(ns) };
            checked(
                nix::sched::setns(ns, CloneFlags::CLONE_NEWUSER),
                b"join the VM's user namespace",
            )?;
        }
        if let Some(ns) = self.netns {
            // SAFETY: the namespace descriptor outlives the spawn (the parent holds it).
            let ns = unsafe { std::os::fd::BorrowedFd::borrow_raw(ns) };
            checked(
                nix::sched::setns(ns, CloneFlags::CLONE_NEWNET),
                b"join the VM's network namespace",
            )?;
        }
        if let Some(j) = &self.jail {
            checked(
                nix::sched::unshare(
                    CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWIPC | CloneFlags::CLONE_NEWUTS,
                ),
                b"new mount, IPC and UTS namespaces",
            )?;
            mounts::run(&j.steps, &report).map_err(std::io::Error::from)?;
        }
        for (i, fd) in self.inherit.iter().enumerate() {
            // dup2 clears close-on-exec on the copy: it survives the exec.
            checked(
                nix::unistd::dup2(*fd, 3 + i as RawFd).map(drop),
                b"pass a descriptor",
            )?;
        }
        checked(
            nix::unistd::chdir(self.workdir.as_c_str()),
            b"enter the working directory",
        )?;
        if let Some(j) = &self.jail {
            checked(nix::unistd::setgroups(&j.groups), b"set the groups")?;
            let gid = nix::unistd::Gid::from_raw(j.gid);
            checked(
                nix::unistd::setresgid(gid, gid, gid),
                b"drop to the jail's group",
            )?;
            let uid = nix::unistd::Uid::from_raw(j.uid);
            checked(
                nix::unistd::setresuid(uid, uid, uid),
                b"drop to the jail's user",
            )?;
            // A change of credentials clears the parent-death signal (credentials(7)):
            // set it again, or a jailed QEMU would outlive a `kill -9` of kiln (found by
            // the restart test).
            checked(
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL),
                b"set the parent-death signal again",
            )?;
        }
        if self.no_new_privs || self.jail.is_some() {
            checked(
                nix::sys::prctl::set_no_new_privs(),
                b"set PR_SET_NO_NEW_PRIVS",
            )?;
        }
        Ok(())
    }
}

fn cstring(s: &std::ffi::OsStr, what: &'static str) -> Result<CString, JailError> {
    CString::new(s.as_bytes()).map_err(|_| JailError::Io {
        what,
        path: PathBuf::from(s),
        source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
    })
}

/// Starts `spec` (jailed by `jail` when [`ProcessSpec::jailed`] says how), from kiln's
/// long-lived spawner thread so that its parent-death signal means "kiln died".
pub fn spawn(spec: ProcessSpec, jail: &Jail) -> Result<tokio::process::Child, JailError> {
    let program = spec.program.display().to_string();
    let stderr =
        std::fs::File::create(&spec.stderr).map_err(JailError::io("creating", &spec.stderr))?;
    // The inherited descriptors are moved clear of the numbers they become.
    let first_free = 3 + spec.inherit.len() as RawFd;
    let mut inherit = Vec::with_capacity(spec.inherit.len());
    for fd in &spec.inherit {
        let moved = nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::F_DUPFD_CLOEXEC(first_free + 16))
            .map_err(|e| JailError::Spawn {
                program: program.clone(),
                source: e.into(),
            })?;
        // SAFETY: fcntl just returned this new descriptor, owned by nobody else.
        inherit.push(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(moved) });
    }
    let jail_setup = match &spec.jailed {
        Some(j) => {
            let steps = j.mounts.prepare(&jail.staging_root()?)?;
            Some(PreparedJail {
                uid: j.uid,
                gid: j.gid,
                groups: j
                    .groups
                    .iter()
                    .map(|g| nix::unistd::Gid::from_raw(*g))
                    .collect(),
                steps,
                cgroup_procs: j.cgroup_procs.clone(),
                nofile: j.nofile,
                nproc: j.nproc,
            })
        }
        None => None,
    };
    let prepared = Prepared {
        netns: spec.netns,
        userns: spec.userns,
        no_new_privs: spec.no_new_privs,
        inherit: inherit.iter().map(|f| f.as_raw_fd()).collect(),
        workdir: cstring(spec.workdir.as_os_str(), "a NUL byte in")?,
        jail: jail_setup,
    };
    let mut cmd = tokio::process::Command::new(&spec.program);
    // argv[0] is the program's name, as when run from PATH: what `ps` and the tools that
    // find kiln's QEMUs by command line (`qemu-system-x86_64 ...`) see.
    if let Some(name) = spec.program.file_name() {
        cmd.arg0(name);
    }
    cmd.args(&spec.args)
        .env_clear()
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .kill_on_drop(true);
    // SAFETY: `enter` makes async-signal-safe calls only, on data prepared before the
    // fork (see `Prepared`).
    unsafe {
        cmd.pre_exec(move || prepared.enter());
    }
    let spawned = spawn_on_spawner_thread(cmd);
    drop(inherit);
    spawned.map_err(|source| {
        // The child names the jail step that failed on its stderr.
        let step = std::fs::read_to_string(&spec.stderr).ok().and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("kiln-jail: ").map(str::to_owned))
        });
        match step {
            Some(step) => JailError::Setup { step, source },
            None => JailError::Spawn { program, source },
        }
    })
}

/// Spawns `cmd` from one long-lived thread.
///
/// `PR_SET_PDEATHSIG` fires when the *thread* that forked the child exits, not the
/// process. Tokio may fork from a `block_on` caller or a blocking-pool thread that ends
/// long before the VM should; forking from a dedicated thread that lives as long as the
/// process makes the death signal mean "the host process died". The child is registered
/// with the caller's runtime (for reaping) by entering its handle.
fn spawn_on_spawner_thread(
    mut cmd: tokio::process::Command,
) -> std::io::Result<tokio::process::Child> {
    type Job = Box<dyn FnOnce() + Send>;
    static SPAWNER: std::sync::OnceLock<std::sync::Mutex<std::sync::mpsc::Sender<Job>>> =
        std::sync::OnceLock::new();
    let sender = SPAWNER.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        let spawned = std::thread::Builder::new()
            .name("kiln-vm-spawner".into())
            .spawn(move || {
                for job in rx {
                    job();
                }
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the VM spawner thread");
        }
        std::sync::Mutex::new(tx)
    });
    let handle = tokio::runtime::Handle::current();
    let (rtx, rrx) = std::sync::mpsc::channel();
    let job: Job = Box::new(move || {
        let _guard = handle.enter();
        let _ = rtx.send(cmd.spawn());
    });
    let gone = || std::io::Error::other("the VM spawner thread is gone");
    sender
        .lock()
        .map_err(|_| std::io::Error::other("the VM spawner is poisoned"))?
        .send(job)
        .map_err(|_| gone())?;
    // The job is a fork+exec: microseconds to a few ms, fine to wait for synchronously.
    rrx.recv().map_err(|_| gone())?
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a process keeps when kiln cannot jail it fully (not root): no new privileges,
    /// no core dumps, a session of its own, and only the environment and descriptors given.
    #[tokio::test]
    async fn an_unjailed_process_still_gets_no_new_privileges_and_its_descriptors() {
        let dir = tempfile::tempdir().unwrap();
        let passed = std::fs::File::open("/dev/null").unwrap();
        let spec = ProcessSpec {
            program: PathBuf::from("/bin/sh"),
            args: vec![
                "-c".into(),
                "grep -E '^NoNewPrivs' /proc/self/status >&2; ulimit -c >&2; \
                 [ -e /proc/self/fd/3 ] && echo fd3 >&2; echo \"env=$KEPT$HOME\" >&2"
                    .into(),
            ],
            env: vec![("KEPT".into(), "yes".into())],
            workdir: dir.path().to_owned(),
            stderr: dir.path().join("out"),
            inherit: vec![passed.into()],
            netns: None,
            userns: None,
            no_new_privs: true,
            jailed: None,
        };
        let status = spawn(spec, &Jail::off()).unwrap().wait().await.unwrap();
        assert!(status.success());
        assert!(
            std::env::var_os("HOME").is_some(),
            "the test's own HOME is not passed on"
        );
        let out = std::fs::read_to_string(dir.path().join("out")).unwrap();
        assert_eq!(out, "NoNewPrivs:\t1\n0\nfd3\nenv=yes\n");
    }
}
