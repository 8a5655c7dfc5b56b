//! `kiln snapshot ...`: list, inspect, rename and delete snapshots of sandboxes (`kiln
//! sandbox snapshot` takes them, `kiln sandbox create --from-snapshot` forks them), on the
//! local state dir or a server (see [`crate::backend`]).

use std::process::ExitCode;

use crate::backend::backend;
use crate::print;

#[derive(Debug, clap::Subcommand)]
pub(crate) enum Cmd {
    /// List snapshots, newest first.
    Ls {
        /// Only this sandbox's (also once it is deleted).
        #[arg(long)]
        sandbox: Option<String>,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Show one snapshot.
    Show {
        /// Snapshot id.
        id: String,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Rename a snapshot.
    Rename {
        /// Snapshot id.
        id: String,
        /// The new name.
        name: String,
    },
    /// Delete a snapshot (sandboxes created from it are not affected).
    Rm {
        /// Snapshot id.
        id: String,
    },
}

pub async fn run(command: Cmd) -> anyhow::Result<ExitCode> {
    let backend = backend().await?;
    let backend = backend.as_ref();
    match command {
        Cmd::Ls { sandbox, json } => {
            print::snapshots(&backend.snapshots(sandbox.as_deref()).await?, json)?
        }
        Cmd::Show { id, json } => print::snapshot(&backend.snapshot(&id).await?, json)?,
        Cmd::Rename { id, name } => {
            println!("{}", backend.rename_snapshot(&id, &name).await?.id);
        }
        Cmd::Rm { id } => {
            backend.delete_snapshot(&id).await?;
            println!("{id}");
        }
    }
    Ok(ExitCode::SUCCESS)
}
