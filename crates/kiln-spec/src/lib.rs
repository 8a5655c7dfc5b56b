//! The BuildSpec model of kiln, its validation, and the stable error codes.
//!
//! This crate does no I/O: it is shared by the server, the SDK, the CLI and the build
//! pipeline, and every one of them must agree on what a valid spec is.

pub mod chain;
pub mod codes;
pub mod hash;
pub mod reference;
pub mod runtime;
pub mod spec;
pub mod validate;

pub use chain::error_chain;
pub use codes::{BuildErrorCode, CodedMessage, UnknownCode};
pub use hash::spec_hash;
pub use reference::{ImageRef, ReferenceError};
pub use runtime::RuntimeDefaults;
pub use spec::{shell_quote, BuildSpec, Form, ResourceRequest, Resources, Step, TemplateRequest};
pub use validate::{Problem, Problems};
