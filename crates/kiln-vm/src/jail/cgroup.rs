//! Resource limits for a jailed process: a cgroup of its own, under kiln's parent.
//!
//! cgroup v2 where the host has it (the unified hierarchy with the controllers kiln uses:
//! `cpu`, `memory`, `pids`, and `io` where the host has it); else the v1 hierarchies of those controllers (`cpu`,
//! `memory`, `pids`, `blkio`), as older hosts and some VMs (CI's among them) only have
//! those. A host with neither runs VM processes without a cgroup: logged once, shown by
//! `kiln doctor`, and the rlimits the jail sets still bound descriptors and threads.
//!
//! A process's cgroup is `<hierarchy>/<parent>/<uid>` (`KILN_CGROUP_PARENT`, default
//! `kiln`; under systemd, a delegated subtree such as `kiln.slice/vms`): its leased uid
//! names it, so a cgroup left by a process that died with its owner is found and reused
//! by the next lease of that uid. The process joins it itself, before it drops root.

use std::fs::File;
use std::os::fd::{AsRawFd as _, RawFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::JailError;

/// The controllers kiln limits, by their v2 names.
const CONTROLLERS: [&str; 4] = ["cpu", "memory", "pids", "io"];
/// Those it cannot do without: `io` is used where the host has it (some have no block
/// device a cgroup can throttle, e.g. a VM on virtiofs).
const REQUIRED: [&str; 3] = ["cpu", "memory", "pids"];

/// The controllers a `cgroup.controllers` or `cgroup.subtree_control` text names.
fn named(text: &str) -> Vec<&str> {
    text.split_whitespace()
        .map(|c| c.trim_start_matches('+'))
        .collect()
}
/// The CFS period the cpu quota is a share of.
const CPU_PERIOD_US: u64 = 100_000;

/// What the host offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CgroupSupport {
    /// The unified hierarchy, mounted here, with the controllers kiln needs (`io` where there).
    V2 {
        /// The mount point.
        root: PathBuf,
        /// kiln's parent cgroup below it.
        parent: String,
    },
    /// Per-controller hierarchies (those that exist; `io` is `blkio`).
    V1 {
        /// `(v2 controller name, mount point)`.
        mounts: Vec<(&'static str, PathBuf)>,
        /// kiln's parent cgroup below each.
        parent: String,
    },
    /// None: why.
    None(String),
}

impl CgroupSupport {
    /// What this host offers (`/proc/self/mountinfo`, and whether kiln's parent cgroup can
    /// be made and given the controllers).
    pub fn detect(parent: &str) -> Self {
        let mountinfo = match std::fs::read_to_string("/proc/self/mountinfo") {
            Ok(m) => m,
            Err(e) => return Self::None(format!("/proc/self/mountinfo: {e}")),
        };
        let found = Self::from_mountinfo(&mountinfo, parent, |root| {
            std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default()
        });
        match found {
            Self::V2 { ref root, .. } => match enable_v2(root, parent) {
                Ok(()) => found,
                Err(why) => Self::None(why),
            },
            Self::V1 { ref mounts, .. } => {
                for (_, m) in mounts {
                    let dir = m.join(parent);
                    if let Err(e) = std::fs::create_dir_all(&dir) {
                        return Self::None(format!("{}: {e}", dir.display()));
                    }
                }
                found
            }
            Self::None(_) => found,
        }
    }

    /// The hierarchies a mount table offers: v2 when its root has the controllers kiln
    /// needs bound to it (`controllers` reads a v2 root's `cgroup.controllers`), else the
    /// v1 ones.
    pub fn from_mountinfo(
        mountinfo: &str,
        parent: &str,
        controllers: impl Fn(&Path) -> String,
    ) -> Self {
        let mut v2 = None;
        let mut v1 = Vec::new();
        for line in mountinfo.lines() {
            // id parent major:minor root mountpoint options [optional...] - fstype source super
            let Some((left, right)) = line.split_once(" - ") else {
                continue;
            };
            let point = left.split(' ').nth(4).unwrap_or_default();
            let mut r = right.split(' ');
            let (fstype, supers) = (r.next().unwrap_or_default(), r.nth(1).unwrap_or_default());
            match fstype {
                "cgroup2" => v2 = Some(PathBuf::from(unescape(point))),
                "cgroup" => {
                    for (name, v1_name) in [
                        ("cpu", "cpu"),
                        ("memory", "memory"),
                        ("pids", "pids"),
                        ("io", "blkio"),
                    ] {
                        if supers.split(',').any(|o| o == v1_name)
                            && !v1.iter().any(|(n, _)| *n == name)
                        {
                            v1.push((name, PathBuf::from(unescape(point))));
                        }
                    }
                }
                _ => {}
            }
        }
        let parent = parent.to_owned();
        // v2 only when the v1 hierarchies do not hold the controllers (a hybrid host's
        // unified mount has none).
        if let Some(root) = v2 {
            let controllers = controllers(&root);
            let have: Vec<&str> = controllers.split_whitespace().collect();
            if v1.is_empty() || REQUIRED.iter().all(|c| have.contains(c)) {
                return Self::V2 { root, parent };
            }
        }
        if v1.is_empty() {
            return Self::None(
                "no cgroup hierarchy with the cpu, memory, pids or io controller".into(),
            );
        }
        Self::V1 { mounts: v1, parent }
    }

    /// Removes the cgroups under kiln's parent named by a uid `stale` says no live VM
    /// holds: those of processes that outlived their owner's clean-up (a server stopped
    /// with VMs running). A cgroup that still has processes is never removed (`rmdir`
    /// refuses it).
    pub fn sweep(&self, stale: impl Fn(u32) -> bool) {
        let parents: Vec<PathBuf> = match self {
            Self::V2 { root, parent } => vec![root.join(parent)],
            Self::V1 { mounts, parent } => mounts.iter().map(|(_, m)| m.join(parent)).collect(),
            Self::None(_) => Vec::new(),
        };
        for parent in parents {
            let Ok(entries) = std::fs::read_dir(&parent) else {
                continue;
            };
            for e in entries.flatten() {
                let uid = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok());
                if uid.is_some_and(&stale) {
                    let _ = std::fs::remove_dir(e.path());
                }
            }
        }
    }

    /// A one-line account for `kiln doctor`.
    pub fn describe(&self) -> String {
        match self {
            Self::V2 { root, parent } => format!("cgroup v2 at {}/{parent}", root.display()),
            Self::V1 { mounts, parent } => format!(
                "cgroup v1 ({}) under {parent}",
                mounts
                    .iter()
                    .map(|(n, _)| *n)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Self::None(why) => format!("no cgroups: {why}"),
        }
    }
}

/// `\040` and friends in mountinfo paths.
fn unescape(s: &str) -> String {
    let mut out = String::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8) {
                out.push(v as char);
                i += 4;
                continue;
            }
        }
        out.push(b[i] as char);
        i += 1;
    }
    out
}

/// Makes kiln's parent cgroup and hands it the controllers (each level's
/// `cgroup.subtree_control` must name them for the level below to have them).
fn enable_v2(root: &Path, parent: &str) -> Result<(), String> {
    let available = std::fs::read_to_string(root.join("cgroup.controllers"))
        .map_err(|e| format!("{}: {e}", root.join("cgroup.controllers").display()))?;
    let available = named(&available);
    let missing: Vec<&str> = REQUIRED
        .iter()
        .copied()
        .filter(|c| !available.contains(c))
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "cgroup v2 at {} lacks the {} controller(s)",
            root.display(),
            missing.join(", ")
        ));
    }
    let wanted: Vec<&str> = CONTROLLERS
        .iter()
        .copied()
        .filter(|c| available.contains(c))
        .collect();
    let want: String = wanted
        .iter()
        .map(|c| format!("+{c}"))
        .collect::<Vec<_>>()
        .join(" ");
    let hand_down = |level: &Path| -> Result<(), String> {
        let control = level.join("cgroup.subtree_control");
        let enabled = std::fs::read_to_string(&control).unwrap_or_default();
        if wanted.iter().all(|c| named(&enabled).contains(c)) {
            return Ok(());
        }
        std::fs::write(&control, &want).map_err(|e| {
            format!(
                "{}: {e} (a cgroup with processes cannot delegate controllers: run kiln \
                 with a delegated cgroup and KILN_CGROUP_PARENT pointing into it)",
                control.display()
            )
        })
    };
    let mut level = root.to_owned();
    for part in parent.split('/') {
        hand_down(&level)?;
        level = level.join(part);
        std::fs::create_dir_all(&level).map_err(|e| format!("{}: {e}", level.display()))?;
    }
    hand_down(&level)
}

/// The `io.max` limits of one VM, applied to the device its run directory is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoMax {
    /// Bytes per second read.
    pub rbps: Option<u64>,
    /// Bytes per second written.
    pub wbps: Option<u64>,
    /// Reads per second.
    pub riops: Option<u64>,
    /// Writes per second.
    pub wiops: Option<u64>,
}

impl Default for IoMax {
    /// 512 MiB/s and 20000 operations/s each way: far above what one VM needs, well below
    /// what it takes to starve its neighbours on a shared disk.
    fn default() -> Self {
        Self {
            rbps: Some(512 << 20),
            wbps: Some(512 << 20),
            riops: Some(20_000),
            wiops: Some(20_000),
        }
    }
}

impl std::str::FromStr for IoMax {
    type Err = String;

    /// `io.max`'s own syntax without the device: `rbps=N wbps=N riops=N wiops=N`, any of
    /// them, `max` for none; `none` for no limit at all.
    fn from_str(s: &str) -> Result<Self, String> {
        let mut io = Self {
            rbps: None,
            wbps: None,
            riops: None,
            wiops: None,
        };
        if s.trim() == "none" {
            return Ok(io);
        }
        for part in s.split_whitespace() {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| format!("{part:?}: expected key=value"))?;
            let v = match v {
                "max" => None,
                n => Some(
                    n.parse::<u64>()
                        .map_err(|_| format!("{part:?}: not a number"))?,
                ),
            };
            match k {
                "rbps" => io.rbps = v,
                "wbps" => io.wbps = v,
                "riops" => io.riops = v,
                "wiops" => io.wiops = v,
                _ => return Err(format!("{k:?}: one of rbps, wbps, riops, wiops")),
            }
        }
        Ok(io)
    }
}

/// What one process may use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// CPU time per [`CPU_PERIOD_US`], in microseconds.
    pub cpu_quota_us: u64,
    /// Memory, page cache of its files included.
    pub memory_bytes: u64,
    /// Threads and processes.
    pub pids: u64,
    /// Disk I/O on this device (`major`, `minor`), if it is a block device.
    pub io: Option<((u32, u32), IoMax)>,
}

/// QEMU's own memory besides guest RAM: device emulation, buffers, the network stack.
const VMM_OVERHEAD: u64 = 256 << 20;
/// Under TCG, the translated-code buffer QEMU allocates as it goes (1 GiB by default).
const TCG_CODE_BUFFER: u64 = 1 << 30;

impl Limits {
    /// A QEMU of `vcpus` and `memory_mib`: its vCPUs' worth of CPU plus half a core for
    /// the I/O and main-loop threads, guest RAM plus overhead, threads for the vCPUs and
    /// QEMU's worker pool (64) and a margin.
    pub fn for_vmm(
        vcpus: u32,
        memory_mib: u64,
        tcg: bool,
        io: Option<((u32, u32), IoMax)>,
    ) -> Self {
        Self {
            cpu_quota_us: u64::from(vcpus) * CPU_PERIOD_US + CPU_PERIOD_US / 2,
            memory_bytes: (memory_mib << 20) + VMM_OVERHEAD + if tcg { TCG_CODE_BUFFER } else { 0 },
            pids: 128 + u64::from(vcpus),
            io,
        }
    }

    /// An egress proxy serving up to `connections` at once: a thread each at most (the
    /// opened-up ones), the runtime's, and a margin; a core; memory for the connections'
    /// buffers and TLS.
    pub fn for_proxy(connections: usize) -> Self {
        Self {
            cpu_quota_us: CPU_PERIOD_US,
            memory_bytes: 256 << 20,
            pids: connections as u64 + 32,
            io: None,
        }
    }

    /// The files to write and their values, in the order they are written.
    pub fn files(&self, v2: bool) -> Vec<(&'static str, &'static str, String)> {
        let mut out = Vec::new();
        if v2 {
            out.push((
                "cpu",
                "cpu.max",
                format!("{} {CPU_PERIOD_US}", self.cpu_quota_us),
            ));
            out.push(("memory", "memory.max", self.memory_bytes.to_string()));
            out.push(("memory", "memory.swap.max", "0".into()));
            out.push(("pids", "pids.max", self.pids.to_string()));
            if let Some(((major, minor), io)) = self.io {
                let f = |v: Option<u64>| v.map_or_else(|| "max".to_owned(), |n| n.to_string());
                out.push((
                    "io",
                    "io.max",
                    format!(
                        "{major}:{minor} rbps={} wbps={} riops={} wiops={}",
                        f(io.rbps),
                        f(io.wbps),
                        f(io.riops),
                        f(io.wiops)
                    ),
                ));
            }
        } else {
            out.push(("cpu", "cpu.cfs_period_us", CPU_PERIOD_US.to_string()));
            out.push(("cpu", "cpu.cfs_quota_us", self.cpu_quota_us.to_string()));
            out.push((
                "memory",
                "memory.limit_in_bytes",
                self.memory_bytes.to_string(),
            ));
            out.push(("pids", "pids.max", self.pids.to_string()));
            if let Some(((major, minor), io)) = self.io {
                for (file, v) in [
                    ("blkio.throttle.read_bps_device", io.rbps),
                    ("blkio.throttle.write_bps_device", io.wbps),
                    ("blkio.throttle.read_iops_device", io.riops),
                    ("blkio.throttle.write_iops_device", io.wiops),
                ] {
                    if let Some(v) = v {
                        out.push(("io", file, format!("{major}:{minor} {v}")));
                    }
                }
            }
        }
        out
    }
}

/// The whole disk `path` is on, as `io.max` wants it (a partition's parent disk); `None`
/// for a filesystem on no block device (tmpfs, overlay), which cannot be throttled.
pub fn block_device_of(path: &Path) -> Option<(u32, u32)> {
    use std::os::unix::fs::MetadataExt as _;
    let dev = std::fs::metadata(path).ok()?.dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    if major == 0 {
        return None;
    }
    let sys = PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
    if sys.join("partition").exists() {
        let parent = std::fs::read_to_string(sys.join("../dev")).ok()?;
        let (ma, mi) = parent.trim().split_once(':')?;
        return Some((ma.parse().ok()?, mi.parse().ok()?));
    }
    sys.exists().then_some((major, minor))
}

/// A process's cgroup(s): made and limited before it starts, joined by the process
/// itself, removed once it has exited.
#[derive(Debug)]
pub struct Cgroup {
    dirs: Vec<PathBuf>,
    procs: Vec<File>,
}

impl Cgroup {
    /// Makes `name`'s cgroup in every hierarchy of `support` with `limits` written. A
    /// leftover of the same name (a process that died with its owner) is removed first.
    pub fn create(support: &CgroupSupport, name: &str, limits: &Limits) -> Result<Self, JailError> {
        let (places, v2): (Vec<(Option<&str>, PathBuf)>, bool) = match support {
            CgroupSupport::V2 { root, parent } => {
                (vec![(None, root.join(parent).join(name))], true)
            }
            CgroupSupport::V1 { mounts, parent } => (
                mounts
                    .iter()
                    .map(|(c, m)| (Some(*c), m.join(parent).join(name)))
                    .collect(),
                false,
            ),
            CgroupSupport::None(_) => {
                return Ok(Self {
                    dirs: Vec::new(),
                    procs: Vec::new(),
                })
            }
        };
        let mut cg = Self {
            dirs: Vec::new(),
            procs: Vec::new(),
        };
        let mut files = limits.files(v2);
        if let CgroupSupport::V2 { root, parent } = support {
            // Only what kiln's parent hands down (`io` may be missing on this host).
            let control = root.join(parent).join("cgroup.subtree_control");
            let enabled = std::fs::read_to_string(&control).unwrap_or_default();
            files.retain(|(c, _, _)| named(&enabled).contains(c));
        }
        for (controller, dir) in places {
            // A leftover is empty (its processes died with their owner): rmdir takes it.
            let _ = std::fs::remove_dir(&dir);
            std::fs::create_dir(&dir).map_err(JailError::io("creating the cgroup", &dir))?;
            cg.dirs.push(dir.clone());
            for (c, file, value) in &files {
                if controller.is_some_and(|ctl| ctl != *c) {
                    continue;
                }
                let path = dir.join(file);
                std::fs::write(&path, value).map_err(JailError::io("writing", &path))?;
            }
            let procs = dir.join("cgroup.procs");
            // `create`: a no-op on a cgroup (the kernel made it), and what lets a plain
            // directory stand for the hierarchy in tests.
            let f = File::options()
                .write(true)
                .create(true)
                .truncate(false)
                .open(&procs)
                .map_err(JailError::io("opening", &procs))?;
            cg.procs.push(f);
        }
        Ok(cg)
    }

    /// The `cgroup.procs` files the process writes itself into.
    pub fn procs_fds(&self) -> Vec<RawFd> {
        self.procs.iter().map(|f| f.as_raw_fd()).collect()
    }

    /// The cgroup directories (one per hierarchy).
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// Removes the cgroups once their process has exited (a dying process may linger in
    /// them for a moment: a few tries).
    pub async fn remove(self) {
        let Self { dirs, procs } = self;
        drop(procs);
        for dir in dirs {
            for attempt in 0..20 {
                match std::fs::remove_dir(&dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                    Err(e) if attempt == 19 => {
                        tracing::warn!(cgroup = %dir.display(), error = %e, "cannot remove a VM's cgroup");
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
38 31 0:35 / /sys/fs/cgroup/blkio rw,relatime - cgroup cgroup rw,blkio
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn a_hybrid_host_uses_its_v1_controllers() {
        // A hybrid host's unified hierarchy has no controllers: they are bound to v1.
        let s = CgroupSupport::from_mountinfo(HYBRID, "kiln", |_| String::new());
        let CgroupSupport::V1 { mounts, parent } = &s else {
            panic!("{s:?}");
        };
        assert_eq!(parent, "kiln");
        let by: Vec<(&str, &str)> = mounts
            .iter()
            .map(|(c, p)| (*c, p.to_str().unwrap()))
            .collect();
        assert_eq!(
            by,
            [
                ("cpu", "/sys/fs/cgroup/cpu,cpuacct"),
                ("memory", "/sys/fs/cgroup/memory"),
                ("io", "/sys/fs/cgroup/blkio"),
                ("pids", "/sys/fs/cgroup/pids"),
            ]
        );
        assert!(s.describe().starts_with("cgroup v1"));
        let none =
            CgroupSupport::from_mountinfo("1 0 0:1 / / rw - ext4 /dev/vda rw\n", "kiln", |_| {
                String::new()
            });
        assert!(matches!(none, CgroupSupport::None(_)));
        let pure = "30 23 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate\n";
        let all = |_: &Path| "cpuset cpu io memory hugetlb pids rdma".to_owned();
        assert!(matches!(
            CgroupSupport::from_mountinfo(pure, "kiln", all),
            CgroupSupport::V2 { .. }
        ));
        // A hybrid host whose unified hierarchy holds the controllers uses it.
        assert!(matches!(
            CgroupSupport::from_mountinfo(HYBRID, "kiln", all),
            CgroupSupport::V2 { .. }
        ));
    }

    #[test]
    fn limits_follow_the_shape_and_are_written_in_each_version() {
        let io = IoMax::default();
        let l = Limits::for_vmm(2, 1024, false, Some(((254, 0), io)));
        assert_eq!(l.cpu_quota_us, 250_000);
        assert_eq!(l.memory_bytes, (1024 << 20) + (256 << 20));
        assert_eq!(l.pids, 130);
        assert_eq!(
            Limits::for_vmm(1, 512, true, None).memory_bytes,
            (512 << 20) + (256 << 20) + (1 << 30),
            "TCG's code buffer is QEMU's too"
        );
        let v2: Vec<String> = l
            .files(true)
            .iter()
            .map(|(_, f, v)| format!("{f}={v}"))
            .collect();
        assert_eq!(
            v2,
            [
                "cpu.max=250000 100000",
                "memory.max=1342177280",
                "memory.swap.max=0",
                "pids.max=130",
                "io.max=254:0 rbps=536870912 wbps=536870912 riops=20000 wiops=20000",
            ]
        );
        let v1: Vec<String> = l
            .files(false)
            .iter()
            .map(|(c, f, v)| format!("{c}/{f}={v}"))
            .collect();
        assert_eq!(
            v1,
            [
                "cpu/cpu.cfs_period_us=100000",
                "cpu/cpu.cfs_quota_us=250000",
                "memory/memory.limit_in_bytes=1342177280",
                "pids/pids.max=130",
                "io/blkio.throttle.read_bps_device=254:0 536870912",
                "io/blkio.throttle.write_bps_device=254:0 536870912",
                "io/blkio.throttle.read_iops_device=254:0 20000",
                "io/blkio.throttle.write_iops_device=254:0 20000",
            ]
        );
        assert_eq!(Limits::for_proxy(256).pids, 288);
    }

    /// kiln's parent is made level by level under a v2 root, each level handing the
    /// controllers down; a VM's cgroup gets its limits and the file it joins through.
    #[test]
    fn a_vm_cgroup_is_made_under_the_parent_with_its_limits_written() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        std::fs::write(r.join("cgroup.controllers"), "cpuset cpu io memory pids").unwrap();
        enable_v2(r, "kiln.slice/vms").unwrap();
        let control = |p: &Path| std::fs::read_to_string(p.join("cgroup.subtree_control")).unwrap();
        assert_eq!(control(r), "+cpu +memory +pids +io");
        assert_eq!(control(&r.join("kiln.slice")), "+cpu +memory +pids +io");
        assert_eq!(control(&r.join("kiln.slice/vms")), "+cpu +memory +pids +io");

        let support = CgroupSupport::V2 {
            root: r.to_owned(),
            parent: "kiln.slice/vms".into(),
        };
        let limits = Limits::for_vmm(1, 512, true, Some(((8, 0), IoMax::default())));
        let cg = Cgroup::create(&support, "1879048193", &limits).unwrap();
        let dir = r.join("kiln.slice/vms/1879048193");
        assert_eq!(cg.dirs(), std::slice::from_ref(&dir));
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap();
        assert_eq!(read("cpu.max"), "150000 100000");
        assert_eq!(
            read("memory.max"),
            ((512u64 << 20) + (256 << 20) + (1 << 30)).to_string()
        );
        assert_eq!(read("memory.swap.max"), "0");
        assert_eq!(read("pids.max"), "129");
        assert!(read("io.max").starts_with("8:0 rbps="));
        assert_eq!(cg.procs_fds().len(), 1);

        // A root lacking a controller kiln needs is no v2 for kiln: it says which.
        let bare = tempfile::tempdir().unwrap();
        std::fs::write(bare.path().join("cgroup.controllers"), "cpu memory io").unwrap();
        let why = enable_v2(bare.path(), "kiln").unwrap_err();
        assert!(why.contains("lacks the pids controller"), "{why}");
        // One without `io` limits the rest, and no `io.max` is written.
        std::fs::write(bare.path().join("cgroup.controllers"), "cpu memory pids").unwrap();
        enable_v2(bare.path(), "kiln").unwrap();
        assert_eq!(control(&bare.path().join("kiln")), "+cpu +memory +pids");
        let no_io = CgroupSupport::V2 {
            root: bare.path().to_owned(),
            parent: "kiln".into(),
        };
        Cgroup::create(&no_io, "9", &limits).unwrap();
        assert!(bare.path().join("kiln/9/pids.max").exists());
        assert!(!bare.path().join("kiln/9/io.max").exists());

        // v1: one cgroup per hierarchy, each with its own controller's files only.
        let v1 = CgroupSupport::V1 {
            mounts: vec![("cpu", r.join("cpu")), ("pids", r.join("pids"))],
            parent: "kiln".into(),
        };
        for m in ["cpu/kiln", "pids/kiln"] {
            std::fs::create_dir_all(r.join(m)).unwrap();
        }
        let cg = Cgroup::create(&v1, "7", &limits).unwrap();
        assert_eq!(cg.dirs().len(), 2);
        assert_eq!(
            std::fs::read_to_string(r.join("cpu/kiln/7/cpu.cfs_quota_us")).unwrap(),
            "150000"
        );
        assert!(!r.join("cpu/kiln/7/pids.max").exists());
        assert_eq!(
            std::fs::read_to_string(r.join("pids/kiln/7/pids.max")).unwrap(),
            "129"
        );
        // No hierarchy: nothing to make, nothing to join.
        let none = Cgroup::create(&CgroupSupport::None("none".into()), "8", &limits).unwrap();
        assert!(none.dirs().is_empty() && none.procs_fds().is_empty());
    }

    #[test]
    fn stale_cgroups_are_swept_and_others_kept() {
        let root = tempfile::tempdir().unwrap();
        for d in ["kiln/5", "kiln/6", "kiln/other"] {
            std::fs::create_dir_all(root.path().join(d)).unwrap();
        }
        let support = CgroupSupport::V2 {
            root: root.path().to_owned(),
            parent: "kiln".into(),
        };
        support.sweep(|uid| uid != 6);
        assert!(!root.path().join("kiln/5").exists());
        assert!(root.path().join("kiln/6").exists(), "a live VM's");
        assert!(
            root.path().join("kiln/other").exists(),
            "not kiln's to remove"
        );
    }

    #[test]
    fn io_limits_parse_like_io_max() {
        let io: IoMax = "wbps=1048576 riops=max".parse().unwrap();
        assert_eq!(io.wbps, Some(1 << 20));
        assert_eq!((io.rbps, io.riops, io.wiops), (None, None, None));
        assert_eq!("none".parse::<IoMax>().unwrap().rbps, None);
        assert!("rbps=fast".parse::<IoMax>().is_err());
        assert!("foo=1".parse::<IoMax>().is_err());
    }
}
