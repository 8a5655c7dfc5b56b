//! The rows kiln keeps, with their statuses spelled exactly as Superserve's SDK
//! (`superserve==0.11.4`, `types.py`) spells them: the server echoes these strings to
//! clients that match on them.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use kiln_api::{HostPattern, SecretAuth};
use kiln_spec::{BuildSpec, Resources};
use serde::{Deserialize, Serialize};

use crate::error::StoreError;

/// Statuses are the wire's enums (one definition, in `kiln-api`), kept in TEXT columns as
/// their wire strings.
pub use kiln_api::{
    BuildStatus, LogStream, PortAccess, PreviewAccess, SandboxFilter, SandboxStatus,
    SnapshotStatus, TemplateStatus,
};

/// The id of the team that owns the system templates (`superserve/...`), which every
/// team sees (migration 0004 creates it).
pub const SYSTEM_TEAM_ID: &str = "system";

/// A tenant. Teams are walls: nothing of one team is visible to another.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Team {
    /// UUID.
    pub id: String,
    /// Unique name.
    pub name: String,
    /// Creation time.
    pub created_at: DateTime<Utc>,
}

/// An API key's metadata; the key itself exists only in the caller's hands.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct ApiKey {
    /// UUID.
    pub id: String,
    /// Owning team.
    pub team_id: String,
    /// Free-form label.
    pub name: String,
    /// The first characters of the key, for display ("which key is this?").
    pub prefix: String,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// Last successful authentication.
    pub last_used_at: Option<DateTime<Utc>>,
}

/// A template row.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct Template {
    /// UUID.
    pub id: String,
    /// Owning team.
    pub team_id: String,
    /// Unique within the team.
    pub name: String,
    /// Follows the latest build.
    pub status: TemplateStatus,
    /// vCPUs of the build VM and of sandboxes.
    pub vcpu: u32,
    /// Guest memory (MiB).
    pub memory_mib: u32,
    /// Root disk (MiB).
    pub disk_mib: u32,
    /// The build spec in wire form (snake_case), as echoed to clients.
    #[sqlx(json)]
    pub build_spec: serde_json::Value,
    /// Size of the live artifact.
    pub size_bytes: Option<u64>,
    /// `"<code>: <detail>"` of the latest build when it failed.
    pub error_message: Option<String>,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// When the live artifact was finished.
    pub built_at: Option<DateTime<Utc>>,
    /// The most recently started build.
    pub latest_build_id: Option<String>,
    /// The build whose artifact sandboxes start from.
    pub current_build_id: Option<String>,
}

impl Template {
    /// The resolved VM shape.
    pub fn resources(&self) -> Resources {
        Resources {
            vcpu: self.vcpu,
            memory_mib: self.memory_mib,
            disk_mib: self.disk_mib,
        }
    }

    /// The stored spec, decoded.
    pub fn spec(&self) -> Result<BuildSpec, StoreError> {
        crate::store::decode_spec(&self.build_spec)
    }
}

/// A build row.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Build {
    /// UUID.
    pub id: String,
    /// The template built.
    pub template_id: String,
    /// The template's team.
    pub team_id: String,
    /// Where the build is.
    pub status: BuildStatus,
    /// `sha256:...` of the spec and resources built.
    pub build_spec_hash: String,
    /// The base image digest the reference resolved to.
    pub image_digest: Option<String>,
    /// `"<code>: <detail>"` when failed.
    pub error_message: Option<String>,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// When a builder picked it up.
    pub started_at: Option<DateTime<Utc>>,
    /// When it reached a terminal status.
    pub finalized_at: Option<DateTime<Utc>>,
    /// Built from scratch even when an identical artifact exists.
    pub no_cache: bool,
}

/// One stored log line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct LogLine {
    /// The build.
    pub build_id: String,
    /// 1-based, strictly increasing per build: the SSE resume cursor.
    pub seq: u64,
    /// When the line was produced.
    pub timestamp: DateTime<Utc>,
    /// Which stream.
    pub stream: LogStream,
    /// The text, without a trailing newline.
    pub text: String,
}

/// A log line to append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewLogLine {
    /// When the line was produced.
    pub timestamp: DateTime<Utc>,
    /// Which stream.
    pub stream: LogStream,
    /// The text.
    pub text: String,
}

impl NewLogLine {
    /// A line stamped now.
    pub fn now(stream: LogStream, text: impl Into<String>) -> Self {
        Self {
            timestamp: crate::store::now(),
            stream,
            text: text.into(),
        }
    }
}

/// A sandbox row.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Sandbox {
    /// UUID.
    pub id: String,
    /// Owning team.
    pub team_id: String,
    /// The template it was made from.
    pub template_id: String,
    /// The build whose artifact it was restored from.
    pub build_id: String,
    /// Display name.
    pub name: String,
    /// Where it is.
    pub status: SandboxStatus,
    /// vCPUs.
    pub vcpu_count: u32,
    /// Guest memory (MiB).
    pub memory_mib: u32,
    /// User metadata, filterable in listings.
    #[sqlx(json)]
    pub metadata: BTreeMap<String, String>,
    /// Environment given at creation, over the template's runtime defaults.
    #[sqlx(json)]
    pub env: BTreeMap<String, String>,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// Last status or field change.
    pub updated_at: DateTime<Utc>,
    /// The snapshot it was created from.
    pub source_snapshot_id: Option<String>,
    /// Auto-pause after this much active time.
    pub timeout_seconds: Option<u32>,
    /// Auto-delete after this long paused.
    pub auto_delete_seconds: Option<u32>,
    /// When it is paused, if it is still active then (set while active with a timeout).
    pub pause_at: Option<DateTime<Utc>>,
    /// When it is deleted, if it is still paused then (set while paused with an
    /// auto-delete window).
    pub delete_at: Option<DateTime<Utc>>,
    /// Its secret bindings, detached and revoked ones included.
    #[sqlx(json)]
    pub secrets: Vec<SecretBinding>,
    /// Which ports preview URLs serve.
    pub preview_access: PreviewAccess,
}

/// A port a sandbox published for preview URLs (or did once: see `published`).
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct PreviewPort {
    /// The sandbox.
    pub sandbox_id: String,
    /// The port inside it.
    pub port: u16,
    /// Who may open it.
    pub access: PortAccess,
    /// The generation of its tokens (only tokens of this one open it).
    pub token_version: u32,
    /// Whether it is published now.
    pub published: bool,
    /// When it was first published.
    pub created_at: DateTime<Utc>,
    /// Its last change.
    pub updated_at: DateTime<Utc>,
}

/// A snapshot row.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Snapshot {
    /// UUID.
    pub id: String,
    /// Owning team.
    pub team_id: String,
    /// The sandbox it was taken from (maybe deleted since).
    pub sandbox_id: String,
    /// That sandbox's template: the snapshot's disk is a layer over its build's.
    pub template_id: String,
    /// The template build whose artifact the snapshot's disk lies over.
    pub build_id: String,
    /// Display name.
    pub name: Option<String>,
    /// `mem+fs`.
    pub kind: String,
    /// Where it is.
    pub status: SnapshotStatus,
    /// `"<code>: <detail>"` when failed.
    pub error_message: Option<String>,
    /// Bytes of its bundle on disk (0 until ready).
    pub size_bytes: u64,
    /// vCPUs of sandboxes created from it.
    pub vcpu_count: u32,
    /// Memory (MiB) of sandboxes created from it.
    pub memory_mib: u32,
    /// Disk (MiB) of sandboxes created from it.
    pub disk_mib: u32,
    /// The create request's idempotency key.
    pub idempotency_key: Option<String>,
    /// The process capturing it while `creating`.
    pub runner_pid: Option<i64>,
    /// When it was asked for.
    pub created_at: DateTime<Utc>,
    /// When it became ready.
    pub ready_at: Option<DateTime<Utc>>,
}

/// What a caller asks for when taking a snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NewSnapshot {
    /// Display name.
    pub name: Option<String>,
    /// Answer an earlier snapshot of the same sandbox made with this key.
    pub idempotency_key: Option<String>,
}

impl Sandbox {
    /// The bindings that hold a live stand-in.
    pub fn bound_secrets(&self) -> impl Iterator<Item = &SecretBinding> {
        self.secrets
            .iter()
            .filter(|b| b.state == BindingState::Bound)
    }
}

/// A team secret: never its value in clear.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Secret {
    /// UUID.
    pub id: String,
    /// Owning team.
    pub team_id: String,
    /// Unique within the team.
    pub name: String,
    /// Where in a request the value goes.
    #[sqlx(json)]
    pub auth: SecretAuth,
    /// Where the value may go.
    #[sqlx(json)]
    pub hosts: Vec<HostPattern>,
    /// The catalog shortcut it was created from.
    pub provider: Option<String>,
    /// The value, sealed for this secret's id.
    pub sealed: String,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// When the value last changed.
    pub updated_at: DateTime<Utc>,
}

/// What a caller asks for when creating a secret (the value comes sealed, through a
/// function of the new secret's id: the seal is bound to it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewSecret {
    /// Unique within the team.
    pub name: String,
    /// The auth shape.
    pub auth: SecretAuth,
    /// The hosts.
    pub hosts: Vec<HostPattern>,
    /// The catalog shortcut.
    pub provider: Option<String>,
}

/// Where a binding is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BindingState {
    /// The stand-in resolves to the secret's value.
    Bound,
    /// The secret was deleted: listed on the sandbox as revoked; the stand-in is refused.
    Revoked,
    /// Detached: no longer listed; the stand-in is refused.
    Detached,
}

/// A secret bound to a sandbox under an environment variable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretBinding {
    /// The variable holding the stand-in.
    pub env_key: String,
    /// The secret; none once it is deleted.
    pub secret_id: Option<String>,
    /// The secret's name when it was bound.
    pub secret_name: String,
    /// The catalog shortcut of the secret (the stand-in's shape).
    #[serde(default)]
    pub provider: Option<String>,
    /// The random token the sandbox holds.
    pub stand_in: String,
    /// Where the binding is.
    pub state: BindingState,
    /// The secret's auth shape (kept: a revoked stand-in is refused on its hosts).
    pub auth: SecretAuth,
    /// The secret's hosts.
    pub hosts: Vec<HostPattern>,
}

/// A binding asked for: the variable, the secret's name, and the stand-in made for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewBinding {
    /// The variable.
    pub env_key: String,
    /// The team secret.
    pub secret_name: String,
    /// The stand-in.
    pub stand_in: String,
}

/// Whether an access token opens a sandbox's data plane.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SandboxAccess {
    /// The token is the sandbox's; here is the sandbox.
    Granted(Box<Sandbox>),
    /// The sandbox exists but the token is not its own.
    Denied,
    /// No such (non-deleted) sandbox.
    NotFound,
}

/// What a caller asks for when creating a sandbox.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NewSandbox {
    /// Template id or name, within the team (or a system template).
    pub template: String,
    /// A ready snapshot of the team to continue from instead (its template and shape
    /// come with it; `template` is ignored).
    pub snapshot: Option<String>,
    /// Auto-pause after this much active time.
    pub timeout_seconds: Option<u32>,
    /// Auto-delete after this long paused.
    pub auto_delete_seconds: Option<u32>,
    /// Display name; defaults to the sandbox id.
    pub name: Option<String>,
    /// User metadata.
    pub metadata: BTreeMap<String, String>,
    /// Environment overrides.
    pub env: BTreeMap<String, String>,
    /// Secrets to bind.
    pub secrets: Vec<NewBinding>,
    /// Its preview policy; none: [`PreviewAccess::DEFAULT`].
    pub preview_access: Option<PreviewAccess>,
}

/// Per-team limits, enforced atomically with the insert they guard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Templates a team may own.
    pub max_templates: u32,
    /// Builds a team may have pending, building or snapshotting at once.
    pub max_concurrent_builds: u32,
    /// Sandboxes a team may have that are neither failed nor deleted.
    pub max_live_sandboxes: u32,
    /// Snapshots a team may keep (creating or ready).
    pub max_snapshots: u32,
}

impl Limits {
    /// No limits: the policy belongs to the server, not the store.
    pub const UNLIMITED: Limits = Limits {
        max_templates: u32::MAX,
        max_concurrent_builds: u32::MAX,
        max_live_sandboxes: u32::MAX,
        max_snapshots: u32::MAX,
    };
}

impl Default for Limits {
    fn default() -> Self {
        Self::UNLIMITED
    }
}

/// What a successful build leaves behind, recorded on the template.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BuiltArtifact {
    /// Total bytes of the artifact directory.
    pub size_bytes: u64,
}

/// The result of [`crate::Store::start_rebuild`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rebuild {
    /// The build to follow.
    pub build: Build,
    /// `false` when an in-flight build of the same spec was returned instead.
    pub created: bool,
}
