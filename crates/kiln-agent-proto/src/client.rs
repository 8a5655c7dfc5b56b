//! Host-side async client for the guest agent.
//!
//! One [`AgentClient`] owns one connection (the QEMU chardev unix socket, or the agent's
//! `--listen-unix` socket in tests). It is cheap to clone and safe to use from many tasks:
//! every call gets its own stream id, a reader task routes incoming frames to it.
//! When the connection dies every pending and future call fails with
//! [`ClientError::Disconnected`] instead of hanging.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::PollSemaphore;

use crate::frame::{channel, DecodeEvent, Decoder, Frame, FrameKind, DATA_CHUNK, MAX_FRAME, SYNC};
use crate::msg::*;

/// Errors from [`AgentClient`] calls.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("could not connect to the agent socket {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the agent at {path} did not answer the hello handshake within {timeout:?}")]
    HandshakeTimeout { path: PathBuf, timeout: Duration },
    #[error("the agent speaks protocol {agent}, this client speaks {client}")]
    ProtocolVersion { agent: u32, client: u32 },
    /// The connection is gone (QEMU exited, socket closed, write failed).
    #[error("the connection to the agent is gone")]
    Disconnected,
    /// The agent refused or failed the request.
    #[error("agent error {code}: {message}")]
    Agent { code: ErrorCode, message: String },
    #[error("agent protocol violation: {0}")]
    Protocol(String),
    /// The stream already ended (e.g. writing stdin after the process exited).
    #[error("the stream already ended")]
    StreamClosed,
    /// A local reader/writer passed to a file call failed.
    #[error("local i/o error")]
    Io(#[source] io::Error),
}

type Result<T, E = ClientError> = std::result::Result<T, E>;

/// What arrives on one stream.
#[derive(Debug)]
enum Incoming {
    Msg(AgentMsg),
    Data(u8, Bytes),
    Eof,
}

#[derive(Debug)]
struct Slot {
    tx: mpsc::UnboundedSender<Incoming>,
    window: Arc<Semaphore>,
}

#[derive(Debug)]
struct Inner {
    out: mpsc::UnboundedSender<Bytes>,
    /// `None` once the connection is dead: no new stream can be opened.
    streams: Mutex<Option<HashMap<u32, Slot>>>,
    next_id: AtomicU32,
}

impl Inner {
    fn kill(&self) {
        let mut g = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(map) = g.take() {
            for (_, slot) in map {
                slot.window.close();
            }
        }
    }

    fn remove(&self, id: u32) {
        let mut g = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(map) = g.as_mut() {
            if let Some(slot) = map.remove(&id) {
                slot.window.close();
            }
        }
    }

    fn send(&self, f: &Frame) -> Result<()> {
        self.out
            .send(f.encode())
            .map_err(|_| ClientError::Disconnected)
    }

    fn send_msg(&self, stream: u32, m: &HostMsg) -> Result<()> {
        let json = serde_json::to_vec(m).map_err(|e| ClientError::Protocol(e.to_string()))?;
        self.send(&Frame::control(stream, json))
    }
}

/// A stream registration; unregisters on drop so abandoned calls do not leak.
#[derive(Debug)]
struct Stream {
    inner: Arc<Inner>,
    id: u32,
    rx: mpsc::UnboundedReceiver<Incoming>,
    window: Arc<Semaphore>,
    /// Received data bytes not yet credited back to the agent.
    unacked: u32,
}

/// Credit is returned in batches of at least this many bytes (fewer control frames).
const CREDIT_BATCH: u32 = 128 * 1024;

impl Drop for Stream {
    fn drop(&mut self) {
        self.inner.remove(self.id);
    }
}

impl Stream {
    async fn recv(&mut self) -> Result<Incoming> {
        self.rx.recv().await.ok_or(ClientError::Disconnected)
    }

    /// The caller took `n` data bytes off this stream: let the agent send more.
    fn consumed(&mut self, n: usize) {
        self.unacked = self.unacked.saturating_add(n as u32);
        if self.unacked >= CREDIT_BATCH {
            let bytes = std::mem::take(&mut self.unacked);
            // A dead connection surfaces on the next recv.
            let _ = self.inner.send_msg(self.id, &HostMsg::Credit { bytes });
        }
    }

    /// Next control message, failing on `error` replies; data frames are a protocol error.
    async fn recv_msg(&mut self) -> Result<AgentMsg> {
        match self.recv().await? {
            Incoming::Msg(AgentMsg::Error(e)) => Err(ClientError::Agent {
                code: e.code,
                message: e.message,
            }),
            Incoming::Msg(m) => Ok(m),
            other => Err(ClientError::Protocol(format!(
                "unexpected data frame {other:?}"
            ))),
        }
    }

    /// Send `data` on channel 0 respecting the agent's flow-control window. While waiting
    /// for credit, an early final reply (e.g. an error) from the agent is returned as Err.
    async fn send_input(&mut self, data: &[u8]) -> Result<()> {
        for chunk in data.chunks(DATA_CHUNK) {
            let n = chunk.len() as u32;
            // An early reply (an error) wins over a window closed by that same reply.
            let early = |m: Option<Incoming>| match m {
                None => ClientError::Disconnected,
                Some(Incoming::Msg(AgentMsg::Error(e))) => ClientError::Agent {
                    code: e.code,
                    message: e.message,
                },
                Some(other) => {
                    ClientError::Protocol(format!("unexpected while sending: {other:?}"))
                }
            };
            let permit = tokio::select! {
                biased;
                m = self.rx.recv() => return Err(early(m)),
                p = self.window.acquire_many(n) => match p {
                    Ok(p) => p,
                    Err(_) => {
                        return Err(match self.rx.try_recv() {
                            Ok(m) => early(Some(m)),
                            Err(_) => self.closed_reason(),
                        })
                    }
                },
            };
            permit.forget();
            self.inner.send(&Frame::data(
                self.id,
                channel::INPUT,
                Bytes::copy_from_slice(chunk),
            ))?;
        }
        Ok(())
    }

    fn closed_reason(&self) -> ClientError {
        let g = self.inner.streams.lock().unwrap_or_else(|e| e.into_inner());
        if g.is_none() {
            ClientError::Disconnected
        } else {
            ClientError::StreamClosed
        }
    }
}

/// Output of [`AgentClient::exec_collect`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub status: ExitStatus,
}

/// Events of a running exec, in order; `Exit` is last.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecEvent {
    Stdout(Bytes),
    Stderr(Bytes),
    Exit(ExitStatus),
}

/// A running foreground exec.
#[derive(Debug)]
pub struct ExecHandle {
    stream: Stream,
    pid: i32,
    stdin: Option<ExecStdin>,
    finished: bool,
}

/// The stdin of an exec started with `stdin: true`. Dropping it without [`close`](Self::close)
/// still closes the process's stdin. Also an [`AsyncWrite`] (shutdown = close), for
/// `tokio::io::copy` from a socket or websocket bridge.
#[derive(Debug)]
pub struct ExecStdin {
    inner: Arc<Inner>,
    id: u32,
    window: Arc<Semaphore>,
    poll_window: PollSemaphore,
    closed: bool,
}

impl ExecStdin {
    fn new(inner: Arc<Inner>, id: u32, window: Arc<Semaphore>) -> Self {
        Self {
            inner,
            id,
            poll_window: PollSemaphore::new(window.clone()),
            window,
            closed: false,
        }
    }

    fn closed_reason(&self) -> ClientError {
        let g = self.inner.streams.lock().unwrap_or_else(|e| e.into_inner());
        if g.is_none() {
            ClientError::Disconnected
        } else {
            ClientError::StreamClosed
        }
    }
}

fn broken_pipe(e: ClientError) -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, e)
}

impl AsyncWrite for ExecStdin {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.closed {
            return Poll::Ready(Err(broken_pipe(ClientError::StreamClosed)));
        }
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let n = buf.len().min(DATA_CHUNK);
        match this.poll_window.poll_acquire_many(cx, n as u32) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => Poll::Ready(Err(broken_pipe(this.closed_reason()))),
            Poll::Ready(Some(permit)) => {
                permit.forget();
                let f = Frame::data(this.id, channel::INPUT, Bytes::copy_from_slice(&buf[..n]));
                Poll::Ready(this.inner.send(&f).map(|()| n).map_err(broken_pipe))
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.closed {
            return Poll::Ready(Ok(()));
        }
        this.closed = true;
        Poll::Ready(
            this.inner
                .send(&Frame::eof(this.id, channel::INPUT))
                .map_err(broken_pipe),
        )
    }
}

impl ExecStdin {
    /// Write bytes to the process's stdin (waits for flow-control credit).
    pub async fn write_all(&mut self, data: &[u8]) -> Result<()> {
        if self.closed {
            return Err(ClientError::StreamClosed);
        }
        for chunk in data.chunks(DATA_CHUNK) {
            let n = chunk.len() as u32;
            let permit = self
                .window
                .acquire_many(n)
                .await
                .map_err(|_| self.closed_reason())?;
            permit.forget();
            self.inner.send(&Frame::data(
                self.id,
                channel::INPUT,
                Bytes::copy_from_slice(chunk),
            ))?;
        }
        Ok(())
    }

    /// Copy everything from `r` to stdin, then close it.
    pub async fn copy_from<R: AsyncRead + Unpin>(mut self, mut r: R) -> Result<u64> {
        let mut buf = vec![0u8; DATA_CHUNK];
        let mut total = 0u64;
        loop {
            let n = r.read(&mut buf).await.map_err(ClientError::Io)?;
            if n == 0 {
                break;
            }
            self.write_all(&buf[..n]).await?;
            total += n as u64;
        }
        self.close()?;
        Ok(total)
    }

    /// Close stdin (the process sees EOF).
    pub fn close(mut self) -> Result<()> {
        self.closed = true;
        self.inner.send(&Frame::eof(self.id, channel::INPUT))
    }
}

impl Drop for ExecStdin {
    fn drop(&mut self) {
        if !self.closed {
            let _ = self.inner.send(&Frame::eof(self.id, channel::INPUT));
        }
    }
}

/// Signals and terminal resizes for a running exec, apart from its output
/// ([`ExecHandle::control`]).
#[derive(Debug, Clone)]
pub struct ExecControl {
    inner: Arc<Inner>,
    id: u32,
}

impl ExecControl {
    /// Send a signal to the process group.
    pub fn signal(&self, signal: i32) -> Result<()> {
        self.inner.send_msg(self.id, &HostMsg::Signal { signal })
    }

    /// Resize the exec's terminal (see [`ExecHandle::resize`]).
    pub fn resize(&self, size: PtySize) -> Result<()> {
        let PtySize { cols, rows } = size.sanitized();
        self.inner
            .send_msg(self.id, &HostMsg::Resize { cols, rows })
    }
}

impl ExecHandle {
    /// PID of the process (its process group id too).
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Take the stdin writer (only when the request had `stdin: true`).
    pub fn take_stdin(&mut self) -> Option<ExecStdin> {
        self.stdin.take()
    }

    /// Send a signal to the process group (e.g. `libc::SIGTERM`).
    pub fn signal(&self, signal: i32) -> Result<()> {
        self.control().signal(signal)
    }

    /// Resize the terminal of an exec started with `pty` (no-op otherwise).
    pub fn resize(&self, size: PtySize) -> Result<()> {
        self.control().resize(size)
    }

    /// A handle that can signal and resize this exec from another task (the output
    /// half keeps reading).
    pub fn control(&self) -> ExecControl {
        ExecControl {
            inner: self.stream.inner.clone(),
            id: self.stream.id,
        }
    }

    /// Next output event; `Ok(None)` after `Exit` was returned.
    pub async fn next_event(&mut self) -> Result<Option<ExecEvent>> {
        loop {
            if self.finished {
                return Ok(None);
            }
            match self.stream.recv().await? {
                Incoming::Data(ch, b) => {
                    self.stream.consumed(b.len());
                    match ch {
                        channel::STDOUT => return Ok(Some(ExecEvent::Stdout(b))),
                        channel::STDERR => return Ok(Some(ExecEvent::Stderr(b))),
                        _ => continue,
                    }
                }
                Incoming::Eof => continue,
                Incoming::Msg(AgentMsg::Exit(st)) => {
                    self.finished = true;
                    return Ok(Some(ExecEvent::Exit(st)));
                }
                Incoming::Msg(AgentMsg::Error(e)) => {
                    self.finished = true;
                    return Err(ClientError::Agent {
                        code: e.code,
                        message: e.message,
                    });
                }
                Incoming::Msg(AgentMsg::Credit { .. }) => continue,
                Incoming::Msg(m) => {
                    return Err(ClientError::Protocol(format!("unexpected {m:?} in exec")))
                }
            }
        }
    }

    /// Wait for the exit, discarding output.
    pub async fn wait(mut self) -> Result<ExitStatus> {
        drop(self.stdin.take());
        while let Some(ev) = self.next_event().await? {
            if let ExecEvent::Exit(st) = ev {
                return Ok(st);
            }
        }
        Err(ClientError::StreamClosed)
    }

    /// Wait for the exit, collecting output.
    pub async fn collect(mut self) -> Result<ExecOutput> {
        drop(self.stdin.take());
        let mut out = ExecOutput {
            stdout: Vec::new(),
            stderr: Vec::new(),
            status: ExitStatus::default(),
        };
        while let Some(ev) = self.next_event().await? {
            match ev {
                ExecEvent::Stdout(b) => out.stdout.extend_from_slice(&b),
                ExecEvent::Stderr(b) => out.stderr.extend_from_slice(&b),
                ExecEvent::Exit(st) => {
                    out.status = st;
                    return Ok(out);
                }
            }
        }
        Err(ClientError::StreamClosed)
    }
}

/// A connection to one guest agent.
#[derive(Debug, Clone)]
pub struct AgentClient {
    inner: Arc<Inner>,
    hello: Arc<HelloAck>,
}

impl AgentClient {
    /// Connect to a unix socket (QEMU's virtio-serial chardev or the agent's
    /// `--listen-unix`), retrying until `timeout` because the socket may not exist yet and
    /// the guest may still be booting, then run the SYNC + hello handshake.
    pub async fn connect_unix(path: impl AsRef<Path>, timeout: Duration) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let deadline = Instant::now() + timeout;
        let nonce = fresh_nonce();
        loop {
            let sock = match UnixStream::connect(&path).await {
                Ok(s) => s,
                Err(e) => {
                    if Instant::now() >= deadline {
                        return Err(ClientError::Connect { path, source: e });
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            match handshake(sock, nonce, deadline).await {
                Ok(Some((r, w, dec, hello))) => {
                    if hello.protocol != PROTOCOL_VERSION {
                        return Err(ClientError::ProtocolVersion {
                            agent: hello.protocol,
                            client: PROTOCOL_VERSION,
                        });
                    }
                    return Ok(Self::start(r, w, dec, hello));
                }
                // Peer closed during the handshake: try a fresh connection.
                Ok(None) => {}
                Err(HandshakeFail::Timeout) => {
                    return Err(ClientError::HandshakeTimeout { path, timeout });
                }
            }
            if Instant::now() >= deadline {
                return Err(ClientError::HandshakeTimeout { path, timeout });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn start(r: OwnedReadHalf, w: OwnedWriteHalf, dec: Decoder, hello: HelloAck) -> Self {
        let (out_tx, out_rx) = mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
            out: out_tx,
            streams: Mutex::new(Some(HashMap::new())),
            next_id: AtomicU32::new(1),
        });
        tokio::spawn(writer_task(w, out_rx, Arc::downgrade(&inner)));
        tokio::spawn(reader_task(r, dec, Arc::downgrade(&inner)));
        Self {
            inner,
            hello: Arc::new(hello),
        }
    }

    /// What the agent said in its hello: pid, boot id, version.
    pub fn agent_info(&self) -> &HelloAck {
        &self.hello
    }

    /// False once the connection died.
    pub fn is_connected(&self) -> bool {
        self.inner
            .streams
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    fn open(&self) -> Result<Stream> {
        let (tx, rx) = mpsc::unbounded_channel();
        let window = Arc::new(Semaphore::new(INITIAL_WINDOW as usize));
        let mut g = self.inner.streams.lock().unwrap_or_else(|e| e.into_inner());
        let map = g.as_mut().ok_or(ClientError::Disconnected)?;
        let mut id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        while id == 0 || map.contains_key(&id) {
            id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        }
        map.insert(
            id,
            Slot {
                tx,
                window: window.clone(),
            },
        );
        Ok(Stream {
            inner: self.inner.clone(),
            id,
            rx,
            window,
            unacked: 0,
        })
    }

    async fn request(&self, m: HostMsg) -> Result<AgentMsg> {
        let mut s = self.open()?;
        s.inner.send_msg(s.id, &m)?;
        s.recv_msg().await
    }

    /// Agent liveness and identity.
    pub async fn health(&self) -> Result<Health> {
        match self.request(HostMsg::Health).await? {
            AgentMsg::Health(h) => Ok(h),
            m => Err(unexpected(m)),
        }
    }

    /// Set the guest realtime clock. Returns whether it was applied (a dev-mode agent
    /// refuses to change the host's clock).
    pub async fn set_clock(&self, t: SystemTime) -> Result<bool> {
        let nanos = match t.duration_since(UNIX_EPOCH) {
            Ok(d) => i64::try_from(d.as_nanos()).unwrap_or(i64::MAX),
            Err(e) => -i64::try_from(e.duration().as_nanos()).unwrap_or(i64::MAX),
        };
        match self
            .request(HostMsg::SetClock { unix_nanos: nanos })
            .await?
        {
            AgentMsg::ClockSet { applied } => Ok(applied),
            m => Err(unexpected(m)),
        }
    }

    /// Replace the runtime defaults (env, cwd, user) used by execs.
    pub async fn set_defaults(&self, defaults: RuntimeDefaults) -> Result<()> {
        match self.request(HostMsg::SetDefaults { defaults }).await? {
            AgentMsg::Done { .. } => Ok(()),
            m => Err(unexpected(m)),
        }
    }

    pub async fn get_defaults(&self) -> Result<RuntimeDefaults> {
        match self.request(HostMsg::GetDefaults).await? {
            AgentMsg::Defaults { defaults } => Ok(defaults),
            m => Err(unexpected(m)),
        }
    }

    /// Start a foreground exec. Returns once the process was spawned.
    pub async fn exec(&self, mut req: ExecRequest) -> Result<ExecHandle> {
        req.background = None;
        let want_stdin = req.stdin;
        let want_pty = req.pty.is_some();
        let mut s = self.open()?;
        s.inner.send_msg(s.id, &HostMsg::Exec(req))?;
        let pid = match s.recv_msg().await? {
            AgentMsg::ExecStarted { pid, pty } if pty || !want_pty => pid,
            AgentMsg::ExecStarted { .. } => {
                // An agent that predates terminals ran it without one: stop it.
                let _ = s.inner.send_msg(s.id, &HostMsg::Signal { signal: 9 });
                return Err(ClientError::Agent {
                    code: ErrorCode::Unsupported,
                    message: format!(
                        "this agent ({}) has no terminals; rebuild the template with a newer kiln",
                        self.hello.agent_version
                    ),
                });
            }
            m => return Err(unexpected(m)),
        };
        let stdin = want_stdin.then(|| ExecStdin::new(s.inner.clone(), s.id, s.window.clone()));
        Ok(ExecHandle {
            stream: s,
            pid,
            stdin,
            finished: false,
        })
    }

    /// Run to completion without stdin and collect stdout/stderr.
    pub async fn exec_collect(&self, mut req: ExecRequest) -> Result<ExecOutput> {
        req.stdin = false;
        self.exec(req).await?.collect().await
    }

    /// Start a detached background process (new session, output to
    /// `background.log_path` or /dev/null); returns its pid.
    pub async fn spawn_background(&self, mut req: ExecRequest) -> Result<i32> {
        req.stdin = false;
        if req.background.is_none() {
            req.background = Some(Background::default());
        }
        match self.request(HostMsg::Exec(req)).await? {
            AgentMsg::BackgroundStarted { pid } => Ok(pid),
            m => Err(unexpected(m)),
        }
    }

    /// Wait up to `timeout` (None = just look) for a process started by the agent.
    pub async fn wait_pid(&self, pid: i32, timeout: Option<Duration>) -> Result<PidStatus> {
        let timeout_ms = timeout.map_or(0, |d| d.as_millis().min(u64::MAX as u128) as u64);
        match self.request(HostMsg::WaitPid { pid, timeout_ms }).await? {
            AgentMsg::PidStatus(p) => Ok(p),
            m => Err(unexpected(m)),
        }
    }

    pub async fn pid_alive(&self, pid: i32) -> Result<bool> {
        Ok(self.wait_pid(pid, None).await?.alive)
    }

    /// Signal a process (or its process group with `group`).
    pub async fn kill_pid(&self, pid: i32, signal: i32, group: bool) -> Result<()> {
        match self
            .request(HostMsg::KillPid { pid, signal, group })
            .await?
        {
            AgentMsg::Done { .. } => Ok(()),
            m => Err(unexpected(m)),
        }
    }

    /// Stream a guest file into `w`; returns the number of bytes.
    pub async fn read_file_to<W: AsyncWrite + Unpin>(&self, path: &str, w: W) -> Result<u64> {
        self.read_file_range_to(path, 0, None, w).await
    }

    /// Stream at most `limit` bytes of a guest file, starting at `offset`, into `w`.
    pub async fn read_file_range_to<W: AsyncWrite + Unpin>(
        &self,
        path: &str,
        offset: u64,
        limit: Option<u64>,
        mut w: W,
    ) -> Result<u64> {
        let mut s = self.open()?;
        s.inner.send_msg(
            s.id,
            &HostMsg::ReadFile {
                path: path.into(),
                offset,
                limit,
            },
        )?;
        let mut total = 0u64;
        loop {
            match s.recv().await? {
                Incoming::Data(_, b) => {
                    w.write_all(&b).await.map_err(ClientError::Io)?;
                    total += b.len() as u64;
                    s.consumed(b.len());
                }
                Incoming::Eof | Incoming::Msg(AgentMsg::Credit { .. }) => {}
                Incoming::Msg(AgentMsg::Done { bytes }) => {
                    w.flush().await.map_err(ClientError::Io)?;
                    if bytes != total {
                        return Err(ClientError::Protocol(format!(
                            "agent sent {total} bytes but reported {bytes}"
                        )));
                    }
                    return Ok(total);
                }
                Incoming::Msg(AgentMsg::Error(e)) => {
                    return Err(ClientError::Agent {
                        code: e.code,
                        message: e.message,
                    })
                }
                Incoming::Msg(m) => return Err(unexpected(m)),
            }
        }
    }

    /// Read a whole (small) guest file into memory.
    pub async fn read_file(&self, path: &str) -> Result<Vec<u8>> {
        let mut v = Vec::new();
        self.read_file_to(path, &mut v).await?;
        Ok(v)
    }

    /// Stream `r` into a guest file (parents created, truncated, `mode` for a new file).
    pub async fn write_file_from<R: AsyncRead + Unpin>(
        &self,
        path: &str,
        r: R,
        mode: Option<u32>,
    ) -> Result<u64> {
        self.write_file_with(
            WriteFileRequest {
                path: path.into(),
                mode,
                owner: None,
                create_parents: true,
                append: false,
            },
            r,
        )
        .await
    }

    /// Write bytes to a guest file.
    pub async fn write_file(&self, path: &str, data: &[u8], mode: Option<u32>) -> Result<u64> {
        self.write_file_from(path, data, mode).await
    }

    /// Full-control variant of [`write_file_from`](Self::write_file_from) (owner, append).
    pub async fn write_file_with<R: AsyncRead + Unpin>(
        &self,
        req: WriteFileRequest,
        mut r: R,
    ) -> Result<u64> {
        let mut s = self.open()?;
        s.inner.send_msg(s.id, &HostMsg::WriteFile(req))?;
        let mut buf = vec![0u8; DATA_CHUNK];
        let mut sent = 0u64;
        loop {
            let n = r.read(&mut buf).await.map_err(ClientError::Io)?;
            if n == 0 {
                break;
            }
            s.send_input(&buf[..n]).await?;
            sent += n as u64;
        }
        s.inner.send(&Frame::eof(s.id, channel::INPUT))?;
        loop {
            match s.recv_msg().await? {
                AgentMsg::Credit { .. } => {}
                AgentMsg::Done { bytes } if bytes == sent => return Ok(bytes),
                AgentMsg::Done { bytes } => {
                    return Err(ClientError::Protocol(format!(
                        "sent {sent} bytes but agent wrote {bytes}"
                    )))
                }
                m => return Err(unexpected(m)),
            }
        }
    }

    /// Metadata of a path (symlinks not followed).
    pub async fn stat(&self, path: &str) -> Result<FileStat> {
        match self.request(HostMsg::Stat { path: path.into() }).await? {
            AgentMsg::Stat(st) => Ok(st),
            m => Err(unexpected(m)),
        }
    }

    /// Entries of a directory (sorted by name by the agent).
    pub async fn list(&self, path: &str) -> Result<Vec<DirEntry>> {
        let mut s = self.open()?;
        s.inner
            .send_msg(s.id, &HostMsg::ListDir { path: path.into() })?;
        let mut out = Vec::new();
        loop {
            match s.recv_msg().await? {
                AgentMsg::DirEntries { entries } => out.extend(entries),
                AgentMsg::Done { .. } => return Ok(out),
                m => return Err(unexpected(m)),
            }
        }
    }

    /// `mkdir -p` with an optional mode for created directories.
    pub async fn mkdir(&self, path: &str, mode: Option<u32>) -> Result<()> {
        match self
            .request(HostMsg::Mkdir {
                path: path.into(),
                mode,
            })
            .await?
        {
            AgentMsg::Done { .. } => Ok(()),
            m => Err(unexpected(m)),
        }
    }

    /// Remove a file, or a directory (recursively with `recursive`).
    pub async fn remove(&self, path: &str, recursive: bool) -> Result<()> {
        match self
            .request(HostMsg::Remove {
                path: path.into(),
                recursive,
            })
            .await?
        {
            AgentMsg::Done { .. } => Ok(()),
            m => Err(unexpected(m)),
        }
    }
}

fn unexpected(m: AgentMsg) -> ClientError {
    ClientError::Protocol(format!("unexpected reply {m:?}"))
}

fn fresh_nonce() -> u64 {
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    // Mix in the address of a stack value and the pid so parallel clients differ.
    let local = 0u8;
    t ^ ((&local as *const u8 as u64).rotate_left(32)) ^ u64::from(std::process::id())
}

enum HandshakeFail {
    Timeout,
}

/// SYNC + hello, resent every second (the guest may still be booting, or a stale partial
/// frame may swallow the first one), until a matching `hello_ack` arrives.
/// `Ok(None)` = peer closed, reconnect.
async fn handshake(
    sock: UnixStream,
    nonce: u64,
    deadline: Instant,
) -> Result<Option<(OwnedReadHalf, OwnedWriteHalf, Decoder, HelloAck)>, HandshakeFail> {
    let (mut r, mut w) = sock.into_split();
    let mut hello = BytesMut::new();
    hello.extend_from_slice(&SYNC);
    let json = serde_json::to_vec(&HostMsg::Hello {
        nonce,
        protocol: PROTOCOL_VERSION,
    })
    .unwrap_or_default();
    Frame::control(0, json).encode_into(&mut hello);
    let mut dec = Decoder::new_hunting(MAX_FRAME);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let now = Instant::now();
        if now >= deadline {
            return Err(HandshakeFail::Timeout);
        }
        if w.write_all(&hello).await.is_err() {
            return Ok(None);
        }
        let resend_at = (now + Duration::from_secs(1)).min(deadline);
        loop {
            let n = match tokio::time::timeout_at(resend_at.into(), r.read(&mut buf)).await {
                Err(_) => break,
                Ok(Err(_)) | Ok(Ok(0)) => return Ok(None),
                Ok(Ok(n)) => n,
            };
            dec.push(&buf[..n]);
            while let Some(ev) = dec.next_event() {
                if let DecodeEvent::Frame(f) = ev {
                    if f.kind != FrameKind::Control || f.stream != 0 {
                        continue;
                    }
                    if let Ok(AgentMsg::HelloAck(ack)) = serde_json::from_slice(&f.payload) {
                        if ack.nonce == nonce {
                            return Ok(Some((r, w, dec, ack)));
                        }
                    }
                }
            }
        }
    }
}

async fn writer_task(
    mut w: OwnedWriteHalf,
    mut rx: mpsc::UnboundedReceiver<Bytes>,
    inner: std::sync::Weak<Inner>,
) {
    while let Some(b) = rx.recv().await {
        if let Err(e) = w.write_all(&b).await {
            tracing::debug!(error = %e, "agent connection write failed");
            break;
        }
    }
    if let Some(inner) = inner.upgrade() {
        inner.kill();
    }
}

async fn reader_task(mut r: OwnedReadHalf, mut dec: Decoder, inner: std::sync::Weak<Inner>) {
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        // Dispatch what is already decoded (the handshake may have left bytes behind).
        while let Some(ev) = dec.next_event() {
            let Some(inner) = inner.upgrade() else { return };
            dispatch(&inner, ev);
        }
        match r.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => dec.push(&buf[..n]),
            Err(e) => {
                tracing::debug!(error = %e, "agent connection read failed");
                break;
            }
        }
    }
    if let Some(inner) = inner.upgrade() {
        inner.kill();
    }
}

fn dispatch(inner: &Inner, ev: DecodeEvent) {
    let f = match ev {
        DecodeEvent::Frame(f) => f,
        DecodeEvent::Sync => return,
        DecodeEvent::Desync | DecodeEvent::Oversized { .. } => {
            tracing::warn!(?ev, "agent stream desynchronised");
            return;
        }
    };
    if f.stream == 0 {
        return; // extra hello_acks from handshake retries
    }
    let item = match f.kind {
        FrameKind::Data => Incoming::Data(f.channel, f.payload),
        FrameKind::Eof => Incoming::Eof,
        FrameKind::Control => match serde_json::from_slice::<AgentMsg>(&f.payload) {
            Ok(m) => Incoming::Msg(m),
            Err(e) => Incoming::Msg(AgentMsg::Error(ErrorReply {
                code: ErrorCode::BadFrame,
                message: format!("undecodable agent message: {e}"),
            })),
        },
    };
    let mut g = inner.streams.lock().unwrap_or_else(|e| e.into_inner());
    let Some(map) = g.as_mut() else { return };
    let finished = match &item {
        Incoming::Msg(AgentMsg::Credit { bytes }) => {
            if let Some(slot) = map.get(&f.stream) {
                slot.window.add_permits(*bytes as usize);
            }
            return;
        }
        Incoming::Msg(m) => m.is_final(),
        _ => false,
    };
    if let Some(slot) = map.get(&f.stream) {
        let _ = slot.tx.send(item);
        if finished {
            // Keep the rx side alive (owned by the caller); just stop routing and close the
            // flow-control window so pending stdin writes fail instead of hanging.
            if let Some(slot) = map.remove(&f.stream) {
                slot.window.close();
            }
        }
    }
}
