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

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use chrono::{DateTime, Utc};
use kiln_api::{NetworkEvent, NetworkVerdict};

use crate::rules::{always_blocked, Decision, NetworkConfig, Policy};

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
    /// Test-only: lets the proxy reach loopback, so a test can exercise the tunnel
    /// against a listener of its own. Never set by kiln itself.
    #[doc(hidden)]
    pub allow_loopback_for_tests: bool,
}

/// What the proxy did with one connection (also its log line).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Tunnelled or forwarded to this address.
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
            match_rule: None,
            error_code: None,
            bytes_sent: 0,
            bytes_recv: 0,
            direction: None,
            method: None,
            path: None,
            status: None,
            latency_ms: None,
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

/// Serves one connection: `input`/`output` are the guest's side of it.
pub fn serve<I, O>(input: I, mut output: O, cfg: &ProxyConfig) -> Outcome
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
    let addr = match choose_addr(&req, &policy, cfg) {
        Ok(a) => a,
        Err((status, reason)) => return refuse(&mut output, &target, status, reason),
    };
    let mut upstream = match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
        Ok(s) => s,
        Err(e) => return refuse(&mut output, &target, 502, format!("connect {addr}: {e}")),
    };
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
        let verdict = if cfg.allow_loopback_for_tests && ip.is_loopback() {
            Decision::Allow
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

    /// A guest's side of one proxied connection: bytes in, bytes out.
    fn run(request: &str, cfg: &ProxyConfig) -> (Outcome, String) {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().expect("pair");
        let input = theirs.try_clone().expect("clone");
        let cfg = cfg.clone();
        let t = std::thread::spawn(move || serve(input, theirs, &cfg));
        let mut ours = ours;
        ours.write_all(request.as_bytes()).expect("send");
        ours.shutdown(std::net::Shutdown::Write)
            .expect("half-close");
        let mut reply = String::new();
        ours.read_to_string(&mut reply).expect("reply");
        (t.join().expect("proxy thread"), reply)
    }

    #[test]
    fn the_host_loopback_is_refused_and_never_connected_to() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let port = listener.local_addr().expect("addr").port();
        let dir = tempfile::tempdir().expect("tempdir");
        let rules = dir.path().join("rules.json");
        // Even an explicit allow of loopback does not open it.
        std::fs::write(&rules, r#"{"allow_out":["127.0.0.0/8","localhost"]}"#).expect("rules");
        let cfg = ProxyConfig {
            rules: Some(rules),
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
        // The tunnel mechanics, against a loopback echo server (loopback is opened for
        // this test only; it is the one destination tests may use).
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
            allow_loopback_for_tests: true,
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
}
