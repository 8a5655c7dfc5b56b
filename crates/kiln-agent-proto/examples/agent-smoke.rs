//! Smoke-test a running agent: `cargo run -p kiln-agent-proto --features client
//! --example agent-smoke -- SOCKET [COMMAND]`. Connects (waiting up to 120 s for a booting
//! guest), prints hello/health, sets the clock and runs COMMAND (default `uname -a`).
//! `bg:CMD` starts CMD in the background and prints its pid; `pid:N` queries pid N.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant, SystemTime};

use kiln_agent_proto::{AgentClient, ExecRequest};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut args = std::env::args().skip(1);
    let sock = args.next().expect("usage: agent-smoke SOCKET [COMMAND]");
    let cmd = args.next().unwrap_or_else(|| "uname -a".into());
    let t0 = Instant::now();
    let c = AgentClient::connect_unix(&sock, Duration::from_secs(120))
        .await
        .unwrap();
    println!("connected in {:?}: {:?}", t0.elapsed(), c.agent_info());
    let t1 = Instant::now();
    println!(
        "health {:?} in {:?}",
        c.health().await.unwrap(),
        t1.elapsed()
    );
    println!(
        "clock applied: {}",
        c.set_clock(SystemTime::now()).await.unwrap()
    );
    if let Some(bg) = cmd.strip_prefix("bg:") {
        let pid = c
            .spawn_background(ExecRequest {
                command: bg.into(),
                ..Default::default()
            })
            .await
            .unwrap();
        println!("background pid {pid}");
        return;
    }
    if let Some(pid) = cmd.strip_prefix("pid:") {
        let st = c.wait_pid(pid.parse().unwrap(), None).await.unwrap();
        println!("{st:?}");
        return;
    }
    let out = c
        .exec_collect(ExecRequest {
            command: cmd,
            ..Default::default()
        })
        .await
        .unwrap();
    print!("{}", String::from_utf8_lossy(&out.stdout));
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    println!("exit: {:?}", out.status);
}
