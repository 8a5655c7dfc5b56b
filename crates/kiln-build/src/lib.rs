//! The kiln build pipeline: a BuildSpec in, a snapshot of a running VM out.
//!
//! This crate owns the build's semantics (step order, runtime defaults, start and ready
//! commands, logs, error codes, time limits). It talks to the VM through the [`Guest`]
//! trait, so those semantics are testable without one.

pub mod error;
pub mod guest;
pub mod log;
pub mod pipeline;
pub mod stepcache;
pub mod steps;

pub use error::BuildError;
pub use guest::{Command, Exit, Guest, GuestError, OutputStream};
pub use kiln_spec::RuntimeDefaults;
pub use log::{LineSplitter, LogLine, LogSink, Stream};
pub use pipeline::{
    agent_defaults, run_build, BuildEnd, BuildEnv, BuildJob, BuildObserver, BuildOutput, Phase,
};
pub use stepcache::{StepCache, StepCacheError};
pub use steps::{StepRunner, Timing};
