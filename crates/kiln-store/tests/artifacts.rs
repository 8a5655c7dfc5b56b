//! The state-directory layout, atomic writes and the artifact manifest.

use std::fs;
use std::path::Path;

use kiln_spec::{Resources, RuntimeDefaults};
use kiln_store::{
    publish_dir, write_atomic, ArtifactError, ArtifactManifest, Layout, MANIFEST_FILE,
};

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn layout_paths() {
    let root = tempfile::tempdir().unwrap();
    let l = Layout::new(root.path());
    l.ensure().unwrap();
    assert_eq!(l.db_path(), root.path().join("kiln.db"));
    assert_eq!(
        l.blob_path("sha256:ab12").unwrap(),
        root.path().join("blobs/sha256/ab12")
    );
    assert_eq!(
        l.image_dir("sha256:ab12").unwrap(),
        root.path().join("images/sha256/ab12")
    );
    assert_eq!(
        l.artifact_dir("t-1", "b-2").unwrap(),
        root.path().join("templates/t-1/b-2")
    );
    assert_eq!(
        l.staging_dir("t-1", "b-2").unwrap(),
        root.path().join("templates/t-1/.b-2.partial")
    );
    assert_eq!(
        l.sandbox_dir("s1").unwrap(),
        root.path().join("sandboxes/s1")
    );
    for dir in ["blobs/sha256", "images/sha256", "templates", "sandboxes"] {
        assert!(root.path().join(dir).is_dir(), "{dir}");
    }
    for bad in ["", "..", "../x", "a/b", ".hidden"] {
        assert!(
            matches!(l.sandbox_dir(bad), Err(ArtifactError::BadName(_))),
            "{bad:?}"
        );
        assert!(l.artifact_dir("t", bad).is_err(), "{bad:?}");
    }
    for bad in ["sha256", "sha256:", "sha256:../x", ":ab", "sha256:xyz"] {
        assert!(l.blob_path(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn write_atomic_replaces_and_leaves_no_temp_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.json");
    write_atomic(&path, b"one").unwrap();
    assert_eq!(fs::read(&path).unwrap(), b"one");
    write_atomic(&path, b"two, longer").unwrap();
    assert_eq!(fs::read(&path).unwrap(), b"two, longer");
    assert_eq!(names(dir.path()), ["state.json"]);

    // A failed write (directory missing) leaves nothing behind either.
    let missing = dir.path().join("nope/state.json");
    assert!(matches!(
        write_atomic(&missing, b"x"),
        Err(ArtifactError::Io { .. })
    ));
    // Renaming onto a directory fails after the temp file was written: it is cleaned up.
    fs::create_dir(dir.path().join("taken")).unwrap();
    fs::write(dir.path().join("taken/inner"), b"").unwrap();
    assert!(write_atomic(&dir.path().join("taken"), b"x").is_err());
    assert_eq!(names(dir.path()), ["state.json", "taken"]);
}

fn sample(dir: &Path) -> ArtifactManifest {
    fs::write(dir.join("disk.ext4"), vec![7u8; 300_000]).unwrap();
    fs::write(dir.join("memory.bin"), b"guest ram").unwrap();
    fs::write(dir.join("vmstate"), b"").unwrap();
    let mut m = ArtifactManifest::new(
        "tmpl-1",
        "build-1",
        "sha256:aaaa",
        "sha256:bbbb",
        RuntimeDefaults {
            env: vec![("A".into(), "1".into()), ("PATH".into(), "/usr/bin".into())],
            workdir: "/app".into(),
            user: "app".into(),
        },
        Resources {
            vcpu: 2,
            memory_mib: 512,
            disk_mib: 1024,
        },
    );
    for f in ["disk.ext4", "memory.bin", "vmstate"] {
        m.add_file(dir, f).unwrap();
    }
    m
}

#[test]
fn manifest_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let m = sample(dir.path());
    assert_eq!(m.version, 1);
    assert_eq!(m.files.len(), 3);
    assert_eq!(m.files[0].size, 300_000);
    assert_eq!(
        m.files[2].sha256.as_deref(),
        Some("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
    );
    assert_eq!(m.total_size(), 300_000 + 9);
    let path = m.write(dir.path()).unwrap();
    assert_eq!(path, dir.path().join(MANIFEST_FILE));
    let text = fs::read_to_string(&path).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(json["version"], 1);
    assert_eq!(json["runtime"]["env"][0], serde_json::json!(["A", "1"]));
    assert_eq!(ArtifactManifest::read(dir.path()).unwrap(), m);
    assert_eq!(ArtifactManifest::read_verified(dir.path()).unwrap(), m);
    // Re-adding a file replaces its entry.
    let mut m2 = m.clone();
    fs::write(dir.path().join("memory.bin"), b"new ram!!!").unwrap();
    m2.add_file(dir.path(), "memory.bin").unwrap();
    assert_eq!(m2.files.len(), 3);
    assert!(m2.add_file(dir.path(), "../etc/passwd").is_err());
    assert!(m2.add_file(dir.path(), MANIFEST_FILE).is_err());
}

/// A snapshot bundle's files are listed with their sizes, unhashed (the bundle's own
/// manifest has their digests), and a reader checks that they are there, whole.
#[test]
fn bundle_files_are_listed_by_size_and_checked_on_read() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    fs::create_dir(d.join("bundle")).unwrap();
    fs::write(d.join("bundle/memory"), vec![0u8; 4096]).unwrap();
    let mut m = ArtifactManifest::new(
        "t",
        "b",
        "sha256:aaaa",
        "sha256:bbbb",
        Default::default(),
        Default::default(),
    );
    m.list_file("bundle/memory", 4096).unwrap();
    for bad in ["bundle/../x", "/etc/passwd", "bundle//x", "", "./x"] {
        assert!(m.list_file(bad, 1).is_err(), "{bad:?}");
    }
    assert_eq!(m.total_size(), 4096);
    m.write(d).unwrap();
    let json: serde_json::Value =
        serde_json::from_slice(&fs::read(d.join(MANIFEST_FILE)).unwrap()).unwrap();
    assert!(json["files"][0].get("sha256").is_none(), "{json}");
    assert_eq!(ArtifactManifest::read_verified(d).unwrap(), m);
    fs::write(d.join("bundle/memory"), vec![0u8; 10]).unwrap();
    assert_corrupt(
        ArtifactManifest::read(d),
        "bundle/memory is 10 bytes, expected 4096",
    );
}

fn assert_corrupt(r: Result<ArtifactManifest, ArtifactError>, needle: &str) {
    match r {
        Err(ArtifactError::Corrupt { reason, .. }) => {
            assert!(reason.contains(needle), "{reason:?} lacks {needle:?}")
        }
        other => panic!("expected Corrupt({needle}), got {other:?}"),
    }
}

#[test]
fn corruption_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let m = sample(d);
    m.write(d).unwrap();

    // Same size, one byte flipped: only the checksum notices.
    let mut bytes = fs::read(d.join("disk.ext4")).unwrap();
    bytes[150_000] ^= 1;
    fs::write(d.join("disk.ext4"), &bytes).unwrap();
    assert!(ArtifactManifest::read(d).is_ok());
    assert_corrupt(
        ArtifactManifest::read_verified(d),
        "disk.ext4 has the wrong sha256",
    );
    bytes[150_000] ^= 1;
    fs::write(d.join("disk.ext4"), &bytes).unwrap();
    ArtifactManifest::read_verified(d).unwrap();

    // Truncated.
    fs::write(d.join("memory.bin"), b"guest").unwrap();
    assert_corrupt(
        ArtifactManifest::read(d),
        "memory.bin is 5 bytes, expected 9",
    );
    fs::write(d.join("memory.bin"), b"guest ram").unwrap();

    // Missing.
    fs::remove_file(d.join("vmstate")).unwrap();
    assert_corrupt(ArtifactManifest::read_verified(d), "vmstate is missing");
    fs::write(d.join("vmstate"), b"").unwrap();
    ArtifactManifest::read_verified(d).unwrap();

    // A manifest pointing outside its directory.
    let mut evil = m.clone();
    evil.files[0].name = "../disk.ext4".into();
    fs::write(d.join(MANIFEST_FILE), serde_json::to_vec(&evil).unwrap()).unwrap();
    assert_corrupt(ArtifactManifest::read(d), "bad file name");

    // Unknown version, garbage, no manifest.
    let mut v2 = serde_json::to_value(&m).unwrap();
    v2["version"] = 2.into();
    fs::write(d.join(MANIFEST_FILE), v2.to_string()).unwrap();
    assert!(matches!(
        ArtifactManifest::read(d),
        Err(ArtifactError::UnsupportedVersion { version: 2, .. })
    ));
    fs::write(d.join(MANIFEST_FILE), b"{not json").unwrap();
    assert!(matches!(
        ArtifactManifest::read(d),
        Err(ArtifactError::Malformed { .. })
    ));
    fs::write(d.join(MANIFEST_FILE), br#"{"version": 1}"#).unwrap();
    assert!(matches!(
        ArtifactManifest::read(d),
        Err(ArtifactError::Malformed { .. })
    ));
    fs::remove_file(d.join(MANIFEST_FILE)).unwrap();
    assert_corrupt(ArtifactManifest::read(d), "manifest.json is missing");
}

#[test]
fn artifacts_are_published_whole() {
    let root = tempfile::tempdir().unwrap();
    let l = Layout::new(root.path());
    l.ensure().unwrap();
    let staging = l.staging_dir("t1", "b1").unwrap();
    let dest = l.artifact_dir("t1", "b1").unwrap();
    fs::create_dir_all(&staging).unwrap();
    let m = sample(&staging);
    m.write(&staging).unwrap();
    assert!(!dest.exists());
    publish_dir(&staging, &dest).unwrap();
    assert!(!staging.exists());
    assert_eq!(ArtifactManifest::read_verified(&dest).unwrap(), m);
    assert_eq!(
        names(&dest),
        ["disk.ext4", "manifest.json", "memory.bin", "vmstate"]
    );
    assert_eq!(names(&l.template_dir("t1").unwrap()), ["b1"]);

    // A published artifact is immutable.
    fs::create_dir_all(&staging).unwrap();
    assert!(publish_dir(&staging, &dest).is_err());
}
