//! The manifest every template artifact carries.
//!
//! A sandbox is restored from files a build wrote possibly long ago, maybe on another
//! machine; the manifest says what they are (which image, which spec, which runtime
//! defaults the agent applies) and lets a reader prove they are intact before handing a
//! truncated memory snapshot to QEMU. It is versioned so a future layout is refused, not
//! misread.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use kiln_spec::{Resources, RuntimeDefaults};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::ArtifactError;
use crate::layout::{io, write_atomic};

/// The manifest's file name inside an artifact directory.
pub const MANIFEST_FILE: &str = "manifest.json";

/// One file of the artifact.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactFile {
    /// Path inside the artifact directory (`bundle/memory`), relative, no `..`.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Lowercase hex sha256 of the content, for files this manifest hashed itself. The
    /// snapshot bundle's files are listed without it: the bundle's own manifest carries
    /// their digests and kiln-vm checks them before every restore, so hashing them again
    /// here would read gigabytes for nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

/// `manifest.json`, version 1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactManifest {
    /// Format version; readers refuse versions they do not know.
    pub version: u32,
    /// The template.
    pub template_id: String,
    /// The build that produced this artifact.
    pub build_id: String,
    /// The base image's resolved digest.
    pub image_digest: String,
    /// `sha256:...` of the spec and resources built.
    pub spec_hash: String,
    /// Defaults the agent applies in sandboxes.
    pub runtime: RuntimeDefaults,
    /// The VM shape the snapshot was taken with; a restore must use the same.
    pub resources: Resources,
    /// Every file of the artifact except the manifest itself.
    pub files: Vec<ArtifactFile>,
    /// The digest of the certificates the guest was made to trust (kiln's egress CA and
    /// the operator's bundle); a restore installs the current ones when they differ.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust: Option<String>,
    /// When the artifact was finished.
    pub created_at: DateTime<Utc>,
}

impl ArtifactManifest {
    /// The version this code writes and reads.
    pub const VERSION: u32 = 1;

    /// A manifest with no files yet, stamped now.
    pub fn new(
        template_id: impl Into<String>,
        build_id: impl Into<String>,
        image_digest: impl Into<String>,
        spec_hash: impl Into<String>,
        runtime: RuntimeDefaults,
        resources: Resources,
    ) -> Self {
        Self {
            version: Self::VERSION,
            template_id: template_id.into(),
            build_id: build_id.into(),
            image_digest: image_digest.into(),
            spec_hash: spec_hash.into(),
            runtime,
            resources,
            files: Vec::new(),
            trust: None,
            created_at: crate::store::now(),
        }
    }

    /// Hashes `dir/name` and lists it (replacing an earlier entry of the same name).
    pub fn add_file(&mut self, dir: &Path, name: &str) -> Result<&ArtifactFile, ArtifactError> {
        check_name(name)?;
        let (size, sha256) = digest_file(&dir.join(name))?;
        Ok(self.put(ArtifactFile {
            name: name.to_owned(),
            size,
            sha256: Some(sha256),
        }))
    }

    /// Lists `name` with its size, without hashing it (a snapshot bundle's file, whose
    /// digest the bundle's own manifest carries); replaces an earlier entry of the name.
    pub fn list_file(&mut self, name: &str, size: u64) -> Result<&ArtifactFile, ArtifactError> {
        check_name(name)?;
        Ok(self.put(ArtifactFile {
            name: name.to_owned(),
            size,
            sha256: None,
        }))
    }

    fn put(&mut self, file: ArtifactFile) -> &ArtifactFile {
        self.files.retain(|f| f.name != file.name);
        self.files.push(file);
        let last = self.files.len() - 1;
        &self.files[last]
    }

    /// Total size of the listed files.
    pub fn total_size(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }

    /// Writes `dir/manifest.json` atomically; returns its path.
    pub fn write(&self, dir: &Path) -> Result<PathBuf, ArtifactError> {
        let path = dir.join(MANIFEST_FILE);
        let mut bytes =
            serde_json::to_vec_pretty(self).map_err(|source| ArtifactError::Malformed {
                path: path.clone(),
                source,
            })?;
        bytes.push(b'\n');
        write_atomic(&path, &bytes)?;
        Ok(path)
    }

    /// Reads `dir/manifest.json` and checks that every listed file exists with its size.
    /// Cheap: for the hot path of starting a sandbox.
    pub fn read(dir: &Path) -> Result<Self, ArtifactError> {
        let m = Self::read_manifest(dir)?;
        for f in &m.files {
            let path = dir.join(&f.name);
            let size = match std::fs::metadata(&path) {
                Ok(meta) => meta.len(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(corrupt(dir, format!("{} is missing", f.name)));
                }
                Err(e) => return Err(io("stat", &path)(e)),
            };
            if size != f.size {
                return Err(corrupt(
                    dir,
                    format!("{} is {size} bytes, expected {}", f.name, f.size),
                ));
            }
        }
        Ok(m)
    }

    /// Like [`ArtifactManifest::read`], and also verifies every file's sha256.
    pub fn read_verified(dir: &Path) -> Result<Self, ArtifactError> {
        let m = Self::read(dir)?;
        for f in &m.files {
            let Some(want) = &f.sha256 else { continue };
            let (_, sha256) = digest_file(&dir.join(&f.name))?;
            if sha256 != *want {
                return Err(corrupt(dir, format!("{} has the wrong sha256", f.name)));
            }
        }
        Ok(m)
    }

    fn read_manifest(dir: &Path) -> Result<Self, ArtifactError> {
        let path = dir.join(MANIFEST_FILE);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(corrupt(dir, format!("{MANIFEST_FILE} is missing")));
            }
            Err(e) => return Err(io("read", &path)(e)),
        };
        let malformed = |source| ArtifactError::Malformed {
            path: path.clone(),
            source,
        };
        // Look at the version before the shape: a v2 manifest may not parse as v1.
        let value: serde_json::Value = serde_json::from_slice(&bytes).map_err(malformed)?;
        let version = value.get("version").and_then(|v| v.as_u64()).unwrap_or(0);
        if version != u64::from(Self::VERSION) {
            return Err(ArtifactError::UnsupportedVersion {
                path,
                version: u32::try_from(version).unwrap_or(u32::MAX),
            });
        }
        let m: Self = serde_json::from_value(value).map_err(malformed)?;
        for f in &m.files {
            check_name(&f.name).map_err(|_| corrupt(dir, format!("bad file name {:?}", f.name)))?;
        }
        Ok(m)
    }
}

fn corrupt(dir: &Path, reason: String) -> ArtifactError {
    ArtifactError::Corrupt {
        dir: dir.to_owned(),
        reason,
    }
}

/// Listed files are plain names: a manifest must not point outside its directory.
/// A relative path of plain components (`memory`, `bundle/disk.raw`) that is not the
/// manifest itself: nothing a manifest lists can point outside its directory.
fn check_name(name: &str) -> Result<(), ArtifactError> {
    let plain = !name.is_empty()
        && !name.starts_with('/')
        && name
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..");
    if !plain || name == MANIFEST_FILE {
        return Err(ArtifactError::BadName(name.to_owned()));
    }
    Ok(())
}

/// Size and sha256 of a file, streamed (memory snapshots are large).
fn digest_file(path: &Path) -> Result<(u64, String), ArtifactError> {
    let mut f = File::open(path).map_err(io("open", path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(io("read", path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    Ok((size, hex::encode(hasher.finalize())))
}
