//! `kiln validate`: exit codes and output on valid and invalid specs of both forms.

use std::io::Write as _;
use std::process::{Command, Output, Stdio};

fn validate(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("validate")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).unwrap();
    }
    drop(input);
    child.wait_with_output().unwrap()
}

fn example(name: &str) -> String {
    format!("{}/../../examples/{name}", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn valid_specs_of_both_forms_print_normalized_wire_json() {
    for file in ["hello-http.json", "tools.wire.json"] {
        let out = validate(&[&example(file)], None);
        assert!(
            out.status.success(),
            "{file}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert!(doc["build_spec"]["from"].is_string(), "{doc}");
        for key in ["vcpu", "memory_mib", "disk_mib"] {
            assert!(doc[key].is_u64(), "{file}: {key} missing in {doc}");
        }
    }
    // Defaults filled in, from standard input.
    let out = validate(
        &["-"],
        Some(r#"{"from": "debian:12", "startCmd": "sleep infinity"}"#),
    );
    assert!(out.status.success());
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["vcpu"], 1);
    assert_eq!(doc["memory_mib"], 1024);
    assert_eq!(doc["disk_mib"], 4096);
    assert_eq!(doc["build_spec"]["start_cmd"], "sleep infinity");
}

#[test]
fn invalid_specs_exit_2_with_one_line_per_problem() {
    let out = validate(&[&example("invalid/many-problems.json")], None);
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty());
    let err = String::from_utf8(out.stderr).unwrap();
    let paths: Vec<&str> = err.lines().map(|l| l.split(": ").next().unwrap()).collect();
    for path in [
        "name",
        "vcpu",
        "build_spec.from",
        "build_spec.steps[0].env.key",
        "build_spec.steps[1].workdir",
        "build_spec.steps[2]",
    ] {
        assert!(paths.contains(&path), "no line for {path}:\n{err}");
    }

    let out = validate(&["-"], Some(r#"{"from": "alpine:3.19", "memoryMib": 64}"#));
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.lines().any(|l| l.starts_with("from: ")), "{err}");
    assert!(err.lines().any(|l| l.starts_with("memoryMib: ")), "{err}");

    let out = validate(&["-"], Some("{not json"));
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).starts_with("$: invalid JSON"));
}
