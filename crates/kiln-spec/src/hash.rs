//! The canonical spec hash.
//!
//! Two requests that mean the same build hash the same: key order, whitespace and
//! omitted-versus-default resources do not matter; the template name does not either,
//! since a build's result does not depend on it. Anything that changes what is built
//! (image, any step, commands, VM shape) changes the hash. The hash is computed over a
//! serialisation of the typed, normalised value, never over the user's bytes.

use sha2::{Digest, Sha256};

use crate::spec::{BuildSpec, Resources, TemplateRequest};

/// Bumped whenever the canonical encoding changes, so old hashes never collide with new.
const CANONICAL_VERSION: &str = "kiln-spec-hash/v1";

/// `sha256:<hex>` of the canonical form of a spec and its resolved VM shape.
pub fn spec_hash(spec: &BuildSpec, resources: &Resources) -> String {
    #[derive(serde::Serialize)]
    struct Canonical<'a> {
        version: &'static str,
        spec: &'a BuildSpec,
        resources: &'a Resources,
    }
    let canonical = Canonical {
        version: CANONICAL_VERSION,
        spec,
        resources,
    };
    // Serialising derived structs emits fields in declaration order: deterministic.
    let bytes = serde_json::to_vec(&canonical).expect("plain derived structs always serialise");
    format!("sha256:{}", hex::encode(Sha256::digest(&bytes)))
}

impl TemplateRequest {
    /// The canonical hash of what this request builds.
    pub fn spec_hash(&self) -> String {
        spec_hash(&self.build_spec, &self.resources.resolve())
    }
}
