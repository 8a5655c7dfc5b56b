//! Base images for kiln: resolve a reference to a digest, pull it into a content-addressed
//! blob cache, unpack it safely into a rootfs directory, and vet what it contains.
//!
//! The build pipeline calls [`ImageStore::prepare`] (or its steps [`ImageStore::resolve`],
//! [`ImageStore::pull`], [`ImageStore::unpack`] and [`vet::vet`]); every failure is an
//! [`OciError`] whose [`OciError::code`] is the build's stable error code.

pub mod config;
pub mod error;
pub mod policy;
mod registry;
pub mod store;
pub mod unpack;
pub mod vet;

pub use config::{RegistryConfig, RegistrySettings};
pub use error::{OciError, Result};
pub use policy::{PrivateRegistries, PRIVATE_REGISTRIES_ENV};
pub use registry::{MAX_DOCUMENT, MAX_REDIRECTS};
pub use store::{
    Descriptor, Image, ImageStore, Platform, Prepared, Progress, ProgressFn, PruneReport,
    PullReport, RuntimeConfig, Unpacked,
};
pub use unpack::{UnpackStats, Unpacker};
pub use vet::{vet, VetReport};
