//! Layer unpacking: overlay semantics and hostile layers, built in memory (no registry).

use std::io::Write as _;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use kiln_oci::{OciError, Unpacker};
use kiln_spec::BuildErrorCode;
use tar::{EntryType, Header};

/// One tar entry, written with raw header fields so hostile names survive (`tar`'s
/// `set_path` would refuse them).
enum E<'a> {
    Dir(&'a str),
    File(&'a str, &'a str),
    Symlink(&'a str, &'a str),
    Hardlink(&'a str, &'a str),
    Fifo(&'a str),
}

fn layer(entries: &[E<'_>]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let (path, kind, link, data, mode): (&str, EntryType, &str, &[u8], u32) = match e {
            E::Dir(p) => (p, EntryType::Directory, "", b"", 0o755),
            E::File(p, d) => (p, EntryType::Regular, "", d.as_bytes(), 0o644),
            E::Symlink(p, t) => (p, EntryType::Symlink, t, b"", 0o777),
            E::Hardlink(p, t) => (p, EntryType::Link, t, b"", 0o644),
            E::Fifo(p) => (p, EntryType::Fifo, "", b"", 0o600),
        };
        let mut h = Header::new_gnu();
        {
            let g = h.as_gnu_mut().expect("gnu header");
            g.name[..path.len()].copy_from_slice(path.as_bytes());
            g.linkname[..link.len()].copy_from_slice(link.as_bytes());
        }
        h.set_entry_type(kind);
        h.set_size(data.len() as u64);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h.set_cksum();
        b.append(&h, data).expect("append");
    }
    b.into_inner().expect("finish")
}

fn gzip(raw: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(raw).expect("gzip");
    enc.finish().expect("gzip")
}

/// A scratch area: `root/` is the rootfs, `canary/` stands for the host outside it.
struct Scratch {
    _dir: tempfile::TempDir,
    root: PathBuf,
    canary: PathBuf,
}

fn scratch() -> Scratch {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("root");
    let canary = dir.path().join("canary");
    std::fs::create_dir_all(&root).expect("mkdir");
    std::fs::create_dir_all(&canary).expect("mkdir");
    std::fs::write(canary.join("passwd"), "host").expect("write");
    Scratch {
        _dir: dir,
        root,
        canary,
    }
}

fn snapshot(dir: &Path) -> Vec<(PathBuf, u64, String)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).expect("read_dir") {
        let e = e.expect("entry");
        let m = std::fs::symlink_metadata(e.path()).expect("meta");
        out.push((
            e.path(),
            m.ino(),
            std::fs::read_to_string(e.path()).unwrap_or_default(),
        ));
    }
    out.sort();
    out
}

fn apply(root: &Path, layers: &[Vec<u8>]) -> Result<(), OciError> {
    let mut u = Unpacker::new(root)?;
    for l in layers {
        u.apply_layer(l.as_slice())?;
    }
    u.finish().map(|_| ())
}

/// Applies `layers` and asserts `image_unsafe` with the canary untouched.
fn assert_unsafe(layers: &[Vec<u8>]) {
    let s = scratch();
    let canary = s.canary.to_string_lossy().into_owned();
    // Entries in the test data say CANARY where the absolute canary path goes.
    let layers: Vec<Vec<u8>> = layers.to_vec();
    let before = snapshot(&s.canary);
    let err = apply(&s.root, &layers).expect_err("hostile layer must be refused");
    assert_eq!(err.code(), BuildErrorCode::ImageUnsafe, "{err}");
    assert_eq!(snapshot(&s.canary), before, "canary {canary} was touched");
    assert_eq!(
        std::fs::read_to_string(s.canary.join("passwd")).expect("read"),
        "host"
    );
}

fn canary_layer(f: impl Fn(&str) -> Vec<u8>) -> Vec<u8> {
    // The canary path is only known per scratch dir; hostile symlinks point at a fixed
    // absolute path created for the test instead.
    f(CANARY)
}

const CANARY: &str = "/tmp/kiln-oci-test-canary";

fn fixed_canary() {
    std::fs::create_dir_all(CANARY).expect("mkdir canary");
    std::fs::write(Path::new(CANARY).join("passwd"), "host").expect("write");
}

fn assert_fixed_canary_untouched() {
    assert_eq!(
        std::fs::read_to_string(Path::new(CANARY).join("passwd")).expect("read"),
        "host"
    );
    let names: Vec<_> = std::fs::read_dir(CANARY)
        .expect("ls")
        .map(|e| e.expect("e").file_name())
        .collect();
    assert_eq!(names.len(), 1, "canary dir gained entries: {names:?}");
}

#[test]
fn dotdot_is_refused() {
    assert_unsafe(&[layer(&[E::File("../canary/passwd", "pwned")])]);
    assert_unsafe(&[layer(&[
        E::Dir("a"),
        E::File("a/../../canary/passwd", "pwned"),
    ])]);
}

#[test]
fn absolute_path_is_refused() {
    fixed_canary();
    assert_unsafe(&[layer(&[E::File(
        "/tmp/kiln-oci-test-canary/passwd",
        "pwned",
    )])]);
    assert_fixed_canary_untouched();
}

#[test]
fn write_through_symlink_same_layer_is_refused() {
    fixed_canary();
    assert_unsafe(&[canary_layer(|c| {
        layer(&[E::Symlink("a", c), E::File("a/passwd", "pwned")])
    })]);
    assert_unsafe(&[canary_layer(|c| {
        layer(&[E::Symlink("a", c), E::File("a/new", "pwned")])
    })]);
    // Relative symlink climbing out.
    assert_unsafe(&[layer(&[
        E::Symlink("a", "../../../../../../tmp/kiln-oci-test-canary"),
        E::File("a/x", "p"),
    ])]);
    assert_fixed_canary_untouched();
}

#[test]
fn write_through_symlink_from_earlier_layer_is_refused() {
    fixed_canary();
    let l1 = canary_layer(|c| layer(&[E::Symlink("etc", c)]));
    let l2 = layer(&[E::File("etc/passwd", "pwned")]);
    assert_unsafe(&[l1.clone(), l2]);
    // Directory entries and whiteouts through it too.
    assert_unsafe(&[l1.clone(), layer(&[E::Dir("etc/sub")])]);
    assert_unsafe(&[l1.clone(), layer(&[E::File("etc/.wh.passwd", "")])]);
    assert_unsafe(&[l1, layer(&[E::File("etc/.wh..wh..opq", "")])]);
    assert_fixed_canary_untouched();
}

#[test]
fn hardlink_to_outside_is_refused() {
    fixed_canary();
    assert_unsafe(&[layer(&[E::Hardlink(
        "x",
        "/tmp/kiln-oci-test-canary/passwd",
    )])]);
    assert_unsafe(&[layer(&[E::Hardlink("x", "../canary/passwd")])]);
    // Through a planted symlink.
    assert_unsafe(&[canary_layer(|c| {
        layer(&[E::Symlink("a", c), E::Hardlink("x", "a/passwd")])
    })]);
    // A hardlink to a symlink is fine (it links the symlink), but writing through it is not.
    assert_unsafe(&[canary_layer(|c| {
        layer(&[
            E::Symlink("s", c),
            E::Hardlink("h", "s"),
            E::File("h/passwd", "pwned"),
        ])
    })]);
    assert_fixed_canary_untouched();
}

#[test]
fn directory_replaced_by_symlink_mid_image_is_refused() {
    fixed_canary();
    // Same layer: a dir, then the same path as a symlink, then a write beneath.
    assert_unsafe(&[canary_layer(|c| {
        layer(&[
            E::Dir("a"),
            E::File("a/ok", "1"),
            E::Symlink("a", c),
            E::File("a/passwd", "pwned"),
        ])
    })]);
    // Across layers: replacing is allowed (overlay semantics) but writing through is not.
    let s = scratch();
    let l1 = layer(&[E::Dir("a"), E::File("a/ok", "1")]);
    let l2 = canary_layer(|c| layer(&[E::Symlink("a", c)]));
    apply(&s.root, &[l1.clone(), l2.clone()]).expect("replacing a lower dir by a symlink is legal");
    assert!(std::fs::symlink_metadata(s.root.join("a"))
        .expect("a")
        .file_type()
        .is_symlink());
    assert_unsafe(&[l1, l2, layer(&[E::File("a/passwd", "pwned")])]);
    assert_fixed_canary_untouched();
}

#[test]
fn file_as_parent_is_refused() {
    assert_unsafe(&[layer(&[E::File("f", "x"), E::File("f/g", "y")])]);
}

#[test]
fn plain_layers_unpack_with_metadata() {
    let s = scratch();
    let l = layer(&[
        E::Dir("usr"),
        E::Dir("usr/bin"),
        E::File("usr/bin/tool", "#!/bin/sh\n"),
        E::Symlink("bin", "usr/bin"),
        E::Symlink("abs", "/etc/passwd"),
        E::Hardlink("usr/bin/tool2", "usr/bin/tool"),
        E::File("implicit/parent/file", "x"),
        E::Fifo("fifo"),
    ]);
    apply(&s.root, &[gzip(&l)]).expect("unpack");
    let r = &s.root;
    assert_eq!(
        std::fs::read_to_string(r.join("usr/bin/tool")).expect("read"),
        "#!/bin/sh\n"
    );
    assert_eq!(
        std::fs::read_link(r.join("bin")).expect("link"),
        Path::new("usr/bin")
    );
    assert_eq!(
        std::fs::read_link(r.join("abs")).expect("link"),
        Path::new("/etc/passwd")
    );
    let a = std::fs::metadata(r.join("usr/bin/tool")).expect("meta");
    let b = std::fs::metadata(r.join("usr/bin/tool2")).expect("meta");
    assert_eq!(a.ino(), b.ino());
    assert_eq!(a.mode() & 0o7777, 0o644);
    assert_eq!(a.mtime(), 1_700_000_000);
    assert_eq!(
        std::fs::metadata(r.join("usr")).expect("meta").mtime(),
        1_700_000_000
    );
    assert!(r.join("implicit/parent/file").is_file());
    use std::os::unix::fs::FileTypeExt;
    assert!(std::fs::symlink_metadata(r.join("fifo"))
        .expect("fifo")
        .file_type()
        .is_fifo());
}

#[test]
fn zstd_and_plain_layers() {
    let s = scratch();
    let l1 = zstd::encode_all(layer(&[E::File("a", "zstd")]).as_slice(), 3).expect("zstd");
    let l2 = layer(&[E::File("b", "plain")]);
    apply(&s.root, &[l1, l2]).expect("unpack");
    assert_eq!(
        std::fs::read_to_string(s.root.join("a")).expect("a"),
        "zstd"
    );
    assert_eq!(
        std::fs::read_to_string(s.root.join("b")).expect("b"),
        "plain"
    );
}

#[test]
fn whiteouts_remove_lower_entries() {
    let s = scratch();
    let l1 = layer(&[
        E::Dir("etc"),
        E::File("etc/keep", "k"),
        E::File("etc/gone", "g"),
        E::Dir("var/lib/gone-dir"),
        E::File("var/lib/gone-dir/f", "f"),
    ]);
    let l2 = layer(&[
        E::File("etc/.wh.gone", ""),
        E::File("var/lib/.wh.gone-dir", ""),
        E::File("etc/.wh.never-existed", ""),
    ]);
    apply(&s.root, &[l1, l2]).expect("unpack");
    assert!(s.root.join("etc/keep").exists());
    assert!(!s.root.join("etc/gone").exists());
    assert!(!s.root.join("var/lib/gone-dir").exists());
    assert!(!s.root.join("etc/.wh.gone").exists());
}

#[test]
fn whiteout_does_not_follow_symlinks() {
    fixed_canary();
    let s = scratch();
    // A whiteout of a symlink to the canary removes the symlink, not the target.
    let l1 = canary_layer(|c| layer(&[E::Symlink("link", c)]));
    apply(&s.root, &[l1, layer(&[E::File(".wh.link", "")])]).expect("unpack");
    assert!(std::fs::symlink_metadata(s.root.join("link")).is_err());
    assert_fixed_canary_untouched();
}

#[test]
fn opaque_directory_hides_lower_children_only() {
    let s = scratch();
    let l1 = layer(&[
        E::Dir("d"),
        E::File("d/old1", "1"),
        E::Dir("d/olddir"),
        E::File("d/olddir/x", "x"),
    ]);
    // The marker comes after a new child: the new child must survive.
    let l2 = layer(&[
        E::Dir("d"),
        E::File("d/new", "n"),
        E::File("d/.wh..wh..opq", ""),
    ]);
    apply(&s.root, &[l1, l2]).expect("unpack");
    let mut names: Vec<_> = std::fs::read_dir(s.root.join("d"))
        .expect("ls")
        .map(|e| e.expect("e").file_name())
        .collect();
    names.sort();
    assert_eq!(names, ["new"]);
}

#[test]
fn file_replaces_lower_directory_and_symlink() {
    let s = scratch();
    let l1 = layer(&[
        E::Dir("x"),
        E::File("x/child", "c"),
        E::Symlink("y", "/etc"),
    ]);
    let l2 = layer(&[E::File("x", "now a file"), E::File("y", "now a file too")]);
    apply(&s.root, &[l1, l2]).expect("unpack");
    assert_eq!(
        std::fs::read_to_string(s.root.join("x")).expect("x"),
        "now a file"
    );
    assert!(std::fs::symlink_metadata(s.root.join("y"))
        .expect("y")
        .is_file());
}

#[test]
fn hardlinks_within_rootfs_and_across_layers() {
    let s = scratch();
    let l1 = layer(&[E::File("a", "data")]);
    let l2 = layer(&[E::Hardlink("b", "a"), E::Hardlink("c", "./a")]);
    apply(&s.root, &[l1, l2]).expect("unpack");
    let ino = |p: &str| std::fs::metadata(s.root.join(p)).expect("meta").ino();
    assert_eq!(ino("a"), ino("b"));
    assert_eq!(ino("a"), ino("c"));
    // A dangling hardlink is refused as unsafe (it cannot be resolved inside the rootfs).
    let s = scratch();
    let err = apply(&s.root, &[layer(&[E::Hardlink("b", "missing")])]).expect_err("dangling");
    assert_eq!(err.code(), BuildErrorCode::ImageUnsafe);
}

#[test]
fn opaque_marker_spares_implicit_parents_of_the_same_layer() {
    let s = scratch();
    let l1 = layer(&[E::Dir("d"), E::File("d/old", "o")]);
    // `d/sub` is never listed: it is created implicitly, in this layer, before the marker.
    let l2 = layer(&[E::File("d/sub/file", "n"), E::File("d/.wh..wh..opq", "")]);
    apply(&s.root, &[l1, l2]).expect("unpack");
    assert!(s.root.join("d/sub/file").exists());
    assert!(!s.root.join("d/old").exists());
}

/// Runs `f` on its own thread and fails the test if it takes longer than `secs`: the
/// regressions below used to hang (a FIFO read) or run for hours (a terabyte of zeros).
fn within<T: Send + 'static>(secs: u64, what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(std::time::Duration::from_secs(secs))
        .unwrap_or_else(|_| panic!("{what} did not finish within {secs} s"))
}

/// A raw layer kept by the unpack fuzz target (`fuzz/regressions/unpack/NAME`): its first
/// byte is the target's mode byte (even: the rest is one raw layer).
fn fuzz_regression(name: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/regressions/unpack")
        .join(name);
    let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(data[0] & 1, 0, "{name} is not a raw-layer input");
    data[1..].to_vec()
}

/// Unpacks a fuzz regression like `ImageStore::prepare` does (unpack, then vet) and
/// returns the error code of whichever step refused it.
fn replay(name: &'static str) -> Option<BuildErrorCode> {
    within(60, name, move || {
        let s = scratch();
        let before = snapshot(&s.canary);
        let layer = fuzz_regression(name);
        let code = match apply(&s.root, &[layer]) {
            Err(e) => Some(e.code()),
            Ok(()) => kiln_oci::vet(&s.root, Some(8192)).err().map(|e| e.code()),
        };
        assert_eq!(snapshot(&s.canary), before, "{name} touched the canary");
        code
    })
}

#[test]
fn a_tiny_layer_claiming_a_terabyte_is_refused_at_once() {
    // 77 bytes of gzip holding one GNU sparse header whose real size is 1 TiB.
    assert_eq!(
        replay("sparse-terabyte"),
        Some(BuildErrorCode::ImageTooLarge)
    );
}

#[test]
fn content_past_the_cap_across_entries_is_refused() {
    let s = scratch();
    let big = "x".repeat(3 << 20);
    let l = layer(&[E::File("a", &big), E::File("b", &big)]);
    let mut u = Unpacker::new(&s.root).expect("open").with_limit(4 << 20);
    let err = u.apply_layer(l.as_slice()).expect_err("over the cap");
    assert_eq!(err.code(), BuildErrorCode::ImageTooLarge, "{err}");
    assert!(err.to_string().contains("4 MiB"), "{err}");
}

#[test]
fn owner_id_minus_one_is_refused_not_a_panic() {
    for name in ["uid-minus-one", "uid-minus-one-symlink"] {
        assert_eq!(replay(name), Some(BuildErrorCode::ImageUnsafe), "{name}");
    }
}

#[test]
fn vetting_reads_os_release_only_when_it_is_a_regular_file() {
    // `/etc/os-release` as a FIFO used to block vetting forever, and as the /dev/zero
    // device node to read until memory ran out. Either way the image is still judged on
    // the rest (these have no /bin/sh, so they are refused for that).
    for name in ["os-release-fifo", "os-release-dev-zero"] {
        assert_eq!(replay(name), Some(BuildErrorCode::ImageUnsafe), "{name}");
    }
}
