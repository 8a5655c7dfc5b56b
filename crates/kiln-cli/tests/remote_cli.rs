//! The CLI against a server (`KILN_URL` + `KILN_API_KEY`): the same commands, output
//! conventions and exit codes as on the local state dir, through `kiln-sdk`. Real VMs
//! under TCG; see `common` for the prerequisites.

mod common;

use std::process::Output;
use std::time::Duration;

use common::{api_key, assert_no_qemu, assets, kiln, registry, Server};

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn last_line(b: &[u8]) -> String {
    text(b).lines().last().unwrap_or_default().to_owned()
}

#[test]
fn template_and_sandbox_commands_work_against_a_server() {
    let registry = registry(&assets());
    let dir = common::state_dir("krc");
    let state = dir.path();
    let key = api_key(state, "cli");
    let server = Server::start(state, &[("KILN_READY_TIMEOUT_SECS", "120")]);
    // The client side runs on an empty state dir: everything must come from the server.
    let client_home = tempfile::tempdir().unwrap();
    let remote = |args: &[&str]| -> Output {
        let out = kiln(client_home.path(), args)
            .env("KILN_URL", &server.url)
            .env("KILN_API_KEY", &key)
            .env("XDG_CONFIG_HOME", client_home.path())
            .output()
            .unwrap();
        eprintln!(
            "$ kiln {}\n{}{}",
            args.join(" "),
            text(&out.stdout),
            text(&out.stderr)
        );
        out
    };

    let spec = client_home.path().join("spec.json");
    std::fs::write(
        &spec,
        serde_json::json!({
            "name": "cli", "memoryMib": 256, "diskMib": 1024,
            "from": format!("{registry}/kiln/minbase:latest"),
            "steps": [{"run": "echo building; mkdir -p /srv && echo v1 > /srv/version"}],
            "startCmd": "sleep 100000", "readyCmd": "true",
        })
        .to_string(),
    )
    .unwrap();
    let out = remote(&["template", "build", "-f", spec.to_str().unwrap()]);
    assert!(out.status.success());
    let template_id = last_line(&out.stdout);
    // The build's output streamed to stderr, as in local mode.
    assert!(
        text(&out.stderr).contains("    building"),
        "no build output"
    );

    let out = remote(&["template", "ls", "--json"]);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list[0]["id"], template_id.as_str());
    assert_eq!(list[0]["status"], "ready");
    let out = remote(&["template", "show", "cli"]);
    assert!(
        text(&out.stdout).starts_with("cli ("),
        "{}",
        text(&out.stdout)
    );
    let out = remote(&["template", "logs", "cli"]);
    assert!(text(&out.stdout).contains("    building"));

    let out = remote(&["sandbox", "create", "cli", "--env", "GREETING=hi"]);
    assert!(out.status.success());
    let id = last_line(&out.stdout);
    let out = remote(&[
        "sandbox",
        "exec",
        &id,
        "--",
        "sh",
        "-c",
        "echo $GREETING; cat /srv/version; exit 3",
    ]);
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(text(&out.stdout), "hi\nv1\n");

    let local = client_home.path().join("in.txt");
    std::fs::write(&local, b"through the API\n").unwrap();
    let dest = format!("{id}:/tmp/in.txt");
    assert!(remote(&["sandbox", "cp", local.to_str().unwrap(), &dest])
        .status
        .success());
    let back = client_home.path().join("back.txt");
    assert!(remote(&["sandbox", "cp", &dest, back.to_str().unwrap()])
        .status
        .success());
    assert_eq!(std::fs::read(&back).unwrap(), b"through the API\n");

    // Egress rules: checked on the client, set through the API, shown in listings.
    let out = remote(&["sandbox", "network", &id, "--deny-out", "example.com"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("network.deny_out[0]"));
    assert!(remote(&[
        "sandbox",
        "network",
        &id,
        "--allow-out",
        "*.example.com",
        "--deny-out",
        "0.0.0.0/0"
    ])
    .status
    .success());
    let out = remote(&["sandbox", "ls", "--json"]);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list[0]["id"], id.as_str());
    assert_eq!(
        list[0]["network"],
        serde_json::json!({"allow_out": ["*.example.com"], "deny_out": ["0.0.0.0/0"]})
    );
    assert!(remote(&["sandbox", "network", &id, "--clear"])
        .status
        .success());

    // Snapshots: taken while the sandbox runs, forked, listed, renamed, deleted.
    assert!(remote(&[
        "sandbox",
        "exec",
        &id,
        "--",
        "sh",
        "-c",
        "echo kept > /srv/mark"
    ])
    .status
    .success());
    let out = remote(&["sandbox", "snapshot", &id, "--name", "first"]);
    assert!(out.status.success());
    let snap = last_line(&out.stdout);
    let out = remote(&["sandbox", "exec", &id, "--", "cat", "/srv/mark"]);
    assert_eq!(text(&out.stdout), "kept\n", "the source runs on");
    let out = remote(&["snapshot", "ls", "--sandbox", &id, "--json"]);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (&list[0]["id"], &list[0]["status"]),
        (&snap.as_str().into(), &"ready".into())
    );
    assert!(remote(&["snapshot", "rename", &snap, "renamed"])
        .status
        .success());
    let out = remote(&["snapshot", "show", &snap]);
    assert!(
        text(&out.stdout).starts_with("renamed ("),
        "{}",
        text(&out.stdout)
    );
    assert!(remote(&["sandbox", "kill", &id]).status.success());
    let out = remote(&[
        "sandbox",
        "create",
        "--from-snapshot",
        &snap,
        "--timeout",
        "3600",
    ]);
    assert!(out.status.success());
    let fork = last_line(&out.stdout);
    let out = remote(&["sandbox", "exec", &fork, "--", "cat", "/srv/mark"]);
    assert_eq!(text(&out.stdout), "kept\n", "the fork has the file");
    let out = remote(&["sandbox", "ls", "--json"]);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list[0]["source_snapshot_id"], snap.as_str());
    assert_eq!(list[0]["timeout_seconds"], 3600);
    assert!(remote(&["sandbox", "kill", &fork]).status.success());
    assert!(remote(&["snapshot", "rm", &snap]).status.success());
    let out = remote(&["snapshot", "show", &snap]);
    assert!(
        text(&out.stderr).contains("not_found"),
        "{}",
        text(&out.stderr)
    );

    // A failing rebuild of the same name, with a new spec: the last stderr line is the
    // code, the exit code 1, as in local mode; the template stays usable.
    std::fs::write(
        &spec,
        serde_json::json!({
            "name": "cli", "memoryMib": 256, "diskMib": 1024,
            "from": format!("{registry}/kiln/minbase:latest"),
            "steps": [{"run": "exit 7"}],
        })
        .to_string(),
    )
    .unwrap();
    let out = remote(&["template", "build", "-f", spec.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        last_line(&out.stderr).starts_with("step_failed: "),
        "{}",
        text(&out.stderr)
    );

    // Invalid specs are refused before anything is sent, with exit 2.
    std::fs::write(&spec, r#"{"name": "cli", "from": "alpine:3.19"}"#).unwrap();
    let out = remote(&["template", "build", "-f", spec.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));

    let out = remote(&["template", "rm", "cli"]);
    assert!(out.status.success());
    assert_eq!(last_line(&out.stdout), template_id);
    // Errors from the server keep their code.
    let out = remote(&["sandbox", "create", "cli"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("not_found"),
        "{}",
        text(&out.stderr)
    );

    drop(server);
    assert_no_qemu(state, Duration::from_secs(20));
    // Nothing was written to the client's own state dir.
    assert!(!client_home.path().join("kiln.db").exists());
}
