//! The host's caches of base images and build steps (`kiln image prune`).

use kiln_oci::PruneReport;

use crate::error::{EngineError, Result};
use crate::Engine;

/// What [`Engine::prune_images`] removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pruned {
    /// Images and blobs.
    pub images: PruneReport,
    /// Bytes of step cache freed; `None` when it was kept because builds are running
    /// (their VMs read their disks through the cache's paths).
    pub step_cache_freed: Option<u64>,
    /// Builds not yet finished when the cache was looked at.
    pub builds_running: u64,
}

impl Engine {
    /// Removes the images no template build uses (nor any of `keep`), and the step cache
    /// when no build is under way.
    pub async fn prune_images(&self, keep: &[String]) -> Result<Pruned> {
        let mut keep: Vec<String> = keep.to_vec();
        keep.extend(self.store.image_digests_in_use().await?);
        let builds_running = self.store.unfinished_builds().await?;
        let keep_refs: Vec<&str> = keep.iter().map(String::as_str).collect();
        let images = self.images.prune(&keep_refs).map_err(EngineError::Images)?;
        let step_cache_freed = if builds_running > 0 {
            None
        } else {
            let cache = kiln_build::StepCache::new(self.layout.step_cache_dir());
            Some(cache.prune().map_err(EngineError::StepCache)?)
        };
        Ok(Pruned {
            images,
            step_cache_freed,
            builds_running,
        })
    }
}
