//! `kiln egress-proxy`: what QEMU runs for every connection a VM makes to the outside,
//! with the connection on stdin and stdout (see `kiln_net::proxy`). Not for people.

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
    let outcome = kiln_net::serve_stdio(&cfg);
    if let Some(path) = args.log {
        let now = chrono::Utc::now();
        // Ids order the log (the SDKs page with them); one process per connection, so
        // the time in microseconds is as good a sequence as any.
        let id = now.timestamp_micros();
        let record = match &outcome {
            Ok(o) => o.log_record(id, now),
            Err(e) => kiln_net::Outcome::Refused {
                target: "-".into(),
                status: 502,
                reason: format!("proxy error: {e}"),
            }
            .log_record(id, now),
        };
        kiln_net::log::append(&path, &record);
    }
    ExitCode::SUCCESS
}
