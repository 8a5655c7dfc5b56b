//! Against a real local registry started by `scripts/test-registry.sh start`.
//!
//! These tests FAIL (never skip) when the registry is not running.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use kiln_oci::{ImageStore, OciError, RegistryConfig, RegistrySettings};
use kiln_spec::BuildErrorCode;

struct Env {
    reg: String,
    auth_reg: String,
    user: String,
    password: String,
}

fn env() -> Env {
    let assets =
        std::env::var("KILN_TEST_ASSETS").unwrap_or_else(|_| "/var/tmp/kiln-test-assets".into());
    let path = Path::new(&assets).join("registry.env");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "no test registry ({}: {e}): run `scripts/test-registry.sh start` first",
            path.display()
        )
    });
    let vars: BTreeMap<&str, &str> = text.lines().filter_map(|l| l.split_once('=')).collect();
    let get = |k: &str| {
        vars.get(k)
            .unwrap_or_else(|| {
                panic!(
                    "{k} missing from {}: rerun `scripts/test-registry.sh start`",
                    path.display()
                )
            })
            .to_string()
    };
    let e = Env {
        reg: get("KILN_TEST_REGISTRY"),
        auth_reg: get("KILN_TEST_AUTH_REGISTRY"),
        user: get("KILN_TEST_AUTH_USER"),
        password: get("KILN_TEST_AUTH_PASSWORD"),
    };
    for r in [&e.reg, &e.auth_reg] {
        if std::net::TcpStream::connect(r).is_err() {
            panic!("test registry {r} is not answering: run `scripts/test-registry.sh start`");
        }
    }
    e
}

fn store(cfg: RegistryConfig) -> (tempfile::TempDir, ImageStore) {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = ImageStore::open(dir.path(), cfg).expect("open store");
    (dir, s)
}

fn none(_: kiln_oci::Progress) {}

/// The digest skopeo finds for `reference`, logged in with the test credentials of `creds`.
fn skopeo_digest(reference: &str, creds: Option<&Env>) -> String {
    let mut skopeo = Command::new("skopeo");
    skopeo.args(["inspect", "--tls-verify=false"]);
    if let Some(e) = creds {
        skopeo
            .arg("--creds")
            .arg(format!("{}:{}", e.user, e.password));
    }
    let out = skopeo
        .arg(format!("docker://{reference}"))
        .output()
        .expect("run skopeo");
    assert!(
        out.status.success(),
        "skopeo inspect {reference}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("skopeo json");
    v["Digest"].as_str().expect("Digest").to_owned()
}

/// A configuration with `settings` for the test's authenticating registry.
fn for_auth_registry(e: &Env, settings: RegistrySettings) -> RegistryConfig {
    RegistryConfig {
        registries: BTreeMap::from([(e.auth_reg.clone(), settings)]),
        ..Default::default()
    }
}

fn code(e: &OciError) -> BuildErrorCode {
    e.code()
}

#[tokio::test]
async fn digests_match_skopeo_for_oci_docker_and_index() {
    let e = env();
    let (_d, s) = store(RegistryConfig::default());
    for name in [
        "kiln/minbase",
        "kiln/minbase-docker",
        "kiln/multi",
        "kiln/python",
    ] {
        let r = format!("{}/{name}:latest", e.reg);
        let image = s.resolve(&r).await.expect("resolve");
        assert_eq!(image.digest, skopeo_digest(&r, None), "{name}");
        assert_eq!(image.platform, "linux/amd64");
        // The default tag is `latest`.
        let untagged = s
            .resolve(&format!("{}/{name}", e.reg))
            .await
            .expect("resolve without tag");
        assert_eq!(untagged.digest, image.digest);
    }
    let multi = s
        .resolve(&format!("{}/kiln/multi", e.reg))
        .await
        .expect("multi");
    let minbase = s
        .resolve(&format!("{}/kiln/minbase", e.reg))
        .await
        .expect("minbase");
    assert_ne!(
        multi.digest, multi.manifest_digest,
        "an index resolves through to its amd64 manifest"
    );
    assert_eq!(multi.manifest_digest, minbase.manifest_digest);
    assert_eq!(
        minbase.config.cmd.as_deref(),
        Some(&["/bin/bash".to_owned()][..])
    );
    assert!(minbase.config.env.iter().any(|v| v.starts_with("PATH=")));
}

#[tokio::test]
async fn pull_unpack_vet_then_everything_is_cached() {
    let e = env();
    let (_d, s) = store(RegistryConfig::default());
    let r = format!("{}/kiln/minbase:latest", e.reg);
    let p = s.prepare(&r, Some(4096), &none).await.expect("prepare");
    assert!(p.pull.bytes_downloaded > 1_000_000, "{:?}", p.pull);
    assert_eq!(p.pull.blobs_downloaded, 2);
    assert!(!p.unpacked.reused);
    let root = &p.unpacked.rootfs;
    assert!(root.ends_with(format!(
        "images/sha256/{}/rootfs",
        &p.image.manifest_digest[7..]
    )));
    // Layer 2 (zstd): a new file, a whiteout and an opaque dir.
    assert_eq!(
        std::fs::read_to_string(root.join("etc/kiln-layer2")).expect("layer2"),
        "layer two\n"
    );
    assert!(!root.join("etc/issue.net").exists());
    assert!(root.join("etc/issue").exists());
    let debconf: Vec<_> = std::fs::read_dir(root.join("var/cache/debconf"))
        .expect("ls")
        .map(|e| e.expect("e").file_name())
        .collect();
    assert_eq!(debconf, ["kiln-only"]);
    assert!(std::fs::symlink_metadata(root.join("bin"))
        .expect("bin")
        .file_type()
        .is_symlink());
    assert!(p.vet.size_bytes > 50 << 20);
    // Image trees may hold setuid binaries and device nodes: owner-only.
    use std::os::unix::fs::PermissionsExt as _;
    let images = root.ancestors().nth(3).expect("images dir");
    assert!(images.ends_with("images"), "{}", images.display());
    assert_eq!(
        std::fs::metadata(images)
            .expect("images")
            .permissions()
            .mode()
            & 0o777,
        0o700
    );
    // Every blob in the cache is named by its verified digest.
    for l in &p.image.layers {
        assert_eq!(
            std::fs::metadata(s.blob_path(&l.digest).expect("path"))
                .expect("blob")
                .len(),
            l.size
        );
    }

    // Second time: nothing downloaded, rootfs reused.
    let again = s
        .prepare(&r, Some(4096), &none)
        .await
        .expect("prepare again");
    assert_eq!(again.pull.bytes_downloaded, 0);
    assert_eq!(again.pull.blobs_cached, 2);
    assert!(again.unpacked.reused);
    assert_eq!(again.unpacked.rootfs, p.unpacked.rootfs);

    // By digest: answered from the store.
    let pinned = s
        .resolve(&format!("{}/kiln/minbase@{}", e.reg, p.image.digest))
        .await
        .expect("by digest");
    assert_eq!(pinned.manifest_digest, p.image.manifest_digest);
    assert_eq!(s.list().expect("list").len(), 1);

    // Too small a disk.
    let err = s.prepare(&r, Some(10), &none).await.expect_err("too large");
    assert_eq!(code(&err), BuildErrorCode::ImageTooLarge, "{err}");
}

#[tokio::test]
async fn pull_by_digest_from_registry_and_index() {
    let e = env();
    let (_d, s) = store(RegistryConfig::default());
    let digest = skopeo_digest(&format!("{}/kiln/multi:latest", e.reg), None);
    let p = s
        .prepare(&format!("{}/kiln/multi@{digest}", e.reg), None, &none)
        .await
        .expect("by digest");
    assert_eq!(p.image.digest, digest);
    assert!(p.unpacked.rootfs.join("etc/kiln-layer2").exists());
}

#[tokio::test]
async fn index_without_amd64_is_unsupported_platform() {
    let e = env();
    let (_d, s) = store(RegistryConfig::default());
    let err = s
        .resolve(&format!("{}/kiln/armonly", e.reg))
        .await
        .expect_err("arm only");
    assert_eq!(code(&err), BuildErrorCode::UnsupportedPlatform, "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("linux/arm64/v8") && msg.contains("linux/arm/v7"),
        "{msg}"
    );
}

#[tokio::test]
async fn errors_have_codes_and_actionable_details() {
    let e = env();
    let (_d, s) = store(RegistryConfig::default());
    let err = s.resolve("Not A Ref").await.expect_err("bad ref");
    assert_eq!(code(&err), BuildErrorCode::BadReference);

    let err = s
        .resolve(&format!("{}/kiln/minbase:no-such-tag", e.reg))
        .await
        .expect_err("missing tag");
    assert_eq!(code(&err), BuildErrorCode::ImagePullFailed);
    assert!(err.detail().contains("not found"), "{}", err.detail());

    let err = s
        .resolve(&format!("{}/kiln/no-such-repo", e.reg))
        .await
        .expect_err("missing repo");
    assert_eq!(code(&err), BuildErrorCode::ImagePullFailed);
    assert!(err.detail().contains("not found"), "{}", err.detail());

    let err = s
        .resolve("127.0.0.1:1/kiln/minbase")
        .await
        .expect_err("unreachable");
    assert_eq!(code(&err), BuildErrorCode::RegistryUnreachable);
    assert!(err.to_string().contains("cannot be reached"), "{err}");
}

#[tokio::test]
async fn vetting_refuses_alpine_and_shell_less_images() {
    let e = env();
    let (_d, s) = store(RegistryConfig::default());
    for (name, needle) in [("alpine-like", "Alpine"), ("noshell", "/bin/sh")] {
        let err = s
            .prepare(&format!("{}/kiln/{name}", e.reg), None, &none)
            .await
            .expect_err(name);
        assert_eq!(code(&err), BuildErrorCode::ImageUnsafe, "{err}");
        assert!(err.to_string().contains(needle), "{err}");
    }
    s.prepare(&format!("{}/kiln/tiny", e.reg), None, &none)
        .await
        .expect("tiny has /bin/sh via /bin -> usr/bin");
}

#[tokio::test]
async fn mirrors_are_tried_before_upstream() {
    let e = env();
    // Mirrors that are down, or lack the repository, then the real registry.
    let (_d, s) = store(for_auth_registry(
        &e,
        RegistrySettings {
            mirrors: vec!["http://127.0.0.1:1".into(), format!("http://{}", e.reg)],
            username: Some(e.user.clone()),
            password: Some(e.password.clone()),
            ..Default::default()
        },
    ));
    let r = format!("{}/kiln/authonly", e.auth_reg);
    let p = s
        .prepare(&r, None, &none)
        .await
        .expect("falls through to upstream");
    assert!(p.pull.bytes_downloaded > 0);
    assert_eq!(p.image.digest, skopeo_digest(&r, Some(&e)));

    // Docker Hub through KILN_REGISTRY_MIRRORS (Docker Hub itself is unreachable here).
    std::env::set_var(
        "KILN_REGISTRY_MIRRORS",
        format!("docker.io=http://{}", e.reg),
    );
    let cfg = RegistryConfig::load(None).expect("config");
    std::env::remove_var("KILN_REGISTRY_MIRRORS");
    let (_d2, s2) = store(cfg);
    let hub = s2
        .resolve("minbase")
        .await
        .expect("docker.io/library/minbase via the mirror");
    assert_eq!(hub.reference, "docker.io/library/minbase:latest");
    assert_eq!(
        hub.digest,
        skopeo_digest(&format!("{}/library/minbase:latest", e.reg), None)
    );
    s2.pull(&hub, &none).await.expect("pull via mirror");
}

#[tokio::test]
async fn basic_auth_good_and_bad_credentials() {
    let e = env();
    let with = |user: &str, password: &str| {
        for_auth_registry(
            &e,
            RegistrySettings {
                username: Some(user.into()),
                password: Some(password.into()),
                ..Default::default()
            },
        )
    };
    let r = format!("{}/kiln/tiny:latest", e.auth_reg);
    let (_d, s) = store(with(&e.user, &e.password));
    let p = s.prepare(&r, None, &none).await.expect("good credentials");
    assert!(p.pull.bytes_downloaded > 0);

    let (_d, s) = store(with(&e.user, "wrong"));
    let err = s.resolve(&r).await.expect_err("bad credentials");
    assert_eq!(code(&err), BuildErrorCode::ImagePullFailed);
    assert!(err.detail().contains("credentials"), "{}", err.detail());

    let (_d, s) = store(RegistryConfig::default());
    let err = s.resolve(&r).await.expect_err("no credentials");
    assert_eq!(code(&err), BuildErrorCode::ImagePullFailed);

    // Credentials `docker login` stored in ~/.docker/config.json (here via DOCKER_CONFIG).
    let docker = tempfile::tempdir().expect("tempdir");
    let auth = base64_encode(format!("{}:{}", e.user, e.password).as_bytes());
    std::fs::write(
        docker.path().join("config.json"),
        format!(r#"{{"auths":{{"{}":{{"auth":"{auth}"}}}}}}"#, e.auth_reg),
    )
    .expect("write docker config");
    std::env::set_var("DOCKER_CONFIG", docker.path());
    let cfg = RegistryConfig::load(None);
    std::env::remove_var("DOCKER_CONFIG");
    let (_d, s) = store(cfg.expect("config"));
    s.resolve(&r)
        .await
        .expect("credentials from Docker's config");
}

fn base64_encode(bytes: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in bytes.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[tokio::test]
async fn prune_keeps_only_what_is_reachable() {
    let e = env();
    let (dir, s) = store(RegistryConfig::default());
    let tiny = s
        .prepare(&format!("{}/kiln/tiny", e.reg), None, &none)
        .await
        .expect("tiny");
    let noshell = s
        .resolve(&format!("{}/kiln/noshell", e.reg))
        .await
        .expect("noshell");
    s.pull(&noshell, &none).await.expect("pull noshell");
    let blobs = |d: &Path| -> Vec<PathBuf> {
        std::fs::read_dir(d.join("blobs/sha256"))
            .expect("ls")
            .map(|e| e.expect("e").path())
            .collect()
    };
    let before = blobs(dir.path()).len();
    let report = s.prune(&[tiny.image.digest.as_str()]).expect("prune");
    assert_eq!(report.images_removed, 1);
    assert_eq!(
        report.blobs_removed, 3,
        "manifest, config, layer of noshell"
    );
    assert_eq!(blobs(dir.path()).len(), before - 3);
    assert!(tiny.unpacked.rootfs.exists());
    assert_eq!(s.list().expect("list").len(), 1);
    // Nothing kept: everything goes.
    s.prune(&[]).expect("prune all");
    assert!(blobs(dir.path()).is_empty());
    assert!(s.list().expect("list").is_empty());
}

/// A loopback TCP proxy in front of the test registry that cuts every connection once it
/// has sent `cut_after` bytes back to the client: small answers (manifests, configs) get
/// through, a layer blob is cut off mid-body. With `stall`, the connection is held open
/// instead, sending nothing more: the download hangs mid-body.
fn cutting_proxy(upstream: &str, cut_after: usize, stall: bool) -> String {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind proxy");
    let addr = listener.local_addr().expect("addr").to_string();
    let upstream = upstream.to_owned();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(mut client) = client else { continue };
            let Ok(mut server) = std::net::TcpStream::connect(&upstream) else {
                continue;
            };
            let (mut c2, mut s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut c2, &mut s2);
            });
            std::thread::spawn(move || {
                let mut sent = 0;
                let mut buf = [0u8; 8192];
                while let Ok(n) = server.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    let n = n.min(cut_after.saturating_sub(sent));
                    if n == 0 || client.write_all(&buf[..n]).is_err() {
                        if stall {
                            std::thread::sleep(std::time::Duration::from_secs(120));
                        }
                        break;
                    }
                    sent += n;
                }
                let _ = client.shutdown(std::net::Shutdown::Both);
                let _ = server.shutdown(std::net::Shutdown::Both);
            });
        }
    });
    addr
}

/// A pull dropped while a blob is mid-download (the caller gave up, or another blob of the
/// image failed and the rest were abandoned) leaves no temp file in the blob cache.
#[tokio::test]
async fn a_pull_dropped_midway_leaves_no_temp_file() {
    use std::sync::atomic::{AtomicU64, Ordering};
    let e = env();
    let proxy = cutting_proxy(&e.reg, 48 * 1024, true);
    let (dir, s) = store(RegistryConfig::default());
    let received = AtomicU64::new(0);
    let progress = |p: kiln_oci::Progress| {
        if let kiln_oci::Progress::BlobBytes { bytes, .. } = p {
            received.fetch_add(bytes, Ordering::Relaxed);
        }
    };
    let blobs = dir.path().join("blobs/sha256");
    let temp_files = || -> Vec<String> {
        std::fs::read_dir(&blobs)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".tmp-"))
            .collect()
    };
    let reference = format!("{proxy}/kiln/minbase:latest");
    tokio::select! {
        r = s.prepare(&reference, None, &progress) => {
            panic!("the pull should hang on the stalled blob, it ended: ok = {}", r.is_ok());
        }
        () = async {
            while received.load(Ordering::Relaxed) == 0 {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        } => {}
    }
    // The pull was dropped above, with a blob's bytes arriving.
    assert!(received.load(Ordering::Relaxed) > 0);
    assert_eq!(temp_files(), Vec::<String>::new(), "a temp file was left");
}

#[tokio::test]
async fn a_registry_cutting_a_blob_midway_fails_cleanly_and_leaves_no_partial_blob() {
    let e = env();
    let proxy = cutting_proxy(&e.reg, 48 * 1024, false);
    let (dir, s) = store(RegistryConfig::default());
    let err = s
        .prepare(&format!("{proxy}/kiln/minbase:latest"), None, &none)
        .await
        .expect_err("a cut blob must fail the pull");
    assert_eq!(
        code(&err),
        BuildErrorCode::ImagePullFailed,
        "{}",
        err.detail()
    );
    // Whatever is in the blob cache is whole: every file's name is its own digest, and
    // no temp file is left.
    let blobs = dir.path().join("blobs/sha256");
    for entry in std::fs::read_dir(&blobs).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let bytes = std::fs::read(entry.path()).expect("read blob");
        let digest = {
            use sha2::Digest as _;
            hex::encode(sha2::Sha256::digest(&bytes))
        };
        assert_eq!(name, digest, "a partial or corrupt blob was kept");
    }
    assert!(
        !dir.path().join("images/sha256").exists()
            || std::fs::read_dir(dir.path().join("images/sha256"))
                .expect("ls images")
                .next()
                .is_none(),
        "an image was published from a cut pull"
    );
    // The same store then pulls the same image whole from the registry itself.
    s.prepare(&format!("{}/kiln/minbase:latest", e.reg), None, &none)
        .await
        .expect("pull after the cut");
}
