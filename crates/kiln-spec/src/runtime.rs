//! The runtime defaults: what a command in a sandbox runs with when it says nothing.
//!
//! They start from the image config (`Env`, `WorkingDir`, `User`), are changed by the
//! spec's `env`, `workdir` and `user` steps, and are recorded in every template artifact.

use serde::{Deserialize, Serialize};

/// PATH for images whose config sets none, as Docker uses.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The env, working directory and user a command runs with when it gives none.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuntimeDefaults {
    /// Environment in order of first definition; later definitions replace values in place.
    pub env: Vec<(String, String)>,
    /// Absolute working directory.
    pub workdir: String,
    /// User name (or numeric uid) in the guest.
    pub user: String,
}

impl Default for RuntimeDefaults {
    fn default() -> Self {
        Self {
            env: vec![("PATH".into(), DEFAULT_PATH.into())],
            workdir: "/".into(),
            user: "root".into(),
        }
    }
}

impl RuntimeDefaults {
    /// Defaults from an OCI image config (`Env` as `K=V`, `WorkingDir`, `User`).
    ///
    /// `User` may be `name`, `uid` or `user:group`; the group part is dropped, since the
    /// agent derives groups from the guest's own files.
    pub fn from_image_config(
        env: &[String],
        working_dir: Option<&str>,
        user: Option<&str>,
    ) -> Self {
        let mut d = Self {
            env: vec![],
            ..Self::default()
        };
        for kv in env {
            if let Some((k, v)) = kv.split_once('=') {
                d.set_env(k, v);
            }
        }
        if !d.env.iter().any(|(k, _)| k == "PATH") {
            d.env.insert(0, ("PATH".into(), DEFAULT_PATH.into()));
        }
        if let Some(dir) = working_dir.filter(|w| w.starts_with('/')) {
            d.workdir = dir.to_owned();
        }
        if let Some(user) = user
            .map(|u| u.split(':').next().unwrap_or(u))
            .filter(|u| !u.is_empty())
        {
            d.user = user.to_owned();
        }
        d
    }

    /// Sets a variable, replacing an earlier value in place.
    pub fn set_env(&mut self, key: &str, value: &str) {
        match self.env.iter_mut().find(|(k, _)| k == key) {
            Some(entry) => entry.1 = value.to_owned(),
            None => self.env.push((key.to_owned(), value.to_owned())),
        }
    }

    /// These defaults with `overrides` applied on top (the caller wins on conflict).
    pub fn env_with(&self, overrides: &[(String, String)]) -> Vec<(String, String)> {
        let mut d = self.clone();
        for (k, v) in overrides {
            d.set_env(k, v);
        }
        d.env
    }
}
