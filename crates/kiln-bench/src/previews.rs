//! Preview URLs: the time to first byte of the template's page through the preview proxy
//! (`kiln serve`, then the sandbox's agent, then the guest's loopback) against the same
//! request made from inside the sandbox, and a 100 MiB download both ways; interleaved
//! rounds, so both see the same host load.

use std::time::Instant;

use anyhow::{ensure, Context as _};
use kiln_sdk::{PortAccess, RunOptions, Sandbox};
use serde::Serialize;

use crate::creates::http_create;
use crate::report::Row;
use crate::stats::{ratio, Stats};
use crate::{say, Ctx, Plan, PAGE};

/// The port of the template's web server (see `START_CMD`).
const PORT: u16 = 8000;
/// The download.
const BIG_BYTES: u64 = 100 << 20;
/// Rounds each side's samples are split into, alternating.
const ROUNDS: usize = 4;

#[derive(Debug, Serialize)]
pub struct PreviewResult {
    /// Time to the response head from inside the sandbox (python `http.client` to
    /// 127.0.0.1, a new connection each time: `http.server` closes them).
    inside_ttfb: Stats,
    /// The same through the preview URL (a kept-alive connection to kiln).
    proxy_ttfb: Stats,
    /// 100 MiB from inside the sandbox (`curl -o /dev/null`), per run.
    inside_download: Stats,
    /// 100 MiB through the preview URL, per run.
    proxy_download: Stats,
}

/// The guest side of a round: `n` requests timed by python, as JSON milliseconds.
fn inside_script(n: usize) -> String {
    format!(
        "python3 -c \"import http.client, json, time\n\
         out = []\n\
         for _ in range({n}):\n\
         \x20   c = http.client.HTTPConnection('127.0.0.1', {PORT})\n\
         \x20   t = time.perf_counter()\n\
         \x20   c.request('GET', '/')\n\
         \x20   r = c.getresponse()\n\
         \x20   out.append((time.perf_counter() - t) * 1000)\n\
         \x20   r.read()\n\
         \x20   c.close()\n\
         print(json.dumps(out))\""
    )
}

pub async fn preview_bench(plan: &Plan, ctx: &Ctx) -> anyhow::Result<PreviewResult> {
    let n = plan.exec_iters;
    let downloads = plan.pull_runs.max(1);
    say(format!(
        "preview URLs: time to first byte ({n} each, inside the sandbox and through the proxy), \
         {downloads} x 100 MiB download each way"
    ));
    let (_, sb) = http_create(ctx, "preview").await?;
    let r = measure(ctx, &sb, n, downloads).await;
    sb.kill().await?;
    r
}

async fn measure(
    ctx: &Ctx,
    sb: &Sandbox,
    n: usize,
    downloads: usize,
) -> anyhow::Result<PreviewResult> {
    let port = sb
        .previews()
        .publish(PORT, Some(PortAccess::Public))
        .await?;
    let base = port.url.context("no preview URL in the publish answer")?;
    let server = ctx.client.base_url();
    let addr = format!(
        "{}:{}",
        server.host_str().context("server host")?,
        server.port_or_known_default().context("server port")?
    )
    .parse()?;
    let host = reqwest::Url::parse(&base)?
        .host_str()
        .context("preview host")?
        .to_owned();
    // The preview host resolves to kiln's listener, as `*.localhost` does in a browser.
    let http = reqwest::Client::builder()
        .resolve(&host, addr)
        .no_proxy()
        .build()?;
    let run = |cmd: String| async move {
        let out = sb.commands().run(&cmd, RunOptions::default()).await?;
        ensure!(out.exit_code == 0, "{cmd}: {}", out.stderr);
        Ok(out.stdout)
    };
    run(format!(
        "head -c {BIG_BYTES} /dev/zero > /srv/big.bin && sync"
    ))
    .await?;

    // Warm both paths (the proxy's connection pool, the guest's page cache).
    for _ in 0..5 {
        let page = http.get(format!("{base}/")).send().await?.text().await?;
        ensure!(page.contains(PAGE), "the preview answered {page:?}");
    }
    serde_json::from_str::<Vec<f64>>(&run(inside_script(5)).await?)?;

    let (mut inside, mut proxy) = (Vec::new(), Vec::new());
    let per_round = n.div_ceil(ROUNDS);
    for _ in 0..ROUNDS {
        let got: Vec<f64> = serde_json::from_str(run(inside_script(per_round)).await?.trim())?;
        inside.extend(got);
        for _ in 0..per_round {
            let t = Instant::now();
            let resp = http.get(format!("{base}/")).send().await?;
            proxy.push(t.elapsed().as_secs_f64() * 1000.0);
            ensure!(resp.status().is_success(), "preview: {}", resp.status());
            resp.bytes().await?;
        }
    }

    let (mut inside_dl, mut proxy_dl) = (Vec::new(), Vec::new());
    for _ in 0..downloads {
        let secs: f64 = run(format!(
            "curl -fsS -o /dev/null -w '%{{time_total}}' http://127.0.0.1:{PORT}/big.bin"
        ))
        .await?
        .trim()
        .parse()?;
        inside_dl.push(secs * 1000.0);
        let t = Instant::now();
        let mut resp = http.get(format!("{base}/big.bin")).send().await?;
        let mut got = 0u64;
        while let Some(chunk) = resp.chunk().await? {
            got += chunk.len() as u64;
        }
        proxy_dl.push(t.elapsed().as_secs_f64() * 1000.0);
        ensure!(
            got == BIG_BYTES,
            "the download through the proxy got {got} bytes"
        );
    }
    Ok(PreviewResult {
        inside_ttfb: Stats::from_ms(&inside),
        proxy_ttfb: Stats::from_ms(&proxy),
        inside_download: Stats::from_ms(&inside_dl),
        proxy_download: Stats::from_ms(&proxy_dl),
    })
}

/// MiB/s of a 100 MiB download that took `ms`.
fn mib_per_s(ms: f64) -> f64 {
    (BIG_BYTES as f64 / f64::from(1 << 20)) / (ms / 1000.0)
}

/// The section's rows: each figure from inside the sandbox (the peer), then through the
/// proxy against it (a download's ratio is of its time: 2.0x is half the throughput).
pub fn preview_rows(rows: &mut Vec<Row>, p: &PreviewResult) {
    let section = "Preview URLs (the template's page, `python3 -m http.server`)";
    rows.push(
        Row::stats(
            section,
            "time to first byte, inside the sandbox (http.client to 127.0.0.1)",
            &p.inside_ttfb,
        )
        .vs(1.0, "peer"),
    );
    rows.push(
        Row::stats(
            section,
            "time to first byte, through the preview URL (kiln serve -> agent)",
            &p.proxy_ttfb,
        )
        .vs(ratio(p.proxy_ttfb.p50_ms, p.inside_ttfb.p50_ms), "inside"),
    );
    let inside = format!(
        "100 MiB download, inside the sandbox (curl; {:.0} MiB/s)",
        mib_per_s(p.inside_download.p50_ms)
    );
    rows.push(Row::stats(section, &inside, &p.inside_download).vs(1.0, "peer"));
    let proxy = format!(
        "100 MiB download, through the preview URL ({:.0} MiB/s)",
        mib_per_s(p.proxy_download.p50_ms)
    );
    rows.push(Row::stats(section, &proxy, &p.proxy_download).vs(
        ratio(p.proxy_download.p50_ms, p.inside_download.p50_ms),
        "inside",
    ));
}
