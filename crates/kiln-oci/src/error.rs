//! The one error type of this crate, mapped onto kiln's stable build error codes.

use kiln_spec::{BuildErrorCode, ReferenceError};

/// A boxed cause, kept as `#[source]` so callers can log the whole chain.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why an image could not be resolved, pulled, unpacked or accepted.
///
/// Every variant maps to one [`BuildErrorCode`] through [`OciError::code`]; the build
/// pipeline stores `"<code>: <detail>"` with [`OciError::detail`].
#[derive(Debug, thiserror::Error)]
pub enum OciError {
    /// The reference does not parse.
    #[error("invalid image reference {reference:?}")]
    BadReference {
        /// The reference as given.
        reference: String,
        /// What is wrong with it.
        #[source]
        source: ReferenceError,
    },
    /// The reference names an index with no `linux/amd64` image.
    #[error("{reference} has no linux/amd64 image (platforms found: {found})")]
    UnsupportedPlatform {
        /// The reference as resolved.
        reference: String,
        /// The platforms the index lists, comma-separated (`linux/arm64/v8, ...`).
        found: String,
    },
    /// The registry could not be reached, refused us, or lacks the image.
    #[error("cannot pull {reference}: {detail}")]
    Pull {
        /// The reference (or blob) being fetched.
        reference: String,
        /// An actionable explanation (what to check).
        detail: String,
        /// The client error, when there is one.
        #[source]
        source: Option<BoxError>,
    },
    /// The registry could not be reached: refused by kiln's address wall (a private address
    /// `kiln serve` was not told to allow), by the peer, by DNS, by a timeout, a redirect
    /// loop. The message is the same whatever the cause, so that a tenant cannot use builds
    /// to learn which internal ports answer; the cause is the source, logged by the server.
    #[error(
        "cannot pull {reference}: registry {registry} cannot be reached (check the name, that \
         the registry is up and reachable from the kiln host; a kiln server reaches registries \
         on private addresses only when its operator allows them)"
    )]
    Unreachable {
        /// The reference being fetched.
        reference: String,
        /// The endpoint (`host[:port]`) that could not be reached.
        registry: String,
        /// What happened, for the server's log only.
        #[source]
        source: BoxError,
    },
    /// A manifest, index, image config or token answer is larger than kiln reads.
    #[error("invalid image {reference}: the {what} is larger than {limit_mib} MiB")]
    TooLargeDocument {
        /// The reference being fetched.
        reference: String,
        /// `manifest`, `image config`, ...
        what: String,
        /// The cap, in MiB.
        limit_mib: u64,
    },
    /// The registry sent something that is not a valid image (bad JSON, digest mismatch).
    #[error("invalid image {reference}: {detail}")]
    Invalid {
        /// The reference or blob digest concerned.
        reference: String,
        /// What is wrong.
        detail: String,
    },
    /// A layer entry would write outside the rootfs (or otherwise cannot be applied safely).
    #[error("unsafe layer entry {path:?}: {reason}")]
    UnsafeEntry {
        /// The entry path as written in the layer.
        path: String,
        /// Why it is refused.
        reason: String,
    },
    /// The image content is not a usable base (Alpine/musl, no `/bin/sh`).
    #[error("{0}")]
    Refused(String),
    /// The flattened image does not fit in the requested disk.
    #[error("the flattened image needs {needed_mib} MiB, more than diskMib {disk_mib}")]
    TooLarge {
        /// Space the rootfs needs, rounded up to MiB.
        needed_mib: u64,
        /// The disk size asked for.
        disk_mib: u64,
    },
    /// The layers hold more content than any disk kiln makes could take: refused while
    /// unpacking, before the host's disk fills (a few bytes of sparse or compressed layer
    /// can claim terabytes).
    #[error("the image's layers hold more than {limit_mib} MiB of content (the largest diskMib)")]
    ContentTooLarge {
        /// The cap, in MiB.
        limit_mib: u64,
    },
    /// A nonexistent image was asked for from the local store.
    #[error("image {0} is not in the local store (pull it first)")]
    NotPulled(String),
    /// Local I/O failed (state directory, unpack target).
    #[error("{context}")]
    Io {
        /// What was being done.
        context: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

impl OciError {
    /// The stable code a build failure carries for this error.
    pub fn code(&self) -> BuildErrorCode {
        match self {
            Self::BadReference { .. } => BuildErrorCode::BadReference,
            Self::UnsupportedPlatform { .. } => BuildErrorCode::UnsupportedPlatform,
            Self::Unreachable { .. } => BuildErrorCode::RegistryUnreachable,
            Self::Pull { .. }
            | Self::Invalid { .. }
            | Self::TooLargeDocument { .. }
            | Self::NotPulled(_) => BuildErrorCode::ImagePullFailed,
            Self::UnsafeEntry { .. } | Self::Refused(_) => BuildErrorCode::ImageUnsafe,
            Self::TooLarge { .. } | Self::ContentTooLarge { .. } => BuildErrorCode::ImageTooLarge,
            Self::Io { .. } => BuildErrorCode::BuildFailed,
        }
    }

    /// The message with its causes, `: `-joined: the detail part of `"<code>: <detail>"`.
    pub fn detail(&self) -> String {
        kiln_spec::error_chain(self)
    }

    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }

    pub(crate) fn unsafe_entry(path: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::UnsafeEntry {
            path: path.into(),
            reason: reason.into(),
        }
    }
}

/// Short for `Result<T, OciError>`.
pub type Result<T, E = OciError> = std::result::Result<T, E>;
