//! Preview ports: policies, publication, token generations, team walls.

mod common;

use common::*;
use kiln_store::{Limits, NewSandbox, PortAccess, PreviewAccess, SandboxStatus, Store};

async fn sandbox(access: Option<PreviewAccess>) -> (Store, String, String) {
    let (store, team) = store_with_team().await;
    let (t, _) = ready_template(&store, &team, "web").await;
    let (s, _) = store
        .create_sandbox(
            &team.id,
            &NewSandbox {
                template: t,
                preview_access: access,
                ..Default::default()
            },
            &Limits::UNLIMITED,
        )
        .await
        .unwrap();
    (store, team.id, s.id)
}
#[tokio::test]
async fn publishing_follows_the_policy_and_versions_only_grow() {
    let (store, team, id) = sandbox(Some(PreviewAccess::Private)).await;
    let (s, p) = store
        .publish_preview_port(&team, &id, 3000, None)
        .await
        .unwrap();
    assert_eq!(s.preview_access, PreviewAccess::Private);
    assert_eq!(
        (p.access, p.token_version, p.published),
        (PortAccess::Private, 1, true)
    );
    // Re-publishing without an access keeps the port's; an explicit one overrides it.
    let (_, p) = store
        .publish_preview_port(&team, &id, 3000, Some(PortAccess::Public))
        .await
        .unwrap();
    assert_eq!(p.access, PortAccess::Public);
    store
        .set_preview_access(&team, &id, PreviewAccess::Private)
        .await
        .unwrap();
    let (_, p) = store
        .publish_preview_port(&team, &id, 3000, None)
        .await
        .unwrap();
    assert_eq!(p.access, PortAccess::Public);
    let (_, p) = store.rotate_preview_port(&team, &id, 3000).await.unwrap();
    assert_eq!(p.token_version, 2);
    // Unpublish revokes (idempotently); publishing again does not bring version 2 back.
    store
        .unpublish_preview_port(&team, &id, 3000)
        .await
        .unwrap();
    store
        .unpublish_preview_port(&team, &id, 3000)
        .await
        .unwrap();
    assert!(store
        .preview_target(&id, 3000)
        .await
        .unwrap()
        .unwrap()
        .1
        .is_none());
    assert!(store.rotate_preview_port(&team, &id, 3000).await.is_err());
    assert!(store
        .published_preview_port(&team, &id, 3000)
        .await
        .is_err());
    let (_, p) = store
        .publish_preview_port(&team, &id, 3000, None)
        .await
        .unwrap();
    assert_eq!((p.token_version, p.access), (3, PortAccess::Private));
    let (_, ports) = store.preview_ports(&team, &id).await.unwrap();
    assert_eq!(ports.len(), 1);
}

#[tokio::test]
async fn team_walls_and_deleted_sandboxes() {
    let (store, team, id) = sandbox(None).await;
    let other = store.create_team("other").await.unwrap();
    assert!(store
        .publish_preview_port(&other.id, &id, 3000, None)
        .await
        .is_err());
    assert!(store.preview_ports(&other.id, &id).await.is_err());
    let (s, p) = store
        .publish_preview_port(&team, &id, 3000, None)
        .await
        .unwrap();
    assert_eq!(s.preview_access, PreviewAccess::Public);
    assert_eq!(p.access, PortAccess::Public);
    store
        .set_sandbox_status(&team, &id, SandboxStatus::Deleted)
        .await
        .unwrap();
    assert!(store.preview_target(&id, 3000).await.unwrap().is_none());
    assert!(store
        .publish_preview_port(&team, &id, 3001, None)
        .await
        .is_err());
}
