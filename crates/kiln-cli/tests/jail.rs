//! The jailer, checked from outside with real VMs under TCG behind a real `kiln serve`
//! (CI runs it as root, so the whole jail applies): every QEMU of the server and every
//! egress proxy runs under a non-zero uid with no new privileges, every QEMU under its
//! seccomp policy (`Seccomp: 2`), and a sandbox still runs commands, pauses and resumes,
//! and reaches the network through its proxy. Then a guest floods its proxy with 1500
//! connections: the server's process tree does not grow, `/health` answers and a
//! neighbour sandbox still runs commands. One template for the whole file.

mod common;

use std::io::{Read as _, Write as _};
use std::net::TcpListener;
use std::time::{Duration, Instant};

use common::{api_key, assert_no_qemu, assets, build_template, http, registry, Server};
use serde_json::json;

/// `/proc/PID/status` as `(key, value)` lines.
fn status(pid: u32) -> Vec<(String, String)> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_owned(), v.trim().to_owned()))
        .collect()
}

fn field(status: &[(String, String)], key: &str) -> String {
    status
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.clone())
        .unwrap_or_default()
}

/// Every process below `root` (children, grandchildren...): pid and command line.
fn descendants(root: u32) -> Vec<(u32, String)> {
    let procs: Vec<(u32, u32, String)> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let pid = e.file_name().to_str()?.parse::<u32>().ok()?;
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            // pid (comm) state ppid ...: the name may hold spaces, the last ')' ends it.
            let ppid = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
            Some((pid, ppid, String::from_utf8_lossy(&cmd).replace('\0', " ")))
        })
        .collect();
    let mut out: Vec<(u32, String)> = Vec::new();
    let mut parents = vec![root];
    while let Some(p) = parents.pop() {
        for (pid, ppid, cmd) in &procs {
            if *ppid == p {
                out.push((*pid, cmd.clone()));
                parents.push(*pid);
            }
        }
    }
    out
}

/// Every QEMU and egress proxy the server runs is jailed: a uid of its own (not root), no
/// new privileges, and for QEMU its seccomp filter. Returns how many of each it saw.
fn assert_jailed(server: u32) -> (usize, usize) {
    let (mut qemus, mut proxies) = (0, 0);
    for (pid, cmd) in descendants(server) {
        let is_qemu = cmd.starts_with("qemu-system");
        let is_proxy = cmd.contains("egress-proxy");
        if !is_qemu && !is_proxy {
            continue;
        }
        let st = status(pid);
        let uids = field(&st, "Uid");
        assert!(
            !uids.is_empty() && uids.split_whitespace().all(|u| u != "0"),
            "{cmd}: runs as uid {uids}"
        );
        assert_eq!(field(&st, "NoNewPrivs"), "1", "{cmd}");
        if is_qemu {
            assert_eq!(field(&st, "Seccomp"), "2", "{cmd}: no seccomp filter");
            qemus += 1;
        } else {
            proxies += 1;
        }
    }
    (qemus, proxies)
}

/// `cmd` run by bash (the agent runs commands with `/bin/sh`, which has no `/dev/tcp`).
fn bash(cmd: &str) -> String {
    format!("bash -c '{}'", cmd.replace('\'', "'\\''"))
}

/// An upstream on the host's loopback that greets whoever connects (the operator opens it
/// to sandboxes with `KILN_EGRESS_ALLOW_PRIVATE`).
fn greeter() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut s in listener.incoming().flatten() {
            let _ = s.write_all(b"hello from the host\n");
            let mut sink = [0u8; 64];
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            let _ = s.read(&mut sink);
        }
    });
    port
}

#[test]
fn vm_processes_are_jailed_and_a_proxy_flood_stays_inside_its_sandbox() {
    assert!(
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() } == 0,
        "this test checks the whole jail, which needs root: run it as root (CI does)"
    );
    let registry = registry(&assets());
    let dir = common::state_dir("kjail");
    let state = dir.path();
    let key = api_key(state, "jail");
    let h = [("x-api-key", key.as_str())];
    let port = greeter();
    let open = format!("127.0.0.1:{port}");
    let mut server = Server::start(
        state,
        &[
            ("KILN_READY_TIMEOUT_SECS", "120"),
            ("KILN_RESTORE_POOL", "0"),
            ("KILN_EGRESS_ALLOW_PRIVATE", open.as_str()),
        ],
    );
    let url = server.url.clone();
    let spec = json!({
        "name": "jail", "memory_mib": 256, "disk_mib": 1024,
        "build_spec": {
            "from": format!("{registry}/kiln/minbase:latest"),
            "steps": [{"run": "true"}],
            "start_cmd": "sleep 100000", "ready_cmd": "true",
        },
    });
    build_template(&url, &h, &spec, Duration::from_secs(600));
    let create = |name: &str| -> String {
        let (s, v) = http(
            "POST",
            &format!("{url}/sandboxes"),
            &h,
            Some(&json!({"name": name, "from_template": "jail"})),
        );
        assert_eq!(s, 201, "{v}");
        v["id"].as_str().unwrap().to_owned()
    };
    let exec = |id: &str, cmd: &str, secs: u64| -> String {
        let v = common::exec(
            &url,
            &key,
            id,
            &json!({"command": bash(cmd), "timeout_s": secs}),
        );
        format!(
            "{}{}",
            v["stdout"].as_str().unwrap(),
            v["stderr"].as_str().unwrap()
        )
    };
    let a = create("a");
    let b = create("b");
    assert_eq!(
        assert_jailed(server.pid()),
        (2, 2),
        "two sandboxes, a QEMU and a proxy each"
    );
    assert_eq!(exec(&a, "echo ok", 60).trim(), "ok");

    // The network, through the proxy only: the operator's upstream greets the guest.
    let through = format!(
        "exec 3<>/dev/tcp/10.0.2.100/3128 && printf 'CONNECT {open} HTTP/1.1\\r\\n\\r\\n' >&3 \
         && timeout 10 head -3 <&3"
    );
    let reply = exec(&a, &through, 60);
    assert!(
        reply.starts_with("HTTP/1.1 200") && reply.contains("hello from the host"),
        "{reply}"
    );

    // Pause and resume: the restored QEMU is jailed as the first was.
    for step in ["pause", "resume"] {
        let (s, v) = http("POST", &format!("{url}/sandboxes/{a}/{step}"), &h, None);
        assert!(s == 200 || s == 204, "{step}: {s} {v}");
    }
    assert_eq!(exec(&a, "echo back", 60).trim(), "back");
    assert_eq!(assert_jailed(server.pid()), (2, 2));

    // The flood: 1500 connections to the proxy, held. The proxy serves its cap and turns
    // the rest away; the server's process tree stays as it was.
    let before = descendants(server.pid()).len();
    let flood = {
        let (url, key, a) = (url.clone(), key.clone(), a.clone());
        std::thread::spawn(move || {
            let cmd = "ulimit -n 4096; n=0; for i in $(seq 1500); do \
                       exec {fd}<>/dev/tcp/10.0.2.100/3128 2>/dev/null && n=$((n+1)); done; \
                       echo \"opened $n\"; sleep 15";
            common::exec(
                &url,
                &key,
                &a,
                &json!({"command": bash(cmd), "timeout_s": 300}),
            )
        })
    };
    let mut most = before;
    let deadline = Instant::now() + Duration::from_secs(300);
    while !flood.is_finished() {
        assert!(Instant::now() < deadline, "the flood did not end");
        most = most.max(descendants(server.pid()).len());
        let (s, v) = http("GET", &format!("{url}/health"), &[], None);
        assert_eq!(s, 200, "/health during the flood: {v}");
        assert_eq!(
            exec(&b, "echo neighbour", 60).trim(),
            "neighbour",
            "the neighbour stopped answering during the flood"
        );
        assert!(
            server.exited().is_none(),
            "kiln serve died during the flood"
        );
    }
    let out = flood.join().unwrap();
    assert!(
        out["stdout"].as_str().unwrap().starts_with("opened "),
        "{out}"
    );
    assert!(
        most <= before + 2,
        "the server's processes went from {before} to {most} during the flood"
    );
    // The proxy is still there for the flooder once its connections are gone.
    let reply = exec(&a, &through, 60);
    assert!(
        reply.contains("hello from the host"),
        "after the flood: {reply}"
    );
    assert_eq!(assert_jailed(server.pid()), (2, 2));

    for id in [&a, &b] {
        let (s, _) = http("DELETE", &format!("{url}/sandboxes/{id}"), &h, None);
        assert_eq!(s, 204);
    }
    drop(server);
    assert_no_qemu(state, Duration::from_secs(30));
}
