//! Builds: reads, the status machine, restart recovery, runner claims and the build
//! cache's candidates.
//!
//! Invariants: a build only moves forward, `pending -> building -> snapshotting`, and ends
//! `ready`, `failed` or `cancelled` from any of those; a terminal build never moves again
//! (cancelling one is a no-op), and every transition runs in one write transaction that also lets the template
//! follow ([`follow_latest`]). Non-terminal builds count against the team's
//! `max_concurrent_builds` ([`check_build_limit`]); at start-up the ones whose runner is
//! gone are failed, so none holds a slot forever. Team walls: reads for a request are
//! scoped to the team; [`Store::get_build`] is for the build pipeline only.

use chrono::{DateTime, Utc};
use kiln_spec::CodedMessage;
use sqlx::SqliteConnection;

use super::templates::{follow_latest, template_by_id_or_name_in};
use super::{check_limit, now, Result, Store};
use crate::error::Limit;
use crate::error::StoreError;
use crate::model::{Build, BuildStatus, BuiltArtifact, Limits};

/// The statuses a build can still leave, as an SQL list: those that hold a build slot.
pub(super) fn unfinished_builds() -> &'static str {
    static LIST: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        super::sql_list(
            &BuildStatus::ALL
                .iter()
                .copied()
                .filter(|s| !s.is_terminal())
                .collect::<Vec<_>>(),
        )
    });
    &LIST
}

impl Store {
    /// A build the team sees: of its own templates, or of a system template.
    pub async fn build_by_id(&self, team_id: &str, build_id: &str) -> Result<Build> {
        sqlx::query_as::<_, Build>("SELECT * FROM builds WHERE id = ? AND team_id IN (?, ?)")
            .bind(build_id)
            .bind(team_id)
            .bind(crate::model::SYSTEM_TEAM_ID)
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
            "SELECT COUNT(*) FROM builds WHERE status IN {unfinished}",
            unfinished = unfinished_builds()
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

    /// Cancels a build of the team (a system template's build is only the system team's
    /// to cancel). A build already terminal is returned unchanged.
    pub async fn cancel_build(&self, team_id: &str, build_id: &str) -> Result<Build> {
        let b = self.build_by_id(team_id, build_id).await?;
        if b.team_id != team_id {
            return Err(StoreError::Conflict(
                "a system template's build: teams cannot cancel it".into(),
            ));
        }
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
            "SELECT id, runner_pid FROM builds WHERE status IN {unfinished}
             ORDER BY created_at, rowid",
            unfinished = unfinished_builds()
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
}

/// Refuses with `LimitReached(too_many_builds)` when the team's non-terminal builds already
/// reach `max_concurrent_builds`; run inside the write transaction that adds a build.
pub(super) async fn check_build_limit(
    conn: &mut SqliteConnection,
    team_id: &str,
    limits: &Limits,
) -> Result<()> {
    let builds: i64 = sqlx::query_scalar(&format!(
        "SELECT COUNT(*) FROM builds WHERE team_id = ? AND status IN {unfinished}",
        unfinished = unfinished_builds()
    ))
    .bind(team_id)
    .fetch_one(&mut *conn)
    .await?;
    check_limit(builds, limits.max_concurrent_builds, Limit::Builds)
}

fn invalid_build(b: &Build, to: BuildStatus) -> StoreError {
    StoreError::InvalidTransition {
        kind: "build",
        id: b.id.clone(),
        from: b.status.to_string(),
        to: to.to_string(),
    }
}

pub(super) async fn insert_build(
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

pub(super) async fn build_in(conn: &mut SqliteConnection, build_id: &str) -> Result<Build> {
    sqlx::query_as::<_, Build>("SELECT * FROM builds WHERE id = ?")
        .bind(build_id)
        .fetch_optional(&mut *conn)
        .await?
        .ok_or_else(|| StoreError::not_found("build", build_id))
}

pub(super) async fn builds_of(
    conn: &mut SqliteConnection,
    template_id: &str,
) -> Result<Vec<Build>> {
    Ok(sqlx::query_as::<_, Build>(
        "SELECT * FROM builds WHERE template_id = ? ORDER BY created_at, rowid",
    )
    .bind(template_id)
    .fetch_all(&mut *conn)
    .await?)
}
