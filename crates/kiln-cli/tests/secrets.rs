//! Team secrets end to end, with real VMs under TCG behind a real `kiln serve`: a sandbox
//! holds a stand-in, and kiln's egress proxy swaps the real value in on requests to the
//! secret's hosts, over HTTP and over HTTPS (TLS terminated with kiln's CA, which the
//! guest trusts, and re-originated to an upstream whose test CA the operator gave in
//! `KILN_EGRESS_TRUST_CA`). The upstreams are loopback listeners this test starts and opens
//! with `KILN_EGRESS_ALLOW_PRIVATE`; they answer with the sha256 of the `Authorization`
//! they got, so nothing hands the value back to the guest.
//!
//! Checked: the upstream gets the real value and the guest never holds it (its env, every
//! `/proc/*/environ`, and its memory as a pause writes it to disk); another host gets the
//! stand-in as it was; rotation, detach (refused at once), the network log's `request`
//! rows and the secret's audit. The template's build runs `pip install requests` from
//! PyPI through this machine's TLS-intercepting network, which works because
//! `KILN_GUEST_TRUST_CA` gives the guest the host's bundle.

mod common;

use std::time::{Duration, Instant};

use common::{api_key, assert_no_qemu, assets, build_template, http, registry, Server};
use kiln_net::ca::EgressCa;
use kiln_net::testing::{answer, Upstream};
use serde_json::{json, Value};

const VALUE: &str = "sk-live-E2E-SECRET-VALUE-5d1c0f2a9b7e";
const ROTATED: &str = "sk-live-E2E-ROTATED-VALUE-0a8b6c4d2e1f";

/// The template's build step: pip bootstrapped from PyPI (the image has python3 but no
/// pip), then `pip install requests`, all through the egress proxy and this machine's
/// TLS interception.
const PIP_STEP: &str = r#"python3 - <<'PY'
import json, urllib.parse, urllib.request
base = "https://pypi.org/pypi/pip/json"
urls = json.load(urllib.request.urlopen(base))["urls"]
wheel = [u["url"] for u in urls if u["packagetype"] == "bdist_wheel"][0]
urllib.request.urlretrieve(urllib.parse.urljoin(base, wheel), "/tmp/pip-0-py3-none-any.whl")
PY
python3 /tmp/pip-0-py3-none-any.whl/pip install --break-system-packages --no-cache-dir --quiet requests
python3 -c 'import requests; print("requests", requests.__version__)'"#;

/// `Bearer <value>` as the upstream answers it.
fn bearer(value: &str) -> Option<String> {
    Some(format!("Bearer {value}"))
}

struct Sbx<'a> {
    url: &'a str,
    key: &'a str,
    id: String,
}

impl Sbx<'_> {
    /// A command's stdout and stderr; the guest's own addresses are not exempt from the
    /// proxy for it (the upstreams are on the host's loopback, which the guest reaches
    /// only through the proxy).
    fn run(&self, cmd: &str) -> String {
        let v = common::exec(
            self.url,
            self.key,
            &self.id,
            &json!({"command": cmd, "timeout_s": 120, "env": {"no_proxy": "", "NO_PROXY": ""}}),
        );
        format!(
            "{}{}",
            v["stdout"].as_str().unwrap(),
            v["stderr"].as_str().unwrap()
        )
    }

    fn curl(&self, url: &str) -> String {
        self.run(&format!(
            "curl -sS -H \"Authorization: Bearer $API_TOKEN\" {url}"
        ))
    }
}

/// Every file under `dir` holding `needle` (grep: the memory and disk files are large).
fn files_with(dir: &std::path::Path, needle: &str) -> Vec<String> {
    let out = std::process::Command::new("grep")
        .args(["-r", "-l", "-a", "-F", "--", needle])
        .arg(dir)
        .output()
        .expect("grep");
    // 0: found, 1: not found; anything else is grep failing.
    assert!(out.status.code().is_some_and(|c| c <= 1), "grep: {out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn secrets_are_swapped_at_egress_and_never_enter_the_guest() {
    let started = Instant::now();
    let registry = registry(&assets());
    let dir = common::state_dir("ksec");
    let state = dir.path();
    let key = api_key(state, "sec");
    let h = [("x-api-key", key.as_str())];

    // Upstreams on the host's loopback: HTTPS and HTTP hosts of the secret, and another.
    let test_ca_dir = tempfile::tempdir().unwrap();
    let test_ca = EgressCa::load_or_create(test_ca_dir.path()).unwrap();
    let tls = Upstream::start(Some(&test_ca));
    let plain = Upstream::start(None);
    let other = Upstream::start(None);
    let allow = [tls.port, plain.port, other.port]
        .map(|p| format!("127.0.0.1:{p}"))
        .join(",");
    let trust = test_ca.cert_path();
    let server = Server::start(
        state,
        &[
            ("KILN_READY_TIMEOUT_SECS", "120"),
            ("KILN_EGRESS_ALLOW_PRIVATE", &allow),
            ("KILN_EGRESS_TRUST_CA", trust.to_str().unwrap()),
            ("KILN_GUEST_TRUST_CA", "/etc/ssl/certs/ca-certificates.crt"),
        ],
    );
    let url = server.url.clone();

    // The build reaches PyPI through the interception: pip install works.
    let spec = json!({
        "name": "sec", "memory_mib": 512, "disk_mib": 1536,
        "build_spec": {
            "from": format!("{registry}/kiln/python:latest"),
            "steps": [{"run": PIP_STEP}],
            "start_cmd": "sleep 100000", "ready_cmd": "true",
        },
    });
    build_template(&url, &h, &spec, Duration::from_secs(900));
    eprintln!(
        "template built after {:.0}s",
        started.elapsed().as_secs_f64()
    );

    let (s, secret) = http(
        "POST",
        &format!("{url}/secrets"),
        &h,
        Some(
            &json!({"name": "upstream", "value": VALUE, "auth": {"type": "bearer"},
                     "hosts": [format!("127.0.0.1:{}", tls.port), format!("127.0.0.1:{}", plain.port)]}),
        ),
    );
    assert_eq!(s, 201, "{secret}");
    let secret_id = secret["id"].as_str().unwrap().to_owned();
    let (s, v) = http(
        "POST",
        &format!("{url}/sandboxes"),
        &h,
        Some(&json!({"name": "agent", "from_template": "sec",
                     "secrets": {"API_TOKEN": "upstream"}})),
    );
    assert_eq!(s, 201, "{v}");
    let sbx = Sbx {
        url: &url,
        key: &key,
        id: v["id"].as_str().unwrap().to_owned(),
    };

    // The guest holds a stand-in, in every process's environment, and never the value.
    let stand_in = sbx.run("printenv API_TOKEN").trim().to_owned();
    assert!(
        stand_in.starts_with("kiln_sk_") && stand_in.len() == 56,
        "{stand_in:?}"
    );
    let environs =
        sbx.run("for f in /proc/[0-9]*/environ; do tr '\\0' '\\n' < \"$f\" 2>/dev/null; done");
    assert!(
        environs.contains(&stand_in),
        "the environ dump is empty: {environs}"
    );
    assert!(
        !environs.contains(VALUE),
        "the value is in a guest process's environment"
    );

    // HTTPS (curl, and the requests pip installed) and HTTP: the upstream gets the value.
    let tls_url = format!("https://127.0.0.1:{}", tls.port);
    assert_eq!(
        sbx.curl(&format!("{tls_url}/curl")),
        answer("/curl", bearer(VALUE).as_deref())
    );
    let py = sbx.run(&format!(
        "python3 -c \"import os, requests; print(requests.get('{tls_url}/py', \
         headers={{'Authorization': 'Bearer ' + os.environ['API_TOKEN']}}).text, end='')\""
    ));
    assert_eq!(py, answer("/py", bearer(VALUE).as_deref()));
    let plain_url = format!("http://127.0.0.1:{}", plain.port);
    assert_eq!(
        sbx.curl(&format!("{plain_url}/plain")),
        answer("/plain", bearer(VALUE).as_deref())
    );
    // Another host gets the stand-in as it was, never the value.
    let other_url = format!("http://127.0.0.1:{}", other.port);
    assert_eq!(
        sbx.curl(&format!("{other_url}/x")),
        answer("/x", bearer(&stand_in).as_deref())
    );
    assert!(other.seen().iter().all(|h| !h.contains(VALUE)));

    // Each swapped request is a `request` row of the network log and an audit event.
    let (s, log) = http(
        "GET",
        &format!("{url}/sandboxes/{}/network", sbx.id),
        &h,
        None,
    );
    assert_eq!(s, 200, "{log}");
    let requests: Vec<&Value> = log["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "request")
        .collect();
    let paths: Vec<&str> = requests
        .iter()
        .map(|e| e["path"].as_str().unwrap())
        .collect();
    assert_eq!(paths, ["/plain", "/py", "/curl"], "{log}");
    assert!(
        requests.iter().all(|e| e["secret_id"] == secret_id.as_str()
            && e["status"] == 200
            && e["method"] == "GET"),
        "{log}"
    );
    let (_, audit) = http("GET", &format!("{url}/secrets/upstream/audit"), &h, None);
    let audit = audit.as_array().unwrap().clone();
    assert_eq!(audit.len(), 3, "{audit:?}");
    assert!(audit
        .iter()
        .all(|e| e["sandbox_name"] == "agent" && e["upstream_status"] == 200));

    // Rotation: the same stand-in now carries the new value.
    let (s, v) = http(
        "PATCH",
        &format!("{url}/secrets/upstream"),
        &h,
        Some(&json!({"value": ROTATED})),
    );
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        sbx.curl(&format!("{tls_url}/rotated")),
        answer("/rotated", bearer(ROTATED).as_deref())
    );

    // The guest's memory, as a pause writes it to disk: the stand-in is there, the
    // values are not (nor anywhere else in the state directory).
    let (s, v) = http(
        "POST",
        &format!("{url}/sandboxes/{}/pause", sbx.id),
        &h,
        None,
    );
    assert_eq!(s, 204, "{v}");
    assert!(
        !files_with(state, &stand_in).is_empty(),
        "the stand-in is nowhere in the paused sandbox's files: the memory check sees nothing"
    );
    for value in [VALUE, ROTATED] {
        let hits = files_with(state, value);
        assert!(hits.is_empty(), "a value in clear in {hits:?}");
    }
    let (s, v) = http(
        "POST",
        &format!("{url}/sandboxes/{}/resume", sbx.id),
        &h,
        None,
    );
    assert_eq!(s, 200, "{v}");

    // Detach: refused at once by the proxy, over HTTPS and HTTP; gone for new processes.
    let seen = (tls.seen().len(), plain.seen().len());
    let (s, v) = http(
        "DELETE",
        &format!("{url}/sandboxes/{}/secrets/API_TOKEN", sbx.id),
        &h,
        None,
    );
    assert_eq!(s, 204, "{v}");
    for target in [format!("{tls_url}/after"), format!("{plain_url}/after")] {
        let code = sbx.run(&format!(
            "curl -s -o /dev/null -w '%{{http_code}}' -H 'Authorization: Bearer {stand_in}' {target}"
        ));
        assert_eq!(code, "403", "{target}");
    }
    assert_eq!(
        (tls.seen().len(), plain.seen().len()),
        seen,
        "a revoked request went out"
    );
    assert_eq!(sbx.run("printenv API_TOKEN || echo unset").trim(), "unset");
    let (_, audit) = http(
        "GET",
        &format!("{url}/secrets/upstream/audit?status=error"),
        &h,
        None,
    );
    let codes: Vec<&str> = audit
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["error_code"].as_str().unwrap())
        .collect();
    assert_eq!(codes, ["secret_revoked", "secret_revoked"], "{audit}");

    let (s, _) = http("DELETE", &format!("{url}/sandboxes/{}", sbx.id), &h, None);
    assert_eq!(s, 204);
    drop(server);
    assert_no_qemu(state, Duration::from_secs(30));
    eprintln!("done in {:.0}s", started.elapsed().as_secs_f64());
}
