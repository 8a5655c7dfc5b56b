//! The SDK against a real `kiln serve` on a fresh state dir, with real VMs (TCG here):
//! one template build (the test registry's `kiln/minbase`), then a sandbox's whole life
//! through the SDK: commands (run, streamed, spawned), files, metadata, pause and resume
//! (and the data plane resuming a paused sandbox by itself), a second handle rotating the
//! token under the first, kill, template delete.
//!
//! Needs what `scripts/test.sh` sets up: the guest kernel (`kiln setup` into
//! `$KILN_TEST_ASSETS/state`), the test registry (`scripts/test-registry.sh start`) and the
//! static agent (`scripts/build-agent.sh`). The `kiln` binary is built here if needed
//! (`cargo build -p kiln-cli`). A missing prerequisite fails the test with the remedy; it
//! never skips.

use std::collections::BTreeMap;
use std::io::{BufRead as _, BufReader, Read};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use kiln_sdk::{
    BuildLogEvent, BuildStatus, Client, Error, ListOptions, LogStream, Output, RunOptions, Sandbox,
    SandboxCreateOptions, SandboxStatus, Step, Template, TemplateCreateOptions, TemplateStatus,
};

const REMEDY: &str = "run scripts/test.sh (it provisions the test assets)";

/// Server settings a developer's shell may carry that would change what the test expects.
const SERVER_ENV_CLEARED: &[&str] = &[
    "KILN_CONFIG",
    "KILN_LISTEN",
    "KILN_MAX_TEMPLATES",
    "KILN_MAX_CONCURRENT_BUILDS",
    "KILN_MAX_SANDBOXES",
    "KILN_MAX_PARALLEL_BUILDS",
    "KILN_RATE_LIMIT_PER_SEC",
    "KILN_RATE_LIMIT_BURST",
];

/// What `kiln serve` prints on stderr once it listens.
const LISTENING: &str = "kiln API listening on ";

fn assets() -> PathBuf {
    std::env::var_os("KILN_TEST_ASSETS")
        .filter(|v| !v.is_empty())
        .map_or_else(|| PathBuf::from("/var/tmp/kiln-test-assets"), PathBuf::from)
}

/// `KILN_TEST_REGISTRY` from `registry.env`, checked to answer.
fn registry(assets: &Path) -> String {
    let path = assets.join("registry.env");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}\n-> {REMEDY} (or scripts/test-registry.sh start)",
            path.display()
        )
    });
    let reg = text
        .lines()
        .find_map(|l| l.strip_prefix("KILN_TEST_REGISTRY="))
        .map(|v| v.trim_matches('"').to_owned())
        .unwrap_or_else(|| panic!("no KILN_TEST_REGISTRY in {}", path.display()));
    let addr: SocketAddr = reg
        .parse()
        .unwrap_or_else(|e| panic!("KILN_TEST_REGISTRY={reg}: {e}"));
    TcpStream::connect_timeout(&addr, Duration::from_secs(3)).unwrap_or_else(|e| {
        panic!(
            "the test registry at {reg} does not answer ({e})\n-> scripts/test-registry.sh start"
        )
    });
    reg
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The static guest agent the server embeds in its VMs must be findable (as
/// `kiln_vm::provision::find_agent_binary` looks for it).
fn check_agent() {
    if let Some(p) = std::env::var_os("KILN_AGENT_BIN").filter(|v| !v.is_empty()) {
        assert!(
            Path::new(&p).is_file(),
            "KILN_AGENT_BIN={} does not exist\n-> scripts/build-agent.sh",
            Path::new(&p).display()
        );
        return;
    }
    let built = workspace_root().join("target/x86_64-unknown-linux-gnu/release/kiln-agent");
    assert!(
        built.is_file(),
        "no guest agent: {} missing and KILN_AGENT_BIN unset\n-> scripts/build-agent.sh \
         (or {REMEDY})",
        built.display()
    );
}

/// The `kiln` binary of this build (the same target dir and profile as this test),
/// built now if missing or stale: cargo makes that a no-op when it is fresh.
fn kiln_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("the test's own path");
    // <target>/<profile>/deps/live-<hash>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test runs from <target>/<profile>/deps")
        .to_owned();
    let release = profile_dir.file_name().is_some_and(|n| n == "release");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut build = Command::new(&cargo);
    build
        .args(["build", "-p", "kiln-cli", "--bin", "kiln"])
        .current_dir(workspace_root())
        .stdin(Stdio::null());
    if release {
        build.arg("--release");
    }
    if let Some(target_dir) = profile_dir.parent() {
        build.env("CARGO_TARGET_DIR", target_dir);
    }
    let started = Instant::now();
    let status = build.status().unwrap_or_else(|e| {
        panic!(
            "running `{} build -p kiln-cli`: {e}\n-> build it yourself: cargo build -p kiln-cli",
            Path::new(&cargo).display()
        )
    });
    assert!(
        status.success(),
        "`cargo build -p kiln-cli` failed ({status})\n-> fix the build, then rerun"
    );
    let bin = profile_dir.join("kiln");
    assert!(
        bin.is_file(),
        "{} missing after cargo build -p kiln-cli",
        bin.display()
    );
    eprintln!(
        "kiln binary ready in {:.1?}: {}",
        started.elapsed(),
        bin.display()
    );
    bin
}

/// `kiln ARGS` on the state dir `state`, with [`SERVER_ENV_CLEARED`] cleared.
fn kiln(bin: &Path, state: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(bin);
    cmd.args(args).env("KILN_HOME", state);
    for var in SERVER_ENV_CLEARED {
        cmd.env_remove(var);
    }
    cmd
}

/// Copies a child's output to ours line by line, tagged; `addr` gets the address of the
/// first `kiln API listening on ADDR` line.
fn forward(
    from: impl Read + Send + 'static,
    tag: &'static str,
    addr: mpsc::Sender<String>,
) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let mut addr = Some(addr);
        for line in BufReader::new(from).lines() {
            let Ok(line) = line else { break };
            eprintln!("[{tag}] {line}");
            if let Some(found) = line.split(LISTENING).nth(1) {
                if let Some(tx) = addr.take() {
                    let _ = tx.send(found.trim().to_owned());
                }
            }
        }
    })
}

fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) on our own child's pid; no memory is involved.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

/// Waits for a child up to `within`; true when it exited.
fn wait_for(child: &mut Child, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => return true,
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(100)),
            _ => return false,
        }
    }
}

/// `kiln serve`, stopped when dropped (the test failing included): SIGINT first (its
/// graceful shutdown stops the VMs), then SIGKILL.
#[derive(Debug)]
struct Server {
    child: Child,
}

impl Drop for Server {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            signal(self.child.id(), libc::SIGINT);
            if !wait_for(&mut self.child, Duration::from_secs(30)) {
                eprintln!("kiln serve did not stop on SIGINT within 30s: killing it");
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
    }
}

/// Pids and command lines of `qemu-system*` processes that mention `needle`.
fn qemu_with(needle: &str) -> Vec<(u32, String)> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(raw) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&raw).replace('\0', " ");
        if cmdline.contains("qemu-system") && cmdline.contains(needle) {
            out.push((pid, cmdline));
        }
    }
    out
}

/// Prints how long each phase took.
struct Clock(Instant);

impl Clock {
    fn lap(&mut self, what: &str) {
        eprintln!("[live] {what}: {:.1?}", self.0.elapsed());
        self.0 = Instant::now();
    }
}

#[test]
fn the_sdk_drives_a_real_kiln_serve() {
    // -- prerequisites
    let assets = assets();
    let kernel = assets.join("state/kernel");
    assert!(kernel.is_dir(), "{} missing -> {REMEDY}", kernel.display());
    let registry = registry(&assets);
    check_agent();
    let bin = kiln_binary();

    // -- a fresh state dir; short, since VM sockets live under it
    let dir = tempfile::Builder::new()
        .prefix("ksdk")
        .tempdir_in("/tmp")
        .unwrap();
    let state = dir.path().to_owned();
    std::os::unix::fs::symlink(&kernel, state.join("kernel")).unwrap();
    let state_str = state.to_str().unwrap().to_owned();

    let out = kiln(&bin, &state, &["admin", "create-api-key", "--team", "t"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kiln admin create-api-key: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let key = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert!(
        !key.is_empty() && !key.contains(char::is_whitespace),
        "not a key: {key:?}"
    );

    // -- the server, on a port of the system's choosing, reported on stderr
    let mut child = kiln(&bin, &state, &["serve", "--listen", "127.0.0.1:0"])
        .env("KILN_READY_TIMEOUT_SECS", "300")
        .env(
            "KILN_LOG",
            std::env::var("KILN_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    // Not joined: a VM that outlived the server may hold its stderr open.
    let _logs = forward(child.stderr.take().unwrap(), "kiln serve", tx);
    let server = Server { child };
    let base_url = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("kiln serve did not report its address within 60s");
    eprintln!("kiln serve at {base_url}, state {state_str}");

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let started = Instant::now();
    rt.block_on(flow(&base_url, &key, &registry));
    eprintln!("[live] the whole flow: {:.1?}", started.elapsed());
    drop(rt);

    // -- the server stops, and leaves no VM behind
    drop(server);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut left = qemu_with(&state_str);
    while !left.is_empty() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(200));
        left = qemu_with(&state_str);
    }
    for (pid, _) in &left {
        signal(*pid, libc::SIGKILL);
    }
    assert!(left.is_empty(), "VMs left behind by kiln serve: {left:#?}");
}

async fn wait_healthy(base_url: &str) {
    let http = kiln_sdk::reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ok = http
            .get(format!("{base_url}/health"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        if ok {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{base_url}/health did not answer within 30s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn flow(base_url: &str, key: &str, registry: &str) {
    let mut clock = Clock(Instant::now());
    wait_healthy(base_url).await;
    let client = Client::new(base_url, key).unwrap();

    // -- a template: one build. Its name holds a `/`, a path segment of its own.
    let name = "sdk-live/minbase";
    let mut template = Template::create(
        &client,
        TemplateCreateOptions {
            steps: vec![
                Step::env("GREETING", "hello"),
                Step::run("mkdir -p /opt/app && echo built > /opt/app/built.txt"),
            ],
            start_cmd: Some("sleep infinity".into()),
            ready_cmd: Some("true".into()),
            memory_mib: Some(256),
            disk_mib: Some(1024),
            ..TemplateCreateOptions::new(name, format!("{registry}/kiln/minbase:latest"))
        },
    )
    .await
    .unwrap();
    assert_eq!(template.name(), name);
    let build_id = template.info().latest_build_id.clone().expect("a build id");
    // The same name again is a conflict.
    let err = Template::create(
        &client,
        TemplateCreateOptions::new(name, format!("{registry}/kiln/minbase:latest")),
    )
    .await
    .unwrap_err();
    assert!(matches!(&err, Error::Conflict { .. }), "{err:?}");
    // Refused by the server's validation, typed.
    let err = Template::create(&client, TemplateCreateOptions::new("Bad Name", "x"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::Validation { code, .. } if code == "invalid_request"),
        "{err:?}"
    );

    let listed = Template::list(&client, Some("sdk-live/")).await.unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert!(Template::list(&client, Some("nothing-"))
        .await
        .unwrap()
        .is_empty());
    let by_name = Template::connect(&client, name).await.unwrap();
    assert_eq!(by_name.id(), template.id());

    let mut logs: Vec<BuildLogEvent> = Vec::new();
    let info = template
        .wait_until_ready(Some(&mut |e: &BuildLogEvent| logs.push(e.clone())))
        .await
        .unwrap();
    clock.lap("template built (wait_until_ready)");
    assert_eq!(info.status, TemplateStatus::Ready);
    assert!(info.size_bytes.is_some_and(|n| n > 0), "{info:?}");
    assert!(
        logs.iter().any(|l| l.stream == LogStream::System),
        "no system log line: {logs:#?}"
    );
    let last = logs.last().expect("log events");
    assert!(last.finished, "{last:?}");
    assert_eq!(last.status, Some(BuildStatus::Ready), "{last:?}");

    let build = template.get_build(&build_id).await.unwrap();
    assert_eq!(build.status, BuildStatus::Ready);
    assert!(build.build_spec_hash.starts_with("sha256:"), "{build:?}");
    let builds = template.list_builds(Some(5)).await.unwrap();
    assert_eq!(builds.len(), 1);
    assert_eq!(builds[0].id, build_id);
    let mut replayed: Vec<BuildLogEvent> = Vec::new();
    template
        .stream_build_logs(None, |e| replayed.push(e.clone()))
        .await
        .unwrap();
    // The log replays whole: every line a step printed, and the closing event. (The live
    // stream may also have carried "queued" heartbeats, which are not stored.)
    let step_lines = |l: &[BuildLogEvent]| -> Vec<String> {
        l.iter()
            .filter(|e| e.stream != LogStream::System)
            .map(|e| e.text.clone())
            .collect()
    };
    assert_eq!(step_lines(&replayed), step_lines(&logs));
    let last = replayed.last().expect("replayed events");
    assert!(
        last.finished && last.status == Some(BuildStatus::Ready),
        "{last:?}"
    );
    // Cancelling a finished build changes nothing (or is refused as a conflict).
    match template.cancel_build(&build_id).await {
        Ok(()) | Err(Error::Conflict { .. }) => {}
        Err(e) => panic!("cancel_build: {e:?}"),
    }
    assert_eq!(
        template.get_build(&build_id).await.unwrap().status,
        BuildStatus::Ready
    );

    // -- a sandbox
    let sandbox = Sandbox::create(
        &client,
        SandboxCreateOptions {
            env_vars: [("FOO".to_owned(), "bar".to_owned())].into(),
            metadata: [("suite".to_owned(), "sdk-live".to_owned())].into(),
            ..SandboxCreateOptions::new("live-1", name)
        },
    )
    .await
    .unwrap();
    clock.lap("sandbox created");
    assert_eq!(sandbox.status(), SandboxStatus::Active);
    let id = sandbox.id().to_owned();
    let listed = Sandbox::list(
        &client,
        ListOptions {
            metadata: [("suite".to_owned(), "sdk-live".to_owned())].into(),
            status: vec![SandboxStatus::Active],
            ..ListOptions::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(
        listed.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(),
        [id.as_str()]
    );
    let none = Sandbox::list(
        &client,
        ListOptions {
            metadata: [("suite".to_owned(), "other".to_owned())].into(),
            ..ListOptions::default()
        },
    )
    .await
    .unwrap();
    assert!(none.is_empty(), "{none:?}");

    // -- commands
    let r = sandbox
        .commands()
        .run(
            "echo \"$GREETING $FOO $ONE\"; cat /opt/app/built.txt; pwd",
            RunOptions {
                env: [("ONE".to_owned(), "1".to_owned())].into(),
                cwd: Some("/opt".into()),
                ..RunOptions::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(
        (
            r.stdout.as_str(),
            r.stderr.as_str(),
            r.exit_code,
            r.truncated
        ),
        ("hello bar 1\nbuilt\n/opt\n", "", 0, false),
        "{r:?}"
    );
    let r = sandbox
        .commands()
        .run("echo oops >&2; exit 3", RunOptions::default())
        .await
        .unwrap();
    assert_eq!((r.stderr.as_str(), r.exit_code), ("oops\n", 3), "{r:?}");
    let r = sandbox
        .commands()
        .run(
            "sleep 30",
            RunOptions {
                timeout_s: Some(1),
                ..RunOptions::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(r.exit_code, 124, "{r:?}");
    let (mut outs, mut errs) = (Vec::new(), Vec::new());
    let r = sandbox
        .commands()
        .run_streaming(
            "echo one; echo two >&2; sleep 1; echo three",
            RunOptions::default(),
            |s| outs.push(s.to_owned()),
            |s| errs.push(s.to_owned()),
        )
        .await
        .unwrap();
    assert_eq!(r.exit_code, 0);
    assert_eq!(r.stdout, "one\nthree\n");
    assert_eq!(r.stderr, "two\n");
    assert!(outs.len() >= 2, "output came in one piece: {outs:?}");
    assert_eq!(errs.concat(), "two\n");
    clock.lap("commands run");

    // -- an interactive session
    let mut session = sandbox
        .commands()
        .spawn("cat; echo bye >&2; exit 7", RunOptions::default())
        .await
        .unwrap();
    session.write_stdin("ping\n").await.unwrap();
    // cat echoes it as it comes, before stdin is closed.
    let mut echoed = String::new();
    while echoed.len() < 5 {
        match tokio::time::timeout(Duration::from_secs(30), session.next_output())
            .await
            .expect("cat echoes within 30s")
        {
            Some(Output::Stdout(s)) => echoed.push_str(&s),
            other => panic!("unexpected output: {other:?}"),
        }
    }
    assert_eq!(echoed, "ping\n");
    session.write_stdin(vec![b'z'; 100_000]).await.unwrap();
    session.close_stdin().await.unwrap();
    let r = tokio::time::timeout(Duration::from_secs(60), session.wait())
        .await
        .expect("the session ends within 60s")
        .unwrap();
    assert_eq!(r.exit_code, 7, "{r:?}");
    assert_eq!(r.stdout.len(), 5 + 100_000);
    assert_eq!(r.stderr, "bye\n");
    // A signal ends a long-lived process: 128 + 15.
    let session = sandbox
        .commands()
        .spawn("sleep 600", RunOptions::default())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    session.signal("SIGTERM").await.unwrap();
    let r = tokio::time::timeout(Duration::from_secs(30), session.wait())
        .await
        .expect("the signalled session ends within 30s")
        .unwrap();
    assert_eq!(r.exit_code, 143, "{r:?}");
    clock.lap("sessions");

    // -- files
    let files = sandbox.files();
    files
        .write("/opt/app/data/notes.txt", "written by the SDK\n")
        .await
        .unwrap();
    let binary: Vec<u8> = (0..=255u8).cycle().take(300_000).collect();
    files
        .write("/opt/app/data/blob.bin", &binary)
        .await
        .unwrap();
    assert_eq!(
        files.read_text("/opt/app/data/notes.txt").await.unwrap(),
        "written by the SDK\n"
    );
    assert_eq!(files.read("/opt/app/data/blob.bin").await.unwrap(), binary);
    let zip_bytes = files.download_dir("/opt/app/data").await.unwrap();
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(zip_bytes)).unwrap();
    let mut names: Vec<String> = zip.file_names().map(str::to_owned).collect();
    names.sort();
    assert_eq!(names, ["data/", "data/blob.bin", "data/notes.txt"]);
    let mut notes = String::new();
    zip.by_name("data/notes.txt")
        .unwrap()
        .read_to_string(&mut notes)
        .unwrap();
    assert_eq!(notes, "written by the SDK\n");
    let err = files.read("/opt/app/missing").await.unwrap_err();
    assert!(
        matches!(&err, Error::NotFound { code, .. } if code == "file_not_found"),
        "{err:?}"
    );
    let err = files.read("opt/relative").await.unwrap_err();
    assert!(matches!(&err, Error::Validation { .. }), "{err:?}");
    clock.lap("files");

    // -- metadata
    let md: BTreeMap<String, String> = [("suite".to_owned(), "sdk-live-2".to_owned())].into();
    sandbox.update(md.clone()).await.unwrap();
    assert_eq!(sandbox.get_info().await.unwrap().metadata, md);

    // -- pause; the data plane resumes a paused sandbox by itself (503
    // sandbox_unavailable, then activate, then the call again)
    sandbox.pause().await.unwrap();
    clock.lap("paused");
    assert_eq!(
        sandbox.get_info().await.unwrap().status,
        SandboxStatus::Paused
    );
    let token = sandbox.access_token();
    assert_eq!(
        files.read_text("/opt/app/data/notes.txt").await.unwrap(),
        "written by the SDK\n",
        "a paused sandbox's file, after the SDK resumed it"
    );
    clock.lap("auto-resumed by a data-plane call");
    assert_ne!(
        sandbox.access_token(),
        token,
        "activation rotates the token"
    );
    assert_eq!(
        sandbox.get_info().await.unwrap().status,
        SandboxStatus::Active
    );

    // -- explicit pause and resume
    sandbox.pause().await.unwrap();
    let token = sandbox.access_token();
    sandbox.resume().await.unwrap();
    clock.lap("paused and resumed");
    assert_ne!(sandbox.access_token(), token);
    let r = sandbox
        .commands()
        .run(
            "cat /opt/app/data/notes.txt; echo $FOO",
            RunOptions::default(),
        )
        .await
        .unwrap();
    assert_eq!(r.stdout, "written by the SDK\nbar\n", "{r:?}");

    // -- a second handle: connect (activate) hands out a token that works. Its resume
    // rotates the token: the first handle's next call gets 401, activates and goes on.
    let other = Sandbox::connect(&client, &id).await.unwrap();
    let r = other
        .commands()
        .run("echo from the other handle", RunOptions::default())
        .await
        .unwrap();
    assert_eq!(r.stdout, "from the other handle\n");
    let before = sandbox.access_token();
    other.resume().await.unwrap();
    assert_ne!(other.access_token(), before, "resume rotates the token");
    let r = sandbox
        .commands()
        .run("echo still here", RunOptions::default())
        .await
        .unwrap();
    assert_eq!(r.stdout, "still here\n");
    assert_eq!(sandbox.access_token(), other.access_token());
    clock.lap("second handle");

    // -- the end
    let err = template.delete().await.unwrap_err();
    assert!(
        matches!(&err, Error::Conflict { .. }),
        "a template in use cannot be deleted: {err:?}"
    );
    sandbox.kill().await.unwrap();
    sandbox.kill().await.unwrap(); // idempotent
    match Sandbox::list(&client, ListOptions::default()).await {
        Ok(all) => assert!(
            all.iter()
                .all(|s| s.id != id || s.status == SandboxStatus::Deleted),
            "{all:?}"
        ),
        Err(e) => panic!("list: {e:?}"),
    }
    let err = sandbox
        .commands()
        .run("true", RunOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(&err, Error::NotFound { .. }), "{err:?}");
    template.delete().await.unwrap();
    template.delete().await.unwrap(); // idempotent
    let err = Template::connect(&client, name).await.unwrap_err();
    assert!(
        matches!(&err, Error::NotFound { code, .. } if code == "not_found"),
        "{err:?}"
    );
    clock.lap("killed and deleted");
}
