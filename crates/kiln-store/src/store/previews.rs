//! Preview URLs: a sandbox's policy and the ports it published, with the generation of each
//! port's tokens.
//!
//! Invariants: a port's token generation only grows (rotate and unpublish bump it, a
//! publish after an unpublish keeps it), so a token of an earlier generation never opens
//! the port again; a deleted sandbox publishes nothing; team walls as everywhere (the
//! proxy, which knows no team, reads [`Store::preview_target`], keyed by the sandbox alone:
//! the URL is the sandbox's, the credential decides).

use sqlx::SqliteConnection;

use super::sandboxes::sandbox_in;
use super::{now, Result, Store};
use crate::error::StoreError;
use crate::model::{PortAccess, PreviewAccess, PreviewPort, Sandbox, SandboxStatus};

/// A sandbox that may be changed: the team's, not deleted.
async fn live_sandbox_in(conn: &mut SqliteConnection, team_id: &str, id: &str) -> Result<Sandbox> {
    let s = sandbox_in(conn, team_id, id).await?;
    if s.status == SandboxStatus::Deleted {
        return Err(StoreError::not_found("sandbox", id));
    }
    Ok(s)
}

async fn port_in(
    conn: &mut SqliteConnection,
    sandbox_id: &str,
    port: u16,
) -> Result<Option<PreviewPort>> {
    Ok(
        sqlx::query_as("SELECT * FROM preview_ports WHERE sandbox_id = ? AND port = ?")
            .bind(sandbox_id)
            .bind(port)
            .fetch_optional(&mut *conn)
            .await?,
    )
}

fn unpublished(port: u16) -> StoreError {
    StoreError::not_found("published preview port", port.to_string())
}

impl Store {
    /// Sets a sandbox's preview policy; its published ports keep their access.
    pub async fn set_preview_access(
        &self,
        team_id: &str,
        sandbox_id: &str,
        access: PreviewAccess,
    ) -> Result<Sandbox> {
        let mut tx = self.write_tx().await?;
        live_sandbox_in(&mut tx, team_id, sandbox_id).await?;
        sqlx::query("UPDATE sandboxes SET preview_access = ?, updated_at = ? WHERE id = ?")
            .bind(access)
            .bind(now())
            .bind(sandbox_id)
            .execute(&mut *tx)
            .await?;
        let s = sandbox_in(&mut tx, team_id, sandbox_id).await?;
        tx.commit().await?;
        Ok(s)
    }

    /// Publishes a port. `access` none keeps a published port's access and gives a new
    /// one the sandbox's default. Publishing again is not an error.
    pub async fn publish_preview_port(
        &self,
        team_id: &str,
        sandbox_id: &str,
        port: u16,
        access: Option<PortAccess>,
    ) -> Result<(Sandbox, PreviewPort)> {
        let mut tx = self.write_tx().await?;
        let s = live_sandbox_in(&mut tx, team_id, sandbox_id).await?;
        let at = now();
        match port_in(&mut tx, sandbox_id, port).await? {
            Some(row) => {
                let access = match access {
                    Some(a) => a,
                    None if row.published => row.access,
                    None => s.preview_access.new_port_access(),
                };
                sqlx::query(
                    "UPDATE preview_ports SET access = ?, published = 1, updated_at = ?
                     WHERE sandbox_id = ? AND port = ?",
                )
                .bind(access)
                .bind(at)
                .bind(sandbox_id)
                .bind(port)
                .execute(&mut *tx)
                .await?;
            }
            None => {
                sqlx::query(
                    "INSERT INTO preview_ports (sandbox_id, port, access, created_at, updated_at)
                     VALUES (?, ?, ?, ?, ?)",
                )
                .bind(sandbox_id)
                .bind(port)
                .bind(access.unwrap_or(s.preview_access.new_port_access()))
                .bind(at)
                .bind(at)
                .execute(&mut *tx)
                .await?;
            }
        }
        let row = port_in(&mut tx, sandbox_id, port)
            .await?
            .ok_or_else(|| unpublished(port))?;
        tx.commit().await?;
        Ok((s, row))
    }

    /// Unpublishes a port and revokes its tokens. Unpublishing a port that is not
    /// published is not an error (the SDKs retry it).
    pub async fn unpublish_preview_port(
        &self,
        team_id: &str,
        sandbox_id: &str,
        port: u16,
    ) -> Result<()> {
        let mut tx = self.write_tx().await?;
        live_sandbox_in(&mut tx, team_id, sandbox_id).await?;
        sqlx::query(
            "UPDATE preview_ports
             SET published = 0, token_version = token_version + 1, updated_at = ?
             WHERE sandbox_id = ? AND port = ? AND published = 1",
        )
        .bind(now())
        .bind(sandbox_id)
        .bind(port)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Starts a new generation of a published port's tokens: every older token stops
    /// working at once.
    pub async fn rotate_preview_port(
        &self,
        team_id: &str,
        sandbox_id: &str,
        port: u16,
    ) -> Result<(Sandbox, PreviewPort)> {
        let mut tx = self.write_tx().await?;
        let s = live_sandbox_in(&mut tx, team_id, sandbox_id).await?;
        let done = sqlx::query(
            "UPDATE preview_ports SET token_version = token_version + 1, updated_at = ?
             WHERE sandbox_id = ? AND port = ? AND published = 1",
        )
        .bind(now())
        .bind(sandbox_id)
        .bind(port)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 0 {
            return Err(unpublished(port));
        }
        let row = port_in(&mut tx, sandbox_id, port)
            .await?
            .ok_or_else(|| unpublished(port))?;
        tx.commit().await?;
        Ok((s, row))
    }

    /// A published port of one of the team's live sandboxes (to mint a token for it).
    pub async fn published_preview_port(
        &self,
        team_id: &str,
        sandbox_id: &str,
        port: u16,
    ) -> Result<(Sandbox, PreviewPort)> {
        let mut conn = self.pool.acquire().await?;
        let s = live_sandbox_in(&mut conn, team_id, sandbox_id).await?;
        match port_in(&mut conn, sandbox_id, port).await? {
            Some(row) if row.published => Ok((s, row)),
            _ => Err(unpublished(port)),
        }
    }

    /// The team's live sandbox and its published ports, by port.
    pub async fn preview_ports(
        &self,
        team_id: &str,
        sandbox_id: &str,
    ) -> Result<(Sandbox, Vec<PreviewPort>)> {
        let mut conn = self.pool.acquire().await?;
        let s = live_sandbox_in(&mut conn, team_id, sandbox_id).await?;
        let ports = sqlx::query_as(
            "SELECT * FROM preview_ports WHERE sandbox_id = ? AND published = 1 ORDER BY port",
        )
        .bind(sandbox_id)
        .fetch_all(&mut *conn)
        .await?;
        Ok((s, ports))
    }

    /// What a preview request for `port` of `sandbox_id` finds, whichever team's it is:
    /// the sandbox unless it is deleted (or never was), and the port if it is published.
    pub async fn preview_target(
        &self,
        sandbox_id: &str,
        port: u16,
    ) -> Result<Option<(Sandbox, Option<PreviewPort>)>> {
        let mut conn = self.pool.acquire().await?;
        let Some(s): Option<Sandbox> =
            sqlx::query_as("SELECT * FROM sandboxes WHERE id = ? AND status <> 'deleted'")
                .bind(sandbox_id)
                .fetch_optional(&mut *conn)
                .await?
        else {
            return Ok(None);
        };
        let port = port_in(&mut conn, sandbox_id, port)
            .await?
            .filter(|p| p.published);
        Ok(Some((s, port)))
    }
}
