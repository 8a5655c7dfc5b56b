//! OCI image references (`python:3.11`, `ghcr.io/org/foo:v1`, `localhost:5000/a/b@sha256:...`).
//!
//! Parsing is pure so that a spec can be rejected before any build is queued; `kiln-oci`
//! uses the same type to talk to registries, so the two can never disagree on what a
//! reference means. The grammar follows the distribution reference grammar
//! (`github.com/distribution/reference`), including Docker Hub's normalisation.

use std::fmt;
use std::str::FromStr;

/// Docker Hub's registry name, as it appears in normalised references.
pub const DOCKER_HUB: &str = "docker.io";
/// The tag used when a reference names neither tag nor digest.
pub const DEFAULT_TAG: &str = "latest";
/// Longest reference accepted, as in the distribution grammar.
pub const MAX_REFERENCE_LEN: usize = 255 + 128 + 80;

/// A parsed, normalised image reference.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ImageRef {
    /// Registry host with optional port, e.g. `docker.io`, `localhost:5000`.
    pub registry: String,
    /// Repository path, e.g. `library/python`, `myorg/foo`.
    pub repository: String,
    /// Tag, if the reference names one (a digest reference may have both).
    pub tag: Option<String>,
    /// Manifest digest `sha256:<64 hex>`, if given.
    pub digest: Option<String>,
}

/// Why a reference failed to parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReferenceError {
    /// The reference is empty.
    #[error("reference is empty")]
    Empty,
    /// The reference is longer than [`MAX_REFERENCE_LEN`].
    #[error("reference is longer than {MAX_REFERENCE_LEN} characters")]
    TooLong,
    /// The registry host part is malformed.
    #[error("invalid registry host {0:?}")]
    Registry(String),
    /// A repository path component is malformed.
    #[error(
        "invalid repository path component {0:?} (lowercase letters, digits and . _ - separators)"
    )]
    Path(String),
    /// The tag is malformed.
    #[error("invalid tag {0:?} (up to 128 of [A-Za-z0-9_.-], not starting with . or -)")]
    Tag(String),
    /// The digest is malformed.
    #[error("invalid digest {0:?} (expected sha256: and 64 lowercase hex digits)")]
    Digest(String),
}

impl ImageRef {
    /// Parses and normalises a reference: `python` becomes `docker.io/library/python:latest`.
    pub fn parse(s: &str) -> Result<Self, ReferenceError> {
        if s.is_empty() {
            return Err(ReferenceError::Empty);
        }
        if s.len() > MAX_REFERENCE_LEN {
            return Err(ReferenceError::TooLong);
        }
        let (name, digest) = match s.split_once('@') {
            Some((name, digest)) => {
                validate_digest(digest)?;
                (name, Some(digest.to_owned()))
            }
            None => (s, None),
        };
        // A tag follows the last ':' that comes after the last '/'.
        let last_slash = name.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match name[last_slash..].rfind(':') {
            Some(i) => {
                let tag = &name[last_slash + i + 1..];
                validate_tag(tag)?;
                (&name[..last_slash + i], Some(tag.to_owned()))
            }
            None => (name, None),
        };
        let (registry, path) = match name.split_once('/') {
            Some((first, rest)) if looks_like_host(first) => {
                validate_host(first)?;
                (first.to_owned(), rest)
            }
            _ => (DOCKER_HUB.to_owned(), name),
        };
        for component in path.split('/') {
            validate_component(component)?;
        }
        let registry = if registry == "index.docker.io" {
            DOCKER_HUB.to_owned()
        } else {
            registry
        };
        let repository = if registry == DOCKER_HUB && !path.contains('/') {
            format!("library/{path}")
        } else {
            path.to_owned()
        };
        let tag = match (&tag, &digest) {
            (None, None) => Some(DEFAULT_TAG.to_owned()),
            _ => tag,
        };
        Ok(Self {
            registry,
            repository,
            tag,
            digest,
        })
    }

    /// The last repository component (`python` for `docker.io/library/python`).
    pub fn image_name(&self) -> &str {
        self.repository
            .rsplit('/')
            .next()
            .unwrap_or(&self.repository)
    }

    /// The tag or digest that selects a manifest; the digest wins when both are present.
    pub fn selector(&self) -> &str {
        self.digest
            .as_deref()
            .or(self.tag.as_deref())
            .unwrap_or(DEFAULT_TAG)
    }

    /// This reference pinned to a digest (the tag is kept for display).
    pub fn with_digest(&self, digest: impl Into<String>) -> Self {
        Self {
            digest: Some(digest.into()),
            ..self.clone()
        }
    }

    /// Whether the registry is on loopback, where plain HTTP is allowed as Docker does.
    pub fn is_loopback_registry(&self) -> bool {
        let host = host_without_port(&self.registry);
        host == "localhost"
            || host == "[::1]"
            || host
                .parse::<std::net::Ipv4Addr>()
                .is_ok_and(|ip| ip.is_loopback())
    }
}

/// Strips `:port` from `host:port` and `[v6]:port`.
pub fn host_without_port(registry: &str) -> &str {
    if registry.starts_with('[') {
        return registry.find(']').map_or(registry, |i| &registry[..=i]);
    }
    registry.split(':').next().unwrap_or(registry)
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

impl FromStr for ImageRef {
    type Err = ReferenceError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// Docker's rule: the first component is a host when it has a `.` or `:` or is `localhost`.
fn looks_like_host(first: &str) -> bool {
    first.contains('.') || first.contains(':') || first == "localhost" || first.starts_with('[')
}

fn validate_host(host: &str) -> Result<(), ReferenceError> {
    let bad = || ReferenceError::Registry(host.to_owned());
    let (name, port) = if let Some(rest) = host.strip_prefix('[') {
        let (v6, after) = rest.split_once(']').ok_or_else(bad)?;
        v6.parse::<std::net::Ipv6Addr>().map_err(|_| bad())?;
        // After `]` comes `:port` or nothing.
        let port = match after {
            "" => None,
            _ => Some(after.strip_prefix(':').ok_or_else(bad)?),
        };
        (None, port)
    } else {
        match host.split_once(':') {
            Some((name, port)) => (Some(name), Some(port)),
            None => (Some(host), None),
        }
    };
    if let Some(port) = port {
        if port.is_empty() || port.len() > 5 || !port.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        port.parse::<u16>().map_err(|_| bad())?;
    }
    if let Some(name) = name {
        let labels_ok = !name.is_empty()
            && name.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    && !label.starts_with('-')
                    && !label.ends_with('-')
            });
        if !labels_ok {
            return Err(bad());
        }
    }
    Ok(())
}

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`
fn validate_component(c: &str) -> Result<(), ReferenceError> {
    let bad = || ReferenceError::Path(c.to_owned());
    let bytes = c.as_bytes();
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if bytes.is_empty() || !alnum(bytes[0]) || !alnum(bytes[bytes.len() - 1]) {
        return Err(bad());
    }
    let mut i = 0;
    while i < bytes.len() {
        if alnum(bytes[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && !alnum(bytes[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|b| b == b'-');
        if !ok {
            return Err(bad());
        }
    }
    Ok(())
}

/// `[\w][\w.-]{0,127}`
fn validate_tag(tag: &str) -> Result<(), ReferenceError> {
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let ok = !tag.is_empty()
        && tag.len() <= 128
        && word(tag.as_bytes()[0])
        && tag.bytes().all(|b| word(b) || b == b'.' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(ReferenceError::Tag(tag.to_owned()))
    }
}

/// Only `sha256` is accepted: it is what every registry kiln talks to uses.
pub fn validate_digest(digest: &str) -> Result<(), ReferenceError> {
    let ok = digest.strip_prefix("sha256:").is_some_and(|hex| {
        hex.len() == 64
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    });
    if ok {
        Ok(())
    } else {
        Err(ReferenceError::Digest(digest.to_owned()))
    }
}

/// Why a base is refused by its name alone, before anything is pulled.
///
/// Content vetting in `kiln-oci` catches renamed images; this catches the common case early
/// so the user hears about it at validation time.
pub fn refused_base_by_name(r: &ImageRef) -> Option<&'static str> {
    let repo = r.repository.as_str();
    let name = r.image_name();
    let tag = r.tag.as_deref().unwrap_or("");
    if name == "alpine" || name.starts_with("alpine-") || tag.contains("alpine") {
        return Some("Alpine bases are not supported (musl; use a Debian or Ubuntu based image)");
    }
    if repo.starts_with("distroless/") || repo.contains("/distroless/") || name == "distroless" {
        return Some("distroless bases are not supported: they ship no shell for `run` steps");
    }
    if r.registry == "cgr.dev" && name == "static" {
        return Some("shell-less bases are not supported: `run` steps need /bin/sh");
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn seed_examples_parse_and_normalise() {
        let r = ImageRef::parse("python:3.11").unwrap();
        assert_eq!(r.to_string(), "docker.io/library/python:3.11");
        let r = ImageRef::parse("ghcr.io/myorg/foo:v1").unwrap();
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str()),
            ("ghcr.io", "myorg/foo")
        );
        assert_eq!(r.tag.as_deref(), Some("v1"));
        let r = ImageRef::parse(&format!("localhost:5000/a/b@{D}")).unwrap();
        assert_eq!(r.registry, "localhost:5000");
        assert_eq!(r.repository, "a/b");
        assert_eq!(r.tag, None);
        assert_eq!(r.digest.as_deref(), Some(D));
        assert_eq!(r.selector(), D);
        assert!(r.is_loopback_registry());
    }

    #[test]
    fn defaults_and_hub_forms() {
        assert_eq!(
            ImageRef::parse("debian").unwrap().to_string(),
            "docker.io/library/debian:latest"
        );
        assert_eq!(
            ImageRef::parse("myorg/app").unwrap().to_string(),
            "docker.io/myorg/app:latest"
        );
        assert_eq!(
            ImageRef::parse("index.docker.io/library/debian:12")
                .unwrap()
                .to_string(),
            "docker.io/library/debian:12"
        );
        let r = ImageRef::parse(&format!("debian:12@{D}")).unwrap();
        assert_eq!(r.tag.as_deref(), Some("12"));
        assert_eq!(r.selector(), D);
        let r = ImageRef::parse("127.0.0.1:5000/x:1").unwrap();
        assert!(r.is_loopback_registry());
        let r = ImageRef::parse("[::1]:5000/x:1").unwrap();
        assert_eq!(r.registry, "[::1]:5000");
        assert!(ImageRef::parse("[::1]--/python").is_err());
        assert!(ImageRef::parse("[::1]x:5000/python").is_err());
        assert!(r.is_loopback_registry());
        assert!(!ImageRef::parse("ghcr.io/x").unwrap().is_loopback_registry());
    }

    #[test]
    fn malformed_references_fail() {
        for bad in [
            "",
            "Python:3.11",
            "python:",
            "python:-x",
            "python@sha256:abc",
            "python@md5:0123",
            "a//b",
            "/a",
            "a/",
            "host:99999/a",
            "host:port/a",
            "a b",
            "a/.b",
            "a..b",
            "ex-.com/a",
        ] {
            assert!(ImageRef::parse(bad).is_err(), "{bad:?} should not parse");
        }
        assert_eq!(
            ImageRef::parse(&"a".repeat(500)),
            Err(ReferenceError::TooLong)
        );
    }

    #[test]
    fn refused_bases() {
        for r in [
            "alpine:3.19",
            "python:3.11-alpine",
            "gcr.io/distroless/base-debian12",
            "gcr.io/distroless/python3",
            "docker.io/library/alpine",
        ] {
            assert!(
                refused_base_by_name(&ImageRef::parse(r).unwrap()).is_some(),
                "{r}"
            );
        }
        for r in [
            "python:3.11",
            "debian:bookworm-slim",
            "ubuntu:24.04",
            "ghcr.io/myorg/foo:v1",
        ] {
            assert!(
                refused_base_by_name(&ImageRef::parse(r).unwrap()).is_none(),
                "{r}"
            );
        }
    }
}
