//! For tests of the egress path (this crate's, and the real-VM tests above it): an
//! upstream HTTP or HTTPS server on loopback that records every request head it gets, so a
//! test sees exactly what left the proxy. Its answer names the path and the sha256 of the
//! `Authorization` header it got (`path=/x authorization-sha256=<hex|none>`): a guest can
//! check which credential arrived without the upstream handing the credential back.

use std::io::{BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use sha2::{Digest as _, Sha256};

use crate::ca::EgressCa;
use crate::intercept::{parse_request, read_head};

/// A recording upstream. Stopped when dropped.
#[derive(Debug)]
pub struct Upstream {
    /// Its loopback port.
    pub port: u16,
    seen: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl Upstream {
    /// Listens on `127.0.0.1`, in plain HTTP, or in HTTPS with a leaf of `ca` for
    /// `127.0.0.1` (a test CA the proxy is told to trust, e.g. through
    /// `KILN_EGRESS_TRUST_CA`).
    pub fn start(tls: Option<&EgressCa>) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the upstream");
        let port = listener.local_addr().expect("upstream address").port();
        let server = tls.map(|ca| {
            let (chain, key) = ca.leaf("127.0.0.1").expect("upstream leaf");
            Arc::new(
                rustls::ServerConfig::builder_with_provider(Arc::new(
                    rustls::crypto::ring::default_provider(),
                ))
                .with_safe_default_protocol_versions()
                .expect("TLS versions")
                .with_no_client_auth()
                .with_single_cert(chain, key)
                .expect("upstream certificate"),
            )
        });
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let accept = {
            let (seen, stop) = (seen.clone(), stop.clone());
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let Ok(conn) = conn else { continue };
                    let seen = seen.clone();
                    let server = server.clone();
                    std::thread::spawn(move || {
                        let _ = match server {
                            Some(cfg) => match rustls::ServerConnection::new(cfg) {
                                Ok(tls) => serve(rustls::StreamOwned::new(tls, conn), &seen),
                                Err(_) => Ok(()),
                            },
                            None => serve(conn, &seen),
                        };
                    });
                }
            })
        };
        Upstream {
            port,
            seen,
            stop,
            accept: Some(accept),
        }
    }

    /// Every request head received so far, in order.
    pub fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

/// What the upstream answers a request with `authorization` (its header, if any) to `path`.
pub fn answer(path: &str, authorization: Option<&str>) -> String {
    let auth = authorization.map_or_else(
        || "none".to_owned(),
        |a| hex::encode(Sha256::digest(a.as_bytes())),
    );
    format!("path={path} authorization-sha256={auth}\n")
}

/// Answers each request of a connection (see [`answer`]).
fn serve<S: Read + Write>(stream: S, seen: &Mutex<Vec<String>>) -> std::io::Result<()> {
    let mut conn = BufReader::new(stream);
    while let Some(head) = read_head(&mut conn)? {
        let text = String::from_utf8_lossy(&head).into_owned();
        seen.lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(text.clone());
        let req = parse_request(&head)?;
        let length = req
            .headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
            .and_then(|(_, v)| std::str::from_utf8(v).ok()?.trim().parse::<u64>().ok())
            .unwrap_or(0);
        std::io::copy(&mut (&mut conn).take(length), &mut std::io::sink())?;
        let authorization = req
            .headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case("authorization"))
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned());
        let body = answer(&req.first.1, authorization.as_deref());
        let reply = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        conn.get_mut().write_all(reply.as_bytes())?;
        conn.get_mut().flush()?;
    }
    Ok(())
}
