//! `GET /exec/connect`: a full-duplex command session over a WebSocket, in the SDK's
//! framing (`superserve.exec.v1`).
//!
//! The client's first text frame is the start request (as `/exec`'s body). Binary frames
//! carry a one-byte channel then bytes: 0 is stdin (client to server), 1 stdout and 2
//! stderr (server to client). Text frames carry control: `{"type":"stdin_close"}` and
//! `{"type":"signal","name":"SIGTERM"}` from the client, and a last
//! `{"finished":true,"exit_code":n}` from the server before it closes. The access token
//! rides in the `token.<value>` subprotocol, which is never echoed back.

use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::response::Response;
use futures::{SinkExt as _, StreamExt as _};
use kiln_agent_proto::{AgentClient, ExecEvent, ExecStdin};
use serde::Deserialize;

use crate::data::{exit_code, ExecBody, Target};
use crate::ApiError;

/// The subprotocol the SDK negotiates.
pub const EXEC_SUBPROTOCOL: &str = "superserve.exec.v1";
/// Largest WebSocket message accepted (the SDK sends stdin in 32 KiB frames).
const MAX_MESSAGE: usize = 1024 * 1024;
/// How long a client may take to send the start frame.
const START_TIMEOUT: Duration = Duration::from_secs(30);

const CH_STDIN: u8 = 0;
const CH_STDOUT: u8 = 1;
const CH_STDERR: u8 = 2;
const SIGKILL: i32 = 9;

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Control {
    StdinClose,
    Signal { name: String },
}

pub(crate) async fn exec_connect(
    target: Target,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let ws = ws.map_err(|e| {
        ApiError::bad_request(format!("expected a WebSocket upgrade: {}", e.body_text()))
    })?;
    let agent = target.agent;
    let sandbox = target.sandbox.id;
    Ok(ws
        .protocols([EXEC_SUBPROTOCOL])
        .max_message_size(MAX_MESSAGE)
        .on_upgrade(move |socket| async move {
            if let Err(reason) = session(socket, agent).await {
                tracing::debug!(%sandbox, %reason, "exec session ended early");
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

async fn session(mut ws: WebSocket, agent: AgentClient) -> Result<(), String> {
    let start = match tokio::time::timeout(START_TIMEOUT, ws.recv()).await {
        Ok(Some(Ok(Message::Text(t)))) => t,
        _ => {
            close(&mut ws, 1002, "expected a start frame").await;
            return Err("no start frame".into());
        }
    };
    let req = serde_json::from_str::<ExecBody>(start.as_str())
        .map_err(|e| format!("invalid start frame: {e}"))
        .and_then(|b| b.into_request(true).map_err(|e| e.message));
    let req = match req {
        Ok(r) => r,
        Err(reason) => {
            let _ = ws
                .send(Message::Text(
                    serde_json::json!({"finished": true, "exit_code": -1, "error": reason})
                        .to_string()
                        .into(),
                ))
                .await;
            close(&mut ws, 1008, "invalid start frame").await;
            return Err(reason);
        }
    };
    let timeout_ms = req.timeout_ms;
    let mut handle = match agent.exec(req).await {
        Ok(h) => h,
        Err(e) => {
            let reason = e.to_string();
            let _ = ws
                .send(Message::Text(
                    serde_json::json!({"finished": true, "exit_code": -1, "error": reason})
                        .to_string()
                        .into(),
                ))
                .await;
            close(&mut ws, 1011, "could not start the command").await;
            return Err(reason);
        }
    };
    let pid = handle.pid();
    let stdin = handle.take_stdin();
    let (mut tx, mut rx) = ws.split();

    // Client to process: stdin bytes, stdin close, signals. Ends when the client goes.
    let input = tokio::spawn(async move {
        let mut stdin: Option<ExecStdin> = stdin;
        while let Some(Ok(msg)) = rx.next().await {
            match msg {
                Message::Binary(b) => {
                    let Some((&CH_STDIN, data)) = b.split_first() else {
                        continue;
                    };
                    if let Some(w) = stdin.as_mut() {
                        if w.write_all(data).await.is_err() {
                            stdin = None;
                        }
                    }
                }
                Message::Text(t) => match serde_json::from_str::<Control>(t.as_str()) {
                    Ok(Control::StdinClose) => {
                        if let Some(w) = stdin.take() {
                            let _ = w.close();
                        }
                    }
                    Ok(Control::Signal { name }) => {
                        if let Some(sig) = signal_number(&name) {
                            let _ = agent.kill_pid(pid, sig, true).await;
                        }
                    }
                    Err(_) => {}
                },
                Message::Close(_) => break,
                _ => {}
            }
        }
        // The client left: the process does not outlive its session.
        let _ = agent.kill_pid(pid, SIGKILL, true).await;
    });

    // Process to client.
    let result = loop {
        match handle.next_event().await {
            Ok(Some(ExecEvent::Stdout(b))) => {
                if tx
                    .send(Message::Binary(framed(CH_STDOUT, &b)))
                    .await
                    .is_err()
                {
                    break Err("client went away".to_owned());
                }
            }
            Ok(Some(ExecEvent::Stderr(b))) => {
                if tx
                    .send(Message::Binary(framed(CH_STDERR, &b)))
                    .await
                    .is_err()
                {
                    break Err("client went away".to_owned());
                }
            }
            Ok(Some(ExecEvent::Exit(st))) => {
                let mut done = serde_json::json!({"finished": true, "exit_code": exit_code(&st)});
                if st.timed_out {
                    done["error"] = crate::data::timeout_notice(timeout_ms).into();
                }
                let _ = tx.send(Message::Text(done.to_string().into())).await;
                let _ = tx
                    .send(Message::Close(Some(CloseFrame {
                        code: 1000,
                        reason: "finished".into(),
                    })))
                    .await;
                break Ok(());
            }
            Ok(None) | Err(_) => {
                let _ = tx
                    .send(Message::Close(Some(CloseFrame {
                        code: 1011,
                        reason: "lost the connection to the sandbox".into(),
                    })))
                    .await;
                break Err("agent connection lost".to_owned());
            }
        }
    };
    input.abort();
    result
}

fn framed(channel: u8, data: &[u8]) -> bytes::Bytes {
    let mut out = Vec::with_capacity(data.len() + 1);
    out.push(channel);
    out.extend_from_slice(data);
    out.into()
}

/// POSIX signal names the SDK sends (`SIGTERM`, `TERM`, or a number).
fn signal_number(name: &str) -> Option<i32> {
    let n = name.trim().to_ascii_uppercase();
    let n = n.strip_prefix("SIG").unwrap_or(&n);
    Some(match n {
        "HUP" => 1,
        "INT" => 2,
        "QUIT" => 3,
        "KILL" => 9,
        "USR1" => 10,
        "USR2" => 12,
        "PIPE" => 13,
        "ALRM" => 14,
        "TERM" => 15,
        "CONT" => 18,
        "STOP" => 19,
        "TSTP" => 20,
        "WINCH" => 28,
        other => other.parse().ok().filter(|n| (1..=64).contains(n))?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signal_names() {
        assert_eq!(signal_number("SIGTERM"), Some(15));
        assert_eq!(signal_number("kill"), Some(9));
        assert_eq!(signal_number("2"), Some(2));
        assert_eq!(signal_number("SIGNOPE"), None);
        assert_eq!(signal_number("0"), None);
    }

    #[test]
    fn control_frames() {
        assert!(matches!(
            serde_json::from_str::<Control>(r#"{"type":"stdin_close"}"#),
            Ok(Control::StdinClose)
        ));
        assert!(matches!(
            serde_json::from_str::<Control>(r#"{"type":"signal","name":"SIGINT"}"#),
            Ok(Control::Signal { .. })
        ));
    }
}
