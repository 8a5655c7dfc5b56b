//! One QEMU virtual machine and everything it owns.
//!
//! A [`Vm`] owns its QEMU process, its run directory (sockets, console log, memory file,
//! disk or overlay) and its agent connection. Dropping it SIGKILLs QEMU and removes the
//! run directory; QEMU is also started with `PR_SET_PDEATHSIG` so a host process that dies
//! without running destructors does not leave it orphaned. A watcher task reaps QEMU and
//! publishes its exit, so calls pending on a crashed VM fail with [`Error::Exited`]
//! instead of hanging.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use kiln_agent_proto::{AgentClient, ClientError, ExecHandle, ExecOutput, ExecRequest};
use tokio::sync::{watch, Mutex};
use tracing::Instrument as _;

use crate::accel::Resolved;
use crate::disk;
use crate::error::{Error, Result};
use crate::jail::Jail;
use crate::launch::{Egress, EgressProxy, Files};
use crate::provision::KernelAssets;
use crate::qmp::Qmp;
use crate::rundir::RunDir;

/// The line the agent prints on the console once its port is open.
pub const READY_MARKER: &str = "kiln-agent: ready";
/// The virtio-serial port name of the agent channel.
pub const AGENT_PORT: &str = "kiln.agent";
const CONSOLE_TAIL: usize = 3000;

/// The root disk a VM boots from.
#[derive(Debug, Clone)]
pub enum RootDisk {
    /// Build an ext4 image of `disk_mib` from a rootfs directory, inside the VM's run dir
    /// (the directory is not modified; the agent is written to `/.kiln/agent`). The image is
    /// the VM's writable disk and becomes the snapshot's disk with no copy.
    Ext4 {
        /// The unpacked root filesystem.
        rootfs: PathBuf,
        /// Exact disk size.
        disk_mib: u64,
        /// Agent binary to inject (`None`: don't).
        agent: Option<PathBuf>,
    },
    /// Use an existing raw image in place, writable. The caller keeps ownership of it.
    Raw(PathBuf),
    /// A fresh qcow2 overlay (in the run dir) over a read-only raw base.
    Overlay(PathBuf),
}

/// A host -> guest TCP port forward (user-mode networking `hostfwd`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortForward {
    /// Host address to listen on.
    pub host_addr: IpAddr,
    /// Host port.
    pub host_port: u16,
    /// Guest port.
    pub guest_port: u16,
}

/// Guest networking: user-mode (libslirp), so that the guest reaches nothing on or
/// through the host but its egress proxy, with optional port forwards.
///
/// QEMU's user network makes every guest connection from a host socket, and maps the
/// addresses of its own network (the gateway 10.0.2.2, ...) to the host's loopback. With
/// egress, QEMU runs in a network namespace of its own (`crate::jail::netns`) holding only
/// a loopback device and the VM's egress proxy listening on it; the network's host address
/// is the guest's proxy address ([`kiln_agent_proto::EGRESS_PROXY`]), so libslirp answers
/// for it and connects what the guest sends there to the proxy, and nothing else the guest
/// tries has anywhere to go. Without egress the guest has no way out at all:
/// `restrict=on` (forwards in, nothing out).
#[derive(Debug, Clone, Default)]
pub struct NetConfig {
    /// Ingress forwards (only without egress: with it, QEMU's network is its own
    /// namespace and cannot listen on the host's).
    pub forwards: Vec<PortForward>,
    /// The VM's egress proxy (see `kiln_net::proxy`); `None`: the guest has no way out.
    pub egress: Option<Egress>,
}

impl NetConfig {
    /// The `-netdev user` option string.
    fn netdev(&self) -> String {
        let mut netdev = match &self.egress {
            Some(_) => format!(
                "user,id=net0,net=10.0.2.0/24,host={},ipv6=off",
                kiln_agent_proto::EGRESS_PROXY.0
            ),
            None => "user,id=net0,restrict=on".to_owned(),
        };
        for f in &self.forwards {
            netdev.push_str(&format!(
                ",hostfwd=tcp:{}:{}-:{}",
                f.host_addr, f.host_port, f.guest_port
            ));
        }
        netdev
    }
}

/// QEMU's own seccomp policy, on for every VM: no new processes (nothing in a VM's QEMU
/// needs one: migration goes to descriptors kiln passes, the egress proxy is a process of
/// its own), no privilege changes, no scheduling or resource control, no obsolete calls.
pub const SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// Everything needed to boot a VM.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// Name: guest hostname, tracing span, run-dir prefix.
    pub name: String,
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Guest RAM.
    pub memory_mib: u64,
    /// Kernel and initramfs.
    pub kernel: KernelAssets,
    /// The root disk.
    pub disk: RootDisk,
    /// `None`: no network device at all.
    pub network: Option<NetConfig>,
    /// The accelerator (see [`crate::accel::choose`]).
    pub accel: Resolved,
    /// Parent of the per-VM run directory (created if missing). Keep the path short:
    /// unix socket paths are limited to 107 bytes.
    pub run_parent: PathBuf,
    /// Where the serial console goes; `None`: `console.log` in the run dir (removed with
    /// the VM). Errors always carry the console tail either way.
    pub console_log: Option<PathBuf>,
    /// Bound on boot to agent-ready; `None`: the accelerator's default.
    pub boot_timeout: Option<Duration>,
}

impl Disk {
    /// The image's backing chain: what the VM reads besides its own disk.
    fn backing(&self) -> Result<Vec<PathBuf>> {
        match self {
            Self::Overlay(p) => disk::backing_chain(p),
            Self::OwnedRaw(_) | Self::ForeignRaw(_) => Ok(Vec::new()),
        }
    }
}

/// How guest RAM is backed; decides how a snapshot stores it.
#[derive(Debug, Clone)]
enum Ram {
    /// `memory-backend-file,share=on` on a file the VM owns: the snapshot is device state
    /// only (`x-ignore-shared`) and the file itself becomes the bundle's memory image.
    SharedFile(PathBuf),
    /// `share=off` on a bundle's memory file (a private COW mapping): a snapshot must
    /// stream RAM.
    PrivateFile(PathBuf),
}

impl Ram {
    fn file(&self) -> RamFile<'_> {
        match self {
            Self::SharedFile(path) => RamFile { path, shared: true },
            Self::PrivateFile(path) => RamFile {
                path,
                shared: false,
            },
        }
    }
}

/// The disk the VM is running on.
#[derive(Debug, Clone)]
enum Disk {
    /// Writable raw image in the run dir (moved into a snapshot bundle).
    OwnedRaw(PathBuf),
    /// Writable raw image owned by the caller (copied into a snapshot bundle).
    ForeignRaw(PathBuf),
    /// qcow2 overlay in the run dir (flattened into a snapshot bundle).
    Overlay(PathBuf),
}

impl Disk {
    fn drive(&self) -> Drive<'_> {
        let (path, format) = match self {
            Self::OwnedRaw(p) | Self::ForeignRaw(p) => (p, DiskFormat::Raw),
            Self::Overlay(p) => (p, DiskFormat::Qcow2),
        };
        Drive {
            path,
            format,
            snapshot: false,
        }
    }
}

/// The machine shape, recorded in a snapshot manifest so the restore matches it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Shape {
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Guest RAM.
    pub memory_mib: u64,
    /// Whether a virtio-net device exists.
    pub network: bool,
    /// Accelerator.
    pub accel: Resolved,
    /// Machine type string.
    pub machine: String,
    /// Guest hostname.
    pub hostname: String,
}

#[cfg(any(test, feature = "fake"))]
impl Shape {
    /// A shape for tests and the fake hypervisor: 2 vCPUs, 1 GiB, hostname `box`.
    pub(crate) fn sample(accel: Resolved, network: bool) -> Self {
        Self {
            vcpus: 2,
            memory_mib: 1024,
            network,
            accel,
            machine: accel.machine().to_owned(),
            hostname: "box".into(),
        }
    }
}

/// How QEMU ended.
#[derive(Debug, Clone)]
pub(crate) struct Exit(pub String);

/// A running VM.
#[derive(Debug)]
pub struct Vm {
    pub(crate) name: String,
    pub(crate) span: tracing::Span,
    pub(crate) dir: Option<RunDir>,
    pub(crate) pid: u32,
    pub(crate) exit: watch::Receiver<Option<Exit>>,
    pub(crate) qmp: Mutex<Qmp>,
    pub(crate) agent: Option<AgentClient>,
    pub(crate) console: PathBuf,
    pub(crate) agent_sock: PathBuf,
    ram: Ram,
    disk: Disk,
    pub(crate) shape: Shape,
    pub(crate) kernel: KernelAssets,
    pub(crate) forwards: Vec<PortForward>,
    /// The template disk a restored VM's disk chain starts from
    /// ([`crate::RestoreConfig::base_disk`]): its captures keep the disk as one layer over
    /// it instead of flattening it. `None` for a booted VM (a build's bundle must stand
    /// alone) and for restores not given one.
    pub(crate) root_disk: Option<PathBuf>,
    /// The VM's egress proxy, when the guest has a way out.
    pub(crate) egress: Option<EgressProxy>,
    /// The disk's backing chain as kiln made it (nearest first): what a snapshot checks
    /// the disk against before reading through it (its header is QEMU's to write).
    backing: Vec<PathBuf>,
}

/// QEMU's command line for one VM: the one place it is written down.
///
/// [`Vm::boot`] and [`Vm::restore`] launch QEMU with it, and so does the benchmark's floor
/// (`kiln-bench`'s bare `-incoming` restore), so that the floor runs production's device
/// set by construction. What the floor leaves out of production's line, it leaves out
/// through the options documented as such here ([`Console::Discard`],
/// [`Drive::snapshot`]), not through a second copy of the list.
#[derive(Debug, Clone)]
pub struct QemuArgs<'a> {
    /// Accelerator, machine type, CPUs, RAM size and whether a NIC exists; the hostname
    /// names the process (`-name kiln-HOST`) and the guest (`kiln.hostname=`).
    pub shape: &'a Shape,
    /// `-kernel` and `-initrd`. A restore passes its snapshot's own files: the option-ROM
    /// layout must match the one the snapshot was taken with.
    pub kernel: &'a KernelAssets,
    /// Where QEMU serves its sockets ([`QemuArgs::qmp_socket`],
    /// [`QemuArgs::agent_socket`]).
    pub run_dir: &'a Path,
    /// Where the serial console goes.
    pub console: Console<'a>,
    /// The file guest RAM lives in.
    pub ram: RamFile<'a>,
    /// The root disk.
    pub disk: Drive<'a>,
    /// Guest networking; ignored unless `shape.network`.
    pub net: &'a NetConfig,
    /// `-incoming defer`: wait for a migration stream (a restore) instead of booting.
    pub incoming: bool,
}

/// Where a VM's serial console goes.
#[derive(Debug, Clone, Copy)]
pub enum Console<'a> {
    /// Written to this file. kiln's boot and exit errors carry its tail.
    File(&'a Path),
    /// Thrown away (`-serial null`; the serial device is the same). The floor's choice: it
    /// reports no errors with a console tail, so it keeps no log.
    Discard,
}

/// The file guest RAM lives in (`memory-backend-file`).
#[derive(Debug, Clone, Copy)]
pub struct RamFile<'a> {
    /// The file.
    pub path: &'a Path,
    /// `share=on`: guest writes land in the file (a VM's own RAM, which a snapshot then
    /// keeps with no copy). `share=off`: a private copy-on-write mapping (a snapshot
    /// bundle's memory image, which must stay as it is).
    pub shared: bool,
}

/// The root disk (`-drive`, on virtio-blk).
#[derive(Debug, Clone, Copy)]
pub struct Drive<'a> {
    /// The image.
    pub path: &'a Path,
    /// Its format.
    pub format: DiskFormat,
    /// `snapshot=on`: QEMU puts a throwaway overlay of its own over the image and the image
    /// is never written. The floor's choice: production restores onto a `qemu-img create`
    /// overlay made by kiln, and that is part of the work the floor measures kiln
    /// against. Production: `false`.
    pub snapshot: bool,
}

/// A disk image format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskFormat {
    /// A raw image.
    Raw,
    /// A qcow2 image (kiln's overlays).
    Qcow2,
}

impl DiskFormat {
    /// QEMU's name for it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Raw => "raw",
            Self::Qcow2 => "qcow2",
        }
    }
}

/// The monitor socket's and the agent socket's names in the run dir.
const QMP_SOCKET: &str = "qmp.sock";
const AGENT_SOCKET: &str = "agent.sock";

impl QemuArgs<'_> {
    /// The monitor socket QEMU serves (connect with [`crate::qmp::Qmp::connect`]).
    pub fn qmp_socket(&self) -> PathBuf {
        self.run_dir.join(QMP_SOCKET)
    }

    /// The agent channel's socket QEMU serves (connect with [`AgentClient::connect_unix`]).
    pub fn agent_socket(&self) -> PathBuf {
        self.run_dir.join(AGENT_SOCKET)
    }

    /// The arguments for `qemu-system-x86_64`.
    pub fn argv(&self) -> Vec<String> {
        let s = self.shape;
        let mut cmdline = format!(
            "console=ttyS0 root=/dev/vda rw kiln.port={AGENT_PORT} kiln.hostname={} panic=-1 quiet",
            s.hostname
        );
        if s.network {
            cmdline.push_str(" kiln.net=1");
        }
        let mut a: Vec<String> = vec![
            "-name".into(),
            format!("kiln-{}", s.hostname),
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
                "memory-backend-file,id=ram0,size={}M,mem-path={},share={},prealloc=off",
                s.memory_mib,
                self.ram.path.display(),
                if self.ram.shared { "on" } else { "off" }
            ),
            "-nodefaults".into(),
            "-no-user-config".into(),
            "-display".into(),
            "none".into(),
            "-no-reboot".into(),
            "-sandbox".into(),
            SANDBOX.into(),
            "-kernel".into(),
            self.kernel.vmlinuz.display().to_string(),
            "-initrd".into(),
            self.kernel.initramfs.display().to_string(),
            "-append".into(),
            cmdline,
        ];
        match self.console {
            Console::File(path) => a.extend([
                "-chardev".into(),
                format!("file,id=con,path={}", path.display()),
                "-serial".into(),
                "chardev:con".into(),
            ]),
            Console::Discard => a.extend(["-serial".into(), "null".into()]),
        }
        let mut drive = format!(
            "file={},format={},if=none,id=root,cache=writeback,discard=unmap",
            self.disk.path.display(),
            self.disk.format.as_str()
        );
        if self.disk.snapshot {
            drive.push_str(",snapshot=on");
        }
        a.extend([
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", self.qmp_socket().display()),
            "-device".into(),
            "virtio-serial-pci,id=vser0".into(),
            "-chardev".into(),
            format!(
                "socket,id=agent,path={},server=on,wait=off",
                self.agent_socket().display()
            ),
            "-device".into(),
            format!("virtserialport,chardev=agent,name={AGENT_PORT}"),
            "-drive".into(),
            drive,
            "-device".into(),
            "virtio-blk-pci,drive=root".into(),
        ]);
        if s.network {
            a.extend([
                "-netdev".into(),
                self.net.netdev(),
                "-device".into(),
                "virtio-net-pci,netdev=net0".into(),
            ]);
        }
        if self.incoming {
            a.extend(["-incoming".into(), "defer".into()]);
        }
        a
    }
}

/// The last few KB of a console log.
pub(crate) fn console_tail(path: &Path) -> String {
    read_nofollow(path, CONSOLE_TAIL)
}

/// The last `limit` bytes of a file QEMU may have written, as text; empty if it cannot be
/// read. A link is not followed: a jailed QEMU owns its run directory and could put one
/// there in place of its console log, pointing at a host file kiln would then read out
/// into an error message.
pub(crate) fn read_nofollow(path: &Path, limit: usize) -> String {
    use std::io::{Read as _, Seek as _};
    use std::os::unix::fs::OpenOptionsExt as _;
    let Ok(mut f) = std::fs::File::options()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
    else {
        return String::new();
    };
    let len = f.metadata().map_or(0, |m| m.len());
    let _ = f.seek(std::io::SeekFrom::Start(len.saturating_sub(limit as u64)));
    let mut data = Vec::new();
    let _ = f.take(limit as u64).read_to_end(&mut data);
    String::from_utf8_lossy(&data).into_owned()
}

/// The files outside its run directory a VM's QEMU opens, for its jail: the boot files and
/// its disk's backing chain read-only; a bundle's memory image and a caller's raw disk
/// shared; a console log of its own.
fn vm_files(
    kernel: &KernelAssets,
    console: &Path,
    ram: &Ram,
    disk: &Disk,
    backing: &[PathBuf],
    run_dir: &Path,
) -> Files {
    let mut files = Files {
        read: vec![kernel.vmlinuz.clone(), kernel.initramfs.clone()],
        ..Files::default()
    };
    files.read.extend(backing.iter().cloned());
    if let Ram::PrivateFile(p) = ram {
        files.shared.push(p.clone());
    }
    if let Disk::ForeignRaw(p) = disk {
        files.shared.push(p.clone());
    }
    if !console.starts_with(run_dir) {
        files.own.push(console.to_owned());
    }
    files.read.retain(|p| !p.starts_with(run_dir));
    files
}

fn validate_hostname(name: &str) -> Result<String> {
    let h: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .take(63)
        .collect();
    if h.is_empty() {
        return Err(Error::Config("empty VM name".into()));
    }
    Ok(h)
}

impl Vm {
    /// Boots a VM and waits until its agent answers the hello handshake.
    ///
    /// Fails with [`Error::Boot`] (code `boot_failed`, with the console tail) if the guest
    /// does not reach the agent within the boot bound or QEMU exits first.
    ///
    /// Jailed as the environment says ([`Jail::from_env`]); [`Vm::boot_in`] takes the jail.
    pub async fn boot(config: VmConfig) -> Result<Self> {
        Self::boot_in(config, &Jail::from_env()?).await
    }

    /// [`Vm::boot`] with its processes jailed by `jail`.
    pub async fn boot_in(config: VmConfig, jail: &Jail) -> Result<Self> {
        let span = tracing::info_span!("vm", name = %config.name);
        Self::boot_inner(config, jail, span.clone())
            .instrument(span)
            .await
    }

    async fn boot_inner(config: VmConfig, jail: &Jail, span: tracing::Span) -> Result<Self> {
        let started = Instant::now();
        if config.vcpus == 0 || config.memory_mib < 64 {
            return Err(Error::Config("need vcpus >= 1 and memory_mib >= 64".into()));
        }
        let hostname = validate_hostname(&config.name)?;
        let dir = RunDir::create(&config.run_parent, &hostname)?;
        let disk = match &config.disk {
            RootDisk::Ext4 {
                rootfs,
                disk_mib,
                agent,
            } => {
                let img = dir.path().join("disk.raw");
                let (rootfs, agent, n, img2) =
                    (rootfs.clone(), agent.clone(), *disk_mib, img.clone());
                tokio::task::spawn_blocking(move || {
                    disk::make_ext4(&rootfs, &img2, n, agent.as_deref())
                })
                .await
                .map_err(|e| Error::Config(format!("disk task: {e}")))??;
                Disk::OwnedRaw(img)
            }
            RootDisk::Raw(p) => Disk::ForeignRaw(p.clone()),
            RootDisk::Overlay(base) => {
                let ov = dir.path().join("disk.qcow2");
                disk::create_overlay(base, &ov)?;
                Disk::Overlay(ov)
            }
        };
        tracing::debug!(elapsed = ?started.elapsed(), "disk ready");
        let shape = Shape {
            vcpus: config.vcpus,
            memory_mib: config.memory_mib,
            network: config.network.is_some(),
            accel: config.accel,
            machine: config.accel.machine().to_owned(),
            hostname,
        };
        let console = config
            .console_log
            .clone()
            .unwrap_or_else(|| dir.path().join("console.log"));
        let ram = Ram::SharedFile(dir.path().join("memory"));
        let net = config.network.clone().unwrap_or_default();
        let forwards = net.forwards.clone();
        let qemu = QemuArgs {
            shape: &shape,
            kernel: &config.kernel,
            run_dir: dir.path(),
            console: Console::File(&console),
            ram: ram.file(),
            disk: disk.drive(),
            net: &net,
            incoming: false,
        };
        let backing = disk.backing()?;
        let files = vm_files(&config.kernel, &console, &ram, &disk, &backing, dir.path());
        let procs = crate::launch::launch(
            jail,
            dir.path(),
            &shape,
            &qemu.argv(),
            &files,
            config.network.as_ref(),
            &span,
        )
        .await?;
        let (pid, exit) = (procs.pid, procs.exit.clone());
        let agent_sock = qemu.agent_socket();
        let timeout = config
            .boot_timeout
            .unwrap_or_else(|| config.accel.default_boot_timeout());
        let boot_fail = |reason: String| Error::Boot {
            reason,
            console: console_tail(&console),
        };
        let qmp = connect_qmp(dir.path(), pid, &exit)
            .await
            .map_err(boot_fail)?;
        let mut vm = Self {
            name: config.name.clone(),
            span,
            dir: Some(dir),
            pid,
            exit,
            qmp: Mutex::new(qmp),
            agent: None,
            console: console.clone(),
            agent_sock,
            ram,
            disk,
            shape,
            kernel: config.kernel.clone(),
            forwards,
            root_disk: None,
            egress: procs.egress,
            backing,
        };
        let deadline = started + timeout;
        match vm.wait_ready(deadline).await {
            Ok(agent) => {
                tracing::info!(
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    agent_pid = agent.agent_info().pid,
                    "vm ready"
                );
                vm.agent = Some(agent);
                Ok(vm)
            }
            Err(reason) => Err(boot_fail(reason)),
        }
    }

    /// Waits for the console marker, then connects the agent; the error is a reason text.
    async fn wait_ready(&self, deadline: Instant) -> Result<AgentClient, String> {
        let mut exit = self.exit.clone();
        let remaining = || deadline.saturating_duration_since(Instant::now());
        let total = remaining();
        let wait = async {
            loop {
                let text = read_nofollow(&self.console, 1 << 20);
                if memfind(text.as_bytes(), READY_MARKER.as_bytes()) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            AgentClient::connect_unix(&self.agent_sock, remaining().max(Duration::from_secs(1)))
                .await
        };
        tokio::select! {
            r = tokio::time::timeout(remaining(), wait) => match r {
                Ok(Ok(agent)) => Ok(agent),
                Ok(Err(e)) => Err(format!("agent handshake failed: {}", error_chain(&e))),
                Err(_) => Err(format!("agent not ready within {total:?}")),
            },
            status = exit_text(&mut exit) => Err(format!("qemu exited during boot ({status})")),
        }
    }

    /// The VM's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The QEMU process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The run directory (sockets, console, overlay).
    pub fn run_dir(&self) -> &Path {
        self.dir
            .as_ref()
            .map(|d| d.path())
            .unwrap_or(Path::new("/nonexistent"))
    }

    /// The serial console log.
    pub fn console_log(&self) -> &Path {
        &self.console
    }

    /// The last few KB of the serial console.
    pub fn console_tail(&self) -> String {
        console_tail(&self.console)
    }

    /// The active port forwards.
    pub fn forwards(&self) -> &[PortForward] {
        &self.forwards
    }

    /// The machine shape (what a restore must match).
    pub fn shape(&self) -> &Shape {
        &self.shape
    }

    /// The agent connection. Calls made directly on it are not raced against QEMU's exit;
    /// use [`Vm::guard`] (or the wrappers) for an [`Error::Exited`] instead of a bare
    /// `Disconnected`.
    pub fn agent(&self) -> &AgentClient {
        self.agent
            .as_ref()
            .expect("a Vm always has an agent once constructed")
    }

    /// The host end of the agent channel: a unix socket QEMU serves.
    pub fn agent_socket(&self) -> &Path {
        &self.agent_sock
    }

    /// Hands over this handle's agent connection, so that another process can connect to
    /// [`Vm::agent_socket`]: the virtio-serial channel serves one host connection at a
    /// time. The VM stays owned by this handle. Call [`Vm::reconnect_agent`] before
    /// [`Vm::agent`] again.
    pub fn release_agent(&mut self) -> Option<AgentClient> {
        self.agent.take()
    }

    /// Connects this handle to the agent again after [`Vm::release_agent`].
    pub async fn reconnect_agent(&mut self, timeout: Duration) -> Result<()> {
        let client = AgentClient::connect_unix(&self.agent_sock, timeout)
            .await
            .map_err(|e| Error::Agent(Box::new(e)))?;
        self.agent = Some(client);
        Ok(())
    }

    /// How QEMU exited, if it has.
    pub fn exit_status(&self) -> Option<String> {
        self.exit.borrow().as_ref().map(|e| e.0.clone())
    }

    fn exited_error(&self, status: String) -> Error {
        Error::Exited {
            status,
            console: self.console_tail(),
        }
    }

    /// Runs an agent call, failing with [`Error::Exited`] if QEMU exits first (or the call
    /// fails because it did).
    pub async fn guard<T>(
        &self,
        fut: impl std::future::Future<Output = Result<T, ClientError>>,
    ) -> Result<T> {
        let mut exit = self.exit.clone();
        tokio::select! {
            r = fut => match r {
                Ok(v) => Ok(v),
                Err(e) => {
                    // A dead connection is usually a dead QEMU: give the reaper a moment.
                    if matches!(e, ClientError::Disconnected | ClientError::StreamClosed) {
                        let mut exit2 = self.exit.clone();
                        let status = match tokio::time::timeout(Duration::from_millis(500), exit2.wait_for(Option::is_some)).await {
                            Ok(Ok(x)) => x.as_ref().map(|e| e.0.clone()),
                            _ => None,
                        };
                        if let Some(s) = status {
                            return Err(self.exited_error(s));
                        }
                    }
                    Err(Error::Agent(Box::new(e)))
                }
            },
            s = exit_text(&mut exit) => Err(self.exited_error(s)),
        }
    }

    /// Runs a command to completion, collecting its output.
    pub async fn exec_collect(&self, req: ExecRequest) -> Result<ExecOutput> {
        self.guard(self.agent().exec_collect(req)).await
    }

    /// Starts a command; events stream from the handle.
    pub async fn exec(&self, req: ExecRequest) -> Result<ExecHandle> {
        self.guard(self.agent().exec(req)).await
    }

    /// Sets the guest clock to the host's (after a restore the guest clock is stale).
    pub async fn sync_clock(&self) -> Result<()> {
        self.guard(self.agent().set_clock(SystemTime::now()))
            .await
            .map(drop)
    }

    /// Pauses the vCPUs.
    pub async fn pause(&self) -> Result<()> {
        Ok(self.qmp.lock().await.stop().await?)
    }

    /// Resumes the vCPUs.
    pub async fn resume(&self) -> Result<()> {
        Ok(self.qmp.lock().await.cont().await?)
    }

    /// QEMU's run state (`running`, `paused`, ...).
    pub async fn status(&self) -> Result<String> {
        Ok(self.qmp.lock().await.query_status().await?.status)
    }

    /// SIGKILLs QEMU, waits for it to be reaped, removes the run directory.
    pub async fn kill(mut self) {
        kill_pid(self.pid, &self.exit);
        let mut exit = self.exit.clone();
        let _ = tokio::time::timeout(Duration::from_secs(5), exit.wait_for(Option::is_some)).await;
        self.cleanup();
    }

    /// Asks QEMU to quit (guest is not shut down cleanly: the disk is thrown away anyway),
    /// falling back to SIGKILL.
    pub async fn shutdown(mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            self.qmp.lock().await.quit().await
        })
        .await;
        let mut exit = self.exit.clone();
        if tokio::time::timeout(Duration::from_secs(3), exit.wait_for(Option::is_some))
            .await
            .is_err()
        {
            kill_pid(self.pid, &self.exit);
        }
        self.cleanup();
    }

    fn cleanup(&mut self) {
        kill_pid(self.pid, &self.exit);
        if let Some(d) = self.dir.take() {
            let path = d.path().to_owned();
            if let Err(e) = d.close() {
                tracing::warn!(parent: &self.span, dir = %path.display(), error = %e, "cannot remove run dir");
            }
        }
    }

    pub(crate) fn ram_shared_file(&self) -> Option<&Path> {
        match &self.ram {
            Ram::SharedFile(p) => Some(p),
            Ram::PrivateFile(_) => None,
        }
    }

    /// After the disk was frozen onto `top` (a new qcow2 layer QEMU now writes to).
    /// Makes `top`, a new qcow2 layer over the current disk, the disk: the current one
    /// becomes the head of the backing chain [`Vm::check_backing`] expects.
    pub(crate) fn set_overlay_top(&mut self, top: PathBuf) {
        let (old, _, _) = self.disk_source();
        self.backing.insert(0, old.to_owned());
        self.disk = Disk::Overlay(top);
    }

    pub(crate) fn disk_source(&self) -> (&Path, bool, bool) {
        // (path, owned-by-us raw, is overlay)
        match &self.disk {
            Disk::OwnedRaw(p) => (p, true, false),
            Disk::ForeignRaw(p) => (p, false, false),
            Disk::Overlay(p) => (p, false, true),
        }
    }

    /// Freezes the disk as it is now: `new_top`, a fresh qcow2 overlay, takes all writes
    /// from here on (QMP `blockdev-snapshot-sync`, atomic with respect to guest I/O), and
    /// the previous top is returned, read-only from now on. The guest should `sync` first
    /// so that the frozen image holds a consistent filesystem. Only for a VM booted on an
    /// overlay ([`RootDisk::Overlay`]).
    pub async fn freeze_disk(&mut self, new_top: &Path) -> Result<PathBuf> {
        let Disk::Overlay(old) = &self.disk else {
            return Err(Error::Config(
                "freezing the disk needs a VM booted on an overlay".into(),
            ));
        };
        let old = old.clone();
        let args = serde_json::json!({
            "device": "root",
            "snapshot-file": new_top.display().to_string(),
            "format": "qcow2",
            "mode": "absolute-paths",
        });
        self.qmp
            .lock()
            .await
            .execute("blockdev-snapshot-sync", Some(args))
            .await?;
        self.set_overlay_top(new_top.to_owned());
        Ok(old)
    }

    /// Checks that the disk's backing chain is still the one kiln made: a snapshot reads
    /// through it as root, and a jailed QEMU could have rewritten the top's header to
    /// name any host file.
    pub(crate) fn check_backing(&self) -> Result<()> {
        let (top, _, _) = self.disk_source();
        let chain = disk::backing_chain(top)?;
        if chain != self.backing {
            return Err(Error::Snapshot(format!(
                "the disk's backing chain changed ({} names {:?}, kiln made {:?})",
                top.display(),
                chain,
                self.backing
            )));
        }
        Ok(())
    }

    /// Launches QEMU waiting for an incoming migration (used by restore).
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn launch_incoming(
        name: &str,
        shape: Shape,
        kernel: KernelAssets,
        run_parent: &Path,
        memory: Option<&Path>,
        base_disk: &Path,
        root_disk: Option<PathBuf>,
        net: NetConfig,
        console_log: Option<PathBuf>,
        jail: &Jail,
    ) -> Result<Self> {
        // `claimed_by`: who a pooled VM ended up serving (see `Incoming::claimed_by`).
        let span = tracing::info_span!("vm", name = %name, claimed_by = tracing::field::Empty);
        let dir = RunDir::create(run_parent, name)?;
        let ov = dir.path().join("disk.qcow2");
        disk::create_overlay(base_disk, &ov)
            .map_err(|e| Error::Restore(format!("overlay: {}", error_chain(&e))))?;
        let disk = Disk::Overlay(ov);
        let ram = match memory {
            Some(m) => Ram::PrivateFile(m.to_owned()),
            None => Ram::SharedFile(dir.path().join("memory")),
        };
        let console = console_log.unwrap_or_else(|| dir.path().join("console.log"));
        let qemu = QemuArgs {
            shape: &shape,
            kernel: &kernel,
            run_dir: dir.path(),
            console: Console::File(&console),
            ram: ram.file(),
            disk: disk.drive(),
            net: &net,
            incoming: true,
        };
        let backing = disk.backing()?;
        let files = vm_files(&kernel, &console, &ram, &disk, &backing, dir.path());
        let procs = crate::launch::launch(
            jail,
            dir.path(),
            &shape,
            &qemu.argv(),
            &files,
            shape.network.then_some(&net),
            &span,
        )
        .await?;
        let (pid, exit) = (procs.pid, procs.exit.clone());
        let agent_sock = qemu.agent_socket();
        let qmp = connect_qmp(dir.path(), pid, &exit)
            .await
            .map_err(Error::Restore)?;
        Ok(Self {
            name: name.to_owned(),
            span,
            dir: Some(dir),
            pid,
            exit,
            qmp: Mutex::new(qmp),
            agent: None,
            console,
            agent_sock,
            ram,
            disk,
            shape,
            kernel,
            forwards: net.forwards,
            root_disk,
            egress: procs.egress,
            backing,
        })
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.cleanup();
    }
}

/// Connects to a just-started QEMU's monitor; on failure QEMU is killed and the reason
/// (its exit status when it died, else the connect error) returned.
pub(crate) async fn connect_qmp(
    dir: &Path,
    pid: u32,
    exit: &watch::Receiver<Option<Exit>>,
) -> std::result::Result<Qmp, String> {
    match Qmp::connect(&dir.join(QMP_SOCKET), Duration::from_secs(10)).await {
        Ok(q) => Ok(q),
        Err(e) => {
            kill_pid(pid, exit);
            let why = exit
                .borrow()
                .as_ref()
                .map_or_else(|| e.to_string(), |x| x.0.clone());
            Err(format!("qemu did not start: {why}"))
        }
    }
}

/// Waits for QEMU's exit and describes it. Copies out of the `watch` guard before
/// returning: the guard is not `Send`, and holding it across an await point (as a
/// `select!` branch output would) makes every caller's future non-`Send`.
async fn exit_text(exit: &mut watch::Receiver<Option<Exit>>) -> String {
    match exit.wait_for(Option::is_some).await {
        Ok(v) => v.as_ref().map(|e| e.0.clone()).unwrap_or_default(),
        Err(_) => String::new(),
    }
}

/// SIGKILLs `pid` unless the watcher already saw it exit (so a recycled pid is never hit).
pub(crate) fn kill_pid(pid: u32, exit: &watch::Receiver<Option<Exit>>) {
    if pid == 0 || exit.borrow().is_some() {
        return;
    }
    // SAFETY: plain syscall; the pid is our unreaped child (the watcher has not reported
    // its exit), so it cannot have been recycled.
    unsafe {
        libc::kill(pid as libc::pid_t, libc::SIGKILL);
    }
}

fn memfind(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

pub use kiln_spec::error_chain;

#[cfg(test)]
mod tests {
    use super::*;

    /// The engine shares VMs between request handlers (`Arc<Vm>`).
    #[test]
    fn vm_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<super::Vm>();
    }

    fn shape(accel: Resolved, network: bool) -> Shape {
        Shape::sample(accel, network)
    }

    fn kernel() -> KernelAssets {
        KernelAssets {
            version: "6.1.0-test".into(),
            vmlinuz: "/k/vmlinuz".into(),
            initramfs: "/k/initramfs.cpio".into(),
        }
    }

    /// What `Vm::boot` runs: TCG, shared RAM, its own raw disk, user networking with an
    /// egress proxy (the network's host address is the guest's proxy address, no
    /// `restrict`: QEMU's own namespace is the wall), QEMU's seccomp policy.
    #[test]
    fn boot_command_line_is_pinned() {
        let shape = shape(Resolved::Tcg, true);
        let net = NetConfig {
            forwards: Vec::new(),
            egress: Some(Egress {
                command: vec!["kiln".into(), "egress-proxy".into()],
                limits: kiln_net::Limits::default(),
                files: None,
            }),
        };
        let (ram, disk) = (
            Ram::SharedFile("/r/box-1/memory".into()),
            Disk::OwnedRaw("/r/box-1/disk.raw".into()),
        );
        let qemu = QemuArgs {
            shape: &shape,
            kernel: &kernel(),
            run_dir: Path::new("/r/box-1"),
            console: Console::File(Path::new("/r/box-1/console.log")),
            ram: ram.file(),
            disk: disk.drive(),
            net: &net,
            incoming: false,
        };
        // One line, arguments separated by " | ", so that a changed argument shows
        // in place and the pin is not a list to keep in step by hand.
        let want = "-name | kiln-box | -accel | tcg,thread=multi | -machine | pc,memory-backend=ram0 | -cpu | max | -smp | 2 | -m | 1024M | -object | memory-backend-file,id=ram0,size=1024M,mem-path=/r/box-1/memory,share=on,prealloc=off | -nodefaults | -no-user-config | -display | none | -no-reboot | -sandbox | on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny | -kernel | /k/vmlinuz | -initrd | /k/initramfs.cpio | -append | console=ttyS0 root=/dev/vda rw kiln.port=kiln.agent kiln.hostname=box panic=-1 quiet kiln.net=1 | -chardev | file,id=con,path=/r/box-1/console.log | -serial | chardev:con | -qmp | unix:/r/box-1/qmp.sock,server=on,wait=off | -device | virtio-serial-pci,id=vser0 | -chardev | socket,id=agent,path=/r/box-1/agent.sock,server=on,wait=off | -device | virtserialport,chardev=agent,name=kiln.agent | -drive | file=/r/box-1/disk.raw,format=raw,if=none,id=root,cache=writeback,discard=unmap | -device | virtio-blk-pci,drive=root | -netdev | user,id=net0,net=10.0.2.0/24,host=10.0.2.100,ipv6=off | -device | virtio-net-pci,netdev=net0";
        assert_eq!(qemu.argv().join(" | "), want);
        // Without egress: restricted, forwards in and nothing out.
        let net = NetConfig {
            forwards: vec![PortForward {
                host_addr: [127, 0, 0, 1].into(),
                host_port: 18080,
                guest_port: 80,
            }],
            egress: None,
        };
        assert_eq!(
            net.netdev(),
            "user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:18080-:80"
        );
    }

    /// What `Vm::restore` runs: KVM, a bundle's memory image mapped privately, a qcow2
    /// overlay, no network device, waiting for the migration stream.
    #[test]
    fn restore_command_line_is_pinned() {
        let shape = shape(Resolved::Kvm, false);
        let (ram, disk) = (
            Ram::PrivateFile("/b/memory".into()),
            Disk::Overlay("/r/box-2/disk.qcow2".into()),
        );
        let qemu = QemuArgs {
            shape: &shape,
            kernel: &kernel(),
            run_dir: Path::new("/r/box-2"),
            console: Console::File(Path::new("/logs/box.log")),
            ram: ram.file(),
            disk: disk.drive(),
            net: &NetConfig::default(),
            incoming: true,
        };
        // One line, arguments separated by " | ", so that a changed argument shows
        // in place and the pin is not a list to keep in step by hand.
        let want = "-name | kiln-box | -accel | kvm | -machine | microvm,pcie=on,rtc=on,memory-backend=ram0 | -cpu | host | -smp | 2 | -m | 1024M | -object | memory-backend-file,id=ram0,size=1024M,mem-path=/b/memory,share=off,prealloc=off | -nodefaults | -no-user-config | -display | none | -no-reboot | -sandbox | on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny | -kernel | /k/vmlinuz | -initrd | /k/initramfs.cpio | -append | console=ttyS0 root=/dev/vda rw kiln.port=kiln.agent kiln.hostname=box panic=-1 quiet | -chardev | file,id=con,path=/logs/box.log | -serial | chardev:con | -qmp | unix:/r/box-2/qmp.sock,server=on,wait=off | -device | virtio-serial-pci,id=vser0 | -chardev | socket,id=agent,path=/r/box-2/agent.sock,server=on,wait=off | -device | virtserialport,chardev=agent,name=kiln.agent | -drive | file=/r/box-2/disk.qcow2,format=qcow2,if=none,id=root,cache=writeback,discard=unmap | -device | virtio-blk-pci,drive=root | -incoming | defer";
        assert_eq!(qemu.argv().join(" | "), want);
    }

    /// The benchmark's floor: production's restore line for the same inputs with its two
    /// documented differences (no console log; `snapshot=on` on the bundle's raw disk
    /// instead of a kiln overlay) and nothing else, so it follows production wherever
    /// production's line (pinned above) goes.
    #[test]
    fn floor_command_line_is_production_minus_its_options() {
        let shape = shape(Resolved::Tcg, true);
        let (kernel, net) = (kernel(), NetConfig::default());
        let production = QemuArgs {
            shape: &shape,
            kernel: &kernel,
            run_dir: Path::new("/t/b-1"),
            console: Console::File(Path::new("/t/b-1/console.log")),
            ram: RamFile {
                path: Path::new("/b/memory"),
                shared: false,
            },
            disk: Drive {
                path: Path::new("/b/disk.raw"),
                format: DiskFormat::Raw,
                snapshot: false,
            },
            net: &net,
            incoming: true,
        };
        let floor = QemuArgs {
            console: Console::Discard,
            disk: Drive {
                snapshot: true,
                ..production.disk
            },
            ..production
        };
        let mut want = production.argv();
        // `-chardev file,id=con,... -serial chardev:con` gives way to `-serial null`.
        let con = want
            .iter()
            .position(|a| a == "file,id=con,path=/t/b-1/console.log")
            .unwrap()
            - 1;
        assert_eq!(want[con..con + 4][2..], ["-serial", "chardev:con"]);
        want.splice(con..con + 4, ["-serial".to_owned(), "null".to_owned()]);
        let drive = want.iter().position(|a| a == "-drive").unwrap() + 1;
        want[drive].push_str(",snapshot=on");
        assert_eq!(floor.argv(), want);
        assert_eq!(floor.qmp_socket(), Path::new("/t/b-1/qmp.sock"));
        assert_eq!(floor.agent_socket(), Path::new("/t/b-1/agent.sock"));
    }
}
