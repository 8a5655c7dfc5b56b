//! Templates: a base image, build steps and a start process, built in a VM and
//! snapshotted; and their builds.

use std::time::Duration;

use kiln_api::{BuildInfo, BuildLogEvent, BuildStatus, Step, TemplateInfo, TemplateStatus};
use reqwest::Method;

use crate::client::{Client, STREAM_IDLE_TIMEOUT};
use crate::error::{split_build_error, Error, Result};

/// How often [`Template::wait_until_ready`] polls the build.
pub const BUILD_POLL_INTERVAL: Duration = Duration::from_secs(2);

/// After a build is over, how long [`Template::wait_until_ready`] lets the log stream
/// deliver its last lines.
const LOG_GRACE: Duration = Duration::from_secs(10);

/// What [`Template::create`] sends: the template's name and VM shape, and its build spec
/// (`from`, `steps`, `start_cmd`, `ready_cmd`) flattened in. `None` fields are omitted
/// (the server's defaults apply: 1 vCPU, 1024 MiB, 4096 MiB of disk).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TemplateCreateOptions {
    /// Unique within the team (`[a-z0-9]([a-z0-9._/-]*[a-z0-9])?`).
    pub name: String,
    /// OCI reference of the base image (`python:3.11`, `ghcr.io/org/img:v1`), linux/amd64.
    pub from: String,
    /// Run in order in the build VM.
    pub steps: Vec<Step>,
    /// Long-running process started after the steps; the snapshot captures it running.
    pub start_cmd: Option<String>,
    /// Readiness probe, polled until it exits 0.
    pub ready_cmd: Option<String>,
    /// Virtual CPUs (1-4).
    pub vcpu: Option<u32>,
    /// Memory, MiB (256-4096).
    pub memory_mib: Option<u32>,
    /// Disk, MiB (1024-8192).
    pub disk_mib: Option<u32>,
    /// Build from scratch, bypassing kiln's build cache (a kiln extension: `"force": true`).
    pub force: bool,
}

impl TemplateCreateOptions {
    /// Options with a name and a base image, and nothing else.
    pub fn new(name: impl Into<String>, from: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            from: from.into(),
            ..Self::default()
        }
    }

    /// The request body.
    fn body(&self) -> serde_json::Value {
        let mut spec = serde_json::json!({ "from": self.from });
        if !self.steps.is_empty() {
            spec["steps"] = serde_json::to_value(&self.steps).expect("steps serialise");
        }
        if let Some(c) = &self.start_cmd {
            spec["start_cmd"] = c.as_str().into();
        }
        if let Some(c) = &self.ready_cmd {
            spec["ready_cmd"] = c.as_str().into();
        }
        let mut body = serde_json::json!({ "name": self.name, "build_spec": spec });
        if self.force {
            body["force"] = true.into();
        }
        for (k, v) in [
            ("vcpu", self.vcpu),
            ("memory_mib", self.memory_mib),
            ("disk_mib", self.disk_mib),
        ] {
            if let Some(v) = v {
                body[k] = v.into();
            }
        }
        body
    }
}

/// A build log callback for [`Template::wait_until_ready`].
pub type LogCallback<'a> = &'a mut (dyn FnMut(&BuildLogEvent) + Send);

/// A template. Made by [`Template::create`] (which queues its first build) or
/// [`Template::connect`].
///
/// ```no_run
/// use kiln_sdk::{BuildLogEvent, Client, Step, Template, TemplateCreateOptions};
///
/// # async fn demo() -> kiln_sdk::Result<()> {
/// let client = Client::from_env()?;
/// let mut template = Template::create(&client, TemplateCreateOptions {
///     steps: vec![Step::run("pip install numpy")],
///     start_cmd: Some("python3 -m http.server 8000".into()),
///     ready_cmd: Some("curl -fsS http://127.0.0.1:8000/".into()),
///     ..TemplateCreateOptions::new("my-python-env", "python:3.11")
/// })
/// .await?;
/// let info = template
///     .wait_until_ready(Some(&mut |e: &BuildLogEvent| println!("{}", e.text)))
///     .await?;
/// println!("{} is {:?}", info.name, info.status);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Template {
    client: Client,
    info: TemplateInfo,
}

impl Template {
    /// Creates a template and queues its first build (`POST /templates`). Wait for it
    /// with [`Template::wait_until_ready`].
    pub async fn create(client: &Client, options: TemplateCreateOptions) -> Result<Self> {
        let req = client
            .api(Method::POST, &["templates"])
            .json(&options.body());
        let raw: serde_json::Value = client.json(req).await?;
        let build_id = raw
            .get("build_id")
            .and_then(|b| b.as_str())
            .filter(|b| !b.is_empty())
            .map(str::to_owned)
            .ok_or_else(|| {
                Error::Protocol("the response to POST /templates has no build_id".into())
            })?;
        let mut info: TemplateInfo = serde_json::from_value(raw)
            .map_err(|e| Error::Protocol(format!("invalid response to POST /templates: {e}")))?;
        info.latest_build_id = Some(build_id);
        Ok(Self {
            client: client.clone(),
            info,
        })
    }

    /// An existing template, by name or id.
    pub async fn connect(client: &Client, name_or_id: &str) -> Result<Self> {
        let info = get_template(client, name_or_id).await?;
        Ok(Self {
            client: client.clone(),
            info,
        })
    }

    /// The team's templates, optionally only those whose name starts with `name_prefix`.
    pub async fn list(client: &Client, name_prefix: Option<&str>) -> Result<Vec<TemplateInfo>> {
        let mut req = client.api(Method::GET, &["templates"]);
        if let Some(p) = name_prefix.filter(|p| !p.is_empty()) {
            req = req.query(&[("name_prefix", p)]);
        }
        client.json(req).await
    }

    /// Deletes a template by name or id. Already gone is fine; a template that sandboxes
    /// still use is an [`Error::Conflict`].
    pub async fn delete_by_id(client: &Client, name_or_id: &str) -> Result<()> {
        match client
            .empty(client.api(Method::DELETE, &["templates", name_or_id]))
            .await
        {
            Err(Error::NotFound { code, .. })
                if code == kiln_api::ApiErrorCode::NotFound.as_str() =>
            {
                Ok(())
            }
            other => other,
        }
    }

    /// Its id.
    pub fn id(&self) -> &str {
        &self.info.id
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.info.name
    }

    /// What was last learnt about it (refresh with [`Template::get_info`]).
    pub fn info(&self) -> &TemplateInfo {
        &self.info
    }

    /// The client it uses.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Fetches its current state (and remembers it).
    pub async fn get_info(&mut self) -> Result<TemplateInfo> {
        let info = get_template(&self.client, &self.info.id).await?;
        self.remember(info.clone());
        Ok(info)
    }

    /// Deletes it. Already gone is fine; still used by sandboxes is an
    /// [`Error::Conflict`].
    pub async fn delete(&self) -> Result<()> {
        Self::delete_by_id(&self.client, &self.info.id).await
    }

    /// Queues a new build (`POST /templates/{id}/builds`). A build of the same spec
    /// already in flight is returned instead of a new one. It becomes the build
    /// [`Template::wait_until_ready`] waits for.
    pub async fn rebuild(&mut self) -> Result<BuildInfo> {
        let req = self
            .client
            .api(Method::POST, &["templates", &self.info.id, "builds"]);
        let build: BuildInfo = self.client.json(req).await?;
        self.info.latest_build_id = Some(build.id.clone());
        Ok(build)
    }

    /// Replaces the template's spec and shape with `options` (its name must be this
    /// template's or empty) and queues a build of it: kiln's extension of
    /// `POST /templates/{id}/builds`, which the official SDKs call without a body.
    pub async fn rebuild_with(&mut self, options: &TemplateCreateOptions) -> Result<BuildInfo> {
        let mut body = options.body();
        if options.name.is_empty() {
            body["name"] = self.info.name.as_str().into();
        }
        let req = self
            .client
            .api(Method::POST, &["templates", &self.info.id, "builds"])
            .json(&body);
        let build: BuildInfo = self.client.json(req).await?;
        self.info.latest_build_id = Some(build.id.clone());
        Ok(build)
    }

    /// Its builds, newest first; at most `limit` when given.
    pub async fn list_builds(&self, limit: Option<usize>) -> Result<Vec<BuildInfo>> {
        let mut req = self
            .client
            .api(Method::GET, &["templates", &self.info.id, "builds"]);
        if let Some(n) = limit {
            req = req.query(&[("limit", &n.to_string())]);
        }
        self.client.json(req).await
    }

    /// One of its builds.
    pub async fn get_build(&self, build_id: &str) -> Result<BuildInfo> {
        let req = self.client.api(
            Method::GET,
            &["templates", &self.info.id, "builds", build_id],
        );
        self.client.json(req).await
    }

    /// Cancels a build in flight. Already gone is fine.
    pub async fn cancel_build(&self, build_id: &str) -> Result<()> {
        let req = self.client.api(
            Method::DELETE,
            &["templates", &self.info.id, "builds", build_id],
        );
        match self.client.empty(req).await {
            Err(Error::NotFound { code, .. })
                if code == kiln_api::ApiErrorCode::NotFound.as_str() =>
            {
                Ok(())
            }
            other => other,
        }
    }

    /// Follows a build's log (Server-Sent Events): its history, then lines as they are
    /// written, until the last event (`finished`). `build_id` defaults to the latest build.
    pub async fn stream_build_logs(
        &self,
        build_id: Option<&str>,
        mut on_event: impl FnMut(&BuildLogEvent) + Send,
    ) -> Result<()> {
        let bid = self.resolve_build_id(build_id).await?;
        self.follow_logs(&bid, &mut on_event).await
    }

    async fn follow_logs(&self, build_id: &str, on_event: LogCallback<'_>) -> Result<()> {
        let req = self
            .client
            .api(
                Method::GET,
                &["templates", &self.info.id, "builds", build_id, "logs"],
            )
            .timeout(None);
        let resp = self.client.send(req).await?;
        crate::sse::read_json_events(resp, STREAM_IDLE_TIMEOUT, |event: BuildLogEvent| {
            on_event(&event);
            !event.finished
        })
        .await
    }

    /// Waits until the latest build is over, polling it every 2 s
    /// ([`BUILD_POLL_INTERVAL`]): the build's own record is the source of truth. With
    /// `on_log`, the build's log is streamed to it meanwhile (a failure of the log stream
    /// does not fail the wait).
    ///
    /// Returns the template's info once the build is `ready`; a `failed` build is an
    /// [`Error::Build`] with its stable code, a cancelled one an [`Error::Conflict`]
    /// with code `cancelled`.
    pub async fn wait_until_ready(
        &mut self,
        on_log: Option<LogCallback<'_>>,
    ) -> Result<TemplateInfo> {
        let bid = match self.resolve_build_id(None).await {
            Ok(b) => Some(b),
            Err(Error::Protocol(_)) => None,
            Err(e) => return Err(e),
        };
        let Some(bid) = bid else {
            return self.wait_for_template_status().await;
        };
        let this = &*self;
        let poll = this.poll_build(&bid);
        let outcome = match on_log {
            None => poll.await,
            Some(cb) => {
                let logs = this.follow_logs(&bid, cb);
                tokio::pin!(poll);
                tokio::pin!(logs);
                let mut logs_done = false;
                let outcome = loop {
                    tokio::select! {
                        _ = &mut logs, if !logs_done => logs_done = true,
                        r = &mut poll => break r,
                    }
                };
                if !logs_done {
                    let _ = tokio::time::timeout(LOG_GRACE, logs).await;
                }
                outcome
            }
        };
        outcome?;
        self.get_info().await
    }

    /// Polls a build until it is over: `Ok` when ready.
    async fn poll_build(&self, build_id: &str) -> Result<()> {
        loop {
            let b = self.get_build(build_id).await?;
            match b.status {
                BuildStatus::Ready => return Ok(()),
                BuildStatus::Failed => {
                    let (code, message) = split_build_error(b.error_message.as_deref());
                    return Err(Error::Build {
                        code,
                        message,
                        build_id: b.id,
                        template_id: b.template_id,
                    });
                }
                BuildStatus::Cancelled => {
                    return Err(Error::Conflict {
                        code: "cancelled".into(),
                        message: format!("build {build_id} was cancelled"),
                    })
                }
                _ => tokio::time::sleep(BUILD_POLL_INTERVAL).await,
            }
        }
    }

    /// Without any build id (rare): the template's own status.
    async fn wait_for_template_status(&mut self) -> Result<TemplateInfo> {
        loop {
            let info = self.get_info().await?;
            match info.status {
                TemplateStatus::Ready => return Ok(info),
                TemplateStatus::Failed => {
                    let (code, message) = split_build_error(info.error_message.as_deref());
                    return Err(Error::Build {
                        code,
                        message,
                        build_id: String::new(),
                        template_id: info.id,
                    });
                }
                _ => tokio::time::sleep(BUILD_POLL_INTERVAL).await,
            }
        }
    }

    /// The explicit build, else the latest known, else the newest listed.
    async fn resolve_build_id(&self, build_id: Option<&str>) -> Result<String> {
        if let Some(b) = build_id.filter(|b| !b.is_empty()) {
            return Ok(b.to_owned());
        }
        if let Some(b) = self
            .info
            .latest_build_id
            .as_deref()
            .filter(|b| !b.is_empty())
        {
            return Ok(b.to_owned());
        }
        self.list_builds(Some(1))
            .await?
            .into_iter()
            .next()
            .map(|b| b.id)
            .ok_or_else(|| {
                Error::Protocol(format!(
                    "template {} has no builds: call rebuild() first",
                    self.info.name
                ))
            })
    }

    /// Keeps a fresh info, but not one that forgets a build id we know of.
    fn remember(&mut self, mut info: TemplateInfo) {
        if info.latest_build_id.is_none() {
            info.latest_build_id = self.info.latest_build_id.take();
        }
        self.info = info;
    }
}

async fn get_template(client: &Client, name_or_id: &str) -> Result<TemplateInfo> {
    client
        .json(client.api(Method::GET, &["templates", name_or_id]))
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_body_nests_the_spec_and_omits_none() {
        let o = TemplateCreateOptions {
            steps: vec![Step::run("true"), Step::user("app", false)],
            start_cmd: Some("sleep infinity".into()),
            memory_mib: Some(256),
            ..TemplateCreateOptions::new("t", "python:3.11")
        };
        assert_eq!(
            o.body(),
            serde_json::json!({
                "name": "t",
                "memory_mib": 256,
                "build_spec": {
                    "from": "python:3.11",
                    "steps": [{"run": "true"}, {"user": {"name": "app", "sudo": false}}],
                    "start_cmd": "sleep infinity",
                }
            })
        );
        let bare = TemplateCreateOptions::new("t", "img").body();
        assert_eq!(
            bare,
            serde_json::json!({"name": "t", "build_spec": {"from": "img"}})
        );
    }

    #[test]
    fn wire_types_parse() {
        let t: TemplateInfo = serde_json::from_value(serde_json::json!({
            "id": "1", "name": "n", "team_id": "t", "status": "building", "vcpu": 1,
            "memory_mib": 256, "disk_mib": 1024, "size_bytes": null, "error_message": null,
            "created_at": "2025-01-01T00:00:00Z", "built_at": null, "latest_build_id": "b",
        }))
        .unwrap();
        assert_eq!(t.status, TemplateStatus::Building);
        let e: BuildLogEvent = serde_json::from_value(serde_json::json!({
            "timestamp": "2025-01-01T00:00:00.5+00:00", "stream": "system",
            "text": "build ready", "finished": true, "status": "ready",
        }))
        .unwrap();
        assert!(e.finished);
        assert_eq!(e.status, Some(BuildStatus::Ready));
        let s: BuildStatus = serde_json::from_str("\"exotic\"").unwrap();
        assert_eq!(s, BuildStatus::Unknown);
        let step: Step = serde_json::from_str(r#"{"user":{"name":"a"}}"#).unwrap();
        assert_eq!(step, Step::user("a", false));
    }
}
