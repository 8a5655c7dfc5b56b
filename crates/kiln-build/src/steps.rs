//! Running a spec's steps, `startCmd` and `readyCmd` inside a build VM.
//!
//! The runtime defaults (env, working directory, user) start from the image config and are
//! changed by the steps, in order; they are what every later step runs with and what a
//! sandbox's exec uses when a call gives none.

use std::time::{Duration, Instant};

use kiln_spec::{BuildErrorCode, RuntimeDefaults, Step};

use crate::error::BuildError;
use crate::guest::{Command, Guest, GuestError};
use crate::log::{LineSplitter, LogSink};

/// Where the start command's output goes in the guest. On tmpfs: it lives in the snapshot.
pub const START_LOG: &str = "/run/kiln-start.log";

/// Time bounds of the steps and the start/ready phase.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// Longest a single step may run.
    pub step_timeout: Duration,
    /// How often `readyCmd` is run.
    pub ready_interval: Duration,
    /// How long `readyCmd` may take to first exit 0.
    pub ready_timeout: Duration,
    /// Without a `readyCmd`: how long the start command must survive before the snapshot.
    pub start_grace: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            step_timeout: Duration::from_secs(30 * 60),
            ready_interval: Duration::from_secs(2),
            ready_timeout: Duration::from_secs(10 * 60),
            start_grace: Duration::from_secs(1),
        }
    }
}

/// How a step did not succeed.
#[derive(Debug)]
enum StepError {
    /// It ran and failed (exit status, signal, timeout): the user's step.
    Failed(String),
    /// It could not be run or followed to its end: the VM or agent is gone.
    Guest(GuestError),
}

/// Runs steps in a build VM, keeping the runtime defaults as they evolve.
#[derive(Debug)]
pub struct StepRunner<'a, G: ?Sized> {
    guest: &'a G,
    sink: &'a dyn LogSink,
    timing: Timing,
    /// The defaults as changed by the steps so far.
    pub defaults: RuntimeDefaults,
}

impl std::fmt::Debug for dyn LogSink + '_ {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LogSink")
    }
}

impl<'a, G: Guest + ?Sized> StepRunner<'a, G> {
    /// A runner starting from the image's defaults.
    pub fn new(
        guest: &'a G,
        sink: &'a dyn LogSink,
        defaults: RuntimeDefaults,
        timing: Timing,
    ) -> Self {
        Self {
            guest,
            sink,
            timing,
            defaults,
        }
    }

    /// Runs every step in order; the first failure stops the build with `step_failed` (or
    /// `build_failed` when the VM itself stopped answering).
    pub async fn run_steps(&mut self, steps: &[Step]) -> Result<(), BuildError> {
        for (i, step) in steps.iter().enumerate() {
            self.run_one(i, steps.len(), step).await?;
        }
        Ok(())
    }

    /// Runs step `index` (0-based) of `total`, logged as such.
    pub async fn run_one(
        &mut self,
        index: usize,
        total: usize,
        step: &Step,
    ) -> Result<(), BuildError> {
        let (i, n) = (index + 1, total);
        self.sink
            .system(format!("step {i}/{n}: {}", describe(step)));
        let started = Instant::now();
        self.run_step(step).await.map_err(|e| match e {
            StepError::Failed(why) => BuildError::new(
                BuildErrorCode::StepFailed,
                format!("step {i}/{n} ({}) {why}", describe(step)),
            ),
            // The VM or its agent went away: nothing the step did wrong.
            StepError::Guest(e) => BuildError::new(
                BuildErrorCode::BuildFailed,
                format!(
                    "the build VM stopped answering during step {i}/{n} ({}): {e}",
                    describe(step)
                ),
            )
            .with_source(e),
        })?;
        tracing::debug!(step = i, elapsed = ?started.elapsed(), "step done");
        Ok(())
    }

    /// Takes step `index` of `total` from the step cache: its effect on the disk is in the
    /// cached layer, so only its effect on the runtime defaults is applied here.
    pub fn skip_cached(&mut self, index: usize, total: usize, step: &Step) {
        self.sink.system(format!(
            "step {}/{total}: {} (cached)",
            index + 1,
            describe(step)
        ));
        match step {
            Step::Run(_) => {}
            Step::Env { key, value } => self.defaults.set_env(key, value),
            Step::Workdir(dir) => self.defaults.workdir = dir.clone(),
            Step::User { name, .. } => self.defaults.user = name.clone(),
        }
    }

    async fn run_step(&mut self, step: &Step) -> Result<(), StepError> {
        let timeout = Some(self.timing.step_timeout);
        match step {
            Step::Run(script) => {
                let cmd = command(&self.defaults, script.clone(), timeout);
                self.run_logged(&cmd).await
            }
            Step::Env { key, value } => {
                self.defaults.set_env(key, value);
                Ok(())
            }
            Step::Workdir(dir) => {
                let script = format!(
                    "mkdir -p -- {dir} && chown -- {user}: {dir}",
                    dir = shell_quote(dir),
                    user = shell_quote(&self.defaults.user)
                );
                self.run_logged(&as_root(&self.defaults, script, timeout))
                    .await?;
                self.defaults.workdir = dir.clone();
                Ok(())
            }
            Step::User { name, sudo } => {
                let mut script = create_user_script(name);
                if *sudo {
                    script.push_str(&grant_sudo_script(name));
                }
                self.run_logged(&as_root(&self.defaults, script, timeout))
                    .await?;
                self.defaults.user = name.clone();
                Ok(())
            }
        }
    }

    /// Runs a command with its output going to the log; `Err` says how it ended.
    async fn run_logged(&self, cmd: &Command) -> Result<(), StepError> {
        let mut lines = LineSplitter::default();
        let sink = self.sink;
        let exit = self
            .guest
            .run(cmd, &mut |stream, chunk| lines.feed(stream, chunk, sink))
            .await;
        lines.flush(sink);
        match exit {
            Ok(exit) if exit.success() => Ok(()),
            Ok(exit) => Err(StepError::Failed(format!("failed with {exit}"))),
            Err(e) if e.vm_gone => Err(StepError::Guest(e)),
            Err(e) => Err(StepError::Failed(format!("could not run: {e}"))),
        }
    }

    /// Starts `start_cmd` in the background and waits for `ready_cmd`, as the spec says:
    /// the probe every `ready_interval` until it exits 0, for at most `ready_timeout`; the
    /// start command exiting non-zero meanwhile fails the build with its output tail.
    pub async fn start_and_wait_ready(
        &self,
        start_cmd: Option<&str>,
        ready_cmd: Option<&str>,
    ) -> Result<Option<u32>, BuildError> {
        let pid = match start_cmd {
            None => None,
            Some(start) => {
                self.sink
                    .system(format!("starting: {}", ellipsize(start, 200)));
                let cmd = command(&self.defaults, start.to_owned(), None);
                let pid = self.guest.spawn(&cmd, START_LOG).await.map_err(|e| {
                    BuildError::new(
                        BuildErrorCode::StartCmdFailed,
                        format!("could not start: {e}"),
                    )
                    .with_source(e)
                })?;
                self.sink.system(format!("started (pid {pid})"));
                Some(pid)
            }
        };
        let Some(ready) = ready_cmd else {
            if let Some(pid) = pid {
                tokio::time::sleep(self.timing.start_grace).await;
                self.check_start(pid).await?;
            }
            return Ok(pid);
        };
        self.sink
            .system(format!("waiting for ready: {}", ellipsize(ready, 200)));
        let started = Instant::now();
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let probe = command(
                &self.defaults,
                ready.to_owned(),
                Some(self.timing.ready_interval.max(Duration::from_secs(30))),
            );
            let mut tail = Vec::new();
            let exit = self
                .guest
                .run(&probe, &mut |_, chunk| keep_tail(&mut tail, chunk, 1024))
                .await
                .map_err(|e| ready_err(format!("could not run readyCmd: {e}")))?;
            if exit.success() {
                self.sink.system(format!(
                    "ready after {attempts} probe(s), {:.1}s",
                    started.elapsed().as_secs_f64()
                ));
                return Ok(pid);
            }
            if let Some(pid) = pid {
                self.check_start(pid).await?;
            }
            if started.elapsed() + self.timing.ready_interval > self.timing.ready_timeout {
                let out = String::from_utf8_lossy(&tail);
                return Err(ready_err(format!(
                    "readyCmd did not exit 0 within {}s ({attempts} probes; last: {exit}{})",
                    self.timing.ready_timeout.as_secs(),
                    if out.trim().is_empty() {
                        String::new()
                    } else {
                        format!(": {}", out.trim())
                    }
                )));
            }
            tokio::time::sleep(self.timing.ready_interval).await;
        }
    }

    /// Fails with `start_cmd_failed` and the output tail if the start command died non-zero.
    async fn check_start(&self, pid: u32) -> Result<(), BuildError> {
        let status = self.guest.exit_status(pid).await.map_err(start_err_from)?;
        match status {
            Some(exit) if !exit.success() => {
                let tail = self.start_log_tail().await;
                Err(BuildError::new(
                    BuildErrorCode::StartCmdFailed,
                    format!(
                        "startCmd ended with {exit} before the snapshot{}",
                        tail_suffix(&tail)
                    ),
                ))
            }
            _ => Ok(()),
        }
    }

    async fn start_log_tail(&self) -> String {
        let cmd = as_root(
            &self.defaults,
            format!("tail -c 2048 {START_LOG}"),
            Some(Duration::from_secs(30)),
        );
        let mut out = Vec::new();
        let _ = self
            .guest
            .run(&cmd, &mut |_, chunk| keep_tail(&mut out, chunk, 2048))
            .await;
        String::from_utf8_lossy(&out).trim().to_owned()
    }
}

fn start_err_from(e: GuestError) -> BuildError {
    BuildError::new(
        BuildErrorCode::StartCmdFailed,
        format!("could not check startCmd: {e}"),
    )
    .with_source(e)
}

fn ready_err(detail: String) -> BuildError {
    BuildError::new(BuildErrorCode::ReadyCmdFailed, detail)
}

fn tail_suffix(tail: &str) -> String {
    if tail.is_empty() {
        String::new()
    } else {
        format!("; output tail:\n{tail}")
    }
}

fn keep_tail(buf: &mut Vec<u8>, chunk: &[u8], max: usize) {
    buf.extend_from_slice(chunk);
    if buf.len() > max {
        buf.drain(..buf.len() - max);
    }
}

/// A step as the logs and error messages name it.
pub fn describe(step: &Step) -> String {
    match step {
        Step::Run(cmd) => format!("run `{}`", ellipsize(cmd, 120)),
        Step::Env { key, .. } => format!("env {key}"),
        Step::Workdir(dir) => format!("workdir {dir}"),
        Step::User { name, sudo: true } => format!("user {name} (sudo)"),
        Step::User { name, sudo: false } => format!("user {name}"),
    }
}

fn ellipsize(s: &str, max: usize) -> String {
    let one_line = s.replace('\n', " ");
    if one_line.chars().count() <= max {
        one_line
    } else {
        format!("{}...", one_line.chars().take(max).collect::<String>())
    }
}

pub use kiln_spec::shell_quote;

/// Creates the user with a home directory when missing, with whatever tool the image has.
fn create_user_script(name: &str) -> String {
    let q = shell_quote(name);
    format!(
        "if ! id -u {q} >/dev/null 2>&1; then \
           if command -v useradd >/dev/null 2>&1; then useradd --create-home --shell /bin/sh {q}; \
           elif command -v adduser >/dev/null 2>&1; then adduser -D {q}; \
           else echo 'kiln: cannot create user: the image has neither useradd nor adduser' >&2; exit 127; fi; \
         fi\n"
    )
}

/// Grants passwordless sudo, installing sudo with apt-get when the image lacks it.
fn grant_sudo_script(name: &str) -> String {
    let q = shell_quote(name);
    // sudo ignores sudoers.d files whose names contain '.' or end in '~'.
    let file: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!(
        "if ! command -v sudo >/dev/null 2>&1; then \
           if command -v apt-get >/dev/null 2>&1; then \
             echo 'kiln: installing sudo with apt-get' >&2; \
             (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends sudo) >&2 \
               || {{ echo 'kiln: sudo: true needs sudo; the image lacks it and apt-get could not install it' >&2; exit 1; }}; \
           else echo 'kiln: sudo: true needs sudo, which the image lacks and cannot install (no apt-get)' >&2; exit 127; fi; \
         fi\n\
         mkdir -p /etc/sudoers.d && printf '%s ALL=(ALL) NOPASSWD:ALL\\n' {q} > /etc/sudoers.d/kiln-{file} \
           && chmod 0440 /etc/sudoers.d/kiln-{file}\n"
    )
}

fn command(d: &RuntimeDefaults, script: String, timeout: Option<Duration>) -> Command {
    Command {
        script,
        env: d.env.clone(),
        cwd: d.workdir.clone(),
        user: d.user.clone(),
        timeout,
    }
}

fn as_root(d: &RuntimeDefaults, script: String, timeout: Option<Duration>) -> Command {
    Command {
        user: "root".into(),
        cwd: "/".into(),
        ..command(d, script, timeout)
    }
}
