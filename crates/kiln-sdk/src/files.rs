//! `sandbox.files()`: files in a sandbox (`GET` and `POST /files`).

use reqwest::Method;

use crate::error::{Error, Result};
use crate::sandbox::Sandbox;

/// Largest download accepted by default (the server's own archive cap is 512 MiB).
pub const MAX_DOWNLOAD_BYTES: u64 = 2 * 1024 * 1024 * 1024;

/// Longest path accepted (as the server).
const MAX_PATH: usize = 4096;

/// Files in one sandbox; from [`Sandbox::files`]. Paths are absolute and may not contain
/// `..` segments (checked before anything is sent).
///
/// ```no_run
/// # async fn demo(sandbox: kiln_sdk::Sandbox) -> kiln_sdk::Result<()> {
/// sandbox.files().write("/app/config.json", br#"{"debug": true}"#).await?;
/// let bytes = sandbox.files().read("/app/config.json").await?;
/// let zip = sandbox.files().download_dir("/app").await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Copy)]
pub struct Files<'a> {
    sandbox: &'a Sandbox,
}

impl<'a> Files<'a> {
    pub(crate) fn new(sandbox: &'a Sandbox) -> Self {
        Self { sandbox }
    }

    /// Writes a file (parents created, owned by the sandbox's default user), replacing
    /// it if it exists.
    pub async fn write(&self, path: &str, data: impl AsRef<[u8]>) -> Result<()> {
        validate_path(path)?;
        let body = bytes::Bytes::copy_from_slice(data.as_ref());
        let sb = self.sandbox;
        sb.with_token_retry(|token| {
            let body = body.clone();
            async move {
                let req = sb
                    .data_request(Method::POST, &["files"], &token)?
                    .query(&[("path", path)])
                    .bytes(body)
                    .timeout(None);
                sb.client.empty(req).await
            }
        })
        .await
    }

    /// A file's bytes.
    pub async fn read(&self, path: &str) -> Result<Vec<u8>> {
        validate_path(path)?;
        self.download(&[("path", path)]).await
    }

    /// A file's text (UTF-8; invalid bytes replaced).
    pub async fn read_text(&self, path: &str) -> Result<String> {
        let bytes = self.read(path).await?;
        Ok(match String::from_utf8(bytes) {
            Ok(s) => s,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        })
    }

    /// A directory as a zip archive whose entries start with the directory's base name
    /// (`<dir>/file.txt`); symlinks are skipped. A regular file comes back as its bytes.
    pub async fn download_dir(&self, path: &str) -> Result<Vec<u8>> {
        validate_path(path)?;
        self.download(&[("path", path), ("format", "zip")]).await
    }

    async fn download(&self, query: &[(&str, &str)]) -> Result<Vec<u8>> {
        let sb = self.sandbox;
        let resp = sb
            .with_token_retry(|token| async move {
                let req = sb
                    .data_request(Method::GET, &["files"], &token)?
                    .query(query)
                    .timeout(None);
                sb.client.send(req).await
            })
            .await?;
        read_body(resp, MAX_DOWNLOAD_BYTES).await
    }
}

/// A response's body, refusing more than `cap` bytes, with an idle timeout.
async fn read_body(mut resp: reqwest::Response, cap: u64) -> Result<Vec<u8>> {
    if resp.content_length().is_some_and(|n| n > cap) {
        return Err(too_big(cap));
    }
    let mut out = Vec::new();
    loop {
        let chunk =
            match tokio::time::timeout(crate::client::STREAM_IDLE_TIMEOUT, resp.chunk()).await {
                Err(_) => {
                    return Err(Error::Timeout {
                        message: "the download stalled".into(),
                    })
                }
                Ok(r) => r.map_err(Error::from_reqwest)?,
            };
        let Some(chunk) = chunk else {
            return Ok(out);
        };
        if (out.len() + chunk.len()) as u64 > cap {
            return Err(too_big(cap));
        }
        out.extend_from_slice(&chunk);
    }
}

fn too_big(cap: u64) -> Error {
    Error::Validation {
        code: "payload_too_large".into(),
        message: format!("the download exceeds {cap} bytes"),
    }
}

/// Absolute, no `..` segment, no NUL, bounded (as the server checks).
pub(crate) fn validate_path(path: &str) -> Result<()> {
    if !path.starts_with('/') {
        return Err(Error::validation(format!(
            "path must be absolute (start with \"/\"): {path:?}"
        )));
    }
    if path.split('/').any(|seg| seg == "..") {
        return Err(Error::validation(format!(
            "path must not contain \"..\" segments: {path:?}"
        )));
    }
    if path.contains('\0') {
        return Err(Error::validation("path must not contain NUL"));
    }
    if path.len() > MAX_PATH {
        return Err(Error::validation(format!(
            "path is longer than {MAX_PATH} bytes"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_checked_like_the_server_does() {
        assert!(validate_path("/tmp/x").is_ok());
        assert!(validate_path("/a/..b/c").is_ok());
        for bad in ["tmp/x", "", "/tmp/../etc", "/tmp/..", "/a\0b"] {
            let e = validate_path(bad).unwrap_err();
            assert_eq!(e.code(), "invalid_request", "{bad:?}");
        }
        assert!(validate_path(&format!("/{}", "a".repeat(5000))).is_err());
    }
}
