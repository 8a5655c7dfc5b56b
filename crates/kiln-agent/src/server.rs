//! Serving the protocol on one byte stream: the virtio-serial port (one fd for the whole
//! life of the VM, host connections come and go underneath it) or a unix socket
//! connection (dev/test mode).
//!
//! Threads: one reader (this loop) that decodes frames and dispatches them, one writer
//! that owns the outgoing side, and short-lived worker threads per request (exec pumps,
//! file transfers). Every outgoing frame is tagged with the *connection generation* it
//! belongs to; a new `hello` bumps the generation so output meant for an old host
//! connection is dropped instead of confusing the new one.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, SyncSender};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use kiln_agent_proto::frame::{channel, SYNC};
use kiln_agent_proto::{
    AgentMsg, DecodeEvent, Decoder, ErrorCode, ErrorReply, Frame, FrameKind, Health, HelloAck,
    HostMsg, PtySize, RuntimeDefaults, INITIAL_WINDOW, MAX_CONTROL, PROTOCOL_VERSION,
};
use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::time::TimeSpec;
use nix::time::{clock_settime, ClockId};

use crate::procs::Procs;
use crate::{exec, files};

/// A frame that stopped making progress for this long *and* has a SYNC marker among its
/// buffered bytes is abandoned and the buffer rescanned (see [`try_expire`]).
const FRAME_DEADLINE: Duration = Duration::from_secs(2);

/// How long the agent port must read as closed before the host connection is written
/// off (see the EOF branch of [`serve`]).
const DISCONNECT_GRACE: Duration = Duration::from_secs(1);

pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();

/// Record the agent's start time (for `health.uptime_ms`); call first thing in main.
pub fn mark_start() {
    START.get_or_init(Instant::now);
}

/// Where outgoing bytes go; replaced per connection in unix-socket mode.
pub type Sink = Arc<Mutex<Option<Box<dyn Write + Send>>>>;

/// The outgoing side: a bounded queue (backpressure for exec output) drained by one
/// writer thread.
#[derive(Debug, Clone)]
pub struct Out {
    tx: SyncSender<(u64, Bytes)>,
    gen: Arc<AtomicU64>,
}

impl Out {
    pub fn new(sink: Sink) -> Self {
        let (tx, rx) = mpsc::sync_channel::<(u64, Bytes)>(64);
        let gen = Arc::new(AtomicU64::new(0));
        let g = gen.clone();
        std::thread::Builder::new()
            .name("writer".into())
            .spawn(move || {
                for (fgen, bytes) in rx {
                    if fgen != g.load(Ordering::SeqCst) {
                        continue;
                    }
                    let mut s = sink.lock().unwrap_or_else(|e| e.into_inner());
                    if let Some(w) = s.as_mut() {
                        if let Err(e) = w.write_all(&bytes).and_then(|()| w.flush()) {
                            tracing::debug!(error = %e, "write to host failed; frame dropped");
                        }
                    }
                }
            })
            .expect("spawn writer thread");
        Self { tx, gen }
    }

    pub fn gen(&self) -> u64 {
        self.gen.load(Ordering::SeqCst)
    }

    pub fn is_current(&self, gen: u64) -> bool {
        self.gen() == gen
    }

    fn bump(&self) -> u64 {
        self.gen.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// The host connection ended: everything still queued or waiting for credit on its
    /// behalf is dropped, so exec output pumps drain freely instead of blocking.
    pub fn disconnected(&self) {
        self.bump();
    }

    pub fn raw(&self, gen: u64, b: Bytes) {
        if self.is_current(gen) {
            let _ = self.tx.send((gen, b));
        }
    }

    pub fn frame(&self, gen: u64, f: &Frame) {
        self.raw(gen, f.encode());
    }

    pub fn msg(&self, gen: u64, stream: u32, m: &AgentMsg) {
        match serde_json::to_vec(m) {
            Ok(json) => self.frame(gen, &Frame::control(stream, json)),
            Err(e) => tracing::error!(error = %e, "cannot serialise reply"),
        }
    }

    pub fn error(&self, gen: u64, stream: u32, code: ErrorCode, message: impl Into<String>) {
        self.msg(
            gen,
            stream,
            &AgentMsg::Error(ErrorReply {
                code,
                message: message.into(),
            }),
        );
    }
}

/// State shared by all connections for the life of the agent.
#[derive(Debug)]
pub struct Agent {
    pub procs: Arc<Procs>,
    pub defaults: Mutex<RuntimeDefaults>,
    /// Root for /etc/passwd and /etc/group lookups ("/" except in tests).
    pub root: PathBuf,
    pub started: Instant,
    pub boot_id: String,
    /// Only a real guest agent may set the clock (dev mode runs on the host).
    pub manage_clock: bool,
    pub out: Out,
    last_nonce: AtomicU64,
}

/// Host -> worker messages for streams that take input.
#[derive(Debug)]
pub enum Input {
    Data(Bytes),
    Eof,
}

/// A live stream on the current connection.
#[derive(Debug)]
pub struct Entry {
    pub done: Arc<AtomicBool>,
    /// For execs: the process group to signal.
    pub pid: Option<i32>,
    pub input: Option<mpsc::Sender<Input>>,
    /// Credit for this stream's outgoing data.
    pub window: Arc<Window>,
    /// For an exec on a terminal: its master side, for `resize`.
    pub pty: Option<Arc<OwnedFd>>,
}

impl Entry {
    pub fn busy(ctx: &Ctx) -> (Self, Arc<AtomicBool>) {
        let done = Arc::new(AtomicBool::new(false));
        (
            Self {
                done: done.clone(),
                pid: None,
                input: None,
                window: ctx.window.clone(),
                pty: None,
            },
            done,
        )
    }
}

/// Agent -> host flow control for one stream: data may only be sent against credit
/// the host returned (see `msg` docs), so a slow host consumer blocks the producing
/// process instead of growing buffers.
#[derive(Debug)]
pub struct Window {
    avail: Mutex<u64>,
    cv: Condvar,
}

impl Window {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            avail: Mutex::new(u64::from(INITIAL_WINDOW)),
            cv: Condvar::new(),
        })
    }

    fn add(&self, n: u32) {
        *self.avail.lock().unwrap_or_else(|e| e.into_inner()) += u64::from(n);
        self.cv.notify_all();
    }

    /// Take `n` bytes of credit; gives up (false) once `valid()` turns false (the host
    /// connection this stream belonged to is gone).
    fn take(&self, n: u64, valid: impl Fn() -> bool) -> bool {
        let mut a = self.avail.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if *a >= n {
                *a -= n;
                return true;
            }
            if !valid() {
                return false;
            }
            a = self
                .cv
                .wait_timeout(a, Duration::from_millis(200))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// Per-request context handed to handlers.
#[derive(Debug, Clone)]
pub struct Ctx {
    pub agent: Arc<Agent>,
    pub gen: u64,
    pub stream: u32,
    pub window: Arc<Window>,
}

impl Ctx {
    pub fn reply(&self, m: &AgentMsg) {
        self.agent.out.msg(self.gen, self.stream, m);
    }
    pub fn error(&self, code: ErrorCode, message: impl Into<String>) {
        self.agent.out.error(self.gen, self.stream, code, message);
    }
    /// Send data once the host has given credit for it. Returns false (data dropped)
    /// if the host connection went away meanwhile.
    pub fn data(&self, ch: u8, b: Bytes) -> bool {
        if !self.window.take(b.len() as u64, || self.current()) {
            return false;
        }
        self.agent
            .out
            .frame(self.gen, &Frame::data(self.stream, ch, b));
        true
    }
    pub fn eof(&self, ch: u8) {
        self.agent.out.frame(self.gen, &Frame::eof(self.stream, ch));
    }
    pub fn current(&self) -> bool {
        self.agent.out.is_current(self.gen)
    }
}

/// How the transport signals "host went away".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// virtio-serial port: read() returning 0 means the host side is disconnected; the
    /// fd stays valid and a new host may connect later.
    Port,
    /// A socket connection: read() returning 0 ends it.
    Socket,
}

fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

impl Agent {
    pub fn new(root: PathBuf, manage_clock: bool, sink: Sink) -> Arc<Self> {
        Arc::new(Self {
            procs: Procs::new(),
            defaults: Mutex::new(RuntimeDefaults::default()),
            root,
            started: *START.get_or_init(Instant::now),
            boot_id: boot_id(),
            manage_clock,
            out: Out::new(sink),
            last_nonce: AtomicU64::new(0),
        })
    }

    pub fn defaults(&self) -> RuntimeDefaults {
        self.defaults
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

pub(crate) fn poll_in(fd: BorrowedFd<'_>, timeout: Option<Duration>) -> std::io::Result<bool> {
    let timeout = timeout.map_or(PollTimeout::NONE, |d| {
        PollTimeout::try_from(d.as_millis().max(1)).unwrap_or(PollTimeout::MAX)
    });
    match poll(&mut [PollFd::new(fd, PollFlags::POLLIN)], timeout) {
        Ok(n) => Ok(n > 0),
        Err(Errno::EINTR) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Decoder state of one byte stream. Normally fresh per socket connection; the
/// `--sticky` dev mode keeps it across connections to exercise in-band resync exactly
/// as a virtio port that never reported the disconnect would.
#[derive(Debug)]
pub struct ServeState {
    dec: Decoder,
    streams: HashMap<u32, Entry>,
}

impl Default for ServeState {
    fn default() -> Self {
        Self {
            dec: Decoder::new_hunting(kiln_agent_proto::frame::MAX_FRAME),
            streams: HashMap::new(),
        }
    }
}

/// Serve one byte stream until it ends (sockets) or forever (port).
pub fn serve(
    agent: &Arc<Agent>,
    conn: &mut (impl Read + AsFd),
    transport: Transport,
    state: &mut ServeState,
) {
    let ServeState { dec, streams } = state;
    let mut buf = vec![0u8; 256 * 1024];
    let mut frame_started: Option<Instant> = None;
    // When the port last started reading as closed (see the EOF branch).
    let mut closed_since: Option<Instant> = None;
    loop {
        let timeout = frame_started.map(|t| {
            FRAME_DEADLINE
                .checked_sub(t.elapsed())
                .unwrap_or(Duration::from_secs(1))
        });
        match poll_in(conn.as_fd(), timeout) {
            Ok(true) => {}
            Ok(false) => {
                try_expire(agent, dec, streams, &mut frame_started);
                continue;
            }
            Err(e) => {
                tracing::error!(error = %e, "poll failed");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        }
        let n = match conn.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => {
                if transport == Transport::Socket {
                    tracing::info!(error = %e, "host connection read failed");
                    agent.out.disconnected();
                    return;
                }
                tracing::warn!(error = %e, "port read failed");
                std::thread::sleep(Duration::from_millis(100));
                0
            }
        };
        if n == 0 {
            match transport {
                Transport::Socket => {
                    agent.out.disconnected();
                    return;
                }
                Transport::Port => {
                    // No host is connected *now*. Inside a reconnect that can be a
                    // moment only: the new host's first bytes may overtake its
                    // port-open event (data interrupts are handled at once, control
                    // messages from a work queue), so the port reads as closed right
                    // after the new hello was read. Writing the connection off then
                    // would drop the reply to that hello. So the old connection is only
                    // written off once the port stays closed; a new host's hello resets
                    // the streams and the output generation anyway.
                    let since = *closed_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= DISCONNECT_GRACE && !dec.is_hunting() {
                        // Forget partial input; the next host starts with SYNC.
                        tracing::info!("host disconnected from the agent port");
                        agent.out.disconnected();
                        dec.reset();
                        frame_started = None;
                        streams.clear();
                    }
                    // poll() reports POLLHUP at once while nobody is connected.
                    crate::init::wait_for_host();
                    continue;
                }
            }
        }
        closed_since = None;
        dec.push(&buf[..n]);
        let progressed = drain(agent, dec, streams);
        if !dec.is_mid_frame() {
            frame_started = None;
        } else if progressed || frame_started.is_none() {
            frame_started = Some(Instant::now());
        } else {
            try_expire(agent, dec, streams, &mut frame_started);
        }
    }
}

/// Give up on a frame that has not completed for [`FRAME_DEADLINE`] *and* shows
/// evidence of a new host: a SYNC marker among its buffered bytes (a new host's hello
/// swallowed by the payload of a frame its predecessor never finished). A merely slow
/// frame of a live host is never expired. A skipped oversized frame is already an
/// error, so it is abandoned on the deadline alone.
fn try_expire(
    agent: &Arc<Agent>,
    dec: &mut Decoder,
    streams: &mut HashMap<u32, Entry>,
    frame_started: &mut Option<Instant>,
) {
    let Some(t) = *frame_started else { return };
    if t.elapsed() < FRAME_DEADLINE || !(dec.is_skipping() || dec.partial_has_sync()) {
        return;
    }
    if dec.expire_partial() {
        tracing::warn!("stalled partial frame abandoned; resynchronising");
        drain(agent, dec, streams);
    }
    *frame_started = dec.is_mid_frame().then(Instant::now);
}

/// Handle every complete event; returns whether any was decoded.
fn drain(agent: &Arc<Agent>, dec: &mut Decoder, streams: &mut HashMap<u32, Entry>) -> bool {
    let mut any = false;
    while let Some(ev) = dec.next_event() {
        any = true;
        match ev {
            DecodeEvent::Sync => {}
            DecodeEvent::Desync => tracing::warn!("bad frame header; hunting for SYNC"),
            DecodeEvent::Oversized { stream, len } => {
                tracing::warn!(stream, len, "oversized frame rejected");
                let gen = agent.out.gen();
                // Input already sent on that stream is now incomplete: abort it.
                streams.remove(&stream);
                agent.out.error(
                    gen,
                    stream,
                    ErrorCode::FrameTooLarge,
                    format!("frame of {len} bytes exceeds the limit"),
                );
            }
            DecodeEvent::Frame(f) => handle_frame(agent, streams, f),
        }
    }
    any
}

fn handle_frame(agent: &Arc<Agent>, streams: &mut HashMap<u32, Entry>, f: Frame) {
    let gen = agent.out.gen();
    match f.kind {
        FrameKind::Data | FrameKind::Eof => {
            if f.channel != channel::INPUT {
                return;
            }
            // Unknown streams are ignored: the request may have finished or failed already.
            if let Some(tx) = streams.get(&f.stream).and_then(|e| e.input.as_ref()) {
                let item = if f.kind == FrameKind::Data {
                    Input::Data(f.payload)
                } else {
                    Input::Eof
                };
                let _ = tx.send(item);
            }
        }
        FrameKind::Control => {
            if f.payload.len() > MAX_CONTROL {
                agent.out.error(
                    gen,
                    f.stream,
                    ErrorCode::FrameTooLarge,
                    "control message too large",
                );
                return;
            }
            let msg: HostMsg = match serde_json::from_slice(&f.payload) {
                Ok(m) => m,
                Err(e) => {
                    streams.remove(&f.stream);
                    agent.out.error(
                        gen,
                        f.stream,
                        ErrorCode::BadFrame,
                        format!("undecodable message: {e}"),
                    );
                    return;
                }
            };
            if f.stream == 0 {
                if let HostMsg::Hello { nonce, protocol } = msg {
                    hello(agent, streams, nonce, protocol);
                } else {
                    agent.out.error(
                        gen,
                        0,
                        ErrorCode::InvalidRequest,
                        "stream 0 only carries hello",
                    );
                }
                return;
            }
            if let HostMsg::Credit { bytes } = msg {
                if let Some(e) = streams.get(&f.stream) {
                    e.window.add(bytes);
                }
                return;
            }
            let ctx = Ctx {
                agent: agent.clone(),
                gen,
                stream: f.stream,
                window: Window::new(),
            };
            if let HostMsg::Signal { signal } = msg {
                if let Some(pid) = streams.get(&f.stream).and_then(|e| e.pid) {
                    let _ = crate::procs::kill(-pid, signal);
                }
                return;
            }
            if let HostMsg::Resize { cols, rows } = msg {
                if let Some(pty) = streams.get(&f.stream).and_then(|e| e.pty.as_ref()) {
                    if let Err(e) = exec::resize(pty.as_fd(), PtySize { cols, rows }) {
                        tracing::debug!(error = %e, "terminal resize failed");
                    }
                }
                return;
            }
            if streams.len() > 64 {
                streams.retain(|_, e| !e.done.load(Ordering::SeqCst));
            }
            if let Some(e) = streams.get(&f.stream) {
                if !e.done.load(Ordering::SeqCst) {
                    ctx.error(ErrorCode::DuplicateStream, "stream id already in use");
                    return;
                }
            }
            if let Some(entry) = dispatch(ctx, msg) {
                streams.insert(f.stream, entry);
            }
        }
    }
}

fn hello(agent: &Arc<Agent>, streams: &mut HashMap<u32, Entry>, nonce: u64, protocol: u32) {
    // Streams of the previous connection keep running (their processes survive) but
    // lose their host-side input and output.
    streams.clear();
    let gen = agent.out.bump();
    // A booting guest sees the host's retried hellos (same nonce) all at once.
    if agent.last_nonce.swap(nonce, Ordering::SeqCst) == nonce {
        tracing::debug!(gen, "repeated hello");
    } else {
        tracing::info!(gen, protocol, "host connected");
    }
    let ack = AgentMsg::HelloAck(HelloAck {
        nonce,
        protocol: PROTOCOL_VERSION,
        pid: std::process::id() as i32,
        boot_id: agent.boot_id.clone(),
        agent_version: AGENT_VERSION.into(),
    });
    let Ok(json) = serde_json::to_vec(&ack) else {
        return;
    };
    let mut b = BytesMut::new();
    b.extend_from_slice(&SYNC);
    Frame::control(0, json).encode_into(&mut b);
    agent.out.raw(gen, b.freeze());
}

/// Run a request. Returns the stream entry if the request stays live.
fn dispatch(ctx: Ctx, msg: HostMsg) -> Option<Entry> {
    match msg {
        HostMsg::Hello { .. } => {
            ctx.error(ErrorCode::InvalidRequest, "hello is only valid on stream 0");
            None
        }
        HostMsg::Signal { .. } | HostMsg::Resize { .. } | HostMsg::Credit { .. } => None,
        HostMsg::Health => {
            let a = &ctx.agent;
            ctx.reply(&AgentMsg::Health(Health {
                pid: std::process::id() as i32,
                uptime_ms: a.started.elapsed().as_millis() as u64,
                agent_version: AGENT_VERSION.into(),
                boot_id: a.boot_id.clone(),
            }));
            None
        }
        HostMsg::SetClock { unix_nanos } => {
            set_clock(&ctx, unix_nanos);
            None
        }
        HostMsg::SetDefaults { defaults } => {
            *ctx.agent.defaults.lock().unwrap_or_else(|e| e.into_inner()) = defaults;
            ctx.reply(&AgentMsg::Done { bytes: 0 });
            None
        }
        HostMsg::GetDefaults => {
            ctx.reply(&AgentMsg::Defaults {
                defaults: ctx.agent.defaults(),
            });
            None
        }
        HostMsg::Exec(req) => exec::start(ctx, req),
        HostMsg::WaitPid { pid, timeout_ms } => {
            let (entry, done) = Entry::busy(&ctx);
            spawn_worker(move || {
                exec::wait_pid(&ctx, pid, timeout_ms);
                done.store(true, Ordering::SeqCst);
            });
            Some(entry)
        }
        HostMsg::KillPid { pid, signal, group } => {
            exec::kill_pid(&ctx, pid, signal, group);
            None
        }
        HostMsg::WriteFile(req) => files::start_write(ctx, req),
        other => {
            let (entry, done) = Entry::busy(&ctx);
            spawn_worker(move || {
                files::run(&ctx, other);
                done.store(true, Ordering::SeqCst);
            });
            Some(entry)
        }
    }
}

pub fn spawn_worker(f: impl FnOnce() + Send + 'static) {
    if let Err(e) = std::thread::Builder::new().spawn(f) {
        tracing::error!(error = %e, "cannot spawn worker thread");
    }
}

fn set_clock(ctx: &Ctx, unix_nanos: i64) {
    if !ctx.agent.manage_clock {
        ctx.reply(&AgentMsg::ClockSet { applied: false });
        return;
    }
    let ts = TimeSpec::new(
        unix_nanos.div_euclid(1_000_000_000),
        unix_nanos.rem_euclid(1_000_000_000),
    );
    if let Err(e) = clock_settime(ClockId::CLOCK_REALTIME, ts) {
        let e = std::io::Error::from(e);
        ctx.error(ErrorCode::PermissionDenied, format!("clock_settime: {e}"));
        return;
    }
    ctx.reply(&AgentMsg::ClockSet { applied: true });
}

/// Map an io::Error to a protocol error code.
pub fn io_code(e: &std::io::Error) -> ErrorCode {
    use std::io::ErrorKind as K;
    match e.kind() {
        K::NotFound => ErrorCode::NotFound,
        K::PermissionDenied => ErrorCode::PermissionDenied,
        K::AlreadyExists => ErrorCode::AlreadyExists,
        _ => match e.raw_os_error() {
            Some(libc::ENOTDIR) => ErrorCode::NotADirectory,
            Some(libc::EISDIR) => ErrorCode::IsADirectory,
            Some(libc::ENOTEMPTY) => ErrorCode::DirectoryNotEmpty,
            Some(libc::ESRCH) => ErrorCode::NoSuchProcess,
            _ => ErrorCode::Io,
        },
    }
}
