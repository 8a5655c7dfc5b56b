//! Content digests of large sparse files: a snapshot bundle's disk and memory file.
//!
//! A bundle's disk image and guest RAM file are gigabytes of *apparent* size, mostly
//! holes (a 4 GiB disk holding 190 MiB, a 1 GiB memory file of which the guest touched
//! 160 MiB). A plain sha256 reads and hashes every byte including the holes, which made
//! hashing most of a template build's snapshot phase. This digest only reads the data:
//!
//! ```text
//! chunked_sha256(file) = sha256( sha256(chunk 0) || sha256(chunk 1) || ... )
//! ```
//!
//! over [`CHUNK`]-byte chunks of the content (the last one may be shorter). A chunk with
//! no data extent in it is all zeros, so its digest is a constant and it is not read.
//! The value depends only on the content, never on where the holes are: a bundle copied
//! with or without `--sparse` has the same digests, and data turned into zeros (or zeros
//! written over a hole) changes a chunk like any other write would.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::AsRawFd as _;
use std::os::unix::fs::FileExt as _;
use std::path::Path;
use std::sync::{LazyLock, Mutex, PoisonError};

use sha2::{Digest as _, Sha256};

use crate::error::{Error, Result};

/// Chunk size of [`chunked_sha256`]. Part of the manifest v2 format: never change it.
pub const CHUNK: u64 = 64 * 1024;

/// `sha256` of a whole chunk of zeros: a hole's chunk digest.
static ZERO_CHUNK: LazyLock<[u8; 32]> = LazyLock::new(|| zeros_digest(CHUNK as usize));

fn zeros_digest(len: usize) -> [u8; 32] {
    Sha256::digest(vec![0u8; len]).into()
}

/// The file's content digest (see the module docs), as hex.
pub fn chunked_sha256(path: &Path) -> Result<String> {
    let file = File::open(path).map_err(Error::io("open", path))?;
    let size = file.metadata().map_err(Error::io("stat", path))?.len();
    let data = data_extents(&file, size).map_err(Error::io("seek", path))?;
    let mut outer = Sha256::new();
    let mut buf = vec![0u8; CHUNK as usize];
    let mut extents = data.iter().peekable();
    let mut start = 0;
    while start < size {
        let len = CHUNK.min(size - start);
        let end = start + len;
        while extents.next_if(|&&(_, e)| e <= start).is_some() {}
        let has_data = extents.peek().is_some_and(|&&(s, _)| s < end);
        if has_data {
            let chunk = &mut buf[..len as usize];
            file.read_exact_at(chunk, start)
                .map_err(Error::io("read", path))?;
            outer.update(Sha256::digest(&*chunk));
        } else if len == CHUNK {
            outer.update(*ZERO_CHUNK);
        } else {
            outer.update(zeros_digest(len as usize));
        }
        start = end;
    }
    Ok(hex::encode(outer.finalize()))
}

/// A file's identity and the metadata any write changes: a file whose stamp is the same as
/// when its content was hashed has not been written since.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
    digest: String,
}

/// Files this process hashed and found to have a digest, by `(dev, ino)`: snapshot
/// bundles checked before every restore and step-cache layers before every build are
/// re-hashed only when they changed since, so a corrupted or replaced file is caught
/// while the common case costs a `stat`. (What this does not catch: bit rot under an
/// unchanged inode after the first check in this process, or a write within the same
/// tick of the kernel's coarse clock as that check.)
static VERIFIED: LazyLock<Mutex<HashMap<(u64, u64), Stamp>>> = LazyLock::new(Default::default);

fn stamp_of(path: &Path, digest: &str) -> Result<((u64, u64), Stamp)> {
    use std::os::unix::fs::MetadataExt as _;
    let m = std::fs::metadata(path).map_err(Error::io("stat", path))?;
    Ok((
        (m.dev(), m.ino()),
        Stamp {
            size: m.len(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
            digest: digest.to_owned(),
        },
    ))
}

fn verified() -> std::sync::MutexGuard<'static, HashMap<(u64, u64), Stamp>> {
    VERIFIED.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Whether this process already found `path` to have `digest`, and the file has not
/// been written since (a `stat`, no reading).
pub fn is_verified(path: &Path, digest: &str) -> Result<bool> {
    let (id, stamp) = stamp_of(path, digest)?;
    Ok(verified().get(&id) == Some(&stamp))
}

/// Records that `path`, as it is now, has `digest` (it was just computed or checked).
pub fn mark_verified(path: &Path, digest: &str) {
    if let Ok((id, stamp)) = stamp_of(path, digest) {
        verified().insert(id, stamp);
    }
}

/// Whether `path` has the [`chunked_sha256`] `digest`: hashed only when it is not
/// already [`is_verified`] (and remembered when it matches).
pub fn check_chunked(path: &Path, digest: &str) -> Result<bool> {
    if is_verified(path, digest)? {
        return Ok(true);
    }
    let ok = chunked_sha256(path)? == digest;
    if ok {
        mark_verified(path, digest);
    }
    Ok(ok)
}

/// The file's data extents as sorted, disjoint `(start, end)` byte ranges, from
/// `SEEK_DATA` / `SEEK_HOLE`. A filesystem that cannot tell reports the whole file.
fn data_extents(file: &File, size: u64) -> std::io::Result<Vec<(u64, u64)>> {
    let fd = file.as_raw_fd();
    let seek = |off: u64, whence: libc::c_int| -> std::io::Result<Option<u64>> {
        let off = libc::off_t::try_from(off).map_err(std::io::Error::other)?;
        // SAFETY: lseek on a descriptor borrowed from `file`, which outlives the call.
        let r = unsafe { libc::lseek(fd, off, whence) };
        if r >= 0 {
            return Ok(Some(r.unsigned_abs()));
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            // No data at or after `off`.
            Some(libc::ENXIO) => Ok(None),
            _ => Err(e),
        }
    };
    let mut out = Vec::new();
    let mut off = 0;
    while off < size {
        let start = match seek(off, libc::SEEK_DATA) {
            Ok(Some(s)) => s,
            Ok(None) => break,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) && off == 0 => {
                return Ok(vec![(0, size)]);
            }
            Err(e) => return Err(e),
        };
        let end = seek(start, libc::SEEK_HOLE)?.unwrap_or(size).min(size);
        if end <= start {
            break;
        }
        out.push((start, end));
        off = end;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek as _, SeekFrom, Write as _};

    /// The digest by its definition, reading every byte.
    fn reference(content: &[u8]) -> String {
        let mut outer = Sha256::new();
        for chunk in content.chunks(CHUNK as usize) {
            outer.update(Sha256::digest(chunk));
        }
        hex::encode(outer.finalize())
    }

    /// A sparse file of `size` bytes with `data` written at each offset.
    fn sparse(
        dir: &Path,
        name: &str,
        size: u64,
        data: &[(u64, &[u8])],
    ) -> (std::path::PathBuf, Vec<u8>) {
        let path = dir.join(name);
        let mut f = File::create(&path).unwrap();
        f.set_len(size).unwrap();
        let mut content = vec![0u8; size as usize];
        for (off, bytes) in data {
            f.seek(SeekFrom::Start(*off)).unwrap();
            f.write_all(bytes).unwrap();
            content[*off as usize..*off as usize + bytes.len()].copy_from_slice(bytes);
        }
        (path, content)
    }

    #[test]
    fn matches_the_definition_and_ignores_where_the_holes_are() {
        let dir = tempfile::tempdir().unwrap();
        let size = 3 * 1024 * 1024 + 123; // a short last chunk
        let blob = vec![0xa5u8; 200_000]; // spans chunk boundaries
        let (sparse_path, content) = sparse(
            dir.path(),
            "sparse",
            size,
            &[(5, b"head"), (1_000_000, &blob), (size - 7, b"tail!!!")],
        );
        let want = reference(&content);
        assert_eq!(chunked_sha256(&sparse_path).unwrap(), want);
        // The same bytes with no holes at all.
        let dense = dir.path().join("dense");
        std::fs::write(&dense, &content).unwrap();
        assert_eq!(chunked_sha256(&dense).unwrap(), want);
    }

    #[test]
    fn any_change_changes_it() {
        let dir = tempfile::tempdir().unwrap();
        let size = 1024 * 1024;
        let (a, _) = sparse(dir.path(), "a", size, &[(70_000, b"x")]);
        let base = chunked_sha256(&a).unwrap();
        // A byte changed inside the data.
        let (b, _) = sparse(dir.path(), "b", size, &[(70_000, b"y")]);
        // A byte written into a hole.
        let (c, _) = sparse(dir.path(), "c", size, &[(70_000, b"x"), (900_000, b"z")]);
        // Data made into zeros: the same as a hole there.
        let (d, _) = sparse(dir.path(), "d", size, &[(70_000, b"\0")]);
        let (empty, _) = sparse(dir.path(), "e", size, &[]);
        // One byte longer.
        let (f, _) = sparse(dir.path(), "f", size + 1, &[(70_000, b"x")]);
        for other in [&b, &c, &d, &f] {
            assert_ne!(chunked_sha256(other).unwrap(), base, "{}", other.display());
        }
        assert_eq!(chunked_sha256(&d).unwrap(), chunked_sha256(&empty).unwrap());
    }

    #[test]
    fn a_checked_file_is_rehashed_only_after_a_write() {
        let dir = tempfile::tempdir().unwrap();
        let (path, _) = sparse(dir.path(), "layer", 200_000, &[(100, b"data")]);
        let digest = chunked_sha256(&path).unwrap();
        assert!(!is_verified(&path, &digest).unwrap());
        assert!(check_chunked(&path, &digest).unwrap());
        assert!(is_verified(&path, &digest).unwrap());
        assert!(!check_chunked(&path, "not-the-digest").unwrap());
        // The same size, one byte different: the stamp no longer matches, the hash fails.
        // (File times come from the kernel's coarse clock: let it tick first.)
        std::thread::sleep(std::time::Duration::from_millis(30));
        let (path, _) = sparse(dir.path(), "layer", 200_000, &[(100, b"dat!")]);
        assert!(!is_verified(&path, &digest).unwrap());
        assert!(!check_chunked(&path, &digest).unwrap());
    }

    #[test]
    fn empty_and_tiny_files() {
        let dir = tempfile::tempdir().unwrap();
        let (empty, _) = sparse(dir.path(), "empty", 0, &[]);
        assert_eq!(chunked_sha256(&empty).unwrap(), reference(&[]));
        let (tiny, content) = sparse(dir.path(), "tiny", 3, &[(0, b"abc")]);
        assert_eq!(chunked_sha256(&tiny).unwrap(), reference(&content));
    }
}
