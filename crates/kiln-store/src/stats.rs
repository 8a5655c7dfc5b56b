//! Aggregates across every team, for the server's `/metrics`.
//!
//! Everything is counted and bucketed in SQL so that a scrape costs a few indexed scans and a
//! fixed amount of memory however many builds and sandboxes the database holds. The numbers
//! come from one read transaction, so they are consistent with each other (WAL gives the
//! transaction a snapshot; writers are not blocked).
//!
//! Nothing here is per team and no id or name is returned: the caller turns this into metric
//! labels, and labels must stay few and must not identify tenants.

use kiln_spec::BuildErrorCode;
use sqlx::Row as _;

use crate::error::StoreError;
use crate::model::{BuildStatus, SandboxStatus};
use crate::store::Store;

type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Upper bounds (seconds) of the build-duration histogram: builds take from seconds (a cached
/// image and no steps) to an hour (a large image and heavy steps).
pub const BUILD_DURATION_BUCKETS_SECS: [f64; 8] =
    [10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0];

/// Observations counted into buckets, in Prometheus' cumulative shape.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct DurationHistogram {
    /// `(upper bound in seconds, observations <= bound)`, bounds ascending. The `+Inf`
    /// bucket is [`DurationHistogram::count`].
    pub buckets: Vec<(f64, u64)>,
    /// Sum of every observation, in seconds.
    pub sum_secs: f64,
    /// Number of observations.
    pub count: u64,
}

/// A snapshot of the store's contents, across all teams.
///
/// Every status and error code is listed, with 0 when nothing has it: a series that vanishes
/// when its count drops to zero reads as "no data", not as zero, on a dashboard.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct StoreStats {
    /// Builds by status, in [`BuildStatus::ALL`] order.
    pub builds_by_status: Vec<(BuildStatus, u64)>,
    /// Failed builds by the code their `error_message` starts with, in
    /// [`BuildErrorCode::ALL`] order. Messages without a known code count as `build_failed`,
    /// as [`kiln_spec::CodedMessage::parse`] reads them.
    pub build_failures_by_code: Vec<(BuildErrorCode, u64)>,
    /// `finalized_at - started_at` of every build that started and ended, bucketed by
    /// [`BUILD_DURATION_BUCKETS_SECS`]. Builds cancelled or interrupted before a builder
    /// picked them up never ran and are left out.
    pub build_durations: DurationHistogram,
    /// Sandboxes by status, in [`SandboxStatus::ALL`] order (deleted rows are kept, so
    /// `deleted` only grows).
    pub sandboxes_by_status: Vec<(SandboxStatus, u64)>,
    /// Sandboxes whose status [`SandboxStatus::is_live`].
    pub live_sandboxes: u64,
    /// Templates.
    pub templates: u64,
}

fn count(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

impl Store {
    /// Counts builds, failures, build durations, sandboxes and templates across all teams.
    pub async fn stats(&self) -> Result<StoreStats> {
        // A deferred BEGIN on SQLite: a read snapshot, no write lock.
        let mut tx = self.pool.begin().await?;

        let rows: Vec<(BuildStatus, i64)> =
            sqlx::query_as("SELECT status, COUNT(*) FROM builds GROUP BY status")
                .fetch_all(&mut *tx)
                .await?;
        let builds_by_status = BuildStatus::ALL
            .iter()
            .map(|s| {
                let n = rows.iter().find(|(r, _)| r == s).map_or(0, |(_, n)| *n);
                (*s, count(n))
            })
            .collect();

        // Mapping unknown prefixes to `build_failed` inside SQL keeps the number of groups
        // bounded by the number of codes, even if free-form messages ever get stored.
        let codes = vec!["?"; BuildErrorCode::ALL.len()].join(", ");
        let sql = format!(
            "SELECT CASE WHEN head IN ({codes}) THEN head ELSE ? END AS code, COUNT(*)
             FROM (SELECT CASE WHEN instr(error_message, ':') > 0
                               THEN substr(error_message, 1, instr(error_message, ':') - 1)
                               ELSE error_message END AS head
                   FROM builds WHERE status = 'failed')
             GROUP BY code"
        );
        let mut q = sqlx::query_as::<_, (String, i64)>(&sql);
        for code in BuildErrorCode::ALL {
            q = q.bind(code.as_str());
        }
        let rows = q
            .bind(BuildErrorCode::BuildFailed.as_str())
            .fetch_all(&mut *tx)
            .await?;
        let build_failures_by_code = BuildErrorCode::ALL
            .iter()
            .map(|c| {
                let n = rows
                    .iter()
                    .filter(|(code, _)| code == c.as_str())
                    .map(|(_, n)| *n)
                    .sum();
                (*c, count(n))
            })
            .collect();

        let build_durations = build_durations(&mut tx).await?;

        let rows: Vec<(SandboxStatus, i64)> =
            sqlx::query_as("SELECT status, COUNT(*) FROM sandboxes GROUP BY status")
                .fetch_all(&mut *tx)
                .await?;
        let sandboxes_by_status: Vec<(SandboxStatus, u64)> = SandboxStatus::ALL
            .iter()
            .map(|s| {
                let n = rows.iter().find(|(r, _)| r == s).map_or(0, |(_, n)| *n);
                (*s, count(n))
            })
            .collect();
        let live_sandboxes = sandboxes_by_status
            .iter()
            .filter(|(s, _)| s.is_live())
            .map(|(_, n)| n)
            .sum();

        let templates: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM templates")
            .fetch_one(&mut *tx)
            .await?;

        tx.commit().await?;
        Ok(StoreStats {
            builds_by_status,
            build_failures_by_code,
            build_durations,
            sandboxes_by_status,
            live_sandboxes,
            templates: count(templates),
        })
    }
}

/// Buckets build durations in one pass over the finished builds.
///
/// Timestamps are stored as RFC 3339 text, which SQLite's `julianday` reads (offset
/// included); a negative difference (a clock stepped back) counts as 0.
async fn build_durations(conn: &mut sqlx::SqliteConnection) -> Result<DurationHistogram> {
    let le: String = BUILD_DURATION_BUCKETS_SECS
        .iter()
        .map(|_| ", COALESCE(SUM(d <= ?), 0)")
        .collect();
    let sql = format!(
        "SELECT COUNT(*), TOTAL(d){le}
         FROM (SELECT MAX(0.0, (julianday(finalized_at) - julianday(started_at)) * 86400.0) AS d
               FROM builds WHERE started_at IS NOT NULL AND finalized_at IS NOT NULL)"
    );
    let mut q = sqlx::query(&sql);
    for bound in BUILD_DURATION_BUCKETS_SECS {
        q = q.bind(bound);
    }
    let row = q.fetch_one(&mut *conn).await?;
    let mut buckets = Vec::with_capacity(BUILD_DURATION_BUCKETS_SECS.len());
    for (i, bound) in BUILD_DURATION_BUCKETS_SECS.iter().enumerate() {
        buckets.push((*bound, count(row.try_get::<i64, _>(i + 2)?)));
    }
    Ok(DurationHistogram {
        buckets,
        sum_secs: row.try_get::<f64, _>(1)?,
        count: count(row.try_get::<i64, _>(0)?),
    })
}

#[cfg(test)]
mod tests {
    use kiln_spec::{CodedMessage, Form, TemplateRequest};

    use super::*;
    use crate::model::{BuiltArtifact, Limits, NewSandbox};

    fn request(name: &str) -> TemplateRequest {
        let doc = serde_json::json!({
            "name": name,
            "build_spec": {"from": "debian:12", "steps": [{"run": "true"}]}
        });
        TemplateRequest::from_json(&doc, Form::Wire).expect("valid request")
    }

    fn get<K: PartialEq + Copy>(v: &[(K, u64)], k: K) -> u64 {
        v.iter().find(|(x, _)| *x == k).map(|(_, n)| *n).unwrap()
    }

    #[tokio::test]
    async fn empty_store_lists_every_status_and_code_at_zero() {
        let store = Store::open_in_memory().await.unwrap();
        let s = store.stats().await.unwrap();
        assert_eq!(s.builds_by_status.len(), BuildStatus::ALL.len());
        assert_eq!(s.build_failures_by_code.len(), BuildErrorCode::ALL.len());
        assert_eq!(s.sandboxes_by_status.len(), SandboxStatus::ALL.len());
        assert!(s.builds_by_status.iter().all(|(_, n)| *n == 0));
        assert!(s.build_failures_by_code.iter().all(|(_, n)| *n == 0));
        assert!(s.sandboxes_by_status.iter().all(|(_, n)| *n == 0));
        assert_eq!(s.build_durations.count, 0);
        assert_eq!(s.build_durations.sum_secs, 0.0);
        assert_eq!(
            s.build_durations.buckets,
            BUILD_DURATION_BUCKETS_SECS
                .iter()
                .map(|b| (*b, 0))
                .collect::<Vec<_>>()
        );
        assert_eq!((s.live_sandboxes, s.templates), (0, 0));
    }

    #[tokio::test]
    async fn counts_across_teams() {
        let store = Store::open_in_memory().await.unwrap();
        let a = store.create_team("a").await.unwrap();
        let b = store.create_team("b").await.unwrap();
        let unlimited = Limits::UNLIMITED;

        // Team a: a ready build that took 45 s, with three sandboxes.
        let (_, ready) = store
            .create_template_with_build(&a.id, &request("web"), &unlimited)
            .await
            .unwrap();
        store.start_build(&ready.id).await.unwrap();
        store
            .finish_build(&ready.id, Ok(BuiltArtifact { size_bytes: 1 }))
            .await
            .unwrap();
        // Team b: a step failure (400 s), a free-form failure (~0 s), a build cancelled
        // before it started, and one still building.
        let (_, step) = store
            .create_template_with_build(&b.id, &request("step"), &unlimited)
            .await
            .unwrap();
        store.start_build(&step.id).await.unwrap();
        store
            .finish_build(
                &step.id,
                Err(CodedMessage::new(BuildErrorCode::StepFailed, "exit 1")),
            )
            .await
            .unwrap();
        let (_, odd) = store
            .create_template_with_build(&b.id, &request("odd"), &unlimited)
            .await
            .unwrap();
        store.start_build(&odd.id).await.unwrap();
        store
            .finish_build(
                &odd.id,
                Err(CodedMessage::new(BuildErrorCode::BootFailed, "")),
            )
            .await
            .unwrap();
        sqlx::query("UPDATE builds SET error_message = 'kaboom: x' WHERE id = ?")
            .bind(&odd.id)
            .execute(&store.pool)
            .await
            .unwrap();
        let (_, cancelled) = store
            .create_template_with_build(&b.id, &request("gone"), &unlimited)
            .await
            .unwrap();
        store.cancel_build(&b.id, &cancelled.id).await.unwrap();
        let (_, running) = store
            .create_template_with_build(&b.id, &request("slow"), &unlimited)
            .await
            .unwrap();
        store.start_build(&running.id).await.unwrap();

        for (id, secs) in [(&ready.id, 45), (&step.id, 400)] {
            sqlx::query("UPDATE builds SET started_at = ?, finalized_at = ? WHERE id = ?")
                .bind(chrono::Utc::now() - chrono::TimeDelta::seconds(secs))
                .bind(chrono::Utc::now())
                .bind(id)
                .execute(&store.pool)
                .await
                .unwrap();
        }

        let new = NewSandbox {
            template: "web".into(),
            ..Default::default()
        };
        let mut sandboxes = Vec::new();
        for _ in 0..3 {
            sandboxes.push(
                store
                    .create_sandbox(&a.id, &new, &unlimited)
                    .await
                    .unwrap()
                    .0,
            );
        }
        store
            .set_sandbox_status(&a.id, &sandboxes[0].id, SandboxStatus::Active)
            .await
            .unwrap();
        store
            .set_sandbox_status(&a.id, &sandboxes[1].id, SandboxStatus::Failed)
            .await
            .unwrap();

        let s = store.stats().await.unwrap();
        let by = &s.builds_by_status;
        assert_eq!(get(by, BuildStatus::Ready), 1);
        assert_eq!(get(by, BuildStatus::Failed), 2);
        assert_eq!(get(by, BuildStatus::Cancelled), 1);
        assert_eq!(get(by, BuildStatus::Building), 1);
        assert_eq!(get(by, BuildStatus::Pending), 0);

        let f = &s.build_failures_by_code;
        assert_eq!(get(f, BuildErrorCode::StepFailed), 1);
        assert_eq!(get(f, BuildErrorCode::BuildFailed), 1, "unknown prefix");
        assert_eq!(get(f, BuildErrorCode::BootFailed), 0, "overwritten");
        assert_eq!(f.iter().map(|(_, n)| n).sum::<u64>(), 2);

        // ready (45 s), step (400 s), odd (~0 s); the cancelled and the running build
        // never finished a run.
        let d = &s.build_durations;
        assert_eq!(d.count, 3);
        assert!((d.sum_secs - 445.0).abs() < 1.0, "{}", d.sum_secs);
        let le = |bound: f64| d.buckets.iter().find(|(b, _)| *b == bound).unwrap().1;
        assert_eq!(le(10.0), 1);
        assert_eq!(le(30.0), 1);
        assert_eq!(le(60.0), 2);
        assert_eq!(le(300.0), 2);
        assert_eq!(le(600.0), 3);
        assert_eq!(le(3600.0), 3);

        let sb = &s.sandboxes_by_status;
        assert_eq!(get(sb, SandboxStatus::Starting), 1);
        assert_eq!(get(sb, SandboxStatus::Active), 1);
        assert_eq!(get(sb, SandboxStatus::Failed), 1);
        assert_eq!(s.live_sandboxes, 2);
        assert_eq!(s.templates, 5);
    }
}
