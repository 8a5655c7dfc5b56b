//! Snapshots of sandboxes: creation (with the team's limit and idempotency keys), lookup,
//! listing, rename, the `creating` -> `ready` | `failed` machine, deletion and restart
//! recovery.
//!
//! Invariants: snapshots that hold an artifact (`creating`, `ready`) count against
//! `max_snapshots` in the write transaction that inserts; a create repeated with the same
//! idempotency key for the same sandbox returns the first snapshot and writes nothing; a
//! snapshot outlives its source sandbox and pins its template (see
//! [`Store::delete_template`]). Team walls: every lookup is scoped to the team.

use kiln_spec::CodedMessage;
use sqlx::SqliteConnection;

use super::{check_limit, new_id, now, sql_list, to_i64, Result, Store};
use crate::error::{Limit, StoreError};
use crate::model::{Limits, NewSnapshot, Sandbox, Snapshot, SnapshotStatus};

impl Store {
    /// Records a snapshot (`creating`) of `sandbox`, to be captured by process
    /// `runner_pid`; its shape is the sandbox's template's.
    ///
    /// With an idempotency key that this sandbox already used, returns that snapshot and
    /// `false`, writing nothing. Refuses with `LimitReached(too_many_snapshots)` at the
    /// team's limit, counted under the write lock.
    pub async fn create_snapshot(
        &self,
        sandbox: &Sandbox,
        new: &NewSnapshot,
        runner_pid: u32,
        limits: &Limits,
    ) -> Result<(Snapshot, bool)> {
        let mut tx = self.write_tx().await?;
        if let Some(key) = &new.idempotency_key {
            let earlier = sqlx::query_as::<_, Snapshot>(
                "SELECT * FROM snapshots WHERE team_id = ? AND sandbox_id = ? AND idempotency_key = ?",
            )
            .bind(&sandbox.team_id)
            .bind(&sandbox.id)
            .bind(key)
            .fetch_optional(&mut *tx)
            .await?;
            if let Some(s) = earlier {
                return Ok((s, false));
            }
        }
        let kept: i64 = sqlx::query_scalar(&format!(
            "SELECT COUNT(*) FROM snapshots WHERE team_id = ? AND status IN {kept}",
            kept = sql_list(&SnapshotStatus::kept())
        ))
        .bind(&sandbox.team_id)
        .fetch_one(&mut *tx)
        .await?;
        check_limit(kept, limits.max_snapshots, Limit::Snapshots)?;
        let disk_mib: u32 = sqlx::query_scalar("SELECT disk_mib FROM templates WHERE id = ?")
            .bind(&sandbox.template_id)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or_else(|| StoreError::not_found("template", &sandbox.template_id))?;
        let id = new_id();
        sqlx::query(
            "INSERT INTO snapshots (id, team_id, sandbox_id, template_id, build_id, name, status,
                                    vcpu_count, memory_mib, disk_mib, idempotency_key,
                                    runner_pid, created_at)
             VALUES (?, ?, ?, ?, ?, ?, 'creating', ?, ?, ?, ?, ?, ?)",
        )
        .bind(&id)
        .bind(&sandbox.team_id)
        .bind(&sandbox.id)
        .bind(&sandbox.template_id)
        .bind(&sandbox.build_id)
        .bind(&new.name)
        .bind(sandbox.vcpu_count)
        .bind(sandbox.memory_mib)
        .bind(disk_mib)
        .bind(&new.idempotency_key)
        .bind(i64::from(runner_pid))
        .bind(now())
        .execute(&mut *tx)
        .await?;
        let s = snapshot_in(&mut tx, &sandbox.team_id, &id).await?;
        tx.commit().await?;
        tracing::info!(snapshot_id = %id, sandbox_id = %sandbox.id, "created snapshot");
        Ok((s, true))
    }

    /// A snapshot of the team.
    pub async fn snapshot_by_id(&self, team_id: &str, snapshot_id: &str) -> Result<Snapshot> {
        let mut conn = self.pool.acquire().await?;
        snapshot_in(&mut conn, team_id, snapshot_id).await
    }

    /// The team's snapshots (of one sandbox, when given), newest first, paged.
    pub async fn list_snapshots(
        &self,
        team_id: &str,
        sandbox_id: Option<&str>,
        limit: Option<u32>,
        offset: u32,
    ) -> Result<Vec<Snapshot>> {
        Ok(sqlx::query_as::<_, Snapshot>(
            "SELECT * FROM snapshots WHERE team_id = ? AND (? IS NULL OR sandbox_id = ?)
             ORDER BY created_at DESC, rowid DESC LIMIT ? OFFSET ?",
        )
        .bind(team_id)
        .bind(sandbox_id)
        .bind(sandbox_id)
        .bind(limit.map_or(-1, i64::from))
        .bind(i64::from(offset))
        .fetch_all(&self.pool)
        .await?)
    }

    /// Renames a snapshot of the team.
    pub async fn rename_snapshot(
        &self,
        team_id: &str,
        snapshot_id: &str,
        name: &str,
    ) -> Result<Snapshot> {
        let mut tx = self.write_tx().await?;
        let done = sqlx::query("UPDATE snapshots SET name = ? WHERE id = ? AND team_id = ?")
            .bind(name)
            .bind(snapshot_id)
            .bind(team_id)
            .execute(&mut *tx)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::not_found("snapshot", snapshot_id));
        }
        let s = snapshot_in(&mut tx, team_id, snapshot_id).await?;
        tx.commit().await?;
        Ok(s)
    }

    /// Ends a `creating` snapshot: `ready` with the size of its published bundle, or
    /// `failed` with a `"<code>: <detail>"` message. Refuses with `InvalidTransition` when
    /// it is no longer `creating` (deleted meanwhile, or failed by a restart).
    pub async fn finish_snapshot(
        &self,
        snapshot_id: &str,
        outcome: std::result::Result<u64, &CodedMessage>,
    ) -> Result<Snapshot> {
        let mut tx = self.write_tx().await?;
        let s = sqlx::query_as::<_, Snapshot>("SELECT * FROM snapshots WHERE id = ?")
            .bind(snapshot_id)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or_else(|| StoreError::not_found("snapshot", snapshot_id))?;
        let to = match outcome {
            Ok(_) => SnapshotStatus::Ready,
            Err(_) => SnapshotStatus::Failed,
        };
        if s.status != SnapshotStatus::Creating {
            return Err(StoreError::InvalidTransition {
                kind: "snapshot",
                id: s.id,
                from: s.status.to_string(),
                to: to.to_string(),
            });
        }
        match outcome {
            Ok(size) => sqlx::query(
                "UPDATE snapshots SET status = 'ready', size_bytes = ?, ready_at = ?,
                        runner_pid = NULL WHERE id = ?",
            )
            .bind(to_i64(size))
            .bind(now()),
            Err(msg) => sqlx::query(
                "UPDATE snapshots SET status = 'failed', error_message = ?, runner_pid = NULL
                 WHERE id = ?",
            )
            .bind(msg.to_string()),
        }
        .bind(snapshot_id)
        .execute(&mut *tx)
        .await?;
        let s = snapshot_in(&mut tx, &s.team_id, snapshot_id).await?;
        tx.commit().await?;
        Ok(s)
    }

    /// Deletes a snapshot of the team and returns it, so that the caller removes its
    /// bundle. Sandboxes created from it are not affected (they keep what they run on).
    pub async fn delete_snapshot(&self, team_id: &str, snapshot_id: &str) -> Result<Snapshot> {
        let mut tx = self.write_tx().await?;
        let s = snapshot_in(&mut tx, team_id, snapshot_id).await?;
        sqlx::query("DELETE FROM snapshots WHERE id = ?")
            .bind(snapshot_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        tracing::info!(snapshot_id, "deleted snapshot");
        Ok(s)
    }

    /// After a crash: snapshots still `creating` whose capturing process is gone are
    /// marked `failed` (`snapshot_failed: interrupted by server restart`). Returns them.
    pub async fn mark_interrupted_snapshots(
        &self,
        runner_alive: impl Fn(u32) -> bool,
    ) -> Result<Vec<Snapshot>> {
        let message = interrupted().to_string();
        let mut tx = self.write_tx().await?;
        let rows = sqlx::query_as::<_, Snapshot>(
            "SELECT * FROM snapshots WHERE status = 'creating' ORDER BY created_at, rowid",
        )
        .fetch_all(&mut *tx)
        .await?;
        let mut out = Vec::new();
        for s in rows {
            let alive = s
                .runner_pid
                .and_then(|p| u32::try_from(p).ok())
                .is_some_and(&runner_alive);
            if alive {
                continue;
            }
            sqlx::query(
                "UPDATE snapshots SET status = 'failed', error_message = ?, runner_pid = NULL
                 WHERE id = ?",
            )
            .bind(&message)
            .bind(&s.id)
            .execute(&mut *tx)
            .await?;
            out.push(snapshot_in(&mut tx, &s.team_id, &s.id).await?);
        }
        tx.commit().await?;
        if !out.is_empty() {
            tracing::warn!(count = out.len(), "marked interrupted snapshots as failed");
        }
        Ok(out)
    }

    /// The ids of the snapshots being captured (of every team).
    pub async fn snapshots_creating(&self) -> Result<Vec<String>> {
        Ok(
            sqlx::query_scalar("SELECT id FROM snapshots WHERE status = 'creating'")
                .fetch_all(&self.pool)
                .await?,
        )
    }

    /// The ids of every snapshot row (of every team): what may have a bundle on disk.
    pub async fn snapshot_ids(&self) -> Result<Vec<String>> {
        Ok(sqlx::query_scalar("SELECT id FROM snapshots")
            .fetch_all(&self.pool)
            .await?)
    }
}

/// Why a snapshot that a restart interrupted failed.
fn interrupted() -> CodedMessage {
    CodedMessage::new(
        kiln_spec::BuildErrorCode::SnapshotFailed,
        "interrupted by server restart",
    )
}

pub(super) async fn snapshot_in(
    conn: &mut SqliteConnection,
    team_id: &str,
    id: &str,
) -> Result<Snapshot> {
    sqlx::query_as::<_, Snapshot>("SELECT * FROM snapshots WHERE id = ? AND team_id = ?")
        .bind(id)
        .bind(team_id)
        .fetch_optional(&mut *conn)
        .await?
        .ok_or_else(|| StoreError::not_found("snapshot", id))
}
