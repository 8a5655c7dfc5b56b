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
    /// Append one line per connection (and per request a secret went into) here.
    #[arg(long)]
    log: Option<PathBuf>,
    /// A private destination the operator opened (`host:port`, `cidr:port`); repeated.
    #[arg(long = "allow-private")]
    allow_private: Vec<kiln_net::PrivateDest>,
    /// The sandbox's secret bindings file; missing: no bindings.
    #[arg(long, requires_all = ["secrets_key", "ca_dir"])]
    secrets: Option<PathBuf>,
    /// The secrets key file the bindings' values are sealed with.
    #[arg(long)]
    secrets_key: Option<PathBuf>,
    /// The egress CA's directory.
    #[arg(long)]
    ca_dir: Option<PathBuf>,
    /// More roots to verify upstreams against (`KILN_EGRESS_TRUST_CA`).
    #[arg(long)]
    trust_ca: Option<PathBuf>,
    /// Append each secret's audit events to `<dir>/<secret id>.log`.
    #[arg(long)]
    audit_dir: Option<PathBuf>,
}

/// Ids order the logs (the SDKs page with them); one process per connection, so the
/// time in microseconds is as good a sequence as any.
fn stamp() -> (i64, chrono::DateTime<chrono::Utc>) {
    let now = chrono::Utc::now();
    (now.timestamp_micros(), now)
}

/// Requests that carried a secret: a `request` row of the sandbox's network log and an
/// event of the secret's audit.
struct Files {
    log: Option<PathBuf>,
    audit_dir: Option<PathBuf>,
}

impl kiln_net::Recorder for Files {
    fn request(&self, record: &kiln_net::RequestRecord) {
        let (id, ts) = stamp();
        if let Some(log) = &self.log {
            kiln_net::log::append(log, &record.network_event(id, ts));
        }
        // Secret ids are kiln's UUIDs; anything else is not a file name.
        let secret = record
            .secret_id
            .as_deref()
            .filter(|s| s.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-'));
        if let (Some(dir), Some(secret)) = (&self.audit_dir, secret) {
            kiln_net::log::append(
                &dir.join(format!("{secret}.log")),
                &record.audit_event(id, ts),
            );
        }
    }
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
    let secrets = match (args.secrets, args.secrets_key, args.ca_dir) {
        (Some(bindings), Some(key), Some(ca_dir)) => Some(kiln_net::SecretsConfig {
            bindings,
            key,
            ca_dir,
            trust_ca: args.trust_ca,
        }),
        _ => None,
    };
    let cfg = kiln_net::ProxyConfig {
        rules: args.rules,
        allow_private: args.allow_private,
        secrets,
    };
    let files = Files {
        log: args.log.clone(),
        audit_dir: args.audit_dir,
    };
    let outcome = kiln_net::serve_stdio(&cfg, &files);
    if let Some(path) = args.log {
        let (id, now) = stamp();
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
