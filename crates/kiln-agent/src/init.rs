//! PID 1 duties: initramfs stage (modules, root disk, switch_root), then the usual init
//! chores in the real root (mounts, hostname, network, signal forwarding).

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::kmod::{finit_module, ModuleInitFlags};
use nix::mount::MsFlags;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{killpg, SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::unistd::{dup2, Pid};

use crate::net;
use crate::procs::Procs;

/// Kernel command line `key=value` pairs (flags map to "").
pub fn cmdline() -> HashMap<String, String> {
    std::fs::read_to_string("/proc/cmdline")
        .unwrap_or_default()
        .split_whitespace()
        .map(|t| match t.split_once('=') {
            Some((k, v)) => (k.to_owned(), v.to_owned()),
            None => (t.to_owned(), String::new()),
        })
        .collect()
}

/// mount(2); an empty `fstype` or `data` is passed as NULL. `EBUSY` (already mounted)
/// is not an error.
pub fn mount(src: &str, target: &str, fstype: &str, flags: MsFlags, data: &str) -> Result<()> {
    let _ = std::fs::create_dir_all(target);
    match nix::mount::mount(
        Some(src),
        target,
        (!fstype.is_empty()).then_some(fstype),
        flags,
        (!data.is_empty()).then_some(data),
    ) {
        Ok(()) | Err(Errno::EBUSY) => Ok(()),
        Err(e) => bail!(
            "mount {src} on {target} ({fstype}): {}",
            std::io::Error::from(e)
        ),
    }
}

fn is_mountpoint(target: &str) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(target))
}

fn mount_if_missing(src: &str, target: &str, fstype: &str, flags: MsFlags, data: &str) {
    if is_mountpoint(target) {
        return;
    }
    if let Err(e) = mount(src, target, fstype, flags, data) {
        tracing::warn!("{e:#}");
    }
}

/// Make sure fds 0/1/2 exist and point at the console (the initramfs may lack
/// /dev/console, in which case the kernel started us with no fds at all).
fn ensure_console() {
    let have_stderr = fcntl(2, FcntlArg::F_GETFD).is_ok();
    if have_stderr {
        return;
    }
    if let Ok(f) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/console")
    {
        let fd = f.as_raw_fd();
        for target in 0..3 {
            let _ = dup2(fd, target);
        }
        if fd > 2 {
            // Keep the standard fds, drop the original.
            drop(f);
        } else {
            std::mem::forget(f);
        }
    }
}

fn load_module(path: &Path) -> Result<()> {
    let f = File::open(path).with_context(|| format!("open {}", path.display()))?;
    match finit_module(&f, c"", ModuleInitFlags::empty()) {
        Ok(()) | Err(Errno::EEXIST) => Ok(()),
        Err(e) => bail!(
            "finit_module {}: {}",
            path.display(),
            std::io::Error::from(e)
        ),
    }
}

fn wait_for(path: &Path, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if path.exists() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    path.exists()
}

/// The initramfs stage: modules, root disk, switch_root into it.
pub fn initramfs_stage() -> Result<()> {
    mount(
        "devtmpfs",
        "/dev",
        "devtmpfs",
        MsFlags::MS_NOSUID,
        "mode=0755",
    )?;
    ensure_console();
    mount(
        "proc",
        "/proc",
        "proc",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        "",
    )?;
    mount(
        "sysfs",
        "/sys",
        "sysfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        "",
    )?;
    let args = cmdline();
    let list = std::fs::read_to_string("/kiln/modules").context("read /kiln/modules")?;
    for name in list.split_whitespace() {
        let file = if name.ends_with(".ko") {
            name.to_owned()
        } else {
            format!("{name}.ko")
        };
        let path = Path::new("/lib/modules/kiln").join(&file);
        if let Err(e) = load_module(&path) {
            tracing::warn!("{e:#}");
        }
    }
    let root_dev = args
        .get("root")
        .cloned()
        .unwrap_or_else(|| "/dev/vda".into());
    if !wait_for(Path::new(&root_dev), Duration::from_secs(10)) {
        bail!("root device {root_dev} did not appear within 10 s");
    }
    let fstype = args.get("rootfstype").map_or("ext4", String::as_str);
    mount(&root_dev, "/newroot", fstype, MsFlags::empty(), "")?;
    for d in ["dev", "proc", "sys"] {
        let target = format!("/newroot/{d}");
        let _ = std::fs::create_dir_all(&target);
        mount(&format!("/{d}"), &target, "", MsFlags::MS_MOVE, "")?;
    }
    // Free the initramfs copies of the agent and modules (they would otherwise sit in
    // every VM's RAM and every memory snapshot). The running binary stays mapped.
    let _ = std::fs::remove_file("/init");
    let _ = std::fs::remove_dir_all("/lib/modules/kiln");
    let _ = std::fs::remove_dir_all("/kiln");
    std::env::set_current_dir("/newroot").context("chdir /newroot")?;
    mount(".", "/", "", MsFlags::MS_MOVE, "")?;
    nix::unistd::chroot(".")
        .map_err(std::io::Error::from)
        .context("chroot")?;
    std::env::set_current_dir("/").context("chdir /")?;
    tracing::info!(root = %root_dev, "switched to the root disk");
    Ok(())
}

/// Make sure /proc is there (needed to read the kernel command line).
pub fn mount_proc() {
    mount_if_missing(
        "proc",
        "/proc",
        "proc",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        "",
    );
}

/// Init chores in the real root.
pub fn real_root_setup(args: &HashMap<String, String>) {
    let nosuid_nodev = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    mount_if_missing(
        "devtmpfs",
        "/dev",
        "devtmpfs",
        MsFlags::MS_NOSUID,
        "mode=0755",
    );
    ensure_console();
    mount_if_missing(
        "proc",
        "/proc",
        "proc",
        nosuid_nodev | MsFlags::MS_NOEXEC,
        "",
    );
    mount_if_missing(
        "sysfs",
        "/sys",
        "sysfs",
        nosuid_nodev | MsFlags::MS_NOEXEC,
        "",
    );
    mount_if_missing(
        "devpts",
        "/dev/pts",
        "devpts",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        "gid=5,mode=620,ptmxmode=666",
    );
    mount_if_missing("shm", "/dev/shm", "tmpfs", nosuid_nodev, "mode=1777");
    mount_if_missing("tmpfs", "/tmp", "tmpfs", nosuid_nodev, "mode=1777");
    mount_if_missing("tmpfs", "/run", "tmpfs", nosuid_nodev, "mode=0755");
    if !Path::new("/dev/ptmx").exists() {
        let _ = std::os::unix::fs::symlink("pts/ptmx", "/dev/ptmx");
    }
    for (link, target) in [
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
    ] {
        if std::fs::symlink_metadata(link).is_err() {
            let _ = std::os::unix::fs::symlink(target, link);
        }
    }
    let hostname = args
        .get("kiln.hostname")
        .filter(|h| !h.is_empty())
        .cloned()
        .unwrap_or_else(|| "kiln".into());
    set_hostname(&hostname);
    if let Err(e) = net::setup(args.get("kiln.net").is_some_and(|v| v == "1")) {
        tracing::warn!("network setup: {e:#}");
    }
}

fn set_hostname(name: &str) {
    if let Err(e) = nix::unistd::sethostname(name) {
        tracing::warn!("sethostname: {}", std::io::Error::from(e));
    }
    let hosts = std::fs::read_to_string("/etc/hosts").unwrap_or_default();
    if !hosts.split_whitespace().any(|w| w == name) {
        let mut s = hosts;
        if !s.contains("localhost") {
            s.push_str("127.0.0.1\tlocalhost\n");
        }
        if !s.is_empty() && !s.ends_with('\n') {
            s.push('\n');
        }
        s.push_str(&format!("127.0.1.1\t{name}\n"));
        let _ = std::fs::write("/etc/hosts", s);
    }
}

/// Find `/dev/vportNpM` whose sysfs name is `port_name`, waiting up to `timeout`.
pub fn find_port(port_name: &str, timeout: Duration) -> Result<PathBuf> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(rd) = std::fs::read_dir("/sys/class/virtio-ports") {
            for e in rd.flatten() {
                let name = std::fs::read_to_string(e.path().join("name")).unwrap_or_default();
                if name.trim() == port_name {
                    let dev = Path::new("/dev").join(e.file_name());
                    if dev.exists() {
                        return Ok(dev);
                    }
                }
            }
        }
        if Instant::now() >= deadline {
            bail!("virtio-serial port {port_name:?} not found");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn sigset(signals: &[Signal]) -> SigSet {
    signals.iter().copied().collect()
}

/// Block SIGTERM/SIGINT in this (the main) thread; threads created later inherit the
/// mask, so only [`forward_signals`]' `sigwait` ever receives them. SIGIO is blocked too:
/// it only ever wakes the port loop through a signalfd (see [`arm_port_sigio`]). Children
/// reset their mask before exec (see `exec::command`).
pub fn block_signals() {
    let _ = sigset(&[Signal::SIGTERM, Signal::SIGINT, Signal::SIGIO]).thread_block();
}

/// PID 1 forwards SIGTERM/SIGINT to every process it started (their process groups).
/// The kernel never delivers unhandled signals to PID 1, so this is the only way a
/// `kill 1` / ctrl-alt-del reaches the workload.
pub fn forward_signals(procs: std::sync::Arc<Procs>) {
    let set = sigset(&[Signal::SIGTERM, Signal::SIGINT]);
    let _ = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            if let Ok(sig) = set.wait() {
                for pid in procs.running_pids() {
                    let _ = killpg(Pid::from_raw(pid), sig);
                }
                tracing::info!(sig = sig as i32, "forwarded signal to children");
            }
        });
}

/// Asks the kernel to raise SIGIO (blocked, so it stays pending) whenever
/// the host side of the agent port connects or disconnects, or data arrives.
///
/// A virtio-serial port reads as EOF and polls as `POLLHUP` for as long as no host is
/// connected, so `poll` cannot wait for the next host. Without this the port loop
/// could only re-check on a timer, and every restored sandbox's first host connection
/// would wait out the rest of that timer before its hello was even read. The virtio
/// console driver raises SIGIO on the port-open control message, which is exactly the
/// event needed. Without it (a port that refuses `O_ASYNC`) [`wait_for_host`] falls
/// back to a short timer.
pub fn arm_port_sigio(port: BorrowedFd<'_>) {
    match port_sigio(port) {
        Ok(sigio) => {
            let _ = PORT_SIGIO.set(sigio);
        }
        Err(e) => {
            tracing::warn!(error = %e, "agent port without SIGIO; polling for the host")
        }
    }
}

/// Directs the port's SIGIO at this process and returns a signalfd that reads it. Every
/// thread blocks SIGIO, so it stays pending until [`wait_for_host`] takes it.
fn port_sigio(port: BorrowedFd<'_>) -> std::io::Result<SignalFd> {
    let fd = port.as_raw_fd();
    let flags = OFlag::from_bits_retain(fcntl(fd, FcntlArg::F_GETFL)?);
    // SAFETY: F_SETOWN takes a plain integer (the pid to signal) and no pointer, and `fd`
    // is borrowed, so open for the whole call. Neither nix nor rustix wraps F_SETOWN.
    if unsafe { libc::fcntl(fd, libc::F_SETOWN, std::process::id() as libc::c_int) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_ASYNC))?;
    let sigio = sigset(&[Signal::SIGIO]);
    Ok(SignalFd::with_flags(
        &sigio,
        SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC,
    )?)
}

/// Reads the port's SIGIO once [`arm_port_sigio`] succeeded.
static PORT_SIGIO: OnceLock<SignalFd> = OnceLock::new();

/// Called by the port loop while no host is connected: returns on the kernel's SIGIO
/// (consuming it; a stale one costs one extra turn of the loop) or after a timer that
/// only backs it up.
pub fn wait_for_host() {
    let Some(sigio) = PORT_SIGIO.get() else {
        std::thread::sleep(Duration::from_millis(50));
        return;
    };
    let mut fds = [PollFd::new(sigio.as_fd(), PollFlags::POLLIN)];
    let _ = poll(&mut fds, PollTimeout::from(250u16));
    let _ = sigio.read_signal();
}
