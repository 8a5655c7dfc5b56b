//! Times kiln's pull + unpack against `skopeo copy` + `umoci unpack` of the same images
//! from the local test registry, cold and warm, and prints a table with ratios.
//!
//!     scripts/test-registry.sh start
//!     cargo run --release -p kiln-oci --example bench_pull [-- RUNS]
//!
//! Cold: empty cache. Warm: blobs cached (kiln also reuses its unpacked rootfs; the
//! "warm blobs, fresh unpack" row removes it first, to compare unpacking alone, as umoci
//! always unpacks again).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use kiln_oci::{ImageStore, RegistryConfig};

type BoxResult<T> = Result<T, Box<dyn std::error::Error>>;

fn registry() -> BoxResult<String> {
    let assets =
        std::env::var("KILN_TEST_ASSETS").unwrap_or_else(|_| "/var/tmp/kiln-test-assets".into());
    let text = std::fs::read_to_string(Path::new(&assets).join("registry.env"))
        .map_err(|e| format!("no test registry ({e}): run scripts/test-registry.sh start"))?;
    text.lines()
        .find_map(|l| l.strip_prefix("KILN_TEST_REGISTRY=").map(str::to_owned))
        .ok_or_else(|| "KILN_TEST_REGISTRY missing from registry.env".into())
}

fn run(cmd: &mut Command) -> BoxResult<()> {
    let out = cmd.output()?;
    if !out.status.success() {
        return Err(format!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr)).into());
    }
    Ok(())
}

fn rm(p: &Path) {
    let _ = std::fs::remove_dir_all(p);
}

async fn kiln(state: &Path, reference: &str, keep_rootfs: bool) -> BoxResult<Duration> {
    if !keep_rootfs {
        rm(&state.join("images"));
    }
    let store = ImageStore::open(state, RegistryConfig::default())?;
    let t = Instant::now();
    let image = store.resolve(reference).await?;
    let t1 = t.elapsed();
    store.pull(&image, &|_| {}).await?;
    let t2 = t.elapsed();
    store.unpack(&image, &|_| {}).await?;
    let t3 = t.elapsed();
    if std::env::var_os("BENCH_VERBOSE").is_some() {
        eprintln!(
            "  kiln {reference}: resolve {t1:.2?}, pull {:.2?}, unpack {:.2?}",
            t2 - t1,
            t3 - t2
        );
    }
    Ok(t3)
}

fn skopeo_umoci(work: &Path, reference: &str, fresh_layout: bool) -> BoxResult<Duration> {
    let layout = work.join("layout");
    let bundle = work.join("bundle");
    if fresh_layout {
        rm(&layout);
    }
    rm(&bundle);
    std::fs::create_dir_all(work)?;
    let t = Instant::now();
    run(Command::new("skopeo").args([
        "copy",
        "--quiet",
        "--src-tls-verify=false",
        &format!("docker://{reference}"),
        &format!("oci:{}:img", layout.display()),
    ]))?;
    run(Command::new("umoci")
        .args(["unpack", "--image", &format!("{}:img", layout.display())])
        .arg(&bundle))?;
    Ok(t.elapsed())
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[tokio::main]
async fn main() -> BoxResult<()> {
    let runs: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let reg = registry()?;
    let base = Path::new("/var/tmp/kiln-bench");
    rm(base);
    std::fs::create_dir_all(base)?;
    println!("median of {runs} runs, registry {reg}");
    println!(
        "{:<28} {:<22} {:>10} {:>14} {:>8}",
        "image", "case", "kiln", "skopeo+umoci", "ratio"
    );
    for name in ["kiln/minbase-docker", "kiln/python"] {
        let reference = format!("{reg}/{name}:latest");
        let (mut kc, mut kw, mut kwu, mut sc, mut sw) = (vec![], vec![], vec![], vec![], vec![]);
        for _ in 0..runs {
            let state = base.join("kiln-state");
            rm(&state);
            kc.push(kiln(&state, &reference, false).await?);
            kw.push(kiln(&state, &reference, true).await?);
            kwu.push(kiln(&state, &reference, false).await?);
            let work = base.join("skopeo");
            sc.push(skopeo_umoci(&work, &reference, true)?);
            sw.push(skopeo_umoci(&work, &reference, false)?);
        }
        let (kc, kw, kwu, sc, sw) = (median(kc), median(kw), median(kwu), median(sc), median(sw));
        let row = |case: &str, k: Duration, s: Duration| {
            println!(
                "{:<28} {:<22} {:>9.2}s {:>13.2}s {:>7.2}x",
                name,
                case,
                k.as_secs_f64(),
                s.as_secs_f64(),
                s.as_secs_f64() / k.as_secs_f64().max(1e-6)
            );
        };
        row("cold", kc, sc);
        row("warm blobs, fresh unpack", kwu, sw);
        row("warm (kiln reuses rootfs)", kw, sw);
    }
    println!("ratio = skopeo+umoci time / kiln time (higher is better for kiln)");
    rm(base);
    Ok(())
}
