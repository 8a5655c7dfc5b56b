//! The engine test harness: an engine on a fresh state dir with the test kernel and
//! registry (see `templates_vm.rs` for the prerequisites), and small helpers.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use kiln_api::{BuildInfo as Build, BuildStatus};
use kiln_engine::{Engine, EngineConfig};
use kiln_spec::{CodedMessage, TemplateRequest};
use serde_json::json;

pub struct Env {
    pub engine: Arc<Engine>,
    pub team: String,
    pub registry: String,
    pub dir: tempfile::TempDir,
}

pub fn assets() -> PathBuf {
    std::env::var_os("KILN_TEST_ASSETS")
        .filter(|v| !v.is_empty())
        .map_or_else(|| PathBuf::from("/var/tmp/kiln-test-assets"), PathBuf::from)
}

pub fn registry(assets: &Path) -> String {
    let path = assets.join("registry.env");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}\n-> run scripts/test-registry.sh start",
            path.display()
        )
    });
    text.lines()
        .find_map(|l| l.strip_prefix("KILN_TEST_REGISTRY="))
        .map(|v| v.trim_matches('"').to_owned())
        .expect("KILN_TEST_REGISTRY in registry.env")
}

/// An engine on a fresh state dir; `ready_timeout` bounds `readyCmd` (short where a test
/// wants `ready_cmd_failed` soon).
pub async fn env(ready_timeout: Duration) -> Env {
    env_with_pool(ready_timeout, 0).await
}

/// [`env`] with a restore pool of `pool` processes per build.
pub async fn env_with_pool(ready_timeout: Duration, pool: usize) -> Env {
    let assets = assets();
    let kernel = assets.join("state/kernel");
    assert!(
        kernel.is_dir(),
        "{} missing -> run scripts/test.sh (it runs `kiln setup` for the tests)",
        kernel.display()
    );
    // Short path: VM sockets live under the state dir.
    let dir = tempfile::Builder::new()
        .prefix("ke")
        .tempdir_in("/tmp")
        .unwrap();
    std::os::unix::fs::symlink(&kernel, dir.path().join("kernel")).unwrap();
    let mut cfg = EngineConfig::new(dir.path());
    cfg.timing.ready_timeout = ready_timeout;
    cfg.timing.ready_interval = Duration::from_secs(1);
    cfg.restore_pool = pool;
    let engine = Engine::open(cfg).await.unwrap();
    let team = engine.local_team().await.unwrap().id;
    Env {
        engine,
        team,
        registry: registry(&assets),
        dir,
    }
}

impl Env {
    pub async fn build(&self, name: &str, spec: serde_json::Value) -> Build {
        let mut doc = spec;
        doc["name"] = json!(name);
        let req = TemplateRequest::parse_and_validate(&doc).unwrap_or_else(|p| panic!("{p}"));
        let (_, build) = self.engine.submit(&self.team, &req).await.unwrap();
        self.engine.run_build(&build.id, None).await.unwrap()
    }

    pub async fn failure(&self, name: &str, spec: serde_json::Value) -> CodedMessage {
        let b = self.build(name, spec).await;
        assert_eq!(b.status, BuildStatus::Failed, "{b:?}");
        CodedMessage::parse(b.error_message.as_deref().unwrap())
    }

    pub fn image(&self, name: &str) -> String {
        format!("{}/kiln/{name}:latest", self.registry)
    }
}

pub async fn exec(vm: &dyn kiln_vm::Machine, cmd: &str) -> (String, i32) {
    let out = vm
        .agent()
        .exec_collect(kiln_vm::ExecRequest {
            command: cmd.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    (text, out.status.code.unwrap_or(-1))
}

/// QEMU processes whose command line mentions `needle` (a state dir): pid and cmdline.
pub fn qemu_of(needle: &str) -> Vec<(i32, String)> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|p| {
            let pid = p.file_name().to_str()?.parse::<i32>().ok()?;
            let c = std::fs::read(p.path().join("cmdline")).ok()?;
            Some((pid, String::from_utf8_lossy(&c).replace('\0', " ")))
        })
        .filter(|(_, c)| c.starts_with("qemu-system") && c.contains(needle))
        .collect()
}

/// No QEMU of this engine's state dir runs, and no VM run directory is left.
pub async fn assert_no_vms(e: &Env) {
    let root = e.engine.layout().root().display().to_string();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let left: Vec<String> = qemu_of(&root).into_iter().map(|q| q.1).collect();
        if left.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "qemu left running: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let vms: Vec<_> = std::fs::read_dir(e.engine.layout().root().join("vms"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(vms.is_empty(), "VM run dirs left: {vms:?}");
}
