//! Server-Sent Events: the `data` of each event of a streamed response.

use std::time::Duration;

use crate::error::{Error, Result};

/// Incremental SSE parser: bytes in, the data of complete events out.
#[derive(Debug, Default)]
pub(crate) struct SseParser {
    line: Vec<u8>,
    data: String,
    has_data: bool,
}

impl SseParser {
    /// Feeds bytes; appends the data of every event they complete to `out`.
    pub(crate) fn push(&mut self, bytes: &[u8], out: &mut Vec<String>) {
        for &b in bytes {
            if b == b'\n' {
                let mut line = std::mem::take(&mut self.line);
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                self.line_done(&line, out);
            } else {
                self.line.push(b);
            }
        }
    }

    /// The end of the stream: an event not yet closed by a blank line is still given
    /// (leniently: the server always closes its events).
    pub(crate) fn finish(&mut self, out: &mut Vec<String>) {
        if !self.line.is_empty() {
            let line = std::mem::take(&mut self.line);
            self.line_done(&line, out);
        }
        self.dispatch(out);
    }

    fn line_done(&mut self, line: &[u8], out: &mut Vec<String>) {
        if line.is_empty() {
            self.dispatch(out);
            return;
        }
        if line[0] == b':' {
            return; // comment (keep-alive)
        }
        let line = String::from_utf8_lossy(line);
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line.as_ref(), ""),
        };
        if field == "data" {
            if self.has_data {
                self.data.push('\n');
            }
            self.data.push_str(value);
            self.has_data = true;
        }
    }

    fn dispatch(&mut self, out: &mut Vec<String>) {
        if self.has_data {
            out.push(std::mem::take(&mut self.data));
            self.has_data = false;
        }
    }
}

/// Reads an SSE response to its end, giving each event's data, parsed as JSON into `T`,
/// to `on_event`; events whose data is not a `T` are skipped. `on_event` returns `false` to
/// stop reading. Fails with [`Error::Timeout`] when the stream is silent for `idle`.
pub(crate) async fn read_json_events<T: serde::de::DeserializeOwned>(
    mut resp: reqwest::Response,
    idle: Duration,
    mut on_event: impl FnMut(T) -> bool,
) -> Result<()> {
    let mut parser = SseParser::default();
    let mut events = Vec::new();
    loop {
        let chunk = match tokio::time::timeout(idle, resp.chunk()).await {
            Err(_) => {
                return Err(Error::Timeout {
                    message: format!("the event stream was silent for {} s", idle.as_secs()),
                })
            }
            Ok(r) => r.map_err(Error::from_reqwest)?,
        };
        match &chunk {
            Some(bytes) => parser.push(bytes, &mut events),
            None => parser.finish(&mut events),
        }
        for data in events.drain(..) {
            let data = data.trim();
            if data.is_empty() || data == "[DONE]" {
                continue;
            }
            if let Ok(v) = serde_json::from_str(data) {
                if !on_event(v) {
                    return Ok(());
                }
            }
        }
        if chunk.is_none() {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_across_chunks_comments_and_crlf() {
        let mut p = SseParser::default();
        let mut out = Vec::new();
        p.push(b": keep-alive\n\nda", &mut out);
        assert!(out.is_empty());
        p.push(b"ta: {\"a\":1}\r\n\r\ndata:x\ndata: y\n", &mut out);
        assert_eq!(out, vec![r#"{"a":1}"#.to_owned()]);
        p.push(b"\nevent: e\nid: 3\n", &mut out);
        assert_eq!(out[1], "x\ny");
        p.push(b"data: last", &mut out);
        p.finish(&mut out);
        assert_eq!(out.len(), 3);
        assert_eq!(out[2], "last");
    }

    #[test]
    fn utf8_split_across_chunks() {
        let mut p = SseParser::default();
        let mut out = Vec::new();
        let text = "data: h\u{e9}\u{1f600}\n\n".as_bytes();
        for b in text {
            p.push(&[*b], &mut out);
        }
        assert_eq!(out, vec!["h\u{e9}\u{1f600}".to_owned()]);
    }
}
