//! Faults in the middle of a build, with real VMs under TCG: each ends with a clear code,
//! nothing left running or on disk, and the template still builds afterwards. See
//! `templates_vm.rs` for the prerequisites.

mod common;

use std::time::{Duration, Instant};

use common::{assert_no_vms, env, qemu_of, Env};
use kiln_api::{BuildInfo as Build, BuildStatus, CreateSandbox, SandboxStatus};
use kiln_spec::{BuildErrorCode, CodedMessage, TemplateRequest};
use serde_json::json;

/// Submits `spec` as template `name` and runs its build on a task.
async fn start_build(
    e: &Env,
    name: &str,
    spec: serde_json::Value,
) -> (Build, tokio::task::JoinHandle<Build>) {
    let mut doc = spec;
    doc["name"] = json!(name);
    let req = TemplateRequest::parse_and_validate(&doc).unwrap_or_else(|p| panic!("{p}"));
    let (_, build) = e.engine.submit(&e.team, &req).await.unwrap();
    let engine = e.engine.clone();
    let id = build.id.clone();
    let task = tokio::spawn(async move { engine.run_build(&id, None).await.unwrap() });
    (build, task)
}

/// Waits until the build's log has a line containing `text`.
async fn wait_for_log(e: &Env, build_id: &str, text: &str) {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let logs = e.engine.build_log(&e.team, build_id).await.unwrap();
        if logs.iter().any(|l| l.text.contains(text)) {
            return;
        }
        assert!(Instant::now() < deadline, "no {text:?} in the build log");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The build failed with `code`, its staging files are gone, no VM is left, and the
/// same template then builds (nothing was left half-published).
async fn assert_failed_cleanly(e: &Env, name: &str, b: &Build, code: BuildErrorCode) -> String {
    assert_eq!(b.status, BuildStatus::Failed, "{b:?}");
    let msg = CodedMessage::parse(b.error_message.as_deref().unwrap());
    assert_eq!(msg.code, code, "{msg:?}");
    assert_no_vms(e).await;
    let dir = e.engine.layout().template_dir(&b.template_id).unwrap();
    let left: Vec<_> = std::fs::read_dir(&dir)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "left behind: {left:?}");
    let req = TemplateRequest::parse_and_validate(&json!({
        "name": name, "from": e.image("minbase"), "memoryMib": 256, "steps": [{"run": "true"}],
    }))
    .unwrap();
    let r = e
        .engine
        .rebuild_with(&e.team, name, Some(&req), false)
        .await
        .unwrap();
    let again = e.engine.run_build(&r.build.id, None).await.unwrap();
    assert_eq!(again.status, BuildStatus::Ready, "{again:?}");
    msg.detail
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_qemu_killed_mid_step_fails_the_build_and_leaves_nothing() {
    let e = env(Duration::from_secs(60)).await;
    let spec = json!({
        "from": e.image("minbase"), "memoryMib": 256,
        "steps": [{"run": "echo step-running; sleep 600"}],
    });
    let (build, task) = start_build(&e, "killed", spec).await;
    wait_for_log(&e, &build.id, "step-running").await;
    let root = e.engine.layout().root().display().to_string();
    let vms = qemu_of(&root);
    assert_eq!(vms.len(), 1, "{vms:?}");
    // SAFETY: kill(2) of the build's QEMU, found by its command line.
    unsafe { libc::kill(vms[0].0, libc::SIGKILL) };
    let b = tokio::time::timeout(Duration::from_secs(60), task)
        .await
        .expect("the build did not notice its VM was killed")
        .unwrap();
    let detail = assert_failed_cleanly(&e, "killed", &b, BuildErrorCode::BuildFailed).await;
    assert!(
        detail.contains("stopped answering during step 1/1"),
        "{detail}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_guest_cannot_signal_its_agent_away_and_a_guest_crash_is_a_clear_error() {
    let e = env(Duration::from_secs(60)).await;
    // The agent is PID 1: signals from inside the guest do not reach it (TERM and INT
    // are forwarded to the processes it started, as `kill 1` asks, by design).
    let b = e
        .build(
            "signals",
            json!({
                "from": e.image("minbase"), "memoryMib": 256,
                "steps": [{"run": "for s in KILL HUP SEGV ABRT QUIT USR1 USR2; do kill -s $s 1; done; \
                                   sleep 1; echo agent-alive"}],
            }),
        )
        .await;
    assert_eq!(b.status, BuildStatus::Ready, "{b:?}");
    let logs = e.engine.build_log(&e.team, &b.id).await.unwrap();
    assert!(logs.iter().any(|l| l.text == "agent-alive"), "{logs:?}");

    // A guest kernel crash takes the agent with it: the build says the VM went away, with
    // no waiting out a timeout.
    let (build, task) = start_build(
        &e,
        "crash",
        json!({
            "from": e.image("minbase"), "memoryMib": 256,
            "steps": [{"run": "echo crashing; sync; echo c > /proc/sysrq-trigger; sleep 600"}],
        }),
    )
    .await;
    wait_for_log(&e, &build.id, "crashing").await;
    let b = tokio::time::timeout(Duration::from_secs(120), task)
        .await
        .expect("the build did not notice its guest crashed")
        .unwrap();
    let detail = assert_failed_cleanly(&e, "crash", &b, BuildErrorCode::BuildFailed).await;
    assert!(
        detail.contains("QEMU exited") || detail.contains("agent"),
        "{detail}"
    );
}

/// Runs `cmd` in `vm` with a bound; `None` when it did not answer in time.
async fn exec_within(vm: &dyn kiln_vm::Machine, cmd: &str, secs: u64) -> Option<(String, i32)> {
    let req = kiln_vm::ExecRequest {
        command: cmd.into(),
        timeout_ms: Some(secs * 1000),
        ..Default::default()
    };
    let out = tokio::time::timeout(Duration::from_secs(secs + 30), vm.exec_collect(req))
        .await
        .ok()?
        .ok()?;
    Some((
        String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        out.status.code.unwrap_or(-1),
    ))
}

/// One sandbox exhausts its processes, its disk and its memory; its neighbour answers
/// throughout, and so does the host (this test runs on it).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_sandbox_exhausting_itself_leaves_its_neighbour_answering() {
    let e = env(Duration::from_secs(60)).await;
    let b = e
        .build(
            "hog",
            json!({"from": e.image("minbase"), "memoryMib": 256, "diskMib": 1024, "steps": [{"run": "true"}]}),
        )
        .await;
    assert_eq!(b.status, BuildStatus::Ready, "{b:?}");
    let new = CreateSandbox::new("s", "hog");
    let (ra, _) = e.engine.create_sandbox_record(&e.team, &new).await.unwrap();
    let hog = e.engine.start_sandbox(&e.team, &ra.id).await.unwrap();
    let (rb, _) = e.engine.create_sandbox_record(&e.team, &new).await.unwrap();
    let neighbour = e.engine.start_sandbox(&e.team, &rb.id).await.unwrap();
    let answers = |what: &'static str| {
        let vm = neighbour.vm.as_ref();
        async move {
            assert_eq!(
                exec_within(vm, "echo ok", 60).await,
                Some(("ok".to_owned(), 0)),
                "the neighbour stopped answering while the other sandbox {what}"
            );
        }
    };

    // The disk, to the last block: the guest sees ENOSPC; the host file stays within
    // diskMib.
    let (out, _) = exec_within(
        hog.vm.as_ref(),
        "dd if=/dev/zero of=/fill bs=1M 2>&1 | grep -o 'No space left on device'; df -P / | tail -1",
        600,
    )
    .await
    .expect("dd in the hog");
    assert!(
        out.contains("No space left on device") && out.contains(" 100% /"),
        "{out}"
    );
    let overlay = std::fs::metadata(hog.vm.run_dir().join("disk.qcow2"))
        .unwrap()
        .len();
    assert!(
        overlay <= (1024 + 64) << 20,
        "the host side of a 1024 MiB disk grew to {overlay} bytes"
    );
    answers("filled its disk").await;
    assert_eq!(
        exec_within(hog.vm.as_ref(), "echo still", 60).await,
        Some(("still".to_owned(), 0)),
        "a full disk took the hog's own agent down"
    );

    // Memory: the guest's OOM killer ends the hog, the agent (PID 1) lives on.
    let (out, _) = exec_within(
        hog.vm.as_ref(),
        "perl -e '$x = \"x\" x (1 << 30); print length $x' 2>&1; echo \" exit=$?\"",
        600,
    )
    .await
    .expect("the hog's agent answers after its OOM");
    assert!(
        !out.starts_with("1073741824"),
        "1 GiB fitted in 256 MiB? {out}"
    );
    answers("ran out of memory").await;

    // Processes: a fork bomb, left running while the neighbour is asked.
    let bomb = {
        let req = kiln_vm::ExecRequest {
            command: "bomb() { bomb | bomb & }; bomb".into(),
            timeout_ms: Some(20_000),
            ..Default::default()
        };
        let h = hog.vm.exec(req).await.unwrap();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(60), h.collect()).await;
        })
    };
    tokio::time::sleep(Duration::from_secs(5)).await;
    answers("ran a fork bomb").await;
    let _ = bomb.await;
    answers("ran a fork bomb").await;

    drop(hog);
    drop(neighbour);
    for id in [&ra.id, &rb.id] {
        e.engine
            .finish_sandbox(&e.team, id, SandboxStatus::Deleted)
            .await
            .unwrap();
    }
    assert_no_vms(&e).await;
}
