//! Auto-pause and auto-delete: one task that sleeps until the earliest stored deadline
//! (or until a deadline may have changed) and pauses or deletes what is due.
//!
//! The deadlines are the store's (`pause_at` while a sandbox is active with a timeout,
//! `delete_at` while it is paused with an auto-delete window, set in the same write as the
//! status), so they survive a restart: a server that starts again deletes a paused sandbox
//! whose window ran out while it was down. Each action takes the sandbox's op lock and
//! looks at the sandbox again under it, so a resume, a pause, a kill or a PATCH of the
//! timers that came first wins over a deadline read a moment earlier.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use kiln_api::SandboxStatus;

use crate::error::Result;
use crate::Engine;

/// After a failed action, when the timer tries again.
const RETRY: Duration = Duration::from_secs(5);

impl Engine {
    /// Runs the timers for as long as the engine lives (`kiln serve` spawns it).
    pub async fn run_timers(self: Arc<Self>) {
        loop {
            // Registered before the deadlines are read, so that no change is missed.
            let changed = self.timers.notified();
            let next = match self.fire_due_timers(kiln_store::now()).await {
                Ok(next) => next,
                Err(e) => {
                    tracing::warn!(error = %e.chain(), "reading the sandbox timers failed");
                    Some(kiln_store::now() + RETRY)
                }
            };
            match next {
                Some(at) => {
                    let wait = (at - kiln_store::now()).to_std().unwrap_or_default();
                    tokio::select! {
                        () = tokio::time::sleep(wait) => {}
                        () = changed => {}
                    }
                }
                None => changed.await,
            }
        }
    }

    /// Pauses the sandboxes whose timeout passed at `now` and deletes those paused past
    /// their window; returns the next deadline still ahead (or soon, after a failure).
    pub(crate) async fn fire_due_timers(
        &self,
        now: DateTime<Utc>,
    ) -> Result<Option<DateTime<Utc>>> {
        let mut next: Option<DateTime<Utc>> = None;
        let mut soon = |at: DateTime<Utc>| next = Some(next.map_or(at, |n| n.min(at)));
        for s in self.store.sandboxes_with_deadlines().await? {
            let (due, action) = match (s.status, s.pause_at, s.delete_at) {
                // A sandbox another process runs is that process's to pause.
                (SandboxStatus::Active, Some(at), _) if self.live.running(&s.id).is_some() => {
                    (at, Action::Pause)
                }
                (SandboxStatus::Paused, _, Some(at)) => (at, Action::Delete),
                _ => continue,
            };
            if due > now {
                soon(due);
                continue;
            }
            let done = match action {
                Action::Pause => self.auto_pause(&s.team_id, &s.id, now).await,
                Action::Delete => self.auto_delete(&s.team_id, &s.id, now).await,
            };
            if let Err(e) = done {
                tracing::warn!(sandbox = %s.id, ?action, error = %e.chain(), "timer action failed");
                soon(now + RETRY);
            }
        }
        Ok(next)
    }
}

#[derive(Debug, Clone, Copy)]
enum Action {
    Pause,
    Delete,
}
