//! The metadata store: one SQLite database, every multi-statement change in one
//! `BEGIN IMMEDIATE` transaction.
//!
//! Why `IMMEDIATE`: limit checks count rows and then insert. Under a deferred transaction
//! two writers can both count "2 of 3" and both insert; an immediate transaction takes the
//! database's write lock before the count, so the count and the insert are one atomic step
//! (other writers wait on `busy_timeout`; readers are never blocked, thanks to WAL). The same
//! shape maps to PostgreSQL as `SELECT ... FOR UPDATE` on the team row.
//!
//! This module owns the [`Store`] handle (pool, migrations, the write transaction) and the
//! helpers every aggregate shares. Each aggregate has its own `impl Store` block, with its
//! SQL next to the methods that run it:
//!
//! - [`teams`]: teams and API keys;
//! - [`templates`]: templates (create, rebuild, delete) and how a template follows its
//!   latest build;
//! - [`builds`]: the build state machine, the build limit, restart recovery, the build cache's
//!   candidates;
//! - [`build_logs`]: a build's log lines and their followers;
//! - [`sandboxes`]: sandboxes, their limit, state machine, timers and access tokens;
//! - [`previews`]: a sandbox's preview policy and published ports;
//! - [`secrets`]: team secrets (sealed values) and their bindings to sandboxes;
//! - [`snapshots`]: snapshots of sandboxes, their limit, idempotency keys and status.

mod build_logs;
mod builds;
mod previews;
mod sandboxes;
mod secrets;
mod snapshots;
mod teams;
mod templates;

pub use build_logs::LOG_PAGE;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, SubsecRound, Utc};
use kiln_spec::{BuildSpec, Form, TemplateRequest};

use crate::error::Limit;
use sha2::{Digest, Sha256};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{Sqlite, Transaction};

use crate::error::StoreError;
use crate::logs::LogHub;

type Result<T, E = StoreError> = std::result::Result<T, E>;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// How long a writer waits for the write lock before giving up with "database is locked".
const BUSY_TIMEOUT: Duration = Duration::from_secs(30);

/// The current time, truncated to microseconds so that a value read back compares equal:
/// what the store stamps rows and sets deadlines with.
pub fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(6)
}

fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// 256 bits from the OS RNG (two v4 UUIDs carry 244 random bits), as hex.
fn new_secret() -> String {
    format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
}

/// sha256 hex of a secret: what is stored in place of API keys and access tokens.
pub fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// Decodes a stored wire-form build spec.
pub(crate) fn decode_spec(value: &serde_json::Value) -> Result<BuildSpec> {
    let doc = serde_json::json!({ "build_spec": value });
    TemplateRequest::from_json(&doc, Form::Wire)
        .map(|r| r.build_spec)
        .map_err(|e| StoreError::Corrupt {
            what: "build spec",
            source: Box::new(e),
        })
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The metadata store. Cheap to clone; clones share the pool and the log notifiers.
#[derive(Debug, Clone)]
pub struct Store {
    pub(crate) pool: SqlitePool,
    logs: Arc<LogHub>,
}

impl Store {
    /// Opens (creating if missing) the database file and applies pending migrations.
    pub async fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| StoreError::Io {
                path: dir.to_owned(),
                source,
            })?;
        }
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(BUSY_TIMEOUT);
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .acquire_timeout(BUSY_TIMEOUT)
            .connect_with(options)
            .await?;
        tracing::debug!(path = %path.display(), "opened metadata database");
        Self::init(pool).await
    }

    /// A private in-memory database, for tests.
    ///
    /// It lives in a single connection (every SQLite `:memory:` connection is its own
    /// database), kept open for the store's lifetime.
    pub async fn open_in_memory() -> Result<Self> {
        let options = SqliteConnectOptions::new()
            .in_memory(true)
            .foreign_keys(true)
            .busy_timeout(BUSY_TIMEOUT);
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(options)
            .await?;
        Self::init(pool).await
    }

    async fn init(pool: SqlitePool) -> Result<Self> {
        MIGRATOR.run(&pool).await?;
        Ok(Self {
            pool,
            logs: Arc::new(LogHub::default()),
        })
    }

    /// Closes every connection; pending writes are already durable.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// A write transaction holding the database write lock from its first statement.
    async fn write_tx(&self) -> Result<Transaction<'static, Sqlite>> {
        Ok(self.pool.begin_with("BEGIN IMMEDIATE").await?)
    }
}

/// Statuses as an SQL list, `('a', 'b')`: the sets of statuses a query filters on are
/// derived from the enums' own rules, never written out by hand. The strings are the
/// enums' fixed wire spellings, so nothing here is user input.
fn sql_list<T: std::fmt::Display>(statuses: &[T]) -> String {
    let quoted: Vec<String> = statuses.iter().map(|s| format!("'{s}'")).collect();
    format!("({})", quoted.join(", "))
}

/// Refuses with `LimitReached(which)` when `count` already reaches the team's `limit`. Run it
/// inside the write transaction that then inserts, so the count cannot go stale.
fn check_limit(count: i64, limit: u32, which: Limit) -> Result<()> {
    if count >= i64::from(limit) {
        tracing::debug!(?which, count, limit, "team limit reached");
        return Err(StoreError::LimitReached { which, limit });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use kiln_api::{BuildStatus, SandboxStatus};

    /// The lists queries filter on, as the status rules derive them.
    #[test]
    fn status_lists() {
        assert_eq!(
            super::sandboxes::live_sandboxes(),
            "('starting', 'active', 'pausing', 'paused', 'resuming', 'migrating')"
        );
        assert_eq!(
            super::builds::unfinished_builds(),
            "('pending', 'building', 'snapshotting')"
        );
        assert_eq!(super::sql_list::<SandboxStatus>(&[]), "()");
        assert_eq!(super::sql_list(&[BuildStatus::Ready]), "('ready')");
    }
}
