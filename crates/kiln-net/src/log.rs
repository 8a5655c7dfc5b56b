//! A sandbox's network log: one JSON [`kiln_api::NetworkEvent`] per line, appended by
//! every process that sees its traffic (the egress proxy QEMU runs per connection, the
//! server's preview proxy per request) and read back by `GET /sandboxes/{id}/network`. A
//! secret's audit log is kept the same way.

use std::io::Write as _;
use std::path::Path;

/// The log is kept to about this size: past it, the current file becomes `.1` (the
/// previous `.1` goes) and a new one starts.
pub const MAX_LOG: u64 = 8 << 20;

/// Appends `event` to the log at `path`. Failures are ignored: a full disk must not break
/// the traffic being logged.
pub fn append(path: &Path, event: &impl serde::Serialize) {
    if std::fs::metadata(path).is_ok_and(|m| m.len() > MAX_LOG) {
        let _ = std::fs::rename(path, path.with_extension("log.1"));
    }
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        // One write per line: concurrent writers append whole lines.
        let mut line = serde_json::to_vec(event).unwrap_or_default();
        line.push(b'\n');
        let _ = f.write_all(&line);
    }
}
