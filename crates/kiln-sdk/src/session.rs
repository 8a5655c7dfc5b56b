//! Full-duplex command sessions over the data plane's `/exec/connect` WebSocket
//! (subprotocol `superserve.exec.v1`).
//!
//! Binary frames carry one channel byte (0 stdin, 1 stdout, 2 stderr) then bytes; text
//! frames carry JSON control: the client's start frame (as `/exec`'s body),
//! `{"type":"stdin_close"}` and `{"type":"signal","name":...}`, and the server's last
//! `{"finished":true,"exit_code":n,"error"?:...}`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt as _, StreamExt as _};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use kiln_api::exec::channel;
use kiln_api::{ExecEvent, ExecRequest, SessionControl, TerminalSize, Utf8Chunks};

use crate::client::{parse_retry_after, SANDBOX_ID_HEADER};
use crate::commands::CommandResult;
use crate::error::{Error, Result};
use crate::sandbox::Sandbox;

/// The subprotocol of an exec session; the access token rides in a second one,
/// `token.<value>`.
pub use kiln_api::EXEC_SUBPROTOCOL;

/// Largest stdin frame sent; larger writes are split.
const STDIN_CHUNK: usize = 32 * 1024;

/// How long the WebSocket handshake may take.
const DIAL_TIMEOUT: Duration = Duration::from_secs(30);

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Output of a running session, as it comes.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Output {
    /// Standard output (UTF-8; a sequence split between frames is kept whole).
    Stdout(String),
    /// Standard error.
    Stderr(String),
    /// What a terminal session's terminal shows, as raw bytes (escape sequences and all):
    /// the only output of [`crate::Commands::spawn_terminal`].
    Terminal(bytes::Bytes),
}

/// A live command, from [`crate::Commands::spawn`]: write to its stdin, signal it, read
/// its output as it comes ([`CommandSession::next_output`]) and [`CommandSession::wait`]
/// for its result. Dropping the session closes the connection, which kills the process.
///
/// ```no_run
/// # async fn demo(sandbox: kiln_sdk::Sandbox) -> kiln_sdk::Result<()> {
/// use kiln_sdk::{Output, RunOptions};
/// let mut session = sandbox.commands().spawn("python3 -i -q", RunOptions::default()).await?;
/// session.write_stdin(b"print(2 + 2)\n").await?;
/// while let Some(out) = session.next_output().await {
///     if matches!(&out, Output::Stdout(s) if s.contains('4')) {
///         break;
///     }
/// }
/// session.close_stdin().await?;
/// let result = session.wait().await?;
/// assert_eq!(result.exit_code, 0);
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct CommandSession {
    sink: Arc<tokio::sync::Mutex<SplitSink<Ws, Message>>>,
    done: Arc<AtomicBool>,
    output: mpsc::UnboundedReceiver<Output>,
    reader: Option<JoinHandle<Result<CommandResult>>>,
}

impl CommandSession {
    pub(crate) async fn start(sandbox: &Sandbox, req: ExecRequest) -> Result<Self> {
        let terminal = req.pty.is_some();
        let start = serde_json::to_string(&req).expect("the start frame serialises");
        let ws = sandbox
            .with_token_retry(|token| dial(sandbox, token))
            .await?;
        let (mut sink, stream) = ws.split();
        sink.send(Message::Text(start.into()))
            .await
            .map_err(|e| Error::network("sending the start frame", e))?;
        let done = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::unbounded_channel();
        let reader = tokio::spawn(read_loop(stream, tx, done.clone(), terminal));
        Ok(Self {
            sink: Arc::new(tokio::sync::Mutex::new(sink)),
            done,
            output: rx,
            reader: Some(reader),
        })
    }

    /// Writes to the process's stdin (split into 32 KiB frames). Once the process has
    /// finished, this does nothing.
    pub async fn write_stdin(&self, data: impl AsRef<[u8]>) -> Result<()> {
        let data = data.as_ref();
        let mut sink = self.sink.lock().await;
        for chunk in data.chunks(STDIN_CHUNK) {
            if self.done.load(Ordering::SeqCst) {
                return Ok(());
            }
            let mut frame = Vec::with_capacity(chunk.len() + 1);
            frame.push(channel::STDIN);
            frame.extend_from_slice(chunk);
            self.send_locked(&mut sink, Message::Binary(frame.into()))
                .await?;
        }
        Ok(())
    }

    /// Resizes the terminal of a session from [`crate::Commands::spawn_terminal`] (the
    /// process gets SIGWINCH); nothing for another session.
    pub async fn resize(&self, size: TerminalSize) -> Result<()> {
        self.control(SessionControl::Resize {
            cols: size.cols,
            rows: size.rows,
        })
        .await
    }

    /// Closes the process's stdin (it reads end-of-file).
    pub async fn close_stdin(&self) -> Result<()> {
        self.control(SessionControl::StdinClose).await
    }

    /// Sends a signal to the process: `"SIGTERM"`, `"TERM"` or a number (`"15"`); names
    /// the server does not know are ignored. Once the process has finished, this does
    /// nothing.
    pub async fn signal(&self, name: &str) -> Result<()> {
        self.control(SessionControl::Signal { name: name.into() })
            .await
    }

    /// The next piece of output, as it comes; `None` once the process has finished (or
    /// the connection ended) and all its output was given. Output read here is also in
    /// the result of [`CommandSession::wait`].
    pub async fn next_output(&mut self) -> Option<Output> {
        self.output.recv().await
    }

    /// Waits for the process to finish: its exit code and all its output. Fails with
    /// [`Error::Protocol`] when the connection ends before the process does.
    pub async fn wait(mut self) -> Result<CommandResult> {
        let reader = self.reader.take().expect("wait takes the session");
        let result = reader
            .await
            .map_err(|e| Error::Protocol(format!("the session's reader failed: {e}")))?;
        // Close our side politely; the server has closed or will.
        let mut sink = self.sink.lock().await;
        let _ = sink.close().await;
        result
    }

    /// Kills the process (SIGKILL) and closes the connection.
    pub async fn close(mut self) -> Result<()> {
        let _ = self.signal("SIGKILL").await;
        if let Some(r) = self.reader.take() {
            r.abort();
        }
        let mut sink = self.sink.lock().await;
        let _ = sink.close().await;
        Ok(())
    }

    async fn control(&self, msg: SessionControl) -> Result<()> {
        if self.done.load(Ordering::SeqCst) {
            return Ok(());
        }
        let text = serde_json::to_string(&msg).expect("control frames serialise");
        let mut sink = self.sink.lock().await;
        self.send_locked(&mut sink, Message::Text(text.into()))
            .await
    }

    async fn send_locked(&self, sink: &mut SplitSink<Ws, Message>, msg: Message) -> Result<()> {
        match sink.send(msg).await {
            Ok(()) => Ok(()),
            // The process finished and the server closed meanwhile: nothing to do.
            Err(_) if self.done.load(Ordering::SeqCst) => Ok(()),
            Err(e) => Err(Error::network("writing to the session", e)),
        }
    }
}

impl Drop for CommandSession {
    fn drop(&mut self) {
        // The reader holds the socket's read half: stop it so the connection closes (and
        // the server kills the process).
        if let Some(r) = self.reader.take() {
            r.abort();
        }
    }
}

async fn dial(sandbox: &Sandbox, token: String) -> Result<Ws> {
    let url = sandbox.client.ws_url(&["exec", "connect"]);
    let mut req = url
        .as_str()
        .into_client_request()
        .map_err(|e| Error::validation(format!("WebSocket URL {url}: {e}")))?;
    let headers = req.headers_mut();
    headers.insert(
        "sec-websocket-protocol",
        HeaderValue::from_str(&format!("{EXEC_SUBPROTOCOL}, token.{token}"))
            .map_err(|_| Error::Protocol("the access token is not a valid header value".into()))?,
    );
    headers.insert(
        SANDBOX_ID_HEADER,
        HeaderValue::from_str(sandbox.id())
            .map_err(|_| Error::validation("the sandbox id is not a valid header value"))?,
    );
    let connect = tokio_tungstenite::connect_async(req);
    let (ws, _resp) = match tokio::time::timeout(DIAL_TIMEOUT, connect).await {
        Err(_) => {
            return Err(Error::Timeout {
                message: format!("connecting to {url}"),
            })
        }
        Ok(Err(tokio_tungstenite::tungstenite::Error::Http(resp))) => {
            let retry_after = resp
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(parse_retry_after);
            let body = resp.body().as_deref().unwrap_or_default();
            return Err(Error::from_response(
                resp.status().as_u16(),
                body,
                retry_after,
            ));
        }
        Ok(Err(e)) => return Err(Error::network(format!("connecting to {url}"), e)),
        Ok(Ok(pair)) => pair,
    };
    Ok(ws)
}

/// Reads the server's frames until the `finished` event (or the end of the connection).
/// A terminal's bytes are given as they are and not kept for the result.
async fn read_loop(
    mut stream: SplitStream<Ws>,
    tx: mpsc::UnboundedSender<Output>,
    done: Arc<AtomicBool>,
    terminal: bool,
) -> Result<CommandResult> {
    let mut out = Utf8Chunks::default();
    let mut err = Utf8Chunks::default();
    let mut result = CommandResult::default();
    let mut emit = |result: &mut CommandResult, o: Output| {
        match &o {
            Output::Stdout(s) => result.stdout.push_str(s),
            Output::Stderr(s) => result.stderr.push_str(s),
            Output::Terminal(_) => {}
        }
        let _ = tx.send(o);
    };
    let mut close: Option<CloseFrame> = None;
    let mut failure: Option<String> = None;
    while let Some(msg) = stream.next().await {
        let msg = match msg {
            Ok(m) => m,
            Err(e) => {
                failure = Some(e.to_string());
                break;
            }
        };
        match msg {
            Message::Binary(b) => {
                let Some((&ch, payload)) = b.split_first() else {
                    continue;
                };
                match ch {
                    channel::STDOUT if terminal => {
                        let bytes = bytes::Bytes::copy_from_slice(payload);
                        emit(&mut result, Output::Terminal(bytes));
                    }
                    channel::STDOUT => {
                        let s = out.push(payload);
                        if !s.is_empty() {
                            emit(&mut result, Output::Stdout(s));
                        }
                    }
                    channel::STDERR => {
                        let s = err.push(payload);
                        if !s.is_empty() {
                            emit(&mut result, Output::Stderr(s));
                        }
                    }
                    _ => {}
                }
            }
            Message::Text(t) => {
                let Ok(ev) = serde_json::from_str::<ExecEvent>(t.as_str()) else {
                    continue;
                };
                if ev.finished {
                    done.store(true, Ordering::SeqCst);
                    flush(&mut out, &mut err, &mut result, &mut emit);
                    if let Some(e) = &ev.error {
                        result.stderr.push_str(e);
                    }
                    result.exit_code = ev.exit_code.unwrap_or(-1);
                    // Let the server's close handshake complete.
                    let _ = tokio::time::timeout(Duration::from_secs(5), async {
                        while let Some(Ok(m)) = stream.next().await {
                            if matches!(m, Message::Close(_)) {
                                break;
                            }
                        }
                    })
                    .await;
                    return Ok(result);
                } else if let Some(e) = &ev.error {
                    result.stderr.push_str(e);
                }
            }
            Message::Close(frame) => {
                close = frame;
                break;
            }
            _ => {}
        }
    }
    done.store(true, Ordering::SeqCst);
    flush(&mut out, &mut err, &mut result, &mut emit);
    let detail = match (close, failure) {
        (Some(f), _) if f.code == 1009.into() => {
            "a message exceeded the server's size limit; send bulk data over stdin or the files API"
                .to_owned()
        }
        (Some(f), _) if !f.reason.is_empty() => f.reason.to_string(),
        (Some(f), _) => format!("close code {}", u16::from(f.code)),
        (None, Some(e)) => e,
        (None, None) => "connection dropped".to_owned(),
    };
    Err(Error::Protocol(format!(
        "exec session closed before the command finished ({detail})"
    )))
}

fn flush(
    out: &mut Utf8Chunks,
    err: &mut Utf8Chunks,
    result: &mut CommandResult,
    emit: &mut impl FnMut(&mut CommandResult, Output),
) {
    let s = out.finish();
    if !s.is_empty() {
        emit(result, Output::Stdout(s));
    }
    let s = err.finish();
    if !s.is_empty() {
        emit(result, Output::Stderr(s));
    }
}
