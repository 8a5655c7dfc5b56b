//! The rows kiln keeps, with their statuses spelled exactly as Superserve's SDK
//! (`superserve==0.11.4`, `types.py`) spells them: the server echoes these strings to
//! clients that match on them.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use kiln_spec::{BuildSpec, Resources};
use serde::Serialize;

use crate::error::StoreError;

/// Statuses are stored as their wire strings.
macro_rules! status_enum {
    ($(#[$meta:meta])* pub enum $name:ident { $($body:tt)* }) => {
        kiln_spec::string_enum! {
            $(#[$meta])*
            #[derive(sqlx::Type)]
            #[sqlx(type_name = "TEXT", rename_all = "lowercase")]
            pub enum $name { $($body)* }
        }
    };
}

status_enum! {
    /// A template's status; it follows the template's latest build.
    pub enum TemplateStatus {
        /// The latest build is queued.
        Pending => "pending",
        /// The latest build is running (or snapshotting).
        Building => "building",
        /// The latest build produced a live artifact.
        Ready => "ready",
        /// The latest build failed (an older artifact may still be live).
        Failed => "failed",
    }
}

status_enum! {
    /// A build's status. `ready`, `failed` and `cancelled` are terminal.
    pub enum BuildStatus {
        /// Queued, not yet picked up.
        Pending => "pending",
        /// Pulling, booting, running steps.
        Building => "building",
        /// Capturing the VM.
        Snapshotting => "snapshotting",
        /// Done; the artifact is live.
        Ready => "ready",
        /// Ended with a coded error.
        Failed => "failed",
        /// Stopped on request.
        Cancelled => "cancelled",
    }
}

impl BuildStatus {
    /// Whether nothing more will happen to a build in this status.
    pub const fn is_terminal(self) -> bool {
        matches!(
            self,
            BuildStatus::Ready | BuildStatus::Failed | BuildStatus::Cancelled
        )
    }
}

status_enum! {
    /// The stream a build log line came from.
    pub enum LogStream {
        /// The step's standard output.
        Stdout => "stdout",
        /// The step's standard error.
        Stderr => "stderr",
        /// kiln's own progress messages.
        System => "system",
    }
}

status_enum! {
    /// A sandbox's status. `migrating` is in the SDK's enum; kiln accepts it for wire
    /// compatibility although it never migrates a sandbox today.
    pub enum SandboxStatus {
        /// Restoring from the template snapshot.
        Starting => "starting",
        /// Running.
        Active => "active",
        /// Being paused.
        Pausing => "pausing",
        /// Paused (snapshotted, not running).
        Paused => "paused",
        /// Being resumed.
        Resuming => "resuming",
        /// Moving between hosts.
        Migrating => "migrating",
        /// Broken; will not run again.
        Failed => "failed",
        /// Gone.
        Deleted => "deleted",
    }
}

impl SandboxStatus {
    /// Whether the sandbox counts against the team's live-sandbox limit and pins its
    /// template: everything except `failed` and `deleted`.
    pub const fn is_live(self) -> bool {
        !matches!(self, SandboxStatus::Failed | SandboxStatus::Deleted)
    }

    /// Whether a sandbox may move from `self` to `to`.
    ///
    /// Any live sandbox may fail or be deleted; `failed` may only be deleted; `deleted` is
    /// final. The rest is the pause/resume cycle.
    pub fn can_move_to(self, to: SandboxStatus) -> bool {
        use SandboxStatus::*;
        match (self, to) {
            (Deleted, _) => false,
            (Failed, Deleted) => true,
            (Failed, _) => false,
            (_, Failed | Deleted) => true,
            (Starting, Active)
            | (Active, Pausing | Migrating)
            | (Pausing, Paused | Active)
            | (Paused, Resuming)
            | (Resuming, Active | Paused)
            | (Migrating, Active) => true,
            _ => false,
        }
    }
}

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
    /// The template as the API returns it (the SDK's `TemplateInfo`).
    pub fn to_wire(&self) -> serde_json::Value {
        serde_json::json!({
            "id": self.id, "name": self.name, "team_id": self.team_id,
            "status": self.status, "vcpu": self.vcpu, "memory_mib": self.memory_mib,
            "disk_mib": self.disk_mib, "size_bytes": self.size_bytes,
            "error_message": self.error_message, "created_at": self.created_at.to_rfc3339(),
            "built_at": self.built_at.map(|t| t.to_rfc3339()),
            "latest_build_id": self.latest_build_id,
        })
    }

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

impl Build {
    /// The build as the API returns it (the SDK's `TemplateBuildInfo`).
    pub fn to_wire(&self) -> serde_json::Value {
        serde_json::json!({
            "id": self.id, "template_id": self.template_id, "status": self.status,
            "build_spec_hash": self.build_spec_hash, "image_digest": self.image_digest,
            "error_message": self.error_message, "created_at": self.created_at.to_rfc3339(),
            "started_at": self.started_at.map(|t| t.to_rfc3339()),
            "finalized_at": self.finalized_at.map(|t| t.to_rfc3339()),
        })
    }
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
}

impl Sandbox {
    /// The sandbox as the API returns it (the SDK's `SandboxInfo`). Fields kiln does not
    /// implement (auto-pause, auto-delete, egress rules, preview access) carry the SDK's
    /// "unset" values.
    pub fn to_wire(&self) -> serde_json::Value {
        serde_json::json!({
            "id": self.id, "name": self.name, "status": self.status,
            "vcpu_count": self.vcpu_count, "memory_mib": self.memory_mib,
            "created_at": self.created_at.to_rfc3339(),
            "updated_at": self.updated_at.to_rfc3339(),
            "template_id": self.template_id, "build_id": self.build_id,
            "metadata": self.metadata,
            "timeout_seconds": null, "auto_delete_seconds": null, "network": null,
            "preview_access": "legacy_public",
        })
    }
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
    /// Template id or name, within the team.
    pub template: String,
    /// Display name; defaults to the sandbox id.
    pub name: Option<String>,
    /// User metadata.
    pub metadata: BTreeMap<String, String>,
    /// Environment overrides.
    pub env: BTreeMap<String, String>,
}

/// Filters for [`crate::Store::list_sandboxes`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SandboxFilter {
    /// Every pair must be present in the sandbox's metadata.
    pub metadata: BTreeMap<String, String>,
    /// Only these statuses; `None` means every status except `deleted`.
    pub statuses: Option<Vec<SandboxStatus>>,
    /// Page size; `None` means no limit.
    pub limit: Option<u32>,
    /// Rows to skip.
    pub offset: u32,
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
}

impl Limits {
    /// No limits: the policy belongs to the server, not the store.
    pub const UNLIMITED: Limits = Limits {
        max_templates: u32::MAX,
        max_concurrent_builds: u32::MAX,
        max_live_sandboxes: u32::MAX,
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
