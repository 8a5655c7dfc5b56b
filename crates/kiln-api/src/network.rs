//! Egress rules and the network log of a sandbox (`network` on create and update,
//! `GET /sandboxes/{id}/network`).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Deserializer, Serialize};

use crate::request::{parse_count, RequestError};

/// Egress rules of a sandbox as the SDKs send them (either list may be missing or
/// `null`). Whatever they say, the host, its loopback, link-local (cloud metadata) and
/// private ranges stay unreachable; an allow that overlaps a deny wins.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkConfig {
    /// CIDRs, addresses and domains (`*.example.com`: subdomains at any depth, not the
    /// apex) that may be reached even where `deny_out` covers them.
    #[serde(default, deserialize_with = "null_as_empty")]
    pub allow_out: Vec<String>,
    /// CIDRs and addresses that may not be reached (`0.0.0.0/0` for an allowlist).
    #[serde(default, deserialize_with = "null_as_empty")]
    pub deny_out: Vec<String>,
}

fn null_as_empty<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    Ok(Option::<Vec<String>>::deserialize(d)?.unwrap_or_default())
}

/// What the egress proxy did with a connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NetworkVerdict {
    /// Connected.
    #[default]
    Allowed,
    /// Refused by a rule (or by the walls around the host).
    Blocked,
    /// Could not be served (a bad request, an unreachable destination).
    Failed,
}

/// One row of a sandbox's network log (the SDK's `NetworkEvent`): `kind: connection` for
/// every connection through the egress proxy; `kind: request` for every request the proxy
/// put a secret into (or refused for carrying a revoked stand-in), with its method, path,
/// status and secret, and (with `direction: inbound`) for every request that reached the
/// sandbox through a preview URL.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkEvent {
    /// `connection` or `request`.
    pub kind: String,
    /// Orders the log; pass the last one of a page as `before` for the next page.
    #[serde(default)]
    pub id: i64,
    /// When the connection ended, or the request was answered.
    #[serde(with = "crate::time")]
    pub ts: DateTime<Utc>,
    /// The destination host as the guest named it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// The address connected to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dst_ip: Option<String>,
    /// The destination port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dst_port: Option<u16>,
    /// What happened.
    pub verdict: NetworkVerdict,
    /// Why it was refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub match_rule: Option<String>,
    /// A connection: the HTTP status the proxy refused with. A request: why the proxy
    /// answered it itself (`secret_revoked`, `upstream_failed`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_code: Option<String>,
    /// Bytes from the guest.
    #[serde(default)]
    pub bytes_sent: u64,
    /// Bytes to the guest.
    #[serde(default)]
    pub bytes_recv: u64,
    /// `inbound` for requests that came into the sandbox through a preview URL (kiln's
    /// addition); absent for its own outgoing traffic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direction: Option<String>,
    /// A request's method.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// A request's path, without the query.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// A request's response status (what the guest got, or what the sandbox answered an
    /// inbound request with).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// The status the upstream answered a request with, when it was reached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_status: Option<u16>,
    /// From a request to its response head, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<u64>,
    /// The secret put into a request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_id: Option<String>,
}

/// Where a page of the network log ends (`before=`): a page's `next_cursor`, or a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Before {
    /// Events older than this one (by id).
    Event(i64),
    /// Events before this time.
    Time(DateTime<Utc>),
}

impl Before {
    /// An event id (what `next_cursor` holds) or an RFC 3339 time, as the SDKs'
    /// `get_network_log(before=...)` documents both.
    pub fn parse(value: &str) -> Result<Self, RequestError> {
        if let Ok(id) = value.parse() {
            return Ok(Self::Event(id));
        }
        crate::time::parse(value)
            .map(Self::Time)
            .map_err(|_| RequestError::invalid("before: must be a next_cursor or an RFC 3339 time"))
    }

    fn admits(&self, e: &NetworkEvent) -> bool {
        match self {
            Self::Event(id) => e.id < *id,
            Self::Time(t) => e.ts < *t,
        }
    }

    /// The query value.
    pub fn to_query(&self) -> String {
        match self {
            Self::Event(id) => id.to_string(),
            Self::Time(t) => crate::time::format(t),
        }
    }
}

/// The `direction` of a request that came in through a preview URL.
pub const INBOUND: &str = "inbound";

/// `GET /sandboxes/{id}/network` filters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetworkLogQuery {
    /// Page size, 1-[`NetworkLogQuery::MAX_PAGE`] (default 100).
    pub limit: usize,
    /// Only events older than this (the previous page's `next_cursor`, or a time).
    pub before: Option<Before>,
    /// Only events at or after this time.
    pub since: Option<DateTime<Utc>>,
    /// Only events with this verdict.
    pub verdict: Option<NetworkVerdict>,
}

impl NetworkLogQuery {
    /// Most events in one page.
    pub const MAX_PAGE: usize = 1000;
    /// Events in a page when `limit` is not given.
    pub const DEFAULT_PAGE: usize = 100;

    /// Parses the query string's pairs; unknown parameters are refused.
    pub fn from_query(pairs: &[(String, String)]) -> Result<Self, RequestError> {
        let mut q = Self {
            limit: Self::DEFAULT_PAGE,
            ..Self::default()
        };
        for (key, value) in pairs {
            match key.as_str() {
                "limit" => q.limit = parse_count::<usize>(key, value)?.clamp(1, Self::MAX_PAGE),
                "before" => q.before = Some(Before::parse(value)?),
                "since" => {
                    q.since =
                        Some(crate::time::parse(value).map_err(|_| {
                            RequestError::invalid("since: must be an RFC 3339 time")
                        })?)
                }
                "verdict" => {
                    q.verdict = Some(
                        serde_json::from_value(serde_json::Value::String(value.clone())).map_err(
                            |_| {
                                RequestError::invalid("verdict: must be allowed, blocked or failed")
                            },
                        )?,
                    )
                }
                other => {
                    return Err(RequestError::invalid(format!(
                        "unknown query parameter {other:?}"
                    )))
                }
            }
        }
        Ok(q)
    }

    /// Whether an event passes the filters (not the paging).
    pub fn matches(&self, e: &NetworkEvent) -> bool {
        self.before.is_none_or(|b| b.admits(e))
            && self.since.is_none_or(|s| e.ts >= s)
            && self.verdict.is_none_or(|v| e.verdict == v)
    }

    /// One page of `events` (newest first) under these filters.
    pub fn page(&self, events_newest_first: impl Iterator<Item = NetworkEvent>) -> NetworkLogPage {
        let mut data: Vec<NetworkEvent> = events_newest_first
            .filter(|e| self.matches(e))
            .take(self.limit + 1)
            .collect();
        let has_more = data.len() > self.limit;
        data.truncate(self.limit);
        let next_cursor = has_more
            .then(|| data.last().map(|e| e.id.to_string()))
            .flatten();
        NetworkLogPage {
            data,
            has_more,
            next_cursor,
        }
    }
}

/// A page of the network log, newest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkLogPage {
    /// The events.
    pub data: Vec<NetworkEvent>,
    /// Whether older events match too.
    pub has_more: bool,
    /// Pass as `before` for the next page; none when `has_more` is false.
    pub next_cursor: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(id: i64, verdict: NetworkVerdict) -> NetworkEvent {
        NetworkEvent {
            kind: "connection".into(),
            id,
            ts: DateTime::from_timestamp(1_700_000_000 + id, 0).unwrap(),
            host: Some("example.com".into()),
            dst_ip: None,
            dst_port: Some(443),
            verdict,
            ..NetworkEvent::default()
        }
    }

    #[test]
    fn pages_newest_first_with_a_cursor() {
        let log: Vec<_> = (1..=5)
            .rev()
            .map(|i| {
                event(
                    i,
                    if i % 2 == 0 {
                        NetworkVerdict::Blocked
                    } else {
                        NetworkVerdict::Allowed
                    },
                )
            })
            .collect();
        let q = NetworkLogQuery::from_query(&[("limit".into(), "2".into())]).unwrap();
        let p = q.page(log.clone().into_iter());
        assert_eq!(p.data.iter().map(|e| e.id).collect::<Vec<_>>(), [5, 4]);
        assert!(p.has_more);
        assert_eq!(p.next_cursor.as_deref(), Some("4"));
        let q = NetworkLogQuery::from_query(&[
            ("before".into(), "4".into()),
            ("verdict".into(), "allowed".into()),
        ])
        .unwrap();
        let p = q.page(log.into_iter());
        assert_eq!(p.data.iter().map(|e| e.id).collect::<Vec<_>>(), [3, 1]);
        assert!(!p.has_more && p.next_cursor.is_none());
        // A time works as `before` too: events strictly before it (ids 1 and 2 here).
        let at = crate::time::format(&DateTime::from_timestamp(1_700_000_003, 0).unwrap());
        let q = NetworkLogQuery::from_query(&[("before".into(), at)]).unwrap();
        let p = q.page(log_of(5).into_iter());
        assert_eq!(p.data.iter().map(|e| e.id).collect::<Vec<_>>(), [2, 1]);
    }

    fn log_of(n: i64) -> Vec<NetworkEvent> {
        (1..=n)
            .rev()
            .map(|i| event(i, NetworkVerdict::Allowed))
            .collect()
    }

    #[test]
    fn bad_filters_are_refused() {
        for (k, v) in [
            ("verdict", "maybe"),
            ("since", "yesterday"),
            ("before", "x"),
            ("x", "1"),
        ] {
            assert!(
                NetworkLogQuery::from_query(&[(k.into(), v.into())]).is_err(),
                "{k}={v}"
            );
        }
    }

    #[test]
    fn config_reads_null_lists() {
        let c: NetworkConfig = serde_json::from_str(r#"{"allow_out": null}"#).unwrap();
        assert_eq!(c, NetworkConfig::default());
    }
}
