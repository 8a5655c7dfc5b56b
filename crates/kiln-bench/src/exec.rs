//! Exec round trip (`true`) on a live sandbox: through the HTTP API and directly through
//! the agent (the engine's connection), interleaved.

use std::time::Instant;

use anyhow::ensure;
use kiln_api::ExecRequest;
use kiln_sdk::RunOptions;
use serde::Serialize;

use crate::creates::{engine_create, http_create};
use crate::report::Row;
use crate::stats::{ratio, Stats};
use crate::{say, Ctx, Plan};

#[derive(Debug, Serialize)]
pub struct ExecResult {
    agent: Stats,
    http: Stats,
}

pub async fn exec_bench(plan: &Plan, ctx: &Ctx) -> anyhow::Result<ExecResult> {
    say(format!(
        "exec round trip (`true`), {} each through the agent and the HTTP API (interleaved)",
        plan.exec_iters
    ));
    let (_, id) = engine_create(ctx, "exec-agent").await?;
    let agent = ctx.engine.sandbox_for_team(&ctx.team_id, &id).await?;
    let result = async {
        let (_, sb) = http_create(ctx, "exec-http").await?;
        let r = async {
            for _ in 0..5 {
                agent.exec(&ExecRequest::new("true")).await?;
                sb.commands().run("true", RunOptions::default()).await?;
            }
            let (mut a, mut h) = (Vec::new(), Vec::new());
            for _ in 0..plan.exec_iters {
                let t = Instant::now();
                let out = agent.exec(&ExecRequest::new("true")).await?;
                a.push(t.elapsed());
                ensure!(
                    out.exit_code == 0,
                    "`true` via the agent: {}",
                    out.exit_code
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
    ctx.engine.kill_sandbox(&ctx.team_id, &id).await?;
    result
}

/// The section's rows: the agent directly (the peer), then the HTTP API against it.
pub fn exec_rows(rows: &mut Vec<Row>, exec: &ExecResult) {
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
}
