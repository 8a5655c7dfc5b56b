//! The kiln host <-> guest agent protocol.
//!
//! - [`frame`]: length-prefixed, multiplexed, resynchronisable framing over one byte stream.
//! - [`msg`]: the JSON control messages and the data types they carry.
//! - `client` (feature `client`): the host-side tokio client used by `kiln-vm` and
//!   `kiln-build`.
//! - `fake` (feature `fake`): a scripted agent on a unix socket, for tests of host code.
//!
//! The protocol is shared by a guest agent that runs as PID 1 inside the VM and a host
//! that may disconnect at any time (including across snapshot/restore), so every
//! connection starts with a SYNC marker plus `hello`, and every request lives on its own
//! stream id so many can be in flight at once.

pub mod frame;
pub mod msg;

#[cfg(feature = "client")]
pub mod client;
#[cfg(feature = "fake")]
pub mod fake;

#[cfg(feature = "client")]
pub use client::{
    AgentClient, ClientError, ExecControl, ExecEvent, ExecHandle, ExecOutput, ExecStdin,
};
pub use frame::{DecodeEvent, Decoder, Frame, FrameKind};
pub use msg::*;

/// Where a guest reaches the outside: the egress proxy (HTTP `CONNECT` or absolute-form
/// requests), at an address of QEMU's user network that nothing else uses. The agent puts
/// it in every process's `http_proxy`/`https_proxy`; the host forwards it to
/// `kiln egress-proxy` (crate `kiln-net`), which applies the sandbox's network rules.
pub const EGRESS_PROXY: (&str, u16) = ("10.0.2.100", 3128);
