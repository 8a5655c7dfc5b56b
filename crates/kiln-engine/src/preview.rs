//! Preview URLs: who may open `{port}-{sandbox}.{domain}`, the tokens that say so, and the
//! way into the sandbox (a [`PortStream`] over its agent).
//!
//! **Policy.** A sandbox's `preview_access` decides which ports are served: `public` and
//! `private` serve published ports only (an unpublished one is 404 before anything else
//! is looked at), `legacy_public` every listening port. A published port is `public` or
//! `private` on its own.
//!
//! **Tokens** are HMAC-SHA256 signatures, by a key kiln generates on first start
//! (`<state>/preview-token.key`, mode 0600), over the sandbox, the port, the port's token
//! generation and an expiry: `kpt_<version>_<expiry>_<mac>`. Nothing is stored per token;
//! rotating or unpublishing a port bumps its generation in the store, which revokes every
//! token of the older ones at once. The signature is checked in constant time. Replacing
//! the key file (and restarting) revokes every token of every sandbox.
//!
//! **The way in** is the sandbox's agent ([`AgentClient::connect_port`]): no port of the
//! host is opened for a sandbox, and a paused sandbox that gets a request is resumed
//! first, as `activate` does.

use std::path::Path;

use base64::Engine as _;
use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use kiln_agent_proto::{ClientError, ErrorCode, PortStream};
use kiln_api::network::INBOUND;
use kiln_api::preview::{check_port, PREVIEW_TOKEN_HEADER, PREVIEW_TOKEN_QUERY};
use kiln_api::{
    NetworkEvent, NetworkVerdict, PortAccess, PreviewAccess, PreviewPortList, PreviewToken,
    PublishPreviewPort, PublishedPreviewPort, RequestError,
};
use kiln_store::{PreviewPort, Sandbox, SandboxStatus};
use sha2::Sha256;

use crate::error::{EngineError, Result};
use crate::sandboxes::NETWORK_LOG;
use crate::Engine;

/// The key file, in the state directory.
pub const TOKEN_KEY_FILE: &str = "preview-token.key";
const KEY_LEN: usize = 32;
const TOKEN_PREFIX: &str = "kpt";

/// The key preview tokens are signed with.
pub(crate) struct TokenKey([u8; KEY_LEN]);

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenKey(..)")
    }
}

impl TokenKey {
    /// The key of this state directory, made on first use: 32 bytes from the OS's
    /// generator (two v4 UUIDs, 244 random bits), written with mode 0600 and renamed into
    /// place, so a concurrent first start of two processes keeps one of them.
    pub(crate) fn load_or_create(dir: &Path) -> Result<Self> {
        let path = dir.join(TOKEN_KEY_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => {
                return bytes.try_into().map(Self).map_err(|_| EngineError::Io {
                    what: "reading the preview token key (it must be 32 bytes)",
                    path: path.clone(),
                    source: std::io::ErrorKind::InvalidData.into(),
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(EngineError::io("reading", &path)(e)),
        }
        let mut key = [0u8; KEY_LEN];
        key[..16].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
        key[16..].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
        let tmp = dir.join(format!(".{TOKEN_KEY_FILE}.{}", std::process::id()));
        {
            use std::io::Write as _;
            use std::os::unix::fs::OpenOptionsExt as _;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(EngineError::io("writing", &tmp))?;
            f.write_all(&key)
                .and_then(|()| f.sync_all())
                .map_err(EngineError::io("writing", &tmp))?;
        }
        let linked = std::fs::hard_link(&tmp, &path);
        let _ = std::fs::remove_file(&tmp);
        match linked {
            Ok(()) => {}
            // Another process won the race: keep its key.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Self::load_or_create(dir)
            }
            Err(e) => return Err(EngineError::io("writing", &path)(e)),
        }
        tracing::info!(path = %path.display(), "created the preview token key");
        Ok(Self(key))
    }

    fn mac(&self, sandbox_id: &str, port: u16, version: u32, expires: i64) -> Hmac<Sha256> {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes a key of any length");
        mac.update(
            format!("kiln-preview-v1\n{sandbox_id}\n{port}\n{version}\n{expires}").as_bytes(),
        );
        mac
    }

    /// A token for `port` of `sandbox_id` of generation `version`, valid until `expires`
    /// (unix seconds; 0: until the generation changes).
    pub(crate) fn mint(&self, sandbox_id: &str, port: u16, version: u32, expires: i64) -> String {
        let sig = self
            .mac(sandbox_id, port, version, expires)
            .finalize()
            .into_bytes();
        let sig = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sig);
        format!("{TOKEN_PREFIX}_{version}_{expires}_{sig}")
    }

    /// Whether `token` opens `port` of `sandbox_id` now that its generation is `version`.
    /// The signature is compared in constant time.
    pub(crate) fn verify(
        &self,
        token: &str,
        sandbox_id: &str,
        port: u16,
        version: u32,
        now: i64,
    ) -> bool {
        let mut parts = token.trim().splitn(4, '_');
        let (Some(TOKEN_PREFIX), Some(v), Some(exp), Some(sig)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return false;
        };
        let (Ok(v), Ok(exp)) = (v.parse::<u32>(), exp.parse::<i64>()) else {
            return false;
        };
        if v != version || (exp != 0 && exp <= now) {
            return false;
        }
        let Ok(sig) = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(sig) else {
            return false;
        };
        self.mac(sandbox_id, port, v, exp)
            .verify_slice(&sig)
            .is_ok()
    }
}

/// Why a preview request is not served.
#[derive(Debug, thiserror::Error)]
pub enum PreviewError {
    /// No such sandbox (or it is deleted, or another team's id is guessed), or a port it
    /// did not publish under a strict policy.
    #[error("no preview here: the sandbox does not exist or this port is not published")]
    NotFound,
    /// The port is outside what previews serve (the SDKs' message).
    #[error("{0}")]
    BadPort(RequestError),
    /// A private port, and no token came with the request.
    #[error("this port is private: open a signed preview URL or send a preview token")]
    TokenRequired,
    /// A token came, but not one of this port's current generation (or it expired).
    #[error("the preview token is not valid for this port (expired, rotated or revoked)")]
    BadToken,
    /// The sandbox exists but its VM is not running here.
    #[error("the sandbox is not running")]
    NotRunning,
    /// The port refused the connection.
    #[error("nothing is listening on port {0} in the sandbox")]
    NothingListening(u16),
    /// The connection to the port broke before an answer came.
    #[error("the connection to port {0} in the sandbox broke before it answered")]
    ConnectionLost(u16),
    /// The sandbox's agent cannot open connections (its template was built by an older
    /// kiln).
    #[error("this sandbox's agent predates preview URLs: rebuild its template")]
    AgentTooOld,
    /// Anything else (a resume that failed, the agent gone).
    #[error(transparent)]
    Engine(#[from] EngineError),
}

impl PreviewError {
    /// The HTTP status the proxy answers with.
    pub fn http_status(&self) -> u16 {
        match self {
            Self::NotFound => 404,
            Self::BadPort(_) => 400,
            Self::TokenRequired | Self::BadToken => 401,
            Self::NotRunning => 503,
            Self::NothingListening(_) | Self::ConnectionLost(_) | Self::AgentTooOld => 502,
            Self::Engine(e) => e.code().http_status(),
        }
    }

    /// What the visitor may read.
    pub fn public_message(&self) -> String {
        match self {
            Self::Engine(e) => e.public_message(),
            e => e.to_string(),
        }
    }
}

/// A preview request allowed through: which sandbox and port, and (for a token that
/// came in a signed URL) until when its cookie may live.
#[derive(Debug, Clone)]
pub struct PreviewGrant {
    /// The sandbox.
    pub sandbox_id: String,
    /// The port inside it.
    pub port: u16,
    /// The port's access.
    pub access: PortAccess,
    /// When the token used expires (none: it does not, or none was needed).
    pub token_expires: Option<DateTime<Utc>>,
    team_id: String,
}

/// A preview request as the sandbox's network log records it.
#[derive(Debug, Clone)]
pub struct InboundRequest<'a> {
    /// The HTTP method.
    pub method: &'a str,
    /// The path, without the query string.
    pub path: &'a str,
    /// The port it was for.
    pub port: u16,
    /// The status answered.
    pub status: u16,
    /// Time to the response head.
    pub latency: std::time::Duration,
}

/// Whether an id can be a sandbox's: ids are UUIDs, and anything else must not reach a
/// query or a log.
fn plausible_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
}

impl Engine {
    fn published(&self, s: &Sandbox, p: &PreviewPort) -> PublishedPreviewPort {
        PublishedPreviewPort {
            port: p.port,
            token_version: p.token_version,
            access: p.access,
            url: Some(self.cfg.preview.url(&s.id, p.port)),
        }
    }

    fn token_for(&self, s: &Sandbox, p: &PreviewPort, ttl_secs: Option<u64>) -> PreviewToken {
        let expires_at = ttl_secs.map(|t| Utc::now() + chrono::Duration::seconds(t as i64));
        let expires = expires_at.map_or(0, |t| t.timestamp());
        PreviewToken {
            token: self
                .preview_key
                .mint(&s.id, p.port, p.token_version, expires),
            port: p.port,
            header: PREVIEW_TOKEN_HEADER.to_owned(),
            query_param: PREVIEW_TOKEN_QUERY.to_owned(),
            token_version: p.token_version,
            access: p.access,
            preview_access: s.preview_access,
            expires_at,
            url: Some(self.cfg.preview.url(&s.id, p.port)),
        }
    }

    /// A sandbox's policy and published ports, each with its URL (never a token).
    pub async fn preview_ports(&self, team_id: &str, sandbox_id: &str) -> Result<PreviewPortList> {
        let (s, ports) = self.store.preview_ports(team_id, sandbox_id).await?;
        Ok(PreviewPortList {
            preview_access: s.preview_access,
            ports: ports.iter().map(|p| self.published(&s, p)).collect(),
        })
    }

    /// Publishes a port (again): `access` none keeps a published port's access and gives
    /// a new one the sandbox's default.
    pub async fn publish_preview_port(
        &self,
        team_id: &str,
        sandbox_id: &str,
        req: &PublishPreviewPort,
    ) -> Result<PublishedPreviewPort> {
        let (port, access) = req.validate()?;
        let (s, p) = self
            .store
            .publish_preview_port(team_id, sandbox_id, port, access)
            .await?;
        tracing::info!(sandbox = %sandbox_id, port, access = %p.access, "preview port published");
        Ok(self.published(&s, &p))
    }

    /// Unpublishes a port and revokes its tokens (idempotent).
    pub async fn unpublish_preview_port(
        &self,
        team_id: &str,
        sandbox_id: &str,
        port: &str,
    ) -> Result<()> {
        let port = kiln_api::preview::parse_port(port)?;
        self.store
            .unpublish_preview_port(team_id, sandbox_id, port)
            .await?;
        tracing::info!(sandbox = %sandbox_id, port, "preview port unpublished");
        Ok(())
    }

    /// A token for a published port, valid for `ttl_secs` (none: until the port is
    /// rotated or unpublished).
    pub async fn preview_token(
        &self,
        team_id: &str,
        sandbox_id: &str,
        port: &str,
        ttl_secs: Option<u64>,
    ) -> Result<PreviewToken> {
        let port = kiln_api::preview::parse_port(port)?;
        let (s, p) = self
            .store
            .published_preview_port(team_id, sandbox_id, port)
            .await?;
        Ok(self.token_for(&s, &p, ttl_secs))
    }

    /// Starts a new generation of a port's tokens (every older token stops working) and
    /// returns a token of the new one.
    pub async fn rotate_preview_token(
        &self,
        team_id: &str,
        sandbox_id: &str,
        port: &str,
    ) -> Result<PreviewToken> {
        let port = kiln_api::preview::parse_port(port)?;
        let (s, p) = self
            .store
            .rotate_preview_port(team_id, sandbox_id, port)
            .await?;
        tracing::info!(sandbox = %sandbox_id, port, version = p.token_version, "preview tokens rotated");
        Ok(self.token_for(&s, &p, None))
    }

    /// Sets a sandbox's preview policy (`public` or `private`).
    pub(crate) async fn set_preview_access(
        &self,
        team_id: &str,
        sandbox_id: &str,
        access: PreviewAccess,
    ) -> Result<()> {
        self.store
            .set_preview_access(team_id, sandbox_id, access.check_choice()?)
            .await?;
        Ok(())
    }

    /// Whether a preview request for `port` of `sandbox_id` may go through, given the
    /// token it carried (header, query or cookie). The order matters: an unknown sandbox
    /// or an unpublished port under a strict policy is not found before anything else is
    /// said about it.
    pub async fn authorize_preview(
        &self,
        sandbox_id: &str,
        port: u32,
        token: Option<&str>,
    ) -> std::result::Result<PreviewGrant, PreviewError> {
        if !plausible_id(sandbox_id) {
            return Err(PreviewError::NotFound);
        }
        let port = check_port(i64::from(port)).map_err(PreviewError::BadPort)?;
        let Some((s, published)) = self
            .store
            .preview_target(sandbox_id, port)
            .await
            .map_err(EngineError::from)?
        else {
            return Err(PreviewError::NotFound);
        };
        let (access, version) = match (&published, s.preview_access.is_strict()) {
            (Some(p), _) => (p.access, p.token_version),
            (None, true) => return Err(PreviewError::NotFound),
            (None, false) => (PortAccess::Public, 0),
        };
        let mut token_expires = None;
        if access != PortAccess::Public {
            let token = token.ok_or(PreviewError::TokenRequired)?;
            let now = Utc::now().timestamp();
            if !self
                .preview_key
                .verify(token, sandbox_id, port, version, now)
            {
                return Err(PreviewError::BadToken);
            }
            token_expires = token_expiry(token);
        }
        Ok(PreviewGrant {
            sandbox_id: s.id,
            port,
            access,
            token_expires,
            team_id: s.team_id,
        })
    }

    /// Makes sure the granted sandbox runs here: a paused one is resumed (its access
    /// token rotates, as with `activate`); one that is not this process's, or not
    /// running at all, is [`PreviewError::NotRunning`].
    pub async fn prepare_preview(
        &self,
        grant: &PreviewGrant,
    ) -> std::result::Result<(), PreviewError> {
        if self.live.agent(&grant.sandbox_id).is_some() {
            return Ok(());
        }
        let s = self
            .store
            .sandbox_by_id(&grant.team_id, &grant.sandbox_id)
            .await
            .map_err(EngineError::from)?;
        match s.status {
            SandboxStatus::Paused | SandboxStatus::Pausing | SandboxStatus::Resuming => {
                tracing::info!(sandbox = %s.id, "preview request resumes the sandbox");
                self.activate_sandbox(&grant.team_id, &grant.sandbox_id)
                    .await?;
                Ok(())
            }
            SandboxStatus::Deleted => Err(PreviewError::NotFound),
            _ => Err(PreviewError::NotRunning),
        }
    }

    /// A connection to `port` inside a sandbox this process runs, through its agent.
    pub async fn preview_connect(
        &self,
        sandbox_id: &str,
        port: u16,
    ) -> std::result::Result<PortStream, PreviewError> {
        let agent = self
            .live
            .agent(sandbox_id)
            .ok_or(PreviewError::NotRunning)?;
        agent.connect_port(port).await.map_err(|e| match e {
            ClientError::Agent {
                code: ErrorCode::ConnectionRefused,
                ..
            } => PreviewError::NothingListening(port),
            // An agent that cannot read the request.
            ClientError::Agent {
                code: ErrorCode::BadFrame | ErrorCode::Unsupported,
                ..
            } => PreviewError::AgentTooOld,
            e => PreviewError::Engine(e.into()),
        })
    }

    /// Appends a preview request to the sandbox's network log (`kind: request`,
    /// `direction: inbound`). Its query string is never written: it may hold a token.
    pub fn log_preview_request(&self, sandbox_id: &str, r: &InboundRequest<'_>) {
        let Ok(dir) = self.layout.sandbox_dir(sandbox_id) else {
            return;
        };
        if !dir.is_dir() {
            return;
        }
        let now = Utc::now();
        let verdict = match r.status {
            401 | 403 | 404 => NetworkVerdict::Blocked,
            s if s >= 500 => NetworkVerdict::Failed,
            _ => NetworkVerdict::Allowed,
        };
        let event = NetworkEvent {
            kind: "request".into(),
            id: now.timestamp_micros(),
            ts: now,
            dst_port: Some(r.port),
            verdict,
            direction: Some(INBOUND.to_owned()),
            method: Some(r.method.to_owned()),
            path: Some(r.path.to_owned()),
            status: Some(r.status),
            latency_ms: Some(u64::try_from(r.latency.as_millis()).unwrap_or(u64::MAX)),
            ..NetworkEvent::default()
        };
        kiln_net::log::append(&dir.join(NETWORK_LOG), &event);
    }

    /// Where preview URLs point.
    pub fn preview_site(&self) -> &kiln_api::PreviewSite {
        &self.cfg.preview
    }
}

/// The expiry a (verified) token carries.
fn token_expiry(token: &str) -> Option<DateTime<Utc>> {
    let exp: i64 = token.trim().split('_').nth(2)?.parse().ok()?;
    (exp != 0)
        .then(|| DateTime::from_timestamp(exp, 0))
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_bound_to_sandbox_port_version_and_time() {
        let dir = tempfile::tempdir().unwrap();
        let key = TokenKey::load_or_create(dir.path()).unwrap();
        // The same key comes back; the file is private.
        let again = TokenKey::load_or_create(dir.path()).unwrap();
        assert_eq!(key.0, again.0);
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(dir.path().join(TOKEN_KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);

        let t = key.mint("sbx", 3000, 2, 0);
        assert!(t.starts_with("kpt_2_0_"), "{t}");
        assert!(key.verify(&t, "sbx", 3000, 2, 1_000));
        assert!(!key.verify(&t, "other", 3000, 2, 1_000));
        assert!(!key.verify(&t, "sbx", 3001, 2, 1_000));
        assert!(!key.verify(&t, "sbx", 3000, 3, 1_000), "rotated");
        // A token edited to claim the new generation does not carry a valid signature.
        assert!(!key.verify(&t.replacen("kpt_2_", "kpt_3_", 1), "sbx", 3000, 3, 1_000));
        let expiring = key.mint("sbx", 3000, 2, 2_000);
        assert!(key.verify(&expiring, "sbx", 3000, 2, 1_999));
        assert!(!key.verify(&expiring, "sbx", 3000, 2, 2_000));
        assert_eq!(token_expiry(&expiring).unwrap().timestamp(), 2_000);
        assert!(!key.verify(
            &expiring.replacen("_2000_", "_0_", 1),
            "sbx",
            3000,
            2,
            3_000
        ));
        for junk in ["", "kpt", "kpt_2_0_", "kpt_x_0_abc", "Bearer kpt_2_0_abc"] {
            assert!(!key.verify(junk, "sbx", 3000, 2, 1_000), "{junk}");
        }
        // Another state directory signs differently.
        let dir2 = tempfile::tempdir().unwrap();
        let key2 = TokenKey::load_or_create(dir2.path()).unwrap();
        assert!(!key2.verify(&t, "sbx", 3000, 2, 1_000));
    }
}
