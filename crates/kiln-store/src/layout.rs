//! The state directory and crash-safe writes into it.
//!
//! ```text
//! <root>/kiln.db                               metadata (SQLite, WAL)
//! <root>/blobs/sha256/<hex>                    OCI blob cache (owned by kiln-oci)
//! <root>/images/sha256/<hex>/                  unpacked, vetted rootfs (owned by kiln-oci)
//! <root>/templates/<template_id>/<build_id>/   disk, memory snapshot, manifest.json
//! <root>/sandboxes/<sandbox_id>/               overlay, sockets, logs, network rules
//! <root>/snapshots/<snapshot_id>/              a sandbox snapshot's bundle
//! <root>/cache/steps/<key>/                    build step layers (owned by kiln-build)
//! <root>/keys/                                 secrets key (0600), egress CA and its leaves
//! <root>/secrets/audit/<secret_id>.log         requests made with each secret
//! ```
//!
//! Nothing half-written is ever visible under its final name: files go through
//! [`write_atomic`], artifact directories are filled under a staging name and published
//! with [`publish_dir`]. A crash leaves at most a dot-named leftover, which
//! [`Layout::staging_dir`] names predictably so it can be swept.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::ArtifactError;

/// Paths inside one state directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    root: PathBuf,
}

impl Layout {
    /// A layout rooted at `root` (nothing is created until [`Layout::ensure`]).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The default root: `$KILN_HOME`, else `$XDG_DATA_HOME/kiln`, else
    /// `$HOME/.local/share/kiln`; `None` when none of those is set.
    pub fn default_root() -> Option<PathBuf> {
        let var = |k: &str| {
            std::env::var_os(k)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        var("KILN_HOME")
            .or_else(|| var("XDG_DATA_HOME").map(|d| d.join("kiln")))
            .or_else(|| var("HOME").map(|h| h.join(".local/share/kiln")))
    }

    /// Creates the top-level directories.
    pub fn ensure(&self) -> Result<(), ArtifactError> {
        for dir in [
            self.root.clone(),
            self.root.join("blobs/sha256"),
            self.root.join("images/sha256"),
            self.templates_dir(),
            self.sandboxes_dir(),
            self.snapshots_dir(),
            self.secret_audit_dir(),
        ] {
            fs::create_dir_all(&dir).map_err(io("create directory", &dir))?;
        }
        Ok(())
    }

    /// The state directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The metadata database file.
    pub fn db_path(&self) -> PathBuf {
        self.root.join("kiln.db")
    }

    /// kiln's keys: the secrets key (unless `KILN_SECRETS_KEY` puts it elsewhere), the
    /// egress CA and its cached leaf certificates; mode 0700.
    pub fn keys_dir(&self) -> PathBuf {
        self.root.join("keys")
    }

    /// One audit log per team secret (`<secret id>.log`), written by the egress proxy.
    pub fn secret_audit_dir(&self) -> PathBuf {
        self.root.join("secrets/audit")
    }

    /// The blob cache root.
    pub fn blobs_dir(&self) -> PathBuf {
        self.root.join("blobs")
    }

    /// Where the blob `sha256:<hex>` lives.
    pub fn blob_path(&self, digest: &str) -> Result<PathBuf, ArtifactError> {
        let (algo, hex) = split_digest(digest)?;
        Ok(self.blobs_dir().join(algo).join(hex))
    }

    /// The unpacked-images root.
    pub fn images_dir(&self) -> PathBuf {
        self.root.join("images")
    }

    /// Where the image with manifest digest `sha256:<hex>` is unpacked.
    pub fn image_dir(&self, digest: &str) -> Result<PathBuf, ArtifactError> {
        let (algo, hex) = split_digest(digest)?;
        Ok(self.images_dir().join(algo).join(hex))
    }

    /// The templates root.
    pub fn templates_dir(&self) -> PathBuf {
        self.root.join("templates")
    }

    /// Every artifact of one template.
    pub fn template_dir(&self, template_id: &str) -> Result<PathBuf, ArtifactError> {
        Ok(self.templates_dir().join(component(template_id)?))
    }

    /// The published artifact of one build.
    pub fn artifact_dir(
        &self,
        template_id: &str,
        build_id: &str,
    ) -> Result<PathBuf, ArtifactError> {
        Ok(self.template_dir(template_id)?.join(component(build_id)?))
    }

    /// Where a build's artifact is assembled before [`publish_dir`] moves it to
    /// [`Layout::artifact_dir`]. Dot-named, so listings of published artifacts skip it.
    pub fn staging_dir(&self, template_id: &str, build_id: &str) -> Result<PathBuf, ArtifactError> {
        Ok(self
            .template_dir(template_id)?
            .join(format!(".{}.partial", component(build_id)?)))
    }

    /// The build step cache (owned by `kiln-build`'s `StepCache`).
    pub fn step_cache_dir(&self) -> PathBuf {
        self.root.join("cache").join("steps")
    }

    /// The sandboxes root.
    pub fn sandboxes_dir(&self) -> PathBuf {
        self.root.join("sandboxes")
    }

    /// One sandbox's runtime directory.
    pub fn sandbox_dir(&self, sandbox_id: &str) -> Result<PathBuf, ArtifactError> {
        Ok(self.sandboxes_dir().join(component(sandbox_id)?))
    }

    /// The snapshots root.
    pub fn snapshots_dir(&self) -> PathBuf {
        self.root.join("snapshots")
    }

    /// A snapshot's published bundle.
    pub fn snapshot_dir(&self, snapshot_id: &str) -> Result<PathBuf, ArtifactError> {
        Ok(self.snapshots_dir().join(component(snapshot_id)?))
    }

    /// Where a snapshot is captured and made forkable before it is published under
    /// [`Layout::snapshot_dir`] (dot-named, like a build's staging directory).
    pub fn snapshot_staging_dir(&self, snapshot_id: &str) -> Result<PathBuf, ArtifactError> {
        Ok(self
            .snapshots_dir()
            .join(format!(".{}.partial", component(snapshot_id)?)))
    }
}

/// Ids become path components: anything that could climb out of the layout is refused.
fn component(id: &str) -> Result<&str, ArtifactError> {
    let ok = !id.is_empty()
        && !id.starts_with('.')
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok {
        Ok(id)
    } else {
        Err(ArtifactError::BadName(id.to_owned()))
    }
}

fn split_digest(digest: &str) -> Result<(&str, &str), ArtifactError> {
    match digest.split_once(':') {
        Some((algo, hex))
            if !algo.is_empty()
                && algo.chars().all(|c| c.is_ascii_alphanumeric())
                && !hex.is_empty()
                && hex.chars().all(|c| c.is_ascii_hexdigit()) =>
        {
            Ok((algo, hex))
        }
        _ => Err(ArtifactError::BadName(digest.to_owned())),
    }
}

pub(crate) fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ArtifactError {
    let path = path.to_owned();
    move |source| ArtifactError::Io { op, path, source }
}

/// Fsyncs a directory, making renames and creations inside it durable.
pub fn fsync_dir(dir: &Path) -> Result<(), ArtifactError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("fsync directory", dir))
}

/// Writes `bytes` to `path` so that readers see either the old file or the whole new one,
/// also across a power loss: temp file in the same directory, fsync, rename, fsync the dir.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), ArtifactError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| ArtifactError::BadName(path.display().to_string()))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        uuid::Uuid::new_v4().simple()
    ));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(io("create", &tmp))?;
        f.write_all(bytes).map_err(io("write", &tmp))?;
        f.sync_all().map_err(io("fsync", &tmp))?;
        drop(f);
        fs::rename(&tmp, path).map_err(io("rename into place", path))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result?;
    fsync_dir(dir)
}

/// Publishes a fully written staging directory under its final name.
///
/// Every file in it (top level) and the directory itself are fsynced before one rename, and
/// the parent after, so the artifact appears complete or not at all. Fails if `dest` exists:
/// a published artifact is immutable.
pub fn publish_dir(staging: &Path, dest: &Path) -> Result<(), ArtifactError> {
    for entry in fs::read_dir(staging).map_err(io("read directory", staging))? {
        let entry = entry.map_err(io("read directory", staging))?;
        let path = entry.path();
        if entry.file_type().map_err(io("stat", &path))?.is_file() {
            File::open(&path)
                .and_then(|f| f.sync_all())
                .map_err(io("fsync", &path))?;
        }
    }
    fsync_dir(staging)?;
    if dest.exists() {
        return Err(ArtifactError::Io {
            op: "publish",
            path: dest.to_owned(),
            source: std::io::Error::from(std::io::ErrorKind::AlreadyExists),
        });
    }
    fs::rename(staging, dest).map_err(io("rename into place", dest))?;
    if let Some(parent) = dest.parent() {
        fsync_dir(parent)?;
    }
    Ok(())
}
