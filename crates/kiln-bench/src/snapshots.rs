//! Snapshots of a running sandbox and forks of them: how long the source's guest is
//! stopped for a capture, how long the capture call and the background conversion take,
//! and fork create -> first exec, through the engine and the HTTP API, each against
//! template create -> first exec of the same path in the same run.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _};
use kiln_api::{CreateSandbox, CreateSnapshot, ExecRequest, SnapshotStatus};
use kiln_sdk::{RunOptions, Sandbox, SandboxCreateOptions};
use serde::Serialize;

use crate::creates::{engine_create, CreateResults, CreateSample};
use crate::report::Row;
use crate::stats::{ratio, Stats};
use crate::{say, Ctx, Failures, Plan};

#[derive(Debug, Serialize)]
pub struct SnapshotResults {
    /// The source's guest stopped: QMP `stop` -> `cont`.
    frozen: Stats,
    /// The capture call, disk layer and digests included (the source runs on meanwhile).
    capture: Stats,
    /// Capture returned -> `ready` (made forkable in the background).
    to_ready: Stats,
    /// Bytes a snapshot takes (what it adds to the template's artifact).
    size_bytes: Vec<u64>,
    engine_fork: Stats,
    http_fork: Stats,
}

/// A fork through the engine: create -> first `true` completed; killed afterwards.
async fn engine_fork(ctx: &Ctx, snapshot: &str, label: &str) -> anyhow::Result<CreateSample> {
    let req = CreateSandbox::from_snapshot(label, snapshot);
    let t = Instant::now();
    let up = ctx.engine.create_sandbox(&ctx.team_id, &req).await?;
    let created = t.elapsed();
    let id = up.sandbox.sandbox.id;
    let out = ctx
        .engine
        .sandbox_for_team(&ctx.team_id, &id)
        .await?
        .exec(&ExecRequest::new("true"))
        .await;
    let first_exec = t.elapsed();
    ctx.engine.kill_sandbox(&ctx.team_id, &id).await?;
    ensure!(out?.exit_code == 0, "`true` failed in a fork");
    Ok(CreateSample::new(created, first_exec))
}

/// A fork through the HTTP API (kiln-sdk): create -> first `true` completed; killed.
async fn http_fork(ctx: &Ctx, snapshot: &str, label: &str) -> anyhow::Result<CreateSample> {
    let t = Instant::now();
    let sb = Sandbox::create(
        &ctx.client,
        SandboxCreateOptions::from_snapshot(label, snapshot),
    )
    .await?;
    let created = t.elapsed();
    let r = sb.commands().run("true", RunOptions::default()).await;
    let first_exec = t.elapsed();
    sb.kill().await?;
    ensure!(r?.exit_code == 0, "`true` failed in a fork");
    Ok(CreateSample::new(created, first_exec))
}

pub async fn snapshot_bench(
    plan: &Plan,
    ctx: &Ctx,
    failures: &mut Failures,
) -> anyhow::Result<SnapshotResults> {
    say(format!(
        "snapshots: {} captures of a running sandbox, {} forks each through the engine and the HTTP API",
        plan.snapshots, plan.snapshots
    ));
    let (_, source) = engine_create(ctx, "snap-source").await?;
    let r = async {
        let (mut frozen, mut capture, mut to_ready, mut sizes) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut last = None;
        for i in 0..plan.snapshots {
            // The source changes between captures, as a user's sandbox would.
            ctx.engine
                .sandbox_for_team(&ctx.team_id, &source)
                .await?
                .exec(&ExecRequest::new(format!(
                    "head -c 4M /dev/urandom > /tmp/churn-{i}"
                )))
                .await?;
            let t = Instant::now();
            let taken = ctx
                .engine
                .create_snapshot(&ctx.team_id, &source, &CreateSnapshot::default())
                .await?;
            capture.push(t.elapsed());
            frozen.push(taken.frozen_time.context("a running sandbox's capture")?);
            let t = Instant::now();
            let s = ctx
                .engine
                .wait_snapshot(&ctx.team_id, &taken.snapshot.id, Duration::from_secs(300))
                .await?;
            ensure!(
                s.status == SnapshotStatus::Ready,
                "snapshot {}: {:?}",
                s.id,
                s.status
            );
            to_ready.push(t.elapsed());
            sizes.push(s.size_bytes);
            if let Some(old) = last.replace(s.id) {
                ctx.engine.delete_snapshot(&ctx.team_id, &old).await?;
            }
        }
        let snap = last.context("no snapshot")?;
        let (mut engine, mut http) = (Vec::new(), Vec::new());
        for i in 0..plan.snapshots {
            match engine_fork(ctx, &snap, &format!("fork-e{i}")).await {
                Ok(s) => engine.push(s),
                Err(e) => failures.note("engine fork", &e),
            }
            match http_fork(ctx, &snap, &format!("fork-h{i}")).await {
                Ok(s) => http.push(s),
                Err(e) => failures.note("http fork", &e),
            }
        }
        failures.check("engine fork", plan.snapshots, engine.len())?;
        failures.check("http fork", plan.snapshots, http.len())?;
        ctx.engine.delete_snapshot(&ctx.team_id, &snap).await?;
        let first = |v: &[CreateSample]| {
            Stats::from_durations(&v.iter().map(|s| s.first_exec).collect::<Vec<_>>())
        };
        Ok(SnapshotResults {
            frozen: Stats::from_durations(&frozen),
            capture: Stats::from_durations(&capture),
            to_ready: Stats::from_durations(&to_ready),
            size_bytes: sizes,
            engine_fork: first(&engine),
            http_fork: first(&http),
        })
    }
    .await;
    ctx.engine.kill_sandbox(&ctx.team_id, &source).await?;
    r
}

/// The section's rows: each figure against template create -> first exec (sequential)
/// of the same path, measured earlier in the run.
pub fn snapshot_rows(rows: &mut Vec<Row>, s: &SnapshotResults, creates: &CreateResults) {
    let section = "Snapshots and forks, sequential";
    let (engine_tpl, http_tpl) = creates.sequential_first_exec_p50();
    let tpl = "template create -> first exec (engine)";
    rows.push(
        Row::stats(
            section,
            "snapshot: the source's guest stopped for the capture",
            &s.frozen,
        )
        .vs(ratio(s.frozen.p50_ms, engine_tpl), tpl),
    );
    rows.push(
        Row::stats(
            section,
            "snapshot: the capture call (disk layer, digests; the source runs on)",
            &s.capture,
        )
        .vs(ratio(s.capture.p50_ms, engine_tpl), tpl),
    );
    rows.push(
        Row::stats(
            section,
            "snapshot: captured -> ready (made forkable, in the background)",
            &s.to_ready,
        )
        .vs(ratio(s.to_ready.p50_ms, engine_tpl), tpl),
    );
    rows.push(
        Row::stats(section, "engine: fork create -> first exec", &s.engine_fork)
            .vs(ratio(s.engine_fork.p50_ms, engine_tpl), tpl),
    );
    rows.push(
        Row::stats(
            section,
            "**HTTP API (kiln-sdk): fork create -> first exec**",
            &s.http_fork,
        )
        .vs(
            ratio(s.http_fork.p50_ms, http_tpl),
            "template create -> first exec (HTTP API)",
        ),
    );
}
