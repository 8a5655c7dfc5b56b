//! Sandbox egress for kiln.
//!
//! VMs never reach the host or private networks: QEMU's user network runs restricted, and
//! the only way out is the egress proxy ([`proxy`]), which applies the sandbox's
//! [`rules`] to every connection (and the private destinations the operator opened).
//! Team secrets are swapped in there too: a sandbox holds stand-ins ([`secrets`]), and
//! requests to a secret's hosts are opened up (TLS terminated with kiln's CA, [`ca`]) and
//! get the real value ([`intercept`]), which is sealed at rest ([`seal`]) and never
//! enters the guest. The library does not care which process runs it: today QEMU starts
//! one `kiln egress-proxy` per connection ([`serve_stdio`]). See `docs/security.md` for
//! the walls this builds.

pub mod ca;
pub mod intercept;
pub mod log;
pub mod proxy;
pub mod rules;
pub mod seal;
pub mod secrets;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

pub use intercept::{Recorder, RequestRecord};
pub use proxy::{serve, Outcome, ProxyConfig, SecretsConfig};
pub use rules::{
    always_blocked, Decision, NetworkConfig, Policy, PrivateDest, RuleError, RuleErrors,
};

/// Serves the one connection on this process's stdin and stdout (how QEMU runs the proxy)
/// and returns what was done, for the caller to log.
pub fn serve_stdio(cfg: &ProxyConfig, recorder: &dyn Recorder) -> std::io::Result<Outcome> {
    use std::os::fd::AsFd as _;
    let input = std::fs::File::from(std::io::stdin().as_fd().try_clone_to_owned()?);
    let output = std::fs::File::from(std::io::stdout().as_fd().try_clone_to_owned()?);
    Ok(serve(input, output, cfg, recorder))
}
