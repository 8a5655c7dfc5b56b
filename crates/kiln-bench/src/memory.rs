//! Host memory (PSS) per idle sandbox of the bench template (python3 -m http.server),
//! one alive and then several at once, read from the sandboxes' QEMU processes
//! ([`crate::mem`]).

use std::time::Duration;

use anyhow::{ensure, Context as _};
use kiln_engine::ENDPOINT_FILE;
use kiln_sdk::{RunOptions, Sandbox};
use serde::Serialize;

use crate::creates::http_create;
use crate::report::{Row, Target, Unit};
use crate::{mem, say, Ctx, Plan, PAGE};

#[derive(Debug, Serialize)]
pub struct MemoryResult {
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

pub async fn memory_bench(plan: &Plan, ctx: &Ctx, memory_mib: u32) -> anyhow::Result<MemoryResult> {
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

/// The section's rows (PSS alone, PSS per sandbox with N alive, RSS alone, each as a share
/// of the template's memoryMib) and the memory target.
pub fn memory_rows(
    rows: &mut Vec<Row>,
    targets: &mut Vec<Target>,
    memory: &MemoryResult,
    memory_mib: u32,
) {
    let mib = |kib: f64| kib / 1024.0;
    // A figure in MiB, as a share of the template's memoryMib.
    let row = |label: &str, n: usize, kib: f64| {
        Row::value(
            "Host memory per idle sandbox (python3 -m http.server)",
            label,
            Some(n),
            mib(kib),
            Unit::Mib,
        )
        .vs(
            mib(kib) / f64::from(memory_mib),
            &format!("memoryMib ({memory_mib})"),
        )
        .percent()
    };
    let n = memory.together.len();
    rows.push(row(
        "PSS, one sandbox alive",
        1,
        memory.alone.pss_kib as f64,
    ));
    rows.push(row(
        &format!("PSS per sandbox, {n} alive (mean)"),
        n,
        memory.mean_pss_kib,
    ));
    rows.push(row(
        "RSS, one sandbox alive",
        1,
        memory.alone.rss_kib as f64,
    ));
    targets.push(Target::check(
        "idle sandbox PSS <= 25 % of memoryMib",
        &format!("mean PSS of {n} idle sandboxes / memoryMib"),
        mib(memory.mean_pss_kib) / f64::from(memory_mib),
        0.25,
    ));
}
