//! The step cache: every step's resulting disk as a qcow2 layer, so that a build whose
//! first steps match an earlier build of the team replays only the rest.
//!
//! An entry is keyed by a chain of hashes: the base key covers the team, the base image
//! **digest** (a re-pushed tag is another digest, so it misses), the disk size and the
//! agent binary injected into the disk; each step's key covers its parent's key and the
//! step itself. The base entry is the ext4 image made from the rootfs (`disk.raw`); a
//! step's entry is the qcow2 delta that step wrote (`disk.qcow2`), backed by its
//! parent's disk. An `env` step changes no disk: its entry names its parent's disk.
//!
//! ```text
//! <root>/<key>/meta.json      {"version": 2, "disk": "<absolute path of the disk>",
//!                              "digest": "<chunked sha256 of the layer>"}
//! <root>/<key>/disk.raw|qcow2 the layer (absent for an env step)
//! <root>/.tmp-*               entries being written, renamed into place when whole
//! ```
//!
//! A build checks the digests of the layers it reuses ([`Entry::verify`]), so a layer
//! damaged on disk is never built on. Version 1 entries (no digest) are still used.
//!
//! Entries are immutable once published (a rename of a complete directory), because the
//! layers above them and running build VMs read them through their paths. Two builds
//! publishing the same key race harmlessly: the second rename fails and the first entry
//! stands. [`StepCache::prune`] removes everything and is for when no build runs.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Format of `meta.json`: 2 added the layer's digest.
const META_VERSION: u32 = 2;

/// The step cache of one state directory.
#[derive(Debug, Clone)]
pub struct StepCache {
    root: PathBuf,
}

/// A published entry: the disk image a build can boot on (as an overlay's backing).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The entry's key.
    pub key: String,
    /// The disk image (raw base or qcow2 layer) holding the disk as it was after the
    /// step.
    pub disk: PathBuf,
    /// The layer's [`kiln_vm::digest::chunked_sha256`]; `None` for an env step's entry
    /// (its disk is its parent's) and for entries of meta version 1.
    pub digest: Option<String>,
}

impl Entry {
    /// Whether the layer still has the digest it was published with (true when it has
    /// none to check). Hashes the layer's data unless this process already checked it
    /// unchanged.
    pub fn verify(&self) -> Result<bool, StepCacheError> {
        match &self.digest {
            None => Ok(true),
            Some(d) => kiln_vm::digest::check_chunked(&self.disk, d).map_err(StepCacheError::Disk),
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Meta {
    version: u32,
    disk: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    digest: Option<String>,
}

/// What went wrong writing an entry (the build goes on without it).
#[derive(Debug, thiserror::Error)]
pub enum StepCacheError {
    /// A file operation failed.
    #[error("step cache: {what} {}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// On what.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Making or rebasing a disk image failed.
    #[error("step cache: disk image")]
    Disk(#[source] kiln_vm::Error),
    /// Another build published this step first. Its layer holds the same step run on
    /// another disk, so layers of this build cannot be stacked on it.
    #[error("step cache: {0} was published by another build")]
    Exists(String),
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StepCacheError {
    let path = path.to_owned();
    move |source| StepCacheError::Io { what, path, source }
}

fn hash(parts: &[&[u8]]) -> String {
    let mut h = Sha256::new();
    h.update(b"kiln-step-cache/v1");
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p);
    }
    hex::encode(h.finalize())
}

/// The key of the base disk of a build.
pub fn base_key(team: &str, image_digest: &str, disk_mib: u32, agent_digest: &str) -> String {
    hash(&[
        b"base",
        team.as_bytes(),
        image_digest.as_bytes(),
        &disk_mib.to_le_bytes(),
        agent_digest.as_bytes(),
    ])
}

/// The key of the disk after `step`, run on the disk of `parent`.
pub fn step_key(parent: &str, step: &kiln_spec::Step) -> String {
    let json = serde_json::to_vec(step).expect("steps serialize");
    hash(&[b"step", parent.as_bytes(), &json])
}

impl StepCache {
    /// The cache under `root` (created on first publish).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// Where the cache lives.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The published entry for `key`, if there is a whole one whose disk still exists
    /// (a state dir moved elsewhere leaves entries whose paths point nowhere: misses).
    pub fn lookup(&self, key: &str) -> Option<Entry> {
        let text = std::fs::read(self.root.join(key).join("meta.json")).ok()?;
        let meta: Meta = serde_json::from_slice(&text).ok()?;
        ((1..=META_VERSION).contains(&meta.version) && meta.disk.is_file()).then(|| Entry {
            key: key.to_owned(),
            disk: meta.disk,
            digest: meta.digest,
        })
    }

    /// Publishes the base disk, made by `make` at the path it is given; the entry already
    /// published under `key` wins if there is one (a build boots on whichever stands).
    pub fn publish_base(
        &self,
        key: &str,
        make: impl FnOnce(&Path) -> Result<(), kiln_vm::Error>,
    ) -> Result<Entry, StepCacheError> {
        match self.publish(key, "disk.raw", |tmp_disk| {
            make(tmp_disk).map_err(StepCacheError::Disk)
        }) {
            Err(StepCacheError::Exists(_)) => self
                .lookup(key)
                .ok_or_else(|| StepCacheError::Exists(key.to_owned())),
            other => other,
        }
    }

    /// A base disk made by `make` for one build only, not published: for when the
    /// published one is damaged. It is removed when the returned directory is dropped.
    pub fn private_base(
        &self,
        make: impl FnOnce(&Path) -> Result<(), kiln_vm::Error>,
    ) -> Result<(tempfile::TempDir, Entry), StepCacheError> {
        let tmp = self.tmp_dir()?;
        let disk = tmp.path().join("disk.raw");
        make(&disk).map_err(StepCacheError::Disk)?;
        let entry = Entry {
            key: String::new(),
            disk,
            digest: None,
        };
        Ok((tmp, entry))
    }

    /// Publishes `frozen`, the qcow2 delta a step wrote on top of `parent`'s disk, as the
    /// entry for `key`. The copy is re-pointed at the parent's published disk (in the VM
    /// it was backed by a file of the VM's run directory).
    pub fn publish_layer(
        &self,
        key: &str,
        frozen: &Path,
        parent: &Entry,
    ) -> Result<Entry, StepCacheError> {
        self.publish(key, "disk.qcow2", |tmp_disk| {
            std::fs::copy(frozen, tmp_disk).map_err(io("copying", frozen))?;
            kiln_vm::disk::set_backing(tmp_disk, &parent.disk).map_err(StepCacheError::Disk)
        })
    }

    /// Publishes an entry for a step that changed no disk: it names its parent's disk.
    pub fn publish_alias(&self, key: &str, parent: &Entry) -> Result<Entry, StepCacheError> {
        if self.lookup(key).is_some() {
            return Err(StepCacheError::Exists(key.to_owned()));
        }
        let tmp = self.tmp_dir()?;
        let entry = Entry {
            key: key.to_owned(),
            disk: parent.disk.clone(),
            digest: None,
        };
        self.finish(tmp, key, &entry)
    }

    /// Removes every entry (and any half-written one). Only call it when no build runs:
    /// a build VM reads its layers through their paths.
    pub fn prune(&self) -> Result<u64, StepCacheError> {
        let mut freed = 0;
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return Ok(0);
        };
        for e in entries.flatten() {
            freed += du(&e.path());
            let p = e.path();
            std::fs::remove_dir_all(&p).map_err(io("removing", &p))?;
        }
        Ok(freed)
    }

    fn tmp_dir(&self) -> Result<tempfile::TempDir, StepCacheError> {
        std::fs::create_dir_all(&self.root).map_err(io("creating", &self.root))?;
        tempfile::Builder::new()
            .prefix(".tmp-")
            .tempdir_in(&self.root)
            .map_err(io("creating a temp dir in", &self.root))
    }

    fn publish(
        &self,
        key: &str,
        disk_name: &str,
        write: impl FnOnce(&Path) -> Result<(), StepCacheError>,
    ) -> Result<Entry, StepCacheError> {
        if self.lookup(key).is_some() {
            return Err(StepCacheError::Exists(key.to_owned()));
        }
        let tmp = self.tmp_dir()?;
        let tmp_disk = tmp.path().join(disk_name);
        write(&tmp_disk)?;
        let digest = kiln_vm::digest::chunked_sha256(&tmp_disk).map_err(StepCacheError::Disk)?;
        let entry = Entry {
            key: key.to_owned(),
            disk: self.root.join(key).join(disk_name),
            digest: Some(digest),
        };
        let entry = self.finish(tmp, key, &entry)?;
        if let Some(d) = &entry.digest {
            kiln_vm::digest::mark_verified(&entry.disk, d);
        }
        Ok(entry)
    }

    fn finish(
        &self,
        tmp: tempfile::TempDir,
        key: &str,
        entry: &Entry,
    ) -> Result<Entry, StepCacheError> {
        let meta = Meta {
            version: META_VERSION,
            disk: entry.disk.clone(),
            digest: entry.digest.clone(),
        };
        let meta_path = tmp.path().join("meta.json");
        std::fs::write(
            &meta_path,
            serde_json::to_vec(&meta).expect("meta serializes"),
        )
        .map_err(io("writing", &meta_path))?;
        // Everything in the entry reaches the disk before the entry is published: after a
        // crash, a published entry is a whole one, never a layer with unwritten blocks.
        for f in std::fs::read_dir(tmp.path())
            .map_err(io("listing", tmp.path()))?
            .flatten()
        {
            sync_file(&f.path())?;
        }
        sync_file(tmp.path())?;
        let dest = self.root.join(key);
        match std::fs::rename(tmp.path(), &dest) {
            Ok(()) => {
                // Renamed: nothing left for the TempDir to remove.
                let _ = tmp.keep();
                let _ = sync_file(&self.root);
                Ok(entry.clone())
            }
            Err(_) if self.lookup(key).is_some() => Err(StepCacheError::Exists(key.to_owned())),
            Err(e) => Err(io("publishing", &dest)(e)),
        }
    }
}

/// `fsync` of a file or a directory.
fn sync_file(path: &Path) -> Result<(), StepCacheError> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(io("flushing", path))
}

/// Bytes a tree takes on disk.
fn du(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt as _;
    let Ok(m) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    if !m.is_dir() {
        return m.blocks() * 512;
    }
    std::fs::read_dir(path)
        .map(|d| d.flatten().map(|e| du(&e.path())).sum())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_chain_and_separate_what_matters() {
        let b = base_key("team", "sha256:aa", 1024, "agent");
        assert_ne!(b, base_key("team", "sha256:ab", 1024, "agent"), "digest");
        assert_ne!(b, base_key("other", "sha256:aa", 1024, "agent"), "team");
        assert_ne!(b, base_key("team", "sha256:aa", 2048, "agent"), "disk");
        assert_ne!(b, base_key("team", "sha256:aa", 1024, "agent2"), "agent");
        let s1 = kiln_spec::Step::Run("echo a".into());
        let s2 = kiln_spec::Step::Run("echo b".into());
        let k1 = step_key(&b, &s1);
        assert_eq!(k1, step_key(&b, &s1), "stable");
        assert_ne!(k1, step_key(&b, &s2));
        assert_ne!(
            step_key(&k1, &s2),
            step_key(&step_key(&b, &s2), &s2),
            "order"
        );
    }

    #[test]
    fn entries_publish_once_and_aliases_share_the_disk() {
        let dir = tempfile::tempdir().unwrap();
        let c = StepCache::new(dir.path().join("steps"));
        assert!(c.lookup("k").is_none());
        let base = c
            .publish_base("k", |p| {
                std::fs::write(p, b"disk").map_err(|e| kiln_vm::Error::Config(e.to_string()))
            })
            .unwrap();
        assert_eq!(base.disk, dir.path().join("steps/k/disk.raw"));
        assert_eq!(c.lookup("k"), Some(base.clone()));
        // A second publish of the same key keeps the first.
        let again = c
            .publish_base("k", |_| panic!("must not be made again"))
            .unwrap();
        assert_eq!(again, base);
        let alias = c.publish_alias("env", &base).unwrap();
        assert_eq!(alias.disk, base.disk);
        // A layer or alias never replaces or joins another build's.
        assert!(matches!(
            c.publish_alias("env", &base),
            Err(StepCacheError::Exists(_))
        ));
        // A failed write leaves nothing behind.
        assert!(c
            .publish_base("bad", |_| Err(kiln_vm::Error::Config("no".into())))
            .is_err());
        assert!(c.lookup("bad").is_none());
        let left: Vec<_> = std::fs::read_dir(c.root())
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(left.len(), 2, "{left:?}");
        assert!(c.prune().unwrap() > 0);
        assert!(c.lookup("k").is_none());
    }
}
