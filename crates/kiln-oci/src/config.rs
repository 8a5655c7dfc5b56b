//! Registry settings: credentials, insecure (plain HTTP) hosts and mirrors.
//!
//! Sources, later ones filling gaps only: kiln's config file (a JSON document with a
//! `registries` object, see [`RegistryConfig`]), `~/.docker/config.json` (or
//! `$DOCKER_CONFIG/config.json`) for credentials `docker login` stored, and
//! `KILN_REGISTRY_MIRRORS` for mirrors, which go before the config file's.
//!
//! ```json
//! {
//!   "registries": {
//!     "docker.io": { "mirrors": ["http://127.0.0.1:5000"] },
//!     "ghcr.io": { "username": "me", "password": "ghp_..." },
//!     "registry.internal:5000": { "insecure": true, "token": "..." }
//!   }
//! }
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use kiln_spec::reference::DOCKER_HUB;
use kiln_spec::ImageRef;
use serde::Deserialize;

use crate::error::{OciError, Result};
use crate::policy::PrivateRegistries;

/// The environment variable listing mirrors: `docker.io=http://127.0.0.1:5000,ghcr.io=https://m`.
pub const MIRRORS_ENV: &str = "KILN_REGISTRY_MIRRORS";

/// Settings for one registry host (`docker.io`, `ghcr.io`, `127.0.0.1:5000`).
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RegistrySettings {
    /// Basic-auth user name (also used to obtain bearer tokens).
    #[serde(default)]
    pub username: Option<String>,
    /// Basic-auth password or access token.
    #[serde(default)]
    pub password: Option<String>,
    /// A ready bearer token, sent as is.
    #[serde(default)]
    pub token: Option<String>,
    /// Talk plain HTTP to this host (loopback hosts always are).
    #[serde(default)]
    pub insecure: bool,
    /// Mirrors tried in order before the registry itself: `http://host:port` or `host`.
    #[serde(default)]
    pub mirrors: Vec<String>,
}

/// All registry settings, keyed by registry host as in normalised references.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
pub struct RegistryConfig {
    /// Per-registry settings.
    #[serde(default)]
    pub registries: BTreeMap<String, RegistrySettings>,
    /// Credentials from Docker's config, consulted after `registries`.
    #[serde(skip)]
    pub docker_auths: BTreeMap<String, (String, String)>,
    /// Which non-public addresses registries may be reached at (mirrors always may):
    /// any for the local CLI (the default), an allowlist for a server.
    #[serde(skip)]
    pub private: PrivateRegistries,
}

/// Credentials to present to one host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credentials {
    /// None: anonymous (bearer tokens are still fetched when the registry asks).
    Anonymous,
    /// User and password (basic auth, or exchanged for a bearer token).
    Basic(String, String),
    /// A bearer token.
    Bearer(String),
}

/// One place to fetch from: a mirror or the registry itself.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Endpoint {
    /// `host[:port]`.
    pub host: String,
    /// Plain HTTP rather than HTTPS.
    pub plain_http: bool,
    /// Whether this is a mirror (failures fall through to the next endpoint).
    pub mirror: bool,
}

/// `index.docker.io` and friends all mean Docker Hub.
fn normalise_host(host: &str) -> String {
    let h = host
        .trim_start_matches("https://")
        .trim_start_matches("http://");
    let h = h.split('/').next().unwrap_or(h);
    match h {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => {
            DOCKER_HUB.to_owned()
        }
        other => other.to_owned(),
    }
}

/// Whether `host[:port]` is on loopback, where plain HTTP is allowed as Docker does
/// (the rule lives in `kiln-spec`, with the reference grammar).
pub fn is_loopback_host(host: &str) -> bool {
    ImageRef::parse(&format!("{host}/x")).is_ok_and(|r| r.is_loopback_registry())
}

impl RegistryConfig {
    /// Loads kiln's config file (a missing file is an empty config), Docker's credentials
    /// and `KILN_REGISTRY_MIRRORS`.
    pub fn load(kiln_config: Option<&Path>) -> Result<Self> {
        let mut cfg = match kiln_config {
            Some(path) => match std::fs::read(path) {
                Ok(bytes) => serde_json::from_slice::<Self>(&bytes).map_err(|e| {
                    OciError::io(
                        format!("kiln config {} is invalid", path.display()),
                        std::io::Error::new(std::io::ErrorKind::InvalidData, e),
                    )
                })?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Self::default(),
                Err(e) => return Err(OciError::io(format!("read {}", path.display()), e)),
            },
            None => Self::default(),
        };
        cfg.registries = cfg
            .registries
            .into_iter()
            .map(|(k, v)| (normalise_host(&k), v))
            .collect();
        if let Some(path) = docker_config_path() {
            cfg.docker_auths = read_docker_auths(&path);
        }
        if let Ok(spec) = std::env::var(MIRRORS_ENV) {
            cfg.add_mirrors_from_env(&spec);
        }
        Ok(cfg)
    }

    /// Adds mirrors from `docker.io=http://127.0.0.1:5000,ghcr.io=...`; they go first.
    pub fn add_mirrors_from_env(&mut self, spec: &str) {
        let mut by_host: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            match item.split_once('=') {
                Some((host, url)) if !host.trim().is_empty() && !url.trim().is_empty() => {
                    by_host
                        .entry(normalise_host(host.trim()))
                        .or_default()
                        .push(url.trim().to_owned());
                }
                _ => tracing::warn!(
                    item,
                    "ignoring malformed {MIRRORS_ENV} entry (want HOST=URL)"
                ),
            }
        }
        for (host, mut urls) in by_host {
            let settings = self.registries.entry(host).or_default();
            urls.append(&mut settings.mirrors);
            settings.mirrors = urls;
        }
    }

    /// Where to fetch `registry`'s content from: its mirrors in order, then itself.
    pub fn endpoints(&self, registry: &str) -> Vec<Endpoint> {
        let mut out = Vec::new();
        if let Some(s) = self.registries.get(registry) {
            for m in &s.mirrors {
                let (scheme, rest) = match m.split_once("://") {
                    Some((scheme, rest)) => (Some(scheme), rest),
                    None => (None, m.as_str()),
                };
                let host = rest.split('/').next().unwrap_or(rest).to_owned();
                if rest.trim_end_matches('/') != host {
                    tracing::warn!(mirror = %m, "mirror path prefixes are not supported; using the host only");
                }
                let plain_http = match scheme {
                    Some("http") => true,
                    Some(_) => false,
                    None => self.insecure(&host),
                };
                out.push(Endpoint {
                    host,
                    plain_http,
                    mirror: true,
                });
            }
        }
        out.push(Endpoint {
            host: registry.to_owned(),
            plain_http: self.insecure(registry),
            mirror: false,
        });
        out
    }

    /// Whether `host` is reached over plain HTTP: loopback, or marked insecure.
    pub fn insecure(&self, host: &str) -> bool {
        is_loopback_host(host) || self.registries.get(host).is_some_and(|s| s.insecure)
    }

    /// The credentials for `host`: kiln's config first, then Docker's.
    pub fn credentials(&self, host: &str) -> Credentials {
        if let Some(s) = self.registries.get(host) {
            if let Some(t) = &s.token {
                return Credentials::Bearer(t.clone());
            }
            if let (Some(u), Some(p)) = (&s.username, &s.password) {
                return Credentials::Basic(u.clone(), p.clone());
            }
        }
        match self.docker_auths.get(host) {
            Some((u, p)) => Credentials::Basic(u.clone(), p.clone()),
            None => Credentials::Anonymous,
        }
    }
}

fn docker_config_path() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("DOCKER_CONFIG").filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(dir).join("config.json"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker/config.json"))
}

#[derive(Deserialize)]
struct DockerConfig {
    #[serde(default)]
    auths: BTreeMap<String, DockerAuth>,
}

#[derive(Deserialize)]
struct DockerAuth {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
}

/// Reads `auths` from Docker's config. Credential helpers (`credsStore`) are not run: a
/// daemon should not exec arbitrary helpers; put such credentials in kiln's config.
pub fn read_docker_auths(path: &Path) -> BTreeMap<String, (String, String)> {
    let Ok(bytes) = std::fs::read(path) else {
        return BTreeMap::new();
    };
    let cfg: DockerConfig = match serde_json::from_slice(&bytes) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "ignoring unreadable Docker config");
            return BTreeMap::new();
        }
    };
    let mut out = BTreeMap::new();
    for (host, a) in cfg.auths {
        let pair = match (a.auth, a.username, a.password) {
            (Some(b64), _, _) => base64::engine::general_purpose::STANDARD
                .decode(b64.trim())
                .ok()
                .and_then(|raw| String::from_utf8(raw).ok())
                .and_then(|s| s.split_once(':').map(|(u, p)| (u.to_owned(), p.to_owned()))),
            (None, Some(u), Some(p)) => Some((u, p)),
            _ => None,
        };
        if let Some(pair) = pair {
            out.insert(normalise_host(&host), pair);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_mirrors_go_first_and_schemes_decide_http() {
        let mut cfg: RegistryConfig = serde_json::from_str(
            r#"{"registries":{"docker.io":{"mirrors":["https://m.example"]},"reg.example":{"insecure":true}}}"#,
        )
        .expect("config");
        cfg.add_mirrors_from_env("docker.io=http://127.0.0.1:5000, ghcr.io=localhost:6000,bad");
        let eps = cfg.endpoints("docker.io");
        let hosts: Vec<_> = eps
            .iter()
            .map(|e| (e.host.as_str(), e.plain_http, e.mirror))
            .collect();
        assert_eq!(
            hosts,
            [
                ("127.0.0.1:5000", true, true),
                ("m.example", false, true),
                ("docker.io", false, false)
            ]
        );
        assert_eq!(
            cfg.endpoints("ghcr.io")[0],
            Endpoint {
                host: "localhost:6000".into(),
                plain_http: true,
                mirror: true
            }
        );
        assert!(cfg.insecure("reg.example"));
        assert!(cfg.insecure("[::1]:5000"));
        assert!(!cfg.insecure("ghcr.io"));
    }

    #[test]
    fn docker_config_credentials() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("config.json");
        std::fs::write(
            &p,
            r#"{"auths":{"https://index.docker.io/v1/":{"auth":"dXNlcjpwYXNz"},"127.0.0.1:5000":{"username":"a","password":"b"}}}"#,
        )
        .expect("write");
        let mut cfg = RegistryConfig {
            docker_auths: read_docker_auths(&p),
            ..Default::default()
        };
        assert_eq!(
            cfg.credentials("docker.io"),
            Credentials::Basic("user".into(), "pass".into())
        );
        assert_eq!(
            cfg.credentials("127.0.0.1:5000"),
            Credentials::Basic("a".into(), "b".into())
        );
        cfg.registries.insert(
            "docker.io".into(),
            RegistrySettings {
                token: Some("t".into()),
                ..Default::default()
            },
        );
        assert_eq!(
            cfg.credentials("docker.io"),
            Credentials::Bearer("t".into())
        );
        assert_eq!(cfg.credentials("ghcr.io"), Credentials::Anonymous);
    }
}
