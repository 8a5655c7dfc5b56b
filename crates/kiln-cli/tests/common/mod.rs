//! What the tests that run a real `kiln serve` share: the test assets, a fresh state dir, the
//! server process and its clean-up, a small JSON-over-HTTP client (curl) with the API calls
//! several tests make, an official SDK's scenario run, and the check that no VM outlived a
//! test.
//!
//! Needs what `scripts/test.sh` sets up: the guest kernel (`kiln setup` into
//! `$KILN_TEST_ASSETS/state`) and the test registry (`scripts/test-registry.sh start`). A
//! missing prerequisite fails the test with the remedy; it never skips.

#![allow(dead_code)] // each test binary uses a different part

use std::io::{BufRead as _, BufReader, Read};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

pub const REMEDY: &str = "run scripts/test.sh (it provisions the test assets)";

/// Server settings a developer's shell may carry that would change what a test expects:
/// the server runs on its defaults plus what the test sets.
pub const SERVER_ENV_CLEARED: &[&str] = &[
    "KILN_CONFIG",
    "KILN_LISTEN",
    "KILN_MAX_TEMPLATES",
    "KILN_MAX_CONCURRENT_BUILDS",
    "KILN_MAX_SANDBOXES",
    "KILN_MAX_SNAPSHOTS",
    "KILN_MAX_PARALLEL_BUILDS",
    "KILN_SYSTEM_TEMPLATES",
    "KILN_BASE_IMAGE",
    "KILN_PYTHON_IMAGE",
    "KILN_RATE_LIMIT_PER_SEC",
    "KILN_RATE_LIMIT_BURST",
    "KILN_PRIVATE_REGISTRIES",
];

/// `kiln ARGS` on the state dir `state`, with [`SERVER_ENV_CLEARED`] cleared.
pub fn kiln(state: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kiln"));
    cmd.args(args).env("KILN_HOME", state);
    for var in SERVER_ENV_CLEARED {
        cmd.env_remove(var);
    }
    cmd
}

pub fn assets() -> PathBuf {
    std::env::var_os("KILN_TEST_ASSETS")
        .filter(|v| !v.is_empty())
        .map_or_else(|| PathBuf::from("/var/tmp/kiln-test-assets"), PathBuf::from)
}

/// `KILN_TEST_REGISTRY` from `registry.env`, checked to answer.
pub fn registry(assets: &Path) -> String {
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

/// The test registries' `host:port`s, comma-separated, from `registry.env` (empty when
/// there is none: a test that needs them fails in [`registry`] with the remedy).
pub fn test_registries(assets: &Path) -> String {
    let text = std::fs::read_to_string(assets.join("registry.env")).unwrap_or_default();
    let regs: Vec<&str> = text
        .lines()
        .filter_map(|l| {
            l.strip_prefix("KILN_TEST_REGISTRY=")
                .or_else(|| l.strip_prefix("KILN_TEST_AUTH_REGISTRY="))
        })
        .map(|v| v.trim_matches('"'))
        .collect();
    regs.join(",")
}

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A fresh state dir with the provisioned kernel linked in; short, because VM sockets live
/// under it. Removed when dropped.
pub fn state_dir(prefix: &str) -> tempfile::TempDir {
    let kernel = assets().join("state/kernel");
    assert!(kernel.is_dir(), "{} missing -> {REMEDY}", kernel.display());
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in("/tmp")
        .unwrap();
    std::os::unix::fs::symlink(&kernel, dir.path().join("kernel")).unwrap();
    dir
}

/// A new API key of `team` (created if needed).
pub fn api_key(state: &Path, team: &str) -> String {
    let out = kiln(state, &["admin", "create-api-key", "--team", team])
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
    key
}

/// What `kiln serve` prints on stderr once it listens.
const LISTENING: &str = "kiln API listening on ";

/// Copies a child's output to ours line by line, tagged; `addr` gets the address of the
/// first `kiln API listening on ADDR` line.
pub fn forward(
    from: impl Read + Send + 'static,
    tag: &'static str,
    addr: Option<mpsc::Sender<String>>,
) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let mut addr = addr;
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

pub fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) on a pid of our own child; no memory is involved.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

/// Waits for a child up to `within`; true when it exited.
pub fn wait_for(child: &mut Child, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => return true,
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(100)),
            _ => return false,
        }
    }
}

/// `kiln serve` on a state dir, stopped when dropped: SIGTERM first (its graceful
/// shutdown), then SIGKILL.
#[derive(Debug)]
pub struct Server {
    child: Child,
    logs: Option<thread::JoinHandle<()>>,
    /// `http://ADDR`.
    pub url: String,
}

impl Server {
    /// Starts `kiln serve` on a port of its choosing, with `env` set, and waits until it
    /// listens. It builds no system template unless `env` sets `KILN_SYSTEM_TEMPLATES`
    /// (a build is a minute of TCG that most tests do not need).
    pub fn start(state: &Path, env: &[(&str, &str)]) -> Server {
        let mut cmd = kiln(state, &["serve", "--listen", "127.0.0.1:0"]);
        cmd.env(
            "KILN_LOG",
            std::env::var("KILN_LOG").unwrap_or_else(|_| "info".into()),
        )
        .env("KILN_SYSTEM_TEMPLATES", "none")
        // The test registries are on loopback, which a server refuses unless told.
        .env("KILN_PRIVATE_REGISTRIES", test_registries(&assets()));
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, rx) = mpsc::channel();
        let logs = forward(child.stderr.take().unwrap(), "kiln serve", Some(tx));
        let url = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("kiln serve did not report its address within 60s");
        Server {
            child,
            logs: Some(logs),
            url,
        }
    }

    /// The server's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// How the server ended, if it has.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// `kill -9`: no clean-up of any kind runs.
    pub fn kill_9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            signal(self.child.id(), libc::SIGTERM);
            if !wait_for(&mut self.child, Duration::from_secs(30)) {
                eprintln!("kiln serve did not stop on SIGTERM within 30s: killing it");
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
        // Not joined: a VM that outlived the server may still hold its stderr open.
        drop(self.logs.take());
    }
}

/// Pids and command lines of `qemu-system*` processes whose command line mentions
/// `needle`.
pub fn qemu_with(needle: &str) -> Vec<(u32, String)> {
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

/// Waits up to `within` for every QEMU of `state` to be gone, kills the survivors and
/// returns them (empty when none outlived their owner).
pub fn reap_qemu(state: &Path, within: Duration) -> Vec<(u32, String)> {
    let needle = state.to_str().unwrap();
    let deadline = Instant::now() + within;
    loop {
        let left = qemu_with(needle);
        if left.is_empty() || Instant::now() > deadline {
            for (pid, _) in &left {
                signal(*pid, libc::SIGKILL);
            }
            return left;
        }
        thread::sleep(Duration::from_millis(200));
    }
}

/// [`reap_qemu`], failing the test if any QEMU outlived its owner.
pub fn assert_no_qemu(state: &Path, within: Duration) {
    let left = reap_qemu(state, within);
    assert!(
        left.is_empty(),
        "QEMU processes outlived their owner: {left:#?}"
    );
}

/// One JSON request with curl: (status, body as JSON, or as a string when it is not JSON).
pub fn http(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<&serde_json::Value>,
) -> (u16, serde_json::Value) {
    let mut cmd = Command::new("curl");
    cmd.args([
        "-sS",
        "--max-time",
        "300",
        "-X",
        method,
        "-w",
        "\n%{http_code}",
    ]);
    for (k, v) in headers {
        cmd.arg("-H").arg(format!("{k}: {v}"));
    }
    if let Some(b) = body {
        cmd.args(["-H", "content-type: application/json", "--data-binary"])
            .arg(b.to_string());
    }
    let out = cmd
        .arg(url)
        .output()
        .expect("curl (a Debian package scripts/test.sh installs)");
    assert!(
        out.status.success(),
        "curl {method} {url}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let (body, status) = text.rsplit_once('\n').unwrap();
    let value =
        serde_json::from_str(body).unwrap_or_else(|_| serde_json::Value::String(body.to_owned()));
    (status.trim().parse().unwrap(), value)
}

/// Polls `GET url` until `done(body)` holds, up to `within`; returns the last body.
pub fn poll(
    url: &str,
    headers: &[(&str, &str)],
    within: Duration,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + within;
    loop {
        let (status, body) = http("GET", url, headers, None);
        assert_eq!(status, 200, "GET {url}: {body}");
        if done(&body) {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "GET {url}: still {body} after {within:?}"
        );
        thread::sleep(Duration::from_millis(500));
    }
}

/// Builds a template through the API: `POST /templates` with `spec`, then its build polled
/// (up to `within`) until it has settled, which must be `ready`.
pub fn build_template(
    url: &str,
    headers: &[(&str, &str)],
    spec: &serde_json::Value,
    within: Duration,
) {
    let (s, t) = http("POST", &format!("{url}/templates"), headers, Some(spec));
    assert_eq!(s, 202, "{t}");
    let build = poll(
        &format!(
            "{url}/templates/{}/builds/{}",
            t["id"].as_str().unwrap(),
            t["build_id"].as_str().unwrap()
        ),
        headers,
        within,
        |b| {
            !matches!(
                b["status"].as_str(),
                Some("pending" | "building" | "snapshotting")
            )
        },
    );
    assert_eq!(build["status"], "ready", "{build}");
}

/// `POST /exec` of `request` in sandbox `id`; asserts it is answered 200 and returns the
/// answer.
pub fn exec(url: &str, key: &str, id: &str, request: &serde_json::Value) -> serde_json::Value {
    let (s, v) = http(
        "POST",
        &format!("{url}/exec"),
        &[("x-api-key", key), ("x-superserve-sandbox-id", id)],
        Some(request),
    );
    assert_eq!(s, 200, "{}: {v}", request["command"]);
    v
}

/// An official SDK's whole scenario: two TCG builds (~60-90 s each, overlapping) and a
/// sandbox's life.
const SDK_SCENARIO_TIMEOUT: Duration = Duration::from_secs(15 * 60);
/// The team's template limit on the server: an SDK scenario owns two templates when it asks
/// for a third and expects `too_many_templates`.
const SDK_MAX_TEMPLATES: &str = "2";
/// The team's sandbox limit: an SDK scenario runs two sandboxes (two forks, in Python) and
/// expects a third to be refused with `too_many_sandboxes`.
const SDK_MAX_SANDBOXES: &str = "2";
/// The team's snapshot limit: the Python scenario keeps one snapshot when it asks for a
/// second and expects `too_many_snapshots`.
const SDK_MAX_SNAPSHOTS: &str = "1";

/// Runs an official SDK's scenario against `kiln serve` on a fresh state dir (`prefix`)
/// and asserts that it passed, that the server lived through it, and that no VM outlived
/// the server. `scenario` is the command but for what every scenario reads from its
/// environment (API key, server URL, test image, the team's limits, and
/// `KILN_SDK_UPSTREAM`: an HTTP upstream sandboxes may reach, which answers with the
/// sha256 of the `Authorization` it got, see `kiln_net::testing`); `provisioned_by` is the
/// script that installs its SDK.
pub fn run_sdk_scenario(prefix: &str, mut scenario: Command, provisioned_by: &str) {
    let registry = registry(&assets());
    let dir = state_dir(prefix);
    let state = dir.path();
    let key = api_key(state, "sdk");
    // The system template `superserve/base`, for the create without a template, from the
    // test registry's minbase (it builds while the scenario's own templates do).
    let base_image = format!("{registry}/kiln/minbase:latest");
    // An upstream on the host's loopback, opened to sandboxes by the operator's list, for
    // the scenarios' team secrets.
    let upstream = kiln_net::testing::Upstream::start(None);
    let upstream_addr = format!("127.0.0.1:{}", upstream.port);
    let mut server = Server::start(
        state,
        &[
            ("KILN_READY_TIMEOUT_SECS", "300"),
            ("KILN_MAX_TEMPLATES", SDK_MAX_TEMPLATES),
            ("KILN_MAX_SANDBOXES", SDK_MAX_SANDBOXES),
            ("KILN_MAX_SNAPSHOTS", SDK_MAX_SNAPSHOTS),
            ("KILN_SYSTEM_TEMPLATES", "base"),
            ("KILN_BASE_IMAGE", &base_image),
            ("KILN_EGRESS_ALLOW_PRIVATE", &upstream_addr),
        ],
    );
    let base_url = server.url.clone();
    eprintln!("kiln serve at {base_url}, state {}", state.display());

    let started = Instant::now();
    let mut child = scenario
        .env("SUPERSERVE_API_KEY", &key)
        .env("SUPERSERVE_BASE_URL", &base_url)
        .env(
            "KILN_TEST_IMAGE_PYTHON",
            format!("{registry}/kiln/python:latest"),
        )
        .env("KILN_MAX_TEMPLATES", SDK_MAX_TEMPLATES)
        .env("KILN_MAX_SANDBOXES", SDK_MAX_SANDBOXES)
        .env("KILN_MAX_SNAPSHOTS", SDK_MAX_SNAPSHOTS)
        .env("KILN_SDK_UPSTREAM", format!("http://{upstream_addr}"))
        // Loopback only: no proxy may stand between the SDK and the server.
        .env_remove("HTTP_PROXY")
        .env_remove("HTTPS_PROXY")
        .env_remove("http_proxy")
        .env_remove("https_proxy")
        .env("NO_PROXY", "*")
        .env("no_proxy", "*")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "{}: {e}\n-> {REMEDY} (or {provisioned_by})",
                scenario.get_program().to_string_lossy()
            )
        });
    let out_fwd = forward(child.stdout.take().unwrap(), "sdk", None);
    let err_fwd = forward(child.stderr.take().unwrap(), "sdk stderr", None);
    let finished = wait_for(&mut child, SDK_SCENARIO_TIMEOUT);
    if !finished {
        let _ = child.kill();
    }
    let status = child.wait().unwrap();
    let _ = out_fwd.join();
    let _ = err_fwd.join();
    eprintln!(
        "scenario ended after {:.0}s: {status}",
        started.elapsed().as_secs_f64()
    );

    // -- the server goes, and takes every VM of this state dir with it
    let crashed = server.exited();
    let addr = base_url.trim_start_matches("http://");
    let answering =
        TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(3)).is_ok();
    drop(server);
    let left = reap_qemu(state, Duration::from_secs(15));

    assert!(
        crashed.is_none(),
        "kiln serve exited during the scenario ({crashed:?}): see its log above"
    );
    assert!(
        answering,
        "kiln serve stopped answering during the scenario: see its log above"
    );
    assert!(
        finished,
        "the SDK scenario did not finish within {SDK_SCENARIO_TIMEOUT:?}"
    );
    assert!(
        status.success(),
        "the SDK scenario failed ({status}): see its FAIL line above"
    );
    assert!(
        left.is_empty(),
        "qemu processes of the test's state dir outlived kiln serve: {left:#?}"
    );
}
