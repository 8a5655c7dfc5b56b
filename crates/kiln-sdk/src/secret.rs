//! Team secrets: credentials a sandbox uses without ever holding them. A sandbox a secret
//! is bound to ([`SandboxCreateOptions::secrets`](crate::SandboxCreateOptions::secrets),
//! [`Sandbox::attach_secret`](crate::Sandbox::attach_secret)) sees a stand-in token under
//! an environment variable; kiln's egress proxy puts the real value in its place on
//! requests to the secret's hosts. The official SDKs' `Secret` and `Provider`.

use kiln_api::{
    ApiErrorCode, AuditQuery, CreateSecret, ProviderShortcut, ProxyAuditEvent, RotateSecret,
    SecretInfo, SecretSandboxBinding,
};
use reqwest::Method;

use crate::client::Client;
use crate::error::{Error, Result};

/// The `/secrets` and `/providers` calls. The value of a secret goes to the server once
/// (create, rotate) and never comes back.
///
/// ```no_run
/// use kiln_sdk::{Client, CreateSecret, Sandbox, SandboxCreateOptions, Secret};
///
/// # async fn demo() -> kiln_sdk::Result<()> {
/// let client = Client::from_env()?;
/// Secret::create(&client, &CreateSecret {
///     name: "anthropic-prod".into(),
///     value: std::env::var("ANTHROPIC_API_KEY").unwrap_or_default(),
///     provider: Some("anthropic".into()),
///     ..CreateSecret::default()
/// })
/// .await?;
/// let mut options = SandboxCreateOptions::new("agent-1", "my-python-env");
/// options.secrets.insert("ANTHROPIC_API_KEY".into(), "anthropic-prod".into());
/// let sandbox = Sandbox::create(&client, options).await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Copy)]
pub struct Secret;

impl Secret {
    /// Stores a secret (`POST /secrets`): a `provider` shortcut, or `auth` and `hosts`.
    pub async fn create(client: &Client, req: &CreateSecret) -> Result<SecretInfo> {
        client
            .json(client.api(Method::POST, &["secrets"]).json(req))
            .await
    }

    /// One secret, by name.
    pub async fn get(client: &Client, name: &str) -> Result<SecretInfo> {
        client
            .json(client.api(Method::GET, &["secrets", name]))
            .await
    }

    /// The team's secrets.
    pub async fn list(client: &Client) -> Result<Vec<SecretInfo>> {
        client.json(client.api(Method::GET, &["secrets"])).await
    }

    /// Replaces its value; bound sandboxes send the new one from their next request.
    pub async fn rotate(client: &Client, name: &str, value: &str) -> Result<SecretInfo> {
        let body = RotateSecret {
            value: value.to_owned(),
        };
        client
            .json(client.api(Method::PATCH, &["secrets", name]).json(&body))
            .await
    }

    /// Deletes it; every binding of it is revoked. Already gone is fine.
    pub async fn delete(client: &Client, name: &str) -> Result<()> {
        match client
            .empty(client.api(Method::DELETE, &["secrets", name]))
            .await
        {
            Err(Error::NotFound { code, .. }) if code == ApiErrorCode::NotFound.as_str() => Ok(()),
            other => other,
        }
    }

    /// Requests made with it, newest first, across every sandbox.
    pub async fn audit(
        client: &Client,
        name: &str,
        q: &AuditQuery,
    ) -> Result<Vec<ProxyAuditEvent>> {
        let pairs = q.to_query();
        let pairs: Vec<(&str, &str)> = pairs
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        client
            .json(
                client
                    .api(Method::GET, &["secrets", name, "audit"])
                    .query(&pairs),
            )
            .await
    }

    /// The sandboxes it is bound to now.
    pub async fn sandboxes(client: &Client, name: &str) -> Result<Vec<SecretSandboxBinding>> {
        client
            .json(client.api(Method::GET, &["secrets", name, "sandboxes"]))
            .await
    }

    /// The provider shortcuts `provider` takes (`GET /providers`).
    pub async fn providers(client: &Client) -> Result<Vec<ProviderShortcut>> {
        client.json(client.api(Method::GET, &["providers"])).await
    }
}
