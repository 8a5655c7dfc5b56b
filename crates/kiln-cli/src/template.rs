//! `kiln template ...`: build, list, inspect and delete templates, on the local state dir
//! or a server (see [`crate::backend`]).

use std::process::ExitCode;

use anyhow::{bail, Context as _};
use kiln_api::{BuildStatus, TemplateRequest};

use crate::backend::{backend, Backend};
use crate::print;

#[derive(Debug, clap::Subcommand)]
pub(crate) enum Cmd {
    /// Build a template from a spec file (either JSON form); rebuilds it if the name exists.
    Build {
        /// The spec file, or `-` for standard input.
        #[arg(short = 'f', long = "file", required_unless_present = "system")]
        file: Option<String>,
        /// Build the system templates (`superserve/base`, `superserve/python-3.11`, or
        /// those `KILN_SYSTEM_TEMPLATES` names) on this machine's state dir, ahead of the
        /// server that would build them when it starts; their images are
        /// `KILN_BASE_IMAGE` and `KILN_PYTHON_IMAGE`.
        #[arg(long, conflicts_with_all = ["file", "name", "detach"])]
        system: bool,
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

pub async fn run(command: Cmd) -> anyhow::Result<ExitCode> {
    if let Cmd::Build { system: true, .. } = &command {
        return build_system().await;
    }
    if let Cmd::RunBuild { build_id } = &command {
        // The detached runner of `build --detach`: this machine only.
        let local = crate::local::Local::open().await?;
        let b = local.engine.run_build(build_id, None).await?;
        return Ok(if b.status == BuildStatus::Ready {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        });
    }
    let backend = backend().await?;
    let backend = backend.as_ref();
    match command {
        Cmd::Build {
            file,
            name,
            detach,
            no_cache,
            system: _,
        } => {
            let file = file.context("--file is required")?;
            build(backend, &file, name, detach, no_cache).await
        }
        Cmd::Ls { json } => {
            print::templates(&backend.templates().await?, json)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Show { name, json } => {
            let t = backend.template(&name).await?;
            print::template(&t, &backend.builds(&t).await?, json)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Logs {
            name,
            build,
            follow,
        } => {
            let t = backend.template(&name).await?;
            let Some(build_id) = build.or_else(|| t.latest_build_id.clone()) else {
                bail!("template {} has no builds", t.name);
            };
            let b = backend.build(&t, &build_id).await?;
            backend
                .logs(&b, follow, &mut |e| print::log_line(e))
                .await?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Rm { name } => {
            let t = backend.template(&name).await?;
            backend.delete_template(&t).await?;
            println!("{}", t.id);
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Cancel { name } => {
            let t = backend.template(&name).await?;
            let Some(build_id) = t.latest_build_id.clone() else {
                bail!("template {} has no builds", t.name)
            };
            backend
                .cancel_build(&backend.build(&t, &build_id).await?)
                .await?;
            let b = backend.build(&t, &build_id).await?;
            println!("{} {}", b.id, b.status);
            Ok(ExitCode::SUCCESS)
        }
        Cmd::RunBuild { .. } => unreachable!("handled above"),
    }
}

/// `template build --system`: the system templates, built here (an operator's command on
/// the server's host: teams cannot build them through the API).
async fn build_system() -> anyhow::Result<ExitCode> {
    if crate::remote::client()?.is_some() {
        bail!(
            "--system builds on this machine's state dir (the server's): run it on the \
             server's host without KILN_URL / a saved login"
        );
    }
    let local = crate::local::Local::open().await?;
    let which = kiln_engine::SystemTemplate::selected(
        std::env::var("KILN_SYSTEM_TEMPLATES").ok().as_deref(),
    )
    .map_err(anyhow::Error::msg)?;
    let builds = local.engine.queue_system_templates(&which).await?;
    if builds.is_empty() {
        eprintln!("--> the system templates are built and up to date");
    }
    let mut code = ExitCode::SUCCESS;
    for b in builds {
        eprintln!("--> system template {}, build {}", b.template_id, b.id);
        let mut on_log = |e: &kiln_api::BuildLogEvent| print::live_log_line(e);
        let finished = local.run_build(&b, &mut on_log).await?;
        let end = print::build_end(&finished.template_id, &finished);
        if finished.status != BuildStatus::Ready {
            code = end;
        }
    }
    Ok(code)
}

async fn build(
    backend: &dyn Backend,
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
    if req.name.is_none() {
        bail!("the template needs a name: give `name` in the spec or --name");
    }
    req.validate().map_err(|p| anyhow::anyhow!("{p}"))?;
    let (template, build) = backend.submit(&req, no_cache).await?;
    eprintln!(
        "--> template {} ({}), build {}",
        template.name, template.id, build.id
    );
    if detach {
        backend.detach(&build)?;
        println!("{}", build.id);
        return Ok(ExitCode::SUCCESS);
    }
    // Ctrl-C cancels the build: its VM is stopped and nothing is left behind.
    let mut on_log = |e: &kiln_api::BuildLogEvent| print::live_log_line(e);
    let run = backend.run_build(&build, &mut on_log);
    tokio::pin!(run);
    let finished = tokio::select! {
        r = &mut run => r?,
        _ = tokio::signal::ctrl_c() => {
            eprintln!("--> cancelling");
            backend.cancel_build(&build).await?;
            run.await?
        }
    };
    Ok(print::build_end(&template.id, &finished))
}
