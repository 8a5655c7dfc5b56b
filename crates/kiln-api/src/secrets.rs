//! Team secrets (`/secrets`, `/providers`, `/sandboxes/{id}/secrets`): credentials a
//! sandbox uses without ever holding them.
//!
//! A secret is a value, the hosts it may be sent to and an auth shape saying where in a
//! request it goes. A sandbox it is bound to sees only a random stand-in token under an
//! environment variable; kiln's egress proxy puts the real value in place of the stand-in
//! on requests to the secret's hosts (see `kiln-net`). The shapes follow the official
//! SDKs (`SecretAuthRule` / `SecretAuthPerHost` in the TypeScript SDK, `SecretInfo`,
//! `ProviderShortcut`, `ProxyAuditEvent` in `types.py`). Nothing here does I/O.

use std::collections::BTreeMap;
use std::net::IpAddr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::request::{parse_count, RequestError};
use crate::status::SandboxStatus;

/// Longest secret name.
pub const MAX_SECRET_NAME: usize = 128;
/// Largest secret value, in bytes.
pub const MAX_SECRET_VALUE: usize = 8192;
/// Most hosts a secret may be sent to.
pub const MAX_HOSTS: usize = 64;
/// Longest environment variable name a secret is bound under.
pub const MAX_ENV_KEY: usize = 255;

kiln_spec::string_enum! {
    /// How a secret is attached to a request (the SDKs' `SecretAuthType`).
    pub enum AuthType {
        /// `Authorization: Bearer <value>`.
        Bearer => "bearer",
        /// HTTP Basic, `<username>:<value>`.
        Basic => "basic",
        /// A named header, `<header>: <prefix><value>`.
        ApiKey => "api-key",
        /// Header templates that reference `{{ value }}`.
        Custom => "custom",
        /// A rule per host.
        PerHost => "per_host",
    }
}

/// One way of attaching a secret to a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthRule {
    /// `Authorization: <scheme> <value>`: the guest sends `Bearer <stand-in>` (or another
    /// scheme, such as GitHub's `token`, which is kept).
    Bearer,
    /// `Authorization: Basic base64(<username>:<value>)`: the guest sends the stand-in as
    /// the password; `username`, when set, replaces the guest's user name.
    Basic {
        /// The user name sent upstream; `None` keeps the guest's.
        username: Option<String>,
    },
    /// `<header>: <prefix><value>`: the guest sends `<prefix><stand-in>` in `header`.
    ApiKey {
        /// The header (case-insensitive), e.g. `x-api-key`.
        header: String,
        /// What comes before the value, e.g. `Token `.
        prefix: String,
    },
    /// Each header set from its template, `{{ value }}` replaced by the value, on a
    /// request that carries the stand-in in any of these headers.
    Custom {
        /// Header name to template.
        headers: BTreeMap<String, String>,
    },
}

/// A secret's auth shape: one rule for all its hosts, or a rule per host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretAuth {
    /// The same rule on every host of the secret.
    Rule(AuthRule),
    /// The first entry whose hosts match the request's host decides.
    PerHost(Vec<HostRule>),
}

/// A rule and the hosts it applies to (an entry of `per_host`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostRule {
    /// The hosts.
    pub hosts: Vec<HostPattern>,
    /// The rule.
    pub rule: AuthRule,
}

/// The flat JSON form of a rule: `{"type": ..., "header", "prefix", "username",
/// "headers"}` (plus `hosts` inside `per_host`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    header: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    username: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    headers: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    hosts: Option<Vec<String>>,
}

impl AuthRule {
    /// The wire type of the rule.
    pub fn auth_type(&self) -> AuthType {
        match self {
            Self::Bearer => AuthType::Bearer,
            Self::Basic { .. } => AuthType::Basic,
            Self::ApiKey { .. } => AuthType::ApiKey,
            Self::Custom { .. } => AuthType::Custom,
        }
    }

    fn to_raw(&self) -> RawRule {
        let mut raw = RawRule {
            kind: self.auth_type().as_str().to_owned(),
            ..RawRule::default()
        };
        match self {
            Self::Bearer => {}
            Self::Basic { username } => raw.username.clone_from(username),
            Self::ApiKey { header, prefix } => {
                raw.header = Some(header.clone());
                raw.prefix = (!prefix.is_empty()).then(|| prefix.clone());
            }
            Self::Custom { headers } => raw.headers = Some(headers.clone()),
        }
        raw
    }

    fn from_raw(raw: RawRule, at: &str) -> Result<Self, RequestError> {
        let bad = |what: &str| RequestError::invalid(format!("{at}: {what}"));
        let only = |allowed: &[&str]| -> Result<(), RequestError> {
            let set = [
                ("header", raw.header.is_some()),
                ("prefix", raw.prefix.is_some()),
                ("username", raw.username.is_some()),
                ("headers", raw.headers.is_some()),
            ];
            match set.iter().find(|(n, s)| *s && !allowed.contains(n)) {
                Some((n, _)) => Err(bad(&format!("{n} does not apply to type {:?}", raw.kind))),
                None => Ok(()),
            }
        };
        let kind: AuthType = raw.kind.parse().map_err(|_| {
            bad(&format!(
                "type {:?} is not one of bearer, basic, api-key, custom",
                raw.kind
            ))
        })?;
        let rule = match kind {
            AuthType::Bearer => {
                only(&[])?;
                Self::Bearer
            }
            AuthType::Basic => {
                only(&["username"])?;
                if let Some(u) = &raw.username {
                    if u.is_empty() || u.contains(':') || !printable(u) {
                        return Err(bad("username must be printable, non-empty, without `:`"));
                    }
                }
                Self::Basic {
                    username: raw.username.clone(),
                }
            }
            AuthType::ApiKey => {
                only(&["header", "prefix"])?;
                let header = raw
                    .header
                    .clone()
                    .ok_or_else(|| bad("api-key needs a header"))?;
                check_header_name(&header).map_err(|e| bad(&e))?;
                let prefix = raw.prefix.clone().unwrap_or_default();
                if !printable(&prefix) {
                    return Err(bad("prefix must be printable"));
                }
                Self::ApiKey { header, prefix }
            }
            AuthType::Custom => {
                only(&["headers"])?;
                let headers = raw.headers.clone().unwrap_or_default();
                if headers.is_empty() {
                    return Err(bad("custom needs headers (name -> template)"));
                }
                for (name, template) in &headers {
                    check_header_name(name).map_err(|e| bad(&e))?;
                    if !template_has_value(template) {
                        return Err(bad(&format!(
                            "the template of {name} does not reference {{{{ value }}}}"
                        )));
                    }
                    if !printable(template) {
                        return Err(bad(&format!("the template of {name} must be printable")));
                    }
                }
                Self::Custom { headers }
            }
            AuthType::PerHost => return Err(bad("per_host cannot be nested")),
        };
        Ok(rule)
    }
}

/// Whether a custom header template references the value (`{{ value }}`, spaces optional).
pub fn template_has_value(template: &str) -> bool {
    value_placeholder(template).is_some()
}

/// The byte range of the first `{{ value }}` (any inner spacing) in a template.
pub fn value_placeholder(template: &str) -> Option<std::ops::Range<usize>> {
    let mut from = 0;
    while let Some(open) = template[from..].find("{{").map(|i| i + from) {
        let rest = &template[open + 2..];
        if let Some(close) = rest.find("}}") {
            if rest[..close].trim() == "value" {
                return Some(open..open + 2 + close + 2);
            }
        }
        from = open + 2;
    }
    None
}

/// Visible ASCII, spaces and tabs, or UTF-8 beyond ASCII: nothing that could end a header
/// line or smuggle a control character into one.
fn printable(s: &str) -> bool {
    s.chars().all(|c| c == '\t' || !c.is_control())
}

/// An HTTP header name (RFC 9110 token) that a secret may be put in: not one that frames
/// the message or routes it.
fn check_header_name(name: &str) -> Result<(), String> {
    let token = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
    if !token {
        return Err(format!("{name:?} is not a header name"));
    }
    const FRAMING: &[&str] = &[
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "upgrade",
        "te",
        "trailer",
        "proxy-connection",
        "keep-alive",
        "expect",
    ];
    if FRAMING.iter().any(|f| name.eq_ignore_ascii_case(f)) {
        return Err(format!(
            "{name} frames or routes the request: not for a secret"
        ));
    }
    Ok(())
}

impl SecretAuth {
    /// The wire type (`auth_type`).
    pub fn auth_type(&self) -> AuthType {
        match self {
            Self::Rule(r) => r.auth_type(),
            Self::PerHost(_) => AuthType::PerHost,
        }
    }

    /// The wire config (`auth_config`): the rule's fields without `type`, or
    /// `{"per_host": [...]}`.
    pub fn config(&self) -> serde_json::Value {
        let mut value = serde_json::to_value(self).unwrap_or_default();
        if let Some(map) = value.as_object_mut() {
            map.remove("type");
        }
        value
    }

    /// Checks and reads the JSON form (`{"type": ...}` or `{"per_host": [...]}`).
    pub fn from_json(value: &serde_json::Value) -> Result<Self, RequestError> {
        let per_host = value.get("per_host").or_else(|| value.get("perHost"));
        match per_host {
            Some(list) => {
                if value.as_object().is_some_and(|m| m.len() > 1) {
                    return Err(RequestError::invalid(
                        "auth: per_host takes no other fields",
                    ));
                }
                let entries: Vec<RawRule> = serde_json::from_value(list.clone())
                    .map_err(|e| RequestError::invalid(format!("auth.per_host: {e}")))?;
                if entries.is_empty() {
                    return Err(RequestError::invalid("auth.per_host: at least one rule"));
                }
                let mut out = Vec::new();
                for (i, mut raw) in entries.into_iter().enumerate() {
                    let at = format!("auth.per_host[{i}]");
                    let hosts = raw.hosts.take().unwrap_or_default();
                    if hosts.is_empty() {
                        return Err(RequestError::invalid(format!("{at}: hosts are required")));
                    }
                    let hosts = parse_hosts(&hosts, &format!("{at}.hosts"))?;
                    out.push(HostRule {
                        hosts,
                        rule: AuthRule::from_raw(raw, &at)?,
                    });
                }
                Ok(Self::PerHost(out))
            }
            None => {
                let raw: RawRule = serde_json::from_value(value.clone())
                    .map_err(|e| RequestError::invalid(format!("auth: {e}")))?;
                if raw.hosts.is_some() {
                    return Err(RequestError::invalid(
                        "auth: hosts belong next to auth, or in per_host entries",
                    ));
                }
                Ok(Self::Rule(AuthRule::from_raw(raw, "auth")?))
            }
        }
    }

    /// The rule for a request to `host:port`, if the shape has one.
    pub fn rule_for(&self, host: &str, port: u16) -> Option<&AuthRule> {
        match self {
            Self::Rule(r) => Some(r),
            Self::PerHost(entries) => entries
                .iter()
                .find(|e| e.hosts.iter().any(|h| h.matches(host, port)))
                .map(|e| &e.rule),
        }
    }
}

impl Serialize for SecretAuth {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Rule(r) => r.to_raw().serialize(s),
            Self::PerHost(entries) => {
                let list: Vec<RawRule> = entries
                    .iter()
                    .map(|e| RawRule {
                        hosts: Some(e.hosts.iter().map(ToString::to_string).collect()),
                        ..e.rule.to_raw()
                    })
                    .collect();
                let mut map = serde_json::Map::new();
                map.insert(
                    "per_host".into(),
                    serde_json::to_value(list).map_err(serde::ser::Error::custom)?,
                );
                map.serialize(s)
            }
        }
    }
}

impl<'de> Deserialize<'de> for SecretAuth {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let value = serde_json::Value::deserialize(d)?;
        Self::from_json(&value).map_err(serde::de::Error::custom)
    }
}

/// Where a secret may be sent: `api.example.com`, `*.example.com` (subdomains at any
/// depth, not the apex), an IP address, each optionally with `:port` (without one, any
/// port of that host).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPattern {
    name: HostName,
    /// Only this port, when set.
    pub port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum HostName {
    /// A lowercase domain, matched exactly.
    Domain(String),
    /// `*.suffix`, stored as `.suffix`.
    Wildcard(String),
    Ip(IpAddr),
}

impl HostPattern {
    /// Parses one entry of `hosts`.
    pub fn parse(raw: &str) -> Result<Self, String> {
        let s = raw.trim();
        let bad = || {
            format!(
                "{raw:?} is not a host (`name`, `*.name` or an IP address, optionally with \
                 `:port`)"
            )
        };
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let (h, after) = rest.split_once(']').ok_or_else(bad)?;
            match after.strip_prefix(':') {
                Some(p) => (h, Some(p)),
                None if after.is_empty() => (h, None),
                None => return Err(bad()),
            }
        } else if s.matches(':').count() > 1 {
            // A bare IPv6 address.
            (s, None)
        } else {
            match s.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (s, None),
            }
        };
        let port = match port {
            Some(p) => Some(p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(bad)?),
            None => None,
        };
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(Self {
                name: HostName::Ip(ip),
                port,
            });
        }
        let name = host.trim_end_matches('.').to_ascii_lowercase();
        let (wild, bare) = match name.strip_prefix("*.") {
            Some(rest) => (true, rest.to_owned()),
            None => (false, name),
        };
        if !valid_domain(&bare) {
            return Err(bad());
        }
        Ok(Self {
            name: if wild {
                HostName::Wildcard(format!(".{bare}"))
            } else {
                HostName::Domain(bare)
            },
            port,
        })
    }

    /// Whether a request to `host:port` (as the guest named the host) is for this entry.
    pub fn matches(&self, host: &str, port: u16) -> bool {
        if self.port.is_some_and(|p| p != port) {
            return false;
        }
        let host = host.trim_matches(['[', ']']);
        match &self.name {
            HostName::Ip(ip) => host.parse::<IpAddr>().is_ok_and(|h| h == *ip),
            HostName::Domain(d) => host.trim_end_matches('.').eq_ignore_ascii_case(d),
            HostName::Wildcard(suffix) => {
                let h = host.trim_end_matches('.').to_ascii_lowercase();
                h.ends_with(suffix.as_str())
            }
        }
    }
}

impl std::fmt::Display for HostPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.name, self.port) {
            (HostName::Domain(d), None) => f.write_str(d),
            (HostName::Domain(d), Some(p)) => write!(f, "{d}:{p}"),
            (HostName::Wildcard(s), None) => write!(f, "*{s}"),
            (HostName::Wildcard(s), Some(p)) => write!(f, "*{s}:{p}"),
            (HostName::Ip(IpAddr::V6(ip)), Some(p)) => write!(f, "[{ip}]:{p}"),
            (HostName::Ip(ip), None) => write!(f, "{ip}"),
            (HostName::Ip(ip), Some(p)) => write!(f, "{ip}:{p}"),
        }
    }
}

impl Serialize for HostPattern {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for HostPattern {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// A DNS name: letters, digits, `-` and `_`, dot-separated labels of 1-63 bytes.
fn valid_domain(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

fn parse_hosts(raw: &[String], at: &str) -> Result<Vec<HostPattern>, RequestError> {
    if raw.len() > MAX_HOSTS {
        return Err(RequestError::invalid(format!("{at}: at most {MAX_HOSTS}")));
    }
    raw.iter()
        .enumerate()
        .map(|(i, h)| {
            HostPattern::parse(h).map_err(|e| RequestError::invalid(format!("{at}[{i}]: {e}")))
        })
        .collect()
}

/// A built-in shortcut: auth shape, hosts and the look of the stand-in for a well-known
/// service, so that `POST /secrets` needs only `provider`, a name and a value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Provider {
    /// `openai`, `anthropic`, `github`.
    pub name: &'static str,
    /// For people.
    pub display: &'static str,
    /// JSON of the auth shape.
    auth: &'static str,
    /// The hosts.
    pub hosts: &'static [&'static str],
    /// The stand-in's look.
    pub token: TokenShape,
}

/// What a stand-in token looks like: `prefix`, then `len` random letters and digits,
/// then `suffix`; shaped like the provider's own keys so that clients that check the
/// form of a key accept it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenShape {
    /// Fixed start.
    pub prefix: &'static str,
    /// Random letters and digits after it.
    pub len: usize,
    /// Fixed end.
    pub suffix: &'static str,
}

impl TokenShape {
    /// The shape of a stand-in when no provider is known: `kiln_sk_` and 48 characters.
    pub const GENERIC: TokenShape = TokenShape {
        prefix: "kiln_sk_",
        len: 48,
        suffix: "",
    };

    /// The SDKs' `token_shape`: the prefix and an ellipsis.
    pub fn sample(&self) -> String {
        format!("{}...", self.prefix)
    }
}

/// The provider catalog, in the order `GET /providers` lists it.
pub const PROVIDERS: &[Provider] = &[
    Provider {
        name: "openai",
        display: "OpenAI",
        auth: r#"{"type": "bearer"}"#,
        hosts: &["api.openai.com"],
        token: TokenShape {
            prefix: "sk-proj-",
            len: 156,
            suffix: "",
        },
    },
    Provider {
        name: "anthropic",
        display: "Anthropic",
        auth: r#"{"type": "api-key", "header": "x-api-key"}"#,
        hosts: &["api.anthropic.com"],
        token: TokenShape {
            prefix: "sk-ant-api03-",
            len: 93,
            suffix: "AA",
        },
    },
    Provider {
        name: "github",
        display: "GitHub",
        // The REST and GraphQL APIs take the token as `Authorization: Bearer|token`; git
        // over HTTPS sends it as the password of Basic auth.
        auth: r#"{"per_host": [
            {"type": "bearer", "hosts": ["api.github.com", "uploads.github.com",
                                         "raw.githubusercontent.com"]},
            {"type": "basic", "username": "x-access-token", "hosts": ["github.com"]}
        ]}"#,
        hosts: &[
            "api.github.com",
            "uploads.github.com",
            "raw.githubusercontent.com",
            "github.com",
        ],
        token: TokenShape {
            prefix: "ghp_",
            len: 36,
            suffix: "",
        },
    },
];

impl Provider {
    /// The catalog entry named `name`.
    pub fn named(name: &str) -> Option<&'static Provider> {
        PROVIDERS.iter().find(|p| p.name == name)
    }

    /// The auth shape.
    pub fn auth(&self) -> SecretAuth {
        let value: serde_json::Value =
            serde_json::from_str(self.auth).expect("the catalog's auth shapes are valid JSON");
        SecretAuth::from_json(&value).expect("the catalog's auth shapes are valid")
    }

    /// The hosts, parsed.
    pub fn host_patterns(&self) -> Vec<HostPattern> {
        self.hosts
            .iter()
            .map(|h| HostPattern::parse(h).expect("the catalog's hosts are valid"))
            .collect()
    }

    /// The entry as `GET /providers` shows it.
    pub fn shortcut(&self) -> ProviderShortcut {
        let auth = self.auth();
        ProviderShortcut {
            name: self.name.to_owned(),
            display: self.display.to_owned(),
            auth_type: auth.auth_type(),
            auth_config: auth.config(),
            hosts: self.hosts.iter().map(|h| (*h).to_owned()).collect(),
            token_shape: self.token.sample(),
        }
    }
}

/// `GET /providers` entries (the SDKs' `ProviderShortcut`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProviderShortcut {
    /// What `provider` takes.
    pub name: String,
    /// For people.
    pub display: String,
    /// The auth type.
    pub auth_type: AuthType,
    /// The auth type's fields.
    #[serde(default)]
    pub auth_config: serde_json::Value,
    /// The hosts.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// A prefix-shaped sample of the stand-in issued (`sk-ant-api03-...`).
    #[serde(default)]
    pub token_shape: String,
}

/// `POST /secrets`: `provider`, or `auth` with `hosts` (which `per_host` may imply).
/// Its `Debug` leaves the value out, so no log line can carry it.
#[derive(Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateSecret {
    /// Unique in the team; what bindings and the URL name it by.
    pub name: String,
    /// The credential. Never shown again.
    pub value: String,
    /// A catalog shortcut (`GET /providers`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    /// The auth shape, when no provider is given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<serde_json::Value>,
    /// The hosts the value may be sent to, when no provider is given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hosts: Option<Vec<String>>,
}

impl std::fmt::Debug for CreateSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CreateSecret")
            .field("name", &self.name)
            .field("value", &"<redacted>")
            .field("provider", &self.provider)
            .field("auth", &self.auth)
            .field("hosts", &self.hosts)
            .finish()
    }
}

/// A [`CreateSecret`] checked: what the store keeps (the value apart).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretSpec {
    /// The auth shape.
    pub auth: SecretAuth,
    /// The hosts.
    pub hosts: Vec<HostPattern>,
    /// The provider it came from.
    pub provider: Option<&'static Provider>,
}

impl CreateSecret {
    /// Checks the request and resolves the provider or the custom shape.
    pub fn validate(&self) -> Result<SecretSpec, RequestError> {
        check_secret_name(&self.name)?;
        check_secret_value(&self.value)?;
        if let Some(p) = &self.provider {
            if self.auth.is_some() || self.hosts.is_some() {
                return Err(RequestError::invalid(
                    "give either provider, or auth and hosts: not both",
                ));
            }
            let provider = Provider::named(p).ok_or_else(|| {
                let known: Vec<&str> = PROVIDERS.iter().map(|p| p.name).collect();
                RequestError::invalid(format!(
                    "provider: unknown provider {p:?} (known: {})",
                    known.join(", ")
                ))
            })?;
            return Ok(SecretSpec {
                auth: provider.auth(),
                hosts: provider.host_patterns(),
                provider: Some(provider),
            });
        }
        let auth = self
            .auth
            .as_ref()
            .ok_or_else(|| RequestError::invalid("give a provider, or auth and hosts"))?;
        let auth = SecretAuth::from_json(auth)?;
        let hosts = match (&auth, &self.hosts) {
            (SecretAuth::PerHost(entries), given) => {
                let mut implied: Vec<HostPattern> = Vec::new();
                for h in entries.iter().flat_map(|e| &e.hosts) {
                    if !implied.contains(h) {
                        implied.push(h.clone());
                    }
                }
                if let Some(given) = given {
                    let given = parse_hosts(given, "hosts")?;
                    let same = given.iter().all(|h| implied.contains(h))
                        && implied.iter().all(|h| given.contains(h));
                    if !same {
                        return Err(RequestError::invalid(
                            "hosts: with per_host, the hosts are those of its rules (leave \
                             hosts out, or list exactly those)",
                        ));
                    }
                }
                implied
            }
            (_, Some(given)) if !given.is_empty() => parse_hosts(given, "hosts")?,
            _ => return Err(RequestError::invalid("hosts: at least one host")),
        };
        Ok(SecretSpec {
            auth,
            hosts,
            provider: None,
        })
    }
}

/// A secret name: 1-128 letters, digits, `-`, `_` and `.`, so that it fits in a URL path
/// segment and a shell word as it is.
pub fn check_secret_name(name: &str) -> Result<(), RequestError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_SECRET_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        && name != "."
        && name != "..";
    if ok {
        Ok(())
    } else {
        Err(RequestError::invalid(format!(
            "name: 1-{MAX_SECRET_NAME} letters, digits, `-`, `_` and `.`"
        )))
    }
}

/// A secret value goes into a header line: 1-8192 bytes and no control characters.
pub fn check_secret_value(value: &str) -> Result<(), RequestError> {
    if value.is_empty() || value.len() > MAX_SECRET_VALUE {
        return Err(RequestError::invalid(format!(
            "value: 1-{MAX_SECRET_VALUE} bytes"
        )));
    }
    if !printable(value) || value.contains('\t') {
        return Err(RequestError::invalid(
            "value: control characters cannot go into a request header",
        ));
    }
    Ok(())
}

/// An environment variable name: a letter or `_`, then letters, digits and `_`.
pub fn check_env_key(key: &str) -> Result<(), RequestError> {
    let mut bytes = key.bytes();
    let ok = key.len() <= MAX_ENV_KEY
        && bytes
            .next()
            .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(RequestError::invalid(format!(
            "env key {key:?}: a letter or `_`, then letters, digits and `_` (at most \
             {MAX_ENV_KEY})"
        )))
    }
}

/// `PATCH /secrets/{name}` (rotate): the new value. Its `Debug` leaves the value out.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RotateSecret {
    /// Replaces the value; bound sandboxes use it from their next request.
    pub value: String,
}

impl std::fmt::Debug for RotateSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RotateSecret { value: <redacted> }")
    }
}

/// A secret as the API shows it (the SDKs' `SecretInfo`); never its value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SecretInfo {
    /// Its id.
    pub id: String,
    /// Its name.
    pub name: String,
    /// The auth type.
    pub auth_type: AuthType,
    /// The auth type's fields.
    #[serde(default)]
    pub auth_config: serde_json::Value,
    /// The provider it was created from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider_shortcut: Option<String>,
    /// Where the value may be sent.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// When it was created.
    #[serde(with = "crate::time")]
    pub created_at: DateTime<Utc>,
    /// When its value last changed.
    #[serde(with = "crate::time")]
    pub updated_at: DateTime<Utc>,
    /// When a request last used it.
    #[serde(default, with = "crate::time::option")]
    pub last_used_at: Option<DateTime<Utc>>,
}

/// `POST /sandboxes/{id}/secrets`: bind a secret under an environment variable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttachSecret {
    /// The variable the stand-in goes in.
    pub env_key: String,
    /// The team secret.
    pub secret_name: String,
}

/// One binding of a sandbox (the SDKs' `SandboxSecretBinding`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxSecretBinding {
    /// The variable holding the stand-in.
    pub env_key: String,
    /// The secret.
    pub secret_name: String,
    /// Set when the secret was deleted: the stand-in no longer resolves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked: Option<bool>,
}

/// A sandbox a secret is bound to (`GET /secrets/{name}/sandboxes`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretSandboxBinding {
    /// The sandbox.
    pub sandbox_id: String,
    /// Its name.
    pub sandbox_name: String,
    /// The variable the stand-in is in.
    pub env_key: String,
    /// The sandbox's status.
    pub status: SandboxStatus,
}

/// One request made with a secret (`GET /secrets/{name}/audit`, the SDKs'
/// `ProxyAuditEvent`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProxyAuditEvent {
    /// Orders the audit; pass as `before` for older events.
    pub id: i64,
    /// When the request was answered.
    #[serde(with = "crate::time")]
    pub ts: DateTime<Utc>,
    /// The sandbox that made it.
    pub sandbox_id: String,
    /// Its name; none when the sandbox has been deleted.
    #[serde(default)]
    pub sandbox_name: Option<String>,
    /// The secret.
    #[serde(default)]
    pub secret_id: Option<String>,
    /// The request's method.
    pub method: String,
    /// The host it went to.
    pub host: String,
    /// Its path, without the query.
    pub path: String,
    /// The status the sandbox got.
    pub status: u16,
    /// The status the upstream answered, when it was reached.
    #[serde(default)]
    pub upstream_status: Option<u16>,
    /// From the request to the upstream's answer.
    #[serde(default)]
    pub latency_ms: Option<u64>,
    /// Why the proxy answered itself (`secret_revoked`, `upstream_failed`, ...).
    #[serde(default)]
    pub error_code: Option<String>,
}

/// `GET /secrets/{name}/audit` filters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditQuery {
    /// Page size, 1-[`AuditQuery::MAX_PAGE`] (default 100).
    pub limit: usize,
    /// Only events older than this id.
    pub before: Option<i64>,
    /// Only events whose status the sandbox got matches: `200`, `4xx`, or `error` (the
    /// proxy answered itself).
    pub status: Option<StatusFilter>,
}

/// The `status` filter of the audit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusFilter {
    /// Exactly this status.
    Exact(u16),
    /// This class (`4` for `4xx`).
    Class(u16),
    /// The proxy answered itself (an `error_code` is set).
    Error,
}

impl AuditQuery {
    /// Most events in one page.
    pub const MAX_PAGE: usize = 1000;

    /// Parses the query string's pairs; unknown parameters are refused.
    pub fn from_query(pairs: &[(String, String)]) -> Result<Self, RequestError> {
        let mut q = Self {
            limit: 100,
            ..Self::default()
        };
        for (key, value) in pairs {
            match key.as_str() {
                "limit" => q.limit = parse_count::<usize>(key, value)?.clamp(1, Self::MAX_PAGE),
                "before" => {
                    q.before = Some(
                        value
                            .parse()
                            .map_err(|_| RequestError::invalid("before: must be an event id"))?,
                    )
                }
                "status" => q.status = Some(StatusFilter::parse(value)?),
                other => {
                    return Err(RequestError::invalid(format!(
                        "unknown query parameter {other:?}"
                    )))
                }
            }
        }
        Ok(q)
    }

    /// The query string's pairs (the inverse of [`AuditQuery::from_query`]).
    pub fn to_query(&self) -> Vec<(String, String)> {
        let mut q = vec![("limit".to_owned(), self.limit.to_string())];
        if let Some(b) = self.before {
            q.push(("before".into(), b.to_string()));
        }
        if let Some(s) = self.status {
            q.push(("status".into(), s.to_string()));
        }
        q
    }

    /// Whether an event passes the filters (not the paging).
    pub fn matches(&self, e: &ProxyAuditEvent) -> bool {
        self.before.is_none_or(|b| e.id < b)
            && self.status.is_none_or(|s| match s {
                StatusFilter::Exact(code) => e.status == code,
                StatusFilter::Class(c) => e.status / 100 == c,
                StatusFilter::Error => e.error_code.is_some(),
            })
    }
}

impl StatusFilter {
    fn parse(value: &str) -> Result<Self, RequestError> {
        let bad = || RequestError::invalid("status: a status (`401`), a class (`4xx`) or `error`");
        if value == "error" {
            return Ok(Self::Error);
        }
        if let Some(class) = value
            .strip_suffix("xx")
            .or_else(|| value.strip_suffix("XX"))
        {
            return match class.parse::<u16>() {
                Ok(c @ 1..=5) => Ok(Self::Class(c)),
                _ => Err(bad()),
            };
        }
        match value.parse::<u16>() {
            Ok(code @ 100..=599) => Ok(Self::Exact(code)),
            _ => Err(bad()),
        }
    }
}

impl std::fmt::Display for StatusFilter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Exact(c) => write!(f, "{c}"),
            Self::Class(c) => write!(f, "{c}xx"),
            Self::Error => f.write_str("error"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn auth(v: serde_json::Value) -> Result<SecretAuth, RequestError> {
        SecretAuth::from_json(&v)
    }

    /// The wire names are a contract with the SDKs.
    #[test]
    fn auth_types_keep_their_wire_names() {
        let names: Vec<&str> = AuthType::ALL.iter().map(|t| t.as_str()).collect();
        assert_eq!(names, ["bearer", "basic", "api-key", "custom", "per_host"]);
    }

    #[test]
    fn every_documented_shape_reads_and_round_trips() {
        for (v, ty) in [
            (json!({"type": "bearer"}), "bearer"),
            (json!({"type": "api-key", "header": "X-Api-Key"}), "api-key"),
            (
                json!({"type": "api-key", "header": "Authorization", "prefix": "Token "}),
                "api-key",
            ),
            (json!({"type": "basic", "username": "deploy"}), "basic"),
            (json!({"type": "basic"}), "basic"),
            (
                json!({"type": "custom", "headers": {"X-Key": "k={{ value }}", "X-B": "{{value}}"}}),
                "custom",
            ),
            (
                json!({"per_host": [{"type": "bearer", "hosts": ["api.example.com"]},
                                    {"type": "basic", "username": "u", "hosts": ["*.example.com:8443"]}]}),
                "per_host",
            ),
        ] {
            let a = auth(v.clone()).unwrap_or_else(|e| panic!("{v}: {e}"));
            assert_eq!(a.auth_type().as_str(), ty);
            assert_eq!(serde_json::to_value(&a).unwrap(), v, "round trip");
        }
        // The TypeScript SDK's camelCase form of per_host is read too.
        let a = auth(json!({"perHost": [{"type": "bearer", "hosts": ["a.example"]}]})).unwrap();
        assert_eq!(a.auth_type(), AuthType::PerHost);
        // auth_config is the shape without its type.
        assert_eq!(
            auth(json!({"type": "api-key", "header": "x-api-key"}))
                .unwrap()
                .config(),
            json!({"header": "x-api-key"})
        );
    }

    #[test]
    fn bad_shapes_are_refused_with_their_place() {
        for (v, said) in [
            (json!({"type": "oauth"}), "auth: type \"oauth\""),
            (json!({"type": "api-key"}), "needs a header"),
            (
                json!({"type": "api-key", "header": "Host"}),
                "frames or routes",
            ),
            (
                json!({"type": "api-key", "header": "bad header"}),
                "not a header name",
            ),
            (
                json!({"type": "bearer", "header": "X"}),
                "header does not apply",
            ),
            (json!({"type": "basic", "username": "a:b"}), "without `:`"),
            (
                json!({"type": "custom", "headers": {"X": "no placeholder"}}),
                "{{ value }}",
            ),
            (
                json!({"type": "custom", "headers": {"X": "{{ value }}\r\nEvil: 1"}}),
                "printable",
            ),
            (
                json!({"type": "bearer", "hosts": ["a.com"]}),
                "hosts belong",
            ),
            (json!({"per_host": []}), "at least one rule"),
            (
                json!({"per_host": [{"type": "bearer"}]}),
                "per_host[0]: hosts are required",
            ),
            (
                json!({"per_host": [{"type": "bearer", "hosts": ["a.com"]}, {"type": "x", "hosts": ["b.com"]}]}),
                "per_host[1]: type",
            ),
            (json!({"type": "bearer", "extra": 1}), "unknown field"),
        ] {
            let err = auth(v.clone()).expect_err(&v.to_string());
            assert!(err.message.contains(said), "{v}: {}", err.message);
        }
    }

    #[test]
    fn host_patterns_match_names_wildcards_addresses_and_ports() {
        let p = |s: &str| HostPattern::parse(s).unwrap();
        assert!(p("api.openai.com").matches("API.OpenAI.com.", 443));
        assert!(p("api.openai.com").matches("api.openai.com", 8080));
        assert!(!p("api.openai.com").matches("api.openai.com.evil.net", 443));
        assert!(!p("api.openai.com").matches("xapi.openai.com", 443));
        assert!(p("*.example.com").matches("a.b.example.com", 443));
        assert!(!p("*.example.com").matches("example.com", 443));
        assert!(!p("*.example.com").matches("badexample.com", 443));
        assert!(p("127.0.0.1:8443").matches("127.0.0.1", 8443));
        assert!(!p("127.0.0.1:8443").matches("127.0.0.1", 8444));
        assert!(p("[::1]:443").matches("[::1]", 443));
        assert!(p("::1").matches("::1", 1));
        for s in [
            "api.openai.com",
            "*.example.com:8443",
            "10.0.0.1",
            "[::1]:443",
        ] {
            assert_eq!(p(s).to_string(), s);
        }
        for bad in [
            "",
            "a b",
            "*.",
            "host:0",
            "host:99999",
            "http://a.com",
            "a/b",
        ] {
            assert!(HostPattern::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn per_host_picks_the_rule_of_the_host() {
        let a = Provider::named("github").unwrap().auth();
        assert_eq!(a.rule_for("api.github.com", 443), Some(&AuthRule::Bearer));
        assert!(matches!(
            a.rule_for("github.com", 443),
            Some(AuthRule::Basic { username: Some(u) }) if u == "x-access-token"
        ));
        assert_eq!(a.rule_for("gitlab.com", 443), None);
    }

    #[test]
    fn the_catalog_has_the_big_three_with_valid_shapes() {
        let names: Vec<&str> = PROVIDERS.iter().map(|p| p.name).collect();
        assert_eq!(names, ["openai", "anthropic", "github"]);
        let openai = Provider::named("openai").unwrap().shortcut();
        assert_eq!(
            serde_json::to_value(&openai).unwrap(),
            json!({"name": "openai", "display": "OpenAI", "auth_type": "bearer",
                   "auth_config": {}, "hosts": ["api.openai.com"], "token_shape": "sk-proj-..."})
        );
        let anthropic = Provider::named("anthropic").unwrap().shortcut();
        assert_eq!(anthropic.auth_type, AuthType::ApiKey);
        assert_eq!(anthropic.auth_config, json!({"header": "x-api-key"}));
        assert_eq!(anthropic.token_shape, "sk-ant-api03-...");
        for p in PROVIDERS {
            // Every host of a per-host shape is one of the provider's hosts, and back.
            if let SecretAuth::PerHost(entries) = p.auth() {
                let implied: Vec<String> = entries
                    .iter()
                    .flat_map(|e| e.hosts.iter().map(ToString::to_string))
                    .collect();
                let mut hosts: Vec<String> = p.hosts.iter().map(|h| (*h).to_owned()).collect();
                let mut sorted = implied.clone();
                sorted.sort();
                hosts.sort();
                assert_eq!(sorted, hosts, "{}", p.name);
            }
        }
    }

    #[test]
    fn create_takes_a_provider_or_auth_and_hosts() {
        let base = CreateSecret {
            name: "openai-prod".into(),
            value: "sk-real".into(),
            ..CreateSecret::default()
        };
        let spec = CreateSecret {
            provider: Some("openai".into()),
            ..base.clone()
        }
        .validate()
        .unwrap();
        assert_eq!(spec.provider.map(|p| p.name), Some("openai"));
        assert_eq!(spec.hosts[0].to_string(), "api.openai.com");

        let custom = CreateSecret {
            auth: Some(json!({"type": "bearer"})),
            hosts: Some(vec!["api.example.com".into()]),
            ..base.clone()
        };
        assert_eq!(
            custom.validate().unwrap().auth,
            SecretAuth::Rule(AuthRule::Bearer)
        );

        let per_host = CreateSecret {
            auth: Some(json!({"per_host": [{"type": "bearer", "hosts": ["a.example"]}]})),
            ..base.clone()
        };
        assert_eq!(
            per_host.validate().unwrap().hosts[0].to_string(),
            "a.example"
        );

        for (req, said) in [
            (
                CreateSecret {
                    provider: Some("nope".into()),
                    ..base.clone()
                },
                "unknown provider",
            ),
            (
                CreateSecret {
                    provider: Some("openai".into()),
                    hosts: Some(vec!["a.com".into()]),
                    ..base.clone()
                },
                "not both",
            ),
            (base.clone(), "give a provider"),
            (
                CreateSecret {
                    auth: Some(json!({"type": "bearer"})),
                    ..base.clone()
                },
                "at least one host",
            ),
            (
                CreateSecret {
                    auth: Some(json!({"type": "bearer"})),
                    hosts: Some(vec!["a b".into()]),
                    ..base.clone()
                },
                "hosts[0]",
            ),
            (
                CreateSecret {
                    auth: Some(json!({"per_host": [{"type": "bearer", "hosts": ["a.example"]}]})),
                    hosts: Some(vec!["b.example".into()]),
                    ..base.clone()
                },
                "with per_host",
            ),
            (
                CreateSecret {
                    name: "a/b".into(),
                    provider: Some("openai".into()),
                    ..base.clone()
                },
                "name:",
            ),
            (
                CreateSecret {
                    value: "sk\r\nX-Evil: 1".into(),
                    provider: Some("openai".into()),
                    ..base.clone()
                },
                "control characters",
            ),
            (
                CreateSecret {
                    value: String::new(),
                    provider: Some("openai".into()),
                    ..base.clone()
                },
                "value: 1-",
            ),
        ] {
            let err = req.validate().expect_err(said);
            assert!(err.message.contains(said), "{said}: {}", err.message);
        }
    }

    #[test]
    fn debug_never_shows_a_value() {
        let create = CreateSecret {
            name: "n".into(),
            value: "sk-live-123".into(),
            ..CreateSecret::default()
        };
        let rotate = RotateSecret {
            value: "sk-live-456".into(),
        };
        for shown in [format!("{create:?}"), format!("{rotate:?}")] {
            assert!(!shown.contains("sk-live"), "{shown}");
            assert!(shown.contains("<redacted>"), "{shown}");
        }
    }

    #[test]
    fn env_keys_are_shell_names() {
        for ok in ["OPENAI_API_KEY", "_x", "a1"] {
            check_env_key(ok).unwrap();
        }
        for bad in ["", "1A", "A-B", "A B", "A=B"] {
            assert!(check_env_key(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn audit_filters() {
        let pairs = crate::request::query_pairs("limit=5&before=9&status=4xx");
        let q = AuditQuery::from_query(&pairs).unwrap();
        assert_eq!(
            (q.limit, q.before, q.status),
            (5, Some(9), Some(StatusFilter::Class(4)))
        );
        assert_eq!(AuditQuery::from_query(&q.to_query()).unwrap(), q);
        let event = |id, status, error: Option<&str>| ProxyAuditEvent {
            id,
            ts: DateTime::from_timestamp(1_700_000_000, 0).unwrap(),
            sandbox_id: "s".into(),
            sandbox_name: None,
            secret_id: None,
            method: "GET".into(),
            host: "h".into(),
            path: "/".into(),
            status,
            upstream_status: None,
            latency_ms: None,
            error_code: error.map(str::to_owned),
        };
        assert!(q.matches(&event(8, 401, None)));
        assert!(!q.matches(&event(9, 401, None)));
        assert!(!q.matches(&event(8, 200, None)));
        let errors = AuditQuery::from_query(&crate::request::query_pairs("status=error")).unwrap();
        assert!(errors.matches(&event(1, 403, Some("secret_revoked"))));
        assert!(!errors.matches(&event(1, 403, None)));
        for bad in [
            "status=6xx",
            "status=abc",
            "status=99",
            "before=x",
            "what=1",
        ] {
            assert!(
                AuditQuery::from_query(&crate::request::query_pairs(bad)).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn placeholders_are_found_with_any_spacing() {
        assert_eq!(value_placeholder("a {{ value }} b"), Some(2..13));
        assert_eq!(value_placeholder("{{value}}"), Some(0..9));
        assert_eq!(value_placeholder("{{ other }} {{ value}}"), Some(12..22));
        assert_eq!(value_placeholder("{{ other }}"), None);
    }
}
