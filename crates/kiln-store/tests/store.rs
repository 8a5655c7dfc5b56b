//! Transitions, guards, scoping and logs of the metadata store (in-memory database).

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{memory_store, pending_template, ready_template, request, store_with_team, team};
use kiln_spec::{BuildErrorCode, CodedMessage};
use kiln_store::*;

fn is_invalid_transition<T: std::fmt::Debug>(r: Result<T, StoreError>) -> bool {
    matches!(r, Err(StoreError::InvalidTransition { .. }))
}

fn is_not_found<T: std::fmt::Debug>(r: Result<T, StoreError>) -> bool {
    matches!(r, Err(StoreError::NotFound { .. }))
}

#[tokio::test]
async fn api_keys_are_hashed_and_authenticate_their_team() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("kiln.db");
    let store = Store::open(&db).await.unwrap();

    let (key, plaintext) = store.create_api_key("acme").await.unwrap();
    assert!(plaintext.starts_with(&key.prefix));
    assert!(key.prefix.len() < plaintext.len());
    let team = store
        .team_by_name("acme")
        .await
        .unwrap()
        .expect("team created");
    assert_eq!(key.team_id, team.id);

    // A second key joins the existing team.
    let (key2, plaintext2) = store.create_named_api_key("acme", "ci").await.unwrap();
    assert_eq!(key2.team_id, team.id);
    assert_ne!(plaintext, plaintext2);

    assert_eq!(
        store.authenticate(&plaintext).await.unwrap(),
        Some(team.clone())
    );
    assert_eq!(
        store.authenticate(&plaintext2).await.unwrap(),
        Some(team.clone())
    );
    assert_eq!(store.authenticate("kiln_nope").await.unwrap(), None);
    assert_eq!(store.authenticate("").await.unwrap(), None);

    let keys = store.list_api_keys(&team.id).await.unwrap();
    assert_eq!(keys.len(), 2);
    assert!(keys.iter().all(|k| k.last_used_at.is_some()));

    store.revoke_api_key(&team.id, &key2.id).await.unwrap();
    assert_eq!(store.authenticate(&plaintext2).await.unwrap(), None);
    store.close().await;

    // The plaintext is nowhere in the database file; its sha256 is.
    let raw = std::fs::read(&db).unwrap();
    let wal = std::fs::read(dir.path().join("kiln.db-wal")).unwrap_or_default();
    let haystack = [raw, wal].concat();
    let contains = |needle: &[u8]| haystack.windows(needle.len()).any(|w| w == needle);
    assert!(!contains(plaintext.as_bytes()));
    assert!(contains(hash_secret(&plaintext).as_bytes()));
}

#[tokio::test]
async fn duplicate_team_is_a_conflict() {
    let store = memory_store().await;
    team(&store, "a").await;
    assert!(matches!(
        store.create_team("a").await,
        Err(StoreError::Conflict(_))
    ));
}

#[tokio::test]
async fn create_template_records_template_and_first_build() {
    let (store, team) = store_with_team().await;
    let req = request("web", "v1");
    let (t, b) = store
        .create_template_with_build(&team.id, &req, &Limits::UNLIMITED)
        .await
        .unwrap();
    assert_eq!(t.name, "web");
    assert_eq!(t.team_id, team.id);
    assert_eq!(t.status, TemplateStatus::Pending);
    assert_eq!((t.vcpu, t.memory_mib, t.disk_mib), (2, 512, 4096));
    assert_eq!(t.latest_build_id.as_deref(), Some(b.id.as_str()));
    assert_eq!(t.current_build_id, None);
    assert_eq!(t.build_spec["start_cmd"], "python3 -m http.server 8000");
    assert_eq!(t.spec().unwrap(), req.build_spec);
    assert_eq!(b.status, BuildStatus::Pending);
    assert_eq!(b.template_id, t.id);
    assert_eq!(b.build_spec_hash, req.spec_hash());
    assert!(b.build_spec_hash.starts_with("sha256:"));

    // Lookup by id and by name.
    assert_eq!(
        store.template_by_id_or_name(&team.id, &t.id).await.unwrap(),
        t
    );
    assert_eq!(
        store.template_by_id_or_name(&team.id, "web").await.unwrap(),
        t
    );
    assert_eq!(
        store.list_templates(&team.id).await.unwrap(),
        vec![t.clone()]
    );
    assert_eq!(store.pending_builds().await.unwrap(), vec![b.clone()]);

    // Same name again: conflict, nothing written.
    let dup = store
        .create_template_with_build(&team.id, &request("web", "v2"), &Limits::UNLIMITED)
        .await;
    assert!(matches!(dup, Err(StoreError::Conflict(ref m)) if m.contains("already exists")));
    assert_eq!(store.list_templates(&team.id).await.unwrap().len(), 1);

    // No name: refused.
    let mut nameless = request("x", "v1");
    nameless.name = None;
    assert!(matches!(
        store
            .create_template_with_build(&team.id, &nameless, &Limits::UNLIMITED)
            .await,
        Err(StoreError::Invalid(_))
    ));
    // Unknown team.
    assert!(is_not_found(
        store
            .create_template_with_build("nope", &request("y", "v1"), &Limits::UNLIMITED)
            .await
    ));
}

#[tokio::test]
async fn build_lifecycle_and_guards() {
    let (store, team) = store_with_team().await;
    let (t, b) = pending_template(&store, &team, "web").await;

    // Cannot skip building.
    assert!(is_invalid_transition(store.mark_snapshotting(&b.id).await));

    let started = store.start_build(&b.id).await.unwrap();
    assert_eq!(started.status, BuildStatus::Building);
    assert!(started.started_at.is_some());
    assert!(is_invalid_transition(store.start_build(&b.id).await));
    let tmpl = store.template_by_id_or_name(&team.id, &t.id).await.unwrap();
    assert_eq!(tmpl.status, TemplateStatus::Building);

    let with_digest = store
        .set_build_image_digest(&b.id, "sha256:abc")
        .await
        .unwrap();
    assert_eq!(with_digest.image_digest.as_deref(), Some("sha256:abc"));

    let snap = store.mark_snapshotting(&b.id).await.unwrap();
    assert_eq!(snap.status, BuildStatus::Snapshotting);
    assert_eq!(
        store
            .template_by_id_or_name(&team.id, &t.id)
            .await
            .unwrap()
            .status,
        TemplateStatus::Building
    );

    let done = store
        .finish_build(&b.id, Ok(BuiltArtifact { size_bytes: 1234 }))
        .await
        .unwrap();
    assert_eq!(done.status, BuildStatus::Ready);
    assert!(done.finalized_at.is_some());
    let tmpl = store.template_by_id_or_name(&team.id, &t.id).await.unwrap();
    assert_eq!(tmpl.status, TemplateStatus::Ready);
    assert_eq!(tmpl.size_bytes, Some(1234));
    assert_eq!(tmpl.built_at, done.finalized_at);
    assert_eq!(tmpl.current_build_id.as_deref(), Some(b.id.as_str()));
    assert_eq!(tmpl.error_message, None);

    // Terminal: nothing moves any more.
    assert!(is_invalid_transition(
        store
            .finish_build(
                &b.id,
                Err(CodedMessage::new(BuildErrorCode::StepFailed, "x"))
            )
            .await
    ));
    assert!(is_invalid_transition(store.start_build(&b.id).await));
    assert!(is_invalid_transition(
        store.set_build_image_digest(&b.id, "sha256:def").await
    ));
    // Cancel of a terminal build is a no-op.
    assert_eq!(store.cancel_build(&team.id, &b.id).await.unwrap(), done);
    assert!(is_not_found(store.start_build("missing").await));
}

#[tokio::test]
async fn failed_build_carries_coded_message_to_template() {
    let (store, team) = store_with_team().await;
    let (t, b) = pending_template(&store, &team, "web").await;
    store.start_build(&b.id).await.unwrap();
    let failed = store
        .finish_build(
            &b.id,
            Err(CodedMessage::new(
                BuildErrorCode::StepFailed,
                "step 1 (`echo v1`) exited 1",
            )),
        )
        .await
        .unwrap();
    assert_eq!(failed.status, BuildStatus::Failed);
    assert_eq!(
        failed.error_message.as_deref(),
        Some("step_failed: step 1 (`echo v1`) exited 1")
    );
    let tmpl = store.template_by_id_or_name(&team.id, &t.id).await.unwrap();
    assert_eq!(tmpl.status, TemplateStatus::Failed);
    assert_eq!(tmpl.error_message, failed.error_message);
    assert_eq!(tmpl.current_build_id, None);
}

#[tokio::test]
async fn cancel_follows_artifact_presence() {
    let (store, team) = store_with_team().await;

    // No artifact: the template fails.
    let (t, b) = pending_template(&store, &team, "fresh").await;
    let c = store.cancel_build(&team.id, &b.id).await.unwrap();
    assert_eq!(c.status, BuildStatus::Cancelled);
    assert!(c.finalized_at.is_some());
    let tmpl = store.template_by_id_or_name(&team.id, &t.id).await.unwrap();
    assert_eq!(tmpl.status, TemplateStatus::Failed);
    assert_eq!(
        tmpl.error_message.as_deref(),
        Some("build_failed: build cancelled")
    );
    // Cancel again: no-op.
    assert_eq!(store.cancel_build(&team.id, &b.id).await.unwrap(), c);

    // An older artifact is live: the template stays ready.
    let (t2, first) = ready_template(&store, &team, "old").await;
    let rb = store
        .start_rebuild(&team.id, &t2, None, &Limits::UNLIMITED)
        .await
        .unwrap();
    store.start_build(&rb.build.id).await.unwrap();
    store.cancel_build(&team.id, &rb.build.id).await.unwrap();
    let tmpl = store.template_by_id_or_name(&team.id, &t2).await.unwrap();
    assert_eq!(tmpl.status, TemplateStatus::Ready);
    assert_eq!(tmpl.current_build_id.as_deref(), Some(first.as_str()));
}

#[tokio::test]
async fn rebuild_is_idempotent_per_spec_and_limited() {
    let (store, team) = store_with_team().await;
    let (tid, first) = ready_template(&store, &team, "web").await;

    let r1 = store
        .start_rebuild(&team.id, "web", None, &Limits::UNLIMITED)
        .await
        .unwrap();
    assert!(r1.created);
    assert_ne!(r1.build.id, first);
    let tmpl = store.template_by_id_or_name(&team.id, &tid).await.unwrap();
    // A live artifact keeps the template ready while it is rebuilt.
    assert_eq!(tmpl.status, TemplateStatus::Ready);
    assert_eq!(tmpl.latest_build_id.as_deref(), Some(r1.build.id.as_str()));
    // The old artifact stays live until the new one is ready.
    assert_eq!(tmpl.current_build_id.as_deref(), Some(first.as_str()));
    // Same spec as the first build.
    let b0 = store.get_build(&first).await.unwrap();
    assert_eq!(r1.build.build_spec_hash, b0.build_spec_hash);

    // Retry while in flight (also once it is building): the same build.
    let r2 = store
        .start_rebuild(&team.id, &tid, None, &Limits::UNLIMITED)
        .await
        .unwrap();
    assert!(!r2.created);
    assert_eq!(r2.build.id, r1.build.id);
    store.start_build(&r1.build.id).await.unwrap();
    let r3 = store
        .start_rebuild(
            &team.id,
            &tid,
            Some(&request("web", "v1")),
            &Limits::UNLIMITED,
        )
        .await
        .unwrap();
    assert!(!r3.created);
    assert_eq!(r3.build.id, r1.build.id);

    // A different spec is a different build, refused at the build limit (1 in flight).
    let one = Limits {
        max_concurrent_builds: 1,
        ..Limits::UNLIMITED
    };
    let refused = store
        .start_rebuild(&team.id, &tid, Some(&request("web", "v2")), &one)
        .await;
    assert!(matches!(
        refused,
        Err(StoreError::LimitReached {
            which: Limit::Builds,
            limit: 1
        })
    ));
    // Nothing changed by the refusal.
    let tmpl = store.template_by_id_or_name(&team.id, &tid).await.unwrap();
    assert_eq!(tmpl.latest_build_id.as_deref(), Some(r1.build.id.as_str()));
    assert_eq!(tmpl.spec().unwrap(), request("web", "v1").build_spec);

    let r4 = store
        .start_rebuild(
            &team.id,
            &tid,
            Some(&request("web", "v2")),
            &Limits::UNLIMITED,
        )
        .await
        .unwrap();
    assert!(r4.created);
    assert_eq!(r4.build.build_spec_hash, request("web", "v2").spec_hash());
    let tmpl = store.template_by_id_or_name(&team.id, &tid).await.unwrap();
    assert_eq!(tmpl.spec().unwrap(), request("web", "v2").build_spec);
    assert_eq!(tmpl.latest_build_id.as_deref(), Some(r4.build.id.as_str()));

    // The superseded build finishing does not touch the template.
    store
        .finish_build(&r1.build.id, Ok(BuiltArtifact { size_bytes: 1 }))
        .await
        .unwrap();
    let tmpl = store.template_by_id_or_name(&team.id, &tid).await.unwrap();
    assert_eq!(tmpl.status, TemplateStatus::Ready);
    assert_eq!(tmpl.current_build_id.as_deref(), Some(first.as_str()));

    let builds = store.list_builds(&team.id, "web").await.unwrap();
    assert_eq!(builds.len(), 3);
    // Newest first.
    assert_eq!(builds[0].id, r4.build.id);
    assert_eq!(builds[2].id, first);
}

#[tokio::test]
async fn template_limit_is_enforced() {
    let (store, team) = store_with_team().await;
    let limits = Limits {
        max_templates: 2,
        ..Limits::UNLIMITED
    };
    for name in ["a", "b"] {
        store
            .create_template_with_build(&team.id, &request(name, "v1"), &limits)
            .await
            .unwrap();
    }
    let err = store
        .create_template_with_build(&team.id, &request("c", "v1"), &limits)
        .await
        .unwrap_err();
    assert_eq!(err.limit_reached(), Some(Limit::Templates));
    assert_eq!(
        err.to_string(),
        "the team's limit of 2 templates is reached"
    );
    let builds = Limits {
        max_concurrent_builds: 2,
        ..Limits::UNLIMITED
    };
    let err = store
        .create_template_with_build(&team.id, &request("c", "v1"), &builds)
        .await
        .unwrap_err();
    assert_eq!(err.limit_reached(), Some(Limit::Builds));
    assert_eq!(store.list_templates(&team.id).await.unwrap().len(), 2);
}

#[tokio::test]
async fn teams_are_walls() {
    let store = memory_store().await;
    let a = team(&store, "a").await;
    let b = team(&store, "b").await;
    let (tid, bid) = ready_template(&store, &a, "web").await;

    assert!(is_not_found(
        store.template_by_id_or_name(&b.id, &tid).await
    ));
    assert!(is_not_found(
        store.template_by_id_or_name(&b.id, "web").await
    ));
    assert!(is_not_found(store.delete_template(&b.id, &tid).await));
    assert!(is_not_found(store.delete_template(&b.id, "web").await));
    assert!(is_not_found(
        store
            .start_rebuild(&b.id, &tid, None, &Limits::UNLIMITED)
            .await
    ));
    assert!(is_not_found(store.build_by_id(&b.id, &bid).await));
    assert!(is_not_found(store.cancel_build(&b.id, &bid).await));
    assert!(is_not_found(store.list_builds(&b.id, &tid).await));
    let new = NewSandbox {
        template: tid.clone(),
        ..Default::default()
    };
    assert!(is_not_found(
        store.create_sandbox(&b.id, &new, &Limits::UNLIMITED).await
    ));
    assert!(store.list_templates(&b.id).await.unwrap().is_empty());

    // The same name is free in another team.
    pending_template(&store, &b, "web").await;

    // Sandboxes too.
    let (sb, _) = store
        .create_sandbox(&a.id, &new, &Limits::UNLIMITED)
        .await
        .unwrap();
    assert!(is_not_found(store.sandbox_by_id(&b.id, &sb.id).await));
    assert!(is_not_found(
        store
            .set_sandbox_status(&b.id, &sb.id, SandboxStatus::Deleted)
            .await
    ));
    assert!(store
        .list_sandboxes(&b.id, &SandboxFilter::default())
        .await
        .unwrap()
        .is_empty());

    // Team A still has everything.
    assert_eq!(
        store.template_by_id_or_name(&a.id, "web").await.unwrap().id,
        tid
    );
}

#[tokio::test]
async fn restart_marks_in_flight_builds_failed() {
    let (store, team) = store_with_team().await;
    let (_, ready) = ready_template(&store, &team, "done").await;
    let (t1, pending) = pending_template(&store, &team, "p").await;
    let (_, building) = pending_template(&store, &team, "b").await;
    store.start_build(&building.id).await.unwrap();
    let (_, snap) = pending_template(&store, &team, "s").await;
    store.start_build(&snap.id).await.unwrap();
    store.mark_snapshotting(&snap.id).await.unwrap();
    let (_, cancelled) = pending_template(&store, &team, "c").await;
    store.cancel_build(&team.id, &cancelled.id).await.unwrap();
    // One run by a process that is still alive: not interrupted.
    let (_, other) = pending_template(&store, &team, "o").await;
    store.claim_build(&other.id, 4242).await.unwrap();
    store.start_build(&other.id).await.unwrap();
    store.claim_build(&building.id, 999).await.unwrap();

    let marked = store
        .mark_interrupted_builds(|pid| pid == 4242)
        .await
        .unwrap();
    let mut ids: Vec<_> = marked.iter().map(|b| b.id.clone()).collect();
    ids.sort();
    let mut want = vec![pending.id.clone(), building.id.clone(), snap.id.clone()];
    want.sort();
    assert_eq!(ids, want);
    for b in &marked {
        assert_eq!(b.status, BuildStatus::Failed);
        assert_eq!(
            b.error_message.as_deref(),
            Some("build_failed: interrupted by server restart")
        );
        assert!(b.finalized_at.is_some());
    }
    let tmpl = store
        .template_by_id_or_name(&team.id, &t1.id)
        .await
        .unwrap();
    assert_eq!(tmpl.status, TemplateStatus::Failed);
    assert_eq!(
        tmpl.error_message.as_deref(),
        Some("build_failed: interrupted by server restart")
    );
    assert_eq!(
        store.get_build(&ready).await.unwrap().status,
        BuildStatus::Ready
    );
    assert_eq!(
        store.get_build(&cancelled.id).await.unwrap().status,
        BuildStatus::Cancelled
    );
    assert_eq!(
        store.get_build(&other.id).await.unwrap().status,
        BuildStatus::Building
    );
    assert!(store
        .mark_interrupted_builds(|pid| pid == 4242)
        .await
        .unwrap()
        .is_empty());
}

#[tokio::test]
async fn sandbox_lifecycle_listing_and_template_deletion() {
    let (store, team) = store_with_team().await;

    // Not ready yet: nothing to start from.
    pending_template(&store, &team, "web").await;
    let new = |name: &str, env: &str| NewSandbox {
        template: "web".into(),
        name: Some(name.into()),
        metadata: BTreeMap::from([("env".to_string(), env.to_string())]),
        env: BTreeMap::from([("FOO".to_string(), "bar".to_string())]),
        ..NewSandbox::default()
    };
    assert!(matches!(
        store
            .create_sandbox(&team.id, &new("x", "dev"), &Limits::UNLIMITED)
            .await,
        Err(StoreError::Conflict(_))
    ));
    let (tid, bid) = ready_template(&store, &team, "api").await;
    let on_api = |name: &str, env: &str| {
        let mut n = new(name, env);
        n.template = tid.clone();
        n
    };

    let (s1, token) = store
        .create_sandbox(&team.id, &on_api("one", "dev"), &Limits::UNLIMITED)
        .await
        .unwrap();
    assert_eq!(s1.status, SandboxStatus::Starting);
    assert_eq!(s1.build_id, bid);
    assert_eq!((s1.vcpu_count, s1.memory_mib), (2, 512));
    assert_eq!(s1.env["FOO"], "bar");
    assert!(store.verify_sandbox_token(&s1.id, &token).await.unwrap());
    assert!(!store.verify_sandbox_token(&s1.id, "wrong").await.unwrap());

    // Transitions.
    let st = |to| store.set_sandbox_status(&team.id, &s1.id, to);
    assert!(is_invalid_transition(st(SandboxStatus::Paused).await));
    assert_eq!(
        st(SandboxStatus::Active).await.unwrap().status,
        SandboxStatus::Active
    );
    assert_eq!(
        st(SandboxStatus::Active).await.unwrap().status,
        SandboxStatus::Active
    );
    assert!(is_invalid_transition(st(SandboxStatus::Resuming).await));
    st(SandboxStatus::Pausing).await.unwrap();
    st(SandboxStatus::Paused).await.unwrap();
    st(SandboxStatus::Resuming).await.unwrap();
    let active = st(SandboxStatus::Active).await.unwrap();
    assert!(active.updated_at >= s1.updated_at);

    let (s2, _) = store
        .create_sandbox(&team.id, &on_api("two", "prod"), &Limits::UNLIMITED)
        .await
        .unwrap();
    let mut m = on_api("three", "prod");
    m.metadata.insert("tier".into(), "gold".into());
    let (s3, _) = store
        .create_sandbox(&team.id, &m, &Limits::UNLIMITED)
        .await
        .unwrap();
    store
        .set_sandbox_status(&team.id, &s2.id, SandboxStatus::Failed)
        .await
        .unwrap();
    assert!(is_invalid_transition(
        store
            .set_sandbox_status(&team.id, &s2.id, SandboxStatus::Active)
            .await
    ));

    let list = |filter: SandboxFilter| {
        let store = store.clone();
        let team = team.id.clone();
        async move {
            store
                .list_sandboxes(&team, &filter)
                .await
                .unwrap()
                .into_iter()
                .map(|s| s.name)
                .collect::<Vec<_>>()
        }
    };
    let meta = |pairs: &[(&str, &str)]| {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<BTreeMap<_, _>>()
    };
    assert_eq!(
        list(SandboxFilter::default()).await,
        ["one", "two", "three"]
    );
    assert_eq!(
        list(SandboxFilter {
            metadata: meta(&[("env", "prod")]),
            ..Default::default()
        })
        .await,
        ["two", "three"]
    );
    assert_eq!(
        list(SandboxFilter {
            metadata: meta(&[("env", "prod"), ("tier", "gold")]),
            ..Default::default()
        })
        .await,
        ["three"]
    );
    assert!(list(SandboxFilter {
        metadata: meta(&[("env", "prod"), ("tier", "silver")]),
        ..Default::default()
    })
    .await
    .is_empty());
    assert_eq!(
        list(SandboxFilter {
            statuses: Some(vec![SandboxStatus::Active, SandboxStatus::Failed]),
            ..Default::default()
        })
        .await,
        ["one", "two"]
    );
    assert!(list(SandboxFilter {
        statuses: Some(vec![]),
        ..Default::default()
    })
    .await
    .is_empty());
    assert_eq!(
        list(SandboxFilter {
            limit: Some(1),
            offset: 1,
            ..Default::default()
        })
        .await,
        ["two"]
    );
    assert_eq!(
        list(SandboxFilter {
            offset: 2,
            ..Default::default()
        })
        .await,
        ["three"]
    );

    // Metadata replacement.
    let updated = store
        .set_sandbox_metadata(&team.id, &s3.id, &meta(&[("k", "v")]))
        .await
        .unwrap();
    assert_eq!(updated.metadata, meta(&[("k", "v")]));

    // Two live sandboxes pin the template.
    let err = store.delete_template(&team.id, &tid).await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict(ref m) if m == "template has 2 live sandboxes"));
    for s in [&s1, &s3] {
        store
            .set_sandbox_status(&team.id, &s.id, SandboxStatus::Deleted)
            .await
            .unwrap();
    }
    assert!(is_invalid_transition(
        store
            .set_sandbox_status(&team.id, &s1.id, SandboxStatus::Active)
            .await
    ));
    assert!(!store.verify_sandbox_token(&s1.id, &token).await.unwrap());
    assert_eq!(list(SandboxFilter::default()).await, ["two"]);
    assert_eq!(
        list(SandboxFilter {
            statuses: Some(vec![SandboxStatus::Deleted]),
            ..Default::default()
        })
        .await,
        ["one", "three"]
    );

    let (gone, builds) = store.delete_template(&team.id, "api").await.unwrap();
    assert_eq!(gone.id, tid);
    assert_eq!(builds.len(), 1);
    assert!(is_not_found(
        store.template_by_id_or_name(&team.id, &tid).await
    ));
    assert!(is_not_found(store.get_build(&bid).await));
    assert!(is_not_found(store.sandbox_by_id(&team.id, &s1.id).await));
    // The name is free again.
    pending_template(&store, &team, "api").await;
}

#[tokio::test]
async fn logs_append_read_since_and_follow_live() {
    let (store, team) = store_with_team().await;
    let (_, b) = pending_template(&store, &team, "web").await;
    store.start_build(&b.id).await.unwrap();

    let last = store
        .append_logs(
            &b.id,
            &[
                NewLogLine::now(LogStream::System, "pulling debian:12"),
                NewLogLine::now(LogStream::Stdout, "v1"),
                NewLogLine::now(LogStream::Stderr, "warning"),
            ],
        )
        .await
        .unwrap();
    assert_eq!(last, 3);
    let all = store.logs_since(&b.id, 0).await.unwrap();
    assert_eq!(all.iter().map(|l| l.seq).collect::<Vec<_>>(), [1, 2, 3]);
    assert_eq!(all[2].stream, LogStream::Stderr);
    assert_eq!(all[0].text, "pulling debian:12");
    let tail = store.logs_since(&b.id, 2).await.unwrap();
    assert_eq!(tail.len(), 1);
    assert_eq!(tail[0].text, "warning");
    assert!(store.logs_since(&b.id, 3).await.unwrap().is_empty());
    assert_eq!(store.append_logs(&b.id, &[]).await.unwrap(), 3);
    assert!(is_not_found(
        store
            .append_logs("missing", &[NewLogLine::now(LogStream::Stdout, "x")])
            .await
    ));

    // A follower resuming after seq 1: history first, then live lines, then the end.
    let follower = {
        let store = store.clone();
        let id = b.id.clone();
        let mut rx = store.subscribe_logs(&id).await.unwrap();
        tokio::spawn(async move {
            let mut seen = Vec::new();
            let mut after = 1;
            loop {
                let finished = rx.borrow_and_update().finished;
                let lines = store.logs_since(&id, after).await.unwrap();
                if let Some(l) = lines.last() {
                    after = l.seq;
                }
                seen.extend(lines.into_iter().map(|l| (l.seq, l.text)));
                if finished {
                    break;
                }
                if rx.changed().await.is_err() {
                    // Sender gone: the build ended; one last drain.
                    let lines = store.logs_since(&id, after).await.unwrap();
                    seen.extend(lines.into_iter().map(|l| (l.seq, l.text)));
                    break;
                }
            }
            seen
        })
    };
    for i in 0..5 {
        tokio::time::sleep(Duration::from_millis(5)).await;
        let batch: Vec<_> = (0..3)
            .map(|j| NewLogLine::now(LogStream::Stdout, format!("line {i}.{j}")))
            .collect();
        store.append_logs(&b.id, &batch).await.unwrap();
    }
    store
        .finish_build(&b.id, Ok(BuiltArtifact { size_bytes: 1 }))
        .await
        .unwrap();
    let seen = tokio::time::timeout(Duration::from_secs(10), follower)
        .await
        .expect("follower finished")
        .unwrap();
    let seqs: Vec<u64> = seen.iter().map(|(s, _)| *s).collect();
    assert_eq!(seqs, (2..=18).collect::<Vec<_>>());
    assert_eq!(seen.last().unwrap().1, "line 4.2");

    // Subscribing to a finished build: already finished.
    let rx = store.subscribe_logs(&b.id).await.unwrap();
    assert!(rx.borrow().finished);
    assert!(is_not_found(store.subscribe_logs("missing").await));
}

#[tokio::test]
async fn logs_are_read_a_page_at_a_time_and_followed_to_the_last_page() {
    let (store, team) = store_with_team().await;
    let (_, b) = pending_template(&store, &team, "loud").await;
    store.start_build(&b.id).await.unwrap();
    // Two full pages and a bit, written before anyone follows.
    let n = 2 * LOG_PAGE + 5;
    let lines: Vec<_> = (1..=n)
        .map(|i| NewLogLine::now(LogStream::Stdout, i.to_string()))
        .collect();
    store.append_logs(&b.id, &lines).await.unwrap();
    let page = store.logs_since(&b.id, 0).await.unwrap();
    assert_eq!(page.len(), LOG_PAGE);
    assert_eq!(page.last().unwrap().seq, LOG_PAGE as u64);
    // A follower of a build that has ended still reads past the full pages.
    store
        .finish_build(&b.id, Ok(BuiltArtifact { size_bytes: 1 }))
        .await
        .unwrap();
    let mut follower = store.follow_logs(&b.id, 0).await.unwrap();
    let mut seqs = Vec::new();
    while let Some(batch) = follower.next_batch().await.unwrap() {
        assert!(batch.len() <= LOG_PAGE);
        seqs.extend(batch.iter().map(|l| l.seq));
    }
    assert_eq!(seqs, (1..=n as u64).collect::<Vec<_>>());
}

#[tokio::test]
async fn log_follower_resumes_and_ends_with_the_build() {
    let (store, team) = store_with_team().await;
    let (_, b) = pending_template(&store, &team, "web").await;
    let line = |t: &str| NewLogLine::now(LogStream::Stdout, t);
    store
        .append_logs(&b.id, &[line("a"), line("b")])
        .await
        .unwrap();

    let mut follower = store.follow_logs(&b.id, 1).await.unwrap();
    let writer = {
        let store = store.clone();
        let id = b.id.clone();
        tokio::spawn(async move {
            for i in 0..20 {
                store
                    .append_logs(&id, &[line(&format!("live {i}"))])
                    .await
                    .unwrap();
                if i % 5 == 0 {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
            store
                .finish_build(&id, Err(CodedMessage::new(BuildErrorCode::BootFailed, "")))
                .await
                .unwrap();
        })
    };
    let mut texts = Vec::new();
    let mut seqs = Vec::new();
    while let Some(batch) = tokio::time::timeout(Duration::from_secs(10), follower.next_batch())
        .await
        .expect("no hang")
        .unwrap()
    {
        assert!(!batch.is_empty());
        seqs.extend(batch.iter().map(|l| l.seq));
        texts.extend(batch.into_iter().map(|l| l.text));
    }
    writer.await.unwrap();
    assert_eq!(seqs, (2..=22).collect::<Vec<_>>());
    assert_eq!(texts[0], "b");
    assert_eq!(texts.last().unwrap(), "live 19");
    assert_eq!(follower.cursor(), 22);
    assert!(follower.next_batch().await.unwrap().is_none());

    // Following a finished build returns its history, then ends.
    let mut late = store.follow_logs(&b.id, 20).await.unwrap();
    let batch = late.next_batch().await.unwrap().unwrap();
    assert_eq!(batch.iter().map(|l| l.seq).collect::<Vec<_>>(), [21, 22]);
    assert!(late.next_batch().await.unwrap().is_none());
}

#[tokio::test]
async fn a_live_follower_is_woken_without_polling() {
    let (store, team) = store_with_team().await;
    let (_, b) = pending_template(&store, &team, "web").await;
    let mut rx = store.subscribe_logs(&b.id).await.unwrap();
    let waiter = tokio::spawn(async move {
        rx.changed().await.unwrap();
        *rx.borrow()
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    store
        .append_logs(&b.id, &[NewLogLine::now(LogStream::System, "hello")])
        .await
        .unwrap();
    let signal = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(signal.last_seq, 1);
    assert!(!signal.finished);
}

#[tokio::test]
async fn image_digests_in_use_are_those_of_existing_templates() {
    let (store, team) = store_with_team().await;
    assert!(store.image_digests_in_use().await.unwrap().is_empty());
    let (_, b) = pending_template(&store, &team, "web").await;
    store.start_build(&b.id).await.unwrap();
    store
        .set_build_image_digest(&b.id, "sha256:abc")
        .await
        .unwrap();
    assert_eq!(store.image_digests_in_use().await.unwrap(), ["sha256:abc"]);
    // Deleting the template frees its image for `kiln image prune`.
    store.delete_template(&team.id, "web").await.unwrap();
    assert!(store.image_digests_in_use().await.unwrap().is_empty());
}

/// A sandbox of `template` moved to `active`.
async fn active_sandbox(store: &Store, team: &Team, template: &str, new: NewSandbox) -> Sandbox {
    let new = NewSandbox {
        template: template.into(),
        ..new
    };
    let (s, _) = store
        .create_sandbox(&team.id, &new, &Limits::UNLIMITED)
        .await
        .unwrap();
    store
        .set_sandbox_status(&team.id, &s.id, SandboxStatus::Active)
        .await
        .unwrap()
}

#[tokio::test]
async fn snapshots_are_limited_idempotent_scoped_and_pin_their_template() {
    let (store, acme) = store_with_team().await;
    let other = team(&store, "other").await;
    let (tid, bid) = ready_template(&store, &acme, "web").await;
    let source = active_sandbox(&store, &acme, &tid, NewSandbox::default()).await;
    let limits = Limits {
        max_snapshots: 2,
        ..Limits::UNLIMITED
    };
    let keyed = NewSnapshot {
        name: Some("first".into()),
        idempotency_key: Some("k1".into()),
    };
    let (first, created) = store
        .create_snapshot(&source, &keyed, 42, &limits)
        .await
        .unwrap();
    assert!(created);
    assert_eq!(first.status, SnapshotStatus::Creating);
    assert_eq!(
        (first.template_id.as_str(), first.build_id.as_str()),
        (tid.as_str(), bid.as_str())
    );
    assert_eq!(
        (first.vcpu_count, first.memory_mib, first.disk_mib),
        (2, 512, 4096)
    );
    // The same key again: the first snapshot, nothing new.
    let (again, created) = store
        .create_snapshot(&source, &keyed, 42, &limits)
        .await
        .unwrap();
    assert!(!created);
    assert_eq!(again.id, first.id);
    let (second, _) = store
        .create_snapshot(&source, &NewSnapshot::default(), 42, &limits)
        .await
        .unwrap();
    let err = store
        .create_snapshot(&source, &NewSnapshot::default(), 42, &limits)
        .await
        .unwrap_err();
    assert_eq!(err.limit_reached(), Some(Limit::Snapshots));
    // A failed snapshot holds nothing and frees its place.
    let why = CodedMessage::new(BuildErrorCode::SnapshotFailed, "disk full");
    let failed = store.finish_snapshot(&second.id, Err(&why)).await.unwrap();
    assert_eq!(failed.status, SnapshotStatus::Failed);
    assert_eq!(
        failed.error_message.as_deref(),
        Some("snapshot_failed: disk full")
    );
    store
        .create_snapshot(&source, &NewSnapshot::default(), 42, &limits)
        .await
        .unwrap();
    // Ready once, then it stays.
    let ready = store.finish_snapshot(&first.id, Ok(1234)).await.unwrap();
    assert_eq!(
        (ready.status, ready.size_bytes),
        (SnapshotStatus::Ready, 1234)
    );
    assert!(ready.ready_at.is_some());
    assert!(is_invalid_transition(
        store.finish_snapshot(&first.id, Ok(1)).await
    ));

    // Newest first, per sandbox or all, paged; another team sees none of them.
    let all = store.list_snapshots(&acme.id, None, None, 0).await.unwrap();
    assert_eq!(all.len(), 3);
    assert_eq!(all.last().unwrap().id, first.id);
    let page = store
        .list_snapshots(&acme.id, Some(&source.id), Some(1), 2)
        .await
        .unwrap();
    assert_eq!(page.iter().map(|s| &s.id).collect::<Vec<_>>(), [&first.id]);
    assert!(store
        .list_snapshots(&other.id, None, None, 0)
        .await
        .unwrap()
        .is_empty());
    assert!(is_not_found(
        store.snapshot_by_id(&other.id, &first.id).await
    ));
    assert!(is_not_found(
        store.rename_snapshot(&other.id, &first.id, "x").await
    ));
    let renamed = store
        .rename_snapshot(&acme.id, &first.id, "renamed")
        .await
        .unwrap();
    assert_eq!(renamed.name.as_deref(), Some("renamed"));

    // A fork takes the snapshot's template, build and shape; only a ready one starts.
    let creating = all
        .iter()
        .find(|s| s.status == SnapshotStatus::Creating)
        .unwrap();
    for (snapshot, ok) in [(&creating.id, false), (&first.id, true)] {
        let new = NewSandbox {
            template: "ignored".into(),
            snapshot: Some(snapshot.clone()),
            ..NewSandbox::default()
        };
        let r = store
            .create_sandbox(&acme.id, &new, &Limits::UNLIMITED)
            .await;
        assert_eq!(r.is_ok(), ok, "{r:?}");
        if let Ok((fork, _)) = r {
            assert_eq!(fork.source_snapshot_id.as_deref(), Some(first.id.as_str()));
            assert_eq!(
                (fork.template_id, fork.build_id),
                (tid.clone(), bid.clone())
            );
        }
    }
    let new = NewSandbox {
        snapshot: Some(first.id.clone()),
        ..NewSandbox::default()
    };
    assert!(is_not_found(
        store
            .create_sandbox(&other.id, &new, &Limits::UNLIMITED)
            .await
    ));

    // The template is pinned while snapshots keep layers over its builds.
    for s in store
        .list_sandboxes(&acme.id, &SandboxFilter::default())
        .await
        .unwrap()
    {
        store
            .set_sandbox_status(&acme.id, &s.id, SandboxStatus::Deleted)
            .await
            .unwrap();
    }
    let err = store.delete_template(&acme.id, &tid).await.unwrap_err();
    assert!(err.to_string().contains("snapshots"), "{err}");
    for s in store.list_snapshots(&acme.id, None, None, 0).await.unwrap() {
        if s.status != SnapshotStatus::Failed {
            store.delete_snapshot(&acme.id, &s.id).await.unwrap();
        }
    }
    assert!(is_not_found(
        store.delete_snapshot(&acme.id, &first.id).await
    ));
    // Failed snapshots hold nothing: they go with the template.
    store.delete_template(&acme.id, &tid).await.unwrap();
    assert!(store
        .list_snapshots(&acme.id, None, None, 0)
        .await
        .unwrap()
        .is_empty());
}

#[tokio::test]
async fn interrupted_snapshots_fail_unless_their_runner_lives() {
    let (store, acme) = store_with_team().await;
    let (tid, _) = ready_template(&store, &acme, "web").await;
    let source = active_sandbox(&store, &acme, &tid, NewSandbox::default()).await;
    let (dead, _) = store
        .create_snapshot(&source, &NewSnapshot::default(), 1, &Limits::UNLIMITED)
        .await
        .unwrap();
    let (alive, _) = store
        .create_snapshot(&source, &NewSnapshot::default(), 2, &Limits::UNLIMITED)
        .await
        .unwrap();
    let failed = store
        .mark_interrupted_snapshots(|pid| pid == 2)
        .await
        .unwrap();
    assert_eq!(failed.iter().map(|s| &s.id).collect::<Vec<_>>(), [&dead.id]);
    assert_eq!(
        failed[0].error_message.as_deref(),
        Some("snapshot_failed: interrupted by server restart")
    );
    let kept = store.snapshot_by_id(&acme.id, &alive.id).await.unwrap();
    assert_eq!(kept.status, SnapshotStatus::Creating);
}

#[tokio::test]
async fn timers_set_deadlines_with_the_status() {
    let (store, acme) = store_with_team().await;
    let (tid, _) = ready_template(&store, &acme, "web").await;
    let timed = NewSandbox {
        timeout_seconds: Some(60),
        auto_delete_seconds: Some(0),
        ..NewSandbox::default()
    };
    let s = active_sandbox(&store, &acme, &tid, timed).await;
    let since = s.updated_at;
    assert_eq!(s.pause_at, Some(since + chrono::TimeDelta::seconds(60)));
    assert_eq!(s.delete_at, None);
    let armed = store.sandboxes_with_deadlines().await.unwrap();
    assert_eq!(armed.iter().map(|x| &x.id).collect::<Vec<_>>(), [&s.id]);

    // Paused: the pause deadline goes, the delete countdown starts (0: at once).
    for st in [SandboxStatus::Pausing, SandboxStatus::Paused] {
        store.set_sandbox_status(&acme.id, &s.id, st).await.unwrap();
    }
    let p = store.sandbox_by_id(&acme.id, &s.id).await.unwrap();
    assert_eq!((p.pause_at, p.delete_at), (None, Some(p.updated_at)));
    // Re-armed while paused: the countdown starts over; cleared: none.
    let p = store
        .set_sandbox_timers(&acme.id, &s.id, None, Some(Some(30)))
        .await
        .unwrap();
    assert_eq!(p.auto_delete_seconds, Some(30));
    assert_eq!(
        p.delete_at,
        Some(p.updated_at + chrono::TimeDelta::seconds(30))
    );
    // A timeout set while paused waits for the resume.
    let p = store
        .set_sandbox_timers(&acme.id, &s.id, Some(Some(5)), Some(None))
        .await
        .unwrap();
    assert_eq!(
        (p.timeout_seconds, p.pause_at, p.delete_at),
        (Some(5), None, None)
    );
    assert!(store.sandboxes_with_deadlines().await.unwrap().is_empty());
    // Resumed: a fresh window of the new timeout.
    for st in [SandboxStatus::Resuming, SandboxStatus::Active] {
        store.set_sandbox_status(&acme.id, &s.id, st).await.unwrap();
    }
    let a = store.sandbox_by_id(&acme.id, &s.id).await.unwrap();
    assert_eq!(
        a.pause_at,
        Some(a.updated_at + chrono::TimeDelta::seconds(5))
    );
    // Cleared while active: no deadline; killed: none either.
    let a = store
        .set_sandbox_timers(&acme.id, &s.id, Some(None), None)
        .await
        .unwrap();
    assert_eq!(a.pause_at, None);
    let a = store
        .set_sandbox_timers(&acme.id, &s.id, Some(Some(9)), None)
        .await
        .unwrap();
    assert!(a.pause_at.is_some());
    let d = store
        .set_sandbox_status(&acme.id, &s.id, SandboxStatus::Deleted)
        .await
        .unwrap();
    assert_eq!((d.pause_at, d.delete_at), (None, None));
}

#[tokio::test]
async fn system_templates_are_seen_by_every_team_and_changed_by_none() {
    let (store, acme) = store_with_team().await;
    let system = store.team_by_id(SYSTEM_TEAM_ID).await.unwrap();
    let (sys_tid, sys_bid) = ready_template(&store, &system, "superserve/base").await;
    let (own, _) = ready_template(&store, &acme, "mine").await;
    let seen: Vec<String> = store
        .list_templates(&acme.id)
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.name)
        .collect();
    assert_eq!(seen, ["superserve/base", "mine"]);
    let t = store
        .template_by_id_or_name(&acme.id, "superserve/base")
        .await
        .unwrap();
    assert_eq!(t.id, sys_tid);
    store.build_by_id(&acme.id, &sys_bid).await.unwrap();
    // A team's sandbox of it is the team's.
    let s = active_sandbox(&store, &acme, "superserve/base", NewSandbox::default()).await;
    assert_eq!(
        (s.team_id.as_str(), s.template_id.as_str()),
        (acme.id.as_str(), sys_tid.as_str())
    );
    // Nobody but the system team rebuilds, cancels or deletes it.
    let err = store
        .start_rebuild(&acme.id, "superserve/base", None, &Limits::UNLIMITED)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err}");
    assert!(matches!(
        store.delete_template(&acme.id, &sys_tid).await,
        Err(StoreError::Conflict(_))
    ));
    assert!(matches!(
        store.cancel_build(&acme.id, &sys_bid).await,
        Err(StoreError::Conflict(_))
    ));
    // System templates do not count against a team's template limit.
    let one = Limits {
        max_templates: 2,
        ..Limits::UNLIMITED
    };
    store
        .create_template_with_build(&acme.id, &request("second", "v1"), &one)
        .await
        .unwrap();
    store
        .start_rebuild(SYSTEM_TEAM_ID, &sys_tid, None, &Limits::UNLIMITED)
        .await
        .unwrap();
    drop(own);
}
