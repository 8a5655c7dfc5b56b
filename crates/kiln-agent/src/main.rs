//! kiln-agent: the guest agent. As PID 1 in a kiln VM it boots the guest (initramfs
//! stage, switch_root, mounts, network) and serves the host over virtio-serial. With
//! `--listen-unix PATH` it serves the same protocol on a unix socket, without any init
//! duties, so exec/files logic can be tested on a host.

mod connect;
mod exec;
mod files;
mod init;
mod net;
mod procs;
mod server;
mod users;

use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use server::{Agent, ServeState, Sink, Transport};

const USAGE: &str = "usage: kiln-agent                  (as PID 1 in a kiln VM)
       kiln-agent --listen-unix PATH [--root DIR] [--sticky]
       kiln-agent --version

  --listen-unix PATH  serve the agent protocol on a unix socket (dev/test mode)
  --root DIR          resolve users from DIR/etc/passwd and DIR/etc/group (default /)
  --sticky            keep decoder state across connections (tests in-band resync)";

#[derive(Debug, Default)]
struct Args {
    listen_unix: Option<PathBuf>,
    root: Option<PathBuf>,
    sticky: bool,
}

fn parse_args() -> Result<Args> {
    let mut a = Args::default();
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--listen-unix" => {
                a.listen_unix = Some(it.next().context("--listen-unix PATH")?.into())
            }
            "--root" => a.root = Some(it.next().context("--root DIR")?.into()),
            "--sticky" => a.sticky = true,
            "--version" => {
                println!("kiln-agent {}", server::AGENT_VERSION);
                std::process::exit(0);
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            // The kernel passes unknown cmdline words to init as arguments: ignore them as PID 1.
            other if std::process::id() == 1 => {
                let _ = other;
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    Ok(a)
}

fn init_logging(pid1: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KILN_AGENT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(!pid1)
        .with_target(false)
        .try_init();
}

fn main() {
    server::mark_start();
    let pid1 = std::process::id() == 1;
    init_logging(pid1);
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("kiln-agent: {e:#}");
            std::process::exit(2);
        }
    };
    let res = if let Some(path) = args.listen_unix.clone() {
        run_unix(path, args)
    } else if pid1 {
        run_pid1()
    } else {
        Err(anyhow::anyhow!(
            "not PID 1 and no --listen-unix given\n{USAGE}"
        ))
    };
    if let Err(e) = res {
        eprintln!("kiln-agent: fatal: {e:#}");
        if pid1 {
            // Exiting would panic the kernel; power off so the host sees QEMU exit quickly.
            nix::unistd::sync();
            let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
        std::process::exit(1);
    }
}

fn run_unix(path: PathBuf, args: Args) -> Result<()> {
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).with_context(|| format!("bind {}", path.display()))?;
    let sink: Sink = Arc::new(Mutex::new(None));
    let agent = Agent::new(
        args.root.unwrap_or_else(|| PathBuf::from("/")),
        false,
        sink.clone(),
    );
    println!("kiln-agent: ready");
    let _ = std::io::stdout().flush();
    let mut sticky_state = ServeState::default();
    for conn in listener.incoming() {
        let mut conn = match conn {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                continue;
            }
        };
        match conn.try_clone() {
            Ok(w) => *sink.lock().unwrap_or_else(|e| e.into_inner()) = Some(Box::new(w)),
            Err(e) => {
                tracing::warn!(error = %e, "cannot clone connection");
                continue;
            }
        }
        if args.sticky {
            server::serve(&agent, &mut conn, Transport::Socket, &mut sticky_state);
        } else {
            let mut st = ServeState::default();
            server::serve(&agent, &mut conn, Transport::Socket, &mut st);
        }
        tracing::info!("host connection closed");
    }
    Ok(())
}

fn run_pid1() -> Result<()> {
    // Block SIGTERM/SIGINT before any thread exists so only the forwarding thread sees them.
    init::block_signals();
    if std::path::Path::new("/kiln/modules").exists() {
        init::initramfs_stage().context("initramfs stage")?;
    }
    // Read after the initramfs stage: /proc is only mounted from there on.
    init::mount_proc();
    let args = init::cmdline();
    init::real_root_setup(&args);
    let port_name = args
        .get("kiln.port")
        .cloned()
        .unwrap_or_else(|| "kiln.agent".into());
    let port_path = init::find_port(&port_name, Duration::from_secs(30))?;
    let mut port = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&port_path)
        .with_context(|| format!("open {}", port_path.display()))?;
    let writer = port.try_clone().context("dup port fd")?;
    let sink: Sink = Arc::new(Mutex::new(Some(Box::new(writer))));
    let agent = Agent::new(PathBuf::from("/"), true, sink);
    init::forward_signals(agent.procs.clone());
    tracing::info!(port = %port_path.display(), "serving");
    println!("kiln-agent: ready");
    let _ = std::io::stdout().flush();
    init::arm_port_sigio(port.as_fd());
    loop {
        // PID 1 must never die (the kernel would panic): a bug that panics the serving
        // loop costs the current connection state, not the VM.
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut st = ServeState::default();
            server::serve(&agent, &mut port, Transport::Port, &mut st);
        }));
        if r.is_err() {
            tracing::error!("serving loop panicked; restarting it");
            std::thread::sleep(Duration::from_millis(100));
        } else {
            bail!("agent port loop ended");
        }
    }
}
