//! Secret values at rest: AES-256-GCM under a key kiln generates on first start.
//!
//! The key file (mode 0600, `KILN_SECRETS_KEY` or `<state>/keys/secrets.key`) holds one
//! key per line, newest first: values are sealed with the newest and opened with
//! whichever key sealed them, so rotation is online (add a key, re-seal everything, drop
//! the old one; see [`KeyRing::add_key`] and [`KeyRing::retire_old`]). A sealed value is
//! `v1.<key id>.<nonce>.<ciphertext>` (base64), bound to the id of the secret it belongs
//! to as additional data, so a sealed value copied onto another secret does not open.

use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD_NO_PAD as B64;
use base64::Engine as _;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom as _, SystemRandom};
use sha2::{Digest as _, Sha256};

/// The first word of every line of a key file.
const KEY_LINE: &str = "kiln-secrets-key-v1";
/// The first field of a sealed value.
const SEALED_VERSION: &str = "v1";

/// Why a key or a sealed value could not be used.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    /// The key file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The key file is not one kiln wrote.
    #[error("{0}: not a kiln secrets key file")]
    BadKeyFile(PathBuf),
    /// The key file gives others access.
    #[error("{0}: readable by others (mode {1:o}); it must be 0600")]
    Exposed(PathBuf, u32),
    /// A sealed value is malformed.
    #[error("a sealed value is malformed")]
    Malformed,
    /// A sealed value was sealed with a key that is not in the key file.
    #[error("a sealed value needs key {0}, which the key file does not hold")]
    UnknownKey(String),
    /// A sealed value does not open (tampered with, or moved to another secret).
    #[error("a sealed value does not open")]
    Tampered,
}

/// The secrets key file's keys, newest first.
#[derive(Debug)]
pub struct KeyRing {
    path: PathBuf,
    keys: Vec<Key>,
}

struct Key {
    id: String,
    raw: [u8; 32],
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Key({})", self.id)
    }
}

impl Key {
    fn new(raw: [u8; 32]) -> Self {
        let id = hex::encode(&Sha256::digest(raw)[..8]);
        Self { id, raw }
    }

    fn generate() -> Self {
        let mut raw = [0u8; 32];
        random(&mut raw);
        Self::new(raw)
    }

    fn aead(&self) -> LessSafeKey {
        LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &self.raw).expect("a 32-byte AES key"))
    }
}

/// Fills `buf` from the system's CSPRNG.
pub fn random(buf: &mut [u8]) {
    SystemRandom::new()
        .fill(buf)
        .expect("the system random number generator failed");
}

impl KeyRing {
    /// Reads the key file.
    pub fn load(path: &Path) -> Result<Self, SealError> {
        let io = |source| SealError::Io {
            path: path.to_owned(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(io)?;
        let mode = std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777;
        if mode & 0o077 != 0 {
            return Err(SealError::Exposed(path.to_owned(), mode));
        }
        let text = std::fs::read_to_string(path).map_err(io)?;
        Self::parse(path, &text)
    }

    /// A key file's content, as the jailed egress proxy is given it (it never opens the
    /// file: see `crate::broker`). Only opens values; a ring made this way is not saved.
    pub fn from_text(text: &str) -> Result<Self, SealError> {
        Self::parse(Path::new("secrets key"), text)
    }

    fn parse(path: &Path, text: &str) -> Result<Self, SealError> {
        let mut keys = Vec::new();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let raw = line
                .strip_prefix(KEY_LINE)
                .map(str::trim)
                .and_then(|b| B64.decode(b).ok())
                .and_then(|b| <[u8; 32]>::try_from(b).ok())
                .ok_or_else(|| SealError::BadKeyFile(path.to_owned()))?;
            keys.push(Key::new(raw));
        }
        if keys.is_empty() {
            return Err(SealError::BadKeyFile(path.to_owned()));
        }
        Ok(Self {
            path: path.to_owned(),
            keys,
        })
    }

    /// Reads the key file, creating it with a fresh key (mode 0600, its directory 0700)
    /// when there is none.
    pub fn load_or_create(path: &Path) -> Result<Self, SealError> {
        match Self::load(path) {
            Err(SealError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                let ring = Self {
                    path: path.to_owned(),
                    keys: vec![Key::generate()],
                };
                // Another process may create it at the same moment: whoever renames last
                // wins, so read back what is there rather than trust our own copy.
                ring.save()?;
                Self::load(path)
            }
            other => other,
        }
    }

    /// The id of the key new values are sealed with.
    pub fn current_id(&self) -> &str {
        &self.keys[0].id
    }

    /// Seals `plaintext` with the newest key, bound to `context` (the secret's id).
    pub fn seal(&self, plaintext: &[u8], context: &str) -> String {
        let key = &self.keys[0];
        let mut nonce = [0u8; NONCE_LEN];
        random(&mut nonce);
        let mut data = plaintext.to_vec();
        key.aead()
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(context.as_bytes()),
                &mut data,
            )
            .expect("sealing fits in memory");
        format!(
            "{SEALED_VERSION}.{}.{}.{}",
            key.id,
            B64.encode(nonce),
            B64.encode(&data)
        )
    }

    /// Opens a value [`KeyRing::seal`] sealed for `context`.
    pub fn open(&self, sealed: &str, context: &str) -> Result<Vec<u8>, SealError> {
        let mut parts = sealed.split('.');
        let (Some(SEALED_VERSION), Some(id), Some(nonce), Some(data), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(SealError::Malformed);
        };
        let key = self
            .keys
            .iter()
            .find(|k| k.id == id)
            .ok_or_else(|| SealError::UnknownKey(id.to_owned()))?;
        let nonce = B64
            .decode(nonce)
            .ok()
            .and_then(|n| <[u8; NONCE_LEN]>::try_from(n).ok())
            .ok_or(SealError::Malformed)?;
        let mut data = B64.decode(data).map_err(|_| SealError::Malformed)?;
        let plain = key
            .aead()
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(context.as_bytes()),
                &mut data,
            )
            .map_err(|_| SealError::Tampered)?;
        Ok(plain.to_vec())
    }

    /// Whether `sealed` was sealed with the newest key.
    pub fn is_current(&self, sealed: &str) -> bool {
        sealed
            .split('.')
            .nth(1)
            .is_some_and(|id| id == self.current_id())
    }

    /// Step one of a rotation: a fresh key goes first in the file (the old ones stay, so
    /// every value still opens). Returns the new key's id.
    pub fn add_key(&mut self) -> Result<String, SealError> {
        self.keys.insert(0, Key::generate());
        self.save()?;
        Ok(self.current_id().to_owned())
    }

    /// Last step of a rotation, once every value is sealed with the newest key: the older
    /// keys leave the file.
    pub fn retire_old(&mut self) -> Result<(), SealError> {
        self.keys.truncate(1);
        self.save()
    }

    fn save(&self) -> Result<(), SealError> {
        let mut text = String::new();
        for k in &self.keys {
            text.push_str(&format!("{KEY_LINE} {}\n", B64.encode(k.raw)));
        }
        write_private(&self.path, text.as_bytes())
    }
}

/// Writes a file only its owner may read (mode 0600, its directory created 0700), through
/// a temporary name and a rename, so readers see the old content or the new, never half.
pub fn write_private(path: &Path, data: &[u8]) -> Result<(), SealError> {
    let io = |source| SealError::Io {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(io)?;
        }
    }
    let mut suffix = [0u8; 6];
    random(&mut suffix);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.{}", hex::encode(suffix)));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn a_new_key_file_is_private_and_seals_what_it_opens() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys/secrets.key");
        let ring = KeyRing::load_or_create(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let dir_mode = std::fs::metadata(path.parent().unwrap())
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(dir_mode, 0o700);

        let sealed = ring.seal(b"sk-live-value", "secret-1");
        assert!(!sealed.contains("sk-live-value"));
        assert_eq!(ring.open(&sealed, "secret-1").unwrap(), b"sk-live-value");
        // Sealing twice gives two different texts (a fresh nonce each time).
        assert_ne!(ring.seal(b"sk-live-value", "secret-1"), sealed);
        // Bound to its secret: the same text does not open for another one.
        assert!(matches!(
            ring.open(&sealed, "secret-2"),
            Err(SealError::Tampered)
        ));
        // A flipped byte does not open.
        let mut bytes = sealed.clone().into_bytes();
        let last = bytes.len() - 2;
        bytes[last] = if bytes[last] == b'A' { b'B' } else { b'A' };
        let flipped = String::from_utf8(bytes).unwrap();
        assert!(ring.open(&flipped, "secret-1").is_err());
        assert!(matches!(
            ring.open("nonsense", "x"),
            Err(SealError::Malformed)
        ));

        // The same file is the same key on the next start.
        let again = KeyRing::load_or_create(&path).unwrap();
        assert_eq!(again.current_id(), ring.current_id());
        assert_eq!(again.open(&sealed, "secret-1").unwrap(), b"sk-live-value");
    }

    #[test]
    fn a_key_file_others_can_read_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secrets.key");
        KeyRing::load_or_create(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(KeyRing::load(&path), Err(SealError::Exposed(..))));
        std::fs::write(&path, "not a key\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(
            KeyRing::load(&path),
            Err(SealError::BadKeyFile(_))
        ));
    }

    #[test]
    fn rotation_keeps_every_value_open_until_the_old_key_is_retired() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secrets.key");
        let mut ring = KeyRing::load_or_create(&path).unwrap();
        let old = ring.seal(b"v", "s");
        let old_id = ring.current_id().to_owned();
        let new_id = ring.add_key().unwrap();
        assert_ne!(new_id, old_id);
        // Another reader (the proxy) of the file opens both.
        let reader = KeyRing::load(&path).unwrap();
        assert_eq!(reader.open(&old, "s").unwrap(), b"v");
        assert!(!reader.is_current(&old));
        let resealed = reader.seal(&reader.open(&old, "s").unwrap(), "s");
        assert!(reader.is_current(&resealed));
        ring.retire_old().unwrap();
        let reader = KeyRing::load(&path).unwrap();
        assert_eq!(reader.open(&resealed, "s").unwrap(), b"v");
        assert!(matches!(
            reader.open(&old, "s"),
            Err(SealError::UnknownKey(id)) if id == old_id
        ));
    }
}
