//! Sandboxes (`/sandboxes`): what the API says about them and what it accepts.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Deserializer, Serialize};

use crate::network::NetworkConfig;
use crate::preview::PreviewAccess;
use crate::request::{parse_count, RequestError};
use crate::secrets::{check_env_key, check_secret_name, SandboxSecretBinding};
use crate::status::SandboxStatus;

/// Longest sandbox name, metadata or env key or value accepted.
pub const MAX_FIELD: usize = 4096;
/// Most metadata or env entries accepted.
pub const MAX_ENTRIES: usize = 256;
/// Longest sandbox name.
pub const MAX_NAME: usize = 255;
/// Longest auto-delete window: 30 days (Superserve's bound).
pub const MAX_AUTO_DELETE_SECONDS: u64 = 30 * 24 * 3600;
/// Longest auto-pause timeout accepted (the same 30 days).
pub const MAX_TIMEOUT_SECONDS: u64 = MAX_AUTO_DELETE_SECONDS;

/// A sandbox, as `GET /sandboxes/{id}` answers (the SDK's `SandboxInfo`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxInfo {
    /// Its id.
    pub id: String,
    /// Its display name.
    pub name: String,
    /// Where it is.
    pub status: SandboxStatus,
    /// Virtual CPUs.
    #[serde(default)]
    pub vcpu_count: u32,
    /// Memory, MiB.
    #[serde(default)]
    pub memory_mib: u32,
    /// When it was created.
    #[serde(with = "crate::time")]
    pub created_at: DateTime<Utc>,
    /// When its status or fields last changed.
    #[serde(default, with = "crate::time::option")]
    pub updated_at: Option<DateTime<Utc>>,
    /// Its template.
    #[serde(default)]
    pub template_id: Option<String>,
    /// The build whose artifact it was restored from.
    #[serde(default)]
    pub build_id: Option<String>,
    /// Its tags.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// Auto-pause: paused after this much active time (each resume starts a fresh
    /// window).
    #[serde(default)]
    pub timeout_seconds: Option<u64>,
    /// Auto-delete: deleted after this long continuously paused.
    #[serde(default)]
    pub auto_delete_seconds: Option<u64>,
    /// When it will be deleted: set while it is paused with `auto_delete_seconds`.
    #[serde(default, with = "crate::time::option")]
    pub auto_delete_at: Option<DateTime<Utc>>,
    /// The snapshot it was created from, when it was.
    #[serde(default)]
    pub source_snapshot_id: Option<String>,
    /// Its egress rules, when any were set.
    #[serde(default)]
    pub network: Option<NetworkConfig>,
    /// Which of its ports preview URLs serve, and how (absent from an older server:
    /// `legacy_public`, as the SDKs read it).
    #[serde(default = "legacy_public")]
    pub preview_access: PreviewAccess,
    /// The team secrets bound to it, when any are.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secrets: Option<Vec<SandboxSecretBinding>>,
}

fn legacy_public() -> PreviewAccess {
    PreviewAccess::LegacyPublic
}

/// What create, resume and activate answer: the sandbox and the token that opens its data
/// plane (shown in these answers only; it rotates on resume).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxWithToken {
    /// The sandbox.
    #[serde(flatten)]
    pub sandbox: SandboxInfo,
    /// Its current access token.
    #[serde(default)]
    pub access_token: String,
}

/// `POST /sandboxes`. The SDKs' optional fields that kiln does not implement are accepted
/// as JSON and refused by name ([`CreateSandbox::validate`]) rather than ignored.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateSandbox {
    /// Display name, 1-255 bytes.
    pub name: String,
    /// Template id or name; it must have a ready build. With neither this nor
    /// `from_snapshot`, the system template [`crate::templates::DEFAULT_TEMPLATE`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_template: Option<String>,
    /// A ready snapshot's id: the new sandbox continues from it, processes live.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_snapshot: Option<String>,
    /// Auto-pause after this many seconds of active time (1 to 30 days).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<u64>,
    /// Auto-delete after this many seconds continuously paused (0, at once, to 30 days).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_delete_seconds: Option<u64>,
    /// Tags, filterable in listings.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
    /// Environment of every process, over the template's runtime defaults.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env_vars: BTreeMap<String, String>,
    /// Egress rules from the start (none: the public internet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkConfig>,
    /// Team secrets to bind, environment variable -> secret name: each variable holds a
    /// stand-in that the egress proxy swaps for the secret on the secret's hosts.
    #[serde(
        default,
        deserialize_with = "null_as_empty",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub secrets: BTreeMap<String, String>,
    /// Its preview policy, `public` or `private` (none: `public`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preview_access: Option<PreviewAccess>,
}

impl CreateSandbox {
    /// A request for a sandbox of `template` named `name`, nothing else set.
    pub fn new(name: impl Into<String>, template: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            from_template: Some(template.into()),
            ..Self::default()
        }
    }

    /// A request for a sandbox that continues from snapshot `snapshot_id`.
    pub fn from_snapshot(name: impl Into<String>, snapshot_id: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            from_snapshot: Some(snapshot_id.into()),
            ..Self::default()
        }
    }

    /// Checks everything that does not need the store: the preview policy, the name, where
    /// it starts from, the timers, metadata and env sizes. Egress rules are checked where
    /// they are compiled (the engine).
    pub fn validate(&self) -> Result<(), RequestError> {
        if let Some(a) = self.preview_access {
            a.check_choice()?;
        }
        match (&self.from_template, &self.from_snapshot) {
            (Some(_), Some(_)) => {
                return Err(RequestError::invalid(
                    "from_template, from_snapshot: give one (a snapshot brings its template)",
                ))
            }
            (Some(t), None) if t.is_empty() => {
                return Err(RequestError::invalid("from_template: must not be empty"))
            }
            (None, Some(s)) if s.is_empty() => {
                return Err(RequestError::invalid("from_snapshot: must not be empty"))
            }
            _ => {}
        }
        if self.name.is_empty() || self.name.len() > MAX_NAME {
            return Err(RequestError::invalid(format!(
                "name: must be 1-{MAX_NAME} bytes"
            )));
        }
        check_timers(self.timeout_seconds, self.auto_delete_seconds)?;
        check_map("metadata", &self.metadata)?;
        check_map("env_vars", &self.env_vars)?;
        check_map("secrets", &self.secrets)?;
        for (key, name) in &self.secrets {
            check_env_key(key).map_err(|e| RequestError::invalid(format!("secrets: {e}")))?;
            check_secret_name(name)
                .map_err(|e| RequestError::invalid(format!("secrets.{key}: {e}")))?;
            if self.env_vars.contains_key(key) {
                return Err(RequestError::invalid(format!(
                    "secrets.{key}: also set in env_vars; a variable holds one or the other"
                )));
            }
        }
        Ok(())
    }
}

/// Auto-pause needs at least a second; auto-delete may be 0 (at once); both at most 30
/// days.
fn check_timers(timeout: Option<u64>, auto_delete: Option<u64>) -> Result<(), RequestError> {
    if timeout.is_some_and(|t| t == 0 || t > MAX_TIMEOUT_SECONDS) {
        return Err(RequestError::invalid(format!(
            "timeout_seconds: must be 1-{MAX_TIMEOUT_SECONDS} (null turns auto-pause off)"
        )));
    }
    if auto_delete.is_some_and(|d| d > MAX_AUTO_DELETE_SECONDS) {
        return Err(RequestError::invalid(format!(
            "auto_delete_seconds: must be 0-{MAX_AUTO_DELETE_SECONDS} (null turns auto-delete off)"
        )));
    }
    Ok(())
}

/// `null` is the SDKs' "unset".
fn null_as_empty<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
    Ok(Option::<BTreeMap<String, String>>::deserialize(d)?.unwrap_or_default())
}

/// `PATCH /sandboxes/{id}`: absent fields are left as they are.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateSandbox {
    /// Replaces the tags.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<BTreeMap<String, String>>,
    /// Egress rules: absent leaves them, `null` clears them, an object replaces them.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub network: Option<Option<NetworkConfig>>,
    /// Auto-pause: absent leaves it, `null` turns it off, a number sets it (a running
    /// sandbox's window starts now).
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub timeout_seconds: Option<Option<u64>>,
    /// Auto-delete: absent leaves it, `null` turns it off, a number sets it (a paused
    /// sandbox's countdown starts now).
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub auto_delete_seconds: Option<Option<u64>>,
    /// A new preview policy, `public` or `private`; published ports keep their access
    /// (moving away from `legacy_public` closes every unpublished port at once).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preview_access: Option<PreviewAccess>,
}

impl UpdateSandbox {
    /// See [`CreateSandbox::validate`].
    pub fn validate(&self) -> Result<(), RequestError> {
        if let Some(a) = self.preview_access {
            a.check_choice()?;
        }
        check_timers(
            self.timeout_seconds.flatten(),
            self.auto_delete_seconds.flatten(),
        )?;
        if let Some(m) = &self.metadata {
            check_map("metadata", m)?;
        }
        Ok(())
    }
}

/// A field that is present (even as `null`) is `Some`; with `#[serde(default)]` an absent
/// one is `None`.
fn present<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

fn check_map(what: &str, map: &BTreeMap<String, String>) -> Result<(), RequestError> {
    if map.len() > MAX_ENTRIES {
        return Err(RequestError::invalid(format!(
            "{what}: at most {MAX_ENTRIES} entries"
        )));
    }
    if map
        .iter()
        .any(|(k, v)| k.is_empty() || k.len() > MAX_FIELD || v.len() > MAX_FIELD)
    {
        return Err(RequestError::invalid(format!(
            "{what}: keys must be 1-{MAX_FIELD} bytes and values at most {MAX_FIELD}"
        )));
    }
    Ok(())
}

/// `GET /sandboxes` filters: `metadata.<key>=<value>` (all must match), `status=a,b` (any;
/// also repeated), `limit`, `offset`. Also the store's filter.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SandboxFilter {
    /// Every pair must be present in the sandbox's metadata.
    pub metadata: BTreeMap<String, String>,
    /// Only these statuses; `None` means every status except `deleted`.
    pub statuses: Option<Vec<SandboxStatus>>,
    /// Page size; `None` means no limit.
    pub limit: Option<u32>,
    /// Rows to skip.
    pub offset: u32,
}

impl SandboxFilter {
    /// Only sandboxes in these statuses.
    pub fn with_statuses(statuses: Vec<SandboxStatus>) -> Self {
        Self {
            statuses: Some(statuses),
            ..Self::default()
        }
    }

    /// Parses the query string's pairs; unknown parameters are refused.
    pub fn from_query(pairs: &[(String, String)]) -> Result<Self, RequestError> {
        let mut filter = Self::default();
        for (key, value) in pairs {
            if let Some(k) = key.strip_prefix("metadata.") {
                filter.metadata.insert(k.to_owned(), value.clone());
                continue;
            }
            match key.as_str() {
                "status" => {
                    for s in value.split(',') {
                        let status = s.trim().parse::<SandboxStatus>().map_err(|_| {
                            RequestError::invalid(format!("status: unknown status {s:?}"))
                        })?;
                        filter.statuses.get_or_insert_with(Vec::new).push(status);
                    }
                }
                "limit" => filter.limit = Some(parse_count(key, value)?),
                "offset" => filter.offset = parse_count(key, value)?,
                other => {
                    return Err(RequestError::invalid(format!(
                        "unknown query parameter {other:?}"
                    )))
                }
            }
        }
        Ok(filter)
    }

    /// The query string's pairs (the inverse of [`SandboxFilter::from_query`]).
    pub fn to_query(&self) -> Vec<(String, String)> {
        let mut q: Vec<(String, String)> = self
            .metadata
            .iter()
            .map(|(k, v)| (format!("metadata.{k}"), v.clone()))
            .collect();
        if let Some(statuses) = self.statuses.as_ref().filter(|s| !s.is_empty()) {
            let s: Vec<&str> = statuses.iter().map(|s| s.as_str()).collect();
            q.push(("status".into(), s.join(",")));
        }
        if let Some(n) = self.limit {
            q.push(("limit".into(), n.to_string()));
        }
        if self.offset > 0 {
            q.push(("offset".into(), self.offset.to_string()));
        }
        q
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preview_access_is_public_or_private() {
        let req: CreateSandbox = serde_json::from_value(
            serde_json::json!({"name": "a", "from_template": "t", "preview_access": "private"}),
        )
        .unwrap();
        assert_eq!(req.preview_access, Some(PreviewAccess::Private));
        req.validate().unwrap();
        for bad in ["legacy_public", "open"] {
            let req: CreateSandbox = serde_json::from_value(
                serde_json::json!({"name": "a", "from_template": "t", "preview_access": bad}),
            )
            .unwrap();
            assert!(req
                .validate()
                .unwrap_err()
                .message
                .starts_with("preview_access:"));
            let upd: UpdateSandbox =
                serde_json::from_value(serde_json::json!({ "preview_access": bad })).unwrap();
            assert!(upd.validate().is_err());
        }
        // `null` is the SDKs' "unset".
        let null: CreateSandbox = serde_json::from_value(
            serde_json::json!({"name": "a", "from_template": "t", "preview_access": null}),
        )
        .unwrap();
        assert_eq!(null.preview_access, None);
        // An older server's info has no policy: the SDKs read `legacy_public`.
        let info: SandboxInfo = serde_json::from_value(serde_json::json!({
            "id": "x", "name": "x", "status": "active",
            "created_at": "2026-01-01T00:00:00Z"
        }))
        .unwrap();
        assert_eq!(info.preview_access, PreviewAccess::LegacyPublic);
    }

    #[test]
    fn create_checks_name_origin_and_maps() {
        assert!(CreateSandbox::new("", "t").validate().is_err());
        assert!(CreateSandbox::new("a", "").validate().is_err());
        // No template: the default one.
        CreateSandbox {
            name: "a".into(),
            ..CreateSandbox::default()
        }
        .validate()
        .unwrap();
        CreateSandbox::from_snapshot("a", "snap")
            .validate()
            .unwrap();
        let mut both = CreateSandbox::from_snapshot("a", "snap");
        both.from_template = Some("t".into());
        assert!(both
            .validate()
            .unwrap_err()
            .message
            .starts_with("from_template, from_snapshot"));
        let mut req = CreateSandbox::new("a", "t");
        req.env_vars.insert(String::new(), "v".into());
        assert!(req.validate().unwrap_err().message.starts_with("env_vars:"));
        let err =
            serde_json::from_value::<CreateSandbox>(serde_json::json!({"name": "a", "nope": 1}))
                .unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
    }

    #[test]
    fn timers_accept_a_second_up_and_auto_delete_zero() {
        let req: CreateSandbox = serde_json::from_value(serde_json::json!({
            "name": "a", "timeout_seconds": 1, "auto_delete_seconds": 0
        }))
        .unwrap();
        req.validate().unwrap();
        for (t, d) in [(Some(0), None), (None, Some(MAX_AUTO_DELETE_SECONDS + 1))] {
            let req = CreateSandbox {
                timeout_seconds: t,
                auto_delete_seconds: d,
                ..CreateSandbox::new("a", "t")
            };
            assert!(req.validate().is_err(), "{t:?} {d:?}");
        }
        // The SDK's update body: null clears, absent leaves.
        let u: UpdateSandbox = serde_json::from_value(
            serde_json::json!({"timeout_seconds": null, "auto_delete_seconds": 30}),
        )
        .unwrap();
        assert_eq!(
            (u.timeout_seconds, u.auto_delete_seconds),
            (Some(None), Some(Some(30)))
        );
        u.validate().unwrap();
        let absent: UpdateSandbox = serde_json::from_str("{}").unwrap();
        assert_eq!(
            (absent.timeout_seconds, absent.auto_delete_seconds),
            (None, None)
        );
        let zero: UpdateSandbox = serde_json::from_str(r#"{"timeout_seconds": 0}"#).unwrap();
        assert!(zero.validate().is_err());
    }

    #[test]
    fn secrets_bind_shell_names_to_secret_names() {
        let req: CreateSandbox = serde_json::from_value(serde_json::json!({
            "name": "a", "from_template": "t", "secrets": {"OPENAI_API_KEY": "openai-prod"}
        }))
        .unwrap();
        req.validate().unwrap();
        assert_eq!(req.secrets["OPENAI_API_KEY"], "openai-prod");
        let null: CreateSandbox =
            serde_json::from_value(serde_json::json!({"name": "a", "secrets": null})).unwrap();
        assert!(null.secrets.is_empty());
        for (secrets, env, said) in [
            (("1BAD", "s"), None, "secrets: env key"),
            (("K", "a/b"), None, "secrets.K: name"),
            (("K", "s"), Some("K"), "secrets.K: also set in env_vars"),
        ] {
            let mut req = CreateSandbox::new("a", "t");
            req.secrets.insert(secrets.0.into(), secrets.1.into());
            if let Some(k) = env {
                req.env_vars.insert(k.into(), "v".into());
            }
            let err = req.validate().unwrap_err();
            assert!(err.message.starts_with(said), "{}", err.message);
        }
    }

    #[test]
    fn update_tells_null_network_from_absent() {
        let absent: UpdateSandbox = serde_json::from_str("{}").unwrap();
        assert_eq!(absent.network, None);
        let cleared: UpdateSandbox = serde_json::from_str(r#"{"network": null}"#).unwrap();
        assert_eq!(cleared.network, Some(None));
        let set: UpdateSandbox =
            serde_json::from_str(r#"{"network": {"deny_out": ["0.0.0.0/0"]}}"#).unwrap();
        assert_eq!(set.network.unwrap().unwrap().deny_out, ["0.0.0.0/0"]);
    }

    #[test]
    fn filter_round_trips_through_the_query() {
        let pairs = crate::request::query_pairs(
            "metadata.env=prod&status=active,paused&status=failed&limit=5&offset=2",
        );
        let f = SandboxFilter::from_query(&pairs).unwrap();
        assert_eq!(f.metadata["env"], "prod");
        assert_eq!(
            f.statuses.as_deref().unwrap(),
            [
                SandboxStatus::Active,
                SandboxStatus::Paused,
                SandboxStatus::Failed
            ]
        );
        assert_eq!((f.limit, f.offset), (Some(5), 2));
        assert_eq!(SandboxFilter::from_query(&f.to_query()).unwrap(), f);
        assert!(SandboxFilter::from_query(&[("status".into(), "bogus".into())]).is_err());
        assert!(SandboxFilter::from_query(&[("colour".into(), "red".into())]).is_err());
        assert!(SandboxFilter::from_query(&[("limit".into(), "-1".into())]).is_err());
    }
}
