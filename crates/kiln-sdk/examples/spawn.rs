//! An interactive session: `cat` in a sandbox, fed over stdin, its output read as it
//! comes, then its result.
//!
//! Uses the template named by `KILN_EXAMPLE_TEMPLATE` when set; otherwise builds a small
//! one from `KILN_EXAMPLE_IMAGE` (and deletes it afterwards).
//!
//! ```sh
//! KILN_URL=http://127.0.0.1:8080 KILN_API_KEY=... KILN_EXAMPLE_IMAGE=python:3.11 \
//!     cargo run -p kiln-sdk --example spawn
//! ```

use std::time::{SystemTime, UNIX_EPOCH};

use kiln_sdk::{
    Client, Output, RunOptions, Sandbox, SandboxCreateOptions, Template, TemplateCreateOptions,
};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let client = Client::from_env()?;
    let stamp = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();

    let (template_name, built) = match std::env::var("KILN_EXAMPLE_TEMPLATE") {
        Ok(t) if !t.is_empty() => (t, None),
        _ => {
            let image = std::env::var("KILN_EXAMPLE_IMAGE").map_err(|_| {
                "set KILN_EXAMPLE_TEMPLATE, or KILN_EXAMPLE_IMAGE to a base image reference"
            })?;
            let name = format!("sdk-spawn-{stamp}");
            println!("building {name} from {image}...");
            let mut t = Template::create(
                &client,
                TemplateCreateOptions {
                    start_cmd: Some("sleep infinity".into()),
                    ready_cmd: Some("true".into()),
                    memory_mib: Some(256),
                    ..TemplateCreateOptions::new(&name, image)
                },
            )
            .await?;
            t.wait_until_ready(None).await?;
            (name, Some(t))
        }
    };

    let sandbox =
        Sandbox::create(&client, SandboxCreateOptions::new("spawn", &template_name)).await?;
    let result = async {
        let mut session = sandbox
            .commands()
            .spawn("cat; echo done >&2", RunOptions::default())
            .await?;
        for line in ["first line\n", "second line\n"] {
            session.write_stdin(line).await?;
            // cat echoes each line as it gets it.
            if let Some(Output::Stdout(out)) = session.next_output().await {
                print!("echoed: {out}");
            }
        }
        session.close_stdin().await?;
        session.wait().await
    }
    .await;
    sandbox.kill().await?;
    if let Some(t) = built {
        t.delete().await?;
    }
    let result = result?;
    println!(
        "exit {}; stdout {:?}; stderr {:?}",
        result.exit_code, result.stdout, result.stderr
    );
    Ok(())
}
