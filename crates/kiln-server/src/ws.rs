//! `GET /exec/connect`: a full-duplex command session over a WebSocket, in the SDK's
//! framing (`superserve.exec.v1`).
//!
//! The client's first text frame is the start request (as `/exec`'s body). Binary frames
//! carry a one-byte channel then bytes: 0 is stdin (client to server), 1 stdout and 2
//! stderr (server to client). Text frames carry control: `{"type":"stdin_close"}` and
//! `{"type":"signal","name":"SIGTERM"}` from the client, and a last
//! `{"finished":true,"exit_code":n}` from the server before it closes. The access token
//! rides in the `token.<value>` subprotocol, which is never echoed back.
//!
//! A client that goes away does not take the command with it (Superserve's
//! `commands_sessions.mdx`: "the process keeps running inside the sandbox"): its output is
//! read and dropped, and its stdin kept open, until it exits. The SDKs' `close()` sends a
//! signal first when it means to stop the command. A terminal session is hung up
//! (SIGHUP, as a closed terminal window does), so an idle shell does not wait
//! for its gone client forever.
//!
//! kiln's extension, which the official SDKs never use: a start frame with
//! `"pty": {"cols", "rows"}` runs the command on a terminal of its own (its bytes on the
//! stdout channel, stdin through the terminal), and `{"type":"resize","cols","rows"}`
//! resizes it. A browser names the sandbox with a `sandbox.<id>` subprotocol, as it
//! cannot set the header.

use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::response::Response;
use futures::{SinkExt as _, StreamExt as _};
use kiln_api::exec::{channel, signal_number};
use kiln_api::{ExecEvent, ExecRequest, SessionControl, TerminalSize, EXEC_SUBPROTOCOL};
use kiln_engine::{SandboxHandle, SessionEvent, SessionOptions};

use crate::data::Target;
use crate::ApiError;

/// Largest WebSocket message accepted (the SDK sends stdin in 32 KiB frames).
const MAX_MESSAGE: usize = 1024 * 1024;
/// How long a client may take to send the start frame.
const START_TIMEOUT: Duration = Duration::from_secs(30);

pub(crate) async fn exec_connect(
    Target(sandbox): Target,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let ws = ws.map_err(|e| {
        ApiError::bad_request(format!("expected a WebSocket upgrade: {}", e.body_text()))
    })?;
    Ok(ws
        .protocols([EXEC_SUBPROTOCOL])
        .max_message_size(MAX_MESSAGE)
        .on_upgrade(move |socket| async move {
            let id = sandbox.id().to_owned();
            if let Err(reason) = session(socket, sandbox).await {
                tracing::debug!(sandbox = %id, %reason, "exec session ended early");
            }
        }))
}

/// Closes with a reason the SDK shows the user.
async fn close(ws: &mut WebSocket, code: u16, reason: &str) {
    let _ = ws
        .send(Message::Close(Some(CloseFrame {
            code,
            reason: reason.into(),
        })))
        .await;
}

fn text(event: &ExecEvent) -> Message {
    Message::Text(serde_json::to_string(event).unwrap_or_default().into())
}

/// Ends a session that never started its command: why, then a close frame.
async fn refuse(ws: &mut WebSocket, code: u16, close_reason: &str, why: String) -> String {
    let _ = ws
        .send(text(&ExecEvent::finished(-1, Some(why.clone()))))
        .await;
    close(ws, code, close_reason).await;
    why
}

async fn session(mut ws: WebSocket, sandbox: SandboxHandle) -> Result<(), String> {
    let start = match tokio::time::timeout(START_TIMEOUT, ws.recv()).await {
        Ok(Some(Ok(Message::Text(t)))) => t,
        _ => {
            close(&mut ws, 1002, "expected a start frame").await;
            return Err("no start frame".into());
        }
    };
    let req = match serde_json::from_str::<ExecRequest>(start.as_str()) {
        Ok(r) => r,
        Err(e) => {
            let why = format!("invalid start frame: {e}");
            return Err(refuse(&mut ws, 1008, "invalid start frame", why).await);
        }
    };
    let opts = SessionOptions {
        stdin: true,
        user: None,
    };
    let mut session = match sandbox.session(&req, opts).await {
        Ok(s) => s,
        Err(e) if e.code() == kiln_api::ApiErrorCode::InvalidRequest => {
            return Err(refuse(&mut ws, 1008, "invalid start frame", e.to_string()).await);
        }
        Err(e) => {
            let why = e.chain();
            return Err(refuse(&mut ws, 1011, "could not start the command", why).await);
        }
    };
    let pty = req.pty.is_some();
    let mut input = session.input().expect("a new session has its input");
    let (mut tx, mut rx) = ws.split();

    // Client to process: stdin bytes, stdin close, signals. Ends when the client goes, and
    // hands the input half back.
    let mut input_task = tokio::spawn(async move {
        while let Some(Ok(msg)) = rx.next().await {
            match msg {
                Message::Binary(b) => {
                    if let Some((&channel::STDIN, data)) = b.split_first() {
                        input.write_stdin(data).await;
                    }
                }
                Message::Text(t) => match serde_json::from_str::<SessionControl>(t.as_str()) {
                    Ok(SessionControl::StdinClose) => input.close_stdin(),
                    Ok(SessionControl::Signal { name }) => {
                        if let Some(sig) = signal_number(&name) {
                            input.signal(sig).await;
                        }
                    }
                    Ok(SessionControl::Resize { cols, rows }) => {
                        input.resize(TerminalSize { cols, rows });
                    }
                    Err(_) => {}
                },
                Message::Close(_) => break,
                _ => {}
            }
        }
        input
    });

    // Process to client.
    let result = loop {
        let event = tokio::select! {
            event = session.next_event() => event,
            input = &mut input_task => {
                run_on(session, input.ok(), pty).await;
                break Err("client went away; the command runs on".to_owned());
            }
        };
        let (ch, data) = match event {
            Ok(SessionEvent::Stdout(b)) => (channel::STDOUT, b),
            Ok(SessionEvent::Stderr(b)) => (channel::STDERR, b),
            Ok(SessionEvent::Exit { exit_code, error }) => {
                let _ = tx.send(text(&ExecEvent::finished(exit_code, error))).await;
                let _ = tx
                    .send(Message::Close(Some(CloseFrame {
                        code: 1000,
                        reason: "finished".into(),
                    })))
                    .await;
                break Ok(());
            }
            Err(_) => {
                let _ = tx
                    .send(Message::Close(Some(CloseFrame {
                        code: 1011,
                        reason: "lost the connection to the sandbox".into(),
                    })))
                    .await;
                break Err("agent connection lost".to_owned());
            }
        };
        if tx.send(Message::Binary(framed(ch, &data))).await.is_err() {
            // The connection is gone, so the input side ends too.
            let input = tokio::time::timeout(START_TIMEOUT, &mut input_task).await;
            run_on(session, input.ok().and_then(Result::ok), pty).await;
            break Err("client went away; the command runs on".to_owned());
        }
    };
    input_task.abort();
    result
}

/// A command whose client went away, left to run to its end: its output is read (and
/// dropped, so that it never blocks on a full pipe) and its stdin held open until it
/// exits or the sandbox's agent goes. A terminal session is hung up first.
async fn run_on(
    mut session: kiln_engine::Session,
    input: Option<kiln_engine::SessionInput>,
    pty: bool,
) {
    if let (true, Some(input)) = (pty, &input) {
        input.hang_up().await;
    }
    tokio::spawn(async move {
        let _stdin = input;
        while let Ok(event) = session.next_event().await {
            if let SessionEvent::Exit { exit_code, .. } = event {
                tracing::debug!(exit_code, "a command whose client went away ended");
                break;
            }
        }
    });
}

fn framed(channel: u8, data: &[u8]) -> bytes::Bytes {
    let mut out = Vec::with_capacity(data.len() + 1);
    out.push(channel);
    out.extend_from_slice(data);
    out.into()
}
