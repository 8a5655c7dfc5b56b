//! End to end with Superserve's official TypeScript SDK: `kiln serve` on a fresh state dir,
//! driven by `tests/sdk/ts/scenario.mjs` with `@superserve/sdk@0.8.1` unmodified except for
//! its data-plane host (a `fetch` and a `WebSocket` wrapper in the scenario). Real VMs (TCG
//! here): templates are built and sandboxes restored.
//!
//! Needs what `scripts/test.sh` sets up: the guest kernel (`kiln setup` into
//! `$KILN_TEST_ASSETS/state`), the test registry (`scripts/test-registry.sh start`), the
//! static agent, Node.js and the SDK's node_modules (`scripts/sdk-node.sh`). A missing
//! prerequisite fails the test with the remedy; it never skips.

mod common;

use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{
    api_key, assert_no_qemu, assets, forward, registry, repo_root, wait_for, Server, REMEDY,
};

/// The whole scenario: two TCG builds (~60-90 s each, overlapping) and a sandbox's life.
const SCENARIO_TIMEOUT: Duration = Duration::from_secs(15 * 60);
/// The team's template limit on the server: the scenario owns two templates when it asks
/// for a third and expects `too_many_templates`.
const MAX_TEMPLATES: &str = "2";
/// The team's sandbox limit: the scenario runs one sandbox and expects a second to be
/// refused with `too_many_sandboxes`.
const MAX_SANDBOXES: &str = "1";

/// `node -p EXPR` (trimmed), or the remedy when there is no usable `node`.
fn node_eval(expr: &str) -> String {
    let out = Command::new("node")
        .args(["-p", expr])
        .output()
        .unwrap_or_else(|e| panic!("node: {e}\n-> {REMEDY} (or scripts/sdk-node.sh)"));
    assert!(
        out.status.success(),
        "node -p {expr:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
fn the_official_typescript_sdk_drives_kiln_serve() {
    // -- prerequisites
    let assets = assets();
    let registry = registry(&assets);
    let sdk_dir = assets.join("sdk-node");
    let sdk = sdk_dir.join("node_modules/@superserve/sdk/package.json");
    assert!(
        sdk.is_file(),
        "{} missing -> {REMEDY} (or scripts/sdk-node.sh)",
        sdk.display()
    );
    let scenario = repo_root().join("tests/sdk/ts/scenario.mjs");
    assert!(scenario.is_file(), "{} missing", scenario.display());
    // The SDK's commands.spawn needs a global WebSocket: Node 22 has one, Node 20.10+ behind
    // a flag; older Nodes get the `ws` package from the scenario.
    let mut node_args: Vec<&str> = Vec::new();
    if node_eval(
        "typeof WebSocket === 'undefined' && \
         process.allowedNodeEnvironmentFlags.has('--experimental-websocket')",
    ) == "true"
    {
        node_args.push("--experimental-websocket");
    }

    // -- a fresh state dir (short: VM sockets live under it) and the server
    let dir = common::state_dir("ktsdk");
    let state = dir.path();
    let state_str = state.to_str().unwrap().to_owned();
    let key = api_key(state, "sdk");
    let server = Server::start(
        state,
        &[
            ("KILN_READY_TIMEOUT_SECS", "300"),
            ("KILN_MAX_TEMPLATES", MAX_TEMPLATES),
            ("KILN_MAX_SANDBOXES", MAX_SANDBOXES),
        ],
    );
    let base_url = server.url.clone();
    eprintln!("kiln serve at {base_url}, state {state_str}");

    // -- the scenario
    let started = Instant::now();
    let mut node = Command::new("node")
        .args(&node_args)
        .arg(&scenario)
        // The scenario loads the SDK from its cwd's node_modules (ESM ignores NODE_PATH;
        // it is set for the CommonJS lookups).
        .current_dir(&sdk_dir)
        .env("NODE_PATH", sdk_dir.join("node_modules"))
        .env("SUPERSERVE_API_KEY", &key)
        .env("SUPERSERVE_BASE_URL", &base_url)
        .env(
            "KILN_TEST_IMAGE_PYTHON",
            format!("{registry}/kiln/python:latest"),
        )
        .env("KILN_MAX_TEMPLATES", MAX_TEMPLATES)
        .env("KILN_MAX_SANDBOXES", MAX_SANDBOXES)
        .env_remove("NODE_OPTIONS")
        // Loopback only: no proxy may stand between the SDK and the server.
        .env_remove("HTTP_PROXY")
        .env_remove("HTTPS_PROXY")
        .env_remove("http_proxy")
        .env_remove("https_proxy")
        .env("NO_PROXY", "*")
        .env("no_proxy", "*")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("node: {e}\n-> {REMEDY} (or scripts/sdk-node.sh)"));
    let out_fwd = forward(node.stdout.take().unwrap(), "sdk", None);
    let err_fwd = forward(node.stderr.take().unwrap(), "sdk stderr", None);
    let finished = wait_for(&mut node, SCENARIO_TIMEOUT);
    if !finished {
        let _ = node.kill();
    }
    let status = node.wait().unwrap();
    let _ = out_fwd.join();
    let _ = err_fwd.join();
    eprintln!(
        "scenario ended after {:.0}s: {status}",
        started.elapsed().as_secs_f64()
    );

    // -- the server goes, and takes every VM of this state dir with it
    let addr = base_url.trim_start_matches("http://");
    let alive = TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(3)).is_ok();
    drop(server);
    assert!(
        alive,
        "kiln serve stopped answering during the scenario: see its log above"
    );
    assert!(
        finished,
        "the SDK scenario did not finish within {SCENARIO_TIMEOUT:?}"
    );
    assert!(
        status.success(),
        "the SDK scenario failed ({status}): see its FAIL line above"
    );
    assert_no_qemu(state, Duration::from_secs(15));
}
