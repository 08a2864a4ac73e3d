//! The INSECURE software backend: KEKs wrapped with AES-256-GCM under a 32-byte root key
//! read from a file. For development and CI. Whoever reads the root key file and the key
//! store decrypts every secret in etcd; that is why its name says so and `serve` warns.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use zeroize::Zeroizing;

use super::{BackendError, BackendIdentity, BackendKind, KeyBackend, SealedKek};
use crate::keyid::{KeyId, hex};
use crate::secret::{KEK_LEN, Kek};

const SEAL_DOMAIN: &[u8] = b"edgeseal/insecure-software-seal/v1\0";
const NONCE_LEN: usize = 12;

/// The root key file name used when none is configured.
pub const DEFAULT_ROOT_KEY_FILE: &str = "insecure-software-root.key";

pub struct SoftwareBackend {
    root: Aes256Gcm,
    fingerprint: String,
}

impl SoftwareBackend {
    /// Opens the root key at `path`, refusing one that others can read.
    pub fn open(path: &Path) -> Result<Self, BackendError> {
        let io = |op, source| BackendError::Io {
            op,
            path: path.to_owned(),
            source,
        };
        let meta = fs::metadata(path).map_err(|e| io("reading root key file", e))?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(BackendError::RootKeyPermissions {
                path: path.to_owned(),
                mode,
            });
        }
        let bytes = Zeroizing::new(fs::read(path).map_err(|e| io("reading root key file", e))?);
        if bytes.len() != KEK_LEN {
            return Err(BackendError::RootKeyLength {
                path: path.to_owned(),
                len: bytes.len(),
            });
        }
        Ok(Self::from_root(&bytes))
    }

    /// Creates a new random root key file (mode 0600) if none exists, then opens it.
    pub fn create_or_open(path: &Path) -> Result<Self, BackendError> {
        if !path.exists() {
            let io = |op, source| BackendError::Io {
                op,
                path: path.to_owned(),
                source,
            };
            let mut root = Zeroizing::new([0u8; KEK_LEN]);
            getrandom::fill(root.as_mut()).map_err(|e| BackendError::Random(e.to_string()))?;
            if let Some(dir) = path.parent() {
                // Usually the key store itself: private to the plugin's user.
                fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(dir)
                    .map_err(|e| io("creating directory for", e))?;
            }
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(|e| io("creating root key file", e))?;
            f.write_all(root.as_ref())
                .map_err(|e| io("writing root key file", e))?;
            f.sync_all().map_err(|e| io("syncing root key file", e))?;
            if let Some(dir) = path.parent() {
                fs::File::open(dir)
                    .and_then(|d| d.sync_all())
                    .map_err(|e| io("syncing directory of", e))?;
            }
        }
        Self::open(path)
    }

    fn from_root(root: &[u8]) -> Self {
        // Public check value of the root key, so a store opened with another root key
        // is reported as such. One-way: reveals nothing about the key.
        let fingerprint = match <Hmac<Sha256> as Mac>::new_from_slice(root) {
            Ok(mut mac) => {
                mac.update(b"edgeseal/insecure-software-root-id");
                hex(&mac.finalize().into_bytes()[..8])
            }
            // HMAC accepts keys of any length.
            Err(_) => String::from("unknown"),
        };
        Self {
            root: Aes256Gcm::new(root.into()),
            fingerprint,
        }
    }

    /// Where the root key lives when the operator names none.
    pub fn default_root_key_path(key_store: &Path) -> PathBuf {
        key_store.join(DEFAULT_ROOT_KEY_FILE)
    }

    fn aad(key_id: &KeyId) -> Vec<u8> {
        [SEAL_DOMAIN, key_id.as_str().as_bytes()].concat()
    }
}

impl KeyBackend for SoftwareBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::InsecureSoftware
    }

    fn identity(&self) -> Result<BackendIdentity, BackendError> {
        Ok(BackendIdentity {
            kind: BackendKind::InsecureSoftware,
            fingerprint: format!("root-key:{}", self.fingerprint),
        })
    }

    fn seal(&self, key_id: &KeyId, kek: &Kek) -> Result<SealedKek, BackendError> {
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce).map_err(|e| BackendError::Random(e.to_string()))?;
        let aad = Self::aad(key_id);
        let wrapped = self
            .root
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: kek.expose(),
                    aad: &aad,
                },
            )
            .map_err(|_| BackendError::Unseal {
                key_id: key_id.clone(),
                reason: "AES-GCM refused to wrap a 32-byte key".into(),
            })?;
        Ok(SealedKek([nonce.as_slice(), &wrapped].concat()))
    }

    fn unseal(&self, key_id: &KeyId, sealed: &SealedKek) -> Result<Kek, BackendError> {
        let fail = |reason: &str| BackendError::Unseal {
            key_id: key_id.clone(),
            reason: reason.into(),
        };
        if sealed.0.len() != NONCE_LEN + KEK_LEN + 16 {
            return Err(fail(
                "the sealed blob has the wrong length: the key store is damaged",
            ));
        }
        let (nonce, wrapped) = sealed.0.split_at(NONCE_LEN);
        let aad = Self::aad(key_id);
        let kek = Zeroizing::new(
            self.root
                .decrypt(Nonce::from_slice(nonce), Payload { msg: wrapped, aad: &aad })
                .map_err(|_| {
                    fail("authentication failed: wrong root key, or the blob was altered or moved to another key id")
                })?,
        );
        Kek::from_slice(&kek).ok_or_else(|| fail("unsealed key has the wrong length"))
    }

    fn health(&self) -> Result<(), BackendError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_round_trip_and_binding() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("root.key");
        let b = SoftwareBackend::create_or_open(&path).unwrap();
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let id = KeyId::parse("kek-1").unwrap();
        let kek = Kek::generate().unwrap();
        let sealed = b.seal(&id, &kek).unwrap();
        // A fresh backend from the same file unseals it.
        let b2 = SoftwareBackend::open(&path).unwrap();
        assert_eq!(b2.unseal(&id, &sealed).unwrap().expose(), kek.expose());
        // Bound to the key id.
        let other = KeyId::parse("kek-2").unwrap();
        assert!(b2.unseal(&other, &sealed).is_err());
        // Another root key fails, and is told apart by its identity.
        let b3 = SoftwareBackend::create_or_open(&dir.path().join("other.key")).unwrap();
        assert!(b3.unseal(&id, &sealed).is_err());
        assert!(b3.verify_identity(&b.identity().unwrap()).is_err());
        b2.verify_identity(&b.identity().unwrap()).unwrap();
    }

    #[test]
    fn refuses_world_readable_root_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("root.key");
        SoftwareBackend::create_or_open(&path).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let err = SoftwareBackend::open(&path).err().unwrap();
        assert!(err.to_string().contains("chmod 600"), "{err}");
    }
}
