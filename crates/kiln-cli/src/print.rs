//! What `kiln template` and `kiln sandbox` print, for both backends: tables for people,
//! the wire JSON with `--json`, build logs, and how a build ended.

use std::process::ExitCode;

use kiln_api::{
    BuildErrorCode, BuildInfo, BuildLogEvent, BuildStatus, CodedMessage, LogStream,
    PreviewPortList, PreviewToken, ProxyAuditEvent, SandboxInfo, SecretInfo, SnapshotInfo,
    TemplateInfo,
};
use serde::Serialize;

fn json(v: &impl Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn or_dash<T: ToString>(v: Option<T>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

/// `template ls`.
pub(crate) fn templates(all: &[TemplateInfo], as_json: bool) -> anyhow::Result<()> {
    if as_json {
        return json(&all);
    }
    println!(
        "{:<36}  {:<24}  {:<8}  {:>4}  {:>6}  {:>6}",
        "ID", "NAME", "STATUS", "VCPU", "MEM", "DISK"
    );
    for t in all {
        println!(
            "{:<36}  {:<24}  {:<8}  {:>4}  {:>6}  {:>6}",
            t.id, t.name, t.status, t.vcpu, t.memory_mib, t.disk_mib
        );
    }
    Ok(())
}

/// `template show`: the template and its builds (newest first).
pub(crate) fn template(
    t: &TemplateInfo,
    builds: &[BuildInfo],
    as_json: bool,
) -> anyhow::Result<()> {
    if as_json {
        #[derive(Serialize)]
        struct Shown<'a> {
            #[serde(flatten)]
            template: &'a TemplateInfo,
            builds: &'a [BuildInfo],
        }
        return json(&Shown {
            template: t,
            builds,
        });
    }
    println!("{} ({})  {}", t.name, t.id, t.status);
    println!(
        "shape      {} vCPU, {} MiB memory, {} MiB disk",
        t.vcpu, t.memory_mib, t.disk_mib
    );
    if let Some(e) = &t.error_message {
        println!("error      {e}");
    }
    for b in builds {
        println!(
            "build      {}  {:<12}  {}  {}",
            b.id,
            b.status.to_string(),
            kiln_api::time::format(&b.created_at),
            or_dash(b.image_digest.as_deref())
        );
    }
    Ok(())
}

/// `sandbox ls`.
pub(crate) fn sandboxes(all: &[SandboxInfo], as_json: bool) -> anyhow::Result<()> {
    if as_json {
        return json(&all);
    }
    println!(
        "{:<36}  {:<10}  {:<36}  CREATED",
        "ID", "STATUS", "TEMPLATE"
    );
    for s in all {
        println!(
            "{:<36}  {:<10}  {:<36}  {}",
            s.id,
            s.status.to_string(),
            or_dash(s.template_id.as_deref()),
            kiln_api::time::format(&s.created_at)
        );
    }
    Ok(())
}

/// `sandbox preview ls`: the policy, then a port per line.
pub(crate) fn preview_ports(list: &PreviewPortList, as_json: bool) -> anyhow::Result<()> {
    if as_json {
        return json(list);
    }
    println!("policy  {}", list.preview_access);
    println!("{:<6}  {:<8}  {:>7}  URL", "PORT", "ACCESS", "VERSION");
    for p in &list.ports {
        println!(
            "{:<6}  {:<8}  {:>7}  {}",
            p.port,
            p.access.to_string(),
            p.token_version,
            or_dash(p.url.as_deref())
        );
    }
    Ok(())
}

/// `secret ls`: never a value (the API has none to give).
pub(crate) fn secrets(all: &[SecretInfo], as_json: bool) -> anyhow::Result<()> {
    if as_json {
        return json(&all);
    }
    println!(
        "{:<24}  {:<8}  {:<10}  {:<32}  LAST USED",
        "NAME", "AUTH", "PROVIDER", "UPDATED"
    );
    for s in all {
        println!(
            "{:<24}  {:<8}  {:<10}  {:<32}  {}",
            s.name,
            s.auth_type.as_str(),
            or_dash(s.provider_shortcut.as_deref()),
            kiln_api::time::format(&s.updated_at),
            or_dash(s.last_used_at.as_ref().map(kiln_api::time::format)),
        );
        println!("{:<24}  hosts: {}", "", s.hosts.join(", "));
    }
    Ok(())
}

/// `secret audit`, newest first.
pub(crate) fn audit(events: &[ProxyAuditEvent], as_json: bool) -> anyhow::Result<()> {
    if as_json {
        return json(&events);
    }
    println!(
        "{:<32}  {:<24}  {:<6}  {:<6}  {:>7}  REQUEST",
        "TIME", "SANDBOX", "STATUS", "UP", "MS"
    );
    for e in events {
        let sandbox = e
            .sandbox_name
            .clone()
            .unwrap_or_else(|| e.sandbox_id.clone());
        let status = match &e.error_code {
            Some(code) => format!("{} {code}", e.status),
            None => e.status.to_string(),
        };
        println!(
            "{:<32}  {:<24}  {:<6}  {:<6}  {:>7}  {} {}{}",
            kiln_api::time::format(&e.ts),
            sandbox,
            status,
            or_dash(e.upstream_status),
            or_dash(e.latency_ms),
            e.method,
            e.host,
            e.path
        );
    }
    Ok(())
}

/// `sandbox preview token`: the token, then the signed URL (a secret either way).
pub(crate) fn preview_token(t: &PreviewToken, as_json: bool) -> anyhow::Result<()> {
    if as_json {
        return json(t);
    }
    println!("{}", t.token);
    if let Some(url) = t.signed_url() {
        println!("{url}");
    }
    let until = t.expires_at.map_or_else(
        || "until rotated or unpublished".to_owned(),
        |at| format!("until {}", kiln_api::time::format(&at)),
    );
    eprintln!(
        "--> send it as `{}: <token>`, or open the second URL; version {}, valid {until}",
        t.header, t.token_version
    );
    Ok(())
}

/// `snapshot ls`.
pub(crate) fn snapshots(all: &[SnapshotInfo], as_json: bool) -> anyhow::Result<()> {
    if as_json {
        return json(&all);
    }
    println!(
        "{:<36}  {:<8}  {:<36}  {:>10}  {:<20}  CREATED",
        "ID", "STATUS", "SANDBOX", "SIZE", "NAME"
    );
    for s in all {
        println!(
            "{:<36}  {:<8}  {:<36}  {:>10}  {:<20}  {}",
            s.id,
            s.status.to_string(),
            s.sandbox_id,
            s.size_bytes,
            or_dash(s.name.as_deref()),
            kiln_api::time::format(&s.created_at)
        );
    }
    Ok(())
}

/// `snapshot show`.
pub(crate) fn snapshot(s: &SnapshotInfo, as_json: bool) -> anyhow::Result<()> {
    if as_json {
        return json(s);
    }
    println!("{} ({})  {}", or_dash(s.name.as_deref()), s.id, s.status);
    println!("sandbox    {}", s.sandbox_id);
    println!("template   {}", or_dash(s.template_id.as_deref()));
    println!(
        "shape      {} vCPU, {} MiB memory, {} MiB disk",
        s.resources.vcpu_count, s.resources.memory_mib, s.resources.disk_mib
    );
    println!("size       {} bytes", s.size_bytes);
    println!("created    {}", kiln_api::time::format(&s.created_at));
    if let Some(t) = &s.ready_at {
        println!("ready      {}", kiln_api::time::format(t));
    }
    if let Some(e) = &s.error_message {
        println!("error      {e}");
    }
    Ok(())
}

/// One build log line as `template logs` prints it: kiln's own lines marked `-->`, the
/// build's output indented; the last (`finished`) event is not a line.
pub(crate) fn log_line(e: &BuildLogEvent) {
    if e.finished {
        return;
    }
    if e.stream == LogStream::System {
        println!("--> {}", e.text);
    } else {
        println!("    {}", e.text);
    }
}

/// A live build's log line, as `template build` shows it: on stderr, since stdout is for
/// the result.
pub(crate) fn live_log_line(e: &BuildLogEvent) {
    if e.finished {
        return;
    }
    if e.stream == LogStream::System {
        eprintln!("--> {}", e.text);
    } else {
        eprintln!("    {}", e.text);
    }
}

/// How a build ended, for people and scripts: the template id on stdout when it is ready,
/// `<code>: <detail>` as the last stderr line and a non-zero exit otherwise (130 when
/// cancelled).
pub(crate) fn build_end(template_id: &str, build: &BuildInfo) -> ExitCode {
    match build.status {
        BuildStatus::Ready => {
            println!("{template_id}");
            ExitCode::SUCCESS
        }
        BuildStatus::Cancelled => {
            eprintln!("{}: build cancelled", BuildErrorCode::BuildFailed);
            ExitCode::from(130)
        }
        status => {
            let msg = build.error_message.as_deref().map_or_else(
                || CodedMessage::new(BuildErrorCode::BuildFailed, format!("build ended {status}")),
                CodedMessage::parse,
            );
            eprintln!("{msg}");
            ExitCode::FAILURE
        }
    }
}
