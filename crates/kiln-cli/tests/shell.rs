//! `kiln sandbox shell` on a real terminal: the CLI runs on a pseudo-terminal this test
//! owns (as it would in a user's terminal emulator), in a real VM under TCG, on the local
//! state dir and against a server. `stty size` sees the user's size, a resize of the
//! user's window reaches a full-screen (curses) program as KEY_RESIZE, keystrokes arrive
//! raw, and the shell's exit code is kiln's. See `common` for the prerequisites.

mod common;

use std::io::{Read as _, Write as _};
use std::os::fd::{AsFd as _, OwnedFd};
use std::os::unix::process::CommandExt as _;
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{api_key, assert_no_qemu, assets, kiln, registry, Server};

/// A curses program: draws its size on the alternate screen, redraws it on every resize,
/// ends on `q`.
const FULL_SCREEN: &str = r#"import curses
def main(w):
    w.addstr(0, 0, "size %dx%d" % w.getmaxyx()); w.refresh()
    while True:
        k = w.getch()
        if k == curses.KEY_RESIZE:
            w.addstr(1, 0, "resized %dx%d" % w.getmaxyx()); w.refresh()
        elif k == ord("q"):
            return
curses.wrapper(main)
print("curses-done")
"#;

/// A child on a terminal of its own whose other side this test holds.
struct OnTerminal {
    child: std::process::Child,
    master: OwnedFd,
    screen: Arc<Mutex<Vec<u8>>>,
}

impl Drop for OnTerminal {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn set_size(fd: impl std::os::fd::AsFd, cols: u16, rows: u16) {
    let ws = rustix::termios::Winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    rustix::termios::tcsetwinsize(fd, ws).unwrap();
}

impl OnTerminal {
    /// `cmd` as the session leader of a new terminal of `cols` x `rows`, like a shell in
    /// a terminal emulator's window.
    fn spawn(mut cmd: Command, cols: u16, rows: u16) -> Self {
        use rustix::pty::{grantpt, ioctl_tiocgptpeer, openpt, unlockpt, OpenptFlags};
        let flags = OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC;
        let master = openpt(flags).unwrap();
        grantpt(&master).unwrap();
        unlockpt(&master).unwrap();
        let slave = ioctl_tiocgptpeer(&master, flags).unwrap();
        set_size(&master, cols, rows);
        let io = || Stdio::from(slave.try_clone().unwrap());
        cmd.stdin(io()).stdout(io()).stderr(io());
        // SAFETY: setsid and the controlling-terminal ioctl are plain syscalls, safe
        // between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                rustix::process::setsid()?;
                rustix::process::ioctl_tiocsctty(std::io::stdin())?;
                Ok(())
            });
        }
        let child = cmd.spawn().unwrap();
        drop(cmd);
        drop(slave);
        let screen = Arc::new(Mutex::new(Vec::new()));
        let (s, mut r) = (
            screen.clone(),
            std::fs::File::from(master.try_clone().unwrap()),
        );
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            // EIO once the child and everything it started are gone.
            while let Ok(n) = r.read(&mut buf) {
                if n == 0 {
                    break;
                }
                s.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        Self {
            child,
            master,
            screen,
        }
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.screen.lock().unwrap()).into_owned()
    }

    /// Waits (generously: TCG) until the screen shows `want`.
    fn expect(&self, want: &str) {
        let deadline = Instant::now() + Duration::from_secs(120);
        while !self.text().contains(want) {
            assert!(
                Instant::now() < deadline,
                "waited for {want:?}; the terminal shows {:?}",
                self.text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn type_keys(&self, keys: &[u8]) {
        std::fs::File::from(self.master.try_clone().unwrap())
            .write_all(keys)
            .unwrap();
    }

    /// The user resizes the window: the kernel signals the terminal's foreground
    /// process group (kiln) with SIGWINCH.
    fn resize(&self, cols: u16, rows: u16) {
        set_size(self.master.as_fd(), cols, rows);
    }

    fn exit_code(mut self) -> Option<i32> {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st.code();
            }
            assert!(Instant::now() < deadline, "kiln sandbox shell did not end");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn checked(what: &str, out: Output) -> String {
    eprintln!("$ {what}\n{}{}", text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{what} failed");
    text(&out.stdout)
        .lines()
        .last()
        .unwrap_or_default()
        .to_owned()
}

/// Both programs through `kiln sandbox shell` (prepared by `kiln_cmd`) in sandbox `id`.
fn terminal_programs_work(kiln_cmd: &dyn Fn(&[&str]) -> Command, id: &str) {
    // The user's size, a terminal on stdin, and the exit code passed back.
    let t = OnTerminal::spawn(
        kiln_cmd(&[
            "sandbox",
            "shell",
            id,
            "--",
            "stty size; test -t 0 && echo on-a-tty; exit 5",
        ]),
        100,
        30,
    );
    t.expect("30 100");
    t.expect("on-a-tty");
    assert_eq!(t.exit_code(), Some(5));

    // A full-screen program: the alternate screen, a resize of the user's window, a key.
    let t = OnTerminal::spawn(
        kiln_cmd(&["sandbox", "shell", id, "--", "python3 /opt/full_screen.py"]),
        100,
        30,
    );
    t.expect("size 30x100");
    assert!(
        t.text().contains("\x1b[?1049h"),
        "no alternate screen: {:?}",
        t.text()
    );
    t.resize(120, 40);
    t.expect("resized 40x120");
    t.type_keys(b"q");
    t.expect("curses-done");
    assert_eq!(t.exit_code(), Some(0));

    // Ctrl-C goes to the sandbox's terminal, not to kiln: the loop is interrupted and
    // the shell that ran it goes on.
    let t = OnTerminal::spawn(
        kiln_cmd(&[
            "sandbox",
            "shell",
            id,
            "--",
            "trap 'echo interrupted' INT; echo looping; while :; do sleep 0.2; done; echo unreachable",
        ]),
        80,
        24,
    );
    t.expect("looping");
    t.type_keys(b"\x03");
    t.expect("interrupted");
    t.type_keys(b"\x1c"); // Ctrl-\: SIGQUIT ends it
    assert_ne!(t.exit_code(), Some(0));
}

#[test]
fn a_shell_on_a_real_terminal_locally_and_against_a_server() {
    let registry = registry(&assets());
    let dir = common::state_dir("ksh");
    let state = dir.path();
    // The server's team is the local one, so both sides see the template.
    let key = api_key(state, "local");
    let server = Server::start(state, &[("KILN_READY_TIMEOUT_SECS", "120")]);
    let client_home = tempfile::tempdir().unwrap();
    let remote = |args: &[&str]| -> Command {
        let mut c = kiln(client_home.path(), args);
        c.env("KILN_URL", &server.url)
            .env("KILN_API_KEY", &key)
            .env("XDG_CONFIG_HOME", client_home.path());
        c
    };
    let local = |args: &[&str]| -> Command {
        let mut c = kiln(state, args);
        c.env_remove("KILN_URL")
            .env_remove("KILN_API_KEY")
            .env("XDG_CONFIG_HOME", client_home.path());
        c
    };

    let spec = client_home.path().join("spec.json");
    std::fs::write(
        &spec,
        serde_json::json!({
            "name": "shell", "memoryMib": 512, "diskMib": 2048,
            "from": format!("{registry}/kiln/python:latest"),
            "steps": [{"run": format!("mkdir -p /opt && cat > /opt/full_screen.py <<'EOF'\n{FULL_SCREEN}EOF")}],
            "startCmd": "sleep 100000", "readyCmd": "true",
        })
        .to_string(),
    )
    .unwrap();
    checked(
        "kiln template build (remote)",
        remote(&["template", "build", "-f", spec.to_str().unwrap()])
            .output()
            .unwrap(),
    );

    let id = checked(
        "kiln sandbox create (remote)",
        remote(&["sandbox", "create", "shell"]).output().unwrap(),
    );
    terminal_programs_work(&remote, &id);
    checked(
        "kiln sandbox kill (remote)",
        remote(&["sandbox", "kill", &id]).output().unwrap(),
    );

    let id = checked(
        "kiln sandbox create (local)",
        local(&["sandbox", "create", "shell"]).output().unwrap(),
    );
    terminal_programs_work(&local, &id);
    checked(
        "kiln sandbox kill (local)",
        local(&["sandbox", "kill", &id]).output().unwrap(),
    );
    drop(server);
    assert_no_qemu(state, Duration::from_secs(30));
}
