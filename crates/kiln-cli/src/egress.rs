//! `kiln egress-proxy`: what QEMU runs for every connection a VM makes to the outside,
//! with the connection on stdin and stdout (see `kiln_net::proxy`). Not for people.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

/// Arguments of the hidden `egress-proxy` command.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The sandbox's rules file (JSON `{allow_out, deny_out}`); missing: no rules.
    #[arg(long)]
    rules: Option<PathBuf>,
    /// Append one line per connection here.
    #[arg(long)]
    log: Option<PathBuf>,
}

pub fn run(args: Args) -> ExitCode {
    // libslirp hands the connection over as stdin, stdout *and* stderr: anything written
    // to stderr would reach the guest inside its byte stream. Point it at /dev/null.
    // A guest that hangs up is a normal end, not a reason to die before the log line.
    // SAFETY: setting a signal disposition before any thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
    if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
        use std::os::fd::AsRawFd as _;
        // SAFETY: dup2 onto fd 2 of this single-threaded process; `null` stays open
        // until after the call.
        unsafe { libc::dup2(null.as_raw_fd(), 2) };
    }
    let cfg = kiln_net::ProxyConfig {
        rules: args.rules,
        ..kiln_net::ProxyConfig::default()
    };
    let outcome = match kiln_net::serve_stdio(&cfg) {
        Ok(o) => o.to_string(),
        Err(e) => format!("refused - (500): {e}"),
    };
    if let Some(path) = args.log {
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
            let _ = writeln!(f, "{now} {outcome}");
        }
    }
    ExitCode::SUCCESS
}
