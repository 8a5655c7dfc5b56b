//! Sandbox network isolation, with real VMs under TCG behind a real `kiln serve`: neither
//! a build VM nor a sandbox reaches the host. Every attempt goes against listeners this
//! test starts on the host's loopback, which must never see a connection: straight at
//! QEMU's gateway address (which user networking maps to the host's loopback unless
//! restricted), and through the egress proxy, whatever the sandbox's rules say. Packets
//! only ever go to loopback (this project's rule for tests); the proxy's rule engine is
//! covered address by address in `kiln-net`'s unit tests.

mod common;

use std::net::TcpListener;
use std::time::Duration;

use common::{api_key, assert_no_qemu, assets, build_template, http, poll, registry, Server};
use serde_json::json;

/// A host listener that records whether anything connected to it.
struct Trap {
    listener: TcpListener,
    port: u16,
}

impl Trap {
    fn new() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        Trap { listener, port }
    }

    fn assert_untouched(&self, when: &str) {
        if let Ok((_, peer)) = self.listener.accept() {
            panic!("{when}: a VM reached the host's loopback listener (from {peer})");
        }
    }
}

/// A shell line that prints `open` if a direct TCP connection to `host:port` succeeds and
/// `blocked` otherwise.
fn direct(host: &str, port: u16) -> String {
    format!("(timeout 10 bash -c 'exec 3<>/dev/tcp/{host}/{port}' 2>/dev/null && echo open) || echo blocked")
}

/// A shell line that asks the egress proxy for `CONNECT target` and prints its status line.
fn via_proxy(target: &str) -> String {
    format!(
        "bash -c \"exec 3<>/dev/tcp/10.0.2.100/3128 && printf 'CONNECT {target} \
         HTTP/1.1\\r\\n\\r\\n' >&3 && timeout 10 head -1 <&3\""
    )
}

#[test]
fn vms_never_reach_the_host_whatever_the_rules_say() {
    let registry = registry(&assets());
    let dir = common::state_dir("knet");
    let state = dir.path();
    let key = api_key(state, "net");
    let h = [("x-api-key", key.as_str())];
    let server = Server::start(state, &[("KILN_READY_TIMEOUT_SECS", "120")]);
    let url = server.url.clone();
    let trap = Trap::new();
    let port = trap.port;

    // The build VM: the step fails the build if the gateway reaches the host.
    let check = direct("10.0.2.2", port);
    let spec = json!({
        "name": "net", "memory_mib": 256, "disk_mib": 1024,
        "build_spec": {
            "from": format!("{registry}/kiln/minbase:latest"),
            "steps": [{"run": format!("r=$( {check} ); echo \"gateway: $r\"; [ \"$r\" = blocked ]")}],
            "start_cmd": "sleep 100000", "ready_cmd": "true",
        },
    });
    build_template(&url, &h, &spec, Duration::from_secs(600));
    trap.assert_untouched("during the build");

    // Rules are checked at create: a domain in deny_out is refused with its position.
    let (s, v) = http(
        "POST",
        &format!("{url}/sandboxes"),
        &h,
        Some(&json!({"name": "bad", "from_template": "net",
                     "network": {"allow_out": ["ok.example"], "deny_out": ["example.com"]}})),
    );
    assert_eq!(s, 400, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("network.deny_out[0]"),
        "{v}"
    );

    // A sandbox whose rules try to allow the host's loopback explicitly.
    let (s, v) = http(
        "POST",
        &format!("{url}/sandboxes"),
        &h,
        Some(&json!({"name": "s", "from_template": "net",
                     "network": {"allow_out": ["127.0.0.0/8", "localhost"], "deny_out": []}})),
    );
    assert_eq!(s, 201, "{v}");
    let id = v["id"].as_str().unwrap().to_owned();
    let exec = |cmd: &str| -> String {
        let v = common::exec(&url, &key, &id, &json!({"command": cmd, "timeout_s": 60}));
        format!(
            "{}{}",
            v["stdout"].as_str().unwrap(),
            v["stderr"].as_str().unwrap()
        )
    };

    // Processes find the proxy in their environment.
    assert!(
        exec("echo $https_proxy").contains("http://10.0.2.100:3128"),
        "no proxy in the sandbox's environment"
    );
    // ... and the guest's own names and addresses bypass it.
    let local = exec("echo \"$(hostname) $no_proxy\"");
    let (name, list) = local.trim().split_once(' ').unwrap();
    for own in ["localhost", "127.0.0.1", "10.0.2.15", name] {
        assert!(
            list.split(',').any(|e| e == own),
            "{own} not in no_proxy: {list}"
        );
    }
    assert_eq!(exec(&direct("10.0.2.2", port)).trim(), "blocked");
    for target in [
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        format!("10.0.2.2:{port}"),
        format!("[::ffff:127.0.0.1]:{port}"),
        "169.254.169.254:80".to_owned(),
    ] {
        let reply = exec(&via_proxy(&target));
        assert!(
            reply.starts_with("HTTP/1.1 403"),
            "CONNECT {target}: {reply}"
        );
    }
    trap.assert_untouched("from the sandbox");

    // Rules change on a running sandbox (PATCH), and the loopback stays closed.
    let (s, v) = http(
        "PATCH",
        &format!("{url}/sandboxes/{id}"),
        &h,
        Some(&json!({"network": {"allow_out": ["0.0.0.0/0"]}})),
    );
    assert_eq!(s, 204, "{v}");
    let reply = exec(&via_proxy(&format!("127.0.0.1:{port}")));
    assert!(reply.starts_with("HTTP/1.1 403"), "{reply}");
    let (s, v) = http(
        "PATCH",
        &format!("{url}/sandboxes/{id}"),
        &h,
        Some(&json!({"network": {"deny_out": ["not-a-cidr"]}})),
    );
    assert_eq!(s, 400, "{v}");
    // Every connection the proxy saw is in the sandbox's network log (the SDKs'
    // `get_network_log`), newest first, with why it was refused.
    let (s, log) = http(
        "GET",
        &format!("{url}/sandboxes/{id}/network?verdict=blocked"),
        &h,
        None,
    );
    assert_eq!(s, 200, "{log}");
    let events = log["data"].as_array().unwrap();
    assert!(events.len() >= 6, "{log}");
    assert_eq!(events[0]["host"], "127.0.0.1", "{log}");
    assert_eq!(events[0]["dst_port"], port, "{log}");
    assert!(
        events
            .iter()
            .all(|e| e["match_rule"].as_str().unwrap().contains("always blocked")),
        "{log}"
    );
    trap.assert_untouched("after the rule change");

    let (s, _) = http("DELETE", &format!("{url}/sandboxes/{id}"), &h, None);
    assert_eq!(s, 204);

    // The next sandbox is restored into the QEMU the server's restore pool started in
    // the meantime, whose egress command was fixed before this sandbox existed: it must
    // still read this sandbox's rules and write this sandbox's log.
    let metric = |name: &str, value: &str| {
        let line = format!("{name} {value}");
        move |b: &serde_json::Value| b.as_str().is_some_and(|t| t.lines().any(|l| l == line))
    };
    poll(
        &format!("{url}/metrics"),
        &[],
        Duration::from_secs(120),
        metric("kiln_restore_pool_waiting", "1"),
    );
    let (s, v) = http(
        "POST",
        &format!("{url}/sandboxes"),
        &h,
        Some(&json!({"name": "s2", "from_template": "net",
                     "network": {"deny_out": ["1.1.1.0/24"]}})),
    );
    assert_eq!(s, 201, "{v}");
    let id2 = v["id"].as_str().unwrap().to_owned();
    poll(
        &format!("{url}/metrics"),
        &[],
        Duration::from_secs(10),
        metric("kiln_restore_pool_claims_total", "1"),
    );
    let v = common::exec(
        &url,
        &key,
        &id2,
        &json!({"command": via_proxy("1.1.1.1:80"), "timeout_s": 60}),
    );
    assert!(
        v["stdout"].as_str().unwrap().starts_with("HTTP/1.1 403"),
        "{v}"
    );
    let (s, log) = http("GET", &format!("{url}/sandboxes/{id2}/network"), &h, None);
    assert_eq!(s, 200, "{log}");
    assert_eq!(log["data"][0]["host"], "1.1.1.1", "{log}");
    assert!(
        log["data"][0]["match_rule"]
            .as_str()
            .unwrap()
            .contains("deny_out"),
        "{log}"
    );
    let (s, _) = http("DELETE", &format!("{url}/sandboxes/{id2}"), &h, None);
    assert_eq!(s, 204);
    drop(server);
    assert_no_qemu(state, Duration::from_secs(30));
}
