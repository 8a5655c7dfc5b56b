//! `sandbox.previews()`: preview URLs, a sandbox's web ports reached from a browser
//! (`/sandboxes/{id}/preview-ports`). The Python SDK's `list_preview_ports`,
//! `publish_preview_port`, `unpublish_preview_port`, `get_preview_token`,
//! `get_signed_preview_url` and `rotate_preview_token` are [`Previews::list`],
//! [`Previews::publish`], [`Previews::unpublish`], [`Previews::token`],
//! [`Previews::signed_url`] and [`Previews::rotate`]. None of them resumes a paused
//! sandbox (a request to its URL does).

use kiln_api::preview::check_port;
use kiln_api::{
    PortAccess, PreviewPortList, PreviewToken, PreviewTokenRequest, PublishPreviewPort,
    PublishedPreviewPort,
};
use reqwest::Method;

use crate::client::Client;
use crate::error::{Error, Result};

/// The preview ports of one sandbox; from [`crate::Sandbox::previews`], or
/// [`Previews::of`] for a sandbox by id.
///
/// ```no_run
/// # async fn demo(sandbox: kiln_sdk::Sandbox) -> kiln_sdk::Result<()> {
/// use kiln_sdk::PortAccess;
/// let port = sandbox.previews().publish(3000, Some(PortAccess::Private)).await?;
/// println!("{}", port.url.unwrap_or_default());
/// // A browser link that works for five minutes:
/// let link = sandbox.previews().signed_url(3000, Some(300)).await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Copy)]
pub struct Previews<'a> {
    client: &'a Client,
    sandbox_id: &'a str,
}

/// A port as the SDKs check it (1024-65535, not 49983) before anything is sent.
fn valid(port: u16) -> Result<String> {
    check_port(i64::from(port))
        .map(|p| p.to_string())
        .map_err(|e| Error::validation(e.message))
}

impl<'a> Previews<'a> {
    /// The preview ports of sandbox `sandbox_id`, without connecting to it.
    pub fn of(client: &'a Client, sandbox_id: &'a str) -> Self {
        Self { client, sandbox_id }
    }

    /// The sandbox's policy and its published ports, each with its URL (never a token).
    pub async fn list(&self) -> Result<PreviewPortList> {
        let req = self.client.api(
            Method::GET,
            &["sandboxes", self.sandbox_id, "preview-ports"],
        );
        self.client.json(req).await
    }

    /// Publishes `port`. `access` none keeps an already published port's access and
    /// gives a new one the sandbox's default.
    pub async fn publish(
        &self,
        port: u16,
        access: Option<PortAccess>,
    ) -> Result<PublishedPreviewPort> {
        valid(port)?;
        let req = self
            .client
            .api(
                Method::POST,
                &["sandboxes", self.sandbox_id, "preview-ports"],
            )
            .json(&PublishPreviewPort::new(port, access));
        self.client.json(req).await
    }

    /// Unpublishes `port` and revokes its tokens. Not published is fine.
    pub async fn unpublish(&self, port: u16) -> Result<()> {
        let p = valid(port)?;
        let req = self.client.api(
            Method::DELETE,
            &["sandboxes", self.sandbox_id, "preview-ports", &p],
        );
        self.client.empty(req).await
    }

    /// A token for published `port`: send it in the header it names, or open
    /// [`PreviewToken::signed_url`] in a browser. `expires_in_seconds` none: it works
    /// until the port is rotated or unpublished.
    pub async fn token(&self, port: u16, expires_in_seconds: Option<u64>) -> Result<PreviewToken> {
        let p = valid(port)?;
        let body = PreviewTokenRequest {
            expires_in_seconds: expires_in_seconds.map(|s| i64::try_from(s).unwrap_or(i64::MAX)),
        };
        let req = self
            .client
            .api(
                Method::POST,
                &["sandboxes", self.sandbox_id, "preview-ports", &p, "token"],
            )
            .json(&body);
        self.client.json(req).await
    }

    /// A browser URL for published `port` that carries a token valid for
    /// `expires_in_seconds` (the Python SDK's default is 60): the server trades it for a
    /// cookie of that preview host and redirects to the clean URL.
    pub async fn signed_url(&self, port: u16, expires_in_seconds: Option<u64>) -> Result<String> {
        self.token(port, expires_in_seconds)
            .await?
            .signed_url()
            .ok_or_else(|| Error::Protocol("the token came without the port's URL".into()))
    }

    /// Revokes every token, signed URL and cookie of `port` and returns a fresh token.
    pub async fn rotate(&self, port: u16) -> Result<PreviewToken> {
        let p = valid(port)?;
        let req = self.client.api(
            Method::POST,
            &[
                "sandboxes",
                self.sandbox_id,
                "preview-ports",
                &p,
                "token",
                "rotate",
            ],
        );
        self.client.json(req).await
    }
}
