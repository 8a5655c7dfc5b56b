//! Templates, their builds and build logs (`/templates`, `/templates/{t}/builds`).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::status::{BuildStatus, LogStream, TemplateStatus};

/// The name prefix of system templates: kiln provides them to every team, and a team's
/// own template may not take it (one of [`kiln_spec::validate::RESERVED_NAME_PREFIXES`]).
pub const SYSTEM_PREFIX: &str = "superserve/";
/// The system template a sandbox created without `from_template` (or `from_snapshot`)
/// starts from, as Superserve's.
pub const DEFAULT_TEMPLATE: &str = "superserve/base";

/// Whether `name` is a system template's (or would take the system prefix).
pub fn is_system_name(name: &str) -> bool {
    name.starts_with(SYSTEM_PREFIX)
}

#[test]
fn the_system_prefix_is_reserved_for_teams() {
    assert!(kiln_spec::validate::RESERVED_NAME_PREFIXES.contains(&SYSTEM_PREFIX));
    assert!(is_system_name(DEFAULT_TEMPLATE));
}

/// A template, as `GET /templates/{t}` answers (the SDK's `TemplateInfo`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateInfo {
    /// Its id.
    pub id: String,
    /// Its name, unique within the team.
    pub name: String,
    /// The owning team.
    #[serde(default)]
    pub team_id: String,
    /// Follows the latest build.
    pub status: TemplateStatus,
    /// Virtual CPUs of its sandboxes.
    #[serde(default)]
    pub vcpu: u32,
    /// Memory of its sandboxes, MiB.
    #[serde(default)]
    pub memory_mib: u32,
    /// Disk of its sandboxes, MiB.
    #[serde(default)]
    pub disk_mib: u32,
    /// Size of the live artifact; none until a build is ready.
    #[serde(default)]
    pub size_bytes: Option<u64>,
    /// `<code>: <detail>` of the latest build, when it failed.
    #[serde(default)]
    pub error_message: Option<String>,
    /// When it was created.
    #[serde(with = "crate::time")]
    pub created_at: DateTime<Utc>,
    /// When the live artifact was finished.
    #[serde(default, with = "crate::time::option")]
    pub built_at: Option<DateTime<Utc>>,
    /// The most recently started build.
    #[serde(default)]
    pub latest_build_id: Option<String>,
    /// The spec the template builds, in wire form (kiln's addition; what the console
    /// shows and edits).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build_spec: Option<serde_json::Value>,
}

/// `POST /templates` answers the template with the id of the build it queued.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreatedTemplate {
    /// The template.
    #[serde(flatten)]
    pub template: TemplateInfo,
    /// Its first build (or a rebuild of an existing one).
    pub build_id: String,
}

/// One build of a template (the SDK's `TemplateBuildInfo`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildInfo {
    /// Its id.
    pub id: String,
    /// Its template.
    pub template_id: String,
    /// Where it is.
    pub status: BuildStatus,
    /// Canonical hash of the spec and VM shape built.
    #[serde(default)]
    pub build_spec_hash: String,
    /// The digest the base image reference resolved to.
    #[serde(default)]
    pub image_digest: Option<String>,
    /// `<code>: <detail>` when failed.
    #[serde(default)]
    pub error_message: Option<String>,
    /// When it was queued.
    #[serde(with = "crate::time")]
    pub created_at: DateTime<Utc>,
    /// When a builder picked it up.
    #[serde(default, with = "crate::time::option")]
    pub started_at: Option<DateTime<Utc>>,
    /// When it ended.
    #[serde(default, with = "crate::time::option")]
    pub finalized_at: Option<DateTime<Utc>>,
}

/// One event of a build's log stream (`GET .../builds/{b}/logs`, Server-Sent Events). The
/// last one has `finished` and the build's terminal `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildLogEvent {
    /// When the line was written.
    #[serde(with = "crate::time")]
    pub timestamp: DateTime<Utc>,
    /// Where it came from.
    pub stream: LogStream,
    /// The line, without its newline.
    #[serde(default)]
    pub text: String,
    /// Set on the last event only.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub finished: bool,
    /// The build's terminal status, on the last event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<BuildStatus>,
}

impl BuildLogEvent {
    /// A line of kiln's own (`system`), stamped now.
    pub fn system(text: impl Into<String>) -> Self {
        Self {
            timestamp: Utc::now(),
            stream: LogStream::System,
            text: text.into(),
            finished: false,
            status: None,
        }
    }

    /// The last event of a build's stream: how it ended, with its error if any.
    pub fn finished(status: BuildStatus, error_message: Option<&str>) -> Self {
        let text = match error_message {
            Some(err) => format!("build {status}: {err}"),
            None => format!("build {status}"),
        };
        Self {
            finished: true,
            status: Some(status),
            ..Self::system(text)
        }
    }
}

/// What `POST /validate` answers (kiln's own): whether a template request, the body
/// `POST /templates` takes, is valid, with every problem as `kiln validate` prints it
/// (`<path>: <message>`), or the normalized request when there is none.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SpecValidation {
    /// No problem was found.
    pub valid: bool,
    /// Each problem, one line each, in the order `kiln validate` lists them.
    #[serde(default)]
    pub problems: Vec<String>,
    /// The request normalized (wire form), when valid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub normalized: Option<serde_json::Value>,
}

impl SpecValidation {
    /// Checks a request body in the wire form, as `POST /templates` will.
    pub fn of(body: &[u8]) -> Self {
        let doc: serde_json::Value = match serde_json::from_slice(body) {
            Ok(doc) => doc,
            Err(e) => return Self::problems(vec![format!("$: invalid JSON: {e}")]),
        };
        match kiln_spec::TemplateRequest::parse_and_validate_as(&doc, kiln_spec::Form::Wire) {
            Ok(req) => Self {
                valid: true,
                problems: Vec::new(),
                normalized: Some(req.normalized().to_json(kiln_spec::Form::Wire)),
            },
            Err(p) => Self::problems(p.0.iter().map(ToString::to_string).collect()),
        }
    }

    fn problems(problems: Vec<String>) -> Self {
        Self {
            valid: false,
            problems,
            normalized: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_events_omit_finished_until_the_end() {
        let mut line = BuildLogEvent::system("pulling");
        line.timestamp = crate::time::parse("2026-12-04T16:00:00Z").unwrap();
        assert_eq!(
            serde_json::to_value(&line).unwrap(),
            serde_json::json!({
                "timestamp": "2026-12-04T16:00:00.000000+00:00",
                "stream": "system", "text": "pulling",
            })
        );
        let last = BuildLogEvent::finished(BuildStatus::Failed, Some("step_failed: x"));
        let v = serde_json::to_value(&last).unwrap();
        assert_eq!(v["finished"], true);
        assert_eq!(v["status"], "failed");
        assert_eq!(v["text"], "build failed: step_failed: x");
    }

    #[test]
    fn validation_lists_problems_as_kiln_validate_prints_them() {
        let v = SpecValidation::of(br#"{"name": "x", "build_spec": {"from": ""}, "vcpu": 99}"#);
        assert!(!v.valid);
        assert!(v.problems.iter().all(|p| p.contains(": ")), "{v:?}");
        assert!(
            v.problems
                .iter()
                .any(|p| p.starts_with("build_spec.from: ")),
            "{v:?}"
        );
        let bad = SpecValidation::of(b"{");
        assert!(bad.problems[0].starts_with("$: invalid JSON: "), "{bad:?}");
        let ok = SpecValidation::of(br#"{"name": "x", "build_spec": {"from": "python:3.11"}}"#);
        assert!(ok.valid && ok.problems.is_empty(), "{ok:?}");
        assert_eq!(ok.normalized.unwrap()["build_spec"]["from"], "python:3.11");
    }
}
