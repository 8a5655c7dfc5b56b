//! Build logs as their readers see them: the stored history, then lines as they are
//! written, and a last event saying how the build ended. The server streams this as
//! Server-Sent Events; the CLI prints it.

use std::time::Duration;

use futures::Stream;
use kiln_api::{BuildLogEvent, BuildStatus};
use tokio::sync::mpsc;

use crate::error::Result;
use crate::{wire, Engine};

/// How often a queued build's log stream says it is still waiting.
const QUEUED_HEARTBEAT: Duration = Duration::from_secs(2);
/// Events buffered for a slow reader before the follower waits for it.
const BUFFER: usize = 64;

impl Engine {
    /// A build's log so far, oldest first (the team's builds only), read a page at a time
    /// (its size is bounded by the per-build cap, `KILN_BUILD_LOG_MAX_BYTES`).
    pub async fn build_log(&self, team_id: &str, build_id: &str) -> Result<Vec<BuildLogEvent>> {
        let b = self.store.build_by_id(team_id, build_id).await?;
        let mut out = Vec::new();
        let mut after = 0;
        loop {
            let page = self.store.logs_since(&b.id, after).await?;
            out.extend(page.iter().map(wire::log_line));
            match page.last() {
                Some(last) if page.len() == kiln_store::LOG_PAGE => after = last.seq,
                _ => return Ok(out),
            }
        }
    }

    /// A build's log from its first line until the build ends: the stored history, then
    /// lines as they are written; while the build waits for a builder, a `system` line
    /// says so every two seconds; the last event has `finished` and the build's status.
    /// The stream ends early when the reader drops it.
    pub async fn follow_build_log(
        &self,
        team_id: &str,
        build_id: &str,
    ) -> Result<impl Stream<Item = BuildLogEvent> + Send + 'static> {
        let b = self.store.build_by_id(team_id, build_id).await?;
        let mut follower = self.store.follow_logs(&b.id, 0).await?;
        let store = self.store.clone();
        let (tx, rx) = mpsc::channel(BUFFER);
        let build_id = b.id;
        tokio::spawn(async move {
            let mut heartbeat = tokio::time::interval(QUEUED_HEARTBEAT);
            heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    batch = follower.next_batch() => match batch {
                        Ok(Some(lines)) => {
                            for l in &lines {
                                if tx.send(wire::log_line(l)).await.is_err() {
                                    return;
                                }
                            }
                        }
                        Ok(None) => break,
                        Err(e) => {
                            tracing::warn!(build = %build_id, error = %e, "reading build logs");
                            break;
                        }
                    },
                    _ = heartbeat.tick() => {
                        let queued = store
                            .get_build(&build_id)
                            .await
                            .is_ok_and(|b| b.status == BuildStatus::Pending);
                        let line = BuildLogEvent::system("build queued, waiting for dispatch");
                        if queued && tx.send(line).await.is_err() {
                            return;
                        }
                    }
                }
            }
            // The last event says how it ended (`ready`, `failed` or `cancelled`).
            if let Ok(b) = store.get_build(&build_id).await {
                let last = BuildLogEvent::finished(b.status, b.error_message.as_deref());
                let _ = tx.send(last).await;
            }
        });
        Ok(futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|e| (e, rx))
        }))
    }
}
