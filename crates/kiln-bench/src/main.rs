//! `kiln-bench`: issue 8's benchmark harness. One invocation measures, side by side on the
//! same template and host, and writes `bench.json` plus `bench.md`:
//!
//! - sandbox create -> first exec completed (p50/p99, sequential and N at a time), through
//!   the HTTP API with kiln-sdk (a `kiln serve` child process, as users see it) and through
//!   the engine in this process ([`kiln_engine::Engine::create_live_sandbox`]);
//! - the floor: the same snapshot restored by bare QEMU (`-incoming`), interleaved with
//!   the kiln samples so that both see the same host load;
//! - the ceiling: the cold path (boot from the template's disk, startCmd, readyCmd);
//! - exec round trip (`true`) through the HTTP API and directly through the agent;
//! - template build overhead (total minus the user's steps), cold and with a warm image
//!   cache, from the build logs;
//! - pull + unpack against `skopeo copy` + `umoci unpack` of the same image;
//! - host memory (PSS) per idle sandbox of the template (python3 -m http.server).
//!
//! Run it through `scripts/bench.sh`, which builds it and sets up what it needs.

mod bare;
mod buildlog;
mod capture;
mod mem;
mod procs;
mod report;
mod stats;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};
use clap::Parser;
use kiln_engine::{Engine, EngineConfig, Owner, ENDPOINT_FILE};
use kiln_sdk::{
    Client, RunOptions, Sandbox, SandboxCreateOptions, Step, Template, TemplateCreateOptions,
};
use kiln_store::NewSandbox;
use kiln_vm::{ExecRequest, Manifest, NetConfig, RootDisk, Vm, VmConfig};
use serde::Serialize;
use serde_json::json;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::Layer as _;

use crate::report::{Row, Target, Unit};
use crate::stats::{ratio, Stats};

/// The template every figure is measured on: the test image `kiln/python` serving a page
/// with `python3 -m http.server`, default shape (1 vCPU, 1024 MiB, 4096 MiB disk).
const START_CMD: &str = "python3 -m http.server 8000 --bind 127.0.0.1 --directory /srv";
const READY_CMD: &str = "curl -fsS -o /dev/null http://127.0.0.1:8000/";
const PAGE: &str = "hello from kiln-bench";

/// Issue 8's benchmark harness (see scripts/bench.sh and docs/performance.md).
#[derive(Debug, Parser)]
#[command(name = "kiln-bench")]
struct Args {
    /// Small sample counts, for trying the harness out (not for docs/performance.md).
    #[arg(long)]
    quick: bool,
    /// Sequential creates (each: create -> first exec -> kill) [default: 30; quick: 6].
    #[arg(long)]
    sequential: Option<usize>,
    /// Creates at `--parallel` at a time, in waves [default: 32; quick: 8].
    #[arg(long)]
    concurrent: Option<usize>,
    /// Creates in flight at once in the concurrent waves.
    #[arg(long, default_value_t = 4)]
    parallel: usize,
    /// Exec round trips through each path [default: 200; quick: 40].
    #[arg(long)]
    exec_iters: Option<usize>,
    /// Cold-path boots [default: 3; quick: 1].
    #[arg(long)]
    cold_runs: Option<usize>,
    /// Pull + unpack runs per tool [default: 3; quick: 1].
    #[arg(long)]
    pull_runs: Option<usize>,
    /// Idle sandboxes alive at once for the memory figure [default: 4; quick: 2].
    #[arg(long)]
    idle_sandboxes: Option<usize>,
    /// Where bench.json and bench.md go.
    #[arg(long, default_value = "target/kiln-bench")]
    out: PathBuf,
    /// The `kiln` binary to serve the API with [default: `kiln` next to this binary].
    #[arg(long)]
    kiln_bin: Option<PathBuf>,
    /// The local test registry, host:port [default: KILN_TEST_REGISTRY, else
    /// $KILN_TEST_ASSETS/registry.env].
    #[arg(long)]
    registry: Option<String>,
    /// Keep the run's state dir (templates, logs, the server's log) for inspection.
    #[arg(long)]
    keep_state: bool,
    /// QEMU processes the engine and the server keep started per template build
    /// (`KILN_RESTORE_POOL`; 0: no pool) [default: --parallel].
    #[arg(long)]
    restore_pool: Option<usize>,
}

struct Plan {
    sequential: usize,
    concurrent: usize,
    parallel: usize,
    exec_iters: usize,
    cold_runs: usize,
    pull_runs: usize,
    idle: usize,
    restore_pool: usize,
}

impl Plan {
    fn new(a: &Args) -> Self {
        let q = a.quick;
        let parallel = a.parallel.max(1);
        let concurrent = a.concurrent.unwrap_or(if q { 8 } else { 32 });
        Self {
            sequential: a.sequential.unwrap_or(if q { 6 } else { 30 }).max(1),
            // Whole waves only.
            concurrent: concurrent.div_ceil(parallel).max(1) * parallel,
            parallel,
            exec_iters: a.exec_iters.unwrap_or(if q { 40 } else { 200 }).max(1),
            cold_runs: a.cold_runs.unwrap_or(if q { 1 } else { 3 }).max(1),
            pull_runs: a.pull_runs.unwrap_or(if q { 1 } else { 3 }).max(1),
            idle: a.idle_sandboxes.unwrap_or(if q { 2 } else { 4 }).max(1),
            restore_pool: a.restore_pool.unwrap_or(parallel),
        }
    }
}

static STARTED: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();

fn say(msg: impl std::fmt::Display) {
    let t = STARTED.get_or_init(Instant::now).elapsed().as_secs();
    eprintln!("[{:02}:{:02}] {msg}", t / 60, t % 60);
}

fn main() -> ExitCode {
    STARTED.get_or_init(Instant::now);
    let filter = tracing_subscriber::EnvFilter::try_from_env("KILN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_filter(filter),
        )
        .with(capture::CaptureLayer)
        .init();
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kiln-bench: cannot start the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = rt.block_on(async {
        tokio::select! {
            r = run(args) => match r {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("kiln-bench: {e:#}");
                    ExitCode::FAILURE
                }
            },
            () = interrupted() => ExitCode::from(130),
        }
    });
    rt.shutdown_timeout(Duration::from_secs(10));
    code
}

/// Waits for SIGINT, SIGTERM or SIGHUP. `main` then drops the run, which unwinds it:
/// sandboxes' VMs and bare QEMUs are killed, the server is stopped, the state removed.
async fn interrupted() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut int), Ok(mut term), Ok(mut hup)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
        signal(SignalKind::hangup()),
    ) else {
        return std::future::pending().await;
    };
    let sig = tokio::select! {
        _ = int.recv() => "interrupted",
        _ = term.recv() => "terminated",
        _ = hup.recv() => "hung up",
    };
    eprintln!("kiln-bench: {sig}: stopping every VM and the server, removing the state dir");
}

/// Removes the run's state dir on every exit path (unless asked to keep it).
struct RunDir {
    path: PathBuf,
    keep: bool,
}

impl Drop for RunDir {
    fn drop(&mut self) {
        if self.keep {
            eprintln!("kiln-bench: state kept in {}", self.path.display());
        } else if let Err(e) = std::fs::remove_dir_all(&self.path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                eprintln!("kiln-bench: cannot remove {}: {e}", self.path.display());
            }
        }
    }
}

fn assets_dir() -> PathBuf {
    std::env::var_os("KILN_TEST_ASSETS")
        .filter(|v| !v.is_empty())
        .map_or_else(|| PathBuf::from("/var/tmp/kiln-test-assets"), PathBuf::from)
}

fn registry(args: &Args, assets: &Path) -> anyhow::Result<String> {
    if let Some(r) = &args.registry {
        return Ok(r.clone());
    }
    if let Some(r) = std::env::var("KILN_TEST_REGISTRY")
        .ok()
        .filter(|v| !v.is_empty())
    {
        return Ok(r);
    }
    let env = assets.join("registry.env");
    let text = std::fs::read_to_string(&env).with_context(|| {
        format!(
            "no test registry ({}): run scripts/test-registry.sh start",
            env.display()
        )
    })?;
    text.lines()
        .find_map(|l| l.strip_prefix("KILN_TEST_REGISTRY=").map(str::to_owned))
        .context("KILN_TEST_REGISTRY missing from registry.env")
}

fn git(args: &[&str]) -> Option<String> {
    let out = std::process::Command::new("git").args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// The first line of `TOOL --version`.
fn tool_version(tool: &str) -> String {
    std::process::Command::new(tool)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(str::to_owned)
        })
        .unwrap_or_default()
}

fn load_avg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn req(cmd: &str) -> ExecRequest {
    ExecRequest {
        command: cmd.into(),
        ..Default::default()
    }
}

/// Per-phase failures are recorded, not fatal, unless they are too many to trust the rest.
#[derive(Default, Serialize)]
struct Failures(Vec<String>);

impl Failures {
    fn note(&mut self, phase: &str, e: &anyhow::Error) {
        say(format!("  {phase}: sample failed: {e:#}"));
        self.0.push(format!("{phase}: {e:#}"));
    }

    fn check(&self, phase: &str, wanted: usize, got: usize) -> anyhow::Result<()> {
        let failed = wanted.saturating_sub(got);
        ensure!(
            got > 0 && failed * 5 <= wanted,
            "{phase}: {failed} of {wanted} samples failed; last: {}",
            self.0.last().map_or("-", String::as_str)
        );
        Ok(())
    }
}

/// Everything one run shares.
struct Ctx {
    engine: Arc<Engine>,
    team_id: String,
    client: Client,
    template: String,
    bundle: PathBuf,
    manifest: Manifest,
    bare_dir: PathBuf,
}

/// One kiln create: create returned, first exec returned.
#[derive(Debug, Clone, Copy)]
struct CreateSample {
    created: Duration,
    first_exec: Duration,
}

async fn run(args: Args) -> anyhow::Result<()> {
    let plan = Plan::new(&args);
    let assets = assets_dir();
    let registry = registry(&args, &assets)?;
    let image = format!("{registry}/kiln/python:latest");
    let kiln_bin = match &args.kiln_bin {
        Some(p) => p.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("no directory for the current executable")?
            .join("kiln"),
    };
    ensure!(
        kiln_bin.is_file(),
        "{} missing: build it (cargo build --release -p kiln-cli) or pass --kiln-bin",
        kiln_bin.display()
    );
    let commit = git(&["rev-parse", "--short", "HEAD"]).unwrap_or_else(|| "unknown".into());
    let dirty =
        git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
    let load_start = load_avg();

    // A fresh state dir: the first build really pulls, nothing of other runs is reused.
    // The guest kernel is the test state dir's (provisioned by scripts/bench.sh).
    let kernels = assets.join("state/kernel");
    ensure!(
        kernels.is_dir(),
        "{} missing: run scripts/bench.sh (it provisions the guest kernel)",
        kernels.display()
    );
    let work = assets.join("bench");
    std::fs::create_dir_all(&work)?;
    let state = RunDir {
        path: work.join(format!("run-{}", std::process::id())),
        keep: args.keep_state,
    };
    let _ = std::fs::remove_dir_all(&state.path);
    std::fs::create_dir_all(&state.path)?;
    std::os::unix::fs::symlink(&kernels, state.path.join("kernel"))?;
    let bare_dir = state.path.join("bare");
    std::fs::create_dir_all(&bare_dir)?;

    say(format!(
        "kiln-bench at {commit}{}: state {}, image {image}",
        if dirty { " (uncommitted changes)" } else { "" },
        state.path.display()
    ));
    let mut cfg = EngineConfig::new(&state.path);
    cfg.owner = Owner::Server;
    cfg.registry_config = None;
    cfg.restore_pool = plan.restore_pool;
    let engine = Engine::open(cfg).await?;
    let env = engine.build_env().await?;
    let accel = kiln_vm::accel::choose(
        kiln_vm::Accel::from_env(),
        &kiln_vm::StateDir::new(&state.path),
        Some(&env.kernel),
    )
    .await;
    say(format!("accelerator: {:?} ({})", accel.accel, accel.reason));
    let (_, api_key) = engine.store().create_api_key("bench").await?;
    let team_id = engine
        .store()
        .team_by_name("bench")
        .await?
        .context("team bench")?
        .id;
    let server = procs::Server::start(
        &kiln_bin,
        &state.path,
        &state.path.join("server.log"),
        plan.restore_pool,
    )
    .await?;
    say(format!("kiln serve (pid {}) on {}", server.pid, server.url));
    let client = Client::new(&server.url, &api_key)?;

    let mut failures = Failures::default();
    let result = measure(
        &plan,
        &engine,
        &team_id,
        &client,
        &image,
        &registry,
        &state.path,
        bare_dir,
        &mut failures,
    )
    .await;
    // Sandboxes the server or this process still runs (on error) go first.
    server.stop(Duration::from_secs(20)).await;
    engine.stop_live_sandboxes().await;
    let (rows, targets, results) = result?;

    let load_end = load_avg();
    let doc = json!({
        "kiln_bench": 1,
        "commit": commit,
        "uncommitted_changes": dirty,
        "finished_at": chrono::Utc::now().to_rfc3339(),
        "duration_s": STARTED.get().map(|t| t.elapsed().as_secs()),
        "host": {
            "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            "accel": format!("{:?}", accel.accel).to_lowercase(),
            "accel_reason": accel.reason,
            "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
            "qemu": tool_version("qemu-system-x86_64"),
            "skopeo": tool_version("skopeo"),
            "umoci": tool_version("umoci"),
            "load_avg_start": load_start,
            "load_avg_end": load_end,
        },
        "plan": {
            "sequential": plan.sequential,
            "concurrent": plan.concurrent,
            "parallel": plan.parallel,
            "exec_iters": plan.exec_iters,
            "cold_runs": plan.cold_runs,
            "pull_runs": plan.pull_runs,
            "idle_sandboxes": plan.idle,
            "restore_pool": plan.restore_pool,
            "quick": args.quick,
        },
        "template": {
            "from": image,
            "start_cmd": START_CMD,
            "ready_cmd": READY_CMD,
        },
        "rows": rows,
        "targets": targets,
        "results": results,
        "failures": failures,
    });
    let md = format!(
        "kiln-bench at `{commit}`{}, {}, {} CPUs, accel {:?}, restore pool {}; load average {load_start} at the start, {load_end} at the end.\n{}",
        if dirty { " (with uncommitted changes)" } else { "" },
        chrono::Utc::now().format("%Y-%m-%d %H:%M UTC"),
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        accel.accel,
        plan.restore_pool,
        report::markdown(&rows, &targets),
    );
    std::fs::create_dir_all(&args.out)?;
    let json_path = args.out.join("bench.json");
    let md_path = args.out.join("bench.md");
    std::fs::write(&json_path, serde_json::to_vec_pretty(&doc)?)?;
    std::fs::write(&md_path, &md)?;
    println!("{md}");
    say(format!(
        "wrote {} and {}",
        json_path.display(),
        md_path.display()
    ));
    if !failures.0.is_empty() {
        say(format!(
            "{} sample(s) failed (listed in bench.json)",
            failures.0.len()
        ));
    }
    drop(engine);
    drop(state);
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn measure(
    plan: &Plan,
    engine: &Arc<Engine>,
    team_id: &str,
    client: &Client,
    image: &str,
    registry: &str,
    state: &Path,
    bare_dir: PathBuf,
    failures: &mut Failures,
) -> anyhow::Result<(Vec<Row>, Vec<Target>, serde_json::Value)> {
    let mut rows = Vec::new();
    let mut targets = Vec::new();
    let mut results = serde_json::Map::new();

    // ---- builds: cold image cache, then warm ----------------------------------------
    let name = "bench-http";
    let cold = build(client, name, image, "cold", SECOND_STEP).await?;
    let warm = build(client, "bench-http-warm", image, "warm", SECOND_STEP).await?;
    // The warm template's steps with only the last one changed: the step cache replays
    // just that step on the disk the first one left.
    let replay = build(
        client,
        "bench-http-warm",
        image,
        "warm",
        SECOND_STEP_CHANGED,
    )
    .await?;
    let tpl = engine.store().template_by_id_or_name(team_id, name).await?;
    let build_id = tpl
        .current_build_id
        .clone()
        .context("template has no build")?;
    let bundle = engine
        .layout()
        .artifact_dir(&tpl.id, &build_id)?
        .join("bundle");
    let manifest = bare::manifest(&bundle)?;
    let memory_mib = tpl.memory_mib;
    build_rows(&mut rows, &cold, &warm);
    rows.push(
        Row::value(
            "Template build (HTTP API; phases from the build log)",
            "last step changed (step cache replays it alone): total",
            None,
            replay.phases.total_ms,
            Unit::Ms,
        )
        .vs(
            ratio(replay.phases.total_ms, warm.phases.total_ms),
            "warm total",
        ),
    );
    results.insert(
        "build".into(),
        json!({ "cold": cold, "warm": warm, "last_step_changed": replay }),
    );

    let ctx = Ctx {
        engine: engine.clone(),
        team_id: team_id.to_owned(),
        client: client.clone(),
        template: name.to_owned(),
        bundle,
        manifest,
        bare_dir,
    };

    // ---- pull + unpack vs skopeo + umoci ----------------------------------------------
    let pull = pull_bench(plan, registry, state).await?;
    pull_rows(&mut rows, &pull);
    results.insert("pull".into(), serde_json::to_value(&pull)?);

    // ---- create -> first exec, with the bare floor interleaved -----------------------
    let creates = create_bench(plan, &ctx, failures).await?;
    // ---- the ceiling ---------------------------------------------------------------
    let cold_path = cold_path_bench(plan, &ctx, failures).await?;
    create_rows(&mut rows, &mut targets, plan, &creates, &cold_path);
    results.insert("create".into(), serde_json::to_value(&creates)?);
    results.insert("cold_path".into(), serde_json::to_value(&cold_path)?);

    // ---- exec round trip -----------------------------------------------------------
    let exec = exec_bench(plan, &ctx).await?;
    rows.push(
        Row::stats(
            "Exec round trip (`true`) on a live sandbox",
            "directly through the agent (engine's connection)",
            &exec.agent,
        )
        .vs(1.0, "peer"),
    );
    rows.push(
        Row::stats(
            "Exec round trip (`true`) on a live sandbox",
            "HTTP API (kiln-sdk `commands().run`)",
            &exec.http,
        )
        .vs(ratio(exec.http.p50_ms, exec.agent.p50_ms), "agent direct"),
    );
    results.insert("exec".into(), serde_json::to_value(&exec)?);

    // ---- memory ----------------------------------------------------------------------
    let memory = memory_bench(plan, &ctx, memory_mib).await?;
    let section = "Host memory per idle sandbox (python3 -m http.server)";
    let mib = |kib: f64| kib / 1024.0;
    rows.push(
        Row::value(
            section,
            "PSS, one sandbox alive",
            Some(1),
            mib(memory.alone.pss_kib as f64),
            Unit::Mib,
        )
        .vs(
            mib(memory.alone.pss_kib as f64) / f64::from(memory_mib),
            &format!("memoryMib ({memory_mib})"),
        )
        .percent(),
    );
    rows.push(
        Row::value(
            section,
            &format!("PSS per sandbox, {} alive (mean)", memory.together.len()),
            Some(memory.together.len()),
            mib(memory.mean_pss_kib),
            Unit::Mib,
        )
        .vs(
            mib(memory.mean_pss_kib) / f64::from(memory_mib),
            &format!("memoryMib ({memory_mib})"),
        )
        .percent(),
    );
    rows.push(
        Row::value(
            section,
            "RSS, one sandbox alive",
            Some(1),
            mib(memory.alone.rss_kib as f64),
            Unit::Mib,
        )
        .vs(
            mib(memory.alone.rss_kib as f64) / f64::from(memory_mib),
            &format!("memoryMib ({memory_mib})"),
        )
        .percent(),
    );
    targets.push(Target::check(
        "idle sandbox PSS <= 25 % of memoryMib",
        &format!(
            "mean PSS of {} idle sandboxes / memoryMib",
            memory.together.len()
        ),
        mib(memory.mean_pss_kib) / f64::from(memory_mib),
        0.25,
    ));
    results.insert("memory".into(), serde_json::to_value(&memory)?);

    Ok((rows, targets, serde_json::Value::Object(results)))
}

// ------------------------------------------------------------------------------------
// Builds

#[derive(Debug, Serialize)]
struct BuildResult {
    template: String,
    /// Build record created -> finalized (server clock): queueing and publishing included.
    wall_ms: f64,
    phases: buildlog::Phases,
    /// The build's log: milliseconds since its first line, kiln's own line or not, text.
    log: Vec<(f64, bool, String)>,
}

/// The bench template's second (last) step, and a variant of it.
const SECOND_STEP: &str = "python3 -c 'import http.server, sys; print(sys.version)'";
const SECOND_STEP_CHANGED: &str = "python3 -c 'import http.server, sys; print(sys.version_info)'";

async fn build(
    client: &Client,
    name: &str,
    image: &str,
    label: &str,
    second: &str,
) -> anyhow::Result<BuildResult> {
    say(format!("build ({label} image cache): {name} from {image}"));
    let _ = Template::delete_by_id(client, name).await;
    // The two builds differ in their first step, so that a step cache (issue 8, part 3)
    // cannot turn the warm one into a cache hit: only the image cache is warm.
    let opts = TemplateCreateOptions {
        steps: vec![
            Step::run(format!(
                "mkdir -p /srv && echo '{PAGE}' > /srv/index.html && echo built {label}"
            )),
            Step::run(second),
        ],
        start_cmd: Some(START_CMD.into()),
        ready_cmd: Some(READY_CMD.into()),
        ..TemplateCreateOptions::new(name, image)
    };
    let mut t = Template::create(client, opts).await?;
    let build_id = t
        .info()
        .latest_build_id
        .clone()
        .context("no build id from POST /templates")?;
    let waited = t.wait_until_ready(None).await;
    let mut lines = Vec::new();
    t.stream_build_logs(Some(&build_id), |e| {
        if !e.finished {
            lines.push(buildlog::Line {
                at: e.timestamp,
                system: e.stream == kiln_sdk::LogStream::System,
                text: e.text.clone(),
            });
        }
    })
    .await?;
    if let Err(e) = waited {
        let tail: Vec<&str> = lines
            .iter()
            .rev()
            .take(20)
            .map(|l| l.text.as_str())
            .collect();
        bail!(
            "build of {name} failed: {e}; log tail (newest first):\n{}",
            tail.join("\n")
        );
    }
    let b = t.get_build(&build_id).await?;
    let wall_ms = match b.finalized_at {
        Some(f) => (f - b.created_at).num_milliseconds() as f64,
        None => f64::NAN,
    };
    let phases = buildlog::phases(&lines).context("the build log has no \"done in\" line")?;
    say(format!(
        "  {label}: {:.1}s (steps {:.1}s, image {:.1}s, VM up {:.1}s, start->ready {:.1}s, snapshot {:.1}s)",
        phases.total_ms / 1000.0,
        phases.steps_ms / 1000.0,
        phases.image_ms / 1000.0,
        phases.vm_up_ms / 1000.0,
        phases.start_ready_ms / 1000.0,
        phases.snapshot_ms / 1000.0
    ));
    Ok(BuildResult {
        template: name.into(),
        wall_ms,
        phases,
        log: lines
            .iter()
            .map(|l| {
                let t0 = lines[0].at;
                let ms = (l.at - t0).num_microseconds().unwrap_or(0) as f64 / 1000.0;
                (ms, l.system, l.text.clone())
            })
            .collect(),
    })
}

fn build_rows(rows: &mut Vec<Row>, cold: &BuildResult, warm: &BuildResult) {
    let s = "Template build (HTTP API; phases from the build log)";
    for (label, b) in [("cold image cache", cold), ("warm image cache", warm)] {
        let p = &b.phases;
        rows.push(
            Row::value(
                s,
                &format!("{label}: total (\"done in\")"),
                None,
                p.total_ms,
                Unit::Ms,
            )
            .vs(ratio(p.total_ms, cold.phases.total_ms), "cold total"),
        );
        rows.push(
            Row::value(
                s,
                &format!("{label}: time inside the user's steps"),
                None,
                p.steps_ms,
                Unit::Ms,
            )
            .vs(ratio(p.steps_ms, p.total_ms), "its total")
            .percent(),
        );
        rows.push(
            Row::value(
                s,
                &format!("{label}: overhead (total - steps)"),
                None,
                p.overhead_ms,
                Unit::Ms,
            )
            .vs(ratio(p.overhead_ms, p.total_ms), "its total")
            .percent(),
        );
        rows.push(
            Row::value(
                s,
                &format!("{label}: overhead excluding startCmd -> ready"),
                None,
                p.overhead_excl_start_ready_ms,
                Unit::Ms,
            )
            .vs(
                ratio(p.overhead_excl_start_ready_ms, p.total_ms),
                "its total",
            )
            .percent(),
        );
    }
}

// ------------------------------------------------------------------------------------
// Pull

#[derive(Debug, Serialize)]
struct PullResult {
    image: String,
    kiln_cold: Stats,
    peer_cold: Stats,
    kiln_warm_blobs_fresh_unpack: Stats,
    peer_warm_layout_fresh_unpack: Stats,
}

async fn pull_bench(plan: &Plan, registry: &str, state: &Path) -> anyhow::Result<PullResult> {
    let reference = format!("{registry}/kiln/python:latest");
    say(format!(
        "pull + unpack vs skopeo copy + umoci unpack of {reference}, {} run(s)",
        plan.pull_runs
    ));
    let dir = state.join("pull");
    let kdir = dir.join("kiln");
    let sdir = dir.join("peer");
    let (mut kc, mut kw, mut sc, mut sw) = (vec![], vec![], vec![], vec![]);
    for i in 0..plan.pull_runs {
        let t = Instant::now();
        remove_and_sync(&kdir).await;
        std::fs::create_dir_all(&kdir)?;
        kc.push(kiln_pull(&kdir, &reference).await?);
        remove_and_sync(&sdir.join("layout")).await;
        remove_and_sync(&sdir.join("bundle")).await;
        sc.push(skopeo_umoci(&sdir, &reference).await?);
        remove_and_sync(&kdir.join("images")).await;
        kw.push(kiln_pull(&kdir, &reference).await?);
        remove_and_sync(&sdir.join("bundle")).await;
        sw.push(skopeo_umoci(&sdir, &reference).await?);
        let s = |v: &[Duration]| v.last().map_or(0.0, Duration::as_secs_f64);
        say(format!(
            "  run {}: kiln {:.1}s vs {:.1}s cold, {:.1}s vs {:.1}s fresh unpack ({:.0}s with cleanup)",
            i + 1,
            s(&kc),
            s(&sc),
            s(&kw),
            s(&sw),
            t.elapsed().as_secs_f64()
        ));
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(PullResult {
        image: reference,
        kiln_cold: Stats::from_durations(&kc),
        peer_cold: Stats::from_durations(&sc),
        kiln_warm_blobs_fresh_unpack: Stats::from_durations(&kw),
        peer_warm_layout_fresh_unpack: Stats::from_durations(&sw),
    })
}

/// Removes a tree and flushes the removal, so that its writeback does not land in the
/// next timed operation.
async fn remove_and_sync(p: &Path) {
    let p = p.to_owned();
    let _ = tokio::task::spawn_blocking(move || {
        let _ = std::fs::remove_dir_all(&p);
        // SAFETY: sync(2) takes no arguments and cannot fail.
        unsafe { libc::sync() };
    })
    .await;
}

async fn kiln_pull(state: &Path, reference: &str) -> anyhow::Result<Duration> {
    let store = kiln_oci::ImageStore::open(state, kiln_oci::RegistryConfig::default())?;
    let t = Instant::now();
    let image = store.resolve(reference).await?;
    store.pull(&image, &|_| {}).await?;
    store.unpack(&image, &|_| {}).await?;
    Ok(t.elapsed())
}

/// `skopeo copy` into an OCI layout, then `umoci unpack` of it (the caller removes what
/// should not be reused).
async fn skopeo_umoci(work: &Path, reference: &str) -> anyhow::Result<Duration> {
    let layout = work.join("layout");
    let bundle = work.join("bundle");
    std::fs::create_dir_all(work)?;
    let t = Instant::now();
    procs::run(procs::command("skopeo").args([
        "copy",
        "--quiet",
        "--src-tls-verify=false",
        &format!("docker://{reference}"),
        &format!("oci:{}:img", layout.display()),
    ]))
    .await?;
    procs::run(
        procs::command("umoci")
            .args(["unpack", "--image", &format!("{}:img", layout.display())])
            .arg(&bundle),
    )
    .await?;
    Ok(t.elapsed())
}

fn pull_rows(rows: &mut Vec<Row>, p: &PullResult) {
    let s = "Image pull + unpack (kiln/python from the local registry)";
    rows.push(Row::stats(s, "skopeo copy + umoci unpack, cold", &p.peer_cold).vs(1.0, "peer"));
    rows.push(Row::stats(s, "kiln pull + unpack, cold", &p.kiln_cold).vs(
        ratio(p.kiln_cold.p50_ms, p.peer_cold.p50_ms),
        "skopeo + umoci, cold",
    ));
    rows.push(
        Row::stats(
            s,
            "skopeo (layout kept) + umoci unpack",
            &p.peer_warm_layout_fresh_unpack,
        )
        .vs(1.0, "peer"),
    );
    rows.push(
        Row::stats(
            s,
            "kiln, blobs cached, fresh unpack",
            &p.kiln_warm_blobs_fresh_unpack,
        )
        .vs(
            ratio(
                p.kiln_warm_blobs_fresh_unpack.p50_ms,
                p.peer_warm_layout_fresh_unpack.p50_ms,
            ),
            "skopeo (layout kept) + umoci",
        ),
    );
}

// ------------------------------------------------------------------------------------
// Create -> first exec

#[derive(Debug, Serialize)]
struct Series {
    /// Launch -> QEMU `running` (bare) / create call returned (kiln).
    up: Stats,
    /// Launch / create call -> first `true` completed.
    first_exec: Stats,
    /// The first `true` alone (`first_exec - up`, per sample): in the guest, mostly.
    first_exec_after_up: Stats,
}

impl Series {
    fn of(pairs: impl Iterator<Item = (Duration, Duration)>) -> Self {
        let (up, done): (Vec<Duration>, Vec<Duration>) = pairs.unzip();
        let after: Vec<Duration> = up
            .iter()
            .zip(&done)
            .map(|(u, d)| d.saturating_sub(*u))
            .collect();
        Self {
            up: Stats::from_durations(&up),
            first_exec: Stats::from_durations(&done),
            first_exec_after_up: Stats::from_durations(&after),
        }
    }
}

#[derive(Debug, Serialize)]
struct CreateResults {
    sequential: Modes,
    concurrent: Modes,
    parallel: usize,
}

#[derive(Debug, Serialize)]
struct Modes {
    bare: Series,
    engine: Series,
    http: Series,
    /// kiln-vm's own split of the engine's restores (its `vm restored` events):
    /// launch -> snapshot loaded, and launch -> agent connected with the clock set.
    engine_vm_loaded: Stats,
    engine_vm_agent_ready: Stats,
    /// Bare restores: a second `true` right after the first, alone.
    bare_second_exec: Stats,
}

#[derive(Default)]
struct Samples {
    bare: Vec<bare::BareSample>,
    engine: Vec<CreateSample>,
    http: Vec<CreateSample>,
}

impl Samples {
    fn modes(&self, restored: &[capture::Restored]) -> Modes {
        let series = |v: &[CreateSample]| Series::of(v.iter().map(|s| (s.created, s.first_exec)));
        Modes {
            bare: Series::of(self.bare.iter().map(|s| (s.running, s.first_exec))),
            engine: series(&self.engine),
            http: series(&self.http),
            engine_vm_loaded: Stats::from_ms(
                &restored.iter().map(|r| r.loaded_ms).collect::<Vec<_>>(),
            ),
            bare_second_exec: Stats::from_durations(
                &self.bare.iter().map(|s| s.second_exec).collect::<Vec<_>>(),
            ),
            engine_vm_agent_ready: Stats::from_ms(
                &restored.iter().map(|r| r.ready_ms).collect::<Vec<_>>(),
            ),
        }
    }
}

async fn engine_create(ctx: &Ctx, label: &str) -> anyhow::Result<(CreateSample, String)> {
    let new = NewSandbox {
        template: ctx.template.clone(),
        name: Some(label.to_owned()),
        ..Default::default()
    };
    let t = Instant::now();
    let s = ctx
        .engine
        .create_live_sandbox(&ctx.team_id, &new, None)
        .await?;
    let created = t.elapsed();
    let id = s.sandbox.id.clone();
    let exec = async {
        let out = ctx
            .engine
            .live_agent(&s.sandbox)?
            .exec_collect(req("true"))
            .await?;
        ensure!(
            out.status.code == Some(0),
            "`true` ended with {:?}",
            out.status
        );
        Ok::<_, anyhow::Error>(())
    }
    .await;
    let first_exec = t.elapsed();
    if let Err(e) = exec {
        let _ = ctx.engine.kill_live_sandbox(&ctx.team_id, &id).await;
        return Err(e);
    }
    Ok((
        CreateSample {
            created,
            first_exec,
        },
        id,
    ))
}

async fn http_create(ctx: &Ctx, label: &str) -> anyhow::Result<(CreateSample, Sandbox)> {
    let t = Instant::now();
    let sb = Sandbox::create(&ctx.client, SandboxCreateOptions::new(label, &ctx.template)).await?;
    let created = t.elapsed();
    let r = sb.commands().run("true", RunOptions::default()).await;
    let first_exec = t.elapsed();
    match r {
        Ok(r) if r.exit_code == 0 => Ok((
            CreateSample {
                created,
                first_exec,
            },
            sb,
        )),
        other => {
            let _ = sb.kill().await;
            match other {
                Ok(r) => bail!("`true` ended with {}", r.exit_code),
                Err(e) => Err(e.into()),
            }
        }
    }
}

async fn create_bench(
    plan: &Plan,
    ctx: &Ctx,
    failures: &mut Failures,
) -> anyhow::Result<CreateResults> {
    say(format!(
        "create -> first exec, sequential: {} each of bare QEMU, engine, HTTP API (interleaved)",
        plan.sequential
    ));
    // Warm-up, not counted: page cache of the bundle, the server's first request.
    bare::restore(&ctx.bundle, &ctx.manifest, &ctx.bare_dir).await?;
    let (_, id) = engine_create(ctx, "warmup-e").await?;
    ctx.engine.kill_live_sandbox(&ctx.team_id, &id).await?;
    let (_, sb) = http_create(ctx, "warmup-h").await?;
    sb.kill().await?;
    capture::take_restored();

    let mut seq = Samples::default();
    for i in 0..plan.sequential {
        match bare::restore(&ctx.bundle, &ctx.manifest, &ctx.bare_dir).await {
            Ok(s) => seq.bare.push(s),
            Err(e) => failures.note("bare sequential", &e),
        }
        match engine_create(ctx, &format!("seq-e{i}")).await {
            Ok((s, id)) => {
                seq.engine.push(s);
                ctx.engine.kill_live_sandbox(&ctx.team_id, &id).await?;
            }
            Err(e) => failures.note("engine sequential", &e),
        }
        match http_create(ctx, &format!("seq-h{i}")).await {
            Ok((s, sb)) => {
                seq.http.push(s);
                sb.kill().await?;
            }
            Err(e) => failures.note("http sequential", &e),
        }
        if (i + 1) % 10 == 0 {
            say(format!("  {}/{}", i + 1, plan.sequential));
        }
    }
    failures.check("bare sequential", plan.sequential, seq.bare.len())?;
    failures.check("engine sequential", plan.sequential, seq.engine.len())?;
    failures.check("http sequential", plan.sequential, seq.http.len())?;
    let seq_restored = capture::take_restored();

    let waves = plan.concurrent / plan.parallel;
    say(format!(
        "create -> first exec, {} at a time: {waves} wave(s) each of bare QEMU, engine, HTTP API",
        plan.parallel
    ));
    let mut conc = Samples::default();
    for w in 0..waves {
        // Bare: `parallel` QEMUs launched at once.
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..plan.parallel {
            let (b, m, d) = (
                ctx.bundle.clone(),
                ctx.manifest.clone(),
                ctx.bare_dir.clone(),
            );
            set.spawn(async move { bare::restore(&b, &m, &d).await });
        }
        while let Some(r) = set.join_next().await {
            match r.map_err(anyhow::Error::from).and_then(|r| r) {
                Ok(s) => conc.bare.push(s),
                Err(e) => failures.note("bare concurrent", &e),
            }
        }
        // Engine: each create in its own task, as the server runs requests.
        let mut set = tokio::task::JoinSet::new();
        for k in 0..plan.parallel {
            let c = ctx.clone_light();
            let label = format!("conc-e{w}-{k}");
            set.spawn(async move { engine_create(&c, &label).await });
        }
        let mut ids = Vec::new();
        while let Some(r) = set.join_next().await {
            match r.map_err(anyhow::Error::from).and_then(|r| r) {
                Ok((s, id)) => {
                    conc.engine.push(s);
                    ids.push(id);
                }
                Err(e) => failures.note("engine concurrent", &e),
            }
        }
        for id in ids {
            ctx.engine.kill_live_sandbox(&ctx.team_id, &id).await?;
        }
        // HTTP API: `parallel` requests in flight.
        let mut set = tokio::task::JoinSet::new();
        for k in 0..plan.parallel {
            let c = ctx.clone_light();
            let label = format!("conc-h{w}-{k}");
            set.spawn(async move { http_create(&c, &label).await });
        }
        let mut boxes = Vec::new();
        while let Some(r) = set.join_next().await {
            match r.map_err(anyhow::Error::from).and_then(|r| r) {
                Ok((s, sb)) => {
                    conc.http.push(s);
                    boxes.push(sb);
                }
                Err(e) => failures.note("http concurrent", &e),
            }
        }
        for sb in boxes {
            sb.kill().await?;
        }
        if (w + 1) % 2 == 0 {
            say(format!("  wave {}/{waves}", w + 1));
        }
    }
    failures.check("bare concurrent", plan.concurrent, conc.bare.len())?;
    failures.check("engine concurrent", plan.concurrent, conc.engine.len())?;
    failures.check("http concurrent", plan.concurrent, conc.http.len())?;
    let conc_restored = capture::take_restored();
    Ok(CreateResults {
        sequential: seq.modes(&seq_restored),
        concurrent: conc.modes(&conc_restored),
        parallel: plan.parallel,
    })
}

impl Ctx {
    /// What a spawned task needs (everything is cheap to clone).
    fn clone_light(&self) -> Self {
        Self {
            engine: self.engine.clone(),
            team_id: self.team_id.clone(),
            client: self.client.clone(),
            template: self.template.clone(),
            bundle: self.bundle.clone(),
            manifest: self.manifest.clone(),
            bare_dir: self.bare_dir.clone(),
        }
    }
}

// ------------------------------------------------------------------------------------
// The cold path

#[derive(Debug, Serialize)]
struct ColdPath {
    /// Boot from the template's disk (a fresh overlay on it) to agent-ready.
    boot: Stats,
    /// startCmd spawned -> readyCmd first exits 0 (probed every 100 ms).
    start_ready: Stats,
    /// Launch -> first `true` completed after ready: the ceiling.
    total: Stats,
}

async fn cold_path_bench(
    plan: &Plan,
    ctx: &Ctx,
    failures: &mut Failures,
) -> anyhow::Result<ColdPath> {
    say(format!(
        "cold path (boot + start + ready + first exec), {} run(s)",
        plan.cold_runs
    ));
    let (mut boot, mut ready, mut total) = (vec![], vec![], vec![]);
    for i in 0..plan.cold_runs {
        match cold_once(ctx, i).await {
            Ok((b, r, t)) => {
                say(format!(
                    "  boot {:.1}s, start->ready {:.1}s, total {:.1}s",
                    b.as_secs_f64(),
                    r.as_secs_f64(),
                    t.as_secs_f64()
                ));
                boot.push(b);
                ready.push(r);
                total.push(t);
            }
            Err(e) => failures.note("cold path", &e),
        }
    }
    failures.check("cold path", plan.cold_runs, total.len())?;
    Ok(ColdPath {
        boot: Stats::from_durations(&boot),
        start_ready: Stats::from_durations(&ready),
        total: Stats::from_durations(&total),
    })
}

async fn cold_once(ctx: &Ctx, i: usize) -> anyhow::Result<(Duration, Duration, Duration)> {
    let shape = &ctx.manifest.shape;
    let t = Instant::now();
    let vm = Vm::boot(VmConfig {
        name: format!("bench-cold-{i}"),
        vcpus: shape.vcpus,
        memory_mib: shape.memory_mib,
        kernel: kiln_vm::KernelAssets {
            version: ctx.manifest.kernel_version.clone(),
            vmlinuz: ctx.bundle.join("vmlinuz"),
            initramfs: ctx.bundle.join("initramfs.cpio"),
        },
        disk: RootDisk::Overlay(ctx.bundle.join("disk.raw")),
        network: shape.network.then(NetConfig::default),
        accel: shape.accel,
        run_parent: ctx.engine.layout().root().join("vms"),
        console_log: None,
        boot_timeout: None,
    })
    .await?;
    let boot = t.elapsed();
    vm.sync_clock().await?;
    let start = ExecRequest {
        command: START_CMD.into(),
        background: Some(kiln_agent_proto::Background {
            log_path: Some("/run/kiln-start.log".into()),
        }),
        ..Default::default()
    };
    let t_start = Instant::now();
    vm.guard(vm.agent().spawn_background(start)).await?;
    loop {
        let out = vm.exec_collect(req(READY_CMD)).await?;
        if out.status.code == Some(0) {
            break;
        }
        ensure!(
            t_start.elapsed() < Duration::from_secs(120),
            "readyCmd did not pass within 120 s on the cold path"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let start_ready = t_start.elapsed();
    let out = vm.exec_collect(req("true")).await?;
    ensure!(
        out.status.code == Some(0),
        "`true` ended with {:?}",
        out.status
    );
    let total = t.elapsed();
    vm.kill().await;
    Ok((boot, start_ready, total))
}

fn create_rows(
    rows: &mut Vec<Row>,
    targets: &mut Vec<Target>,
    plan: &Plan,
    c: &CreateResults,
    cold: &ColdPath,
) {
    for (mode, m, label) in [
        ("sequential", &c.sequential, "sequential".to_owned()),
        (
            "concurrent",
            &c.concurrent,
            format!("{} at a time", c.parallel),
        ),
    ] {
        let s = format!("Sandbox create -> first exec completed, {label}");
        let floor = m.bare.up.p50_ms;
        let fl = format!("bare floor ({label})");
        rows.push(
            Row::stats(
                &s,
                "bare QEMU `-incoming` -> running (the floor)",
                &m.bare.up,
            )
            .vs(1.0, "floor"),
        );
        rows.push(
            Row::stats(
                &s,
                "bare QEMU -> first exec via the agent socket",
                &m.bare.first_exec,
            )
            .vs(ratio(m.bare.first_exec.p50_ms, floor), &fl),
        );
        rows.push(
            Row::stats(
                &s,
                "bare QEMU: the first exec alone (after `running`)",
                &m.bare.first_exec_after_up,
            )
            .vs(ratio(m.bare.first_exec_after_up.p50_ms, floor), &fl),
        );
        rows.push(
            Row::stats(
                &s,
                "bare QEMU: a second exec right after it",
                &m.bare_second_exec,
            )
            .vs(ratio(m.bare_second_exec.p50_ms, floor), &fl),
        );
        rows.push(
            Row::stats(
                &s,
                "engine: kiln-vm restore -> snapshot loaded",
                &m.engine_vm_loaded,
            )
            .vs(ratio(m.engine_vm_loaded.p50_ms, floor), &fl),
        );
        rows.push(
            Row::stats(&s, "engine: `create_live_sandbox` returned", &m.engine.up)
                .vs(ratio(m.engine.up.p50_ms, floor), &fl),
        );
        rows.push(
            Row::stats(&s, "engine: create -> first exec", &m.engine.first_exec)
                .vs(ratio(m.engine.first_exec.p50_ms, floor), &fl),
        );
        rows.push(
            Row::stats(
                &s,
                "HTTP API (kiln-sdk): `Sandbox::create` returned",
                &m.http.up,
            )
            .vs(ratio(m.http.up.p50_ms, floor), &fl),
        );
        rows.push(
            Row::stats(
                &s,
                "HTTP API: the first exec alone (after create returned)",
                &m.http.first_exec_after_up,
            )
            .vs(ratio(m.http.first_exec_after_up.p50_ms, floor), &fl),
        );
        rows.push(
            Row::stats(
                &s,
                "**HTTP API (kiln-sdk): create -> first exec**",
                &m.http.first_exec,
            )
            .vs(ratio(m.http.first_exec.p50_ms, floor), &fl),
        );
        if mode == "sequential" {
            rows.push(
                Row::stats(
                    &s,
                    "cold path: boot from the template disk -> agent",
                    &cold.boot,
                )
                .vs(ratio(cold.boot.p50_ms, floor), &fl),
            );
            rows.push(
                Row::stats(
                    &s,
                    "cold path: startCmd -> readyCmd passes",
                    &cold.start_ready,
                )
                .vs(ratio(cold.start_ready.p50_ms, floor), &fl),
            );
            rows.push(
                Row::stats(
                    &s,
                    "cold path: boot + start + ready + first exec (the ceiling)",
                    &cold.total,
                )
                .vs(ratio(cold.total.p50_ms, floor), &fl),
            );
            rows.push(
                Row::stats(
                    &s,
                    "HTTP API: create -> first exec, share of the cold path",
                    &m.http.first_exec,
                )
                .vs(
                    ratio(m.http.first_exec.p50_ms, cold.total.p50_ms),
                    "cold path p50",
                )
                .percent(),
            );
        }
    }
    let seq = &c.sequential;
    let conc = &c.concurrent;
    for (path, series) in [("HTTP API", &seq.http), ("engine", &seq.engine)] {
        targets.push(Target::check(
            "create -> first exec <= 1.2x the bare-QEMU floor",
            &format!("{path}, sequential p50 / bare `-incoming` -> running p50"),
            ratio(series.first_exec.p50_ms, seq.bare.up.p50_ms),
            1.2,
        ));
    }
    targets.push(Target::check(
        "create -> first exec <= 1.2x the bare-QEMU floor",
        "HTTP API, sequential p50 / bare -> first exec via agent p50 (floor incl. the agent)",
        ratio(seq.http.first_exec.p50_ms, seq.bare.first_exec.p50_ms),
        1.2,
    ));
    targets.push(Target::check(
        "create -> first exec <= 1.2x the bare-QEMU floor",
        &format!(
            "HTTP API, {} at a time p50 / bare {} at a time p50",
            c.parallel, c.parallel
        ),
        ratio(conc.http.first_exec.p50_ms, conc.bare.up.p50_ms),
        1.2,
    ));
    for (path, series) in [("HTTP API", &seq.http), ("engine", &seq.engine)] {
        targets.push(Target::check(
            "create -> first exec <= 5 % of the cold path",
            &format!("{path}, sequential p50 / cold path p50"),
            ratio(series.first_exec.p50_ms, cold.total.p50_ms),
            0.05,
        ));
    }
    for (path, series) in [("HTTP API", &conc.http), ("engine", &conc.engine)] {
        targets.push(Target::check(
            &format!("p99 <= 2x p50 at {} concurrent creates", plan.parallel),
            &format!(
                "{path}, create -> first exec p99 / p50 (n = {})",
                series.first_exec.n
            ),
            ratio(series.first_exec.p99_ms, series.first_exec.p50_ms),
            2.0,
        ));
    }
}

// ------------------------------------------------------------------------------------
// Exec round trip

#[derive(Debug, Serialize)]
struct ExecResult {
    agent: Stats,
    http: Stats,
}

async fn exec_bench(plan: &Plan, ctx: &Ctx) -> anyhow::Result<ExecResult> {
    say(format!(
        "exec round trip (`true`), {} each through the agent and the HTTP API (interleaved)",
        plan.exec_iters
    ));
    let (_, id) = engine_create(ctx, "exec-agent").await?;
    let record = ctx.engine.store().sandbox_by_id(&ctx.team_id, &id).await?;
    let agent = ctx.engine.live_agent(&record)?;
    let result = async {
        let (_, sb) = http_create(ctx, "exec-http").await?;
        let r = async {
            for _ in 0..5 {
                agent.exec_collect(req("true")).await?;
                sb.commands().run("true", RunOptions::default()).await?;
            }
            let (mut a, mut h) = (Vec::new(), Vec::new());
            for _ in 0..plan.exec_iters {
                let t = Instant::now();
                let out = agent.exec_collect(req("true")).await?;
                a.push(t.elapsed());
                ensure!(
                    out.status.code == Some(0),
                    "`true` via the agent: {:?}",
                    out.status
                );
                let t = Instant::now();
                let out = sb.commands().run("true", RunOptions::default()).await?;
                h.push(t.elapsed());
                ensure!(out.exit_code == 0, "`true` via HTTP: {}", out.exit_code);
            }
            Ok(ExecResult {
                agent: Stats::from_durations(&a),
                http: Stats::from_durations(&h),
            })
        }
        .await;
        sb.kill().await?;
        r
    }
    .await;
    ctx.engine.kill_live_sandbox(&ctx.team_id, &id).await?;
    result
}

// ------------------------------------------------------------------------------------
// Memory

#[derive(Debug, Serialize)]
struct MemoryResult {
    memory_mib: u32,
    /// Idle before each reading.
    idle_s: u64,
    /// The first sandbox alone.
    alone: mem::Rollup,
    /// Every sandbox, all alive at once.
    together: Vec<mem::Rollup>,
    mean_pss_kib: f64,
    /// The page each sandbox's HTTP server answered with afterwards (checked).
    served: bool,
}

fn qemu_pid(ctx: &Ctx, sandbox_id: &str) -> anyhow::Result<u32> {
    let path = ctx
        .engine
        .layout()
        .sandbox_dir(sandbox_id)?
        .join(ENDPOINT_FILE);
    let ep: kiln_engine::SandboxEndpoint = serde_json::from_slice(
        &std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?,
    )?;
    Ok(ep.qemu_pid)
}

async fn memory_bench(plan: &Plan, ctx: &Ctx, memory_mib: u32) -> anyhow::Result<MemoryResult> {
    const IDLE: Duration = Duration::from_secs(5);
    say(format!(
        "host memory: PSS of idle sandboxes (1, then {} alive), via the HTTP API",
        plan.idle
    ));
    let mut boxes: Vec<Sandbox> = Vec::new();
    let r = async {
        let (_, sb) = http_create(ctx, "mem-0").await?;
        boxes.push(sb);
        tokio::time::sleep(IDLE).await;
        let alone = mem::rollup(qemu_pid(ctx, boxes[0].id())?)?;
        for i in 1..plan.idle {
            let (_, sb) = http_create(ctx, &format!("mem-{i}")).await?;
            boxes.push(sb);
        }
        tokio::time::sleep(IDLE).await;
        let mut together = Vec::new();
        for sb in &boxes {
            together.push(mem::rollup(qemu_pid(ctx, sb.id())?)?);
        }
        // Afterwards (not measured): each sandbox's server answers.
        for sb in &boxes {
            let out = sb
                .commands()
                .run("curl -fsS http://127.0.0.1:8000/", RunOptions::default())
                .await?;
            ensure!(
                out.exit_code == 0 && out.stdout.contains(PAGE),
                "the sandbox's HTTP server did not answer: {} {}",
                out.stdout,
                out.stderr
            );
        }
        let mean = together.iter().map(|r| r.pss_kib as f64).sum::<f64>() / together.len() as f64;
        say(format!(
            "  PSS alone {:.1} MiB, mean of {} {:.1} MiB (memoryMib {memory_mib})",
            alone.pss_kib as f64 / 1024.0,
            together.len(),
            mean / 1024.0
        ));
        Ok(MemoryResult {
            memory_mib,
            idle_s: IDLE.as_secs(),
            alone,
            together,
            mean_pss_kib: mean,
            served: true,
        })
    }
    .await;
    for sb in boxes {
        let _ = sb.kill().await;
    }
    r
}
