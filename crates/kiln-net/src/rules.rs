//! Egress rules: what a sandbox may reach.
//!
//! The wire form is Superserve's `network: {allow_out, deny_out}`. `allow_out` holds
//! CIDRs and domains (`*.example.com` matches subdomains at any depth, not the apex),
//! `deny_out` holds CIDRs only, and an allow that overlaps a deny wins. Whatever the rules
//! say, the ranges of [`always_blocked`] stay blocked: a sandbox never reaches the host,
//! its loopback, link-local (cloud metadata) or private networks.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net};
pub use kiln_api::NetworkConfig;

/// Most entries either list may hold; the rules are checked on every connection.
pub const MAX_RULES: usize = 256;
/// Longest domain name (RFC 1035).
const MAX_DOMAIN: usize = 253;

/// A rule that could not be understood, with where it is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("network.{field}[{index}]: {reason}")]
pub struct RuleError {
    /// `allow_out` or `deny_out`.
    pub field: &'static str,
    /// Position in that list.
    pub index: usize,
    /// What is wrong with it.
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Allow {
    Net(IpNet),
    /// A lowercase domain, matched exactly.
    Domain(String),
    /// `*.suffix`: stored as `.suffix`, matched by any name ending in it.
    Wildcard(String),
}

/// Every bad rule of a [`NetworkConfig`], shown `; `-joined.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
pub struct RuleErrors(pub Vec<RuleError>);

/// Compiled rules, ready to decide connections.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    allow: Vec<Allow>,
    deny: Vec<IpNet>,
}

/// What happens to one connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// It may be made.
    Allow,
    /// It is refused, and why (shown to the guest and logged).
    Deny(String),
}

impl Policy {
    /// Checks and compiles a sandbox's rules (as the API carries them); every bad entry
    /// is reported, not just the first.
    pub fn compile(rules: &NetworkConfig) -> Result<Policy, RuleErrors> {
        let mut errors = Vec::new();
        let mut policy = Policy::default();
        for (field, list) in [
            ("allow_out", &rules.allow_out),
            ("deny_out", &rules.deny_out),
        ] {
            if list.len() > MAX_RULES {
                errors.push(RuleError {
                    field,
                    index: MAX_RULES,
                    reason: format!("at most {MAX_RULES} rules"),
                });
            }
        }
        for (index, raw) in rules.allow_out.iter().enumerate().take(MAX_RULES) {
            match parse_allow(raw) {
                Ok(a) => policy.allow.push(a),
                Err(reason) => errors.push(RuleError {
                    field: "allow_out",
                    index,
                    reason,
                }),
            }
        }
        for (index, raw) in rules.deny_out.iter().enumerate().take(MAX_RULES) {
            match parse_net(raw) {
                Some(n) => policy.deny.push(n),
                None => errors.push(RuleError {
                    field: "deny_out",
                    index,
                    reason: format!("{raw:?} is not a CIDR (deny_out takes CIDRs only)"),
                }),
            }
        }
        if errors.is_empty() {
            Ok(policy)
        } else {
            Err(RuleErrors(errors))
        }
    }
}

/// A CIDR, or a bare address as its /32 or /128.
fn parse_net(raw: &str) -> Option<IpNet> {
    let raw = raw.trim();
    raw.parse::<IpNet>()
        .ok()
        .map(|n| n.trunc())
        .or_else(|| raw.parse::<IpAddr>().ok().map(IpNet::from))
        .map(canonical_net)
}

fn parse_allow(raw: &str) -> Result<Allow, String> {
    if let Some(n) = parse_net(raw) {
        return Ok(Allow::Net(n));
    }
    let name = raw.trim().trim_end_matches('.').to_ascii_lowercase();
    let (wild, bare) = match name.strip_prefix("*.") {
        Some(rest) => (true, rest),
        None => (false, name.as_str()),
    };
    if !valid_domain(bare) {
        return Err(format!(
            "{raw:?} is neither a CIDR nor a domain (letters, digits, `-` and `.`, with an \
             optional leading `*.`)"
        ));
    }
    Ok(if wild {
        Allow::Wildcard(format!(".{bare}"))
    } else {
        Allow::Domain(bare.to_owned())
    })
}

fn valid_domain(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_DOMAIN
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

impl Policy {
    /// Decides a connection to `ip`, asked for by `domain` when the guest named one. The
    /// always-blocked ranges are checked first and cannot be allowed.
    pub fn decide(&self, domain: Option<&str>, ip: IpAddr) -> Decision {
        if let Some(why) = always_blocked(ip) {
            return Decision::Deny(format!("{ip} is {why}, always blocked"));
        }
        self.decide_rules(domain, ip)
    }

    /// The sandbox's own rules alone, for a destination the operator has taken out of the
    /// always-blocked ranges ([`PrivateDest`]).
    pub fn decide_rules(&self, domain: Option<&str>, ip: IpAddr) -> Decision {
        let ip = canonical(ip);
        let allowed = domain.is_some_and(|d| self.names(d))
            || self
                .allow
                .iter()
                .any(|a| matches!(a, Allow::Net(n) if n.contains(&ip)));
        if allowed {
            return Decision::Allow;
        }
        match self.deny.iter().find(|n| n.contains(&ip) || denies_all(n)) {
            Some(n) if !n.contains(&ip) => {
                Decision::Deny(format!("{ip} is IPv6, which deny_out {n} denies too"))
            }
            Some(n) => Decision::Deny(format!("{ip} is in deny_out {n}")),
            None => Decision::Allow,
        }
    }

    /// Whether a name the guest asked for may be looked up at all. Under an allowlist
    /// (`deny_out` holding `0.0.0.0/0`) only a name an `allow_out` domain names may: a
    /// lookup is itself a message out (a guest could spell data into the names it asks
    /// for), so any other name is refused before it reaches a resolver. Without an
    /// allowlist every name is looked up and its addresses decide.
    pub fn may_resolve(&self, domain: &str) -> Result<(), String> {
        match self.deny.iter().find(|n| denies_all(n)) {
            Some(n) if !self.names(domain) => Err(format!(
                "{domain} is named by no allow_out rule and deny_out {n} makes the rules an \
                 allowlist: not resolved"
            )),
            _ => Ok(()),
        }
    }

    /// Whether an `allow_out` domain or wildcard names `domain`.
    fn names(&self, domain: &str) -> bool {
        let domain = domain.trim_end_matches('.').to_ascii_lowercase();
        self.allow.iter().any(|a| match a {
            Allow::Net(_) => false,
            Allow::Domain(d) => domain == *d,
            Allow::Wildcard(suffix) => domain.ends_with(suffix.as_str()),
        })
    }
}

/// `0.0.0.0/0` in `deny_out`, the allowlist idiom: it denies every address no allow rule
/// names, IPv6 included (left to the letter it would leave all of public IPv6 open).
fn denies_all(net: &IpNet) -> bool {
    matches!(net, IpNet::V4(n) if n.prefix_len() == 0)
}

/// A private destination the operator lets sandboxes reach (`KILN_EGRESS_ALLOW_PRIVATE`):
/// `host:port` (the name as the guest asks for it) or `cidr:port` / `address:port` (any
/// name resolving there, or the address itself). It lifts the wall around private
/// networks and the host for that port only; the sandbox's own rules still apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrivateDest {
    target: PrivateTarget,
    port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum PrivateTarget {
    Net(IpNet),
    /// Lowercase, matched exactly.
    Host(String),
}

impl PrivateDest {
    /// Parses one entry: `host:port`, `a.b.c.d[/n]:port` or `[v6[/n]]:port`.
    pub fn parse(raw: &str) -> Result<Self, String> {
        let s = raw.trim();
        let bad =
            || format!("{raw:?} is not host:port or cidr:port (IPv6 in brackets: [fd00::/8]:443)");
        let (target, port) = if let Some(rest) = s.strip_prefix('[') {
            let (t, after) = rest.split_once(']').ok_or_else(bad)?;
            (t, after.strip_prefix(':').ok_or_else(bad)?)
        } else {
            s.rsplit_once(':').ok_or_else(bad)?
        };
        let port = port
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(bad)?;
        let target = match parse_net(target) {
            Some(n) => PrivateTarget::Net(n),
            None => {
                let name = target.trim_end_matches('.').to_ascii_lowercase();
                if !valid_domain(&name) {
                    return Err(bad());
                }
                PrivateTarget::Host(name)
            }
        };
        Ok(Self { target, port })
    }

    /// A comma- or space-separated list, as the environment variable holds it.
    pub fn parse_list(raw: &str) -> Result<Vec<Self>, String> {
        raw.split(|c: char| c == ',' || c.is_whitespace())
            .filter(|s| !s.is_empty())
            .map(Self::parse)
            .collect()
    }

    /// Whether a connection to `ip:port`, asked for as `domain`, is this destination.
    pub fn permits(&self, domain: Option<&str>, ip: IpAddr, port: u16) -> bool {
        port == self.port
            && match &self.target {
                PrivateTarget::Net(n) => n.contains(&canonical(ip)),
                PrivateTarget::Host(h) => {
                    domain.is_some_and(|d| d.trim_end_matches('.').eq_ignore_ascii_case(h))
                }
            }
    }
}

impl std::str::FromStr for PrivateDest {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Self::parse(s)
    }
}

impl std::fmt::Display for PrivateDest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.target {
            PrivateTarget::Host(h) => write!(f, "{h}:{}", self.port),
            PrivateTarget::Net(IpNet::V6(n)) => write!(f, "[{n}]:{}", self.port),
            PrivateTarget::Net(n) => write!(f, "{n}:{}", self.port),
        }
    }
}

/// The address every check judges: an IPv6 form that carries an IPv4 address reaches
/// that address, so it is that address. Checking the raw form would let
/// `[::ffff:<host IPv4>]` past the host's own addresses, or `::10.0.0.1` past the
/// private ranges and the sandbox's IPv4 rules.
pub(crate) fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => embedded_v4(v6).map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The IPv4 address inside IPv4-mapped `::ffff:a.b.c.d`, IPv4-compatible `::a.b.c.d`
/// (deprecated; `::` and `::1` stay themselves) and NAT64 `64:ff9b::a.b.c.d`.
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    if let Some(v4) = ip.to_ipv4_mapped() {
        return Some(v4);
    }
    let s = ip.segments();
    let compatible = s[..6] == [0; 6] && !ip.is_loopback() && !ip.is_unspecified();
    let nat64 = s[..6] == [0x64, 0xff9b, 0, 0, 0, 0];
    let [.., a, b, c, d] = ip.octets();
    (compatible || nat64).then_some(Ipv4Addr::new(a, b, c, d))
}

/// A rule's network in the same terms as [`canonical`] addresses: an IPv6 CIDR lying
/// wholly in one of the IPv4-carrying ranges is the IPv4 CIDR it carries, so a rule
/// written either way matches an address written either way.
fn canonical_net(net: IpNet) -> IpNet {
    let IpNet::V6(v6) = net else { return net };
    match (
        v6.prefix_len().checked_sub(96),
        embedded_v4(v6.network()),
        embedded_v4(v6.broadcast()),
    ) {
        (Some(prefix), Some(first), Some(_)) => Ipv4Net::new(first, prefix).map_or(net, IpNet::V4),
        _ => net,
    }
}

/// Why `ip` can never be reached from a sandbox, or `None` when it is a public address.
pub fn always_blocked(ip: IpAddr) -> Option<&'static str> {
    match canonical(ip) {
        IpAddr::V4(v4) => blocked_v4(v4),
        IpAddr::V6(v6) => blocked_v6(v6),
    }
}

fn in_v4(ip: Ipv4Addr, net: [u8; 4], prefix: u32) -> bool {
    let mask = u32::MAX.checked_shl(32 - prefix).unwrap_or(0);
    u32::from(ip) & mask == u32::from(Ipv4Addr::from(net)) & mask
}

fn blocked_v4(ip: Ipv4Addr) -> Option<&'static str> {
    const RANGES: &[([u8; 4], u32, &str)] = &[
        ([0, 0, 0, 0], 8, "an unspecified (this-network) address"),
        ([127, 0, 0, 0], 8, "loopback"),
        ([10, 0, 0, 0], 8, "a private address (10/8)"),
        ([172, 16, 0, 0], 12, "a private address (172.16/12)"),
        ([192, 168, 0, 0], 16, "a private address (192.168/16)"),
        ([100, 64, 0, 0], 10, "a shared (CGNAT) address (100.64/10)"),
        ([169, 254, 0, 0], 16, "link-local (cloud metadata)"),
        ([192, 0, 0, 0], 24, "IETF protocol assignments"),
        ([198, 18, 0, 0], 15, "a benchmarking network"),
        ([224, 0, 0, 0], 4, "multicast"),
        ([240, 0, 0, 0], 4, "reserved or broadcast"),
    ];
    RANGES
        .iter()
        .find(|(net, prefix, _)| in_v4(ip, *net, *prefix))
        .map(|r| r.2)
}

fn blocked_v6(ip: Ipv6Addr) -> Option<&'static str> {
    let seg = ip.segments();
    if ip.is_unspecified() {
        Some("unspecified")
    } else if ip.is_loopback() {
        Some("loopback")
    } else if seg[0] & 0xfe00 == 0xfc00 {
        Some("a unique local address (fc00::/7)")
    } else if seg[0] & 0xffc0 == 0xfe80 {
        Some("link-local")
    } else if seg[0] & 0xff00 == 0xff00 {
        Some("multicast")
    } else if seg[0] == 0x2001 && seg[1] == 0x0db8 {
        Some("documentation")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(allow: &[&str], deny: &[&str]) -> Policy {
        Policy::compile(&NetworkConfig {
            allow_out: allow.iter().map(|s| (*s).to_owned()).collect(),
            deny_out: deny.iter().map(|s| (*s).to_owned()).collect(),
        })
        .expect("valid rules")
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    const PUBLIC: &str = "140.82.112.4";

    #[test]
    fn no_rules_reach_any_public_address_and_nothing_private() {
        let p = Policy::default();
        assert_eq!(p.decide(None, ip(PUBLIC)), Decision::Allow);
        assert_eq!(
            p.decide(Some("example.com"), ip("2606:4700::1")),
            Decision::Allow
        );
        for blocked in [
            "127.0.0.1",
            "127.9.9.9",
            "0.0.0.0",
            "10.0.2.2",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "100.64.0.1",
            "169.254.169.254",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "::",
            "fe80::1",
            "fd00::1",
            "fc00::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::a00:1",
        ] {
            assert!(
                matches!(p.decide(None, ip(blocked)), Decision::Deny(_)),
                "{blocked} must be blocked"
            );
        }
        // Neighbours of the private ranges are public.
        for public in ["172.32.0.1", "100.128.0.1", "11.0.0.1", "64:ff9b::808:808"] {
            assert_eq!(p.decide(None, ip(public)), Decision::Allow, "{public}");
        }
    }

    #[test]
    fn allow_rules_cannot_open_the_always_blocked_ranges() {
        let p = rules(&["127.0.0.0/8", "0.0.0.0/0", "metadata.internal"], &[]);
        for (d, a) in [
            (None, "127.0.0.1"),
            (None, "10.1.2.3"),
            (Some("metadata.internal"), "169.254.169.254"),
        ] {
            assert!(matches!(p.decide(d, ip(a)), Decision::Deny(_)), "{a}");
        }
    }

    #[test]
    fn an_allowlist_is_deny_everything_plus_exceptions_and_allow_wins() {
        let p = rules(
            &["api.openai.com", "*.github.com", "140.82.112.0/20"],
            &["0.0.0.0/0"],
        );
        assert_eq!(
            p.decide(Some("api.openai.com"), ip("1.2.3.4")),
            Decision::Allow
        );
        assert_eq!(
            p.decide(Some("API.OpenAI.com."), ip("1.2.3.4")),
            Decision::Allow
        );
        assert_eq!(
            p.decide(Some("codeload.github.com"), ip("1.2.3.4")),
            Decision::Allow
        );
        assert_eq!(
            p.decide(Some("a.b.github.com"), ip("1.2.3.4")),
            Decision::Allow
        );
        // The wildcard does not match the apex, nor a name that merely ends the same.
        assert!(matches!(
            p.decide(Some("github.com"), ip("1.2.3.4")),
            Decision::Deny(_)
        ));
        assert!(matches!(
            p.decide(Some("evilgithub.com"), ip("1.2.3.4")),
            Decision::Deny(_)
        ));
        assert_eq!(p.decide(None, ip(PUBLIC)), Decision::Allow);
        assert!(matches!(p.decide(None, ip("8.8.8.8")), Decision::Deny(_)));
    }

    #[test]
    fn an_allowlist_denies_public_ipv6_too_unless_a_rule_names_it() {
        let p = rules(
            &["api.openai.com", "2001:4860::/32"],
            &["10.0.0.0/8", "0.0.0.0/0"],
        );
        let Decision::Deny(why) = p.decide(None, ip("2606:4700::1")) else {
            panic!("public IPv6 open under deny_out 0.0.0.0/0");
        };
        assert!(why.contains("0.0.0.0/0"), "{why}");
        // An explicit IPv6 CIDR or a domain still opens what it names.
        assert_eq!(p.decide(None, ip("2001:4860::8888")), Decision::Allow);
        assert_eq!(
            p.decide(Some("api.openai.com"), ip("2606:4700::1")),
            Decision::Allow
        );
        // Any narrower IPv4 deny leaves IPv6 alone.
        let p = rules(&[], &["8.0.0.0/7"]);
        assert_eq!(p.decide(None, ip("2606:4700::1")), Decision::Allow);
    }

    #[test]
    fn ipv6_forms_of_an_ipv4_address_are_held_to_its_walls() {
        let p = Policy::default();
        for blocked in [
            "::ffff:10.0.0.1",
            "::10.0.0.1",
            "::127.0.0.1",
            "::169.254.169.254",
            "64:ff9b::10.0.0.1",
            "64:ff9b::127.0.0.1",
        ] {
            assert!(
                matches!(p.decide(None, ip(blocked)), Decision::Deny(_)),
                "{blocked} must be blocked"
            );
        }
        // The sandbox's IPv4 rules hold for every spelling, and an IPv6 rule written for
        // an IPv4 address holds for the address.
        let p = rules(&[], &["1.2.3.0/24", "::ffff:5.6.7.0/120"]);
        for denied in [
            "1.2.3.4",
            "::ffff:1.2.3.4",
            "::1.2.3.4",
            "64:ff9b::1.2.3.4",
            "5.6.7.8",
            "::5.6.7.8",
        ] {
            assert!(
                matches!(p.decide(None, ip(denied)), Decision::Deny(_)),
                "{denied} must be denied"
            );
        }
        let p = rules(&["1.2.3.4"], &["0.0.0.0/0"]);
        assert_eq!(p.decide(None, ip("::ffff:1.2.3.4")), Decision::Allow);
    }

    #[test]
    fn under_an_allowlist_only_named_domains_may_be_resolved() {
        let p = rules(
            &["api.openai.com", "*.github.com", "1.2.3.4"],
            &["0.0.0.0/0"],
        );
        for named in ["api.openai.com", "API.OpenAI.com.", "codeload.github.com"] {
            assert_eq!(p.may_resolve(named), Ok(()), "{named}");
        }
        for unnamed in [
            "github.com",
            "secret-data.attacker.example",
            "1.2.3.4.nip.io",
        ] {
            let why = p.may_resolve(unnamed).expect_err(unnamed);
            assert!(why.contains("not resolved"), "{why}");
        }
        // Without an allowlist every name is looked up and its addresses decide.
        let p = rules(&["api.openai.com"], &["8.8.8.0/24"]);
        assert_eq!(p.may_resolve("anything.example"), Ok(()));
        assert_eq!(Policy::default().may_resolve("anything.example"), Ok(()));
    }

    #[test]
    fn deny_rules_take_cidrs_and_addresses() {
        let p = rules(&[], &["8.8.8.0/24", "1.1.1.1", "2001:4860::/32"]);
        assert!(matches!(p.decide(None, ip("8.8.8.8")), Decision::Deny(_)));
        assert!(matches!(p.decide(None, ip("1.1.1.1")), Decision::Deny(_)));
        assert!(matches!(
            p.decide(None, ip("2001:4860::8888")),
            Decision::Deny(_)
        ));
        assert_eq!(p.decide(None, ip("1.1.1.2")), Decision::Allow);
    }

    #[test]
    fn every_bad_rule_is_reported_with_its_position() {
        let errs = Policy::compile(&NetworkConfig {
            allow_out: vec!["ok.example.com".into(), "not a domain".into(), "*.".into()],
            deny_out: vec!["example.com".into(), "10.0.0.0/33".into()],
        })
        .expect_err("invalid");
        let shown: Vec<String> = errs.0.iter().map(ToString::to_string).collect();
        assert_eq!(shown.len(), 4, "{shown:?}");
        assert!(shown[0].starts_with("network.allow_out[1]: "), "{shown:?}");
        assert!(shown[1].starts_with("network.allow_out[2]: "), "{shown:?}");
        assert!(shown[2].contains("deny_out[0]") && shown[2].contains("CIDRs only"));
        assert!(shown[3].starts_with("network.deny_out[1]: "), "{shown:?}");
    }

    #[test]
    fn operator_private_destinations_match_name_or_address_and_port() {
        let list = PrivateDest::parse_list(
            "mirror.internal:443, 10.1.0.0/16:8080 127.0.0.1:5000 [fd00::/8]:443",
        )
        .unwrap();
        let shown: Vec<String> = list.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            [
                "mirror.internal:443",
                "10.1.0.0/16:8080",
                "127.0.0.1/32:5000",
                "[fd00::/8]:443"
            ]
        );
        let any = |d: Option<&str>, a: &str, port| list.iter().any(|p| p.permits(d, ip(a), port));
        assert!(any(Some("Mirror.Internal."), "10.9.9.9", 443));
        assert!(!any(Some("mirror.internal"), "10.9.9.9", 80));
        assert!(!any(Some("other.internal"), "10.9.9.9", 443));
        assert!(any(None, "10.1.2.3", 8080));
        assert!(any(Some("whatever.example"), "10.1.2.3", 8080));
        assert!(!any(None, "10.2.0.1", 8080));
        assert!(any(None, "::ffff:127.0.0.1", 5000));
        assert!(!any(None, "127.0.0.1", 5001));
        assert!(any(None, "fd12::1", 443));
        for bad in [
            "mirror.internal",
            "10.0.0.0/8",
            "host:0",
            "a b:80",
            "[fd00::]",
        ] {
            assert!(PrivateDest::parse(bad).is_err(), "{bad:?}");
        }
        // The wall is lifted, the sandbox's rules still apply.
        let p = rules(&[], &["10.0.0.0/8"]);
        assert!(matches!(
            p.decide_rules(None, ip("10.1.2.3")),
            Decision::Deny(_)
        ));
        assert_eq!(
            Policy::default().decide_rules(None, ip("10.1.2.3")),
            Decision::Allow
        );
    }

    #[test]
    fn the_wire_form_refuses_unknown_fields() {
        let r: NetworkConfig =
            serde_json::from_str(r#"{"allow_out":["a.com"]}"#).expect("partial is fine");
        assert!(r.deny_out.is_empty());
        assert!(serde_json::from_str::<NetworkConfig>(r#"{"allowOut":[]}"#).is_err());
    }
}
