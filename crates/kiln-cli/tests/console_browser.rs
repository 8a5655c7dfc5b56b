//! The web console in a real browser: `kiln serve` on a fresh state dir with a real
//! template (built here, under TCG), driven by `tests/console/browser_test.py` through
//! Playwright and Debian's `chromium` (no browser download): sign in, the template and its
//! build log, the spec editor, a sandbox created, its terminal typed into (the effect
//! checked through the API), paused, resumed and killed, with no JavaScript error on any
//! page. Screenshots of each page land in `target/console-screenshots/` (the best ones are
//! in docs/console.md).
//!
//! Needs what `scripts/test.sh` sets up: the guest kernel, the test registry, the static
//! agent, `chromium` (scripts/lib.sh) and the Playwright venv (`scripts/browser-venv.sh`).
//! A missing prerequisite fails the test with the remedy; it never skips.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{
    api_key, assert_no_qemu, assets, build_template, registry, repo_root, Server, REMEDY,
};

/// Where the screenshots go (a test artifact).
fn screenshots() -> std::path::PathBuf {
    std::env::var_os("KILN_CONSOLE_SCREENSHOTS").map_or_else(
        || repo_root().join("target/console-screenshots"),
        Into::into,
    )
}

#[test]
fn the_console_works_in_a_real_browser() {
    let python = assets().join("browser-venv/bin/python");
    assert!(
        python.is_file(),
        "{} missing -> {REMEDY} (or scripts/browser-venv.sh)",
        python.display()
    );
    let chromium = Path::new("/usr/bin/chromium");
    assert!(
        chromium.is_file(),
        "{} missing -> {REMEDY} (it installs Debian's chromium)",
        chromium.display()
    );
    let script = repo_root().join("tests/console/browser_test.py");
    let registry = registry(&assets());
    let dir = common::state_dir("kcons");
    let state = dir.path();
    let key = api_key(state, "console");
    let server = Server::start(state, &[("KILN_READY_TIMEOUT_SECS", "120")]);
    build_template(
        &server.url,
        &[("x-api-key", key.as_str())],
        &serde_json::json!({
            "name": "web", "memory_mib": 512, "disk_mib": 2048,
            "build_spec": {
                "from": format!("{registry}/kiln/python:latest"),
                "steps": [{"run": "echo building; echo a warning >&2"}],
                "start_cmd": "sleep 100000", "ready_cmd": "true",
            },
        }),
        Duration::from_secs(600),
    );

    let status = Command::new(&python)
        .arg("-u")
        .arg(&script)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("KILN_URL", &server.url)
        .env("KILN_API_KEY", &key)
        .env("KILN_TEMPLATE", "web")
        .env("KILN_SCREENSHOTS", screenshots())
        .env("KILN_CHROMIUM", chromium)
        .stdin(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "the browser test failed: {status}");
    drop(server);
    assert_no_qemu(state, Duration::from_secs(30));
}
