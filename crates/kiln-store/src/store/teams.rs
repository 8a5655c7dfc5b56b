//! Teams and their API keys.
//!
//! Invariants: a team name is unique (a taken one is a `Conflict`); an API key is stored
//! only as its sha256, its plaintext is returned once at creation and never again; a key
//! is revoked only through its own team. Authentication refreshes a key's `last_used_at`
//! at most once per [`LAST_USED_RESOLUTION`], so that reads do not become writes.

use chrono::{DateTime, Utc};
use sqlx::SqliteConnection;

use super::{hash_secret, new_id, new_secret, now, Result, Store};
use crate::error::StoreError;
use crate::model::{ApiKey, Team};

/// How stale an API key's `last_used_at` may get before authentication refreshes it.
const LAST_USED_RESOLUTION: chrono::TimeDelta = chrono::TimeDelta::seconds(60);

impl Store {
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

pub(super) async fn ensure_team(conn: &mut SqliteConnection, team_id: &str) -> Result<()> {
    let found: Option<i64> = sqlx::query_scalar("SELECT 1 FROM teams WHERE id = ?")
        .bind(team_id)
        .fetch_optional(&mut *conn)
        .await?;
    found
        .map(|_| ())
        .ok_or_else(|| StoreError::not_found("team", team_id))
}
