//! Talking to registries: the distribution API's few GETs kiln needs (manifests, blobs,
//! bearer tokens), behind the address wall of [`crate::policy`].
//!
//! kiln speaks the protocol itself rather than through a client library because every
//! connection must be checked and pinned where it is made: the registry's, each redirect's
//! (followed by hand, at most [`MAX_REDIRECTS`], each target checked like the first) and
//! the token realm's (a registry names it, so it is as untrusted as a redirect). Every
//! failure to reach a registry, whether refused by the wall, by the peer, by DNS or by a
//! clock, is one [`OciError::Unreachable`] whose message does not say which: a tenant must
//! not learn from kiln which internal ports are open. The cause goes to the server's log.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use kiln_spec::reference::DOCKER_HUB;
use reqwest::header::{HeaderValue, ACCEPT, AUTHORIZATION, LOCATION, WWW_AUTHENTICATE};
use reqwest::{StatusCode, Url};

use crate::config::{Credentials, Endpoint, RegistryConfig};
use crate::error::{BoxError, OciError};
use crate::policy::PrivateRegistries;

/// Manifest media types kiln accepts (OCI and Docker schema 2, images and indexes).
pub const MANIFEST_TYPES: &[&str] = &[
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
];

/// The largest manifest, index, image config or token answer kiln reads: what registries
/// themselves accept for a manifest (distribution's limit). Past it the pull fails; a
/// registry sending an endless document costs the host this much memory at most.
pub const MAX_DOCUMENT: u64 = 4 << 20;
/// Redirects followed for one request; more is a loop or an attack.
pub const MAX_REDIRECTS: usize = 5;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Between two reads of a body: a stalled blob download ends.
const READ_TIMEOUT: Duration = Duration::from_secs(120);
/// The whole of a small request (manifest, config, token): a registry dripping a document
/// byte by byte does not hold a build.
const DOCUMENT_TIMEOUT: Duration = Duration::from_secs(60);

/// Registry access shared by every pull of a process: settings, the address wall and the
/// bearer tokens registries handed out.
pub(crate) struct Registries {
    pub(crate) config: RegistryConfig,
    policy: PrivateRegistries,
    /// Bearer tokens by (endpoint, repository); a stale one earns a 401 and is replaced.
    tokens: Mutex<HashMap<(String, String), HeaderValue>>,
}

impl std::fmt::Debug for Registries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registries")
            .field("config", &self.config)
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

/// A request of kiln's to one endpoint.
struct Get<'a> {
    ep: &'a Endpoint,
    repository: &'a str,
    /// After `/v2/<repository>/`: `manifests/<tag>`, `blobs/<digest>`.
    path: String,
    accept: Option<String>,
    /// A deadline for the whole request, body included.
    timeout: Option<Duration>,
    /// The reference being pulled, as errors show it.
    shown: &'a str,
}

impl Registries {
    /// Registry access with `config`; its mirrors are reachable whatever their address
    /// (the operator chose them, tenants cannot).
    pub(crate) fn new(config: RegistryConfig) -> Self {
        let mut policy = config.private.clone();
        for registry in config.registries.keys() {
            for m in config.endpoints(registry).iter().filter(|e| e.mirror) {
                // `host:port` as written, or `host` on its scheme's port: `allow` ignores
                // whichever of the two is not `host:port`.
                let default_port = if m.plain_http { 80 } else { 443 };
                policy.allow(&m.host);
                policy.allow(&format!("{}:{default_port}", m.host));
            }
        }
        Self {
            config,
            policy,
            tokens: Mutex::new(HashMap::new()),
        }
    }

    /// Fetches a manifest (by tag or digest) raw from one endpoint, at most
    /// [`MAX_DOCUMENT`] bytes of it.
    pub(crate) async fn manifest(
        &self,
        ep: &Endpoint,
        repository: &str,
        selector: &str,
        shown: &str,
    ) -> Result<Vec<u8>, OciError> {
        let resp = self
            .get(Get {
                ep,
                repository,
                path: format!("manifests/{selector}"),
                accept: Some(MANIFEST_TYPES.join(", ")),
                timeout: Some(DOCUMENT_TIMEOUT),
                shown,
            })
            .await?;
        read_capped(resp, "manifest", shown, ep).await
    }

    /// Fetches a small blob (an image config) whole, at most [`MAX_DOCUMENT`] bytes.
    pub(crate) async fn small_blob(
        &self,
        ep: &Endpoint,
        repository: &str,
        digest: &str,
        shown: &str,
    ) -> Result<Vec<u8>, OciError> {
        let resp = self.blob(ep, repository, digest, shown, true).await?;
        read_capped(resp, "image config", shown, ep).await
    }

    /// Starts a blob download; the caller reads the body (and bounds it).
    pub(crate) async fn blob(
        &self,
        ep: &Endpoint,
        repository: &str,
        digest: &str,
        shown: &str,
        small: bool,
    ) -> Result<reqwest::Response, OciError> {
        self.get(Get {
            ep,
            repository,
            path: format!("blobs/{digest}"),
            accept: None,
            timeout: small.then_some(DOCUMENT_TIMEOUT),
            shown,
        })
        .await
    }

    /// A GET of the distribution API with authentication: the configured token, a cached
    /// bearer token, or (on a 401) the registry's challenge answered once.
    async fn get(&self, g: Get<'_>) -> Result<reqwest::Response, OciError> {
        let scheme = if g.ep.plain_http { "http" } else { "https" };
        let url = Url::parse(&format!(
            "{scheme}://{}/v2/{}/{}",
            api_host(&g.ep.host),
            g.repository,
            g.path
        ))
        .map_err(|e| unreachable(g.ep, g.shown, e))?;
        let creds = self.config.credentials(&g.ep.host);
        let key = (g.ep.host.clone(), g.repository.to_owned());
        let mut auth = match &creds {
            Credentials::Bearer(t) => Some(header(&format!("Bearer {t}"))?),
            _ => self.tokens().get(&key).cloned(),
        };
        let mut answered = false;
        loop {
            let resp = self.send(url.clone(), &g, auth.as_ref(), g.timeout).await?;
            if resp.status() != StatusCode::UNAUTHORIZED || answered {
                return status_ok(resp, &creds, g.ep, g.shown);
            }
            answered = true;
            let challenge = resp
                .headers()
                .get(WWW_AUTHENTICATE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            match self.answer(&challenge, &creds, &g).await? {
                Some(a) => {
                    if challenge.trim_start().starts_with("Bearer") {
                        self.tokens().insert(key.clone(), a.clone());
                    }
                    auth = Some(a);
                }
                None => return status_ok(resp, &creds, g.ep, g.shown),
            }
        }
    }

    fn tokens(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), HeaderValue>> {
        self.tokens.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The `Authorization` that answers a 401's challenge, or `None` when kiln has
    /// nothing to answer with.
    async fn answer(
        &self,
        challenge: &str,
        creds: &Credentials,
        g: &Get<'_>,
    ) -> Result<Option<HeaderValue>, OciError> {
        let basic = match creds {
            Credentials::Basic(u, p) => Some(header(&format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
            ))?),
            _ => None,
        };
        let Some(params) = challenge.trim_start().strip_prefix("Bearer") else {
            return Ok(basic);
        };
        let params = challenge_params(params);
        let Some(realm) = params.get("realm") else {
            return Ok(None);
        };
        let mut url = Url::parse(realm).map_err(|e| unreachable(g.ep, g.shown, e))?;
        url.query_pairs_mut()
            .append_pair("scope", &format!("repository:{}:pull", g.repository));
        if let Some(service) = params.get("service") {
            url.query_pairs_mut().append_pair("service", service);
        }
        // The token service is another origin: credentials go to it on purpose here.
        let resp = self
            .send_to(url, g, basic.as_ref(), true, Some(DOCUMENT_TIMEOUT))
            .await?;
        let resp = status_ok(resp, creds, g.ep, g.shown)?;
        let body = read_capped(resp, "token answer", g.shown, g.ep).await?;
        #[derive(serde::Deserialize)]
        struct Token {
            #[serde(default)]
            token: Option<String>,
            #[serde(default)]
            access_token: Option<String>,
        }
        let t: Token = serde_json::from_slice(&body).map_err(|e| OciError::Pull {
            reference: g.shown.to_owned(),
            detail: format!(
                "the token service of {} answered something else than a token",
                g.ep.host
            ),
            source: Some(Box::new(e)),
        })?;
        match t.token.or(t.access_token) {
            Some(t) => Ok(Some(header(&format!("Bearer {t}"))?)),
            None => Ok(None),
        }
    }

    /// Sends a GET to the registry's own origin, `auth` kept only while redirects stay
    /// on that origin.
    async fn send(
        &self,
        url: Url,
        g: &Get<'_>,
        auth: Option<&HeaderValue>,
        timeout: Option<Duration>,
    ) -> Result<reqwest::Response, OciError> {
        self.send_to(url, g, auth, false, timeout).await
    }

    /// Sends a GET, following redirects by hand: each hop's address is checked and the
    /// connection pinned to it. `auth` goes to the first URL's origin only, unless
    /// `auth_anywhere` (a token request, whose credentials are meant for that service).
    async fn send_to(
        &self,
        url: Url,
        g: &Get<'_>,
        auth: Option<&HeaderValue>,
        auth_anywhere: bool,
        timeout: Option<Duration>,
    ) -> Result<reqwest::Response, OciError> {
        let origin = url.origin();
        let mut url = url;
        for _ in 0..=MAX_REDIRECTS {
            let client = self
                .pinned_client(&url)
                .await
                .map_err(|e| unreachable(g.ep, g.shown, e))?;
            let mut req = client.get(url.clone());
            if let Some(a) = &g.accept {
                req = req.header(ACCEPT, a);
            }
            if let Some(a) = auth.filter(|_| auth_anywhere || url.origin() == origin) {
                req = req.header(AUTHORIZATION, a.clone());
            }
            if let Some(t) = timeout {
                req = req.timeout(t);
            }
            let resp = req
                .send()
                .await
                .map_err(|e| unreachable(g.ep, g.shown, e))?;
            let location = resp
                .headers()
                .get(LOCATION)
                .and_then(|l| l.to_str().ok())
                .filter(|_| resp.status().is_redirection());
            match location {
                Some(l) => url = url.join(l).map_err(|e| unreachable(g.ep, g.shown, e))?,
                None => return Ok(resp),
            }
        }
        Err(unreachable(
            g.ep,
            g.shown,
            format!("more than {MAX_REDIRECTS} redirects"),
        ))
    }

    /// A client that can reach `url`'s host only at the addresses the wall let through:
    /// no redirects of its own, no proxy, no other name resolved.
    async fn pinned_client(&self, url: &Url) -> Result<reqwest::Client, BoxError> {
        if !matches!(url.scheme(), "http" | "https") {
            return Err(format!("scheme {} is not http(s)", url.scheme()).into());
        }
        let port = url.port_or_known_default().ok_or("no port")?;
        let host = url.host_str().ok_or("no host")?;
        // `url` has already normalised IPv4 literals (`0x7f.1` is `127.0.0.1` here).
        let literal: Option<IpAddr> = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse()
            .ok();
        let addrs: Vec<SocketAddr> = match literal {
            Some(ip) => vec![SocketAddr::new(ip, port)],
            None => tokio::net::lookup_host((host, port)).await?.collect(),
        };
        let allowed = self
            .policy
            .filter(host, port, &addrs)
            .map_err(|r| r.to_string())?;
        if allowed.is_empty() {
            return Err("the name resolved to no address".into());
        }
        let mut builder = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .dns_resolver(Arc::new(NoResolve))
            .connect_timeout(CONNECT_TIMEOUT)
            .read_timeout(READ_TIMEOUT)
            .user_agent(concat!("kiln/", env!("CARGO_PKG_VERSION")));
        if literal.is_none() {
            builder = builder.resolve_to_addrs(host, &allowed);
        }
        Ok(builder.build()?)
    }
}

/// The resolver of pinned clients: every name they may reach is pinned, so any lookup
/// at all is a bug, refused rather than answered unchecked.
struct NoResolve;

impl reqwest::dns::Resolve for NoResolve {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let name = name.as_str().to_owned();
        Box::pin(async move { Err(format!("{name} is not a checked address").into()) })
    }
}

/// Where an endpoint's API is: Docker Hub's is not at `docker.io`.
fn api_host(host: &str) -> &str {
    if host == DOCKER_HUB {
        "registry-1.docker.io"
    } else {
        host
    }
}

fn header(value: &str) -> Result<HeaderValue, OciError> {
    HeaderValue::from_str(value).map_err(|e| OciError::Pull {
        reference: String::new(),
        detail: "credentials hold characters HTTP cannot carry".into(),
        source: Some(Box::new(e)),
    })
}

/// `realm="...",service="...",scope="..."` as a map.
fn challenge_params(s: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let mut rest = s.trim();
    while let Some((key, after)) = rest.split_once('=') {
        let key = key
            .trim()
            .trim_start_matches(',')
            .trim()
            .to_ascii_lowercase();
        let (value, next) = match after.strip_prefix('"') {
            Some(q) => q.split_once('"').unwrap_or((q, "")),
            None => after.split_once(',').unwrap_or((after, "")),
        };
        out.insert(key, value.to_owned());
        rest = next.trim_start_matches(',').trim();
    }
    out
}

/// The uniform "cannot be reached" error; the cause is logged here and kept as the
/// error's source (for the log and the local CLI), never in its message.
fn unreachable(ep: &Endpoint, shown: &str, cause: impl Into<BoxError>) -> OciError {
    let cause = cause.into();
    tracing::warn!(
        registry = %ep.host,
        reference = shown,
        cause = %kiln_spec::error_chain(cause.as_ref()),
        "registry unreachable"
    );
    OciError::Unreachable {
        reference: shown.to_owned(),
        registry: ep.host.clone(),
        source: cause,
    }
}

/// Reads a small body whole, failing past [`MAX_DOCUMENT`] bytes without reading on.
async fn read_capped(
    mut resp: reqwest::Response,
    what: &str,
    shown: &str,
    ep: &Endpoint,
) -> Result<Vec<u8>, OciError> {
    let too_large = || OciError::TooLargeDocument {
        reference: shown.to_owned(),
        what: what.to_owned(),
        limit_mib: MAX_DOCUMENT >> 20,
    };
    if resp.content_length().is_some_and(|n| n > MAX_DOCUMENT) {
        return Err(too_large());
    }
    let mut out = Vec::new();
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| broke_off(what, shown, ep, e))?
    {
        if (out.len() + chunk.len()) as u64 > MAX_DOCUMENT {
            return Err(too_large());
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// A body that stopped arriving after the registry answered.
pub(crate) fn broke_off(what: &str, shown: &str, ep: &Endpoint, e: reqwest::Error) -> OciError {
    OciError::Pull {
        reference: shown.to_owned(),
        detail: format!("download of {what} from {} broke off", ep.host),
        source: Some(Box::new(e)),
    }
}

/// A response that is a success, or an `image_pull_failed` saying what to check.
fn status_ok(
    resp: reqwest::Response,
    creds: &Credentials,
    ep: &Endpoint,
    shown: &str,
) -> Result<reqwest::Response, OciError> {
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let host = &ep.host;
    let detail = match status {
        StatusCode::NOT_FOUND => format!("not found on {host}: check the repository name and tag"),
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN
            if !matches!(creds, Credentials::Anonymous) =>
        {
            format!(
                "registry {host} refused the credentials: check registries.\"{host}\" in kiln's \
                 config or run `docker login {host}`"
            )
        }
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => format!(
            "access denied by {host}: set registries.\"{host}\" credentials in kiln's config or \
             run `docker login {host}`"
        ),
        other => format!("registry {host} answered HTTP {}", other.as_u16()),
    };
    Err(OciError::Pull {
        reference: shown.to_owned(),
        detail,
        source: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configured_mirrors_pass_the_wall_and_nothing_else_does() {
        let mut config: RegistryConfig = serde_json::from_str(
            r#"{"registries":{"docker.io":{"mirrors":["http://127.0.0.1:5000","mirror.lan"]}}}"#,
        )
        .unwrap();
        config.private = PrivateRegistries::only("").unwrap();
        let r = Registries::new(config);
        let lo = |port| [SocketAddr::from(([127, 0, 0, 1], port))];
        assert!(r.policy.filter("127.0.0.1", 5000, &lo(5000)).is_ok());
        assert!(r.policy.filter("mirror.lan", 443, &lo(443)).is_ok());
        assert!(r.policy.filter("127.0.0.1", 5001, &lo(5001)).is_err());
        assert!(r.policy.filter("mirror.lan", 80, &lo(80)).is_err());
    }

    #[test]
    fn bearer_challenges_parse() {
        let p = challenge_params(
            r#" realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/x:pull""#,
        );
        assert_eq!(p["realm"], "https://auth.docker.io/token");
        assert_eq!(p["service"], "registry.docker.io");
        assert_eq!(p["scope"], "repository:library/x:pull");
        let p = challenge_params(" realm=https://r.example/t, service=s");
        assert_eq!(p["realm"], "https://r.example/t");
        assert_eq!(p["service"], "s");
    }
}
