//! A minimal cpio `newc` writer for the initramfs.
//!
//! The initramfs is tiny (the agent plus ten modules), so it is built in memory by hand
//! rather than through the `cpio` tool: no temp tree, no dependence on file ownership on
//! the host, byte-for-byte reproducible (mtime 0) for a given agent and kernel.

use std::io::Write;

const MAGIC: &str = "070701";

/// An in-memory newc archive being built.
#[derive(Debug, Default)]
pub struct Cpio {
    buf: Vec<u8>,
    ino: u32,
}

impl Cpio {
    /// An empty archive.
    pub fn new() -> Self {
        Self {
            buf: Vec::new(),
            ino: 1,
        }
    }

    fn header(&mut self, name: &str, mode: u32, size: usize, rdev: (u32, u32)) {
        let namesize = name.len() + 1;
        let ino = self.ino;
        self.ino += 1;
        let nlink = if mode & 0o170000 == 0o040000 { 2 } else { 1 };
        // c_magic ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor namesize check
        let hdr = format!(
            "{MAGIC}{ino:08x}{mode:08x}{:08x}{:08x}{nlink:08x}{:08x}{size:08x}{:08x}{:08x}{:08x}{:08x}{namesize:08x}{:08x}",
            0, 0, 0, 0, 0, rdev.0, rdev.1, 0
        );
        self.buf.extend_from_slice(hdr.as_bytes());
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad();
    }

    fn pad(&mut self) {
        while self.buf.len() % 4 != 0 {
            self.buf.push(0);
        }
    }

    /// A directory (`name` without a leading slash).
    pub fn dir(&mut self, name: &str) {
        self.header(name, 0o040755, 0, (0, 0));
    }

    /// A regular file with the given permission bits.
    pub fn file(&mut self, name: &str, perm: u32, data: &[u8]) {
        self.header(name, 0o100000 | (perm & 0o7777), data.len(), (0, 0));
        self.buf.extend_from_slice(data);
        self.pad();
    }

    /// A character device node.
    pub fn char_dev(&mut self, name: &str, perm: u32, major: u32, minor: u32) {
        self.header(name, 0o020000 | (perm & 0o7777), 0, (major, minor));
    }

    /// Finishes the archive (trailer) and returns its bytes.
    pub fn finish(mut self) -> Vec<u8> {
        self.header("TRAILER!!!", 0, 0, (0, 0));
        // The kernel does not care, but pad to 512 like the cpio tool does.
        while self.buf.len() % 512 != 0 {
            self.buf.push(0);
        }
        self.buf
    }

    /// Writes the finished archive to `w`.
    pub fn write_to(self, mut w: impl Write) -> std::io::Result<()> {
        w.write_all(&self.finish())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newc_is_readable_by_cpio_tool() {
        let mut c = Cpio::new();
        c.dir("kiln");
        c.file("kiln/modules", 0o644, b"a\nb\n");
        c.file("init", 0o755, b"#!/bin/sh\n");
        let bytes = c.finish();
        assert_eq!(bytes.len() % 512, 0);
        assert!(bytes.starts_with(b"070701"));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.cpio");
        std::fs::write(&path, &bytes).unwrap();
        if crate::tool::which("cpio").is_some() {
            let out = std::process::Command::new("sh")
                .arg("-c")
                .arg(format!("cpio -it < {}", path.display()))
                .output()
                .unwrap();
            let listing = String::from_utf8_lossy(&out.stdout);
            assert!(listing.contains("kiln/modules"), "{listing}");
            assert!(listing.contains("init"), "{listing}");
        }
    }
}
