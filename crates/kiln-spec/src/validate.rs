//! The rules on values, each problem reported with its JSON path.
//!
//! Every string and list has a cap: these documents arrive from the network, and a spec is
//! stored, hashed, logged and sent into a VM, so nothing in it may be unbounded.

use std::fmt;

use crate::reference::{self, ImageRef};
use crate::spec::{Form, Resources, Step, TemplateRequest};

/// Most steps a spec may have.
pub const MAX_STEPS: usize = 256;
/// Longest `run`, `startCmd` or `readyCmd` (bytes).
pub const MAX_COMMAND_LEN: usize = 64 * 1024;
/// Longest environment variable name (bytes).
pub const MAX_ENV_KEY_LEN: usize = 256;
/// Longest environment variable value (bytes).
pub const MAX_ENV_VALUE_LEN: usize = 32 * 1024;
/// Longest `workdir` (bytes), Linux's PATH_MAX.
pub const MAX_PATH_LEN: usize = 4096;
/// Longest user name, as useradd allows.
pub const MAX_USER_LEN: usize = 31;
/// Longest template name.
pub const MAX_NAME_LEN: usize = 128;
/// Template names with these prefixes belong to the platform, not to teams: `kiln/`, and
/// `superserve/` of the system templates every team sees (`superserve/base`, ...).
pub const RESERVED_NAME_PREFIXES: &[&str] = &["kiln/", "superserve/"];

/// One thing wrong with a document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Where, as a JSON path such as `build_spec.steps[2].env.key` (empty for the root).
    pub path: String,
    /// What is wrong, for a human.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = if self.path.is_empty() {
            "$"
        } else {
            &self.path
        };
        write!(f, "{path}: {}", self.message)
    }
}

/// Every problem found in a document: shape problems (types, unknown keys) first, then
/// problems with values.
#[derive(Debug, Clone, Default, PartialEq, Eq, thiserror::Error)]
pub struct Problems(pub Vec<Problem>);

impl Problems {
    /// Records a problem.
    pub fn push(&mut self, path: &str, message: impl Into<String>) {
        self.0.push(Problem {
            path: path.to_owned(),
            message: message.into(),
        });
    }

    /// `Ok(value)` when nothing was recorded.
    pub fn into_result<T>(self, value: T) -> Result<T, Problems> {
        if self.0.is_empty() {
            Ok(value)
        } else {
            Err(self)
        }
    }

    /// Whether a problem was recorded at exactly this path.
    pub fn has(&self, path: &str) -> bool {
        self.0.iter().any(|p| p.path == path)
    }
}

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

impl TemplateRequest {
    /// Checks every rule, reporting paths as in the given form.
    pub fn validate_as(&self, form: Form) -> Result<(), Problems> {
        let mut p = Problems::default();
        self.check(form, &[], &mut p);
        p.into_result(())
    }

    /// Checks every rule, reporting paths as in the wire form.
    pub fn validate(&self) -> Result<(), Problems> {
        self.validate_as(Form::Wire)
    }

    /// `step_index[i]` is the document index of step `i` when some steps failed to decode;
    /// empty means the identity.
    pub(crate) fn check(&self, form: Form, step_index: &[usize], p: &mut Problems) {
        if let Some(name) = &self.name {
            check_template_name(name, "name", p);
        }
        let (mem_key, disk_key, spec_prefix, start_key, ready_key) = match form {
            Form::Wire => (
                "memory_mib",
                "disk_mib",
                "build_spec.",
                "start_cmd",
                "ready_cmd",
            ),
            Form::Sdk => ("memoryMib", "diskMib", "", "startCmd", "readyCmd"),
        };
        let r = &self.resources;
        for (key, value, range) in [
            ("vcpu", r.vcpu, Resources::VCPU),
            (mem_key, r.memory_mib, Resources::MEMORY_MIB),
            (disk_key, r.disk_mib, Resources::DISK_MIB),
        ] {
            if let Some(v) = value.filter(|v| !range.contains(v)) {
                p.push(
                    key,
                    format!("{v} is out of range {}..={}", range.start(), range.end()),
                );
            }
        }
        let spec = &self.build_spec;
        check_from(&spec.from, &format!("{spec_prefix}from"), p);
        for (i, step) in spec.steps.iter().enumerate() {
            let i = step_index.get(i).copied().unwrap_or(i);
            check_step(step, &format!("{spec_prefix}steps[{i}]"), p);
        }
        for (key, cmd) in [(start_key, &spec.start_cmd), (ready_key, &spec.ready_cmd)] {
            if let Some(cmd) = cmd {
                check_command(cmd, &format!("{spec_prefix}{key}"), p);
            }
        }
    }
}

fn check_from(from: &str, path: &str, p: &mut Problems) {
    match ImageRef::parse(from) {
        Err(e) => p.push(path, format!("not a valid image reference: {e}")),
        Ok(r) => {
            if let Some(why) = reference::refused_base_by_name(&r) {
                p.push(path, why);
            }
        }
    }
}

fn check_step(step: &Step, path: &str, p: &mut Problems) {
    match step {
        Step::Run(cmd) => check_command(cmd, &format!("{path}.run"), p),
        Step::Env { key, value } => {
            let kp = format!("{path}.env.key");
            if key.len() > MAX_ENV_KEY_LEN {
                p.push(&kp, format!("longer than {MAX_ENV_KEY_LEN} bytes"));
            } else if !is_env_name(key) {
                p.push(
                    &kp,
                    format!("{key:?} is not a valid variable name ([A-Za-z_][A-Za-z0-9_]*)"),
                );
            }
            let vp = format!("{path}.env.value");
            if value.len() > MAX_ENV_VALUE_LEN {
                p.push(&vp, format!("longer than {MAX_ENV_VALUE_LEN} bytes"));
            } else if value.contains('\0') {
                p.push(&vp, "contains a NUL byte");
            }
        }
        Step::Workdir(dir) => {
            let wp = format!("{path}.workdir");
            if dir.len() > MAX_PATH_LEN {
                p.push(&wp, format!("longer than {MAX_PATH_LEN} bytes"));
            } else if !dir.starts_with('/') {
                p.push(&wp, format!("{dir:?} is not an absolute path"));
            } else if dir.contains('\0') {
                p.push(&wp, "contains a NUL byte");
            }
        }
        Step::User { name, .. } => {
            let up = format!("{path}.user.name");
            if name.len() > MAX_USER_LEN {
                p.push(&up, format!("longer than {MAX_USER_LEN} characters"));
            } else if !is_user_name(name) {
                p.push(
                    &up,
                    format!("{name:?} is not a valid user name ([a-z_][a-z0-9_-]*, optional trailing $)"),
                );
            }
        }
    }
}

fn check_command(cmd: &str, path: &str, p: &mut Problems) {
    if cmd.len() > MAX_COMMAND_LEN {
        p.push(path, format!("longer than {MAX_COMMAND_LEN} bytes"));
    } else if cmd.trim().is_empty() {
        p.push(path, "is empty");
    } else if cmd.contains('\0') {
        p.push(path, "contains a NUL byte");
    }
}

fn check_template_name(name: &str, path: &str, p: &mut Problems) {
    if name.len() > MAX_NAME_LEN {
        p.push(path, format!("longer than {MAX_NAME_LEN} characters"));
    } else if !is_template_name(name) {
        p.push(
            path,
            format!("{name:?} must match ^[a-z0-9]([a-z0-9._/-]*[a-z0-9])?$"),
        );
    } else if let Some(prefix) = RESERVED_NAME_PREFIXES
        .iter()
        .find(|p| name.starts_with(**p))
    {
        p.push(
            path,
            format!("names starting with {prefix:?} are reserved for system templates"),
        );
    }
}

/// `^[a-z0-9]([a-z0-9._/-]*[a-z0-9])?$`
pub fn is_template_name(name: &str) -> bool {
    let edge = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let b = name.as_bytes();
    !b.is_empty()
        && edge(b[0])
        && edge(b[b.len() - 1])
        && b.iter()
            .all(|&c| edge(c) || matches!(c, b'.' | b'_' | b'/' | b'-'))
}

/// POSIX portable environment variable names.
pub fn is_env_name(key: &str) -> bool {
    let b = key.as_bytes();
    !b.is_empty()
        && (b[0].is_ascii_alphabetic() || b[0] == b'_')
        && b.iter().all(|&c| c.is_ascii_alphanumeric() || c == b'_')
}

/// useradd's default NAME_REGEX: `^[a-z_][a-z0-9_-]*[$]?$`, at most 31 characters.
pub fn is_user_name(name: &str) -> bool {
    let body = name.strip_suffix('$').unwrap_or(name);
    let b = body.as_bytes();
    !b.is_empty()
        && name.len() <= MAX_USER_LEN
        && (b[0].is_ascii_lowercase() || b[0] == b'_')
        && b.iter()
            .all(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_' || c == b'-')
}
