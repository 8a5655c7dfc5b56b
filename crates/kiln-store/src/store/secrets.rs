//! Team secrets and their bindings to sandboxes.
//!
//! Invariants: a secret's name is unique in its team; its value is stored only sealed
//! (the caller seals, bound to the new row's id); a sandbox holds at most one live
//! binding (bound or revoked) per environment variable; deleting a secret revokes every
//! binding of it in the same transaction; a binding is never removed, only detached, so
//! its stand-in stays known (and refused). Team walls: every lookup is scoped to the team.

use sqlx::SqliteConnection;

use super::sandboxes::{live_sandboxes, sandbox_in};
use super::{new_id, now, Result, Store};
use crate::error::StoreError;
use crate::model::{
    BindingState, NewBinding, NewSecret, Sandbox, SandboxStatus, Secret, SecretBinding,
};

impl Store {
    /// Creates a secret; `seal` seals its value for the new secret's id. A taken name is
    /// a `Conflict`.
    pub async fn create_secret(
        &self,
        team_id: &str,
        new: &NewSecret,
        seal: &(dyn Fn(&str) -> String + Sync),
    ) -> Result<Secret> {
        let mut tx = self.write_tx().await?;
        super::teams::ensure_team(&mut tx, team_id).await?;
        if secret_named(&mut tx, team_id, &new.name).await.is_ok() {
            return Err(StoreError::Conflict(format!(
                "secret {:?} already exists",
                new.name
            )));
        }
        let id = new_id();
        let at = now();
        sqlx::query(
            "INSERT INTO secrets (id, team_id, name, auth, hosts, provider, sealed, created_at,
                                  updated_at)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&id)
        .bind(team_id)
        .bind(&new.name)
        .bind(sqlx::types::Json(&new.auth))
        .bind(sqlx::types::Json(&new.hosts))
        .bind(&new.provider)
        .bind(seal(&id))
        .bind(at)
        .bind(at)
        .execute(&mut *tx)
        .await?;
        let secret = secret_named(&mut tx, team_id, &new.name).await?;
        tx.commit().await?;
        tracing::info!(secret_id = %id, "created secret");
        Ok(secret)
    }

    /// One of the team's secrets, by name.
    pub async fn secret_by_name(&self, team_id: &str, name: &str) -> Result<Secret> {
        let mut conn = self.pool.acquire().await?;
        secret_named(&mut conn, team_id, name).await
    }

    /// The team's secrets, by name.
    pub async fn list_secrets(&self, team_id: &str) -> Result<Vec<Secret>> {
        Ok(
            sqlx::query_as::<_, Secret>("SELECT * FROM secrets WHERE team_id = ? ORDER BY name")
                .bind(team_id)
                .fetch_all(&self.pool)
                .await?,
        )
    }

    /// Every secret of every team (re-sealing under a new key).
    pub async fn all_secrets(&self) -> Result<Vec<Secret>> {
        Ok(
            sqlx::query_as::<_, Secret>("SELECT * FROM secrets ORDER BY rowid")
                .fetch_all(&self.pool)
                .await?,
        )
    }

    /// Replaces a secret's sealed value with what `seal` makes of the current row (in the
    /// write transaction, so a concurrent change is not lost). With `rotated` the change
    /// is a new value (its `updated_at` moves); without, the same value sealed again
    /// (under a new key).
    pub async fn reseal_secret(
        &self,
        team_id: &str,
        name: &str,
        seal: &(dyn Fn(&Secret) -> Result<String> + Sync),
        rotated: bool,
    ) -> Result<Secret> {
        let mut tx = self.write_tx().await?;
        let secret = secret_named(&mut tx, team_id, name).await?;
        let sealed = seal(&secret)?;
        let updated = if rotated { now() } else { secret.updated_at };
        sqlx::query("UPDATE secrets SET sealed = ?, updated_at = ? WHERE id = ?")
            .bind(sealed)
            .bind(updated)
            .bind(&secret.id)
            .execute(&mut *tx)
            .await?;
        let secret = secret_named(&mut tx, team_id, name).await?;
        tx.commit().await?;
        Ok(secret)
    }

    /// Deletes a secret and revokes every binding of it, in one transaction. Returns the
    /// secret and the sandboxes whose bindings changed.
    pub async fn delete_secret(&self, team_id: &str, name: &str) -> Result<(Secret, Vec<Sandbox>)> {
        let mut tx = self.write_tx().await?;
        let secret = secret_named(&mut tx, team_id, name).await?;
        let mut changed = Vec::new();
        for s in bound_to(&mut tx, team_id, &secret.id, false).await? {
            let mut bindings = s.secrets.clone();
            for b in &mut bindings {
                if b.secret_id.as_deref() == Some(secret.id.as_str()) {
                    b.secret_id = None;
                    if b.state == BindingState::Bound {
                        b.state = BindingState::Revoked;
                    }
                }
            }
            changed.push(set_bindings(&mut tx, team_id, &s.id, &bindings).await?);
        }
        sqlx::query("DELETE FROM secrets WHERE id = ?")
            .bind(&secret.id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        tracing::info!(secret_id = %secret.id, revoked_in = changed.len(), "deleted secret");
        Ok((secret, changed))
    }

    /// The team's live sandboxes (not failed or deleted) a secret is bound to.
    pub async fn sandboxes_bound_to(&self, team_id: &str, secret_id: &str) -> Result<Vec<Sandbox>> {
        let mut conn = self.pool.acquire().await?;
        bound_to(&mut conn, team_id, secret_id, true).await
    }

    /// Binds a team secret to a live sandbox under `binding.env_key`. A variable already
    /// bound is a `Conflict`; one whose secret was deleted (revoked) is bound afresh.
    pub async fn bind_secret(
        &self,
        team_id: &str,
        sandbox_id: &str,
        binding: &NewBinding,
    ) -> Result<Sandbox> {
        let mut tx = self.write_tx().await?;
        let s = sandbox_in(&mut tx, team_id, sandbox_id).await?;
        if !s.status.is_live() {
            return Err(StoreError::not_found("sandbox", sandbox_id));
        }
        let mut bindings = s.secrets.clone();
        if bindings
            .iter()
            .any(|b| b.env_key == binding.env_key && b.state == BindingState::Bound)
        {
            return Err(StoreError::Conflict(format!(
                "{} is already bound to a secret; detach it first",
                binding.env_key
            )));
        }
        for b in &mut bindings {
            if b.env_key == binding.env_key && b.state == BindingState::Revoked {
                b.state = BindingState::Detached;
            }
        }
        bindings.push(resolve(&mut tx, team_id, binding).await?);
        let s = set_bindings(&mut tx, team_id, sandbox_id, &bindings).await?;
        tx.commit().await?;
        Ok(s)
    }

    /// Detaches the binding of `env_key` (bound or revoked) from a sandbox.
    pub async fn unbind_secret(
        &self,
        team_id: &str,
        sandbox_id: &str,
        env_key: &str,
    ) -> Result<Sandbox> {
        let mut tx = self.write_tx().await?;
        let s = sandbox_in(&mut tx, team_id, sandbox_id).await?;
        if s.status == SandboxStatus::Deleted {
            return Err(StoreError::not_found("sandbox", sandbox_id));
        }
        let mut bindings = s.secrets.clone();
        let found = bindings
            .iter_mut()
            .find(|b| b.env_key == env_key && b.state != BindingState::Detached)
            .ok_or_else(|| StoreError::not_found("secret binding", env_key))?;
        found.state = BindingState::Detached;
        let s = set_bindings(&mut tx, team_id, sandbox_id, &bindings).await?;
        tx.commit().await?;
        Ok(s)
    }

    /// Replaces a sandbox's bindings as a whole (a fork's copy of its parent's, with
    /// stand-ins of its own).
    pub async fn replace_bindings(
        &self,
        team_id: &str,
        sandbox_id: &str,
        bindings: &[SecretBinding],
    ) -> Result<Sandbox> {
        let mut tx = self.write_tx().await?;
        let s = set_bindings(&mut tx, team_id, sandbox_id, bindings).await?;
        tx.commit().await?;
        Ok(s)
    }
}

async fn secret_named(conn: &mut SqliteConnection, team_id: &str, name: &str) -> Result<Secret> {
    sqlx::query_as::<_, Secret>("SELECT * FROM secrets WHERE team_id = ? AND name = ?")
        .bind(team_id)
        .bind(name)
        .fetch_optional(&mut *conn)
        .await?
        .ok_or_else(|| StoreError::not_found("secret", name))
}

/// A binding asked for, resolved against the team's secret of that name.
pub(super) async fn resolve(
    conn: &mut SqliteConnection,
    team_id: &str,
    new: &NewBinding,
) -> Result<SecretBinding> {
    let secret = secret_named(conn, team_id, &new.secret_name).await?;
    Ok(SecretBinding {
        env_key: new.env_key.clone(),
        secret_id: Some(secret.id),
        secret_name: secret.name,
        provider: secret.provider,
        stand_in: new.stand_in.clone(),
        state: BindingState::Bound,
        auth: secret.auth,
        hosts: secret.hosts,
    })
}

/// Sandboxes of the team holding a binding of the secret (a bound one with `bound_only`),
/// live ones only.
async fn bound_to(
    conn: &mut SqliteConnection,
    team_id: &str,
    secret_id: &str,
    bound_only: bool,
) -> Result<Vec<Sandbox>> {
    let state = if bound_only {
        "AND json_extract(b.value, '$.state') = 'bound'"
    } else {
        ""
    };
    Ok(sqlx::query_as::<_, Sandbox>(&format!(
        "SELECT DISTINCT s.* FROM sandboxes s, json_each(s.secrets) b
         WHERE s.team_id = ? AND s.status IN {live}
           AND json_extract(b.value, '$.secret_id') = ? {state}
         ORDER BY s.created_at, s.rowid",
        live = live_sandboxes()
    ))
    .bind(team_id)
    .bind(secret_id)
    .fetch_all(&mut *conn)
    .await?)
}

async fn set_bindings(
    conn: &mut SqliteConnection,
    team_id: &str,
    sandbox_id: &str,
    bindings: &[SecretBinding],
) -> Result<Sandbox> {
    let done = sqlx::query(
        "UPDATE sandboxes SET secrets = ?, updated_at = ? WHERE id = ? AND team_id = ?",
    )
    .bind(sqlx::types::Json(bindings))
    .bind(now())
    .bind(sandbox_id)
    .bind(team_id)
    .execute(&mut *conn)
    .await?;
    if done.rows_affected() == 0 {
        return Err(StoreError::not_found("sandbox", sandbox_id));
    }
    sandbox_in(conn, team_id, sandbox_id).await
}
