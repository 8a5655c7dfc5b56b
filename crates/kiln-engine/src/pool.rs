//! The restore pool: QEMU processes started ahead of time, each waiting for the snapshot
//! of one template build (QEMU's `-incoming defer`, see [`Hypervisor::prepare_restore`]).
//!
//! Starting QEMU (exec, machine and device set-up, the monitor socket) and creating the
//! disk overlay is most of what a restore costs before the guest's own work. None of it
//! depends on the sandbox, so a sandbox created from a build with a waiting process only
//! pays for loading device state, resuming and reaching the agent. A pool is per build:
//! a QEMU's command line names the bundle's memory file, disk and kernel.
//!
//! Policy: after every restore of a build, the pool is topped up to `size` processes for
//! it in the background (so the first sandbox of a build pays the full price, the
//! following ones do not). Processes idle for longer than `idle` are stopped, and so are
//! those of a template's other builds once one of its builds is claimed, and all of a
//! template's when it is deleted. A pooled VM's egress proxy starts with no files and is
//! pointed at the claiming sandbox's ([`kiln_vm::PendingRestore::assign_egress`]).

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use kiln_vm::{Hypervisor, PendingRestore, RestoreConfig};

/// How often idle processes are looked for.
const SWEEP_EVERY: Duration = Duration::from_secs(30);
/// A refill waits this long before starting processes: right after a claim the new
/// sandbox's guest is doing its first work (under TCG, translating code on a cold
/// cache), and a burst of creates should not also compete with QEMU start-ups.
const REFILL_DELAY: Duration = Duration::from_millis(500);

#[derive(Debug)]
struct Slot {
    incoming: Box<dyn PendingRestore>,
    template_id: String,
    since: Instant,
}

#[derive(Debug, Default)]
struct Slots {
    /// Waiting processes by build id.
    ready: HashMap<String, Vec<Slot>>,
    /// Launches in flight by build id, with their template.
    starting: HashMap<String, (String, usize)>,
    /// Deleted templates: a launch for one that completes late is stopped at once.
    deleted: HashSet<String>,
    /// Set by [`RestorePool::close`]: nothing is started or kept any more.
    closed: bool,
}

#[derive(Debug)]
struct Inner {
    size: usize,
    idle: Duration,
    slots: Mutex<Slots>,
    claimed: AtomicU64,
    /// Woken whenever a launch ends, so a delete can wait for its template's launches.
    landed: tokio::sync::Notify,
}

/// What the pool holds and has handed out, for `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Processes waiting now, over all builds.
    pub waiting: usize,
    /// Sandboxes that got a waiting process, since start.
    pub claimed: u64,
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, Slots> {
        self.slots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Takes out the waiting processes `pred(build id, slot)` picks. The caller drops
    /// them (a signal and a directory removal each) after the lock is released.
    fn remove_where(&self, pred: impl Fn(&str, &Slot) -> bool) -> Vec<Slot> {
        let mut g = self.lock();
        let mut gone = Vec::new();
        for (build, v) in g.ready.iter_mut() {
            let (out, keep): (Vec<Slot>, Vec<Slot>) = v.drain(..).partition(|s| pred(build, s));
            *v = keep;
            gone.extend(out);
        }
        g.ready.retain(|_, v| !v.is_empty());
        gone
    }
}

/// See the module docs. Dropping the pool stops every waiting process.
#[derive(Debug)]
pub(crate) struct RestorePool {
    inner: Arc<Inner>,
}

impl RestorePool {
    /// A pool of `size` processes per build in use (0: no pool). Must be created inside
    /// a tokio runtime when `size > 0` (the idle sweeper is a task).
    pub(crate) fn new(size: usize, idle: Duration) -> Self {
        let inner = Arc::new(Inner {
            size,
            idle,
            slots: Mutex::new(Slots::default()),
            claimed: AtomicU64::new(0),
            landed: tokio::sync::Notify::new(),
        });
        if size > 0 {
            tokio::spawn(sweep(Arc::downgrade(&inner)));
        }
        Self { inner }
    }

    /// A waiting process for `build_id`, if one is alive. Processes of the template's
    /// other builds are stopped: a claim means this build is the one in use.
    pub(crate) fn take(
        &self,
        template_id: &str,
        build_id: &str,
    ) -> Option<Box<dyn PendingRestore>> {
        if self.inner.size == 0 {
            return None;
        }
        let mut stale = self
            .inner
            .remove_where(|b, s| b != build_id && s.template_id == template_id);
        let found = {
            let mut g = self.inner.lock();
            let mut found = None;
            if let Some(v) = g.ready.get_mut(build_id) {
                while let Some(s) = v.pop() {
                    if s.incoming.is_alive() {
                        found = Some(s.incoming);
                        break;
                    }
                    stale.push(s);
                }
            }
            found
        };
        // Stopping processes (a signal and a directory removal each) outside the lock.
        drop(stale);
        if found.is_some() {
            self.inner.claimed.fetch_add(1, Ordering::Relaxed);
        }
        found
    }

    /// Starts processes in the background until `size` wait (or are starting) for
    /// `build_id`. `cfg`'s egress has no files yet (they are assigned on claim).
    pub(crate) fn refill(
        &self,
        hypervisor: Arc<dyn Hypervisor>,
        template_id: &str,
        build_id: &str,
        bundle: PathBuf,
        cfg: RestoreConfig,
    ) {
        let missing = {
            let mut g = self.inner.lock();
            if g.closed || g.deleted.contains(template_id) {
                return;
            }
            let have = g.ready.get(build_id).map_or(0, Vec::len);
            let (_, starting) = g
                .starting
                .entry(build_id.to_owned())
                .or_insert_with(|| (template_id.to_owned(), 0));
            let missing = self.inner.size.saturating_sub(have + *starting);
            *starting += missing;
            missing
        };
        for _ in 0..missing {
            let inner = Arc::downgrade(&self.inner);
            let (template_id, build_id) = (template_id.to_owned(), build_id.to_owned());
            let (bundle, cfg, hypervisor) = (bundle.clone(), cfg.clone(), hypervisor.clone());
            tokio::spawn(async move {
                tokio::time::sleep(REFILL_DELAY).await;
                let started = hypervisor.prepare_restore(&bundle, &cfg).await;
                let Some(inner) = inner.upgrade() else { return };
                let mut g = inner.lock();
                if let Some((_, n)) = g.starting.get_mut(&build_id) {
                    *n = n.saturating_sub(1);
                    if *n == 0 {
                        g.starting.remove(&build_id);
                    }
                }
                match started {
                    Ok(incoming) if g.closed || g.deleted.contains(&template_id) => {
                        drop(g);
                        drop(incoming);
                    }
                    Ok(incoming) => {
                        tracing::debug!(build = %build_id, "restore pool: process waiting");
                        g.ready.entry(build_id).or_default().push(Slot {
                            incoming,
                            template_id,
                            since: Instant::now(),
                        });
                    }
                    Err(e) => {
                        tracing::warn!(build = %build_id, error = %kiln_vm::error_chain(&e), "restore pool: could not start a process");
                    }
                }
                inner.landed.notify_waiters();
            });
        }
    }

    /// Stops the processes waiting for any build of `template_id` (it was deleted), and
    /// waits (up to `within`) for those still starting for it, which stop as soon as they
    /// are up: when this returns, no VM of the pool uses the template's files.
    pub(crate) async fn forget_template(&self, template_id: &str, within: Duration) {
        if self.inner.size == 0 {
            return;
        }
        self.inner.lock().deleted.insert(template_id.to_owned());
        drop(self.inner.remove_where(|_, s| s.template_id == template_id));
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let landed = self.inner.landed.notified();
            let in_flight = self
                .inner
                .lock()
                .starting
                .values()
                .any(|(t, n)| t == template_id && *n > 0);
            if !in_flight {
                return;
            }
            if tokio::time::timeout_at(deadline, landed).await.is_err() {
                tracing::warn!(template = %template_id, "restore pool: launches still in flight after {within:?}");
                return;
            }
        }
    }

    /// Stops every waiting process (and those still starting, once up) for good: the
    /// server is shutting down, and its VMs' run directories should go with them rather
    /// than be left behind when the process exits.
    pub(crate) fn close(&self) {
        self.inner.lock().closed = true;
        drop(self.inner.remove_where(|_, _| true));
    }

    pub(crate) fn stats(&self) -> PoolStats {
        PoolStats {
            waiting: self.inner.lock().ready.values().map(Vec::len).sum(),
            claimed: self.inner.claimed.load(Ordering::Relaxed),
        }
    }
}

/// Stops processes that idled past the limit or died, until the pool is dropped.
async fn sweep(inner: Weak<Inner>) {
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        let gone =
            inner.remove_where(|_, s| s.since.elapsed() > inner.idle || !s.incoming.is_alive());
        if !gone.is_empty() {
            tracing::debug!(stopped = gone.len(), "restore pool: idle processes stopped");
        }
    }
}
