//! Templates: creation with their first build, rebuilds, lookup and deletion, and how a
//! template's status follows its latest build ([`follow_latest`]).
//!
//! Invariants: a template name is unique within its team; `max_templates` and
//! `max_concurrent_builds` are counted and applied in one write transaction, and a refusal
//! writes nothing; a rebuild of a spec already in flight joins that build instead of
//! queueing another; a template with live sandboxes, or with snapshots (whose disks lie
//! over its builds' disks), cannot be deleted. Team walls: every lookup is scoped to the
//! team, so another team's template is simply not found; the system team's templates
//! ([`SYSTEM_TEAM_ID`]) are seen by every team and changed by none but the system team.

use kiln_spec::{spec_hash, CodedMessage, Form, TemplateRequest};
use sqlx::SqliteConnection;

use super::builds::{build_in, builds_of, check_build_limit, insert_build, unfinished_builds};
use super::sandboxes::live_sandboxes;
use super::teams::ensure_team;
use super::{check_limit, new_id, now, to_i64, Result, Store};
use crate::error::Limit;
use crate::error::StoreError;
use crate::model::{
    Build, BuildStatus, BuiltArtifact, Limits, Rebuild, SnapshotStatus, Template, TemplateStatus,
    SYSTEM_TEAM_ID,
};

impl Store {
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
        check_limit(templates, limits.max_templates, Limit::Templates)?;
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
        owned_by(&t, team_id)?;
        let hash = match replace {
            Some(r) => r.spec_hash(),
            None => spec_hash(&t.spec()?, &t.resources()),
        };
        let inflight = sqlx::query_as::<_, Build>(&format!(
            "SELECT * FROM builds WHERE template_id = ? AND build_spec_hash = ?
             AND status IN {unfinished} ORDER BY created_at DESC, rowid DESC LIMIT 1",
            unfinished = unfinished_builds()
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

    /// The templates the team sees, oldest first: the system templates and its own.
    pub async fn list_templates(&self, team_id: &str) -> Result<Vec<Template>> {
        Ok(sqlx::query_as::<_, Template>(
            "SELECT * FROM templates WHERE team_id IN (?, ?) ORDER BY created_at, rowid",
        )
        .bind(team_id)
        .bind(SYSTEM_TEAM_ID)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Deletes a template with its builds, logs, dead sandboxes and failed snapshots.
    ///
    /// Refuses with `Conflict` while any of its sandboxes is live or any snapshot keeps a
    /// disk layer over one of its builds (deleting those first frees it). Returns the
    /// template and its builds so the caller can remove their artifacts and stop builds
    /// still running.
    pub async fn delete_template(
        &self,
        team_id: &str,
        template: &str,
    ) -> Result<(Template, Vec<Build>)> {
        let mut tx = self.write_tx().await?;
        let t = template_by_id_or_name_in(&mut tx, team_id, template).await?;
        owned_by(&t, team_id)?;
        let live: i64 = sqlx::query_scalar(&format!(
            "SELECT COUNT(*) FROM sandboxes WHERE template_id = ? AND status IN {live}",
            live = live_sandboxes()
        ))
        .bind(&t.id)
        .fetch_one(&mut *tx)
        .await?;
        if live > 0 {
            return Err(StoreError::Conflict(format!(
                "template has {live} live sandboxes"
            )));
        }
        let snapshots: i64 = sqlx::query_scalar(&format!(
            "SELECT COUNT(*) FROM snapshots WHERE template_id = ? AND status IN {kept}",
            kept = super::sql_list(&SnapshotStatus::kept())
        ))
        .bind(&t.id)
        .fetch_one(&mut *tx)
        .await?;
        if snapshots > 0 {
            return Err(StoreError::Conflict(format!(
                "template has {snapshots} snapshots (their disks lie over its builds'); \
                 delete them first"
            )));
        }
        let builds = builds_of(&mut tx, &t.id).await?;
        sqlx::query("DELETE FROM snapshots WHERE template_id = ?")
            .bind(&t.id)
            .execute(&mut *tx)
            .await?;
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
}

async fn template_in(conn: &mut SqliteConnection, team_id: &str, id: &str) -> Result<Template> {
    sqlx::query_as::<_, Template>("SELECT * FROM templates WHERE id = ? AND team_id = ?")
        .bind(id)
        .bind(team_id)
        .fetch_optional(&mut *conn)
        .await?
        .ok_or_else(|| StoreError::not_found("template", id))
}

/// Refuses a change to a template the team does not own (a system template, which every
/// team sees).
fn owned_by(t: &Template, team_id: &str) -> Result<()> {
    if t.team_id != team_id {
        return Err(StoreError::Conflict(format!(
            "{:?} is a system template: teams cannot rebuild or delete it",
            t.name
        )));
    }
    Ok(())
}

/// A template the team sees (its own, or a system template), by id or else by name. A
/// team's own template wins over a system template's name (which teams cannot take anyway).
pub(super) async fn template_by_id_or_name_in(
    conn: &mut SqliteConnection,
    team_id: &str,
    key: &str,
) -> Result<Template> {
    sqlx::query_as::<_, Template>(
        "SELECT * FROM templates WHERE team_id IN (?, ?) AND (id = ? OR name = ?)
         ORDER BY (id = ?) DESC, (team_id = ?) DESC LIMIT 1",
    )
    .bind(team_id)
    .bind(SYSTEM_TEAM_ID)
    .bind(key)
    .bind(key)
    .bind(key)
    .bind(team_id)
    .fetch_optional(&mut *conn)
    .await?
    .ok_or_else(|| StoreError::not_found("template", key))
}

/// Makes the template's status follow `build` when it is the template's latest build.
///
/// A template with a live artifact stays `ready` through rebuilds, failed ones included
/// (the failure is in `error_message`). A cancelled latest build leaves a template without
/// one `failed`, since there is nothing to start sandboxes from.
pub(super) async fn follow_latest(
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
        // The store never writes a status it does not know.
        BuildStatus::Unknown => return Ok(()),
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
