//! What the egress proxy knows of a sandbox's secrets, and how it puts them into requests.
//!
//! The engine writes one file per sandbox ([`SandboxSecrets`], `secrets.json` next to its
//! network rules), atomically, whenever a binding changes; the proxy reads it for every
//! request, so a detach or a deleted secret revokes the stand-in at once. The file holds
//! each binding's stand-in, hosts and auth shape, and the value *sealed* (see
//! [`crate::seal`]): never the value in clear. A revoked binding stays in the file
//! without its value, so that a request still carrying its stand-in is refused rather
//! than sent on.
//!
//! Swapping is by exact match in the place the auth shape names ([`swap`]): a stand-in
//! anywhere else, or on a host that is not the secret's, goes out unchanged, and never
//! becomes the real value.

use std::path::Path;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use kiln_api::{AuthRule, HostPattern, SecretAuth, TokenShape};
use serde::{Deserialize, Serialize};

/// The bindings file's name in a sandbox's directory.
pub const SECRETS_FILE: &str = "secrets.json";

/// The bindings file: the sandbox and its bindings, revoked ones included.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SandboxSecrets {
    /// The sandbox (what its audit events name).
    pub sandbox_id: String,
    /// Every binding the proxy must know of.
    pub bindings: Vec<Binding>,
}

/// One binding as the proxy sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Binding {
    /// The variable the stand-in is in (for messages).
    pub env_key: String,
    /// The random token the sandbox holds in place of the value.
    pub stand_in: String,
    /// The secret; `None` once it is deleted.
    pub secret_id: Option<String>,
    /// Where the value may go.
    pub hosts: Vec<HostPattern>,
    /// Where in a request it goes.
    pub auth: SecretAuth,
    /// The value, sealed for `secret_id`; `None` when the binding is revoked.
    pub sealed: Option<String>,
}

impl Binding {
    /// Whether the stand-in no longer resolves (detached, or its secret deleted).
    pub fn revoked(&self) -> bool {
        self.sealed.is_none()
    }

    /// Whether a request to `host:port` may carry this binding's value.
    pub fn for_host(&self, host: &str, port: u16) -> bool {
        self.hosts.iter().any(|h| h.matches(host, port))
    }
}

/// Why the bindings file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum BindingsError {
    /// It could not be read.
    #[error("secret bindings unreadable: {0}")]
    Io(#[from] std::io::Error),
    /// It is not a bindings file.
    #[error("secret bindings unreadable: {0}")]
    Parse(#[from] serde_json::Error),
}

impl SandboxSecrets {
    /// Reads a bindings file; a missing file is no bindings.
    pub fn load(path: &Path) -> Result<Option<Self>, BindingsError> {
        match std::fs::read(path) {
            Ok(bytes) => Ok(Some(Self::parse(&bytes)?)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// A bindings file's content.
    pub fn parse(bytes: &[u8]) -> Result<Self, BindingsError> {
        Ok(serde_json::from_slice(bytes)?)
    }

    /// Whether connections to `host:port` are opened up (TLS terminated) to look for
    /// stand-ins: the hosts of every binding, revoked ones too (so their stand-ins are
    /// refused there).
    pub fn intercepts(&self, host: &str, port: u16) -> bool {
        self.bindings.iter().any(|b| b.for_host(host, port))
    }
}

/// A request header: name and raw value.
pub type Header = (String, Vec<u8>);

/// What [`swap`] did to a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Swap {
    /// No stand-in of a live binding was where its auth shape puts it.
    Untouched,
    /// These bindings' values were put in (indexes into the bindings).
    Swapped(Vec<usize>),
    /// The request carries a revoked stand-in: it must be refused, not sent.
    Revoked(usize),
}

/// Puts the values of the live bindings for `host:port` into `headers` wherever their
/// auth shape finds their stand-in; `open` gives a binding's value. A revoked stand-in
/// anywhere in the headers refuses the request. Bindings for other hosts are not looked
/// at: their stand-ins go out as they are.
pub fn swap(
    bindings: &[Binding],
    host: &str,
    port: u16,
    headers: &mut Vec<Header>,
    open: &mut dyn FnMut(&Binding) -> Result<String, String>,
) -> Result<Swap, String> {
    if let Some(i) = bindings
        .iter()
        .position(|b| b.revoked() && carries(headers, &b.stand_in))
    {
        return Ok(Swap::Revoked(i));
    }
    let mut swapped = Vec::new();
    for (i, b) in bindings.iter().enumerate() {
        if b.revoked() || !b.for_host(host, port) {
            continue;
        }
        let Some(rule) = b.auth.rule_for(host, port) else {
            continue;
        };
        if !found(rule, headers, &b.stand_in) {
            continue;
        }
        let value = open(b)?;
        if value.chars().any(|c| c.is_control()) {
            return Err(format!(
                "the value of {} cannot go into a header",
                b.env_key
            ));
        }
        apply(rule, headers, &b.stand_in, &value);
        swapped.push(i);
    }
    Ok(if swapped.is_empty() {
        Swap::Untouched
    } else {
        Swap::Swapped(swapped)
    })
}

/// Whether a stand-in appears in any header value, Basic credentials decoded.
fn carries(headers: &[Header], stand_in: &str) -> bool {
    headers.iter().any(|(name, value)| {
        contains(value, stand_in.as_bytes())
            || (name.eq_ignore_ascii_case("authorization")
                && basic(value).is_some_and(|(_, password)| password == stand_in))
    })
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// `Basic base64(user:password)` decoded.
fn basic(value: &[u8]) -> Option<(String, String)> {
    let text = std::str::from_utf8(value).ok()?.trim();
    let (scheme, creds) = text.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = String::from_utf8(B64.decode(creds.trim()).ok()?).ok()?;
    let (user, password) = decoded.split_once(':')?;
    Some((user.to_owned(), password.to_owned()))
}

/// `<scheme> <credentials>` of an `Authorization` value that is not Basic.
fn scheme_credentials(value: &[u8]) -> Option<(&str, &str)> {
    let text = std::str::from_utf8(value).ok()?.trim();
    let (scheme, creds) = text.split_once(' ')?;
    (!scheme.eq_ignore_ascii_case("basic")).then_some((scheme, creds.trim()))
}

fn values<'a>(headers: &'a [Header], name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
    headers
        .iter()
        .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_slice())
}

/// Whether the stand-in is where `rule` puts the value.
fn found(rule: &AuthRule, headers: &[Header], stand_in: &str) -> bool {
    match rule {
        AuthRule::Bearer => values(headers, "authorization")
            .any(|v| scheme_credentials(v).is_some_and(|(_, c)| c == stand_in)),
        AuthRule::Basic { .. } => {
            values(headers, "authorization").any(|v| basic(v).is_some_and(|(_, p)| p == stand_in))
        }
        AuthRule::ApiKey { header, prefix } => values(headers, header).any(|v| {
            std::str::from_utf8(v)
                .map(str::trim)
                .is_ok_and(|v| v == stand_in || v.strip_prefix(prefix.as_str()) == Some(stand_in))
        }),
        AuthRule::Custom { headers: templates } => templates
            .keys()
            .any(|name| values(headers, name).any(|v| contains(v, stand_in.as_bytes()))),
    }
}

/// Puts `value` where `rule` says, in place of `stand_in` (a custom template's headers
/// the request did not have are added).
fn apply(rule: &AuthRule, headers: &mut Vec<Header>, stand_in: &str, value: &str) {
    for (name, v) in headers.iter_mut() {
        let new = match rule {
            AuthRule::Bearer if name.eq_ignore_ascii_case("authorization") => scheme_credentials(v)
                .filter(|(_, c)| *c == stand_in)
                .map(|(scheme, _)| format!("{scheme} {value}")),
            AuthRule::Basic { username } if name.eq_ignore_ascii_case("authorization") => {
                basic(v).filter(|(_, p)| p == stand_in).map(|(user, _)| {
                    let user = username.as_deref().unwrap_or(&user);
                    format!("Basic {}", B64.encode(format!("{user}:{value}")))
                })
            }
            AuthRule::ApiKey { header, prefix } if name.eq_ignore_ascii_case(header) => {
                std::str::from_utf8(v)
                    .map(str::trim)
                    .ok()
                    .filter(|t| *t == stand_in || t.strip_prefix(prefix.as_str()) == Some(stand_in))
                    .map(|_| format!("{prefix}{value}"))
            }
            AuthRule::Custom { headers: templates } => templates
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, template)| fill(template, value)),
            _ => None,
        };
        if let Some(new) = new {
            *v = new.into_bytes();
        }
    }
    if let AuthRule::Custom { headers: templates } = rule {
        let missing: Vec<Header> = templates
            .iter()
            .filter(|(n, _)| !headers.iter().any(|(h, _)| h.eq_ignore_ascii_case(n)))
            .map(|(n, t)| (n.clone(), fill(t, value).into_bytes()))
            .collect();
        headers.extend(missing);
    }
}

/// A custom template with its `{{ value }}` filled in.
fn fill(template: &str, value: &str) -> String {
    match kiln_api::secrets::value_placeholder(template) {
        Some(range) => format!(
            "{}{value}{}",
            &template[..range.start],
            &template[range.end..]
        ),
        None => template.to_owned(),
    }
}

/// A fresh stand-in of `shape`: its prefix, random letters and digits, its suffix.
pub fn new_stand_in(shape: &TokenShape) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut out = String::with_capacity(shape.prefix.len() + shape.len + shape.suffix.len());
    out.push_str(shape.prefix);
    let mut buf = [0u8; 64];
    crate::seal::random(&mut buf);
    let mut have = 0;
    let mut pos = 0;
    while have < shape.len {
        if pos == buf.len() {
            crate::seal::random(&mut buf);
            pos = 0;
        }
        let b = buf[pos];
        pos += 1;
        // Rejection sampling: 248 is the largest multiple of 62 below 256.
        if b < 248 {
            out.push(ALPHABET[usize::from(b) % ALPHABET.len()] as char);
            have += 1;
        }
    }
    out.push_str(shape.suffix);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const STAND_IN: &str = "sk-proj-STANDIN0001";
    const VALUE: &str = "sk-real-value";

    fn binding(auth: serde_json::Value, hosts: &[&str]) -> Binding {
        Binding {
            env_key: "KEY".into(),
            stand_in: STAND_IN.into(),
            secret_id: Some("sec-1".into()),
            hosts: hosts
                .iter()
                .map(|h| HostPattern::parse(h).unwrap())
                .collect(),
            auth: SecretAuth::from_json(&auth).unwrap(),
            sealed: Some("sealed".into()),
        }
    }

    fn h(name: &str, value: &str) -> Header {
        (name.to_owned(), value.as_bytes().to_vec())
    }

    fn run(b: &[Binding], host: &str, headers: &mut Vec<Header>) -> Swap {
        swap(b, host, 443, headers, &mut |_| Ok(VALUE.to_owned())).unwrap()
    }

    fn get<'a>(headers: &'a [Header], name: &str) -> &'a str {
        headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| std::str::from_utf8(v).unwrap())
            .unwrap()
    }

    #[test]
    fn bearer_swaps_the_credentials_and_keeps_the_scheme() {
        let b = [binding(json!({"type": "bearer"}), &["api.openai.com"])];
        let mut headers = vec![
            h("Host", "api.openai.com"),
            h("Authorization", &format!("Bearer {STAND_IN}")),
        ];
        assert_eq!(
            run(&b, "api.openai.com", &mut headers),
            Swap::Swapped(vec![0])
        );
        assert_eq!(get(&headers, "authorization"), format!("Bearer {VALUE}"));
        // GitHub's `token` scheme is kept.
        let mut headers = vec![h("authorization", &format!("token {STAND_IN}"))];
        run(&b, "api.openai.com", &mut headers);
        assert_eq!(get(&headers, "authorization"), format!("token {VALUE}"));
    }

    #[test]
    fn api_key_headers_with_and_without_their_prefix() {
        let b = [binding(
            json!({"type": "api-key", "header": "X-Api-Key", "prefix": "Token "}),
            &["api.example.com"],
        )];
        for sent in [format!("Token {STAND_IN}"), STAND_IN.to_owned()] {
            let mut headers = vec![h("x-api-key", &sent)];
            assert_eq!(
                run(&b, "api.example.com", &mut headers),
                Swap::Swapped(vec![0])
            );
            assert_eq!(get(&headers, "x-api-key"), format!("Token {VALUE}"));
        }
        // In another header, or with more around it, it is not where the shape says.
        let mut headers = vec![
            h("Authorization", &format!("Bearer {STAND_IN}")),
            h("X-Api-Key", &format!("x{STAND_IN}")),
        ];
        assert_eq!(run(&b, "api.example.com", &mut headers), Swap::Untouched);
        assert!(get(&headers, "authorization").contains(STAND_IN));
    }

    #[test]
    fn basic_replaces_the_password_and_the_configured_user() {
        let b = [binding(
            json!({"type": "basic", "username": "x-access-token"}),
            &["github.com"],
        )];
        let sent = format!("Basic {}", B64.encode(format!("me:{STAND_IN}")));
        let mut headers = vec![h("Authorization", &sent)];
        assert_eq!(run(&b, "github.com", &mut headers), Swap::Swapped(vec![0]));
        let (user, password) = basic(get(&headers, "authorization").as_bytes()).unwrap();
        assert_eq!(
            (user.as_str(), password.as_str()),
            ("x-access-token", VALUE)
        );
        // Without a configured user, the guest's stays.
        let b = [binding(json!({"type": "basic"}), &["github.com"])];
        let mut headers = vec![h("Authorization", &sent)];
        run(&b, "github.com", &mut headers);
        let (user, _) = basic(get(&headers, "authorization").as_bytes()).unwrap();
        assert_eq!(user, "me");
    }

    #[test]
    fn custom_templates_set_every_header_they_name() {
        let b = [binding(
            json!({"type": "custom", "headers": {"X-Key": "key={{ value }}", "X-Sig": "v1:{{value}}"}}),
            &["api.example.com"],
        )];
        let mut headers = vec![h("X-Key", STAND_IN), h("Accept", "*/*")];
        assert_eq!(
            run(&b, "api.example.com", &mut headers),
            Swap::Swapped(vec![0])
        );
        assert_eq!(get(&headers, "x-key"), format!("key={VALUE}"));
        assert_eq!(get(&headers, "x-sig"), format!("v1:{VALUE}"));
        assert_eq!(get(&headers, "accept"), "*/*");
    }

    #[test]
    fn per_host_rules_apply_on_their_hosts_only() {
        let b = [binding(
            json!({"per_host": [{"type": "bearer", "hosts": ["api.github.com"]},
                                {"type": "basic", "username": "x-access-token", "hosts": ["github.com"]}]}),
            &["api.github.com", "github.com"],
        )];
        let mut headers = vec![h("Authorization", &format!("Bearer {STAND_IN}"))];
        assert_eq!(
            run(&b, "api.github.com", &mut headers),
            Swap::Swapped(vec![0])
        );
        // Bearer is not github.com's rule.
        let mut headers = vec![h("Authorization", &format!("Bearer {STAND_IN}"))];
        assert_eq!(run(&b, "github.com", &mut headers), Swap::Untouched);
        assert!(get(&headers, "authorization").contains(STAND_IN));
    }

    #[test]
    fn other_hosts_never_get_the_value() {
        let b = [binding(
            json!({"type": "bearer"}),
            &["api.openai.com", "127.0.0.1:8443"],
        )];
        for (host, port) in [
            ("evil.example", 443),
            ("api.openai.com.evil.example", 443),
            ("127.0.0.1", 8444),
        ] {
            let mut headers = vec![h("Authorization", &format!("Bearer {STAND_IN}"))];
            let out = swap(&b, host, port, &mut headers, &mut |_| {
                panic!("the value was opened for {host}:{port}")
            })
            .unwrap();
            assert_eq!(out, Swap::Untouched, "{host}:{port}");
            assert_eq!(get(&headers, "authorization"), format!("Bearer {STAND_IN}"));
        }
        assert!(!SandboxSecrets {
            sandbox_id: "s".into(),
            bindings: b.to_vec()
        }
        .intercepts("evil.example", 443));
    }

    #[test]
    fn a_revoked_stand_in_is_refused_wherever_it_is() {
        let mut revoked = binding(json!({"type": "bearer"}), &["api.openai.com"]);
        revoked.sealed = None;
        let b = [revoked];
        for headers in [
            vec![h("Authorization", &format!("Bearer {STAND_IN}"))],
            vec![h("X-Other", &format!("zz{STAND_IN}zz"))],
            vec![h(
                "Authorization",
                &format!("Basic {}", B64.encode(format!("u:{STAND_IN}"))),
            )],
        ] {
            let mut headers = headers;
            let out = swap(&b, "api.openai.com", 443, &mut headers, &mut |_| {
                panic!("a revoked binding was opened")
            });
            assert_eq!(out, Ok(Swap::Revoked(0)));
        }
        let mut clean = vec![h("Authorization", "Bearer something-else")];
        assert_eq!(run(&b, "api.openai.com", &mut clean), Swap::Untouched);
    }

    #[test]
    fn a_value_that_does_not_open_stops_the_request() {
        let b = [binding(json!({"type": "bearer"}), &["api.openai.com"])];
        let mut headers = vec![h("Authorization", &format!("Bearer {STAND_IN}"))];
        let out = swap(&b, "api.openai.com", 443, &mut headers, &mut |_| {
            Err("the key file does not open it".into())
        });
        assert!(out.is_err());
        let out = swap(&b, "api.openai.com", 443, &mut headers, &mut |_| {
            Ok("a\r\nInjected: 1".into())
        });
        assert!(out.unwrap_err().contains("cannot go into a header"));
    }

    #[test]
    fn stand_ins_have_their_shape_and_differ() {
        let shape = TokenShape {
            prefix: "sk-ant-api03-",
            len: 93,
            suffix: "AA",
        };
        let a = new_stand_in(&shape);
        let b = new_stand_in(&shape);
        assert_ne!(a, b);
        assert_eq!(a.len(), 13 + 93 + 2);
        assert!(a.starts_with("sk-ant-api03-") && a.ends_with("AA"));
        assert!(a[13..106].bytes().all(|c| c.is_ascii_alphanumeric()));
    }

    #[test]
    fn the_bindings_file_round_trips_and_a_missing_one_is_none() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(SECRETS_FILE);
        assert_eq!(SandboxSecrets::load(&path).unwrap(), None);
        let file = SandboxSecrets {
            sandbox_id: "sbx".into(),
            bindings: vec![binding(json!({"type": "bearer"}), &["api.openai.com"])],
        };
        std::fs::write(&path, serde_json::to_vec(&file).unwrap()).unwrap();
        assert_eq!(SandboxSecrets::load(&path).unwrap(), Some(file));
        std::fs::write(&path, "{broken").unwrap();
        assert!(SandboxSecrets::load(&path).is_err());
    }
}
