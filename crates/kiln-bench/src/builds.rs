//! Template builds through the HTTP API: a cold image cache, a warm one, and the warm
//! template with only its last step changed (the step cache replays that step alone);
//! phases from each build's log.

use anyhow::{bail, Context as _};
use kiln_sdk::{Client, Step, Template, TemplateCreateOptions};
use serde::Serialize;

use crate::report::{Row, Unit};
use crate::stats::ratio;
use crate::{buildlog, say, PAGE, READY_CMD, START_CMD};

#[derive(Debug, Serialize)]
pub struct BuildResult {
    template: String,
    /// Build record created -> finalized (server clock): queueing and publishing included.
    wall_ms: f64,
    phases: buildlog::Phases,
    /// The build's log: milliseconds since its first line, kiln's own line or not, text.
    log: Vec<(f64, bool, String)>,
}

/// The bench template's second (last) step, and a variant of it.
pub const SECOND_STEP: &str = "python3 -c 'import http.server, sys; print(sys.version)'";
pub const SECOND_STEP_CHANGED: &str =
    "python3 -c 'import http.server, sys; print(sys.version_info)'";

pub async fn build(
    client: &Client,
    name: &str,
    image: &str,
    label: &str,
    second: &str,
) -> anyhow::Result<BuildResult> {
    say(format!("build ({label} image cache): {name} from {image}"));
    let _ = Template::delete_by_id(client, name).await;
    // The two builds differ in their first step, so that a step cache (issue 8, part 3)
    // cannot turn the warm one into a cache hit: only the image cache is warm.
    let opts = TemplateCreateOptions {
        steps: vec![
            Step::run(format!(
                "mkdir -p /srv && echo '{PAGE}' > /srv/index.html && echo built {label}"
            )),
            Step::run(second),
        ],
        start_cmd: Some(START_CMD.into()),
        ready_cmd: Some(READY_CMD.into()),
        ..TemplateCreateOptions::new(name, image)
    };
    let mut t = Template::create(client, opts).await?;
    let build_id = t
        .info()
        .latest_build_id
        .clone()
        .context("no build id from POST /templates")?;
    let waited = t.wait_until_ready(None).await;
    let mut lines = Vec::new();
    t.stream_build_logs(Some(&build_id), |e| {
        if !e.finished {
            lines.push(buildlog::Line {
                at: e.timestamp,
                system: e.stream == kiln_sdk::LogStream::System,
                text: e.text.clone(),
            });
        }
    })
    .await?;
    if let Err(e) = waited {
        let tail: Vec<&str> = lines
            .iter()
            .rev()
            .take(20)
            .map(|l| l.text.as_str())
            .collect();
        bail!(
            "build of {name} failed: {e}; log tail (newest first):\n{}",
            tail.join("\n")
        );
    }
    let b = t.get_build(&build_id).await?;
    let wall_ms = match b.finalized_at {
        Some(f) => (f - b.created_at).num_milliseconds() as f64,
        None => f64::NAN,
    };
    let phases = buildlog::phases(&lines).context("the build log has no \"done in\" line")?;
    say(format!(
        "  {label}: {:.1}s (steps {:.1}s, image {:.1}s, VM up {:.1}s, start->ready {:.1}s, snapshot {:.1}s)",
        phases.total_ms / 1000.0,
        phases.steps_ms / 1000.0,
        phases.image_ms / 1000.0,
        phases.vm_up_ms / 1000.0,
        phases.start_ready_ms / 1000.0,
        phases.snapshot_ms / 1000.0
    ));
    Ok(BuildResult {
        template: name.into(),
        wall_ms,
        phases,
        log: lines
            .iter()
            .map(|l| {
                let t0 = lines[0].at;
                let ms = (l.at - t0).num_microseconds().unwrap_or(0) as f64 / 1000.0;
                (ms, l.system, l.text.clone())
            })
            .collect(),
    })
}

/// The section's rows: cold and warm image cache, then the build with its last step
/// changed.
pub fn build_rows(
    rows: &mut Vec<Row>,
    cold: &BuildResult,
    warm: &BuildResult,
    last_step_changed: &BuildResult,
) {
    let s = "Template build (HTTP API; phases from the build log)";
    for (label, b) in [("cold image cache", cold), ("warm image cache", warm)] {
        let p = &b.phases;
        rows.push(
            Row::value(
                s,
                &format!("{label}: total (\"done in\")"),
                None,
                p.total_ms,
                Unit::Ms,
            )
            .vs(ratio(p.total_ms, cold.phases.total_ms), "cold total"),
        );
        rows.push(
            Row::value(
                s,
                &format!("{label}: time inside the user's steps"),
                None,
                p.steps_ms,
                Unit::Ms,
            )
            .vs(ratio(p.steps_ms, p.total_ms), "its total")
            .percent(),
        );
        rows.push(
            Row::value(
                s,
                &format!("{label}: overhead (total - steps)"),
                None,
                p.overhead_ms,
                Unit::Ms,
            )
            .vs(ratio(p.overhead_ms, p.total_ms), "its total")
            .percent(),
        );
        rows.push(
            Row::value(
                s,
                &format!("{label}: overhead excluding startCmd -> ready"),
                None,
                p.overhead_excl_start_ready_ms,
                Unit::Ms,
            )
            .vs(
                ratio(p.overhead_excl_start_ready_ms, p.total_ms),
                "its total",
            )
            .percent(),
        );
    }
    rows.push(
        Row::value(
            s,
            "last step changed (step cache replays it alone): total",
            None,
            last_step_changed.phases.total_ms,
            Unit::Ms,
        )
        .vs(
            ratio(last_step_changed.phases.total_ms, warm.phases.total_ms),
            "warm total",
        ),
    );
}
