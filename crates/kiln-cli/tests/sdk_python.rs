//! End to end with Superserve's official Python SDK: `kiln serve` on a fresh state dir,
//! driven by `tests/sdk/python/scenario.py` with `superserve==0.11.4` unmodified except for
//! its data-plane host. Real VMs (TCG here): templates are built and sandboxes restored.
//!
//! Its preview step opens a signed preview URL in headless Chromium (Debian's, through the
//! Playwright venv of `scripts/browser-venv.sh`).
//!
//! Needs what `scripts/test.sh` sets up: the guest kernel (`kiln setup` into
//! `$KILN_TEST_ASSETS/state`), the test registry (`scripts/test-registry.sh start`), the
//! static agent, the SDK's venv (`scripts/sdk-venv.sh`), `chromium` and the Playwright
//! venv. A missing prerequisite fails the test with the remedy; it never skips.

mod common;

use std::process::Command;

use common::{assets, repo_root, run_sdk_scenario, REMEDY};

#[test]
fn the_official_python_sdk_drives_kiln_serve() {
    let python = assets().join("sdk-venv/bin/python");
    assert!(
        python.is_file(),
        "{} missing -> {REMEDY} (or scripts/sdk-venv.sh)",
        python.display()
    );
    let scenario = repo_root().join("tests/sdk/python/scenario.py");
    assert!(scenario.is_file(), "{} missing", scenario.display());
    let browser_python = assets().join("browser-venv/bin/python");
    assert!(
        browser_python.is_file(),
        "{} missing -> {REMEDY} (or scripts/browser-venv.sh)",
        browser_python.display()
    );
    let chromium = std::path::Path::new("/usr/bin/chromium");
    assert!(
        chromium.is_file(),
        "{} missing -> {REMEDY} (it installs Debian's chromium)",
        chromium.display()
    );

    let mut py = Command::new(&python);
    py.arg("-u")
        .arg(&scenario)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("KILN_BROWSER_PYTHON", &browser_python)
        .env("KILN_CHROMIUM", chromium);
    run_sdk_scenario("ksdk", py, "scripts/sdk-venv.sh");
}
