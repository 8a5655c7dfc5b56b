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
use nix::errno::Errno;
use nix::unistd::Pid;
use rustix::process::{WaitOptions, WaitStatus};

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
                let alive = matches!(
                    nix::sys::signal::kill(Pid::from_raw(pid), None),
                    Ok(()) | Err(Errno::EPERM)
                );
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
            let pid = match peek_zombie() {
                Ok(pid) => pid,
                Err(Errno::EINTR) => continue,
                Err(_) => {
                    // ECHILD: nothing to wait for until the next spawn.
                    let st = self.lock();
                    let _ = self.cv.wait_timeout(st, Duration::from_millis(200));
                    continue;
                }
            };
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
            // The raw status keeps a death by a realtime signal (nix's would not).
            let reaped = rustix::process::Pid::from_raw(pid)
                .and_then(|p| rustix::process::waitpid(Some(p), WaitOptions::NOHANG).ok()?);
            let Some((_, status)) = reaped else {
                continue;
            };
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

/// The pid of the next child that exited, left unreaped (`waitid(P_ALL, WEXITED |
/// WNOWAIT)`); 0 if there was none.
///
/// Neither crate fits: nix decodes the status too and fails with `EINVAL` for a child
/// killed by a realtime signal, and as WNOWAIT leaves that zombie in place the reaper
/// would see it (and that error) forever; rustix's result does not carry the pid.
fn peek_zombie() -> Result<i32, Errno> {
    // SAFETY: an all-zero `siginfo_t` is a valid value (plain integers and a union of
    // them); it stays zero (pid 0) if no child is waitable.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: `info` is a live, writable `siginfo_t` for the call; WNOWAIT leaves the
    // zombie in place.
    let r = unsafe { libc::waitid(libc::P_ALL, 0, &mut info, libc::WEXITED | libc::WNOWAIT) };
    Errno::result(r)?;
    // SAFETY: `waitid` succeeded, so `info` is zero or a SIGCHLD siginfo, whose union
    // holds the child fields `si_pid` reads.
    Ok(unsafe { info.si_pid() })
}

pub fn decode_status(status: WaitStatus) -> ExitStatus {
    if let Some(code) = status.exit_status() {
        ExitStatus {
            code: Some(code),
            signal: None,
            timed_out: false,
        }
    } else if let Some(signal) = status.terminating_signal() {
        ExitStatus {
            code: None,
            signal: Some(signal),
            timed_out: false,
        }
    } else {
        ExitStatus::default()
    }
}

/// kill(2) with a raw signal number: the host may send any signal up to 64, realtime
/// ones included, which neither nix's `Signal` nor rustix's named signals can express.
pub fn kill(target: i32, signal: i32) -> std::io::Result<()> {
    // SAFETY: kill(2) takes two plain integers and touches no memory of ours; an invalid
    // signal number is refused by the kernel with EINVAL.
    if unsafe { libc::kill(target, signal) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
