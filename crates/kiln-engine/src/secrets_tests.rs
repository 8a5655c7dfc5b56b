//! Team secrets on the fake hypervisor: values sealed at rest (no byte of a value anywhere
//! in the state directory), bindings at create and later, what the guest's environment
//! and the egress proxy's bindings file hold through attach, detach, rotate, delete, a
//! fork's copy and a rotation of the key, and the audit as the API reads it.

use std::path::Path;

use kiln_api::{
    AttachSecret, AuditQuery, CreateSandbox, CreateSecret, RotateSecret, SandboxStatus,
};
use kiln_net::seal::KeyRing;
use kiln_net::secrets::{SandboxSecrets, SECRETS_FILE};
use kiln_store::Limits;

use crate::testing::TestEngine;
use crate::EngineError;

const TEAM: &str = "acme";
const VALUE: &str = "sk-live-VALUE-THAT-MUST-NEVER-BE-IN-CLEAR-0001";
const ROTATED: &str = "sk-live-ROTATED-VALUE-ALSO-NEVER-IN-CLEAR-0002";

async fn engine() -> (TestEngine, String) {
    let t = TestEngine::new(Limits::UNLIMITED, 0).await.unwrap();
    let team = t.team(TEAM).await.unwrap();
    t.ready_template(TEAM, "web").await.unwrap();
    (t, team)
}

fn openai(name: &str, value: &str) -> CreateSecret {
    CreateSecret {
        name: name.into(),
        value: value.into(),
        provider: Some("openai".into()),
        ..CreateSecret::default()
    }
}

/// Every file under `dir` whose bytes contain `needle`.
fn files_containing(dir: &Path, needle: &[u8]) -> Vec<String> {
    let mut hits = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = e.path();
            let Ok(meta) = std::fs::symlink_metadata(&path) else {
                continue;
            };
            if meta.is_dir() {
                stack.push(path);
            } else if meta.is_file() {
                let bytes = std::fs::read(&path).unwrap_or_default();
                if bytes.windows(needle.len()).any(|w| w == needle) {
                    hits.push(path.display().to_string());
                }
            }
        }
    }
    hits
}

fn bindings_file(t: &TestEngine, sandbox: &str) -> SandboxSecrets {
    let path = t
        .dir
        .path()
        .join("sandboxes")
        .join(sandbox)
        .join(SECRETS_FILE);
    SandboxSecrets::load(&path)
        .unwrap()
        .expect("a bindings file")
}

async fn guest_env(
    t: &TestEngine,
    team: &str,
    sandbox: &str,
) -> std::collections::BTreeMap<String, String> {
    let record = t.engine.store.sandbox_by_id(team, sandbox).await.unwrap();
    let agent = t.engine.live_agent(&record).unwrap();
    agent.get_defaults().await.unwrap().env
}

fn open(t: &TestEngine, sealed: &str, id: &str) -> String {
    let ring = KeyRing::load(&t.engine.cfg.secrets_key).unwrap();
    String::from_utf8(ring.open(sealed, id).unwrap()).unwrap()
}

#[tokio::test]
async fn values_are_sealed_at_rest_and_sandboxes_hold_only_stand_ins() {
    let (t, team) = engine().await;
    let info = t
        .engine
        .create_secret(&team, &openai("openai", VALUE))
        .await
        .unwrap();
    assert_eq!(info.auth_type.as_str(), "bearer");
    assert_eq!(info.hosts, ["api.openai.com"]);
    assert_eq!(info.provider_shortcut.as_deref(), Some("openai"));
    assert!(info.last_used_at.is_none());
    // The key is the owner's alone.
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&t.engine.cfg.secrets_key)
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);

    let mut req = CreateSandbox::new("box", "web");
    req.secrets.insert("OPENAI_API_KEY".into(), "openai".into());
    let up = t.engine.create_sandbox(&team, &req).await.unwrap();
    let id = up.sandbox.sandbox.id.clone();
    let listed = up.sandbox.sandbox.secrets.clone().unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(
        (listed[0].env_key.as_str(), listed[0].secret_name.as_str()),
        ("OPENAI_API_KEY", "openai")
    );

    // The guest's environment has a stand-in shaped like an OpenAI key.
    let env = guest_env(&t, &team, &id).await;
    let stand_in = env["OPENAI_API_KEY"].clone();
    assert!(
        stand_in.starts_with("sk-proj-") && stand_in.len() > 100,
        "{stand_in}"
    );
    assert_ne!(stand_in, VALUE);
    // The proxy's file has the stand-in and the value sealed, and only its owner reads it.
    let file = bindings_file(&t, &id);
    assert_eq!(file.sandbox_id, id);
    assert_eq!(file.bindings[0].stand_in, stand_in);
    assert_eq!(
        open(&t, file.bindings[0].sealed.as_ref().unwrap(), &info.id),
        VALUE
    );
    let path = t.dir.path().join("sandboxes").join(&id).join(SECRETS_FILE);
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&path).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);

    // Rotation: the file follows; the environment keeps its stand-in.
    t.engine
        .rotate_secret(
            &team,
            "openai",
            &RotateSecret {
                value: ROTATED.into(),
            },
        )
        .await
        .unwrap();
    let file = bindings_file(&t, &id);
    assert_eq!(
        open(&t, file.bindings[0].sealed.as_ref().unwrap(), &info.id),
        ROTATED
    );
    assert_eq!(guest_env(&t, &team, &id).await["OPENAI_API_KEY"], stand_in);

    // Nowhere in the state directory (database and its journal included) is either value
    // in clear.
    for value in [VALUE, ROTATED] {
        let hits = files_containing(t.dir.path(), value.as_bytes());
        assert!(hits.is_empty(), "{value} in clear in {hits:?}");
    }
}

#[tokio::test]
async fn attach_detach_and_delete_change_the_guest_and_the_proxy_at_once() {
    let (t, team) = engine().await;
    let secret = t
        .engine
        .create_secret(&team, &openai("openai", VALUE))
        .await
        .unwrap();
    let up = t
        .engine
        .create_sandbox(&team, &CreateSandbox::new("box", "web"))
        .await
        .unwrap();
    let id = up.sandbox.sandbox.id.clone();
    assert!(up.sandbox.sandbox.secrets.is_none());
    let attach = AttachSecret {
        env_key: "OPENAI_API_KEY".into(),
        secret_name: "openai".into(),
    };
    t.engine.attach_secret(&team, &id, &attach).await.unwrap();
    let stand_in = guest_env(&t, &team, &id).await["OPENAI_API_KEY"].clone();
    assert!(stand_in.starts_with("sk-proj-"));
    assert_eq!(bindings_file(&t, &id).bindings[0].stand_in, stand_in);
    let bound = t.engine.secret_sandboxes(&team, "openai").await.unwrap();
    assert_eq!(
        (bound[0].sandbox_id.as_str(), bound[0].env_key.as_str()),
        (id.as_str(), "OPENAI_API_KEY")
    );
    // Twice is a conflict; an unknown secret is not found.
    let again = t.engine.attach_secret(&team, &id, &attach).await;
    assert_eq!(again.unwrap_err().code().as_str(), "conflict");
    let missing = AttachSecret {
        env_key: "OTHER".into(),
        secret_name: "nope".into(),
    };
    let err = t
        .engine
        .attach_secret(&team, &id, &missing)
        .await
        .unwrap_err();
    assert_eq!(err.code().as_str(), "not_found");

    // Detach: gone from the environment; in the proxy's file, revoked (no value) so its
    // stand-in is refused.
    t.engine
        .detach_secret(&team, &id, "OPENAI_API_KEY")
        .await
        .unwrap();
    assert!(!guest_env(&t, &team, &id)
        .await
        .contains_key("OPENAI_API_KEY"));
    let file = bindings_file(&t, &id);
    assert_eq!(file.bindings[0].stand_in, stand_in);
    assert!(file.bindings[0].revoked());
    assert!(t
        .engine
        .sandbox(&team, &id)
        .await
        .unwrap()
        .secrets
        .is_none());
    assert!(t
        .engine
        .secret_sandboxes(&team, "openai")
        .await
        .unwrap()
        .is_empty());

    // Bound again, then the secret deleted: listed as revoked, refused by the proxy.
    t.engine.attach_secret(&team, &id, &attach).await.unwrap();
    t.engine.delete_secret(&team, "openai").await.unwrap();
    let listed = t.engine.sandbox(&team, &id).await.unwrap().secrets.unwrap();
    assert_eq!(listed[0].revoked, Some(true));
    assert!(bindings_file(&t, &id).bindings.iter().all(|b| b.revoked()));
    let gone = t.engine.secret(&team, "openai").await.unwrap_err();
    assert!(matches!(gone, EngineError::Store(_)));
    assert!(!t
        .dir
        .path()
        .join("secrets/audit")
        .join(format!("{}.log", secret.id))
        .exists());
}

#[tokio::test]
async fn a_paused_sandbox_gets_its_bindings_on_resume_and_a_fork_gets_stand_ins_of_its_own() {
    let (t, team) = engine().await;
    t.engine
        .create_secret(&team, &openai("openai", VALUE))
        .await
        .unwrap();
    let mut req = CreateSandbox::new("parent", "web");
    req.secrets.insert("OPENAI_API_KEY".into(), "openai".into());
    let parent = t
        .engine
        .create_sandbox(&team, &req)
        .await
        .unwrap()
        .sandbox
        .sandbox
        .id;
    let parent_stand_in = guest_env(&t, &team, &parent).await["OPENAI_API_KEY"].clone();

    t.engine.pause_sandbox(&team, &parent).await.unwrap();
    let attach = AttachSecret {
        env_key: "SECOND_KEY".into(),
        secret_name: "openai".into(),
    };
    t.engine
        .attach_secret(&team, &parent, &attach)
        .await
        .unwrap();
    t.engine.resume_sandbox(&team, &parent).await.unwrap();
    let env = guest_env(&t, &team, &parent).await;
    assert_eq!(
        env["OPENAI_API_KEY"], parent_stand_in,
        "a resume keeps the stand-ins"
    );
    assert!(env["SECOND_KEY"].starts_with("sk-proj-"), "{env:?}");

    // A fork of the parent's snapshot: the parent's bindings with stand-ins of its own.
    let snap = crate::snapshot_tests::snapshot(&t, &team, &parent, "s").await;
    let fork = t
        .engine
        .create_sandbox(&team, &CreateSandbox::from_snapshot("fork", &snap))
        .await
        .unwrap()
        .sandbox
        .sandbox
        .id;
    let fork_env = guest_env(&t, &team, &fork).await;
    let file = bindings_file(&t, &fork);
    assert_eq!(file.bindings.len(), 2);
    for b in &file.bindings {
        assert_eq!(fork_env[&b.env_key], b.stand_in);
        assert_ne!(
            b.stand_in, env[&b.env_key],
            "{} shares its parent's stand-in",
            b.env_key
        );
    }
}

#[tokio::test]
async fn a_new_secrets_key_reseals_everything_and_the_old_one_goes() {
    let (t, team) = engine().await;
    let secret = t
        .engine
        .create_secret(&team, &openai("openai", VALUE))
        .await
        .unwrap();
    let mut req = CreateSandbox::new("box", "web");
    req.secrets.insert("OPENAI_API_KEY".into(), "openai".into());
    let id = t
        .engine
        .create_sandbox(&team, &req)
        .await
        .unwrap()
        .sandbox
        .sandbox
        .id;
    let before = KeyRing::load(&t.engine.cfg.secrets_key)
        .unwrap()
        .current_id()
        .to_owned();
    assert_eq!(t.engine.rotate_secrets_key().await.unwrap(), 1);
    let ring = KeyRing::load(&t.engine.cfg.secrets_key).unwrap();
    assert_ne!(ring.current_id(), before);
    let sealed = bindings_file(&t, &id).bindings[0].sealed.clone().unwrap();
    assert!(ring.is_current(&sealed));
    assert_eq!(open(&t, &sealed, &secret.id), VALUE);
    let stored = t
        .engine
        .store
        .secret_by_name(&team, "openai")
        .await
        .unwrap();
    assert_eq!(open(&t, &stored.sealed, &secret.id), VALUE);
}

#[tokio::test]
async fn the_audit_reads_newest_first_with_sandbox_names_and_filters() {
    let (t, team) = engine().await;
    let secret = t
        .engine
        .create_secret(&team, &openai("openai", VALUE))
        .await
        .unwrap();
    let id = t
        .engine
        .create_sandbox(&team, &CreateSandbox::new("box", "web"))
        .await
        .unwrap();
    let id = id.sandbox.sandbox.id;
    // What the proxy appends (see `kiln egress-proxy`).
    let record = |status: u16, error: Option<&str>| kiln_net::RequestRecord {
        sandbox_id: id.clone(),
        secret_id: Some(secret.id.clone()),
        method: "POST".into(),
        host: "api.openai.com".into(),
        port: 443,
        path: "/v1/chat/completions".into(),
        status,
        upstream_status: error.is_none().then_some(status),
        latency_ms: 12,
        error_code: error.map(str::to_owned),
    };
    let file = t
        .dir
        .path()
        .join("secrets/audit")
        .join(format!("{}.log", secret.id));
    let ts = chrono::Utc::now();
    let lines: Vec<String> = [
        (1, record(200, None)),
        (2, record(401, None)),
        (3, record(403, Some("secret_revoked"))),
    ]
    .iter()
    .map(|(i, r)| serde_json::to_string(&r.audit_event(*i, ts)).unwrap())
    .collect();
    std::fs::write(&file, lines.join("\n") + "\nnot json\n").unwrap();

    let all = t
        .engine
        .secret_audit(
            &team,
            "openai",
            &AuditQuery {
                limit: 10,
                ..AuditQuery::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(all.iter().map(|e| e.id).collect::<Vec<_>>(), [3, 2, 1]);
    assert!(all.iter().all(|e| e.sandbox_name.as_deref() == Some("box")));
    let q = AuditQuery::from_query(&kiln_api::request::query_pairs("status=4xx&before=3")).unwrap();
    let page = t.engine.secret_audit(&team, "openai", &q).await.unwrap();
    assert_eq!(page.iter().map(|e| e.id).collect::<Vec<_>>(), [2]);
    assert!(t
        .engine
        .secret(&team, "openai")
        .await
        .unwrap()
        .last_used_at
        .is_some());

    // Once the sandbox is deleted its events stay, without its name.
    t.engine.kill_sandbox(&team, &id).await.unwrap();
    let all = t
        .engine
        .secret_audit(
            &team,
            "openai",
            &AuditQuery {
                limit: 10,
                ..AuditQuery::default()
            },
        )
        .await
        .unwrap();
    assert!(all
        .iter()
        .all(|e| e.sandbox_name.is_none() && e.sandbox_id == id));
    let record = t.engine.store.sandbox_by_id(&team, &id).await.unwrap();
    assert_eq!(record.status, SandboxStatus::Deleted);
}
