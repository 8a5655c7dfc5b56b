//! `kiln setup`, `kiln doctor` and `kiln run`: the local VM commands.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context as _};
use kiln_vm::provision::{self, AgentSource, SetupOptions, StateDir};
use kiln_vm::{ExecEvent, ExecRequest, NetConfig, RootDisk, Vm, VmConfig};

use crate::state::state_dir;

/// `kiln setup`: install host packages, fetch the guest kernel, build the initramfs.
#[derive(Debug, clap::Args)]
pub struct SetupArgs {
    /// Agent binary to put in the initramfs (default: $KILN_AGENT_BIN, else the one built
    /// into kiln).
    #[arg(long)]
    agent: Option<PathBuf>,
    /// Do not install missing Debian packages.
    #[arg(long)]
    no_packages: bool,
}

/// `kiln doctor`: report what is present and which accelerator VMs will use.
#[derive(Debug, clap::Args)]
pub struct DoctorArgs {}

/// `kiln run`: boot a throwaway VM from an image and run one command in it.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Virtual CPUs.
    #[arg(long, default_value_t = 1)]
    vcpu: u32,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 512)]
    memory: u64,
    /// Root disk size in MiB.
    #[arg(long, default_value_t = 1024)]
    disk: u64,
    /// Environment variable for the command (repeatable).
    #[arg(long = "env", value_name = "K=V")]
    env: Vec<String>,
    /// Working directory in the guest.
    #[arg(long)]
    workdir: Option<String>,
    /// User (name or uid, optionally user:group).
    #[arg(long)]
    user: Option<String>,
    /// Forward this process's stdin to the command.
    #[arg(short = 'i', long)]
    interactive: bool,
    /// No network device.
    #[arg(long)]
    no_network: bool,
    /// Image: an OCI reference (pulled, unpacked and vetted like a build's `from`), an
    /// unpacked rootfs directory, or a rootfs .tar.
    image: String,
    /// The command (run with `/bin/sh -c`, arguments shell-quoted).
    #[arg(last = true, required = true)]
    cmd: Vec<String>,
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("tokio runtime")
}

/// Runs `kiln setup`.
pub fn setup(args: SetupArgs) -> anyhow::Result<ExitCode> {
    let state = StateDir::new(state_dir());
    let report = provision::setup(&SetupOptions {
        state: state.clone(),
        agent: args
            .agent
            .map_or_else(crate::embedded_agent, AgentSource::Path),
        install_packages: !args.no_packages,
    })
    .map_err(|e| anyhow::anyhow!(kiln_vm::error_chain(&e)))?;
    if report.installed.is_empty() {
        println!(
            "host packages: present ({})",
            provision::HOST_PACKAGES.join(" ")
        );
    } else {
        println!("host packages: installed {}", report.installed.join(" "));
    }
    println!(
        "guest kernel:  {} {}",
        report.kernel.version,
        if report.kernel_downloaded {
            "(downloaded)"
        } else {
            "(present)"
        }
    );
    println!("vmlinuz:       {}", report.kernel.vmlinuz.display());
    println!(
        "initramfs:     {} {}",
        report.kernel.initramfs.display(),
        if report.initramfs_built {
            "(built)"
        } else {
            "(present)"
        }
    );
    println!("agent:         {}", report.agent_bin.display());
    let rt = runtime()?;
    let accel = rt.block_on(kiln_vm::accel::choose(
        kiln_vm::Accel::from_env(),
        &state,
        Some(&report.kernel),
    ));
    println!("accelerator:   {:?} ({})", accel.accel, accel.reason);
    Ok(ExitCode::SUCCESS)
}

/// Runs `kiln doctor`.
pub fn doctor(_args: DoctorArgs) -> anyhow::Result<ExitCode> {
    let state = StateDir::new(state_dir());
    let report = runtime()?.block_on(provision::doctor(&state, &crate::embedded_agent()));
    println!("state dir: {}", state.root().display());
    for c in &report.checks {
        println!(
            "[{}] {}: {}",
            if c.ok { " ok " } else { "FAIL" },
            c.what,
            c.detail
        );
    }
    println!(
        "accelerator: {:?} ({})",
        report.accel.accel, report.accel.reason
    );
    match kiln_vm::Jail::from_env() {
        Ok(jail) => {
            let level = match jail.level() {
                kiln_vm::jail::Level::Full => "full (own uid, namespaces, cgroup, seccomp)",
                kiln_vm::jail::Level::Unprivileged => {
                    "partial: kiln is not root (seccomp, no new privileges, network namespace)"
                }
                kiln_vm::jail::Level::Off => "off (KILN_JAIL=off): VM processes are not jailed",
            };
            let cgroups = match jail.level() {
                kiln_vm::jail::Level::Full => jail.cgroups().describe(),
                _ => "no cgroups".to_owned(),
            };
            println!("jail: {level}; {cgroups}");
        }
        Err(e) => println!("jail: {}", kiln_vm::error_chain(&e)),
    }
    Ok(if report.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Runs `kiln run`.
pub fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    runtime()?.block_on(run_async(args))
}

fn shell_join(words: &[String]) -> String {
    if words.len() == 1 {
        // One word: take it as a shell snippet (`kiln run IMG -- 'echo $HOME'`).
        return words[0].clone();
    }
    words
        .iter()
        .map(|w| {
            if !w.is_empty()
                && w.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c))
            {
                w.clone()
            } else {
                format!("'{}'", w.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Unpacks a rootfs tarball (as root: ownership and modes kept) into `dest`.
fn unpack_tar(tar: &Path, dest: &Path) -> anyhow::Result<()> {
    let f = std::fs::File::open(tar).with_context(|| format!("open {}", tar.display()))?;
    let mut ar = tar::Archive::new(std::io::BufReader::new(f));
    ar.set_preserve_permissions(true);
    ar.set_preserve_ownerships(true);
    ar.set_unpack_xattrs(false);
    ar.unpack(dest)
        .with_context(|| format!("unpack {}", tar.display()))?;
    Ok(())
}

async fn run_async(args: RunArgs) -> anyhow::Result<ExitCode> {
    let state = StateDir::new(state_dir());
    let agent = crate::embedded_agent()
        .resolve(&state)
        .map_err(|e| anyhow::anyhow!(kiln_vm::error_chain(&e)))?;
    let kernel = provision::prepare(&state, &agent)
        .map_err(|e| anyhow::anyhow!(kiln_vm::error_chain(&e)))?;
    let accel = kiln_vm::accel::choose(kiln_vm::Accel::from_env(), &state, Some(&kernel)).await;
    tracing::info!(accel = ?accel.accel, reason = %accel.reason, "accelerator");

    let run_parent = state.vms_dir();
    std::fs::create_dir_all(&run_parent)
        .with_context(|| format!("create {}", run_parent.display()))?;
    kiln_vm::sweep_stale_run_dirs(&run_parent);
    // Everything temporary lives under this dir and goes when it drops. QEMU dies with us
    // (PR_SET_PDEATHSIG) even on SIGKILL; the dir is then swept by the next `kiln run` or
    // server start.
    let scratch = kiln_vm::RunDir::create(&run_parent, "run")
        .map_err(|e| anyhow::anyhow!(kiln_vm::error_chain(&e)))?;
    let image = Path::new(&args.image);
    let rootfs = if image.is_dir() {
        image.to_owned()
    } else if image.is_file() {
        let dest = scratch.path().join("rootfs");
        std::fs::create_dir(&dest)?;
        let (tar, d) = (image.to_owned(), dest.clone());
        tokio::task::spawn_blocking(move || unpack_tar(&tar, &d)).await??;
        dest
    } else {
        // Not a path: an image reference. The unpacked rootfs is the shared cache; the
        // disk build only reads it.
        let cfg_path = std::env::var_os("KILN_CONFIG")
            .filter(|v| !v.is_empty())
            .map_or_else(|| state.root().join("config.json"), PathBuf::from);
        let config = kiln_oci::RegistryConfig::load(Some(&cfg_path))
            .with_context(|| format!("image {}", args.image))?;
        let store = kiln_oci::ImageStore::open(state.root(), config)
            .with_context(|| format!("image {}", args.image))?;
        let prepared = store
            .prepare(&args.image, Some(args.disk), &|_| {})
            .await
            .map_err(|e| anyhow::anyhow!("{}: {}", e.code(), e.detail()))?;
        prepared.unpacked.rootfs
    };
    let mut env = std::collections::BTreeMap::new();
    for kv in &args.env {
        let (k, v) = kv
            .split_once('=')
            .with_context(|| format!("--env {kv}: expected K=V"))?;
        env.insert(k.to_owned(), v.to_owned());
    }
    let vm = Vm::boot(VmConfig {
        name: "kiln-run".into(),
        vcpus: args.vcpu,
        memory_mib: args.memory,
        kernel,
        disk: RootDisk::Ext4 {
            rootfs,
            disk_mib: args.disk,
            agent: Some(agent),
        },
        network: (!args.no_network).then(|| NetConfig {
            forwards: Vec::new(),
            egress: std::env::current_exe().ok().map(|exe| kiln_vm::Egress {
                command: vec![exe.display().to_string(), "egress-proxy".to_owned()],
                limits: kiln_net::Limits::default(),
                files: Some(kiln_net::FileSet::default()),
            }),
        }),
        accel: accel.accel,
        run_parent: scratch.path().to_owned(),
        console_log: None,
        boot_timeout: None,
    })
    .await
    .map_err(|e| anyhow::anyhow!("{}: {}", e.code(), kiln_vm::error_chain(&e)))?;

    let result = exec_streaming(&vm, &args, env).await;
    vm.shutdown().await;
    drop(scratch);
    result
}

async fn exec_streaming(
    vm: &Vm,
    args: &RunArgs,
    env: std::collections::BTreeMap<String, String>,
) -> anyhow::Result<ExitCode> {
    let req = ExecRequest {
        command: shell_join(&args.cmd),
        env,
        cwd: args.workdir.clone(),
        user: args.user.clone(),
        stdin: args.interactive,
        ..Default::default()
    };
    let mut handle = vm
        .exec(req)
        .await
        .map_err(|e| anyhow::anyhow!(kiln_vm::error_chain(&e)))?;
    if let Some(stdin) = handle.take_stdin() {
        tokio::spawn(async move {
            let _ = stdin.copy_from(tokio::io::stdin()).await;
        });
    }
    loop {
        let ev = vm
            .guard(handle.next_event())
            .await
            .map_err(|e| anyhow::anyhow!(kiln_vm::error_chain(&e)))?;
        match ev {
            Some(ExecEvent::Stdout(b)) => {
                let mut out = std::io::stdout().lock();
                out.write_all(&b)?;
                out.flush()?;
            }
            Some(ExecEvent::Stderr(b)) => {
                let mut err = std::io::stderr().lock();
                err.write_all(&b)?;
                err.flush()?;
            }
            Some(ExecEvent::Exit(st)) => {
                let code = match (st.code, st.signal) {
                    (Some(c), _) => c,
                    (None, Some(s)) => 128 + s,
                    _ => 255,
                };
                return Ok(ExitCode::from(u8::try_from(code & 0xff).unwrap_or(255)));
            }
            None => bail!("the command's output ended without an exit status"),
        }
    }
}
