//! Image pull + unpack of the bench image from the local registry, kiln's against
//! `skopeo copy` + `umoci unpack`: cold, and with the blobs (kiln) or the OCI layout (the
//! peer) kept and only the unpack fresh.

use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::report::Row;
use crate::stats::{ratio, Stats};
use crate::{procs, say, Plan};

#[derive(Debug, Serialize)]
pub struct PullResult {
    image: String,
    kiln_cold: Stats,
    peer_cold: Stats,
    kiln_warm_blobs_fresh_unpack: Stats,
    peer_warm_layout_fresh_unpack: Stats,
}

pub async fn pull_bench(plan: &Plan, registry: &str, state: &Path) -> anyhow::Result<PullResult> {
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

/// The section's rows, each kiln figure against its skopeo + umoci peer.
pub fn pull_rows(rows: &mut Vec<Row>, p: &PullResult) {
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
