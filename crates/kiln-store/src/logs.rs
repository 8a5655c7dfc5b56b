//! Wake-ups for build log followers.
//!
//! Lines live in the database (so a reader can resume from any `seq`); this only tells
//! waiting readers that there is something new to read, so an SSE stream does not poll the
//! database. One `watch` channel per build with at least one follower: a watch never
//! queues, so a slow reader costs nothing and simply reads everything new on its next turn.

use std::collections::HashMap;
use std::sync::Mutex;

use tokio::sync::watch;

/// What a follower is told.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LogSignal {
    /// The last `seq` appended since the follower subscribed (0 if none yet).
    pub last_seq: u64,
    /// The build reached a terminal status: once history is drained, stop.
    pub finished: bool,
}

/// The per-build senders.
#[derive(Debug, Default)]
pub(crate) struct LogHub {
    senders: Mutex<HashMap<String, watch::Sender<LogSignal>>>,
}

impl LogHub {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, watch::Sender<LogSignal>>> {
        // A panic while holding this lock cannot leave the map inconsistent.
        self.senders
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(crate) fn subscribe(&self, build_id: &str) -> watch::Receiver<LogSignal> {
        self.lock()
            .entry(build_id.to_owned())
            .or_insert_with(|| watch::channel(LogSignal::default()).0)
            .subscribe()
    }

    /// New lines up to `seq`. Builds nobody follows cost nothing.
    pub(crate) fn notify(&self, build_id: &str, seq: u64) {
        let mut map = self.lock();
        if let Some(tx) = map.get(build_id) {
            if tx.receiver_count() == 0 {
                map.remove(build_id);
            } else {
                tx.send_modify(|s| s.last_seq = s.last_seq.max(seq));
            }
        }
    }

    /// The build is over: wake every follower for the last time and drop the sender.
    pub(crate) fn finish(&self, build_id: &str) {
        if let Some(tx) = self.lock().remove(build_id) {
            tx.send_modify(|s| s.finished = true);
        }
    }
}

/// Reads one build's log from a cursor: the stored history first, then lines as they are
/// appended, until the build ends. This is the loop behind an SSE log stream with
/// `Last-Event-ID` resume; it waits on the build's notifier instead of polling.
#[derive(Debug)]
pub struct LogFollower {
    store: crate::Store,
    build_id: String,
    after: u64,
    rx: watch::Receiver<LogSignal>,
    closed: bool,
    done: bool,
}

impl LogFollower {
    pub(crate) fn new(
        store: crate::Store,
        build_id: String,
        after: u64,
        rx: watch::Receiver<LogSignal>,
    ) -> Self {
        Self {
            store,
            build_id,
            after,
            rx,
            closed: false,
            done: false,
        }
    }

    /// The next lines (never empty), or `None` once the build has ended and every line
    /// was returned.
    pub async fn next_batch(&mut self) -> Result<Option<Vec<crate::LogLine>>, crate::StoreError> {
        loop {
            if self.done {
                return Ok(None);
            }
            // Read the flag before the lines: a line appended before `finished` was set is
            // then guaranteed to be in this read.
            let finished = self.closed || self.rx.borrow_and_update().finished;
            let lines = self.store.logs_since(&self.build_id, self.after).await?;
            if let Some(last) = lines.last() {
                self.after = last.seq;
            }
            // A full page may have more behind it.
            let full = lines.len() == crate::LOG_PAGE;
            self.done = finished && !full;
            if !lines.is_empty() {
                return Ok(Some(lines));
            }
            if self.done {
                return Ok(None);
            }
            if self.rx.changed().await.is_err() {
                // The sender is dropped only after the build ended.
                self.closed = true;
            }
        }
    }

    /// The `seq` of the last line returned (the resume cursor).
    pub fn cursor(&self) -> u64 {
        self.after
    }
}
