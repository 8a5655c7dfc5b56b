//! Where a run's inputs come from (the test assets, the local registry, git, the tools'
//! versions, the load) and the state dir it removes on every exit path.

use std::path::{Path, PathBuf};

use anyhow::Context as _;

/// Removes the run's state dir on every exit path (unless asked to keep it).
pub struct RunDir {
    pub path: PathBuf,
    pub keep: bool,
}

impl Drop for RunDir {
    fn drop(&mut self) {
        if self.keep {
            eprintln!("kiln-bench: state kept in {}", self.path.display());
        } else if let Err(e) = std::fs::remove_dir_all(&self.path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                eprintln!("kiln-bench: cannot remove {}: {e}", self.path.display());
            }
        }
    }
}

/// `$KILN_TEST_ASSETS`, else the default test assets dir.
pub fn assets_dir() -> PathBuf {
    std::env::var_os("KILN_TEST_ASSETS")
        .filter(|v| !v.is_empty())
        .map_or_else(|| PathBuf::from("/var/tmp/kiln-test-assets"), PathBuf::from)
}

/// The local test registry (host:port): `--registry`, else `KILN_TEST_REGISTRY`, else the
/// test assets' `registry.env`.
pub fn registry(arg: Option<&str>, assets: &Path) -> anyhow::Result<String> {
    if let Some(r) = arg {
        return Ok(r.to_owned());
    }
    if let Some(r) = std::env::var("KILN_TEST_REGISTRY")
        .ok()
        .filter(|v| !v.is_empty())
    {
        return Ok(r);
    }
    let env = assets.join("registry.env");
    let text = std::fs::read_to_string(&env).with_context(|| {
        format!(
            "no test registry ({}): run scripts/test-registry.sh start",
            env.display()
        )
    })?;
    text.lines()
        .find_map(|l| l.strip_prefix("KILN_TEST_REGISTRY=").map(str::to_owned))
        .context("KILN_TEST_REGISTRY missing from registry.env")
}

/// `git ARGS`' trimmed stdout, if it succeeds.
pub fn git(args: &[&str]) -> Option<String> {
    let out = std::process::Command::new("git").args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// The first line of `TOOL --version`.
pub fn tool_version(tool: &str) -> String {
    std::process::Command::new(tool)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(str::to_owned)
        })
        .unwrap_or_default()
}

/// The 1, 5 and 15 minute load averages.
pub fn load_avg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}
