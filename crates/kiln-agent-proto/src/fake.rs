//! A scripted guest agent for tests of the host side (feature `fake`): it speaks the real
//! protocol on a unix socket, so [`crate::AgentClient`] connects to it as to a VM's agent,
//! but it runs nothing.
//!
//! It answers the handshake, `health`, `set_clock`, `get_defaults`/`set_defaults` (kept in
//! memory), `kill_pid`, and `exec`: the command is not run; its stdout is the command
//! text, and a command of the form `exit N` exits with `N` (0 otherwise). Everything else
//! is an `unsupported` error (`exec` with `pty` is confirmed as a terminal; `signal` and
//! `resize` get no reply, as from the real agent). Every request is recorded for the test
//! to inspect.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::BytesMut;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{UnixListener, UnixStream};

use crate::frame::{channel, DecodeEvent, Decoder, Frame, FrameKind, MAX_FRAME, SYNC};
use crate::msg::{
    AgentMsg, ErrorCode, ErrorReply, ExitStatus, Health, HelloAck, HostMsg, RuntimeDefaults,
};

/// What the fake agent has been asked, and its state.
#[derive(Debug, Clone, Default)]
pub struct FakeAgentState {
    /// The runtime defaults (as `set_defaults` left them).
    pub defaults: RuntimeDefaults,
    /// Every request, in order (handshakes excluded).
    pub requests: Vec<HostMsg>,
    /// Host connections accepted so far.
    pub connections: u32,
}

/// A fake agent serving a unix socket until dropped.
#[derive(Debug)]
pub struct FakeAgent {
    socket: PathBuf,
    state: Arc<Mutex<FakeAgentState>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeAgent {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.socket);
    }
}

impl FakeAgent {
    /// Listens on `socket` (which must not exist); one host connection is served at a
    /// time, like a virtio-serial port, and a new one may follow a dropped one.
    pub fn serve(socket: &Path, defaults: RuntimeDefaults) -> std::io::Result<Self> {
        let listener = UnixListener::bind(socket)?;
        let state = Arc::new(Mutex::new(FakeAgentState {
            defaults,
            ..FakeAgentState::default()
        }));
        let shared = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                shared.lock().unwrap_or_else(|e| e.into_inner()).connections += 1;
                serve_connection(conn, &shared).await;
            }
        });
        Ok(Self {
            socket: socket.to_owned(),
            state,
            task,
        })
    }

    /// The socket it listens on.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// A copy of its state.
    pub fn state(&self) -> FakeAgentState {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

async fn serve_connection(mut conn: UnixStream, state: &Mutex<FakeAgentState>) {
    let mut dec = Decoder::new_hunting(MAX_FRAME);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match conn.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        dec.push(&buf[..n]);
        while let Some(ev) = dec.next_event() {
            let DecodeEvent::Frame(f) = ev else { continue };
            if f.kind != FrameKind::Control {
                continue;
            }
            let Ok(msg) = serde_json::from_slice::<HostMsg>(&f.payload) else {
                continue;
            };
            let mut out = BytesMut::new();
            answer(f.stream, msg, state, &mut out);
            if conn.write_all(&out).await.is_err() {
                return;
            }
        }
    }
}

fn reply(stream: u32, m: &AgentMsg, out: &mut BytesMut) {
    Frame::control(stream, serde_json::to_vec(m).unwrap_or_default()).encode_into(out);
}

fn answer(stream: u32, msg: HostMsg, state: &Mutex<FakeAgentState>, out: &mut BytesMut) {
    let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
    if !matches!(msg, HostMsg::Hello { .. } | HostMsg::Credit { .. }) {
        st.requests.push(msg.clone());
    }
    let m = match msg {
        HostMsg::Hello { nonce, protocol } => {
            // A hello is answered after a SYNC marker: the client hunts for it.
            out.extend_from_slice(&SYNC);
            AgentMsg::HelloAck(HelloAck {
                nonce,
                protocol,
                pid: 1,
                boot_id: "fake-boot".into(),
                agent_version: "fake".into(),
            })
        }
        HostMsg::Health => AgentMsg::Health(Health {
            pid: 1,
            uptime_ms: 0,
            agent_version: "fake".into(),
            boot_id: "fake-boot".into(),
        }),
        HostMsg::SetClock { .. } => AgentMsg::ClockSet { applied: true },
        HostMsg::GetDefaults => AgentMsg::Defaults {
            defaults: st.defaults.clone(),
        },
        HostMsg::SetDefaults { defaults } => {
            st.defaults = defaults;
            AgentMsg::Done { bytes: 0 }
        }
        HostMsg::KillPid { .. } => AgentMsg::Done { bytes: 0 },
        HostMsg::Credit { .. } | HostMsg::Resize { .. } | HostMsg::Signal { .. } => return,
        HostMsg::Exec(req) => {
            reply(
                stream,
                &AgentMsg::ExecStarted {
                    pid: 1000 + stream as i32,
                    pty: req.pty.is_some(),
                },
                out,
            );
            Frame::data(stream, channel::STDOUT, req.command.clone().into_bytes()).encode_into(out);
            let code = req
                .command
                .strip_prefix("exit ")
                .and_then(|n| n.trim().parse().ok())
                .unwrap_or(0);
            AgentMsg::Exit(ExitStatus {
                code: Some(code),
                signal: None,
                timed_out: false,
            })
        }
        other => AgentMsg::Error(ErrorReply {
            code: ErrorCode::Unsupported,
            message: format!("the fake agent does not serve {other:?}"),
        }),
    };
    reply(stream, &m, out);
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::AgentClient;

    #[tokio::test]
    async fn a_real_client_talks_to_it() {
        let dir = tempfile::tempdir().unwrap();
        let agent =
            FakeAgent::serve(&dir.path().join("a.sock"), RuntimeDefaults::default()).unwrap();
        let client = AgentClient::connect_unix(agent.socket(), Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(client.agent_info().pid, 1);
        let mut d = client.get_defaults().await.unwrap();
        d.env.insert("A".into(), "1".into());
        client.set_defaults(d).await.unwrap();
        assert_eq!(agent.state().defaults.env["A"], "1");
        let out = client
            .exec_collect(crate::ExecRequest {
                command: "exit 3".into(),
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(out.status.code, Some(3));
        assert_eq!(out.stdout, b"exit 3");
        assert!(client.stat("/x").await.is_err());
    }
}
