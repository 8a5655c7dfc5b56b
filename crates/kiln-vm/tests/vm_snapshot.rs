//! Real-VM tests (TCG here): snapshot + restore keeps processes running, restores are
//! isolated, a killed QEMU is a clear error with nothing left behind.

mod common;

use std::time::{Duration, Instant};

use common::req;
use kiln_vm::{Error, Hypervisor as _, RestoreConfig, Vm};

async fn read_counter(vm: &Vm) -> u64 {
    let out = vm
        .guard(vm.agent().read_file("/tmp/counter"))
        .await
        .unwrap();
    String::from_utf8_lossy(&out).trim().parse().unwrap()
}

/// Waits (TCG on a loaded host is slow) until the counter exceeds `above`.
async fn counter_passes(vm: &Vm, above: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        // Not yet written right after the spawn: count as 0.
        let c = match vm.agent().read_file("/tmp/counter").await {
            Ok(b) => String::from_utf8_lossy(&b).trim().parse().unwrap_or(0),
            Err(_) => 0,
        };
        if c > above {
            return c;
        }
        assert!(
            Instant::now() < deadline,
            "counter stuck at {c} (expected > {above})"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn counter_survives_snapshot_and_restores_are_isolated() {
    let env = common::env("snap").await;
    let vm = Vm::boot(env.config("snap"))
        .await
        .unwrap_or_else(|e| panic!("{}", kiln_vm::error_chain(&e)));
    let mut bg = req("i=0; while :; do i=$((i+1)); echo $i > /tmp/counter.new; mv /tmp/counter.new /tmp/counter; sleep 0.1; done");
    bg.background = Some(Default::default());
    let pid = vm.guard(vm.agent().spawn_background(bg)).await.unwrap();
    let before = counter_passes(&vm, 3).await;

    let bundle = env.run_parent.join("bundle");
    let info = vm
        .snapshot(&bundle)
        .await
        .unwrap_or_else(|e| panic!("{}", kiln_vm::error_chain(&e)));
    eprintln!(
        "snapshot: save {:?}, total {:?}, state {} B, memory {} B",
        info.save_time,
        info.total_time,
        info.manifest.files["state"].size,
        info.manifest.files.get("memory").map_or(0, |f| f.size)
    );
    assert_eq!(info.manifest.ram, kiln_vm::RamMode::File);
    kiln_vm::snapshot::verify_bundle(&bundle).await.unwrap();

    // Two restores at once.
    let t = Instant::now();
    let (a, b) = tokio::join!(
        Vm::restore(&bundle, RestoreConfig::new("snap-a", &env.run_parent)),
        Vm::restore(&bundle, RestoreConfig::new("snap-b", &env.run_parent)),
    );
    let mut a = a.unwrap_or_else(|e| panic!("{}", kiln_vm::error_chain(&e)));
    let b = b.unwrap_or_else(|e| panic!("{}", kiln_vm::error_chain(&e)));
    eprintln!("two concurrent restores: {:?}", t.elapsed());
    // A restored guest's first connections come right after the port was closed under
    // it (the snapshot's host connection is gone).
    common::reconnect_cycles(&mut a, 10).await;

    for vm in [&a, &b] {
        assert!(
            vm.guard(vm.agent().pid_alive(pid)).await.unwrap(),
            "counter pid {pid} gone"
        );
        let c1 = read_counter(vm).await;
        assert!(c1 >= before, "counter went back: {c1} < {before}");
        counter_passes(vm, c1).await;
        let out = vm
            .exec_collect(req(&format!("cat /proc/{pid}/cmdline | tr '\\0' ' '")))
            .await
            .unwrap();
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("while"),
            "pid {pid} is not the counter"
        );
        // The clock was synced from the host.
        let out = vm.exec_collect(req("date +%s")).await.unwrap();
        let guest: i64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
        let host = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        assert!(
            (guest - host).abs() <= 3,
            "guest clock {guest} vs host {host}"
        );
    }

    // Isolation: a file written in one restore is absent in the other.
    a.exec_collect(req("echo only-a > /root/marker && sync"))
        .await
        .unwrap();
    let out = b
        .exec_collect(req("test -e /root/marker; echo $?"))
        .await
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1");
    let out = a.exec_collect(req("cat /root/marker")).await.unwrap();
    assert_eq!(out.stdout, b"only-a\n");

    b.kill().await;

    // A restored VM runs on a private mapping: its snapshot streams RAM (`stream` mode),
    // and restoring that keeps the same process running with A's disk changes.
    let bundle2 = env.run_parent.join("bundle2");
    let info = a
        .snapshot(&bundle2)
        .await
        .unwrap_or_else(|e| panic!("{}", kiln_vm::error_chain(&e)));
    assert_eq!(info.manifest.ram, kiln_vm::RamMode::Stream);
    eprintln!(
        "stream snapshot: save {:?}, state {} B",
        info.save_time, info.manifest.files["state"].size
    );
    let c = Vm::restore(&bundle2, RestoreConfig::new("snap-c", &env.run_parent))
        .await
        .unwrap_or_else(|e| panic!("{}", kiln_vm::error_chain(&e)));
    assert!(c.guard(c.agent().pid_alive(pid)).await.unwrap());
    let c1 = read_counter(&c).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(
        read_counter(&c).await > c1,
        "counter stopped after second restore"
    );
    let out = c.exec_collect(req("cat /root/marker")).await.unwrap();
    assert_eq!(out.stdout, b"only-a\n");
    c.shutdown().await;
    std::fs::remove_dir_all(&bundle2).unwrap();
    // The bundle was never written by the restores.
    kiln_vm::snapshot::verify_bundle(&bundle).await.unwrap();

    // A bundle of manifest version 1 (a template built before the chunked digests: a
    // plain sha256 per file, named `sha256`) still restores, and is checked the v1 way.
    let manifest_path = bundle.join("manifest.json");
    let mut m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&manifest_path).unwrap()).unwrap();
    assert_eq!(m["version"], kiln_vm::snapshot::MANIFEST_VERSION);
    m["version"] = 1.into();
    for (name, entry) in m["files"].as_object_mut().unwrap() {
        let entry = entry.as_object_mut().unwrap();
        entry.remove("digest").expect("a v2 entry has a digest");
        let sha = kiln_vm::provision::file_sha256(&bundle.join(name)).unwrap();
        entry.insert("sha256".into(), sha.into());
    }
    std::fs::write(&manifest_path, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
    let v1 = Vm::restore(&bundle, RestoreConfig::new("snap-v1", &env.run_parent))
        .await
        .unwrap_or_else(|e| panic!("{}", kiln_vm::error_chain(&e)));
    assert!(v1.guard(v1.agent().pid_alive(pid)).await.unwrap());
    v1.shutdown().await;

    // A corrupted artifact (same size, one byte flipped) is refused before any VM starts.
    let a_state = bundle.join("state");
    let mut bytes = std::fs::read(&a_state).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&a_state, &bytes).unwrap();
    let err = Vm::restore(&bundle, RestoreConfig::new("snap-d", &env.run_parent))
        .await
        .expect_err("a corrupt bundle must not restore");
    assert!(
        kiln_vm::error_chain(&err).contains("state: checksum mismatch"),
        "{}",
        kiln_vm::error_chain(&err)
    );
    std::fs::remove_dir_all(&bundle).unwrap();
    env.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_qemu_mid_exec_is_a_clear_error() {
    let env = common::env("kill").await;
    let vm = Vm::boot(env.config("kill"))
        .await
        .unwrap_or_else(|e| panic!("{}", kiln_vm::error_chain(&e)));
    let run_dir = vm.run_dir().to_owned();
    let h = vm.exec(req("sleep 60")).await.unwrap();
    let pid = vm.pid();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(500)).await;
        // SAFETY: plain kill(2) of the QEMU child (alive: the exec is pending).
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    });
    let err = tokio::time::timeout(Duration::from_secs(10), vm.guard(h.wait()))
        .await
        .expect("pending call hung")
        .unwrap_err();
    assert!(matches!(err, Error::Exited { .. }), "{err:?}");
    assert!(err.to_string().contains("signal: 9"), "{err}");
    // Later calls fail the same way, promptly.
    let err = tokio::time::timeout(Duration::from_secs(5), vm.exec_collect(req("true")))
        .await
        .unwrap()
        .unwrap_err();
    assert!(matches!(err, Error::Exited { .. }), "{err:?}");
    drop(vm);
    assert!(!run_dir.exists(), "run dir left: {}", run_dir.display());
    env.assert_no_leaks().await;
}

/// A size-limited tmpfs mounted for one test, unmounted (lazily) on drop.
struct Tmpfs(tempfile::TempDir);

impl Tmpfs {
    fn mount(size: &str) -> Self {
        // SAFETY: geteuid(2) has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        assert!(
            root,
            "this test mounts a tmpfs and needs root (CI runs the suite as root)"
        );
        let dir = tempfile::tempdir().unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "kiln-full"])
            .arg(dir.path())
            .status()
            .unwrap()
            .success();
        assert!(ok, "mount -t tmpfs failed");
        Tmpfs(dir)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.0.path())
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_filesystem_during_a_snapshot_is_snapshot_failed_and_leaves_nothing() {
    let env = common::env("full").await;
    let full = Tmpfs::mount("2m");
    let vm = Vm::boot(env.config("full"))
        .await
        .unwrap_or_else(|e| panic!("{}", kiln_vm::error_chain(&e)));
    let bundle = full.0.path().join("bundle");
    let err = vm
        .snapshot(&bundle)
        .await
        .expect_err("a snapshot into 2 MiB must fail");
    eprintln!("{}", kiln_vm::error_chain(&err));
    assert_eq!(
        err.code(),
        kiln_spec::BuildErrorCode::SnapshotFailed,
        "{err:?}"
    );
    let left: Vec<_> = std::fs::read_dir(full.0.path())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "left on the full filesystem: {left:?}");
    env.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qemu_killed_mid_snapshot_is_snapshot_failed_and_leaves_nothing() {
    let env = common::env("midsnap").await;
    let vm = Vm::boot(env.config("midsnap"))
        .await
        .unwrap_or_else(|e| panic!("{}", kiln_vm::error_chain(&e)));
    let first = env.run_parent.join("first");
    vm.snapshot(&first)
        .await
        .unwrap_or_else(|e| panic!("{}", kiln_vm::error_chain(&e)));
    // A restored VM snapshots by streaming its RAM (as a pause does): seconds under TCG,
    // a window wide enough to kill QEMU in.
    let vm = Vm::restore(&first, RestoreConfig::new("midsnap-r", &env.run_parent))
        .await
        .unwrap_or_else(|e| panic!("{}", kiln_vm::error_chain(&e)));
    vm.exec_collect(req("head -c 100M /dev/urandom > /dev/shm/ballast"))
        .await
        .unwrap();
    let pid = vm.pid();
    let second = env.run_parent.join("second");
    let target = second.clone();
    let snap = tokio::spawn(async move { vm.snapshot(&target).await });
    // Once the temp bundle exists, QEMU is saving.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_dir(&env.run_parent)
        .unwrap()
        .flatten()
        .any(|e| e.file_name().to_string_lossy().starts_with(".snapshot-"))
    {
        assert!(Instant::now() < deadline, "the snapshot never started");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // SAFETY: kill(2) of the VM's QEMU, which the snapshot task still owns.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let err = tokio::time::timeout(Duration::from_secs(60), snap)
        .await
        .expect("the snapshot hung after QEMU died")
        .unwrap()
        .expect_err("a snapshot whose QEMU was killed must fail");
    eprintln!("{}", kiln_vm::error_chain(&err));
    assert_eq!(
        err.code(),
        kiln_spec::BuildErrorCode::SnapshotFailed,
        "{err:?}"
    );
    assert!(!second.exists(), "a bundle was published");
    let temps: Vec<_> = std::fs::read_dir(&env.run_parent)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".snapshot-"))
        .map(|e| e.path())
        .collect();
    assert!(temps.is_empty(), "temp bundles left: {temps:?}");
    std::fs::remove_dir_all(&first).unwrap();
    env.assert_no_leaks().await;
}

/// A sandbox's snapshot: the VM is captured and runs on (the guest stopped only for the
/// capture), the capture becomes a bundle that forks map copy-on-write, forks continue
/// the processes with the files as they were and are independent of each other; later
/// captures (of the source, of a fork) fold their disk layers over the template's disk;
/// a capture onto a full filesystem fails and the VM runs on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_checkpoint_lets_the_vm_run_on_and_forks_continue_from_it() {
    let env = common::env("ckpt").await;
    let full = Tmpfs::mount("2m");
    let chain = |e: kiln_vm::Error| kiln_vm::error_chain(&e);
    // The template, and a sandbox of it with a live counter and a file.
    let template = env.run_parent.join("template");
    Vm::boot(env.config("ckpt"))
        .await
        .unwrap_or_else(|e| panic!("{}", chain(e)))
        .snapshot(&template)
        .await
        .unwrap_or_else(|e| panic!("{}", chain(e)));
    let base = template.join("disk.raw");
    // Restores that know their template's disk: their captures are layers over it.
    let cfg = |name: &str| RestoreConfig {
        base_disk: Some(base.clone()),
        ..RestoreConfig::new(name, &env.run_parent)
    };
    let mut src = Vm::restore(&template, cfg("ckpt-src"))
        .await
        .unwrap_or_else(|e| panic!("{}", chain(e)));
    let mut bg = req("i=0; while :; do i=$((i+1)); echo $i > /tmp/counter.new; mv /tmp/counter.new /tmp/counter; sleep 0.1; done");
    bg.background = Some(Default::default());
    let pid = src.guard(src.agent().spawn_background(bg)).await.unwrap();
    src.exec_collect(req("echo before > /root/file && sync"))
        .await
        .unwrap();
    let before = counter_passes(&src, 3).await;

    // Onto a full filesystem: fails, and the VM runs on.
    let err = src
        .checkpoint(&full.0.path().join("snap"))
        .await
        .expect_err("a checkpoint into 2 MiB must fail");
    assert_eq!(
        err.code(),
        kiln_spec::BuildErrorCode::SnapshotFailed,
        "{err:?}"
    );
    assert_eq!(std::fs::read_dir(full.0.path()).unwrap().count(), 0);
    src.sync_clock().await.unwrap();
    let c = counter_passes(&src, before).await;

    let stream = env.run_parent.join("stream");
    let info = src
        .checkpoint(&stream)
        .await
        .unwrap_or_else(|e| panic!("{}", chain(e)));
    eprintln!(
        "checkpoint: frozen {:?}, total {:?}, state {} B, disk layer {} B",
        info.frozen_time,
        info.total_time,
        info.manifest.files["state"].size,
        info.manifest.files["disk.qcow2"].size
    );
    assert_eq!(info.manifest.ram, kiln_vm::RamMode::Stream);
    assert_eq!(info.manifest.disk_file(), "disk.qcow2");
    src.sync_clock().await.unwrap();
    // The source runs on, on a new disk layer: what it writes now is not in the capture.
    let c = counter_passes(&src, c).await;
    src.exec_collect(req("echo after > /root/file && sync"))
        .await
        .unwrap();

    let t = Instant::now();
    let forkable = env.run_parent.join("forkable");
    let f = kiln_vm::Qemu::default()
        .make_forkable(&stream, &forkable, &env.run_parent)
        .await
        .unwrap_or_else(|e| panic!("{}", chain(e)));
    eprintln!(
        "made forkable in {:?}: state {} B, memory {} B",
        t.elapsed(),
        f.manifest.files["state"].size,
        f.manifest.files["memory"].size
    );
    assert_eq!(f.manifest.ram, kiln_vm::RamMode::File);
    kiln_vm::snapshot::verify_bundle(&forkable).await.unwrap();

    // Two forks (and, to compare, one restored from the stream capture itself).
    let t = Instant::now();
    let (a, b) = tokio::join!(
        Vm::restore(&forkable, cfg("ckpt-a")),
        Vm::restore(&forkable, cfg("ckpt-b")),
    );
    eprintln!("two forks (memory file): {:?}", t.elapsed());
    let t = Instant::now();
    let s = Vm::restore(&stream, RestoreConfig::new("ckpt-s", &env.run_parent))
        .await
        .unwrap_or_else(|e| panic!("{}", chain(e)));
    eprintln!("one fork (stream): {:?}", t.elapsed());
    s.shutdown().await;
    let a = a.unwrap_or_else(|e| panic!("{}", chain(e)));
    let mut b = b.unwrap_or_else(|e| panic!("{}", chain(e)));
    for vm in [&a, &b] {
        assert!(
            vm.guard(vm.agent().pid_alive(pid)).await.unwrap(),
            "counter pid {pid} gone"
        );
        let n = read_counter(vm).await;
        assert!(n >= c.min(before), "counter went back: {n}");
        counter_passes(vm, n).await;
        let out = vm.exec_collect(req("cat /root/file")).await.unwrap();
        assert_eq!(out.stdout, b"before\n", "the fork's file is the capture's");
    }
    a.exec_collect(req("echo only-a > /root/marker && sync"))
        .await
        .unwrap();
    let out = b
        .exec_collect(req("test -e /root/marker; echo $?"))
        .await
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1");

    // A second capture of the source, and one of a fork: their layers lie over the
    // template's disk directly, with what the layers in between held folded in.
    let stream2 = env.run_parent.join("stream2");
    src.checkpoint(&stream2)
        .await
        .unwrap_or_else(|e| panic!("{}", chain(e)));
    let stream3 = env.run_parent.join("stream3");
    b.checkpoint(&stream3)
        .await
        .unwrap_or_else(|e| panic!("{}", chain(e)));
    for layer in [&stream2, &stream3] {
        let backing = kiln_vm::disk::backing_file(&layer.join("disk.qcow2")).unwrap();
        assert_eq!(
            backing.map(|b| std::fs::canonicalize(b).unwrap()),
            Some(std::fs::canonicalize(&base).unwrap())
        );
    }
    a.shutdown().await;
    src.shutdown().await;
    // A pause (the fork consumed) keeps its disk as one layer over the template's; a
    // resume of it captured again lies over the template's disk too, with both layers'
    // writes.
    b.exec_collect(req("echo paused-once > /root/file && sync"))
        .await
        .unwrap();
    let paused = env.run_parent.join("paused");
    let p = b
        .snapshot(&paused)
        .await
        .unwrap_or_else(|e| panic!("{}", chain(e)));
    assert_eq!(p.manifest.disk_file(), "disk.qcow2");
    let mut r = Vm::restore(&paused, cfg("ckpt-p"))
        .await
        .unwrap_or_else(|e| panic!("{}", chain(e)));
    let stream4 = env.run_parent.join("stream4");
    r.checkpoint(&stream4)
        .await
        .unwrap_or_else(|e| panic!("{}", chain(e)));
    r.shutdown().await;
    for layer in [&paused, &stream4] {
        let backing = kiln_vm::disk::backing_file(&layer.join("disk.qcow2")).unwrap();
        assert_eq!(
            backing.map(|b| std::fs::canonicalize(b).unwrap()),
            Some(std::fs::canonicalize(&base).unwrap())
        );
    }
    for (bundle, want) in [
        (&stream2, "after\n"),
        (&stream3, "before\n"),
        (&stream4, "paused-once\n"),
    ] {
        let vm = Vm::restore(bundle, RestoreConfig::new("ckpt-r", &env.run_parent))
            .await
            .unwrap_or_else(|e| panic!("{}", chain(e)));
        assert!(vm.guard(vm.agent().pid_alive(pid)).await.unwrap());
        let out = vm.exec_collect(req("cat /root/file")).await.unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), want);
        vm.shutdown().await;
    }
    for dir in [
        &template, &stream, &stream2, &stream3, &stream4, &paused, &forkable,
    ] {
        std::fs::remove_dir_all(dir).unwrap();
    }
    env.assert_no_leaks().await;
}
