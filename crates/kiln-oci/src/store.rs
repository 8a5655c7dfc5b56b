//! The image store: resolve, pull into the blob cache, unpack into cached rootfs dirs,
//! list, prune.
//!
//! Layout under the state directory (shared by every build of the host):
//!
//! ```text
//! blobs/sha256/<hex>                 every blob (manifests, configs, layers), verified
//! images/sha256/<hex>/image.json     what was pulled (hex = the linux/amd64 manifest digest)
//! images/sha256/<hex>/rootfs/        the unpacked layers, made visible by one rename
//! ```
//!
//! Nothing is visible half-written: blobs and records go to a temp name, are fsynced and
//! renamed; a rootfs is unpacked beside its final name and renamed when complete.

use std::collections::HashSet;
use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::{StreamExt, TryStreamExt};
use kiln_spec::reference::validate_digest;
use kiln_spec::ImageRef;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncWriteExt as _;

use crate::config::{Endpoint, RegistryConfig};
use crate::error::{OciError, Result};
use crate::registry::{broke_off, Registries, MAX_DOCUMENT};
use crate::unpack::{self, UnpackStats};
use crate::vet::{self, VetReport};

/// Layers fetched at once: enough to fill a link, few enough not to starve other builds.
const CONCURRENT_BLOBS: usize = 4;
/// Temp files older than this are leftovers of a killed process and are pruned.
const STALE_TMP: Duration = Duration::from_secs(3600);
/// The only platform kiln runs.
pub const PLATFORM: &str = "linux/amd64";

/// An OCI content descriptor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Descriptor {
    /// The media type (`application/vnd.oci.image.layer.v1.tar+gzip`, ...).
    #[serde(rename = "mediaType", default)]
    pub media_type: String,
    /// `sha256:<hex>`.
    pub digest: String,
    /// Size in bytes.
    pub size: u64,
    /// Platform, on index entries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
}

/// A platform as index entries and image configs state it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Platform {
    /// `amd64`, `arm64`, ...
    pub architecture: String,
    /// `linux`, ...
    pub os: String,
    /// `v8`, ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

#[derive(Deserialize)]
struct RawManifest {
    #[serde(rename = "mediaType", default)]
    media_type: Option<String>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Option<Vec<Descriptor>>,
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
}

#[derive(Deserialize, Default)]
struct RawConfig {
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    os: String,
    #[serde(default)]
    variant: Option<String>,
    #[serde(default)]
    config: Option<RawRuntime>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct RawRuntime {
    #[serde(default)]
    env: Option<Vec<String>>,
    #[serde(default)]
    working_dir: Option<String>,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    entrypoint: Option<Vec<String>>,
    #[serde(default)]
    cmd: Option<Vec<String>>,
}

/// The runtime defaults an image's config carries (the template inherits them).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuntimeConfig {
    /// `KEY=value` entries.
    pub env: Vec<String>,
    /// Working directory, if set.
    pub workdir: Option<String>,
    /// User (`name`, `uid`, `uid:gid`), if set.
    pub user: Option<String>,
    /// Entrypoint, if set.
    pub entrypoint: Option<Vec<String>>,
    /// Command, if set.
    pub cmd: Option<Vec<String>>,
}

/// A resolved image: what a reference points at, down to its linux/amd64 layers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Image {
    /// The normalised reference that was resolved (`docker.io/library/python:3.11`).
    pub reference: String,
    /// The digest the reference resolves to: the index's when it names an index, as
    /// `skopeo inspect` reports it. Pin `reference@digest` to get the same image again.
    pub digest: String,
    /// The linux/amd64 image manifest's digest (equal to `digest` without an index). The
    /// rootfs is cached under it.
    pub manifest_digest: String,
    /// Always `linux/amd64` today.
    pub platform: String,
    /// The image config blob.
    pub config_digest: String,
    /// Layers, bottom first.
    pub layers: Vec<Descriptor>,
    /// Runtime defaults from the image config.
    pub config: RuntimeConfig,
    /// Raw documents (index, manifest, config) fetched while resolving, stored on pull.
    #[serde(skip)]
    documents: Vec<(String, Vec<u8>)>,
    /// Where the manifest came from; blobs are fetched from there first.
    #[serde(skip)]
    endpoint: Option<Endpoint>,
}

impl Image {
    /// Total compressed size of the layers.
    pub fn compressed_size(&self) -> u64 {
        self.layers.iter().map(|l| l.size).sum()
    }
}

/// Progress of a pull or unpack, for bars and build logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// A blob is needed; `cached` when it is already in the cache (no download).
    BlobStarted {
        /// Its digest.
        digest: String,
        /// Its size.
        size: u64,
        /// Already present.
        cached: bool,
    },
    /// More bytes of a blob arrived (`bytes` is the increment).
    BlobBytes {
        /// Its digest.
        digest: String,
        /// Bytes received since the last event.
        bytes: u64,
    },
    /// A blob is in the cache, verified.
    BlobDone {
        /// Its digest.
        digest: String,
    },
    /// Layer `index` (0-based) of `count` is being applied.
    Unpacking {
        /// Which layer.
        index: usize,
        /// How many.
        count: usize,
    },
}

/// A progress sink; `&|_| {}` ignores progress.
pub type ProgressFn<'a> = &'a (dyn Fn(Progress) + Send + Sync);

/// What a pull did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PullReport {
    /// Bytes downloaded from registries (0 when everything was cached).
    pub bytes_downloaded: u64,
    /// Blobs downloaded.
    pub blobs_downloaded: usize,
    /// Blobs found in the cache.
    pub blobs_cached: usize,
}

/// An unpacked rootfs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unpacked {
    /// The rootfs directory (shared: callers must copy, not modify, it).
    pub rootfs: PathBuf,
    /// Whether an earlier unpack was reused.
    pub reused: bool,
    /// What this unpack wrote (zero when reused).
    pub stats: UnpackStats,
}

/// Everything a build needs from its base image.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// The resolved image.
    pub image: Image,
    /// What the pull did.
    pub pull: PullReport,
    /// The unpacked rootfs.
    pub unpacked: Unpacked,
    /// What vetting found.
    pub vet: VetReport,
}

/// What [`ImageStore::prune`] removed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PruneReport {
    /// Image directories removed.
    pub images_removed: usize,
    /// Blobs removed.
    pub blobs_removed: usize,
    /// Bytes of blobs freed (rootfs trees not counted).
    pub blob_bytes_freed: u64,
}

/// The image store of one state directory. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct ImageStore {
    state: PathBuf,
    registries: Registries,
}

fn hex_of(digest: &str) -> Result<&str> {
    validate_digest(digest).map_err(|e| OciError::Invalid {
        reference: digest.to_owned(),
        detail: format!("bad digest: {e}"),
    })?;
    Ok(&digest["sha256:".len()..])
}

fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

fn ioe(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> OciError {
    let context = context.into();
    move |e| OciError::io(context, e)
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Temp names are `.tmp-<what>-<pid>-<unique>` (`<what>` without `-`): the pid says whether
/// the process writing it is still alive, so leftovers of a killed one can be told apart
/// from a neighbour's work in flight (the CLI and the server share the state directory).
fn tmp_name(prefix: &str) -> String {
    format!(
        ".tmp-{prefix}-{}-{}",
        std::process::id(),
        TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Whether `name` (in a store directory) is a temp file or tree left behind: its writer is
/// dead, or it has not changed for [`STALE_TMP`] (a name without a pid, a reused pid).
fn leftover(name: &str, path: &Path, now: SystemTime) -> bool {
    if !name.starts_with(".tmp-") {
        return false;
    }
    let writer_dead = name
        .split('-')
        .nth(2)
        .and_then(|pid| pid.parse::<i32>().ok())
        .and_then(rustix::process::Pid::from_raw)
        .is_some_and(|pid| rustix::process::test_kill_process(pid) == Err(rustix::io::Errno::SRCH));
    writer_dead || is_stale(path, now)
}

fn is_stale(path: &Path, now: SystemTime) -> bool {
    std::fs::symlink_metadata(path)
        .and_then(|m| m.modified())
        .is_ok_and(|t| now.duration_since(t).unwrap_or_default() > STALE_TMP)
}

/// Removes a temp file or tree.
fn remove_temp(path: &Path) -> Result<()> {
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.is_dir()) {
        unpack::remove_tree(path)
    } else {
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(OciError::io(format!("remove {}", path.display()), e))
            }
            _ => Ok(()),
        }
    }
}

/// Writes `bytes` to `path` atomically: temp name, fsync, rename, fsync of the directory.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(ioe(format!("create {}", dir.display())))?;
    let tmp = dir.join(tmp_name("w"));
    let res = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res.map_err(ioe(format!("write {}", path.display())))
}

impl ImageStore {
    /// Opens (creating) the store under `state_dir`.
    pub fn open(state_dir: &Path, config: RegistryConfig) -> Result<Self> {
        for sub in ["blobs/sha256", "images/sha256"] {
            let p = state_dir.join(sub);
            std::fs::create_dir_all(&p).map_err(ioe(format!("create {}", p.display())))?;
        }
        // Unpacked images hold whatever their layers say: setuid-root binaries, device
        // nodes of host disks. Only the owner (kiln) may reach them.
        let images = state_dir.join("images");
        std::fs::set_permissions(&images, std::fs::Permissions::from_mode(0o700))
            .map_err(ioe(format!("chmod {}", images.display())))?;
        let store = Self {
            state: state_dir.to_path_buf(),
            registries: Registries::new(config),
        };
        let swept = store.sweep_temps()?;
        if swept > 0 {
            tracing::info!(
                count = swept,
                "temp files of interrupted pulls and unpacks removed"
            );
        }
        Ok(store)
    }

    /// Removes what interrupted writers left: half-downloaded blobs, half-written records
    /// and half-unpacked rootfs trees (see [`leftover`]). Returns how many went.
    pub fn sweep_temps(&self) -> Result<usize> {
        let now = SystemTime::now();
        let images = self.state.join("images/sha256");
        let mut dirs = vec![self.state.join("blobs/sha256"), images.clone()];
        dirs.extend(
            std::fs::read_dir(&images)
                .map_err(ioe(format!("list {}", images.display())))?
                .flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path()),
        );
        let mut removed = 0;
        for dir in dirs {
            for ent in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                let path = ent.path();
                if leftover(&ent.file_name().to_string_lossy(), &path, now) {
                    remove_temp(&path)?;
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }

    /// The path of a blob in the cache.
    pub fn blob_path(&self, digest: &str) -> Result<PathBuf> {
        Ok(self.state.join("blobs/sha256").join(hex_of(digest)?))
    }

    fn image_dir(&self, manifest_digest: &str) -> Result<PathBuf> {
        Ok(self
            .state
            .join("images/sha256")
            .join(hex_of(manifest_digest)?))
    }

    /// Resolves a reference to its linux/amd64 image (manifest, config, layer list).
    ///
    /// A digest reference already pulled is answered from the store, offline; tags always
    /// ask the registry (they move). Mirrors are tried first, then the registry.
    pub async fn resolve(&self, reference: &str) -> Result<Image> {
        let r = ImageRef::parse(reference).map_err(|source| OciError::BadReference {
            reference: reference.to_owned(),
            source,
        })?;
        if let Some(d) = &r.digest {
            if let Some(image) = self.find_local(d)? {
                return Ok(Image {
                    reference: r.to_string(),
                    ..image
                });
            }
        }
        let shown = r.to_string();
        let endpoints = self.registries.config.endpoints(&r.registry);
        let mut last_err = None;
        for ep in &endpoints {
            match self.resolve_at(&r, ep, &shown).await {
                Ok(image) => return Ok(image),
                Err(e) if ep.mirror => {
                    tracing::warn!(mirror = %ep.host, error = %e.detail(), "mirror failed; trying the next source");
                    last_err = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last_err.unwrap_or_else(|| OciError::Pull {
            reference: shown,
            detail: "no registry endpoint".into(),
            source: None,
        }))
    }

    async fn resolve_at(&self, r: &ImageRef, ep: &Endpoint, shown: &str) -> Result<Image> {
        let top = self
            .registries
            .manifest(ep, &r.repository, r.selector(), shown)
            .await?;
        let digest = sha256_digest(&top);
        if let Some(want) = &r.digest {
            if *want != digest {
                return Err(OciError::Invalid {
                    reference: shown.to_owned(),
                    detail: format!("{} served a manifest whose digest is {digest}", ep.host),
                });
            }
        }
        let parsed: RawManifest = serde_json::from_slice(&top).map_err(|e| OciError::Invalid {
            reference: shown.to_owned(),
            detail: format!("manifest is not valid JSON: {e}"),
        })?;
        let mut documents = vec![(digest.clone(), top.clone())];
        let is_index = parsed.manifests.is_some()
            || parsed
                .media_type
                .as_deref()
                .is_some_and(|m| m.contains("index") || m.contains("list"));
        let (manifest_digest, manifest) = if is_index {
            let entries = parsed.manifests.unwrap_or_default();
            let pick = entries.iter().find(|e| {
                e.platform
                    .as_ref()
                    .is_some_and(|p| p.os == "linux" && p.architecture == "amd64")
            });
            let Some(pick) = pick else {
                let found: Vec<String> = entries
                    .iter()
                    .filter_map(|e| e.platform.as_ref())
                    .filter(|p| p.os != "unknown")
                    .map(ToString::to_string)
                    .collect();
                return Err(OciError::UnsupportedPlatform {
                    reference: shown.to_owned(),
                    found: if found.is_empty() {
                        "none".into()
                    } else {
                        found.join(", ")
                    },
                });
            };
            hex_of(&pick.digest)?;
            let bytes = self
                .registries
                .manifest(ep, &r.repository, &pick.digest, shown)
                .await?;
            if sha256_digest(&bytes) != pick.digest {
                return Err(OciError::Invalid {
                    reference: shown.to_owned(),
                    detail: format!("manifest {} does not match its digest", pick.digest),
                });
            }
            let m: RawManifest = serde_json::from_slice(&bytes).map_err(|e| OciError::Invalid {
                reference: shown.to_owned(),
                detail: format!("manifest is not valid JSON: {e}"),
            })?;
            documents.push((pick.digest.clone(), bytes));
            (pick.digest.clone(), m)
        } else {
            (digest.clone(), parsed)
        };
        let (Some(config_desc), Some(layers)) = (manifest.config, manifest.layers) else {
            return Err(OciError::Invalid {
                reference: shown.to_owned(),
                detail: "manifest has no config or layers".into(),
            });
        };
        hex_of(&config_desc.digest)?;
        for l in &layers {
            hex_of(&l.digest)?;
        }
        let config_bytes = self
            .fetch_small_blob(ep, &r.repository, &config_desc, shown)
            .await?;
        let cfg: RawConfig =
            serde_json::from_slice(&config_bytes).map_err(|e| OciError::Invalid {
                reference: shown.to_owned(),
                detail: format!("image config is not valid JSON: {e}"),
            })?;
        if !cfg.os.is_empty() && (cfg.os != "linux" || cfg.architecture != "amd64") {
            let p = Platform {
                architecture: cfg.architecture,
                os: cfg.os,
                variant: cfg.variant,
            };
            return Err(OciError::UnsupportedPlatform {
                reference: shown.to_owned(),
                found: p.to_string(),
            });
        }
        documents.push((config_desc.digest.clone(), config_bytes));
        let rt = cfg.config.unwrap_or_default();
        Ok(Image {
            reference: shown.to_owned(),
            digest,
            manifest_digest,
            platform: PLATFORM.to_owned(),
            config_digest: config_desc.digest,
            layers,
            config: RuntimeConfig {
                env: rt.env.unwrap_or_default(),
                workdir: rt.working_dir.filter(|s| !s.is_empty()),
                user: rt.user.filter(|s| !s.is_empty()),
                entrypoint: rt.entrypoint,
                cmd: rt.cmd,
            },
            documents,
            endpoint: Some(ep.clone()),
        })
    }

    async fn fetch_small_blob(
        &self,
        ep: &Endpoint,
        repo: &str,
        d: &Descriptor,
        shown: &str,
    ) -> Result<Vec<u8>> {
        if let Ok(bytes) = std::fs::read(self.blob_path(&d.digest)?) {
            return Ok(bytes);
        }
        if d.size > MAX_DOCUMENT {
            return Err(OciError::TooLargeDocument {
                reference: shown.to_owned(),
                what: "image config".into(),
                limit_mib: MAX_DOCUMENT >> 20,
            });
        }
        let out = self
            .registries
            .small_blob(ep, repo, &d.digest, shown)
            .await?;
        if sha256_digest(&out) != d.digest {
            return Err(OciError::Invalid {
                reference: shown.to_owned(),
                detail: format!("blob {} failed verification", d.digest),
            });
        }
        Ok(out)
    }

    /// Looks up a pulled image by its digest or manifest digest.
    pub fn find_local(&self, digest: &str) -> Result<Option<Image>> {
        Ok(self
            .list()?
            .into_iter()
            .find(|i| i.digest == digest || i.manifest_digest == digest))
    }

    /// Every pulled image.
    pub fn list(&self) -> Result<Vec<Image>> {
        let dir = self.state.join("images/sha256");
        let mut out = Vec::new();
        let rd = std::fs::read_dir(&dir).map_err(ioe(format!("list {}", dir.display())))?;
        for ent in rd.flatten() {
            let p = ent.path().join("image.json");
            if let Ok(bytes) = std::fs::read(&p) {
                match serde_json::from_slice::<Image>(&bytes) {
                    Ok(i) => out.push(i),
                    Err(e) => {
                        tracing::warn!(path = %p.display(), error = %e, "unreadable image record")
                    }
                }
            }
        }
        out.sort_by(|a, b| a.reference.cmp(&b.reference));
        Ok(out)
    }

    /// Downloads every blob of `image` not yet cached, verifying each, `CONCURRENT_BLOBS`
    /// at a time, then records the image.
    pub async fn pull(&self, image: &Image, progress: ProgressFn<'_>) -> Result<PullReport> {
        let downloaded = Arc::new(AtomicU64::new(0));
        let r = ImageRef::parse(&image.reference).map_err(|source| OciError::BadReference {
            reference: image.reference.clone(),
            source,
        })?;
        let mut endpoints = self.registries.config.endpoints(&r.registry);
        if let Some(ep) = &image.endpoint {
            endpoints.retain(|e| e != ep);
            endpoints.insert(0, ep.clone());
        }
        let mut report = PullReport::default();
        let mut todo = Vec::new();
        let mut seen = HashSet::new();
        for l in &image.layers {
            if !seen.insert(l.digest.clone()) {
                continue;
            }
            let path = self.blob_path(&l.digest)?;
            let cached = std::fs::metadata(&path).is_ok_and(|m| m.len() == l.size);
            progress(Progress::BlobStarted {
                digest: l.digest.clone(),
                size: l.size,
                cached,
            });
            if cached {
                report.blobs_cached += 1;
                progress(Progress::BlobDone {
                    digest: l.digest.clone(),
                });
            } else {
                todo.push(l.clone());
            }
        }
        report.blobs_downloaded = todo.len();
        let repo = r.repository.clone();
        futures::stream::iter(todo.into_iter().map(|l| {
            let endpoints = &endpoints;
            let repo = &repo;
            let downloaded = downloaded.clone();
            async move {
                self.fetch_blob(endpoints, repo, &l, &image.reference, progress, &downloaded)
                    .await
            }
        }))
        .buffer_unordered(CONCURRENT_BLOBS)
        .try_collect::<Vec<()>>()
        .await?;
        for (digest, bytes) in &image.documents {
            let path = self.blob_path(digest)?;
            if !path.exists() {
                write_atomic(&path, bytes)?;
            }
        }
        let record = serde_json::to_vec_pretty(image)
            .map_err(|e| OciError::io("encode image record", e.into()))?;
        write_atomic(
            &self.image_dir(&image.manifest_digest)?.join("image.json"),
            &record,
        )?;
        report.bytes_downloaded = downloaded.load(Ordering::Relaxed);
        Ok(report)
    }

    async fn fetch_blob(
        &self,
        endpoints: &[Endpoint],
        repo: &str,
        d: &Descriptor,
        shown: &str,
        progress: ProgressFn<'_>,
        downloaded: &AtomicU64,
    ) -> Result<()> {
        let mut last = None;
        for ep in endpoints {
            match self
                .fetch_blob_at(ep, repo, d, shown, progress, downloaded)
                .await
            {
                Ok(()) => return Ok(()),
                Err(e) => {
                    tracing::warn!(endpoint = %ep.host, blob = %d.digest, error = %e.detail(), "blob fetch failed");
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| OciError::Pull {
            reference: shown.to_owned(),
            detail: "no endpoint".into(),
            source: None,
        }))
    }

    async fn fetch_blob_at(
        &self,
        ep: &Endpoint,
        repo: &str,
        d: &Descriptor,
        shown: &str,
        progress: ProgressFn<'_>,
        downloaded: &AtomicU64,
    ) -> Result<()> {
        let final_path = self.blob_path(&d.digest)?;
        let dir = final_path.parent().unwrap_or(Path::new(".")).to_path_buf();
        let mut resp = self
            .registries
            .blob(ep, repo, &d.digest, shown, false)
            .await?;
        let too_long = || OciError::Invalid {
            reference: shown.to_owned(),
            detail: format!(
                "blob {} from {} is longer than the {} bytes its manifest declares",
                d.digest, ep.host, d.size
            ),
        };
        if resp.content_length().is_some_and(|n| n > d.size) {
            return Err(too_long());
        }
        // The download goes to a temp file that is removed on drop: on an error, and also
        // when this future is dropped mid-way (another blob of the image failed and the
        // pull gave up on the rest, or the caller was cancelled). Created synchronously so
        // that no creation is still in flight when it is dropped.
        let (file, tmp) = tempfile::Builder::new()
            .prefix(&format!(
                ".tmp-{}-{}-",
                hex_of(&d.digest)?,
                std::process::id()
            ))
            // What `File::create` would give: cached blobs are not secrets.
            .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644))
            .tempfile_in(&dir)
            .map_err(ioe(format!("create a temp file in {}", dir.display())))?
            .into_parts();
        let mut file = tokio::fs::File::from_std(file);
        let mut hasher = Sha256::new();
        let mut total = 0u64;
        // Never past the declared size: a registry streaming on would fill the disk.
        while let Some(chunk) = resp
            .chunk()
            .await
            .map_err(|e| broke_off(&format!("blob {}", d.digest), shown, ep, e))?
        {
            if total + chunk.len() as u64 > d.size {
                return Err(too_long());
            }
            hasher.update(&chunk);
            total += chunk.len() as u64;
            file.write_all(&chunk)
                .await
                .map_err(ioe(format!("write {}", tmp.display())))?;
            downloaded.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            progress(Progress::BlobBytes {
                digest: d.digest.clone(),
                bytes: chunk.len() as u64,
            });
        }
        let got = format!("sha256:{}", hex::encode(hasher.finalize()));
        if got != d.digest || total != d.size {
            return Err(OciError::Invalid {
                reference: shown.to_owned(),
                detail: format!(
                    "blob {} from {} failed verification (got {got}, {total} bytes)",
                    d.digest, ep.host
                ),
            });
        }
        file.sync_all()
            .await
            .map_err(ioe(format!("fsync {}", tmp.display())))?;
        drop(file);
        tmp.persist(&final_path)
            .map_err(|e| OciError::io(format!("rename to {}", final_path.display()), e.error))?;
        if let Ok(f) = std::fs::File::open(&dir) {
            let _ = f.sync_all();
        }
        progress(Progress::BlobDone {
            digest: d.digest.clone(),
        });
        Ok(())
    }

    /// Unpacks a pulled image's layers into its cached rootfs (reused when present).
    pub async fn unpack(&self, image: &Image, progress: ProgressFn<'_>) -> Result<Unpacked> {
        let dir = self.image_dir(&image.manifest_digest)?;
        let rootfs = dir.join("rootfs");
        if rootfs.is_dir() {
            return Ok(Unpacked {
                rootfs,
                reused: true,
                stats: UnpackStats::default(),
            });
        }
        let mut layers = Vec::new();
        for l in &image.layers {
            let p = self.blob_path(&l.digest)?;
            if !p.exists() {
                return Err(OciError::NotPulled(format!(
                    "{} (layer {})",
                    image.reference, l.digest
                )));
            }
            layers.push(p);
        }
        std::fs::create_dir_all(&dir).map_err(ioe(format!("create {}", dir.display())))?;
        let tmp = dir.join(tmp_name("rootfs"));
        std::fs::create_dir(&tmp).map_err(ioe(format!("create {}", tmp.display())))?;
        let count = layers.len();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        // The whole unpack, publication or clean-up included, runs in the blocking task: it
        // finishes even if this future is dropped (a cancelled build), so the temp tree is
        // either published or removed, never left behind.
        let rootfs2 = rootfs.clone();
        let task = tokio::task::spawn_blocking(move || {
            let stats = match unpack::unpack_files(&tmp, &layers, &mut |index| {
                let _ = tx.send(index);
            }) {
                Ok(s) => s,
                Err(e) => {
                    let _ = unpack::remove_tree(&tmp);
                    return Err(e);
                }
            };
            match std::fs::rename(&tmp, &rootfs2) {
                Ok(()) => {
                    if let Ok(f) = std::fs::File::open(&dir) {
                        let _ = f.sync_all();
                    }
                    Ok(Some(stats))
                }
                // Another build unpacked the same image first: use theirs.
                Err(_) if rootfs2.is_dir() => {
                    let _ = unpack::remove_tree(&tmp);
                    Ok(None)
                }
                Err(e) => {
                    let _ = unpack::remove_tree(&tmp);
                    Err(OciError::io(format!("rename to {}", rootfs2.display()), e))
                }
            }
        });
        while let Some(index) = rx.recv().await {
            progress(Progress::Unpacking { index, count });
        }
        let published = task
            .await
            .map_err(|e| OciError::io("unpack task", std::io::Error::other(e)))??;
        Ok(Unpacked {
            rootfs,
            reused: published.is_none(),
            stats: published.unwrap_or_default(),
        })
    }

    /// Resolve, pull, unpack and vet: what a build does with its `from`.
    pub async fn prepare(
        &self,
        reference: &str,
        disk_mib: Option<u64>,
        progress: ProgressFn<'_>,
    ) -> Result<Prepared> {
        let image = self.resolve(reference).await?;
        let pull = self.pull(&image, progress).await?;
        let unpacked = self.unpack(&image, progress).await?;
        let root = unpacked.rootfs.clone();
        let vet = tokio::task::spawn_blocking(move || vet::vet(&root, disk_mib))
            .await
            .map_err(|e| OciError::io("vet task", std::io::Error::other(e)))??;
        Ok(Prepared {
            image,
            pull,
            unpacked,
            vet,
        })
    }

    /// Removes every image not reachable from `keep` (digests or manifest digests) and
    /// every blob no kept image uses, plus temp leftovers ([`ImageStore::sweep_temps`]).
    pub fn prune(&self, keep: &[&str]) -> Result<PruneReport> {
        let keep: HashSet<&str> = keep.iter().copied().collect();
        let mut report = PruneReport::default();
        let mut live: HashSet<String> = HashSet::new();
        let images_dir = self.state.join("images/sha256");
        self.sweep_temps()?;
        let now = SystemTime::now();
        for ent in std::fs::read_dir(&images_dir)
            .map_err(ioe(format!("list {}", images_dir.display())))?
            .flatten()
        {
            let path = ent.path();
            let name = ent.file_name().to_string_lossy().into_owned();
            if name.starts_with(".tmp-") {
                continue;
            }
            let record = std::fs::read(path.join("image.json"))
                .ok()
                .and_then(|b| serde_json::from_slice::<Image>(&b).ok());
            let kept = record.as_ref().is_some_and(|i| {
                keep.contains(i.digest.as_str()) || keep.contains(i.manifest_digest.as_str())
            });
            // A record-less dir may be an unpack in flight: only stale ones go.
            if kept || (record.is_none() && !is_stale(&path, now)) {
                if let Some(i) = record {
                    live.insert(i.digest.clone());
                    live.insert(i.manifest_digest.clone());
                    live.insert(i.config_digest.clone());
                    live.extend(i.layers.iter().map(|l| l.digest.clone()));
                }
                continue;
            }
            unpack::remove_tree(&path)?;
            report.images_removed += 1;
        }
        let blobs_dir = self.state.join("blobs/sha256");
        for ent in std::fs::read_dir(&blobs_dir)
            .map_err(ioe(format!("list {}", blobs_dir.display())))?
            .flatten()
        {
            let name = ent.file_name().to_string_lossy().into_owned();
            // Temp files in flight are a writer's; leftovers went in the sweep above.
            if !name.starts_with(".tmp-") && !live.contains(&format!("sha256:{name}")) {
                let size = ent.metadata().map(|m| m.len()).unwrap_or(0);
                std::fs::remove_file(ent.path())
                    .map_err(ioe(format!("remove {}", ent.path().display())))?;
                report.blobs_removed += 1;
                report.blob_bytes_freed += size;
            }
        }
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opening_sweeps_the_leftovers_of_dead_writers_of_every_kind() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path();
        let dead = {
            let mut child = std::process::Command::new("true").spawn().unwrap();
            let pid = child.id();
            child.wait().unwrap();
            pid
        };
        let me = std::process::id();
        let image = state.join("images/sha256").join("ab".repeat(32));
        std::fs::create_dir_all(&image).unwrap();
        std::fs::create_dir_all(state.join("blobs/sha256")).unwrap();
        let blob_tmp = |pid: u32| {
            state.join(format!(
                "blobs/sha256/.tmp-{}-{pid}-Xy12Z9",
                "cd".repeat(32)
            ))
        };
        let files = [
            (blob_tmp(dead), false),
            (blob_tmp(me), true),
            (state.join(format!("blobs/sha256/.tmp-w-{dead}-3")), false),
            (image.join(format!(".tmp-w-{dead}-4")), false),
            (image.join(format!(".tmp-w-{me}-5")), true),
            // An older kiln's name, without a pid: only once stale.
            (state.join("blobs/sha256/.tmp-old-name"), true),
        ];
        for (path, _) in &files {
            std::fs::write(path, b"x").unwrap();
        }
        let stale = state.join("blobs/sha256/.tmp-ancient");
        std::fs::File::create(&stale)
            .unwrap()
            .set_modified(SystemTime::now() - STALE_TMP * 2)
            .unwrap();
        let rootfs = image.join(format!(".tmp-rootfs-{dead}-1"));
        std::fs::create_dir_all(rootfs.join("usr/bin")).unwrap();
        std::fs::write(rootfs.join("usr/bin/sh"), b"x").unwrap();

        ImageStore::open(state, RegistryConfig::default()).unwrap();
        for (path, kept) in &files {
            assert_eq!(path.exists(), *kept, "{}", path.display());
        }
        assert!(!stale.exists());
        assert!(!rootfs.exists());
        assert!(image.is_dir(), "the image dir itself is not a temp");
    }
}
