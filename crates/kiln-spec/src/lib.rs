//! The BuildSpec model of kiln, its validation, and the stable error codes.
//!
//! This crate does no I/O: it is shared by the server, the SDK, the CLI and the build
//! pipeline, and every one of them must agree on what a valid spec is.

pub mod codes;
pub mod reference;

pub use codes::{BuildErrorCode, CodedMessage, RateLimitCode, UnknownCode};
pub use reference::{ImageRef, ReferenceError};
