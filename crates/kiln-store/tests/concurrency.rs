//! Limits must hold when many requests race: a file-backed database (WAL, a pool of
//! connections) and 20 concurrent tasks against a limit of 3.

mod common;

use std::sync::Arc;

use common::{ready_template, request, team};
use kiln_spec::RateLimitCode;
use kiln_store::{Limits, NewSandbox, Store, StoreError};

const RACERS: usize = 20;
const LIMIT: u32 = 3;

async fn file_store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("state/kiln.db")).await.unwrap();
    (dir, store)
}

/// Splits results into (successes, limit refusals) and fails on anything else.
fn tally<T>(results: Vec<Result<T, StoreError>>, code: RateLimitCode) -> (Vec<T>, usize) {
    let mut ok = Vec::new();
    let mut refused = 0;
    for r in results {
        match r {
            Ok(v) => ok.push(v),
            Err(e) if e.rate_limit_code() == Some(code) => refused += 1,
            Err(e) => panic!("unexpected error: {e:?}"),
        }
    }
    (ok, refused)
}

async fn join_all<T: Send + 'static>(handles: Vec<tokio::task::JoinHandle<T>>) -> Vec<T> {
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn template_limit_holds_under_concurrency() {
    let (_dir, store) = file_store().await;
    let team = Arc::new(team(&store, "acme").await);
    let limits = Limits {
        max_templates: LIMIT,
        ..Limits::UNLIMITED
    };
    let handles = (0..RACERS)
        .map(|i| {
            let (store, team) = (store.clone(), team.clone());
            tokio::spawn(async move {
                store
                    .create_template_with_build(&team.id, &request(&format!("t{i}"), "v1"), &limits)
                    .await
            })
        })
        .collect();
    let (ok, refused) = tally(join_all(handles).await, RateLimitCode::TooManyTemplates);
    assert_eq!(ok.len(), LIMIT as usize);
    assert_eq!(refused, RACERS - LIMIT as usize);
    assert_eq!(store.list_templates(&team.id).await.unwrap().len(), 3);
    // Every winner got its build, and no loser left one behind.
    assert_eq!(store.pending_builds().await.unwrap().len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn build_limit_holds_under_concurrency() {
    let (_dir, store) = file_store().await;
    let team = Arc::new(team(&store, "acme").await);
    let limits = Limits {
        max_concurrent_builds: LIMIT,
        ..Limits::UNLIMITED
    };
    let handles = (0..RACERS)
        .map(|i| {
            let (store, team) = (store.clone(), team.clone());
            tokio::spawn(async move {
                store
                    .create_template_with_build(&team.id, &request(&format!("t{i}"), "v1"), &limits)
                    .await
            })
        })
        .collect();
    let (ok, refused) = tally(join_all(handles).await, RateLimitCode::TooManyBuilds);
    assert_eq!(ok.len(), LIMIT as usize);
    assert_eq!(refused, RACERS - LIMIT as usize);
    assert_eq!(store.list_templates(&team.id).await.unwrap().len(), 3);

    // Rebuilds with distinct specs race for the slots freed by finishing the builds.
    for (_, b) in &ok {
        store.start_build(&b.id).await.unwrap();
        store
            .finish_build(&b.id, Ok(kiln_store::BuiltArtifact { size_bytes: 1 }))
            .await
            .unwrap();
    }
    let template = ok[0].0.id.clone();
    let handles = (0..RACERS)
        .map(|i| {
            let (store, team, template) = (store.clone(), team.clone(), template.clone());
            tokio::spawn(async move {
                let spec = request("ignored", &format!("v{i}"));
                store
                    .start_rebuild(&team.id, &template, Some(&spec), &limits)
                    .await
            })
        })
        .collect();
    let (ok, refused) = tally(join_all(handles).await, RateLimitCode::TooManyBuilds);
    assert_eq!(ok.len(), LIMIT as usize);
    assert!(ok.iter().all(|r| r.created));
    assert_eq!(refused, RACERS - LIMIT as usize);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_identical_rebuilds_share_one_build() {
    let (_dir, store) = file_store().await;
    let team = Arc::new(team(&store, "acme").await);
    let (template, _) = ready_template(&store, &team, "web").await;
    let handles = (0..RACERS)
        .map(|_| {
            let (store, team, template) = (store.clone(), team.clone(), template.clone());
            tokio::spawn(async move {
                store
                    .start_rebuild(&team.id, &template, None, &Limits::UNLIMITED)
                    .await
                    .unwrap()
            })
        })
        .collect();
    let results = join_all(handles).await;
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
    let (_dir, store) = file_store().await;
    let team = Arc::new(team(&store, "acme").await);
    let (template, _) = ready_template(&store, &team, "web").await;
    let limits = Limits {
        max_live_sandboxes: LIMIT,
        ..Limits::UNLIMITED
    };
    let race = |store: Store, team: Arc<kiln_store::Team>, template: String| {
        let handles = (0..RACERS)
            .map(|i| {
                let (store, team, template) = (store.clone(), team.clone(), template.clone());
                tokio::spawn(async move {
                    let new = NewSandbox {
                        template,
                        name: Some(format!("s{i}")),
                        ..Default::default()
                    };
                    store.create_sandbox(&team.id, &new, &limits).await
                })
            })
            .collect();
        join_all(handles)
    };
    let (ok, refused) = tally(
        race(store.clone(), team.clone(), template.clone()).await,
        RateLimitCode::TooManySandboxes,
    );
    assert_eq!(ok.len(), LIMIT as usize);
    assert_eq!(refused, RACERS - LIMIT as usize);

    // Failed and deleted sandboxes free their slot.
    store
        .set_sandbox_status(&team.id, &ok[0].0.id, kiln_store::SandboxStatus::Failed)
        .await
        .unwrap();
    store
        .set_sandbox_status(&team.id, &ok[1].0.id, kiln_store::SandboxStatus::Deleted)
        .await
        .unwrap();
    let (ok, refused) = tally(
        race(store.clone(), team.clone(), template).await,
        RateLimitCode::TooManySandboxes,
    );
    assert_eq!(ok.len(), 2);
    assert_eq!(refused, RACERS - 2);
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
    assert_eq!(t.status, kiln_store::TemplateStatus::Ready);
}
