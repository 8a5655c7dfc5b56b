//! `kiln serve` and `kiln admin`: the HTTP API on the same state dir as the CLI.

use std::process::ExitCode;

use anyhow::Context as _;

use crate::engine;

/// `kiln serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "KILN_LISTEN", default_value = "127.0.0.1:8080")]
    listen: std::net::SocketAddr,
}

/// `kiln admin`.
#[derive(Debug, clap::Args)]
pub struct AdminArgs {
    #[command(subcommand)]
    command: AdminCmd,
}

#[derive(Debug, clap::Subcommand)]
enum AdminCmd {
    /// Create an API key for a team (created if needed); prints the key alone.
    CreateApiKey {
        /// Team name.
        #[arg(long)]
        team: String,
    },
}

pub async fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let engine = engine().await?;
    // Builds that were running when a previous server died cannot be resumed.
    for b in engine.store().mark_interrupted_builds().await? {
        tracing::warn!(build = %b.id, "build interrupted by server restart marked failed");
    }
    let app = kiln_server::router(kiln_server::AppState { engine });
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    eprintln!("kiln API listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(ExitCode::SUCCESS)
}

pub async fn admin(args: AdminArgs) -> anyhow::Result<ExitCode> {
    let engine = engine().await?;
    match args.command {
        AdminCmd::CreateApiKey { team } => {
            let (_, key) = engine.store().create_api_key(&team).await?;
            println!("{key}");
        }
    }
    Ok(ExitCode::SUCCESS)
}
