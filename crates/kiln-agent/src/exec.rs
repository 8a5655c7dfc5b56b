//! exec: `/bin/sh -c` with env, cwd, user, streamed stdin/stdout/stderr, timeout,
//! signals, and detached background processes.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use kiln_agent_proto::frame::{channel, DATA_CHUNK};
use kiln_agent_proto::{AgentMsg, ErrorCode, ExecRequest, ExitStatus, PidStatus};
use nix::errno::Errno;
use nix::sys::signal::{killpg, SigSet, Signal};
use nix::unistd::{getuid, setgid, setgroups, setsid, setuid, Gid, Pid, Uid};

use crate::server::{io_code, spawn_worker, Ctx, Entry, Input};
use crate::users::{self, ResolvedUser};

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

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

/// A `/bin/sh -c` command in its own session, as `user`.
fn command(
    req: &ExecRequest,
    user: &ResolvedUser,
    env: &BTreeMap<String, String>,
    cwd: &str,
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
            setsid()?;
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
    let mut cmd = command(&req, &user, &env, &cwd);
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
    ctx.reply(&AgentMsg::ExecStarted { pid });

    let (pump_tx, pump_rx) = mpsc::channel::<()>();
    let activity = Arc::new(PumpActivity {
        sending: AtomicUsize::new(0),
        last_read: Mutex::new(Instant::now()),
    });
    if let Some(out) = child.stdout.take() {
        pump(
            ctx.clone(),
            out,
            channel::STDOUT,
            pump_tx.clone(),
            activity.clone(),
        );
    }
    if let Some(err) = child.stderr.take() {
        pump(
            ctx.clone(),
            err,
            channel::STDERR,
            pump_tx.clone(),
            activity.clone(),
        );
    }
    drop(pump_tx);
    let input = child.stdin.take().map(|stdin| {
        let (tx, rx) = mpsc::channel::<Input>();
        let c = ctx.clone();
        spawn_worker(move || feed_stdin(&c, stdin, rx));
        tx
    });
    let done = Arc::new(AtomicBool::new(false));
    let d = done.clone();
    let timeout = req.timeout_ms.map(Duration::from_millis);
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
    Some(Entry {
        done,
        pid: Some(pid),
        input,
        window,
    })
}

/// Copy a child pipe to data frames, then send eof. Output of a stale connection is
/// still drained (so the child never blocks on a full pipe) but dropped.
/// What the output pumps of one exec are doing (for the end-of-exec grace logic).
#[derive(Debug)]
struct PumpActivity {
    /// Pumps currently holding data and waiting for credit / the writer.
    sending: AtomicUsize,
    last_read: Mutex<Instant>,
}

fn pump(
    ctx: Ctx,
    mut r: impl Read + Send + 'static,
    ch: u8,
    done: mpsc::Sender<()>,
    activity: Arc<PumpActivity>,
) {
    spawn_worker(move || {
        let mut buf = vec![0u8; DATA_CHUNK];
        loop {
            match r.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    // Blocks for credit; output of a stale connection is dropped.
                    activity.sending.fetch_add(1, Ordering::SeqCst);
                    if ctx.current() {
                        ctx.data(ch, Bytes::copy_from_slice(&buf[..n]));
                    }
                    *activity.last_read.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
                    activity.sending.fetch_sub(1, Ordering::SeqCst);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
        }
        ctx.eof(ch);
        drop(done);
    });
}

fn feed_stdin(ctx: &Ctx, mut stdin: std::process::ChildStdin, rx: mpsc::Receiver<Input>) {
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
            Input::Eof => break,
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
