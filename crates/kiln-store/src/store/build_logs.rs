//! A build's log lines: appending, reading from a `seq`, and following live.
//!
//! (Named after its table, `build_logs`; the wake-ups for followers are in `crate::logs`.)
//!
//! Invariants: `seq` runs 1, 2, 3... per build with no gap or repeat, because a batch is
//! numbered and inserted in one write transaction; followers are woken only after the
//! commit, and told `finished` once the build is terminal, so a follower never waits on a
//! build that has ended.

use sqlx::{QueryBuilder, Sqlite};
use tokio::sync::watch;

use super::{to_i64, Result, Store};
use crate::error::StoreError;
use crate::logs::{LogFollower, LogSignal};
use crate::model::{LogLine, NewLogLine};

/// Lines per INSERT when appending logs, far below SQLite's bound-parameter limit.
const LOG_BATCH: usize = 500;
/// Most lines one [`Store::logs_since`] returns: a reader of a long log holds a page at
/// a time, not the whole log.
pub const LOG_PAGE: usize = 1000;

impl Store {
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

    /// The first [`LOG_PAGE`] of a build's lines with `seq > after_seq`, in order
    /// (`after_seq = 0` from the start); read again after the last `seq` for the next page.
    pub async fn logs_since(&self, build_id: &str, after_seq: u64) -> Result<Vec<LogLine>> {
        Ok(sqlx::query_as::<_, LogLine>(
            "SELECT * FROM build_logs WHERE build_id = ? AND seq > ? ORDER BY seq LIMIT ?",
        )
        .bind(build_id)
        .bind(to_i64(after_seq))
        .bind(LOG_PAGE as i64)
        .fetch_all(&self.pool)
        .await?)
    }

    /// A receiver that changes whenever lines are appended to the build or it finishes.
    ///
    /// Subscribe *before* reading history, then loop: read [`Store::logs_since`] the last
    /// seq seen, stop once the signal says `finished` (or the receiver errors) and the read
    /// returned less than a page, else wait on `changed()` (after a short page). No line is missed: an append after the
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
}
