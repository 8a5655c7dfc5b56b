//! The user's side of `kiln sandbox shell`: the local terminal in raw mode (keystrokes go
//! to the sandbox's terminal as they are typed, Ctrl-C included), its size and every
//! change of it (SIGWINCH), restored however the session ends.

use std::io::{IsTerminal as _, Read as _};

use kiln_api::TerminalSize;
use rustix::termios::{self, OptionalActions, Termios};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

use crate::backend::ShellInput;

/// The size used when stdout is not a terminal.
const DEFAULT_SIZE: TerminalSize = TerminalSize { cols: 80, rows: 24 };

/// Puts stdin's terminal back in the mode it had when dropped.
pub(crate) struct RawMode {
    saved: Option<Termios>,
}

impl RawMode {
    /// Raw mode on stdin when it is a terminal; nothing otherwise (input from a pipe or a
    /// file is passed on as it is).
    pub(crate) fn enter() -> anyhow::Result<Self> {
        let stdin = std::io::stdin();
        if !stdin.is_terminal() {
            return Ok(Self { saved: None });
        }
        let saved = termios::tcgetattr(&stdin)?;
        let mut raw = saved.clone();
        raw.make_raw();
        termios::tcsetattr(&stdin, OptionalActions::Flush, &raw)?;
        Ok(Self { saved: Some(saved) })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Some(saved) = &self.saved {
            let _ = termios::tcsetattr(std::io::stdin(), OptionalActions::Flush, saved);
        }
    }
}

/// The size of the terminal the user sits at (stdout's, else stdin's).
pub(crate) fn size() -> TerminalSize {
    let of = |ws: termios::Winsize| {
        (ws.ws_col > 0 && ws.ws_row > 0).then_some(TerminalSize {
            cols: ws.ws_col,
            rows: ws.ws_row,
        })
    };
    termios::tcgetwinsize(std::io::stdout())
        .ok()
        .and_then(of)
        .or_else(|| termios::tcgetwinsize(std::io::stdin()).ok().and_then(of))
        .unwrap_or(DEFAULT_SIZE)
}

/// The user's keystrokes and window changes, as they come. Stdin is read on a thread of
/// its own: a blocking read cannot be cancelled, and the process must be able to end
/// while it waits for a key.
pub(crate) fn input() -> anyhow::Result<mpsc::Receiver<ShellInput>> {
    let (tx, rx) = mpsc::channel(64);
    let keys = tx.clone();
    std::thread::Builder::new()
        .name("stdin".into())
        .spawn(move || {
            let mut stdin = std::io::stdin().lock();
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                match stdin.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        if keys
                            .blocking_send(ShellInput::Data(buf[..n].to_vec()))
                            .is_err()
                        {
                            return;
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(_) => break,
                }
            }
            let _ = keys.blocking_send(ShellInput::Eof);
        })?;
    let mut winch = signal(SignalKind::window_change())?;
    tokio::spawn(async move {
        while winch.recv().await.is_some() {
            if tx.send(ShellInput::Resize(size())).await.is_err() {
                break;
            }
        }
    });
    Ok(rx)
}
