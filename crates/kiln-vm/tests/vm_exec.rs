//! Real-VM tests (TCG here): exec through the agent, files, concurrency, boot failure.

mod common;

use std::time::{Duration, Instant};

use common::req;
use kiln_vm::{ExecEvent, RootDisk, Vm};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exec_files_and_concurrency() {
    let env = common::env("exec").await;
    let t = Instant::now();
    let vm = Vm::boot(env.config("exec"))
        .await
        .unwrap_or_else(|e| panic!("{}", kiln_vm::error_chain(&e)));
    eprintln!("boot to agent-ready: {:?}", t.elapsed());

    // env, cwd, user
    let mut r = req("echo \"$FOO\"; pwd; id -un");
    r.env.insert("FOO".into(), "bar baz".into());
    r.cwd = Some("/tmp".into());
    r.user = Some("nobody".into());
    let out = vm.exec_collect(r).await.unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "bar baz\n/tmp\nnobody\n",
        "stderr: {:?}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success());

    // stdin
    let mut r = req("cat; echo done >&2");
    r.stdin = true;
    let mut h = vm.exec(r).await.unwrap();
    let mut stdin = h.take_stdin().expect("stdin requested");
    stdin.write_all(b"hello through stdin\n").await.unwrap();
    stdin.close().unwrap();
    let out = vm.guard(h.collect()).await.unwrap();
    assert_eq!(out.stdout, b"hello through stdin\n");
    assert_eq!(out.stderr, b"done\n");

    // non-zero exit
    let out = vm.exec_collect(req("echo oops >&2; exit 7")).await.unwrap();
    assert_eq!(out.status.code, Some(7));
    assert_eq!(out.stderr, b"oops\n");

    // signal delivered through the handle
    let mut h = vm.exec(req("echo started; exec sleep 30")).await.unwrap();
    match vm.guard(h.next_event()).await.unwrap() {
        Some(ExecEvent::Stdout(b)) => assert_eq!(&b[..], b"started\n"),
        other => panic!("unexpected {other:?}"),
    }
    // SIGTERM, which PID 1 itself blocks: an exec must not inherit that mask.
    h.signal(libc::SIGTERM).unwrap();
    let st = tokio::time::timeout(Duration::from_secs(10), vm.guard(h.wait()))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(st.signal, Some(libc::SIGTERM), "{st:?}");

    // 20 MiB file round trip, checked on both sides
    let data: Vec<u8> = (0..20u32 * 1024 * 1024)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let t = Instant::now();
    vm.guard(vm.agent().write_file("/root/big.bin", &data, Some(0o600)))
        .await
        .unwrap();
    let up = t.elapsed();
    let t = Instant::now();
    let back = vm
        .guard(vm.agent().read_file("/root/big.bin"))
        .await
        .unwrap();
    eprintln!("20 MiB up {up:?}, down {:?}", t.elapsed());
    assert!(back == data, "round trip differs");
    let out = vm
        .exec_collect(req("sha256sum /root/big.bin | cut -d' ' -f1"))
        .await
        .unwrap();
    use sha2::Digest as _;
    let host = hex::encode(sha2::Sha256::digest(&data));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), host);

    // 10 concurrent execs on one connection: each checks in, then waits until all 10
    // have, which they only can when they all run at once.
    vm.exec_collect(req("mkdir /tmp/rendezvous")).await.unwrap();
    let mut set = tokio::task::JoinSet::new();
    for i in 0..10 {
        let agent = vm.agent().clone();
        let all_in = format!(
            "touch /tmp/rendezvous/{i}; \
             until [ \"$(ls /tmp/rendezvous | wc -l)\" -eq 10 ]; do sleep 0.2; done; echo {i}"
        );
        set.spawn(async move { (i, agent.exec_collect(req(&all_in)).await) });
    }
    let mut seen = Vec::new();
    let joined = tokio::time::timeout(Duration::from_secs(300), async {
        while let Some(r) = set.join_next().await {
            let (i, out) = r.unwrap();
            let out = out.unwrap();
            assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), i.to_string());
            seen.push(i);
        }
    })
    .await;
    assert!(
        joined.is_ok(),
        "not concurrent: only {seen:?} got past the rendezvous"
    );
    assert_eq!(seen.len(), 10);

    let mut vm = vm;
    common::reconnect_cycles(&mut vm, 10).await;

    vm.shutdown().await;
    env.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boot_failure_is_boot_failed_with_console() {
    let env = common::env("bootfail").await;
    // A disk with no filesystem: the agent cannot mount root.
    let blank = env.run_parent.join("blank.raw");
    std::fs::File::create(&blank)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let mut cfg = env.config("bootfail");
    cfg.disk = RootDisk::Raw(blank.clone());
    cfg.boot_timeout = Some(Duration::from_secs(60));
    let err = Vm::boot(cfg).await.expect_err("boot must fail");
    assert_eq!(err.code().as_str(), "boot_failed", "{err}");
    let text = err.to_string();
    assert!(text.contains("console tail"), "{text}");
    assert!(
        text.contains("Linux version") || text.contains("kiln"),
        "console tail missing: {text}"
    );
    std::fs::remove_file(&blank).unwrap();
    env.assert_no_leaks().await;
}

/// Ingress forwards work on the restricted network, and the guest's way to the host
/// (QEMU's gateway address, the host's loopback behind it) is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_forward_reaches_guest_listener_and_the_guest_never_reaches_the_host() {
    use tokio::io::AsyncReadExt as _;
    let env = common::env("net").await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut cfg = env.config("net");
    cfg.network = Some(kiln_vm::NetConfig {
        forwards: vec![kiln_vm::PortForward {
            host_addr: "127.0.0.1".parse().unwrap(),
            host_port: port,
            guest_port: 8080,
        }],
        egress: None,
    });
    let vm = Vm::boot(cfg)
        .await
        .unwrap_or_else(|e| panic!("{}", kiln_vm::error_chain(&e)));
    // perl-base is in every Debian: a one-shot TCP server.
    let mut bg = req(
        "perl -MIO::Socket::INET -e '$s=IO::Socket::INET->new(LocalPort=>8080,Listen=>5,ReuseAddr=>1) or die $!; \
         while($c=$s->accept){print $c \"hello from guest\\n\"; close $c}'",
    );
    bg.background = Some(Default::default());
    vm.guard(vm.agent().spawn_background(bg)).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let got = loop {
        let attempt = async {
            let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
            let mut buf = Vec::new();
            s.read_to_end(&mut buf).await?;
            Ok::<_, std::io::Error>(buf)
        };
        match tokio::time::timeout(Duration::from_secs(3), attempt).await {
            Ok(Ok(buf)) if !buf.is_empty() => break buf,
            _ if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(300)).await,
            other => panic!("no answer through hostfwd: {other:?}"),
        }
    };
    assert_eq!(got, b"hello from guest\n");

    let trap = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    trap.set_nonblocking(true).unwrap();
    let trap_port = trap.local_addr().unwrap().port();
    for host in ["10.0.2.2", "10.0.2.100", "10.0.2.3"] {
        let out = vm
            .exec_collect(req(&format!(
                "perl -MIO::Socket::INET -e 'print IO::Socket::INET->new(PeerAddr=>\"{host}:{trap_port}\", \
                 Timeout=>5) ? \"open\" : \"blocked\"'"
            )))
            .await
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "blocked", "{host}");
    }
    assert!(
        trap.accept().is_err(),
        "the guest reached the host's loopback"
    );
    vm.kill().await;
    env.assert_no_leaks().await;
}
