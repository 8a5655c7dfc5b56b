//! `kiln egress-proxy`: one VM's egress proxy (see `kiln_net::proxy`), started by the
//! VM's owner in a jail (`kiln_vm::jail`) with two sockets inherited: the listener QEMU's
//! user network connects the guest's proxy address to (made in the VM's network
//! namespace), and its owner's end of the broker that serves the sandbox's files. Lives as
//! long as the VM. Not for people.

use std::os::fd::{FromRawFd as _, OwnedFd, RawFd};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;

/// Arguments of the hidden `egress-proxy` command.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The inherited listening socket.
    #[arg(long)]
    listen_fd: RawFd,
    /// The inherited socket to the owner, which serves the sandbox's files.
    #[arg(long)]
    broker_fd: RawFd,
    /// A private destination the operator opened (`host:port`, `cidr:port`); repeated.
    #[arg(long = "allow-private")]
    allow_private: Vec<kiln_net::PrivateDest>,
    /// Connections served at once; more are answered 503.
    #[arg(long, default_value_t = kiln_net::Limits::default().max_connections)]
    max_connections: usize,
    /// Seconds a connection has to send its request head.
    #[arg(long, default_value_t = kiln_net::Limits::default().header_timeout.as_secs())]
    header_timeout_secs: u64,
    /// Seconds a connection may move no byte either way.
    #[arg(long, default_value_t = kiln_net::Limits::default().idle_timeout.as_secs())]
    idle_timeout_secs: u64,
}

/// Takes an inherited descriptor, checking that it is open.
fn inherited(fd: RawFd, what: &str) -> anyhow::Result<OwnedFd> {
    // SAFETY: F_GETFD only inspects the descriptor table.
    if fd < 3 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        anyhow::bail!("{what}: descriptor {fd} is not open");
    }
    // SAFETY: the descriptor is open, was handed to this process for this use, and
    // nothing else in it owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let listener = std::net::TcpListener::from(inherited(args.listen_fd, "--listen-fd")?);
    let broker = std::os::unix::net::UnixStream::from(inherited(args.broker_fd, "--broker-fd")?);
    listener
        .set_nonblocking(true)
        .context("the listening socket")?;
    let limits = kiln_net::Limits {
        max_connections: args.max_connections.max(1),
        header_timeout: Duration::from_secs(args.header_timeout_secs),
        idle_timeout: Duration::from_secs(args.idle_timeout_secs),
    };
    let files = Arc::new(kiln_net::broker::BrokerClient::new(broker));
    let proxy = Arc::new(kiln_net::Proxy::new(args.allow_private, files, limits));
    // Opened-up connections hold a blocking thread each (the relay is synchronous), DNS
    // and the owner's answers take one briefly: the cap bounds them all.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(limits.max_connections + 16)
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        proxy.run(listener).await
    })
    .context("serving")?;
    Ok(ExitCode::SUCCESS)
}
