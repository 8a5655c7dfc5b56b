//! Test support for code above the engine (feature `testing`): an engine on a temporary
//! state directory whose VMs are [`kiln_vm::fake::FakeHypervisor`]'s, and state seeded
//! without running builds, so that the server's router tests (and the engine's own) drive
//! real lifecycles without QEMU.

use std::sync::Arc;

use kiln_api::SandboxStatus;
use kiln_store::{ArtifactManifest, BuiltArtifact, Limits, NewSandbox};
use kiln_vm::fake::FakeHypervisor;

use crate::error::Result;
use crate::{Engine, EngineConfig, Owner};

/// An engine on the fake hypervisor, and its state directory (removed on drop).
#[derive(Debug)]
pub struct TestEngine {
    /// The engine.
    pub engine: Arc<Engine>,
    /// Its VMs.
    pub hypervisor: FakeHypervisor,
    /// Its state directory.
    pub dir: tempfile::TempDir,
}

impl TestEngine {
    /// A server-like engine (it owns its sandboxes' VMs) with `limits`, and `pool` VMs
    /// kept ahead per build.
    pub async fn new(limits: Limits, pool: usize) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("kt")
            .tempdir_in("/tmp")
            .map_err(crate::EngineError::io(
                "creating a temp dir in",
                "/tmp".as_ref(),
            ))?;
        Self::open_in(dir, limits, pool).await
    }

    /// [`TestEngine::new`] on an existing state directory (a "restarted server").
    pub async fn open_in(dir: tempfile::TempDir, limits: Limits, pool: usize) -> Result<Self> {
        let hypervisor = FakeHypervisor::new();
        let mut cfg = EngineConfig::new(dir.path());
        cfg.limits = limits;
        cfg.owner = Owner::Server;
        cfg.restore_pool = pool;
        cfg.hypervisor = Arc::new(hypervisor.clone());
        let engine = Engine::open(cfg).await?;
        Ok(Self {
            engine,
            hypervisor,
            dir,
        })
    }

    /// The id of team `name`, created if missing.
    pub async fn team(&self, name: &str) -> Result<String> {
        let store = &self.engine.store;
        Ok(match store.team_by_name(name).await? {
            Some(t) => t.id,
            None => store.create_team(name).await?.id,
        })
    }

    /// A template of team `team` whose build is `ready`, with an artifact the fake
    /// hypervisor restores (a small bundle, [`kiln_vm::fake::write_bundle`], and the
    /// artifact manifest with the template's runtime defaults: `TEMPLATE_VAR=template`,
    /// working directory `/srv`), made without a build. Returns the template's id.
    pub async fn ready_template(&self, team: &str, name: &str) -> Result<String> {
        let team_id = self.team(team).await?;
        self.ready_template_of(&team_id, name).await
    }

    /// A system template (`superserve/...`) whose build is ready, as
    /// [`TestEngine::ready_template`] makes one. Returns its id.
    pub async fn ready_system_template(&self, name: &str) -> Result<String> {
        self.ready_template_of(kiln_store::SYSTEM_TEAM_ID, name)
            .await
    }

    /// A system template whose first build is queued (`kiln serve` building it). Returns
    /// the template's and the build's ids.
    pub async fn queued_system_template(&self, name: &str) -> Result<(String, String)> {
        self.queued_template_of(kiln_store::SYSTEM_TEAM_ID, name)
            .await
    }

    async fn ready_template_of(&self, team_id: &str, name: &str) -> Result<String> {
        let (t, b) = self.queued_template_of(team_id, name).await?;
        self.finish_queued(&t, &b).await?;
        Ok(t)
    }

    /// A template of `team_id` named `name` (no name checks: system names too) whose
    /// first build is queued. Returns the template's and the build's ids.
    async fn queued_template_of(&self, team_id: &str, name: &str) -> Result<(String, String)> {
        let mut req = kiln_spec::TemplateRequest::parse_and_validate(&serde_json::json!({
            "build_spec": {"from": "127.0.0.1:9/kiln/none:1"}
        }))
        .map_err(crate::EngineError::Invalid)?;
        req.name = Some(name.to_owned());
        let (t, b) = self
            .engine
            .store
            .create_template_with_build(team_id, &req, &Limits::UNLIMITED)
            .await?;
        Ok((t.id, b.id))
    }

    /// The bundle sandboxes of template `template_id` restore from.
    pub async fn bundle_of(&self, team: &str, template_id: &str) -> Result<std::path::PathBuf> {
        let team_id = self.team(team).await?;
        self.engine.template_bundle(&team_id, template_id).await
    }

    /// A sandbox row of `template` in `status` with no VM behind it (what a server that
    /// does not run it sees), and its access token.
    pub async fn seed_sandbox(
        &self,
        team: &str,
        template: &str,
        metadata: &[(&str, &str)],
        status: SandboxStatus,
    ) -> Result<(String, String)> {
        let team_id = self.team(team).await?;
        let store = &self.engine.store;
        let new = NewSandbox {
            template: template.into(),
            metadata: metadata
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            ..Default::default()
        };
        let (s, token) = store
            .create_sandbox(&team_id, &new, &Limits::UNLIMITED)
            .await?;
        let path: &[SandboxStatus] = match status {
            SandboxStatus::Starting => &[],
            SandboxStatus::Active => &[SandboxStatus::Active],
            SandboxStatus::Paused => &[
                SandboxStatus::Active,
                SandboxStatus::Pausing,
                SandboxStatus::Paused,
            ],
            other => &[other],
        };
        for st in path {
            store.set_sandbox_status(&team_id, &s.id, *st).await?;
        }
        Ok((s.id, token))
    }

    /// A template whose first build is queued and that nothing runs (its log stream waits).
    /// Returns the template's and the build's ids.
    pub async fn queued_build(&self, team: &str, name: &str) -> Result<(String, String)> {
        let team_id = self.team(team).await?;
        self.queued_template_of(&team_id, name).await
    }

    /// Marks a queued build `ready` with an artifact, as [`TestEngine::ready_template`]
    /// makes one (a build "finishing" while something waits for it).
    pub async fn finish_queued(&self, template_id: &str, build_id: &str) -> Result<()> {
        let store = &self.engine.store;
        store.start_build(build_id).await?;
        store.mark_snapshotting(build_id).await?;
        let artifact = self.engine.layout.artifact_dir(template_id, build_id)?;
        std::fs::create_dir_all(&artifact)
            .map_err(crate::EngineError::io("creating", &artifact))?;
        kiln_vm::fake::write_bundle(&artifact.join("bundle"), kiln_vm::RamMode::File, "disk.raw")
            .map_err(crate::EngineError::Setup)?;
        let runtime = kiln_spec::RuntimeDefaults {
            env: vec![("TEMPLATE_VAR".into(), "template".into())],
            workdir: "/srv".into(),
            user: "root".into(),
        };
        ArtifactManifest::new(
            template_id,
            build_id,
            "sha256:0",
            "sha256:0",
            runtime,
            Default::default(),
        )
        .write(&artifact)?;
        store
            .finish_build(build_id, Ok(BuiltArtifact { size_bytes: 1 }))
            .await?;
        Ok(())
    }

    /// Gives a sandbox the `legacy_public` preview policy (every listening port served),
    /// which only sandboxes from before previews have and the API cannot set.
    pub async fn legacy_preview(&self, team: &str, sandbox_id: &str) -> Result<()> {
        let team_id = self.team(team).await?;
        self.engine
            .store
            .set_preview_access(&team_id, sandbox_id, kiln_api::PreviewAccess::LegacyPublic)
            .await?;
        Ok(())
    }

    /// Whether a build was asked to bypass the build cache.
    pub async fn build_no_cache(&self, build_id: &str) -> Result<bool> {
        Ok(self.engine.store.get_build(build_id).await?.no_cache)
    }
}
