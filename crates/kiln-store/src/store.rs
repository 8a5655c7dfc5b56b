//! The metadata store: one SQLite database, every multi-statement change in one
//! `BEGIN IMMEDIATE` transaction.
//!
//! Why `IMMEDIATE`: limit checks count rows and then insert. Under a deferred transaction
//! two writers can both count "2 of 3" and both insert; an immediate transaction takes the
//! database's write lock before the count, so the count and the insert are one atomic step
//! (other writers wait on `busy_timeout`; readers are never blocked, thanks to WAL). The same
//! shape maps to PostgreSQL as `SELECT ... FOR UPDATE` on the team row.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, SubsecRound, Utc};
use kiln_spec::{spec_hash, BuildSpec, CodedMessage, Form, RateLimitCode, TemplateRequest};
use sha2::{Digest, Sha256};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{QueryBuilder, Sqlite, SqliteConnection, Transaction};
use tokio::sync::watch;

use crate::error::StoreError;
use crate::logs::{LogFollower, LogHub, LogSignal};
use crate::model::*;

type Result<T, E = StoreError> = std::result::Result<T, E>;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// How long a writer waits for the write lock before giving up with "database is locked".
const BUSY_TIMEOUT: Duration = Duration::from_secs(30);

/// How stale an API key's `last_used_at` may get before authentication refreshes it.
const LAST_USED_RESOLUTION: chrono::TimeDelta = chrono::TimeDelta::seconds(60);

/// Lines per INSERT when appending logs, far below SQLite's bound-parameter limit.
const LOG_BATCH: usize = 500;

const NON_TERMINAL_BUILD: &str = "('pending', 'building', 'snapshotting')";
const LIVE_SANDBOX: &str = "('starting', 'active', 'pausing', 'paused', 'resuming', 'migrating')";

/// The current time, truncated to microseconds so that a value read back compares equal.
pub(crate) fn now() -> DateTime<Utc> {
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

    // ---------------------------------------------------------------- teams and keys

    /// Creates a team; a taken name is a `Conflict`.
    pub async fn create_team(&self, name: &str) -> Result<Team> {
        let mut tx = self.write_tx().await?;
        if team_by_name(&mut tx, name).await?.is_some() {
            return Err(StoreError::Conflict(format!(
                "team {name:?} already exists"
            )));
        }
        let team = insert_team(&mut tx, name).await?;
        tx.commit().await?;
        Ok(team)
    }

    /// The team with this id.
    pub async fn team_by_id(&self, id: &str) -> Result<Team> {
        sqlx::query_as::<_, Team>("SELECT * FROM teams WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| StoreError::not_found("team", id))
    }

    /// The team with this name, if any.
    pub async fn team_by_name(&self, name: &str) -> Result<Option<Team>> {
        let mut conn = self.pool.acquire().await?;
        team_by_name(&mut conn, name).await
    }

    /// Creates an API key named `default` for the team, creating the team if needed.
    ///
    /// Returns the key's metadata and the plaintext key, which is shown once and never
    /// stored: only its sha256 is.
    pub async fn create_api_key(&self, team_name: &str) -> Result<(ApiKey, String)> {
        self.create_named_api_key(team_name, "default").await
    }

    /// Like [`Store::create_api_key`], with a label for the key.
    pub async fn create_named_api_key(
        &self,
        team_name: &str,
        key_name: &str,
    ) -> Result<(ApiKey, String)> {
        let mut tx = self.write_tx().await?;
        let team = match team_by_name(&mut tx, team_name).await? {
            Some(t) => t,
            None => insert_team(&mut tx, team_name).await?,
        };
        let plaintext = format!("kiln_{}", new_secret());
        let key = ApiKey {
            id: new_id(),
            team_id: team.id.clone(),
            name: key_name.to_owned(),
            prefix: plaintext.chars().take(12).collect(),
            created_at: now(),
            last_used_at: None,
        };
        sqlx::query(
            "INSERT INTO api_keys (id, team_id, name, key_hash, prefix, created_at)
             VALUES (?, ?, ?, ?, ?, ?)",
        )
        .bind(&key.id)
        .bind(&key.team_id)
        .bind(&key.name)
        .bind(hash_secret(&plaintext))
        .bind(&key.prefix)
        .bind(key.created_at)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        tracing::info!(team = %team.name, key_id = %key.id, "created API key");
        Ok((key, plaintext))
    }

    /// The team a plaintext API key belongs to, or `None` for an unknown key.
    ///
    /// Records the key's use, at most once a minute per key: authentication runs on every
    /// request and must not turn every read into a write contending for the lock.
    pub async fn authenticate(&self, plaintext: &str) -> Result<Option<Team>> {
        let hash = hash_secret(plaintext);
        let row: Option<(String, String, Option<DateTime<Utc>>)> =
            sqlx::query_as("SELECT id, team_id, last_used_at FROM api_keys WHERE key_hash = ?")
                .bind(&hash)
                .fetch_optional(&self.pool)
                .await?;
        let Some((key_id, team_id, last_used)) = row else {
            return Ok(None);
        };
        let at = now();
        if last_used.is_none_or(|t| at - t >= LAST_USED_RESOLUTION) {
            sqlx::query("UPDATE api_keys SET last_used_at = ? WHERE id = ?")
                .bind(at)
                .bind(&key_id)
                .execute(&self.pool)
                .await?;
        }
        self.team_by_id(&team_id).await.map(Some)
    }

    /// The team's API keys (metadata only).
    pub async fn list_api_keys(&self, team_id: &str) -> Result<Vec<ApiKey>> {
        Ok(sqlx::query_as::<_, ApiKey>(
            "SELECT id, team_id, name, prefix, created_at, last_used_at FROM api_keys
             WHERE team_id = ? ORDER BY created_at, rowid",
        )
        .bind(team_id)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Deletes one of the team's API keys.
    pub async fn revoke_api_key(&self, team_id: &str, key_id: &str) -> Result<()> {
        let done = sqlx::query("DELETE FROM api_keys WHERE id = ? AND team_id = ?")
            .bind(key_id)
            .bind(team_id)
            .execute(&self.pool)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::not_found("api key", key_id));
        }
        Ok(())
    }

    // ---------------------------------------------------------------- templates

    /// Creates a template and its first build in one transaction.
    ///
    /// Refuses with `Conflict` when the team already has a template of that name, and with
    /// `LimitReached` (`too_many_templates` / `too_many_builds`) when a limit is reached;
    /// in every refusal nothing is written.
    pub async fn create_template_with_build(
        &self,
        team_id: &str,
        request: &TemplateRequest,
        limits: &Limits,
    ) -> Result<(Template, Build)> {
        let name = request
            .name
            .as_deref()
            .ok_or_else(|| StoreError::Invalid("a template needs a name".into()))?;
        let mut tx = self.write_tx().await?;
        ensure_team(&mut tx, team_id).await?;
        let taken: Option<String> =
            sqlx::query_scalar("SELECT id FROM templates WHERE team_id = ? AND name = ?")
                .bind(team_id)
                .bind(name)
                .fetch_optional(&mut *tx)
                .await?;
        if taken.is_some() {
            return Err(StoreError::Conflict(format!(
                "template {name:?} already exists"
            )));
        }
        let templates: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM templates WHERE team_id = ?")
            .bind(team_id)
            .fetch_one(&mut *tx)
            .await?;
        check_limit(
            templates,
            limits.max_templates,
            RateLimitCode::TooManyTemplates,
        )?;
        check_build_limit(&mut tx, team_id, limits).await?;

        let resources = request.resources.resolve();
        let spec_json = request.build_spec.to_json(Form::Wire);
        let template_id = new_id();
        let build_id = new_id();
        let created_at = now();
        sqlx::query(
            "INSERT INTO templates (id, team_id, name, status, vcpu, memory_mib, disk_mib,
                                    build_spec, created_at, latest_build_id)
             VALUES (?, ?, ?, 'pending', ?, ?, ?, ?, ?, ?)",
        )
        .bind(&template_id)
        .bind(team_id)
        .bind(name)
        .bind(resources.vcpu)
        .bind(resources.memory_mib)
        .bind(resources.disk_mib)
        .bind(spec_json.to_string())
        .bind(created_at)
        .bind(&build_id)
        .execute(&mut *tx)
        .await?;
        insert_build(
            &mut tx,
            &build_id,
            &template_id,
            team_id,
            &request.spec_hash(),
            created_at,
        )
        .await?;
        let template = template_in(&mut tx, team_id, &template_id).await?;
        let build = build_in(&mut tx, &build_id).await?;
        tx.commit().await?;
        tracing::info!(template_id, build_id, name, "created template");
        Ok((template, build))
    }

    /// Starts a new build of an existing template, or returns the in-flight one.
    ///
    /// With `replace`, the template's spec and resources are replaced first (its name is
    /// ignored). When a build of the same spec hash is already pending, building or
    /// snapshotting, that build is returned with `created: false`: a client retrying a
    /// rebuild must not queue duplicate work. Otherwise the team's non-terminal builds are
    /// counted against `max_concurrent_builds` under the write lock.
    pub async fn start_rebuild(
        &self,
        team_id: &str,
        template: &str,
        replace: Option<&TemplateRequest>,
        limits: &Limits,
    ) -> Result<Rebuild> {
        let mut tx = self.write_tx().await?;
        let t = template_by_id_or_name_in(&mut tx, team_id, template).await?;
        let hash = match replace {
            Some(r) => r.spec_hash(),
            None => spec_hash(&t.spec()?, &t.resources()),
        };
        let inflight = sqlx::query_as::<_, Build>(&format!(
            "SELECT * FROM builds WHERE template_id = ? AND build_spec_hash = ?
             AND status IN {NON_TERMINAL_BUILD} ORDER BY created_at DESC, rowid DESC LIMIT 1"
        ))
        .bind(&t.id)
        .bind(&hash)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(build) = inflight {
            tracing::debug!(build_id = %build.id, "rebuild joins the in-flight build");
            return Ok(Rebuild {
                build,
                created: false,
            });
        }
        check_build_limit(&mut tx, team_id, limits).await?;
        if let Some(r) = replace {
            let res = r.resources.resolve();
            sqlx::query(
                "UPDATE templates SET vcpu = ?, memory_mib = ?, disk_mib = ?, build_spec = ?
                 WHERE id = ?",
            )
            .bind(res.vcpu)
            .bind(res.memory_mib)
            .bind(res.disk_mib)
            .bind(r.build_spec.to_json(Form::Wire).to_string())
            .bind(&t.id)
            .execute(&mut *tx)
            .await?;
        }
        let build_id = new_id();
        insert_build(&mut tx, &build_id, &t.id, team_id, &hash, now()).await?;
        sqlx::query("UPDATE templates SET latest_build_id = ? WHERE id = ?")
            .bind(&build_id)
            .bind(&t.id)
            .execute(&mut *tx)
            .await?;
        let build = build_in(&mut tx, &build_id).await?;
        follow_latest(&mut tx, &build, None).await?;
        tx.commit().await?;
        tracing::info!(template_id = %t.id, build_id, "started rebuild");
        Ok(Rebuild {
            build,
            created: true,
        })
    }

    /// A template of the team, by id or (failing that) by name.
    pub async fn template_by_id_or_name(&self, team_id: &str, template: &str) -> Result<Template> {
        let mut conn = self.pool.acquire().await?;
        template_by_id_or_name_in(&mut conn, team_id, template).await
    }

    /// The team's templates, oldest first.
    pub async fn list_templates(&self, team_id: &str) -> Result<Vec<Template>> {
        Ok(sqlx::query_as::<_, Template>(
            "SELECT * FROM templates WHERE team_id = ? ORDER BY created_at, rowid",
        )
        .bind(team_id)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Deletes a template with its builds, logs and dead sandboxes.
    ///
    /// Refuses with `Conflict` while any of its sandboxes is live. Returns the template and
    /// its builds so the caller can remove their artifacts and stop builds still running.
    pub async fn delete_template(
        &self,
        team_id: &str,
        template: &str,
    ) -> Result<(Template, Vec<Build>)> {
        let mut tx = self.write_tx().await?;
        let t = template_by_id_or_name_in(&mut tx, team_id, template).await?;
        let live: i64 = sqlx::query_scalar(&format!(
            "SELECT COUNT(*) FROM sandboxes WHERE template_id = ? AND status IN {LIVE_SANDBOX}"
        ))
        .bind(&t.id)
        .fetch_one(&mut *tx)
        .await?;
        if live > 0 {
            return Err(StoreError::Conflict(format!(
                "template has {live} live sandboxes"
            )));
        }
        let builds = builds_of(&mut tx, &t.id).await?;
        sqlx::query("DELETE FROM sandboxes WHERE template_id = ?")
            .bind(&t.id)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM templates WHERE id = ?")
            .bind(&t.id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        for b in &builds {
            self.logs.finish(&b.id);
        }
        tracing::info!(template_id = %t.id, "deleted template");
        Ok((t, builds))
    }

    // ---------------------------------------------------------------- builds

    /// A build of the team.
    pub async fn build_by_id(&self, team_id: &str, build_id: &str) -> Result<Build> {
        sqlx::query_as::<_, Build>("SELECT * FROM builds WHERE id = ? AND team_id = ?")
            .bind(build_id)
            .bind(team_id)
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| StoreError::not_found("build", build_id))
    }

    /// A build by id regardless of team: for the build pipeline, never for a request.
    pub async fn get_build(&self, build_id: &str) -> Result<Build> {
        let mut conn = self.pool.acquire().await?;
        build_in(&mut conn, build_id).await
    }

    /// A template's builds, newest first (the SDK takes the first as the latest).
    pub async fn list_builds(&self, team_id: &str, template: &str) -> Result<Vec<Build>> {
        let mut conn = self.pool.acquire().await?;
        let t = template_by_id_or_name_in(&mut conn, team_id, template).await?;
        let mut builds = builds_of(&mut conn, &t.id).await?;
        builds.reverse();
        Ok(builds)
    }

    /// How many builds of any team are not finished (pending, building, snapshotting).
    pub async fn unfinished_builds(&self) -> Result<u64> {
        let n: i64 = sqlx::query_scalar(&format!(
            "SELECT COUNT(*) FROM builds WHERE status IN {NON_TERMINAL_BUILD}"
        ))
        .fetch_one(&self.pool)
        .await?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// Every `pending` build, oldest first: the builder's queue.
    pub async fn pending_builds(&self) -> Result<Vec<Build>> {
        Ok(sqlx::query_as::<_, Build>(
            "SELECT * FROM builds WHERE status = 'pending' ORDER BY created_at, rowid",
        )
        .fetch_all(&self.pool)
        .await?)
    }

    /// `pending -> building`: a builder picked the build up.
    pub async fn start_build(&self, build_id: &str) -> Result<Build> {
        self.transition(
            build_id,
            &[BuildStatus::Pending],
            BuildStatus::Building,
            None,
        )
        .await
    }

    /// `building -> snapshotting`.
    pub async fn mark_snapshotting(&self, build_id: &str) -> Result<Build> {
        self.transition(
            build_id,
            &[BuildStatus::Building],
            BuildStatus::Snapshotting,
            None,
        )
        .await
    }

    /// Records the digest the base image resolved to. Only while the build runs.
    pub async fn set_build_image_digest(&self, build_id: &str, digest: &str) -> Result<Build> {
        let mut tx = self.write_tx().await?;
        let b = build_in(&mut tx, build_id).await?;
        if b.status.is_terminal() {
            return Err(invalid_build(&b, b.status));
        }
        sqlx::query("UPDATE builds SET image_digest = ? WHERE id = ?")
            .bind(digest)
            .bind(build_id)
            .execute(&mut *tx)
            .await?;
        let b = build_in(&mut tx, build_id).await?;
        tx.commit().await?;
        Ok(b)
    }

    /// Ends a build: `ready` with its artifact, or `failed` with `"<code>: <detail>"`.
    ///
    /// Only from a non-terminal status; the template follows when this is its latest build
    /// (a success also makes this build's artifact the live one).
    pub async fn finish_build(
        &self,
        build_id: &str,
        outcome: std::result::Result<BuiltArtifact, CodedMessage>,
    ) -> Result<Build> {
        const FROM: &[BuildStatus] = &[
            BuildStatus::Pending,
            BuildStatus::Building,
            BuildStatus::Snapshotting,
        ];
        let b = match outcome {
            Ok(artifact) => {
                self.transition(build_id, FROM, BuildStatus::Ready, Some(artifact))
                    .await?
            }
            Err(msg) => self.fail(build_id, FROM, &msg.to_string()).await?,
        };
        Ok(b)
    }

    /// Cancels a build of the team. A build already terminal is returned unchanged.
    pub async fn cancel_build(&self, team_id: &str, build_id: &str) -> Result<Build> {
        let b = self.build_by_id(team_id, build_id).await?;
        if b.status.is_terminal() {
            return Ok(b);
        }
        match self
            .transition(
                build_id,
                &[
                    BuildStatus::Pending,
                    BuildStatus::Building,
                    BuildStatus::Snapshotting,
                ],
                BuildStatus::Cancelled,
                None,
            )
            .await
        {
            // It finished between the read and the write: still a no-op.
            Err(StoreError::InvalidTransition { .. }) => self.get_build(build_id).await,
            other => other,
        }
    }

    /// Base image digests of every build that still has a template: what `kiln image
    /// prune` must keep.
    pub async fn image_digests_in_use(&self) -> Result<Vec<String>> {
        Ok(sqlx::query_scalar(
            "SELECT DISTINCT image_digest FROM builds WHERE image_digest IS NOT NULL",
        )
        .fetch_all(&self.pool)
        .await?)
    }

    /// Fails every pending, building or snapshotting build with
    /// `build_failed: interrupted by server restart`, and returns them.
    ///
    /// Makes a queued build skip the build cache.
    pub async fn set_build_no_cache(&self, build_id: &str) -> Result<Build> {
        sqlx::query("UPDATE builds SET no_cache = 1 WHERE id = ?")
            .bind(build_id)
            .execute(&self.pool)
            .await?;
        self.get_build(build_id).await
    }

    /// Ready builds of the team with this spec hash and base image digest, newest first,
    /// other than `except`: the build cache's candidates. A tag re-pushed to another image
    /// resolves to another digest, so it never matches.
    pub async fn reusable_builds(
        &self,
        team_id: &str,
        spec_hash: &str,
        image_digest: &str,
        except: &str,
    ) -> Result<Vec<Build>> {
        Ok(sqlx::query_as::<_, Build>(
            "SELECT * FROM builds WHERE team_id = ? AND status = 'ready' AND build_spec_hash = ?
               AND image_digest = ? AND id <> ?
             ORDER BY finalized_at DESC, rowid DESC",
        )
        .bind(team_id)
        .bind(spec_hash)
        .bind(image_digest)
        .bind(except)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Records that this process runs (or waits to run) a build, so that a restart of
    /// another process leaves it alone ([`Store::mark_interrupted_builds`]).
    pub async fn claim_build(&self, build_id: &str, pid: u32) -> Result<()> {
        sqlx::query("UPDATE builds SET runner_pid = ? WHERE id = ?")
            .bind(i64::from(pid))
            .bind(build_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Marks every unfinished build whose runner is gone (`runner_alive` says no, or it
    /// never had one) as failed, `build_failed: interrupted by server restart`, and returns
    /// them.
    ///
    /// Called once at start-up: no build survives the death of the process running it, and
    /// a build left "building" forever would hold a slot of the team's build limit. Builds
    /// that another live process (a CLI) runs are not touched.
    pub async fn mark_interrupted_builds(
        &self,
        runner_alive: impl Fn(u32) -> bool,
    ) -> Result<Vec<Build>> {
        let message = CodedMessage::new(
            kiln_spec::BuildErrorCode::BuildFailed,
            "interrupted by server restart",
        )
        .to_string();
        let mut tx = self.write_tx().await?;
        let rows: Vec<(String, Option<i64>)> = sqlx::query_as(&format!(
            "SELECT id, runner_pid FROM builds WHERE status IN {NON_TERMINAL_BUILD}
             ORDER BY created_at, rowid"
        ))
        .fetch_all(&mut *tx)
        .await?;
        let at = now();
        let mut out = Vec::with_capacity(rows.len());
        for (id, runner) in &rows {
            let alive = runner
                .and_then(|p| u32::try_from(p).ok())
                .is_some_and(&runner_alive);
            if alive {
                continue;
            }
            sqlx::query(
                "UPDATE builds SET status = 'failed', error_message = ?, finalized_at = ?
                 WHERE id = ?",
            )
            .bind(&message)
            .bind(at)
            .bind(id)
            .execute(&mut *tx)
            .await?;
            let b = build_in(&mut tx, id).await?;
            follow_latest(&mut tx, &b, None).await?;
            out.push(b);
        }
        tx.commit().await?;
        for b in &out {
            self.logs.finish(&b.id);
        }
        if !out.is_empty() {
            tracing::warn!(count = out.len(), "marked interrupted builds as failed");
        }
        Ok(out)
    }

    async fn fail(&self, build_id: &str, from: &[BuildStatus], message: &str) -> Result<Build> {
        let mut tx = self.write_tx().await?;
        let b = build_in(&mut tx, build_id).await?;
        if !from.contains(&b.status) {
            return Err(invalid_build(&b, BuildStatus::Failed));
        }
        sqlx::query(
            "UPDATE builds SET status = 'failed', error_message = ?, finalized_at = ? WHERE id = ?",
        )
        .bind(message)
        .bind(now())
        .bind(build_id)
        .execute(&mut *tx)
        .await?;
        let b = build_in(&mut tx, build_id).await?;
        follow_latest(&mut tx, &b, None).await?;
        tx.commit().await?;
        self.logs.finish(build_id);
        tracing::info!(build_id, error = message, "build failed");
        Ok(b)
    }

    async fn transition(
        &self,
        build_id: &str,
        from: &[BuildStatus],
        to: BuildStatus,
        artifact: Option<BuiltArtifact>,
    ) -> Result<Build> {
        let mut tx = self.write_tx().await?;
        let b = build_in(&mut tx, build_id).await?;
        if !from.contains(&b.status) {
            return Err(invalid_build(&b, to));
        }
        let at = now();
        let sql = match to {
            BuildStatus::Building => "UPDATE builds SET status = ?, started_at = ? WHERE id = ?",
            s if s.is_terminal() => "UPDATE builds SET status = ?, finalized_at = ? WHERE id = ?",
            _ => "UPDATE builds SET status = ?, started_at = COALESCE(started_at, ?) WHERE id = ?",
        };
        sqlx::query(sql)
            .bind(to)
            .bind(at)
            .bind(build_id)
            .execute(&mut *tx)
            .await?;
        let b = build_in(&mut tx, build_id).await?;
        follow_latest(&mut tx, &b, artifact).await?;
        tx.commit().await?;
        if to.is_terminal() {
            self.logs.finish(build_id);
        }
        tracing::debug!(build_id, status = %to, "build status changed");
        Ok(b)
    }

    // ---------------------------------------------------------------- logs

    /// Appends lines to a build's log in one transaction; returns the last `seq` written.
    ///
    /// `seq` continues from the build's last line, so a reader resuming "after N" (SSE
    /// `Last-Event-ID`) misses nothing and sees nothing twice.
    pub async fn append_logs(&self, build_id: &str, lines: &[NewLogLine]) -> Result<u64> {
        let mut tx = self.write_tx().await?;
        let last: i64 =
            sqlx::query_scalar("SELECT COALESCE(MAX(seq), 0) FROM build_logs WHERE build_id = ?")
                .bind(build_id)
                .fetch_one(&mut *tx)
                .await?;
        if lines.is_empty() {
            return Ok(u64::try_from(last).unwrap_or(0));
        }
        let exists: Option<i64> = sqlx::query_scalar("SELECT 1 FROM builds WHERE id = ?")
            .bind(build_id)
            .fetch_optional(&mut *tx)
            .await?;
        if exists.is_none() {
            return Err(StoreError::not_found("build", build_id));
        }
        let mut seq = last;
        for chunk in lines.chunks(LOG_BATCH) {
            let mut q = QueryBuilder::<Sqlite>::new(
                "INSERT INTO build_logs (build_id, seq, timestamp, stream, text) ",
            );
            q.push_values(chunk, |mut row, line| {
                seq += 1;
                row.push_bind(build_id)
                    .push_bind(seq)
                    .push_bind(line.timestamp)
                    .push_bind(line.stream)
                    .push_bind(&line.text);
            });
            q.build().execute(&mut *tx).await?;
        }
        tx.commit().await?;
        let seq = u64::try_from(seq).unwrap_or(0);
        self.logs.notify(build_id, seq);
        Ok(seq)
    }

    /// A build's lines with `seq > after_seq`, in order (`after_seq = 0` for everything).
    pub async fn logs_since(&self, build_id: &str, after_seq: u64) -> Result<Vec<LogLine>> {
        Ok(sqlx::query_as::<_, LogLine>(
            "SELECT * FROM build_logs WHERE build_id = ? AND seq > ? ORDER BY seq",
        )
        .bind(build_id)
        .bind(to_i64(after_seq))
        .fetch_all(&self.pool)
        .await?)
    }

    /// A receiver that changes whenever lines are appended to the build or it finishes.
    ///
    /// Subscribe *before* reading history, then loop: read [`Store::logs_since`] the last
    /// seq seen, stop once the signal says `finished` (or the receiver errors) and the read
    /// returned nothing, else wait on `changed()`. No line is missed: an append after the
    /// subscription marks the receiver changed. For a build already terminal the receiver
    /// is `finished` and closed.
    pub async fn subscribe_logs(&self, build_id: &str) -> Result<watch::Receiver<LogSignal>> {
        let rx = self.logs.subscribe(build_id);
        let b = self.get_build(build_id).await;
        match b {
            Ok(b) if !b.status.is_terminal() => Ok(rx),
            Ok(_) => {
                self.logs.finish(build_id);
                Ok(rx)
            }
            Err(e) => {
                self.logs.finish(build_id);
                Err(e)
            }
        }
    }

    /// Follows a build's log from `after_seq` (0 for the start) until the build ends.
    pub async fn follow_logs(&self, build_id: &str, after_seq: u64) -> Result<LogFollower> {
        let rx = self.subscribe_logs(build_id).await?;
        Ok(LogFollower::new(
            self.clone(),
            build_id.to_owned(),
            after_seq,
            rx,
        ))
    }

    // ---------------------------------------------------------------- sandboxes

    /// Records a new sandbox (`starting`) from the template's live artifact.
    ///
    /// Refuses with `Conflict` when the template has no ready build and with
    /// `LimitReached(too_many_sandboxes)` at the team's live-sandbox limit, counted under the
    /// write lock. Returns the row and the plaintext access token (only its hash is kept).
    pub async fn create_sandbox(
        &self,
        team_id: &str,
        new: &NewSandbox,
        limits: &Limits,
    ) -> Result<(Sandbox, String)> {
        let mut tx = self.write_tx().await?;
        let t = template_by_id_or_name_in(&mut tx, team_id, &new.template).await?;
        let Some(build_id) = t.current_build_id.clone() else {
            return Err(StoreError::Conflict(format!(
                "template {:?} has no ready build",
                t.name
            )));
        };
        let live: i64 = sqlx::query_scalar(&format!(
            "SELECT COUNT(*) FROM sandboxes WHERE team_id = ? AND status IN {LIVE_SANDBOX}"
        ))
        .bind(team_id)
        .fetch_one(&mut *tx)
        .await?;
        check_limit(
            live,
            limits.max_live_sandboxes,
            RateLimitCode::TooManySandboxes,
        )?;
        let id = new_id();
        let token = format!("kiln_sbx_{}", new_secret());
        let at = now();
        sqlx::query(
            "INSERT INTO sandboxes (id, team_id, template_id, build_id, name, status, vcpu_count,
                                    memory_mib, metadata, env, access_token_hash, created_at,
                                    updated_at)
             VALUES (?, ?, ?, ?, ?, 'starting', ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&id)
        .bind(team_id)
        .bind(&t.id)
        .bind(&build_id)
        .bind(new.name.clone().unwrap_or_else(|| id.clone()))
        .bind(t.vcpu)
        .bind(t.memory_mib)
        .bind(sqlx::types::Json(&new.metadata))
        .bind(sqlx::types::Json(&new.env))
        .bind(hash_secret(&token))
        .bind(at)
        .bind(at)
        .execute(&mut *tx)
        .await?;
        let sandbox = sandbox_in(&mut tx, team_id, &id).await?;
        tx.commit().await?;
        tracing::info!(sandbox_id = %id, template_id = %t.id, "created sandbox");
        Ok((sandbox, token))
    }

    /// A sandbox of the team (including deleted ones, which keep their row).
    pub async fn sandbox_by_id(&self, team_id: &str, sandbox_id: &str) -> Result<Sandbox> {
        let mut conn = self.pool.acquire().await?;
        sandbox_in(&mut conn, team_id, sandbox_id).await
    }

    /// The team's sandboxes matching every filter, oldest first.
    pub async fn list_sandboxes(
        &self,
        team_id: &str,
        filter: &SandboxFilter,
    ) -> Result<Vec<Sandbox>> {
        let mut q = QueryBuilder::<Sqlite>::new("SELECT * FROM sandboxes WHERE team_id = ");
        q.push_bind(team_id);
        match &filter.statuses {
            Some(statuses) if statuses.is_empty() => return Ok(Vec::new()),
            Some(statuses) => {
                q.push(" AND status IN (");
                let mut sep = q.separated(", ");
                for s in statuses {
                    sep.push_bind(*s);
                }
                q.push(")");
            }
            None => {
                q.push(" AND status <> 'deleted'");
            }
        }
        for (key, value) in &filter.metadata {
            q.push(" AND EXISTS (SELECT 1 FROM json_each(sandboxes.metadata) m WHERE m.key = ");
            q.push_bind(key);
            q.push(" AND m.value = ");
            q.push_bind(value);
            q.push(")");
        }
        q.push(" ORDER BY created_at, rowid LIMIT ");
        q.push_bind(filter.limit.map_or(-1, i64::from));
        q.push(" OFFSET ");
        q.push_bind(i64::from(filter.offset));
        Ok(q.build_query_as::<Sandbox>().fetch_all(&self.pool).await?)
    }

    /// Moves a sandbox of the team to `to`, if [`SandboxStatus::can_move_to`] allows.
    /// Moving to the current status is a no-op.
    pub async fn set_sandbox_status(
        &self,
        team_id: &str,
        sandbox_id: &str,
        to: SandboxStatus,
    ) -> Result<Sandbox> {
        let mut tx = self.write_tx().await?;
        let s = sandbox_in(&mut tx, team_id, sandbox_id).await?;
        if s.status == to {
            return Ok(s);
        }
        if !s.status.can_move_to(to) {
            return Err(StoreError::InvalidTransition {
                kind: "sandbox",
                id: s.id,
                from: s.status.to_string(),
                to: to.to_string(),
            });
        }
        sqlx::query("UPDATE sandboxes SET status = ?, updated_at = ? WHERE id = ?")
            .bind(to)
            .bind(now())
            .bind(sandbox_id)
            .execute(&mut *tx)
            .await?;
        let s = sandbox_in(&mut tx, team_id, sandbox_id).await?;
        tx.commit().await?;
        tracing::debug!(sandbox_id, status = %to, "sandbox status changed");
        Ok(s)
    }

    /// Replaces a sandbox's metadata.
    pub async fn set_sandbox_metadata(
        &self,
        team_id: &str,
        sandbox_id: &str,
        metadata: &std::collections::BTreeMap<String, String>,
    ) -> Result<Sandbox> {
        let mut tx = self.write_tx().await?;
        let done = sqlx::query(
            "UPDATE sandboxes SET metadata = ?, updated_at = ? WHERE id = ? AND team_id = ?",
        )
        .bind(sqlx::types::Json(metadata))
        .bind(now())
        .bind(sandbox_id)
        .bind(team_id)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::not_found("sandbox", sandbox_id));
        }
        let s = sandbox_in(&mut tx, team_id, sandbox_id).await?;
        tx.commit().await?;
        Ok(s)
    }

    /// Whether `token` is the access token of this (non-deleted) sandbox.
    pub async fn verify_sandbox_token(&self, sandbox_id: &str, token: &str) -> Result<bool> {
        Ok(matches!(
            self.sandbox_access(sandbox_id, token).await?,
            SandboxAccess::Granted(_)
        ))
    }

    /// Whether `token` opens this sandbox's data plane. The token alone authorises (it is
    /// the sandbox's own secret); the stored hash is compared in constant time.
    pub async fn sandbox_access(&self, sandbox_id: &str, token: &str) -> Result<SandboxAccess> {
        let row: Option<(String, String)> = sqlx::query_as(
            "SELECT team_id, access_token_hash FROM sandboxes WHERE id = ? AND status <> 'deleted'",
        )
        .bind(sandbox_id)
        .fetch_optional(&self.pool)
        .await?;
        let Some((team_id, stored)) = row else {
            return Ok(SandboxAccess::NotFound);
        };
        if !constant_time_eq(stored.as_bytes(), hash_secret(token).as_bytes()) {
            return Ok(SandboxAccess::Denied);
        }
        Ok(SandboxAccess::Granted(Box::new(
            self.sandbox_by_id(&team_id, sandbox_id).await?,
        )))
    }

    /// Replaces a sandbox's access token (on resume and activate) and returns the new one in
    /// plain text; the old token stops working at once.
    pub async fn rotate_sandbox_token(&self, team_id: &str, sandbox_id: &str) -> Result<String> {
        let token = format!("kiln_sbx_{}", new_secret());
        let done = sqlx::query(
            "UPDATE sandboxes SET access_token_hash = ?, updated_at = ?
             WHERE id = ? AND team_id = ? AND status <> 'deleted'",
        )
        .bind(hash_secret(&token))
        .bind(now())
        .bind(sandbox_id)
        .bind(team_id)
        .execute(&self.pool)
        .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::not_found("sandbox", sandbox_id));
        }
        Ok(token)
    }

    /// Sandboxes of every team in one of `statuses` (restart recovery and metrics).
    pub async fn sandboxes_with_status(&self, statuses: &[SandboxStatus]) -> Result<Vec<Sandbox>> {
        if statuses.is_empty() {
            return Ok(Vec::new());
        }
        let mut q = QueryBuilder::<Sqlite>::new("SELECT * FROM sandboxes WHERE status IN (");
        let mut sep = q.separated(", ");
        for s in statuses {
            sep.push_bind(*s);
        }
        q.push(") ORDER BY created_at, rowid");
        Ok(q.build_query_as::<Sandbox>().fetch_all(&self.pool).await?)
    }
}

// -------------------------------------------------------------------- helpers on a connection

/// Equality whose time does not depend on where the inputs differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn check_limit(count: i64, limit: u32, code: RateLimitCode) -> Result<()> {
    if count >= i64::from(limit) {
        tracing::debug!(%code, count, limit, "team limit reached");
        return Err(StoreError::LimitReached { code, limit });
    }
    Ok(())
}

async fn check_build_limit(
    conn: &mut SqliteConnection,
    team_id: &str,
    limits: &Limits,
) -> Result<()> {
    let builds: i64 = sqlx::query_scalar(&format!(
        "SELECT COUNT(*) FROM builds WHERE team_id = ? AND status IN {NON_TERMINAL_BUILD}"
    ))
    .bind(team_id)
    .fetch_one(&mut *conn)
    .await?;
    check_limit(
        builds,
        limits.max_concurrent_builds,
        RateLimitCode::TooManyBuilds,
    )
}

fn invalid_build(b: &Build, to: BuildStatus) -> StoreError {
    StoreError::InvalidTransition {
        kind: "build",
        id: b.id.clone(),
        from: b.status.to_string(),
        to: to.to_string(),
    }
}

async fn team_by_name(conn: &mut SqliteConnection, name: &str) -> Result<Option<Team>> {
    Ok(
        sqlx::query_as::<_, Team>("SELECT * FROM teams WHERE name = ?")
            .bind(name)
            .fetch_optional(&mut *conn)
            .await?,
    )
}

async fn insert_team(conn: &mut SqliteConnection, name: &str) -> Result<Team> {
    let team = Team {
        id: new_id(),
        name: name.to_owned(),
        created_at: now(),
    };
    sqlx::query("INSERT INTO teams (id, name, created_at) VALUES (?, ?, ?)")
        .bind(&team.id)
        .bind(&team.name)
        .bind(team.created_at)
        .execute(&mut *conn)
        .await?;
    tracing::info!(team = %team.name, "created team");
    Ok(team)
}

async fn ensure_team(conn: &mut SqliteConnection, team_id: &str) -> Result<()> {
    let found: Option<i64> = sqlx::query_scalar("SELECT 1 FROM teams WHERE id = ?")
        .bind(team_id)
        .fetch_optional(&mut *conn)
        .await?;
    found
        .map(|_| ())
        .ok_or_else(|| StoreError::not_found("team", team_id))
}

async fn insert_build(
    conn: &mut SqliteConnection,
    build_id: &str,
    template_id: &str,
    team_id: &str,
    hash: &str,
    created_at: DateTime<Utc>,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO builds (id, template_id, team_id, status, build_spec_hash, created_at)
         VALUES (?, ?, ?, 'pending', ?, ?)",
    )
    .bind(build_id)
    .bind(template_id)
    .bind(team_id)
    .bind(hash)
    .bind(created_at)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

async fn template_in(conn: &mut SqliteConnection, team_id: &str, id: &str) -> Result<Template> {
    sqlx::query_as::<_, Template>("SELECT * FROM templates WHERE id = ? AND team_id = ?")
        .bind(id)
        .bind(team_id)
        .fetch_optional(&mut *conn)
        .await?
        .ok_or_else(|| StoreError::not_found("template", id))
}

async fn template_by_id_or_name_in(
    conn: &mut SqliteConnection,
    team_id: &str,
    key: &str,
) -> Result<Template> {
    sqlx::query_as::<_, Template>(
        "SELECT * FROM templates WHERE team_id = ? AND (id = ? OR name = ?)
         ORDER BY (id = ?) DESC LIMIT 1",
    )
    .bind(team_id)
    .bind(key)
    .bind(key)
    .bind(key)
    .fetch_optional(&mut *conn)
    .await?
    .ok_or_else(|| StoreError::not_found("template", key))
}

async fn build_in(conn: &mut SqliteConnection, build_id: &str) -> Result<Build> {
    sqlx::query_as::<_, Build>("SELECT * FROM builds WHERE id = ?")
        .bind(build_id)
        .fetch_optional(&mut *conn)
        .await?
        .ok_or_else(|| StoreError::not_found("build", build_id))
}

async fn builds_of(conn: &mut SqliteConnection, template_id: &str) -> Result<Vec<Build>> {
    Ok(sqlx::query_as::<_, Build>(
        "SELECT * FROM builds WHERE template_id = ? ORDER BY created_at, rowid",
    )
    .bind(template_id)
    .fetch_all(&mut *conn)
    .await?)
}

async fn sandbox_in(conn: &mut SqliteConnection, team_id: &str, id: &str) -> Result<Sandbox> {
    sqlx::query_as::<_, Sandbox>("SELECT * FROM sandboxes WHERE id = ? AND team_id = ?")
        .bind(id)
        .bind(team_id)
        .fetch_optional(&mut *conn)
        .await?
        .ok_or_else(|| StoreError::not_found("sandbox", id))
}

/// Makes the template's status follow `build` when it is the template's latest build.
///
/// A template with a live artifact stays `ready` through rebuilds, failed ones included
/// (the failure is in `error_message`). A cancelled latest build leaves a template without
/// one `failed`, since there is nothing to start sandboxes from.
async fn follow_latest(
    conn: &mut SqliteConnection,
    build: &Build,
    artifact: Option<BuiltArtifact>,
) -> Result<()> {
    let t: Option<(Option<String>, Option<String>)> =
        sqlx::query_as("SELECT latest_build_id, current_build_id FROM templates WHERE id = ?")
            .bind(&build.template_id)
            .fetch_optional(&mut *conn)
            .await?;
    let Some((latest, current)) = t else {
        return Ok(());
    };
    if latest.as_deref() != Some(build.id.as_str()) {
        return Ok(());
    }
    let (status, error): (TemplateStatus, Option<String>) = match build.status {
        // While a live artifact exists the template stays `ready` (the SDKs read the
        // template's status as that of its latest *successful* build; the build's own
        // status is what a rebuild's caller follows).
        BuildStatus::Pending | BuildStatus::Building | BuildStatus::Snapshotting
            if current.is_some() =>
        {
            (TemplateStatus::Ready, None)
        }
        BuildStatus::Failed if current.is_some() => {
            (TemplateStatus::Ready, build.error_message.clone())
        }
        BuildStatus::Pending => (TemplateStatus::Pending, None),
        BuildStatus::Building | BuildStatus::Snapshotting => (TemplateStatus::Building, None),
        BuildStatus::Ready => {
            sqlx::query(
                "UPDATE templates SET status = 'ready', error_message = NULL, built_at = ?,
                        current_build_id = ?, size_bytes = ? WHERE id = ?",
            )
            .bind(build.finalized_at)
            .bind(&build.id)
            .bind(artifact.map(|a| to_i64(a.size_bytes)))
            .bind(&build.template_id)
            .execute(&mut *conn)
            .await?;
            return Ok(());
        }
        BuildStatus::Failed => (TemplateStatus::Failed, build.error_message.clone()),
        BuildStatus::Cancelled if current.is_some() => (TemplateStatus::Ready, None),
        BuildStatus::Cancelled => (
            TemplateStatus::Failed,
            Some(
                CodedMessage::new(kiln_spec::BuildErrorCode::BuildFailed, "build cancelled")
                    .to_string(),
            ),
        ),
    };
    sqlx::query("UPDATE templates SET status = ?, error_message = ? WHERE id = ?")
        .bind(status)
        .bind(error)
        .bind(&build.template_id)
        .execute(&mut *conn)
        .await?;
    Ok(())
}
