//! Snapshots of sandboxes (`POST /sandboxes/{id}/snapshot`, `/snapshots`): a running
//! sandbox's memory and disk, kept by the team until deleted, that new sandboxes start
//! from (`from_snapshot` on create).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::request::{parse_count, RequestError};
use crate::sandboxes::MAX_NAME;
use crate::status::SnapshotStatus;

/// The one kind of snapshot: memory and disk.
pub const KIND_MEM_FS: &str = "mem+fs";
/// Longest idempotency key accepted.
pub const MAX_IDEMPOTENCY_KEY: usize = 255;

/// The shape a sandbox created from a snapshot gets (the SDK's `SnapshotResources`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotResources {
    /// Virtual CPUs.
    #[serde(default)]
    pub vcpu_count: u32,
    /// Memory, MiB.
    #[serde(default)]
    pub memory_mib: u32,
    /// Disk, MiB.
    #[serde(default)]
    pub disk_mib: u32,
}

/// A snapshot, as `GET /snapshots/{id}` answers (the SDK's `SnapshotInfo`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    /// Its id.
    pub id: String,
    /// The sandbox it was taken from (which may have been deleted since).
    pub sandbox_id: String,
    /// The template that sandbox was created from.
    #[serde(default)]
    pub template_id: Option<String>,
    /// What it holds: `mem+fs`.
    #[serde(default = "mem_fs")]
    pub kind: String,
    /// Where it is.
    pub status: SnapshotStatus,
    /// Its display name, if it was given one.
    #[serde(default)]
    pub name: Option<String>,
    /// Bytes it takes on disk (what it adds to its template's artifact); 0 until ready.
    #[serde(default)]
    pub size_bytes: u64,
    /// The shape of sandboxes created from it.
    #[serde(default)]
    pub resources: SnapshotResources,
    /// When it was asked for.
    #[serde(with = "crate::time")]
    pub created_at: DateTime<Utc>,
    /// When it became ready.
    #[serde(default, with = "crate::time::option")]
    pub ready_at: Option<DateTime<Utc>>,
    /// `snapshot_failed: <detail>` when it failed (kiln's; the SDK ignores it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_message: Option<String>,
}

fn mem_fs() -> String {
    KIND_MEM_FS.to_owned()
}

/// `POST /sandboxes/{id}/snapshot`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateSnapshot {
    /// `mem+fs` (the default, and the only kind).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// A display name, 1-255 bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// A request repeated with the same key (for the same sandbox) answers the snapshot
    /// the first one made instead of taking another.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
}

impl CreateSnapshot {
    /// Checks the kind, the name and the key.
    pub fn validate(&self) -> Result<(), RequestError> {
        if let Some(kind) = self.kind.as_deref().filter(|k| *k != KIND_MEM_FS) {
            return Err(RequestError::invalid(format!(
                "kind: {kind:?} is not a snapshot kind (only {KIND_MEM_FS:?})"
            )));
        }
        if let Some(name) = &self.name {
            check_name(name)?;
        }
        if self
            .idempotency_key
            .as_ref()
            .is_some_and(|k| k.is_empty() || k.len() > MAX_IDEMPOTENCY_KEY)
        {
            return Err(RequestError::invalid(format!(
                "idempotency_key: must be 1-{MAX_IDEMPOTENCY_KEY} bytes"
            )));
        }
        Ok(())
    }
}

/// `PATCH /snapshots/{id}`: renames it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateSnapshot {
    /// The new name, 1-255 bytes.
    pub name: String,
}

impl UpdateSnapshot {
    /// Checks the name.
    pub fn validate(&self) -> Result<(), RequestError> {
        check_name(&self.name)
    }
}

fn check_name(name: &str) -> Result<(), RequestError> {
    if name.is_empty() || name.len() > MAX_NAME {
        return Err(RequestError::invalid(format!(
            "name: must be 1-{MAX_NAME} bytes"
        )));
    }
    Ok(())
}

/// `GET /snapshots` and `GET /sandboxes/{id}/snapshots`: a page, newest first.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SnapshotPage {
    /// Page size; `None` means no limit.
    pub limit: Option<u32>,
    /// Rows to skip.
    pub offset: u32,
}

impl SnapshotPage {
    /// Parses `limit` and `offset`; other parameters are refused.
    pub fn from_query(pairs: &[(String, String)]) -> Result<Self, RequestError> {
        let mut page = Self::default();
        for (key, value) in pairs {
            match key.as_str() {
                "limit" => page.limit = Some(parse_count(key, value)?),
                "offset" => page.offset = parse_count(key, value)?,
                other => {
                    return Err(RequestError::invalid(format!(
                        "unknown query parameter {other:?}"
                    )))
                }
            }
        }
        Ok(page)
    }

    /// The query string's pairs (the inverse of [`SnapshotPage::from_query`]).
    pub fn to_query(&self) -> Vec<(String, String)> {
        let mut q = Vec::new();
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
    fn info_reads_as_the_sdk_writes_it() {
        let v = serde_json::json!({
            "id": "s1", "sandbox_id": "b1", "status": "creating",
            "created_at": "2026-12-04T16:00:00Z",
        });
        let info: SnapshotInfo = serde_json::from_value(v).unwrap();
        assert_eq!(info.kind, "mem+fs");
        assert_eq!(info.status, SnapshotStatus::Creating);
        let back = serde_json::to_value(&info).unwrap();
        assert_eq!(back["created_at"], "2026-12-04T16:00:00.000000+00:00");
        assert_eq!(back["ready_at"], serde_json::Value::Null);
        assert_eq!(
            back["resources"],
            serde_json::json!({"vcpu_count": 0, "memory_mib": 0, "disk_mib": 0})
        );
        assert!(back.get("error_message").is_none());
    }

    #[test]
    fn create_checks_kind_name_and_key() {
        // What the SDK sends.
        let req: CreateSnapshot = serde_json::from_value(serde_json::json!({
            "kind": "mem+fs", "idempotency_key": "k-1", "name": "before-upgrade"
        }))
        .unwrap();
        req.validate().unwrap();
        for bad in [
            serde_json::json!({"kind": "fs"}),
            serde_json::json!({"name": ""}),
            serde_json::json!({"idempotency_key": ""}),
        ] {
            let req: CreateSnapshot = serde_json::from_value(bad.clone()).unwrap();
            assert!(req.validate().is_err(), "{bad}");
        }
        assert!(serde_json::from_value::<CreateSnapshot>(serde_json::json!({"x": 1})).is_err());
        assert!(UpdateSnapshot {
            name: String::new()
        }
        .validate()
        .is_err());
    }

    #[test]
    fn page_round_trips() {
        let p = SnapshotPage::from_query(&crate::request::query_pairs("limit=2&offset=3")).unwrap();
        assert_eq!((p.limit, p.offset), (Some(2), 3));
        assert_eq!(SnapshotPage::from_query(&p.to_query()).unwrap(), p);
        assert!(SnapshotPage::from_query(&[("status".into(), "ready".into())]).is_err());
    }
}
