//! Preview URLs: a sandbox's web ports, reachable from a browser at
//! `{port}-{sandbox_id}.{domain}` (`/sandboxes/{id}/preview-ports`, and the proxy on the
//! server's listener).
//!
//! Ground truth is the official Python SDK: `_config.py` (`preview_url`, the port range,
//! the reserved port and their messages), `types.py` (`PreviewAccess`,
//! `PublishedPreviewPort`, `PreviewToken`, `PreviewPortList`) and `sandbox.py` (the preview
//! methods). kiln adds the full `url` of each port to what the SDKs read (they ignore it).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::request::RequestError;

/// The lowest port a preview URL can reach: privileged ports are never proxied.
pub const MIN_PREVIEW_PORT: u16 = 1024;
/// The highest port.
pub const MAX_PREVIEW_PORT: u16 = 65535;
/// The port Superserve reserves for sandbox control traffic: refused, as the SDKs refuse
/// it, so that code written for either platform behaves the same.
pub const RESERVED_PREVIEW_PORT: u16 = 49983;

/// The domain previews are served under when the operator sets none: browsers resolve
/// every `*.localhost` name to the loopback, so `http://8080-<id>.preview.localhost:<port>/`
/// opens on the server's own machine with no DNS set-up.
pub const DEFAULT_PREVIEW_DOMAIN: &str = "preview.localhost";

/// The request header a private port's token is read from (what `PreviewToken.header`
/// names). It never reaches the sandbox.
pub const PREVIEW_TOKEN_HEADER: &str = "x-kiln-preview-token";
/// The query parameter a signed URL carries the token in (`PreviewToken.query_param`).
/// The proxy moves it into a cookie and removes it from the URL.
pub const PREVIEW_TOKEN_QUERY: &str = "kiln_preview_token";
/// The cookie a browser holds a preview token in, scoped to one preview host. It never
/// reaches the sandbox.
pub const PREVIEW_TOKEN_COOKIE: &str = "kiln_preview_token";

/// The longest life a token may be given (the SDK's documented range is 1-604800 s).
pub const MAX_TOKEN_TTL_SECS: u64 = 604_800;

macro_rules! access_enum {
    ($(#[$meta:meta])* pub enum $name:ident { $($body:tt)* }) => {
        kiln_spec::string_enum! {
            $(#[$meta])*
            #[cfg_attr(feature = "sqlx", derive(sqlx::Type))]
            #[cfg_attr(feature = "sqlx", sqlx(type_name = "TEXT", rename_all = "snake_case"))]
            pub enum $name { $($body)* }
            /// A value this client does not know (from a newer server); never accepted in
            /// a request.
            else Unknown => "unknown"
        }
    };
}

access_enum! {
    /// A sandbox's preview policy: which of its ports the proxy serves, and the access a
    /// newly published port gets.
    pub enum PreviewAccess {
        /// Every listening port, without a credential (sandboxes from before previews had
        /// a policy). Never chosen through the API.
        LegacyPublic => "legacy_public",
        /// Published ports only; a new port is public.
        Public => "public",
        /// Published ports only; a new port needs a token.
        Private => "private",
    }
}

access_enum! {
    /// One published port's access.
    pub enum PortAccess {
        /// Anyone with the URL.
        Public => "public",
        /// A token of this port (header, signed URL or its cookie) is required.
        Private => "private",
    }
}

impl PreviewAccess {
    /// What a sandbox created without a choice gets: strict publication, public ports
    /// (Superserve's default for new sandboxes).
    pub const DEFAULT: Self = Self::Public;

    /// Whether only published ports are served.
    pub fn is_strict(self) -> bool {
        !matches!(self, Self::LegacyPublic)
    }

    /// The access a newly published port gets when the request names none.
    pub fn new_port_access(self) -> PortAccess {
        match self {
            Self::Private => PortAccess::Private,
            _ => PortAccess::Public,
        }
    }

    /// A policy a client may choose (on create and update): `public` or `private`.
    pub fn check_choice(self) -> Result<Self, RequestError> {
        match self {
            Self::Public | Self::Private => Ok(self),
            _ => Err(RequestError::invalid(
                "preview_access: must be \"public\" or \"private\"",
            )),
        }
    }
}

/// Checks a port as the SDKs do, with their messages: an integer from
/// [`MIN_PREVIEW_PORT`] to [`MAX_PREVIEW_PORT`], not [`RESERVED_PREVIEW_PORT`].
pub fn check_port(port: i64) -> Result<u16, RequestError> {
    if port == i64::from(RESERVED_PREVIEW_PORT) {
        return Err(RequestError::invalid(format!(
            "Invalid preview port {port}: reserved for sandbox control traffic."
        )));
    }
    match u16::try_from(port) {
        Ok(p) if p >= MIN_PREVIEW_PORT => Ok(p),
        _ => Err(out_of_range(&port.to_string())),
    }
}

fn out_of_range(shown: &str) -> RequestError {
    RequestError::invalid(format!(
        "Invalid preview port {shown}: must be an integer between {MIN_PREVIEW_PORT} and \
         {MAX_PREVIEW_PORT}. Privileged ports (< {MIN_PREVIEW_PORT}) are not proxied."
    ))
}

/// A port from a URL path segment (`/preview-ports/{port}`), checked as [`check_port`].
pub fn parse_port(segment: &str) -> Result<u16, RequestError> {
    match segment.parse::<i64>() {
        Ok(p) => check_port(p),
        Err(_) => Err(out_of_range(&format!("{segment:?}"))),
    }
}

/// A port from a JSON body, checked as [`check_port`] (a non-integer is refused with the
/// same message).
fn port_value(v: &serde_json::Value) -> Result<u16, RequestError> {
    match v.as_i64() {
        Some(p) => check_port(p),
        None => Err(out_of_range(&v.to_string())),
    }
}

/// `POST /sandboxes/{id}/preview-ports`: publish a port (again).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishPreviewPort {
    /// The port; checked by [`PublishPreviewPort::validate`] so that a bad one gets the
    /// SDK's message rather than a JSON error.
    pub port: serde_json::Value,
    /// The port's access; none keeps an already published port's, and gives a new port
    /// the sandbox's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access: Option<PortAccess>,
}

impl PublishPreviewPort {
    /// A request for `port` with `access`.
    pub fn new(port: u16, access: Option<PortAccess>) -> Self {
        Self {
            port: port.into(),
            access,
        }
    }

    /// The port and the access asked for.
    pub fn validate(&self) -> Result<(u16, Option<PortAccess>), RequestError> {
        let port = port_value(&self.port)?;
        if self.access == Some(PortAccess::Unknown) {
            return Err(RequestError::invalid(
                "access: must be \"public\" or \"private\"",
            ));
        }
        Ok((port, self.access))
    }
}

/// `POST /sandboxes/{id}/preview-ports/{port}/token` (an empty body is fine).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PreviewTokenRequest {
    /// Seconds the token is valid, 1 to [`MAX_TOKEN_TTL_SECS`]; none: until the port is
    /// rotated or unpublished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_in_seconds: Option<i64>,
}

impl PreviewTokenRequest {
    /// The lifetime asked for, checked.
    pub fn validate(&self) -> Result<Option<u64>, RequestError> {
        match self.expires_in_seconds {
            None => Ok(None),
            Some(s) if (1..=MAX_TOKEN_TTL_SECS as i64).contains(&s) => Ok(Some(s as u64)),
            Some(_) => Err(RequestError::invalid(format!(
                "expires_in_seconds: must be from 1 to {MAX_TOKEN_TTL_SECS}"
            ))),
        }
    }
}

/// A published port (the SDK's `PublishedPreviewPort`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishedPreviewPort {
    /// The port inside the sandbox.
    pub port: u16,
    /// The generation of its tokens: rotating bumps it, and tokens of older generations
    /// stop working at once.
    pub token_version: u32,
    /// Its access.
    pub access: PortAccess,
    /// Its preview URL (kiln's addition; without credentials).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
}

/// `GET /sandboxes/{id}/preview-ports` (the SDK's `PreviewPortList`). Never holds tokens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreviewPortList {
    /// The sandbox's policy.
    pub preview_access: PreviewAccess,
    /// Its published ports, by port.
    #[serde(default)]
    pub ports: Vec<PublishedPreviewPort>,
}

/// A credential for one published port (the SDK's `PreviewToken`).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreviewToken {
    /// The token.
    pub token: String,
    /// The port it opens (and no other).
    pub port: u16,
    /// The request header to send it in.
    pub header: String,
    /// The query parameter of a signed URL.
    pub query_param: String,
    /// The generation it belongs to.
    pub token_version: u32,
    /// The port's access.
    pub access: PortAccess,
    /// The sandbox's policy.
    pub preview_access: PreviewAccess,
    /// When it stops working; none: when the port is rotated or unpublished.
    #[serde(default, with = "crate::time::option")]
    pub expires_at: Option<DateTime<Utc>>,
    /// The port's preview URL (kiln's addition).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
}

impl std::fmt::Debug for PreviewToken {
    /// Everything but the token itself, which must not end up in logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreviewToken")
            .field("port", &self.port)
            .field("token_version", &self.token_version)
            .field("access", &self.access)
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

impl PreviewToken {
    /// The URL a browser opens: the port's URL with the token as its query parameter
    /// (the SDK's `get_signed_preview_url`). The proxy answers it with a redirect that
    /// trades the token for a cookie.
    pub fn signed_url(&self) -> Option<String> {
        let url = self.url.as_deref()?;
        let query = crate::request::encode_query(&[(self.query_param.clone(), self.token.clone())]);
        Some(format!("{}/?{query}", url.trim_end_matches('/')))
    }
}

/// Where preview URLs point: `{scheme}://{port}-{sandbox_id}.{domain}[:{listen_port}]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreviewSite {
    /// `http` or `https`.
    pub scheme: String,
    /// The domain preview hosts end with, lower case.
    pub domain: String,
    /// The port in handed-out URLs, when it is not the scheme's default.
    pub port: Option<u16>,
}

impl PreviewSite {
    /// The site for `domain` on a server listening on `listen_port`: a `*.localhost`
    /// domain is reached directly (`http`, that port); any other is assumed to sit behind
    /// a TLS proxy on 443 (`https`, no port).
    pub fn for_domain(domain: &str, listen_port: u16) -> Self {
        let domain = domain.trim().trim_end_matches('.').to_ascii_lowercase();
        let local = domain == "localhost" || domain.ends_with(".localhost");
        Self {
            scheme: if local { "http" } else { "https" }.to_owned(),
            port: local.then_some(listen_port),
            domain,
        }
    }

    /// A site from a base URL such as `https://preview.example.com` or
    /// `http://preview.lan:8080` (scheme, domain and port, no path).
    pub fn parse(base: &str) -> Result<Self, String> {
        let (scheme, rest) = base
            .split_once("://")
            .ok_or_else(|| format!("{base:?}: expected http(s)://DOMAIN[:PORT]"))?;
        let scheme = scheme.to_ascii_lowercase();
        if scheme != "http" && scheme != "https" {
            return Err(format!("{base:?}: the scheme must be http or https"));
        }
        let rest = rest.trim_end_matches('/');
        if rest.contains('/') || rest.contains('?') || rest.contains('@') {
            return Err(format!("{base:?}: only a scheme, a domain and a port"));
        }
        let (domain, port) = match rest.rsplit_once(':') {
            Some((d, p)) => (
                d,
                Some(
                    p.parse::<u16>()
                        .map_err(|_| format!("{base:?}: bad port {p:?}"))?,
                ),
            ),
            None => (rest, None),
        };
        if !is_domain(domain) {
            return Err(format!("{base:?}: {domain:?} is not a domain name"));
        }
        let default = if scheme == "https" { 443 } else { 80 };
        Ok(Self {
            scheme,
            domain: domain.to_ascii_lowercase(),
            port: port.filter(|p| *p != default),
        })
    }

    /// The preview URL of `port` of sandbox `sandbox_id` (no trailing slash).
    pub fn url(&self, sandbox_id: &str, port: u16) -> String {
        let host = format!("{port}-{sandbox_id}.{}", self.domain);
        match self.port {
            Some(p) => format!("{}://{host}:{p}", self.scheme),
            None => format!("{}://{host}", self.scheme),
        }
    }

    /// The port and sandbox id a request's `Host` names, when it is a preview host of
    /// this site (any port after the name is ignored: a proxy in front may rewrite it).
    /// Both are returned as written: the caller checks the port ([`check_port`]) and that
    /// the sandbox exists.
    pub fn target<'h>(&self, host: &'h str) -> Option<(u32, &'h str)> {
        let name = match host.rsplit_once(':') {
            // An IPv6 literal is never a preview host.
            Some((n, p)) if !n.contains(']') && p.bytes().all(|b| b.is_ascii_digit()) => n,
            _ => host,
        };
        let name = name.strip_suffix('.').unwrap_or(name);
        let label_end = name.len().checked_sub(self.domain.len() + 1)?;
        let (label, rest) = name.split_at(label_end);
        if !rest[1..].eq_ignore_ascii_case(&self.domain) || !rest.starts_with('.') {
            return None;
        }
        let (port, id) = label.split_once('-')?;
        if port.is_empty()
            || !port.bytes().all(|b| b.is_ascii_digit())
            || id.is_empty()
            || id.contains('.')
        {
            return None;
        }
        // Out-of-range ports are preview hosts all the same (the proxy refuses them).
        Some((port.parse::<u32>().ok()?, id))
    }
}

fn is_domain(d: &str) -> bool {
    !d.is_empty()
        && d.len() <= 253
        && d.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The SDK's messages, verbatim (`superserve/_config.py`, `preview_url`).
    #[test]
    fn bad_ports_get_the_sdks_messages() {
        assert_eq!(check_port(8080).unwrap(), 8080);
        assert_eq!(check_port(1024).unwrap(), 1024);
        assert_eq!(check_port(65535).unwrap(), 65535);
        assert_eq!(
            check_port(80).unwrap_err().message,
            "Invalid preview port 80: must be an integer between 1024 and 65535. \
             Privileged ports (< 1024) are not proxied."
        );
        assert_eq!(
            check_port(49983).unwrap_err().message,
            "Invalid preview port 49983: reserved for sandbox control traffic."
        );
        assert!(check_port(65536)
            .unwrap_err()
            .message
            .starts_with("Invalid preview port 65536: must be"));
        assert!(check_port(-1).is_err());
        assert_eq!(parse_port("3000").unwrap(), 3000);
        assert!(parse_port("web")
            .unwrap_err()
            .message
            .starts_with("Invalid preview port \"web\": must be"));
        let bad = PublishPreviewPort {
            port: serde_json::json!("8080"),
            access: None,
        };
        assert!(bad.validate().is_err());
    }

    #[test]
    fn wire_shapes() {
        assert_eq!(
            serde_json::to_value(PreviewAccess::LegacyPublic).unwrap(),
            "legacy_public"
        );
        let list = PreviewPortList {
            preview_access: PreviewAccess::Private,
            ports: vec![PublishedPreviewPort {
                port: 3000,
                token_version: 2,
                access: PortAccess::Private,
                url: Some("http://3000-x.preview.localhost:8080".into()),
            }],
        };
        assert_eq!(
            serde_json::to_value(&list).unwrap(),
            serde_json::json!({"preview_access": "private", "ports": [
                {"port": 3000, "token_version": 2, "access": "private",
                 "url": "http://3000-x.preview.localhost:8080"}
            ]})
        );
        let req: PublishPreviewPort =
            serde_json::from_str(r#"{"port": 3000, "access": "public"}"#).unwrap();
        assert_eq!(req.validate().unwrap(), (3000, Some(PortAccess::Public)));
        let req: PublishPreviewPort = serde_json::from_str(r#"{"port": 3000}"#).unwrap();
        assert_eq!(req.validate().unwrap(), (3000, None));
        let odd: PublishPreviewPort =
            serde_json::from_str(r#"{"port": 3000, "access": "sometimes"}"#).unwrap();
        assert!(odd.validate().is_err());
        assert!(PreviewAccess::LegacyPublic.check_choice().is_err());
        assert!(PreviewAccess::Private.check_choice().is_ok());
        let t: PreviewTokenRequest = serde_json::from_str("{}").unwrap();
        assert_eq!(t.validate().unwrap(), None);
        for bad in [0, 604_801, -5] {
            let t = PreviewTokenRequest {
                expires_in_seconds: Some(bad),
            };
            assert!(t.validate().is_err(), "{bad}");
        }
    }

    #[test]
    fn tokens_do_not_show_in_debug_output() {
        let t = PreviewToken {
            token: "SECRET".into(),
            port: 3000,
            header: PREVIEW_TOKEN_HEADER.into(),
            query_param: PREVIEW_TOKEN_QUERY.into(),
            token_version: 1,
            access: PortAccess::Private,
            preview_access: PreviewAccess::Private,
            expires_at: None,
            url: Some("https://3000-abc.preview.example.com".into()),
        };
        assert!(!format!("{t:?}").contains("SECRET"));
        assert_eq!(
            t.signed_url().unwrap(),
            "https://3000-abc.preview.example.com/?kiln_preview_token=SECRET"
        );
    }

    #[test]
    fn sites_build_urls_and_read_hosts() {
        let local = PreviewSite::for_domain(DEFAULT_PREVIEW_DOMAIN, 8080);
        assert_eq!(
            local.url("0b1c-2d", 3000),
            "http://3000-0b1c-2d.preview.localhost:8080"
        );
        let real = PreviewSite::for_domain("Preview.Example.com.", 8080);
        assert_eq!(real.url("ab", 5173), "https://5173-ab.preview.example.com");
        let parsed = PreviewSite::parse("http://preview.lan:8081/").unwrap();
        assert_eq!(parsed.url("ab", 80), "http://80-ab.preview.lan:8081");
        assert_eq!(
            PreviewSite::parse("https://p.example.com:443")
                .unwrap()
                .port,
            None
        );
        for bad in [
            "preview.example.com",
            "ftp://x.com",
            "https://x.com/path",
            "https://a..b",
        ] {
            assert!(PreviewSite::parse(bad).is_err(), "{bad}");
        }

        let id = "6f1e2a9c-1111-4a2b-8c3d-0123456789ab";
        for host in [
            format!("3000-{id}.preview.localhost:8080"),
            format!("3000-{id}.preview.localhost"),
            format!("3000-{id}.PREVIEW.localhost."),
        ] {
            assert_eq!(local.target(&host), Some((3000, id)), "{host}");
        }
        assert_eq!(
            local.target(&format!("99999-{id}.preview.localhost")),
            Some((99999, id))
        );
        for host in [
            "preview.localhost:8080".to_owned(),
            "127.0.0.1:8080".to_owned(),
            format!("boxd-{id}.preview.localhost"),
            format!("3000-{id}.evilpreview.localhost"),
            format!("3000-{id}.preview.localhost.evil.com"),
            format!("x.3000-{id}.preview.localhost"),
            "3000-.preview.localhost".to_owned(),
            "[::1]:8080".to_owned(),
        ] {
            assert_eq!(local.target(&host), None, "{host}");
        }
    }
}
