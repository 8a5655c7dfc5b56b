//! Disk images: an ext4 root image built from a directory, and qcow2 overlays on it.
//!
//! `mke2fs -d` populates the filesystem from a directory with no mounts and no loop
//! devices, so building a disk needs no privileges beyond reading the rootfs. The source
//! directory is a shared cache and is never modified: the agent is written into the image
//! afterwards with `debugfs`.

use std::path::Path;

use crate::error::{Error, Result};
use crate::tool::Tool;

/// Where the agent binary is placed inside every root disk.
pub const AGENT_PATH_IN_DISK: &str = "/.kiln/agent";

/// Builds an ext4 image of exactly `disk_mib` MiB at `image` from `rootfs`, optionally
/// with `agent` written to [`AGENT_PATH_IN_DISK`]. Written to a temp name and renamed.
pub fn make_ext4(rootfs: &Path, image: &Path, disk_mib: u64, agent: Option<&Path>) -> Result<()> {
    if disk_mib == 0 {
        return Err(Error::Config("disk_mib must be > 0".into()));
    }
    let dir = image.parent().unwrap_or(Path::new("."));
    let tmp = tempfile::Builder::new()
        .prefix(".disk-")
        .tempfile_in(dir)
        .map_err(Error::io("create temp in", dir))?;
    tmp.as_file()
        .set_len(disk_mib * 1024 * 1024)
        .map_err(Error::io("size", tmp.path().to_owned()))?;
    let res = Tool::new("mke2fs")
        .args([
            "-q",
            "-t",
            "ext4",
            "-F",
            "-E",
            "root_owner=0:0",
            "-L",
            "kiln-root",
            "-d",
        ])
        .arg(rootfs)
        .arg(tmp.path())
        .arg(format!("{}k", disk_mib * 1024))
        .run();
    if let Err(e) = res {
        let err = e.stderr().to_ascii_lowercase();
        if err.contains("could not allocate")
            || err.contains("no space")
            || err.contains("too small")
        {
            return Err(Error::DiskTooSmall {
                disk_mib,
                source: e,
            });
        }
        return Err(e.into());
    }
    if let Some(agent) = agent {
        inject_file(tmp.path(), agent, AGENT_PATH_IN_DISK, 0o755)?;
    }
    tmp.persist(image).map_err(|e| Error::Io {
        what: "rename to",
        path: image.to_owned(),
        source: e.error,
    })?;
    Ok(())
}

/// Writes host file `src` into the ext4 `image` at absolute `dest` with `mode`, creating
/// the parent directory (one level) as needed. Replaces an existing file.
pub fn inject_file(image: &Path, src: &Path, dest: &str, mode: u32) -> Result<()> {
    let parent = Path::new(dest)
        .parent()
        .and_then(Path::to_str)
        .unwrap_or("/");
    let name = Path::new(dest)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("file");
    let src = src
        .to_str()
        .ok_or_else(|| Error::Config(format!("non-UTF-8 path {}", src.display())))?;
    // debugfs reports most failures on stderr with status 0; mkdir fails harmlessly if
    // the directory exists, so check the result by reading back the inode.
    let script = format!(
        "mkdir {parent}\ncd {parent}\nrm {name}\nwrite {src} {name}\nsif {name} mode 0{:o}\nsif {name} uid 0\nsif {name} gid 0\n",
        0o100000 | mode
    );
    let dir = tempfile::tempdir().map_err(Error::io("create temp dir", std::env::temp_dir()))?;
    let cmds = dir.path().join("cmds");
    std::fs::write(&cmds, script).map_err(Error::io("write", &cmds))?;
    Tool::new("debugfs")
        .arg("-w")
        .arg("-f")
        .arg(&cmds)
        .arg(image)
        .run()?;
    let out = Tool::new("debugfs")
        .arg("-R")
        .arg(format!("stat {dest}"))
        .arg(image)
        .run()?;
    if !String::from_utf8_lossy(&out).contains("Type: regular") {
        return Err(Error::Config(format!(
            "debugfs could not write {dest} into {}",
            image.display()
        )));
    }
    Ok(())
}

/// Creates a qcow2 overlay at `overlay` whose backing file is the raw `base` (kept
/// read-only by QEMU, so many overlays can share one base).
pub fn create_overlay(base: &Path, overlay: &Path) -> Result<()> {
    let base = std::fs::canonicalize(base).map_err(Error::io("resolve", base))?;
    let format = image_format(&base)?;
    Tool::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", format, "-b"])
        .arg(&base)
        .arg(overlay)
        .run()?;
    Ok(())
}

/// `qcow2` for a qcow2 image (by its magic), `raw` for anything else: the only two
/// formats kiln writes.
pub fn image_format(path: &Path) -> Result<&'static str> {
    use std::io::Read as _;
    let mut magic = [0u8; 4];
    let mut f = std::fs::File::open(path).map_err(Error::io("open", path))?;
    let n = f.read(&mut magic).map_err(Error::io("read", path))?;
    Ok(if n == 4 && magic == *b"QFI\xfb" {
        "qcow2"
    } else {
        "raw"
    })
}

/// The backing file a qcow2 image names in its header (a relative name is relative to
/// the image's directory); `None` for a raw image or a qcow2 without one.
pub fn backing_file(image: &Path) -> Result<Option<std::path::PathBuf>> {
    use std::io::{Read as _, Seek as _};
    let mut f = std::fs::File::open(image).map_err(Error::io("open", image))?;
    let mut header = [0u8; 20];
    let n = f.read(&mut header).map_err(Error::io("read", image))?;
    if n < 20 || header[..4] != *b"QFI\xfb" {
        return Ok(None);
    }
    let offset = u64::from_be_bytes(header[8..16].try_into().unwrap_or_default());
    let size = u32::from_be_bytes(header[16..20].try_into().unwrap_or_default());
    if offset == 0 || size == 0 {
        return Ok(None);
    }
    // qcow2 caps backing names at 1023 bytes.
    if size > 1023 {
        return Err(Error::Config(format!(
            "{}: a backing file name of {size} bytes",
            image.display()
        )));
    }
    let mut name = vec![0; size as usize];
    f.seek(std::io::SeekFrom::Start(offset))
        .and_then(|_| f.read_exact(&mut name))
        .map_err(Error::io("read", image))?;
    let name = std::path::PathBuf::from(
        <std::ffi::OsString as std::os::unix::ffi::OsStringExt>::from_vec(name),
    );
    Ok(Some(match image.parent() {
        Some(dir) if name.is_relative() => dir.join(name),
        _ => name,
    }))
}

/// Every image below `image` in its backing chain, nearest first.
pub fn backing_chain(image: &Path) -> Result<Vec<std::path::PathBuf>> {
    let mut chain: Vec<std::path::PathBuf> = Vec::new();
    let mut at = image.to_owned();
    while let Some(next) = backing_file(&at)? {
        if chain.len() >= 64 || chain.contains(&next) {
            return Err(Error::Config(format!(
                "{}: a backing chain deeper than 64 or with a loop",
                image.display()
            )));
        }
        chain.push(next.clone());
        at = next;
    }
    Ok(chain)
}

/// Points a qcow2 image at another backing file without touching its data (`qemu-img
/// rebase -u`): for a layer copied out of a VM's chain, whose recorded backing path is
/// the VM's run directory.
pub fn set_backing(image: &Path, backing: &Path) -> Result<()> {
    let format = image_format(backing)?;
    Tool::new("qemu-img")
        .args(["rebase", "-q", "-u", "-f", "qcow2", "-F", format, "-b"])
        .arg(backing)
        .arg(image)
        .run()?;
    Ok(())
}

/// Makes the qcow2 `image` lie over `backing` while reading as it did
/// (`qemu-img rebase`, safe mode): whatever its current backing chain holds that differs
/// from `backing` is written into it. The current chain must still be there.
pub fn rebase(image: &Path, backing: &Path) -> Result<()> {
    let format = image_format(backing)?;
    Tool::new("qemu-img")
        .args(["rebase", "-q", "-f", "qcow2", "-F", format, "-b"])
        .arg(backing)
        .arg(image)
        .run()?;
    Ok(())
}

/// Flattens any image (e.g. an overlay and its base) into a standalone raw image.
pub fn flatten_to_raw(src: &Path, dest: &Path) -> Result<()> {
    Tool::new("qemu-img")
        .args(["convert", "-q", "-O", "raw"])
        .arg(src)
        .arg(dest)
        .run()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the jail binds under an overlay: the whole chain, read from the headers
    /// (relative names resolved against their image's directory).
    #[test]
    fn a_backing_chain_is_read_from_the_headers() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.raw");
        std::fs::File::create(&base)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        let layer = dir.path().join("layer.qcow2");
        create_overlay(&base, &layer).unwrap();
        let sub = dir.path().join("run");
        std::fs::create_dir(&sub).unwrap();
        let top = sub.join("top.qcow2");
        create_overlay(&layer, &top).unwrap();
        // A relative name, as `qemu-img rebase` may leave.
        Tool::new("qemu-img")
            .args([
                "rebase",
                "-q",
                "-u",
                "-f",
                "qcow2",
                "-F",
                "qcow2",
                "-b",
                "../layer.qcow2",
            ])
            .arg(&top)
            .run()
            .unwrap();
        let canonical = |p: &Path| std::fs::canonicalize(p).unwrap();
        let chain: Vec<_> = backing_chain(&top)
            .unwrap()
            .iter()
            .map(|p| canonical(p))
            .collect();
        assert_eq!(chain, [canonical(&layer), canonical(&base)]);
        assert_eq!(backing_file(&base).unwrap(), None);
    }
}
