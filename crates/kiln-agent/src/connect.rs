//! `connect`: a TCP connection to a port on the guest's loopback, relayed over the
//! protocol. It is how a preview URL's request reaches a web server in the sandbox
//! without any port of the host being involved, and it survives pause and resume the way
//! every other stream does: a resumed VM's agent gets a new host connection, whose hello
//! ends the old streams.
//!
//! Two threads per connection: this stream's reader (socket -> host, under the host's
//! credit) and its writer (host -> socket, returning credit as it writes).

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use kiln_agent_proto::frame::{channel, DATA_CHUNK};
use kiln_agent_proto::{AgentMsg, ErrorCode};

use crate::server::{spawn_worker, Ctx, Entry, Input};

/// How long a connect to the guest's loopback may take: it is refused or accepted at
/// once unless the listener's backlog is full.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How often a writer waiting for the host's bytes looks whether the stream was closed.
const CLOSE_POLL: Duration = Duration::from_millis(200);

/// What the protocol loop holds of a connection, to end it on the host's `close`.
#[derive(Debug, Default)]
pub struct Conn {
    /// Set while the relay runs: once every descriptor of the socket is closed, a guest
    /// server still sending gets a reset instead of blocking on a full buffer.
    socket: Mutex<Option<TcpStream>>,
    closed: AtomicBool,
}

impl Conn {
    /// The host's `close` (or the host gone): the connection is aborted. Its socket is
    /// shut down both ways, which ends the reader, the writer stops at its next look, and
    /// the last close of the socket resets the connection (linger 0): a guest server
    /// still sending sees the reset, where an orderly close would let it write into
    /// the void.
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        if let Some(s) = self.socket().as_ref() {
            let abort = libc::linger {
                l_onoff: 1,
                l_linger: 0,
            };
            let _ = nix::sys::socket::setsockopt(s, nix::sys::socket::sockopt::Linger, &abort);
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    fn socket(&self) -> std::sync::MutexGuard<'_, Option<TcpStream>> {
        self.socket.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }
}

/// Starts a `connect` to `port`. The stream's entry exists at once, so that the host's
/// first bytes (sent after `connected`) have somewhere to wait.
pub fn start(ctx: Ctx, port: u16) -> Option<Entry> {
    let (tx, rx) = mpsc::channel::<Input>();
    let conn = Arc::new(Conn::default());
    let done = Arc::new(AtomicBool::new(false));
    let entry = Entry {
        done: done.clone(),
        pid: None,
        input: Some(tx),
        window: ctx.window.clone(),
        pty: None,
        conn: Some(conn.clone()),
    };
    spawn_worker(move || {
        relay(&ctx, port, rx, &conn);
        done.store(true, Ordering::SeqCst);
    });
    Some(entry)
}

/// The guest's loopback, IPv4 first: a server bound to `localhost` may listen on either
/// (Node resolves `localhost` to `::1` first).
fn connect_loopback(port: u16) -> std::io::Result<TcpStream> {
    let v4 = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    match TcpStream::connect_timeout(&v4, CONNECT_TIMEOUT) {
        Ok(s) => Ok(s),
        Err(e4) => {
            let v6 = SocketAddr::from((Ipv6Addr::LOCALHOST, port));
            // An IPv6 failure says less than the IPv4 one (often: no IPv6 at all).
            TcpStream::connect_timeout(&v6, CONNECT_TIMEOUT).map_err(|_| e4)
        }
    }
}

fn relay(ctx: &Ctx, port: u16, rx: mpsc::Receiver<Input>, conn: &Arc<Conn>) {
    let sock = match connect_loopback(port) {
        Ok(s) => s,
        Err(e) => {
            let code = if e.kind() == std::io::ErrorKind::ConnectionRefused {
                ErrorCode::ConnectionRefused
            } else {
                ErrorCode::Io
            };
            ctx.error(code, format!("connect to port {port}: {e}"));
            return;
        }
    };
    // Requests and responses are small writes: waiting to coalesce them only adds latency.
    let _ = sock.set_nodelay(true);
    let (reader, writer) = match (sock.try_clone(), sock.try_clone()) {
        (Ok(r), Ok(w)) => (r, w),
        (Err(e), _) | (_, Err(e)) => {
            ctx.error(ErrorCode::Io, format!("connection to port {port}: {e}"));
            return;
        }
    };
    *conn.socket() = Some(sock);
    if conn.is_closed() {
        conn.close();
    }
    ctx.reply(&AgentMsg::Connected);

    let (wctx, wconn) = (ctx.clone(), conn.clone());
    let (writer_done_tx, writer_done) = mpsc::channel::<()>();
    spawn_worker(move || {
        feed(&wctx, writer, &rx, &wconn);
        drop(writer_done_tx);
    });

    let total = pump(ctx, reader, conn);
    ctx.eof(channel::STDOUT);
    // Both directions end before the stream does.
    let _ = writer_done.recv();
    conn.socket().take();
    ctx.reply(&AgentMsg::Done { bytes: total });
}

/// Socket -> host until the guest's end of data, a close, or the host going away.
/// Returns the bytes sent.
fn pump(ctx: &Ctx, mut sock: TcpStream, conn: &Conn) -> u64 {
    let mut buf = vec![0u8; DATA_CHUNK];
    let mut total = 0u64;
    loop {
        match sock.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                // Blocks for the host's credit; false once the host is gone or closed
                // the stream, whose bytes then go nowhere.
                if !ctx.data(channel::STDOUT, Bytes::copy_from_slice(&buf[..n])) {
                    conn.close();
                    break;
                }
                total += n as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
    }
    total
}

/// Host -> socket: the host's bytes are written and credited (also once the guest stopped
/// reading, so the host never blocks); its eof half-closes the socket. The end of the
/// input channel (the host went away) or a close shuts the socket down both ways.
fn feed(ctx: &Ctx, mut sock: TcpStream, rx: &mpsc::Receiver<Input>, conn: &Conn) {
    let mut broken = false;
    loop {
        if conn.is_closed() {
            return;
        }
        match rx.recv_timeout(CLOSE_POLL) {
            Ok(Input::Data(b)) => {
                if !broken && sock.write_all(&b).is_err() {
                    broken = true;
                }
                ctx.reply(&AgentMsg::Credit {
                    bytes: b.len() as u32,
                });
            }
            Ok(Input::Eof) => {
                let _ = sock.shutdown(Shutdown::Write);
                return;
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                conn.close();
                return;
            }
        }
    }
}
