//! System templates: `superserve/base` (what a sandbox created without a template starts
//! from) and `superserve/python-3.11`, which kiln provides to every team.
//!
//! They belong to the system team ([`kiln_store::SYSTEM_TEAM_ID`]): every team sees them
//! and starts sandboxes from them, none can rebuild or delete them, and no team template
//! may take a `superserve/` name. Their base images are the operator's settings
//! (`KILN_BASE_IMAGE`, `KILN_PYTHON_IMAGE`), resolved through the normal registry config,
//! so registry mirrors apply. `kiln serve` queues their builds when it starts (a build
//! whose spec did not change is not repeated) and `kiln template build --system` builds
//! them ahead of time; a create that arrives while one is building waits for it.

use kiln_api::BuildInfo;
use kiln_spec::{Form, TemplateRequest};
use kiln_store::{Limits, StoreError, SYSTEM_TEAM_ID};

use crate::error::{EngineError, Result};
use crate::{wire, Engine};

/// One system template.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SystemTemplate {
    /// Its name (`superserve/...`).
    pub name: &'static str,
    /// The short name `KILN_SYSTEM_TEMPLATES` lists it by (`base`).
    pub short: &'static str,
    /// The setting that names its base image.
    pub image_var: &'static str,
    /// The base image when the setting is absent.
    pub default_image: &'static str,
}

/// The system templates, the default one first. Their shape is Superserve's: 1 vCPU,
/// 1024 MiB of memory, 4096 MiB of disk.
pub const SYSTEM_TEMPLATES: &[SystemTemplate] = &[
    SystemTemplate {
        name: kiln_api::DEFAULT_TEMPLATE,
        short: "base",
        image_var: "KILN_BASE_IMAGE",
        default_image: "debian:bookworm",
    },
    SystemTemplate {
        name: "superserve/python-3.11",
        short: "python-3.11",
        image_var: "KILN_PYTHON_IMAGE",
        default_image: "python:3.11-slim",
    },
];

impl SystemTemplate {
    /// The system templates `KILN_SYSTEM_TEMPLATES` names: `all` (the default), `none`,
    /// or a comma-separated list of short names (`base,python-3.11`).
    pub fn selected(setting: Option<&str>) -> std::result::Result<Vec<Self>, String> {
        match setting.map(str::trim) {
            None | Some("" | "all") => Ok(SYSTEM_TEMPLATES.to_vec()),
            Some("none" | "off") => Ok(Vec::new()),
            Some(list) => list
                .split(',')
                .map(|n| {
                    let n = n.trim();
                    SYSTEM_TEMPLATES
                        .iter()
                        .find(|t| t.short == n || t.name == n)
                        .copied()
                        .ok_or_else(|| {
                            format!(
                                "KILN_SYSTEM_TEMPLATES: no system template {n:?} (known: {})",
                                SYSTEM_TEMPLATES
                                    .iter()
                                    .map(|t| t.short)
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            )
                        })
                })
                .collect(),
        }
    }

    /// Its base image: the setting, else the default.
    pub fn image(&self) -> String {
        std::env::var(self.image_var)
            .ok()
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| self.default_image.to_owned())
    }

    /// What is built: the base image as it is, in Superserve's shape. The name is
    /// reserved for teams, so it is checked apart from the rest.
    fn request(&self) -> Result<TemplateRequest> {
        let doc = serde_json::json!({
            "vcpu": 1, "memory_mib": 1024, "disk_mib": 4096,
            "build_spec": {"from": self.image()},
        });
        let mut req = TemplateRequest::from_json(&doc, Form::Wire).map_err(EngineError::Invalid)?;
        req.validate().map_err(EngineError::Invalid)?;
        req.name = Some(self.name.to_owned());
        Ok(req)
    }
}

impl Engine {
    /// Makes sure the system templates `which` exist with their configured images and
    /// returns the builds to run: the first build of a new one, a rebuild of one whose
    /// image setting changed or whose last build failed. One that is ready with the same
    /// spec is left alone.
    pub async fn queue_system_templates(&self, which: &[SystemTemplate]) -> Result<Vec<BuildInfo>> {
        let mut builds = Vec::new();
        for st in which {
            let req = st.request()?;
            match self
                .store
                .template_by_id_or_name(SYSTEM_TEAM_ID, st.name)
                .await
            {
                Err(StoreError::NotFound { .. }) => {
                    let (_, b) = self
                        .store
                        .create_template_with_build(SYSTEM_TEAM_ID, &req, &Limits::UNLIMITED)
                        .await?;
                    tracing::info!(template = st.name, image = %st.image(), "system template queued");
                    builds.push(wire::build(&b));
                }
                Err(e) => return Err(e.into()),
                Ok(t) => {
                    let same =
                        t.spec()? == req.build_spec && t.resources() == req.resources.resolve();
                    if same && t.current_build_id.is_some() {
                        continue;
                    }
                    let r = self
                        .store
                        .start_rebuild(SYSTEM_TEAM_ID, &t.id, Some(&req), &Limits::UNLIMITED)
                        .await?;
                    tracing::info!(template = st.name, image = %st.image(), "system template rebuild queued");
                    if r.build.status == kiln_api::BuildStatus::Pending {
                        builds.push(wire::build(&r.build));
                    }
                }
            }
        }
        Ok(builds)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_setting_selects_by_short_name() {
        assert_eq!(SystemTemplate::selected(None).unwrap().len(), 2);
        assert!(SystemTemplate::selected(Some("none")).unwrap().is_empty());
        let base = SystemTemplate::selected(Some(" base ")).unwrap();
        assert_eq!(base[0].name, "superserve/base");
        assert!(SystemTemplate::selected(Some("base,node-22"))
            .unwrap_err()
            .contains("node-22"));
    }
}
