//! A build's phases, from its log (kiln-build's system lines and their timestamps):
//!
//! ```text
//! resolving REF                         start of the pipeline
//! pulling|cached layer ...
//! image REF resolved to DIGEST
//! booting build VM (...)                image ready; ext4 disk + boot begin
//! build VM up in X.Xs                   disk + boot
//! step 1/N: ...                         the user's steps begin
//!   (their stdout/stderr)
//! starting: CMD | waiting for ready: CMD | snapshotting    the steps are over
//! ready after K probe(s), X.Xs
//! snapshotting
//! snapshot taken in X.XXs (SIZE, ...)
//! done in X.Xs                          the pipeline's total
//! ```

use chrono::{DateTime, Utc};
use serde::Serialize;

/// One log line: when, whether kiln wrote it, what it says.
#[derive(Debug, Clone)]
pub struct Line {
    /// Timestamp.
    pub at: DateTime<Utc>,
    /// kiln's own line (not a step's output).
    pub system: bool,
    /// The text.
    pub text: String,
}

/// A build's time, split by phase (milliseconds).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Phases {
    /// "done in": the pipeline from resolving the image to the snapshot.
    pub total_ms: f64,
    /// Resolve + pull + unpack + vet (resolving -> booting build VM).
    pub image_ms: f64,
    /// ext4 disk + boot to agent-ready ("build VM up in").
    pub vm_up_ms: f64,
    /// Inside the user's steps (first "step 1/" line -> the next kiln line after them).
    pub steps_ms: f64,
    /// startCmd started -> readyCmd first exits 0 (probes every 2 s).
    pub start_ready_ms: f64,
    /// "snapshot taken in".
    pub snapshot_ms: f64,
    /// `total - steps`: the build overhead as the issue defines it.
    pub overhead_ms: f64,
    /// `total - steps - start_ready`: what kiln adds around everything the spec runs.
    pub overhead_excl_start_ready_ms: f64,
}

fn secs_after(text: &str, prefix: &str) -> Option<f64> {
    let rest = text.strip_prefix(prefix)?;
    let num: String = rest
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    num.parse::<f64>().ok().map(|s| s * 1000.0)
}

fn between(a: Option<DateTime<Utc>>, b: Option<DateTime<Utc>>) -> f64 {
    match (a, b) {
        (Some(a), Some(b)) => (b - a).num_microseconds().unwrap_or(0) as f64 / 1000.0,
        _ => 0.0,
    }
}

/// Splits a finished build's log into phases; `None` when it has no "done in" line.
pub fn phases(lines: &[Line]) -> Option<Phases> {
    let sys = |pred: &dyn Fn(&str) -> bool| {
        lines
            .iter()
            .find(|l| l.system && pred(&l.text))
            .map(|l| l.at)
    };
    let total_ms = lines
        .iter()
        .filter(|l| l.system)
        .find_map(|l| secs_after(&l.text, "done in "))?;
    let resolving = sys(&|t| t.starts_with("resolving "));
    let booting = sys(&|t| t.starts_with("booting build VM"));
    let vm_up_ms = lines
        .iter()
        .filter(|l| l.system)
        .find_map(|l| secs_after(&l.text, "build VM up in "))
        .unwrap_or(0.0);
    let first_step = lines
        .iter()
        .position(|l| l.system && l.text.starts_with("step 1/"));
    let steps_ms = match first_step {
        None => 0.0,
        Some(i) => {
            let end = lines[i + 1..]
                .iter()
                .find(|l| {
                    l.system
                        && (l.text.starts_with("starting: ")
                            || l.text.starts_with("waiting for ready: ")
                            || l.text == "snapshotting")
                })
                .map(|l| l.at);
            between(Some(lines[i].at), end)
        }
    };
    let start_ready_ms = between(
        sys(&|t| t.starts_with("starting: ") || t.starts_with("waiting for ready: ")),
        sys(&|t| t.starts_with("ready after ") || t == "snapshotting"),
    );
    let snapshot_ms = lines
        .iter()
        .filter(|l| l.system)
        .find_map(|l| secs_after(&l.text, "snapshot taken in "))
        .unwrap_or(0.0);
    Some(Phases {
        total_ms,
        image_ms: between(resolving, booting),
        vm_up_ms,
        steps_ms,
        start_ready_ms,
        snapshot_ms,
        overhead_ms: total_ms - steps_ms,
        overhead_excl_start_ready_ms: total_ms - steps_ms - start_ready_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(s: f64, system: bool, text: &str) -> Line {
        let base = DateTime::<Utc>::from_timestamp(1_700_000_000, 0).unwrap();
        Line {
            at: base + chrono::Duration::milliseconds((s * 1000.0) as i64),
            system,
            text: text.into(),
        }
    }

    #[test]
    fn splits_a_build_log() {
        let log = vec![
            line(0.0, true, "resolving 127.0.0.1:5000/kiln/python:latest"),
            line(0.1, true, "pulling layer 0123456789ab (50.0 MiB)"),
            line(2.0, true, "image x resolved to sha256:abc"),
            line(
                2.0,
                true,
                "booting build VM (1 vCPU, 1024 MiB memory, 4096 MiB disk)",
            ),
            line(9.5, true, "build VM up in 7.5s"),
            line(9.6, true, "step 1/2: run `echo hi`"),
            line(9.7, false, "hi"),
            line(10.0, true, "step 2/2: workdir /srv"),
            line(11.6, true, "starting: python3 -m http.server"),
            line(11.7, true, "started (pid 42)"),
            line(
                11.7,
                true,
                "waiting for ready: curl -fsS http://127.0.0.1:8000/",
            ),
            line(15.7, true, "ready after 3 probe(s), 4.0s"),
            line(15.8, true, "snapshotting"),
            line(
                16.8,
                true,
                "snapshot taken in 1.00s (1.2 GiB, 300.0 MiB allocated; device state 0.01s, \
                 disk 0.20s, digests 0.30s, sync 0.40s)",
            ),
            line(16.9, true, "done in 16.9s"),
        ];
        let p = phases(&log).unwrap();
        assert_eq!(p.total_ms, 16900.0);
        assert_eq!(p.image_ms, 2000.0);
        assert_eq!(p.vm_up_ms, 7500.0);
        assert_eq!(p.steps_ms, 2000.0);
        assert_eq!(p.start_ready_ms, 4100.0);
        assert_eq!(p.snapshot_ms, 1000.0);
        assert_eq!(p.overhead_ms, 14900.0);
        assert_eq!(p.overhead_excl_start_ready_ms, 10800.0);
        assert!(phases(&log[..5]).is_none());
    }
}
