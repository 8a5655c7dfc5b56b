//! The Rust SDK (`kiln-sdk`) against a real `kiln serve` on a fresh state dir, with real
//! VMs (TCG here): one template build (the test registry's `kiln/minbase`), then a
//! sandbox's whole life through the SDK: commands (run, streamed, spawned), files, metadata,
//! pause and resume (and the data plane resuming a paused sandbox by itself), a second
//! handle rotating the token under the first, kill, template delete. Then the SDK's own
//! examples (`crates/kiln-sdk/examples`) run against the same server, as a user would run
//! them. See `common` for the prerequisites.

mod common;

use std::collections::BTreeMap;
use std::io::Read as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kiln_sdk::{
    BuildLogEvent, BuildStatus, Client, Error, ListOptions, LogStream, NetworkConfig, Output,
    RunOptions, Sandbox, SandboxCreateOptions, SandboxStatus, Step, Template,
    TemplateCreateOptions, TemplateStatus,
};

use common::{api_key, assert_no_qemu, assets, registry, repo_root, Server};

/// The SDK's example binaries, as `cargo test` builds them; built here if missing (a
/// no-op when they are fresh).
fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test's own path");
    // <target>/<profile>/deps/sdk_rust-<hash>
    let profile_dir = exe
        .parent()
        .and_then(std::path::Path::parent)
        .expect("the test runs from <target>/<profile>/deps")
        .to_owned();
    let bin = profile_dir.join("examples").join(name);
    if !bin.is_file() {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut build = Command::new(cargo);
        build
            .args(["build", "-p", "kiln-sdk", "--examples"])
            .current_dir(repo_root())
            .stdin(Stdio::null());
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            build.arg("--release");
        }
        if let Some(target_dir) = profile_dir.parent() {
            build.env("CARGO_TARGET_DIR", target_dir);
        }
        let status = build
            .status()
            .expect("running cargo build -p kiln-sdk --examples");
        assert!(
            status.success(),
            "cargo build -p kiln-sdk --examples failed"
        );
    }
    assert!(bin.is_file(), "{} missing", bin.display());
    bin
}

#[test]
fn the_rust_sdk_and_its_examples_drive_a_real_kiln_serve() {
    let registry = registry(&assets());
    let dir = common::state_dir("ksdr");
    let state = dir.path();
    let key = api_key(state, "t");
    let server = Server::start(state, &[("KILN_READY_TIMEOUT_SECS", "300")]);
    let base_url = server.url.clone();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let started = Instant::now();
    rt.block_on(flow(&base_url, &key, &registry));
    eprintln!("[live] the whole flow: {:.1?}", started.elapsed());
    drop(rt);

    for (name, image) in [("quickstart", "python"), ("spawn", "minbase")] {
        let started = Instant::now();
        let status = Command::new(example(name))
            .env("KILN_URL", &base_url)
            .env("KILN_API_KEY", &key)
            .env(
                "KILN_EXAMPLE_IMAGE",
                format!("{registry}/kiln/{image}:latest"),
            )
            .env_remove("KILN_EXAMPLE_TEMPLATE")
            .stdin(Stdio::null())
            .status()
            .unwrap();
        eprintln!(
            "[live] example {name}: {status} in {:.1?}",
            started.elapsed()
        );
        assert!(status.success(), "example {name} failed ({status})");
    }

    drop(server);
    assert_no_qemu(state, Duration::from_secs(20));
}

/// Prints how long each phase took.
struct Clock(Instant);

impl Clock {
    fn lap(&mut self, what: &str) {
        eprintln!("[live] {what}: {:.1?}", self.0.elapsed());
        self.0 = Instant::now();
    }
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

    // -- a sandbox, with egress rules (applied by the proxy: see tests/network.rs)
    let rules = NetworkConfig {
        allow_out: vec!["*.example.com".to_owned()],
        deny_out: vec!["0.0.0.0/0".to_owned()],
    };
    let sandbox = Sandbox::create(
        &client,
        SandboxCreateOptions {
            env_vars: [("FOO".to_owned(), "bar".to_owned())].into(),
            metadata: [("suite".to_owned(), "sdk-live".to_owned())].into(),
            network: Some(rules.clone()),
            ..SandboxCreateOptions::new("live-1", name)
        },
    )
    .await
    .unwrap();
    clock.lap("sandbox created");
    assert_eq!(sandbox.status(), SandboxStatus::Active);
    assert_eq!(sandbox.get_info().await.unwrap().network, Some(rules));
    sandbox.set_network(None).await.unwrap();
    assert_eq!(sandbox.get_info().await.unwrap().network, None);
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

    // -- a second handle: connect (activate) hands out a token that works. Resuming an
    // active sandbox is a conflict; its pause and resume rotate the token: the first
    // handle's next call gets 401, activates and goes on.
    let other = Sandbox::connect(&client, &id).await.unwrap();
    let r = other
        .commands()
        .run("echo from the other handle", RunOptions::default())
        .await
        .unwrap();
    assert_eq!(r.stdout, "from the other handle\n");
    let before = sandbox.access_token();
    let err = other.resume().await.unwrap_err();
    assert!(
        matches!(&err, Error::Conflict { .. }),
        "resuming an active sandbox: {err:?}"
    );
    other.pause().await.unwrap();
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
