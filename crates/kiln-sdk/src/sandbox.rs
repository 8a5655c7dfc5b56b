//! Sandboxes: restored template snapshots, with their commands and files.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use reqwest::Method;
use serde::{Deserialize, Serialize};

use crate::client::{Client, Request};
use crate::commands::Commands;
use crate::error::{Error, Result};
use crate::files::Files;

/// A sandbox's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum SandboxStatus {
    /// Being restored.
    Starting,
    /// Running.
    Active,
    /// Being snapshotted.
    Pausing,
    /// Saved; resumes on demand.
    Paused,
    /// Being restored from its pause.
    Resuming,
    /// In Superserve's enum; kiln never migrates.
    Migrating,
    /// Its VM failed.
    Failed,
    /// Deleted.
    Deleted,
    /// A status this SDK does not know.
    #[serde(other)]
    Unknown,
}

impl SandboxStatus {
    /// The wire name (`active`, `paused`...).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Starting => "starting",
            Self::Active => "active",
            Self::Pausing => "pausing",
            Self::Paused => "paused",
            Self::Resuming => "resuming",
            Self::Migrating => "migrating",
            Self::Failed => "failed",
            Self::Deleted => "deleted",
            Self::Unknown => "unknown",
        }
    }
}

/// A sandbox, as the API describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
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
    pub created_at: DateTime<Utc>,
    /// When it last changed.
    #[serde(default)]
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
    /// Superserve's auto-pause timeout (always none in kiln).
    #[serde(default)]
    pub timeout_seconds: Option<u64>,
    /// Superserve's auto-delete delay (always none in kiln).
    #[serde(default)]
    pub auto_delete_seconds: Option<u64>,
    /// Superserve's preview access policy (`legacy_public` in kiln).
    #[serde(default)]
    pub preview_access: Option<String>,
    /// Its egress rules, when any were set.
    #[serde(default)]
    pub network: Option<NetworkConfig>,
}

/// Egress rules of a sandbox. Whatever they say, the host, its loopback, link-local
/// (cloud metadata) and private ranges stay unreachable; an allow that overlaps a deny
/// wins. Processes in the sandbox reach the outside through kiln's egress proxy, which
/// they find in `http_proxy` / `https_proxy`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NetworkConfig {
    /// CIDRs, addresses and domains (`*.example.com`: subdomains at any depth, not the
    /// apex) that may be reached even where `deny_out` covers them.
    #[serde(default, deserialize_with = "null_as_empty")]
    pub allow_out: Vec<String>,
    /// CIDRs and addresses that may not be reached (`0.0.0.0/0` for an allowlist).
    #[serde(default, deserialize_with = "null_as_empty")]
    pub deny_out: Vec<String>,
}

fn null_as_empty<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Vec<String>, D::Error> {
    Ok(<Option<Vec<String>> as serde::Deserialize>::deserialize(d)?.unwrap_or_default())
}

/// What [`Sandbox::create`] sends.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SandboxCreateOptions {
    /// Display name (1-255 bytes).
    pub name: String,
    /// Template id or name; it must have a ready build.
    pub from_template: String,
    /// Environment of every process, over the template's defaults.
    pub env_vars: BTreeMap<String, String>,
    /// Tags, filterable in [`Sandbox::list`].
    pub metadata: BTreeMap<String, String>,
    /// Egress rules from the start (none: the public internet).
    pub network: Option<NetworkConfig>,
}

impl SandboxCreateOptions {
    /// Options with a name and a template, and nothing else.
    pub fn new(name: impl Into<String>, from_template: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            from_template: from_template.into(),
            ..Self::default()
        }
    }
}

/// Filters and paging of [`Sandbox::list`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListOptions {
    /// Only sandboxes with all these tags.
    pub metadata: BTreeMap<String, String>,
    /// Only sandboxes in one of these statuses (any, when empty).
    pub status: Vec<SandboxStatus>,
    /// At most this many.
    pub limit: Option<u64>,
    /// Skip this many first.
    pub offset: Option<u64>,
}

impl ListOptions {
    fn query(&self) -> Vec<(String, String)> {
        let mut q: Vec<(String, String)> = self
            .metadata
            .iter()
            .map(|(k, v)| (format!("metadata.{k}"), v.clone()))
            .collect();
        if !self.status.is_empty() {
            let s: Vec<&str> = self.status.iter().map(|s| s.as_str()).collect();
            q.push(("status".into(), s.join(",")));
        }
        if let Some(n) = self.limit {
            q.push(("limit".into(), n.to_string()));
        }
        if let Some(n) = self.offset {
            q.push(("offset".into(), n.to_string()));
        }
        q
    }
}

/// A pause still finishing when the sandbox is activated: the server answers
/// `sandbox_pausing`; the SDK retries every second for up to 30 s.
const PAUSING_RETRY: Duration = Duration::from_secs(1);
const PAUSING_WAIT: Duration = Duration::from_secs(30);

/// A handle on a sandbox: its lifecycle (control plane, with the API key) and, through
/// [`Sandbox::commands`] and [`Sandbox::files`], the processes and files inside it (data
/// plane, with the sandbox's access token).
///
/// The access token rotates on resume; the handle keeps the current one. A data-plane
/// call that finds the token stale (401) or the sandbox not running (503
/// `sandbox_unavailable`) activates the sandbox once (`POST /activate`: resumed if
/// paused, and a current token) and is retried. Clones share the token.
///
/// ```no_run
/// use kiln_sdk::{Client, RunOptions, Sandbox, SandboxCreateOptions};
///
/// # async fn demo() -> kiln_sdk::Result<()> {
/// let client = Client::from_env()?;
/// let sandbox = Sandbox::create(&client, SandboxCreateOptions::new("run-1", "my-python-env")).await?;
/// let out = sandbox.commands().run("python3 -c 'print(2 + 2)'", RunOptions::default()).await?;
/// assert_eq!(out.stdout, "4\n");
/// sandbox.files().write("/tmp/hello.txt", "hi").await?;
/// assert_eq!(sandbox.files().read("/tmp/hello.txt").await?, b"hi");
/// sandbox.pause().await?;
/// sandbox.resume().await?;
/// sandbox.kill().await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Sandbox {
    pub(crate) client: Client,
    id: String,
    state: Arc<Mutex<State>>,
    /// One activation at a time: concurrent callers that found the same stale token
    /// share the first one's result.
    refresh: Arc<tokio::sync::Mutex<()>>,
}

struct State {
    info: SandboxInfo,
    token: String,
    /// Bumped on every token change.
    revision: u64,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the access token.
        f.debug_struct("Sandbox")
            .field("info", &self.info)
            .field("token_revision", &self.revision)
            .finish_non_exhaustive()
    }
}

/// `SandboxInfo` plus `access_token`, as create, resume and activate answer.
#[derive(Deserialize)]
struct WithToken {
    #[serde(flatten)]
    info: SandboxInfo,
    #[serde(default)]
    access_token: String,
}

impl Sandbox {
    fn from_parts(client: &Client, with: WithToken, what: &str) -> Result<Self> {
        if with.access_token.is_empty() {
            return Err(Error::Protocol(format!(
                "the response to {what} has no access_token"
            )));
        }
        Ok(Self {
            client: client.clone(),
            id: with.info.id.clone(),
            state: Arc::new(Mutex::new(State {
                info: with.info,
                token: with.access_token,
                revision: 0,
            })),
            refresh: Arc::new(tokio::sync::Mutex::new(())),
        })
    }

    /// Creates a sandbox from a template and returns once it runs (`POST /sandboxes`).
    pub async fn create(client: &Client, options: SandboxCreateOptions) -> Result<Self> {
        let mut body = serde_json::json!({
            "name": options.name,
            "from_template": options.from_template,
        });
        if !options.metadata.is_empty() {
            body["metadata"] = serde_json::to_value(&options.metadata).expect("map");
        }
        if !options.env_vars.is_empty() {
            body["env_vars"] = serde_json::to_value(&options.env_vars).expect("map");
        }
        if let Some(network) = &options.network {
            body["network"] = serde_json::to_value(network).expect("rules");
        }
        let req = client
            .api(Method::POST, &["sandboxes"])
            .json(&body)
            .timeout(Some(client.lifecycle_timeout()));
        let with: WithToken = client.json(req).await?;
        Self::from_parts(client, with, "POST /sandboxes")
    }

    /// An existing sandbox, made sure to run (`POST /sandboxes/{id}/activate`: a paused
    /// sandbox is resumed), with a current access token.
    pub async fn connect(client: &Client, sandbox_id: &str) -> Result<Self> {
        let with = activate(client, sandbox_id, "activate").await?;
        Self::from_parts(client, with, "POST /sandboxes/{id}/activate")
    }

    /// The team's sandboxes, filtered and paged by `options`.
    pub async fn list(client: &Client, options: ListOptions) -> Result<Vec<SandboxInfo>> {
        let q = options.query();
        let pairs: Vec<(&str, &str)> = q.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let req = client.api(Method::GET, &["sandboxes"]).query(&pairs);
        client.json(req).await
    }

    /// Replaces a sandbox's egress rules by id (`None` clears them), without connecting to
    /// it (a paused sandbox stays paused; the rules apply from its next connection).
    pub async fn set_network_by_id(
        client: &Client,
        sandbox_id: &str,
        network: Option<&NetworkConfig>,
    ) -> Result<()> {
        let req = client
            .api(Method::PATCH, &["sandboxes", sandbox_id])
            .json(&serde_json::json!({ "network": network }));
        client.empty(req).await
    }

    /// Deletes a sandbox by id. Already gone is fine.
    pub async fn kill_by_id(client: &Client, sandbox_id: &str) -> Result<()> {
        let req = client
            .api(Method::DELETE, &["sandboxes", sandbox_id])
            .retry_conflict()
            .timeout(Some(client.lifecycle_timeout()));
        match client.empty(req).await {
            Err(Error::NotFound { code, .. }) if code == "not_found" => Ok(()),
            other => other,
        }
    }

    /// Its id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// What was last learnt about it (refresh with [`Sandbox::get_info`]).
    pub fn info(&self) -> SandboxInfo {
        self.lock().info.clone()
    }

    /// Its last known status.
    pub fn status(&self) -> SandboxStatus {
        self.lock().info.status
    }

    /// The current data-plane access token.
    pub fn access_token(&self) -> String {
        self.lock().token.clone()
    }

    /// The client it uses.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Running commands in it.
    pub fn commands(&self) -> Commands<'_> {
        Commands::new(self)
    }

    /// Its files.
    pub fn files(&self) -> Files<'_> {
        Files::new(self)
    }

    /// Fetches its current state (and remembers it).
    pub async fn get_info(&self) -> Result<SandboxInfo> {
        let info: SandboxInfo = self
            .client
            .json(self.client.api(Method::GET, &["sandboxes", &self.id]))
            .await?;
        self.lock().info = info.clone();
        Ok(info)
    }

    /// Replaces its metadata (`PATCH /sandboxes/{id}`).
    pub async fn update(&self, metadata: BTreeMap<String, String>) -> Result<()> {
        let req = self
            .client
            .api(Method::PATCH, &["sandboxes", &self.id])
            .json(&serde_json::json!({ "metadata": metadata }));
        self.client.empty(req).await?;
        self.lock().info.metadata = metadata;
        Ok(())
    }

    /// Replaces its egress rules (`None` clears them); they apply to its next connection.
    pub async fn set_network(&self, network: Option<NetworkConfig>) -> Result<()> {
        Self::set_network_by_id(&self.client, &self.id, network.as_ref()).await?;
        self.lock().info.network = network;
        Ok(())
    }

    /// Pauses it and returns once the pause has landed (the server holds the request;
    /// 204). Its state is saved; [`Sandbox::resume`], or any data-plane call, brings it
    /// back.
    pub async fn pause(&self) -> Result<()> {
        let req = self
            .client
            .api(Method::POST, &["sandboxes", &self.id, "pause"])
            .timeout(Some(self.client.lifecycle_timeout()));
        let resp = self.client.send(req).await?;
        let status = resp.status();
        let _ = resp.bytes().await;
        if status == reqwest::StatusCode::ACCEPTED {
            // Only with `Prefer: respond-async`, which is not sent; follow it anyway.
            self.wait_until_paused().await?;
        }
        self.lock().info.status = SandboxStatus::Paused;
        Ok(())
    }

    async fn wait_until_paused(&self) -> Result<()> {
        let deadline = Instant::now() + self.client.lifecycle_timeout();
        loop {
            match self.get_info().await {
                Ok(i) if matches!(i.status, SandboxStatus::Paused | SandboxStatus::Deleted) => {
                    return Ok(())
                }
                Ok(i) if i.status == SandboxStatus::Pausing => {}
                Ok(i) => {
                    return Err(Error::Conflict {
                        code: "conflict".into(),
                        message: format!(
                            "sandbox {} did not pause: it is {}",
                            self.id,
                            i.status.as_str()
                        ),
                    })
                }
                Err(Error::NotFound { .. }) => return Ok(()),
                Err(e) => return Err(e),
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    message: format!("sandbox {} is still pausing", self.id),
                });
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Resumes it (`POST /sandboxes/{id}/resume`). The access token rotates; this handle
    /// (and its clones) use the new one.
    pub async fn resume(&self) -> Result<()> {
        let with = activate(&self.client, &self.id, "resume").await?;
        self.adopt(with);
        Ok(())
    }

    /// Deletes it and its VM. Already gone is fine.
    pub async fn kill(&self) -> Result<()> {
        Self::kill_by_id(&self.client, &self.id).await?;
        self.lock().info.status = SandboxStatus::Deleted;
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn adopt(&self, with: WithToken) {
        let mut st = self.lock();
        st.info = with.info;
        if !with.access_token.is_empty() {
            st.token = with.access_token;
            st.revision += 1;
        }
    }

    /// The token and its revision.
    pub(crate) fn token(&self) -> (String, u64) {
        let st = self.lock();
        (st.token.clone(), st.revision)
    }

    /// A current token from `/activate`, unless another caller already replaced the one
    /// seen at `revision`.
    pub(crate) async fn refresh_token(&self, revision: u64) -> Result<String> {
        let _one = self.refresh.lock().await;
        {
            let st = self.lock();
            if st.revision != revision {
                return Ok(st.token.clone());
            }
        }
        let with = activate(&self.client, &self.id, "activate").await?;
        if with.access_token.is_empty() {
            return Err(Error::Protocol(
                "the response to POST /sandboxes/{id}/activate has no access_token".into(),
            ));
        }
        self.adopt(with);
        Ok(self.lock().token.clone())
    }

    /// A data-plane request for `segments` with the current token.
    pub(crate) fn data_request(
        &self,
        method: Method,
        segments: &[&str],
        token: &str,
    ) -> Result<Request> {
        self.client.data(method, segments, &self.id, token)
    }

    /// Runs `send` with the current token; on a failure activation can fix, activates
    /// once and runs it again with the fresh token.
    pub(crate) async fn with_token_retry<T, F, Fut>(&self, send: F) -> Result<T>
    where
        F: Fn(String) -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let (token, revision) = self.token();
        match send(token).await {
            Err(e) if e.is_resumable() => {
                let fresh = self.refresh_token(revision).await?;
                send(fresh).await
            }
            other => other,
        }
    }
}

/// `POST /sandboxes/{id}/{resume|activate}`, waiting out a pause still in progress.
async fn activate(client: &Client, sandbox_id: &str, endpoint: &str) -> Result<WithToken> {
    let deadline = Instant::now() + PAUSING_WAIT;
    loop {
        let req = client
            .api(Method::POST, &["sandboxes", sandbox_id, endpoint])
            .timeout(Some(client.lifecycle_timeout()));
        match client.json::<WithToken>(req).await {
            Err(Error::Conflict { code, .. })
                if code == "sandbox_pausing" && Instant::now() + PAUSING_RETRY < deadline =>
            {
                tokio::time::sleep(PAUSING_RETRY).await;
            }
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_query() {
        let o = ListOptions {
            metadata: [("env".to_owned(), "prod".to_owned())].into(),
            status: vec![SandboxStatus::Active, SandboxStatus::Paused],
            limit: Some(5),
            offset: None,
        };
        assert_eq!(
            o.query(),
            vec![
                ("metadata.env".to_owned(), "prod".to_owned()),
                ("status".to_owned(), "active,paused".to_owned()),
                ("limit".to_owned(), "5".to_owned()),
            ]
        );
    }

    #[test]
    fn sandbox_with_token_parses() {
        let w: WithToken = serde_json::from_value(serde_json::json!({
            "id": "s", "name": "n", "status": "active", "vcpu_count": 1, "memory_mib": 256,
            "created_at": "2025-01-01T00:00:00Z", "updated_at": "2025-01-01T00:00:00Z",
            "template_id": "t", "build_id": "b", "metadata": {"k": "v"},
            "timeout_seconds": null, "auto_delete_seconds": null, "network": null,
            "preview_access": "legacy_public", "access_token": "tok",
        }))
        .unwrap();
        assert_eq!(w.access_token, "tok");
        assert_eq!(w.info.metadata["k"], "v");
    }
}
