//! The processes of one VM, started the way the jail wants them ([`crate::jail`]): QEMU,
//! and, when the guest has a way out, its egress proxy with the owner's end of the
//! proxy's file broker ([`kiln_net::broker`]).
//!
//! A watcher task per process reaps it, removes its cgroups and publishes its exit. The
//! VM's id lease is held by the watchers (and inherited by the processes), so the ids are
//! free again only once every process of the VM is gone.

use std::net::TcpListener;
use std::os::fd::{AsFd as _, AsRawFd as _, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kiln_net::broker::AssignedFiles;
use tokio::sync::watch;
use tracing::Instrument as _;

use crate::accel::Resolved;
use crate::error::{Error, Result};
use crate::jail::{
    self, Cgroup, Jail, Jailed, Lease, Level, Limits, MountPlan, NetNs, ProcessSpec,
};
use crate::vm::{Exit, NetConfig, Shape};

/// What the egress proxy's owner-side needs from the engine: the proxy's command and the
/// files it serves it.
#[derive(Debug, Clone)]
pub struct Egress {
    /// `kiln egress-proxy` and its own settings (the private destinations the operator
    /// opened), program first; kiln-vm adds the descriptors and [`Egress::limits`].
    pub command: Vec<String>,
    /// What one guest may hold of its proxy.
    pub limits: kiln_net::Limits,
    /// The files the proxy reads and logs to; `None` until a sandbox claims the VM (a
    /// pooled restore: see [`crate::PendingRestore::assign_egress`]).
    pub files: Option<kiln_net::FileSet>,
}

/// The guest's proxy address, as QEMU's user network maps it: its host address, which
/// libslirp connects to on the host's loopback (in the VM's namespace).
pub(crate) const PROXY_PORT: u16 = kiln_agent_proto::EGRESS_PROXY.1;

/// Files outside its run directory a VM's QEMU uses, and how.
#[derive(Debug, Default)]
pub(crate) struct Files {
    /// Read only: kernel, initramfs, the disk's backing chain.
    pub read: Vec<PathBuf>,
    /// Written, and shared with other VMs: a bundle's memory image (QEMU opens it
    /// read-write even to map it privately), a caller's raw disk.
    pub shared: Vec<PathBuf>,
    /// Written by this VM alone: a console log outside the run directory.
    pub own: Vec<PathBuf>,
}

/// One process's exit, as its watcher saw it.
pub(crate) type ExitWatch = watch::Receiver<Option<Exit>>;

/// A VM's egress proxy.
#[derive(Debug)]
pub(crate) struct EgressProxy {
    pub pid: u32,
    pub exit: ExitWatch,
    /// The files the broker serves (a pooled VM's are assigned on claim).
    pub files: Arc<AssignedFiles>,
    broker: tokio::task::JoinHandle<()>,
}

impl Drop for EgressProxy {
    fn drop(&mut self) {
        crate::vm::kill_pid(self.pid, &self.exit);
        self.broker.abort();
    }
}

/// The processes of a started VM.
#[derive(Debug)]
pub(crate) struct Processes {
    pub pid: u32,
    pub exit: ExitWatch,
    pub egress: Option<EgressProxy>,
}

/// Starts a VM's processes: the egress proxy first (its socket is there before the guest
/// can connect), then QEMU with `argv`, in `dir`.
pub(crate) async fn launch(
    jail: &Jail,
    dir: &Path,
    shape: &Shape,
    argv: &[String],
    files: &Files,
    net: Option<&NetConfig>,
    span: &tracing::Span,
) -> Result<Processes> {
    let level = jail.level();
    let jailed = level == Level::Full;
    let lease = if jailed {
        Some(Arc::new(jail.lease()?))
    } else {
        None
    };
    let egress = net.and_then(|n| n.egress.as_ref());
    let forwards = net.is_some_and(|n| !n.forwards.is_empty());
    if egress.is_some() && forwards {
        return Err(Error::Config(
            "port forwards and egress together are not supported: the guest's network is its \
             own namespace, forwards listen on the host's"
                .into(),
        ));
    }
    // QEMU's own network namespace: needed for egress (see `jail::netns`), and given to
    // every jailed QEMU without forwards, which then reaches no host socket at all (one
    // without egress is restricted anyway: when kiln is not root and the kernel refuses
    // it a namespace, it goes without).
    let (netns, listener) = if egress.is_some() {
        let (ns, l) = NetNs::create(Some(PROXY_PORT))?;
        (Some(ns), l)
    } else if level != Level::Off && !forwards {
        match NetNs::create(None) {
            Ok((ns, _)) => (Some(ns), None),
            Err(e) if !jailed => {
                tracing::debug!(parent: span, error = %e, "no network namespace of its own");
                (None, None)
            }
            Err(e) => return Err(e.into()),
        }
    } else {
        (None, None)
    };
    let proxy = match (egress, listener) {
        (Some(e), Some(listener)) => Some(
            start_proxy(jail, level, lease.clone(), dir, e, listener, span)
                .await
                .map_err(Error::Jail)?,
        ),
        _ => None,
    };
    let qemu = crate::tool::which("qemu-system-x86_64")
        .and_then(|p| std::fs::canonicalize(p).ok())
        .ok_or_else(|| Error::NotProvisioned("qemu-system-x86_64 is not on PATH".into()))?;
    let mut inherit = Vec::new();
    let mut jailed_spec = None;
    let mut cgroup = None;
    if let Some(lease) = &lease {
        let ids = lease.ids();
        let group = jail.vm_group();
        prepare_files(dir, files, ids.vmm, group).map_err(Error::Jail)?;
        let mut mounts = MountPlan::system(&qemu);
        mounts.with_proc();
        mounts.write(dir);
        for p in &files.read {
            mounts.read(p);
        }
        for p in files.shared.iter().chain(&files.own) {
            mounts.write(p);
        }
        if shape.accel == Resolved::Kvm {
            mounts.write(Path::new("/dev/kvm"));
        }
        let io = jail::cgroup::block_device_of(dir).map(|dev| (dev, jail.io_max()));
        let limits = Limits::for_vmm(
            shape.vcpus,
            shape.memory_mib,
            shape.accel == Resolved::Tcg,
            io,
        );
        let cg = Cgroup::create(jail.cgroups(), &ids.vmm.to_string(), &limits)?;
        jailed_spec = Some(Jailed {
            uid: ids.vmm,
            gid: group,
            groups: Vec::new(),
            mounts,
            cgroup_procs: cg.procs_fds(),
            nofile: 4096,
            nproc: limits.pids,
        });
        cgroup = Some(cg);
        inherit.push(dup(lease.lock_file().as_fd())?);
    }
    let spec = ProcessSpec {
        program: qemu,
        args: argv.to_vec(),
        env: vec![("TMPDIR".into(), dir.display().to_string())],
        workdir: dir.to_owned(),
        stderr: dir.join("qemu.stderr"),
        inherit,
        netns: netns.as_ref().map(|n| n.as_fd().as_raw_fd()),
        userns: netns.as_ref().and_then(NetNs::user_fd),
        no_new_privs: level != Level::Off,
        jailed: jailed_spec,
    };
    tracing::debug!(parent: span, args = ?argv, jailed, "spawning qemu");
    let child = jail::spawn(spec, jail)?;
    // The namespace lives on in QEMU; kiln's descriptor of it is no longer needed.
    drop(netns);
    let pid = child.id().unwrap_or(0);
    let exit = watch_exit(child, dir.join("qemu.stderr"), cgroup, lease, span, "qemu");
    Ok(Processes {
        pid,
        exit,
        egress: proxy,
    })
}

/// Gives the VM's user what it writes and its group what it reads or shares.
fn prepare_files(
    dir: &Path,
    files: &Files,
    uid: u32,
    group: u32,
) -> std::result::Result<(), jail::JailError> {
    jail::give(dir, uid, group)?;
    for entry in std::fs::read_dir(dir).map_err(jail::JailError::io("listing", dir))? {
        let entry = entry.map_err(jail::JailError::io("listing", dir))?;
        let name = entry.file_name();
        // The owner's lock and the processes' stderr stay kiln's.
        if name == crate::rundir::LOCK_FILE || name.to_string_lossy().ends_with(".stderr") {
            continue;
        }
        if entry.file_type().is_ok_and(|t| t.is_file()) {
            jail::give(&entry.path(), uid, group)?;
        }
    }
    for p in &files.read {
        jail::grant_group(p, group, false)?;
    }
    for p in &files.shared {
        jail::grant_group(p, group, true)?;
    }
    for p in &files.own {
        if !p.exists() {
            std::fs::File::create(p).map_err(jail::JailError::io("creating", p))?;
        }
        jail::give(p, uid, group)?;
    }
    Ok(())
}

fn dup(fd: std::os::fd::BorrowedFd<'_>) -> Result<OwnedFd> {
    fd.try_clone_to_owned().map_err(Error::Spawn)
}

/// Starts `egress`'s proxy on `listener` (made in the VM's namespace), with the owner's
/// end of its broker served by a task of this process.
#[allow(clippy::too_many_arguments)]
async fn start_proxy(
    jail: &Jail,
    level: Level,
    lease: Option<Arc<Lease>>,
    dir: &Path,
    egress: &Egress,
    listener: TcpListener,
    span: &tracing::Span,
) -> std::result::Result<EgressProxy, jail::JailError> {
    let (program, rest) = egress
        .command
        .split_first()
        .ok_or_else(|| jail::JailError::Config {
            name: "egress",
            reason: "an empty egress proxy command".into(),
        })?;
    let program =
        std::fs::canonicalize(program).map_err(jail::JailError::io("resolving", program))?;
    let (ours, theirs) = std::os::unix::net::UnixStream::pair()
        .map_err(jail::JailError::io("a socket pair for", dir))?;
    ours.set_nonblocking(true)
        .map_err(jail::JailError::io("a socket pair for", dir))?;
    let files = Arc::new(AssignedFiles::new(egress.files.clone()));
    let stream = tokio::net::UnixStream::from_std(ours)
        .map_err(jail::JailError::io("a socket pair for", dir))?;
    let broker =
        tokio::spawn(kiln_net::broker::serve(stream, files.clone()).instrument(span.clone()));
    let l = egress.limits;
    let mut args: Vec<String> = rest.to_vec();
    args.extend([
        "--listen-fd".into(),
        "3".into(),
        "--broker-fd".into(),
        "4".into(),
        "--max-connections".into(),
        l.max_connections.to_string(),
        "--header-timeout-secs".into(),
        l.header_timeout.as_secs().max(1).to_string(),
        "--idle-timeout-secs".into(),
        l.idle_timeout.as_secs().max(1).to_string(),
    ]);
    let mut inherit: Vec<OwnedFd> = vec![listener.into(), theirs.into()];
    let mut jailed = None;
    let mut cgroup = None;
    if let Some(lease) = &lease {
        let uid = lease.ids().proxy;
        let mut mounts = MountPlan::system(&program);
        // Names and roots: what resolving a host and verifying an upstream read.
        for p in [
            "/etc/resolv.conf",
            "/etc/hosts",
            "/etc/nsswitch.conf",
            "/etc/host.conf",
            "/etc/gai.conf",
            "/etc/ssl",
            "/etc/pki",
            "/etc/ca-certificates",
        ] {
            if Path::new(p).exists() {
                mounts.read(Path::new(p));
            }
        }
        let limits = Limits::for_proxy(l.max_connections);
        let cg = Cgroup::create(jail.cgroups(), &uid.to_string(), &limits)?;
        jailed = Some(Jailed {
            uid,
            gid: uid,
            groups: Vec::new(),
            mounts,
            cgroup_procs: cg.procs_fds(),
            // Each connection: the guest's socket and the upstream's.
            nofile: 2 * l.max_connections as u64 + 64,
            nproc: limits.pids,
        });
        cgroup = Some(cg);
        inherit.push(
            lease
                .lock_file()
                .as_fd()
                .try_clone_to_owned()
                .map_err(jail::JailError::io("passing the lease", dir))?,
        );
    }
    let mut env = Vec::new();
    if let Ok(filter) = std::env::var("KILN_LOG") {
        env.push(("KILN_LOG".to_owned(), filter));
    }
    let stderr = dir.join("egress.stderr");
    let spec = ProcessSpec {
        program,
        args,
        env,
        // Its mount namespace has no run directory: `/` is where it stands.
        workdir: if lease.is_some() {
            PathBuf::from("/")
        } else {
            dir.to_owned()
        },
        stderr: stderr.clone(),
        inherit,
        netns: None,
        userns: None,
        no_new_privs: level != Level::Off,
        jailed,
    };
    let child = jail::spawn(spec, jail)?;
    let pid = child.id().unwrap_or(0);
    let exit = watch_exit(child, stderr, cgroup, lease, span, "egress proxy");
    Ok(EgressProxy {
        pid,
        exit,
        files,
        broker,
    })
}

/// Reaps `child`, then removes its cgroups and lets go of its lease; publishes how it
/// ended with its stderr.
fn watch_exit(
    mut child: tokio::process::Child,
    stderr: PathBuf,
    cgroup: Option<Cgroup>,
    lease: Option<Arc<Lease>>,
    span: &tracing::Span,
    what: &'static str,
) -> ExitWatch {
    let (tx, rx) = watch::channel(None);
    tokio::spawn(
        async move {
            let status = child.wait().await;
            let mut text = match status {
                Ok(s) => s.to_string(),
                Err(e) => format!("wait failed: {e}"),
            };
            let err = crate::vm::read_nofollow(&stderr, 4096);
            if !err.trim().is_empty() {
                text.push_str(&format!("; {what} stderr: {}", err.trim()));
            }
            tracing::debug!(status = %text, "{what} exited");
            let _ = tx.send(Some(Exit(text)));
            // The lease goes last: until its cgroups are gone, its ids are not free.
            if let Some(cg) = cgroup {
                cg.remove().await;
            }
            drop(lease);
        }
        .instrument(span.clone()),
    );
    rx
}
