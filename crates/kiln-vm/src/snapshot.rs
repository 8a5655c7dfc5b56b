//! Snapshot bundles: capture a running VM, restore any number of VMs from it.
//!
//! Bundle layout (a directory, published by an atomic rename of a temp sibling):
//!
//! ```text
//! manifest.json   version, machine shape, ram mode, digest + size of every file below
//! state           QEMU migration stream (device state; RAM too in `stream` mode)
//! memory          guest RAM image (`file` mode)
//! disk.raw        the frozen root disk: the read-only base of every restore's overlay
//! disk.qcow2      (instead, for a restored VM's capture) its disk as one layer over its
//!                 template's disk.raw, which the layer names by absolute path
//! vmlinuz, initramfs.cpio   the exact boot files (the firmware/option-ROM layout must match)
//! ```
//!
//! Fast path (`file` mode): a booted VM's RAM is a `memory-backend-file` with `share=on` in
//! its run dir, so with `x-ignore-shared` the migration stream is device state only. The
//! snapshot consumes the VM: after QEMU quits, the memory file and the disk image are
//! *moved* into the bundle (no copy, and nothing can write to them any more, so restores see
//! a consistent image). Restores map `memory` with `share=off` (private copy-on-write; the
//! bundle is never written) and put a fresh qcow2 overlay on `disk.raw`.
//!
//! A VM that was itself restored runs on a private mapping, which `x-ignore-shared` does
//! not skip, so its snapshot streams RAM into `state` (`stream` mode); restoring such a
//! bundle loads RAM from the stream into a fresh per-VM memory file. Its disk is kept as
//! one qcow2 layer over the bottom of its chain, the template's `disk.raw` (`disk.qcow2`:
//! see [`layer_over`]), so a pause costs what the sandbox wrote, not its whole disk, and
//! the disk chains of resumed sandboxes stay one layer deep.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use kiln_agent_proto::AgentClient;
use serde::{Deserialize, Serialize};
use tracing::Instrument as _;

use crate::digest::chunked_sha256;
use crate::error::{Error, Result};
use crate::jail::Jail;
use crate::launch::Egress;
use crate::provision::{file_sha256, write_atomic, KernelAssets};
use crate::qmp::Qmp;
use crate::tool::Tool;
use crate::vm::{error_chain, kill_pid, PortForward, Shape, Vm};

/// Current manifest format version, the one snapshots write.
///
/// - 2: file digests are [`chunked_sha256`], which reads only a sparse file's data.
/// - 1: file digests are a plain sha256 of the whole file (holes included). Still read,
///   verified and restored: a kiln upgrade keeps the templates built before it.
pub const MANIFEST_VERSION: u32 = 2;
/// The oldest manifest version restores accept.
const OLDEST_MANIFEST_VERSION: u32 = 1;

/// How a manifest of `version` digests its files.
fn digest_for(version: u32) -> fn(&Path) -> Result<String> {
    if version >= 2 {
        chunked_sha256
    } else {
        file_sha256
    }
}

/// Where guest RAM lives in a bundle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RamMode {
    /// In the `memory` file; `state` is device state only.
    File,
    /// In the `state` migration stream.
    Stream,
}

/// One file of a bundle.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FileEntry {
    /// Hex content digest, as [`Manifest::version`] defines it (see [`MANIFEST_VERSION`]).
    /// Named `sha256` in version 1.
    #[serde(alias = "sha256")]
    pub digest: String,
    /// Size in bytes (apparent).
    pub size: u64,
}

/// `manifest.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    /// [`MANIFEST_VERSION`].
    pub version: u32,
    /// When the snapshot was taken (unix seconds).
    pub created_unix: u64,
    /// The machine shape a restore must reproduce.
    pub shape: Shape,
    /// Guest kernel release.
    pub kernel_version: String,
    /// Where RAM lives.
    pub ram: RamMode,
    /// Every file in the bundle except the manifest.
    pub files: BTreeMap<String, FileEntry>,
}

impl Manifest {
    /// The bundle's disk image: `disk.raw` (a template's, or a pause's flattened disk) or
    /// `disk.qcow2` (a checkpoint's layer over its template's `disk.raw`).
    pub fn disk_file(&self) -> &'static str {
        if self.files.contains_key("disk.qcow2") {
            "disk.qcow2"
        } else {
            "disk.raw"
        }
    }
}

/// What a snapshot produced.
#[derive(Debug, Clone)]
pub struct SnapshotInfo {
    /// The bundle directory.
    pub bundle: PathBuf,
    /// The manifest written.
    pub manifest: Manifest,
    /// Time the vCPUs were stopped until the device state was saved.
    pub save_time: Duration,
    /// Moving the memory file and the disk into the bundle (flattening a disk overlay).
    pub files_time: Duration,
    /// Computing the manifest's digests.
    pub digest_time: Duration,
    /// Flushing the bundle to stable storage.
    pub sync_time: Duration,
    /// Total time including moving files and checksums.
    pub total_time: Duration,
    /// Bytes the bundle's files take on disk (sparse files count only their data; the
    /// boot files are hard links shared by every bundle).
    pub allocated: u64,
}

/// Options for [`Vm::restore`].
#[derive(Debug, Clone)]
pub struct RestoreConfig {
    /// Name of the new VM (tracing, run-dir prefix). The guest hostname is the snapshot's.
    pub name: String,
    /// Parent of the run directory.
    pub run_parent: PathBuf,
    /// Port forwards (only if the snapshot has a network device).
    pub forwards: Vec<PortForward>,
    /// The egress proxy (see [`crate::NetConfig::egress`]); `None`: no way out.
    pub egress: Option<Egress>,
    /// Console log location (`None`: in the run dir).
    pub console_log: Option<PathBuf>,
    /// Bound for the whole restore to agent-connected.
    pub timeout: Duration,
    /// The template disk the bundle's disk lies over (the template bundle's own
    /// `disk.raw`, or the one a sandbox snapshot's or pause's `disk.qcow2` layer names):
    /// captures of the VM ([`Vm::snapshot`], [`Vm::checkpoint`]) keep its disk as one
    /// layer over it. `None`: a capture flattens the disk into a `disk.raw` of its own, and
    /// a checkpoint is refused.
    pub base_disk: Option<PathBuf>,
}

impl RestoreConfig {
    /// Defaults: no forwards, console in the run dir, 30 s bound.
    pub fn new(name: impl Into<String>, run_parent: impl Into<PathBuf>) -> Self {
        Self {
            name: name.into(),
            run_parent: run_parent.into(),
            forwards: Vec::new(),
            egress: None,
            console_log: None,
            timeout: Duration::from_secs(30),
            base_disk: None,
        }
    }
}

/// Reads and sanity-checks a bundle's manifest (version, files present, sizes). Does not
/// hash: see [`verify_bundle`].
pub fn read_manifest(bundle: &Path) -> Result<Manifest> {
    let bad = |reason: String| Error::Bundle {
        path: bundle.to_owned(),
        reason,
    };
    let path = bundle.join("manifest.json");
    let text = std::fs::read_to_string(&path).map_err(|e| bad(format!("manifest.json: {e}")))?;
    let m: Manifest =
        serde_json::from_str(&text).map_err(|e| bad(format!("manifest.json: {e}")))?;
    if !(OLDEST_MANIFEST_VERSION..=MANIFEST_VERSION).contains(&m.version) {
        return Err(bad(format!(
            "manifest version {} (this kiln reads {OLDEST_MANIFEST_VERSION} to {MANIFEST_VERSION})",
            m.version
        )));
    }
    for (name, entry) in &m.files {
        let meta = std::fs::metadata(bundle.join(name)).map_err(|e| bad(format!("{name}: {e}")))?;
        if meta.len() != entry.size {
            return Err(bad(format!(
                "{name}: size {} != {}",
                meta.len(),
                entry.size
            )));
        }
    }
    for need in ["state", m.disk_file(), "vmlinuz", "initramfs.cpio"] {
        if !m.files.contains_key(need) {
            return Err(bad(format!("missing {need}")));
        }
    }
    if m.ram == RamMode::File && !m.files.contains_key("memory") {
        return Err(bad("missing memory".into()));
    }
    Ok(m)
}

fn remember_verified(dir: &Path, files: &BTreeMap<String, FileEntry>) {
    for (name, entry) in files {
        crate::digest::mark_verified(&dir.join(name), &entry.digest);
    }
}

/// Checks every file of a bundle against its manifest's checksum, hashing only the files
/// not already verified unchanged by this process (see [`crate::digest::is_verified`]).
pub async fn ensure_verified(bundle: &Path, m: &Manifest) -> Result<()> {
    let mut stale = Vec::new();
    for (name, entry) in &m.files {
        if !crate::digest::is_verified(&bundle.join(name), &entry.digest)? {
            stale.push(name.clone());
        }
    }
    if stale.is_empty() {
        return Ok(());
    }
    let started = Instant::now();
    let sums = hash_files(bundle, stale.clone(), m.version).await?;
    for name in &stale {
        if sums.get(name).map(|e| &e.digest) != m.files.get(name).map(|e| &e.digest) {
            return Err(Error::Bundle {
                path: bundle.to_owned(),
                reason: format!(
                    "{name}: checksum mismatch (the artifact is corrupt; rebuild the template)"
                ),
            });
        }
    }
    remember_verified(bundle, &sums);
    tracing::info!(files = ?stale, ms = started.elapsed().as_millis() as u64, "bundle verified");
    Ok(())
}

/// Re-hashes every file of a bundle against its manifest (reads all of their data).
pub async fn verify_bundle(bundle: &Path) -> Result<Manifest> {
    let m = read_manifest(bundle)?;
    let sums = hash_files(bundle, m.files.keys().cloned().collect(), m.version).await?;
    for (name, entry) in &m.files {
        if sums.get(name).map(|e| &e.digest) != Some(&entry.digest) {
            return Err(Error::Bundle {
                path: bundle.to_owned(),
                reason: format!("{name}: checksum mismatch"),
            });
        }
    }
    Ok(m)
}

/// Digests files of `dir` as a manifest of `version` does, in parallel.
async fn hash_files(
    dir: &Path,
    names: Vec<String>,
    version: u32,
) -> Result<BTreeMap<String, FileEntry>> {
    let digest = digest_for(version);
    let tasks: Vec<_> = names
        .into_iter()
        .map(|n| {
            let p = dir.join(&n);
            tokio::task::spawn_blocking(move || -> Result<(String, FileEntry)> {
                let size = std::fs::metadata(&p).map_err(Error::io("stat", &p))?.len();
                Ok((
                    n,
                    FileEntry {
                        digest: digest(&p)?,
                        size,
                    },
                ))
            })
        })
        .collect();
    let mut out = BTreeMap::new();
    for t in tasks {
        let (n, e) = t
            .await
            .map_err(|e| Error::Snapshot(format!("hash task: {e}")))??;
        out.insert(n, e);
    }
    Ok(out)
}

/// Moves `from` to `to`; across filesystems, copies sparsely.
fn move_file(from: &Path, to: &Path) -> Result<()> {
    match std::fs::rename(from, to) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
            copy_sparse(from, to)?;
            std::fs::remove_file(from).map_err(Error::io("remove", from))
        }
        Err(e) => Err(Error::Io {
            what: "rename",
            path: from.to_owned(),
            source: e,
        }),
    }
}

fn copy_sparse(from: &Path, to: &Path) -> Result<()> {
    Tool::new("cp")
        .args(["--sparse=always", "--reflink=auto"])
        .arg(from)
        .arg(to)
        .run()?;
    Ok(())
}

/// Hard-links (or copies) a boot file into the bundle.
fn link_or_copy(from: &Path, to: &Path) -> Result<()> {
    if std::fs::hard_link(from, to).is_ok() {
        return Ok(());
    }
    std::fs::copy(from, to).map_err(Error::io("copy", from))?;
    Ok(())
}

/// What a file takes on disk (0 if it cannot be read).
fn allocated_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(path).map_or(0, |m| m.blocks() * 512)
}

fn fsync_dir(dir: &Path) {
    if let Ok(f) = std::fs::File::open(dir) {
        let _ = f.sync_all();
    }
}

fn snap_err(e: impl std::error::Error + 'static) -> Error {
    Error::Snapshot(error_chain(&e))
}

/// Migrates a stopped VM's state to the file `state` (`x-ignore-shared`: RAM that lives in
/// a shared memory file is left out) and waits for the end of it.
async fn migrate_to(qmp: &mut Qmp, state: &Path, ignore_shared: bool) -> Result<()> {
    qmp.migrate_set_capabilities(&[("x-ignore-shared", ignore_shared)])
        .await
        .map_err(snap_err)?;
    // QEMU runs jailed and never sees where its state goes: kiln opens the file and
    // passes it over QMP (and QEMU may not spawn a helper to write it).
    let out = std::fs::File::create(state).map_err(Error::io("create", state))?;
    qmp.migrate_to(&out).await.map_err(snap_err)?;
    qmp.wait_migration(MIGRATION_TIMEOUT)
        .await
        .map_err(snap_err)?;
    Ok(())
}

/// Bound on saving a VM's state (RAM included, in stream mode).
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(300);

/// The name a bundle gives a disk image of this format.
fn disk_name_of(image: &Path) -> Result<&'static str> {
    Ok(match crate::disk::image_format(image)? {
        "qcow2" => "disk.qcow2",
        _ => "disk.raw",
    })
}

/// Writes to `dest` a qcow2 layer over `base` that reads as the (frozen, read-only)
/// layer `frozen` and its backing chain do. When `frozen` already lies over `base`, that is
/// a link to it; otherwise a copy rebased onto `base` (`qemu-img rebase` writes into it
/// whatever of the chain in between differs from `base`).
fn layer_over(frozen: &Path, base: &Path, dest: &Path) -> Result<()> {
    let base = std::fs::canonicalize(base).map_err(Error::io("resolve", base))?;
    let backing = crate::disk::backing_file(frozen)?;
    let direct = backing
        .as_deref()
        .and_then(|b| std::fs::canonicalize(b).ok())
        .is_some_and(|b| b == base);
    if direct {
        link_or_copy(frozen, dest)
    } else {
        copy_sparse(frozen, dest)?;
        crate::disk::rebase(dest, &base).map_err(|e| Error::Snapshot(error_chain(&e)))
    }
}

/// Turns a bundle whose RAM is in its migration stream (a [`Vm::checkpoint`]) into one
/// at `bundle` whose RAM is a memory file, which restores map copy-on-write (`share=off`)
/// like a template's: many forks share its pages instead of each loading the stream
/// into memory of its own.
///
/// How: a QEMU started for the stream bundle (`-incoming defer`, RAM in a shared file in
/// its run dir under `run_parent`) loads the stream, its guest never run, and saves itself
/// again with `x-ignore-shared`, so that the file holds the whole RAM and the new `state`
/// only the devices. The disk image is linked, not copied: the guest wrote nothing.
pub async fn make_forkable(
    stream: &Path,
    bundle: &Path,
    run_parent: &Path,
    jail: &Jail,
) -> Result<SnapshotInfo> {
    let m = read_manifest(stream)?;
    if m.ram != RamMode::Stream {
        return Err(Error::Config(format!(
            "{} already keeps its RAM in a file",
            stream.display()
        )));
    }
    let mut cfg = RestoreConfig::new("forkable", run_parent);
    cfg.timeout = MIGRATION_TIMEOUT;
    let incoming = Vm::prepare_restore_in(stream, &cfg, jail).await?;
    let stream = incoming.bundle().to_owned();
    let vm = incoming.load(MIGRATION_TIMEOUT).await?;
    let disk = m.disk_file();
    let known = m
        .files
        .iter()
        .filter(|(n, _)| [disk, "vmlinuz", "initramfs.cpio"].contains(&n.as_str()))
        .map(|(n, e)| (n.clone(), e.clone()))
        .collect();
    vm.capture(bundle, BundleDisk::Linked(stream.join(disk)), known)
        .await
}

/// Hard-links every file of the bundle `src` into a new directory `dst` (copying where
/// a link cannot be made): the files of a published bundle are never written, so the
/// links are as good as copies and cost nothing, and they keep the data when `src` is
/// removed. Files this process verified stay verified.
pub fn link_bundle(src: &Path, dst: &Path) -> Result<Manifest> {
    let m = read_manifest(src)?;
    std::fs::create_dir(dst).map_err(Error::io("create", dst))?;
    for (name, entry) in &m.files {
        let from = src.join(name);
        let verified = crate::digest::is_verified(&from, &entry.digest).unwrap_or(false);
        link_or_copy(&from, &dst.join(name))?;
        if verified {
            // A link changes the inode's ctime: it was verified, and is the same file.
            crate::digest::mark_verified(&dst.join(name), &entry.digest);
        }
    }
    link_or_copy(&src.join("manifest.json"), &dst.join("manifest.json"))?;
    Ok(m)
}

/// A bundle being written: a temp directory next to where it is published, removed unless
/// [`Staged::publish`] renames it into place, so that a half-written bundle is never seen
/// under its name.
struct Staged {
    tmp: tempfile::TempDir,
    parent: PathBuf,
}

/// What [`Staged::publish`] measured.
struct Published {
    manifest: Manifest,
    digest_time: Duration,
    sync_time: Duration,
    allocated: u64,
}

impl Staged {
    fn new(bundle: &Path) -> Result<Self> {
        if bundle.exists() {
            return Err(Error::Snapshot(format!(
                "{} already exists",
                bundle.display()
            )));
        }
        let parent = bundle.parent().unwrap_or(Path::new(".")).to_owned();
        let tmp = tempfile::Builder::new()
            .prefix(".snapshot-")
            .tempdir_in(&parent)
            .map_err(|e| Error::Snapshot(format!("temp dir in {}: {e}", parent.display())))?;
        Ok(Self { tmp, parent })
    }

    fn path(&self) -> &Path {
        self.tmp.path()
    }

    /// Hashes the files named (those not in `known`, whose digests are already known),
    /// writes the manifest, flushes everything and renames the directory to `bundle`.
    async fn publish(
        self,
        bundle: &Path,
        names: &[&str],
        known: &BTreeMap<String, FileEntry>,
        head: ManifestHead,
    ) -> Result<Published> {
        let dir = self.path().to_owned();
        let t_hash = Instant::now();
        let mut files = hash_files(
            &dir,
            names
                .iter()
                .filter(|n| !known.contains_key(**n))
                .map(|n| (*n).to_owned())
                .collect(),
            MANIFEST_VERSION,
        )
        .await?;
        for n in names {
            if let Some(entry) = known.get(*n) {
                files.insert((*n).to_owned(), entry.clone());
            }
        }
        let digest_time = t_hash.elapsed();
        remember_verified(&dir, &files);
        let manifest = Manifest {
            version: MANIFEST_VERSION,
            created_unix: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            shape: head.shape,
            kernel_version: head.kernel_version,
            ram: head.ram,
            files,
        };
        let json =
            serde_json::to_vec_pretty(&manifest).map_err(|e| Error::Snapshot(e.to_string()))?;
        write_atomic(&dir.join("manifest.json"), &json)?;
        let t_sync = Instant::now();
        for name in manifest.files.keys() {
            if let Ok(f) = std::fs::File::open(dir.join(name)) {
                let _ = f.sync_all();
            }
        }
        fsync_dir(&dir);
        let sync_time = t_sync.elapsed();
        let allocated = manifest
            .files
            .keys()
            .map(|n| allocated_bytes(&dir.join(n)))
            .sum();
        let tmp_path = self.tmp.keep();
        if let Err(e) = std::fs::rename(&tmp_path, bundle) {
            let _ = std::fs::remove_dir_all(&tmp_path);
            return Err(Error::Snapshot(format!(
                "publish {}: {e}",
                bundle.display()
            )));
        }
        fsync_dir(&self.parent);
        Ok(Published {
            manifest,
            digest_time,
            sync_time,
            allocated,
        })
    }
}

/// The manifest fields that are not about files.
struct ManifestHead {
    shape: Shape,
    kernel_version: String,
    ram: RamMode,
}

/// Where a captured bundle's disk comes from.
enum BundleDisk {
    /// The VM's own disk: moved in when the VM owns a raw image, else flattened.
    Own,
    /// This image, unchanged by the VM (which never ran its guest): linked in.
    Linked(PathBuf),
}

/// What [`Vm::checkpoint`] produced.
#[derive(Debug, Clone)]
pub struct CheckpointInfo {
    /// The bundle: RAM in its migration stream, the disk a layer over the base disk.
    pub bundle: PathBuf,
    /// Its manifest.
    pub manifest: Manifest,
    /// How long the guest was stopped, `stop` to `cont`: what the sandbox's processes
    /// noticed of the capture.
    pub frozen_time: Duration,
    /// The whole capture, the disk layer and digests included.
    pub total_time: Duration,
    /// Bytes the bundle's files take on disk.
    pub allocated: u64,
}

impl Vm {
    /// Captures this VM into a bundle at `bundle` (must not exist; its parent must). The
    /// VM is consumed: it is paused, its device state saved, QEMU quits, and its memory file
    /// and disk become the bundle's. Errors carry code `snapshot_failed`.
    pub async fn snapshot(self, bundle: &Path) -> Result<SnapshotInfo> {
        self.capture(bundle, BundleDisk::Own, BTreeMap::new()).await
    }

    /// [`Vm::snapshot`], with the disk taken as `disk` says and the digests of `known`
    /// files not computed again.
    async fn capture(
        self,
        bundle: &Path,
        disk: BundleDisk,
        known: BTreeMap<String, FileEntry>,
    ) -> Result<SnapshotInfo> {
        let span = self.span.clone();
        async move {
            let started = Instant::now();
            let staged = Staged::new(bundle)?;
            let state = staged.path().join("state");
            let ram = if self.ram_shared_file().is_some() {
                RamMode::File
            } else {
                RamMode::Stream
            };
            let save_time;
            {
                let mut qmp = self.qmp.lock().await;
                qmp.stop().await.map_err(snap_err)?;
                let t0 = Instant::now();
                migrate_to(&mut qmp, &state, ram == RamMode::File).await?;
                save_time = t0.elapsed();
                tracing::info!(
                    ms = save_time.as_millis() as u64,
                    ?ram,
                    "device state saved"
                );
                let _ = qmp.quit().await;
            }
            // QEMU must be gone before its memory file and disk are taken over.
            let mut exit = self.exit.clone();
            if tokio::time::timeout(Duration::from_secs(10), exit.wait_for(Option::is_some))
                .await
                .is_err()
            {
                kill_pid(self.pid, &self.exit);
                let _ =
                    tokio::time::timeout(Duration::from_secs(5), exit.wait_for(Option::is_some))
                        .await;
            }
            let t_files = Instant::now();
            // QEMU (gone now) owned the run directory: what kiln takes out of it must be
            // what kiln left there, not a link a jailed QEMU put in its place.
            if let Some(mem) = self.ram_shared_file() {
                let mem = mem.to_owned();
                take_back(&mem)?;
                move_file(&mem, &staged.path().join("memory"))?;
            }
            let disk_name = match disk {
                BundleDisk::Own => {
                    let (disk, owned, overlay) = self.disk_source();
                    match (&self.root_disk, overlay) {
                        // A restored VM: one layer over its template's disk (what a pause
                        // then a resume, or a fork, restores on), not a flattened copy.
                        (Some(root), true) => {
                            take_back(disk)?;
                            self.check_backing()?;
                            layer_over(disk, root, &staged.path().join("disk.qcow2"))?;
                            "disk.qcow2"
                        }
                        _ => {
                            let dest = staged.path().join("disk.raw");
                            if owned {
                                take_back(disk)?;
                                move_file(disk, &dest)?;
                            } else if overlay {
                                take_back(disk)?;
                                self.check_backing()?;
                                crate::disk::flatten_to_raw(disk, &dest)
                                    .map_err(|e| Error::Snapshot(error_chain(&e)))?;
                            } else {
                                copy_sparse(disk, &dest)?;
                            }
                            "disk.raw"
                        }
                    }
                }
                BundleDisk::Linked(image) => {
                    let name = disk_name_of(&image)?;
                    link_or_copy(&image, &staged.path().join(name))?;
                    name
                }
            };
            link_or_copy(&self.kernel.vmlinuz, &staged.path().join("vmlinuz"))?;
            link_or_copy(
                &self.kernel.initramfs,
                &staged.path().join("initramfs.cpio"),
            )?;
            let mut names = vec!["state", disk_name, "vmlinuz", "initramfs.cpio"];
            if ram == RamMode::File {
                names.push("memory");
            }
            let files_time = t_files.elapsed();
            let head = ManifestHead {
                shape: self.shape.clone(),
                kernel_version: self.kernel.version.clone(),
                ram,
            };
            let p = staged.publish(bundle, &names, &known, head).await?;
            let total_time = started.elapsed();
            tracing::info!(
                ms = total_time.as_millis() as u64,
                files_ms = files_time.as_millis() as u64,
                digest_ms = p.digest_time.as_millis() as u64,
                sync_ms = p.sync_time.as_millis() as u64,
                allocated = p.allocated,
                bundle = %bundle.display(),
                "snapshot written"
            );
            // Drop does the rest (kill is a no-op once exited; run dir removed).
            Ok(SnapshotInfo {
                bundle: bundle.to_owned(),
                manifest: p.manifest,
                save_time,
                files_time,
                digest_time: p.digest_time,
                sync_time: p.sync_time,
                total_time,
                allocated: p.allocated,
            })
        }
        .instrument(span)
        .await
        .map_err(|e| match e {
            Error::Snapshot(_) | Error::SnapshotFiles(_) => e,
            other => Error::SnapshotFiles(Box::new(other)),
        })
    }

    /// Captures this running VM into a bundle at `bundle` (must not exist; its parent
    /// must) and lets it run on: the guest is stopped only while its disk is frozen and
    /// its RAM and device state are streamed to the bundle's `state`, then continued. The
    /// VM must have been restored with a [`RestoreConfig::base_disk`].
    ///
    /// The bundle's RAM is in the stream ([`RamMode::Stream`]: a VM restored from a
    /// bundle maps its RAM privately, so there is no file of it to keep); see
    /// [`make_forkable`] for a bundle that forks map copy-on-write. Its disk is the
    /// layer frozen at the capture (`blockdev-snapshot-sync`; the VM writes to a new layer
    /// from then on), made to lie directly over the base disk: a VM restored from the
    /// template has it as is, and the layers of earlier captures or of a pause are folded
    /// in (`qemu-img rebase`), so the bundle depends on nothing but the base disk.
    ///
    /// On any failure the guest is continued all the same and the VM is as it was (its
    /// disk may have gained a layer). The guest clock is behind by the frozen time
    /// afterwards: the caller sets it through the agent connection it holds.
    pub async fn checkpoint(&mut self, bundle: &Path) -> Result<CheckpointInfo> {
        let span = self.span.clone();
        self.checkpoint_inner(bundle)
            .instrument(span)
            .await
            .map_err(|e| match e {
                Error::Snapshot(_) | Error::SnapshotFiles(_) => e,
                other => Error::SnapshotFiles(Box::new(other)),
            })
    }

    async fn checkpoint_inner(&mut self, bundle: &Path) -> Result<CheckpointInfo> {
        let started = Instant::now();
        let (Some(base_disk), (top, _, true)) = (self.root_disk.clone(), self.disk_source()) else {
            return Err(Error::Config(
                "a checkpoint needs a VM restored with a base disk".into(),
            ));
        };
        let top = top.to_owned();
        let staged = Staged::new(bundle)?;
        let state = staged.path().join("state");
        let stamp = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let new_top = self.run_dir().join(format!("disk-{stamp:x}.qcow2"));
        let (froze, saved, frozen_time) = {
            let mut qmp = self.qmp.lock().await;
            qmp.stop().await.map_err(snap_err)?;
            let t0 = Instant::now();
            let froze = qmp
                .execute(
                    "blockdev-snapshot-sync",
                    Some(serde_json::json!({
                        "device": "root",
                        "snapshot-file": new_top.display().to_string(),
                        "format": "qcow2",
                        "mode": "absolute-paths",
                    })),
                )
                .await
                .map_err(snap_err);
            let saved = match &froze {
                Ok(_) => migrate_to(&mut qmp, &state, false).await,
                Err(_) => Ok(()),
            };
            // Whatever happened, the guest runs on (`cont` after a completed migration
            // also takes the disks back from the migration's end).
            let resumed = qmp.cont().await.map_err(snap_err);
            let frozen_time = t0.elapsed();
            resumed?;
            (froze, saved, frozen_time)
        };
        froze?;
        self.set_overlay_top(new_top);
        saved?;
        // The frozen layer is read as root below: it must be the file kiln made, with the
        // backing chain kiln made (a jailed QEMU could have rewritten its header).
        check_own_file(&top)?;
        self.check_backing()?;
        tracing::info!(
            frozen_ms = frozen_time.as_millis() as u64,
            "checkpoint saved"
        );
        let dest = staged.path().join("disk.qcow2");
        let t_layer = Instant::now();
        layer_over(&top, &base_disk, &dest)?;
        let layer_time = t_layer.elapsed();
        link_or_copy(&self.kernel.vmlinuz, &staged.path().join("vmlinuz"))?;
        link_or_copy(
            &self.kernel.initramfs,
            &staged.path().join("initramfs.cpio"),
        )?;
        let head = ManifestHead {
            shape: self.shape.clone(),
            kernel_version: self.kernel.version.clone(),
            ram: RamMode::Stream,
        };
        let names = ["state", "disk.qcow2", "vmlinuz", "initramfs.cpio"];
        let p = staged
            .publish(bundle, &names, &BTreeMap::new(), head)
            .await?;
        let total_time = started.elapsed();
        tracing::info!(
            ms = total_time.as_millis() as u64,
            frozen_ms = frozen_time.as_millis() as u64,
            layer_ms = layer_time.as_millis() as u64,
            digest_ms = p.digest_time.as_millis() as u64,
            allocated = p.allocated,
            bundle = %bundle.display(),
            "checkpoint written"
        );
        Ok(CheckpointInfo {
            bundle: bundle.to_owned(),
            manifest: p.manifest,
            frozen_time,
            total_time,
            allocated: p.allocated,
        })
    }

    /// Starts a new VM from a bundle on a fresh copy-on-write overlay of its disk, waits for
    /// the agent (same process as at snapshot time) and syncs the guest clock. Restores of
    /// one bundle are independent of each other and never write to the bundle.
    ///
    /// The same as [`Vm::prepare_restore`] followed at once by [`Incoming::finish`].
    pub async fn restore(bundle: &Path, cfg: RestoreConfig) -> Result<Vm> {
        Self::restore_in(bundle, cfg, &Jail::from_env()?).await
    }

    /// [`Vm::restore`] with its processes jailed by `jail`.
    pub async fn restore_in(bundle: &Path, cfg: RestoreConfig, jail: &Jail) -> Result<Vm> {
        let timeout = cfg.timeout;
        let started = Instant::now();
        let incoming = Self::prepare_restore_in(bundle, &cfg, jail).await?;
        let left = timeout
            .saturating_sub(started.elapsed())
            .max(Duration::from_secs(1));
        incoming.finish(left).await
    }

    /// The first half of a restore, everything that does not depend on *when* the VM is
    /// wanted: checks the bundle, creates the disk overlay and starts a QEMU that waits
    /// for its migration stream (`-incoming defer`), its guest not yet loaded. A pool of
    /// these hides process start-up from the sandbox that finally claims one.
    ///
    /// Jailed as the environment says ([`Jail::from_env`]).
    pub async fn prepare_restore(bundle: &Path, cfg: &RestoreConfig) -> Result<Incoming> {
        Self::prepare_restore_in(bundle, cfg, &Jail::from_env()?).await
    }

    /// [`Vm::prepare_restore`] with its processes jailed by `jail`.
    pub async fn prepare_restore_in(
        bundle: &Path,
        cfg: &RestoreConfig,
        jail: &Jail,
    ) -> Result<Incoming> {
        let m = read_manifest(bundle)?;
        let bundle = std::fs::canonicalize(bundle).map_err(Error::io("resolve", bundle))?;
        ensure_verified(&bundle, &m).await?;
        if !m.shape.network && !cfg.forwards.is_empty() {
            return Err(Error::Restore(
                "port forwards need a snapshot with networking".into(),
            ));
        }
        let kernel = KernelAssets {
            version: m.kernel_version.clone(),
            vmlinuz: bundle.join("vmlinuz"),
            initramfs: bundle.join("initramfs.cpio"),
        };
        // `stream` mode: RAM comes from the stream into a fresh shared file in the run dir
        // (so this VM's own snapshot can take the fast path again).
        let memory = match m.ram {
            RamMode::File => Some(bundle.join("memory")),
            RamMode::Stream => None,
        };
        let vm = Vm::launch_incoming(
            &cfg.name,
            m.shape.clone(),
            kernel,
            &cfg.run_parent,
            memory.as_deref(),
            &bundle.join(m.disk_file()),
            cfg.base_disk.clone(),
            crate::NetConfig {
                forwards: cfg.forwards.clone(),
                egress: cfg.egress.clone(),
            },
            cfg.console_log.clone(),
            jail,
        )
        .await?;
        Ok(Incoming {
            vm,
            bundle,
            manifest: m,
        })
    }
}

/// A QEMU started by [`Vm::prepare_restore`], waiting for its snapshot. Dropping it
/// kills the process and removes its run directory.
#[derive(Debug)]
pub struct Incoming {
    vm: Vm,
    bundle: PathBuf,
    manifest: Manifest,
}

impl Incoming {
    /// The bundle it will load.
    pub fn bundle(&self) -> &Path {
        &self.bundle
    }

    /// The VM's run directory.
    pub fn run_dir(&self) -> &Path {
        self.vm.run_dir()
    }

    /// Points the VM's egress proxy at the files of the sandbox that claims it (a pooled
    /// restore starts its proxy before any sandbox is known). Before the guest runs.
    pub fn assign_egress(&self, files: kiln_net::FileSet) {
        if let Some(proxy) = &self.vm.egress {
            proxy.files.assign(files);
        }
    }

    /// False once QEMU has exited (it can no longer be finished).
    pub fn is_alive(&self) -> bool {
        self.vm.exit_status().is_none()
    }

    /// Names who this VM serves in its logs: a process started ahead of time is named
    /// after what it was started for, and this ties its later log lines to its user.
    pub fn claimed_by(&self, who: &str) {
        self.vm.span.record("claimed_by", who);
    }

    /// Loads the snapshot, resumes the guest, connects to its agent and sets the guest
    /// clock, all within `timeout`. The bundle is checked again first (a cheap `stat`
    /// unless it changed since it was last hashed): it may have sat in a pool a while.
    pub async fn finish(self, timeout: Duration) -> Result<Vm> {
        let started = Instant::now();
        let mut vm = self.load_inner(timeout, true).await?;
        let span = vm.span.clone();
        async {
            let loaded = started.elapsed();
            let remaining = timeout
                .saturating_sub(started.elapsed())
                .max(Duration::from_secs(1));
            let agent = vm
                .guard(AgentClient::connect_unix(&vm.agent_sock, remaining))
                .await?;
            vm.agent = Some(agent);
            vm.sync_clock().await?;
            tracing::info!(
                loaded_ms = loaded.as_millis() as u64,
                ready_ms = started.elapsed().as_millis() as u64,
                "vm restored"
            );
            Ok::<_, Error>(())
        }
        .instrument(span)
        .await?;
        Ok(vm)
    }

    /// Loads the snapshot and leaves the guest stopped, never run (for
    /// [`make_forkable`]): no agent, no clock.
    async fn load(self, timeout: Duration) -> Result<Vm> {
        self.load_inner(timeout, false).await
    }

    async fn load_inner(self, timeout: Duration, run: bool) -> Result<Vm> {
        let Self {
            vm,
            bundle,
            manifest: m,
        } = self;
        ensure_verified(&bundle, &m).await?;
        let span = vm.span.clone();
        let state = bundle.join("state");
        let state = std::fs::File::open(&state).map_err(Error::io("open", &state))?;
        let res = tokio::time::timeout(timeout, async {
            let mut qmp = vm.qmp.lock().await;
            qmp.migrate_set_capabilities(&[("x-ignore-shared", m.ram == RamMode::File)])
                .await?;
            qmp.migrate_from(&state).await?;
            qmp.wait_migration(timeout).await?;
            // The source was paused when saved, and QEMU keeps that run state.
            if run && qmp.query_status().await?.status != "running" {
                qmp.cont().await?;
            }
            Ok::<_, crate::qmp::QmpError>(())
        })
        .instrument(span)
        .await;
        let fail = |reason: String| {
            Error::Restore(format!("{reason}; console tail:\n{}", vm.console_tail()))
        };
        match res {
            Err(_) => Err(fail("timed out loading the snapshot".into())),
            Ok(Err(e)) => {
                let why = vm.exit_status().unwrap_or_else(|| error_chain(&e));
                Err(fail(why))
            }
            Ok(Ok(())) => Ok(vm),
        }
    }
}

/// Checks that `path`, in a run directory QEMU owns, is a regular file of its own (no
/// link, no second name).
fn check_own_file(path: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt as _;
    let meta = std::fs::symlink_metadata(path).map_err(Error::io("inspect", path))?;
    if !meta.file_type().is_file() || meta.nlink() != 1 {
        return Err(Error::Snapshot(format!(
            "{} is not the regular file kiln left there",
            path.display()
        )));
    }
    Ok(())
}

/// [`check_own_file`], then gives the file back to kiln's user.
fn take_back(path: &Path) -> Result<()> {
    check_own_file(path)?;
    crate::jail::give(
        path,
        nix::unistd::geteuid().as_raw(),
        nix::unistd::getegid().as_raw(),
    )
    .map_err(|e| Error::SnapshotFiles(Box::new(e.into())))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A bundle of small files with a manifest of `version`, written as that version's
    /// JSON (version 1 names the digest `sha256`).
    fn fake_bundle_v(dir: &Path, version: u32) -> Manifest {
        let mut files = BTreeMap::new();
        for name in ["state", "disk.raw", "vmlinuz", "initramfs.cpio", "memory"] {
            std::fs::write(dir.join(name), name.as_bytes()).unwrap();
            files.insert(
                name.to_owned(),
                FileEntry {
                    digest: digest_for(version)(&dir.join(name)).unwrap(),
                    size: name.len() as u64,
                },
            );
        }
        let m = Manifest {
            version,
            created_unix: 0,
            shape: Shape::sample(crate::Resolved::Tcg, false),
            kernel_version: "x".into(),
            ram: RamMode::File,
            files,
        };
        let mut json = serde_json::to_string(&m).unwrap();
        if version == 1 {
            json = json.replace("\"digest\":", "\"sha256\":");
        }
        std::fs::write(dir.join("manifest.json"), json).unwrap();
        m
    }

    fn fake_bundle(dir: &Path) -> Manifest {
        fake_bundle_v(dir, MANIFEST_VERSION)
    }

    #[tokio::test]
    async fn version_1_bundles_still_verify() {
        let dir = tempfile::tempdir().unwrap();
        let m = fake_bundle_v(dir.path(), 1);
        // The two digests differ, so a v1 manifest is really checked the v1 way.
        assert_ne!(
            m.files["state"].digest,
            chunked_sha256(&dir.path().join("state")).unwrap()
        );
        let read = read_manifest(dir.path()).unwrap();
        assert_eq!(read.files, m.files);
        verify_bundle(dir.path()).await.unwrap();
        ensure_verified(dir.path(), &read).await.unwrap();
        std::fs::write(dir.path().join("disk.raw"), b"DISK.RAW").unwrap();
        let err = ensure_verified(dir.path(), &read).await.unwrap_err();
        assert!(
            err.to_string().contains("disk.raw: checksum mismatch"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn manifest_round_trip_and_corruption_detected() {
        let dir = tempfile::tempdir().unwrap();
        fake_bundle(dir.path());
        verify_bundle(dir.path()).await.unwrap();
        // Same size, different content: only the checksum catches it.
        std::fs::write(dir.path().join("state"), b"STATE").unwrap();
        read_manifest(dir.path()).unwrap();
        let err = verify_bundle(dir.path()).await.unwrap_err();
        assert!(err.to_string().contains("checksum mismatch"), "{err}");
        // Truncation is caught by the cheap check.
        std::fs::write(dir.path().join("memory"), b"m").unwrap();
        let err = read_manifest(dir.path()).unwrap_err();
        assert!(err.to_string().contains("memory: size"), "{err}");
    }

    #[test]
    fn wrong_version_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = fake_bundle(dir.path());
        m.version = 99;
        std::fs::write(
            dir.path().join("manifest.json"),
            serde_json::to_vec(&m).unwrap(),
        )
        .unwrap();
        let err = read_manifest(dir.path()).unwrap_err();
        assert!(err.to_string().contains("manifest version 99"), "{err}");
    }
}
