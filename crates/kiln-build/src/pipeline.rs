//! One build, end to end: image -> disk -> build VM -> steps -> start/ready -> snapshot.
//!
//! The pipeline owns every resource it creates until the build succeeds: the build VM is
//! a [`Machine`] handle (the VM is killed when it drops, also on error and cancel) and the bundle
//! directory is removed unless the build reaches the end.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use kiln_oci::{ImageStore, Progress};
use kiln_spec::{BuildErrorCode, BuildSpec, Resources};
use kiln_vm::{
    ExecRequest, GuestTrust, Hypervisor, KernelAssets, Machine, NetConfig, Resolved, RootDisk,
    VmConfig,
};
use tokio_util::sync::CancellationToken;

use crate::error::BuildError;
use crate::guest::{Command, Exit, Guest, GuestError, OutputStream};
use crate::log::LogSink;
use kiln_spec::RuntimeDefaults;

use crate::stepcache::{self, Entry, StepCache};
use crate::steps::{StepRunner, Timing};

/// A build's phases, as the build status follows them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Image, VM, steps, start and ready.
    Building,
    /// Capturing the VM.
    Snapshotting,
}

/// Receives a build's log lines and phase changes.
pub trait BuildObserver: LogSink {
    /// The build entered a phase.
    fn phase(&self, _phase: Phase) {}
}

/// What a build needs from the host, shared by every build.
#[derive(Debug, Clone)]
pub struct BuildEnv {
    /// What runs build VMs.
    pub hypervisor: Arc<dyn Hypervisor>,
    /// The image cache and registry client.
    pub images: Arc<ImageStore>,
    /// Guest kernel and initramfs.
    pub kernel: KernelAssets,
    /// Agent binary injected into the disk.
    pub agent: Option<PathBuf>,
    /// Accelerator for build VMs.
    pub accel: Resolved,
    /// Parent of VM run directories (short: unix socket paths are limited).
    pub vm_dir: PathBuf,
    /// Time limits.
    pub timing: Timing,
    /// Bound on the whole build.
    pub build_timeout: Duration,
    /// The egress proxy of build VMs (`kiln_vm::NetConfig::egress`).
    pub egress: Option<kiln_vm::Egress>,
    /// The step cache (`None`: every build runs every step on a fresh disk).
    pub step_cache: Option<StepCache>,
    /// Certificates the build VM (and so every sandbox of the template) trusts besides
    /// the image's: kiln's egress CA and the operator's bundle.
    pub trust: Option<GuestTrust>,
}

/// One build to run.
#[derive(Debug, Clone)]
pub struct BuildJob {
    /// Names the VM in logs.
    pub name: String,
    /// The validated spec.
    pub spec: BuildSpec,
    /// The VM shape.
    pub resources: Resources,
    /// Where the snapshot bundle goes (must not exist yet).
    pub bundle_dir: PathBuf,
    /// Who shares step cache entries (the team): nobody else's layers are used.
    pub cache_scope: String,
    /// Run every step even where the step cache has it (`force`, `--no-cache`).
    pub no_cache: bool,
}

/// What a successful build produced.
#[derive(Debug, Clone)]
pub struct BuildOutput {
    /// The base image's manifest digest, for reproducibility.
    pub image_digest: String,
    /// The snapshot bundle.
    pub bundle_dir: PathBuf,
    /// Runtime defaults sandboxes start with.
    pub defaults: RuntimeDefaults,
    /// Pid of the start command in the snapshot, if any.
    pub start_pid: Option<u32>,
    /// Bytes the bundle's files hold (their apparent sizes).
    pub size_bytes: u64,
    /// The bundle's files (names inside it) and their sizes.
    pub files: Vec<(String, u64)>,
    /// The digest of the trust bundle installed in the guest ([`GuestTrust::digest`]).
    pub trust: Option<String>,
}

/// How a build ended other than in success.
#[derive(Debug, thiserror::Error)]
pub enum BuildEnd {
    /// It failed with a code.
    #[error(transparent)]
    Failed(#[from] BuildError),
    /// It was cancelled.
    #[error("cancelled")]
    Cancelled,
}

/// Runs one build to the end, or until `cancel` fires.
pub async fn run_build(
    env: &BuildEnv,
    job: &BuildJob,
    observer: &dyn BuildObserver,
    cancel: &CancellationToken,
) -> Result<BuildOutput, BuildEnd> {
    let started = Instant::now();
    let work = async {
        match tokio::time::timeout(env.build_timeout, build_inner(env, job, observer)).await {
            Ok(result) => result,
            Err(_) => Err(BuildError::new(
                BuildErrorCode::BuildFailed,
                format!(
                    "the build did not finish within {}s",
                    env.build_timeout.as_secs()
                ),
            )),
        }
    };
    let result = tokio::select! {
        r = work => r.map_err(BuildEnd::Failed),
        () = cancel.cancelled() => Err(BuildEnd::Cancelled),
    };
    match &result {
        Ok(_) => observer.system(format!("done in {:.1}s", started.elapsed().as_secs_f64())),
        Err(end) => {
            // The VM is gone with the dropped future; the partial bundle goes now.
            let _ = std::fs::remove_dir_all(&job.bundle_dir);
            match end {
                BuildEnd::Cancelled => observer.system("build cancelled".into()),
                BuildEnd::Failed(e) => {
                    tracing::warn!(error = ?e, "build failed");
                    observer.system(format!("build failed: {e}"));
                }
            }
        }
    }
    result
}

async fn build_inner(
    env: &BuildEnv,
    job: &BuildJob,
    observer: &dyn BuildObserver,
) -> Result<BuildOutput, BuildError> {
    observer.phase(Phase::Building);
    let spec = &job.spec;
    observer.system(format!("resolving {}", spec.from));
    let progress = |p: Progress| {
        if let Progress::BlobStarted {
            digest,
            size,
            cached,
        } = p
        {
            let short = digest.get(7..19).unwrap_or(&digest);
            let how = if cached { "cached" } else { "pulling" };
            observer.system(format!("{how} layer {short} ({})", human_bytes(size)));
        }
    };
    let prepared = env
        .images
        .prepare(
            &spec.from,
            Some(u64::from(job.resources.disk_mib)),
            &progress,
        )
        .await
        .map_err(|e| BuildError::new(e.code(), e.to_string()).with_source(e))?;
    let image = &prepared.image;
    observer.system(format!("image {} resolved to {}", spec.from, image.digest));

    observer.system(format!(
        "booting build VM ({} vCPU, {} MiB memory, {} MiB disk)",
        job.resources.vcpu, job.resources.memory_mib, job.resources.disk_mib
    ));
    let config = &image.config;
    let defaults = RuntimeDefaults::from_image_config(
        &config.env,
        config.workdir.as_deref(),
        config.user.as_deref(),
    );
    let steps = &spec.steps;
    let n = steps.len();
    let layers = match &env.step_cache {
        Some(cache) => Some(
            Layers::find(
                cache,
                env,
                job,
                &image.digest,
                &prepared.unpacked.rootfs,
                observer,
            )
            .await?,
        ),
        None => None,
    };
    let disk = match &layers {
        Some(l) => RootDisk::Overlay(l.top.disk.clone()),
        None => RootDisk::Ext4 {
            rootfs: prepared.unpacked.rootfs.clone(),
            disk_mib: u64::from(job.resources.disk_mib),
            agent: env.agent.clone(),
        },
    };
    let cached = layers.as_ref().map_or(0, |l| l.cached);

    let boot_started = Instant::now();
    let mut vm = env
        .hypervisor
        .boot(VmConfig {
            name: job.name.clone(),
            vcpus: job.resources.vcpu,
            memory_mib: u64::from(job.resources.memory_mib),
            kernel: env.kernel.clone(),
            disk,
            network: Some(NetConfig {
                forwards: Vec::new(),
                egress: env.egress.clone(),
            }),
            accel: env.accel,
            run_parent: env.vm_dir.clone(),
            console_log: None,
            boot_timeout: None,
        })
        .await
        .map_err(vm_err)?;
    observer.system(format!(
        "build VM up in {:.1}s",
        boot_started.elapsed().as_secs_f64()
    ));
    vm.sync_clock().await.map_err(vm_err)?;

    let mut defaults = defaults;
    if let Some(trust) = &env.trust {
        let vars = trust.install(vm.agent()).await.map_err(|e| {
            BuildError::new(
                BuildErrorCode::BuildFailed,
                format!("installing the trusted certificates in the guest: {e}"),
            )
            .with_source(e)
        })?;
        // Defaults: the image's own settings win.
        for (k, v) in vars {
            if !defaults.env.iter().any(|(name, _)| *name == k) {
                defaults.set_env(&k, &v);
            }
        }
        observer.system("the guest trusts kiln's egress CA and the operator's certificates".into());
    }
    let mut layers = layers;
    for (i, step) in steps.iter().enumerate() {
        let guest = VmGuest(vm.as_ref());
        let mut runner = StepRunner::new(&guest, observer, defaults, env.timing);
        if i < cached {
            runner.skip_cached(i, n, step);
        } else {
            runner.run_one(i, n, step).await?;
        }
        defaults = runner.defaults;
        if i >= cached {
            if let Some(l) = &mut layers {
                l.publish(vm.as_mut(), i, step).await;
            }
        }
    }
    let guest = VmGuest(vm.as_ref());
    let runner = StepRunner::new(&guest, observer, defaults, env.timing);
    let start_pid = runner
        .start_and_wait_ready(spec.start_cmd.as_deref(), spec.ready_cmd.as_deref())
        .await?;
    let defaults = runner.defaults.clone();
    // The agent keeps the defaults in guest memory, so they are in the snapshot and every
    // sandbox's exec uses them without the host saying so again.
    vm.agent()
        .set_defaults(agent_defaults(&defaults))
        .await
        .map_err(|e| {
            BuildError::new(
                BuildErrorCode::BuildFailed,
                format!("setting runtime defaults: {e}"),
            )
            .with_source(e)
        })?;

    observer.phase(Phase::Snapshotting);
    observer.system("snapshotting".into());
    if let Some(parent) = job.bundle_dir.parent() {
        std::fs::create_dir_all(parent).map_err(|e| {
            BuildError::new(
                BuildErrorCode::SnapshotFailed,
                format!("creating {}: {e}", parent.display()),
            )
        })?;
    }
    let info = vm.snapshot(&job.bundle_dir).await.map_err(vm_err)?;
    let size_bytes = info.manifest.files.values().map(|f| f.size).sum();
    observer.system(format!(
        "snapshot taken in {:.2}s ({}, {} allocated; device state {:.2}s, disk {:.2}s, \
         digests {:.2}s, sync {:.2}s)",
        info.total_time.as_secs_f64(),
        human_bytes(size_bytes),
        human_bytes(info.allocated),
        info.save_time.as_secs_f64(),
        info.files_time.as_secs_f64(),
        info.digest_time.as_secs_f64(),
        info.sync_time.as_secs_f64(),
    ));
    let files = info
        .manifest
        .files
        .iter()
        .map(|(name, f)| (name.clone(), f.size))
        .collect();
    Ok(BuildOutput {
        image_digest: image.digest.clone(),
        bundle_dir: job.bundle_dir.clone(),
        defaults,
        start_pid,
        size_bytes,
        files,
        trust: env.trust.as_ref().map(|t| t.digest().to_owned()),
    })
}

/// The step cache's part in one build: where it starts and the chain it publishes.
struct Layers<'a> {
    cache: &'a StepCache,
    /// Key of the disk after each step.
    keys: Vec<String>,
    /// Steps taken from the cache (a prefix).
    cached: usize,
    /// The entry the VM's disk currently sits on (the last published layer).
    top: Entry,
    /// Cleared when a publish fails: later layers would be backed by a missing one.
    publishing: bool,
    /// A base disk made for this build alone (the published one was damaged); removed
    /// with the build.
    _private_base: Option<tempfile::TempDir>,
    observer: &'a dyn BuildObserver,
}

impl<'a> Layers<'a> {
    /// The longest cached prefix of the spec's steps (none with `no_cache`), and the
    /// base disk under it, made and published when missing.
    async fn find(
        cache: &'a StepCache,
        env: &BuildEnv,
        job: &BuildJob,
        image_digest: &str,
        rootfs: &std::path::Path,
        observer: &'a dyn BuildObserver,
    ) -> Result<Layers<'a>, BuildError> {
        let agent_digest = match &env.agent {
            Some(p) => kiln_vm::provision::file_sha256(p).map_err(vm_err)?,
            None => "no-agent".to_owned(),
        };
        let base = stepcache::base_key(
            &job.cache_scope,
            image_digest,
            job.resources.disk_mib,
            &agent_digest,
        );
        let mut keys = Vec::with_capacity(job.spec.steps.len());
        let mut parent = base.clone();
        for step in &job.spec.steps {
            parent = stepcache::step_key(&parent, step);
            keys.push(parent.clone());
        }
        let hit = if job.no_cache {
            None
        } else {
            keys.iter()
                .enumerate()
                .rev()
                .find_map(|(i, k)| cache.lookup(k).map(|e| (i + 1, e)))
        };
        let make_base = |private: bool| {
            let (cache, base, rootfs, agent, disk_mib) = (
                cache.clone(),
                base.clone(),
                rootfs.to_owned(),
                env.agent.clone(),
                u64::from(job.resources.disk_mib),
            );
            async move {
                tokio::task::spawn_blocking(move || {
                    let make = |p: &std::path::Path| {
                        kiln_vm::disk::make_ext4(&rootfs, p, disk_mib, agent.as_deref())
                    };
                    if private {
                        cache.private_base(make).map(|(dir, e)| (Some(dir), e))
                    } else {
                        cache.publish_base(&base, make).map(|e| (None, e))
                    }
                })
                .await
                .map_err(|e| BuildError::new(BuildErrorCode::BuildFailed, e.to_string()))?
                .map_err(|e| {
                    let code = match &e {
                        stepcache::StepCacheError::Disk(d) => d.code(),
                        _ => BuildErrorCode::BuildFailed,
                    };
                    BuildError::new(code, kiln_vm::error_chain(&e)).with_source(e)
                })
            }
        };
        let (mut cached, mut top) = match hit {
            Some((cached, entry)) => {
                observer.system(format!(
                    "step cache: reusing the disk after step {cached}/{}",
                    keys.len()
                ));
                (cached, entry)
            }
            None => {
                // The base disk is the image's, whatever the steps: `no_cache` reuses it.
                let entry = match cache.lookup(&base) {
                    Some(e) => e,
                    None => make_base(false).await?.1,
                };
                (0, entry)
            }
        };
        // Every layer under the VM's disk must be whole: a damaged one is not built on.
        let chain: Vec<String> = std::iter::once(base.clone())
            .chain(keys[..cached].iter().cloned())
            .collect();
        let mut publishing = true;
        let mut private = None;
        // The entries of the chain, in order, up to the first damaged or missing one.
        let whole = {
            let cache = cache.clone();
            tokio::task::spawn_blocking(move || {
                chain
                    .iter()
                    .map_while(|k| cache.lookup(k).filter(|e| e.verify().unwrap_or(false)))
                    .collect::<Vec<Entry>>()
            })
            .await
            .map_err(|e| BuildError::new(BuildErrorCode::BuildFailed, e.to_string()))?
        };
        // Position 0 is the base, position p the disk after step p.
        let damaged = whole.len();
        if damaged <= cached {
            // The steps before the damaged layer can still come from the cache; nothing
            // is published on top of it (its key is taken, and later layers would stack
            // on a private disk).
            publishing = false;
            observer.system(if damaged == 0 {
                "step cache: the cached base disk of this image is damaged; building one \
                 for this build only (`kiln image prune` clears the cache)"
                    .to_owned()
            } else {
                format!(
                    "step cache: the cached disk after step {damaged}/{} is damaged or \
                     missing; running the steps from step {damaged} on (`kiln image prune` \
                     clears the cache)",
                    keys.len()
                )
            });
            match whole.last() {
                None => {
                    let (dir, entry) = make_base(true).await?;
                    private = dir;
                    (cached, top) = (0, entry);
                }
                Some(entry) => (cached, top) = (damaged - 1, entry.clone()),
            }
        }
        Ok(Layers {
            cache,
            keys,
            cached,
            top,
            publishing,
            _private_base: private,
            observer,
        })
    }

    /// Publishes the disk as step `index` left it. Failing to is not the build's
    /// failure: the cache is an optimisation, so the build goes on without it.
    async fn publish(&mut self, vm: &mut dyn Machine, index: usize, step: &kiln_spec::Step) {
        if !self.publishing {
            return;
        }
        let key = self.keys[index].clone();
        let published = if matches!(step, kiln_spec::Step::Env { .. }) {
            self.cache
                .publish_alias(&key, &self.top)
                .map_err(|e| kiln_vm::error_chain(&e))
        } else {
            self.freeze_and_publish(vm, index, &key).await
        };
        match published {
            Ok(entry) => self.top = entry,
            Err(e) => {
                // Later layers would sit on a disk the cache does not have.
                self.publishing = false;
                tracing::info!(error = %e, "step cache: not published");
                self.observer
                    .system(format!("step cache: step {} not cached: {e}", index + 1));
            }
        }
    }

    async fn freeze_and_publish(
        &self,
        vm: &mut dyn Machine,
        index: usize,
        key: &str,
    ) -> Result<Entry, String> {
        // What the step wrote must be on the disk, not in the guest's page cache.
        let sync = ExecRequest {
            command: "sync".into(),
            timeout_ms: Some(120_000),
            ..ExecRequest::default()
        };
        vm.exec_collect(sync)
            .await
            .map_err(|e| kiln_vm::error_chain(&e))?;
        let next = vm.run_dir().join(format!("disk-{}.qcow2", index + 1));
        let frozen = vm
            .freeze_disk(&next)
            .await
            .map_err(|e| kiln_vm::error_chain(&e))?;
        let (cache, key, parent) = (self.cache.clone(), key.to_owned(), self.top.clone());
        tokio::task::spawn_blocking(move || cache.publish_layer(&key, &frozen, &parent))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| kiln_vm::error_chain(&e))
    }
}

fn vm_err(e: kiln_vm::Error) -> BuildError {
    let detail = kiln_vm::error_chain(&e);
    BuildError::new(e.code(), detail).with_source(e)
}

fn human_bytes(n: u64) -> String {
    const MIB: f64 = 1024.0 * 1024.0;
    if n >= 1024 * 1024 {
        format!("{:.1} MiB", n as f64 / MIB)
    } else {
        format!("{:.1} KiB", n as f64 / 1024.0)
    }
}

/// The agent's form of the defaults (what a build sets, and a fork resets to).
pub fn agent_defaults(d: &RuntimeDefaults) -> kiln_agent_proto::RuntimeDefaults {
    kiln_agent_proto::RuntimeDefaults {
        env: d.env.iter().cloned().collect(),
        cwd: Some(d.workdir.clone()),
        user: Some(d.user.clone()),
    }
}

/// The build VM as a [`Guest`].
struct VmGuest<'a>(&'a dyn Machine);

impl VmGuest<'_> {
    /// A failed agent call; the VM is gone when the connection broke or QEMU exited.
    fn err(&self, e: kiln_agent_proto::ClientError) -> GuestError {
        let vm_gone = matches!(e, kiln_agent_proto::ClientError::Disconnected)
            || self.0.exit_status().is_some();
        let message = match self.0.exit_status() {
            Some(status) => format!("{e} (QEMU exited: {status})"),
            None => e.to_string(),
        };
        GuestError {
            message,
            source: Some(Box::new(e)),
            vm_gone,
        }
    }
}

fn exec_request(cmd: &Command) -> ExecRequest {
    ExecRequest {
        command: cmd.script.clone(),
        env: cmd.env.iter().cloned().collect(),
        cwd: Some(cmd.cwd.clone()),
        user: Some(cmd.user.clone()),
        timeout_ms: cmd
            .timeout
            .map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX)),
        ..ExecRequest::default()
    }
}

fn exit_of(status: kiln_vm::ExitStatus) -> Exit {
    match (status.code, status.signal) {
        (Some(code), _) => Exit::Code(code),
        (None, Some(signal)) => Exit::Signal(signal),
        (None, None) => Exit::Code(-1),
    }
}

#[async_trait]
impl Guest for VmGuest<'_> {
    async fn run(
        &self,
        cmd: &Command,
        on_output: &mut (dyn for<'b> FnMut(OutputStream, &'b [u8]) + Send),
    ) -> Result<Exit, GuestError> {
        let mut handle = self
            .0
            .agent()
            .exec(exec_request(cmd))
            .await
            .map_err(|e| self.err(e))?;
        loop {
            match handle.next_event().await.map_err(|e| self.err(e))? {
                Some(kiln_vm::ExecEvent::Stdout(b)) => on_output(OutputStream::Stdout, &b),
                Some(kiln_vm::ExecEvent::Stderr(b)) => on_output(OutputStream::Stderr, &b),
                Some(kiln_vm::ExecEvent::Exit(status)) => return Ok(exit_of(status)),
                None => {
                    return Err(GuestError::msg(
                        "the exec stream ended without an exit status",
                    ))
                }
            }
        }
    }

    async fn spawn(&self, cmd: &Command, log_path: &str) -> Result<u32, GuestError> {
        let mut req = exec_request(cmd);
        req.timeout_ms = None;
        req.background = Some(kiln_agent_proto::Background {
            log_path: Some(log_path.to_owned()),
        });
        let pid = self
            .0
            .agent()
            .spawn_background(req)
            .await
            .map_err(|e| self.err(e))?;
        u32::try_from(pid).map_err(|_| GuestError::msg(format!("agent returned pid {pid}")))
    }

    async fn exit_status(&self, pid: u32) -> Result<Option<Exit>, GuestError> {
        let pid = i32::try_from(pid).map_err(|_| GuestError::msg("pid out of range"))?;
        let status = self
            .0
            .agent()
            .wait_pid(pid, Some(Duration::ZERO))
            .await
            .map_err(|e| self.err(e))?;
        Ok(match (status.alive, status.exit) {
            (true, _) => None,
            (false, Some(exit)) => Some(exit_of(exit)),
            (false, None) => Some(Exit::Code(-1)),
        })
    }
}
