//! Templates and their builds.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use kiln_api::{BuildInfo, BuildLogEvent, SandboxFilter, SandboxStatus, TemplateInfo};
use kiln_build::{run_build, BuildEnd, BuildJob, BuildObserver, LogLine, LogSink, Phase, Stream};
use kiln_spec::{BuildErrorCode, CodedMessage, TemplateRequest};
use kiln_store::{
    ArtifactManifest, Build, BuildStatus, BuiltArtifact, LogStream, NewLogLine, Template,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::error::{EngineError, Result};
use crate::{wire, Engine};

/// What [`Engine::rebuild_with`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rebuilt {
    /// The build to follow.
    pub build: BuildInfo,
    /// `false` when an in-flight build of the same spec was returned instead of a new one.
    pub created: bool,
}

/// How often a running build checks whether it was cancelled from elsewhere (another
/// CLI process, the API).
const CANCEL_POLL: Duration = Duration::from_millis(500);

impl Engine {
    /// Validates a request and records the template with its first build, `pending`.
    /// The build runs when [`Engine::run_build`] is called for it.
    pub async fn submit(
        &self,
        team_id: &str,
        req: &TemplateRequest,
    ) -> Result<(TemplateInfo, BuildInfo)> {
        self.submit_with(team_id, req, false).await
    }

    /// [`Engine::submit`]; with `no_cache` the build ignores the build cache.
    pub async fn submit_with(
        &self,
        team_id: &str,
        req: &TemplateRequest,
        no_cache: bool,
    ) -> Result<(TemplateInfo, BuildInfo)> {
        req.validate().map_err(EngineError::Invalid)?;
        let (t, mut b) = self
            .store
            .create_template_with_build(team_id, req, &self.cfg.limits)
            .await?;
        if no_cache {
            b = self.store.set_build_no_cache(&b.id).await?;
        }
        Ok((wire::template(&t), wire::build(&b)))
    }

    /// Queues a rebuild of a template's current spec; an in-flight build of the same spec
    /// is returned instead of a new one.
    pub async fn rebuild(&self, team_id: &str, template: &str) -> Result<Rebuilt> {
        self.rebuild_with(team_id, template, None, false).await
    }

    /// Queues a rebuild; with `spec`, the template's spec and shape become that first (an
    /// in-flight build of the same spec is still returned instead of a new one). With
    /// `no_cache` the new build ignores the build cache.
    pub async fn rebuild_with(
        &self,
        team_id: &str,
        template: &str,
        spec: Option<&TemplateRequest>,
        no_cache: bool,
    ) -> Result<Rebuilt> {
        if let Some(req) = spec {
            req.validate().map_err(EngineError::Invalid)?;
            // A spec for this template may repeat its name, never another's.
            if let Some(name) = &req.name {
                let t = self.store.template_by_id_or_name(team_id, template).await?;
                if *name != t.name {
                    return Err(kiln_api::RequestError::invalid(format!(
                        "name: {name:?} is not this template's name ({:?})",
                        t.name
                    ))
                    .into());
                }
            }
        }
        let mut r = self
            .store
            .start_rebuild(team_id, template, spec, &self.cfg.limits)
            .await?;
        if no_cache && r.created {
            r.build = self.store.set_build_no_cache(&r.build.id).await?;
        }
        Ok(Rebuilt {
            build: wire::build(&r.build),
            created: r.created,
        })
    }

    /// The team's templates whose names start with `name_prefix`.
    pub async fn list_templates(
        &self,
        team_id: &str,
        name_prefix: &str,
    ) -> Result<Vec<TemplateInfo>> {
        Ok(self
            .store
            .list_templates(team_id)
            .await?
            .iter()
            .filter(|t| t.name.starts_with(name_prefix))
            .map(wire::template)
            .collect())
    }

    /// One of the team's templates, by id or name.
    pub async fn template(&self, team_id: &str, template: &str) -> Result<TemplateInfo> {
        let t = self.store.template_by_id_or_name(team_id, template).await?;
        Ok(wire::template(&t))
    }

    /// A template's builds, newest first.
    pub async fn list_builds(&self, team_id: &str, template: &str) -> Result<Vec<BuildInfo>> {
        Ok(self
            .store
            .list_builds(team_id, template)
            .await?
            .iter()
            .map(wire::build)
            .collect())
    }

    /// The snapshot bundle that sandboxes of a template restore from (its current build's),
    /// for tools that run it outside the engine (the benchmark's bare-QEMU floor).
    pub async fn template_bundle(
        &self,
        team_id: &str,
        template: &str,
    ) -> Result<std::path::PathBuf> {
        let t = self.store.template_by_id_or_name(team_id, template).await?;
        let Some(build) = &t.current_build_id else {
            return Err(EngineError::NotReady {
                name: t.name,
                status: t.status.to_string(),
            });
        };
        Ok(self.layout.artifact_dir(&t.id, build)?.join("bundle"))
    }

    /// One of the team's builds, by id.
    pub async fn build(&self, team_id: &str, build_id: &str) -> Result<BuildInfo> {
        Ok(wire::build(
            &self.store.build_by_id(team_id, build_id).await?,
        ))
    }

    /// A build, checked to belong to the template named (by id or name): another
    /// template's build is not found.
    pub async fn template_build(
        &self,
        team_id: &str,
        template: &str,
        build_id: &str,
    ) -> Result<BuildInfo> {
        let t = self.store.template_by_id_or_name(team_id, template).await?;
        let b = self.store.build_by_id(team_id, build_id).await?;
        if b.template_id != t.id {
            return Err(kiln_store::StoreError::not_found("build", build_id).into());
        }
        Ok(wire::build(&b))
    }

    /// Marks a build cancelled; the process running it stops its VM within
    /// [`CANCEL_POLL`]. A no-op on a finished build.
    pub async fn cancel_build(&self, team_id: &str, build_id: &str) -> Result<BuildInfo> {
        Ok(wire::build(
            &self.store.cancel_build(team_id, build_id).await?,
        ))
    }

    /// Deletes a template (refused while sandboxes use it) and its artifacts. Builds still
    /// queued or running are cancelled first, and this process's runners of them are given
    /// [`DELETE_WAIT`] to stop their VMs, so nothing is published into a deleted template.
    pub async fn delete_template(&self, team_id: &str, template: &str) -> Result<TemplateInfo> {
        let t = self.store.template_by_id_or_name(team_id, template).await?;
        if t.team_id != team_id {
            return Err(EngineError::Conflict(format!(
                "{:?} is a system template: teams cannot delete it",
                t.name
            )));
        }
        let live = SandboxFilter::with_statuses(SandboxStatus::live());
        let in_use = self
            .store
            .list_sandboxes(team_id, &live)
            .await?
            .iter()
            .filter(|s| s.template_id == t.id)
            .count();
        if in_use > 0 {
            return Err(kiln_store::StoreError::Conflict(format!(
                "template has {in_use} live sandboxes"
            ))
            .into());
        }
        let mut cancelled = Vec::new();
        for b in self.store.list_builds(team_id, &t.id).await? {
            if !b.status.is_terminal() {
                self.store.cancel_build(team_id, &b.id).await?;
                cancelled.push(b.id);
            }
        }
        self.running_builds.wait_gone(&cancelled, DELETE_WAIT).await;
        let (t, _) = self.store.delete_template(team_id, &t.id).await?;
        self.forget_pooled(&t.id).await;
        let dir = self.layout.template_dir(&t.id)?;
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(path = %dir.display(), error = %e, "could not remove template artifacts");
            }
        }
        Ok(wire::template(&t))
    }

    /// Runs a pending build in this process to its end, writing logs and statuses to the
    /// store. `also` gets every log line too, as the API shows it (a terminal prints
    /// them). Returns the finished build.
    pub async fn run_build(
        &self,
        build_id: &str,
        also: Option<mpsc::UnboundedSender<BuildLogEvent>>,
    ) -> Result<BuildInfo> {
        let build = self.store.get_build(build_id).await?;
        let template = self
            .store
            .template_by_id_or_name(&build.team_id, &build.template_id)
            .await?;
        let span = tracing::info_span!("build", build = %build_id, template = %template.name);
        async {
            let (tx, rx) = mpsc::unbounded_channel();
            let observer = Observer::new(tx, also, self.cfg.build_log_max_bytes);
            let writer = tokio::spawn(write_events(self.store.clone(), build_id.to_owned(), rx));
            self.store.claim_build(build_id, std::process::id()).await?;
            if self.build_slots.available_permits() == 0 {
                observer.system("build queued, waiting for dispatch".into());
            }
            // Held for the whole build: builds beyond the host's capacity wait `pending`.
            let Ok(_slot) = self.build_slots.acquire().await else {
                return Ok(self.store.get_build(build_id).await?);
            };
            if let Err(e) = self.store.start_build(build_id).await {
                // Cancelled while queued, or taken by another process: not ours to finish.
                tracing::info!(error = %e, "build not started");
                drop(observer);
                let _ = writer.await;
                return Ok(self.store.get_build(build_id).await?);
            }
            let _running = self.running_builds.enter(build_id);
            let outcome = self.run_build_with(&build, &template, &observer).await;
            drop(observer);
            let _ = writer.await;
            let finished = match outcome {
                Ok(size_bytes) => {
                    let done = self
                        .store
                        .finish_build(build_id, Ok(BuiltArtifact { size_bytes }))
                        .await;
                    if done.is_err() {
                        // Cancelled or deleted while it was being published: the artifact
                        // has no owner.
                        if let Ok(dir) = self.layout.artifact_dir(&template.id, build_id) {
                            crate::sandboxes::remove_dir_quiet(&dir);
                        }
                    }
                    done?
                }
                Err(BuildEnd::Cancelled) => {
                    self.store.cancel_build(&build.team_id, build_id).await?
                }
                Err(BuildEnd::Failed(e)) => {
                    self.store.finish_build(build_id, Err(e.message())).await?
                }
            };
            Ok(finished)
        }
        .instrument(span)
        .await
        .map(|b: Build| wire::build(&b))
    }

    async fn run_build_with(
        &self,
        build: &Build,
        template: &Template,
        observer: &Observer,
    ) -> Result<u64, BuildEnd> {
        let failed = |code: BuildErrorCode, detail: String| {
            BuildEnd::Failed(kiln_build::BuildError::new(code, detail))
        };
        let env = self
            .build_env()
            .await
            .map_err(|e| failed(BuildErrorCode::BootFailed, e.to_string()))?;
        let spec = template
            .spec()
            .map_err(|e| failed(BuildErrorCode::BuildFailed, e.to_string()))?;
        let staging = self
            .layout
            .staging_dir(&template.id, &build.id)
            .map_err(|e| failed(BuildErrorCode::BuildFailed, e.to_string()))?;
        let _ = std::fs::remove_dir_all(&staging);
        std::fs::create_dir_all(&staging).map_err(|e| {
            failed(
                BuildErrorCode::BuildFailed,
                format!("creating {}: {e}", staging.display()),
            )
        })?;
        if !build.no_cache {
            match self
                .reuse_artifact(build, template, &spec.from, &staging, observer)
                .await
            {
                Ok(Some(size)) => return Ok(size),
                Ok(None) => {}
                // The cache is an optimisation: a miss for any reason builds normally.
                Err(e) => observer.system(format!("build cache not used: {e}")),
            }
        }
        let job = BuildJob {
            name: format!("build-{}", short(&build.id)),
            spec,
            resources: template.resources(),
            bundle_dir: staging.join("bundle"),
            cache_scope: build.team_id.clone(),
            no_cache: build.no_cache,
        };

        let cancel = CancellationToken::new();
        let watcher = tokio::spawn(watch_cancel(
            self.store.clone(),
            build.id.clone(),
            cancel.clone(),
        ));
        let result = run_build(env, &job, observer, &cancel).await;
        watcher.abort();
        let result = match result {
            Ok(out) => self.publish(build, template, &staging, out).await,
            Err(e) => Err(e),
        };
        if result.is_err() {
            let _ = std::fs::remove_dir_all(&staging);
        }
        result
    }

    /// Writes the artifact manifest and makes the artifact visible at its final path.
    /// The build cache: when a ready build of the team has the same spec hash (spec and
    /// VM shape) and its base image reference still resolves to the same digest, its
    /// artifact is this build's too (hard links, nothing copied, no VM booted). Returns the
    /// artifact's size, or `None` on a miss.
    async fn reuse_artifact(
        &self,
        build: &Build,
        template: &Template,
        from: &str,
        staging: &std::path::Path,
        observer: &Observer,
    ) -> std::result::Result<Option<u64>, String> {
        // A tag is resolved again (it may have moved); a digest reference is answered
        // from the local store.
        let image = self.images.resolve(from).await.map_err(|e| e.to_string())?;
        let candidates = self
            .store
            .reusable_builds(
                &build.team_id,
                &build.build_spec_hash,
                &image.digest,
                &build.id,
            )
            .await
            .map_err(|e| e.to_string())?;
        for prev in candidates {
            let Ok(src) = self.layout.artifact_dir(&prev.template_id, &prev.id) else {
                continue;
            };
            // Every listed file is there with its size (a cheap check: the bundle's
            // digests are checked before any restore); published files are immutable.
            let mut manifest = match ArtifactManifest::read(&src) {
                Ok(m) if !m.files.is_empty() => m,
                Ok(_) => {
                    observer.system(format!(
                        "build cache: build {} lists no files (made by an older kiln); not reused",
                        prev.id
                    ));
                    continue;
                }
                Err(e) => {
                    observer.system(format!(
                        "build cache: build {} is damaged ({e}); not reused",
                        prev.id
                    ));
                    continue;
                }
            };
            link_tree(&src, staging).map_err(|e| format!("linking {}: {e}", src.display()))?;
            manifest.template_id = template.id.clone();
            manifest.build_id = build.id.clone();
            manifest.created_at = chrono::Utc::now();
            manifest.write(staging).map_err(|e| e.to_string())?;
            let _ = self
                .store
                .set_build_image_digest(&build.id, &image.digest)
                .await;
            let dest = self
                .layout
                .artifact_dir(&template.id, &build.id)
                .map_err(|e| e.to_string())?;
            kiln_store::publish_dir(staging, &dest).map_err(|e| e.to_string())?;
            observer.system(format!(
                "build cache hit: the steps and the snapshot of build {} are reused (same spec, \
                 base image {}); no VM was booted",
                prev.id, image.digest
            ));
            return Ok(Some(manifest.total_size()));
        }
        Ok(None)
    }

    async fn publish(
        &self,
        build: &Build,
        template: &Template,
        staging: &std::path::Path,
        out: kiln_build::BuildOutput,
    ) -> Result<u64, BuildEnd> {
        let fail = |detail: String| {
            BuildEnd::Failed(kiln_build::BuildError::new(
                BuildErrorCode::SnapshotFailed,
                detail,
            ))
        };
        let _ = self
            .store
            .set_build_image_digest(&build.id, &out.image_digest)
            .await;
        let runtime = out.defaults.clone();
        let mut manifest = ArtifactManifest::new(
            &template.id,
            &build.id,
            &out.image_digest,
            &build.build_spec_hash,
            runtime,
            template.resources(),
        );
        manifest.trust = out.trust.clone();
        for (name, size) in &out.files {
            manifest
                .list_file(&format!("bundle/{name}"), *size)
                .map_err(|e| fail(format!("listing the artifact's files: {e}")))?;
        }
        manifest
            .write(staging)
            .map_err(|e| fail(format!("writing the artifact manifest: {e}")))?;
        let dest = self
            .layout
            .artifact_dir(&template.id, &build.id)
            .map_err(|e| fail(e.to_string()))?;
        kiln_store::publish_dir(staging, &dest)
            .map_err(|e| fail(format!("publishing the artifact: {e}")))?;
        Ok(manifest.total_size())
    }
}

/// Recreates the tree at `src` under `dst` (which exists) with hard links to its files:
/// published artifacts are never written again, so sharing them is safe and instant.
fn link_tree(src: &std::path::Path, dst: &std::path::Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(src)? {
        let entry = entry?;
        let (from, to) = (entry.path(), dst.join(entry.file_name()));
        let kind = entry.file_type()?;
        if kind.is_dir() {
            std::fs::create_dir(&to)?;
            link_tree(&from, &to)?;
        } else if kind.is_file() {
            std::fs::hard_link(&from, &to)?;
        }
    }
    Ok(())
}

/// How long deleting a template waits for its cancelled builds to stop.
pub const DELETE_WAIT: Duration = Duration::from_secs(60);

/// The builds this process is running, so that a delete can wait for them to stop.
#[derive(Debug, Default)]
pub(crate) struct RunningBuilds {
    ids: std::sync::Mutex<std::collections::HashSet<String>>,
    changed: tokio::sync::Notify,
}

/// Removes its build from [`RunningBuilds`] when the runner ends, however it ends.
pub(crate) struct Running<'a> {
    set: &'a RunningBuilds,
    id: String,
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.set.lock().remove(&self.id);
        self.set.changed.notify_waiters();
    }
}

impl RunningBuilds {
    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<String>> {
        self.ids.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn enter(&self, id: &str) -> Running<'_> {
        self.lock().insert(id.to_owned());
        Running {
            set: self,
            id: id.to_owned(),
        }
    }

    /// Waits until none of `ids` is running here, or `within` has passed.
    pub(crate) async fn wait_gone(&self, ids: &[String], within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let changed = self.changed.notified();
            if !ids.iter().any(|id| self.lock().contains(id)) {
                return;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                tracing::warn!("cancelled builds still running after {within:?}");
                return;
            }
        }
    }
}

fn short(id: &str) -> &str {
    id.get(..8).unwrap_or(id)
}

async fn watch_cancel(store: kiln_store::Store, build_id: String, cancel: CancellationToken) {
    loop {
        tokio::time::sleep(CANCEL_POLL).await;
        match store.get_build(&build_id).await {
            Ok(b) if b.status == BuildStatus::Cancelled => {
                cancel.cancel();
                return;
            }
            Ok(b) if b.status.is_terminal() => return,
            _ => {}
        }
    }
}

enum Event {
    Line(LogLine),
    Phase(Phase),
}

/// Sends a build's lines and phases to the store writer (and to `also`), keeping at most
/// `max_bytes` of the build's output (stdout and stderr, a newline counted per line):
/// past it further output is dropped and one `system` line says so. kiln's own `system`
/// lines always pass (they say how the build went), and they are few. The channels stay
/// unbounded because a sink cannot wait (it is called from the build's hot path): the cap
/// is what bounds what they can hold.
struct Observer {
    tx: mpsc::UnboundedSender<Event>,
    also: Option<mpsc::UnboundedSender<BuildLogEvent>>,
    max_bytes: u64,
    output_bytes: AtomicU64,
    truncated: AtomicBool,
}

impl Observer {
    fn new(
        tx: mpsc::UnboundedSender<Event>,
        also: Option<mpsc::UnboundedSender<BuildLogEvent>>,
        max_bytes: u64,
    ) -> Self {
        Self {
            tx,
            also,
            max_bytes,
            output_bytes: AtomicU64::new(0),
            truncated: AtomicBool::new(false),
        }
    }

    fn forward(&self, line: LogLine) {
        if let Some(also) = &self.also {
            let new = to_store_line(line.clone());
            let _ = also.send(BuildLogEvent {
                timestamp: new.timestamp,
                stream: new.stream,
                text: new.text,
                finished: false,
                status: None,
            });
        }
        let _ = self.tx.send(Event::Line(line));
    }
}

impl LogSink for Observer {
    fn line(&self, line: LogLine) {
        if line.stream != Stream::System {
            let n = line.text.len() as u64 + 1;
            if self.output_bytes.fetch_add(n, Ordering::Relaxed) + n > self.max_bytes {
                if !self.truncated.swap(true, Ordering::Relaxed) {
                    self.forward(LogLine {
                        timestamp: line.timestamp,
                        stream: Stream::System,
                        text: format!(
                            "build log truncated: the build's output passed {} bytes; \
                             further output is not kept",
                            self.max_bytes
                        ),
                    });
                }
                return;
            }
        }
        self.forward(line);
    }
}

impl BuildObserver for Observer {
    fn phase(&self, phase: Phase) {
        let _ = self.tx.send(Event::Phase(phase));
    }
}

/// Appends lines to the store in batches, in order, and follows the build's phases.
async fn write_events(
    store: kiln_store::Store,
    build_id: String,
    mut rx: mpsc::UnboundedReceiver<Event>,
) {
    let mut batch = Vec::new();
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(event) = next.take().or_else(|| rx.try_recv().ok()) {
            match event {
                Event::Line(line) => batch.push(to_store_line(line)),
                Event::Phase(phase) => {
                    flush(&store, &build_id, &mut batch).await;
                    if phase == Phase::Snapshotting {
                        if let Err(e) = store.mark_snapshotting(&build_id).await {
                            tracing::warn!(error = %e, "could not mark the build snapshotting");
                        }
                    }
                }
            }
            if batch.len() >= 256 {
                flush(&store, &build_id, &mut batch).await;
            }
        }
        flush(&store, &build_id, &mut batch).await;
    }
}

async fn flush(store: &kiln_store::Store, build_id: &str, batch: &mut Vec<NewLogLine>) {
    if batch.is_empty() {
        return;
    }
    if let Err(e) = store.append_logs(build_id, batch).await {
        tracing::warn!(error = %e, lines = batch.len(), "could not store build log lines");
    }
    batch.clear();
}

fn to_store_line(line: LogLine) -> NewLogLine {
    let stream = match line.stream {
        Stream::Stdout => LogStream::Stdout,
        Stream::Stderr => LogStream::Stderr,
        Stream::System => LogStream::System,
    };
    NewLogLine {
        timestamp: line.timestamp.into(),
        stream,
        text: line.text,
    }
}

/// The `"<code>: <detail>"` a failed build carries, parsed.
pub fn build_failure(build: &BuildInfo) -> Option<CodedMessage> {
    build.error_message.as_deref().map(CodedMessage::parse)
}

#[cfg(test)]
mod tests {
    use kiln_build::{LineSplitter, OutputStream};

    use super::*;
    use crate::testing::TestEngine;

    #[tokio::test]
    async fn a_build_log_stops_at_its_cap_and_says_so_once() {
        let t = TestEngine::new(kiln_store::Limits::UNLIMITED, 0)
            .await
            .unwrap();
        let (_, build_id) = t.queued_build("acme", "loud").await.unwrap();
        let team = t.team("acme").await.unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        let (also, mut terminal) = mpsc::unbounded_channel();
        // Ten lines of "line NNNN" and their newlines fill it exactly.
        let observer = Observer::new(tx, Some(also), 100);
        let writer = tokio::spawn(write_events(t.engine.store.clone(), build_id.clone(), rx));
        observer.system("step 1/1: RUN loud".into());
        let mut split = LineSplitter::default();
        for i in 0..30 {
            let line = format!("line {i:04}\n");
            split.feed(OutputStream::Stdout, line.as_bytes(), &observer);
        }
        observer.system("step 1/1 failed".into());
        drop(observer);
        writer.await.unwrap();

        let notice = "build log truncated: the build's output passed 100 bytes; further \
                      output is not kept";
        let mut expected = vec![(LogStream::System, "step 1/1: RUN loud".to_owned())];
        expected.extend((0..10).map(|i| (LogStream::Stdout, format!("line {i:04}"))));
        expected.push((LogStream::System, notice.to_owned()));
        expected.push((LogStream::System, "step 1/1 failed".to_owned()));
        let stored: Vec<_> = (t.engine.build_log(&team, &build_id).await.unwrap())
            .into_iter()
            .map(|e| (e.stream, e.text))
            .collect();
        assert_eq!(stored, expected);
        let mut shown = Vec::new();
        while let Ok(e) = terminal.try_recv() {
            shown.push((e.stream, e.text));
        }
        assert_eq!(shown, expected);
    }
}
