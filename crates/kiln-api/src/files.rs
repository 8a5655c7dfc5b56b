//! Files in a sandbox (the data plane): `GET /files?path=` (a file's bytes, or a
//! directory as a zip) and `POST /files?path=` (the body becomes the file).

use serde::{Deserialize, Serialize};

use crate::request::RequestError;

/// Longest path accepted.
pub const MAX_PATH: usize = 4096;

/// Absolute, no `..` segment, no NUL, bounded.
pub fn validate_path(path: &str) -> Result<(), &'static str> {
    if !path.starts_with('/') {
        return Err("must be an absolute path");
    }
    if path.split('/').any(|seg| seg == "..") {
        return Err("must not contain \"..\" segments");
    }
    if path.contains('\0') {
        return Err("must not contain NUL");
    }
    if path.len() > MAX_PATH {
        return Err("is too long");
    }
    Ok(())
}

/// The query of `/files`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilesQuery {
    /// The file or directory in the sandbox.
    pub path: String,
    /// `zip` (downloads only; a directory is always a zip).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
}

impl FilesQuery {
    /// The checked path of a download.
    pub fn download_path(&self) -> Result<&str, RequestError> {
        if let Some(f) = self.format.as_deref().filter(|f| *f != "zip") {
            return Err(RequestError::invalid(format!(
                "format: unknown format {f:?}"
            )));
        }
        self.path()
    }

    /// The checked path of an upload.
    pub fn upload_path(&self) -> Result<&str, RequestError> {
        if self.format.is_some() {
            return Err(RequestError::invalid("format: only for downloads"));
        }
        self.path()
    }

    fn path(&self) -> Result<&str, RequestError> {
        validate_path(&self.path).map_err(|m| RequestError::invalid(format!("path: {m}")))?;
        Ok(&self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_absolute_without_dotdot() {
        assert!(validate_path("/tmp/x").is_ok());
        assert!(validate_path("/a/..b/c").is_ok());
        assert!(validate_path("tmp/x").is_err());
        assert!(validate_path("/tmp/../etc/passwd").is_err());
        assert!(validate_path("/tmp/..").is_err());
        assert!(validate_path("/tmp/a\0b").is_err());
        assert!(validate_path(&format!("/{}", "a".repeat(5000))).is_err());
    }

    #[test]
    fn formats() {
        let q = |f: Option<&str>| FilesQuery {
            path: "/tmp".into(),
            format: f.map(Into::into),
        };
        assert!(q(Some("zip")).download_path().is_ok());
        assert!(q(Some("tar")).download_path().is_err());
        assert!(q(Some("zip")).upload_path().is_err());
        assert!(q(None).upload_path().is_ok());
    }
}
