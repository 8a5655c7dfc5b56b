//! Child process table and the zombie reaper.
//!
//! As PID 1 the agent must reap every orphan (`waitpid(-1)`), but it must not steal the
//! exit status of a process it spawned itself. So one reaper thread *peeks* at the next
//! zombie with `waitid(WNOWAIT)`, and only reaps it once it knows whom it belongs to:
//! a registered exec (its status goes to that exec's waiter), a background process (the
//! status is kept for `wait_pid`), or an orphan (discarded). While a spawn is in flight
//! the pid is not known yet, so the reaper waits for the spawn to finish first (std's
//! `Command::spawn` itself waits for a child whose `exec` failed).

use std::collections::{HashMap, VecDeque};
use std::process::{Child, Command};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kiln_agent_proto::ExitStatus;

/// How many exit statuses of background processes are remembered.
const EXITED_CAP: usize = 4096;

#[derive(Debug)]
enum Waiter {
    Foreground(mpsc::Sender<ExitStatus>),
    Background,
}

#[derive(Debug, Default)]
struct State {
    spawning: usize,
    running: HashMap<i32, Waiter>,
    exited: HashMap<i32, ExitStatus>,
    exited_order: VecDeque<i32>,
}

/// Shared process table.
#[derive(Debug, Default)]
pub struct Procs {
    state: Mutex<State>,
    cv: Condvar,
}

impl Procs {
    pub fn new() -> Arc<Self> {
        let p = Arc::new(Self::default());
        let r = p.clone();
        std::thread::Builder::new()
            .name("reaper".into())
            .spawn(move || r.reaper())
            .expect("spawn reaper thread");
        p
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Spawn a foreground process; its exit status arrives on the returned receiver.
    pub fn spawn_foreground(
        &self,
        cmd: &mut Command,
    ) -> std::io::Result<(Child, mpsc::Receiver<ExitStatus>)> {
        let (tx, rx) = mpsc::channel();
        let child = self.spawn(cmd, Waiter::Foreground(tx))?;
        Ok((child, rx))
    }

    /// Spawn a background process; its exit status is kept for [`Procs::wait_pid`].
    pub fn spawn_background(&self, cmd: &mut Command) -> std::io::Result<Child> {
        self.spawn(cmd, Waiter::Background)
    }

    fn spawn(&self, cmd: &mut Command, w: Waiter) -> std::io::Result<Child> {
        self.lock().spawning += 1;
        let res = cmd.spawn();
        let mut st = self.lock();
        st.spawning -= 1;
        if let Ok(child) = &res {
            let pid = child.id() as i32;
            st.exited.remove(&pid);
            st.running.insert(pid, w);
        }
        drop(st);
        self.cv.notify_all();
        res
    }

    /// Pids of running processes the agent started (for signal forwarding).
    pub fn running_pids(&self) -> Vec<i32> {
        self.lock().running.keys().copied().collect()
    }

    /// Status of `pid`, waiting up to `timeout` for a process of ours to exit.
    /// Returns `None` if the pid is unknown to the agent and does not exist.
    pub fn wait_pid(&self, pid: i32, timeout: Duration) -> Option<(bool, Option<ExitStatus>)> {
        let deadline = Instant::now() + timeout;
        let mut st = self.lock();
        loop {
            if let Some(e) = st.exited.get(&pid) {
                return Some((false, Some(*e)));
            }
            if !st.running.contains_key(&pid) {
                // Not ours (or reaped by its own exec): ask the kernel.
                // SAFETY: kill with signal 0 only checks for existence.
                let alive = unsafe { libc::kill(pid, 0) } == 0
                    || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
                return alive.then_some((true, None));
            }
            let now = Instant::now();
            if now >= deadline {
                return Some((true, None));
            }
            st = self
                .cv
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn reaper(&self) {
        loop {
            // SAFETY: zeroed siginfo_t is a valid out-parameter for waitid.
            let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
            // SAFETY: valid pointer; WNOWAIT leaves the zombie in place.
            let r =
                unsafe { libc::waitid(libc::P_ALL, 0, &mut info, libc::WEXITED | libc::WNOWAIT) };
            if r < 0 {
                let err = std::io::Error::last_os_error();
                if err.raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                // ECHILD: nothing to wait for until the next spawn.
                let st = self.lock();
                let _ = self.cv.wait_timeout(st, Duration::from_millis(200));
                continue;
            }
            // SAFETY: waitid filled a SIGCHLD siginfo.
            let pid = unsafe { info.si_pid() };
            if pid <= 0 {
                continue;
            }
            let mut st = self.lock();
            if !st.running.contains_key(&pid) && st.spawning > 0 {
                // Possibly the child of a spawn in flight: let the spawn finish.
                drop(st);
                std::thread::sleep(Duration::from_millis(2));
                continue;
            }
            let mut status = 0;
            // SAFETY: reaping a zombie we just observed.
            let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
            if r != pid {
                continue;
            }
            let es = decode_status(status);
            match st.running.remove(&pid) {
                Some(w) => {
                    if let Waiter::Foreground(tx) = w {
                        let _ = tx.send(es);
                    }
                    // Remembered for foreground execs too: a host that reconnected after
                    // losing an exec's stream can still ask how it ended.
                    st.exited.insert(pid, es);
                    st.exited_order.push_back(pid);
                    while st.exited_order.len() > EXITED_CAP {
                        if let Some(old) = st.exited_order.pop_front() {
                            st.exited.remove(&old);
                        }
                    }
                }
                None => tracing::debug!(pid, ?es, "reaped orphan"),
            }
            drop(st);
            self.cv.notify_all();
        }
    }
}

pub fn decode_status(status: i32) -> ExitStatus {
    if libc::WIFEXITED(status) {
        ExitStatus {
            code: Some(libc::WEXITSTATUS(status)),
            signal: None,
            timed_out: false,
        }
    } else if libc::WIFSIGNALED(status) {
        ExitStatus {
            code: None,
            signal: Some(libc::WTERMSIG(status)),
            timed_out: false,
        }
    } else {
        ExitStatus::default()
    }
}
