//! `kiln secret ...`: team secrets, on the local state dir or a server (see
//! [`crate::backend`]). A value is read from standard input (or an environment variable
//! with `--value-env`), never from the command line, where `ps` and shell history would
//! show it; and it is never printed.

use std::io::Read as _;
use std::process::ExitCode;

use anyhow::{bail, Context as _};
use kiln_api::{AuditQuery, CreateSecret};

use crate::backend::backend;
use crate::print;

#[derive(Debug, clap::Subcommand)]
pub(crate) enum Cmd {
    /// Store a secret: a provider shortcut (`openai`, `anthropic`, `github`), or an auth
    /// shape and hosts. The value is read from standard input.
    Create {
        /// Its name (letters, digits, `-`, `_`, `.`).
        name: String,
        /// A provider shortcut: its auth shape and hosts.
        #[arg(long, conflicts_with_all = ["auth", "hosts"])]
        provider: Option<String>,
        /// The auth shape as JSON, e.g. `{"type": "bearer"}`, `{"type": "api-key",
        /// "header": "X-Api-Key"}`, `{"type": "basic", "username": "u"}`, or `{"per_host":
        /// [{"type": ..., "hosts": [...]}, ...]}` (whose hosts need no `--host`).
        #[arg(long)]
        auth: Option<String>,
        /// A host the value may be sent to (`api.example.com`, `*.example.com`, an
        /// address; `:port` optional). Repeatable.
        #[arg(long = "host", value_name = "HOST")]
        hosts: Vec<String>,
        /// Read the value from this environment variable instead of standard input.
        #[arg(long, value_name = "VAR")]
        value_env: Option<String>,
    },
    /// List the team's secrets (never their values).
    Ls {
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Replace a secret's value (read from standard input); bound sandboxes send the new
    /// one from their next request.
    Rotate {
        /// Its name.
        name: String,
        /// Read the value from this environment variable instead of standard input.
        #[arg(long, value_name = "VAR")]
        value_env: Option<String>,
    },
    /// Delete a secret; every binding of it is revoked at once.
    Rm {
        /// Its name.
        name: String,
    },
    /// The requests made with a secret, newest first.
    Audit {
        /// Its name.
        name: String,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Only this status (`401`), class (`4xx`) or `error` (the proxy answered).
        #[arg(long)]
        status: Option<String>,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
}

/// The value: from `$var`, or standard input without its final newline.
fn read_value(var: Option<&str>) -> anyhow::Result<String> {
    let value = match var {
        Some(var) => std::env::var(var).with_context(|| format!("reading ${var}"))?,
        None => {
            let mut v = String::new();
            std::io::stdin()
                .read_to_string(&mut v)
                .context("reading the value from standard input")?;
            let trimmed = v.strip_suffix('\n').unwrap_or(&v);
            trimmed.strip_suffix('\r').unwrap_or(trimmed).to_owned()
        }
    };
    if value.is_empty() {
        bail!("the value is empty (give it on standard input, or with --value-env)");
    }
    Ok(value)
}

pub async fn run(command: Cmd) -> anyhow::Result<ExitCode> {
    let backend = backend().await?;
    let backend = backend.as_ref();
    match command {
        Cmd::Create {
            name,
            provider,
            auth,
            hosts,
            value_env,
        } => {
            let auth = auth
                .map(|a| serde_json::from_str(&a).context("--auth is not JSON"))
                .transpose()?;
            let req = CreateSecret {
                name,
                value: read_value(value_env.as_deref())?,
                provider,
                auth,
                hosts: (!hosts.is_empty()).then_some(hosts),
            };
            // Checked here too, so a typo fails before anything is sent.
            req.validate()?;
            println!("{}", backend.create_secret(&req).await?.name);
        }
        Cmd::Ls { json } => print::secrets(&backend.secrets().await?, json)?,
        Cmd::Rotate { name, value_env } => {
            let value = read_value(value_env.as_deref())?;
            println!("{}", backend.rotate_secret(&name, &value).await?.name);
        }
        Cmd::Rm { name } => {
            backend.delete_secret(&name).await?;
            println!("{name}");
        }
        Cmd::Audit {
            name,
            limit,
            status,
            json,
        } => {
            let mut pairs = vec![("limit".to_owned(), limit.to_string())];
            pairs.extend(status.map(|s| ("status".to_owned(), s)));
            let q = AuditQuery::from_query(&pairs)?;
            print::audit(&backend.secret_audit(&name, &q).await?, json)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
