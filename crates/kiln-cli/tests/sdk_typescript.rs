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

use std::process::Command;

use common::{assets, repo_root, run_sdk_scenario, REMEDY};

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
    let sdk_dir = assets().join("sdk-node");
    let sdk = sdk_dir.join("node_modules/@superserve/sdk/package.json");
    assert!(
        sdk.is_file(),
        "{} missing -> {REMEDY} (or scripts/sdk-node.sh)",
        sdk.display()
    );
    let scenario = repo_root().join("tests/sdk/ts/scenario.mjs");
    assert!(scenario.is_file(), "{} missing", scenario.display());

    let mut node = Command::new("node");
    // The SDK's commands.spawn needs a global WebSocket: Node 22 has one, Node 20.10+ behind
    // a flag; older Nodes get the `ws` package from the scenario.
    if node_eval(
        "typeof WebSocket === 'undefined' && \
         process.allowedNodeEnvironmentFlags.has('--experimental-websocket')",
    ) == "true"
    {
        node.arg("--experimental-websocket");
    }
    node.arg(&scenario)
        // The scenario loads the SDK from its cwd's node_modules (ESM ignores NODE_PATH;
        // it is set for the CommonJS lookups).
        .current_dir(&sdk_dir)
        .env("NODE_PATH", sdk_dir.join("node_modules"))
        .env_remove("NODE_OPTIONS");
    run_sdk_scenario("ktsdk", node, "scripts/sdk-node.sh");
}
