//! `kiln-bench`: issue 8's benchmark harness. One invocation measures, side by side on the
//! same template and host, and writes `bench.json` plus `bench.md`:
//!
//! - sandbox create -> first exec completed (p50/p99, sequential and N at a time), through
//!   the HTTP API with kiln-sdk (a `kiln serve` child process, as users see it) and through
//!   the engine in this process ([`kiln_engine::Engine::create_sandbox`]);
//! - the floor: the same snapshot restored by bare QEMU (`-incoming`), interleaved with
//!   the kiln samples so that both see the same host load;
//! - the ceiling: the cold path (boot from the template's disk, startCmd, readyCmd);
//! - what the jailer costs a restore (jailed vs `KILN_JAIL=off`, interleaved);
//! - exec round trip (`true`) through the HTTP API and directly through the agent;
//! - preview URLs: time to first byte and a 100 MiB download through the preview proxy,
//!   against the same requests made from inside the sandbox;
//! - template build overhead (total minus the user's steps), cold and with a warm image
//!   cache, from the build logs;
//! - pull + unpack against `skopeo copy` + `umoci unpack` of the same image;
//! - host memory (PSS) per idle sandbox of the template (python3 -m http.server);
//! - snapshots of a running sandbox (the source's guest stopped for the capture, the
//!   capture call, the background conversion) and fork create -> first exec, against
//!   template create -> first exec.
//!
//! Run it through `scripts/bench.sh`, which builds it and sets up what it needs.

mod bare;
mod buildlog;
mod builds;
mod capture;
mod cold_path;
mod creates;
mod exec;
mod jail;
mod mem;
mod memory;
mod previews;
mod procs;
mod pulls;
mod report;
mod setup;
mod snapshots;
mod stats;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _};
use clap::Parser;
use kiln_engine::{Engine, EngineConfig, Owner};
use kiln_sdk::Client;
use kiln_vm::{ExecRequest, Manifest};
use serde::Serialize;
use serde_json::json;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::Layer as _;

use crate::report::{Row, Target};

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
    /// Snapshots of a running sandbox, and forks through each path [default: 5; quick: 2].
    #[arg(long)]
    snapshots: Option<usize>,
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
    snapshots: usize,
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
            snapshots: a.snapshots.unwrap_or(if q { 2 } else { 5 }).max(1),
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

/// Everything one run shares; cheap to clone into a spawned task.
#[derive(Clone)]
struct Ctx {
    engine: Arc<Engine>,
    team_id: String,
    client: Client,
    template: String,
    bundle: PathBuf,
    manifest: Manifest,
    bare_dir: PathBuf,
}

async fn run(args: Args) -> anyhow::Result<()> {
    let plan = Plan::new(&args);
    let assets = setup::assets_dir();
    let registry = setup::registry(args.registry.as_deref(), &assets)?;
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
    let commit = setup::git(&["rev-parse", "--short", "HEAD"]).unwrap_or_else(|| "unknown".into());
    let dirty = setup::git(&["status", "--porcelain", "--untracked-files=no"])
        .is_some_and(|s| !s.is_empty());
    let load_start = setup::load_avg();

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
    let state = setup::RunDir {
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
    let api_key = engine.create_api_key("bench").await?;
    let team_id = engine
        .authenticate(&api_key)
        .await?
        .context("team bench")?
        .id;
    let server = procs::Server::start(
        &kiln_bin,
        &state.path,
        &state.path.join("server.log"),
        plan.restore_pool,
        &registry,
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

    let load_end = setup::load_avg();
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
            "qemu": setup::tool_version("qemu-system-x86_64"),
            "skopeo": setup::tool_version("skopeo"),
            "umoci": setup::tool_version("umoci"),
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
            "snapshots": plan.snapshots,
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
    let cold = builds::build(client, name, image, "cold", builds::SECOND_STEP).await?;
    let warm = builds::build(
        client,
        "bench-http-warm",
        image,
        "warm",
        builds::SECOND_STEP,
    )
    .await?;
    // The warm template's steps with only the last one changed: the step cache replays
    // just that step on the disk the first one left.
    let replay = builds::build(
        client,
        "bench-http-warm",
        image,
        "warm",
        builds::SECOND_STEP_CHANGED,
    )
    .await?;
    let tpl = engine.template(team_id, name).await?;
    let bundle = engine.template_bundle(team_id, name).await?;
    let manifest = bare::manifest(&bundle)?;
    let memory_mib = tpl.memory_mib;
    builds::build_rows(&mut rows, &cold, &warm, &replay);
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
    let pull = pulls::pull_bench(plan, registry, state).await?;
    pulls::pull_rows(&mut rows, &pull);
    results.insert("pull".into(), serde_json::to_value(&pull)?);

    // ---- create -> first exec, with the bare floor interleaved -----------------------
    let creates = creates::create_bench(plan, &ctx, failures).await?;
    // ---- the ceiling ---------------------------------------------------------------
    let cold_path = cold_path::cold_path_bench(plan, &ctx, failures).await?;
    creates::create_rows(&mut rows, &mut targets, plan, &creates, &cold_path);
    results.insert("create".into(), serde_json::to_value(&creates)?);
    results.insert("cold_path".into(), serde_json::to_value(&cold_path)?);

    // ---- snapshots and forks, against the creates above ----------------------------
    let snaps = snapshots::snapshot_bench(plan, &ctx, failures).await?;
    snapshots::snapshot_rows(&mut rows, &snaps, &creates);
    results.insert("snapshots".into(), serde_json::to_value(&snaps)?);

    // ---- the jailer's cost on restore -------------------------------------------------
    let jail = jail::jail_bench(plan, &ctx, failures).await?;
    jail::jail_rows(&mut rows, &jail);
    results.insert("jail".into(), serde_json::to_value(&jail)?);

    // ---- exec round trip -----------------------------------------------------------
    let exec = exec::exec_bench(plan, &ctx).await?;
    exec::exec_rows(&mut rows, &exec);
    results.insert("exec".into(), serde_json::to_value(&exec)?);

    // ---- preview URLs ------------------------------------------------------------------
    let preview = previews::preview_bench(plan, &ctx).await?;
    previews::preview_rows(&mut rows, &preview);
    results.insert("preview".into(), serde_json::to_value(&preview)?);

    // ---- memory ----------------------------------------------------------------------
    let memory = memory::memory_bench(plan, &ctx, memory_mib).await?;
    memory::memory_rows(&mut rows, &mut targets, &memory, memory_mib);
    results.insert("memory".into(), serde_json::to_value(&memory)?);

    Ok((rows, targets, serde_json::Value::Object(results)))
}
