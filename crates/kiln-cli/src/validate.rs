//! `kiln validate FILE`: check a spec before any build is queued.

use std::io::Read;
use std::process::ExitCode;

use anyhow::Context;
use kiln_spec::{Form, TemplateRequest};

/// Largest spec document read; far above any real spec, small enough to never hurt.
const MAX_SPEC_BYTES: u64 = 1024 * 1024;

/// Arguments of `kiln validate`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The spec file (HTTP wire form or SDK form), or `-` for standard input.
    pub file: String,
}

/// Exit 0 and the normalized wire JSON on stdout; exit 2 and one `<path>: <message>` line
/// per problem on stderr.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let text = read_spec(&args.file)?;
    let doc: serde_json::Value = match serde_json::from_str(&text) {
        Ok(doc) => doc,
        Err(e) => {
            eprintln!("$: invalid JSON: {e}");
            return Ok(ExitCode::from(2));
        }
    };
    match TemplateRequest::parse_and_validate(&doc) {
        Ok(req) => {
            let normalized = req.normalized().to_json(Form::Wire);
            println!("{}", serde_json::to_string_pretty(&normalized)?);
            Ok(ExitCode::SUCCESS)
        }
        Err(problems) => {
            for p in &problems.0 {
                eprintln!("{p}");
            }
            Ok(ExitCode::from(2))
        }
    }
}

/// Reads a spec document, refusing anything larger than [`MAX_SPEC_BYTES`].
pub fn read_spec(file: &str) -> anyhow::Result<String> {
    let mut text = String::new();
    let reader: Box<dyn Read> = if file == "-" {
        Box::new(std::io::stdin())
    } else {
        Box::new(std::fs::File::open(file).with_context(|| format!("cannot open {file}"))?)
    };
    reader
        .take(MAX_SPEC_BYTES + 1)
        .read_to_string(&mut text)
        .with_context(|| format!("cannot read {file}"))?;
    anyhow::ensure!(
        text.len() as u64 <= MAX_SPEC_BYTES,
        "{file} is larger than {MAX_SPEC_BYTES} bytes"
    );
    Ok(text)
}
