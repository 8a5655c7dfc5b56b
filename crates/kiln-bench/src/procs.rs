//! Child processes the harness starts (the `kiln serve` under test, bare QEMUs, skopeo,
//! umoci): each dies with the harness.
//!
//! Three layers make sure of it: `kill_on_drop` (an error or Ctrl-C unwinds the future that
//! owns the child), `PR_SET_PDEATHSIG` (the harness dies without unwinding), and for the
//! server a graceful SIGTERM first, so that it stops its own sandboxes' VMs.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

/// A command whose process is SIGKILLed when its handle drops or the harness dies.
pub fn command(program: impl AsRef<std::ffi::OsStr>) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(program);
    cmd.kill_on_drop(true).stdin(Stdio::null());
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}

/// Runs a command to completion; a non-zero exit is an error with its stderr.
pub async fn run(cmd: &mut tokio::process::Command) -> anyhow::Result<()> {
    let out = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .await
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn signal(pid: u32, sig: i32) {
    if let Ok(pid) = i32::try_from(pid) {
        if pid > 0 {
            // SAFETY: kill(2) on our own unreaped child.
            unsafe { libc::kill(pid, sig) };
        }
    }
}

/// `kiln serve` on a fresh state dir, listening on a free loopback port.
#[derive(Debug)]
pub struct Server {
    child: Option<tokio::process::Child>,
    /// Its base URL.
    pub url: String,
    /// Its pid.
    pub pid: u32,
    /// Its log (stderr).
    pub log: PathBuf,
}

impl Server {
    /// Starts `kiln serve --listen 127.0.0.1:0` with `KILN_HOME=state` (and the restore
    /// pool size; the local test `registry`, on loopback, allowed) and waits until it
    /// says where it listens and answers `/health`.
    pub async fn start(
        kiln: &Path,
        state: &Path,
        log: &Path,
        restore_pool: usize,
        registry: &str,
    ) -> anyhow::Result<Self> {
        let file =
            std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let mut cmd = command(kiln);
        cmd.args(["serve", "--listen", "127.0.0.1:0"])
            .env("KILN_HOME", state)
            // Exec loops send far more than the default 50 requests/s.
            .env("KILN_RATE_LIMIT_PER_SEC", "0")
            .env("KILN_RESTORE_POOL", restore_pool.to_string())
            // No system template builds competing with the measurements.
            .env("KILN_SYSTEM_TEMPLATES", "none")
            // A server pulls from loopback registries only when its operator lists them.
            .env("KILN_PRIVATE_REGISTRIES", registry)
            .env_remove("KILN_CONFIG")
            .env_remove("KILN_LISTEN")
            .env_remove("KILN_URL")
            .env_remove("KILN_API_KEY")
            .stdout(Stdio::null())
            .stderr(file);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {} serve", kiln.display()))?;
        let pid = child.id().unwrap_or(0);
        let mut server = Self {
            child: Some(child),
            url: String::new(),
            pid,
            log: log.to_owned(),
        };
        let started = Instant::now();
        loop {
            if let Some(child) = server.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    bail!("kiln serve exited ({status}); log:\n{}", server.log_tail());
                }
            }
            let text = std::fs::read_to_string(log).unwrap_or_default();
            if let Some(url) = text
                .lines()
                .find_map(|l| l.split("listening on ").nth(1))
                .map(|u| u.trim().to_owned())
            {
                server.url = url;
                break;
            }
            if started.elapsed() > Duration::from_secs(60) {
                bail!(
                    "kiln serve did not start within 60 s; log:\n{}",
                    server.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(server)
    }

    /// The last lines of its log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// SIGTERM (it stops its sandboxes' VMs and exits), SIGKILL after `grace`.
    pub async fn stop(mut self, grace: Duration) {
        if let Some(mut child) = self.child.take() {
            signal(self.pid, libc::SIGTERM);
            if tokio::time::timeout(grace, child.wait()).await.is_err() {
                let _ = child.kill().await;
            }
        }
    }
}

impl Drop for Server {
    /// The error and Ctrl-C path: the same as [`Server::stop`], blocking.
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        signal(self.pid, libc::SIGTERM);
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(15) {
            if matches!(child.try_wait(), Ok(Some(_)) | Err(_)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.start_kill();
    }
}
