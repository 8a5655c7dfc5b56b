//! exec: `/bin/sh -c` with env, cwd, user, streamed stdin/stdout/stderr, timeout,
//! signals, and detached background processes; or, with `pty`, on a pseudo-terminal of its
//! own (raw bytes both ways, resizable).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use kiln_agent_proto::frame::{channel, DATA_CHUNK};
use kiln_agent_proto::{AgentMsg, ErrorCode, ExecRequest, ExitStatus, PidStatus, PtySize};
use nix::errno::Errno;
use nix::sys::signal::{killpg, signal, SigHandler, SigSet, Signal};
use nix::unistd::{getuid, setgid, setgroups, setsid, setuid, Gid, Pid, Uid};

use crate::server::{io_code, spawn_worker, Ctx, Entry, Input};
use crate::users::{self, ResolvedUser};

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// `TERM` of a terminal exec that does not set one: what xterm.js and most terminal
/// emulators a user sits at understand.
const DEFAULT_TERM: &str = "xterm-256color";

/// What a terminal's input end-of-file becomes: the VEOF character, which a program
/// reading the terminal at the start of a line sees as end-of-file.
const TERMINAL_EOF: u8 = 0x04;

/// After the process exits, how long to keep reading its stdout/stderr: a daemon it left
/// behind may hold the pipes open forever, and the exec must still finish.
const OUTPUT_GRACE: Duration = Duration::from_millis(1000);

/// The effective user, environment and working directory of one exec.
type Prepared = (ResolvedUser, BTreeMap<String, String>, String);

/// Resolve the effective user, env and cwd of a request against the runtime defaults.
pub fn prepare(ctx: &Ctx, req: &ExecRequest) -> Result<Prepared, (ErrorCode, String)> {
    let defaults = ctx.agent.defaults();
    let user = match req.user.as_deref().or(defaults.user.as_deref()) {
        None => ResolvedUser::root(),
        Some(spec) => users::resolve(spec, &ctx.agent.root)
            .map_err(|e| (ErrorCode::UserNotFound, format!("{e:#}")))?,
    };
    let mut env = BTreeMap::new();
    env.insert("PATH".to_owned(), DEFAULT_PATH.to_owned());
    env.insert("HOME".to_owned(), user.home.clone());
    env.insert("USER".to_owned(), user.name.clone());
    env.insert("LOGNAME".to_owned(), user.name.clone());
    env.extend(crate::net::proxy_env());
    env.extend(defaults.env.clone());
    env.extend(req.env.clone());
    let cwd = req
        .cwd
        .clone()
        .or(defaults.cwd.clone())
        .unwrap_or_else(|| "/".to_owned());
    Ok((user, env, cwd))
}

/// A `/bin/sh -c` command in its own session, as `user`; with `ctty`, its stdin (a
/// terminal) becomes the session's controlling terminal.
fn command(
    req: &ExecRequest,
    user: &ResolvedUser,
    env: &BTreeMap<String, String>,
    cwd: &str,
    ctty: bool,
) -> Command {
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c").arg(&req.command);
    cmd.env_clear().envs(env).current_dir(cwd);
    let (uid, gid) = (Uid::from_raw(user.uid), Gid::from_raw(user.gid));
    let groups: Vec<Gid> = user.groups.iter().copied().map(Gid::from_raw).collect();
    let empty = SigSet::empty();
    // SAFETY: the closure runs in the forked child, where only async-signal-safe calls
    // are allowed: it makes plain syscalls on data allocated before the fork and
    // allocates nothing itself.
    unsafe {
        cmd.pre_exec(move || {
            // PID 1 blocks SIGTERM/SIGINT in every thread so that only its forwarder
            // receives them; a child must not inherit that mask, or it could never be
            // stopped politely.
            let _ = empty.thread_set_mask();
            // Nor the agent's ignored signals: a parent that ignores SIGINT (as a shell
            // does for its background jobs) would make ^C and `signal` useless on the
            // command (found by CI: a test run started with `&` in a script).
            for sig in [
                Signal::SIGINT,
                Signal::SIGQUIT,
                Signal::SIGHUP,
                Signal::SIGTERM,
            ] {
                let _ = signal(sig, SigHandler::SigDfl);
            }
            setsid()?;
            if ctty {
                // std has made the terminal fd 0 already.
                rustix::process::ioctl_tiocsctty(std::io::stdin())?;
            }
            if getuid().is_root() {
                setgroups(&groups)?;
                setgid(gid)?;
                setuid(uid)?;
            } else if uid != getuid() {
                return Err(Errno::EPERM.into());
            }
            Ok(())
        });
    }
    cmd
}

/// Start an exec request. Foreground execs stay registered on the stream.
pub fn start(ctx: Ctx, req: ExecRequest) -> Option<Entry> {
    let (user, env, cwd) = match prepare(&ctx, &req) {
        Ok(x) => x,
        Err((code, msg)) => {
            ctx.error(code, msg);
            return None;
        }
    };
    if !std::path::Path::new(&cwd).is_dir() {
        ctx.error(
            ErrorCode::NotFound,
            format!("working directory {cwd} does not exist"),
        );
        return None;
    }
    let window = ctx.window.clone();
    if let Some(size) = req.pty.filter(|_| req.background.is_none()) {
        let mut env = env;
        env.entry("TERM".to_owned())
            .or_insert_with(|| DEFAULT_TERM.to_owned());
        let cmd = command(&req, &user, &env, &cwd, true);
        return start_pty(ctx, cmd, size.sanitized(), req.timeout_ms);
    }
    let mut cmd = command(&req, &user, &env, &cwd, false);
    if let Some(bg) = &req.background {
        let log = match bg.log_path.as_deref() {
            None => std::fs::OpenOptions::new().write(true).open("/dev/null"),
            Some(p) => {
                if let Some(parent) = std::path::Path::new(p).parent() {
                    let _ = std::fs::create_dir_all(parent);
                }
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
            }
        };
        let log = match log {
            Ok(f) => f,
            Err(e) => {
                ctx.error(io_code(&e), format!("background log: {e}"));
                return None;
            }
        };
        let log2 = match log.try_clone() {
            Ok(f) => f,
            Err(e) => {
                ctx.error(ErrorCode::Io, e.to_string());
                return None;
            }
        };
        cmd.stdin(Stdio::null()).stdout(log).stderr(log2);
        match ctx.agent.procs.spawn_background(&mut cmd) {
            Ok(child) => ctx.reply(&AgentMsg::BackgroundStarted {
                pid: child.id() as i32,
            }),
            Err(e) => ctx.error(ErrorCode::SpawnFailed, format!("spawn: {e}")),
        }
        return None;
    }

    cmd.stdin(if req.stdin {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let (mut child, exit_rx) = match ctx.agent.procs.spawn_foreground(&mut cmd) {
        Ok(x) => x,
        Err(e) => {
            ctx.error(ErrorCode::SpawnFailed, format!("spawn: {e}"));
            return None;
        }
    };
    let pid = child.id() as i32;
    ctx.reply(&AgentMsg::ExecStarted { pid, pty: false });

    let (pump_tx, pump_rx) = mpsc::channel::<()>();
    let activity = PumpActivity::new();
    if let Some(out) = child.stdout.take() {
        let p = Pump::new(&ctx, channel::STDOUT, &pump_tx, &activity, None);
        p.spawn(out);
    }
    if let Some(err) = child.stderr.take() {
        let p = Pump::new(&ctx, channel::STDERR, &pump_tx, &activity, None);
        p.spawn(err);
    }
    drop(pump_tx);
    let input = child.stdin.take().map(|stdin| {
        let (tx, rx) = mpsc::channel::<Input>();
        let c = ctx.clone();
        spawn_worker(move || feed_stdin(&c, stdin, rx, None));
        tx
    });
    let done = Arc::new(AtomicBool::new(false));
    finish_when_done(&ctx, pid, exit_rx, pump_rx, activity, &done, req.timeout_ms);
    Some(Entry {
        done,
        pid: Some(pid),
        input,
        window,
        pty: None,
        conn: None,
    })
}

/// Start a foreground exec on a new pseudo-terminal of `size`: the terminal is its
/// stdin, stdout and stderr and its controlling terminal; what it shows goes to the host
/// as raw bytes on the stdout channel.
fn start_pty(ctx: Ctx, mut cmd: Command, size: PtySize, timeout_ms: Option<u64>) -> Option<Entry> {
    let (master, slave) = match open_pty(size) {
        Ok(pair) => pair,
        Err(e) => {
            ctx.error(ErrorCode::SpawnFailed, format!("opening a terminal: {e}"));
            return None;
        }
    };
    let stdio = || slave.try_clone().map(Stdio::from);
    let (stdin, stdout, stderr) = match (stdio(), stdio(), stdio()) {
        (Ok(i), Ok(o), Ok(e)) => (i, o, e),
        (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
            ctx.error(ErrorCode::SpawnFailed, format!("opening a terminal: {e}"));
            return None;
        }
    };
    cmd.stdin(stdin).stdout(stdout).stderr(stderr);
    let spawned = ctx.agent.procs.spawn_foreground(&mut cmd);
    // The agent must hold no end of the terminal's slave side, or reading the master
    // would never see the process's last close.
    drop(cmd);
    drop(slave);
    let (child, exit_rx) = match spawned {
        Ok(x) => x,
        Err(e) => {
            ctx.error(ErrorCode::SpawnFailed, format!("spawn: {e}"));
            return None;
        }
    };
    let pid = child.id() as i32;
    drop(child);
    let (reader, writer) = match (master.try_clone(), master.try_clone()) {
        (Ok(r), Ok(w)) => (std::fs::File::from(r), std::fs::File::from(w)),
        (Err(e), _) | (_, Err(e)) => {
            let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
            ctx.error(ErrorCode::Io, format!("terminal: {e}"));
            return None;
        }
    };
    ctx.reply(&AgentMsg::ExecStarted { pid, pty: true });

    let (pump_tx, pump_rx) = mpsc::channel::<()>();
    let activity = PumpActivity::new();
    let done = Arc::new(AtomicBool::new(false));
    Pump::new(
        &ctx,
        channel::STDOUT,
        &pump_tx,
        &activity,
        Some(done.clone()),
    )
    .spawn(reader);
    drop(pump_tx);
    let (tx, rx) = mpsc::channel::<Input>();
    let c = ctx.clone();
    spawn_worker(move || feed_stdin(&c, writer, rx, Some(TERMINAL_EOF)));
    finish_when_done(&ctx, pid, exit_rx, pump_rx, activity, &done, timeout_ms);
    Some(Entry {
        done,
        pid: Some(pid),
        input: Some(tx),
        window: ctx.window.clone(),
        pty: Some(Arc::new(master)),
        conn: None,
    })
}

/// A new terminal pair of `size`, both ends close-on-exec from the start (another exec
/// forking meanwhile must not inherit them).
fn open_pty(size: PtySize) -> std::io::Result<(OwnedFd, OwnedFd)> {
    use rustix::pty::{grantpt, ioctl_tiocgptpeer, openpt, unlockpt, OpenptFlags};
    let flags = OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC;
    let master = openpt(flags)?;
    grantpt(&master)?;
    unlockpt(&master)?;
    let slave = ioctl_tiocgptpeer(&master, flags)?;
    resize(&master, size)?;
    Ok((master, slave))
}

/// Set a terminal's size; the kernel sends SIGWINCH to its foreground process group.
pub fn resize(master: impl AsFd, size: PtySize) -> std::io::Result<()> {
    let size = size.sanitized();
    let ws = rustix::termios::Winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    rustix::termios::tcsetwinsize(master, ws)?;
    Ok(())
}

/// Sends the exec's `exit` once the process has exited and its output is drained (or
/// given up on: see below); `done` is set just before.
fn finish_when_done(
    ctx: &Ctx,
    pid: i32,
    exit_rx: mpsc::Receiver<ExitStatus>,
    pump_rx: mpsc::Receiver<()>,
    activity: Arc<PumpActivity>,
    done: &Arc<AtomicBool>,
    timeout_ms: Option<u64>,
) {
    let ctx = ctx.clone();
    let d = done.clone();
    let timeout = timeout_ms.map(Duration::from_millis);
    spawn_worker(move || {
        let mut status = match timeout {
            None => exit_rx.recv().unwrap_or_default(),
            Some(t) => match exit_rx.recv_timeout(t) {
                Ok(s) => s,
                Err(_) => {
                    let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
                    let mut s = exit_rx.recv().unwrap_or_default();
                    s.timed_out = true;
                    s
                }
            },
        };
        // Wait for both pumps to hit EOF (they close the channel). A pump that holds
        // data waiting for host credit is making progress. Once the process is gone for
        // OUTPUT_GRACE and the pipes went quiet, what still holds them open is a
        // leftover daemon, so the exec finishes without waiting for it (hard cap: 30 s).
        let exited_at = Instant::now();
        loop {
            match pump_rx.recv_timeout(Duration::from_millis(50)) {
                Ok(()) => continue,
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if !ctx.current() || exited_at.elapsed() >= Duration::from_secs(30) {
                        break;
                    }
                    if activity.sending.load(Ordering::SeqCst) > 0
                        || exited_at.elapsed() < OUTPUT_GRACE
                    {
                        continue;
                    }
                    let quiet = activity
                        .last_read
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .elapsed();
                    if quiet >= Duration::from_millis(250) {
                        tracing::debug!(pid, "output still open after exit; finishing exec");
                        break;
                    }
                }
            }
        }
        if status == ExitStatus::default() {
            status.code = Some(-1);
        }
        d.store(true, Ordering::SeqCst);
        ctx.reply(&AgentMsg::Exit(status));
    });
}

/// What the output pumps of one exec are doing (for the end-of-exec grace logic).
#[derive(Debug)]
struct PumpActivity {
    /// Pumps currently holding data and waiting for credit / the writer.
    sending: AtomicUsize,
    last_read: Mutex<Instant>,
}

impl PumpActivity {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            sending: AtomicUsize::new(0),
            last_read: Mutex::new(Instant::now()),
        })
    }
}

/// Copies a child's pipe or terminal to data frames on one channel, then sends eof.
/// Output of a stale connection is still drained (so the child never blocks on a full
/// pipe) but dropped.
struct Pump {
    ctx: Ctx,
    ch: u8,
    done: mpsc::Sender<()>,
    activity: Arc<PumpActivity>,
    /// For a terminal: stop reading once the exec has finished, so that closing the
    /// master hangs up whatever the process left behind on it. A pipe is drained for
    /// as long as anyone writes to it.
    stop: Option<Arc<AtomicBool>>,
}

impl Pump {
    fn new(
        ctx: &Ctx,
        ch: u8,
        done: &mpsc::Sender<()>,
        activity: &Arc<PumpActivity>,
        stop: Option<Arc<AtomicBool>>,
    ) -> Self {
        Self {
            ctx: ctx.clone(),
            ch,
            done: done.clone(),
            activity: activity.clone(),
            stop,
        }
    }

    fn spawn(self, mut r: impl Read + AsFd + Send + 'static) {
        spawn_worker(move || {
            let mut buf = vec![0u8; DATA_CHUNK];
            loop {
                if let Some(stop) = &self.stop {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    match crate::server::poll_in(r.as_fd(), Some(Duration::from_millis(200))) {
                        Ok(true) => {}
                        Ok(false) => continue,
                        Err(_) => break,
                    }
                }
                match r.read(&mut buf) {
                    // A terminal whose last slave closed reads EIO: the same end.
                    Ok(0) => break,
                    Ok(n) => {
                        // Blocks for credit; output of a stale connection is dropped.
                        let a = &self.activity;
                        a.sending.fetch_add(1, Ordering::SeqCst);
                        if self.ctx.current() {
                            self.ctx.data(self.ch, Bytes::copy_from_slice(&buf[..n]));
                        }
                        *a.last_read.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
                        a.sending.fetch_sub(1, Ordering::SeqCst);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(_) => break,
                }
            }
            self.ctx.eof(self.ch);
            drop(self.done);
        });
    }
}

/// Writes the host's input to the process: its stdin pipe, or its terminal. The end of
/// the input closes the pipe; a terminal stays open (the process may still write to it)
/// and gets `eof_byte` instead.
fn feed_stdin(ctx: &Ctx, mut stdin: impl Write, rx: mpsc::Receiver<Input>, eof_byte: Option<u8>) {
    let mut broken = false;
    for item in rx {
        match item {
            Input::Data(b) => {
                if !broken && stdin.write_all(&b).is_err() {
                    // The process closed stdin; keep crediting so the host never blocks.
                    broken = true;
                }
                ctx.reply(&AgentMsg::Credit {
                    bytes: b.len() as u32,
                });
            }
            Input::Eof => match eof_byte {
                Some(c) if !broken => broken = stdin.write_all(&[c]).is_err(),
                Some(_) => {}
                None => break,
            },
        }
    }
    // Dropping stdin closes the pipe.
}

pub fn wait_pid(ctx: &Ctx, pid: i32, timeout_ms: u64) {
    match ctx
        .agent
        .procs
        .wait_pid(pid, Duration::from_millis(timeout_ms))
    {
        Some((alive, exit)) => ctx.reply(&AgentMsg::PidStatus(PidStatus { pid, alive, exit })),
        None => ctx.reply(&AgentMsg::PidStatus(PidStatus {
            pid,
            alive: false,
            exit: None,
        })),
    }
}

pub fn kill_pid(ctx: &Ctx, pid: i32, signal: i32, group: bool) {
    if pid <= 1 {
        ctx.error(ErrorCode::InvalidRequest, "refusing to signal pid <= 1");
        return;
    }
    let target = if group { -pid } else { pid };
    if let Err(e) = crate::procs::kill(target, signal) {
        ctx.error(io_code(&e), format!("kill: {e}"));
        return;
    }
    ctx.reply(&AgentMsg::Done { bytes: 0 });
}
