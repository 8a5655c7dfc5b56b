//! Step semantics against a scripted guest (the real-VM tests live with the pipeline).

use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use kiln_build::{
    BuildError, Command, Exit, Guest, GuestError, LogLine, LogSink, OutputStream, RuntimeDefaults,
    StepRunner, Stream, Timing,
};
use kiln_spec::{BuildErrorCode, Step};

/// Answers commands by the first rule whose needle the script contains.
#[derive(Default)]
struct FakeGuest {
    rules: Vec<(&'static str, Exit, &'static str)>,
    ran: Mutex<Vec<Command>>,
    start_exit: Mutex<Option<Exit>>,
}

#[async_trait]
impl Guest for FakeGuest {
    async fn run(
        &self,
        cmd: &Command,
        on_output: &mut (dyn for<'b> FnMut(OutputStream, &'b [u8]) + Send),
    ) -> Result<Exit, GuestError> {
        self.ran.lock().unwrap().push(cmd.clone());
        for (needle, exit, out) in &self.rules {
            if cmd.script.contains(needle) {
                on_output(OutputStream::Stdout, out.as_bytes());
                return Ok(*exit);
            }
        }
        Ok(Exit::Code(0))
    }
    async fn spawn(&self, cmd: &Command, _log: &str) -> Result<u32, GuestError> {
        self.ran.lock().unwrap().push(cmd.clone());
        Ok(42)
    }
    async fn exit_status(&self, _pid: u32) -> Result<Option<Exit>, GuestError> {
        Ok(*self.start_exit.lock().unwrap())
    }
}

impl FakeGuest {
    fn with_rules(rules: Vec<(&'static str, Exit, &'static str)>) -> Self {
        FakeGuest {
            rules,
            ..Default::default()
        }
    }
}

#[derive(Default)]
struct Log(Mutex<Vec<LogLine>>);
impl LogSink for Log {
    fn line(&self, line: LogLine) {
        self.0.lock().unwrap().push(line);
    }
}

fn fast() -> Timing {
    Timing {
        step_timeout: Duration::from_secs(5),
        ready_interval: Duration::from_millis(10),
        ready_timeout: Duration::from_millis(200),
        start_grace: Duration::from_millis(1),
    }
}

/// Starts `serve` on `guest` (empty runtime defaults) and waits until `ready` passes.
async fn start_serve(guest: &FakeGuest, ready: Option<&str>) -> Result<Option<u32>, BuildError> {
    let log = Log::default();
    StepRunner::new(guest, &log, RuntimeDefaults::default(), fast())
        .start_and_wait_ready(Some("serve"), ready)
        .await
}

fn steps() -> Vec<Step> {
    vec![
        Step::Env {
            key: "DEBUG".into(),
            value: "1".into(),
        },
        Step::Run("echo hi".into()),
        Step::Workdir("/srv/app".into()),
        Step::User {
            name: "app".into(),
            sudo: true,
        },
        Step::Run("whoami".into()),
        Step::Env {
            key: "DEBUG".into(),
            value: "2".into(),
        },
    ]
}

#[tokio::test]
async fn steps_evolve_the_runtime_defaults_in_order() {
    let guest = FakeGuest::with_rules(vec![("echo hi", Exit::Code(0), "hi\n")]);
    let log = Log::default();
    let defaults = RuntimeDefaults::from_image_config(
        &["PATH=/bin".into(), "LANG=C.UTF-8".into()],
        Some("/"),
        None,
    );
    let mut runner = StepRunner::new(&guest, &log, defaults, fast());
    runner.run_steps(&steps()).await.unwrap();

    let d = &runner.defaults;
    assert_eq!(d.workdir, "/srv/app");
    assert_eq!(d.user, "app");
    assert_eq!(
        d.env,
        [
            ("PATH".into(), "/bin".into()),
            ("LANG".into(), "C.UTF-8".into()),
            ("DEBUG".into(), "2".into())
        ]
    );

    let ran = guest.ran.lock().unwrap();
    // `echo hi` ran as root in / with DEBUG=1.
    let echo = ran.iter().find(|c| c.script == "echo hi").unwrap();
    assert_eq!((echo.user.as_str(), echo.cwd.as_str()), ("root", "/"));
    assert!(echo.env.contains(&("DEBUG".into(), "1".into())));
    // The workdir was created and chowned to the then-current user, as root.
    let mk = ran
        .iter()
        .find(|c| c.script.contains("mkdir -p -- '/srv/app'"))
        .unwrap();
    assert!(
        mk.script.contains("chown -- 'root': '/srv/app'"),
        "{}",
        mk.script
    );
    // The user was created, given sudo, and later steps ran as it, in the workdir.
    let user = ran.iter().find(|c| c.script.contains("useradd")).unwrap();
    assert_eq!(user.user, "root");
    assert!(user.script.contains("/etc/sudoers.d/kiln-app"));
    let whoami = ran.iter().find(|c| c.script == "whoami").unwrap();
    assert_eq!(
        (whoami.user.as_str(), whoami.cwd.as_str()),
        ("app", "/srv/app")
    );

    let lines = log.0.lock().unwrap();
    assert!(lines
        .iter()
        .any(|l| l.stream == Stream::Stdout && l.text == "hi"));
    assert!(lines
        .iter()
        .any(|l| l.stream == Stream::System && l.text.starts_with("step 2/6: run `echo hi`")));
}

#[tokio::test]
async fn a_failing_step_names_itself_and_its_exit_code() {
    let guest = FakeGuest::with_rules(vec![("whoami", Exit::Code(3), "")]);
    let log = Log::default();
    let mut runner = StepRunner::new(&guest, &log, RuntimeDefaults::default(), fast());
    let err = runner.run_steps(&steps()).await.unwrap_err();
    assert_eq!(err.code, BuildErrorCode::StepFailed);
    assert_eq!(
        err.to_string(),
        "step_failed: step 5/6 (run `whoami`) failed with exit code 3"
    );
    // Nothing after the failing step ran.
    assert!(!guest
        .ran
        .lock()
        .unwrap()
        .iter()
        .any(|c| c.env.contains(&("DEBUG".into(), "2".into()))));
}

#[tokio::test]
async fn ready_is_polled_until_it_passes() {
    let pid = start_serve(&FakeGuest::default(), Some("probe"))
        .await
        .unwrap();
    assert_eq!(pid, Some(42));
}

#[tokio::test]
async fn ready_gives_up_with_ready_cmd_failed() {
    let guest = FakeGuest::with_rules(vec![("probe", Exit::Code(7), "connection refused\n")]);
    let err = start_serve(&guest, Some("probe")).await.unwrap_err();
    assert_eq!(err.code, BuildErrorCode::ReadyCmdFailed);
    assert!(
        err.detail.contains("exit code 7: connection refused"),
        "{}",
        err.detail
    );
    let probes = guest
        .ran
        .lock()
        .unwrap()
        .iter()
        .filter(|c| c.script == "probe")
        .count();
    assert!(probes >= 2, "probed {probes} times");
}

#[tokio::test]
async fn a_start_command_that_dies_fails_with_its_output() {
    let guest = FakeGuest {
        start_exit: Mutex::new(Some(Exit::Code(2))),
        ..FakeGuest::with_rules(vec![
            ("probe", Exit::Code(1), ""),
            ("tail -c", Exit::Code(0), "Traceback: boom\n"),
        ])
    };
    let err = start_serve(&guest, Some("probe")).await.unwrap_err();
    assert_eq!(err.code, BuildErrorCode::StartCmdFailed);
    assert!(
        err.detail.contains("exit code 2") && err.detail.contains("Traceback: boom"),
        "{}",
        err.detail
    );

    // Without a readyCmd the start is checked once after the grace period.
    let err = start_serve(&guest, None).await.unwrap_err();
    assert_eq!(err.code, BuildErrorCode::StartCmdFailed);
}

#[test]
fn image_config_defaults() {
    let d = RuntimeDefaults::from_image_config(
        &["A=1".into(), "B=x=y".into()],
        Some("/app"),
        Some("1000:1000"),
    );
    assert_eq!(d.user, "1000");
    assert_eq!(d.workdir, "/app");
    assert_eq!(d.env[0].0, "PATH");
    assert_eq!(d.env[2], ("B".into(), "x=y".into()));
    assert_eq!(
        d.env_with(&[("A".into(), "2".into())])[1],
        ("A".into(), "2".into())
    );
}
