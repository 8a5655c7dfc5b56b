//! Property tests: hash stability and JSON round trips of both forms.

use kiln_spec::{BuildSpec, Form, ResourceRequest, Step, TemplateRequest};
use proptest::prelude::*;
use serde_json::Value;

fn arb_step() -> impl Strategy<Value = Step> {
    prop_oneof![
        "[ -~]{1,40}".prop_map(Step::Run),
        ("[A-Z_][A-Z0-9_]{0,10}", "[ -~]{0,20}").prop_map(|(key, value)| Step::Env { key, value }),
        "(/[a-z0-9]{1,8}){1,3}".prop_map(Step::Workdir),
        ("[a-z_][a-z0-9_-]{0,10}", any::<bool>())
            .prop_map(|(name, sudo)| Step::User { name, sudo }),
    ]
}

fn arb_request() -> impl Strategy<Value = TemplateRequest> {
    (
        proptest::option::of("[a-z0-9]{1,10}"),
        proptest::option::of(1u32..=4),
        proptest::option::of(256u32..=4096),
        proptest::option::of(1024u32..=8192),
        prop_oneof![
            Just("python:3.11"),
            Just("debian:12"),
            Just("ghcr.io/o/x:v1")
        ],
        proptest::collection::vec(arb_step(), 0..8),
        proptest::option::of("[ -~]{1,30}"),
        proptest::option::of("[ -~]{1,30}"),
    )
        .prop_map(
            |(name, vcpu, memory_mib, disk_mib, from, steps, start_cmd, ready_cmd)| {
                TemplateRequest {
                    name,
                    resources: ResourceRequest {
                        vcpu,
                        memory_mib,
                        disk_mib,
                    },
                    build_spec: BuildSpec {
                        from: from.to_owned(),
                        steps,
                        start_cmd,
                        ready_cmd,
                    },
                }
            },
        )
}

/// Re-serialises a JSON value with object keys in reverse order and pretty formatting.
fn shuffle(v: &Value) -> String {
    fn rev(v: &Value) -> Value {
        match v {
            Value::Object(o) => {
                let mut m = serde_json::Map::new();
                for (k, v) in o.iter().rev() {
                    m.insert(k.clone(), rev(v));
                }
                Value::Object(m)
            }
            Value::Array(a) => Value::Array(a.iter().map(rev).collect()),
            other => other.clone(),
        }
    }
    serde_json::to_string_pretty(&rev(v)).unwrap()
}

proptest! {
    #[test]
    fn round_trips_both_forms(req in arb_request()) {
        for form in [Form::Wire, Form::Sdk] {
            let doc = req.to_json(form);
            prop_assert_eq!(&TemplateRequest::from_json(&doc, form).unwrap(), &req);
            let other = match form { Form::Wire => Form::Sdk, Form::Sdk => Form::Wire };
            let back = TemplateRequest::from_json(&doc, form).unwrap().to_json(other);
            prop_assert_eq!(TemplateRequest::from_json(&back, other).unwrap(), req.clone());
        }
    }

    #[test]
    fn hash_ignores_key_order_formatting_and_explicit_defaults(req in arb_request()) {
        let text = shuffle(&req.to_json(Form::Wire));
        let reparsed: Value = serde_json::from_str(&text).unwrap();
        let again = TemplateRequest::from_json(&reparsed, Form::Wire).unwrap();
        prop_assert_eq!(again.spec_hash(), req.spec_hash());
        prop_assert_eq!(req.normalized().spec_hash(), req.spec_hash());
        let sdk = TemplateRequest::from_json(&req.to_json(Form::Sdk), Form::Sdk).unwrap();
        prop_assert_eq!(sdk.spec_hash(), req.spec_hash());
    }

    #[test]
    fn hash_changes_with_any_semantic_change(req in arb_request(), step in arb_step()) {
        let h = req.spec_hash();
        let mut changed = req.clone();
        changed.build_spec.steps.push(step);
        prop_assert_ne!(changed.spec_hash(), h.clone());

        let mut changed = req.clone();
        changed.resources.vcpu = Some(req.resources.resolve().vcpu % 4 + 1);
        prop_assert_ne!(changed.spec_hash(), h.clone());

        let mut changed = req.clone();
        changed.build_spec.from.push_str("-x");
        prop_assert_ne!(changed.spec_hash(), h.clone());

        let mut changed = req.clone();
        changed.build_spec.start_cmd = Some(format!("{}!", req.build_spec.start_cmd.clone().unwrap_or_default()));
        prop_assert_ne!(changed.spec_hash(), h.clone());

        if req.build_spec.steps.len() >= 2 && req.build_spec.steps[0] != req.build_spec.steps[1] {
            let mut changed = req.clone();
            changed.build_spec.steps.swap(0, 1);
            prop_assert_ne!(changed.spec_hash(), h.clone());
        }

        let mut renamed = req.clone();
        renamed.name = Some("another-name".into());
        prop_assert_eq!(renamed.spec_hash(), h);
    }

    #[test]
    fn arbitrary_json_never_panics(s in "\\PC{0,200}") {
        if let Ok(v) = serde_json::from_str::<Value>(&s) {
            let _ = TemplateRequest::parse_and_validate(&v);
        }
    }
}
