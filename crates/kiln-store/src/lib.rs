//! kiln's state: metadata in SQLite (PostgreSQL by URL later) and artifacts in a local
//! directory (object storage later).
//!
//! The store owns every invariant that must hold under concurrency: per-team name
//! uniqueness, team limits (checked and applied in one write transaction), status state
//! machines, and team scoping (another team's object is simply not found). The server maps
//! [`StoreError`] variants to HTTP statuses; it never re-implements these checks.

pub mod error;
pub mod layout;
mod logs;
pub mod manifest;
pub mod model;
mod stats;
mod store;

pub use error::{ArtifactError, Limit, StoreError};
pub use layout::{fsync_dir, publish_dir, write_atomic, Layout};
pub use logs::{LogFollower, LogSignal};
pub use manifest::{ArtifactFile, ArtifactManifest, MANIFEST_FILE};
pub use model::{
    ApiKey, BindingState, Build, BuildStatus, BuiltArtifact, Limits, LogLine, LogStream,
    NewBinding, NewLogLine, NewSandbox, NewSecret, NewSnapshot, PortAccess, PreviewAccess,
    PreviewPort, Rebuild, Sandbox, SandboxAccess, SandboxFilter, SandboxStatus, Secret,
    SecretBinding, Snapshot, SnapshotStatus, Team, Template, TemplateStatus, SYSTEM_TEAM_ID,
};
pub use stats::{DurationHistogram, StoreStats, BUILD_DURATION_BUCKETS_SECS};
pub use store::{hash_secret, now, Store, LOG_PAGE};
