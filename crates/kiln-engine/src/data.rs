//! The data plane of a running sandbox: commands (collected under a cap, streamed as
//! text, or as an interactive session of raw bytes) and files (read, write, a directory
//! as a zip), through its guest agent.
//!
//! The server's `/exec`, `/exec/stream`, `/exec/connect` and `/files` and the CLI's
//! `sandbox exec` and `cp` all go through a [`SandboxHandle`], so the caps, the text
//! chunking and the clean-up of failed uploads are written once.

use std::io::{Seek as _, Write as _};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::Stream;
use kiln_agent_proto::{
    AgentClient, ClientError, ExecControl, ExecHandle, ExecStdin, ExitStatus, FileKind, PtySize,
    WriteFileRequest,
};
use kiln_api::exec::{timeout_notice, TIMEOUT_EXIT_CODE};
use kiln_api::{ExecEvent, ExecRequest, ExecResult, RequestError, TerminalSize, Utf8Chunks};
use kiln_store::{SandboxAccess, SandboxStatus};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::{EngineError, Result};
use crate::Engine;

/// Combined stdout and stderr kept for a collected exec; the rest is dropped and the
/// result says `truncated`.
pub const MAX_EXEC_OUTPUT: usize = 16 * 1024 * 1024;
/// Largest file accepted by an upload.
pub const MAX_UPLOAD_BYTES: u64 = 512 * 1024 * 1024;
/// Most file bytes in a directory archive built for a download: what the guest sends,
/// not what its listing says (a file may grow in between).
pub const MAX_ZIP_BYTES: u64 = 512 * 1024 * 1024;
/// Directory archives built or being read at once on this host: each may hold
/// [`MAX_ZIP_BYTES`] on disk until its reader is done, so more wait.
const ZIP_SLOTS: usize = 2;
/// Most entries in a directory archive.
const MAX_ZIP_ENTRIES: usize = 100_000;
/// How a download reaches its reader: a pipe of this many bytes, so a slow reader holds
/// the guest back instead of the host's memory.
const DOWNLOAD_PIPE: usize = 256 * 1024;
/// What a terminal whose window closes sends its processes.
const SIGHUP: i32 = 1;

/// The data plane of one running sandbox. Cheap to clone.
#[derive(Debug, Clone)]
pub struct SandboxHandle {
    id: String,
    agent: AgentClient,
    zips: ZipSpool,
}

/// Where directory archives are assembled: unnamed files in the state directory (not
/// memory, and not `/tmp`, often a tmpfs), [`ZIP_SLOTS`] at a time for the whole engine.
#[derive(Debug, Clone)]
pub(crate) struct ZipSpool {
    dir: PathBuf,
    slots: Arc<Semaphore>,
}

impl ZipSpool {
    pub(crate) fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            slots: Arc::new(Semaphore::new(ZIP_SLOTS)),
        }
    }
}

impl Engine {
    /// A running sandbox's data plane, opened with its access token. A token that is not
    /// the sandbox's is [`EngineError::WrongToken`] (the SDKs then ask for a fresh one);
    /// an unknown or deleted id is not found; a paused one is [`EngineError::Unavailable`].
    pub async fn sandbox_by_token(&self, sandbox_id: &str, token: &str) -> Result<SandboxHandle> {
        match self.store.sandbox_access(sandbox_id, token).await? {
            SandboxAccess::Granted(s) => self.handle(&s),
            SandboxAccess::Denied => Err(EngineError::WrongToken),
            SandboxAccess::NotFound => {
                Err(kiln_store::StoreError::not_found("sandbox", sandbox_id).into())
            }
        }
    }

    /// A running sandbox's data plane, opened by its team (an API key): another team's
    /// sandbox is not found.
    pub async fn sandbox_for_team(&self, team_id: &str, sandbox_id: &str) -> Result<SandboxHandle> {
        let s = self.store.sandbox_by_id(team_id, sandbox_id).await?;
        self.handle(&s)
    }

    /// The data plane of a sandbox whose VM another process owns (a CLI keeper): a
    /// connection of its own to the sandbox's agent.
    pub async fn connect_sandbox(&self, team_id: &str, sandbox_id: &str) -> Result<SandboxHandle> {
        Ok(SandboxHandle {
            id: sandbox_id.to_owned(),
            agent: self.connect_agent(team_id, sandbox_id).await?,
            zips: self.zips.clone(),
        })
    }

    fn handle(&self, s: &kiln_store::Sandbox) -> Result<SandboxHandle> {
        if s.status == SandboxStatus::Deleted {
            return Err(kiln_store::StoreError::not_found("sandbox", &s.id).into());
        }
        Ok(SandboxHandle {
            id: s.id.clone(),
            agent: self.live_agent(s)?,
            zips: self.zips.clone(),
        })
    }
}

/// How a session's command runs beyond its request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionOptions {
    /// Its standard input is fed through [`SessionInput`].
    pub stdin: bool,
    /// Run as this user instead of the template's (the CLI's local `--user`).
    pub user: Option<String>,
}

/// The exit code callers see: the process's, `128 + signal` when killed, 124 on timeout
/// (as `timeout(1)` reports it).
fn exit_code(st: &ExitStatus) -> i32 {
    if st.timed_out {
        return TIMEOUT_EXIT_CODE;
    }
    st.code.or(st.signal.map(|s| 128 + s)).unwrap_or(-1)
}

/// The agent's request for a checked API request.
fn agent_request(
    req: &ExecRequest,
    opts: &SessionOptions,
) -> Result<(kiln_agent_proto::ExecRequest, Option<u64>)> {
    let timeout_ms = req.validate()?;
    Ok((
        kiln_agent_proto::ExecRequest {
            command: req.command.clone(),
            env: req.env.clone(),
            cwd: req.working_dir.clone(),
            user: opts.user.clone(),
            stdin: opts.stdin,
            timeout_ms,
            background: None,
            pty: req.pty.map(|s| PtySize {
                cols: s.cols,
                rows: s.rows,
            }),
        },
        timeout_ms,
    ))
}

/// A terminal needs a session: its output is a screen, not text to collect or stream.
fn no_terminal(req: &ExecRequest) -> Result<()> {
    match req.pty {
        Some(_) => Err(RequestError::invalid(
            "pty: a terminal is only available in a session (/exec/connect)",
        )
        .into()),
        None => Ok(()),
    }
}

impl SandboxHandle {
    /// The sandbox's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Runs a command to completion. At most [`MAX_EXEC_OUTPUT`] bytes of output are kept
    /// (`truncated` beyond, with a note at the end of stderr); a timeout is noted there too.
    pub async fn exec(&self, req: &ExecRequest) -> Result<ExecResult> {
        no_terminal(req)?;
        let (agent_req, timeout_ms) = agent_request(req, &SessionOptions::default())?;
        let mut handle = self.agent.exec(agent_req).await?;
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        let mut truncated = false;
        let status = loop {
            match handle.next_event().await? {
                Some(kiln_agent_proto::ExecEvent::Stdout(b)) => {
                    keep(&mut stdout, stderr.len(), &b, &mut truncated);
                }
                Some(kiln_agent_proto::ExecEvent::Stderr(b)) => {
                    keep(&mut stderr, stdout.len(), &b, &mut truncated);
                }
                Some(kiln_agent_proto::ExecEvent::Exit(st)) => break st,
                None => return Err(EngineError::Agent(ClientError::StreamClosed)),
            }
        };
        let mut stderr = String::from_utf8_lossy(&stderr).into_owned();
        if truncated {
            stderr.push_str(&format!(
                "\n[kiln] output exceeded {MAX_EXEC_OUTPUT} bytes and was truncated; stream it \
                 (exec/stream) or redirect it to a file\n"
            ));
        }
        if status.timed_out {
            if !stderr.is_empty() && !stderr.ends_with('\n') {
                stderr.push('\n');
            }
            stderr.push_str(&timeout_notice(timeout_ms));
        }
        Ok(ExecResult {
            stdout: String::from_utf8_lossy(&stdout).into_owned(),
            stderr,
            exit_code: exit_code(&status),
            truncated,
        })
    }

    /// Starts a command and streams its output as text events (never splitting a UTF-8
    /// sequence), then a last event with the exit code. A command that cannot start is
    /// an error here, not an event.
    pub async fn exec_stream(
        &self,
        req: &ExecRequest,
    ) -> Result<impl Stream<Item = ExecEvent> + Send + 'static> {
        no_terminal(req)?;
        let (agent_req, timeout_ms) = agent_request(req, &SessionOptions::default())?;
        let handle = self.agent.exec(agent_req).await?;
        struct St {
            handle: ExecHandle,
            out: Utf8Chunks,
            err: Utf8Chunks,
            done: bool,
            timeout_ms: Option<u64>,
        }
        let st = St {
            handle,
            out: Utf8Chunks::default(),
            err: Utf8Chunks::default(),
            done: false,
            timeout_ms,
        };
        Ok(futures::stream::unfold(st, |mut st| async move {
            loop {
                if st.done {
                    return None;
                }
                let event = match st.handle.next_event().await {
                    Ok(Some(kiln_agent_proto::ExecEvent::Stdout(b))) => {
                        let text = st.out.push(&b);
                        if text.is_empty() {
                            continue;
                        }
                        ExecEvent {
                            stdout: Some(text),
                            ..ExecEvent::default()
                        }
                    }
                    Ok(Some(kiln_agent_proto::ExecEvent::Stderr(b))) => {
                        let text = st.err.push(&b);
                        if text.is_empty() {
                            continue;
                        }
                        ExecEvent {
                            stderr: Some(text),
                            ..ExecEvent::default()
                        }
                    }
                    Ok(Some(kiln_agent_proto::ExecEvent::Exit(status))) => {
                        st.done = true;
                        let error = status.timed_out.then(|| timeout_notice(st.timeout_ms));
                        let mut last = ExecEvent::finished(exit_code(&status), error);
                        last.stdout = Some(st.out.finish()).filter(|s| !s.is_empty());
                        last.stderr = Some(st.err.finish()).filter(|s| !s.is_empty());
                        last
                    }
                    Ok(None) | Err(_) => {
                        st.done = true;
                        ExecEvent::finished(
                            -1,
                            Some("the connection to the sandbox's agent was lost".into()),
                        )
                    }
                };
                return Some((event, st));
            }
        }))
    }

    /// Starts an interactive command: raw output events until its exit, and (with
    /// `opts.stdin`) its standard input through [`Session::input`]. With `req.pty` it
    /// runs on a terminal of its own: all its output is the terminal's (as `Stdout`),
    /// and [`SessionInput::resize`] resizes it.
    pub async fn session(&self, req: &ExecRequest, opts: SessionOptions) -> Result<Session> {
        let (agent_req, timeout_ms) = agent_request(req, &opts)?;
        let mut handle = self.agent.exec(agent_req).await?;
        let input = SessionInput {
            stdin: handle.take_stdin(),
            agent: self.agent.clone(),
            pid: handle.pid(),
            control: handle.control(),
        };
        Ok(Session {
            handle,
            input: Some(input),
            timeout_ms,
        })
    }

    /// A file's bytes as they stream from the guest, or a directory as a zip archive
    /// whose entries start with the directory's base name (symlinks inside it skipped).
    /// A directory whose files send more than [`MAX_ZIP_BYTES`] is refused
    /// ([`EngineError::TooLarge`]), whatever its listing said.
    pub async fn read_file(&self, path: &str) -> Result<FileContent> {
        let st = self.agent.stat(path).await?;
        match st.kind {
            FileKind::Dir => zip_dir(&self.agent, path, &self.zips, MAX_ZIP_BYTES).await,
            FileKind::File | FileKind::Symlink => {
                let (reader, writer) = tokio::io::duplex(DOWNLOAD_PIPE);
                let agent = self.agent.clone();
                let path = path.to_owned();
                tokio::spawn(async move {
                    if let Err(e) = agent.read_file_to(&path, writer).await {
                        tracing::debug!(error = %e, "file download ended early");
                    }
                });
                Ok(FileContent::File(Box::pin(reader)))
            }
            FileKind::Other => {
                Err(RequestError::invalid("path: not a regular file or directory").into())
            }
        }
    }

    /// Writes `body` to `path` (parents created), owned by the sandbox's default user
    /// like a file its own commands would write. Bodies beyond [`MAX_UPLOAD_BYTES`] are
    /// refused, and a failed upload leaves no partial file behind.
    pub async fn write_file(
        &self,
        path: &str,
        body: impl AsyncRead + Unpin + Send,
        mode: Option<u32>,
    ) -> Result<u64> {
        let defaults = self.agent.get_defaults().await?;
        let req = WriteFileRequest {
            path: path.to_owned(),
            mode,
            owner: defaults.user,
            create_parents: true,
            append: false,
        };
        let body = Capped {
            inner: body,
            left: MAX_UPLOAD_BYTES,
        };
        match self.agent.write_file_with(req, body).await {
            Ok(n) => Ok(n),
            Err(e) => {
                let _ = self.agent.remove(path, false).await;
                match e {
                    ClientError::Io(io) if io.kind() == std::io::ErrorKind::FileTooLarge => {
                        Err(upload_too_large())
                    }
                    ClientError::Io(io) => {
                        Err(RequestError::invalid(format!("reading the request body: {io}")).into())
                    }
                    other => Err(other.into()),
                }
            }
        }
    }
}

/// An upload larger than allowed.
pub(crate) fn upload_too_large() -> EngineError {
    EngineError::TooLarge(format!("files are limited to {MAX_UPLOAD_BYTES} bytes"))
}

/// Reads `inner` and fails with `FileTooLarge` past `left` bytes (rather than cutting the
/// file short, as `take` would).
struct Capped<R> {
    inner: R,
    left: u64,
}

impl<R: AsyncRead + Unpin> AsyncRead for Capped<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            let n = (buf.filled().len() - before) as u64;
            if n > self.left {
                // A failed read must not report bytes read.
                buf.set_filled(before);
                return Poll::Ready(Err(std::io::ErrorKind::FileTooLarge.into()));
            }
            self.left -= n;
        }
        r
    }
}

/// A file or a directory, as [`SandboxHandle::read_file`] gives it.
pub enum FileContent {
    /// A file's bytes as they stream from the guest.
    File(Pin<Box<dyn AsyncRead + Send>>),
    /// A directory as a zip archive of `len` bytes, read from a file on the host that is
    /// gone once the reader is dropped.
    Zip {
        /// The archive's size.
        len: u64,
        /// The archive.
        reader: Pin<Box<dyn AsyncRead + Send>>,
    },
}

impl std::fmt::Debug for FileContent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::File(_) => f.write_str("File(..)"),
            Self::Zip { len, .. } => write!(f, "Zip({len} bytes)"),
        }
    }
}

/// A finished archive, holding its spool slot until the reader drops it.
struct SpooledZip {
    file: tokio::fs::File,
    _slot: OwnedSemaphorePermit,
}

impl AsyncRead for SpooledZip {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.file).poll_read(cx, buf)
    }
}

/// Writes a guest file's bytes into the archive's current entry, failing with
/// `FileTooLarge` past `left` bytes: the host's own bound, whatever the agent does with
/// the read's `limit`.
struct ZipEntrySink<'a> {
    zip: &'a mut zip::ZipWriter<std::fs::File>,
    left: u64,
}

impl AsyncWrite for ZipEntrySink<'_> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if buf.len() as u64 > self.left {
            return Poll::Ready(Err(std::io::ErrorKind::FileTooLarge.into()));
        }
        // A local file, written (and deflated) as the chunks arrive, as the archive in
        // memory was before.
        self.zip.write_all(buf)?;
        self.left -= buf.len() as u64;
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// One interactive command. Its input half ([`Session::input`]) can move to another task
/// while this half reads output.
#[derive(Debug)]
pub struct Session {
    handle: ExecHandle,
    input: Option<SessionInput>,
    timeout_ms: Option<u64>,
}

/// What a session's command sent, in order; `Exit` is last.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEvent {
    /// Standard output bytes.
    Stdout(Bytes),
    /// Standard error bytes.
    Stderr(Bytes),
    /// The command ended.
    Exit {
        /// As [`SandboxHandle::exec`] reports it.
        exit_code: i32,
        /// Why it ended abnormally (its timeout).
        error: Option<String>,
    },
}

impl Session {
    /// The input half (once).
    pub fn input(&mut self) -> Option<SessionInput> {
        self.input.take()
    }

    /// The next output, or the exit. A lost connection to the agent is an error.
    pub async fn next_event(&mut self) -> Result<SessionEvent> {
        match self.handle.next_event().await? {
            Some(kiln_agent_proto::ExecEvent::Stdout(b)) => Ok(SessionEvent::Stdout(b)),
            Some(kiln_agent_proto::ExecEvent::Stderr(b)) => Ok(SessionEvent::Stderr(b)),
            Some(kiln_agent_proto::ExecEvent::Exit(st)) => Ok(SessionEvent::Exit {
                exit_code: exit_code(&st),
                error: st.timed_out.then(|| timeout_notice(self.timeout_ms)),
            }),
            None => Err(EngineError::Agent(ClientError::StreamClosed)),
        }
    }
}

/// The input half of a [`Session`]: standard input and signals.
#[derive(Debug)]
pub struct SessionInput {
    stdin: Option<ExecStdin>,
    agent: AgentClient,
    pid: i32,
    control: ExecControl,
}

impl SessionInput {
    /// Feeds standard input; false once it is closed (by [`SessionInput::close_stdin`],
    /// the process, or a session started without stdin).
    pub async fn write_stdin(&mut self, data: &[u8]) -> bool {
        let Some(w) = self.stdin.as_mut() else {
            return false;
        };
        if w.write_all(data).await.is_err() {
            self.stdin = None;
            return false;
        }
        true
    }

    /// No more standard input.
    pub fn close_stdin(&mut self) {
        if let Some(w) = self.stdin.take() {
            let _ = w.close();
        }
    }

    /// Sends a signal to the command's process group.
    pub async fn signal(&self, signal: i32) {
        let _ = self.agent.kill_pid(self.pid, signal, true).await;
    }

    /// Resizes the session's terminal (nothing for a session without one). Sizes out of
    /// range are clamped: a client's window is what it is.
    pub fn resize(&self, size: TerminalSize) {
        let _ = self.control.resize(PtySize {
            cols: size.cols,
            rows: size.rows,
        });
    }

    /// Hangs up the command's terminal (SIGHUP to its process group), as closing a terminal
    /// window does: an interactive shell whose client is gone would otherwise wait for
    /// input forever.
    pub async fn hang_up(&self) {
        self.signal(SIGHUP).await;
    }
}

fn keep(buf: &mut Vec<u8>, other: usize, data: &[u8], truncated: &mut bool) {
    let room = MAX_EXEC_OUTPUT.saturating_sub(buf.len() + other);
    if data.len() > room {
        *truncated = true;
    }
    buf.extend_from_slice(&data[..data.len().min(room)]);
}

/// A directory of the guest as a zip of at most `budget` file bytes and
/// [`MAX_ZIP_ENTRIES`] entries, assembled in an unnamed file of `spool` (so no path is
/// ever left behind) once one of its slots is free.
///
/// Each file is read with a cap of what is left of the budget: a file that grew after
/// the listing fails the request ([`EngineError::TooLarge`]) as soon as it passes the
/// cap, rather than being cut short in an archive that would look complete.
async fn zip_dir(
    agent: &AgentClient,
    root: &str,
    spool: &ZipSpool,
    budget: u64,
) -> Result<FileContent> {
    let base = root
        .trim_end_matches('/')
        .rsplit('/')
        .next()
        .filter(|b| !b.is_empty())
        .unwrap_or("root")
        .to_owned();
    let slot = spool
        .slots
        .clone()
        .acquire_owned()
        .await
        .map_err(|_| EngineError::Unavailable("the server is shutting down".into()))?;
    let io_err = |what| EngineError::io(what, &spool.dir);
    let file = tempfile::tempfile_in(&spool.dir).map_err(io_err("creating a file in"))?;
    let mut zip = zip::ZipWriter::new(file);
    let opts = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated)
        .large_file(false);
    let too_big = || {
        EngineError::TooLarge(format!(
            "the directory is larger than {budget} bytes or {MAX_ZIP_ENTRIES} entries"
        ))
    };
    let zip_err = |e: zip::result::ZipError| EngineError::Io {
        what: "building a zip of",
        path: root.into(),
        source: std::io::Error::other(e),
    };
    let mut total = 0u64;
    let mut entries = 0usize;
    // Depth-first over (guest path, name inside the archive).
    let mut todo = vec![(root.trim_end_matches('/').to_owned(), base)];
    while let Some((dir, name)) = todo.pop() {
        zip.add_directory(format!("{name}/"), opts)
            .map_err(zip_err)?;
        let dir = if dir.is_empty() { "/".to_owned() } else { dir };
        for entry in agent.list(&dir).await? {
            entries += 1;
            if entries > MAX_ZIP_ENTRIES {
                return Err(too_big());
            }
            let child = format!("{}/{}", dir.trim_end_matches('/'), entry.name);
            let inner = format!("{name}/{}", entry.name);
            match entry.stat.kind {
                FileKind::Dir => todo.push((child, inner)),
                FileKind::File => {
                    let left = budget - total;
                    // What the listing says is only a hint, to refuse early.
                    if entry.stat.size > left {
                        return Err(too_big());
                    }
                    zip.start_file(inner, opts.unix_permissions(entry.stat.mode))
                        .map_err(zip_err)?;
                    let mut sink = ZipEntrySink {
                        zip: &mut zip,
                        left,
                    };
                    // One byte past the cap tells a grown file from one that fits exactly.
                    match agent
                        .read_file_range_to(&child, 0, Some(left + 1), &mut sink)
                        .await
                    {
                        Ok(n) => total += n,
                        Err(ClientError::Io(e)) if e.kind() == std::io::ErrorKind::FileTooLarge => {
                            return Err(too_big())
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
                FileKind::Symlink | FileKind::Other => {}
            }
        }
    }
    let mut file = zip.finish().map_err(zip_err)?;
    let len = file.stream_position().map_err(io_err("reading a zip in"))?;
    file.rewind().map_err(io_err("reading a zip in"))?;
    Ok(FileContent::Zip {
        len,
        reader: Box::pin(SpooledZip {
            file: tokio::fs::File::from_std(file),
            _slot: slot,
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes() {
        let st = |code, signal, timed_out| ExitStatus {
            code,
            signal,
            timed_out,
        };
        assert_eq!(exit_code(&st(Some(3), None, false)), 3);
        assert_eq!(exit_code(&st(None, Some(9), false)), 137);
        assert_eq!(exit_code(&st(None, Some(9), true)), 124);
    }

    #[tokio::test]
    async fn uploads_past_the_cap_fail_instead_of_being_cut() {
        use tokio::io::AsyncReadExt as _;
        let mut ok = Capped {
            inner: &b"hello"[..],
            left: 5,
        };
        let mut out = Vec::new();
        ok.read_to_end(&mut out).await.unwrap();
        assert_eq!(out, b"hello");
        let mut over = Capped {
            inner: &b"hello!"[..],
            left: 5,
        };
        let err = over.read_to_end(&mut Vec::new()).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::FileTooLarge);
    }

    /// A guest directory behind the fake agent, a spool for its archives, and a client.
    async fn fake_dir() -> (
        tempfile::TempDir,
        kiln_agent_proto::fake::FakeAgent,
        AgentClient,
        ZipSpool,
    ) {
        let tmp = tempfile::tempdir().unwrap();
        let socket = tmp.path().join("agent.sock");
        let fake = kiln_agent_proto::fake::FakeAgent::serve(&socket, Default::default()).unwrap();
        let agent = AgentClient::connect_unix(&socket, std::time::Duration::from_secs(5))
            .await
            .unwrap();
        let spool = tmp.path().join("spool");
        std::fs::create_dir(&spool).unwrap();
        (tmp, fake, agent, ZipSpool::new(spool))
    }

    fn spool_is_empty(spool: &ZipSpool) -> bool {
        std::fs::read_dir(&spool.dir).unwrap().next().is_none()
    }

    #[tokio::test]
    async fn a_file_grown_after_the_listing_fails_the_zip_at_the_budget() {
        let (_tmp, fake, agent, spool) = fake_dir().await;
        fake.add_file("/d/small", 5, &b"hello"[..]);
        // Listed as 10 bytes, served as 1 MiB: the guest grew it after the listing.
        fake.add_file("/d/sub/grown", 10, vec![b'x'; 1 << 20]);
        let err = zip_dir(&agent, "/d", &spool, 1024).await.unwrap_err();
        assert!(matches!(err, EngineError::TooLarge(_)), "{err:?}");
        // Each read asked for no more than what was left of the budget, plus one byte.
        let limits: Vec<_> = (fake.state().requests.iter())
            .filter_map(|r| match r {
                kiln_agent_proto::HostMsg::ReadFile { limit, .. } => Some(*limit),
                _ => None,
            })
            .collect();
        assert_eq!(limits, [Some(1025), Some(1020)]);
        assert!(spool_is_empty(&spool));
        // The slot is free again: a directory within the budget still downloads.
        fake.add_file("/d/sub/grown", 10, vec![b'x'; 10]);
        let Ok(FileContent::Zip { len, mut reader }) = zip_dir(&agent, "/d", &spool, 1024).await
        else {
            panic!("the directory was not zipped")
        };
        let mut bytes = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut reader, &mut bytes)
            .await
            .unwrap();
        assert_eq!(bytes.len() as u64, len);
        let mut archive = zip::ZipArchive::new(std::io::Cursor::new(bytes)).unwrap();
        let mut names: Vec<_> = archive.file_names().map(str::to_owned).collect();
        names.sort();
        assert_eq!(names, ["d/", "d/small", "d/sub/", "d/sub/grown"]);
        let mut small = String::new();
        std::io::Read::read_to_string(&mut archive.by_name("d/small").unwrap(), &mut small)
            .unwrap();
        assert_eq!(small, "hello");
        drop(reader);
        assert!(spool_is_empty(&spool));
    }

    #[tokio::test]
    async fn directory_downloads_wait_for_a_spool_slot() {
        let (_tmp, fake, agent, spool) = fake_dir().await;
        fake.add_file("/d/f", 1, &b"x"[..]);
        let mut held = Vec::new();
        for _ in 0..ZIP_SLOTS {
            held.push(zip_dir(&agent, "/d", &spool, 1024).await.unwrap());
        }
        let next = zip_dir(&agent, "/d", &spool, 1024);
        tokio::pin!(next);
        assert!(futures::poll!(next.as_mut()).is_pending());
        drop(held.pop());
        next.await.unwrap();
    }
}
