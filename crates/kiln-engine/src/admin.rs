//! Teams and their API keys: who a request is, and `kiln admin`.

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::error::Result;
use crate::{Engine, Team};

/// An API key as `kiln admin list-api-keys` shows it; the key itself exists only in its
/// holder's hands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ApiKeyInfo {
    /// Its id (what `revoke-api-key` takes).
    pub id: String,
    /// Its label.
    pub name: String,
    /// The first characters of the key, to tell keys apart.
    pub prefix: String,
    /// When it was made.
    #[serde(with = "kiln_api::time")]
    pub created_at: DateTime<Utc>,
    /// When it last authenticated a request.
    #[serde(with = "kiln_api::time::option")]
    pub last_used_at: Option<DateTime<Utc>>,
}

impl Engine {
    /// The team whose key this is, if any (keys are stored hashed).
    pub async fn authenticate(&self, key: &str) -> Result<Option<Team>> {
        Ok(self.store.authenticate(key).await?)
    }

    /// A new key for the team `team_name` (created if missing), in plain text: shown once.
    pub async fn create_api_key(&self, team_name: &str) -> Result<String> {
        Ok(self.store.create_api_key(team_name).await?.1)
    }

    /// The keys of the team `team_name`.
    pub async fn list_api_keys(&self, team_name: &str) -> Result<Vec<ApiKeyInfo>> {
        let team = self.team_named(team_name).await?;
        Ok(self
            .store
            .list_api_keys(&team.id)
            .await?
            .into_iter()
            .map(|k| ApiKeyInfo {
                id: k.id,
                name: k.name,
                prefix: k.prefix,
                created_at: k.created_at,
                last_used_at: k.last_used_at,
            })
            .collect())
    }

    /// Revokes a key of the team `team_name`: it authenticates nothing from now on.
    pub async fn revoke_api_key(&self, team_name: &str, key_id: &str) -> Result<()> {
        let team = self.team_named(team_name).await?;
        Ok(self.store.revoke_api_key(&team.id, key_id).await?)
    }

    async fn team_named(&self, name: &str) -> Result<Team> {
        self.store
            .team_by_name(name)
            .await?
            .ok_or_else(|| kiln_store::StoreError::not_found("team", name).into())
    }
}
