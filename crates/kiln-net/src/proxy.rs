//! The egress proxy: one long-lived process per VM, serving every connection its guest
//! makes to the outside.
//!
//! A VM's guest reaches nothing on or through the host: QEMU runs in a network namespace
//! of its own (see `kiln_vm::jail`) where the only thing listening is this proxy, on the
//! address its user network maps the guest's [`kiln_agent_proto::EGRESS_PROXY`] to. The
//! proxy itself runs jailed, as an unprivileged user with the host's network, and reads
//! the sandbox's files through its owner ([`crate::broker`]). For every connection it
//! reads one HTTP proxy request (`CONNECT host:port` for TLS and anything else, or an
//! absolute-form `GET http://...`), resolves the name on the host, checks every address
//! against the sandbox's rules and the always-blocked ranges (and the host's own
//! addresses), connects to an address that passed, and splices bytes until either side
//! closes or the connection is idle ([`crate::idle`]).
//!
//! Deciding on the resolved address and connecting to that same address (never
//! re-resolving) keeps DNS rebinding from slipping a private address past the check. The
//! rules are read per connection, so a PATCH applies to the next connection at once.
//!
//! A guest cannot take the host down through it: the connections it serves at once are
//! capped ([`Limits::max_connections`]; past the cap a connection gets a 503 at once), a
//! request head must arrive whole within [`Limits::header_timeout`], and a connection
//! that moves no byte for [`Limits::idle_timeout`] is closed. Its process is one per VM,
//! in a cgroup of its own, so a flood costs that VM's proxy its threads and nothing more.
//!
//! A connection to a host one of the sandbox's secrets is bound to (its bindings,
//! [`crate::secrets`]) is opened up instead of spliced: TLS is terminated with a leaf of
//! kiln's egress CA ([`crate::ca`]), which every guest trusts, and re-originated to the
//! real host, verified against the system roots and the operator's bundle; each request
//! in between has its stand-ins swapped ([`crate::intercept`]). Connections to any other
//! host are never opened: a stand-in sent there goes out as it is.

use std::collections::HashMap;
use std::io::{BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use kiln_api::{NetworkEvent, NetworkVerdict};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncBufRead, AsyncBufReadExt as _, AsyncRead, AsyncReadExt as _};
use tokio::io::{AsyncWrite, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::io::SyncIoBridge;

use crate::ca::{parse_pem_certs, EgressCa, LEAF_REISSUE};
use crate::files::{Files, Sink, Source};
use crate::idle::{Activity, Idle};
use crate::intercept::{parse_request, relay, Duplex, Recorder, Relay, RequestRecord, Secrets};
use crate::rules::{always_blocked, canonical, Decision, NetworkConfig, Policy, PrivateDest};
use crate::seal::KeyRing;
use crate::secrets::{Binding, SandboxSecrets};

/// Longest request head accepted from the guest.
const MAX_HEAD: usize = 16 * 1024;
/// Bound on connecting to the destination.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on telling a guest past the connection cap that it is.
const BUSY_REPLY_TIMEOUT: Duration = Duration::from_secs(1);
const ESTABLISHED: &[u8] = b"HTTP/1.1 200 Connection established\r\n\r\n";

/// What a guest may hold of its proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections served at once; more are answered 503 and closed.
    pub max_connections: usize,
    /// From accepting a connection to its whole request head.
    pub header_timeout: Duration,
    /// How long a connection may move no byte either way.
    pub idle_timeout: Duration,
}

impl Default for Limits {
    /// 256 connections, 10 s for a head, 5 min of silence.
    fn default() -> Self {
        Self {
            max_connections: 256,
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
        }
    }
}

/// What the proxy did with one connection (also its log line).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Tunnelled or forwarded to this address (opened up when secrets were bound to it).
    Connected {
        /// The request target as the guest gave it.
        target: String,
        /// The address connected to.
        addr: SocketAddr,
        /// Bytes from the guest to the destination.
        bytes_sent: u64,
        /// Bytes from the destination to the guest.
        bytes_recv: u64,
    },
    /// Refused with this HTTP status and reason.
    Refused {
        /// The request target, when one was read.
        target: String,
        /// HTTP status sent to the guest.
        status: u16,
        /// Why.
        reason: String,
    },
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Connected { target, addr, .. } => write!(f, "allowed {target} -> {addr}"),
            Self::Refused {
                target,
                status,
                reason,
            } => write!(f, "refused {target} ({status}): {reason}"),
        }
    }
}

impl Outcome {
    /// The connection as a row of the sandbox's network log, in the SDKs' shape
    /// (`kind: connection`, `verdict: allowed | blocked | failed`).
    pub fn log_record(&self, id: i64, ts: DateTime<Utc>) -> NetworkEvent {
        let (host, port) = split_target(self.target());
        let mut event = NetworkEvent {
            kind: "connection".into(),
            id,
            ts,
            host: Some(host),
            dst_ip: None,
            dst_port: port,
            verdict: NetworkVerdict::Allowed,
            ..NetworkEvent::default()
        };
        match self {
            Self::Connected {
                addr,
                bytes_sent,
                bytes_recv,
                ..
            } => {
                event.dst_ip = Some(addr.ip().to_string());
                event.dst_port = Some(addr.port());
                event.bytes_sent = *bytes_sent;
                event.bytes_recv = *bytes_recv;
            }
            Self::Refused { status, reason, .. } => {
                event.verdict = if *status == 403 {
                    NetworkVerdict::Blocked
                } else {
                    NetworkVerdict::Failed
                };
                event.match_rule = Some(reason.clone());
                event.error_code = Some(status.to_string());
            }
        }
        event
    }

    fn target(&self) -> &str {
        match self {
            Self::Connected { target, .. } | Self::Refused { target, .. } => target,
        }
    }
}

/// `host:port` or `[v6]:port` as logged: the host without brackets, and the port.
fn split_target(target: &str) -> (String, Option<u16>) {
    match target.rsplit_once(':') {
        Some((h, p)) => (h.trim_matches(['[', ']']).to_owned(), p.parse().ok()),
        None => (target.to_owned(), None),
    }
}

/// One parsed request head.
#[derive(Debug, Clone)]
struct Request {
    /// `CONNECT`: tunnel; otherwise forward `head` (rewritten to origin form).
    tunnel: bool,
    host: String,
    port: u16,
    head: Vec<u8>,
}

/// Ids order the logs (the SDKs page with them): the time in microseconds, made strictly
/// increasing within the process.
#[derive(Debug, Default)]
struct Stamps(AtomicI64);

impl Stamps {
    fn next(&self) -> (i64, DateTime<Utc>) {
        let now = Utc::now();
        let micros = now.timestamp_micros();
        let prev = self
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |last| {
                Some(micros.max(last + 1))
            })
            .unwrap_or(micros);
        (micros.max(prev + 1), now)
    }
}

/// Request records into the sandbox's network log and the secret's audit, through the
/// proxy's [`Files`].
struct FilesRecorder {
    files: Arc<dyn Files>,
    stamps: Arc<Stamps>,
}

impl Recorder for FilesRecorder {
    fn request(&self, record: &RequestRecord) {
        let (id, ts) = self.stamps.next();
        append(&*self.files, &Sink::Network, &record.network_event(id, ts));
        if let Some(secret) = &record.secret_id {
            append(
                &*self.files,
                &Sink::Audit(secret.clone()),
                &record.audit_event(id, ts),
            );
        }
    }
}

fn append(files: &dyn Files, sink: &Sink, record: &impl serde::Serialize) {
    let line = serde_json::to_vec(record).unwrap_or_default();
    if let Err(e) = files.append(sink, &line) {
        tracing::warn!(error = %kiln_spec::error_chain(&e), ?sink, "cannot write a log line");
    }
}

/// Leaves of kiln's CA this process issued, by CA fingerprint and host.
type Leaves = HashMap<(String, String), (tokio::time::Instant, Leaf)>;
type Leaf = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

/// One VM's egress proxy.
pub struct Proxy {
    allow_private: Vec<PrivateDest>,
    files: Arc<dyn Files>,
    recorder: Arc<dyn Recorder>,
    stamps: Arc<Stamps>,
    limits: Limits,
    leaves: Mutex<Leaves>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("allow_private", &self.allow_private)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl Proxy {
    /// A proxy reading and logging through `files`, opening the private destinations
    /// the operator opened (`KILN_EGRESS_ALLOW_PRIVATE`).
    pub fn new(allow_private: Vec<PrivateDest>, files: Arc<dyn Files>, limits: Limits) -> Self {
        let stamps = Arc::new(Stamps::default());
        let recorder = Arc::new(FilesRecorder {
            files: files.clone(),
            stamps: stamps.clone(),
        });
        Self {
            allow_private,
            files,
            recorder,
            stamps,
            limits,
            leaves: Mutex::default(),
        }
    }

    /// The same, with request records going to `recorder` instead (tests).
    pub fn with_recorder(mut self, recorder: Arc<dyn Recorder>) -> Self {
        self.recorder = recorder;
        self
    }

    /// Serves `listener` until it fails: every connection in a task of its own, at most
    /// [`Limits::max_connections`] at once, each logged to the network log when it ends.
    pub async fn run(self: Arc<Self>, listener: TcpListener) -> std::io::Result<()> {
        let slots = Arc::new(Semaphore::new(self.limits.max_connections));
        loop {
            let stream = match listener.accept().await {
                Ok((s, _)) => s,
                // Out of descriptors or memory for a moment: the guest retries.
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let me = self.clone();
            match slots.clone().try_acquire_owned() {
                Ok(slot) => {
                    tokio::spawn(async move {
                        let outcome = me.handle(stream).await;
                        drop(slot);
                        me.log(outcome).await;
                    });
                }
                Err(_) => {
                    tokio::spawn(async move {
                        let reason = format!(
                            "this sandbox has {} connections open through the proxy, its limit",
                            me.limits.max_connections
                        );
                        let mut stream = stream;
                        let outcome = tokio::time::timeout(
                            BUSY_REPLY_TIMEOUT,
                            refuse(&mut stream, "-", 503, reason.clone()),
                        )
                        .await
                        .unwrap_or(Outcome::Refused {
                            target: "-".into(),
                            status: 503,
                            reason,
                        });
                        drop(stream);
                        me.log(outcome).await;
                    });
                }
            }
        }
    }

    async fn log(&self, outcome: Outcome) {
        let (files, (id, ts)) = (self.files.clone(), self.stamps.next());
        let _ = tokio::task::spawn_blocking(move || {
            append(&*files, &Sink::Network, &outcome.log_record(id, ts));
        })
        .await;
    }

    /// Serves one connection: `stream` is the guest's side of it.
    pub async fn handle<S>(self: &Arc<Self>, stream: S) -> Outcome
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let mut guest = tokio::io::BufReader::new(stream);
        let limit = self.limits.header_timeout;
        let req = match tokio::time::timeout(limit, read_request(&mut guest)).await {
            Ok(Ok(r)) => r,
            Ok(Err(reason)) => return refuse(&mut guest, "-", 400, reason).await,
            Err(_) => {
                let reason = format!("no complete request head within {limit:?}");
                return refuse(&mut guest, "-", 408, reason).await;
            }
        };
        let target = format!("{}:{}", req.host, req.port);
        let me = self.clone();
        let r = req.clone();
        let decided = tokio::task::spawn_blocking(move || me.decide(&r))
            .await
            .unwrap_or_else(|e| Err((503, e.to_string())));
        let (addr, intercept) = match decided {
            Ok(d) => d,
            Err((status, reason)) => return refuse(&mut guest, &target, status, reason).await,
        };
        let upstream = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                return refuse(&mut guest, &target, 502, format!("connect {addr}: {e}")).await
            }
            Err(_) => {
                let reason = format!("connect {addr}: no answer within {CONNECT_TIMEOUT:?}");
                return refuse(&mut guest, &target, 502, reason).await;
            }
        };
        let activity = Activity::new(self.limits.idle_timeout);
        let mut guest = Idle::new(guest, activity.clone());
        let mut upstream = Idle::new(upstream, activity);
        if intercept {
            return self.open_up(guest, upstream, req, target, addr).await;
        }
        let sent = if req.tunnel {
            guest.write_all(ESTABLISHED).await
        } else {
            upstream.write_all(&req.head).await
        };
        if let Err(e) = sent {
            return refuse(guest.get_mut(), &target, 502, format!("write: {e}")).await;
        }
        // Idle, or a side reset: the connection ends either way; what moved, moved.
        let _ = tokio::io::copy_bidirectional(&mut guest, &mut upstream).await;
        Outcome::Connected {
            target,
            addr,
            bytes_sent: guest.bytes_read(),
            bytes_recv: upstream.bytes_read(),
        }
    }

    /// The sandbox's rules and bindings as they are now, and where the request may go:
    /// the address to connect to and whether it is opened up for a secret.
    fn decide(&self, req: &Request) -> Result<(SocketAddr, bool), (u16, String)> {
        let policy = load_policy(&*self.files).map_err(|r| (503, r))?;
        let intercept = match self.files.read(Source::Secrets) {
            Ok(Some(bytes)) => SandboxSecrets::parse(&bytes)
                .map_err(|e| (503, e.to_string()))?
                .intercepts(&req.host, req.port),
            Ok(None) => false,
            Err(e) => return Err((503, kiln_spec::error_chain(&e))),
        };
        let addr = choose_addr(
            req,
            &policy,
            &self.allow_private,
            &host_addresses(),
            &system_resolve,
        )?;
        Ok((addr, intercept))
    }

    /// A connection to a secret's host, relayed request by request in a blocking task
    /// (the relay and rustls are synchronous; a task per connection is within the cap).
    async fn open_up<S>(
        self: &Arc<Self>,
        guest: Idle<tokio::io::BufReader<S>>,
        upstream: Idle<TcpStream>,
        req: Request,
        target: String,
        addr: SocketAddr,
    ) -> Outcome
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (r, w) = tokio::io::split(guest);
        let (r, w, up) = (
            SyncIoBridge::new(r),
            SyncIoBridge::new(w),
            SyncIoBridge::new(upstream),
        );
        let me = self.clone();
        tokio::task::spawn_blocking(move || {
            match me.open_up_blocking(BufReader::new(r), w, up, &req) {
                Ok((bytes_sent, bytes_recv)) => Outcome::Connected {
                    target,
                    addr,
                    bytes_sent,
                    bytes_recv,
                },
                Err(Refusal { reply, reason }) => {
                    let reason = format!("{addr}: {reason}");
                    match reply {
                        Some(mut out) => refuse_sync(&mut out, &target, 502, reason),
                        None => Outcome::Refused {
                            target,
                            status: 502,
                            reason,
                        },
                    }
                }
            }
        })
        .await
        .unwrap_or_else(|e| Outcome::Refused {
            target: "-".into(),
            status: 502,
            reason: e.to_string(),
        })
    }

    /// Relays a connection to a secret's host request by request: over TLS for a tunnel
    /// (the upstream's handshake first, so a host that fails verification is refused
    /// before the guest is told the tunnel is up), in plain HTTP for a forward. Returns
    /// the bytes from and to the guest.
    fn open_up_blocking<I, O, U>(
        &self,
        reader: BufReader<I>,
        mut output: O,
        upstream: U,
        req: &Request,
    ) -> Result<(u64, u64), Refusal<O>>
    where
        I: Read,
        O: Write,
        U: Read + Write,
    {
        let read = Arc::new(AtomicU64::new(0));
        let written = Arc::new(AtomicU64::new(0));
        let counts = |r: &Arc<AtomicU64>, w: &Arc<AtomicU64>| {
            (r.load(Ordering::Relaxed), w.load(Ordering::Relaxed))
        };
        let secrets = FileSecrets(self.files.clone());
        let ctx = Relay {
            host: &req.host,
            port: req.port,
            secrets: &secrets,
            recorder: &*self.recorder,
            one_request: !req.tunnel,
        };
        if !req.tunnel {
            let first = match parse_request(&req.head) {
                Ok(h) => h,
                Err(e) => {
                    return Err(Refusal {
                        reply: Some(output),
                        reason: e.to_string(),
                    })
                }
            };
            let mut guest = BufReader::new(Duplex {
                r: reader,
                w: output,
                read: read.clone(),
                written: written.clone(),
            });
            let mut up = BufReader::new(upstream);
            let _ = relay(&mut guest, &mut up, Some(first), &ctx);
            return Ok(counts(&read, &written));
        }
        let refuse = |output, reason: String| Refusal {
            reply: Some(output),
            reason,
        };
        let client = match self.client_config() {
            Ok(c) => c,
            Err(e) => return Err(refuse(output, e)),
        };
        let name = match rustls::pki_types::ServerName::try_from(req.host.clone()) {
            Ok(n) => n,
            Err(e) => return Err(refuse(output, format!("{}: {e}", req.host))),
        };
        let mut tcp = upstream;
        let mut tls = match rustls::ClientConnection::new(Arc::new(client), name) {
            Ok(c) => c,
            Err(e) => return Err(refuse(output, e.to_string())),
        };
        while tls.is_handshaking() {
            if let Err(e) = tls.complete_io(&mut tcp) {
                return Err(refuse(output, format!("TLS with the upstream: {e}")));
            }
        }
        let server = match self.server_config(&req.host) {
            Ok(s) => s,
            Err(e) => return Err(refuse(output, e)),
        };
        if let Err(e) = output.write_all(ESTABLISHED).and_then(|()| output.flush()) {
            return Err(Refusal {
                reply: None,
                reason: format!("write: {e}"),
            });
        }
        let mut duplex = Duplex {
            r: reader,
            w: output,
            read: read.clone(),
            written: written.clone(),
        };
        let mut guest_tls =
            rustls::ServerConnection::new(Arc::new(server)).map_err(|e| Refusal {
                reply: None,
                reason: e.to_string(),
            })?;
        while guest_tls.is_handshaking() {
            if let Err(e) = guest_tls.complete_io(&mut duplex) {
                return Err(Refusal {
                    reply: None,
                    reason: format!("TLS with the guest (does it trust kiln's egress CA?): {e}"),
                });
            }
        }
        let mut guest = BufReader::new(rustls::StreamOwned::new(guest_tls, duplex));
        let mut up = BufReader::new(rustls::StreamOwned::new(tls, tcp));
        let _ = relay(&mut guest, &mut up, None, &ctx);
        let guest = guest.get_mut();
        guest.conn.send_close_notify();
        let _ = guest.flush();
        Ok(counts(&read, &written))
    }

    /// Verifies upstreams against the system roots and the operator's bundle; speaks
    /// HTTP/1.1 only (the relay's protocol).
    fn client_config(&self) -> Result<rustls::ClientConfig, String> {
        static NATIVE: OnceLock<Vec<CertificateDer<'static>>> = OnceLock::new();
        let native = NATIVE.get_or_init(|| rustls_native_certs::load_native_certs().certs);
        let mut roots = rustls::RootCertStore::empty();
        roots.add_parsable_certificates(native.iter().cloned());
        match self.files.read(Source::TrustCa) {
            Ok(Some(pem)) => {
                roots.add_parsable_certificates(parse_pem_certs(&pem));
            }
            Ok(None) => {}
            Err(e) => {
                return Err(format!(
                    "KILN_EGRESS_TRUST_CA: {}",
                    kiln_spec::error_chain(&e)
                ))
            }
        }
        if roots.is_empty() {
            return Err("no root certificates to verify the upstream with".into());
        }
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(cfg)
    }

    /// Serves the guest as `host` with a leaf of kiln's CA; HTTP/1.1 only. The CA is read
    /// for every connection (cheap, and a new CA applies at once); its leaves are kept.
    fn server_config(&self, host: &str) -> Result<rustls::ServerConfig, String> {
        let read = |source| match self.files.read(source) {
            Ok(Some(bytes)) => String::from_utf8(bytes).map_err(|_| "not PEM".to_owned()),
            Ok(None) => Err("kiln's egress CA is missing".to_owned()),
            Err(e) => Err(kiln_spec::error_chain(&e)),
        };
        let ca = EgressCa::from_pem(read(Source::CaCert)?, &read(Source::CaKey)?)
            .map_err(|e| format!("egress CA: {e}"))?;
        let (chain, key) = self.leaf(&ca, host)?;
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(|e| e.to_string())?;
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(cfg)
    }

    /// `host`'s leaf of `ca`, issued once and again well before it expires.
    fn leaf(&self, ca: &EgressCa, host: &str) -> Result<Leaf, String> {
        let key = (ca.fingerprint(), host.to_owned());
        let mut leaves = self.leaves.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((issued, (chain, key))) = leaves.get(&key) {
            if issued.elapsed() < LEAF_REISSUE {
                return Ok((chain.clone(), key.clone_key()));
            }
        }
        let (chain, leaf_key) = ca.leaf(host).map_err(|e| format!("egress CA: {e}"))?;
        leaves.insert(
            key,
            (
                tokio::time::Instant::now(),
                (chain.clone(), leaf_key.clone_key()),
            ),
        );
        Ok((chain, leaf_key))
    }
}

/// Answers the guest with `status` and `reason` and closes: what a refused connection
/// gets. One write: the guest should see the status line whole.
async fn refuse(
    out: &mut (impl AsyncWrite + Unpin),
    target: &str,
    status: u16,
    reason: String,
) -> Outcome {
    let (outcome, reply) = refusal(target, status, reason);
    let _ = out.write_all(&reply).await;
    let _ = out.flush().await;
    let _ = out.shutdown().await;
    outcome
}

/// [`refuse`], on the synchronous side of an opened-up connection.
fn refuse_sync(out: &mut impl Write, target: &str, status: u16, reason: String) -> Outcome {
    let (outcome, reply) = refusal(target, status, reason);
    let _ = out.write_all(&reply).and_then(|()| out.flush());
    outcome
}

fn refusal(target: &str, status: u16, reason: String) -> (Outcome, Vec<u8>) {
    let text = match status {
        400 => "Bad Request",
        403 => "Forbidden",
        408 => "Request Timeout",
        502 => "Bad Gateway",
        _ => "Service Unavailable",
    };
    let body = format!("kiln: egress to {target} refused: {reason}\n");
    let reply = format!(
        "HTTP/1.1 {status} {text}\r\nContent-Type: text/plain\r\nConnection: close\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    (
        Outcome::Refused {
            target: target.to_owned(),
            status,
            reason,
        },
        reply.into_bytes(),
    )
}

/// The bindings and the key, read afresh for every request.
struct FileSecrets(Arc<dyn Files>);

impl Secrets for FileSecrets {
    fn bindings(&self) -> Result<Option<SandboxSecrets>, String> {
        match self.0.read(Source::Secrets) {
            Ok(Some(bytes)) => SandboxSecrets::parse(&bytes)
                .map(Some)
                .map_err(|e| e.to_string()),
            Ok(None) => Ok(None),
            Err(e) => Err(kiln_spec::error_chain(&e)),
        }
    }

    fn open(&self, binding: &Binding) -> Result<String, String> {
        let (Some(sealed), Some(id)) = (&binding.sealed, &binding.secret_id) else {
            return Err(format!("the binding of {} is revoked", binding.env_key));
        };
        let text = match self.0.read(Source::Key) {
            Ok(Some(bytes)) => String::from_utf8(bytes).map_err(|_| "secrets key: not text")?,
            Ok(None) => return Err("secrets key: missing".into()),
            Err(e) => return Err(format!("secrets key: {}", kiln_spec::error_chain(&e))),
        };
        let ring = KeyRing::from_text(&text).map_err(|e| format!("secrets key: {e}"))?;
        let value = ring
            .open(sealed, id)
            .map_err(|e| format!("the secret of {}: {e}", binding.env_key))?;
        String::from_utf8(value)
            .map_err(|_| format!("the secret of {} is not text", binding.env_key))
    }
}

/// Why a connection that was to be opened up could not be: `reply` is the guest's side
/// when it can still be told in plain HTTP (before the tunnel is established).
struct Refusal<O> {
    reply: Option<O>,
    reason: String,
}

/// TLS settings for both sides, with ring (the provider the rest of the tree uses).
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn load_policy(files: &dyn Files) -> Result<Policy, String> {
    let text = match files.read(Source::Rules) {
        Ok(Some(t)) => t,
        Ok(None) => return Ok(Policy::default()),
        Err(e) => {
            return Err(format!(
                "network rules unreadable: {}",
                kiln_spec::error_chain(&e)
            ))
        }
    };
    let rules: NetworkConfig =
        serde_json::from_slice(&text).map_err(|e| format!("network rules unreadable: {e}"))?;
    Policy::compile(&rules).map_err(|errs| format!("network rules invalid: {errs}"))
}

async fn read_request(reader: &mut (impl AsyncBufRead + Unpin)) -> Result<Request, String> {
    let mut head = Vec::new();
    let mut lines: Vec<Vec<u8>> = Vec::new();
    loop {
        let mut line = Vec::new();
        let n = (&mut *reader)
            .take((MAX_HEAD - head.len()) as u64 + 1)
            .read_until(b'\n', &mut line)
            .await
            .map_err(|e| format!("reading the request: {e}"))?;
        if n == 0 {
            return Err("connection closed before a complete request".into());
        }
        head.extend_from_slice(&line);
        if head.len() > MAX_HEAD {
            return Err(format!("request head over {MAX_HEAD} bytes"));
        }
        if line == b"\r\n" || line == b"\n" {
            break;
        }
        lines.push(line);
    }
    let first = lines
        .first()
        .map(|l| String::from_utf8_lossy(l).trim_end().to_owned())
        .unwrap_or_default();
    let mut parts = first.split(' ');
    let (Some(method), Some(uri), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(format!("not an HTTP proxy request: {first:?}"));
    };
    if !version.starts_with("HTTP/1.") {
        return Err(format!("unsupported protocol {version:?}"));
    }
    if method == "CONNECT" {
        let (host, port) = split_host_port(uri, None)?;
        return Ok(Request {
            tunnel: true,
            host,
            port,
            head,
        });
    }
    let Some(rest) = uri.strip_prefix("http://") else {
        return Err(format!(
            "{uri:?}: only CONNECT and absolute http:// requests go through the proxy"
        ));
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let (host, port) = split_host_port(authority, Some(80))?;
    // Origin form for the destination, without the hop-by-hop proxy headers.
    let mut out = format!("{method} {path} {version}\r\n").into_bytes();
    for l in &lines[1..] {
        let lower = String::from_utf8_lossy(l).to_ascii_lowercase();
        if !lower.starts_with("proxy-connection:") && !lower.starts_with("proxy-authorization:") {
            out.extend_from_slice(l);
        }
    }
    out.extend_from_slice(b"\r\n");
    Ok(Request {
        tunnel: false,
        host,
        port,
        head: out,
    })
}

/// `host:port`, `[v6]:port`, or `host` with a default port.
fn split_host_port(s: &str, default_port: Option<u16>) -> Result<(String, u16), String> {
    let bad = || format!("bad destination {s:?}");
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (h, after) = rest.split_once(']').ok_or_else(bad)?;
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p),
            None if after.is_empty() => None,
            None => return Err(bad()),
        };
        (h, port)
    } else {
        match s.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        }
    };
    let port = match port {
        Some(p) => p.parse::<u16>().map_err(|_| bad())?,
        None => default_port.ok_or_else(bad)?,
    };
    if host.is_empty()
        || port == 0
        || !host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._:".contains(&b))
    {
        return Err(bad());
    }
    Ok((host.to_ascii_lowercase(), port))
}

/// How a name becomes addresses: [`system_resolve`], or a stand-in in tests.
type Resolve<'a> = &'a dyn Fn(&str, u16) -> std::io::Result<Vec<SocketAddr>>;

/// The host's resolver.
fn system_resolve(host: &str, port: u16) -> std::io::Result<Vec<SocketAddr>> {
    Ok((host, port).to_socket_addrs()?.collect())
}

/// Resolves the destination (when the rules let its name be looked up at all) and picks
/// the first address every rule lets through. Every address is judged in its
/// [`canonical`] form, so an IPv6 spelling of an IPv4 address (`[::ffff:a.b.c.d]`) is
/// held to that address's walls, the host's own addresses (`own`) included.
fn choose_addr(
    req: &Request,
    policy: &Policy,
    allow_private: &[PrivateDest],
    own: &[IpAddr],
    resolve: Resolve<'_>,
) -> Result<SocketAddr, (u16, String)> {
    let literal = req.host.parse::<IpAddr>().ok();
    let domain = if literal.is_some() {
        None
    } else {
        Some(req.host.as_str())
    };
    let addrs: Vec<SocketAddr> = match literal {
        Some(ip) => vec![SocketAddr::new(ip, req.port)],
        None => {
            policy.may_resolve(&req.host).map_err(|why| (403, why))?;
            resolve(&req.host, req.port)
                .map_err(|e| (502, format!("cannot resolve {}: {e}", req.host)))?
        }
    };
    let own: Vec<IpAddr> = own.iter().copied().map(canonical).collect();
    let mut last = String::from("no address");
    for a in addrs {
        let ip = a.ip();
        let opened = allow_private
            .iter()
            .any(|p| p.permits(domain, ip, req.port));
        let verdict = if opened {
            policy.decide_rules(domain, ip)
        } else if own.contains(&canonical(ip)) && always_blocked(ip).is_none() {
            Decision::Deny(format!("{ip} is an address of the host, always blocked"))
        } else {
            policy.decide(domain, ip)
        };
        match verdict {
            Decision::Allow => return Ok(a),
            Decision::Deny(why) => last = why,
        }
    }
    Err((403, last))
}

/// The host's own interface addresses: a public address of the host is still the host.
fn host_addresses() -> Vec<IpAddr> {
    let mut out = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return out;
    }
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, not yet freed.
        let ifa = unsafe { &*cur };
        if !ifa.ifa_addr.is_null() {
            // SAFETY: ifa_addr points to a sockaddr whose family says its real type.
            let family = i32::from(unsafe { (*ifa.ifa_addr).sa_family });
            if family == libc::AF_INET {
                // SAFETY: AF_INET addresses are sockaddr_in.
                let sin = unsafe { &*ifa.ifa_addr.cast::<libc::sockaddr_in>() };
                out.push(IpAddr::from(
                    u32::from_be(sin.sin_addr.s_addr).to_be_bytes(),
                ));
            } else if family == libc::AF_INET6 {
                // SAFETY: AF_INET6 addresses are sockaddr_in6.
                let sin6 = unsafe { &*ifa.ifa_addr.cast::<libc::sockaddr_in6>() };
                out.push(IpAddr::from(sin6.sin6_addr.s6_addr));
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: `head` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::read_pem_certs;
    use crate::files::FileSet;
    use std::io::{BufRead, Cursor};

    fn parse(head: &str) -> Result<Request, String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        rt.block_on(read_request(&mut Cursor::new(head.as_bytes().to_vec())))
    }

    #[test]
    fn requests_parse_into_destinations() {
        let r = parse("CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
            .expect("connect");
        assert!(r.tunnel);
        assert_eq!((r.host.as_str(), r.port), ("example.com", 443));
        let r = parse("CONNECT [2606:4700::1]:443 HTTP/1.1\r\n\r\n").expect("v6");
        assert_eq!((r.host.as_str(), r.port), ("2606:4700::1", 443));
        let r = parse(
            "GET http://Example.com/a?b HTTP/1.1\r\nHost: example.com\r\nProxy-Connection: \
             keep-alive\r\n\r\n",
        )
        .expect("get");
        assert!(!r.tunnel);
        assert_eq!((r.host.as_str(), r.port), ("example.com", 80));
        assert_eq!(
            String::from_utf8_lossy(&r.head),
            "GET /a?b HTTP/1.1\r\nHost: example.com\r\n\r\n"
        );
        for bad in [
            "GET /relative HTTP/1.1\r\n\r\n",
            "CONNECT example.com HTTP/1.1\r\n\r\n",
            "CONNECT example.com:0 HTTP/1.1\r\n\r\n",
            "CONNECT exa mple.com:443 HTTP/1.1\r\n\r\n",
            "CONNECT a/b:443 HTTP/1.1\r\n\r\n",
            "CONNECT example.com:443 SPDY/3\r\n\r\n",
            "CONNECT example.com:443 HTTP/1.1\r\n",
            "",
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
        let huge = format!(
            "GET http://a/ HTTP/1.1\r\nX: {}\r\n\r\n",
            "x".repeat(MAX_HEAD)
        );
        assert!(parse(&huge).expect_err("huge").contains("over"));
    }

    fn policy(allow: &[&str], deny: &[&str]) -> Policy {
        Policy::compile(&NetworkConfig {
            allow_out: allow.iter().map(|s| (*s).to_owned()).collect(),
            deny_out: deny.iter().map(|s| (*s).to_owned()).collect(),
        })
        .expect("rules")
    }

    /// A resolver answering `addr` for every name, counting the lookups.
    fn resolver<'a>(
        addr: &str,
        calls: &'a std::cell::Cell<usize>,
    ) -> impl Fn(&str, u16) -> std::io::Result<Vec<SocketAddr>> + 'a {
        let ip: IpAddr = addr.parse().expect("ip");
        move |_, port| {
            calls.set(calls.get() + 1);
            Ok(vec![SocketAddr::new(ip, port)])
        }
    }

    #[test]
    fn an_ipv6_spelling_of_a_host_address_is_the_host() {
        let own = ["198.51.100.7".parse().expect("ip")];
        let calls = std::cell::Cell::new(0);
        let by_name = resolver("::ffff:198.51.100.7", &calls);
        for (connect, resolve) in [
            ("[::ffff:198.51.100.7]:22", &system_resolve as Resolve<'_>),
            ("[::198.51.100.7]:22", &system_resolve),
            ("host.example:22", &by_name),
        ] {
            let req = parse(&format!("CONNECT {connect} HTTP/1.1\r\n\r\n")).expect(connect);
            let (status, why) =
                choose_addr(&req, &Policy::default(), &[], &own, resolve).expect_err(connect);
            assert_eq!(status, 403, "{connect}");
            assert!(why.contains("address of the host"), "{connect}: {why}");
        }
        assert_eq!(calls.get(), 1);
    }

    #[test]
    fn under_an_allowlist_a_name_no_rule_names_never_reaches_the_resolver() {
        let calls = std::cell::Cell::new(0);
        let resolve = resolver("140.82.112.4", &calls);
        let choose = |p: &Policy, host: &str| {
            let req = parse(&format!("CONNECT {host}:443 HTTP/1.1\r\n\r\n")).expect(host);
            choose_addr(&req, p, &[], &[], &resolve)
        };
        // Even a name whose address an allow rule opens: the lookup itself leaks.
        let allowlist = policy(&["api.example.com", "140.82.112.0/20"], &["0.0.0.0/0"]);
        let (status, why) = choose(&allowlist, "c2VjcmV0.attacker.example").expect_err("unnamed");
        assert_eq!((status, calls.get()), (403, 0), "{why}");
        let addr = choose(&allowlist, "api.example.com").expect("named");
        assert_eq!(
            (addr.to_string().as_str(), calls.get()),
            ("140.82.112.4:443", 1)
        );
        // Without an allowlist names are looked up, and their addresses decide.
        choose(&Policy::default(), "c2VjcmV0.attacker.example").expect("no allowlist");
        assert_eq!(calls.get(), 2);
    }

    /// A proxy over `files`, run on a runtime of its own: the tests are guests speaking
    /// plain blocking sockets to it.
    struct Harness {
        rt: tokio::runtime::Runtime,
        proxy: Arc<Proxy>,
    }

    impl Harness {
        fn new(allow_private: Vec<PrivateDest>, files: FileSet) -> Self {
            Self::with(Proxy::new(
                allow_private,
                Arc::new(files),
                Limits::default(),
            ))
        }

        fn with(proxy: Proxy) -> Self {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime");
            Self {
                rt,
                proxy: Arc::new(proxy),
            }
        }

        /// Starts the proxy on one connection; returns the guest's end.
        fn connect(
            &self,
        ) -> (
            std::os::unix::net::UnixStream,
            tokio::task::JoinHandle<Outcome>,
        ) {
            let (ours, theirs) = std::os::unix::net::UnixStream::pair().expect("pair");
            theirs.set_nonblocking(true).expect("nonblocking");
            let proxy = self.proxy.clone();
            let task = self.rt.spawn(async move {
                let stream = tokio::net::UnixStream::from_std(theirs).expect("stream");
                proxy.handle(stream).await
            });
            (ours, task)
        }

        /// A guest's side of one proxied connection: bytes in, bytes out.
        fn run(&self, request: &str) -> (Outcome, String) {
            let (mut ours, task) = self.connect();
            ours.write_all(request.as_bytes()).expect("send");
            ours.shutdown(std::net::Shutdown::Write)
                .expect("half-close");
            let mut reply = String::new();
            ours.read_to_string(&mut reply).expect("reply");
            (self.rt.block_on(task).expect("proxy task"), reply)
        }
    }

    /// `127.0.0.1:port` opened the way an operator opens a private destination.
    fn open_loopback(port: u16) -> Vec<PrivateDest> {
        vec![PrivateDest::parse(&format!("127.0.0.1:{port}")).expect("dest")]
    }

    #[test]
    fn the_host_loopback_is_refused_and_never_connected_to() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let port = listener.local_addr().expect("addr").port();
        let dir = tempfile::tempdir().expect("tempdir");
        let rules = dir.path().join("rules.json");
        // Even an explicit allow of loopback does not open it, nor does the operator
        // opening another port of it.
        std::fs::write(&rules, r#"{"allow_out":["127.0.0.0/8","localhost"]}"#).expect("rules");
        let proxy = Harness::new(
            open_loopback(port.wrapping_add(1).max(1)),
            FileSet {
                rules: Some(rules),
                ..FileSet::default()
            },
        );
        for req in [
            format!("CONNECT 127.0.0.1:{port} HTTP/1.1\r\n\r\n"),
            format!("CONNECT localhost:{port} HTTP/1.1\r\n\r\n"),
            format!("CONNECT [::ffff:127.0.0.1]:{port} HTTP/1.1\r\n\r\n"),
            format!("GET http://127.0.0.1:{port}/ HTTP/1.1\r\n\r\n"),
        ] {
            let (outcome, reply) = proxy.run(&req);
            assert!(
                matches!(&outcome, Outcome::Refused { status: 403, .. }),
                "{req:?}: {outcome}"
            );
            assert!(reply.starts_with("HTTP/1.1 403 "), "{reply}");
            assert!(reply.contains("always blocked"), "{reply}");
        }
        assert!(
            listener.accept().is_err(),
            "the proxy connected to the host's loopback"
        );
    }

    #[test]
    fn a_broken_rules_file_fails_closed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let rules = dir.path().join("rules.json");
        std::fs::write(&rules, "{not json").expect("rules");
        let proxy = Harness::new(
            Vec::new(),
            FileSet {
                rules: Some(rules),
                ..FileSet::default()
            },
        );
        let (outcome, reply) = proxy.run("CONNECT 1.1.1.1:443 HTTP/1.1\r\n\r\n");
        assert!(
            matches!(outcome, Outcome::Refused { status: 503, .. }),
            "{outcome}"
        );
        assert!(reply.starts_with("HTTP/1.1 503 "), "{reply}");
    }

    #[test]
    fn tunnels_and_forwards_carry_bytes_both_ways() {
        // The tunnel mechanics, against a loopback echo server the operator's list opens
        // (loopback is the one destination tests may use).
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let server = std::thread::spawn(move || {
            for _ in 0..2 {
                let (mut s, _) = listener.accept().expect("accept");
                let mut got = Vec::new();
                s.read_to_end(&mut got).expect("read");
                s.write_all(b"echo:").expect("write");
                s.write_all(&got).expect("write");
            }
        });
        let proxy = Harness::new(open_loopback(port), FileSet::default());
        let (outcome, reply) = proxy.run(&format!("CONNECT 127.0.0.1:{port} HTTP/1.1\r\n\r\nping"));
        assert!(matches!(outcome, Outcome::Connected { .. }), "{outcome}");
        assert_eq!(
            reply,
            "HTTP/1.1 200 Connection established\r\n\r\necho:ping"
        );
        let (_, reply) = proxy.run(&format!(
            "GET http://127.0.0.1:{port}/x HTTP/1.1\r\nHost: h\r\n\r\nbody"
        ));
        assert_eq!(reply, "echo:GET /x HTTP/1.1\r\nHost: h\r\n\r\nbody");
        server.join().expect("server");
    }

    /// Everything a sandbox with one bound secret has: the key, kiln's CA, a test CA the
    /// upstreams' certificates come from, the bindings file.
    struct Bound {
        _dir: tempfile::TempDir,
        ca: EgressCa,
        upstream_ca: EgressCa,
        ring: KeyRing,
        files: FileSet,
        allow: Vec<PrivateDest>,
        records: Arc<std::sync::Mutex<Vec<crate::RequestRecord>>>,
    }

    const STAND_IN: &str = "sk-proj-STANDIN0123456789";
    const VALUE: &str = "sk-real-secret-value";

    impl Bound {
        fn new() -> Bound {
            let dir = tempfile::tempdir().expect("tempdir");
            let key = dir.path().join("keys/secrets.key");
            let ring = KeyRing::load_or_create(&key).expect("key");
            let ca = EgressCa::load_or_create(&dir.path().join("keys")).expect("ca");
            let upstream_ca =
                EgressCa::load_or_create(&dir.path().join("upstream-ca")).expect("ca");
            let files = FileSet {
                secrets: Some(dir.path().join("secrets.json")),
                key: Some(key),
                ca_dir: Some(dir.path().join("keys")),
                trust_ca: Some(upstream_ca.cert_path()),
                ..FileSet::default()
            };
            Bound {
                _dir: dir,
                ca,
                upstream_ca,
                ring,
                files,
                allow: Vec::new(),
                records: Arc::default(),
            }
        }

        /// Binds a secret for `hosts` under OPENAI_API_KEY, `revoked` or not, and opens
        /// the loopback ports `allow` as an operator would.
        fn bind(&mut self, hosts: &[String], allow: &[u16], revoked: bool) {
            let file = SandboxSecrets {
                sandbox_id: "sbx-1".into(),
                bindings: vec![Binding {
                    env_key: "OPENAI_API_KEY".into(),
                    stand_in: STAND_IN.into(),
                    secret_id: Some("sec-1".into()),
                    hosts: hosts
                        .iter()
                        .map(|h| kiln_api::HostPattern::parse(h).expect("host"))
                        .collect(),
                    auth: kiln_api::SecretAuth::Rule(kiln_api::AuthRule::Bearer),
                    sealed: (!revoked).then(|| self.ring.seal(VALUE.as_bytes(), "sec-1")),
                }],
            };
            let path = self.files.secrets.as_ref().expect("secrets");
            std::fs::write(path, serde_json::to_vec(&file).expect("json")).expect("write");
            self.allow = allow.iter().flat_map(|p| open_loopback(*p)).collect();
        }

        /// The proxy as the bindings stand, recording into `records`.
        fn proxy(&self) -> Harness {
            let proxy = Proxy::new(
                self.allow.clone(),
                Arc::new(self.files.clone()),
                Limits::default(),
            )
            .with_recorder(Arc::new(Records(self.records.clone())));
            Harness::with(proxy)
        }
    }

    struct Records(Arc<std::sync::Mutex<Vec<crate::RequestRecord>>>);

    impl Recorder for Records {
        fn request(&self, r: &crate::RequestRecord) {
            self.0.lock().expect("records").push(r.clone());
        }
    }

    /// Reads one HTTP response with a Content-Length body.
    fn response(from: &mut impl BufRead) -> (String, String) {
        let mut head = String::new();
        loop {
            let mut line = String::new();
            from.read_line(&mut line).expect("response line");
            head.push_str(&line);
            if line == "\r\n" || line.is_empty() {
                break;
            }
        }
        let len: usize = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length:")
                    .map(|v| v.trim().parse().expect("length"))
            })
            .unwrap_or(0);
        let mut body = vec![0; len];
        from.read_exact(&mut body).expect("body");
        (head, String::from_utf8(body).expect("utf-8"))
    }

    #[test]
    fn over_tls_the_secrets_host_gets_the_value_and_revocation_applies_at_once() {
        let mut bound = Bound::new();
        let upstream = crate::testing::Upstream::start(Some(&bound.upstream_ca));
        let port = upstream.port;
        bound.bind(&[format!("127.0.0.1:{port}")], &[port], false);
        let harness = bound.proxy();
        let (mut guest, proxy) = harness.connect();
        guest
            .write_all(format!("CONNECT 127.0.0.1:{port} HTTP/1.1\r\n\r\n").as_bytes())
            .expect("connect");
        let mut reader = BufReader::new(guest.try_clone().expect("clone"));
        let mut status = String::new();
        reader.read_line(&mut status).expect("status");
        assert_eq!(status, "HTTP/1.1 200 Connection established\r\n");
        let mut blank = String::new();
        reader.read_line(&mut blank).expect("blank");
        // The guest trusts kiln's CA, as every guest does.
        let mut roots = rustls::RootCertStore::empty();
        roots.add_parsable_certificates(read_pem_certs(&bound.ca.cert_path()).expect("ca"));
        let client = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("name");
        let conn = rustls::ClientConnection::new(Arc::new(client), name).expect("client");
        let duplex = Duplex {
            r: reader,
            w: guest,
            read: Arc::default(),
            written: Arc::default(),
        };
        let mut tls = BufReader::new(rustls::StreamOwned::new(conn, duplex));
        let request = format!(
            "GET /v1/models?key=x HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {STAND_IN}\r\n\r\n"
        );
        tls.get_mut()
            .write_all(request.as_bytes())
            .expect("request");
        let (head, body) = response(&mut tls);
        assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
        let bearer = |v: &str| format!("Bearer {v}");
        assert_eq!(
            body,
            crate::testing::answer("/v1/models?key=x", Some(&bearer(VALUE)))
        );
        assert!(upstream.seen()[0].contains(&format!("Authorization: {}", bearer(VALUE))));

        // Detach: the file is rewritten; the next request on the same connection is
        // refused by the proxy and never reaches the upstream.
        bound.bind(&[format!("127.0.0.1:{port}")], &[port], true);
        tls.get_mut()
            .write_all(request.as_bytes())
            .expect("request");
        let (head, body) = response(&mut tls);
        assert!(head.starts_with("HTTP/1.1 403 Forbidden"), "{head}");
        assert!(body.contains("revoked"), "{body}");
        drop(tls);
        let outcome = harness.rt.block_on(proxy).expect("proxy");
        assert!(matches!(outcome, Outcome::Connected { .. }), "{outcome}");
        assert_eq!(upstream.seen().len(), 1, "{:?}", upstream.seen());
        assert!(upstream.seen().iter().all(|h| !h.contains(STAND_IN)));

        let records = bound.records.lock().expect("records").clone();
        let rows: Vec<(u16, Option<&str>, &str)> = records
            .iter()
            .map(|r| (r.status, r.error_code.as_deref(), r.path.as_str()))
            .collect();
        assert_eq!(
            rows,
            [
                (200, None, "/v1/models"),
                (403, Some("secret_revoked"), "/v1/models")
            ]
        );
        assert!(records
            .iter()
            .all(|r| r.secret_id.as_deref() == Some("sec-1") && r.sandbox_id == "sbx-1"));
    }

    #[test]
    fn in_plain_http_the_value_goes_to_the_secrets_host_only() {
        let mut bound = Bound::new();
        let mine = crate::testing::Upstream::start(None);
        let other = crate::testing::Upstream::start(None);
        bound.bind(
            &[format!("127.0.0.1:{}", mine.port)],
            &[mine.port, other.port],
            false,
        );
        let request = |port: u16| {
            format!(
                "GET http://127.0.0.1:{port}/p HTTP/1.1\r\nHost: 127.0.0.1\r\n\
                 Authorization: Bearer {STAND_IN}\r\nProxy-Connection: keep-alive\r\n\r\n"
            )
        };
        let proxy = bound.proxy();
        let (outcome, reply) = proxy.run(&request(mine.port));
        assert!(matches!(outcome, Outcome::Connected { .. }), "{outcome}");
        let bearer = |v: &str| format!("Bearer {v}");
        assert!(
            reply.ends_with(&crate::testing::answer("/p", Some(&bearer(VALUE)))),
            "{reply}"
        );
        // One request per connection: the next may be for another host.
        assert!(reply.contains("Connection: close"), "{reply}");
        let seen = mine.seen();
        assert!(seen[0].starts_with("GET /p HTTP/1.1"), "{seen:?}");
        assert!(!seen[0].contains("Proxy-Connection"), "{seen:?}");

        // Another host, even one the operator opened, gets the stand-in as it was.
        let (_, reply) = proxy.run(&request(other.port));
        assert!(
            reply.ends_with(&crate::testing::answer("/p", Some(&bearer(STAND_IN)))),
            "{reply}"
        );
        assert!(other.seen().iter().all(|h| !h.contains(VALUE)));
        // The swapped request is recorded, the other is not.
        let records = bound.records.lock().expect("records").clone();
        let ports: Vec<(u16, u16)> = records.iter().map(|r| (r.port, r.status)).collect();
        assert_eq!(ports, [(mine.port, 200)]);
    }

    #[test]
    fn an_upstream_that_fails_verification_is_refused_before_the_tunnel() {
        let mut bound = Bound::new();
        // Its certificate comes from a CA the proxy does not trust.
        let untrusted = tempfile::tempdir().expect("tempdir");
        let rogue = EgressCa::load_or_create(untrusted.path()).expect("ca");
        let upstream = crate::testing::Upstream::start(Some(&rogue));
        let port = upstream.port;
        bound.bind(&[format!("127.0.0.1:{port}")], &[port], false);
        let (outcome, reply) = bound
            .proxy()
            .run(&format!("CONNECT 127.0.0.1:{port} HTTP/1.1\r\n\r\n"));
        assert!(reply.starts_with("HTTP/1.1 502 "), "{reply}");
        assert!(reply.contains("TLS with the upstream"), "{reply}");
        assert!(
            matches!(outcome, Outcome::Refused { status: 502, .. }),
            "{outcome}"
        );
        assert!(upstream.seen().is_empty());
    }

    #[test]
    fn a_broken_bindings_file_fails_closed() {
        let bound = Bound::new();
        let path = bound.files.secrets.as_ref().expect("secrets");
        std::fs::write(path, "{broken").expect("write");
        let (outcome, reply) = bound.proxy().run("CONNECT 1.1.1.1:443 HTTP/1.1\r\n\r\n");
        assert!(
            matches!(outcome, Outcome::Refused { status: 503, .. }),
            "{outcome}"
        );
        assert!(reply.starts_with("HTTP/1.1 503 "), "{reply}");
    }

    /// A guest that opens a connection and sends nothing gets 408 at the header
    /// timeout, not before; the connection is then closed.
    #[tokio::test(start_paused = true)]
    async fn a_silent_connection_is_refused_at_the_header_timeout() {
        let limits = Limits {
            header_timeout: Duration::from_secs(10),
            ..Limits::default()
        };
        let proxy = Arc::new(Proxy::new(Vec::new(), Arc::new(FileSet::default()), limits));
        let (mut guest, theirs) = tokio::io::duplex(4096);
        let started = tokio::time::Instant::now();
        let task = tokio::spawn(async move { proxy.handle(theirs).await });
        // A slow drip does not reset it: the whole head must come within the limit.
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_secs(3)).await;
            guest.write_all(b"C").await.expect("drip");
        }
        let outcome = task.await.expect("task");
        assert_eq!(started.elapsed(), limits.header_timeout);
        assert!(
            matches!(&outcome, Outcome::Refused { status: 408, .. }),
            "{outcome}"
        );
        let mut reply = String::new();
        guest.read_to_string(&mut reply).await.expect("reply");
        assert!(reply.starts_with("HTTP/1.1 408 "), "{reply}");
    }

    /// Past the connection cap a guest gets 503 at once, and the refusal is logged;
    /// the connections within the cap are served as before.
    #[test]
    fn connections_past_the_cap_are_refused_at_once_and_logged() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("network.log");
        let limits = Limits {
            max_connections: 2,
            header_timeout: Duration::from_secs(600),
            ..Limits::default()
        };
        let files = FileSet {
            log: Some(log.clone()),
            ..FileSet::default()
        };
        let harness = Harness::with(Proxy::new(Vec::new(), Arc::new(files), limits));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        listener.set_nonblocking(true).expect("nonblocking");
        let proxy = harness.proxy.clone();
        harness.rt.spawn(async move {
            let listener = TcpListener::from_std(listener).expect("listener");
            proxy.run(listener).await
        });
        // Two connections take the two places and hold them (they send nothing).
        let held: Vec<std::net::TcpStream> = (0..2)
            .map(|_| std::net::TcpStream::connect(addr).expect("connect"))
            .collect();
        let mut third = std::net::TcpStream::connect(addr).expect("connect");
        let mut reply = String::new();
        third.read_to_string(&mut reply).expect("reply");
        assert!(reply.starts_with("HTTP/1.1 503 "), "{reply}");
        assert!(reply.contains("limit"), "{reply}");
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let logged = loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if !text.is_empty() || std::time::Instant::now() > deadline {
                break text;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let row: NetworkEvent =
            serde_json::from_str(logged.lines().next().expect("a line")).expect("a network event");
        assert_eq!(row.error_code.as_deref(), Some("503"));
        assert_eq!(row.verdict, NetworkVerdict::Failed);
        drop(held);
    }
}
