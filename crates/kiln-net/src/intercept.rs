//! HTTP/1.1 between a guest and a host one of its secrets is bound to: every request is
//! read, its stand-ins swapped for the values ([`crate::secrets::swap`]), and relayed;
//! every response is relayed back as it comes (streamed, so server-sent events flow).
//!
//! The same relay serves plain HTTP (the proxy's absolute-form requests, one per
//! connection) and TLS, terminated with a leaf of kiln's egress CA on the guest's side and
//! re-originated to the real host, verified against the system roots and the operator's
//! bundle. The bindings file is read again for every request, so a revocation applies to
//! the next request of a connection already open.
//!
//! Not supported on these hosts: protocol upgrades (the `Upgrade` header is dropped, so a
//! WebSocket handshake gets the server's refusal) and HTTP/2 (only `http/1.1` is offered
//! in ALPN on both sides).

use std::io::{self, BufRead, BufReader, Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use chrono::{DateTime, Utc};
use kiln_api::{NetworkEvent, NetworkVerdict, ProxyAuditEvent};

use crate::secrets::{swap, Binding, Header, SandboxSecrets, Swap};

/// Longest request or response head.
const MAX_HEAD: usize = 64 * 1024;
/// Most headers in one head.
const MAX_HEADERS: usize = 128;
/// Longest chunk-size or trailer line.
const MAX_LINE: usize = 8 * 1024;

/// One request the proxy put a secret into, or refused for carrying a revoked stand-in:
/// a `request` row of the sandbox's network log and an event of the secret's audit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestRecord {
    /// The sandbox.
    pub sandbox_id: String,
    /// The secret (none when it was deleted).
    pub secret_id: Option<String>,
    /// The request's method.
    pub method: String,
    /// The host as the guest named it.
    pub host: String,
    /// The port.
    pub port: u16,
    /// The path, without the query (queries may carry data of their own).
    pub path: String,
    /// What the guest got.
    pub status: u16,
    /// What the upstream answered, when it was reached.
    pub upstream_status: Option<u16>,
    /// From the request to the upstream's answer (or the proxy's).
    pub latency_ms: u64,
    /// Why the proxy answered itself: `secret_revoked`, `secret_unavailable`,
    /// `upstream_failed`.
    pub error_code: Option<String>,
}

impl RequestRecord {
    /// The `request` row of the sandbox's network log.
    pub fn network_event(&self, id: i64, ts: DateTime<Utc>) -> NetworkEvent {
        NetworkEvent {
            kind: "request".into(),
            id,
            ts,
            host: Some(self.host.clone()),
            dst_port: Some(self.port),
            verdict: match self.error_code.as_deref() {
                None => NetworkVerdict::Allowed,
                Some("secret_revoked") => NetworkVerdict::Blocked,
                Some(_) => NetworkVerdict::Failed,
            },
            error_code: self.error_code.clone(),
            method: Some(self.method.clone()),
            path: Some(self.path.clone()),
            status: Some(self.status),
            upstream_status: self.upstream_status,
            latency_ms: Some(self.latency_ms),
            secret_id: self.secret_id.clone(),
            ..NetworkEvent::default()
        }
    }

    /// The secret's audit event (the sandbox's name is the engine's to add).
    pub fn audit_event(&self, id: i64, ts: DateTime<Utc>) -> ProxyAuditEvent {
        ProxyAuditEvent {
            id,
            ts,
            sandbox_id: self.sandbox_id.clone(),
            sandbox_name: None,
            secret_id: self.secret_id.clone(),
            method: self.method.clone(),
            host: self.host.clone(),
            path: self.path.clone(),
            status: self.status,
            upstream_status: self.upstream_status,
            latency_ms: Some(self.latency_ms),
            error_code: self.error_code.clone(),
        }
    }
}

/// Where the proxy's request records go (the network log and the audit, for `kiln
/// egress-proxy`; a list, in tests).
pub trait Recorder: Send + Sync {
    /// One request record.
    fn request(&self, record: &RequestRecord);
}

/// Reads the sandbox's bindings (per request) and opens their values.
pub trait Secrets: Send + Sync {
    /// The bindings now (none: the file is gone, e.g. the sandbox was deleted).
    fn bindings(&self) -> Result<Option<SandboxSecrets>, String>;
    /// A binding's value, in clear.
    fn open(&self, binding: &Binding) -> Result<String, String>;
}

/// What one relay needs besides the two connections.
pub(crate) struct Relay<'a> {
    pub host: &'a str,
    pub port: u16,
    pub secrets: &'a dyn Secrets,
    pub recorder: &'a dyn Recorder,
    /// Plain HTTP: one request, then the connection closes (the next request may be for
    /// another host, which this relay must not carry).
    pub one_request: bool,
}

/// A request or response head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Head {
    /// Request: method, target. Response: status code, reason.
    pub first: (String, String),
    /// `HTTP/1.x` minor version.
    pub minor: u8,
    pub headers: Vec<Header>,
}

impl Head {
    fn get(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    }

    fn has_token(&self, name: &str, token: &str) -> bool {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .flat_map(|(_, v)| v.split(|b| *b == b','))
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
    }

    fn remove(&mut self, name: &str) {
        self.headers.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
    }

    fn set(&mut self, name: &str, value: &str) {
        self.remove(name);
        self.headers
            .push((name.to_owned(), value.as_bytes().to_vec()));
    }

    /// How the message's body is delimited.
    fn body(&self) -> Result<Body, String> {
        let chunked = self.get("transfer-encoding").is_some();
        let length = self.get("content-length");
        match (chunked, length) {
            (true, Some(_)) => Err("both Transfer-Encoding and Content-Length".into()),
            (true, None) => {
                if self.has_token("transfer-encoding", "chunked") {
                    Ok(Body::Chunked)
                } else {
                    Err("a Transfer-Encoding other than chunked".into())
                }
            }
            (false, Some(v)) => std::str::from_utf8(v)
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .map(Body::Length)
                .ok_or_else(|| "a Content-Length that is not a number".into()),
            (false, None) => Ok(Body::None),
        }
    }

    fn encode_request(&self) -> Vec<u8> {
        let mut out = format!(
            "{} {} HTTP/1.{}\r\n",
            self.first.0, self.first.1, self.minor
        )
        .into_bytes();
        self.encode_headers(&mut out);
        out
    }

    fn encode_response(&self) -> Vec<u8> {
        let mut out = format!(
            "HTTP/1.{} {} {}\r\n",
            self.minor, self.first.0, self.first.1
        )
        .into_bytes();
        self.encode_headers(&mut out);
        out
    }

    fn encode_headers(&self, out: &mut Vec<u8>) {
        for (n, v) in &self.headers {
            out.extend_from_slice(n.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(v);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"\r\n");
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Body {
    None,
    Length(u64),
    Chunked,
    /// Until the sender closes (responses only).
    ToEnd,
}

/// Reads a head (up to the empty line); `None` when the stream ends before its first byte.
pub(crate) fn read_head(from: &mut impl BufRead) -> io::Result<Option<Vec<u8>>> {
    let mut head = Vec::new();
    loop {
        let before = head.len();
        let n = from
            .by_ref()
            .take((MAX_HEAD - head.len()) as u64 + 1)
            .read_until(b'\n', &mut head)?;
        if n == 0 {
            return if head.is_empty() {
                Ok(None)
            } else {
                Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the stream ended inside a head",
                ))
            };
        }
        if head.len() > MAX_HEAD {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("a head over {MAX_HEAD} bytes"),
            ));
        }
        let line = &head[before..];
        if line == b"\r\n" || line == b"\n" {
            // Blank lines before a request are allowed (RFC 9112 2.2).
            if before == 0 {
                head.clear();
                continue;
            }
            return Ok(Some(head));
        }
    }
}

fn invalid(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

fn to_headers(parsed: &[httparse::Header<'_>]) -> Vec<Header> {
    parsed
        .iter()
        .map(|h| (h.name.to_owned(), h.value.to_vec()))
        .collect()
}

/// Parses a request head.
pub(crate) fn parse_request(bytes: &[u8]) -> io::Result<Head> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(bytes).map_err(invalid)? {
        httparse::Status::Complete(_) => Ok(Head {
            first: (
                req.method.unwrap_or_default().to_owned(),
                req.path.unwrap_or_default().to_owned(),
            ),
            minor: req.version.unwrap_or(1),
            headers: to_headers(req.headers),
        }),
        httparse::Status::Partial => Err(invalid("an incomplete request head")),
    }
}

fn parse_response(bytes: &[u8]) -> io::Result<Head> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    match resp.parse(bytes).map_err(invalid)? {
        httparse::Status::Complete(_) => Ok(Head {
            first: (
                resp.code.unwrap_or_default().to_string(),
                resp.reason.unwrap_or_default().to_owned(),
            ),
            minor: resp.version.unwrap_or(1),
            headers: to_headers(resp.headers),
        }),
        httparse::Status::Partial => Err(invalid("an incomplete response head")),
    }
}

/// Copies `n` bytes.
fn copy_exact(from: &mut impl BufRead, to: &mut impl Write, n: u64) -> io::Result<()> {
    let copied = io::copy(&mut from.by_ref().take(n), to)?;
    if copied < n {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the body ended early",
        ));
    }
    Ok(())
}

fn read_line(from: &mut impl BufRead) -> io::Result<Vec<u8>> {
    let mut line = Vec::new();
    from.by_ref()
        .take(MAX_LINE as u64)
        .read_until(b'\n', &mut line)?;
    if !line.ends_with(b"\n") {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "a chunk line ended early or is too long",
        ));
    }
    Ok(line)
}

/// Copies a chunked body as it is, chunk by chunk (flushed after each, so a stream flows).
fn copy_chunked(from: &mut impl BufRead, to: &mut impl Write) -> io::Result<()> {
    loop {
        let line = read_line(from)?;
        to.write_all(&line)?;
        let size = std::str::from_utf8(&line)
            .ok()
            .and_then(|l| l.split(';').next())
            .and_then(|s| u64::from_str_radix(s.trim(), 16).ok())
            .ok_or_else(|| invalid("a bad chunk size"))?;
        if size == 0 {
            loop {
                let trailer = read_line(from)?;
                to.write_all(&trailer)?;
                if trailer == b"\r\n" || trailer == b"\n" {
                    return to.flush();
                }
            }
        }
        copy_exact(from, to, size)?;
        let end = read_line(from)?;
        to.write_all(&end)?;
        to.flush()?;
    }
}

/// Copies until the sender closes, flushing as data comes.
fn copy_to_end(from: &mut impl BufRead, to: &mut impl Write) -> io::Result<()> {
    loop {
        let buf = match from.fill_buf() {
            Ok(b) => b,
            // A TLS peer that closes without close_notify: the body ends there.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return to.flush(),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if buf.is_empty() {
            return to.flush();
        }
        let n = buf.len();
        to.write_all(buf)?;
        from.consume(n);
        to.flush()?;
    }
}

fn copy_body(from: &mut impl BufRead, to: &mut impl Write, body: Body) -> io::Result<()> {
    match body {
        Body::None => Ok(()),
        Body::Length(n) => {
            copy_exact(from, to, n)?;
            to.flush()
        }
        Body::Chunked => copy_chunked(from, to),
        Body::ToEnd => copy_to_end(from, to),
    }
}

/// The proxy's own answer to a request it does not send on.
fn answer(to: &mut impl Write, status: u16, reason: &str, message: &str) -> io::Result<()> {
    let body = format!("kiln: {message}\n");
    let reply = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\nConnection: close\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    to.write_all(reply.as_bytes())?;
    to.flush()
}

/// The path of a request target, without its query.
fn path_of(target: &str) -> String {
    let path = target.split(['?', '#']).next().unwrap_or("/");
    if path.is_empty() {
        "/".into()
    } else {
        path.to_owned()
    }
}

/// Relays requests from `guest` to `up` and responses back until either side is done.
/// `first` is a request head already read (the plain-HTTP case).
pub(crate) fn relay<G, U>(
    guest: &mut BufReader<G>,
    up: &mut BufReader<U>,
    mut first: Option<Head>,
    ctx: &Relay<'_>,
) -> io::Result<()>
where
    G: Read + Write,
    U: Read + Write,
{
    loop {
        let mut req = match first.take() {
            Some(h) => h,
            None => match read_head(guest)? {
                Some(bytes) => parse_request(&bytes)?,
                None => return Ok(()),
            },
        };
        let started = Instant::now();
        let (method, path) = (req.first.0.clone(), path_of(&req.first.1));
        let record = |status, upstream_status, error_code: Option<&str>| RequestRecord {
            sandbox_id: String::new(),
            secret_id: None,
            method: method.clone(),
            host: ctx.host.to_owned(),
            port: ctx.port,
            path: path.clone(),
            status,
            upstream_status,
            latency_ms: started.elapsed().as_millis() as u64,
            error_code: error_code.map(str::to_owned),
        };
        let req_body = match req.body() {
            Ok(b) => b,
            Err(why) => {
                return answer(
                    guest.get_mut(),
                    400,
                    "Bad Request",
                    &format!("request with {why}"),
                )
            }
        };
        // Hop-by-hop and upgrade headers stop here.
        for h in [
            "proxy-connection",
            "proxy-authorization",
            "upgrade",
            "http2-settings",
        ] {
            req.remove(h);
        }
        let expects_continue = req.has_token("expect", "100-continue");
        req.remove("expect");
        if ctx.one_request {
            req.set("Connection", "close");
        }

        // The bindings as they are now: a revocation applies to this request.
        let (sandbox_id, bindings) = match ctx.secrets.bindings() {
            Ok(Some(s)) => (s.sandbox_id, s.bindings),
            Ok(None) => (String::new(), Vec::new()),
            Err(why) => {
                answer(guest.get_mut(), 503, "Service Unavailable", &why)?;
                return Ok(());
            }
        };
        let mut open = |b: &Binding| ctx.secrets.open(b);
        let outcome = swap(&bindings, ctx.host, ctx.port, &mut req.headers, &mut open);
        let swapped: Vec<&Binding> = match &outcome {
            Ok(Swap::Swapped(ix)) => ix.iter().map(|i| &bindings[*i]).collect(),
            _ => Vec::new(),
        };
        let emit = |r: RequestRecord, secret_ids: &[Option<String>]| {
            for id in secret_ids {
                ctx.recorder.request(&RequestRecord {
                    sandbox_id: sandbox_id.clone(),
                    secret_id: id.clone(),
                    ..r.clone()
                });
            }
        };
        match outcome {
            Ok(Swap::Revoked(i)) => {
                let b = &bindings[i];
                emit(
                    record(403, None, Some("secret_revoked")),
                    std::slice::from_ref(&b.secret_id),
                );
                return answer(
                    guest.get_mut(),
                    403,
                    "Forbidden",
                    &format!(
                        "the stand-in in {} was revoked (detached, or its secret deleted)",
                        b.env_key
                    ),
                );
            }
            Err(why) => {
                emit(record(502, None, Some("secret_unavailable")), &[None]);
                return answer(guest.get_mut(), 502, "Bad Gateway", &why);
            }
            Ok(_) => {}
        }
        let ids: Vec<Option<String>> = swapped.iter().map(|b| b.secret_id.clone()).collect();

        if expects_continue && req_body != Body::None {
            guest
                .get_mut()
                .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
            guest.get_mut().flush()?;
        }
        let sent = (|| {
            up.get_mut().write_all(&req.encode_request())?;
            copy_body(guest, up.get_mut(), req_body)?;
            up.get_mut().flush()
        })();
        // The response head, past any interim (1xx) ones.
        let head = sent.and_then(|()| loop {
            let bytes = read_head(up)?.ok_or_else(|| {
                io::Error::new(io::ErrorKind::UnexpectedEof, "the upstream closed")
            })?;
            let head = parse_response(&bytes)?;
            let code: u16 = head.first.0.parse().unwrap_or(0);
            if (100..200).contains(&code) && code != 101 {
                guest.get_mut().write_all(&bytes)?;
                guest.get_mut().flush()?;
                continue;
            }
            break Ok((head, code));
        });
        let (mut resp, code) = match head {
            Ok(h) => h,
            Err(e) => {
                if !ids.is_empty() {
                    emit(record(502, None, Some("upstream_failed")), &ids);
                }
                return answer(
                    guest.get_mut(),
                    502,
                    "Bad Gateway",
                    &format!("{}:{}: {e}", ctx.host, ctx.port),
                );
            }
        };
        if !ids.is_empty() {
            emit(record(code, Some(code), None), &ids);
        }
        let resp_body = if req.first.0.eq_ignore_ascii_case("HEAD")
            || code == 204
            || code == 304
            || (100..200).contains(&code)
        {
            Body::None
        } else {
            match resp.body() {
                Ok(Body::None) => Body::ToEnd,
                Ok(b) => b,
                Err(why) => {
                    return answer(
                        guest.get_mut(),
                        502,
                        "Bad Gateway",
                        &format!("the upstream answered with {why}"),
                    )
                }
            }
        };
        let last = ctx.one_request
            || code == 101
            || resp_body == Body::ToEnd
            || req.has_token("connection", "close")
            || resp.has_token("connection", "close")
            || req.minor == 0;
        if last {
            resp.set("Connection", "close");
        }
        guest.get_mut().write_all(&resp.encode_response())?;
        copy_body(up, guest.get_mut(), resp_body)?;
        guest.get_mut().flush()?;
        if last {
            return Ok(());
        }
    }
}

/// A read half and a write half as one stream (the guest's connection is stdin and
/// stdout), counting the bytes each way.
pub(crate) struct Duplex<R, W> {
    pub r: R,
    pub w: W,
    pub read: Arc<AtomicU64>,
    pub written: Arc<AtomicU64>,
}

impl<R: Read, W> Read for Duplex<R, W> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.r.read(buf)?;
        self.read.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

impl<R, W: Write> Write for Duplex<R, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.w.write(buf)?;
        self.written.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.w.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;
    use std::sync::Mutex;

    #[test]
    fn heads_parse_and_encode_back() {
        let raw =
            b"POST /v1/chat?x=1 HTTP/1.1\r\nHost: api.example.com\r\nContent-Length: 5\r\n\r\n";
        let head = parse_request(raw).unwrap();
        assert_eq!(head.first, ("POST".into(), "/v1/chat?x=1".into()));
        assert_eq!(head.body().unwrap(), Body::Length(5));
        assert_eq!(head.encode_request(), raw);
        assert_eq!(path_of("/v1/chat?x=1"), "/v1/chat");
        let smuggle = parse_request(
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
        )
        .unwrap();
        assert!(smuggle.body().is_err());
        let gzip = parse_request(b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n").unwrap();
        assert!(gzip.body().is_err());
    }

    #[test]
    fn chunked_bodies_are_copied_whole_and_no_further() {
        let body = b"5\r\nhello\r\n3;ext=1\r\n, w\r\n0\r\nX-Trailer: t\r\n\r\nNEXT";
        let mut from = Cursor::new(body.to_vec());
        let mut to = Vec::new();
        copy_chunked(&mut from, &mut to).unwrap();
        assert_eq!(to, &body[..body.len() - 4]);
        let mut rest = String::new();
        from.read_to_string(&mut rest).unwrap();
        assert_eq!(rest, "NEXT");
        let mut cut = Cursor::new(b"5\r\nhel".to_vec());
        assert!(copy_chunked(&mut cut, &mut Vec::new()).is_err());
    }

    /// A fixed binding file and value.
    struct Fixed(Mutex<Option<SandboxSecrets>>);

    impl Secrets for Fixed {
        fn bindings(&self) -> Result<Option<SandboxSecrets>, String> {
            Ok(self.0.lock().unwrap().clone())
        }
        fn open(&self, _: &Binding) -> Result<String, String> {
            Ok("REAL".into())
        }
    }

    #[derive(Default)]
    struct Records(Mutex<Vec<RequestRecord>>);

    impl Recorder for Records {
        fn request(&self, record: &RequestRecord) {
            self.0.lock().unwrap().push(record.clone());
        }
    }

    fn bindings(revoked: bool) -> SandboxSecrets {
        SandboxSecrets {
            sandbox_id: "sbx".into(),
            bindings: vec![Binding {
                env_key: "KEY".into(),
                stand_in: "STANDIN".into(),
                secret_id: Some("sec".into()),
                hosts: vec![kiln_api::HostPattern::parse("api.example.com").unwrap()],
                auth: kiln_api::SecretAuth::Rule(kiln_api::AuthRule::Bearer),
                sealed: (!revoked).then(|| "x".into()),
            }],
        }
    }

    /// A scripted upstream: what it was sent, and what it answers.
    struct Upstream {
        sent: Vec<u8>,
        replies: Cursor<Vec<u8>>,
    }

    impl Read for Upstream {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.replies.read(buf)
        }
    }

    impl Write for Upstream {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.sent.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// A guest that sends `requests` and collects what it gets back.
    struct Guest {
        requests: Cursor<Vec<u8>>,
        got: Vec<u8>,
    }

    impl Read for Guest {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.requests.read(buf)
        }
    }

    impl Write for Guest {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.got.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn exchange(
        requests: &str,
        replies: &str,
        secrets: &Fixed,
    ) -> (String, String, Vec<RequestRecord>) {
        let records = Records::default();
        let mut guest = BufReader::new(Guest {
            requests: Cursor::new(requests.as_bytes().to_vec()),
            got: Vec::new(),
        });
        let mut up = BufReader::new(Upstream {
            sent: Vec::new(),
            replies: Cursor::new(replies.as_bytes().to_vec()),
        });
        let ctx = Relay {
            host: "api.example.com",
            port: 443,
            secrets,
            recorder: &records,
            one_request: false,
        };
        relay(&mut guest, &mut up, None, &ctx).unwrap();
        let got = String::from_utf8(guest.into_inner().got).unwrap();
        let sent = String::from_utf8(up.into_inner().sent).unwrap();
        (sent, got, records.0.into_inner().unwrap())
    }

    #[test]
    fn requests_on_one_connection_are_swapped_each_and_recorded() {
        let secrets = Fixed(Mutex::new(Some(bindings(false))));
        let (sent, got, records) = exchange(
            "GET /a?q=secret HTTP/1.1\r\nHost: api.example.com\r\nAuthorization: Bearer STANDIN\r\n\r\n\
             POST /b HTTP/1.1\r\nHost: api.example.com\r\nAuthorization: Bearer STANDIN\r\n\
             Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n\
             GET /c HTTP/1.1\r\nHost: api.example.com\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok\
             HTTP/1.1 401 Unauthorized\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nno\r\n0\r\n\r\n\
             HTTP/1.1 204 No Content\r\n\r\n",
            &secrets,
        );
        assert!(!sent.contains("STANDIN"), "{sent}");
        assert_eq!(
            sent.matches("Authorization: Bearer REAL").count(),
            2,
            "{sent}"
        );
        assert!(
            sent.contains("\r\n\r\n3\r\nabc\r\n0\r\n\r\nGET /c"),
            "{sent}"
        );
        assert_eq!(
            got,
            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok\
             HTTP/1.1 401 Unauthorized\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nno\r\n0\r\n\r\n\
             HTTP/1.1 204 No Content\r\n\r\n"
        );
        // Two swapped requests, the third had no stand-in.
        let rows: Vec<(&str, &str, u16)> = records
            .iter()
            .map(|r| (r.method.as_str(), r.path.as_str(), r.status))
            .collect();
        assert_eq!(rows, [("GET", "/a", 200), ("POST", "/b", 401)]);
        assert!(records.iter().all(|r| r.secret_id.as_deref() == Some("sec")
            && r.sandbox_id == "sbx"
            && r.error_code.is_none()));
    }

    #[test]
    fn a_revoked_stand_in_is_answered_by_the_proxy_and_never_sent() {
        let secrets = Fixed(Mutex::new(Some(bindings(true))));
        let (sent, got, records) = exchange(
            "GET /a HTTP/1.1\r\nAuthorization: Bearer STANDIN\r\n\r\n",
            "",
            &secrets,
        );
        assert_eq!(sent, "");
        assert!(got.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{got}");
        assert!(got.contains("revoked"), "{got}");
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].error_code.as_deref(), Some("secret_revoked"));
        let row = records[0].network_event(1, DateTime::from_timestamp(0, 0).unwrap());
        assert_eq!(row.verdict, NetworkVerdict::Blocked);
        assert_eq!(row.kind, "request");
    }

    #[test]
    fn an_upstream_that_fails_gets_the_guest_a_502_and_a_record() {
        let secrets = Fixed(Mutex::new(Some(bindings(false))));
        let (_, got, records) = exchange(
            "GET /a HTTP/1.1\r\nAuthorization: Bearer STANDIN\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Le",
            &secrets,
        );
        assert!(got.starts_with("HTTP/1.1 502 Bad Gateway\r\n"), "{got}");
        assert_eq!(records[0].error_code.as_deref(), Some("upstream_failed"));
    }

    #[test]
    fn a_body_to_the_end_closes_the_connection_and_upgrades_are_dropped() {
        let secrets = Fixed(Mutex::new(None));
        let (sent, got, records) = exchange(
            "GET /s HTTP/1.1\r\nUpgrade: websocket\r\nExpect: 100-continue\r\n\r\nGET /never HTTP/1.1\r\n\r\n",
            "HTTP/1.1 200 OK\r\n\r\nstreamed until close",
            &secrets,
        );
        assert!(!sent.to_ascii_lowercase().contains("upgrade: "), "{sent}");
        assert!(!sent.contains("/never"), "{sent}");
        assert!(
            got.ends_with("Connection: close\r\n\r\nstreamed until close"),
            "{got}"
        );
        assert!(records.is_empty());
    }
}
