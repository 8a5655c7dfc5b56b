//! The egress proxy's files, served by its owner over a socket.
//!
//! The proxy runs as an unprivileged user in a mount namespace with none of kiln's state
//! in it, so it cannot open a sandbox's files itself. Its owner (the kiln process that
//! started the VM, as root) keeps one end of a socket pair and answers the proxy's
//! requests from a [`FileSet`]: read a [`Source`], append a line to a [`Sink`]. The proxy
//! learns the contents of its own sandbox's files and nothing else, and can write lines
//! to its own logs only (see [`FileSet`] for what an audit takes).
//!
//! Frames, little-endian:
//!
//! ```text
//! read:     1  source:u8
//! append:   2  sink:u8 (0 network, 1 audit)  id_len:u8 id  len:u32 line
//! answer:   status:u8 (0 data, 1 absent, 2 done, 3 error)  len:u32 payload
//! ```

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, RwLock};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::files::{FileSet, Files, FilesError, Sink, Source, MAX_LINE, MAX_READ};

const OP_READ: u8 = 1;
const OP_APPEND: u8 = 2;
const DATA: u8 = 0;
const ABSENT: u8 = 1;
const DONE: u8 = 2;
const ERROR: u8 = 3;

fn source_code(s: Source) -> u8 {
    Source::ALL.iter().position(|x| *x == s).unwrap_or(0) as u8
}

/// A VM's files, set once the VM's sandbox is known: a pooled restore starts its proxy
/// before any sandbox claims it. Until then every read fails, so the proxy refuses what it
/// is asked (the guest is not even running then).
#[derive(Debug, Default)]
pub struct AssignedFiles(RwLock<Option<FileSet>>);

impl AssignedFiles {
    /// Files known from the start.
    pub fn new(set: Option<FileSet>) -> Self {
        Self(RwLock::new(set))
    }

    /// Points the proxy at `set` from its next request on.
    pub fn assign(&self, set: FileSet) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Some(set);
    }

    fn current(&self) -> Result<FileSet, FilesError> {
        self.0
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| FilesError::Refused("this VM serves no sandbox yet".into()))
    }
}

impl Files for AssignedFiles {
    fn read(&self, source: Source) -> Result<Option<Vec<u8>>, FilesError> {
        self.current()?.read(source)
    }

    fn append(&self, sink: &Sink, line: &[u8]) -> Result<(), FilesError> {
        self.current()?.append(sink, line)
    }
}

/// Answers a proxy's requests on `stream` from `files` until the proxy hangs up (or sends
/// something that is not a request).
pub async fn serve(mut stream: tokio::net::UnixStream, files: Arc<dyn Files>) {
    loop {
        let request = match read_request(&mut stream).await {
            Ok(Some(r)) => r,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(error = %e, "egress proxy sent a malformed request; hanging up");
                return;
            }
        };
        let files = files.clone();
        let answer = tokio::task::spawn_blocking(move || match request {
            Request::Read(source) => match files.read(source) {
                Ok(Some(data)) => (DATA, data),
                Ok(None) => (ABSENT, Vec::new()),
                Err(e) => (ERROR, kiln_spec::error_chain(&e).into_bytes()),
            },
            Request::Append(sink, line) => match files.append(&sink, &line) {
                Ok(()) => (DONE, Vec::new()),
                Err(e) => (ERROR, kiln_spec::error_chain(&e).into_bytes()),
            },
        })
        .await
        .unwrap_or_else(|e| (ERROR, e.to_string().into_bytes()));
        let mut frame = Vec::with_capacity(5 + answer.1.len());
        frame.push(answer.0);
        frame.extend_from_slice(&(answer.1.len() as u32).to_le_bytes());
        frame.extend_from_slice(&answer.1);
        if stream.write_all(&frame).await.is_err() {
            return;
        }
    }
}

enum Request {
    Read(Source),
    Append(Sink, Vec<u8>),
}

async fn read_request(stream: &mut tokio::net::UnixStream) -> std::io::Result<Option<Request>> {
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned());
    let op = match stream.read_u8().await {
        Ok(op) => op,
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    };
    match op {
        OP_READ => {
            let code = stream.read_u8().await?;
            let source = *Source::ALL
                .get(usize::from(code))
                .ok_or_else(|| bad("unknown source"))?;
            Ok(Some(Request::Read(source)))
        }
        OP_APPEND => {
            let kind = stream.read_u8().await?;
            let id_len = stream.read_u8().await?;
            let mut id = vec![0; usize::from(id_len)];
            stream.read_exact(&mut id).await?;
            let len = stream.read_u32_le().await? as usize;
            if len > MAX_LINE {
                return Err(bad("line too long"));
            }
            let mut line = vec![0; len];
            stream.read_exact(&mut line).await?;
            let sink = match kind {
                0 => Sink::Network,
                1 => Sink::Audit(String::from_utf8(id).map_err(|_| bad("audit id"))?),
                _ => return Err(bad("unknown sink")),
            };
            Ok(Some(Request::Append(sink, line)))
        }
        _ => Err(bad("unknown operation")),
    }
}

/// The proxy's end: [`Files`] answered by the owner. Requests from the proxy's threads
/// take turns on the one socket.
#[derive(Debug)]
pub struct BrokerClient(Mutex<UnixStream>);

impl BrokerClient {
    /// Over a connected socket (the proxy inherits it from its owner).
    pub fn new(stream: UnixStream) -> Self {
        Self(Mutex::new(stream))
    }

    fn ask(&self, request: &[u8]) -> Result<(u8, Vec<u8>), FilesError> {
        let mut s = self.0.lock().unwrap_or_else(|e| e.into_inner());
        s.write_all(request).map_err(FilesError::Broker)?;
        let mut head = [0u8; 5];
        s.read_exact(&mut head).map_err(FilesError::Broker)?;
        let len = u32::from_le_bytes([head[1], head[2], head[3], head[4]]);
        if u64::from(len) > MAX_READ + 4096 {
            return Err(FilesError::Broker(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "answer too long",
            )));
        }
        let mut payload = vec![0; len as usize];
        s.read_exact(&mut payload).map_err(FilesError::Broker)?;
        Ok((head[0], payload))
    }
}

impl Files for BrokerClient {
    fn read(&self, source: Source) -> Result<Option<Vec<u8>>, FilesError> {
        match self.ask(&[OP_READ, source_code(source)])? {
            (DATA, data) => Ok(Some(data)),
            (ABSENT, _) => Ok(None),
            (_, message) => Err(FilesError::Remote(
                String::from_utf8_lossy(&message).into_owned(),
            )),
        }
    }

    fn append(&self, sink: &Sink, line: &[u8]) -> Result<(), FilesError> {
        let (kind, id) = match sink {
            Sink::Network => (0, ""),
            Sink::Audit(id) => (1, id.as_str()),
        };
        if id.len() > usize::from(u8::MAX) || line.len() > MAX_LINE {
            return Err(FilesError::Refused("audit id or line too long".into()));
        }
        let mut frame = vec![OP_APPEND, kind, id.len() as u8];
        frame.extend_from_slice(id.as_bytes());
        frame.extend_from_slice(&(line.len() as u32).to_le_bytes());
        frame.extend_from_slice(line);
        match self.ask(&frame)? {
            (DONE, _) => Ok(()),
            (_, message) => Err(FilesError::Remote(
                String::from_utf8_lossy(&message).into_owned(),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A proxy's requests go through the owner to the files it was assigned, and a VM
    /// not yet assigned reads nothing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_proxy_reads_and_appends_through_its_owner() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("network.json"), b"{\"allow_out\":[]}").unwrap();
        let (ours, theirs) = UnixStream::pair().unwrap();
        theirs.set_nonblocking(true).unwrap();
        let files = Arc::new(AssignedFiles::new(None));
        let owner = tokio::spawn(serve(
            tokio::net::UnixStream::from_std(theirs).unwrap(),
            files.clone(),
        ));
        let client = BrokerClient::new(ours);
        let r = tokio::task::spawn_blocking(move || {
            let unassigned = client.read(Source::Rules);
            (client, unassigned)
        })
        .await
        .unwrap();
        let (client, unassigned) = r;
        assert!(
            matches!(&unassigned, Err(FilesError::Remote(m)) if m.contains("no sandbox")),
            "{unassigned:?}"
        );
        files.assign(FileSet {
            rules: Some(dir.path().join("network.json")),
            log: Some(dir.path().join("network.log")),
            audit_dir: Some(dir.path().to_owned()),
            ..FileSet::default()
        });
        let client = tokio::task::spawn_blocking(move || {
            assert_eq!(
                client.read(Source::Rules).unwrap().unwrap(),
                b"{\"allow_out\":[]}"
            );
            assert_eq!(client.read(Source::Key).unwrap(), None);
            client
                .append(&Sink::Network, b"{\"kind\":\"connection\"}")
                .unwrap();
            // No secret is bound to this sandbox: its audit takes nothing.
            let refused = client.append(&Sink::Audit("abc".into()), b"x");
            assert!(matches!(refused, Err(FilesError::Remote(_))), "{refused:?}");
            client
        })
        .await
        .unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.path().join("network.log")).unwrap(),
            "{\"kind\":\"connection\"}\n"
        );
        drop(client);
        owner.await.unwrap();
    }
}
