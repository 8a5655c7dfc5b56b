//! What every guest trusts besides its own roots: kiln's egress CA (so that requests to a
//! secret's hosts, which the egress proxy opens up, verify) and the operator's bundle
//! (`KILN_GUEST_TRUST_CA`, e.g. the CA of a network that intercepts TLS).
//!
//! Installed through the agent's file calls, which every agent has, so a sandbox of a
//! template built before the bundle changed gets it at restore too: the certificates go
//! to `/usr/local/share/ca-certificates/kiln.crt` (which `update-ca-certificates` keeps),
//! into the system bundle between markers (replaced on the next install, not appended
//! twice), and processes find them through `SSL_CERT_FILE`, `REQUESTS_CA_BUNDLE`,
//! `PIP_CERT` (the whole bundle) and `NODE_EXTRA_CA_CERTS` (kiln's file: Node adds it to
//! its own roots), set as defaults that an image, a step or a request may override.

use kiln_agent_proto::{AgentClient, ClientError, ErrorCode};
use sha2::{Digest as _, Sha256};

/// kiln's certificates in the guest.
pub const GUEST_CA_FILE: &str = "/usr/local/share/ca-certificates/kiln.crt";
/// System bundles, in the order they are looked for (Debian and Ubuntu, Fedora and RHEL,
/// SUSE, others); the first that exists gets kiln's block. None existing, the first is
/// created.
const SYSTEM_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
];
const BEGIN: &str = "# kiln trust: begin (kiln's egress CA and the operator's certificates)\n";
const END: &str = "# kiln trust: end\n";

/// A PEM bundle every guest trusts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestTrust {
    pem: String,
    digest: String,
}

impl GuestTrust {
    /// A bundle from PEM certificates (kiln's CA first, then the operator's).
    pub fn new(pem: impl Into<String>) -> Self {
        let mut pem = pem.into();
        if !pem.ends_with('\n') {
            pem.push('\n');
        }
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(pem.as_bytes())));
        Self { pem, digest }
    }

    /// The bundle.
    pub fn pem(&self) -> &str {
        &self.pem
    }

    /// `sha256:<hex>` of the bundle: what an artifact records as installed, so a restore
    /// knows whether its guest has the current one.
    pub fn digest(&self) -> &str {
        &self.digest
    }

    /// Writes the bundle into the guest; returns the environment defaults that point
    /// processes at it.
    pub async fn install(&self, agent: &AgentClient) -> Result<Vec<(String, String)>, ClientError> {
        agent
            .write_file(GUEST_CA_FILE, self.pem.as_bytes(), Some(0o644))
            .await?;
        let mut bundle = SYSTEM_BUNDLES[0];
        let mut current = String::new();
        for path in SYSTEM_BUNDLES {
            match agent.read_file(path).await {
                Ok(bytes) => {
                    bundle = path;
                    current = String::from_utf8_lossy(&bytes).into_owned();
                    break;
                }
                Err(ClientError::Agent {
                    code: ErrorCode::NotFound,
                    ..
                }) => continue,
                Err(e) => return Err(e),
            }
        }
        let merged = with_block(&current, &self.pem);
        agent
            .write_file(bundle, merged.as_bytes(), Some(0o644))
            .await?;
        Ok(env_for(bundle))
    }
}

/// The variables that point processes at the bundle.
pub fn env_for(bundle: &str) -> Vec<(String, String)> {
    ["SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "PIP_CERT"]
        .iter()
        .map(|k| ((*k).to_owned(), bundle.to_owned()))
        .chain([("NODE_EXTRA_CA_CERTS".to_owned(), GUEST_CA_FILE.to_owned())])
        .collect()
}

/// `bundle` with kiln's block (between its markers) replaced by `pem`.
fn with_block(bundle: &str, pem: &str) -> String {
    let mut out = match (bundle.find(BEGIN), bundle.find(END)) {
        (Some(b), Some(e)) if e > b => {
            format!("{}{}", &bundle[..b], &bundle[e + END.len()..])
        }
        _ => bundle.to_owned(),
    };
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
    out.push_str(BEGIN);
    out.push_str(pem);
    out.push_str(END);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_block_is_replaced_not_appended_twice() {
        let system = "-----BEGIN CERTIFICATE-----\nROOT\n-----END CERTIFICATE-----";
        let once = with_block(system, "A\n");
        assert!(once.starts_with(system));
        assert!(once.ends_with(&format!("{BEGIN}A\n{END}")));
        let twice = with_block(&once, "B\n");
        assert_eq!(twice.matches(BEGIN).count(), 1);
        assert!(twice.contains("B\n") && !twice.contains("A\n"));
        assert!(twice.starts_with(system));
        // No bundle at all: just kiln's.
        assert_eq!(with_block("", "A\n"), format!("{BEGIN}A\n{END}"));
    }

    #[test]
    fn every_runtime_finds_the_bundle() {
        let env = env_for("/etc/ssl/certs/ca-certificates.crt");
        let keys: Vec<&str> = env.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            [
                "SSL_CERT_FILE",
                "REQUESTS_CA_BUNDLE",
                "PIP_CERT",
                "NODE_EXTRA_CA_CERTS"
            ]
        );
        assert_eq!(env[3].1, GUEST_CA_FILE);
        let t = GuestTrust::new("PEM");
        assert_eq!(t.pem(), "PEM\n");
        assert!(t.digest().starts_with("sha256:"));
        assert_ne!(GuestTrust::new("OTHER").digest(), t.digest());
    }
}
