//! The connection: base URL, API key, HTTP client, and the retry policy.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher as _, Hasher as _};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use reqwest::header::{HeaderMap, HeaderName, HeaderValue, RETRY_AFTER};
use reqwest::{Method, Url};

use crate::error::{Error, Result};

/// Where a client connects when neither an explicit URL nor the environment names one
/// (`kiln serve`'s default).
pub const DEFAULT_BASE_URL: &str = "http://127.0.0.1:8080";

/// Timeout of an ordinary control-plane request.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Timeout of a request the server holds while a VM starts, stops or is snapshotted:
/// sandbox create, pause, resume and activate.
pub const DEFAULT_LIFECYCLE_TIMEOUT: Duration = Duration::from_secs(300);

/// How long a streamed response (build logs, streamed command output) may stay silent
/// before the SDK gives up on it. The server sends a keep-alive every 15 s.
pub const STREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

const USER_AGENT: &str = concat!("kiln-sdk-rust/", env!("CARGO_PKG_VERSION"));

/// When a failed request is tried again.
///
/// Only idempotent methods (GET and DELETE) are ever retried, on 429, 502, 503 and 504
/// and on connection errors; POST and PATCH are sent once. The wait before attempt
/// `n + 1` is `initial_backoff * 2^(n-1)` with ±20% jitter, capped at `max_backoff`,
/// unless the answer carried a `Retry-After`, which is honoured (capped the same way).
/// A 503 `sandbox_unavailable` is not retried: it does not clear by itself (the
/// data-plane calls activate the sandbox instead).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (1 disables retries).
    pub max_attempts: u32,
    /// The first wait.
    pub initial_backoff: Duration,
    /// The longest wait.
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    /// 3 attempts, 100 ms then 200 ms (±20%), waits capped at 30 s.
    fn default() -> Self {
        Self {
            max_attempts: 3,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(30),
        }
    }
}

impl RetryPolicy {
    /// The wait after failed attempt `attempt` (0-based), with jitter.
    pub(crate) fn backoff(&self, attempt: u32) -> Duration {
        let base = self
            .initial_backoff
            .saturating_mul(2u32.saturating_pow(attempt.min(20)));
        let jitter = 0.8 + random_unit() * 0.4;
        base.mul_f64(jitter).min(self.max_backoff)
    }
}

/// A number in [0, 1) from the standard library's random hasher keys.
fn random_unit() -> f64 {
    let mut h = RandomState::new().build_hasher();
    h.write_u128(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

/// Settings for a [`Client`]; see [`Client::builder`].
#[derive(Clone)]
pub struct ClientBuilder {
    base_url: Option<String>,
    api_key: Option<String>,
    timeout: Duration,
    lifecycle_timeout: Duration,
    retry: RetryPolicy,
    http: Option<reqwest::Client>,
}

impl std::fmt::Debug for ClientBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientBuilder")
            .field("base_url", &self.base_url)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("timeout", &self.timeout)
            .field("lifecycle_timeout", &self.lifecycle_timeout)
            .field("retry", &self.retry)
            .finish_non_exhaustive()
    }
}

impl ClientBuilder {
    /// The API's base URL, e.g. `http://127.0.0.1:8080` (default: `$KILN_URL`, then
    /// `$SUPERSERVE_BASE_URL`, then [`DEFAULT_BASE_URL`]).
    pub fn base_url(mut self, url: impl Into<String>) -> Self {
        self.base_url = Some(url.into());
        self
    }

    /// The team's API key (default: `$KILN_API_KEY`, then `$SUPERSERVE_API_KEY`).
    pub fn api_key(mut self, key: impl Into<String>) -> Self {
        self.api_key = Some(key.into());
        self
    }

    /// Timeout of an ordinary request (default [`DEFAULT_TIMEOUT`]).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Timeout of the requests that start, pause or resume a VM (default
    /// [`DEFAULT_LIFECYCLE_TIMEOUT`]).
    pub fn lifecycle_timeout(mut self, timeout: Duration) -> Self {
        self.lifecycle_timeout = timeout;
        self
    }

    /// When failed requests are retried (default [`RetryPolicy::default`]).
    pub fn retry_policy(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// A `reqwest` client of your own (proxies, certificates, connection pool...). Its
    /// own timeouts apply on top of the SDK's.
    pub fn http_client(mut self, client: reqwest::Client) -> Self {
        self.http = Some(client);
        self
    }

    /// The client. Fails with [`Error::Authentication`] (`missing_api_key`) when no key is
    /// set nor in the environment, and [`Error::Validation`] for a base URL that is not an
    /// `http(s)` URL.
    pub fn build(self) -> Result<Client> {
        let api_key = self
            .api_key
            .or_else(|| env_var("KILN_API_KEY"))
            .or_else(|| env_var("SUPERSERVE_API_KEY"))
            .ok_or_else(|| Error::Authentication {
                code: "missing_api_key".into(),
                message: "no API key: pass one or set KILN_API_KEY (or SUPERSERVE_API_KEY)".into(),
            })?;
        if HeaderValue::from_str(&api_key).is_err() {
            return Err(Error::validation("the API key is not a valid header value"));
        }
        let raw = self
            .base_url
            .filter(|u| !u.trim().is_empty())
            .or_else(|| env_var("KILN_URL"))
            .or_else(|| env_var("SUPERSERVE_BASE_URL"))
            .unwrap_or_else(|| DEFAULT_BASE_URL.to_owned());
        let base = Url::parse(raw.trim())
            .map_err(|e| Error::validation(format!("base URL {raw:?}: {e}")))?;
        if !matches!(base.scheme(), "http" | "https") || base.cannot_be_a_base() {
            return Err(Error::validation(format!(
                "base URL {raw:?}: must be an http:// or https:// URL"
            )));
        }
        let http = match self.http {
            Some(h) => h,
            None => reqwest::Client::builder()
                .user_agent(USER_AGENT)
                .connect_timeout(Duration::from_secs(10))
                .build()
                .map_err(|e| Error::network("building the HTTP client", e))?,
        };
        Ok(Client {
            inner: Arc::new(Inner {
                base,
                api_key,
                http,
                timeout: self.timeout,
                lifecycle_timeout: self.lifecycle_timeout,
                retry: self.retry,
            }),
        })
    }
}

fn env_var(name: &str) -> Option<String> {
    std::env::var(name)
        .ok()
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
}

/// A connection to a kiln server: its base URL and a team's API key. Cheap to clone
/// (clones share one connection pool).
///
/// ```no_run
/// # async fn demo() -> kiln_sdk::Result<()> {
/// // From KILN_URL / KILN_API_KEY (or SUPERSERVE_BASE_URL / SUPERSERVE_API_KEY):
/// let client = kiln_sdk::Client::from_env()?;
/// // Or explicitly:
/// let client = kiln_sdk::Client::new("http://127.0.0.1:8080", "kiln_...")?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    base: Url,
    api_key: String,
    http: reqwest::Client,
    timeout: Duration,
    lifecycle_timeout: Duration,
    retry: RetryPolicy,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the API key.
        f.debug_struct("Client")
            .field("base_url", &self.base.as_str())
            .field("timeout", &self.timeout)
            .field("lifecycle_timeout", &self.lifecycle_timeout)
            .field("retry", &self.retry)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// A client for `base_url` with `api_key` and default settings.
    pub fn new(base_url: impl Into<String>, api_key: impl Into<String>) -> Result<Self> {
        Self::builder().base_url(base_url).api_key(api_key).build()
    }

    /// A client configured from the environment: `KILN_URL` and `KILN_API_KEY`, falling
    /// back to `SUPERSERVE_BASE_URL` and `SUPERSERVE_API_KEY`.
    pub fn from_env() -> Result<Self> {
        Self::builder().build()
    }

    /// Settings beyond the URL and key.
    pub fn builder() -> ClientBuilder {
        ClientBuilder {
            base_url: None,
            api_key: None,
            timeout: DEFAULT_TIMEOUT,
            lifecycle_timeout: DEFAULT_LIFECYCLE_TIMEOUT,
            retry: RetryPolicy::default(),
            http: None,
        }
    }

    /// The base URL requests go to.
    pub fn base_url(&self) -> &Url {
        &self.inner.base
    }

    /// The retry policy in force.
    pub fn retry_policy(&self) -> RetryPolicy {
        self.inner.retry
    }

    pub(crate) fn lifecycle_timeout(&self) -> Duration {
        self.inner.lifecycle_timeout
    }

    /// `<base>/<segments...>`, each segment percent-encoded (a template name may hold `/`).
    pub(crate) fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.inner.base.clone();
        url.set_query(None);
        url.set_fragment(None);
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(segments);
        }
        url
    }

    /// The WebSocket URL for a path: `ws://` or `wss://` on the API's origin.
    pub(crate) fn ws_url(&self, segments: &[&str]) -> Url {
        let mut url = self.url(segments);
        let scheme = if url.scheme() == "https" { "wss" } else { "ws" };
        // http -> ws and https -> wss are both allowed by the URL standard.
        let _ = url.set_scheme(scheme);
        url
    }

    /// A control-plane request (with the API key).
    pub(crate) fn api(&self, method: Method, segments: &[&str]) -> Request {
        let mut r = Request::new(method, self.url(segments), self.inner.timeout);
        r.headers.insert(
            HeaderName::from_static("x-api-key"),
            HeaderValue::from_str(&self.inner.api_key).expect("checked in build"),
        );
        r
    }

    /// A data-plane request for a sandbox (its id and access token, no API key).
    pub(crate) fn data(
        &self,
        method: Method,
        segments: &[&str],
        sandbox_id: &str,
        token: &str,
    ) -> Result<Request> {
        let mut r = Request::new(method, self.url(segments), self.inner.timeout);
        r.headers.insert(
            HeaderName::from_static(SANDBOX_ID_HEADER),
            header(sandbox_id)?,
        );
        r.headers
            .insert(HeaderName::from_static("x-access-token"), header(token)?);
        Ok(r)
    }

    /// Sends `req` under the retry policy; a non-success status becomes a typed error.
    pub(crate) async fn send(&self, req: Request) -> Result<reqwest::Response> {
        let policy = self.inner.retry;
        let idempotent = req.method == Method::GET || req.method == Method::DELETE;
        let mut attempt: u32 = 0;
        loop {
            let max_attempts = if idempotent {
                policy.max_attempts.max(1)
            } else {
                1
            };
            let mut builder = self
                .inner
                .http
                .request(req.method.clone(), req.url.clone())
                .headers(req.headers.clone());
            if let Some(t) = req.timeout {
                builder = builder.timeout(t);
            }
            if let Some(body) = &req.body {
                builder = builder.body(body.clone());
            }
            let resp = match builder.send().await {
                Ok(r) => r,
                Err(e) => {
                    let retry = idempotent && !e.is_timeout() && !e.is_builder();
                    if retry && attempt + 1 < max_attempts {
                        tokio::time::sleep(policy.backoff(attempt)).await;
                        attempt += 1;
                        continue;
                    }
                    return Err(Error::from_reqwest(e));
                }
            };
            let status = resp.status();
            if status.is_success() {
                return Ok(resp);
            }
            let retry_after = resp
                .headers()
                .get(RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(parse_retry_after);
            let body = read_capped(resp, 64 * 1024).await;
            let err = Error::from_response(status.as_u16(), &body, retry_after);
            let transient = matches!(status.as_u16(), 429 | 502 | 503 | 504)
                && !(status.as_u16() == 503
                    && err.code() == kiln_api::ApiErrorCode::SandboxUnavailable.as_str());
            let conflict = req.retry_conflict && status.as_u16() == 409;
            let max_attempts = if idempotent && conflict {
                CONFLICT_MAX_ATTEMPTS
            } else {
                max_attempts
            };
            if idempotent && (transient || conflict) && attempt + 1 < max_attempts {
                let wait = match retry_after {
                    Some(d) => d.min(policy.max_backoff),
                    None => policy.backoff(attempt),
                };
                tokio::time::sleep(wait).await;
                attempt += 1;
                continue;
            }
            return Err(err);
        }
    }

    /// Sends `req` and decodes its JSON body.
    pub(crate) async fn json<T: serde::de::DeserializeOwned>(&self, req: Request) -> Result<T> {
        let what = format!("{} {}", req.method, req.url.path());
        let resp = self.send(req).await?;
        let bytes = resp.bytes().await.map_err(Error::from_reqwest)?;
        serde_json::from_slice(&bytes)
            .map_err(|e| Error::Protocol(format!("invalid response to {what}: {e}")))
    }

    /// Sends `req`, expecting no body of interest.
    pub(crate) async fn empty(&self, req: Request) -> Result<()> {
        let resp = self.send(req).await?;
        // Drain so the connection can be reused.
        let _ = resp.bytes().await;
        Ok(())
    }
}

/// The header naming the sandbox of a data-plane request.
pub(crate) const SANDBOX_ID_HEADER: &str = "x-superserve-sandbox-id";

/// A DELETE that hits a state transition in progress (409) is tried this many times.
const CONFLICT_MAX_ATTEMPTS: u32 = 11;

pub(crate) fn header(value: &str) -> Result<HeaderValue> {
    HeaderValue::from_str(value)
        .map_err(|_| Error::validation(format!("{value:?} is not a valid header value")))
}

/// One request, resendable. (No `Debug`: its headers hold secrets.)
#[derive(Clone)]
pub(crate) struct Request {
    pub(crate) method: Method,
    pub(crate) url: Url,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Option<bytes::Bytes>,
    /// Whole-exchange timeout; `None` for streams (they have an idle timeout instead).
    pub(crate) timeout: Option<Duration>,
    /// Retry a 409 on DELETE (a transition in progress clears by itself).
    pub(crate) retry_conflict: bool,
}

impl Request {
    fn new(method: Method, url: Url, timeout: Duration) -> Self {
        Self {
            method,
            url,
            headers: HeaderMap::new(),
            body: None,
            timeout: Some(timeout),
            retry_conflict: false,
        }
    }

    /// A JSON body.
    pub(crate) fn json(mut self, body: &impl serde::Serialize) -> Self {
        let bytes = serde_json::to_vec(body).expect("request bodies serialise");
        self.headers.insert(
            reqwest::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        self.body = Some(bytes.into());
        self
    }

    /// A raw body.
    pub(crate) fn bytes(mut self, body: bytes::Bytes) -> Self {
        self.headers.insert(
            reqwest::header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        self.body = Some(body);
        self
    }

    pub(crate) fn query(mut self, pairs: &[(&str, &str)]) -> Self {
        if !pairs.is_empty() {
            self.url.query_pairs_mut().extend_pairs(pairs);
        }
        self
    }

    pub(crate) fn timeout(mut self, timeout: Option<Duration>) -> Self {
        self.timeout = timeout;
        self
    }

    pub(crate) fn retry_conflict(mut self) -> Self {
        self.retry_conflict = true;
        self
    }
}

/// `Retry-After` as seconds or an HTTP date.
pub(crate) fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs));
    }
    let when = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    let now = chrono::Utc::now();
    Some(
        (when.with_timezone(&chrono::Utc) - now)
            .to_std()
            .unwrap_or(Duration::ZERO),
    )
}

/// At most `cap` bytes of a body (an error body is small; a hostile one is not read on).
async fn read_capped(mut resp: reqwest::Response, cap: usize) -> Vec<u8> {
    let mut out = Vec::new();
    while let Ok(Some(chunk)) = resp.chunk().await {
        out.extend_from_slice(&chunk);
        if out.len() >= cap {
            out.truncate(cap);
            break;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_and_cap() {
        let p = RetryPolicy::default();
        for _ in 0..50 {
            let b0 = p.backoff(0);
            let b1 = p.backoff(1);
            assert!(b0 >= Duration::from_millis(80) && b0 <= Duration::from_millis(120));
            assert!(b1 >= Duration::from_millis(160) && b1 <= Duration::from_millis(240));
        }
        assert_eq!(p.backoff(40), Duration::from_secs(30));
    }

    #[test]
    fn retry_after_in_seconds_or_as_a_date() {
        assert_eq!(parse_retry_after("2"), Some(Duration::from_secs(2)));
        assert_eq!(parse_retry_after(" 0.5 "), Some(Duration::from_millis(500)));
        assert_eq!(parse_retry_after("-1"), None);
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon"), None);
    }

    #[test]
    fn urls_encode_segments_and_keep_a_base_path() {
        let c = Client::new("http://h:1/prefix/", "k").unwrap();
        assert_eq!(
            c.url(&["templates", "org/web"]).as_str(),
            "http://h:1/prefix/templates/org%2Fweb"
        );
        let c = Client::new("https://h", "k").unwrap();
        assert_eq!(
            c.ws_url(&["exec", "connect"]).as_str(),
            "wss://h/exec/connect"
        );
        let c = Client::new("http://h:8080", "k").unwrap();
        assert_eq!(
            c.ws_url(&["exec", "connect"]).as_str(),
            "ws://h:8080/exec/connect"
        );
        assert!(matches!(
            Client::new("ftp://h", "k"),
            Err(Error::Validation { .. })
        ));
    }
}
