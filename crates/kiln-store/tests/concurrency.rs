//! Limits must hold when many requests race: a file-backed database (WAL, a pool of
//! connections) and 20 concurrent tasks against a limit of 3.

mod common;

use std::future::Future;

use common::{ready_template, request, team};
use kiln_store::{
    Build, BuiltArtifact, Limit, Limits, NewSandbox, Sandbox, SandboxStatus, Store, StoreError,
    Team, Template, TemplateStatus,
};

const RACERS: usize = 20;
const LIMIT: u32 = 3;

/// A store on a file under a fresh temp dir (in a subdirectory `open` must create), with one
/// team, `acme`. The dir is removed when the returned guard drops.
async fn file_store() -> (tempfile::TempDir, Store, Team) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("state/kiln.db")).await.unwrap();
    let acme = team(&store, "acme").await;
    (dir, store, acme)
}

/// Starts `RACERS` tasks at once, task `i` running `task(i)`, then collects their results.
async fn race<T, Fut>(task: impl Fn(usize) -> Fut) -> Vec<T>
where
    Fut: Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let handles: Vec<_> = (0..RACERS).map(|i| tokio::spawn(task(i))).collect();
    let mut out = Vec::with_capacity(RACERS);
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

/// Checks that exactly `winners` racers succeeded and every other one was refused with
/// `which` (any other error fails the test); returns the successes.
fn expect_winners<T>(results: Vec<Result<T, StoreError>>, which: Limit, winners: usize) -> Vec<T> {
    let mut ok = Vec::new();
    let mut refused = 0;
    for r in results {
        match r {
            Ok(v) => ok.push(v),
            Err(e) if e.limit_reached() == Some(which) => refused += 1,
            Err(e) => panic!("unexpected error: {e:?}"),
        }
    }
    assert_eq!(ok.len(), winners, "successes");
    assert_eq!(refused, RACERS - winners, "refusals");
    ok
}

/// Templates `t0`, `t1`, ... created at once under `limits`.
async fn race_to_create_templates(
    store: &Store,
    team: &Team,
    limits: Limits,
) -> Vec<Result<(Template, Build), StoreError>> {
    race(|i| {
        let (store, team_id) = (store.clone(), team.id.clone());
        async move {
            store
                .create_template_with_build(&team_id, &request(&format!("t{i}"), "v1"), &limits)
                .await
        }
    })
    .await
}

/// Sandboxes `s0`, `s1`, ... of `template` created at once under `limits`.
async fn race_to_create_sandboxes(
    store: &Store,
    team: &Team,
    template: &str,
    limits: Limits,
) -> Vec<Result<(Sandbox, String), StoreError>> {
    race(|i| {
        let (store, team_id) = (store.clone(), team.id.clone());
        let new = NewSandbox {
            template: template.to_owned(),
            name: Some(format!("s{i}")),
            ..Default::default()
        };
        async move { store.create_sandbox(&team_id, &new, &limits).await }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn template_limit_holds_under_concurrency() {
    let (_dir, store, team) = file_store().await;
    let limits = Limits {
        max_templates: LIMIT,
        ..Limits::UNLIMITED
    };
    expect_winners(
        race_to_create_templates(&store, &team, limits).await,
        Limit::Templates,
        LIMIT as usize,
    );
    assert_eq!(store.list_templates(&team.id).await.unwrap().len(), 3);
    // Every winner got its build, and no loser left one behind.
    assert_eq!(store.pending_builds().await.unwrap().len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn build_limit_holds_under_concurrency() {
    let (_dir, store, team) = file_store().await;
    let limits = Limits {
        max_concurrent_builds: LIMIT,
        ..Limits::UNLIMITED
    };
    let ok = expect_winners(
        race_to_create_templates(&store, &team, limits).await,
        Limit::Builds,
        LIMIT as usize,
    );
    assert_eq!(store.list_templates(&team.id).await.unwrap().len(), 3);

    // Rebuilds with distinct specs race for the slots freed by finishing the builds.
    for (_, b) in &ok {
        store.start_build(&b.id).await.unwrap();
        store
            .finish_build(&b.id, Ok(BuiltArtifact { size_bytes: 1 }))
            .await
            .unwrap();
    }
    let template = ok[0].0.id.clone();
    let rebuilds = race(|i| {
        let (store, team_id, template) = (store.clone(), team.id.clone(), template.clone());
        async move {
            let spec = request("ignored", &format!("v{i}"));
            store
                .start_rebuild(&team_id, &template, Some(&spec), &limits)
                .await
        }
    })
    .await;
    let ok = expect_winners(rebuilds, Limit::Builds, LIMIT as usize);
    assert!(ok.iter().all(|r| r.created));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_identical_rebuilds_share_one_build() {
    let (_dir, store, team) = file_store().await;
    let (template, _) = ready_template(&store, &team, "web").await;
    let results = race(|_| {
        let (store, team_id, template) = (store.clone(), team.id.clone(), template.clone());
        async move {
            store
                .start_rebuild(&team_id, &template, None, &Limits::UNLIMITED)
                .await
                .unwrap()
        }
    })
    .await;
    assert_eq!(results.iter().filter(|r| r.created).count(), 1);
    let id = &results[0].build.id;
    assert!(results.iter().all(|r| &r.build.id == id));
    assert_eq!(
        store.list_builds(&team.id, &template).await.unwrap().len(),
        2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sandbox_limit_holds_under_concurrency() {
    let (_dir, store, team) = file_store().await;
    let (template, _) = ready_template(&store, &team, "web").await;
    let limits = Limits {
        max_live_sandboxes: LIMIT,
        ..Limits::UNLIMITED
    };
    let ok = expect_winners(
        race_to_create_sandboxes(&store, &team, &template, limits).await,
        Limit::Sandboxes,
        LIMIT as usize,
    );

    // Failed and deleted sandboxes free their slot.
    store
        .set_sandbox_status(&team.id, &ok[0].0.id, SandboxStatus::Failed)
        .await
        .unwrap();
    store
        .set_sandbox_status(&team.id, &ok[1].0.id, SandboxStatus::Deleted)
        .await
        .unwrap();
    expect_winners(
        race_to_create_sandboxes(&store, &team, &template, limits).await,
        Limit::Sandboxes,
        2,
    );
}

#[tokio::test]
async fn reopening_keeps_data_and_migrations_are_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kiln.db");
    let store = Store::open(&path).await.unwrap();
    assert!(path.exists());
    let team = team(&store, "acme").await;
    let (template, _) = ready_template(&store, &team, "web").await;
    store.close().await;
    drop(store);

    let store = Store::open(&path).await.unwrap();
    let t = store.template_by_id_or_name(&team.id, "web").await.unwrap();
    assert_eq!(t.id, template);
    assert_eq!(t.status, TemplateStatus::Ready);
}
