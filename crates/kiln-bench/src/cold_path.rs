//! The ceiling: the cold path a sandbox would take without a snapshot. A VM boots from the
//! template's disk (a fresh overlay on it), runs the startCmd, waits for the readyCmd, and
//! runs a first exec.

use std::time::{Duration, Instant};

use anyhow::ensure;
use kiln_vm::{ExecRequest, NetConfig, RootDisk, Vm, VmConfig};
use serde::Serialize;

use crate::stats::Stats;
use crate::{req, say, Ctx, Failures, Plan, READY_CMD, START_CMD};

#[derive(Debug, Serialize)]
pub struct ColdPath {
    /// Boot from the template's disk (a fresh overlay on it) to agent-ready.
    pub boot: Stats,
    /// startCmd spawned -> readyCmd first exits 0 (probed every 100 ms).
    pub start_ready: Stats,
    /// Launch -> first `true` completed after ready: the ceiling.
    pub total: Stats,
}

pub async fn cold_path_bench(
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
