//! `kiln image`: pull, inspect, list and prune base images in the local store.
//!
//! Scripts read two things: the last stdout line of `pull` (the resolved digest) and, on
//! failure, the last stderr line (`<code>: <detail>`, the same string a failed build
//! carries). Progress bars go to stderr so they never mix with either.

use std::collections::HashMap;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::Context as _;
use clap::Subcommand;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use kiln_oci::{ImageStore, OciError, Progress, RegistryConfig};

/// Pull, inspect, list and prune base images.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: ImageCommand,
}

#[derive(Debug, Subcommand)]
enum ImageCommand {
    /// Resolve, pull, unpack and vet an image; prints its digest as the last stdout line.
    Pull {
        /// Image reference (`debian:12`, `127.0.0.1:5000/kiln/minbase`, `x@sha256:...`).
        reference: String,
        /// Also check that the flattened image fits in a disk of this many MiB.
        #[arg(long)]
        disk_mib: Option<u64>,
    },
    /// Print an image's digest, platform, layers and config as JSON.
    Inspect {
        /// Image reference.
        reference: String,
    },
    /// List pulled images.
    Ls {
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Remove images and blobs not reachable from the kept digests.
    Prune {
        /// Digest to keep (repeatable); nothing kept by default.
        #[arg(long = "keep", value_name = "DIGEST")]
        keep: Vec<String>,
    },
}

/// Runs `kiln image ...`. Failures are reported here as `<code>: <detail>`.
pub fn run(args: Args, state_dir: &Path) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start tokio runtime")?;
    match rt.block_on(run_async(args, state_dir)) {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(err) => {
            match err.downcast_ref::<OciError>() {
                Some(e) => eprintln!("{}: {}", e.code(), e.detail()),
                None => eprintln!("{}: {err:#}", kiln_spec::BuildErrorCode::BuildFailed),
            }
            Ok(ExitCode::FAILURE)
        }
    }
}

async fn run_async(args: Args, state_dir: &Path) -> anyhow::Result<()> {
    let config = RegistryConfig::load(Some(&kiln_engine::registry_config_path(state_dir)))?;
    let store = ImageStore::open(state_dir, config)?;
    match args.command {
        ImageCommand::Pull {
            reference,
            disk_mib,
        } => {
            let bars = Bars::new();
            let prepared = store
                .prepare(&reference, disk_mib, &|p| bars.update(p))
                .await;
            bars.finish();
            let p = prepared?;
            eprintln!(
                "{}: {} layers, {} downloaded, rootfs {} ({} MiB)",
                p.image.reference,
                p.image.layers.len(),
                human(p.pull.bytes_downloaded),
                p.unpacked.rootfs.display(),
                p.vet.size_bytes.div_ceil(1 << 20)
            );
            println!("{}", p.image.digest);
        }
        ImageCommand::Inspect { reference } => {
            let image = store.resolve(&reference).await?;
            let json = serde_json::json!({
                "reference": image.reference,
                "digest": image.digest,
                "manifest_digest": image.manifest_digest,
                "platform": image.platform,
                "config_digest": image.config_digest,
                "compressed_size": image.compressed_size(),
                "layers": image.layers.iter().map(|l| serde_json::json!({
                    "digest": l.digest, "size": l.size, "media_type": l.media_type,
                })).collect::<Vec<_>>(),
                "config": image.config,
                "pulled": store.find_local(&image.manifest_digest)?.is_some(),
            });
            println!("{}", serde_json::to_string_pretty(&json)?);
        }
        ImageCommand::Ls { json: true } => {
            let all: Vec<_> = store
                .list()?
                .iter()
                .map(|i| {
                    serde_json::json!({
                        "reference": i.reference, "digest": i.digest,
                        "manifest_digest": i.manifest_digest, "platform": i.platform,
                        "compressed_size": i.compressed_size(),
                    })
                })
                .collect();
            println!("{}", serde_json::to_string_pretty(&all)?);
        }
        ImageCommand::Ls { json: false } => {
            println!("{:<50} {:<20} {:>10}", "REFERENCE", "DIGEST", "SIZE");
            for i in store.list()? {
                println!(
                    "{:<50} {:<20} {:>10}",
                    i.reference,
                    &i.digest[..19.min(i.digest.len())],
                    human(i.compressed_size())
                );
            }
        }
        ImageCommand::Prune { keep } => {
            drop(store);
            let engine =
                kiln_engine::Engine::open(crate::engine_config(state_dir.to_owned())).await?;
            let p = engine.prune_images(&keep).await?;
            println!(
                "removed {} images, {} blobs ({})",
                p.images.images_removed,
                p.images.blobs_removed,
                human(p.images.blob_bytes_freed)
            );
            // Build VMs read their step layers through the cache's paths: the cache
            // goes only when no build is under way.
            match p.step_cache_freed {
                Some(freed) => println!("removed the step cache ({})", human(freed)),
                None => println!(
                    "step cache kept: {} builds are not finished",
                    p.builds_running
                ),
            }
        }
    }
    Ok(())
}

fn human(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// One bar per downloading blob and a spinner while unpacking, all on stderr.
struct Bars {
    multi: MultiProgress,
    bars: Mutex<HashMap<String, ProgressBar>>,
    unpack: Mutex<Option<ProgressBar>>,
}

impl Bars {
    fn new() -> Self {
        Self {
            multi: MultiProgress::with_draw_target(ProgressDrawTarget::stderr()),
            bars: Mutex::new(HashMap::new()),
            unpack: Mutex::new(None),
        }
    }

    fn update(&self, p: Progress) {
        let mut bars = self.bars.lock().unwrap_or_else(|e| e.into_inner());
        match p {
            Progress::BlobStarted {
                digest,
                size,
                cached,
            } => {
                let short = digest.get(7..19).unwrap_or(&digest).to_owned();
                let bar = self.multi.add(ProgressBar::new(size));
                bar.set_style(
                    ProgressStyle::with_template("{prefix} [{bar:30}] {bytes}/{total_bytes} {msg}")
                        .unwrap_or_else(|_| ProgressStyle::default_bar())
                        .progress_chars("=> "),
                );
                bar.set_prefix(short);
                if cached {
                    bar.set_position(size);
                    bar.finish_with_message("cached");
                }
                bars.insert(digest, bar);
            }
            Progress::BlobBytes { digest, bytes } => {
                if let Some(b) = bars.get(&digest) {
                    b.inc(bytes);
                }
            }
            Progress::BlobDone { digest } => {
                if let Some(b) = bars.get(&digest) {
                    if !b.is_finished() {
                        b.finish_with_message("done");
                    }
                }
            }
            Progress::Unpacking { index, count } => {
                let mut u = self.unpack.lock().unwrap_or_else(|e| e.into_inner());
                let bar = u.get_or_insert_with(|| {
                    let b = self.multi.add(ProgressBar::new_spinner());
                    b.enable_steady_tick(Duration::from_millis(120));
                    b
                });
                bar.set_message(format!("unpacking {count} layers ({})", index + 1));
            }
        }
    }

    fn finish(&self) {
        if let Some(b) = self.unpack.lock().unwrap_or_else(|e| e.into_inner()).take() {
            b.finish_and_clear();
        }
        let _ = self.multi.clear();
    }
}
