//! Team secrets: stored sealed, bound to sandboxes as stand-ins, swapped in at egress.
//!
//! The engine keeps three things in step for every sandbox with bindings:
//!
//! - the store's record of its bindings (what the API lists and the truth);
//! - its bindings file (`secrets.json` in the sandbox's directory, mode 0600), what the
//!   egress proxy reads for every request: stand-ins, hosts, auth shapes and the values
//!   *sealed* under the secrets key, never in clear. It is rewritten whole, atomically,
//!   whenever a binding or a value changes, so a detach or a delete revokes at once;
//! - the stand-ins in the guest agent's environment defaults (new processes see the
//!   variable; a paused sandbox gets the change on resume).
//!
//! Forks (a sandbox restored from another's snapshot) keep the bindings with stand-ins of
//! their own: [`Engine::copy_secret_bindings`] before the fork's VM runs, and
//! [`Engine::apply_secret_env`] once its agent answers, which replaces the parent's
//! stand-ins in the restored defaults.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use kiln_agent_proto::AgentClient;
use kiln_api::{
    AttachSecret, AuditQuery, CreateSecret, Provider, ProviderShortcut, ProxyAuditEvent,
    RotateSecret, SecretInfo, SecretSandboxBinding, TokenShape,
};
use kiln_net::ca::{read_pem_certs, EgressCa};
use kiln_net::seal::{write_private, KeyRing};
use kiln_net::secrets::{new_stand_in, SandboxSecrets, SECRETS_FILE};
use kiln_net::PrivateDest;
use kiln_store::{
    BindingState, Layout, NewBinding, NewSecret, Sandbox, SandboxStatus, Secret, SecretBinding,
    StoreError,
};
use kiln_vm::GuestTrust;

use crate::error::{EngineError, Result};
use crate::{Engine, EngineConfig};

/// What the egress proxy runs with and what guests trust, fixed when the engine opens.
#[derive(Debug)]
pub(crate) struct Egress {
    /// `KILN_EGRESS_ALLOW_PRIVATE`, parsed.
    pub allow_private: Vec<PrivateDest>,
    /// kiln's egress CA and the operator's bundle.
    pub trust: GuestTrust,
}

impl Egress {
    /// Checks the operator's settings and makes the secrets key and the egress CA on
    /// first start.
    pub fn open(cfg: &EngineConfig, layout: &Layout) -> Result<Self> {
        let allow_private = PrivateDest::parse_list(&cfg.egress_allow_private)
            .map_err(|e| EngineError::Config(format!("KILN_EGRESS_ALLOW_PRIVATE: {e}")))?;
        KeyRing::load_or_create(&cfg.secrets_key)?;
        let ca = EgressCa::load_or_create(&layout.keys_dir())?;
        if let Some(path) = &cfg.egress_trust_ca {
            read_pem_certs(path)
                .map_err(|e| EngineError::Config(format!("KILN_EGRESS_TRUST_CA: {e}")))?;
        }
        let mut pem = ca.cert_pem().to_owned();
        if let Some(path) = &cfg.guest_trust_ca {
            read_pem_certs(path)
                .map_err(|e| EngineError::Config(format!("KILN_GUEST_TRUST_CA: {e}")))?;
            let operator = std::fs::read_to_string(path)
                .map_err(EngineError::io("reading KILN_GUEST_TRUST_CA", path))?;
            if !pem.ends_with('\n') {
                pem.push('\n');
            }
            pem.push_str(&operator);
        }
        Ok(Self {
            allow_private,
            trust: GuestTrust::new(pem),
        })
    }
}

/// The shape of the stand-ins of a secret made from `provider`.
fn shape(provider: Option<&str>) -> TokenShape {
    provider
        .and_then(Provider::named)
        .map_or(TokenShape::GENERIC, |p| p.token)
}

/// A sealed value that does not open is a stored value kiln cannot read.
fn corrupt(e: kiln_net::seal::SealError) -> StoreError {
    StoreError::Corrupt {
        what: "sealed secret",
        source: Box::new(e),
    }
}

impl Engine {
    /// The provider catalog (`GET /providers`).
    pub fn providers(&self) -> Vec<ProviderShortcut> {
        kiln_api::secrets::PROVIDERS
            .iter()
            .map(Provider::shortcut)
            .collect()
    }

    fn keyring(&self) -> Result<KeyRing> {
        Ok(KeyRing::load(&self.cfg.secrets_key)?)
    }

    /// Stores a team secret, its value sealed (`POST /secrets`).
    pub async fn create_secret(&self, team_id: &str, req: &CreateSecret) -> Result<SecretInfo> {
        let spec = req.validate()?;
        let ring = self.keyring()?;
        let new = NewSecret {
            name: req.name.clone(),
            auth: spec.auth,
            hosts: spec.hosts,
            provider: spec.provider.map(|p| p.name.to_owned()),
        };
        let value = req.value.as_bytes();
        let secret = self
            .store
            .create_secret(team_id, &new, &|id| ring.seal(value, id))
            .await?;
        Ok(self.secret_info(&secret))
    }

    /// The team's secrets, by name.
    pub async fn list_secrets(&self, team_id: &str) -> Result<Vec<SecretInfo>> {
        Ok(self
            .store
            .list_secrets(team_id)
            .await?
            .iter()
            .map(|s| self.secret_info(s))
            .collect())
    }

    /// One of the team's secrets.
    pub async fn secret(&self, team_id: &str, name: &str) -> Result<SecretInfo> {
        let s = self.store.secret_by_name(team_id, name).await?;
        Ok(self.secret_info(&s))
    }

    /// Replaces a secret's value; every sandbox it is bound to uses the new one from its
    /// next request (`PATCH /secrets/{name}`).
    pub async fn rotate_secret(
        &self,
        team_id: &str,
        name: &str,
        req: &RotateSecret,
    ) -> Result<SecretInfo> {
        kiln_api::secrets::check_secret_value(&req.value)?;
        let ring = self.keyring()?;
        let value = req.value.as_bytes();
        let secret = self
            .store
            .reseal_secret(team_id, name, &|s| Ok(ring.seal(value, &s.id)), true)
            .await?;
        for s in self.store.sandboxes_bound_to(team_id, &secret.id).await? {
            self.write_bindings(&s).await?;
        }
        tracing::info!(secret_id = %secret.id, "secret rotated");
        Ok(self.secret_info(&secret))
    }

    /// Deletes a secret: every binding of it is revoked at once (the sandboxes list it as
    /// revoked; the proxy refuses its stand-ins), and its audit goes with it.
    pub async fn delete_secret(&self, team_id: &str, name: &str) -> Result<()> {
        let (secret, changed) = self.store.delete_secret(team_id, name).await?;
        for s in &changed {
            self.write_bindings(s).await?;
        }
        let audit = self.audit_file(&secret.id);
        for path in [audit.with_extension("log.1"), audit] {
            if let Err(e) = std::fs::remove_file(&path) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    return Err(EngineError::io("removing", &path)(e));
                }
            }
        }
        Ok(())
    }

    /// The sandboxes a secret is bound to now.
    pub async fn secret_sandboxes(
        &self,
        team_id: &str,
        name: &str,
    ) -> Result<Vec<SecretSandboxBinding>> {
        let secret = self.store.secret_by_name(team_id, name).await?;
        let sandboxes = self.store.sandboxes_bound_to(team_id, &secret.id).await?;
        Ok(sandboxes
            .iter()
            .flat_map(|s| {
                s.bound_secrets()
                    .filter(|b| b.secret_id.as_deref() == Some(secret.id.as_str()))
                    .map(|b| SecretSandboxBinding {
                        sandbox_id: s.id.clone(),
                        sandbox_name: s.name.clone(),
                        env_key: b.env_key.clone(),
                        status: s.status,
                    })
            })
            .collect())
    }

    fn audit_file(&self, secret_id: &str) -> std::path::PathBuf {
        self.layout
            .secret_audit_dir()
            .join(format!("{secret_id}.log"))
    }

    /// Requests made with a secret, newest first, across its sandboxes (the egress
    /// proxy's audit log of it, with the sandboxes' names).
    pub async fn secret_audit(
        &self,
        team_id: &str,
        name: &str,
        q: &AuditQuery,
    ) -> Result<Vec<ProxyAuditEvent>> {
        let secret = self.store.secret_by_name(team_id, name).await?;
        let file = self.audit_file(&secret.id);
        let mut text = Vec::new();
        // The rotated-out half first: older lines come first.
        for path in [file.with_extension("log.1"), file] {
            match tokio::fs::read(&path).await {
                Ok(t) => text.extend_from_slice(&t),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(EngineError::io("reading", &path)(e)),
            }
        }
        let mut events: Vec<ProxyAuditEvent> = text
            .split(|b| *b == b'\n')
            .filter_map(|l| serde_json::from_slice(l).ok())
            .filter(|e: &ProxyAuditEvent| q.matches(e))
            .collect();
        events.reverse();
        events.truncate(q.limit);
        let mut names: HashMap<String, Option<String>> = HashMap::new();
        for e in &mut events {
            if !names.contains_key(&e.sandbox_id) {
                let name = match self.store.sandbox_by_id(team_id, &e.sandbox_id).await {
                    Ok(s) if s.status != SandboxStatus::Deleted => Some(s.name),
                    _ => None,
                };
                names.insert(e.sandbox_id.clone(), name);
            }
            e.sandbox_name = names[&e.sandbox_id].clone();
        }
        Ok(events)
    }

    /// The stand-ins for a create's `secrets` (variable -> secret name), each shaped
    /// like its provider's keys.
    pub(crate) async fn new_bindings(
        &self,
        team_id: &str,
        secrets: &BTreeMap<String, String>,
    ) -> Result<Vec<NewBinding>> {
        let mut out = Vec::new();
        for (env_key, name) in secrets {
            let secret = self.store.secret_by_name(team_id, name).await?;
            out.push(NewBinding {
                env_key: env_key.clone(),
                secret_name: name.clone(),
                stand_in: new_stand_in(&shape(secret.provider.as_deref())),
            });
        }
        Ok(out)
    }

    /// Binds a secret to a sandbox under a variable (`POST /sandboxes/{id}/secrets`):
    /// processes started from now on see the stand-in; a paused sandbox gets it on
    /// resume.
    pub async fn attach_secret(
        &self,
        team_id: &str,
        sandbox_id: &str,
        req: &AttachSecret,
    ) -> Result<()> {
        kiln_api::secrets::check_env_key(&req.env_key)?;
        let sandbox = self.store.sandbox_by_id(team_id, sandbox_id).await?;
        if sandbox.env.contains_key(&req.env_key) {
            return Err(kiln_api::RequestError::invalid(format!(
                "env_key: {} is one of the sandbox's env_vars",
                req.env_key
            ))
            .into());
        }
        let mut new = self
            .new_bindings(
                team_id,
                &BTreeMap::from([(req.env_key.clone(), req.secret_name.clone())]),
            )
            .await?;
        let sandbox = self
            .store
            .bind_secret(team_id, sandbox_id, &new.remove(0))
            .await?;
        self.write_bindings(&sandbox).await?;
        self.apply_secret_env_if_running(team_id, &sandbox).await
    }

    /// Removes a binding (`DELETE /sandboxes/{id}/secrets/{env}`): its stand-in is refused
    /// from the next request on, and new processes no longer see the variable.
    pub async fn detach_secret(
        &self,
        team_id: &str,
        sandbox_id: &str,
        env_key: &str,
    ) -> Result<()> {
        let sandbox = self
            .store
            .unbind_secret(team_id, sandbox_id, env_key)
            .await?;
        self.write_bindings(&sandbox).await?;
        self.apply_secret_env_if_running(team_id, &sandbox).await
    }

    /// For a fork (a sandbox restored from `parent`'s snapshot): copies the parent's
    /// bindings with stand-ins of the fork's own (the fork's own bindings win) and writes
    /// the fork's bindings file. Called at create, before the fork's VM makes a connection;
    /// [`Engine::apply_secret_env`] follows once the fork's agent answers (its memory
    /// holds the parent's stand-ins, which the fork's proxy does not know).
    pub(crate) async fn copy_secret_bindings(
        &self,
        team_id: &str,
        parent_id: &str,
        fork_id: &str,
    ) -> Result<Sandbox> {
        let parent = self.store.sandbox_by_id(team_id, parent_id).await?;
        let own = self.store.sandbox_by_id(team_id, fork_id).await?.secrets;
        // The fork's own bindings (its create request's `secrets`) win over the parent's.
        let mut bindings: Vec<SecretBinding> = parent
            .secrets
            .iter()
            .filter(|b| b.state != BindingState::Detached)
            .filter(|b| !own.iter().any(|o| o.env_key == b.env_key))
            .map(|b| SecretBinding {
                stand_in: new_stand_in(&shape(b.provider.as_deref())),
                ..b.clone()
            })
            .collect();
        bindings.extend(own);
        let fork = self
            .store
            .replace_bindings(team_id, fork_id, &bindings)
            .await?;
        self.write_bindings(&fork).await?;
        Ok(fork)
    }

    async fn apply_secret_env_if_running(&self, team_id: &str, sandbox: &Sandbox) -> Result<()> {
        let agent = match self.live.agent(&sandbox.id) {
            Some(a) => a,
            None if sandbox.status == SandboxStatus::Active => {
                match self.connect_agent(team_id, &sandbox.id).await {
                    Ok(a) => a,
                    // No VM behind it here: the next restore applies the bindings.
                    Err(_) => return Ok(()),
                }
            }
            None => return Ok(()),
        };
        self.apply_secret_env(sandbox, &agent).await
    }

    /// Makes the agent's environment defaults hold the sandbox's live stand-ins and none
    /// of its revoked or detached ones (after a restore, an attach or a detach).
    pub(crate) async fn apply_secret_env(
        &self,
        sandbox: &Sandbox,
        agent: &AgentClient,
    ) -> Result<()> {
        if sandbox.secrets.is_empty() {
            return Ok(());
        }
        let mut defaults = agent.get_defaults().await.map_err(EngineError::Agent)?;
        let before = defaults.env.clone();
        for b in &sandbox.secrets {
            if b.state == BindingState::Bound {
                defaults.env.insert(b.env_key.clone(), b.stand_in.clone());
            } else if defaults.env.get(&b.env_key) == Some(&b.stand_in) {
                defaults.env.remove(&b.env_key);
            }
        }
        if defaults.env != before {
            agent
                .set_defaults(defaults)
                .await
                .map_err(EngineError::Agent)?;
        }
        Ok(())
    }

    /// Writes a sandbox's bindings file (or removes it when it has none): what the egress
    /// proxy reads for every request.
    pub(crate) async fn write_bindings(&self, sandbox: &Sandbox) -> Result<()> {
        let dir = self.layout.sandbox_dir(&sandbox.id)?;
        let path = dir.join(SECRETS_FILE);
        if sandbox.secrets.is_empty() {
            return match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    Err(EngineError::io("removing", &path)(e))
                }
                _ => Ok(()),
            };
        }
        let sealed: HashMap<String, String> = self
            .store
            .list_secrets(&sandbox.team_id)
            .await?
            .into_iter()
            .map(|s| (s.id, s.sealed))
            .collect();
        let file = SandboxSecrets {
            sandbox_id: sandbox.id.clone(),
            bindings: sandbox
                .secrets
                .iter()
                .map(|b| kiln_net::secrets::Binding {
                    env_key: b.env_key.clone(),
                    stand_in: b.stand_in.clone(),
                    secret_id: b.secret_id.clone(),
                    hosts: b.hosts.clone(),
                    auth: b.auth.clone(),
                    sealed: match (b.state, &b.secret_id) {
                        (BindingState::Bound, Some(id)) => sealed.get(id).cloned(),
                        _ => None,
                    },
                })
                .collect(),
        };
        std::fs::create_dir_all(&dir).map_err(EngineError::io("creating", &dir))?;
        let json = serde_json::to_vec_pretty(&file).expect("bindings serialize");
        write_private(&path, &json)?;
        Ok(())
    }

    /// Re-seals every secret under a new key, then drops the old one: a rotation of the
    /// secrets key, online (values open under either key until the old one goes).
    /// Returns how many secrets were re-sealed.
    pub async fn rotate_secrets_key(&self) -> Result<usize> {
        let mut ring = self.keyring()?;
        ring.add_key()?;
        let secrets = self.store.all_secrets().await?;
        let mut teams = std::collections::BTreeSet::new();
        for s in &secrets {
            self.store
                .reseal_secret(
                    &s.team_id,
                    &s.name,
                    &|row| {
                        let value = ring.open(&row.sealed, &row.id).map_err(corrupt)?;
                        Ok(ring.seal(&value, &row.id))
                    },
                    false,
                )
                .await?;
            teams.insert(s.team_id.clone());
        }
        for team in &teams {
            for s in self.store.list_secrets(team).await? {
                for sandbox in self.store.sandboxes_bound_to(team, &s.id).await? {
                    self.write_bindings(&sandbox).await?;
                }
            }
        }
        ring.retire_old()?;
        tracing::info!(key = %ring.current_id(), secrets = secrets.len(), "secrets key rotated");
        Ok(secrets.len())
    }

    /// Installs the current trust bundle in a guest restored from `artifact` when the
    /// artifact records another one (a template built before the CA or the operator's
    /// bundle changed); returns the environment defaults that point at it. A failure is
    /// logged, not fatal: the sandbox works, TLS through kiln's CA does not.
    pub(crate) async fn refresh_trust(
        &self,
        artifact: &Path,
        agent: &AgentClient,
    ) -> Vec<(String, String)> {
        let trust = &self.egress.trust;
        match kiln_store::ArtifactManifest::read(artifact) {
            Ok(m) if m.trust.as_deref() == Some(trust.digest()) => return Vec::new(),
            Ok(_) => {}
            // No manifest, no artifact: nothing to compare with.
            Err(_) => return Vec::new(),
        }
        match trust.install(agent).await {
            Ok(vars) => {
                tracing::info!("installed the current trust bundle in the guest");
                vars
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not install the trust bundle in the guest");
                Vec::new()
            }
        }
    }

    /// A secret as the API shows it: never its value; last used is when the proxy last
    /// wrote to its audit.
    pub(crate) fn secret_info(&self, s: &Secret) -> SecretInfo {
        let last_used_at = std::fs::metadata(self.audit_file(&s.id))
            .and_then(|m| m.modified())
            .ok()
            .map(chrono::DateTime::<chrono::Utc>::from);
        SecretInfo {
            id: s.id.clone(),
            name: s.name.clone(),
            auth_type: s.auth.auth_type(),
            auth_config: s.auth.config(),
            provider_shortcut: s.provider.clone(),
            hosts: s.hosts.iter().map(ToString::to_string).collect(),
            created_at: s.created_at,
            updated_at: s.updated_at,
            last_used_at,
        }
    }
}
