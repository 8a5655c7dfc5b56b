//! Build logs: every line of every step's output, and `system` lines for each phase.

use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::guest::OutputStream;

/// Longest line kept; longer lines are split, so one runaway line cannot bloat the log.
pub const MAX_LINE_BYTES: usize = 8 * 1024;

/// Where a log line came from. Serialised as the SDK's `stream` field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stream {
    /// A step's standard output.
    Stdout,
    /// A step's standard error.
    Stderr,
    /// kiln itself: phases, progress, the outcome.
    System,
}

impl Stream {
    /// The wire string.
    pub fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
            Stream::System => "system",
        }
    }
}

impl From<OutputStream> for Stream {
    fn from(s: OutputStream) -> Self {
        match s {
            OutputStream::Stdout => Stream::Stdout,
            OutputStream::Stderr => Stream::Stderr,
        }
    }
}

/// One line of a build log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    /// When it was produced.
    pub timestamp: SystemTime,
    /// Its stream.
    pub stream: Stream,
    /// The text, without the trailing newline.
    pub text: String,
}

/// Receives a build's log lines as they happen (the store, a terminal, a test).
pub trait LogSink: Send + Sync {
    /// Takes one line. Must not block for long: it is called from the build's hot path.
    fn line(&self, line: LogLine);

    /// A `system` line.
    fn system(&self, text: String) {
        self.line(LogLine {
            timestamp: SystemTime::now(),
            stream: Stream::System,
            text,
        });
    }
}

/// Cuts a byte stream into lines per output stream, keeping partial lines until their end.
#[derive(Debug, Default)]
pub struct LineSplitter {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
}

impl LineSplitter {
    /// Feeds a chunk, emitting every complete line.
    pub fn feed(&mut self, stream: OutputStream, chunk: &[u8], sink: &dyn LogSink) {
        let buf = match stream {
            OutputStream::Stdout => &mut self.stdout,
            OutputStream::Stderr => &mut self.stderr,
        };
        buf.extend_from_slice(chunk);
        let mut start = 0;
        while let Some(nl) = buf[start..].iter().position(|&b| b == b'\n') {
            emit(sink, stream.into(), &buf[start..start + nl]);
            start += nl + 1;
        }
        buf.drain(..start);
        while buf.len() >= MAX_LINE_BYTES {
            let rest = buf.split_off(MAX_LINE_BYTES);
            emit(sink, stream.into(), buf);
            *buf = rest;
        }
    }

    /// Emits whatever partial lines remain.
    pub fn flush(&mut self, sink: &dyn LogSink) {
        for (stream, buf) in [
            (Stream::Stdout, &mut self.stdout),
            (Stream::Stderr, &mut self.stderr),
        ] {
            if !buf.is_empty() {
                emit(sink, stream, buf);
                buf.clear();
            }
        }
    }
}

fn emit(sink: &dyn LogSink, stream: Stream, bytes: &[u8]) {
    let text = String::from_utf8_lossy(bytes);
    let text = text.strip_suffix('\r').unwrap_or(&text).to_owned();
    sink.line(LogLine {
        timestamp: SystemTime::now(),
        stream,
        text,
    });
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    #[derive(Default)]
    struct Lines(Mutex<Vec<(Stream, String)>>);
    impl LogSink for Lines {
        fn line(&self, line: LogLine) {
            self.0.lock().unwrap().push((line.stream, line.text));
        }
    }

    #[test]
    fn splits_lines_per_stream_and_keeps_partials() {
        let sink = Lines::default();
        let mut s = LineSplitter::default();
        s.feed(OutputStream::Stdout, b"a\nb", &sink);
        s.feed(OutputStream::Stderr, b"err\r\n", &sink);
        s.feed(OutputStream::Stdout, b"c\n\nd", &sink);
        s.flush(&sink);
        let got = sink.0.into_inner().unwrap();
        let want = [
            (Stream::Stdout, "a"),
            (Stream::Stderr, "err"),
            (Stream::Stdout, "bc"),
            (Stream::Stdout, ""),
            (Stream::Stdout, "d"),
        ];
        assert_eq!(got, want.map(|(s, t)| (s, t.to_owned())));
    }

    #[test]
    fn long_lines_are_cut() {
        let sink = Lines::default();
        let mut s = LineSplitter::default();
        s.feed(
            OutputStream::Stdout,
            &vec![b'x'; MAX_LINE_BYTES * 2 + 10],
            &sink,
        );
        s.flush(&sink);
        let got = sink.0.into_inner().unwrap();
        assert_eq!(
            got.iter().map(|(_, t)| t.len()).collect::<Vec<_>>(),
            [MAX_LINE_BYTES, MAX_LINE_BYTES, 10]
        );
    }
}
