//! `kiln template ...`: build templates on the local state dir, no server needed.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use kiln_engine::{BuildLogPrinter, Engine};
use kiln_spec::{BuildErrorCode, CodedMessage, TemplateRequest};
use kiln_store::{Build, BuildStatus, StoreError, Template};

use crate::engine;

/// `kiln template`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, clap::Subcommand)]
pub(crate) enum Cmd {
    /// Build a template from a spec file (either JSON form); rebuilds it if the name exists.
    Build {
        /// The spec file, or `-` for standard input.
        #[arg(short = 'f', long = "file")]
        file: String,
        /// Template name (overrides the spec's `name`).
        #[arg(long)]
        name: Option<String>,
        /// Queue the build, print its id and return at once.
        #[arg(long)]
        detach: bool,
        /// Build from scratch even if an identical build (same spec, same base image
        /// digest) can be reused.
        #[arg(long)]
        no_cache: bool,
    },
    /// List templates.
    Ls {
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Show one template and its builds.
    Show {
        /// Name or id.
        name: String,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Print a build's logs (the latest build by default).
    Logs {
        /// Template name or id.
        name: String,
        /// A specific build.
        #[arg(long)]
        build: Option<String>,
        /// Keep printing until the build ends.
        #[arg(short, long)]
        follow: bool,
    },
    /// Delete a template (refused while sandboxes use it).
    Rm {
        /// Name or id.
        name: String,
    },
    /// Cancel a template's running build.
    Cancel {
        /// Name or id.
        name: String,
    },
    /// Run a queued build in this process (used by `build --detach`).
    #[command(hide = true)]
    RunBuild {
        /// The build id.
        build_id: String,
    },
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    if let Some(client) = crate::remote::client()? {
        return crate::remote::template(args.command, client).await;
    }
    let engine = engine().await?;
    let team = engine.local_team().await?;
    match args.command {
        Cmd::Build {
            file,
            name,
            detach,
            no_cache,
        } => build(&engine, &team.id, &file, name, detach, no_cache).await,
        Cmd::Ls { json } => {
            let templates = engine.store().list_templates(&team.id).await?;
            let all: Vec<_> = templates.iter().map(Template::to_wire).collect();
            print_templates(&all, json)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Show { name, json } => {
            let t = engine
                .store()
                .template_by_id_or_name(&team.id, &name)
                .await?;
            let builds = engine.store().list_builds(&team.id, &t.id).await?;
            let mut doc = t.to_wire();
            doc["build_spec"] = t.build_spec.clone();
            doc["builds"] = builds.iter().map(Build::to_wire).collect();
            print_template(&doc, json)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Logs {
            name,
            build,
            follow,
        } => {
            let t = engine
                .store()
                .template_by_id_or_name(&team.id, &name)
                .await?;
            let build_id = match build.or(t.latest_build_id) {
                Some(b) => b,
                None => anyhow::bail!("template {} has no builds", t.name),
            };
            let b = engine.store().build_by_id(&team.id, &build_id).await?;
            print_logs(&engine, &b, follow).await?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Rm { name } => {
            let t = engine.delete_template(&team.id, &name).await?;
            println!("{}", t.id);
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Cancel { name } => {
            let t = engine
                .store()
                .template_by_id_or_name(&team.id, &name)
                .await?;
            let Some(build_id) = t.latest_build_id else {
                anyhow::bail!("template {} has no builds", t.name)
            };
            let b = engine.cancel_build(&team.id, &build_id).await?;
            println!("{} {}", b.id, b.status);
            Ok(ExitCode::SUCCESS)
        }
        Cmd::RunBuild { build_id } => {
            let b = engine.run_build(&build_id, None).await?;
            Ok(if b.status == BuildStatus::Ready {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}

async fn build(
    engine: &Arc<Engine>,
    team_id: &str,
    file: &str,
    name: Option<String>,
    detach: bool,
    no_cache: bool,
) -> anyhow::Result<ExitCode> {
    let text = crate::validate::read_spec(file)?;
    let doc: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{file} is not valid JSON"))?;
    let mut req = match TemplateRequest::parse_and_validate(&doc) {
        Ok(req) => req,
        Err(problems) => {
            for p in &problems.0 {
                eprintln!("{p}");
            }
            return Ok(ExitCode::from(2));
        }
    };
    if name.is_some() {
        req.name = name;
    }
    let Some(template_name) = req.name.clone() else {
        anyhow::bail!("the template needs a name: give `name` in the spec or --name");
    };
    req.validate().map_err(|p| anyhow::anyhow!("{p}"))?;
    let (template, build) = match engine.submit_with(team_id, &req, no_cache).await {
        Ok(created) => created,
        Err(kiln_engine::EngineError::Store(StoreError::Conflict(_))) => {
            let rebuild = engine
                .rebuild_with(team_id, &template_name, Some(&req), no_cache)
                .await?;
            let t = engine
                .store()
                .template_by_id_or_name(team_id, &template_name)
                .await?;
            if !rebuild.created {
                eprintln!(
                    "--> a build of this spec is already running: {}",
                    rebuild.build.id
                );
            }
            (t, rebuild.build)
        }
        Err(e) => return Err(e.into()),
    };
    eprintln!(
        "--> template {} ({}), build {}",
        template.name, template.id, build.id
    );
    if detach {
        if build.status == BuildStatus::Pending {
            crate::spawn_detached(
                &["template", "run-build", &build.id],
                &engine.layout().root().join("logs"),
                &build.id,
            )?;
        }
        println!("{}", build.id);
        return Ok(ExitCode::SUCCESS);
    }
    let finished = if build.status == BuildStatus::Pending {
        // Ctrl-C cancels the build: the VM is stopped and nothing is left behind.
        let runner = engine.run_build(&build.id, Some(Arc::new(BuildLogPrinter)));
        tokio::pin!(runner);
        tokio::select! {
            r = &mut runner => r?,
            _ = tokio::signal::ctrl_c() => {
                eprintln!("--> cancelling");
                engine.cancel_build(team_id, &build.id).await?;
                runner.await?
            }
        }
    } else {
        print_logs(engine, &build, true).await?;
        engine.store().build_by_id(team_id, &build.id).await?
    };
    finish(&template, &finished)
}

fn finish(template: &Template, build: &Build) -> anyhow::Result<ExitCode> {
    Ok(finish_wire(
        &template.id,
        build.status,
        build.error_message.as_deref(),
    ))
}

/// How a build ended, for people and scripts: the template id on stdout when it is ready,
/// `<code>: <detail>` as the last stderr line and a non-zero exit otherwise (130 when
/// cancelled).
pub(crate) fn finish_wire(
    template_id: &str,
    status: BuildStatus,
    error_message: Option<&str>,
) -> ExitCode {
    match status {
        BuildStatus::Ready => {
            println!("{template_id}");
            ExitCode::SUCCESS
        }
        BuildStatus::Cancelled => {
            eprintln!("{}: build cancelled", BuildErrorCode::BuildFailed);
            ExitCode::from(130)
        }
        _ => {
            let msg = error_message.map_or_else(
                || CodedMessage::new(BuildErrorCode::BuildFailed, format!("build ended {status}")),
                CodedMessage::parse,
            );
            eprintln!("{msg}");
            ExitCode::FAILURE
        }
    }
}

/// `template ls`: a table, or the wire JSON.
pub(crate) fn print_templates(all: &[serde_json::Value], json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(all)?);
        return Ok(());
    }
    println!(
        "{:<36}  {:<24}  {:<8}  {:>4}  {:>6}  {:>6}",
        "ID", "NAME", "STATUS", "VCPU", "MEM", "DISK"
    );
    for t in all {
        println!(
            "{:<36}  {:<24}  {:<8}  {:>4}  {:>6}  {:>6}",
            field(t, "id"),
            field(t, "name"),
            field(t, "status"),
            field(t, "vcpu"),
            field(t, "memory_mib"),
            field(t, "disk_mib")
        );
    }
    Ok(())
}

/// `template show`: the template (wire JSON with `builds`, newest first).
pub(crate) fn print_template(doc: &serde_json::Value, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(doc)?);
        return Ok(());
    }
    println!(
        "{} ({})  {}",
        field(doc, "name"),
        field(doc, "id"),
        field(doc, "status")
    );
    println!(
        "shape      {} vCPU, {} MiB memory, {} MiB disk",
        field(doc, "vcpu"),
        field(doc, "memory_mib"),
        field(doc, "disk_mib")
    );
    if let Some(e) = doc["error_message"].as_str() {
        println!("error      {e}");
    }
    for b in doc["builds"].as_array().into_iter().flatten() {
        let digest = b["image_digest"].as_str().unwrap_or("-");
        println!(
            "build      {}  {:<12}  {}  {digest}",
            field(b, "id"),
            field(b, "status"),
            field(b, "created_at")
        );
    }
    Ok(())
}

/// A JSON field as display text (`-` when absent).
pub(crate) fn field(v: &serde_json::Value, key: &str) -> String {
    match &v[key] {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "-".to_owned(),
        other => other.to_string(),
    }
}

async fn print_logs(engine: &Engine, build: &Build, follow: bool) -> anyhow::Result<()> {
    if !follow || build.status.is_terminal() {
        for line in engine.store().logs_since(&build.id, 0).await? {
            print_line(&line);
        }
        return Ok(());
    }
    let mut follower = engine.store().follow_logs(&build.id, 0).await?;
    while let Some(batch) = follower.next_batch().await? {
        for line in &batch {
            print_line(line);
        }
    }
    Ok(())
}

fn print_line(line: &kiln_store::LogLine) {
    print_log(line.stream == kiln_store::LogStream::System, &line.text);
}

/// One build log line: kiln's own lines marked `-->`, the build's output indented.
pub(crate) fn print_log(system: bool, text: &str) {
    if system {
        println!("--> {text}");
    } else {
        println!("    {text}");
    }
}
