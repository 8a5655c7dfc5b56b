//! kiln's egress CA: the certificate authority every guest trusts, so that the egress
//! proxy can terminate TLS for the hosts a secret is bound to (and only those).
//!
//! Generated on first start (ECDSA P-256; the certificate `egress-ca.pem`, its key
//! `egress-ca.key` mode 0600). Leaf certificates are issued per host, valid [`LEAF_DAYS`]
//! days; the proxy, one long-lived process per VM, keeps them in memory (see
//! `crate::proxy`), under the CA's fingerprint, so a new CA never serves an old CA's
//! leaves.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SerialNumber,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sha2::{Digest as _, Sha256};

use crate::seal::{random, write_private, SealError};

/// The CA certificate's file name in its directory.
pub const CA_CERT: &str = "egress-ca.pem";
/// The CA key's file name in its directory.
pub const CA_KEY: &str = "egress-ca.key";
/// How long a leaf certificate is valid.
pub const LEAF_DAYS: i64 = 90;
/// A cached leaf older than this is issued again (well before it expires).
pub const LEAF_REISSUE: Duration = Duration::from_secs(60 * 24 * 3600);
/// How long the CA is valid.
const CA_YEARS: i32 = 10;

/// Why the CA could not be used.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A file could not be written privately.
    #[error(transparent)]
    Write(#[from] SealError),
    /// A certificate or key could not be made or read.
    #[error("certificate: {0}")]
    Cert(#[from] rcgen::Error),
    /// A file holds no certificate.
    #[error("{0}: no PEM certificate in it")]
    NoCert(PathBuf),
}

/// The egress CA, able to issue leaf certificates.
pub struct EgressCa {
    dir: PathBuf,
    cert_pem: String,
    /// A certificate with the CA's name and key, to sign with (rcgen signs with the
    /// issuer's name and key only; the stored certificate is what guests trust).
    issuer: Certificate,
    key: KeyPair,
}

impl std::fmt::Debug for EgressCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EgressCa")
            .field("dir", &self.dir)
            .field("fingerprint", &self.fingerprint())
            .finish_non_exhaustive()
    }
}

/// The CA's name: fixed, since signing reconstructs the issuer from it and the key.
fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "kiln");
    dn.push(DnType::CommonName, "kiln egress CA");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

/// A random positive serial number.
fn serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    random(&mut bytes);
    bytes[0] &= 0x7f;
    SerialNumber::from_slice(&bytes)
}

/// Valid from yesterday (clocks differ) to `days` from today.
fn validity(params: &mut CertificateParams, days: i64) {
    use chrono::Datelike as _;
    let day = |offset: i64| {
        let d = (chrono::Utc::now() + chrono::TimeDelta::days(offset)).date_naive();
        rcgen::date_time_ymd(d.year(), d.month() as u8, d.day() as u8)
    };
    params.not_before = day(-1);
    params.not_after = day(days);
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CaError + '_ {
    move |source| CaError::Io {
        path: path.to_owned(),
        source,
    }
}

impl EgressCa {
    /// Loads the CA of `dir`.
    pub fn load(dir: &Path) -> Result<Self, CaError> {
        let cert_path = dir.join(CA_CERT);
        let key_path = dir.join(CA_KEY);
        let cert_pem = std::fs::read_to_string(&cert_path).map_err(io(&cert_path))?;
        let key_pem = std::fs::read_to_string(&key_path).map_err(io(&key_path))?;
        let mut ca = Self::from_pem(cert_pem, &key_pem)?;
        ca.dir = dir.to_owned();
        Ok(ca)
    }

    /// The CA from its certificate and key (what the jailed proxy is given, by content).
    pub fn from_pem(cert_pem: String, key_pem: &str) -> Result<Self, CaError> {
        let key = KeyPair::from_pem(key_pem)?;
        let issuer = ca_params().self_signed(&key)?;
        Ok(Self {
            dir: PathBuf::new(),
            cert_pem,
            issuer,
            key,
        })
    }

    /// Loads the CA of `dir`, generating it on first use.
    pub fn load_or_create(dir: &Path) -> Result<Self, CaError> {
        if dir.join(CA_CERT).is_file() && dir.join(CA_KEY).is_file() {
            return Self::load(dir);
        }
        let key = KeyPair::generate()?;
        let mut params = ca_params();
        params.serial_number = Some(serial());
        validity(&mut params, i64::from(CA_YEARS) * 365);
        let cert = params.self_signed(&key)?;
        // The key first: a certificate without its key would be loaded and fail.
        write_private(&dir.join(CA_KEY), key.serialize_pem().as_bytes())?;
        write_private(&dir.join(CA_CERT), cert.pem().as_bytes())?;
        let cert_path = dir.join(CA_CERT);
        std::fs::set_permissions(
            &cert_path,
            std::os::unix::fs::PermissionsExt::from_mode(0o644),
        )
        .map_err(io(&cert_path))?;
        Self::load(dir)
    }

    /// The CA certificate, PEM: what guests add to their trust store.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate's file (of a CA loaded from its directory).
    pub fn cert_path(&self) -> PathBuf {
        self.dir.join(CA_CERT)
    }

    /// sha256 of the CA certificate's PEM, hex: keys the proxy's leaf cache.
    pub fn fingerprint(&self) -> String {
        hex::encode(Sha256::digest(self.cert_pem.as_bytes()))
    }

    /// A new certificate for `host` (a DNS name or an IP address) signed by the CA, and
    /// its key.
    pub fn leaf(
        &self,
        host: &str,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), CaError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec![host.to_owned()])?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, host);
        params.distinguished_name = dn;
        params.serial_number = Some(serial());
        validity(&mut params, LEAF_DAYS);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer, &self.key)?;
        Ok((
            vec![cert.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        ))
    }
}

/// Every certificate of a PEM bundle (an operator's CA file).
pub fn read_pem_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, CaError> {
    let bytes = std::fs::read(path).map_err(io(path))?;
    let certs = parse_pem_certs(&bytes);
    if certs.is_empty() {
        return Err(CaError::NoCert(path.to_owned()));
    }
    Ok(certs)
}

/// Every certificate of a PEM bundle's content (none when it holds none).
pub fn parse_pem_certs(bytes: &[u8]) -> Vec<CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject as _;
    CertificateDer::pem_slice_iter(bytes)
        .filter_map(Result::ok)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ca_is_made_once_with_a_private_key_and_signs_leaves() {
        use rustls::client::danger::ServerCertVerifier as _;
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let ca = EgressCa::load_or_create(dir.path()).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir.path().join(CA_KEY)), 0o600);
        assert_eq!(mode(&dir.path().join(CA_CERT)), 0o644);
        assert!(ca.cert_pem().starts_with("-----BEGIN CERTIFICATE-----"));
        let again = EgressCa::load_or_create(dir.path()).unwrap();
        assert_eq!(again.fingerprint(), ca.fingerprint());

        // A leaf verifies against the CA for its name (and an address for an IP).
        let roots = {
            let mut r = rustls::RootCertStore::empty();
            r.add_parsable_certificates(read_pem_certs(&ca.cert_path()).unwrap());
            std::sync::Arc::new(r)
        };
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let verifier =
            rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
                .build()
                .unwrap();
        for host in ["api.example.com", "127.0.0.1"] {
            let (chain, _) = ca.leaf(host).unwrap();
            let name = rustls::pki_types::ServerName::try_from(host.to_owned()).unwrap();
            verifier
                .verify_server_cert(
                    &chain[0],
                    &[],
                    &name,
                    &[],
                    rustls::pki_types::UnixTime::now(),
                )
                .unwrap_or_else(|e| panic!("{host}: {e}"));
            // ... and not for another name.
            let other = rustls::pki_types::ServerName::try_from("other.example.com").unwrap();
            assert!(verifier
                .verify_server_cert(
                    &chain[0],
                    &[],
                    &other,
                    &[],
                    rustls::pki_types::UnixTime::now()
                )
                .is_err());
        }
        // Given by content, as the jailed proxy gets it, it is the same CA.
        let key_pem = std::fs::read_to_string(dir.path().join(CA_KEY)).unwrap();
        let given = EgressCa::from_pem(ca.cert_pem().to_owned(), &key_pem).unwrap();
        assert_eq!(given.fingerprint(), ca.fingerprint());
    }

    #[test]
    fn a_bundle_without_certificates_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.pem");
        std::fs::write(&path, "nothing here").unwrap();
        assert!(matches!(read_pem_certs(&path), Err(CaError::NoCert(_))));
    }
}
