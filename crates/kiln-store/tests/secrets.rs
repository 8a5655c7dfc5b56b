//! Team secrets and their bindings: names, team walls, sealing through the caller,
//! bindings at create and later, detach, and what deleting a secret does to them.

mod common;

use common::{ready_template, store_with_team, team};
use kiln_api::{HostPattern, SecretAuth};
use kiln_store::{
    BindingState, Limits, NewBinding, NewSandbox, NewSecret, SandboxStatus, Store, StoreError, Team,
};

fn new_secret(name: &str) -> NewSecret {
    NewSecret {
        name: name.into(),
        auth: SecretAuth::Rule(kiln_api::AuthRule::Bearer),
        hosts: vec![HostPattern::parse("api.openai.com").unwrap()],
        provider: Some("openai".into()),
    }
}

/// What the store is given instead of a value: a "sealed" text naming the id it is
/// bound to, so a test sees that sealing happened for the right row.
fn seal(id: &str) -> String {
    format!("sealed-for-{id}")
}

fn binding(env: &str, secret: &str, stand_in: &str) -> NewBinding {
    NewBinding {
        env_key: env.into(),
        secret_name: secret.into(),
        stand_in: stand_in.into(),
    }
}

async fn sandbox(store: &Store, team: &Team, secrets: Vec<NewBinding>) -> String {
    let new = NewSandbox {
        template: "web".into(),
        secrets,
        ..NewSandbox::default()
    };
    let (s, _) = store
        .create_sandbox(&team.id, &new, &Limits::UNLIMITED)
        .await
        .unwrap();
    store
        .set_sandbox_status(&team.id, &s.id, SandboxStatus::Active)
        .await
        .unwrap();
    s.id
}

#[tokio::test]
async fn secrets_are_named_once_per_team_and_sealed_for_their_own_id() {
    let (store, acme) = store_with_team().await;
    let other = team(&store, "other").await;
    let s = store
        .create_secret(&acme.id, &new_secret("openai"), &seal)
        .await
        .unwrap();
    assert_eq!(s.sealed, seal(&s.id));
    assert_eq!(s.provider.as_deref(), Some("openai"));
    assert!(matches!(
        store
            .create_secret(&acme.id, &new_secret("openai"), &seal)
            .await,
        Err(StoreError::Conflict(_))
    ));
    // Another team has its own namespace and cannot see this one.
    store
        .create_secret(&other.id, &new_secret("openai"), &seal)
        .await
        .unwrap();
    assert!(matches!(
        store.secret_by_name(&other.id, "nope").await,
        Err(StoreError::NotFound { .. })
    ));
    assert_eq!(store.list_secrets(&acme.id).await.unwrap().len(), 1);
    assert_eq!(store.all_secrets().await.unwrap().len(), 2);

    // Rotation moves updated_at; re-sealing under a new key does not.
    let rotated = store
        .reseal_secret(&acme.id, "openai", &|s| Ok(format!("v2-{}", s.id)), true)
        .await
        .unwrap();
    assert_eq!(rotated.sealed, format!("v2-{}", s.id));
    assert!(rotated.updated_at >= s.updated_at);
    let resealed = store
        .reseal_secret(&acme.id, "openai", &|s| Ok(format!("v3-{}", s.id)), false)
        .await
        .unwrap();
    assert_eq!(resealed.updated_at, rotated.updated_at);
}

#[tokio::test]
async fn bindings_at_create_attach_detach_and_revocation_by_delete() {
    let (store, acme) = store_with_team().await;
    ready_template(&store, &acme, "web").await;
    store
        .create_secret(&acme.id, &new_secret("openai"), &seal)
        .await
        .unwrap();
    store
        .create_secret(&acme.id, &new_secret("spare"), &seal)
        .await
        .unwrap();

    // An unknown secret at create: nothing is created.
    let new = NewSandbox {
        template: "web".into(),
        secrets: vec![binding("K", "missing", "s0")],
        ..NewSandbox::default()
    };
    assert!(matches!(
        store
            .create_sandbox(&acme.id, &new, &Limits::UNLIMITED)
            .await,
        Err(StoreError::NotFound { kind: "secret", .. })
    ));
    assert!(store
        .list_sandboxes(&acme.id, &Default::default())
        .await
        .unwrap()
        .is_empty());

    let id = sandbox(
        &store,
        &acme,
        vec![binding("OPENAI_API_KEY", "openai", "s1")],
    )
    .await;
    let s = store.sandbox_by_id(&acme.id, &id).await.unwrap();
    let b = &s.secrets[0];
    assert_eq!(
        (b.env_key.as_str(), b.stand_in.as_str(), b.state),
        ("OPENAI_API_KEY", "s1", BindingState::Bound)
    );
    assert_eq!(b.hosts[0].to_string(), "api.openai.com");

    // Attach: a second variable; the same variable again is a conflict.
    store
        .bind_secret(&acme.id, &id, &binding("SPARE", "spare", "s2"))
        .await
        .unwrap();
    assert!(matches!(
        store
            .bind_secret(&acme.id, &id, &binding("SPARE", "openai", "s3"))
            .await,
        Err(StoreError::Conflict(_))
    ));
    let openai = store.secret_by_name(&acme.id, "openai").await.unwrap();
    let bound = store
        .sandboxes_bound_to(&acme.id, &openai.id)
        .await
        .unwrap();
    assert_eq!(bound.len(), 1);

    // Detach keeps the stand-in (to refuse it), no longer bound.
    let s = store.unbind_secret(&acme.id, &id, "SPARE").await.unwrap();
    let spare: Vec<_> = s.secrets.iter().filter(|b| b.env_key == "SPARE").collect();
    assert_eq!(spare.len(), 1);
    assert_eq!(spare[0].state, BindingState::Detached);
    assert!(matches!(
        store.unbind_secret(&acme.id, &id, "SPARE").await,
        Err(StoreError::NotFound { .. })
    ));
    // ... and the variable can be bound again, with a new stand-in.
    store
        .bind_secret(&acme.id, &id, &binding("SPARE", "spare", "s4"))
        .await
        .unwrap();

    // Deleting a secret revokes its bindings in the same step.
    let (_, changed) = store.delete_secret(&acme.id, "openai").await.unwrap();
    assert_eq!(changed.len(), 1);
    let s = store.sandbox_by_id(&acme.id, &id).await.unwrap();
    let b = s
        .secrets
        .iter()
        .find(|b| b.env_key == "OPENAI_API_KEY")
        .unwrap();
    assert_eq!(
        (b.state, b.secret_id.as_deref()),
        (BindingState::Revoked, None)
    );
    assert!(store
        .sandboxes_bound_to(&acme.id, &openai.id)
        .await
        .unwrap()
        .is_empty());
    // A revoked variable may be bound to another secret.
    let s = store
        .bind_secret(&acme.id, &id, &binding("OPENAI_API_KEY", "spare", "s5"))
        .await
        .unwrap();
    assert_eq!(s.bound_secrets().count(), 2);

    // Another team sees none of it.
    let other = team(&store, "other").await;
    assert!(matches!(
        store
            .bind_secret(&other.id, &id, &binding("X", "spare", "s6"))
            .await,
        Err(StoreError::NotFound { .. })
    ));
    // A deleted sandbox takes no bindings.
    store
        .set_sandbox_status(&acme.id, &id, SandboxStatus::Deleted)
        .await
        .unwrap();
    assert!(matches!(
        store
            .bind_secret(&acme.id, &id, &binding("Y", "spare", "s7"))
            .await,
        Err(StoreError::NotFound { .. })
    ));
}
