//! Talking to registries: one `oci-client` client per endpoint, mirrors before upstream,
//! and registry failures turned into actionable `image_pull_failed` details.
//!
//! `oci-client` does the distribution protocol (bearer-token challenges, basic auth, the
//! `/v2/` URL scheme); manifests are fetched raw and parsed here so that index handling,
//! platform choice and digest checks follow kiln's rules rather than the client's.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};

use crate::config::{Credentials, Endpoint, RegistryConfig};
use crate::error::OciError;

/// Manifest media types kiln accepts (OCI and Docker schema 2, images and indexes).
pub const MANIFEST_TYPES: &[&str] = &[
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
];

/// Registry clients, shared by every pull of a process.
pub(crate) struct Registries {
    pub(crate) config: RegistryConfig,
    clients: Mutex<HashMap<Endpoint, Client>>,
}

impl std::fmt::Debug for Registries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registries")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Registries {
    pub(crate) fn new(config: RegistryConfig) -> Self {
        Self {
            config,
            clients: Mutex::new(HashMap::new()),
        }
    }

    /// The client for an endpoint (clients keep token caches, so they are reused).
    pub(crate) fn client(&self, ep: &Endpoint) -> Client {
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        clients
            .entry(ep.clone())
            .or_insert_with(|| {
                Client::new(ClientConfig {
                    protocol: if ep.plain_http {
                        ClientProtocol::Http
                    } else {
                        ClientProtocol::Https
                    },
                    // Indexes are resolved by kiln (linux/amd64, with a useful error).
                    platform_resolver: None,
                    connect_timeout: Some(Duration::from_secs(10)),
                    read_timeout: Some(Duration::from_secs(120)),
                    ..Default::default()
                })
            })
            .clone()
    }

    pub(crate) fn auth(&self, ep: &Endpoint) -> RegistryAuth {
        match self.config.credentials(&ep.host) {
            Credentials::Anonymous => RegistryAuth::Anonymous,
            Credentials::Basic(u, p) => RegistryAuth::Basic(u, p),
            Credentials::Bearer(t) => RegistryAuth::Bearer(t),
        }
    }

    /// Fetches a manifest (by tag or digest) raw from one endpoint.
    pub(crate) async fn manifest(
        &self,
        ep: &Endpoint,
        repository: &str,
        selector: &str,
        shown: &str,
    ) -> Result<Vec<u8>, OciError> {
        let reference = oci_ref(ep, repository, selector);
        let client = self.client(ep);
        let (bytes, _digest) = client
            .pull_manifest_raw(&reference, &self.auth(ep), MANIFEST_TYPES)
            .await
            .map_err(|e| pull_error(shown, ep, e))?;
        Ok(bytes)
    }
}

/// An `oci-client` reference to `repository` on an endpoint, by tag or digest.
pub(crate) fn oci_ref(ep: &Endpoint, repository: &str, selector: &str) -> Reference {
    if selector.starts_with("sha256:") {
        Reference::with_digest(ep.host.clone(), repository.to_owned(), selector.to_owned())
    } else {
        Reference::with_tag(ep.host.clone(), repository.to_owned(), selector.to_owned())
    }
}

/// Turns a client error into an `image_pull_failed` with a detail saying what to check.
pub(crate) fn pull_error(shown: &str, ep: &Endpoint, e: OciDistributionError) -> OciError {
    let host = &ep.host;
    let scheme = if ep.plain_http { "http" } else { "https" };
    let detail = match &e {
        OciDistributionError::RequestError(re) if re.is_connect() => format!(
            "registry {host} is unreachable over {scheme} (connection failed): check the address, \
             that the registry is running, and KILN_REGISTRY_MIRRORS"
        ),
        OciDistributionError::RequestError(re) if re.is_timeout() => {
            format!("registry {host} timed out: check the network and the registry's health")
        }
        OciDistributionError::RequestError(_) => {
            format!("request to registry {host} over {scheme} failed")
        }
        OciDistributionError::UnauthorizedError { .. }
        | OciDistributionError::AuthenticationFailure(_) => {
            format!(
                "registry {host} refused the credentials (or requires some): set registries.\"{host}\" \
                 username/password in kiln's config or run `docker login {host}`"
            )
        }
        OciDistributionError::ImageManifestNotFoundError(_) => {
            format!("not found on {host}: check the repository name and tag")
        }
        OciDistributionError::ServerError { code: 404, .. } => {
            format!("not found on {host}: check the repository name and tag")
        }
        OciDistributionError::ServerError {
            code: 401 | 403, ..
        } => format!(
            "access denied by {host}: set registries.\"{host}\" credentials in kiln's config or \
             run `docker login {host}`"
        ),
        OciDistributionError::ServerError { code, .. } => {
            format!("registry {host} answered HTTP {code}")
        }
        OciDistributionError::RegistryError { envelope, .. } => {
            let codes: Vec<String> = envelope
                .errors
                .iter()
                .map(|x| format!("{:?}", x.code))
                .collect();
            let joined = codes.join(", ");
            if joined.contains("Unknown") {
                format!("not found on {host} ({joined}): check the repository name and tag")
            } else if joined.contains("Unauthorized") || joined.contains("Denied") {
                format!(
                    "access denied by {host} ({joined}): set registries.\"{host}\" credentials in \
                     kiln's config or run `docker login {host}`"
                )
            } else {
                format!("registry {host} returned an error ({joined})")
            }
        }
        _ => format!("registry {host} failed"),
    };
    OciError::Pull {
        reference: shown.to_owned(),
        detail,
        source: Some(Box::new(e)),
    }
}
