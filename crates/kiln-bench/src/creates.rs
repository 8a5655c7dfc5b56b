//! Sandbox create -> first exec completed, sequential and N at a time: through the engine
//! in this process, through the HTTP API (kiln-sdk against the `kiln serve` child), and
//! the bare-QEMU floor ([`crate::bare`]), interleaved so that all three see the same host
//! load.

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure};
use kiln_api::{CreateSandbox, ExecRequest};
use kiln_sdk::{RunOptions, Sandbox, SandboxCreateOptions};
use serde::Serialize;

use crate::cold_path::ColdPath;
use crate::report::{Row, Target};
use crate::stats::{ratio, Stats};
use crate::{bare, capture, say, Ctx, Failures, Plan};

/// One kiln create: create returned, first exec returned.
#[derive(Debug, Clone, Copy)]
pub struct CreateSample {
    created: Duration,
    pub first_exec: Duration,
}

impl CreateSample {
    /// A sample from its two times since the create was sent.
    pub fn new(created: Duration, first_exec: Duration) -> Self {
        Self {
            created,
            first_exec,
        }
    }
}

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
pub struct CreateResults {
    sequential: Modes,
    concurrent: Modes,
    parallel: usize,
}

impl CreateResults {
    /// Template create -> first exec, sequential p50: (engine, HTTP API).
    pub fn sequential_first_exec_p50(&self) -> (f64, f64) {
        (
            self.sequential.engine.first_exec.p50_ms,
            self.sequential.http.first_exec.p50_ms,
        )
    }
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

pub async fn engine_create(ctx: &Ctx, label: &str) -> anyhow::Result<(CreateSample, String)> {
    let new = CreateSandbox::new(label, &ctx.template);
    let t = Instant::now();
    let s = ctx.engine.create_sandbox(&ctx.team_id, &new).await?;
    let created = t.elapsed();
    let id = s.sandbox.sandbox.id.clone();
    let exec = async {
        let out = ctx
            .engine
            .sandbox_for_team(&ctx.team_id, &id)
            .await?
            .exec(&ExecRequest::new("true"))
            .await?;
        ensure!(out.exit_code == 0, "`true` ended with {}", out.exit_code);
        Ok::<_, anyhow::Error>(())
    }
    .await;
    let first_exec = t.elapsed();
    if let Err(e) = exec {
        let _ = ctx.engine.kill_sandbox(&ctx.team_id, &id).await;
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

pub async fn http_create(ctx: &Ctx, label: &str) -> anyhow::Result<(CreateSample, Sandbox)> {
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

pub async fn create_bench(
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
    ctx.engine.kill_sandbox(&ctx.team_id, &id).await?;
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
                ctx.engine.kill_sandbox(&ctx.team_id, &id).await?;
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
        let bare = wave(plan.parallel, "bare concurrent", failures, |_| {
            let c = ctx.clone();
            async move { bare::restore(&c.bundle, &c.manifest, &c.bare_dir).await }
        })
        .await;
        conc.bare.extend(bare);
        // Engine: each create in its own task, as the server runs requests.
        let engine = wave(plan.parallel, "engine concurrent", failures, |k| {
            let (c, label) = (ctx.clone(), format!("conc-e{w}-{k}"));
            async move { engine_create(&c, &label).await }
        })
        .await;
        for (s, id) in engine {
            conc.engine.push(s);
            ctx.engine.kill_sandbox(&ctx.team_id, &id).await?;
        }
        // HTTP API: `parallel` requests in flight.
        let http = wave(plan.parallel, "http concurrent", failures, |k| {
            let (c, label) = (ctx.clone(), format!("conc-h{w}-{k}"));
            async move { http_create(&c, &label).await }
        })
        .await;
        for (s, sb) in http {
            conc.http.push(s);
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

/// Runs `parallel` tasks at once (`start(k)` for each k) and waits for all of them; the
/// results of those that succeeded, in the order they finished. Failures are noted under
/// `phase`.
async fn wave<T, F>(
    parallel: usize,
    phase: &str,
    failures: &mut Failures,
    start: impl Fn(usize) -> F,
) -> Vec<T>
where
    T: Send + 'static,
    F: Future<Output = anyhow::Result<T>> + Send + 'static,
{
    let mut set = tokio::task::JoinSet::new();
    for k in 0..parallel {
        set.spawn(start(k));
    }
    let mut done = Vec::new();
    while let Some(r) = set.join_next().await {
        match r.map_err(anyhow::Error::from).and_then(|r| r) {
            Ok(v) => done.push(v),
            Err(e) => failures.note(phase, &e),
        }
    }
    done
}

/// The section's rows (sequential, then N at a time; every figure against the bare floor
/// of its mode; the cold path in the sequential part) and the create targets.
pub fn create_rows(
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
            Row::stats(&s, "engine: `create_sandbox` returned", &m.engine.up)
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
