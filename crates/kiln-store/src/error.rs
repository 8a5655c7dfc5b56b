//! Typed errors. The server maps each variant to one HTTP status in one place, so the
//! variants follow what a client must be told (404 / 409 / 429 / 500), not where the
//! failure happened.

/// The per-team limits the store enforces (see [`crate::Limits`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Limit {
    /// Templates a team may own.
    Templates,
    /// Builds a team may have queued or running.
    Builds,
    /// Sandboxes a team may have live.
    Sandboxes,
    /// Snapshots a team may keep.
    Snapshots,
}

impl std::fmt::Display for Limit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Limit::Templates => "templates",
            Limit::Builds => "builds queued or running",
            Limit::Sandboxes => "live sandboxes",
            Limit::Snapshots => "snapshots",
        })
    }
}

/// Errors of the metadata store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The object does not exist, or belongs to another team (the two are not told apart).
    #[error("{kind} {id:?} not found")]
    NotFound {
        /// What was looked up ("template", "build", ...).
        kind: &'static str,
        /// The id or name given.
        id: String,
    },
    /// The request contradicts current state: a duplicate name, a template still in use.
    #[error("{0}")]
    Conflict(String),
    /// A team limit is reached; nothing was written.
    #[error("the team's limit of {limit} {which} is reached")]
    LimitReached {
        /// Which limit.
        which: Limit,
        /// The limit in force.
        limit: u32,
    },
    /// A status change that the state machine does not allow.
    #[error("{kind} {id} cannot go from {from} to {to}")]
    InvalidTransition {
        /// "build" or "sandbox".
        kind: &'static str,
        /// Its id.
        id: String,
        /// Current status.
        from: String,
        /// Requested status.
        to: String,
    },
    /// An argument the store cannot accept (e.g. a template request without a name).
    #[error("invalid input: {0}")]
    Invalid(String),
    /// A stored value could not be decoded: the database was edited or is from a newer kiln.
    #[error("stored {what} is unreadable")]
    Corrupt {
        /// Which value.
        what: &'static str,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The database failed.
    #[error("database error")]
    Database(#[from] sqlx::Error),
    /// Applying the embedded migrations failed.
    #[error("database migration failed")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The database file's directory could not be created.
    #[error("cannot create {path}")]
    Io {
        /// The path.
        path: std::path::PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

impl StoreError {
    /// Which limit refused, when this is a limit refusal.
    pub fn limit_reached(&self) -> Option<Limit> {
        match self {
            StoreError::LimitReached { which, .. } => Some(*which),
            _ => None,
        }
    }

    /// No `kind` with this id (in the team asking).
    pub fn not_found(kind: &'static str, id: impl Into<String>) -> Self {
        StoreError::NotFound {
            kind,
            id: id.into(),
        }
    }
}

/// Errors of the artifact directory.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    /// A filesystem operation failed.
    #[error("{op} {path}")]
    Io {
        /// What was being done ("write", "rename", ...).
        op: &'static str,
        /// On which path.
        path: std::path::PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// An id, digest or file name that cannot safely become a path component.
    #[error("{0:?} is not a valid path component")]
    BadName(String),
    /// The manifest is not valid JSON of the expected shape.
    #[error("manifest {path} is malformed")]
    Malformed {
        /// The manifest path.
        path: std::path::PathBuf,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// The manifest is of a version this kiln does not read.
    #[error("manifest {path} has unsupported version {version}")]
    UnsupportedVersion {
        /// The manifest path.
        path: std::path::PathBuf,
        /// The version found.
        version: u32,
    },
    /// A listed file is missing, of the wrong size, or has the wrong checksum.
    #[error("artifact {dir} is corrupt: {reason}")]
    Corrupt {
        /// The artifact directory.
        dir: std::path::PathBuf,
        /// What does not match.
        reason: String,
    },
}
