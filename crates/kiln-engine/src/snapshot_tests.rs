//! Snapshots, forks, auto-pause/auto-delete and system templates on the fake hypervisor:
//! the engine's bookkeeping (statuses, which VM was captured or restored from which
//! bundle, what is left on disk, who wins a race with a timer), which the real-VM tests
//! and the SDK scenarios cannot reach cheaply or at all.

use std::time::Duration;

use chrono::TimeDelta;
use kiln_api::{
    ApiErrorCode, CreateSandbox, CreateSnapshot, ExecRequest, SandboxStatus, SnapshotPage,
    SnapshotStatus, UpdateSandbox, UpdateSnapshot,
};
use kiln_store::Limits;
use kiln_vm::fake::Call;

use crate::testing::TestEngine;

const TEAM: &str = "acme";

async fn engine(limits: Limits) -> (TestEngine, String) {
    let t = TestEngine::new(limits, 0).await.unwrap();
    let team = t.team(TEAM).await.unwrap();
    t.ready_template(TEAM, "web").await.unwrap();
    (t, team)
}

/// A running sandbox of `web` with env `SOURCE=1`; its id.
async fn running(t: &TestEngine, team: &str, name: &str) -> String {
    let mut req = CreateSandbox::new(name, "web");
    req.env_vars.insert("SOURCE".into(), "1".into());
    t.engine
        .create_sandbox(team, &req)
        .await
        .unwrap()
        .sandbox
        .sandbox
        .id
}

fn named(name: &str) -> CreateSnapshot {
    CreateSnapshot {
        name: Some(name.into()),
        ..CreateSnapshot::default()
    }
}

/// Takes a snapshot and waits for it to be ready.
pub(crate) async fn snapshot(t: &TestEngine, team: &str, sandbox: &str, name: &str) -> String {
    let taken = t
        .engine
        .create_snapshot(team, sandbox, &named(name))
        .await
        .unwrap();
    let s = t
        .engine
        .wait_snapshot(team, &taken.snapshot.id, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(s.status, SnapshotStatus::Ready, "{s:?}");
    s.id
}

/// The API code of a failed call.
fn code<T>(r: crate::Result<T>) -> ApiErrorCode {
    match r {
        Ok(_) => panic!("expected a failure"),
        Err(e) => e.code(),
    }
}

fn dir_entries(path: std::path::PathBuf) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(path)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[tokio::test]
async fn a_snapshot_captures_a_running_sandbox_which_runs_on() {
    let (t, team) = engine(Limits::UNLIMITED).await;
    let id = running(&t, &team, "src").await;
    let pid = t.hypervisor.alive()[0];
    let taken = t
        .engine
        .create_snapshot(&team, &id, &named("first"))
        .await
        .unwrap();
    assert!(taken.created);
    assert_eq!(taken.snapshot.sandbox_id, id);
    assert_eq!(taken.snapshot.kind, "mem+fs");
    // The source was checkpointed, not consumed, and serves its data plane.
    assert_eq!(t.hypervisor.alive(), [pid]);
    assert!(t
        .hypervisor
        .calls()
        .iter()
        .any(|c| matches!(c, Call::Checkpoint(p, _) if *p == pid)));
    let handle = t.engine.sandbox_for_team(&team, &id).await.unwrap();
    assert_eq!(
        handle
            .exec(&ExecRequest::new("true"))
            .await
            .unwrap()
            .exit_code,
        0
    );

    let ready = t
        .engine
        .wait_snapshot(&team, &taken.snapshot.id, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(ready.status, SnapshotStatus::Ready);
    assert!(ready.ready_at.is_some() && ready.size_bytes > 0);
    assert_eq!(ready.resources.memory_mib, 1024, "the template's shape");
    // Published whole, nothing left staged; made forkable in the background.
    assert_eq!(
        dir_entries(t.dir.path().join("snapshots")),
        [ready.id.as_str()]
    );
    assert!(t
        .hypervisor
        .calls()
        .iter()
        .any(|c| matches!(c, Call::MakeForkable(_, _))));

    // The same idempotency key answers the first snapshot; newest first in listings.
    let keyed = CreateSnapshot {
        idempotency_key: Some("k".into()),
        ..CreateSnapshot::default()
    };
    let a = t.engine.create_snapshot(&team, &id, &keyed).await.unwrap();
    let b = t.engine.create_snapshot(&team, &id, &keyed).await.unwrap();
    assert!(a.created && !b.created);
    assert_eq!(a.snapshot.id, b.snapshot.id);
    let listed = t
        .engine
        .list_snapshots(&team, Some(&id), &SnapshotPage::default())
        .await
        .unwrap();
    assert_eq!(
        listed.iter().map(|s| &s.id).collect::<Vec<_>>(),
        [&a.snapshot.id, &ready.id]
    );
    let renamed = t
        .engine
        .rename_snapshot(
            &team,
            &ready.id,
            &UpdateSnapshot {
                name: "renamed".into(),
            },
        )
        .await
        .unwrap();
    assert_eq!(renamed.name.as_deref(), Some("renamed"));
}

#[tokio::test]
async fn forks_continue_from_the_snapshot_side_by_side_and_outlive_it() {
    let (t, team) = engine(Limits::UNLIMITED).await;
    let src = running(&t, &team, "src").await;
    let snap = snapshot(&t, &team, &src, "s").await;
    t.engine.kill_sandbox(&team, &src).await.unwrap();
    let bundle = t.dir.path().join("snapshots").join(&snap);

    let mut forks = Vec::new();
    for name in ["f1", "f2"] {
        let mut req = CreateSandbox::from_snapshot(name, &snap);
        req.env_vars.insert("FORK".into(), name.into());
        let up = t.engine.create_sandbox(&team, &req).await.unwrap();
        let info = up.sandbox.sandbox;
        assert_eq!(info.source_snapshot_id.as_deref(), Some(snap.as_str()));
        assert_eq!(info.status, SandboxStatus::Active);
        forks.push(info.id);
    }
    assert_eq!(t.hypervisor.alive().len(), 2, "two forks side by side");
    for (fork, name) in forks.iter().zip(["f1", "f2"]) {
        let origin = t.dir.path().join("sandboxes").join(fork).join("origin");
        // Restored from its own links to the snapshot's files.
        assert!(t
            .hypervisor
            .calls()
            .iter()
            .any(|c| matches!(c, Call::Prepare(b, _) if *b == origin)));
        // The template's defaults with the fork's own env; not the source's env.
        let handle = t.engine.sandbox_for_team(&team, fork).await.unwrap();
        let out = handle.exec(&ExecRequest::new("env")).await.unwrap();
        drop(out);
        let agent = t
            .engine
            .live_agent(&t.engine.store.sandbox_by_id(&team, fork).await.unwrap())
            .unwrap();
        let d = agent.get_defaults().await.unwrap();
        assert_eq!(
            d.env.get("TEMPLATE_VAR").map(String::as_str),
            Some("template")
        );
        assert_eq!(d.env.get("FORK").map(String::as_str), Some(name));
        assert!(!d.env.contains_key("SOURCE"), "{d:?}");
        assert_eq!(d.cwd.as_deref(), Some("/srv"));
    }

    // Deleting the snapshot takes nothing from the forks: they run on their links, and
    // pause and resume as any sandbox does.
    t.engine.delete_snapshot(&team, &snap).await.unwrap();
    assert!(!bundle.exists());
    let origin = t
        .dir
        .path()
        .join("sandboxes")
        .join(&forks[0])
        .join("origin");
    kiln_vm::snapshot::verify_bundle(&origin).await.unwrap();
    t.engine.pause_sandbox(&team, &forks[0]).await.unwrap();
    t.engine.resume_sandbox(&team, &forks[0]).await.unwrap();
    // A new fork of the deleted snapshot is not found.
    let gone = t
        .engine
        .create_sandbox(&team, &CreateSandbox::from_snapshot("f3", &snap))
        .await
        .unwrap_err();
    assert_eq!(gone.code(), ApiErrorCode::NotFound, "{gone}");
}

#[tokio::test]
async fn bad_snapshot_requests_get_their_codes() {
    let limits = Limits {
        max_snapshots: 2,
        ..Limits::UNLIMITED
    };
    let (t, team) = engine(limits).await;
    let other = t.team("other").await.unwrap();
    let src = running(&t, &team, "src").await;
    let snap = snapshot(&t, &team, &src, "s").await;
    // Unknown or another team's: not found, for every route.
    assert_eq!(
        code(t.engine.snapshot(&team, "nope").await),
        ApiErrorCode::NotFound
    );
    assert_eq!(
        code(t.engine.snapshot(&other, &snap).await),
        ApiErrorCode::NotFound
    );
    assert_eq!(
        code(t.engine.delete_snapshot(&other, &snap).await),
        ApiErrorCode::NotFound
    );
    assert_eq!(
        code(
            t.engine
                .create_sandbox(&other, &CreateSandbox::from_snapshot("x", &snap))
                .await
        ),
        ApiErrorCode::NotFound
    );
    assert_eq!(
        code(t.engine.create_snapshot(&other, &src, &named("x")).await),
        ApiErrorCode::NotFound
    );
    assert_eq!(
        code(
            t.engine
                .list_snapshots(&other, Some(&src), &SnapshotPage::default())
                .await
        ),
        ApiErrorCode::NotFound
    );
    // The team's limit.
    t.engine
        .create_snapshot(&team, &src, &named("2"))
        .await
        .unwrap();
    assert_eq!(
        code(t.engine.create_snapshot(&team, &src, &named("3")).await),
        ApiErrorCode::TooManySnapshots
    );
    t.engine.delete_snapshot(&team, &snap).await.unwrap();
    // A killed sandbox is gone: no snapshot of it, and GET answers 404; its snapshots
    // are still listed.
    t.engine.kill_sandbox(&team, &src).await.unwrap();
    assert_eq!(
        code(t.engine.sandbox(&team, &src).await),
        ApiErrorCode::NotFound
    );
    assert_eq!(
        code(t.engine.create_snapshot(&team, &src, &named("x")).await),
        ApiErrorCode::NotFound
    );
    let listed = t
        .engine
        .list_snapshots(&team, Some(&src), &SnapshotPage::default())
        .await
        .unwrap();
    assert_eq!(listed.len(), 1);
    // A kind that is not mem+fs, a fork that names both a template and a snapshot.
    let bad = CreateSnapshot {
        kind: Some("fs".into()),
        ..CreateSnapshot::default()
    };
    let src2 = running(&t, &team, "src2").await;
    assert_eq!(
        code(t.engine.create_snapshot(&team, &src2, &bad).await),
        ApiErrorCode::InvalidRequest
    );
    let mut both = CreateSandbox::from_snapshot("x", &listed[0].id);
    both.from_template = Some("web".into());
    assert_eq!(
        code(t.engine.create_sandbox(&team, &both).await),
        ApiErrorCode::InvalidRequest
    );
}

#[tokio::test]
async fn a_paused_sandbox_is_captured_from_its_pause_snapshot_and_stays_paused() {
    let (t, team) = engine(Limits::UNLIMITED).await;
    let src = running(&t, &team, "src").await;
    t.engine.pause_sandbox(&team, &src).await.unwrap();
    let calls = t.hypervisor.calls().len();
    let snap = snapshot(&t, &team, &src, "of-paused").await;
    // No VM was started or checkpointed for it; the stream capture was made forkable.
    let new_calls = &t.hypervisor.calls()[calls..];
    assert!(
        new_calls
            .iter()
            .all(|c| matches!(c, Call::MakeForkable(_, _))),
        "{new_calls:?}"
    );
    assert!(t.hypervisor.alive().is_empty());
    assert_eq!(
        t.engine.sandbox(&team, &src).await.unwrap().status,
        SandboxStatus::Paused
    );
    // It forks like any snapshot, and the source still resumes.
    t.engine
        .create_sandbox(&team, &CreateSandbox::from_snapshot("f", &snap))
        .await
        .unwrap();
    t.engine.resume_sandbox(&team, &src).await.unwrap();
}

#[tokio::test]
async fn a_failed_capture_leaves_the_snapshot_failed_and_the_sandbox_running() {
    let (t, team) = engine(Limits::UNLIMITED).await;
    let src = running(&t, &team, "src").await;
    t.hypervisor
        .fail_checkpoints(Some("No space left on device"));
    let err = t
        .engine
        .create_snapshot(&team, &src, &named("full"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), ApiErrorCode::SnapshotFailed, "{err}");
    let all = t
        .engine
        .list_snapshots(&team, None, &SnapshotPage::default())
        .await
        .unwrap();
    assert_eq!(all[0].status, SnapshotStatus::Failed);
    assert!(all[0]
        .error_message
        .as_deref()
        .is_some_and(|m| m.starts_with("snapshot_failed: ")));
    assert!(dir_entries(t.dir.path().join("snapshots")).is_empty());
    let handle = t.engine.sandbox_for_team(&team, &src).await.unwrap();
    assert_eq!(
        handle
            .exec(&ExecRequest::new("true"))
            .await
            .unwrap()
            .exit_code,
        0
    );
    // A failure while making it forkable (in the background) fails it too.
    t.hypervisor.fail_checkpoints(None);
    t.hypervisor
        .fail_make_forkable(Some("No space left on device"));
    let taken = t
        .engine
        .create_snapshot(&team, &src, &named("later"))
        .await
        .unwrap();
    let s = t
        .engine
        .wait_snapshot(&team, &taken.snapshot.id, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(s.status, SnapshotStatus::Failed);
    assert!(dir_entries(t.dir.path().join("snapshots")).is_empty());
    assert_eq!(
        t.engine.sandbox(&team, &src).await.unwrap().status,
        SandboxStatus::Active
    );
    // A failed snapshot cannot be forked.
    let err = t
        .engine
        .create_sandbox(&team, &CreateSandbox::from_snapshot("f", &s.id))
        .await
        .unwrap_err();
    assert_eq!(err.code(), ApiErrorCode::NotReady, "{err}");
}

#[tokio::test]
async fn a_capture_cut_short_by_a_restart_ends_failed_with_nothing_left() {
    let (t, team) = engine(Limits::UNLIMITED).await;
    let src = running(&t, &team, "src").await;
    // What a server killed mid-capture leaves: a `creating` row whose process is gone,
    // and a half-written staging directory.
    let sandbox = t.engine.store.sandbox_by_id(&team, &src).await.unwrap();
    let (row, _) = t
        .engine
        .store
        .create_snapshot(
            &sandbox,
            &Default::default(),
            u32::MAX - 1,
            &Limits::UNLIMITED,
        )
        .await
        .unwrap();
    let staging = t.engine.layout.snapshot_staging_dir(&row.id).unwrap();
    std::fs::create_dir_all(staging.join("capture")).unwrap();
    std::fs::write(staging.join("capture/state"), b"half").unwrap();
    // And a bundle no row owns (deleted while its deleter died).
    std::fs::create_dir_all(t.dir.path().join("snapshots/orphan")).unwrap();

    let recovered = t.engine.recover_after_restart().await.unwrap();
    assert_eq!(recovered.snapshots, [row.id.as_str()]);
    let s = t.engine.snapshot(&team, &row.id).await.unwrap();
    assert_eq!(s.status, SnapshotStatus::Failed);
    assert_eq!(
        s.error_message.as_deref(),
        Some("snapshot_failed: interrupted by server restart")
    );
    assert!(dir_entries(t.dir.path().join("snapshots")).is_empty());
}

#[tokio::test]
async fn a_template_with_snapshots_is_kept_until_they_are_deleted() {
    let (t, team) = engine(Limits::UNLIMITED).await;
    let src = running(&t, &team, "src").await;
    let snap = snapshot(&t, &team, &src, "s").await;
    t.engine.kill_sandbox(&team, &src).await.unwrap();
    let err = t.engine.delete_template(&team, "web").await.unwrap_err();
    assert_eq!(err.code(), ApiErrorCode::Conflict, "{err}");
    assert!(err.to_string().contains("snapshots"), "{err}");
    // A fork still starts: the template's disk is there.
    let fork = t
        .engine
        .create_sandbox(&team, &CreateSandbox::from_snapshot("f", &snap))
        .await
        .unwrap();
    t.engine
        .kill_sandbox(&team, &fork.sandbox.sandbox.id)
        .await
        .unwrap();
    t.engine.delete_snapshot(&team, &snap).await.unwrap();
    t.engine.delete_template(&team, "web").await.unwrap();
}

#[tokio::test]
async fn status_semantics_pause_resume_and_network_on_a_paused_sandbox() {
    let (t, team) = engine(Limits::UNLIMITED).await;
    let id = running(&t, &team, "s").await;
    assert_eq!(
        code(t.engine.resume_sandbox(&team, &id).await),
        ApiErrorCode::Conflict,
        "resuming a running sandbox"
    );
    t.engine.pause_sandbox(&team, &id).await.unwrap();
    let again = t.engine.pause_sandbox(&team, &id).await.unwrap_err();
    assert_eq!(again.code(), ApiErrorCode::Conflict);
    // Egress rules set while paused are kept and in force once it runs again.
    let rules = kiln_api::NetworkConfig {
        allow_out: vec![],
        deny_out: vec!["0.0.0.0/0".into()],
    };
    let update = UpdateSandbox {
        network: Some(Some(rules.clone())),
        ..UpdateSandbox::default()
    };
    t.engine.update_sandbox(&team, &id, &update).await.unwrap();
    t.engine.resume_sandbox(&team, &id).await.unwrap();
    assert_eq!(
        t.engine.sandbox(&team, &id).await.unwrap().network,
        Some(rules)
    );
}

/// A sandbox of `web` with timers; its id.
async fn timed(
    t: &TestEngine,
    team: &str,
    timeout: Option<u64>,
    auto_delete: Option<u64>,
) -> String {
    let req = CreateSandbox {
        timeout_seconds: timeout,
        auto_delete_seconds: auto_delete,
        ..CreateSandbox::new("timed", "web")
    };
    t.engine
        .create_sandbox(team, &req)
        .await
        .unwrap()
        .sandbox
        .sandbox
        .id
}

#[tokio::test]
async fn timers_pause_then_delete_at_their_deadlines() {
    let (t, team) = engine(Limits::UNLIMITED).await;
    let id = timed(&t, &team, Some(60), Some(30)).await;
    let info = t.engine.sandbox(&team, &id).await.unwrap();
    assert_eq!(
        (info.timeout_seconds, info.auto_delete_seconds),
        (Some(60), Some(30))
    );
    assert_eq!(info.auto_delete_at, None, "armed only while paused");
    let start = kiln_store::now();
    // Not yet: the next deadline is the pause, a minute out.
    let next = t.engine.fire_due_timers(start).await.unwrap().unwrap();
    assert!(next > start + TimeDelta::seconds(59), "{next}");
    assert_eq!(
        t.engine.sandbox(&team, &id).await.unwrap().status,
        SandboxStatus::Active
    );

    let later = start + TimeDelta::seconds(61);
    t.engine.fire_due_timers(later).await.unwrap();
    let paused = t.engine.sandbox(&team, &id).await.unwrap();
    assert_eq!(paused.status, SandboxStatus::Paused);
    let delete_at = paused
        .auto_delete_at
        .expect("the countdown runs while paused");
    // Re-armed while paused: the countdown starts over from now.
    let rearm = UpdateSandbox {
        auto_delete_seconds: Some(Some(120)),
        ..UpdateSandbox::default()
    };
    t.engine.update_sandbox(&team, &id, &rearm).await.unwrap();
    let rearmed = t
        .engine
        .sandbox(&team, &id)
        .await
        .unwrap()
        .auto_delete_at
        .unwrap();
    assert!(rearmed > delete_at, "{rearmed} vs {delete_at}");
    t.engine
        .fire_due_timers(delete_at + TimeDelta::seconds(1))
        .await
        .unwrap();
    assert_eq!(
        t.engine.sandbox(&team, &id).await.unwrap().status,
        SandboxStatus::Paused
    );
    t.engine.fire_due_timers(rearmed).await.unwrap();
    let gone = t.engine.sandbox(&team, &id).await.unwrap_err();
    assert_eq!(gone.code(), ApiErrorCode::NotFound);
}

#[tokio::test]
async fn a_resume_before_the_deadline_wins_and_restarts_the_window() {
    let (t, team) = engine(Limits::UNLIMITED).await;
    let id = timed(&t, &team, Some(60), Some(30)).await;
    t.engine.pause_sandbox(&team, &id).await.unwrap();
    let delete_at = t
        .engine
        .sandbox(&team, &id)
        .await
        .unwrap()
        .auto_delete_at
        .unwrap();
    // The resume lands first (as a request in flight under the op lock would): the
    // deadline read before it no longer holds, so nothing is deleted.
    t.engine.resume_sandbox(&team, &id).await.unwrap();
    assert!(!t
        .engine
        .auto_delete(&team, &id, delete_at + TimeDelta::seconds(1))
        .await
        .unwrap());
    let info = t.engine.sandbox(&team, &id).await.unwrap();
    assert_eq!(
        (info.status, info.auto_delete_at),
        (SandboxStatus::Active, None)
    );
    // A fresh auto-pause window from the resume.
    let resumed_at = info.updated_at.unwrap();
    t.engine
        .fire_due_timers(resumed_at + TimeDelta::seconds(59))
        .await
        .unwrap();
    assert_eq!(
        t.engine.sandbox(&team, &id).await.unwrap().status,
        SandboxStatus::Active
    );
    // Cleared: never paused.
    let clear = UpdateSandbox {
        timeout_seconds: Some(None),
        ..UpdateSandbox::default()
    };
    t.engine.update_sandbox(&team, &id, &clear).await.unwrap();
    assert_eq!(
        t.engine
            .fire_due_timers(delete_at + TimeDelta::days(1))
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        t.engine.sandbox(&team, &id).await.unwrap().status,
        SandboxStatus::Active
    );
}

#[tokio::test]
async fn deadlines_survive_a_restart() {
    let (t, team) = engine(Limits::UNLIMITED).await;
    let id = timed(&t, &team, None, Some(600)).await;
    t.engine.pause_sandbox(&team, &id).await.unwrap();
    let delete_at = t
        .engine
        .sandbox(&team, &id)
        .await
        .unwrap()
        .auto_delete_at
        .unwrap();
    // The server goes away; a new one on the same state dir.
    let TestEngine { dir, engine, .. } = t;
    drop(engine);
    let t = TestEngine::open_in(dir, Limits::UNLIMITED, 0)
        .await
        .unwrap();
    t.engine.recover_after_restart().await.unwrap();
    let next = t.engine.fire_due_timers(kiln_store::now()).await.unwrap();
    assert_eq!(next, Some(delete_at));
    t.engine.fire_due_timers(delete_at).await.unwrap();
    let gone = t.engine.sandbox(&team, &id).await.unwrap_err();
    assert_eq!(gone.code(), ApiErrorCode::NotFound);
}

/// The timer task itself, on the real clock with one-second values: it wakes for the
/// deadlines it is told about, pauses, then deletes (0: at once).
#[tokio::test]
async fn the_timer_task_pauses_and_deletes_on_its_own() {
    let (t, team) = engine(Limits::UNLIMITED).await;
    let timer = tokio::spawn(t.engine.clone().run_timers());
    let id = timed(&t, &team, Some(1), Some(0)).await;
    for _ in 0..200 {
        if t.engine.sandbox(&team, &id).await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let gone = t.engine.sandbox(&team, &id).await.unwrap_err();
    assert_eq!(gone.code(), ApiErrorCode::NotFound);
    // It was paused first (a pause snapshot), then deleted.
    assert!(t
        .hypervisor
        .calls()
        .iter()
        .any(|c| matches!(c, Call::Snapshot(_, _))));
    timer.abort();
}

#[tokio::test]
async fn a_create_without_a_template_starts_from_the_system_base_and_waits_for_its_build() {
    let (t, team) = engine(Limits::UNLIMITED).await;
    let no_template = CreateSandbox {
        name: "quickstart".into(),
        ..CreateSandbox::default()
    };
    // No system template at all: the create says what is missing.
    let err = t
        .engine
        .create_sandbox(&team, &no_template)
        .await
        .unwrap_err();
    assert_eq!(err.code(), ApiErrorCode::NotReady, "{err}");
    assert!(err.to_string().contains("--system"), "{err}");
    // Its build is under way: the create waits for it.
    let (tid, bid) = {
        let sys = t.queued_system_template("superserve/base").await.unwrap();
        (sys.0, sys.1)
    };
    let engine = t.engine.clone();
    let team2 = team.clone();
    let create = tokio::spawn(async move { engine.create_sandbox(&team2, &no_template).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!create.is_finished(), "the create waits for the build");
    t.finish_queued(&tid, &bid).await.unwrap();
    let up = create.await.unwrap().unwrap();
    assert_eq!(
        up.sandbox.sandbox.template_id.as_deref(),
        Some(tid.as_str())
    );
    // Every team sees it; none deletes it.
    let listed = t.engine.list_templates(&team, "superserve/").await.unwrap();
    assert_eq!(listed.len(), 1);
    t.engine
        .kill_sandbox(&team, &up.sandbox.sandbox.id)
        .await
        .unwrap();
    let err = t
        .engine
        .delete_template(&team, "superserve/base")
        .await
        .unwrap_err();
    assert_eq!(err.code(), ApiErrorCode::Conflict, "{err}");
}
