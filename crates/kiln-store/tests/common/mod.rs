//! Shared test helpers.
#![allow(dead_code)]

use kiln_spec::{Form, TemplateRequest};
use kiln_store::{Build, BuiltArtifact, Limits, Store, Team, Template};
use serde_json::json;

/// A template request named `name` whose spec varies with `variant`.
pub fn request(name: &str, variant: &str) -> TemplateRequest {
    let doc = json!({
        "name": name,
        "vcpu": 2,
        "memory_mib": 512,
        "build_spec": {
            "from": "debian:12",
            "steps": [{"run": format!("echo {variant}")}, {"env": {"key": "A", "value": "1"}}],
            "start_cmd": "python3 -m http.server 8000",
            "ready_cmd": "curl -sf localhost:8000"
        }
    });
    TemplateRequest::from_json(&doc, Form::Wire).expect("valid request")
}

/// A private in-memory store.
pub async fn memory_store() -> Store {
    Store::open_in_memory().await.expect("open in-memory store")
}

pub async fn team(store: &Store, name: &str) -> Team {
    store.create_team(name).await.expect("create team")
}

/// An in-memory store with one team, `acme`: where most tests start.
pub async fn store_with_team() -> (Store, Team) {
    let store = memory_store().await;
    let acme = team(&store, "acme").await;
    (store, acme)
}

/// Creates template `name` (spec variant `v1`, no limits) with its first build, still
/// pending.
pub async fn pending_template(store: &Store, team: &Team, name: &str) -> (Template, Build) {
    store
        .create_template_with_build(&team.id, &request(name, "v1"), &Limits::UNLIMITED)
        .await
        .expect("create template")
}

/// Creates a template whose first build is ready; returns (template id, build id).
pub async fn ready_template(store: &Store, team: &Team, name: &str) -> (String, String) {
    let (t, b) = pending_template(store, team, name).await;
    store.start_build(&b.id).await.expect("start");
    store.mark_snapshotting(&b.id).await.expect("snapshot");
    store
        .finish_build(&b.id, Ok(BuiltArtifact { size_bytes: 4096 }))
        .await
        .expect("finish");
    (t.id, b.id)
}
