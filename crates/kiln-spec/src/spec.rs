//! The BuildSpec, its steps and the VM shape, in both JSON forms users send.
//!
//! Two forms exist because two kinds of client exist: the HTTP body nests the spec under
//! `build_spec` and uses snake_case (`{name, vcpu, memory_mib, disk_mib, build_spec}`), while
//! the SDKs flatten it onto `TemplateCreateOptions` in camelCase (`{name, from, steps,
//! startCmd, readyCmd, vcpu, memoryMib, diskMib}`). Both decode into [`TemplateRequest`],
//! which encodes back into either form losslessly: omitted resources stay omitted.
//!
//! Decoding goes through `serde_json::Value` by hand rather than `#[derive(Deserialize)]`
//! so that every problem is reported with its JSON path in one pass, instead of serde's
//! first-error-and-stop.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::validate::{Problems, MAX_STEPS};

/// One build step. Exactly one of `run` / `env` / `workdir` / `user` is set in JSON.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum Step {
    /// A shell command, run with `/bin/sh -c`.
    Run(String),
    /// Sets a variable for later steps and as a runtime default.
    Env {
        /// Variable name.
        key: String,
        /// Variable value.
        value: String,
    },
    /// Working directory for later steps and the runtime default cwd.
    Workdir(String),
    /// Switches the user for later steps and the runtime default exec user.
    User {
        /// User name, created if missing.
        name: String,
        /// Passwordless sudo for this user.
        #[serde(default)]
        sudo: bool,
    },
}

impl Step {
    /// A `run` step.
    pub fn run(command: impl Into<String>) -> Self {
        Self::Run(command.into())
    }

    /// An `env` step.
    pub fn env(key: impl Into<String>, value: impl Into<String>) -> Self {
        Self::Env {
            key: key.into(),
            value: value.into(),
        }
    }

    /// A `workdir` step.
    pub fn workdir(path: impl Into<String>) -> Self {
        Self::Workdir(path.into())
    }

    /// A `user` step.
    pub fn user(name: impl Into<String>, sudo: bool) -> Self {
        Self::User {
            name: name.into(),
            sudo,
        }
    }

    /// The JSON key that tags this step.
    pub fn kind(&self) -> &'static str {
        match self {
            Step::Run(_) => "run",
            Step::Env { .. } => "env",
            Step::Workdir(_) => "workdir",
            Step::User { .. } => "user",
        }
    }
}

/// Quotes a string for `/bin/sh` as one word: how kiln puts paths and arguments into the
/// shell commands it runs (steps, `kiln sandbox exec` with several arguments, QEMU's
/// `exec:` migration URIs).
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// How to build a template: base image, ordered steps, the process to start, its probe.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BuildSpec {
    /// OCI image reference of the base image.
    pub from: String,
    /// Steps, run in order inside the build VM.
    #[serde(default)]
    pub steps: Vec<Step>,
    /// Long-running process started after the steps; captured live by the snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_cmd: Option<String>,
    /// Readiness probe polled every 2 s until it exits 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_cmd: Option<String>,
}

/// The VM shape, fully resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Resources {
    /// Virtual CPUs, 1..=4.
    pub vcpu: u32,
    /// Guest memory in MiB, 256..=4096.
    pub memory_mib: u32,
    /// Root disk size in MiB, 1024..=8192.
    pub disk_mib: u32,
}

impl Resources {
    /// Allowed vCPU range.
    pub const VCPU: std::ops::RangeInclusive<u32> = 1..=4;
    /// Allowed memory range (MiB).
    pub const MEMORY_MIB: std::ops::RangeInclusive<u32> = 256..=4096;
    /// Allowed disk range (MiB).
    pub const DISK_MIB: std::ops::RangeInclusive<u32> = 1024..=8192;
}

impl Default for Resources {
    fn default() -> Self {
        Self {
            vcpu: 1,
            memory_mib: 1024,
            disk_mib: 4096,
        }
    }
}

/// The VM shape as the user wrote it: unset fields take [`Resources::default`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ResourceRequest {
    /// Requested vCPUs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpu: Option<u32>,
    /// Requested memory (MiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u32>,
    /// Requested disk (MiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_mib: Option<u32>,
}

impl ResourceRequest {
    /// The shape with defaults filled in.
    pub fn resolve(&self) -> Resources {
        let d = Resources::default();
        Resources {
            vcpu: self.vcpu.unwrap_or(d.vcpu),
            memory_mib: self.memory_mib.unwrap_or(d.memory_mib),
            disk_mib: self.disk_mib.unwrap_or(d.disk_mib),
        }
    }
}

/// A request to create (or rebuild) a named template.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TemplateRequest {
    /// Template name; `None` when the document carried none (e.g. a spec file for the CLI).
    pub name: Option<String>,
    /// The VM shape as given.
    pub resources: ResourceRequest,
    /// The build spec.
    pub build_spec: BuildSpec,
}

/// Which JSON form a document is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    /// HTTP body: snake_case, spec nested under `build_spec`.
    Wire,
    /// SDK `TemplateCreateOptions`: camelCase, spec fields flattened.
    Sdk,
}

impl Form {
    /// Guesses the form: a `build_spec` key or a snake_case resource key means wire.
    pub fn detect(doc: &Value) -> Form {
        match doc.as_object() {
            Some(o)
                if o.contains_key("build_spec")
                    || ["memory_mib", "disk_mib"]
                        .iter()
                        .any(|k| o.contains_key(*k)) =>
            {
                Form::Wire
            }
            Some(o) if o.contains_key("from") || o.contains_key("startCmd") => Form::Sdk,
            _ => Form::Wire,
        }
    }
}

impl TemplateRequest {
    /// Decodes a document in the given form, reporting every structural problem.
    ///
    /// This checks shape only (types, unknown keys, exactly-one-of); call
    /// [`TemplateRequest::validate`] for the rules on values.
    pub fn from_json(doc: &Value, form: Form) -> Result<Self, Problems> {
        let mut p = Problems::default();
        let req = decode_request(doc, form, &mut p, &mut Vec::new());
        p.into_result(req)
    }

    /// Decodes and validates in one go, in whichever form the document is.
    ///
    /// Shape problems and value problems are reported together, so a user fixing a spec
    /// sees everything wrong with it at once.
    pub fn parse_and_validate(doc: &Value) -> Result<Self, Problems> {
        Self::parse_and_validate_as(doc, Form::detect(doc))
    }

    /// Decodes and validates a document that must be in the given form (an HTTP body is
    /// always the wire form), reporting shape and value problems together.
    pub fn parse_and_validate_as(doc: &Value, form: Form) -> Result<Self, Problems> {
        let mut p = Problems::default();
        let mut step_index = Vec::new();
        let req = decode_request(doc, form, &mut p, &mut step_index);
        req.check(form, &step_index, &mut p);
        p.into_result(req)
    }

    /// The document in the given form. Unset resources stay unset.
    pub fn to_json(&self, form: Form) -> Value {
        let mut o = Map::new();
        if let Some(name) = &self.name {
            o.insert("name".into(), name.clone().into());
        }
        let (mem_key, disk_key) = match form {
            Form::Wire => ("memory_mib", "disk_mib"),
            Form::Sdk => ("memoryMib", "diskMib"),
        };
        let r = &self.resources;
        for (key, value) in [
            ("vcpu", r.vcpu),
            (mem_key, r.memory_mib),
            (disk_key, r.disk_mib),
        ] {
            if let Some(v) = value {
                o.insert(key.into(), v.into());
            }
        }
        let spec = self.build_spec.to_json(form);
        match form {
            Form::Wire => {
                o.insert("build_spec".into(), spec);
            }
            Form::Sdk => {
                if let Value::Object(spec) = spec {
                    o.extend(spec);
                }
            }
        }
        Value::Object(o)
    }

    /// This request with every default filled in, as the server stores and echoes it.
    pub fn normalized(&self) -> Self {
        let r = self.resources.resolve();
        Self {
            name: self.name.clone(),
            resources: ResourceRequest {
                vcpu: Some(r.vcpu),
                memory_mib: Some(r.memory_mib),
                disk_mib: Some(r.disk_mib),
            },
            build_spec: self.build_spec.clone(),
        }
    }
}

impl BuildSpec {
    /// The spec alone in the given form (`start_cmd` vs `startCmd`).
    pub fn to_json(&self, form: Form) -> Value {
        let (start_key, ready_key) = match form {
            Form::Wire => ("start_cmd", "ready_cmd"),
            Form::Sdk => ("startCmd", "readyCmd"),
        };
        let mut o = Map::new();
        o.insert("from".into(), self.from.clone().into());
        let steps = serde_json::to_value(&self.steps).expect("steps always serialise");
        o.insert("steps".into(), steps);
        if let Some(cmd) = &self.start_cmd {
            o.insert(start_key.into(), cmd.clone().into());
        }
        if let Some(cmd) = &self.ready_cmd {
            o.insert(ready_key.into(), cmd.clone().into());
        }
        Value::Object(o)
    }
}

/// Keys of an object, checked against the allowed set; unknown ones become problems.
struct Obj<'a> {
    map: &'a Map<String, Value>,
    path: String,
}

impl<'a> Obj<'a> {
    fn new(v: &'a Value, path: &str, p: &mut Problems) -> Option<Self> {
        match v {
            Value::Object(map) => Some(Self {
                map,
                path: path.to_owned(),
            }),
            other => {
                p.push(
                    path,
                    format!("expected an object, found {}", type_name(other)),
                );
                None
            }
        }
    }

    fn deny_unknown(&self, allowed: &[&str], p: &mut Problems) {
        for key in self.map.keys() {
            if !allowed.contains(&key.as_str()) {
                p.push(
                    &child(&self.path, key),
                    format!("unknown field (expected one of: {})", allowed.join(", ")),
                );
            }
        }
    }

    fn str(&self, key: &str, required: bool, p: &mut Problems) -> Option<String> {
        let path = child(&self.path, key);
        match self.map.get(key) {
            Some(Value::String(s)) => Some(s.clone()),
            None | Some(Value::Null) if !required => None,
            None => {
                p.push(&path, "is required");
                None
            }
            Some(other) => {
                p.push(
                    &path,
                    format!("expected a string, found {}", type_name(other)),
                );
                None
            }
        }
    }

    fn u32(&self, key: &str, p: &mut Problems) -> Option<u32> {
        let path = child(&self.path, key);
        match self.map.get(key) {
            None | Some(Value::Null) => None,
            Some(Value::Number(n)) => match n.as_u64().and_then(|v| u32::try_from(v).ok()) {
                Some(v) => Some(v),
                None => {
                    p.push(&path, format!("expected a whole number, found {n}"));
                    None
                }
            },
            Some(other) => {
                p.push(
                    &path,
                    format!("expected a number, found {}", type_name(other)),
                );
                None
            }
        }
    }

    fn bool(&self, key: &str, p: &mut Problems) -> Option<bool> {
        match self.map.get(key) {
            None | Some(Value::Null) => None,
            Some(Value::Bool(b)) => Some(*b),
            Some(other) => {
                let path = child(&self.path, key);
                p.push(
                    &path,
                    format!("expected true or false, found {}", type_name(other)),
                );
                None
            }
        }
    }
}

fn child(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// `step_index` receives, for each decoded step, its index in the document: steps that
/// failed to decode are dropped, and value problems must still name the right index.
fn decode_request(
    doc: &Value,
    form: Form,
    p: &mut Problems,
    step_index: &mut Vec<usize>,
) -> TemplateRequest {
    let empty = BuildSpec {
        from: String::new(),
        steps: vec![],
        start_cmd: None,
        ready_cmd: None,
    };
    let Some(top) = Obj::new(doc, "", p) else {
        return TemplateRequest {
            name: None,
            resources: Default::default(),
            build_spec: empty,
        };
    };
    let (mem_key, disk_key) = match form {
        Form::Wire => ("memory_mib", "disk_mib"),
        Form::Sdk => ("memoryMib", "diskMib"),
    };
    let name = top.str("name", false, p);
    let resources = ResourceRequest {
        vcpu: top.u32("vcpu", p),
        memory_mib: top.u32(mem_key, p),
        disk_mib: top.u32(disk_key, p),
    };
    let build_spec = match form {
        Form::Wire => {
            top.deny_unknown(&["name", "vcpu", mem_key, disk_key, "build_spec"], p);
            match top.map.get("build_spec") {
                Some(spec) => decode_spec(spec, "build_spec", form, p, step_index),
                None => {
                    p.push("build_spec", "is required");
                    empty
                }
            }
        }
        Form::Sdk => {
            let allowed = [
                "name", "vcpu", mem_key, disk_key, "from", "steps", "startCmd", "readyCmd",
            ];
            top.deny_unknown(&allowed, p);
            decode_spec_fields(&top, form, p, step_index)
        }
    };
    TemplateRequest {
        name,
        resources,
        build_spec,
    }
}

fn decode_spec(
    v: &Value,
    path: &str,
    form: Form,
    p: &mut Problems,
    step_index: &mut Vec<usize>,
) -> BuildSpec {
    match Obj::new(v, path, p) {
        Some(o) => {
            let (s, r) = cmd_keys(form);
            o.deny_unknown(&["from", "steps", s, r], p);
            decode_spec_fields(&o, form, p, step_index)
        }
        None => BuildSpec {
            from: String::new(),
            steps: vec![],
            start_cmd: None,
            ready_cmd: None,
        },
    }
}

fn cmd_keys(form: Form) -> (&'static str, &'static str) {
    match form {
        Form::Wire => ("start_cmd", "ready_cmd"),
        Form::Sdk => ("startCmd", "readyCmd"),
    }
}

fn decode_spec_fields(
    o: &Obj<'_>,
    form: Form,
    p: &mut Problems,
    step_index: &mut Vec<usize>,
) -> BuildSpec {
    let (start_key, ready_key) = cmd_keys(form);
    let from = o.str("from", true, p).unwrap_or_default();
    let steps_path = child(&o.path, "steps");
    let steps = match o.map.get("steps") {
        None | Some(Value::Null) => vec![],
        Some(Value::Array(items)) => {
            if items.len() > MAX_STEPS {
                p.push(
                    &steps_path,
                    format!("at most {MAX_STEPS} steps are allowed"),
                );
                vec![]
            } else {
                let mut steps = Vec::with_capacity(items.len());
                for (i, item) in items.iter().enumerate() {
                    if let Some(step) = decode_step(item, &format!("{steps_path}[{i}]"), p) {
                        steps.push(step);
                        step_index.push(i);
                    }
                }
                steps
            }
        }
        Some(other) => {
            p.push(
                &steps_path,
                format!("expected an array, found {}", type_name(other)),
            );
            vec![]
        }
    };
    BuildSpec {
        from,
        steps,
        start_cmd: o.str(start_key, false, p),
        ready_cmd: o.str(ready_key, false, p),
    }
}

fn decode_step(v: &Value, path: &str, p: &mut Problems) -> Option<Step> {
    const KINDS: [&str; 4] = ["run", "env", "workdir", "user"];
    let o = Obj::new(v, path, p)?;
    o.deny_unknown(&KINDS, p);
    let present: Vec<&str> = KINDS
        .into_iter()
        .filter(|k| o.map.contains_key(*k))
        .collect();
    let kind = match present.as_slice() {
        [one] => *one,
        [] => {
            p.push(path, "a step needs exactly one of run, env, workdir, user");
            return None;
        }
        many => {
            p.push(
                path,
                format!(
                    "a step takes exactly one of run, env, workdir, user; found {}",
                    many.join(", ")
                ),
            );
            return None;
        }
    };
    match kind {
        "run" => o.str("run", true, p).map(Step::Run),
        "workdir" => o.str("workdir", true, p).map(Step::Workdir),
        "env" => {
            let inner = Obj::new(&o.map["env"], &child(path, "env"), p)?;
            inner.deny_unknown(&["key", "value"], p);
            let key = inner.str("key", true, p);
            let value = inner.str("value", true, p);
            Some(Step::Env {
                key: key?,
                value: value?,
            })
        }
        _ => {
            let inner = Obj::new(&o.map["user"], &child(path, "user"), p)?;
            inner.deny_unknown(&["name", "sudo"], p);
            let name = inner.str("name", true, p);
            let sudo = inner.bool("sudo", p).unwrap_or(false);
            Some(Step::User { name: name?, sudo })
        }
    }
}
