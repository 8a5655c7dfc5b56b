//! Snapshots: a sandbox's memory and disk, kept until deleted, that new sandboxes
//! continue from ([`crate::SandboxCreateOptions::from_snapshot`]).

use std::time::{Duration, Instant};

use kiln_api::{
    ApiErrorCode, CreateSnapshot, SnapshotInfo, SnapshotPage, SnapshotStatus, UpdateSnapshot,
};
use reqwest::Method;

use crate::client::Client;
use crate::error::{Error, Result};

/// How often [`Snapshot::wait_until_ready`] looks.
pub const SNAPSHOT_POLL_INTERVAL: Duration = Duration::from_secs(1);

/// What [`crate::Sandbox::snapshot`] sends.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SnapshotOptions {
    /// A display name.
    pub name: Option<String>,
    /// A request repeated with the same key answers the first one's snapshot; the SDK
    /// makes one up when this is `None`, so that its own retries cannot take two.
    pub idempotency_key: Option<String>,
}

/// A snapshot of a sandbox.
///
/// ```no_run
/// use kiln_sdk::{Client, Sandbox, SandboxCreateOptions, SnapshotOptions};
///
/// # async fn demo() -> kiln_sdk::Result<()> {
/// let client = Client::from_env()?;
/// let sandbox = Sandbox::connect(&client, "7a3f2b8c-...").await?;
/// let snapshot = sandbox.snapshot(SnapshotOptions::default()).await?;
/// let fork = Sandbox::create(&client, SandboxCreateOptions::from_snapshot("fork", snapshot.id())).await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Snapshot {
    client: Client,
    info: SnapshotInfo,
}

impl Snapshot {
    pub(crate) fn new(client: &Client, info: SnapshotInfo) -> Self {
        Self {
            client: client.clone(),
            info,
        }
    }

    /// Takes a snapshot of sandbox `sandbox_id` (`POST /sandboxes/{id}/snapshot`); it may
    /// still be `creating` (see [`Snapshot::wait_until_ready`]).
    pub async fn take(client: &Client, sandbox_id: &str, options: SnapshotOptions) -> Result<Self> {
        let body = CreateSnapshot {
            kind: Some(kiln_api::snapshots::KIND_MEM_FS.to_owned()),
            name: options.name,
            idempotency_key: Some(options.idempotency_key.unwrap_or_else(idempotency_key)),
        };
        let req = client
            .api(Method::POST, &["sandboxes", sandbox_id, "snapshot"])
            .json(&body)
            .timeout(Some(client.lifecycle_timeout()));
        Ok(Self::new(client, client.json(req).await?))
    }

    /// A snapshot by id.
    pub async fn get(client: &Client, snapshot_id: &str) -> Result<Self> {
        let info = client
            .json(client.api(Method::GET, &["snapshots", snapshot_id]))
            .await?;
        Ok(Self::new(client, info))
    }

    /// The team's snapshots, or one sandbox's (also after it was deleted), newest first.
    pub async fn list(
        client: &Client,
        sandbox_id: Option<&str>,
        page: SnapshotPage,
    ) -> Result<Vec<SnapshotInfo>> {
        let q = page.to_query();
        let pairs: Vec<(&str, &str)> = q.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let segments: Vec<&str> = match sandbox_id {
            Some(id) => vec!["sandboxes", id, "snapshots"],
            None => vec!["snapshots"],
        };
        client
            .json(client.api(Method::GET, &segments).query(&pairs))
            .await
    }

    /// Deletes a snapshot by id. Already gone is fine; sandboxes created from it are not
    /// affected.
    pub async fn delete_by_id(client: &Client, snapshot_id: &str) -> Result<()> {
        let req = client.api(Method::DELETE, &["snapshots", snapshot_id]);
        match client.empty(req).await {
            Err(Error::NotFound { code, .. }) if code == ApiErrorCode::NotFound.as_str() => Ok(()),
            other => other,
        }
    }

    /// Its id.
    pub fn id(&self) -> &str {
        &self.info.id
    }

    /// What was last learnt about it (refresh with [`Snapshot::get_info`]).
    pub fn info(&self) -> &SnapshotInfo {
        &self.info
    }

    /// Fetches its current state (and remembers it).
    pub async fn get_info(&mut self) -> Result<&SnapshotInfo> {
        self.info = Self::get(&self.client, &self.info.id).await?.info;
        Ok(&self.info)
    }

    /// Renames it (`PATCH /snapshots/{id}`).
    pub async fn rename(&mut self, name: impl Into<String>) -> Result<&SnapshotInfo> {
        let req = self
            .client
            .api(Method::PATCH, &["snapshots", &self.info.id])
            .json(&UpdateSnapshot { name: name.into() });
        self.info = self.client.json(req).await?;
        Ok(&self.info)
    }

    /// Deletes it. Already gone is fine.
    pub async fn delete(&self) -> Result<()> {
        Self::delete_by_id(&self.client, &self.info.id).await
    }

    /// Waits until it is `ready`: an error when it failed or was deleted, a
    /// [`Error::Timeout`] when it is still `creating` after the client's lifecycle
    /// timeout.
    pub async fn wait_until_ready(&mut self) -> Result<&SnapshotInfo> {
        let deadline = Instant::now() + self.client.lifecycle_timeout();
        loop {
            match self.info.status {
                SnapshotStatus::Ready => return Ok(&self.info),
                SnapshotStatus::Creating => {}
                status => {
                    return Err(Error::Conflict {
                        code: ApiErrorCode::Conflict.as_str().into(),
                        message: format!(
                            "snapshot {} is {status}: {}",
                            self.info.id,
                            self.info
                                .error_message
                                .as_deref()
                                .unwrap_or("it will not be ready")
                        ),
                    })
                }
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    message: format!("snapshot {} is still creating", self.info.id),
                });
            }
            tokio::time::sleep(SNAPSHOT_POLL_INTERVAL).await;
            self.get_info().await?;
        }
    }
}

/// A fresh idempotency key (a random UUID, as the official SDKs make one).
fn idempotency_key() -> String {
    uuid::Uuid::new_v4().to_string()
}
