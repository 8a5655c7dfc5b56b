//! The SDK's tour against a running `kiln serve`: build a template (a step, a start and a
//! ready command) while printing its log, start a sandbox from it, run a command, write
//! and read a file, pause and resume, then clean up.
//!
//! ```sh
//! KILN_URL=http://127.0.0.1:8080 KILN_API_KEY=... KILN_EXAMPLE_IMAGE=python:3.11 \
//!     cargo run -p kiln-sdk --example quickstart
//! ```

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use kiln_sdk::{
    BuildLogEvent, Client, RunOptions, Sandbox, SandboxCreateOptions, Step, Template,
    TemplateCreateOptions,
};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let image = std::env::var("KILN_EXAMPLE_IMAGE")
        .map_err(|_| "set KILN_EXAMPLE_IMAGE to a base image reference, e.g. python:3.11")?;
    // KILN_URL and KILN_API_KEY.
    let client = Client::from_env()?;
    let stamp = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let name = format!("sdk-quickstart-{stamp}");

    // A template: the base image, one step, a long-running start command and a probe
    // that says it is ready. The build runs in a VM on the server.
    let started = Instant::now();
    let mut template = Template::create(
        &client,
        TemplateCreateOptions {
            steps: vec![
                Step::env("GREETING", "hello from the template"),
                Step::run("mkdir -p /srv && echo built > /srv/built.txt"),
            ],
            start_cmd: Some("sleep infinity".into()),
            ready_cmd: Some("test -f /srv/built.txt".into()),
            memory_mib: Some(512),
            ..TemplateCreateOptions::new(&name, image)
        },
    )
    .await?;
    println!("template {} ({}) queued", template.name(), template.id());
    let info = template
        .wait_until_ready(Some(&mut |e: &BuildLogEvent| {
            println!("  [{:?}] {}", e.stream, e.text)
        }))
        .await?;
    println!(
        "template ready in {:.0?} ({} bytes)",
        started.elapsed(),
        info.size_bytes.unwrap_or(0)
    );

    // A sandbox: the template's snapshot, restored.
    let sandbox = Sandbox::create(
        &client,
        SandboxCreateOptions {
            env_vars: [("WHO".to_owned(), "quickstart".to_owned())].into(),
            ..SandboxCreateOptions::new("quickstart", &name)
        },
    )
    .await?;
    println!("sandbox {} is {:?}", sandbox.id(), sandbox.status());

    let r = sandbox
        .commands()
        .run(
            "echo \"$GREETING, $WHO\"; cat /srv/built.txt",
            RunOptions::default(),
        )
        .await?;
    print!("command said (exit {}):\n{}", r.exit_code, r.stdout);

    sandbox
        .files()
        .write("/tmp/notes.txt", "written by the Rust SDK\n")
        .await?;
    let text = sandbox.files().read_text("/tmp/notes.txt").await?;
    print!("read back: {text}");

    sandbox.pause().await?;
    println!("paused");
    sandbox.resume().await?;
    println!("resumed; the file is still there:");
    print!("  {}", sandbox.files().read_text("/tmp/notes.txt").await?);

    sandbox.kill().await?;
    template.delete().await?;
    println!("cleaned up");
    Ok(())
}
