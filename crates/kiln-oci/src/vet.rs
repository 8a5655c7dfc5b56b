//! Vetting an unpacked base image by content.
//!
//! The name check in `kiln-spec` catches `alpine:3.19`; this catches a renamed one. kiln's
//! agent and build steps need glibc and `/bin/sh`, so musl-based and shell-less images are
//! refused before a VM is booted for them, with a message saying why.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use crate::error::{OciError, Result};

/// ext4 block size assumed when estimating how much disk a rootfs needs.
const BLOCK: u64 = 4096;
/// On-disk inode size of ext4 as `mke2fs` makes it.
const INODE: u64 = 256;
/// Symlinks this short live inside the inode ("fast symlinks") and take no block.
const FAST_SYMLINK_MAX: u64 = 59;

/// What vetting found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VetReport {
    /// Estimated bytes the rootfs needs on an ext4 disk (blocks + inodes, hardlinks once).
    pub size_bytes: u64,
    /// `ID=` of `/etc/os-release`, when present.
    pub os_id: Option<String>,
}

/// Checks that `rootfs` is a usable base: not Alpine/musl, has `/bin/sh`, and (when
/// `disk_mib` is given) fits in a disk of that size.
pub fn vet(rootfs: &Path, disk_mib: Option<u64>) -> Result<VetReport> {
    let os_id = os_release_id(rootfs);
    if os_id.as_deref() == Some("alpine") {
        return Err(OciError::Refused(
            "Alpine bases are not supported (/etc/os-release says ID=alpine; kiln needs glibc: \
             use a Debian or Ubuntu based image)"
                .into(),
        ));
    }
    if let Some(loader) = musl_loader(rootfs) {
        return Err(OciError::Refused(format!(
            "musl-based images are not supported (found {loader}; kiln needs glibc: use a \
             Debian or Ubuntu based image)"
        )));
    }
    let has_shell = resolve_in_root(rootfs, "/bin/sh")
        .and_then(|p| std::fs::metadata(p).ok())
        .is_some_and(|m| m.is_file() && m.mode() & 0o111 != 0);
    if !has_shell {
        return Err(OciError::Refused(
            "shell-less images are not supported: /bin/sh is missing and `run` steps need it \
             (distroless and static images cannot be used as a base)"
                .into(),
        ));
    }
    let size_bytes = flattened_size(rootfs)
        .map_err(|e| OciError::io(format!("measure {}", rootfs.display()), e))?;
    if let Some(disk_mib) = disk_mib {
        let needed_mib = size_bytes.div_ceil(1 << 20);
        if needed_mib > disk_mib {
            return Err(OciError::TooLarge {
                needed_mib,
                disk_mib,
            });
        }
    }
    Ok(VetReport { size_bytes, os_id })
}

fn os_release_id(rootfs: &Path) -> Option<String> {
    let path = resolve_in_root(rootfs, "/etc/os-release")
        .or_else(|| resolve_in_root(rootfs, "/usr/lib/os-release"))?;
    let text = read_small_regular(&path, 64 * 1024)?;
    text.lines().find_map(|l| {
        let v = l.trim().strip_prefix("ID=")?;
        Some(
            v.trim_matches(|c| c == '"' || c == '\'')
                .to_ascii_lowercase(),
        )
    })
}

/// Reads at most `cap` bytes of a regular file, as text. The image decides what the path
/// is: a FIFO would block a plain read forever, a device node such as `/dev/zero` would
/// never end, so the file is opened without blocking and refused unless it is regular.
fn read_small_regular(path: &Path, cap: u64) -> Option<String> {
    use rustix::fs::{Mode, OFlags};
    use std::io::Read as _;
    let flags =
        OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOFOLLOW | OFlags::NOCTTY | OFlags::CLOEXEC;
    let f = std::fs::File::from(rustix::fs::open(path, flags, Mode::empty()).ok()?);
    if !f.metadata().ok()?.is_file() {
        return None;
    }
    let mut bytes = Vec::new();
    f.take(cap).read_to_end(&mut bytes).ok()?;
    Some(String::from_utf8_lossy(&bytes).into_owned())
}

fn musl_loader(rootfs: &Path) -> Option<String> {
    for dir in ["/lib", "/usr/lib"] {
        let Some(real) = resolve_in_root(rootfs, dir) else {
            continue;
        };
        let Ok(rd) = std::fs::read_dir(real) else {
            continue;
        };
        for ent in rd.flatten() {
            let name = ent.file_name();
            let name = name.to_string_lossy();
            if name.starts_with("ld-musl-") {
                return Some(format!("{dir}/{name}"));
            }
        }
    }
    None
}

/// Resolves `path` as the guest would see it, with `rootfs` as `/`: absolute symlink
/// targets restart at the rootfs and `..` stops at it, so the result is always inside.
/// `None` when a component is missing or there are too many links.
pub fn resolve_in_root(rootfs: &Path, path: &str) -> Option<PathBuf> {
    let mut pending: Vec<String> = Vec::new();
    push_components(&mut pending, Path::new(path));
    let mut cur: Vec<String> = Vec::new();
    let mut links = 0;
    while let Some(c) = pending.pop() {
        match c.as_str() {
            "." => continue,
            ".." => {
                cur.pop();
                continue;
            }
            _ => {}
        }
        let mut candidate = rootfs.to_path_buf();
        candidate.extend(cur.iter());
        candidate.push(&c);
        let meta = std::fs::symlink_metadata(&candidate).ok()?;
        if meta.file_type().is_symlink() {
            links += 1;
            if links > 40 {
                return None;
            }
            let target = std::fs::read_link(&candidate).ok()?;
            if target.is_absolute() {
                cur.clear();
            }
            push_components(&mut pending, &target);
        } else {
            cur.push(c);
        }
    }
    let mut out = rootfs.to_path_buf();
    out.extend(cur);
    Some(out)
}

/// Pushes `p`'s components onto a stack so that the first one is popped first.
fn push_components(stack: &mut Vec<String>, p: &Path) {
    let comps: Vec<String> = p
        .components()
        .filter_map(|c| match c {
            Component::Normal(s) => Some(s.to_string_lossy().into_owned()),
            Component::ParentDir => Some("..".to_owned()),
            _ => None,
        })
        .collect();
    stack.extend(comps.into_iter().rev());
}

/// Bytes the tree needs on ext4: each inode once (hardlinks share), data rounded to blocks.
pub fn flattened_size(rootfs: &Path) -> std::io::Result<u64> {
    let mut seen = HashSet::new();
    let mut total = 0u64;
    let mut stack = vec![rootfs.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for ent in std::fs::read_dir(&dir)? {
            let ent = ent?;
            let meta = ent.metadata()?; // does not follow symlinks
            if meta.nlink() > 1 && !meta.is_dir() && !seen.insert((meta.dev(), meta.ino())) {
                continue;
            }
            total += INODE;
            let ft = meta.file_type();
            if ft.is_dir() {
                total += meta.len().max(BLOCK).div_ceil(BLOCK) * BLOCK;
                stack.push(ent.path());
            } else if ft.is_symlink() {
                if meta.len() > FAST_SYMLINK_MAX {
                    total += BLOCK;
                }
            } else {
                total += meta.len().div_ceil(BLOCK) * BLOCK;
            }
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree() -> tempfile::TempDir {
        let d = tempfile::tempdir().expect("tempdir");
        for p in ["etc", "usr/bin", "usr/lib"] {
            std::fs::create_dir_all(d.path().join(p)).expect("mkdir");
        }
        std::os::unix::fs::symlink("usr/bin", d.path().join("bin")).expect("symlink");
        std::os::unix::fs::symlink("usr/lib", d.path().join("lib")).expect("symlink");
        std::fs::write(d.path().join("etc/os-release"), "ID=debian\n").expect("write");
        d
    }

    fn add_shell(d: &Path) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(d.join("usr/bin/dash"), "#!").expect("write");
        std::fs::set_permissions(
            d.join("usr/bin/dash"),
            std::fs::Permissions::from_mode(0o755),
        )
        .expect("chmod");
        std::os::unix::fs::symlink("/usr/bin/dash", d.join("usr/bin/sh")).expect("symlink");
    }

    #[test]
    fn debian_with_shell_through_symlinks_passes() {
        let d = tree();
        add_shell(d.path());
        let r = vet(d.path(), Some(100)).expect("vetted");
        assert_eq!(r.os_id.as_deref(), Some("debian"));
    }

    #[test]
    fn shell_less_is_refused() {
        let d = tree();
        let e = vet(d.path(), None).expect_err("refused");
        assert_eq!(e.code(), kiln_spec::BuildErrorCode::ImageUnsafe);
        assert!(e.to_string().contains("/bin/sh"), "{e}");
    }

    #[test]
    fn shell_symlink_escaping_the_root_stays_inside() {
        let d = tree();
        // /bin/sh -> ../../../../bin/sh must resolve inside the rootfs, where it is missing.
        std::os::unix::fs::symlink("../../../../../bin/sh", d.path().join("usr/bin/sh"))
            .expect("symlink");
        assert!(vet(d.path(), None).is_err());
    }

    #[test]
    fn alpine_and_musl_are_refused() {
        let d = tree();
        add_shell(d.path());
        std::fs::write(d.path().join("etc/os-release"), "ID=\"alpine\"\n").expect("write");
        assert!(vet(d.path(), None)
            .expect_err("alpine")
            .to_string()
            .contains("Alpine"));
        std::fs::write(d.path().join("etc/os-release"), "ID=debian\n").expect("write");
        std::fs::write(d.path().join("usr/lib/ld-musl-x86_64.so.1"), "").expect("write");
        assert!(vet(d.path(), None)
            .expect_err("musl")
            .to_string()
            .contains("musl"));
    }

    #[test]
    fn too_large_for_disk() {
        let d = tree();
        add_shell(d.path());
        std::fs::write(d.path().join("big"), vec![1u8; 3 << 20]).expect("write");
        let e = vet(d.path(), Some(2)).expect_err("too large");
        assert_eq!(e.code(), kiln_spec::BuildErrorCode::ImageTooLarge);
        vet(d.path(), Some(10)).expect("fits");
    }
}
