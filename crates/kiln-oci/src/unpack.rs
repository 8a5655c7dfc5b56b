//! Applying image layers to a rootfs directory without ever touching anything outside it.
//!
//! A layer is an untrusted tar stream. The `tar` crate parses it, but its `unpack` follows
//! symlinks that earlier entries planted, so every write here goes through a directory file
//! descriptor reached from the rootfs one component at a time with `O_NOFOLLOW`: a
//! symlink anywhere in an entry's parent chain (`a -> /etc`, then `a/passwd`) is refused
//! rather than followed, as are absolute paths, `..` components, hardlinks whose target
//! cannot be reached that way, and a directory replaced by a non-directory within one layer.
//! Symlinks themselves are created verbatim: they are only ever resolved later, inside the
//! guest, where `/` is the rootfs.
//!
//! Overlay semantics follow the OCI image spec: `.wh.NAME` deletes `NAME` from lower layers,
//! `.wh..wh..opq` hides every lower-layer entry of its directory.

use std::collections::{BTreeMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, Timespec, Timestamps, XattrFlags};
use rustix::io::Errno;
use tar::EntryType;

use crate::error::{OciError, Result};

const WHITEOUT_PREFIX: &[u8] = b".wh.";
const OPAQUE: &[u8] = b".wh..wh..opq";

/// Layer compression, detected from the stream's magic bytes (media types lie more often).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// A plain tar.
    None,
    /// gzip (`1f 8b`).
    Gzip,
    /// zstd (`28 b5 2f fd`).
    Zstd,
}

impl Compression {
    /// Detects the compression from the first bytes of a layer.
    pub fn sniff(head: &[u8]) -> Self {
        if head.starts_with(&[0x1f, 0x8b]) {
            Self::Gzip
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Self::Zstd
        } else {
            Self::None
        }
    }
}

/// Wraps a possibly compressed layer stream in the matching decoder.
pub fn decompress<'a, R: Read + 'a>(reader: R) -> std::io::Result<Box<dyn Read + 'a>> {
    let mut buf = BufReader::with_capacity(256 * 1024, reader);
    let kind = Compression::sniff(buf.fill_buf()?);
    Ok(match kind {
        Compression::None => Box::new(buf),
        Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(buf)),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(buf)?),
    })
}

/// What an unpack wrote, for logs and reports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UnpackStats {
    /// Entries applied (files, dirs, links, whiteouts...).
    pub entries: u64,
    /// Bytes of regular-file content written.
    pub bytes: u64,
    /// Entries skipped because the host refused them (device nodes without privilege...).
    pub skipped: u64,
}

/// Applies layers, in order, to one rootfs directory.
#[derive(Debug)]
pub struct Unpacker {
    root: OwnedFd,
    /// Directory mtimes to set once every layer is in (adding children changes them).
    dir_times: BTreeMap<Vec<OsString>, u64>,
    /// Paths created by the layer being applied: an opaque whiteout must spare them.
    created: HashSet<Vec<OsString>>,
    /// Directories created or updated by the layer being applied.
    layer_dirs: HashSet<Vec<OsString>>,
    /// The parent directory of the previous entry: layers are mostly sorted, so this saves
    /// re-walking the same chain. Dropped whenever anything is removed.
    last_parent: Option<(Vec<OsString>, OwnedFd)>,
    stats: UnpackStats,
    /// Content bytes (holes included) the layers may write in all.
    limit: u64,
}

/// The default content cap: the largest disk a spec may ask for. A rootfs past it could
/// never be built into a VM disk, so unpacking it would only fill the host's.
pub const DEFAULT_CONTENT_LIMIT: u64 = (*kiln_spec::Resources::DISK_MIB.end() as u64) << 20;

fn io_err(context: impl Into<String>, e: impl Into<std::io::Error>) -> OciError {
    OciError::io(context, e.into())
}

fn display(comps: &[OsString]) -> String {
    let parts: Vec<_> = comps.iter().map(|c| c.to_string_lossy()).collect();
    parts.join("/")
}

/// Splits a layer path into clean components, refusing absolute paths and `..`.
fn components(raw: &[u8], shown: &str) -> Result<Vec<OsString>> {
    if raw.first() == Some(&b'/') {
        return Err(OciError::unsafe_entry(shown, "absolute path"));
    }
    let mut out = Vec::new();
    for c in raw.split(|b| *b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return Err(OciError::unsafe_entry(shown, "path has a `..` component")),
            c if c.contains(&0) => return Err(OciError::unsafe_entry(shown, "NUL in path")),
            c => out.push(OsStr::from_bytes(c).to_os_string()),
        }
    }
    Ok(out)
}

fn dir_flags() -> OFlags {
    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC
}

impl Unpacker {
    /// Starts unpacking into `root`, an existing (normally empty) directory.
    pub fn new(root: &Path) -> Result<Self> {
        let root_fd = rustix::fs::open(root, dir_flags(), Mode::empty())
            .map_err(|e| io_err(format!("open rootfs {}", root.display()), e))?;
        Ok(Self {
            root: root_fd,
            dir_times: BTreeMap::new(),
            created: HashSet::new(),
            layer_dirs: HashSet::new(),
            last_parent: None,
            stats: UnpackStats::default(),
            limit: DEFAULT_CONTENT_LIMIT,
        })
    }

    /// Caps the content the layers may write, holes included ([`DEFAULT_CONTENT_LIMIT`]
    /// unless set): past it unpacking stops with [`OciError::ContentTooLarge`].
    #[must_use]
    pub fn with_limit(mut self, bytes: u64) -> Self {
        self.limit = bytes;
        self
    }

    fn too_large(&self) -> OciError {
        OciError::ContentTooLarge {
            limit_mib: self.limit.div_ceil(1 << 20),
        }
    }

    /// Applies one layer (plain, gzip or zstd tar).
    pub fn apply_layer<R: Read>(&mut self, layer: R) -> Result<()> {
        self.created.clear();
        self.layer_dirs.clear();
        self.last_parent = None;
        let reader = decompress(layer).map_err(|e| io_err("read layer", e))?;
        let mut archive = tar::Archive::new(reader);
        let entries = archive.entries().map_err(|e| io_err("read layer", e))?;
        for entry in entries {
            let entry = entry.map_err(|e| OciError::Invalid {
                reference: "layer".into(),
                detail: format!("malformed tar: {e}"),
            })?;
            self.apply_entry(entry)?;
        }
        Ok(())
    }

    /// Sets directory mtimes and returns what was written.
    pub fn finish(mut self) -> Result<UnpackStats> {
        self.last_parent = None;
        let times = std::mem::take(&mut self.dir_times);
        for (comps, mtime) in times {
            let fd = if comps.is_empty() {
                Some(rustix::io::dup(&self.root).map_err(|e| io_err("dup rootfs fd", e))?)
            } else {
                // Whiteouts may have removed it since; unsafe chains were refused earlier.
                self.open_dir(&comps, false, "").ok().flatten()
            };
            if let Some(fd) = fd {
                let _ = rustix::fs::futimens(&fd, &times_of(mtime));
            }
        }
        Ok(self.stats)
    }

    fn apply_entry<R: Read>(&mut self, mut entry: tar::Entry<'_, R>) -> Result<()> {
        let kind = entry.header().entry_type();
        if matches!(kind, EntryType::XGlobalHeader | EntryType::XHeader) {
            return Ok(());
        }
        let raw = entry.path_bytes().into_owned();
        let shown = String::from_utf8_lossy(&raw).into_owned();
        let comps = components(&raw, &shown)?;
        self.stats.entries += 1;
        let header = entry.header();
        let mode = header.mode().map_err(|e| bad_header(&shown, e))? & 0o7777;
        let uid = owner_id(header.uid(), &shown)?;
        let gid = owner_id(header.gid(), &shown)?;
        let mtime = header.mtime().map_err(|e| bad_header(&shown, e))?;

        let Some((name, parent_comps)) = comps.split_last() else {
            // The rootfs itself (`./`): take its metadata, nothing else.
            if kind.is_dir() {
                let root = rustix::io::dup(&self.root).map_err(|e| io_err("dup rootfs fd", e))?;
                set_owner_mode(&root, uid, gid, mode, &shown)?;
                self.dir_times.insert(Vec::new(), mtime);
            }
            return Ok(());
        };
        let name_bytes = name.as_bytes();

        if name_bytes == OPAQUE {
            return self.opaque(parent_comps, &shown);
        }
        if let Some(target) = name_bytes.strip_prefix(WHITEOUT_PREFIX) {
            if target.is_empty() || target == b"." || target == b".." {
                return Err(OciError::unsafe_entry(&shown, "malformed whiteout"));
            }
            let Some(parent) = self.open_dir(parent_comps, false, &shown)? else {
                return Ok(());
            };
            self.last_parent = None;
            return remove_all(&parent, OsStr::from_bytes(target), &shown);
        }

        let parent = self.parent_fd(parent_comps, &shown)?;
        let xattrs = xattrs_of(&mut entry);
        match kind {
            EntryType::Directory => {
                match rustix::fs::statat(&parent, name, AtFlags::SYMLINK_NOFOLLOW) {
                    Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => {}
                    Ok(_) => {
                        self.last_parent = None;
                        rustix::fs::unlinkat(&parent, name, AtFlags::empty())
                            .map_err(|e| io_err(format!("replace {shown}"), e))?;
                        mkdir(&parent, name, &shown)?;
                    }
                    Err(Errno::NOENT) => mkdir(&parent, name, &shown)?,
                    Err(e) => return Err(io_err(format!("stat {shown}"), e)),
                }
                let fd = rustix::fs::openat(&parent, name, dir_flags(), Mode::empty())
                    .map_err(|e| io_err(format!("open {shown}"), e))?;
                set_owner_mode(&fd, uid, gid, mode, &shown)?;
                set_xattrs(&fd, &xattrs, &shown);
                self.dir_times.insert(comps.clone(), mtime);
                self.layer_dirs.insert(comps.clone());
            }
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                // The declared size first: a sparse entry of a few bytes can claim a
                // terabyte of zeros, which would take hours just to read through.
                let budget = self.limit.saturating_sub(self.stats.bytes);
                if entry.size() > budget {
                    return Err(self.too_large());
                }
                self.clear_slot(&parent, &comps, &shown)?;
                let fd = rustix::fs::openat(
                    &parent,
                    name,
                    OFlags::WRONLY
                        | OFlags::CREATE
                        | OFlags::EXCL
                        | OFlags::NOFOLLOW
                        | OFlags::CLOEXEC,
                    Mode::from_raw_mode(0o600),
                )
                .map_err(|e| io_err(format!("create {shown}"), e))?;
                let mut file = std::fs::File::from(fd);
                let n = match copy_sparse(&mut entry, &mut file, budget) {
                    Ok(n) => n,
                    Err(CopyError::OverBudget) => return Err(self.too_large()),
                    Err(CopyError::Io(e)) => return Err(io_err(format!("write {shown}"), e)),
                };
                file.flush()
                    .map_err(|e| io_err(format!("write {shown}"), e))?;
                self.stats.bytes += n;
                set_owner_mode(&file, uid, gid, mode, &shown)?;
                set_xattrs(&file, &xattrs, &shown);
                let _ = rustix::fs::futimens(&file, &times_of(mtime));
            }
            EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| OciError::unsafe_entry(&shown, "symlink without a target"))?
                    .into_owned();
                self.clear_slot(&parent, &comps, &shown)?;
                rustix::fs::symlinkat(target.as_slice(), &parent, name)
                    .map_err(|e| io_err(format!("symlink {shown}"), e))?;
                set_owner_times_nofollow(&parent, name, uid, gid, mtime);
            }
            EntryType::Link => {
                let raw_target = entry
                    .link_name_bytes()
                    .ok_or_else(|| OciError::unsafe_entry(&shown, "hardlink without a target"))?
                    .into_owned();
                let target = components(&raw_target, &shown).map_err(|_| {
                    OciError::unsafe_entry(
                        &shown,
                        format!(
                            "hardlink target {:?} is outside the rootfs",
                            String::from_utf8_lossy(&raw_target)
                        ),
                    )
                })?;
                let Some((tname, tparent_comps)) = target.split_last() else {
                    return Err(OciError::unsafe_entry(
                        &shown,
                        "hardlink to the rootfs itself",
                    ));
                };
                let tparent = self
                    .open_dir(tparent_comps, false, &shown)?
                    .ok_or_else(|| {
                        OciError::unsafe_entry(
                            &shown,
                            format!("hardlink target {} does not exist", display(&target)),
                        )
                    })?;
                match rustix::fs::statat(&tparent, tname, AtFlags::SYMLINK_NOFOLLOW) {
                    Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => {
                        return Err(OciError::unsafe_entry(&shown, "hardlink to a directory"));
                    }
                    Ok(_) => {}
                    Err(_) => {
                        return Err(OciError::unsafe_entry(
                            &shown,
                            format!("hardlink target {} does not exist", display(&target)),
                        ));
                    }
                }
                if target == comps {
                    return Ok(());
                }
                self.clear_slot(&parent, &comps, &shown)?;
                // Flags 0: a link to a symlink links the symlink itself, never its target.
                rustix::fs::linkat(&tparent, tname, &parent, name, AtFlags::empty())
                    .map_err(|e| io_err(format!("hardlink {shown}"), e))?;
            }
            EntryType::Char | EntryType::Block | EntryType::Fifo => {
                let (ft, dev) = match kind {
                    EntryType::Fifo => (FileType::Fifo, 0),
                    _ => {
                        let major = entry.header().device_major().ok().flatten().unwrap_or(0);
                        let minor = entry.header().device_minor().ok().flatten().unwrap_or(0);
                        let ft = if kind == EntryType::Char {
                            FileType::CharacterDevice
                        } else {
                            FileType::BlockDevice
                        };
                        (ft, rustix::fs::makedev(major, minor))
                    }
                };
                self.clear_slot(&parent, &comps, &shown)?;
                match rustix::fs::mknodat(&parent, name, ft, Mode::from_raw_mode(mode & 0o777), dev)
                {
                    Ok(()) => {
                        set_owner_times_nofollow(&parent, name, uid, gid, mtime);
                    }
                    Err(e @ (Errno::PERM | Errno::ACCESS | Errno::OPNOTSUPP)) => {
                        tracing::debug!(path = %shown, error = %e, "special file skipped: host refuses it");
                        self.stats.skipped += 1;
                        return Ok(());
                    }
                    Err(e) => return Err(io_err(format!("mknod {shown}"), e)),
                }
            }
            other => {
                tracing::debug!(path = %shown, kind = ?other, "layer entry of unsupported type skipped");
                self.stats.skipped += 1;
                return Ok(());
            }
        }
        self.created.insert(comps);
        Ok(())
    }

    /// Makes room for a non-directory at `comps`: removes what lower layers left there.
    fn clear_slot(&mut self, parent: &OwnedFd, comps: &[OsString], shown: &str) -> Result<()> {
        let name = comps.last().map(OsString::as_os_str).unwrap_or_default();
        match rustix::fs::statat(parent, name, AtFlags::SYMLINK_NOFOLLOW) {
            Err(Errno::NOENT) => Ok(()),
            Err(e) => Err(io_err(format!("stat {shown}"), e)),
            Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => {
                if self.layer_dirs.contains(comps) {
                    // No tool writes one path twice with two types; an attacker does, to
                    // swap a directory for a symlink under entries that follow.
                    return Err(OciError::unsafe_entry(
                        shown,
                        "replaces a directory created earlier in the same layer",
                    ));
                }
                self.last_parent = None;
                remove_all(parent, name, shown)
            }
            Ok(_) => rustix::fs::unlinkat(parent, name, AtFlags::empty())
                .map_err(|e| io_err(format!("replace {shown}"), e)),
        }
    }

    /// Handles `.wh..wh..opq`: hides every lower-layer child of the directory.
    fn opaque(&mut self, dir_comps: &[OsString], shown: &str) -> Result<()> {
        let Some(dir) = self.open_dir(dir_comps, true, shown)? else {
            return Ok(());
        };
        self.last_parent = None;
        let mut names = Vec::new();
        let iter =
            rustix::fs::Dir::read_from(&dir).map_err(|e| io_err(format!("list {shown}"), e))?;
        for ent in iter {
            let ent = ent.map_err(|e| io_err(format!("list {shown}"), e))?;
            let n = ent.file_name().to_bytes();
            if n == b"." || n == b".." {
                continue;
            }
            names.push(OsStr::from_bytes(n).to_os_string());
        }
        for n in names {
            let mut child = dir_comps.to_vec();
            child.push(n.clone());
            if !self.created.contains(&child) {
                remove_all(&dir, &n, shown)?;
            }
        }
        Ok(())
    }

    fn parent_fd(&mut self, comps: &[OsString], shown: &str) -> Result<OwnedFd> {
        if let Some((cached, fd)) = &self.last_parent {
            if cached == comps {
                return rustix::io::dup(fd).map_err(|e| io_err("dup fd", e));
            }
        }
        let fd = self
            .open_dir(comps, true, shown)?
            .ok_or_else(|| OciError::unsafe_entry(shown, "parent directory vanished"))?;
        let dup = rustix::io::dup(&fd).map_err(|e| io_err("dup fd", e))?;
        self.last_parent = Some((comps.to_vec(), dup));
        Ok(fd)
    }

    /// Walks `comps` from the rootfs, one `openat(O_NOFOLLOW)` per component. Missing
    /// directories are created when `create` (tar streams need not list parents), else
    /// `None` is returned. A symlink or non-directory on the way is refused.
    fn open_dir(
        &mut self,
        comps: &[OsString],
        create: bool,
        shown: &str,
    ) -> Result<Option<OwnedFd>> {
        let mut cur = rustix::io::dup(&self.root).map_err(|e| io_err("dup rootfs fd", e))?;
        for (i, c) in comps.iter().enumerate() {
            let next = match rustix::fs::openat(&cur, c.as_os_str(), dir_flags(), Mode::empty()) {
                Ok(fd) => fd,
                Err(Errno::NOENT) if create => {
                    match rustix::fs::mkdirat(&cur, c.as_os_str(), Mode::from_raw_mode(0o755)) {
                        Ok(()) => {
                            // Implicit parents belong to this layer: an opaque marker
                            // must spare them, and they may not be swapped for a symlink.
                            self.created.insert(comps[..=i].to_vec());
                            self.layer_dirs.insert(comps[..=i].to_vec());
                        }
                        Err(Errno::EXIST) => {}
                        Err(e) => return Err(io_err(format!("create parent of {shown}"), e)),
                    }
                    rustix::fs::openat(&cur, c.as_os_str(), dir_flags(), Mode::empty())
                        .map_err(|e| io_err(format!("open parent of {shown}"), e))?
                }
                Err(Errno::NOENT) => return Ok(None),
                Err(e @ (Errno::LOOP | Errno::NOTDIR)) => {
                    let what =
                        match rustix::fs::statat(&cur, c.as_os_str(), AtFlags::SYMLINK_NOFOLLOW) {
                            Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Symlink => {
                                "a symlink"
                            }
                            Ok(_) => "not a directory",
                            Err(_) => return Err(io_err(format!("open parent of {shown}"), e)),
                        };
                    return Err(OciError::unsafe_entry(
                        shown,
                        format!(
                            "parent {} is {what}: writing through it could leave the rootfs",
                            display(&comps[..=i])
                        ),
                    ));
                }
                Err(e) => return Err(io_err(format!("open parent of {shown}"), e)),
            };
            cur = next;
        }
        Ok(Some(cur))
    }
}

fn bad_header(shown: &str, e: std::io::Error) -> OciError {
    OciError::Invalid {
        reference: "layer".into(),
        detail: format!("bad tar header for {shown:?}: {e}"),
    }
}

fn times_of(mtime: u64) -> Timestamps {
    let t = Timespec {
        tv_sec: mtime.min(i64::MAX as u64) as i64,
        tv_nsec: 0,
    };
    Timestamps {
        last_access: t,
        last_modification: t,
    }
}

fn mkdir(parent: &OwnedFd, name: &OsStr, shown: &str) -> Result<()> {
    rustix::fs::mkdirat(parent, name, Mode::from_raw_mode(0o700))
        .map_err(|e| io_err(format!("mkdir {shown}"), e))
}

/// A uid or gid from a header, as Linux can hold it. `u32::MAX` is `-1`, which chown
/// reads as "leave unchanged" (and rustix refuses), and anything wider is no id at all:
/// an image carrying either was not made by a real build, so it is refused.
fn owner_id(raw: std::io::Result<u64>, shown: &str) -> Result<u32> {
    let v = raw.map_err(|e| bad_header(shown, e))?;
    u32::try_from(v)
        .ok()
        .filter(|v| *v != u32::MAX)
        .ok_or_else(|| OciError::unsafe_entry(shown, format!("owner id {v} is out of range")))
}

/// chown before chmod: chown clears setuid/setgid bits.
fn set_owner_mode(
    fd: impl std::os::fd::AsFd,
    uid: u32,
    gid: u32,
    mode: u32,
    shown: &str,
) -> Result<()> {
    let owner = Some(rustix::fs::Uid::from_raw(uid));
    let group = Some(rustix::fs::Gid::from_raw(gid));
    if let Err(e) = rustix::fs::fchown(&fd, owner, group) {
        // Unprivileged runs (tests as a user) cannot chown; the VM disk is built as root.
        tracing::trace!(path = %shown, error = %e, "chown refused");
    }
    rustix::fs::fchmod(&fd, Mode::from_raw_mode(mode))
        .map_err(|e| io_err(format!("chmod {shown}"), e))
}

/// Only `user.*` and file capabilities are carried over: `trusted.*` and `security.*`
/// (SELinux labels, overlay markers) mean something to the host and are not the image's
/// to set.
fn xattrs_of<R: Read>(entry: &mut tar::Entry<'_, R>) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut out = Vec::new();
    if let Ok(Some(exts)) = entry.pax_extensions() {
        for ext in exts.flatten() {
            if let Some(name) = ext.key_bytes().strip_prefix(b"SCHILY.xattr.") {
                if name.starts_with(b"user.") || name == b"security.capability" {
                    out.push((name.to_vec(), ext.value_bytes().to_vec()));
                }
            }
        }
    }
    out
}

fn set_xattrs(fd: impl std::os::fd::AsFd, xattrs: &[(Vec<u8>, Vec<u8>)], shown: &str) {
    for (name, value) in xattrs {
        if let Err(e) = rustix::fs::fsetxattr(&fd, name.as_slice(), value, XattrFlags::empty()) {
            tracing::debug!(path = %shown, error = %e, "xattr not set: host refuses it");
        }
    }
}

/// `rm -rf` of `parent/name` that never follows a symlink.
fn remove_all(parent: &OwnedFd, name: &OsStr, shown: &str) -> Result<()> {
    let st = match rustix::fs::statat(parent, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => st,
        Err(Errno::NOENT) => return Ok(()),
        Err(e) => return Err(io_err(format!("stat for removal ({shown})"), e)),
    };
    if FileType::from_raw_mode(st.st_mode) != FileType::Directory {
        return rustix::fs::unlinkat(parent, name, AtFlags::empty())
            .map_err(|e| io_err(format!("remove ({shown})"), e));
    }
    let dir = rustix::fs::openat(parent, name, dir_flags(), Mode::empty())
        .map_err(|e| io_err(format!("open for removal ({shown})"), e))?;
    let mut names = Vec::new();
    for ent in rustix::fs::Dir::read_from(&dir).map_err(|e| io_err(format!("list ({shown})"), e))? {
        let ent = ent.map_err(|e| io_err(format!("list ({shown})"), e))?;
        let n = ent.file_name().to_bytes();
        if n != b"." && n != b".." {
            names.push(OsStr::from_bytes(n).to_os_string());
        }
    }
    for n in names {
        remove_all(&dir, &n, shown)?;
    }
    rustix::fs::unlinkat(parent, name, AtFlags::REMOVEDIR)
        .map_err(|e| io_err(format!("remove ({shown})"), e))
}

/// Removes a directory tree that kiln itself owns (a failed or pruned rootfs), without
/// following symlinks out of it.
pub fn remove_tree(path: &Path) -> Result<()> {
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
        return Ok(());
    };
    let parent = match rustix::fs::open(parent, dir_flags(), Mode::empty()) {
        Ok(fd) => fd,
        Err(Errno::NOENT) => return Ok(()),
        Err(e) => return Err(io_err(format!("open {}", parent.display()), e)),
    };
    remove_all(&parent, name, &path.display().to_string())
}

/// Unpacks layer files, in order, into `rootfs` (which must exist), calling `on_layer`
/// with each layer's index before applying it. Ends with a `syncfs` so that the caller's
/// rename publishes a tree that is on disk, not just in the page cache.
pub fn unpack_files(
    rootfs: &Path,
    layers: &[PathBuf],
    on_layer: &mut dyn FnMut(usize),
) -> Result<UnpackStats> {
    let mut u = Unpacker::new(rootfs)?;
    for (i, l) in layers.iter().enumerate() {
        on_layer(i);
        let f =
            std::fs::File::open(l).map_err(|e| io_err(format!("open layer {}", l.display()), e))?;
        u.apply_layer(f)?;
    }
    let root = rustix::io::dup(&u.root).map_err(|e| io_err("dup rootfs fd", e))?;
    let stats = u.finish()?;
    let started = std::time::Instant::now();
    rustix::fs::syncfs(&root).map_err(|e| io_err(format!("sync {}", rootfs.display()), e))?;
    tracing::debug!(elapsed = ?started.elapsed(), rootfs = %rootfs.display(), "rootfs synced");
    Ok(stats)
}

/// Best effort owner and mtime on an entry that must not be followed (a symlink, a
/// device node): the host may refuse either, and the image is still usable without.
fn set_owner_times_nofollow(
    parent: &impl rustix::fd::AsFd,
    name: &std::ffi::OsStr,
    uid: u32,
    gid: u32,
    mtime: u64,
) {
    let _ = rustix::fs::chownat(
        parent,
        name,
        Some(rustix::fs::Uid::from_raw(uid)),
        Some(rustix::fs::Gid::from_raw(gid)),
        AtFlags::SYMLINK_NOFOLLOW,
    );
    let _ = rustix::fs::utimensat(parent, name, &times_of(mtime), AtFlags::SYMLINK_NOFOLLOW);
}

/// Copies an entry's content, leaving holes where it has whole blocks of zeros.
///
/// Images carry sparse files (GNU sparse entries, or just large zero-filled files such
/// as `/var/log/lastlog`); writing their zeros out would cost host disk and time for
/// nothing, since the VM disk builder keeps holes too.
fn copy_sparse(
    src: &mut impl std::io::Read,
    dst: &mut std::fs::File,
    budget: u64,
) -> std::result::Result<u64, CopyError> {
    use std::io::{Seek, SeekFrom, Write};
    const CHUNK: usize = 64 * 1024;
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0u64;
    let mut pending_hole = false;
    loop {
        let n = match src.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        };
        total += n as u64;
        if total > budget {
            return Err(CopyError::OverBudget);
        }
        if buf[..n].iter().all(|&b| b == 0) {
            dst.seek(SeekFrom::Current(n as i64))?;
            pending_hole = true;
        } else {
            dst.write_all(&buf[..n])?;
            pending_hole = false;
        }
    }
    if pending_hole {
        // A trailing hole: the size must still be right.
        dst.set_len(total)?;
    }
    Ok(total)
}

/// Why [`copy_sparse`] stopped.
#[derive(Debug)]
enum CopyError {
    /// More content than the unpacker's cap allows (the header under-declared it).
    OverBudget,
    Io(std::io::Error),
}

impl From<std::io::Error> for CopyError {
    fn from(e: std::io::Error) -> Self {
        Self::Io(e)
    }
}
