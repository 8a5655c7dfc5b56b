//! Template builds end to end with real VMs (TCG here), checked from inside sandboxes
//! restored from them. Needs the test registry (`scripts/test-registry.sh start`), the
//! static agent (`scripts/build-agent.sh`) and a provisioned kernel (`kiln setup`, done
//! by `scripts/test.sh`); a missing prerequisite fails the test with the remedy.

mod common;

use std::time::Duration;

use common::{assert_no_vms, env, env_with_pool, exec};
use kiln_api::{BuildStatus, CreateSandbox, LogStream, SandboxStatus};
use kiln_spec::{BuildErrorCode, TemplateRequest};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_template_builds_and_its_sandboxes_come_up_live() {
    // With a restore pool: the first sandbox starts its own QEMU, the second claims the
    // one started for it in the meantime.
    let e = env_with_pool(Duration::from_secs(300), 1).await;
    let spec = json!({
        "memoryMib": 384, "diskMib": 1024,
        "from": e.image("python"),
        "steps": [
            {"env": {"key": "GREETING", "value": "hello"}},
            {"run": "echo built > /opt/built.txt; echo to-stderr >&2"},
            {"user": {"name": "app", "sudo": true}},
            {"workdir": "/srv/app"},
            {"run": "echo \"$GREETING from $(id -un)\" > index.html"},
        ],
        "startCmd": "python3 -m http.server 8000 --bind 127.0.0.1",
        "readyCmd": "curl -fsS http://127.0.0.1:8000/ >/dev/null"
    });
    let b = e.build("web", spec).await;
    assert_eq!(b.status, BuildStatus::Ready, "{b:?}");
    assert!(
        b.image_digest
            .as_deref()
            .is_some_and(|d| d.starts_with("sha256:")),
        "{b:?}"
    );

    // Logs: every step's output, on its stream, and the phases.
    let logs = e.engine.build_log(&e.team, &b.id).await.unwrap();
    let has = |stream: LogStream, text: &str| {
        logs.iter()
            .any(|l| l.stream == stream && l.text.contains(text))
    };
    assert!(has(LogStream::Stderr, "to-stderr"), "{logs:#?}");
    for phase in [
        "resolving",
        "booting build VM",
        "step 5/5",
        "starting",
        "waiting for ready",
        "snapshotting",
        "done",
    ] {
        assert!(
            has(LogStream::System, phase),
            "no system line with {phase:?}"
        );
    }
    let start_pid: String = logs
        .iter()
        .find_map(|l| {
            l.text
                .strip_prefix("started (pid ")
                .map(|r| r.trim_end_matches(')').to_owned())
        })
        .expect("start pid logged");

    // A sandbox with env overrides.
    let new = CreateSandbox {
        env_vars: [
            ("GREETING".into(), "overridden".into()),
            ("EXTRA".into(), "1".into()),
        ]
        .into(),
        ..CreateSandbox::new("first", "web")
    };
    let (record, _) = e.engine.create_sandbox_record(&e.team, &new).await.unwrap();
    let live = e.engine.start_sandbox(&e.team, &record.id).await.unwrap();
    assert_eq!(live.info.status, SandboxStatus::Active);
    let vm = live.vm.as_ref();
    // The start process is the one the build started, answering right away.
    assert_eq!(
        exec(vm, "curl -fsS http://127.0.0.1:8000/index.html").await,
        ("hello from app".into(), 0)
    );
    let (pids, _) = exec(
        vm,
        "for p in /proc/[0-9]*; do [ \"$(cat $p/comm)\" = python3 ] && echo ${p#/proc/}; done",
    )
    .await;
    let (ppid_of_python, _) = exec(vm, &format!("cat /proc/{pids}/stat | cut -d' ' -f4")).await;
    assert!(
        pids == start_pid || ppid_of_python == start_pid,
        "python pid {pids} (parent {ppid_of_python}), started as {start_pid}"
    );
    // Env: caller wins, template defaults kept.
    assert_eq!(exec(vm, "echo $GREETING $EXTRA").await.0, "overridden 1");
    // Default cwd and user; workdir owned by the user; sudo; files from run steps.
    assert_eq!(exec(vm, "pwd; id -un").await.0, "/srv/app\napp");
    assert_eq!(exec(vm, "stat -c %U /srv/app").await.0, "app");
    assert_eq!(exec(vm, "sudo -n true && echo ok").await, ("ok".into(), 0));
    assert_eq!(exec(vm, "cat /opt/built.txt").await.0, "built");

    // A second sandbox is independent and sees the template's own defaults. It comes
    // from the pool, which has a QEMU waiting by now.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while e.engine.restore_pool_stats().waiting < 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "the pool never filled"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (second, _) = e
        .engine
        .create_sandbox_record(&e.team, &CreateSandbox::new("second", "web"))
        .await
        .unwrap();
    let live2 = e.engine.start_sandbox(&e.team, &second.id).await.unwrap();
    assert_eq!(e.engine.restore_pool_stats().claimed, 1);
    let run_dir = live2.vm.run_dir().file_name().unwrap().to_string_lossy();
    assert!(run_dir.starts_with("pool-"), "{run_dir}");
    // Its console log is kept with the sandbox, like a fresh restore's.
    assert!(live2.dir.join("console.log").is_file());
    exec(vm, "echo mine > /srv/app/only-in-first").await;
    assert_eq!(
        exec(
            live2.vm.as_ref(),
            "echo $GREETING; test -e /srv/app/only-in-first; echo $?"
        )
        .await
        .0,
        "hello\n1"
    );

    // A template with live sandboxes cannot be deleted.
    let err = e.engine.delete_template(&e.team, "web").await.unwrap_err();
    assert!(err.to_string().contains("live sandboxes"), "{err}");

    for live in [live, live2] {
        let id = live.info.id.clone();
        live.vm.kill().await;
        e.engine
            .finish_sandbox(&e.team, &id, SandboxStatus::Deleted)
            .await
            .unwrap();
    }
    e.engine.delete_template(&e.team, "web").await.unwrap();
    assert_no_vms(&e).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_failure_has_its_code() {
    let e = env(Duration::from_secs(6)).await;
    let small = |from: String, extra: serde_json::Value| {
        let mut s = json!({"memoryMib": 256, "diskMib": 1024, "from": from});
        s.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        s
    };

    let m = e.failure("steps", small(e.image("minbase"), json!({"steps": [{"run": "true"}, {"run": "echo before; exit 7"}, {"run": "echo never"}]}))).await;
    assert_eq!(m.code, BuildErrorCode::StepFailed);
    assert!(
        m.detail.contains("step 2/3")
            && m.detail.contains("exit 7")
            && m.detail.contains("exit code 7"),
        "{m}"
    );

    let m = e
        .failure(
            "start",
            small(
                e.image("minbase"),
                json!({"startCmd": "echo boom >&2; exit 3", "readyCmd": "false"}),
            ),
        )
        .await;
    assert_eq!(m.code, BuildErrorCode::StartCmdFailed, "{m}");
    assert!(m.detail.contains("boom"), "{m}");

    let m = e
        .failure(
            "ready",
            small(
                e.image("minbase"),
                json!({"startCmd": "sleep 600", "readyCmd": "exit 1"}),
            ),
        )
        .await;
    assert_eq!(m.code, BuildErrorCode::ReadyCmdFailed, "{m}");

    let m = e
        .failure(
            "pull",
            small("127.0.0.1:9/kiln/none:latest".into(), json!({})),
        )
        .await;
    assert_eq!(m.code, BuildErrorCode::RegistryUnreachable, "{m}");
    let m = e
        .failure(
            "missing",
            small(
                format!("{}/kiln/does-not-exist:latest", e.registry),
                json!({}),
            ),
        )
        .await;
    assert_eq!(m.code, BuildErrorCode::ImagePullFailed, "{m}");

    let m = e.failure("arm", small(e.image("armonly"), json!({}))).await;
    assert_eq!(m.code, BuildErrorCode::UnsupportedPlatform, "{m}");
    assert!(m.detail.contains("arm64"), "{m}");

    let m = e
        .failure("noshell", small(e.image("noshell"), json!({})))
        .await;
    assert_eq!(m.code, BuildErrorCode::ImageUnsafe, "{m}");
    // An Alpine base is refused by its name before anything runs (content vetting of
    // renamed ones is kiln-oci's test).
    let doc = json!({"name": "alpine", "from": e.image("alpine-like")});
    let err = e
        .engine
        .submit(
            &e.team,
            &TemplateRequest::from_json(&doc, kiln_spec::Form::Sdk).unwrap(),
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("Alpine"), "{err}");

    let m = e.failure("huge", small(e.image("huge"), json!({}))).await;
    assert_eq!(m.code, BuildErrorCode::ImageTooLarge, "{m}");

    assert_no_vms(&e).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_build_cancelled_mid_step_stops_and_leaves_nothing() {
    let e = env(Duration::from_secs(60)).await;
    let doc = json!({"name": "slow", "memoryMib": 256, "diskMib": 1024, "from": e.image("minbase"),
                     "steps": [{"run": "echo sleeping; sleep 600"}]});
    let req = TemplateRequest::parse_and_validate(&doc).unwrap();
    let (t, build) = e.engine.submit(&e.team, &req).await.unwrap();
    let engine = e.engine.clone();
    let id = build.id.clone();
    let running = tokio::spawn(async move { engine.run_build(&id, None).await });
    // Wait until the step is running inside the VM.
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    loop {
        let logs = e.engine.build_log(&e.team, &build.id).await.unwrap();
        if logs.iter().any(|l| l.text == "sleeping") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "step never started: {logs:#?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let cancelled_at = std::time::Instant::now();
    e.engine.cancel_build(&e.team, &build.id).await.unwrap();
    let done = tokio::time::timeout(Duration::from_secs(30), running)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(done.status, BuildStatus::Cancelled);
    eprintln!("cancel took {:?}", cancelled_at.elapsed());
    assert_no_vms(&e).await;
    let staging = e.engine.layout().template_dir(&t.id).unwrap();
    let left: Vec<_> = std::fs::read_dir(&staging)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_step_cache_replays_only_the_steps_after_a_change() {
    let e = env(Duration::from_secs(120)).await;
    let spec = |last: &str, start: &str| {
        json!({
            "name": "layered", "memoryMib": 256, "diskMib": 1024, "from": e.image("minbase"),
            "steps": [
                {"run": "head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n' > /opt/one"},
                {"env": {"key": "LAYER", "value": "two"}},
                {"workdir": "/srv/app"},
                {"run": last},
            ],
            "startCmd": start, "readyCmd": "true",
        })
    };
    let built = |spec: serde_json::Value, force: bool| {
        let e = &e;
        async move {
            let req = TemplateRequest::parse_and_validate(&spec).unwrap();
            let r = e
                .engine
                .rebuild_with(&e.team, "layered", Some(&req), force)
                .await
                .unwrap();
            let b = e.engine.run_build(&r.build.id, None).await.unwrap();
            assert_eq!(b.status, BuildStatus::Ready, "{b:?}");
            let logs = e.engine.build_log(&e.team, &b.id).await.unwrap();
            let new = CreateSandbox::new("s", "layered");
            let (record, _) = e.engine.create_sandbox_record(&e.team, &new).await.unwrap();
            let live = e.engine.start_sandbox(&e.team, &record.id).await.unwrap();
            let seen = exec(
                live.vm.as_ref(),
                "cat /opt/one; echo; echo \"$(cat last) $LAYER $PWD\"",
            )
            .await
            .0;
            e.engine
                .finish_sandbox(&e.team, &record.id, SandboxStatus::Deleted)
                .await
                .unwrap();
            (logs, seen)
        }
    };
    let first = e
        .build("layered", spec("echo v1 > last", "sleep 100000"))
        .await;
    assert_eq!(first.status, BuildStatus::Ready, "{first:?}");
    let logs = e.engine.build_log(&e.team, &first.id).await.unwrap();
    assert!(!log_has(&logs, "(cached)"), "{logs:#?}");

    // The last step changed: steps 1-3 come from the cache (the random bytes of step 1
    // are the first build's), only step 4 runs.
    let (logs, a) = built(spec("echo v2 > last", "sleep 100000"), false).await;
    for cached in ["step 1/4", "step 2/4", "step 3/4"] {
        assert!(
            logs.iter()
                .any(|l| l.text.starts_with(cached) && l.text.ends_with("(cached)")),
            "{cached} not from the cache: {logs:#?}"
        );
    }
    assert!(
        logs.iter()
            .any(|l| l.text.starts_with("step 4/4") && !l.text.ends_with("(cached)")),
        "{logs:#?}"
    );
    let (one, rest) = a.split_once('\n').unwrap();
    assert_eq!(rest, "v2 two /srv/app", "{a}");
    assert_eq!(one.len(), 32, "{a}");

    // The first build's steps with another start command (so not a whole-build hit):
    // all four steps from the cache, the same bytes.
    let (logs, b) = built(spec("echo v1 > last", "sleep 200000"), false).await;
    assert_eq!(
        logs.iter().filter(|l| l.text.ends_with("(cached)")).count(),
        4,
        "{logs:#?}"
    );
    assert_eq!(b, format!("{one}\nv1 two /srv/app"));

    // `force`: every step runs again (new random bytes).
    let (logs, c) = built(spec("echo v1 > last", "sleep 200000"), true).await;
    assert!(!log_has(&logs, "(cached)"), "{logs:#?}");
    assert_ne!(
        c.split_once('\n').unwrap().0,
        one,
        "step 1 did not run again"
    );

    // A cached layer damaged on disk (one byte of every step layer flipped, the size
    // unchanged) is never built on: the steps from the damaged one run again.
    let steps_dir = e.engine.layout().step_cache_dir();
    let mut damaged = 0;
    for entry in std::fs::read_dir(&steps_dir).unwrap().flatten() {
        let layer = entry.path().join("disk.qcow2");
        if let Ok(mut bytes) = std::fs::read(&layer) {
            let last = bytes.len() - 1;
            bytes[last] ^= 0xff;
            std::fs::write(&layer, &bytes).unwrap();
            damaged += 1;
        }
    }
    assert!(
        damaged >= 2,
        "no step layers found in {}",
        steps_dir.display()
    );
    // A build of the first spec (a new start command: not a whole-build hit) that must
    // run every step again, saying why.
    let replays_all = |start: &'static str, says: &'static str| {
        let built = &built;
        let spec = &spec;
        async move {
            let (logs, d) = built(spec("echo v1 > last", start), false).await;
            assert!(log_has(&logs, says), "{logs:#?}");
            assert!(!log_has(&logs, "(cached)"), "{logs:#?}");
            assert_eq!(d.split_once('\n').unwrap().1, "v1 two /srv/app", "{d}");
        }
    };
    replays_all(
        "sleep 300000",
        "step cache: the cached disk after step 1/4 is damaged",
    )
    .await;

    // A damaged base disk: the build makes one of its own, used once and removed.
    let mut bases = 0;
    for entry in std::fs::read_dir(&steps_dir).unwrap().flatten() {
        let base = entry.path().join("disk.raw");
        if let Ok(f) = std::fs::OpenOptions::new().write(true).open(&base) {
            // Byte 0: the ext4 image's unused boot sector, zero until now.
            std::os::unix::fs::FileExt::write_all_at(&f, b"!", 0).unwrap();
            bases += 1;
        }
    }
    assert_eq!(
        bases,
        1,
        "one base disk expected in {}",
        steps_dir.display()
    );
    replays_all(
        "sleep 400000",
        "step cache: the cached base disk of this image is damaged",
    )
    .await;
    let temps: Vec<_> = std::fs::read_dir(&steps_dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".tmp-"))
        .collect();
    assert!(temps.is_empty(), "the private base was left: {temps:?}");
}

/// Points `repo:latest` in the test registry at `image` (a tag that moves, as on Docker
/// Hub).
fn push_tag(registry: &str, image: &str, repo: &str) {
    let status = std::process::Command::new("skopeo")
        .args([
            "copy",
            "--quiet",
            "--src-tls-verify=false",
            "--dest-tls-verify=false",
        ])
        .arg(format!("docker://{registry}/kiln/{image}:latest"))
        .arg(format!("docker://{registry}/{repo}:latest"))
        .status()
        .expect("skopeo (a Debian package scripts/test.sh installs)");
    assert!(status.success(), "skopeo copy {image} -> {repo}");
}

fn log_has(logs: &[kiln_api::BuildLogEvent], text: &str) -> bool {
    logs.iter().any(|l| l.text.contains(text))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_build_cache_reuses_identical_builds_until_the_digest_moves_or_force() {
    let e = env(Duration::from_secs(120)).await;
    // A repository of this run's own, so the tag's history is this test's.
    let repo = format!("cache-{}", std::process::id());
    push_tag(&e.registry, "minbase", &repo);
    let from = format!("{}/{repo}:latest", e.registry);
    let spec = json!({
        "memoryMib": 256, "diskMib": 1024, "from": from,
        "steps": [{"run": "echo once > /opt/marker; date +%s%N > /opt/built-at"}],
        "startCmd": "sleep 100000", "readyCmd": "true",
    });
    let first = e.build("cached", spec.clone()).await;
    assert_eq!(first.status, BuildStatus::Ready, "{first:?}");

    // The same spec again: reused, no VM booted, and its sandboxes are the first build's.
    let r = e.engine.rebuild(&e.team, "cached").await.unwrap();
    let hit = e.engine.run_build(&r.build.id, None).await.unwrap();
    assert_eq!(hit.status, BuildStatus::Ready, "{hit:?}");
    assert_eq!(hit.image_digest, first.image_digest);
    let logs = e.engine.build_log(&e.team, &hit.id).await.unwrap();
    assert!(log_has(&logs, "build cache hit"), "{logs:#?}");
    assert!(!log_has(&logs, "booting build VM"), "{logs:#?}");
    let new = CreateSandbox::new("s", "cached");
    let (record, _) = e.engine.create_sandbox_record(&e.team, &new).await.unwrap();
    assert_eq!(record.build_id.as_deref(), Some(hit.id.as_str()));
    let live = e.engine.start_sandbox(&e.team, &record.id).await.unwrap();
    let first_built_at = exec(live.vm.as_ref(), "cat /opt/built-at").await.0;
    e.engine
        .finish_sandbox(&e.team, &record.id, SandboxStatus::Deleted)
        .await
        .unwrap();
    drop(live);

    // Shared within the team: another template with the same spec hits too.
    let other = e.build("cached-too", spec.clone()).await;
    assert_eq!(other.status, BuildStatus::Ready);
    let logs = e.engine.build_log(&e.team, &other.id).await.unwrap();
    assert!(log_has(&logs, "build cache hit"), "{logs:#?}");

    // `force`: built again from scratch.
    let r = e
        .engine
        .rebuild_with(&e.team, "cached", None, true)
        .await
        .unwrap();
    let forced = e.engine.run_build(&r.build.id, None).await.unwrap();
    assert_eq!(forced.status, BuildStatus::Ready, "{forced:?}");
    let logs = e.engine.build_log(&e.team, &forced.id).await.unwrap();
    assert!(!log_has(&logs, "build cache hit") && log_has(&logs, "booting build VM"));
    assert!(
        !log_has(&logs, "(cached)"),
        "force replays every step: {logs:#?}"
    );

    // The tag now names another image: same spec text, new digest, a miss.
    push_tag(&e.registry, "python", &repo);
    let r = e.engine.rebuild(&e.team, "cached").await.unwrap();
    let moved = e.engine.run_build(&r.build.id, None).await.unwrap();
    assert_eq!(moved.status, BuildStatus::Ready, "{moved:?}");
    assert_ne!(moved.image_digest, first.image_digest);
    let logs = e.engine.build_log(&e.team, &moved.id).await.unwrap();
    assert!(!log_has(&logs, "build cache hit") && log_has(&logs, "booting build VM"));
    assert!(
        !log_has(&logs, "(cached)"),
        "a moved tag misses the step cache: {logs:#?}"
    );
    let (record, _) = e.engine.create_sandbox_record(&e.team, &new).await.unwrap();
    let live = e.engine.start_sandbox(&e.team, &record.id).await.unwrap();
    assert_ne!(
        exec(live.vm.as_ref(), "cat /opt/built-at").await.0,
        first_built_at
    );
    assert_eq!(
        exec(live.vm.as_ref(), "command -v python3 >/dev/null && echo py")
            .await
            .0,
        "py"
    );
    e.engine
        .finish_sandbox(&e.team, &record.id, SandboxStatus::Deleted)
        .await
        .unwrap();
}
