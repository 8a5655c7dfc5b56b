//! Restart safety: `kill -9` of `kiln serve` with a build running, a sandbox live and one
//! paused, then a restart on the same state dir. Nothing stays orphaned (no VM, no VM run
//! dir, no staging files, no `active` row without a VM), and nothing that was saved is
//! lost (the paused sandbox resumes with its files and processes, the template still
//! starts sandboxes).
//! Real VMs under TCG; see `common` for the prerequisites.

mod common;

use std::time::Duration;

use common::{api_key, assert_no_qemu, assets, build_template, http, qemu_with, registry, Server};
use serde_json::{json, Value};

const BUILD_WITHIN: Duration = Duration::from_secs(400);

fn status(v: &Value) -> &str {
    v["status"].as_str().unwrap_or_default()
}

#[test]
fn a_restarted_server_settles_what_the_dead_one_left() {
    let registry = registry(&assets());
    let dir = common::state_dir("krs");
    let state = dir.path();
    let key = api_key(state, "acme");
    let h = [("x-api-key", key.as_str())];
    let image = format!("{registry}/kiln/minbase:latest");

    // No restore pool: the test counts this state dir's QEMUs to know when the create in
    // flight has its VM, and a pooled process would both count and be claimed.
    let server = Server::start(
        state,
        &[
            ("KILN_READY_TIMEOUT_SECS", "120"),
            ("KILN_RESTORE_POOL", "0"),
        ],
    );
    let url = server.url.clone();

    // A ready template whose start process is a sleeper.
    let spec = json!({
        "name": "base", "memory_mib": 256, "disk_mib": 1024,
        "build_spec": {
            "from": image,
            "steps": [{"run": "echo kept > /opt/kept"}],
            "start_cmd": "sleep 100000", "ready_cmd": "true",
        },
    });
    build_template(&url, &h, &spec, BUILD_WITHIN);

    let create = |base: &str, name: &str| {
        let (s, v) = http(
            "POST",
            &format!("{base}/sandboxes"),
            &h,
            Some(&json!({"name": name, "from_template": "base"})),
        );
        assert_eq!(s, 201, "{v}");
        v["id"].as_str().unwrap().to_owned()
    };
    let exec = |base: &str, id: &str, cmd: &str| {
        let v = common::exec(base, &key, id, &json!({"command": cmd}));
        v["stdout"].as_str().unwrap().trim().to_owned()
    };

    // One sandbox paused with a file of its own; one running.
    let paused = create(&url, "paused");
    exec(&url, &paused, "echo precious > /root/p");
    let (s, v) = http("POST", &format!("{url}/sandboxes/{paused}/pause"), &h, None);
    assert_eq!(s, 204, "{v}");
    let live = create(&url, "live");
    assert_eq!(exec(&url, &live, "cat /opt/kept"), "kept");

    // A build that will still be running when the server dies.
    let slow = json!({
        "name": "slow", "memory_mib": 256, "disk_mib": 1024,
        "build_spec": {"from": image, "steps": [{"run": "sleep 600"}]},
    });
    let (s, t) = http("POST", &format!("{url}/templates"), &h, Some(&slow));
    assert_eq!(s, 202, "{t}");
    let slow_id = t["id"].as_str().unwrap().to_owned();
    let slow_build = t["build_id"].as_str().unwrap().to_owned();
    // Its VM is up once two QEMUs run on this state dir (the live sandbox and the build).
    let needle = state.to_str().unwrap().to_owned();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while qemu_with(&needle).len() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "the build VM never came up"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let staging = state
        .join("templates")
        .join(&slow_id)
        .join(format!(".{slow_build}.partial"));
    assert!(
        staging.exists(),
        "{} should exist mid-build",
        staging.display()
    );

    // A create in flight: its VM is being restored when the server dies.
    let midway = {
        let (url, key) = (url.clone(), key.clone());
        std::thread::spawn(move || {
            // Its answer never comes: the connection dies with the server.
            let _ = std::process::Command::new("curl")
                .args(["-sS", "--max-time", "120", "-X", "POST", "-H"])
                .arg(format!("x-api-key: {key}"))
                .args(["-H", "content-type: application/json", "--data-binary"])
                .arg(json!({"name": "midway", "from_template": "base"}).to_string())
                .arg(format!("{url}/sandboxes"))
                .output();
        })
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while qemu_with(&needle).len() < 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "the mid-create VM never came up"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The VMs' run dirs (the build VM's disk and memory file, the sandboxes' overlays).
    let run_dirs: Vec<_> = std::fs::read_dir(state.join("vms"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(run_dirs.len() >= 3, "{run_dirs:?}");
    server.kill_9();
    midway.join().unwrap();
    // The VMs die with their owner (PDEATHSIG), with no clean-up code running.
    assert_no_qemu(state, Duration::from_secs(20));
    assert!(run_dirs.iter().all(|d| d.exists()), "{run_dirs:?}");

    let server = Server::start(state, &[]);
    let url = server.url.clone();
    let left: Vec<_> = run_dirs.iter().filter(|d| d.exists()).collect();
    assert!(
        left.is_empty(),
        "run dirs of the dead server left: {left:?}"
    );
    let (_, b) = http(
        "GET",
        &format!("{url}/templates/slow/builds/{slow_build}"),
        &h,
        None,
    );
    assert_eq!(status(&b), "failed", "{b}");
    assert_eq!(
        b["error_message"], "build_failed: interrupted by server restart",
        "{b}"
    );
    assert!(!staging.exists(), "{} left behind", staging.display());
    let (_, s) = http("GET", &format!("{url}/sandboxes/{live}"), &h, None);
    assert_eq!(status(&s), "failed", "{s}");
    assert!(!state.join("sandboxes").join(&live).exists());
    let (_, s) = http("GET", &format!("{url}/sandboxes/{paused}"), &h, None);
    assert_eq!(status(&s), "paused", "{s}");
    // The sandbox created midway is not left `starting` (or `active` without a VM).
    let (_, all) = http(
        "GET",
        &format!("{url}/sandboxes?status=starting,active,failed"),
        &h,
        None,
    );
    let mid: Vec<_> = all
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["name"] == "midway")
        .collect();
    assert_eq!(mid.len(), 1, "{all}");
    assert_eq!(status(mid[0]), "failed", "{all}");

    // The paused sandbox comes back as it was, its start process still running.
    let (s, v) = http(
        "POST",
        &format!("{url}/sandboxes/{paused}/resume"),
        &h,
        None,
    );
    assert_eq!(s, 200, "{v}");
    assert_eq!(exec(&url, &paused, "cat /root/p"), "precious");
    assert_eq!(
        exec(
            &url,
            &paused,
            "cat /proc/[0-9]*/comm 2>/dev/null | grep -qx sleep && echo up"
        ),
        "up"
    );
    // The template still starts sandboxes.
    let fresh = create(&url, "fresh");
    assert_eq!(exec(&url, &fresh, "cat /opt/kept"), "kept");

    for id in [&paused, &fresh] {
        let (s, v) = http("DELETE", &format!("{url}/sandboxes/{id}"), &h, None);
        assert_eq!(s, 204, "{v}");
    }
    let (s, v) = http("DELETE", &format!("{url}/templates/base"), &h, None);
    assert_eq!(s, 204, "{v}");
    drop(server);
    assert_no_qemu(state, Duration::from_secs(20));
    let left: Vec<_> = std::fs::read_dir(state.join("sandboxes"))
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "sandbox directories left: {left:?}");
}
