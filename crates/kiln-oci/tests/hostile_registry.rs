//! Registries that attack the host pulling from them, each a tiny HTTP server on loopback
//! written for the test: an endless manifest, blobs longer or shorter than declared,
//! redirects to addresses kiln must not reach, redirect loops, and a registry on a
//! private address that the server was not told to allow.
//!
//! Bounds are asserted by what the hostile server managed to send (kiln stops reading, so
//! the server's writes stop), never by how long anything took.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln_oci::{ImageStore, OciError, PrivateRegistries, RegistryConfig, MAX_DOCUMENT};
use kiln_spec::BuildErrorCode;
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

/// What the hostile server answers to one request.
enum Reply {
    /// A status line's code, extra headers and a whole body (with its length).
    Full(u16, Vec<(String, String)>, Vec<u8>),
    /// 200, then `prefix` and filler bytes for as long as the client reads, with no
    /// length: the body never ends.
    Endless(Vec<u8>),
    /// 200 with `Content-Length: length` and only `body` (shorter), then the close.
    Short { length: usize, body: Vec<u8> },
}

impl Reply {
    fn json(body: &[u8]) -> Self {
        Self::Full(200, vec![], body.to_vec())
    }

    fn redirect(to: &str) -> Self {
        Self::Full(302, vec![("Location".into(), to.into())], vec![])
    }

    fn not_found() -> Self {
        Self::Full(404, vec![], b"{}".to_vec())
    }
}

type Handler = dyn Fn(&str) -> Reply + Send + Sync;

/// A hostile registry: what it was asked, and how many body bytes it got out.
struct Hostile {
    addr: SocketAddr,
    sent: Arc<AtomicU64>,
    open: Arc<AtomicUsize>,
    paths: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Hostile {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Hostile {
    async fn start(handler: impl Fn(&str) -> Reply + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let sent = Arc::new(AtomicU64::new(0));
        let open = Arc::new(AtomicUsize::new(0));
        let paths = Arc::new(Mutex::new(Vec::new()));
        let handler: Arc<Handler> = Arc::new(handler);
        let (s, o, p) = (sent.clone(), open.clone(), paths.clone());
        let task = tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                o.fetch_add(1, Ordering::SeqCst);
                let (s, o, p, h) = (s.clone(), o.clone(), p.clone(), handler.clone());
                tokio::spawn(async move {
                    let _ = serve(conn, &*h, &s, &p).await;
                    o.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Self {
            addr,
            sent,
            open,
            paths,
            task,
        }
    }

    fn host(&self) -> String {
        self.addr.to_string()
    }

    fn paths(&self) -> Vec<String> {
        self.paths.lock().unwrap().clone()
    }

    /// Waits until every connection it served is closed (kiln hung up), then says how
    /// many body bytes it sent. A guard against hanging, not a timing assertion.
    async fn sent_when_closed(&self) -> u64 {
        tokio::time::timeout(Duration::from_secs(120), async {
            while self.open.load(Ordering::SeqCst) > 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("kiln kept reading from the hostile registry");
        self.sent.load(Ordering::SeqCst)
    }
}

async fn serve(
    mut conn: TcpStream,
    handler: &Handler,
    sent: &AtomicU64,
    paths: &Mutex<Vec<String>>,
) -> std::io::Result<()> {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = conn.read(&mut buf).await?;
        if n == 0 || head.len() > 65536 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&head);
    let path = text.split(' ').nth(1).unwrap_or("/").to_owned();
    paths.lock().unwrap().push(path.clone());
    match handler(&path) {
        Reply::Full(status, headers, body) => {
            let mut h = format!(
                "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n",
                body.len()
            );
            for (k, v) in headers {
                h.push_str(&format!("{k}: {v}\r\n"));
            }
            conn.write_all(format!("{h}\r\n").as_bytes()).await?;
            send_body(&mut conn, sent, body).await?;
        }
        Reply::Endless(prefix) => {
            conn.write_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
                .await?;
            send_body(&mut conn, sent, prefix).await?;
            loop {
                send_body(&mut conn, sent, vec![b'a'; 64 * 1024]).await?;
            }
        }
        Reply::Short { length, body } => {
            conn.write_all(
                format!("HTTP/1.1 200 OK\r\nContent-Length: {length}\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await?;
            send_body(&mut conn, sent, body).await?;
        }
    }
    conn.shutdown().await
}

/// Writes body bytes, counting them once they are out.
async fn send_body(conn: &mut TcpStream, sent: &AtomicU64, bytes: Vec<u8>) -> std::io::Result<()> {
    conn.write_all(&bytes).await?;
    sent.fetch_add(bytes.len() as u64, Ordering::SeqCst);
    Ok(())
}

fn digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// A store that may reach `allowed` (`host:port`s) among private addresses, as a server
/// configured with `KILN_PRIVATE_REGISTRIES` does.
fn server_store(allowed: &[&str]) -> (tempfile::TempDir, ImageStore) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = RegistryConfig {
        private: PrivateRegistries::only(&allowed.join(",")).unwrap(),
        ..Default::default()
    };
    let store = ImageStore::open(dir.path(), cfg).unwrap();
    (dir, store)
}

fn no_progress(_: kiln_oci::Progress) {}

fn temp_files(dir: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(dir.join("blobs/sha256"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

#[tokio::test]
async fn an_endless_manifest_is_cut_at_the_cap() {
    let reg = Hostile::start(|_| Reply::Endless(br#"{"schemaVersion":2,"x":""#.to_vec())).await;
    let (_d, s) = server_store(&[&reg.host()]);
    let err = s
        .resolve(&format!("{}/evil/endless:1", reg.host()))
        .await
        .expect_err("an endless manifest must fail");
    assert!(matches!(err, OciError::TooLargeDocument { .. }), "{err:?}");
    assert_eq!(err.code(), BuildErrorCode::ImagePullFailed);
    assert!(err.to_string().contains("larger than 4 MiB"), "{err}");
    // kiln stopped reading at the cap and hung up: what the server got out is the cap plus
    // what socket buffers hold, not more.
    let sent = reg.sent_when_closed().await;
    assert!(
        sent > MAX_DOCUMENT / 2,
        "the server barely sent anything: {sent}"
    );
    assert!(
        sent < MAX_DOCUMENT + (16 << 20),
        "kiln read on past the cap: {sent} bytes"
    );
}

/// A registry serving a valid image whose one layer is `layer`, declared as `declared`
/// bytes with `digest`; the layer's reply is `blob`.
fn image_registry(
    layer_digest: String,
    declared: usize,
    blob: impl Fn() -> Reply + Send + Sync + 'static,
) -> impl Fn(&str) -> Reply + Send + Sync + 'static {
    let config = br#"{"architecture":"amd64","os":"linux","config":{}}"#.to_vec();
    let config_digest = digest(&config);
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config_digest, "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": layer_digest, "size": declared}],
    })
    .to_string()
    .into_bytes();
    move |path: &str| {
        if path.contains("/manifests/") {
            Reply::json(&manifest)
        } else if path.ends_with(&config_digest) {
            Reply::json(&config)
        } else if path.contains("/blobs/") {
            blob()
        } else {
            Reply::not_found()
        }
    }
}

#[tokio::test]
async fn a_blob_longer_than_declared_stops_at_its_size_and_leaves_nothing() {
    let layer = vec![7u8; 100_000];
    let d = digest(&layer);
    let prefix = layer.clone();
    let reg = Hostile::start(image_registry(d.clone(), layer.len(), move || {
        Reply::Endless(prefix.clone())
    }))
    .await;
    let (dir, s) = server_store(&[&reg.host()]);
    let image = s
        .resolve(&format!("{}/evil/long:1", reg.host()))
        .await
        .expect("the manifest is fine");
    let err = s
        .pull(&image, &no_progress)
        .await
        .expect_err("a blob longer than declared must fail");
    assert_eq!(err.code(), BuildErrorCode::ImagePullFailed, "{err}");
    assert!(
        err.to_string().contains("longer than the 100000 bytes"),
        "{err}"
    );
    assert_eq!(temp_files(dir.path()), Vec::<String>::new());
    let sent = reg.sent_when_closed().await;
    assert!(sent < 100_000 + (16 << 20), "kiln read on: {sent} bytes");
}

#[tokio::test]
async fn a_blob_shorter_than_declared_or_corrupt_fails_and_leaves_nothing() {
    let layer = vec![7u8; 100_000];
    let d = digest(&layer);
    let half = layer[..50_000].to_vec();
    let reg = Hostile::start(image_registry(d.clone(), layer.len(), move || {
        Reply::Short {
            length: 100_000,
            body: half.clone(),
        }
    }))
    .await;
    let (dir, s) = server_store(&[&reg.host()]);
    let image = s
        .resolve(&format!("{}/evil/short:1", reg.host()))
        .await
        .unwrap();
    let err = s.pull(&image, &no_progress).await.expect_err("short blob");
    assert_eq!(err.code(), BuildErrorCode::ImagePullFailed, "{err}");
    assert_eq!(temp_files(dir.path()), Vec::<String>::new());

    // The declared size, other bytes: the digest catches it.
    let other = vec![8u8; 100_000];
    let reg = Hostile::start(image_registry(d, layer.len(), move || Reply::json(&other))).await;
    let (dir, s) = server_store(&[&reg.host()]);
    let image = s
        .resolve(&format!("{}/evil/corrupt:1", reg.host()))
        .await
        .unwrap();
    let err = s
        .pull(&image, &no_progress)
        .await
        .expect_err("corrupt blob");
    assert!(err.to_string().contains("failed verification"), "{err}");
    assert_eq!(temp_files(dir.path()), Vec::<String>::new());
}

#[tokio::test]
async fn redirects_are_followed_only_to_allowed_addresses() {
    // Where the redirects point: a loopback service kiln must not touch.
    let victim = Hostile::start(|_| Reply::not_found()).await;
    let targets = [
        format!("http://{}/v2/x/manifests/1", victim.host()),
        format!("http://localhost:{}/v2/x/manifests/1", victim.addr.port()),
        format!("http://[::ffff:127.0.0.1]:{}/x", victim.addr.port()),
        format!("http://127.0.0.2:{}/x", victim.addr.port()),
        "file:///etc/passwd".to_owned(),
    ];
    for target in targets {
        let t = target.clone();
        let reg = Hostile::start(move |_| Reply::redirect(&t)).await;
        let (_d, s) = server_store(&[&reg.host()]);
        let err = s
            .resolve(&format!("{}/evil/redirect:1", reg.host()))
            .await
            .expect_err(&target);
        assert_eq!(
            err.code(),
            BuildErrorCode::RegistryUnreachable,
            "{target}: {err}"
        );
    }
    assert_eq!(
        victim.paths(),
        Vec::<String>::new(),
        "a redirect reached the victim"
    );

    // A redirect within the allowed registry is followed (blob storage often lives
    // elsewhere on the same host).
    let manifest = br#"{"schemaVersion":2,"manifests":[]}"#.to_vec();
    let reg = Hostile::start(move |path| {
        if path.starts_with("/storage/") {
            Reply::json(&manifest)
        } else {
            Reply::redirect(&format!("/storage{path}"))
        }
    })
    .await;
    let (_d, s) = server_store(&[&reg.host()]);
    let err = s
        .resolve(&format!("{}/ok/redirected:1", reg.host()))
        .await
        .expect_err("an empty index");
    assert_eq!(err.code(), BuildErrorCode::UnsupportedPlatform, "{err}");
}

#[tokio::test]
async fn a_redirect_loop_ends_after_a_few_hops() {
    let reg = Hostile::start(Reply::redirect).await;
    let (_d, s) = server_store(&[&reg.host()]);
    let err = s
        .resolve(&format!("{}/evil/loop:1", reg.host()))
        .await
        .expect_err("a loop");
    assert_eq!(err.code(), BuildErrorCode::RegistryUnreachable, "{err}");
    assert_eq!(reg.paths().len(), kiln_oci::MAX_REDIRECTS + 1);
}

/// A registry on a private address is refused without the allowlist, with exactly the
/// error a closed port gets: a tenant cannot tell "something listens there" from
/// "nothing does".
#[tokio::test]
async fn a_private_registry_is_refused_like_a_closed_port() {
    let reg = Hostile::start(|_| Reply::not_found()).await;
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    // The closed port is allowed (so kiln really connects and is refused); the live
    // registry is not.
    let (_d, s) = server_store(&[&closed]);
    let denied = s
        .resolve(&format!("{}/x/y:1", reg.host()))
        .await
        .expect_err("not allowed");
    let refused = s
        .resolve(&format!("{closed}/x/y:1"))
        .await
        .expect_err("closed");
    assert_eq!(denied.code(), BuildErrorCode::RegistryUnreachable);
    assert_eq!(refused.code(), BuildErrorCode::RegistryUnreachable);
    assert_eq!(
        denied.to_string().replace(&reg.host(), "HOST"),
        refused.to_string().replace(&closed, "HOST")
    );
    assert_eq!(reg.paths(), Vec::<String>::new(), "kiln connected to it");

    // Allowed, the same registry answers (here: not found).
    let (_d, s) = server_store(&[&reg.host()]);
    let err = s
        .resolve(&format!("{}/x/y:1", reg.host()))
        .await
        .expect_err("404");
    assert_eq!(err.code(), BuildErrorCode::ImagePullFailed, "{err}");
    assert_eq!(reg.paths().len(), 1);
}
