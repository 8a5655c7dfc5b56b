//! Sandboxes: restored template snapshots, with their commands and files.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kiln_api::{
    ApiErrorCode, CreateSandbox, NetworkConfig, PreviewAccess, SandboxFilter, SandboxInfo,
    SandboxStatus, SandboxWithToken, SnapshotInfo, SnapshotPage,
};
use reqwest::Method;

use crate::client::{Client, Request};
use crate::commands::Commands;
use crate::error::{Error, Result};
use crate::files::Files;
use crate::previews::Previews;
use crate::snapshot::{Snapshot, SnapshotOptions};

/// What [`Sandbox::create`] sends.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SandboxCreateOptions {
    /// Display name (1-255 bytes).
    pub name: String,
    /// Template id or name; it must have a ready build. Empty (with no `from_snapshot`):
    /// the system template `superserve/base`.
    pub from_template: String,
    /// A ready snapshot's id to continue from instead of a template (its processes live).
    pub from_snapshot: Option<String>,
    /// Auto-pause after this many seconds of active time.
    pub timeout_seconds: Option<u64>,
    /// Auto-delete after this many seconds continuously paused (0: at once).
    pub auto_delete_seconds: Option<u64>,
    /// Environment of every process, over the template's defaults.
    pub env_vars: BTreeMap<String, String>,
    /// Tags, filterable in [`Sandbox::list`].
    pub metadata: BTreeMap<String, String>,
    /// Egress rules from the start (none: the public internet).
    pub network: Option<NetworkConfig>,
    /// Team secrets to bind: environment variable -> secret name (the variable holds a
    /// stand-in; see [`crate::Secret`]).
    pub secrets: BTreeMap<String, String>,
    /// Its preview policy, [`PreviewAccess::Public`] or [`PreviewAccess::Private`]
    /// (none: public).
    pub preview_access: Option<PreviewAccess>,
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

    /// Options for a sandbox that continues from snapshot `snapshot_id` (a fork).
    pub fn from_snapshot(name: impl Into<String>, snapshot_id: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            from_snapshot: Some(snapshot_id.into()),
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
        let clamp = |n: u64| u32::try_from(n).unwrap_or(u32::MAX);
        SandboxFilter {
            metadata: self.metadata.clone(),
            statuses: (!self.status.is_empty()).then(|| self.status.clone()),
            limit: self.limit.map(clamp),
            offset: self.offset.map_or(0, clamp),
        }
        .to_query()
    }
}

impl SandboxCreateOptions {
    /// The request body.
    fn request(&self) -> CreateSandbox {
        CreateSandbox {
            name: self.name.clone(),
            from_template: Some(self.from_template.clone()).filter(|t| !t.is_empty()),
            from_snapshot: self.from_snapshot.clone(),
            timeout_seconds: self.timeout_seconds,
            auto_delete_seconds: self.auto_delete_seconds,
            metadata: self.metadata.clone(),
            env_vars: self.env_vars.clone(),
            network: self.network.clone(),
            secrets: self.secrets.clone(),
            preview_access: self.preview_access,
        }
    }
}

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

impl Sandbox {
    fn from_parts(client: &Client, with: SandboxWithToken, what: &str) -> Result<Self> {
        if with.access_token.is_empty() {
            return Err(Error::Protocol(format!(
                "the response to {what} has no access_token"
            )));
        }
        Ok(Self {
            client: client.clone(),
            id: with.sandbox.id.clone(),
            state: Arc::new(Mutex::new(State {
                info: with.sandbox,
                token: with.access_token,
                revision: 0,
            })),
            refresh: Arc::new(tokio::sync::Mutex::new(())),
        })
    }

    /// Creates a sandbox from a template (or a snapshot) and returns once it runs (`POST
    /// /sandboxes`).
    pub async fn create(client: &Client, options: SandboxCreateOptions) -> Result<Self> {
        let req = client
            .api(Method::POST, &["sandboxes"])
            .json(&options.request())
            .timeout(Some(client.lifecycle_timeout()));
        let with: SandboxWithToken = client.json(req).await?;
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
            Err(Error::NotFound { code, .. }) if code == ApiErrorCode::NotFound.as_str() => Ok(()),
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

    /// Its preview URLs.
    pub fn previews(&self) -> Previews<'_> {
        Previews::of(&self.client, &self.id)
    }

    /// Sets its preview policy ([`PreviewAccess::Public`] or [`PreviewAccess::Private`];
    /// published ports keep their own access).
    pub async fn set_preview_access(&self, access: PreviewAccess) -> Result<()> {
        let req = self
            .client
            .api(Method::PATCH, &["sandboxes", &self.id])
            .json(&serde_json::json!({ "preview_access": access }));
        self.client.empty(req).await?;
        self.lock().info.preview_access = access;
        Ok(())
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

    /// Sets its timers (`PATCH /sandboxes/{id}`): `Some(Some(n))` sets one, `Some(None)`
    /// turns it off, `None` leaves it. A running sandbox's auto-pause window, and a
    /// paused one's auto-delete countdown, start over from now.
    pub async fn set_timers(
        &self,
        timeout_seconds: Option<Option<u64>>,
        auto_delete_seconds: Option<Option<u64>>,
    ) -> Result<()> {
        let update = kiln_api::UpdateSandbox {
            timeout_seconds,
            auto_delete_seconds,
            ..kiln_api::UpdateSandbox::default()
        };
        let req = self
            .client
            .api(Method::PATCH, &["sandboxes", &self.id])
            .json(&update);
        self.client.empty(req).await?;
        self.get_info().await?;
        Ok(())
    }

    /// Takes a snapshot of it (memory and disk; a running sandbox runs on) and waits
    /// until the snapshot is ready, which new sandboxes can then continue from.
    pub async fn snapshot(&self, options: SnapshotOptions) -> Result<Snapshot> {
        let mut s = Snapshot::take(&self.client, &self.id, options).await?;
        s.wait_until_ready().await?;
        Ok(s)
    }

    /// Its snapshots, newest first.
    pub async fn snapshots(&self) -> Result<Vec<SnapshotInfo>> {
        Snapshot::list(&self.client, Some(&self.id), SnapshotPage::default()).await
    }

    /// Replaces its egress rules (`None` clears them); they apply to its next connection.
    pub async fn set_network(&self, network: Option<NetworkConfig>) -> Result<()> {
        Self::set_network_by_id(&self.client, &self.id, network.as_ref()).await?;
        self.lock().info.network = network;
        Ok(())
    }

    /// Binds a team secret under an environment variable: processes started from now on
    /// see a stand-in, which kiln's egress proxy swaps for the secret on its hosts (a
    /// paused sandbox gets it on resume).
    pub async fn attach_secret(&self, env_key: &str, secret_name: &str) -> Result<()> {
        Self::attach_secret_by_id(&self.client, &self.id, env_key, secret_name).await
    }

    /// [`Sandbox::attach_secret`] by id, without connecting to the sandbox (a paused one
    /// stays paused).
    pub async fn attach_secret_by_id(
        client: &Client,
        sandbox_id: &str,
        env_key: &str,
        secret_name: &str,
    ) -> Result<()> {
        let body = kiln_api::AttachSecret {
            env_key: env_key.to_owned(),
            secret_name: secret_name.to_owned(),
        };
        let req = client
            .api(Method::POST, &["sandboxes", sandbox_id, "secrets"])
            .json(&body);
        client.empty(req).await
    }

    /// Removes the binding of `env_key`: its stand-in is refused from the next request,
    /// and new processes no longer see the variable.
    pub async fn detach_secret(&self, env_key: &str) -> Result<()> {
        Self::detach_secret_by_id(&self.client, &self.id, env_key).await
    }

    /// [`Sandbox::detach_secret`] by id, without connecting to the sandbox.
    pub async fn detach_secret_by_id(
        client: &Client,
        sandbox_id: &str,
        env_key: &str,
    ) -> Result<()> {
        let req = client.api(
            Method::DELETE,
            &["sandboxes", sandbox_id, "secrets", env_key],
        );
        client.empty(req).await
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
                        message: format!("sandbox {} did not pause: it is {}", self.id, i.status),
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
    /// (and its clones) use the new one. Resuming an active sandbox is
    /// [`Error::Conflict`]; [`Sandbox::connect`] hands out the current token instead.
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

    fn adopt(&self, with: SandboxWithToken) {
        let mut st = self.lock();
        st.info = with.sandbox;
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

/// `POST /sandboxes/{id}/{resume|activate}`. The server holds the request while a pause
/// of the sandbox is still under way, so no retry is needed for that.
async fn activate(client: &Client, sandbox_id: &str, endpoint: &str) -> Result<SandboxWithToken> {
    let req = client
        .api(Method::POST, &["sandboxes", sandbox_id, endpoint])
        .timeout(Some(client.lifecycle_timeout()));
    client.json(req).await
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
        let w: SandboxWithToken = serde_json::from_value(serde_json::json!({
            "id": "s", "name": "n", "status": "active", "vcpu_count": 1, "memory_mib": 256,
            "created_at": "2025-01-01T00:00:00Z", "updated_at": "2025-01-01T00:00:00Z",
            "template_id": "t", "build_id": "b", "metadata": {"k": "v"},
            "timeout_seconds": null, "auto_delete_seconds": null, "network": null,
            "preview_access": "legacy_public", "access_token": "tok",
        }))
        .unwrap();
        assert_eq!(w.access_token, "tok");
        assert_eq!(w.sandbox.metadata["k"], "v");
    }
}
