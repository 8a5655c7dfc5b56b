//! Remote mode: `kiln template ...` and `kiln sandbox ...` against a kiln server, through
//! `kiln-sdk`, with the same output and exit codes as on the local state dir.
//!
//! The server comes from `KILN_URL` and `KILN_API_KEY`, else from the profile `kiln login`
//! saved; without either the CLI works locally. Differences that follow from the API:
//! `sandbox exec` has no `--user` (commands run as the template's user), and `template
//! logs` of a running build always follows it (the log stream has no "history only").

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context as _};
use kiln_sdk::{
    BuildLogEvent, Client, ListOptions, LogStream, RunOptions, Sandbox, SandboxCreateOptions, Step,
    Template, TemplateCreateOptions,
};
use kiln_spec::TemplateRequest;
use serde::{Deserialize, Serialize};

use crate::template::{finish_wire, print_log, print_template, print_templates};

/// A saved server: `kiln login` writes it, `kiln logout` removes it.
#[derive(Debug, Serialize, Deserialize)]
pub struct Profile {
    /// The server's base URL.
    pub url: String,
    /// A team's API key.
    pub api_key: String,
}

/// Where the profile lives: `$XDG_CONFIG_HOME/kiln/profile.json` or
/// `~/.config/kiln/profile.json`.
pub fn profile_path() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("kiln").join("profile.json"))
}

/// The server to talk to, if any: the environment first, then the saved profile.
pub fn client() -> anyhow::Result<Option<Client>> {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
    let (url, key) = match (env("KILN_URL"), env("KILN_API_KEY")) {
        (Some(url), Some(key)) => (url, key),
        (Some(_), None) => bail!("KILN_URL is set but KILN_API_KEY is not"),
        _ => match load_profile()? {
            Some(p) => (p.url, p.api_key),
            None => return Ok(None),
        },
    };
    let client = Client::new(url.trim(), key.trim()).context("configuring the kiln client")?;
    Ok(Some(client))
}

fn load_profile() -> anyhow::Result<Option<Profile>> {
    let Some(path) = profile_path() else {
        return Ok(None);
    };
    match std::fs::read(&path) {
        Ok(bytes) => {
            Ok(Some(serde_json::from_slice(&bytes).with_context(|| {
                format!("{} is invalid", path.display())
            })?))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// `kiln login URL`: checks the key against the server, then saves both (mode 0600).
pub async fn login(url: &str, api_key: &str) -> anyhow::Result<ExitCode> {
    let client = Client::new(url, api_key)?;
    Template::list(&client, None)
        .await
        .with_context(|| format!("checking the key against {url}"))?;
    let path = profile_path().context("no home directory for the profile")?;
    let dir = path.parent().expect("profile path has a parent");
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let json = serde_json::to_vec_pretty(&Profile {
        url: url.to_owned(),
        api_key: api_key.to_owned(),
    })?;
    let mut f = {
        use std::os::unix::fs::OpenOptionsExt as _;
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("writing {}", path.display()))?
    };
    f.write_all(&json)?;
    eprintln!("--> logged in to {url}; saved in {}", path.display());
    Ok(ExitCode::SUCCESS)
}

/// `kiln logout`: back to the local state dir.
pub fn logout() -> anyhow::Result<ExitCode> {
    if let Some(path) = profile_path() {
        match std::fs::remove_file(&path) {
            Ok(()) => eprintln!("--> removed {}", path.display()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn wire<T: Serialize>(v: &T) -> anyhow::Result<serde_json::Value> {
    Ok(serde_json::to_value(v)?)
}

/// The SDK's status as the CLI's own (both are the wire's strings).
fn build_status(s: kiln_sdk::BuildStatus) -> kiln_store::BuildStatus {
    serde_json::to_value(s)
        .ok()
        .and_then(|v| v.as_str().and_then(|s| s.parse().ok()))
        .unwrap_or(kiln_store::BuildStatus::Failed)
}

/// A validated request as the SDK's options.
fn create_options(req: &TemplateRequest) -> anyhow::Result<TemplateCreateOptions> {
    let doc = req.to_json(kiln_spec::Form::Wire);
    let spec = &doc["build_spec"];
    let steps: Vec<Step> = serde_json::from_value(spec["steps"].clone()).unwrap_or_default();
    let text = |v: &serde_json::Value| v.as_str().map(str::to_owned);
    let num = |v: &serde_json::Value| v.as_u64().and_then(|n| u32::try_from(n).ok());
    Ok(TemplateCreateOptions {
        name: req.name.clone().unwrap_or_default(),
        from: text(&spec["from"]).context("the spec has no `from`")?,
        steps,
        start_cmd: text(&spec["start_cmd"]),
        ready_cmd: text(&spec["ready_cmd"]),
        vcpu: num(&doc["vcpu"]),
        memory_mib: num(&doc["memory_mib"]),
        disk_mib: num(&doc["disk_mib"]),
        force: false,
    })
}

fn print_event(e: &BuildLogEvent) {
    if e.finished {
        return;
    }
    let system = e.stream == LogStream::System;
    // Live build output goes to stderr, as in local mode: stdout is for the result.
    if system {
        eprintln!("--> {}", e.text);
    } else {
        eprintln!("    {}", e.text);
    }
}

/// `kiln template ...` against the server.
pub async fn template(cmd: crate::template::Cmd, client: Client) -> anyhow::Result<ExitCode> {
    use crate::template::Cmd;
    match cmd {
        Cmd::Build {
            file,
            name,
            detach,
            no_cache,
        } => {
            let text = crate::validate::read_spec(&file)?;
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
                bail!("the template needs a name: give `name` in the spec or --name");
            };
            req.validate().map_err(|p| anyhow::anyhow!("{p}"))?;
            let mut options = create_options(&req)?;
            options.force = no_cache;
            let mut template = match Template::create(&client, options.clone()).await {
                Ok(t) => t,
                Err(e) if e.code() == "conflict" => {
                    let mut t = Template::connect(&client, &template_name).await?;
                    t.rebuild_with(&options).await?;
                    t
                }
                Err(e) => return Err(e.into()),
            };
            let build_id = template.info().latest_build_id.clone().unwrap_or_default();
            eprintln!(
                "--> template {} ({}), build {build_id}",
                template.name(),
                template.id()
            );
            if detach {
                println!("{build_id}");
                return Ok(ExitCode::SUCCESS);
            }
            let waited = {
                let mut on_log = |e: &BuildLogEvent| print_event(e);
                let wait = template.wait_until_ready(Some(&mut on_log));
                tokio::pin!(wait);
                tokio::select! {
                    r = &mut wait => Some(r),
                    _ = tokio::signal::ctrl_c() => None,
                }
            };
            if waited.is_none() {
                eprintln!("--> cancelling");
                template.cancel_build(&build_id).await?;
            }
            // The build's own record says how it ended, whichever way the wait did.
            let b = template.get_build(&build_id).await?;
            Ok(finish_wire(
                template.id(),
                build_status(b.status),
                b.error_message.as_deref(),
            ))
        }
        Cmd::Ls { json } => {
            let all = Template::list(&client, None).await?;
            let docs = all.iter().map(wire).collect::<anyhow::Result<Vec<_>>>()?;
            print_templates(&docs, json)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Show { name, json } => {
            let t = Template::connect(&client, &name).await?;
            let builds = t.list_builds(None).await?;
            let mut doc = wire(t.info())?;
            doc["builds"] = builds
                .iter()
                .map(wire)
                .collect::<anyhow::Result<Vec<_>>>()?
                .into();
            print_template(&doc, json)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Logs { name, build, .. } => {
            let t = Template::connect(&client, &name).await?;
            let Some(build_id) = build.or_else(|| t.info().latest_build_id.clone()) else {
                bail!("template {} has no builds", t.name());
            };
            t.stream_build_logs(Some(&build_id), |e: &BuildLogEvent| {
                if !e.finished {
                    print_log(e.stream == LogStream::System, &e.text);
                }
            })
            .await?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Rm { name } => {
            let t = Template::connect(&client, &name).await?;
            t.delete().await?;
            println!("{}", t.id());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Cancel { name } => {
            let t = Template::connect(&client, &name).await?;
            let Some(build_id) = t.info().latest_build_id.clone() else {
                bail!("template {} has no builds", t.name());
            };
            t.cancel_build(&build_id).await?;
            let b = t.get_build(&build_id).await?;
            println!("{} {}", b.id, build_status(b.status));
            Ok(ExitCode::SUCCESS)
        }
        Cmd::RunBuild { .. } => bail!("run-build works on the local state dir only"),
    }
}

/// `kiln sandbox ...` against the server.
/// The SDK's form of checked egress rules.
fn sdk_network(r: kiln_net::NetworkRules) -> kiln_sdk::NetworkConfig {
    kiln_sdk::NetworkConfig {
        allow_out: r.allow_out,
        deny_out: r.deny_out,
    }
}

pub async fn sandbox(cmd: crate::sandbox::Cmd, client: Client) -> anyhow::Result<ExitCode> {
    use crate::sandbox::{pairs, print_sandboxes, shell_join, split_remote, Cmd};
    match cmd {
        Cmd::Create {
            template,
            env,
            metadata,
            name,
            allow_out,
            deny_out,
        } => {
            // The API wants a name; the local default is the id, which only the server
            // knows, so the template's name and a random suffix stand in.
            let name = name.unwrap_or_else(|| {
                let tail = uuid::Uuid::new_v4().simple().to_string();
                format!("{template}-{}", &tail[..8])
            });
            let mut options = SandboxCreateOptions::new(name, template);
            options.env_vars = pairs(&env)?;
            options.metadata = pairs(&metadata)?;
            options.network = crate::sandbox::network_rules(allow_out, deny_out)?.map(sdk_network);
            let s = Sandbox::create(&client, options).await?;
            println!("{}", s.id());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Ls { json } => {
            let all = Sandbox::list(&client, ListOptions::default()).await?;
            let docs = all.iter().map(wire).collect::<anyhow::Result<Vec<_>>>()?;
            print_sandboxes(&docs, json)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Network {
            id,
            allow_out,
            deny_out,
            clear,
        } => {
            let rules =
                crate::sandbox::network_update(allow_out, deny_out, clear)?.map(sdk_network);
            Sandbox::set_network_by_id(&client, &id, rules.as_ref()).await?;
            println!("{id}");
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Kill { id } => {
            Sandbox::kill_by_id(&client, &id).await?;
            println!("{id}");
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Exec {
            cwd,
            env,
            user,
            id,
            cmd,
        } => {
            if user.is_some() {
                bail!(
                    "--user is not available against a server: commands run as the template's user"
                );
            }
            let s = Sandbox::connect(&client, &id).await?;
            let options = RunOptions {
                cwd,
                env: pairs(&env)?,
                ..RunOptions::default()
            };
            let result = s
                .commands()
                .run_streaming(
                    &shell_join(&cmd),
                    options,
                    |out: &str| {
                        let mut o = std::io::stdout();
                        let _ = o.write_all(out.as_bytes());
                        let _ = o.flush();
                    },
                    |err: &str| {
                        let mut e = std::io::stderr();
                        let _ = e.write_all(err.as_bytes());
                        let _ = e.flush();
                    },
                )
                .await?;
            Ok(ExitCode::from(
                u8::try_from(result.exit_code & 0xff).unwrap_or(1),
            ))
        }
        Cmd::Cp { src, dst } => {
            match (split_remote(&src), split_remote(&dst)) {
                (Some((id, path)), None) => {
                    let s = Sandbox::connect(&client, id).await?;
                    let data = s.files().read(path).await?;
                    std::fs::write(&dst, &data).with_context(|| format!("writing {dst}"))?;
                    eprintln!("{} bytes", data.len());
                }
                (None, Some((id, path))) => {
                    let data = std::fs::read(&src).with_context(|| format!("reading {src}"))?;
                    let s = Sandbox::connect(&client, id).await?;
                    s.files().write(path, &data).await?;
                    eprintln!("{} bytes", data.len());
                }
                _ => bail!("exactly one side must be a sandbox path, as ID:/absolute/path"),
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Keep { .. } => bail!("keep works on the local state dir only"),
    }
}
