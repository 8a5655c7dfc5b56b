//! The egress proxy: one process per guest connection, speaking HTTP proxy on its stdio.
//!
//! A VM's user-mode network runs with `restrict=on`: the guest reaches nothing on or
//! through the host, except one address (`kiln_agent_proto::EGRESS_PROXY`) that QEMU forwards to a fresh
//! `kiln egress-proxy` process per TCP connection (`guestfwd=...-cmd:`), with the
//! connection on its stdin and stdout. That process reads one HTTP proxy request
//! (`CONNECT host:port` for TLS and anything else, or an absolute-form `GET http://...`),
//! resolves the name on the host, checks every address against the sandbox's rules and
//! the always-blocked ranges (and the host's own addresses), connects to an address that
//! passed, and splices bytes until either side closes.
//!
//! Deciding on the resolved address and connecting to that same address (never
//! re-resolving) keeps DNS rebinding from slipping a private address past the check. The
//! rules file is read per connection, so a PATCH applies to the next connection at once,
//! and no long-lived listener needs an owner: the process lives as long as the connection
//! and QEMU reaps it.
//!
//! A connection to a host one of the sandbox's secrets is bound to (its bindings file,
//! [`crate::secrets`]) is opened up instead of spliced: TLS is terminated with a leaf of
//! kiln's egress CA ([`crate::ca`]), which every guest trusts, and re-originated to the
//! real host, verified against the system roots and the operator's bundle; each request
//! in between has its stand-ins swapped ([`crate::intercept`]). Connections to any other
//! host are never opened: a stand-in sent there goes out as it is.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use kiln_api::{NetworkEvent, NetworkVerdict};

use crate::ca::{read_pem_certs, EgressCa};
use crate::intercept::{parse_request, relay, Duplex, Recorder, Relay, Secrets};
use crate::rules::{always_blocked, Decision, NetworkConfig, Policy, PrivateDest};
use crate::seal::KeyRing;
use crate::secrets::{Binding, SandboxSecrets};

/// Longest request head accepted from the guest.
const MAX_HEAD: usize = 16 * 1024;
/// Bound on connecting to the destination.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How one proxy process decides.
#[derive(Debug, Clone, Default)]
pub struct ProxyConfig {
    /// The sandbox's rules (JSON [`NetworkConfig`]); missing means no rules (public
    /// internet only). A file that exists but cannot be read or parsed fails closed.
    pub rules: Option<PathBuf>,
    /// Private destinations the operator lets every sandbox reach
    /// (`KILN_EGRESS_ALLOW_PRIVATE`).
    pub allow_private: Vec<PrivateDest>,
    /// What swapping secrets needs; `None`: nothing is ever opened up.
    pub secrets: Option<SecretsConfig>,
}

/// Where the proxy finds a sandbox's secrets and what it needs to put them in.
#[derive(Debug, Clone, Default)]
pub struct SecretsConfig {
    /// The sandbox's bindings file ([`SandboxSecrets`]); missing means no bindings. A
    /// file that exists but cannot be read fails closed.
    pub bindings: PathBuf,
    /// The secrets key file ([`KeyRing`]).
    pub key: PathBuf,
    /// The egress CA's directory ([`EgressCa`]).
    pub ca_dir: PathBuf,
    /// More roots to verify upstreams against, besides the system's
    /// (`KILN_EGRESS_TRUST_CA`).
    pub trust_ca: Option<PathBuf>,
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
#[derive(Debug)]
struct Request {
    /// `CONNECT`: tunnel; otherwise forward `head` (rewritten to origin form).
    tunnel: bool,
    host: String,
    port: u16,
    head: Vec<u8>,
}

/// Serves one connection: `input`/`output` are the guest's side of it; the requests it
/// puts secrets into go to `recorder`.
pub fn serve<I, O>(input: I, mut output: O, cfg: &ProxyConfig, recorder: &dyn Recorder) -> Outcome
where
    I: Read + Send + 'static,
    O: Write + Send + 'static,
{
    let mut reader = BufReader::new(input);
    let req = match read_request(&mut reader) {
        Ok(r) => r,
        Err(reason) => return refuse(&mut output, "-", 400, reason),
    };
    let target = format!("{}:{}", req.host, req.port);
    let policy = match load_policy(cfg) {
        Ok(p) => p,
        Err(reason) => return refuse(&mut output, &target, 503, reason),
    };
    let secrets = match &cfg.secrets {
        Some(sc) => match SandboxSecrets::load(&sc.bindings) {
            Ok(Some(b)) if b.intercepts(&req.host, req.port) => Some(FileSecrets(sc.clone())),
            Ok(_) => None,
            Err(e) => return refuse(&mut output, &target, 503, e.to_string()),
        },
        None => None,
    };
    let addr = match choose_addr(&req, &policy, cfg) {
        Ok(a) => a,
        Err((status, reason)) => return refuse(&mut output, &target, status, reason),
    };
    let mut upstream = match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
        Ok(s) => s,
        Err(e) => return refuse(&mut output, &target, 502, format!("connect {addr}: {e}")),
    };
    if let Some(secrets) = secrets {
        return match open_up(reader, output, upstream, &req, &secrets, recorder) {
            Ok((bytes_sent, bytes_recv)) => Outcome::Connected {
                target,
                addr,
                bytes_sent,
                bytes_recv,
            },
            Err(Refusal { reply, reason }) => {
                let reason = format!("{addr}: {reason}");
                match reply {
                    Some(mut out) => refuse(&mut out, &target, 502, reason),
                    None => Outcome::Refused {
                        target,
                        status: 502,
                        reason,
                    },
                }
            }
        };
    }
    let greeting: &[u8] = if req.tunnel {
        b"HTTP/1.1 200 Connection established\r\n\r\n"
    } else {
        b""
    };
    let sent = if req.tunnel {
        output.write_all(greeting).and_then(|()| output.flush())
    } else {
        upstream.write_all(&req.head)
    };
    if let Err(e) = sent {
        return refuse(&mut output, &target, 502, format!("write: {e}"));
    }
    let (bytes_sent, bytes_recv) = splice(reader, output, upstream);
    Outcome::Connected {
        target,
        addr,
        bytes_sent,
        bytes_recv,
    }
}

/// Copies both ways until both directions are done; a side's EOF is passed on as a
/// half-close so request/response protocols finish cleanly.
fn splice<I, O>(mut from_guest: BufReader<I>, mut to_guest: O, upstream: TcpStream) -> (u64, u64)
where
    I: Read + Send + 'static,
    O: Write + Send + 'static,
{
    let Ok(mut up_write) = upstream.try_clone() else {
        return (0, 0);
    };
    let up_read = upstream;
    let outbound = std::thread::spawn(move || {
        let sent = std::io::copy(&mut from_guest, &mut up_write).unwrap_or(0);
        let _ = up_write.shutdown(std::net::Shutdown::Write);
        sent
    });
    let mut up_read = up_read;
    let recv = std::io::copy(&mut up_read, &mut to_guest).unwrap_or(0);
    let _ = to_guest.flush();
    drop(to_guest);
    // The guest may keep its side open after the destination closed: the VM closing the
    // connection (or QEMU exiting) ends the outbound copy.
    let _ = up_read.shutdown(std::net::Shutdown::Both);
    (outbound.join().unwrap_or(0), recv)
}

fn refuse(out: &mut impl Write, target: &str, status: u16, reason: String) -> Outcome {
    let text = match status {
        400 => "Bad Request",
        403 => "Forbidden",
        502 => "Bad Gateway",
        _ => "Service Unavailable",
    };
    let body = format!("kiln: egress to {target} refused: {reason}\n");
    // One write: `write!` on an unbuffered stdout is a syscall per piece, and the guest
    // would see the status line arrive in fragments.
    let reply = format!(
        "HTTP/1.1 {status} {text}\r\nContent-Type: text/plain\r\nConnection: close\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let _ = out.write_all(reply.as_bytes()).and_then(|()| out.flush());
    Outcome::Refused {
        target: target.to_owned(),
        status,
        reason,
    }
}

/// The bindings file and the key, read afresh for every request.
struct FileSecrets(SecretsConfig);

impl Secrets for FileSecrets {
    fn bindings(&self) -> Result<Option<SandboxSecrets>, String> {
        SandboxSecrets::load(&self.0.bindings).map_err(|e| e.to_string())
    }

    fn open(&self, binding: &Binding) -> Result<String, String> {
        let (Some(sealed), Some(id)) = (&binding.sealed, &binding.secret_id) else {
            return Err(format!("the binding of {} is revoked", binding.env_key));
        };
        let ring = KeyRing::load(&self.0.key).map_err(|e| format!("secrets key: {e}"))?;
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

/// Verifies upstreams against the system roots and the operator's bundle; speaks
/// HTTP/1.1 only (the relay's protocol).
fn client_config(trust_ca: Option<&std::path::Path>) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    roots.add_parsable_certificates(native.certs);
    if let Some(path) = trust_ca {
        let extra = read_pem_certs(path).map_err(|e| format!("KILN_EGRESS_TRUST_CA: {e}"))?;
        roots.add_parsable_certificates(extra);
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

/// Serves the guest as `host` with a leaf of kiln's CA; HTTP/1.1 only.
fn server_config(ca: &EgressCa, host: &str) -> Result<rustls::ServerConfig, String> {
    let (chain, key) = ca.leaf(host).map_err(|e| format!("egress CA: {e}"))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| e.to_string())?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

/// Relays a connection to a secret's host request by request: over TLS for a tunnel
/// (the upstream's handshake first, so a host that fails verification is refused before
/// the guest is told the tunnel is up), in plain HTTP for a forward. Returns the bytes
/// from and to the guest.
fn open_up<I, O>(
    reader: BufReader<I>,
    mut output: O,
    upstream: TcpStream,
    req: &Request,
    secrets: &FileSecrets,
    recorder: &dyn Recorder,
) -> Result<(u64, u64), Refusal<O>>
where
    I: Read,
    O: Write,
{
    let read = Arc::new(AtomicU64::new(0));
    let written = Arc::new(AtomicU64::new(0));
    let counts = |r: &Arc<AtomicU64>, w: &Arc<AtomicU64>| {
        use std::sync::atomic::Ordering::Relaxed;
        (r.load(Relaxed), w.load(Relaxed))
    };
    let ctx = Relay {
        host: &req.host,
        port: req.port,
        secrets,
        recorder,
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
    let sc = &secrets.0;
    let client = match client_config(sc.trust_ca.as_deref()) {
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
    let server = EgressCa::load(&sc.ca_dir)
        .map_err(|e| format!("egress CA: {e}"))
        .and_then(|ca| server_config(&ca, &req.host));
    let server = match server {
        Ok(s) => s,
        Err(e) => return Err(refuse(output, e)),
    };
    if let Err(e) = output
        .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
        .and_then(|()| output.flush())
    {
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
    let mut guest_tls = rustls::ServerConnection::new(Arc::new(server)).map_err(|e| Refusal {
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

fn load_policy(cfg: &ProxyConfig) -> Result<Policy, String> {
    let Some(path) = &cfg.rules else {
        return Ok(Policy::default());
    };
    let text = match std::fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Policy::default()),
        Err(e) => return Err(format!("network rules unreadable: {e}")),
    };
    let rules: NetworkConfig =
        serde_json::from_slice(&text).map_err(|e| format!("network rules unreadable: {e}"))?;
    Policy::compile(&rules).map_err(|errs| format!("network rules invalid: {errs}"))
}

fn read_request(reader: &mut impl BufRead) -> Result<Request, String> {
    let mut head = Vec::new();
    let mut lines: Vec<Vec<u8>> = Vec::new();
    loop {
        let mut line = Vec::new();
        let n = reader
            .take((MAX_HEAD - head.len()) as u64 + 1)
            .read_until(b'\n', &mut line)
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

/// Resolves the destination and picks the first address every rule lets through.
fn choose_addr(
    req: &Request,
    policy: &Policy,
    cfg: &ProxyConfig,
) -> Result<SocketAddr, (u16, String)> {
    let literal = req.host.parse::<IpAddr>().ok();
    let domain = if literal.is_some() {
        None
    } else {
        Some(req.host.as_str())
    };
    let addrs: Vec<SocketAddr> = match literal {
        Some(ip) => vec![SocketAddr::new(ip, req.port)],
        None => (req.host.as_str(), req.port)
            .to_socket_addrs()
            .map_err(|e| (502, format!("cannot resolve {}: {e}", req.host)))?
            .collect(),
    };
    let own = host_addresses();
    let mut last = String::from("no address");
    for a in addrs {
        let ip = a.ip();
        let opened = cfg
            .allow_private
            .iter()
            .any(|p| p.permits(domain, ip, req.port));
        let verdict = if opened {
            policy.decide_rules(domain, ip)
        } else if own.contains(&ip) && always_blocked(ip).is_none() {
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
    use std::io::Cursor;

    fn parse(head: &str) -> Result<Request, String> {
        read_request(&mut Cursor::new(head.as_bytes().to_vec()))
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

    /// Records nothing.
    struct Nowhere;

    impl Recorder for Nowhere {
        fn request(&self, _: &crate::RequestRecord) {}
    }

    /// A guest's side of one proxied connection: bytes in, bytes out.
    fn run(request: &str, cfg: &ProxyConfig) -> (Outcome, String) {
        run_recorded(request, cfg, Box::new(Nowhere))
    }

    /// [`run`], with the requests it records going to `recorder`.
    fn run_recorded(
        request: &str,
        cfg: &ProxyConfig,
        recorder: Box<dyn Recorder>,
    ) -> (Outcome, String) {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().expect("pair");
        let input = theirs.try_clone().expect("clone");
        let cfg = cfg.clone();
        let t = std::thread::spawn(move || serve(input, theirs, &cfg, recorder.as_ref()));
        let mut ours = ours;
        ours.write_all(request.as_bytes()).expect("send");
        ours.shutdown(std::net::Shutdown::Write)
            .expect("half-close");
        let mut reply = String::new();
        ours.read_to_string(&mut reply).expect("reply");
        (t.join().expect("proxy thread"), reply)
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
        let cfg = ProxyConfig {
            rules: Some(rules),
            allow_private: open_loopback(port.wrapping_add(1).max(1)),
            ..ProxyConfig::default()
        };
        for req in [
            format!("CONNECT 127.0.0.1:{port} HTTP/1.1\r\n\r\n"),
            format!("CONNECT localhost:{port} HTTP/1.1\r\n\r\n"),
            format!("CONNECT [::ffff:127.0.0.1]:{port} HTTP/1.1\r\n\r\n"),
            format!("GET http://127.0.0.1:{port}/ HTTP/1.1\r\n\r\n"),
        ] {
            let (outcome, reply) = run(&req, &cfg);
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
        let cfg = ProxyConfig {
            rules: Some(rules),
            ..ProxyConfig::default()
        };
        let (outcome, reply) = run("CONNECT 1.1.1.1:443 HTTP/1.1\r\n\r\n", &cfg);
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
        let cfg = ProxyConfig {
            allow_private: open_loopback(port),
            ..ProxyConfig::default()
        };
        let (outcome, reply) = run(
            &format!("CONNECT 127.0.0.1:{port} HTTP/1.1\r\n\r\nping"),
            &cfg,
        );
        assert!(matches!(outcome, Outcome::Connected { .. }), "{outcome}");
        assert_eq!(
            reply,
            "HTTP/1.1 200 Connection established\r\n\r\necho:ping"
        );
        let (_, reply) = run(
            &format!("GET http://127.0.0.1:{port}/x HTTP/1.1\r\nHost: h\r\n\r\nbody"),
            &cfg,
        );
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
        cfg: ProxyConfig,
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
            let cfg = ProxyConfig {
                rules: None,
                allow_private: Vec::new(),
                secrets: Some(SecretsConfig {
                    bindings: dir.path().join("secrets.json"),
                    key,
                    ca_dir: dir.path().join("keys"),
                    trust_ca: Some(upstream_ca.cert_path()),
                }),
            };
            Bound {
                _dir: dir,
                ca,
                upstream_ca,
                ring,
                cfg,
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
            let path = &self.cfg.secrets.as_ref().expect("secrets").bindings;
            std::fs::write(path, serde_json::to_vec(&file).expect("json")).expect("write");
            self.cfg.allow_private = allow.iter().flat_map(|p| open_loopback(*p)).collect();
        }

        /// Starts the proxy on one connection; returns the guest's end.
        fn connect(
            &self,
        ) -> (
            std::os::unix::net::UnixStream,
            std::thread::JoinHandle<Outcome>,
        ) {
            let (ours, theirs) = std::os::unix::net::UnixStream::pair().expect("pair");
            let input = theirs.try_clone().expect("clone");
            let cfg = self.cfg.clone();
            let records = Records(self.records.clone());
            let t = std::thread::spawn(move || serve(input, theirs, &cfg, &records));
            (ours, t)
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
        let (mut guest, proxy) = bound.connect();
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
        let outcome = proxy.join().expect("proxy");
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
        let recorded = || Box::new(Records(bound.records.clone()));
        let (outcome, reply) = run_recorded(&request(mine.port), &bound.cfg, recorded());
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
        let (_, reply) = run_recorded(&request(other.port), &bound.cfg, recorded());
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
        let (outcome, reply) = run(
            &format!("CONNECT 127.0.0.1:{port} HTTP/1.1\r\n\r\n"),
            &bound.cfg,
        );
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
        let path = &bound.cfg.secrets.as_ref().expect("secrets").bindings;
        std::fs::write(path, "{broken").expect("write");
        let (outcome, reply) = run("CONNECT 1.1.1.1:443 HTTP/1.1\r\n\r\n", &bound.cfg);
        assert!(
            matches!(outcome, Outcome::Refused { status: 503, .. }),
            "{outcome}"
        );
        assert!(reply.starts_with("HTTP/1.1 503 "), "{reply}");
    }
}
