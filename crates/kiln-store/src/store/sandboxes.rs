//! Sandboxes: creation from a template's live artifact or a snapshot, lookup and listing,
//! status, timers, metadata and access tokens.
//!
//! Invariants: a sandbox starts only from a template with a ready build or a ready
//! snapshot of its team; live sandboxes count against `max_live_sandboxes` in the write
//! transaction that inserts; status moves only as [`SandboxStatus::can_move_to`] allows,
//! and the move sets the timers' deadlines in the same write (`pause_at` while active
//! with a timeout, `delete_at` while paused with an auto-delete window, neither
//! otherwise); a deleted sandbox keeps its row but no longer opens; access tokens are
//! stored as sha256 only and compared in constant time. Team walls: every
//! request-facing lookup is scoped to the team.

use std::collections::BTreeMap;

use sqlx::{QueryBuilder, Sqlite, SqliteConnection};

use chrono::{DateTime, TimeDelta, Utc};

use super::snapshots::snapshot_in;
use super::templates::template_by_id_or_name_in;
use super::{check_limit, hash_secret, new_id, new_secret, now, Result, Store};
use crate::error::Limit;
use crate::error::StoreError;
use crate::model::{
    Limits, NewSandbox, PreviewAccess, Sandbox, SandboxAccess, SandboxFilter, SandboxStatus,
    SnapshotStatus,
};

/// The statuses [`SandboxStatus::is_live`] holds for, as an SQL list: those that count
/// against the team's limit and pin their template.
pub(super) fn live_sandboxes() -> &'static str {
    static LIST: std::sync::LazyLock<String> =
        std::sync::LazyLock::new(|| super::sql_list(&SandboxStatus::live()));
    &LIST
}

impl Store {
    /// Records a new sandbox (`starting`) from the template's live artifact, or from a
    /// ready snapshot of the team (whose template, build and shape it takes), with its
    /// secret bindings (an unknown secret name is `NotFound`).
    ///
    /// Refuses with `Conflict` when the template has no ready build or the snapshot is not
    /// ready, and with `LimitReached(too_many_sandboxes)` at the team's live-sandbox limit,
    /// counted under the write lock. Returns the row and the plaintext access token (only
    /// its hash is kept).
    pub async fn create_sandbox(
        &self,
        team_id: &str,
        new: &NewSandbox,
        limits: &Limits,
    ) -> Result<(Sandbox, String)> {
        let mut tx = self.write_tx().await?;
        let (template_id, build_id, vcpu, memory_mib) = match &new.snapshot {
            Some(snapshot) => {
                let s = snapshot_in(&mut tx, team_id, snapshot).await?;
                if s.status != SnapshotStatus::Ready {
                    return Err(StoreError::Conflict(format!(
                        "snapshot {} is {}, not ready",
                        s.id, s.status
                    )));
                }
                (s.template_id, s.build_id, s.vcpu_count, s.memory_mib)
            }
            None => {
                let t = template_by_id_or_name_in(&mut tx, team_id, &new.template).await?;
                let Some(build_id) = t.current_build_id.clone() else {
                    return Err(StoreError::Conflict(format!(
                        "template {:?} has no ready build",
                        t.name
                    )));
                };
                (t.id, build_id, t.vcpu, t.memory_mib)
            }
        };
        let live: i64 = sqlx::query_scalar(&format!(
            "SELECT COUNT(*) FROM sandboxes WHERE team_id = ? AND status IN {live}",
            live = live_sandboxes()
        ))
        .bind(team_id)
        .fetch_one(&mut *tx)
        .await?;
        check_limit(live, limits.max_live_sandboxes, Limit::Sandboxes)?;
        let mut bindings = Vec::new();
        for b in &new.secrets {
            bindings.push(super::secrets::resolve(&mut tx, team_id, b).await?);
        }
        let id = new_id();
        let token = format!("kiln_sbx_{}", new_secret());
        let at = now();
        sqlx::query(
            "INSERT INTO sandboxes (id, team_id, template_id, build_id, name, status, vcpu_count,
                                    memory_mib, metadata, env, secrets, access_token_hash,
                                    created_at, updated_at, source_snapshot_id, timeout_seconds,
                                    auto_delete_seconds, preview_access)
             VALUES (?, ?, ?, ?, ?, 'starting', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&id)
        .bind(team_id)
        .bind(&template_id)
        .bind(&build_id)
        .bind(new.name.clone().unwrap_or_else(|| id.clone()))
        .bind(vcpu)
        .bind(memory_mib)
        .bind(sqlx::types::Json(&new.metadata))
        .bind(sqlx::types::Json(&new.env))
        .bind(sqlx::types::Json(&bindings))
        .bind(hash_secret(&token))
        .bind(at)
        .bind(at)
        .bind(&new.snapshot)
        .bind(new.timeout_seconds)
        .bind(new.auto_delete_seconds)
        .bind(new.preview_access.unwrap_or(PreviewAccess::DEFAULT))
        .execute(&mut *tx)
        .await?;
        let sandbox = sandbox_in(&mut tx, team_id, &id).await?;
        tx.commit().await?;
        tracing::info!(sandbox_id = %id, %template_id, snapshot = ?new.snapshot, "created sandbox");
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

    /// Moves a sandbox of the team to `to`, if [`SandboxStatus::can_move_to`] allows, and
    /// sets its timers' deadlines for the new status: `active` starts a fresh auto-pause
    /// window, `paused` a fresh auto-delete countdown, anything else clears both. Moving to
    /// the current status is a no-op.
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
        let at = now();
        let pause_at = (to == SandboxStatus::Active)
            .then(|| after(at, s.timeout_seconds))
            .flatten();
        let delete_at = (to == SandboxStatus::Paused)
            .then(|| after(at, s.auto_delete_seconds))
            .flatten();
        sqlx::query(
            "UPDATE sandboxes SET status = ?, updated_at = ?, pause_at = ?, delete_at = ?
             WHERE id = ?",
        )
        .bind(to)
        .bind(at)
        .bind(pause_at)
        .bind(delete_at)
        .bind(sandbox_id)
        .execute(&mut *tx)
        .await?;
        let s = sandbox_in(&mut tx, team_id, sandbox_id).await?;
        tx.commit().await?;
        tracing::debug!(sandbox_id, status = %to, "sandbox status changed");
        Ok(s)
    }

    /// Sets (`Some(Some(_))`) or clears (`Some(None)`) a sandbox's auto-pause timeout and
    /// auto-delete window; `None` leaves one as it is. A timer changed on a sandbox in the
    /// status it applies to restarts from now: an active sandbox's window, a paused one's
    /// countdown.
    pub async fn set_sandbox_timers(
        &self,
        team_id: &str,
        sandbox_id: &str,
        timeout_seconds: Option<Option<u32>>,
        auto_delete_seconds: Option<Option<u32>>,
    ) -> Result<Sandbox> {
        let mut tx = self.write_tx().await?;
        let s = sandbox_in(&mut tx, team_id, sandbox_id).await?;
        let at = now();
        let timeout = timeout_seconds.unwrap_or(s.timeout_seconds);
        let auto_delete = auto_delete_seconds.unwrap_or(s.auto_delete_seconds);
        let pause_at = match (timeout_seconds, s.status) {
            (Some(t), SandboxStatus::Active) => after(at, t),
            _ => s.pause_at,
        };
        let delete_at = match (auto_delete_seconds, s.status) {
            (Some(d), SandboxStatus::Paused) => after(at, d),
            _ => s.delete_at,
        };
        sqlx::query(
            "UPDATE sandboxes SET timeout_seconds = ?, auto_delete_seconds = ?, pause_at = ?,
                                  delete_at = ?, updated_at = ?
             WHERE id = ?",
        )
        .bind(timeout)
        .bind(auto_delete)
        .bind(pause_at)
        .bind(delete_at)
        .bind(at)
        .bind(sandbox_id)
        .execute(&mut *tx)
        .await?;
        let s = sandbox_in(&mut tx, team_id, sandbox_id).await?;
        tx.commit().await?;
        Ok(s)
    }

    /// Every sandbox with a deadline armed (of every team): active ones with `pause_at`,
    /// paused ones with `delete_at`. The engine's timer wakes for the earliest.
    pub async fn sandboxes_with_deadlines(&self) -> Result<Vec<Sandbox>> {
        Ok(sqlx::query_as::<_, Sandbox>(
            "SELECT * FROM sandboxes
             WHERE (status = 'active' AND pause_at IS NOT NULL)
                OR (status = 'paused' AND delete_at IS NOT NULL)",
        )
        .fetch_all(&self.pool)
        .await?)
    }

    /// Replaces a sandbox's metadata.
    pub async fn set_sandbox_metadata(
        &self,
        team_id: &str,
        sandbox_id: &str,
        metadata: &BTreeMap<String, String>,
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

/// `at` plus `seconds`, if there are seconds.
fn after(at: DateTime<Utc>, seconds: Option<u32>) -> Option<DateTime<Utc>> {
    seconds.map(|s| at + TimeDelta::seconds(i64::from(s)))
}

/// Equality whose time does not depend on where the inputs differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub(super) async fn sandbox_in(
    conn: &mut SqliteConnection,
    team_id: &str,
    id: &str,
) -> Result<Sandbox> {
    sqlx::query_as::<_, Sandbox>("SELECT * FROM sandboxes WHERE id = ? AND team_id = ?")
        .bind(id)
        .bind(team_id)
        .fetch_optional(&mut *conn)
        .await?
        .ok_or_else(|| StoreError::not_found("sandbox", id))
}
