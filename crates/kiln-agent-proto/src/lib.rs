//! The kiln host <-> guest agent protocol.
//!
//! - [`frame`]: length-prefixed, multiplexed, resynchronisable framing over one byte stream.
//! - [`msg`]: the JSON control messages and the data types they carry.
//! - `client` (feature `client`): the host-side tokio client used by `kiln-vm` and
//!   `kiln-build`.
//!
//! The protocol is shared by a guest agent that runs as PID 1 inside the VM and a host
//! that may disconnect at any time (including across snapshot/restore), so every
//! connection starts with a SYNC marker plus `hello`, and every request lives on its own
//! stream id so many can be in flight at once.

pub mod frame;
pub mod msg;

#[cfg(feature = "client")]
pub mod client;

#[cfg(feature = "client")]
pub use client::{AgentClient, ClientError, ExecEvent, ExecHandle, ExecOutput, ExecStdin};
pub use frame::{DecodeEvent, Decoder, Frame, FrameKind};
pub use msg::*;
