//! Hostile image layers against kiln's real layer unpacker (`kiln_oci::Unpacker`, the code
//! `ImageStore::unpack` runs), then `kiln_oci::vet` on the result as `ImageStore::prepare`
//! does: whatever the layers, nothing outside the scratch rootfs may be created, removed
//! or modified, nothing inside it may be a hardlink to a file outside it, and nothing
//! may panic or hang.
//!
//! The first input byte picks the mode:
//! - even: the rest is one raw layer (plain tar, or gzip / zstd by magic) for libFuzzer to
//!   mutate byte by byte;
//! - odd: the rest drives `arbitrary` to build 1 to 3 layers of well-formed tar entries
//!   with hostile contents: regular files (some all zeros, to hit the hole path), dirs,
//!   symlinks (to the canary by absolute and relative paths, to `..`, ...), hardlinks,
//!   fifos and device nodes, GNU sparse files, whiteouts `.wh.*` and opaque markers, names
//!   such as `../x`, `/abs`, `a/../../b`, `a\0b`, names longer than the 100-byte header
//!   field (GNU long name or PAX path), PAX xattrs, raw unusual type flags, and paths that
//!   reuse an earlier entry's path or go through it (symlink, then a file under it).
//!
//! Layout, per fuzzing process (on /dev/shm when it exists):
//!
//! ```text
//! kiln-fuzz-unpack.<pid>/g/p/root            the scratch rootfs, emptied after every run
//! kiln-fuzz-unpack.<pid>/g/p/canary/victim   a file that must stay untouched
//! kiln-fuzz-unpack.<pid>/g/p/canary/sub/     a directory that must stay untouched
//! ```
//!
//! After every run (and again after `kiln_oci::unpack::remove_tree` cleans the rootfs, as
//! a failed unpack does in production) the whole tree outside `root` must be exactly as it
//! was: same names, types, modes, owners, sizes, mtimes, link counts and contents.
#![no_main]

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use arbitrary::{Result as ArbResult, Unstructured};
use libfuzzer_sys::fuzz_target;
use tar::{EntryType, Header};

/// Fixed mtime given to everything outside the rootfs, so a touch shows.
const EPOCH: i64 = 1_000_000_000;
/// The content cap given to the unpacker, far below production's (the largest disk) so
/// that a layer claiming gigabytes is refused in microseconds rather than written to
/// /dev/shm. Found by this target and fixed: a 77-byte layer claiming a terabyte
/// (`sparse-terabyte`), uid -1 (`uid-minus-one*`), and vetting a FIFO or device node
/// `/etc/os-release` (`os-release-*`); all kept in `fuzz/regressions/unpack/` and replayed
/// by `crates/kiln-oci/tests/unpack.rs`.
const RAW_CONTENT_CAP: u64 = 64 << 20;

#[derive(Debug, PartialEq, Eq)]
struct Meta {
    kind: &'static str,
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    mtime: (i64, i64),
    nlink: u64,
    ino: u64,
    content: Option<Vec<u8>>,
}

struct Scratch {
    base: PathBuf,
    p: PathBuf,
    root: PathBuf,
    canary: PathBuf,
    expected: BTreeMap<PathBuf, Meta>,
}

fn kind_of(ft: std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if ft.is_dir() {
        "dir"
    } else if ft.is_symlink() {
        "symlink"
    } else if ft.is_file() {
        "file"
    } else if ft.is_fifo() {
        "fifo"
    } else if ft.is_char_device() {
        "char"
    } else if ft.is_block_device() {
        "block"
    } else {
        "other"
    }
}

fn meta_of(path: &Path) -> Meta {
    let m = std::fs::symlink_metadata(path)
        .unwrap_or_else(|e| panic!("{} vanished or changed: {e}", path.display()));
    let kind = kind_of(m.file_type());
    let content = match kind {
        "file" => Some(std::fs::read(path).expect("read canary file")),
        "symlink" => Some(
            std::fs::read_link(path)
                .expect("readlink")
                .as_os_str()
                .as_bytes()
                .to_vec(),
        ),
        _ => None,
    };
    Meta {
        kind,
        mode: m.mode(),
        uid: m.uid(),
        gid: m.gid(),
        size: if kind == "dir" { 0 } else { m.size() },
        mtime: (m.mtime(), m.mtime_nsec()),
        nlink: m.nlink(),
        ino: m.ino(),
        content,
    }
}

/// Everything under `base` except the rootfs subtree, without following symlinks.
fn snapshot(s_root: &Path, base: &Path) -> BTreeMap<PathBuf, Meta> {
    let mut out = BTreeMap::new();
    let mut todo = vec![base.to_path_buf()];
    while let Some(dir) = todo.pop() {
        out.insert(dir.clone(), meta_of(&dir));
        let mut names: Vec<_> = std::fs::read_dir(&dir)
            .expect("list outside dir")
            .map(|e| e.expect("dir entry").path())
            .collect();
        names.sort();
        for p in names {
            if p == s_root {
                continue;
            }
            let m = meta_of(&p);
            if m.kind == "dir" {
                todo.push(p);
            } else {
                out.insert(p, m);
            }
        }
    }
    out
}

fn set_epoch(path: &Path) {
    let t = rustix::fs::Timespec {
        tv_sec: EPOCH,
        tv_nsec: 0,
    };
    rustix::fs::utimensat(
        rustix::fs::CWD,
        path,
        &rustix::fs::Timestamps {
            last_access: t,
            last_modification: t,
        },
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
    )
    .expect("set mtime");
}

impl Scratch {
    fn new() -> Self {
        let shm = Path::new("/dev/shm");
        let top = if shm.is_dir() {
            shm.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        // Scratch dirs of fuzzing processes that died (a crash aborts before any cleanup).
        if let Ok(rd) = std::fs::read_dir(&top) {
            for e in rd.flatten() {
                let name = e.file_name();
                let Some(pid) = name
                    .to_str()
                    .and_then(|n| n.strip_prefix("kiln-fuzz-unpack."))
                    .and_then(|p| p.parse::<u32>().ok())
                else {
                    continue;
                };
                if !Path::new(&format!("/proc/{pid}")).exists() {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        let base = top.join(format!("kiln-fuzz-unpack.{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let p = base.join("g").join("p");
        let root = p.join("root");
        let canary = p.join("canary");
        std::fs::create_dir_all(canary.join("sub")).expect("create canary");
        std::fs::write(canary.join("victim"), b"victim: must never change\n").expect("victim");
        std::fs::create_dir(&root).expect("create root");
        for q in [
            canary.join("victim"),
            canary.join("sub"),
            canary.clone(),
            p.clone(),
            base.join("g"),
            base.clone(),
        ] {
            set_epoch(&q);
        }
        let expected = snapshot(&root, &base);
        Self {
            base,
            p,
            root,
            canary,
            expected,
        }
    }

    fn check_outside(&self, when: &str, input: &dyn std::fmt::Debug) {
        let now = snapshot(&self.root, &self.base);
        if now != self.expected {
            let mut diff = String::new();
            for (k, v) in &now {
                match self.expected.get(k) {
                    None => diff += &format!("\n  created: {} {v:?}", k.display()),
                    Some(e) if e != v => {
                        diff += &format!("\n  changed: {} {e:?} -> {v:?}", k.display())
                    }
                    _ => {}
                }
            }
            for k in self.expected.keys() {
                if !now.contains_key(k) {
                    diff += &format!("\n  removed: {}", k.display());
                }
            }
            panic!("unpack touched the host {when}:{diff}\ninput: {input:?}");
        }
    }

    /// Every non-directory inside the rootfs must have all its links inside the rootfs.
    fn check_links_inside(&self) {
        let mut seen: HashMap<(u64, u64), (u64, u64, PathBuf)> = HashMap::new();
        let mut todo = vec![self.root.clone()];
        while let Some(dir) = todo.pop() {
            let Ok(rd) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in rd.flatten() {
                let path = e.path();
                let Ok(m) = std::fs::symlink_metadata(&path) else {
                    continue;
                };
                if m.is_dir() {
                    todo.push(path);
                } else {
                    let slot = seen
                        .entry((m.dev(), m.ino()))
                        .or_insert((0, m.nlink(), path));
                    slot.0 += 1;
                }
            }
        }
        for (count, nlink, path) in seen.values() {
            assert_eq!(
                count,
                nlink,
                "{} has {nlink} links but only {count} inside the rootfs: hardlinked to a \
                 file outside it",
                path.display()
            );
        }
    }

    fn reset(&self, input: &dyn std::fmt::Debug) {
        if let Err(e) = kiln_oci::unpack::remove_tree(&self.root) {
            panic!("remove_tree failed on an unpacked rootfs: {e}\ninput: {input:?}");
        }
        std::fs::create_dir(&self.root).expect("recreate root");
        set_epoch(&self.p);
        self.check_outside("while removing the rootfs", input);
    }
}

fn scratch() -> &'static Scratch {
    static S: OnceLock<Scratch> = OnceLock::new();
    S.get_or_init(Scratch::new)
}

// ---------------------------------------------------------------------------------------
// Structured layers.

const NAMES: &[&[u8]] = &[
    b"a",
    b"b",
    b"c",
    b"a",
    b"b",
    b".",
    b"..",
    b"",
    b".wh.a",
    b".wh.b",
    b".wh..wh..opq",
    b".wh.",
    b".wh..",
    b".wh...",
    b"a\0b",
    b"canary",
    b"victim",
    b"etc",
    // What `vet` looks at.
    b"os-release",
    b"lib",
    b"usr",
    b"bin",
    b"sh",
    b"ld-musl-x86_64.so.1",
];

fn comp(u: &mut Unstructured<'_>) -> ArbResult<Vec<u8>> {
    Ok(match u.int_in_range(0..=NAMES.len() + 1)? {
        i if i < NAMES.len() => NAMES[i].to_vec(),
        i if i == NAMES.len() => {
            // Longer than the 100-byte header field, and up to NAME_MAX and beyond.
            let n = 90 + usize::from(u.arbitrary::<u8>()?) * 2;
            vec![b'l'; n]
        }
        _ => {
            let n = u.int_in_range(1..=6)?;
            u.bytes(n)?.to_vec()
        }
    })
}

fn join(parts: &[Vec<u8>]) -> Vec<u8> {
    parts.join(&b'/')
}

/// A path for a new entry: fresh, an earlier entry's path, or a child of one.
fn path(u: &mut Unstructured<'_>, prev: &[Vec<u8>]) -> ArbResult<Vec<u8>> {
    let choice = u.int_in_range(0..=9)?;
    let mut p = if !prev.is_empty() && choice >= 7 {
        let i = u.choose_index(prev.len())?;
        let mut p = prev[i].clone();
        if choice >= 8 {
            while p.last() == Some(&b'/') {
                p.pop();
            }
            p.push(b'/');
            p.extend(comp(u)?);
        }
        p
    } else {
        let n = u.int_in_range(1..=4)?;
        let mut parts = Vec::new();
        for _ in 0..n {
            parts.push(comp(u)?);
        }
        join(&parts)
    };
    match u.int_in_range(0..=15)? {
        0 => p.insert(0, b'/'),
        1 => p.splice(0..0, *b"./").for_each(drop),
        2 => p.push(b'/'),
        3 => p.splice(0..0, *b"../").for_each(drop),
        _ => {}
    }
    Ok(p)
}

fn link_target(u: &mut Unstructured<'_>, prev: &[Vec<u8>], canary: &Path) -> ArbResult<Vec<u8>> {
    let canary = canary.as_os_str().as_bytes();
    Ok(match u.int_in_range(0..=11)? {
        0 => canary.to_vec(),
        1 => [canary, b"/victim"].concat(),
        2 => [canary, b"/sub"].concat(),
        3 => {
            let ups = u.int_in_range(0..=4)?;
            let mut t = b"../".repeat(ups);
            t.extend_from_slice(if u.arbitrary()? {
                b"canary"
            } else {
                b"canary/victim"
            });
            t
        }
        4 => b"..".to_vec(),
        5 => b"/".to_vec(),
        6 => b".".to_vec(),
        7 => Vec::new(),
        _ => path(u, prev)?,
    })
}

/// Appends `data` padded to whole blocks.
fn put_data(out: &mut Vec<u8>, data: &[u8]) {
    out.extend_from_slice(data);
    let pad = (512 - data.len() % 512) % 512;
    out.extend(std::iter::repeat_n(0u8, pad));
}

fn put_header(out: &mut Vec<u8>, h: &mut Header) {
    h.set_cksum();
    out.extend_from_slice(h.as_bytes());
}

fn pax_record(key: &[u8], value: &[u8]) -> Vec<u8> {
    // "<len> <key>=<value>\n", where <len> counts itself.
    let rest = key.len() + value.len() + 3;
    let mut len = rest + 1;
    while len != rest + len.to_string().len() {
        len = rest + len.to_string().len();
    }
    let mut r = format!("{len} ").into_bytes();
    r.extend_from_slice(key);
    r.push(b'=');
    r.extend_from_slice(value);
    r.push(b'\n');
    r
}

fn ext_entry(out: &mut Vec<u8>, ty: u8, name: &[u8], data: &[u8]) {
    let mut h = Header::new_gnu();
    h.as_gnu_mut().expect("gnu").name[..name.len()].copy_from_slice(name);
    h.set_entry_type(EntryType::new(ty));
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    put_header(out, &mut h);
    put_data(out, data);
}

#[derive(Debug)]
struct Built {
    layers: Vec<Vec<u8>>,
}

fn build_layer(
    u: &mut Unstructured<'_>,
    prev: &mut Vec<Vec<u8>>,
    canary: &Path,
) -> ArbResult<Vec<u8>> {
    let mut out = Vec::new();
    let n = u.int_in_range(0..=24)?;
    for _ in 0..n {
        let p = path(u, prev)?;
        prev.push(p.clone());
        let mut h = Header::new_gnu();
        let mode = match u.int_in_range(0..=3)? {
            0 => u32::from(u.arbitrary::<u16>()?) & 0o7777,
            1 => 0o644,
            _ => 0o755,
        };
        h.set_mode(mode);
        let (uid, gid) = match u.int_in_range(0..=3)? {
            0 => {
                (
                    u64::from(u.arbitrary::<u32>()?),
                    u64::from(u.arbitrary::<u32>()?),
                )
            }
            1 => (1000, 1000),
            _ => (0, 0),
        };
        h.set_uid(uid);
        h.set_gid(gid);
        h.set_mtime(if u.arbitrary()? {
            u64::from(u.arbitrary::<u32>()?)
        } else {
            u.arbitrary::<u64>()?
        });
        let mut pax: Vec<u8> = Vec::new();
        let mut link: Option<Vec<u8>> = None;
        let mut data: Vec<u8> = Vec::new();
        let kind = u.int_in_range(0..=13)?;
        match kind {
            0..=3 => {
                h.set_entry_type(EntryType::Regular);
                data = match u.int_in_range(0..=3)? {
                    0 => Vec::new(),
                    1 => vec![0u8; u.int_in_range(1..=140_000)?],
                    2 => {
                        // Zeros then data, or data then zeros, across 64 KiB chunks.
                        let mut d = vec![0u8; u.int_in_range(1..=140_000)?];
                        let at = u.choose_index(d.len())?;
                        d[at] = 0x55;
                        d
                    }
                    _ => {
                        let n = u.int_in_range(0..=600)?;
                        u.bytes(n)?.to_vec()
                    }
                };
            }
            4 | 5 => h.set_entry_type(EntryType::Directory),
            6 | 7 => {
                h.set_entry_type(EntryType::Symlink);
                link = Some(link_target(u, prev, canary)?);
            }
            8 | 9 => {
                h.set_entry_type(EntryType::Link);
                link = Some(link_target(u, prev, canary)?);
            }
            10 => {
                let ty = match u.int_in_range(0..=2)? {
                    0 => EntryType::Fifo,
                    1 => EntryType::Char,
                    _ => EntryType::Block,
                };
                h.set_entry_type(ty);
                h.set_device_major(u32::from(u.arbitrary::<u8>()?)).ok();
                h.set_device_minor(u32::from(u.arbitrary::<u8>()?)).ok();
            }
            11 => {
                // GNU sparse: up to 4 blocks, real size up to 1 MiB.
                h.set_entry_type(EntryType::GNUSparse);
                let nblocks = u.int_in_range(0..=4)?;
                let mut off = 0u64;
                let mut blocks = Vec::new();
                for _ in 0..nblocks {
                    off += u64::from(u.arbitrary::<u16>()?) & !511;
                    let len = if u.ratio(7, 8)? {
                        u64::from(u.int_in_range(0..=3u8)?) * 512
                    } else {
                        u64::from(u.arbitrary::<u16>()?) % 1500
                    };
                    blocks.push((off, len));
                    off += len;
                }
                let real = if u.ratio(7, 8)? {
                    off
                } else {
                    u64::from(u.arbitrary::<u32>()?) & 0xF_FFFF
                };
                let stored: u64 = blocks.iter().map(|b| b.1).sum();
                let g = h.as_gnu_mut().expect("gnu");
                for (i, (o, l)) in blocks.iter().enumerate() {
                    g.sparse[i].set_offset(*o);
                    g.sparse[i].set_length(*l);
                }
                g.set_real_size(real);
                data = (0..stored).map(|i| (i % 251) as u8 | 1).collect();
            }
            12 => {
                // Unusual and extension type flags, with arbitrary data.
                let ty = *u.choose(b"2467DKLMNSVXgx\x00AZ")?;
                h.set_entry_type(EntryType::new(ty));
                let n = u.int_in_range(0..=200)?;
                data = u.bytes(n)?.to_vec();
                if u.arbitrary()? {
                    link = Some(link_target(u, prev, canary)?);
                }
            }
            _ => {
                // A whiteout or opaque marker spelled out (also reachable through names).
                h.set_entry_type(EntryType::Regular);
                let mut q = p.clone();
                let last = q.iter().rposition(|b| *b == b'/').map_or(0, |i| i + 1);
                q.truncate(last);
                if u.arbitrary()? {
                    q.extend_from_slice(b".wh..wh..opq");
                } else {
                    q.extend_from_slice(b".wh.");
                    q.extend(comp(u)?);
                }
                *prev.last_mut().expect("pushed") = q;
            }
        }
        let p = prev.last().expect("pushed").clone();
        h.set_size(data.len() as u64);

        // How the name travels: in the header, as a GNU long name, or in PAX.
        let enc = u.int_in_range(0..=3)?;
        if p.len() > 100 || enc == 1 {
            if enc == 2 {
                pax.extend(pax_record(b"path", &p));
            } else {
                let mut v = p.clone();
                v.push(0);
                ext_entry(&mut out, b'L', b"././@LongLink", &v);
            }
        } else if enc == 2 {
            pax.extend(pax_record(b"path", &p));
        }
        let g = h.as_gnu_mut().expect("gnu");
        let n = p.len().min(100);
        g.name[..n].copy_from_slice(&p[..n]);
        if let Some(l) = &link {
            let lenc = u.int_in_range(0..=3)?;
            if l.len() > 100 || lenc == 1 {
                if lenc == 2 {
                    pax.extend(pax_record(b"linkpath", l));
                } else {
                    let mut v = l.clone();
                    v.push(0);
                    ext_entry(&mut out, b'K', b"././@LongLink", &v);
                }
            } else if lenc == 2 {
                pax.extend(pax_record(b"linkpath", l));
            }
            let g = h.as_gnu_mut().expect("gnu");
            let n = l.len().min(100);
            g.linkname[..n].copy_from_slice(&l[..n]);
        }
        for _ in 0..u.int_in_range(0..=2)? {
            let key: &[u8] = u.choose(&[
                &b"SCHILY.xattr.user.kiln"[..],
                b"SCHILY.xattr.security.capability",
                b"SCHILY.xattr.trusted.overlay.opaque",
                b"SCHILY.xattr.security.selinux",
                b"SCHILY.xattr.user.",
                b"size",
                b"uid",
                b"mtime",
            ])?;
            let n = u.int_in_range(0..=24)?;
            let v = u.bytes(n)?.to_vec();
            pax.extend(pax_record(key, &v));
        }
        if !pax.is_empty() {
            ext_entry(&mut out, b'x', b"PaxHeaders/e", &pax);
        }
        put_header(&mut out, &mut h);
        put_data(&mut out, &data);
    }
    match u.int_in_range(0..=7)? {
        0 => {}
        1 => out.extend_from_slice(&[0u8; 512]),
        2 => {
            let n = u.int_in_range(0..=64)?;
            out.extend_from_slice(u.bytes(n)?);
        }
        _ => out.extend_from_slice(&[0u8; 1024]),
    }
    Ok(match u.int_in_range(0..=5)? {
        0 => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(&out).expect("gzip");
            e.finish().expect("gzip")
        }
        1 => zstd::encode_all(&out[..], 1).expect("zstd"),
        _ => out,
    })
}

fn build(data: &[u8], canary: &Path) -> Built {
    let mut u = Unstructured::new(data);
    let mut prev = Vec::new();
    let mut layers = Vec::new();
    let n = u.int_in_range(1..=3).unwrap_or(1);
    for _ in 0..n {
        match build_layer(&mut u, &mut prev, canary) {
            Ok(l) => layers.push(l),
            Err(_) => break,
        }
    }
    Built { layers }
}

// ---------------------------------------------------------------------------------------

/// What `ImageStore::prepare` does with the layers: unpack, then vet the rootfs.
fn unpack(s: &Scratch, layers: &[&[u8]]) {
    let mut u = kiln_oci::Unpacker::new(&s.root)
        .expect("open scratch root")
        .with_limit(RAW_CONTENT_CAP);
    for l in layers {
        if u.apply_layer(*l).is_err() {
            // Production stops at the first failing layer and removes the rootfs.
            return;
        }
    }
    if u.finish().is_err() {
        return;
    }
    let _ = kiln_oci::vet(&s.root, Some(8192));
}

fuzz_target!(|data: &[u8]| {
    let s = scratch();
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        unpack(s, &[rest]);
        let shown = format!("raw layer of {} bytes", rest.len());
        s.check_outside("after unpacking", &shown);
        s.check_links_inside();
        s.reset(&shown);
    } else {
        let built = build(rest, &s.canary);
        let layers: Vec<&[u8]> = built.layers.iter().map(Vec::as_slice).collect();
        unpack(s, &layers);
        s.check_outside("after unpacking", &built);
        s.check_links_inside();
        s.reset(&built);
    }
});
