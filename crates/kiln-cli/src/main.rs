//! `kiln`: build sandbox templates and run sandboxes from them.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod state;
mod validate;

#[derive(Debug, Parser)]
#[command(name = "kiln", version, about = "Build sandbox templates and run sandboxes from them")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check a BuildSpec (either JSON form) and print it normalized, as wire JSON.
    Validate(validate::Args),
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KILN_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Validate(args) => validate::run(args),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            // The last line of stderr is what scripts read: keep it `<code>: <detail>` when
            // the error carries a code, the plain chain otherwise.
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
