//! A scripted guest agent for tests of the host side (feature `fake`): it speaks the real
//! protocol on a unix socket, so [`crate::AgentClient`] connects to it as to a VM's agent,
//! but it runs nothing.
//!
//! It answers the handshake, `health`, `set_clock`, `get_defaults`/`set_defaults` (kept in
//! memory), `kill_pid`, and `exec`: the command is not run; its stdout is the command
//! text, and a command of the form `exit N` exits with `N` (0 otherwise). `connect`
//! reaches the port on the *host's* loopback (a test runs its "guest app" there), relayed
//! as the real agent relays a guest port. Everything else is an `unsupported` error
//! (`exec` with `pty` is confirmed as a terminal; `signal` and `resize` get no reply, as
//! from the real agent). Every request is recorded for the test to inspect.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpStream, UnixListener, UnixStream};
use tokio::sync::mpsc;

use crate::frame::{channel, DecodeEvent, Decoder, Frame, FrameKind, MAX_FRAME, SYNC};
use crate::msg::{
    AgentMsg, DirEntry, ErrorCode, ErrorReply, ExitStatus, FileKind, FileStat, Health, HelloAck,
    HostMsg, RuntimeDefaults,
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
    /// Files served, by absolute path.
    pub files: BTreeMap<String, FakeFile>,
}

/// A file the fake agent serves.
#[derive(Debug, Clone, Default)]
pub struct FakeFile {
    /// The size `stat` and `list_dir` report.
    pub listed_size: u64,
    /// What `read_file` sends.
    pub data: Bytes,
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

    /// Serves `data` at the absolute `path`, listed as `listed_size` bytes.
    pub fn add_file(&self, path: &str, listed_size: u64, data: impl Into<Bytes>) {
        let file = FakeFile {
            listed_size,
            data: data.into(),
        };
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.files.insert(path.to_owned(), file);
    }

    /// A copy of its state.
    pub fn state(&self) -> FakeAgentState {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// The host's bytes for one `connect` stream (data, or `None` for its eof).
type ConnInput = mpsc::UnboundedSender<Option<Bytes>>;

async fn serve_connection(conn: UnixStream, state: &Mutex<FakeAgentState>) {
    let (mut r, mut w) = conn.into_split();
    let (out_tx, mut out_rx) = mpsc::unbounded_channel::<Bytes>();
    let writer = tokio::spawn(async move {
        while let Some(b) = out_rx.recv().await {
            if w.write_all(&b).await.is_err() {
                return;
            }
        }
    });
    let mut conns: HashMap<u32, ConnInput> = HashMap::new();
    let mut dec = Decoder::new_hunting(MAX_FRAME);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        dec.push(&buf[..n]);
        while let Some(ev) = dec.next_event() {
            let DecodeEvent::Frame(f) = ev else { continue };
            match f.kind {
                FrameKind::Data | FrameKind::Eof => {
                    if let Some(tx) = conns.get(&f.stream) {
                        let len = f.payload.len() as u32;
                        let eof = f.kind == FrameKind::Eof;
                        let _ = tx.send((!eof).then_some(f.payload));
                        if !eof {
                            let mut out = BytesMut::new();
                            reply(f.stream, &AgentMsg::Credit { bytes: len }, &mut out);
                            let _ = out_tx.send(out.freeze());
                        }
                    }
                    continue;
                }
                FrameKind::Control => {}
            }
            let Ok(msg) = serde_json::from_slice::<HostMsg>(&f.payload) else {
                continue;
            };
            match msg {
                HostMsg::Connect { port } => {
                    record(state, &msg);
                    let (tx, rx) = mpsc::unbounded_channel();
                    conns.insert(f.stream, tx);
                    tokio::spawn(relay(f.stream, port, rx, out_tx.clone()));
                }
                HostMsg::Close => {
                    record(state, &msg);
                    conns.remove(&f.stream);
                }
                msg => {
                    let mut out = BytesMut::new();
                    answer(f.stream, msg, state, &mut out);
                    if out_tx.send(out.freeze()).is_err() {
                        break;
                    }
                }
            }
        }
    }
    // The host went away: its connections close, as the real agent's do.
    drop(conns);
    writer.abort();
}

fn record(state: &Mutex<FakeAgentState>, msg: &HostMsg) {
    state
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .requests
        .push(msg.clone());
}

/// One `connect`: the host's loopback `port`, relayed both ways until both ends are done
/// or the host closes the stream (drops its sender). Credit is not enforced.
async fn relay(
    stream: u32,
    port: u16,
    mut input: mpsc::UnboundedReceiver<Option<Bytes>>,
    out: mpsc::UnboundedSender<Bytes>,
) {
    let send = |m: &AgentMsg| {
        let mut b = BytesMut::new();
        reply(stream, m, &mut b);
        let _ = out.send(b.freeze());
    };
    let sock = match TcpStream::connect(("127.0.0.1", port)).await {
        Ok(s) => s,
        Err(e) => {
            send(&AgentMsg::Error(ErrorReply {
                code: if e.kind() == std::io::ErrorKind::ConnectionRefused {
                    ErrorCode::ConnectionRefused
                } else {
                    ErrorCode::Io
                },
                message: format!("connect to port {port}: {e}"),
            }));
            return;
        }
    };
    send(&AgentMsg::Connected);
    let (mut sr, mut sw) = sock.into_split();
    let (mut to_guest_done, mut from_guest_done) = (false, false);
    let mut total = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    while !(to_guest_done && from_guest_done) {
        tokio::select! {
            // Still read after the host's eof: the end of the channel is its `close`.
            item = input.recv() => match item {
                Some(Some(b)) => {
                    if to_guest_done || sw.write_all(&b).await.is_err() {
                        to_guest_done = true;
                    }
                }
                Some(None) => {
                    if !to_guest_done {
                        let _ = sw.shutdown().await;
                    }
                    to_guest_done = true;
                }
                // Closed by the host: abort the connection (a reset, as the real agent).
                None => {
                    let _ = sw.as_ref().set_zero_linger();
                    break;
                }
            },
            n = sr.read(&mut buf), if !from_guest_done => match n {
                Ok(0) | Err(_) => {
                    from_guest_done = true;
                    let _ = out.send(Frame::eof(stream, channel::STDOUT).encode());
                }
                Ok(n) => {
                    total += n as u64;
                    let data = Bytes::copy_from_slice(&buf[..n]);
                    let _ = out.send(Frame::data(stream, channel::STDOUT, data).encode());
                }
            },
        }
    }
    send(&AgentMsg::Done { bytes: total });
}

/// A served file's stat, or a directory's when files lie under `path`.
fn stat(files: &BTreeMap<String, FakeFile>, path: &str) -> Option<FileStat> {
    let (kind, size, mode) = match files.get(path) {
        Some(f) => (FileKind::File, f.listed_size, 0o644),
        None => {
            let prefix = format!("{}/", path.trim_end_matches('/'));
            files.keys().find(|p| p.starts_with(&prefix))?;
            (FileKind::Dir, 0, 0o755)
        }
    };
    Some(FileStat {
        kind,
        size,
        mode,
        uid: 0,
        gid: 0,
        mtime_unix_nanos: 0,
        link_target: None,
    })
}

fn not_found(path: &str) -> AgentMsg {
    AgentMsg::Error(ErrorReply {
        code: ErrorCode::NotFound,
        message: format!("{path}: no such file"),
    })
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
        HostMsg::Stat { path } => match stat(&st.files, &path) {
            Some(stat) => AgentMsg::Stat(stat),
            None => not_found(&path),
        },
        HostMsg::ListDir { path } => {
            let prefix = format!("{}/", path.trim_end_matches('/'));
            let mut names: Vec<&str> = st
                .files
                .keys()
                .filter_map(|p| p.strip_prefix(&prefix)?.split('/').next())
                .collect();
            names.dedup();
            let entries = names
                .into_iter()
                .filter_map(|name| {
                    let stat = stat(&st.files, &format!("{prefix}{name}"))?;
                    let name = name.to_owned();
                    Some(DirEntry { name, stat })
                })
                .collect();
            reply(stream, &AgentMsg::DirEntries { entries }, out);
            AgentMsg::Done { bytes: 0 }
        }
        HostMsg::ReadFile { path, .. } => match st.files.get(&path) {
            Some(f) => {
                for chunk in f.data.chunks(64 * 1024) {
                    let chunk = f.data.slice_ref(chunk);
                    Frame::data(stream, channel::STDOUT, chunk).encode_into(out);
                }
                AgentMsg::Done {
                    bytes: f.data.len() as u64,
                }
            }
            None => not_found(&path),
        },
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
    use crate::{AgentClient, ClientError};

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

    #[tokio::test]
    async fn connect_relays_a_port_both_ways() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let dir = tempfile::tempdir().unwrap();
        let agent =
            FakeAgent::serve(&dir.path().join("a.sock"), RuntimeDefaults::default()).unwrap();
        let client = AgentClient::connect_unix(agent.socket(), Duration::from_secs(5))
            .await
            .unwrap();
        // An upper-casing echo server stands in for the guest's app.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).await.unwrap();
            s.write_all(&got.to_ascii_uppercase()).await.unwrap();
        });
        let mut conn = client.connect_port(port).await.unwrap();
        // More than the flow-control window, so credit has to come back.
        let sent = vec![b'a'; 3 * crate::INITIAL_WINDOW as usize / 2];
        conn.write_all(&sent).await.unwrap();
        conn.shutdown().await.unwrap();
        let mut back = Vec::new();
        conn.read_to_end(&mut back).await.unwrap();
        assert_eq!(back.len(), sent.len());
        assert!(back.iter().all(|b| *b == b'A'));

        // Nothing listens on a port that was just freed.
        let free = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dead = free.local_addr().unwrap().port();
        drop(free);
        let err = client.connect_port(dead).await.unwrap_err();
        assert!(
            matches!(
                err,
                ClientError::Agent {
                    code: ErrorCode::ConnectionRefused,
                    ..
                }
            ),
            "{err:?}"
        );
    }
}
