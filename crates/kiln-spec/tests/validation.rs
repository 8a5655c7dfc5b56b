//! Every rule of the BuildSpec, on both JSON forms.

use kiln_spec::{Form, Problems, Resources, Step, TemplateRequest};
use serde_json::{json, Value};

fn check(doc: Value) -> Result<TemplateRequest, Problems> {
    TemplateRequest::parse_and_validate(&doc)
}

fn problems(doc: Value) -> Problems {
    match check(doc.clone()) {
        Ok(_) => panic!("expected problems for {doc}"),
        Err(p) => p,
    }
}

fn wire(spec: Value) -> Value {
    json!({"name": "my-env", "build_spec": spec})
}

#[test]
fn seed_examples_are_valid() {
    for from in ["python:3.11", "ghcr.io/myorg/foo:v1", "localhost:5000/a/b@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"] {
        check(wire(json!({"from": from}))).unwrap_or_else(|p| panic!("{from}: {p}"));
    }
    let sdk = json!({
        "name": "my-python-env", "vcpu": 2, "memoryMib": 2048, "from": "python:3.11",
        "steps": [
            {"run": "pip install numpy pandas"},
            {"env": {"key": "DEBUG", "value": "1"}},
            {"workdir": "/app"},
            {"user": {"name": "appuser", "sudo": true}}
        ],
        "startCmd": "python -m http.server 8000",
        "readyCmd": "curl -f http://localhost:8000/"
    });
    let req = check(sdk).unwrap();
    assert_eq!(req.build_spec.steps.len(), 4);
    assert_eq!(
        req.build_spec.steps[3],
        Step::User {
            name: "appuser".into(),
            sudo: true
        }
    );
    assert_eq!(
        req.resources.resolve(),
        Resources {
            vcpu: 2,
            memory_mib: 2048,
            disk_mib: 4096
        }
    );
}

#[test]
fn defaults_fill_in() {
    let req = check(wire(json!({"from": "debian:12"}))).unwrap();
    assert_eq!(
        req.resources.resolve(),
        Resources {
            vcpu: 1,
            memory_mib: 1024,
            disk_mib: 4096
        }
    );
    let n = req.normalized().to_json(Form::Wire);
    assert_eq!(n["vcpu"], 1);
    assert_eq!(n["memory_mib"], 1024);
    assert_eq!(n["disk_mib"], 4096);
    assert_eq!(n["build_spec"]["steps"], json!([]));
}

#[test]
fn every_problem_is_reported_with_its_path() {
    let p = problems(json!({
        "name": "Bad Name",
        "vcpu": 9,
        "memory_mib": 100,
        "disk_mib": 99999,
        "build_spec": {
            "from": "alpine:3.19",
            "steps": [
                {"run": "ok"},
                {"env": {"key": "1BAD", "value": "x"}},
                {"workdir": "relative/dir"},
                {"user": {"name": "Root-User"}},
                {"run": "x", "workdir": "/a"},
                {},
                {"shell": "x"},
                {"run": "   "},
                {"env": {"key": "A"}}
            ],
            "start_cmd": "",
            "extra": 1
        }
    }));
    for path in [
        "name",
        "vcpu",
        "memory_mib",
        "disk_mib",
        "build_spec.from",
        "build_spec.steps[1].env.key",
        "build_spec.steps[2].workdir",
        "build_spec.steps[3].user.name",
        "build_spec.steps[4]",
        "build_spec.steps[5]",
        "build_spec.steps[6].shell",
        "build_spec.steps[7].run",
        "build_spec.steps[8].env.value",
        "build_spec.start_cmd",
        "build_spec.extra",
    ] {
        assert!(p.has(path), "no problem at {path}; got:\n{p}");
    }
    assert!(!p.has("build_spec.steps[0].run"), "{p}");
}

#[test]
fn sdk_form_paths_are_flat_and_camel_case() {
    let p = problems(
        json!({"from": "python:3.11-alpine", "memoryMib": 1, "steps": [{"workdir": "x"}], "readyCmd": 5, "ready_cmd": "x"}),
    );
    for path in [
        "from",
        "memoryMib",
        "steps[0].workdir",
        "readyCmd",
        "ready_cmd",
    ] {
        assert!(p.has(path), "no problem at {path}; got:\n{p}");
    }
}

#[test]
fn refused_bases() {
    for from in [
        "alpine:3.19",
        "python:3.11-alpine",
        "gcr.io/distroless/base-debian12",
        "gcr.io/distroless/static",
    ] {
        assert!(
            problems(wire(json!({"from": from}))).has("build_spec.from"),
            "{from}"
        );
    }
}

#[test]
fn bad_references() {
    for from in [
        "",
        "Python:3.11",
        "python:",
        "a//b",
        "localhost:5000/a@sha256:123",
        "http://x/y",
    ] {
        assert!(
            problems(wire(json!({"from": from}))).has("build_spec.from"),
            "{from:?}"
        );
    }
    assert!(problems(wire(json!({}))).has("build_spec.from"));
    assert!(problems(json!({"name": "x"})).has("build_spec"));
}

#[test]
fn names() {
    for ok in ["a", "my-env", "team/app.v1", "a_b-c.d/e", &"a".repeat(128)] {
        check(json!({"name": ok, "build_spec": {"from": "debian"}}))
            .unwrap_or_else(|p| panic!("{ok}: {p}"));
    }
    for bad in [
        "",
        "-a",
        "a-",
        "A",
        "a b",
        "kiln/base",
        "superserve/base",
        &"a".repeat(129),
        "a/",
    ] {
        assert!(
            problems(json!({"name": bad, "build_spec": {"from": "debian"}})).has("name"),
            "{bad:?}"
        );
    }
}

#[test]
fn step_values() {
    let bad_user = "a".repeat(32);
    let cases = [
        (json!({"env": {"key": "A-B", "value": ""}}), "env.key"),
        (json!({"env": {"key": "", "value": ""}}), "env.key"),
        (
            json!({"env": {"key": "A", "value": "a\u{0}b"}}),
            "env.value",
        ),
        (json!({"workdir": ""}), "workdir"),
        (json!({"user": {"name": bad_user}}), "user.name"),
        (json!({"user": {"name": "9user"}}), "user.name"),
        (json!({"user": {"name": "ok", "sudo": "yes"}}), "user.sudo"),
        (
            json!({"user": {"name": "ok", "shell": "/bin/sh"}}),
            "user.shell",
        ),
        (json!({"run": 5}), "run"),
        (json!("run"), ""),
    ];
    for (step, suffix) in cases {
        let p = problems(wire(json!({"from": "debian", "steps": [step]})));
        let path = if suffix.is_empty() {
            "build_spec.steps[0]".to_owned()
        } else {
            format!("build_spec.steps[0].{suffix}")
        };
        assert!(p.has(&path), "{step}: expected {path}, got:\n{p}");
    }
    for ok in [
        json!({"env": {"key": "_A1", "value": ""}}),
        json!({"user": {"name": "app-user_1"}}),
        json!({"user": {"name": "machine$"}}),
        json!({"user": {"name": "root"}}),
        json!({"workdir": "/"}),
    ] {
        check(wire(json!({"from": "debian", "steps": [ok.clone()]})))
            .unwrap_or_else(|p| panic!("{ok}: {p}"));
    }
}

#[test]
fn size_caps() {
    let steps: Vec<Value> = (0..=kiln_spec::validate::MAX_STEPS)
        .map(|_| json!({"run": "true"}))
        .collect();
    assert!(problems(wire(json!({"from": "debian", "steps": steps}))).has("build_spec.steps"));
    let long = "x".repeat(kiln_spec::validate::MAX_COMMAND_LEN + 1);
    assert!(
        problems(wire(json!({"from": "debian", "steps": [{"run": long}]})))
            .has("build_spec.steps[0].run")
    );
    assert!(
        problems(wire(json!({"from": "debian", "start_cmd": long}))).has("build_spec.start_cmd")
    );
    assert!(problems(wire(json!({"from": "x".repeat(10_000)}))).has("build_spec.from"));
    let long_key = "K".repeat(kiln_spec::validate::MAX_ENV_KEY_LEN + 1);
    assert!(problems(wire(
        json!({"from": "debian", "steps": [{"env": {"key": long_key, "value": ""}}]})
    ))
    .has("build_spec.steps[0].env.key"));
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    assert!(
        serde_json::from_str::<Value>(&deep).is_err(),
        "serde_json's depth limit guards nesting"
    );
}

#[test]
fn wrong_types_and_shapes() {
    assert!(problems(json!([])).has(""));
    let p = problems(
        json!({"vcpu": "2", "memory_mib": -1, "disk_mib": 1.5, "build_spec": {"from": "debian", "steps": {}}}),
    );
    for path in ["vcpu", "memory_mib", "disk_mib", "build_spec.steps"] {
        assert!(p.has(path), "{path}: {p}");
    }
}

#[test]
fn both_forms_convert_losslessly() {
    let sdk = json!({
        "name": "x", "vcpu": 2, "diskMib": 2048, "from": "python:3.11",
        "steps": [{"run": "true"}, {"user": {"name": "u", "sudo": false}}],
        "startCmd": "sleep infinity"
    });
    let req = TemplateRequest::from_json(&sdk, Form::Sdk).unwrap();
    let wire_doc = req.to_json(Form::Wire);
    assert_eq!(
        wire_doc,
        json!({"name": "x", "vcpu": 2, "disk_mib": 2048, "build_spec": {
            "from": "python:3.11",
            "steps": [{"run": "true"}, {"user": {"name": "u", "sudo": false}}],
            "start_cmd": "sleep infinity"}})
    );
    assert_eq!(
        TemplateRequest::from_json(&wire_doc, Form::Wire).unwrap(),
        req
    );
    assert_eq!(req.to_json(Form::Sdk), sdk);
}

#[test]
fn problems_print_one_per_line() {
    let p = problems(json!({"vcpu": 0, "build_spec": {"from": ""}}));
    let text = p.to_string();
    assert_eq!(text.lines().count(), p.0.len());
    assert!(text.lines().any(|l| l.starts_with("vcpu: ")), "{text}");
}
