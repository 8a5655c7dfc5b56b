//! The sandbox lifecycle on the fake hypervisor: create, the data plane, pause and resume,
//! kill, the restore pool, restart recovery, and restores that fail. What these check is
//! the engine's bookkeeping around VMs (statuses, tokens, slots, directories, which VM
//! serves which sandbox), which the real-VM tests cannot reach cheaply or at all.

use std::time::Duration;

use kiln_api::{CreateSandbox, ExecRequest, SandboxFilter, SandboxStatus};
use kiln_store::Limits;
use kiln_vm::fake::Call;

use crate::testing::TestEngine;
use crate::EngineError;

const TEAM: &str = "acme";

async fn engine(pool: usize) -> (TestEngine, String, String) {
    let t = TestEngine::new(Limits::UNLIMITED, pool).await.unwrap();
    let team = t.team(TEAM).await.unwrap();
    let template = t.ready_template(TEAM, "web").await.unwrap();
    (t, team, template)
}

fn create(name: &str) -> CreateSandbox {
    CreateSandbox::new(name, "web")
}

/// Waits (bounded) for `cond`; a hang is a failure, not a slow pass.
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..400 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("never happened: {what}");
}

fn sandbox_dirs(t: &TestEngine) -> usize {
    std::fs::read_dir(t.dir.path().join("sandboxes")).map_or(0, |d| d.count())
}

fn run_dirs(t: &TestEngine) -> usize {
    std::fs::read_dir(t.dir.path().join("vms")).map_or(0, |d| d.count())
}

#[tokio::test]
async fn create_runs_the_sandbox_with_its_env_and_its_token_opens_the_data_plane() {
    let (t, team, _) = engine(0).await;
    let mut req = create("one");
    req.env_vars.insert("MODE".into(), "test".into());
    let up = t.engine.create_sandbox(&team, &req).await.unwrap();
    let s = &up.sandbox.sandbox;
    assert_eq!(s.status, SandboxStatus::Active);
    assert!(!up.sandbox.access_token.is_empty());
    assert!(up.restore_time.is_some());
    assert_eq!(t.hypervisor.alive().len(), 1);

    let handle = t
        .engine
        .sandbox_by_token(&s.id, &up.sandbox.access_token)
        .await
        .unwrap();
    let out = handle.exec(&ExecRequest::new("exit 3")).await.unwrap();
    assert_eq!((out.exit_code, out.stdout.as_str()), (3, "exit 3"));
    // The sandbox's env went over the template's defaults in the guest.
    let agent = t
        .engine
        .live_agent(&t.engine.store.sandbox_by_id(&team, &s.id).await.unwrap());
    let defaults = agent.unwrap().get_defaults().await.unwrap();
    assert_eq!(defaults.env["MODE"], "test");

    let wrong = t.engine.sandbox_by_token(&s.id, "not-the-token").await;
    assert!(matches!(wrong, Err(EngineError::WrongToken)), "{wrong:?}");
    let other_team = t.team("other").await.unwrap();
    let walled = t.engine.sandbox_for_team(&other_team, &s.id).await;
    assert!(matches!(walled, Err(EngineError::Store(_))), "{walled:?}");
}

#[tokio::test]
async fn pause_saves_and_stops_the_vm_and_resume_brings_it_back_with_a_new_token() {
    let (t, team, _) = engine(0).await;
    let up = t.engine.create_sandbox(&team, &create("p")).await.unwrap();
    let id = up.sandbox.sandbox.id.clone();
    let first_pid = t.hypervisor.alive()[0];

    let paused = t.engine.pause_sandbox(&team, &id).await.unwrap();
    assert_eq!(paused.sandbox.status, SandboxStatus::Paused);
    assert!(paused.snapshot_time.is_some());
    assert!(
        t.hypervisor.alive().is_empty(),
        "a paused sandbox holds no VM"
    );
    let bundle = t.dir.path().join("sandboxes").join(&id).join("paused");
    assert!(bundle.join("manifest.json").is_file());
    assert!(t.hypervisor.calls().contains(&Call::Snapshot(
        first_pid,
        t.dir.path().join("sandboxes").join(&id).join("paused-next")
    )));
    // Pausing again is a conflict (Superserve's errors.mdx); the data plane says to resume.
    let again = t.engine.pause_sandbox(&team, &id).await.unwrap_err();
    assert_eq!(again.code(), kiln_api::ApiErrorCode::Conflict, "{again}");
    let unavailable = t
        .engine
        .sandbox_by_token(&id, &up.sandbox.access_token)
        .await;
    assert!(
        matches!(unavailable, Err(EngineError::Unavailable(_))),
        "{unavailable:?}"
    );

    let resumed = t.engine.resume_sandbox(&team, &id).await.unwrap();
    assert_eq!(resumed.sandbox.sandbox.status, SandboxStatus::Active);
    assert_ne!(resumed.sandbox.access_token, up.sandbox.access_token);
    let restored_from = t.hypervisor.calls().into_iter().find_map(|c| match c {
        Call::Prepare(b, _) if b.ends_with("paused") => Some(b),
        _ => None,
    });
    assert!(restored_from.is_some(), "resumed from its own pause bundle");
    let stale = t
        .engine
        .sandbox_by_token(&id, &up.sandbox.access_token)
        .await;
    assert!(matches!(stale, Err(EngineError::WrongToken)));
    let handle = t
        .engine
        .sandbox_by_token(&id, &resumed.sandbox.access_token)
        .await
        .unwrap();
    assert_eq!(
        handle
            .exec(&ExecRequest::new("true"))
            .await
            .unwrap()
            .exit_code,
        0
    );

    // Activate on a running sandbox hands out the same token (other clients keep theirs).
    let active = t.engine.activate_sandbox(&team, &id).await.unwrap();
    assert_eq!(active.sandbox.access_token, resumed.sandbox.access_token);
    assert!(active.restore_time.is_none());
}

#[tokio::test]
async fn kill_stops_the_vm_removes_everything_and_is_idempotent() {
    let (t, team, _) = engine(0).await;
    let up = t.engine.create_sandbox(&team, &create("k")).await.unwrap();
    let id = up.sandbox.sandbox.id.clone();
    let pid = t.hypervisor.alive()[0];
    let killed = t.engine.kill_sandbox(&team, &id).await.unwrap();
    assert_eq!(killed.status, SandboxStatus::Deleted);
    assert!(t.hypervisor.calls().contains(&Call::Kill(pid)));
    assert!(t.hypervisor.alive().is_empty());
    assert_eq!((sandbox_dirs(&t), run_dirs(&t)), (0, 0));
    assert_eq!(
        t.engine.kill_sandbox(&team, &id).await.unwrap().status,
        SandboxStatus::Deleted
    );
    let gone = t
        .engine
        .sandbox_by_token(&id, &up.sandbox.access_token)
        .await;
    assert!(matches!(gone, Err(EngineError::Store(_))), "{gone:?}");
    // A paused sandbox is killed too, its snapshot with it.
    let up = t.engine.create_sandbox(&team, &create("k2")).await.unwrap();
    let id = up.sandbox.sandbox.id;
    t.engine.pause_sandbox(&team, &id).await.unwrap();
    t.engine.kill_sandbox(&team, &id).await.unwrap();
    assert_eq!(sandbox_dirs(&t), 0);
}

#[tokio::test]
async fn a_restore_that_fails_leaves_a_failed_sandbox_and_frees_its_slot() {
    let limits = Limits {
        max_live_sandboxes: 1,
        ..Limits::UNLIMITED
    };
    let t = TestEngine::new(limits, 0).await.unwrap();
    let team = t.team(TEAM).await.unwrap();
    let template = t.ready_template(TEAM, "web").await.unwrap();
    t.hypervisor
        .fail_restores_of(&t.bundle_of(TEAM, &template).await.unwrap());
    let err = t
        .engine
        .create_sandbox(&team, &create("f"))
        .await
        .unwrap_err();
    assert!(matches!(err, EngineError::Restore(_)), "{err:?}");
    let all = t
        .engine
        .list_sandboxes(&team, &SandboxFilter::default())
        .await
        .unwrap();
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].status, SandboxStatus::Failed);
    assert!(t.hypervisor.alive().is_empty());
    assert_eq!((sandbox_dirs(&t), run_dirs(&t)), (0, 0));
    // The failed sandbox does not hold the team's only slot: the limit refuses nothing
    // once restores work again (a second template, not failing).
    t.ready_template(TEAM, "web2").await.unwrap();
    t.engine
        .create_sandbox(&team, &CreateSandbox::new("ok", "web2"))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_resume_that_fails_keeps_the_sandbox_paused_with_its_snapshot() {
    let (t, team, _) = engine(0).await;
    let up = t.engine.create_sandbox(&team, &create("r")).await.unwrap();
    let id = up.sandbox.sandbox.id;
    t.engine.pause_sandbox(&team, &id).await.unwrap();
    let bundle = t.dir.path().join("sandboxes").join(&id).join("paused");
    t.hypervisor.fail_restores_of(&bundle);
    let err = t.engine.resume_sandbox(&team, &id).await.unwrap_err();
    assert!(matches!(err, EngineError::Restore(_)), "{err:?}");
    let s = t.engine.sandbox(&team, &id).await.unwrap();
    assert_eq!(s.status, SandboxStatus::Paused);
    assert!(bundle.join("manifest.json").is_file(), "nothing lost");
    assert!(t.hypervisor.alive().is_empty());
}

#[tokio::test]
async fn the_pool_keeps_a_vm_ready_and_a_create_claims_it() {
    let (t, team, template) = engine(1).await;
    let first = t.engine.create_sandbox(&team, &create("a")).await.unwrap();
    eventually("the pool has a VM waiting", || {
        t.engine.restore_pool_stats().waiting == 1
    })
    .await;
    let pooled_pid = *t
        .hypervisor
        .alive()
        .iter()
        .max()
        .expect("the pooled VM is alive");
    let second = t.engine.create_sandbox(&team, &create("b")).await.unwrap();
    assert_eq!(t.engine.restore_pool_stats().claimed, 1);
    // The pooled VM was finished for the second sandbox: no new VM was started for it.
    let calls = t.hypervisor.calls();
    let finish_of_pooled = calls.iter().position(|c| *c == Call::Finish(pooled_pid));
    assert!(finish_of_pooled.is_some(), "{calls:?}");
    let endpoint: crate::SandboxEndpoint = serde_json::from_slice(
        &std::fs::read(
            t.dir
                .path()
                .join("sandboxes")
                .join(&second.sandbox.sandbox.id)
                .join(crate::ENDPOINT_FILE),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(endpoint.qemu_pid, pooled_pid);
    // Deleting the template (once its sandboxes are gone) stops what the pool holds,
    // including the refill the claim started, still in flight now: when the delete
    // returns, no VM uses the template's files.
    for s in [&first, &second] {
        t.engine
            .kill_sandbox(&team, &s.sandbox.sandbox.id)
            .await
            .unwrap();
    }
    t.engine.delete_template(&team, &template).await.unwrap();
    assert_eq!(t.engine.restore_pool_stats().waiting, 0);
    assert!(t.hypervisor.alive().is_empty());
    assert_eq!(
        run_dirs(&t),
        0,
        "a launch of the deleted template left its run dir"
    );
}

#[tokio::test]
async fn a_restart_fails_sandboxes_whose_vm_died_and_keeps_paused_ones() {
    let (t, team, _) = engine(0).await;
    let running = t
        .engine
        .create_sandbox(&team, &create("run"))
        .await
        .unwrap();
    let paused = t
        .engine
        .create_sandbox(&team, &create("pau"))
        .await
        .unwrap();
    let (running, paused) = (running.sandbox.sandbox.id, paused.sandbox.sandbox.id);
    t.engine.pause_sandbox(&team, &paused).await.unwrap();
    // The server dies: its VMs with it, its state dir stays.
    let TestEngine { engine, dir, .. } = t;
    drop(engine);
    let t = TestEngine::open_in(dir, Limits::UNLIMITED, 0)
        .await
        .unwrap();
    let recovered = t.engine.recover_after_restart().await.unwrap();
    assert_eq!(recovered.sandboxes, std::slice::from_ref(&running));
    assert_eq!(
        t.engine.sandbox(&team, &running).await.unwrap().status,
        SandboxStatus::Failed
    );
    assert_eq!(
        t.engine.sandbox(&team, &paused).await.unwrap().status,
        SandboxStatus::Paused
    );
    let resumed = t.engine.resume_sandbox(&team, &paused).await.unwrap();
    assert_eq!(resumed.sandbox.sandbox.status, SandboxStatus::Active);
    assert_eq!(t.hypervisor.alive().len(), 1);
}
