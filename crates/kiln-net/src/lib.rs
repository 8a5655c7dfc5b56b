//! Sandbox egress for kiln.
//!
//! VMs never reach the host or private networks: QEMU's user network runs restricted, and
//! the only way out is the egress proxy ([`proxy`]), which applies the sandbox's
//! [`rules`] to every connection. See `docs/security.md` for the wall this builds.

pub mod log;
pub mod proxy;
pub mod rules;

pub use proxy::{serve, Outcome, ProxyConfig};
pub use rules::{always_blocked, Decision, NetworkConfig, Policy, RuleError, RuleErrors};

/// Serves the one connection on this process's stdin and stdout (how QEMU runs the proxy)
/// and returns what was done, for the caller to log.
pub fn serve_stdio(cfg: &ProxyConfig) -> std::io::Result<Outcome> {
    use std::os::fd::AsFd as _;
    let input = std::fs::File::from(std::io::stdin().as_fd().try_clone_to_owned()?);
    let output = std::fs::File::from(std::io::stdout().as_fd().try_clone_to_owned()?);
    Ok(serve(input, output, cfg))
}
