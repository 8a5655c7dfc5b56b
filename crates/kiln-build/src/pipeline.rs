//! One build, end to end: image -> disk -> build VM -> steps -> start/ready -> snapshot.
//!
//! The pipeline owns every resource it creates until the build succeeds: the build VM is
//! a [`Vm`] handle (QEMU is killed when it drops, also on error and cancel) and the bundle
//! directory is removed unless the build reaches the end.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use kiln_oci::{ImageStore, Progress};
use kiln_spec::{BuildErrorCode, BuildSpec, Resources};
use kiln_vm::{ExecRequest, KernelAssets, NetConfig, Resolved, RootDisk, Vm, VmConfig};
use tokio_util::sync::CancellationToken;

use crate::error::BuildError;
use crate::guest::{Command, Exit, Guest, GuestError, OutputStream};
use crate::log::LogSink;
use kiln_spec::RuntimeDefaults;

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
    /// The egress proxy command for build VMs (`kiln_vm::NetConfig::egress`).
    pub egress: Option<Vec<String>>,
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
    /// Bytes the bundle takes on disk.
    pub size_bytes: u64,
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
    let boot_started = Instant::now();
    let vm = Vm::boot(VmConfig {
        name: job.name.clone(),
        vcpus: job.resources.vcpu,
        memory_mib: u64::from(job.resources.memory_mib),
        kernel: env.kernel.clone(),
        disk: RootDisk::Ext4 {
            rootfs: prepared.unpacked.rootfs.clone(),
            disk_mib: u64::from(job.resources.disk_mib),
            agent: env.agent.clone(),
        },
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

    let config = &image.config;
    let defaults = RuntimeDefaults::from_image_config(
        &config.env,
        config.workdir.as_deref(),
        config.user.as_deref(),
    );
    let guest = VmGuest(&vm);
    let mut runner = StepRunner::new(&guest, observer, defaults, env.timing);
    runner.run_steps(&spec.steps).await?;
    let start_pid = runner
        .start_and_wait_ready(spec.start_cmd.as_deref(), spec.ready_cmd.as_deref())
        .await?;
    let defaults = runner.defaults.clone();
    // The agent keeps the defaults in guest memory, so they are in the snapshot and every
    // sandbox's exec uses them without the host saying so again.
    vm.agent()
        .set_defaults(to_agent(&defaults))
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
        "snapshot taken in {:.2}s ({})",
        info.total_time.as_secs_f64(),
        human_bytes(size_bytes)
    ));
    Ok(BuildOutput {
        image_digest: image.digest.clone(),
        bundle_dir: job.bundle_dir.clone(),
        defaults,
        start_pid,
        size_bytes,
    })
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

/// The agent's form of the defaults.
fn to_agent(d: &RuntimeDefaults) -> kiln_agent_proto::RuntimeDefaults {
    kiln_agent_proto::RuntimeDefaults {
        env: d.env.iter().cloned().collect(),
        cwd: Some(d.workdir.clone()),
        user: Some(d.user.clone()),
    }
}

/// The build VM as a [`Guest`].
struct VmGuest<'a>(&'a Vm);

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
