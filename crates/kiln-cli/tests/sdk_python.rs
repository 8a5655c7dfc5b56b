//! End to end with Superserve's official Python SDK: `kiln serve` on a fresh state dir,
//! driven by `tests/sdk/python/scenario.py` with `superserve==0.11.4` unmodified except for
//! its data-plane host. Real VMs (TCG here): templates are built and sandboxes restored.
//!
//! Needs what `scripts/test.sh` sets up: the guest kernel (`kiln setup` into
//! `$KILN_TEST_ASSETS/state`), the test registry (`scripts/test-registry.sh start`), the
//! static agent and the SDK's venv (`scripts/sdk-venv.sh`). A missing prerequisite fails
//! the test with the remedy; it never skips.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{api_key, assets, forward, reap_qemu, registry, repo_root, wait_for, Server, REMEDY};

/// The whole scenario: two TCG builds (~60-90 s each, overlapping) and a sandbox's life.
const SCENARIO_TIMEOUT: Duration = Duration::from_secs(15 * 60);
/// The team's template limit on the server: the scenario owns two templates when it asks
/// for a third and expects `too_many_templates`.
const MAX_TEMPLATES: &str = "2";
/// The team's sandbox limit: the scenario runs one sandbox and expects a second to be
/// refused with `too_many_sandboxes`.
const MAX_SANDBOXES: &str = "1";

#[test]
fn the_official_python_sdk_drives_kiln_serve() {
    // -- prerequisites
    let assets = assets();
    let registry = registry(&assets);
    let python = assets.join("sdk-venv/bin/python");
    assert!(
        python.is_file(),
        "{} missing -> {REMEDY} (or scripts/sdk-venv.sh)",
        python.display()
    );
    let scenario = repo_root().join("tests/sdk/python/scenario.py");
    assert!(scenario.is_file(), "{} missing", scenario.display());

    let dir = common::state_dir("ksdk");
    let state = dir.path();
    let key = api_key(state, "sdk");
    let mut server = Server::start(
        state,
        &[
            ("KILN_READY_TIMEOUT_SECS", "300"),
            ("KILN_MAX_TEMPLATES", MAX_TEMPLATES),
            ("KILN_MAX_SANDBOXES", MAX_SANDBOXES),
        ],
    );
    let base_url = server.url.clone();
    eprintln!("kiln serve at {base_url}, state {}", state.display());

    // -- the scenario
    let started = Instant::now();
    let mut py = Command::new(&python)
        .arg("-u")
        .arg(&scenario)
        .env("SUPERSERVE_API_KEY", &key)
        .env("SUPERSERVE_BASE_URL", &base_url)
        .env(
            "KILN_TEST_IMAGE_PYTHON",
            format!("{registry}/kiln/python:latest"),
        )
        .env("KILN_MAX_TEMPLATES", MAX_TEMPLATES)
        .env("KILN_MAX_SANDBOXES", MAX_SANDBOXES)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        // Loopback only: no proxy may stand between the SDK and the server.
        .env("NO_PROXY", "*")
        .env("no_proxy", "*")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out_fwd = forward(py.stdout.take().unwrap(), "sdk", None);
    let err_fwd = forward(py.stderr.take().unwrap(), "sdk stderr", None);
    let finished = wait_for(&mut py, SCENARIO_TIMEOUT);
    if !finished {
        let _ = py.kill();
    }
    let status = py.wait().unwrap();
    let _ = out_fwd.join();
    let _ = err_fwd.join();
    eprintln!(
        "scenario ended after {:.0}s: {status}",
        started.elapsed().as_secs_f64()
    );

    // -- the server goes, and takes every VM of this state dir with it
    let crashed = server.exited();
    drop(server);
    let left = reap_qemu(state, Duration::from_secs(15));

    assert!(
        crashed.is_none(),
        "kiln serve exited during the scenario ({crashed:?}): see its log above"
    );
    assert!(
        finished,
        "the SDK scenario did not finish within {SCENARIO_TIMEOUT:?}"
    );
    assert!(
        status.success(),
        "the SDK scenario failed ({status}): see its FAIL line above"
    );
    assert!(
        left.is_empty(),
        "qemu processes of the test's state dir outlived kiln serve: {left:#?}"
    );
}
