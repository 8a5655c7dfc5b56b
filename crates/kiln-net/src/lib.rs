//! Sandbox egress for kiln.
//!
//! VMs never reach the host or private networks: QEMU runs in a network namespace of its
//! own whose one way out is the VM's egress proxy ([`proxy`]), a long-lived, jailed
//! process that applies the sandbox's [`rules`] to every connection (and the private
//! destinations the operator opened), with a cap on connections and timeouts
//! ([`proxy::Limits`], [`idle`]). It reads the sandbox's files through its owner
//! ([`files`], [`broker`]). Team secrets are swapped in there too: a sandbox holds
//! stand-ins ([`secrets`]), and requests to a secret's hosts are opened up (TLS terminated
//! with kiln's CA, [`ca`]) and get the real value ([`intercept`]), which is sealed at rest
//! ([`seal`]) and never enters the guest. See `docs/security.md` for the walls this
//! builds.

pub mod broker;
pub mod ca;
pub mod files;
pub mod idle;
pub mod intercept;
pub mod log;
pub mod proxy;
pub mod rules;
pub mod seal;
pub mod secrets;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

pub use files::{FileSet, Files, Sink, Source};
pub use intercept::{Recorder, RequestRecord};
pub use proxy::{Limits, Outcome, Proxy};
pub use rules::{
    always_blocked, Decision, NetworkConfig, Policy, PrivateDest, RuleError, RuleErrors,
};
