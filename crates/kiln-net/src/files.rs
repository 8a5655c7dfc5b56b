//! What the egress proxy reads and writes outside itself: a sandbox's rules and secret
//! bindings, the key and the CA that using the bindings needs, and its logs.
//!
//! The proxy runs jailed (see `kiln_vm::jail`): an unprivileged user that sees none of
//! kiln's state. It asks for these by name ([`Source`], [`Sink`]) through [`Files`], which
//! its owner answers with a [`FileSet`] over a socket ([`crate::broker`]): the owner (root)
//! opens the files, so none of them needs to be readable by the proxy's user, and the proxy
//! can reach nothing else. The files are read again on every use, so the engine's updates
//! (a PATCH of the rules, a detach, a rotation of the key) apply to the next connection or
//! request at once.

use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};

use crate::secrets::SandboxSecrets;

/// The longest file the proxy is given.
pub const MAX_READ: u64 = 4 << 20;
/// The longest line it may append.
pub const MAX_LINE: usize = 64 << 10;
/// A log is kept to about this size: past it, the current file becomes `.1` (the previous
/// `.1` goes) and a new one starts.
pub const MAX_LOG: u64 = 8 << 20;

/// A file the proxy reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The sandbox's rules (JSON [`crate::NetworkConfig`]); absent: no rules.
    Rules,
    /// The sandbox's secret bindings ([`SandboxSecrets`]); absent: no bindings.
    Secrets,
    /// The secrets key ([`crate::seal::KeyRing`]).
    Key,
    /// The egress CA's certificate.
    CaCert,
    /// The egress CA's key.
    CaKey,
    /// More roots to verify upstreams against (`KILN_EGRESS_TRUST_CA`).
    TrustCa,
}

impl Source {
    /// Every source, in wire order.
    pub const ALL: [Source; 6] = [
        Source::Rules,
        Source::Secrets,
        Source::Key,
        Source::CaCert,
        Source::CaKey,
        Source::TrustCa,
    ];
}

/// A log the proxy appends a line to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sink {
    /// The sandbox's network log (connections, and requests a secret went into).
    Network,
    /// The audit of one secret, by id.
    Audit(String),
}

/// Why a file could not be read or a line appended.
#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    /// A file operation failed.
    #[error("{what} {}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// On which file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is larger than the proxy is given.
    #[error("{} is over {MAX_READ} bytes", .0.display())]
    TooLarge(PathBuf),
    /// The request is not one the proxy may make.
    #[error("refused: {0}")]
    Refused(String),
    /// The owner could not be asked (the broker's socket failed).
    #[error("the proxy's owner does not answer")]
    Broker(#[source] std::io::Error),
    /// The owner answered with an error.
    #[error("the proxy's owner: {0}")]
    Remote(String),
}

/// Where the proxy's files are, and how to read and append to them.
pub trait Files: Send + Sync {
    /// The file's bytes; `None` when it does not exist (or the sandbox has none).
    fn read(&self, source: Source) -> Result<Option<Vec<u8>>, FilesError>;
    /// Appends one line (a newline is added).
    fn append(&self, sink: &Sink, line: &[u8]) -> Result<(), FilesError>;
}

/// Where one VM's egress files are, by path (`None`: the VM has none of that kind). What
/// the owner serves its proxy from; also usable directly (tests, tools).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FileSet {
    /// The sandbox's rules file.
    pub rules: Option<PathBuf>,
    /// The sandbox's bindings file.
    pub secrets: Option<PathBuf>,
    /// The secrets key file.
    pub key: Option<PathBuf>,
    /// The egress CA's directory.
    pub ca_dir: Option<PathBuf>,
    /// The operator's bundle of upstream roots.
    pub trust_ca: Option<PathBuf>,
    /// The sandbox's network log.
    pub log: Option<PathBuf>,
    /// The directory of the secrets' audit logs (`<id>.log`).
    pub audit_dir: Option<PathBuf>,
}

impl FileSet {
    fn path(&self, source: Source) -> Option<PathBuf> {
        match source {
            Source::Rules => self.rules.clone(),
            Source::Secrets => self.secrets.clone(),
            Source::Key => self.key.clone(),
            Source::CaCert => self.ca_dir.as_ref().map(|d| d.join(crate::ca::CA_CERT)),
            Source::CaKey => self.ca_dir.as_ref().map(|d| d.join(crate::ca::CA_KEY)),
            Source::TrustCa => self.trust_ca.clone(),
        }
    }

    /// The file an append goes to. A secret's audit only takes lines for a secret bound
    /// to this sandbox: the ids come from the proxy, which reads guest bytes.
    fn sink_path(&self, sink: &Sink) -> Result<Option<PathBuf>, FilesError> {
        match sink {
            Sink::Network => Ok(self.log.clone()),
            Sink::Audit(id) => {
                let Some(dir) = &self.audit_dir else {
                    return Ok(None);
                };
                // Secret ids are kiln's UUIDs; anything else is not a file name.
                let well_formed = !id.is_empty()
                    && id.len() <= 64
                    && id.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-');
                let bound = well_formed
                    && match self.read(Source::Secrets)? {
                        Some(bytes) => SandboxSecrets::parse(&bytes)
                            .map_err(|e| FilesError::Refused(e.to_string()))?
                            .bindings
                            .iter()
                            .any(|b| b.secret_id.as_deref() == Some(id.as_str())),
                        None => false,
                    };
                if !bound {
                    return Err(FilesError::Refused(format!(
                        "no secret {id:?} is bound to this sandbox"
                    )));
                }
                Ok(Some(dir.join(format!("{id}.log"))))
            }
        }
    }
}

impl Files for FileSet {
    fn read(&self, source: Source) -> Result<Option<Vec<u8>>, FilesError> {
        let Some(path) = self.path(source) else {
            return Ok(None);
        };
        let io = |what| {
            let path = path.clone();
            move |source| FilesError::Io { what, path, source }
        };
        let file = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io("opening")(e)),
        };
        let mut bytes = Vec::new();
        file.take(MAX_READ + 1)
            .read_to_end(&mut bytes)
            .map_err(io("reading"))?;
        if bytes.len() as u64 > MAX_READ {
            return Err(FilesError::TooLarge(path));
        }
        Ok(Some(bytes))
    }

    fn append(&self, sink: &Sink, line: &[u8]) -> Result<(), FilesError> {
        if line.len() > MAX_LINE || line.contains(&b'\n') {
            return Err(FilesError::Refused(format!(
                "a log line must be one line of at most {MAX_LINE} bytes"
            )));
        }
        let Some(path) = self.sink_path(sink)? else {
            return Ok(());
        };
        append_line(&path, line).map_err(|source| FilesError::Io {
            what: "appending to",
            path,
            source,
        })
    }
}

/// Appends `line` and a newline to `path` in one write (concurrent writers append whole
/// lines), rotating it to `.1` first when it is over [`MAX_LOG`].
fn append_line(path: &Path, line: &[u8]) -> std::io::Result<()> {
    if std::fs::metadata(path).is_ok_and(|m| m.len() > MAX_LOG) {
        std::fs::rename(path, path.with_extension("log.1"))?;
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    let mut buf = Vec::with_capacity(line.len() + 1);
    buf.extend_from_slice(line);
    buf.push(b'\n');
    f.write_all(&buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bindings(secret: &str) -> String {
        serde_json::json!({
            "sandbox_id": "sbx-1",
            "bindings": [{
                "env_key": "K", "stand_in": "s", "secret_id": secret,
                "hosts": ["api.example.com"], "auth": {"type": "bearer"}, "sealed": null,
            }],
        })
        .to_string()
    }

    #[test]
    fn files_are_read_by_name_and_missing_ones_are_none() {
        let dir = tempfile::tempdir().unwrap();
        let set = FileSet {
            rules: Some(dir.path().join("network.json")),
            ca_dir: Some(dir.path().to_owned()),
            ..FileSet::default()
        };
        assert_eq!(set.read(Source::Rules).unwrap(), None);
        assert_eq!(set.read(Source::Secrets).unwrap(), None, "not configured");
        std::fs::write(dir.path().join("network.json"), b"{}").unwrap();
        std::fs::write(dir.path().join(crate::ca::CA_CERT), b"cert").unwrap();
        assert_eq!(set.read(Source::Rules).unwrap().unwrap(), b"{}");
        assert_eq!(set.read(Source::CaCert).unwrap().unwrap(), b"cert");
        let big = dir.path().join("big");
        std::fs::File::create(&big)
            .unwrap()
            .set_len(MAX_READ + 1)
            .unwrap();
        let set = FileSet {
            rules: Some(big),
            ..FileSet::default()
        };
        assert!(matches!(
            set.read(Source::Rules),
            Err(FilesError::TooLarge(_))
        ));
    }

    #[test]
    fn logs_rotate_and_audits_take_only_bound_secrets() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("network.log");
        let audit = dir.path().join("audit");
        std::fs::create_dir(&audit).unwrap();
        let set = FileSet {
            log: Some(log.clone()),
            secrets: Some(dir.path().join("secrets.json")),
            audit_dir: Some(audit.clone()),
            ..FileSet::default()
        };
        set.append(&Sink::Network, b"one").unwrap();
        set.append(&Sink::Network, b"two").unwrap();
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "one\ntwo\n");
        for bad in [&b"a\nb"[..], &vec![b'x'; MAX_LINE + 1]] {
            assert!(matches!(
                set.append(&Sink::Network, bad),
                Err(FilesError::Refused(_))
            ));
        }
        std::fs::File::options()
            .append(true)
            .open(&log)
            .unwrap()
            .set_len(MAX_LOG + 1)
            .unwrap();
        set.append(&Sink::Network, b"three").unwrap();
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "three\n");
        assert!(dir.path().join("network.log.1").exists());

        // No bindings file: no secret is bound, so no audit takes a line.
        let id = "0b6e3d1c-4f00-4a3b-9d7e-5b8f0c1d2e3f";
        let refused = |s: &str| {
            matches!(
                set.append(&Sink::Audit(s.into()), b"x"),
                Err(FilesError::Refused(_))
            )
        };
        assert!(refused(id));
        std::fs::write(dir.path().join("secrets.json"), bindings(id)).unwrap();
        set.append(&Sink::Audit(id.into()), b"event").unwrap();
        assert_eq!(
            std::fs::read_to_string(audit.join(format!("{id}.log"))).unwrap(),
            "event\n"
        );
        // Another team's secret, or a path, never.
        assert!(refused("1b6e3d1c-4f00-4a3b-9d7e-5b8f0c1d2e3f"));
        assert!(refused("../../etc/passwd"));
        assert!(refused(""));
        assert_eq!(std::fs::read_dir(&audit).unwrap().count(), 1);
    }
}
