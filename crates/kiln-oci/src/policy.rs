//! Which addresses kiln may connect to when it talks to a registry.
//!
//! A tenant of `kiln serve` chooses its template's `from`, so without a wall the host would
//! connect wherever a tenant says: to kiln's own API on loopback, to a database on the LAN,
//! to a cloud metadata service on a link-local address. A server therefore reaches
//! registries on public addresses only, plus the `host:port`s its operator names in
//! `KILN_PRIVATE_REGISTRIES` (and the mirrors it configures). The check is made on the
//! addresses actually connected to: a name is resolved once, its addresses are checked,
//! and the connection is pinned to them, so a DNS answer that changes between the check
//! and the connection (DNS rebinding) gains nothing. Redirects and token realms go through
//! the same check (see `registry.rs`).
//!
//! The local CLI (one user on their own machine) allows every address: the user could
//! connect there anyway.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The environment variable listing the private registries a server may reach:
/// `registry.internal:5000,127.0.0.1:5000,[fd00::5]:443`.
pub const PRIVATE_REGISTRIES_ENV: &str = "KILN_PRIVATE_REGISTRIES";

/// Whether registries on non-public addresses may be reached.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum PrivateRegistries {
    /// Every address: the local CLI, where the user could connect there anyway.
    #[default]
    Any,
    /// Public addresses only, plus these `host:port`s (lower-case, IPv6 in brackets).
    Only(BTreeSet<String>),
}

/// A `KILN_PRIVATE_REGISTRIES` entry that is not `host:port`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{PRIVATE_REGISTRIES_ENV}: {entry:?} is not host:port (e.g. registry.internal:5000, [fd00::5]:443)")]
pub struct BadAllowlistEntry {
    /// The entry as written.
    pub entry: String,
}

impl PrivateRegistries {
    /// The server's policy from a `KILN_PRIVATE_REGISTRIES` value (empty: none allowed).
    pub fn only(spec: &str) -> Result<Self, BadAllowlistEntry> {
        let mut set = BTreeSet::new();
        for entry in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            set.insert(normalise_host_port(entry).ok_or_else(|| BadAllowlistEntry {
                entry: entry.to_owned(),
            })?);
        }
        Ok(Self::Only(set))
    }

    /// The server's policy from `KILN_PRIVATE_REGISTRIES` in the environment.
    pub fn from_env() -> Result<Self, BadAllowlistEntry> {
        Self::only(&std::env::var(PRIVATE_REGISTRIES_ENV).unwrap_or_default())
    }

    /// Adds `host:port` to an allowlist (no-op for [`PrivateRegistries::Any`]).
    pub(crate) fn allow(&mut self, host_port: &str) {
        if let (Self::Only(set), Some(hp)) = (self, normalise_host_port(host_port)) {
            set.insert(hp);
        }
    }

    /// Which of `addrs` (what `host:port` resolved to) may be connected to; empty when
    /// none. `Err` names the class of the first refused address, for the server's log.
    pub(crate) fn filter(
        &self,
        host: &str,
        port: u16,
        addrs: &[SocketAddr],
    ) -> Result<Vec<SocketAddr>, Refused> {
        let Self::Only(allowed) = self else {
            return Ok(addrs.to_vec());
        };
        if allowed.contains(&format!("{}:{port}", host.to_ascii_lowercase())) {
            return Ok(addrs.to_vec());
        }
        let own = own_addresses();
        let mut refused = None;
        let ok: Vec<SocketAddr> = addrs
            .iter()
            .copied()
            .filter(|a| {
                if allowed.contains(&normalise_socket(a)) {
                    return true;
                }
                match classify(a.ip(), &own) {
                    None => true,
                    Some(class) => {
                        refused.get_or_insert(Refused { addr: *a, class });
                        false
                    }
                }
            })
            .collect();
        match (ok.is_empty(), refused) {
            (true, Some(r)) => Err(r),
            _ => Ok(ok),
        }
    }
}

/// An address the policy refused, and why (for the server's log, never the tenant).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Refused {
    pub(crate) addr: SocketAddr,
    pub(crate) class: &'static str,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} is a {} address, not listed in {PRIVATE_REGISTRIES_ENV}",
            self.addr, self.class
        )
    }
}

/// `host:port` lower-cased, IPv6 hosts bracketed; `None` when it is not `host:port`.
fn normalise_host_port(s: &str) -> Option<String> {
    let (host, port) = match s.strip_prefix('[') {
        Some(rest) => {
            let (v6, port) = rest.split_once("]:")?;
            (format!("[{}]", v6.parse::<Ipv6Addr>().ok()?), port)
        }
        None => {
            let (host, port) = s.rsplit_once(':')?;
            if host.is_empty() || host.contains([':', '/', '@']) {
                return None;
            }
            (host.to_ascii_lowercase(), port)
        }
    };
    let port: u16 = port.parse().ok()?;
    Some(format!("{host}:{port}"))
}

fn normalise_socket(a: &SocketAddr) -> String {
    match a {
        SocketAddr::V4(v4) => v4.to_string(),
        SocketAddr::V6(v6) => format!("[{}]:{}", v6.ip(), v6.port()),
    }
}

/// The addresses of this host's interfaces: a registry "on" the host's public address is
/// the host itself (kiln's API, anything listening on all addresses).
fn own_addresses() -> Vec<IpAddr> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    addrs
        .filter_map(|i| i.address)
        .filter_map(|a| {
            a.as_sockaddr_in()
                .map(|v4| IpAddr::V4(v4.ip()))
                .or_else(|| a.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())))
        })
        .collect()
}

/// Why `ip` is not a public address a server may connect to, or `None` when it is.
/// IPv6 forms that carry an IPv4 address (mapped `::ffff:a.b.c.d`, compatible `::a.b.c.d`,
/// NAT64 `64:ff9b::a.b.c.d`) are judged by that address.
pub(crate) fn classify(ip: IpAddr, own: &[IpAddr]) -> Option<&'static str> {
    let class = match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => match embedded_v4(v6) {
            Some(v4) => classify_v4(v4),
            None => classify_v6(v6),
        },
    };
    class.or_else(|| {
        let canonical = |a: IpAddr| match a {
            IpAddr::V6(v6) => embedded_v4(v6).map_or(a, IpAddr::V4),
            v4 => v4,
        };
        own.iter()
            .any(|o| canonical(*o) == canonical(ip))
            .then_some("host's own")
    })
}

fn classify_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, ..] = ip.octets();
    Some(if ip.is_loopback() {
        "loopback"
    } else if ip.is_private() {
        "private"
    } else if ip.is_link_local() {
        "link-local"
    } else if a == 100 && (64..128).contains(&b) {
        "carrier-grade NAT"
    } else if a == 0 {
        "unspecified"
    } else if ip.is_multicast() {
        "multicast"
    } else if a >= 240 {
        "reserved"
    } else {
        return None;
    })
}

fn classify_v6(ip: Ipv6Addr) -> Option<&'static str> {
    let first = ip.segments()[0];
    Some(if ip.is_loopback() {
        "loopback"
    } else if ip.is_unspecified() {
        "unspecified"
    } else if first & 0xfe00 == 0xfc00 {
        "unique-local (private)"
    } else if first & 0xffc0 == 0xfe80 {
        "link-local"
    } else if first & 0xffc0 == 0xfec0 {
        "site-local (private)"
    } else if ip.is_multicast() {
        "multicast"
    } else {
        return None;
    })
}

/// The IPv4 address an IPv6 address stands for, if it is one of the forms that do.
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    if let Some(v4) = ip.to_ipv4_mapped() {
        return Some(v4);
    }
    let s = ip.segments();
    let low = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
    // `::a.b.c.d` (deprecated "compatible"; `::` and `::1` are themselves) and NAT64.
    let compatible = s[..6] == [0; 6] && !ip.is_loopback() && !ip.is_unspecified();
    let nat64 = s[..6] == [0x64, 0xff9b, 0, 0, 0, 0];
    (compatible || nat64).then_some(low)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class(s: &str) -> Option<&'static str> {
        classify(s.parse().unwrap(), &[])
    }

    #[test]
    fn every_non_public_class_is_refused() {
        for (addr, want) in [
            ("127.0.0.1", "loopback"),
            ("127.255.0.9", "loopback"),
            ("::1", "loopback"),
            ("10.1.2.3", "private"),
            ("172.16.0.1", "private"),
            ("172.31.255.255", "private"),
            ("192.168.1.1", "private"),
            ("fd00::5", "unique-local (private)"),
            ("fc00::1", "unique-local (private)"),
            ("fec0::1", "site-local (private)"),
            ("169.254.169.254", "link-local"),
            ("fe80::1", "link-local"),
            ("100.64.0.1", "carrier-grade NAT"),
            ("100.127.255.254", "carrier-grade NAT"),
            ("0.0.0.0", "unspecified"),
            ("0.1.2.3", "unspecified"),
            ("::", "unspecified"),
            ("224.0.0.1", "multicast"),
            ("ff02::1", "multicast"),
            ("255.255.255.255", "reserved"),
            ("240.0.0.1", "reserved"),
        ] {
            assert_eq!(class(addr), Some(want), "{addr}");
        }
    }

    #[test]
    fn ipv6_forms_of_ipv4_are_judged_by_their_ipv4() {
        for (addr, want) in [
            ("::ffff:127.0.0.1", "loopback"),
            ("::ffff:10.0.0.1", "private"),
            ("::ffff:169.254.169.254", "link-local"),
            ("::ffff:100.64.0.1", "carrier-grade NAT"),
            ("::ffff:0.0.0.0", "unspecified"),
            ("::127.0.0.1", "loopback"),
            ("64:ff9b::192.168.0.1", "private"),
        ] {
            assert_eq!(class(addr), Some(want), "{addr}");
        }
        assert_eq!(class("::ffff:8.8.8.8"), None);
        assert_eq!(class("64:ff9b::8.8.8.8"), None);
    }

    #[test]
    fn public_addresses_pass_and_the_hosts_own_do_not() {
        for addr in [
            "8.8.8.8",
            "1.1.1.1",
            "172.32.0.1",
            "100.128.0.1",
            "2606:4700::1111",
        ] {
            assert_eq!(class(addr), None, "{addr}");
        }
        let own: Vec<IpAddr> = vec!["203.0.113.7".parse().unwrap()];
        assert_eq!(
            classify("203.0.113.7".parse().unwrap(), &own),
            Some("host's own")
        );
        assert_eq!(
            classify("::ffff:203.0.113.7".parse().unwrap(), &own),
            Some("host's own")
        );
        assert_eq!(classify("203.0.113.8".parse().unwrap(), &own), None);
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_allowlist_is_by_host_and_port() {
        let p = PrivateRegistries::only(
            " registry.internal:5000, 127.0.0.1:5000 ,[FD00::5]:443,,REG.lan:80",
        )
        .unwrap();
        let lo = [sa("127.0.0.1:5000")];
        // By name: whatever the name resolves to.
        assert_eq!(p.filter("registry.internal", 5000, &lo), Ok(lo.to_vec()));
        assert_eq!(
            p.filter("reg.LAN", 80, &[sa("10.0.0.1:80")]).unwrap().len(),
            1
        );
        // Another port of the same name is not listed.
        let err = p.filter("registry.internal", 5001, &[sa("127.0.0.1:5001")]);
        assert_eq!(err.unwrap_err().class, "loopback");
        // By address: that address and port, however it is named.
        assert_eq!(p.filter("127.0.0.1", 5000, &lo), Ok(lo.to_vec()));
        assert_eq!(p.filter("local.name", 5000, &lo), Ok(lo.to_vec()));
        assert!(p
            .filter("127.0.0.1", 8080, &[sa("127.0.0.1:8080")])
            .is_err());
        assert!(p.filter("[fd00::5]", 443, &[sa("[fd00::5]:443")]).is_ok());
        // Private answers are dropped, public ones kept (and connected to, pinned).
        let mixed = [sa("127.0.0.1:443"), sa("8.8.8.8:443")];
        assert_eq!(
            p.filter("evil.example", 443, &mixed),
            Ok(vec![sa("8.8.8.8:443")])
        );
        // The local CLI: anything.
        assert_eq!(PrivateRegistries::Any.filter("x", 1, &lo), Ok(lo.to_vec()));
        // An empty list allows no private address at all.
        let none = PrivateRegistries::only("").unwrap();
        assert!(none.filter("127.0.0.1", 5000, &lo).is_err());
    }

    #[test]
    fn malformed_allowlist_entries_are_errors() {
        for bad in [
            "registry.internal",
            "host:port",
            "::1:5000",
            "[::1]",
            "a/b:1",
            ":5000",
            "h:70000",
        ] {
            assert!(PrivateRegistries::only(bad).is_err(), "{bad}");
        }
    }
}
