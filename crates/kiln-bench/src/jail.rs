//! What the jailer costs a restore: the template's snapshot restored to agent-ready by
//! kiln-vm with its processes jailed ([`kiln_vm::jail`]: a uid lease, a cgroup, a mount
//! and a network namespace per QEMU) and unjailed (`KILN_JAIL=off`), interleaved so that
//! both see the same host load. No egress proxy on either side: QEMU alone.

use std::time::{Duration, Instant};

use kiln_vm::{Jail, RestoreConfig, Vm};
use serde::Serialize;

use crate::report::Row;
use crate::stats::{ratio, Stats};
use crate::{say, Ctx, Failures, Plan};

#[derive(Debug, Serialize)]
pub struct JailCost {
    /// Restore -> agent ready, jailed as the environment says (root: the whole jail).
    pub jailed: Stats,
    /// The same, unjailed.
    pub unjailed: Stats,
}

pub async fn jail_bench(
    plan: &Plan,
    ctx: &Ctx,
    failures: &mut Failures,
) -> anyhow::Result<JailCost> {
    let runs = plan.cold_runs * 2;
    say(format!(
        "jailer cost on restore -> agent ready, {runs} run(s) each, interleaved"
    ));
    let jailed = Jail::from_env()?;
    let off = Jail::off();
    let (mut with, mut without) = (vec![], vec![]);
    for i in 0..runs {
        for (jail, into, label) in [
            (&jailed, &mut with, "jailed"),
            (&off, &mut without, "unjailed"),
        ] {
            match restore_once(ctx, jail, &format!("bench-jail-{label}-{i}")).await {
                Ok(d) => into.push(d),
                Err(e) => failures.note(&format!("jail ({label})"), &e),
            }
        }
    }
    failures.check("jail (jailed)", runs, with.len())?;
    failures.check("jail (unjailed)", runs, without.len())?;
    Ok(JailCost {
        jailed: Stats::from_durations(&with),
        unjailed: Stats::from_durations(&without),
    })
}

async fn restore_once(ctx: &Ctx, jail: &Jail, name: &str) -> anyhow::Result<Duration> {
    let cfg = RestoreConfig::new(name, ctx.engine.layout().root().join("vms"));
    let t = Instant::now();
    let vm = Vm::restore_in(&ctx.bundle, cfg, jail).await?;
    let took = t.elapsed();
    vm.kill().await;
    Ok(took)
}

pub fn jail_rows(rows: &mut Vec<Row>, j: &JailCost) {
    let s = "Jailer cost: kiln-vm restore -> agent ready";
    rows.push(Row::stats(s, "unjailed (`KILN_JAIL=off`)", &j.unjailed).vs(1.0, "unjailed"));
    rows.push(
        Row::stats(s, "jailed (uid, namespaces, cgroup, seccomp)", &j.jailed)
            .vs(ratio(j.jailed.p50_ms, j.unjailed.p50_ms), "unjailed"),
    );
}
