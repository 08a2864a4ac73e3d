//! The KMS domain core: Encrypt, Decrypt and health over the current key ring.
//! Knows nothing of gRPC; the protocol layers in `grpc/` translate.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use tokio::sync::Notify;

use crate::envelope::{self, EnvelopeError, FORMAT_V2};
use crate::keyid::{KeyId, KeyIdError};
use crate::keyring::{BudgetError, KeyRing, LoadedKek, Lookup, SOFT_ENCRYPTION_LIMIT};
use crate::secret::Plaintext;

/// The annotation every Encrypt response carries: the envelope format, so a future
/// format change is visible in etcd without decrypting anything.
pub const ANNOTATION_KEY: &str = "v1.envelope.edgeseal.io";

#[derive(Debug, thiserror::Error)]
pub enum KmsError {
    #[error(
        "no active key-encryption key is loaded; initialize the key store with \
         `kms-plugin key init` or check the plugin's log for why loading failed"
    )]
    NoActiveKey,
    #[error("key_id in the request is invalid: {0}")]
    InvalidKeyId(#[from] KeyIdError),
    #[error(
        "key_id {0:?} is not in this plugin's key ring: the data was encrypted by another \
         cluster or node whose key was never enrolled here, or the key was destroyed"
    )]
    UnknownKeyId(String),
    #[error(
        "key_id {0} is retired on this node; reinstate it with `kms-plugin key reinstate {0}` \
         to read data still encrypted under it"
    )]
    KeyRetired(KeyId),
    #[error(transparent)]
    Envelope(#[from] EnvelopeError),
    #[error("annotation {key:?}: {problem}")]
    BadAnnotation { key: String, problem: String },
    #[error(transparent)]
    Budget(#[from] BudgetError),
    #[error(
        "key {id} has used every encryption recorded in the key store, and recording more \
         failed: {reason}. Encrypt resumes by itself once the key store can be written"
    )]
    ReservationFailed { id: KeyId, reason: String },
}

/// The outcome of Encrypt.
pub struct Encrypted {
    pub ciphertext: Vec<u8>,
    pub key_id: KeyId,
}

/// The answer to Status: the current key and whether it works.
pub struct Health {
    pub key_id: Option<KeyId>,
    pub problem: Option<String>,
}

/// The plugin's state shared by every request: one swappable key ring.
pub struct Kms {
    ring: RwLock<Arc<KeyRing>>,
    reservation_wanted: Notify,
    reservation_granted: Notify,
    /// Why the keeper's last attempt to reserve encryptions in the key store failed
    /// (`None` after a success): what an Encrypt refused for lack of them reports.
    reservation_failure: Mutex<Option<String>>,
}

/// How long an Encrypt waits for the keeper to reserve more encryptions before failing.
const RESERVATION_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

impl Kms {
    pub fn new(ring: KeyRing) -> Self {
        Self {
            ring: RwLock::new(Arc::new(ring)),
            reservation_wanted: Notify::new(),
            reservation_granted: Notify::new(),
            reservation_failure: Mutex::new(None),
        }
    }

    /// The current ring (cheap: an `Arc` clone under a read lock held for nanoseconds).
    pub fn ring(&self) -> Arc<KeyRing> {
        match self.ring.read() {
            Ok(g) => Arc::clone(&g),
            // A writer never panics while holding the lock (it only swaps an Arc), but
            // if one did, the ring inside is still a whole, valid value.
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// Swaps in a new ring; requests in flight finish on the one they started with.
    pub fn install(&self, ring: KeyRing) {
        let ring = Arc::new(ring);
        match self.ring.write() {
            Ok(mut g) => *g = ring,
            Err(poisoned) => *poisoned.into_inner() = ring,
        }
    }

    /// Woken when the active key wants more encryptions reserved in the key store.
    pub fn reservation_wanted(&self) -> &Notify {
        &self.reservation_wanted
    }

    /// Signalled by the keeper after it reserved encryptions or installed a new ring.
    pub fn reservation_granted(&self) -> &Notify {
        &self.reservation_granted
    }

    /// Records the outcome of the keeper's last reservation attempt (`None`: it worked).
    pub fn set_reservation_failure(&self, failure: Option<String>) {
        *self
            .reservation_failure
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = failure;
    }

    /// Why the last reservation attempt failed, if it did.
    pub fn reservation_failure(&self) -> Option<String> {
        self.reservation_failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// A refusal for lack of reserved encryptions, with the reason the keeper could not
    /// reserve more if it tried and failed (a full or read-only key store).
    fn explain(&self, err: KmsError) -> KmsError {
        match err {
            KmsError::Budget(BudgetError::ReservationPending { id }) => {
                match self.reservation_failure() {
                    Some(reason) => KmsError::ReservationFailed { id, reason },
                    None => KmsError::Budget(BudgetError::ReservationPending { id }),
                }
            }
            e => e,
        }
    }

    /// Runs an Encrypt; if the active key is waiting for its next counter reservation (a
    /// burst used up the block), waits for the keeper briefly and tries again instead of
    /// failing the request. Without a burst this returns at once.
    pub async fn with_reservation<T>(
        &self,
        encrypt: impl Fn() -> Result<T, KmsError>,
    ) -> Result<T, KmsError> {
        // The common case: the active key has reserved encryptions left.
        match encrypt() {
            Err(KmsError::Budget(BudgetError::ReservationPending { .. })) => {}
            r => return r.map_err(|e| self.explain(e)),
        }
        let deadline = tokio::time::Instant::now() + RESERVATION_WAIT;
        loop {
            // Registered before the attempt, so a grant between the two is not missed.
            let granted = self.reservation_granted.notified();
            tokio::pin!(granted);
            granted.as_mut().enable();
            match encrypt() {
                Err(KmsError::Budget(BudgetError::ReservationPending { .. }))
                    if tokio::time::Instant::now() < deadline =>
                {
                    self.reservation_wanted.notify_one();
                    let _ = tokio::time::timeout_at(deadline, granted).await;
                }
                r => return r.map_err(|e| self.explain(e)),
            }
        }
    }

    /// Status: the active key id and an in-memory round trip through its cipher.
    pub fn health(&self) -> Health {
        let ring = self.ring();
        let Some(active) = ring.active() else {
            return Health {
                key_id: None,
                problem: Some(KmsError::NoActiveKey.to_string()),
            };
        };
        let problem = self
            .take_nonce(active)
            .map_err(|e| self.explain(e.into()))
            .and_then(|()| {
                active
                    .cipher()
                    .self_check(&active.id)
                    .map_err(KmsError::from)
            })
            .err()
            .map(|e| format!("self-check of key {} failed: {e}", active.id));
        Health {
            key_id: Some(active.id.clone()),
            problem,
        }
    }

    /// Encrypts a DEK seed for the v2 API under the active key.
    pub fn encrypt_v2(&self, plaintext: &Plaintext) -> Result<Encrypted, KmsError> {
        let ring = self.ring();
        let active = ring.active().ok_or(KmsError::NoActiveKey)?;
        self.take_nonce(active)?;
        let ciphertext = active.cipher().seal_v2(&active.id, plaintext)?;
        Ok(Encrypted {
            ciphertext,
            key_id: active.id.clone(),
        })
    }

    /// The annotations returned with every v2 ciphertext.
    pub fn annotations() -> HashMap<String, Vec<u8>> {
        HashMap::from([(
            ANNOTATION_KEY.to_owned(),
            FORMAT_V2.to_string().into_bytes(),
        )])
    }

    /// Decrypts a v2 ciphertext under the key the apiserver names.
    pub fn decrypt_v2(
        &self,
        key_id: &str,
        ciphertext: &[u8],
        annotations: &HashMap<String, Vec<u8>>,
    ) -> Result<Plaintext, KmsError> {
        check_annotations(annotations)?;
        let key_id = KeyId::parse(key_id)?;
        let ring = self.ring();
        let kek = usable(&ring, &key_id)?;
        Ok(kek.cipher().open_v2(&key_id, ciphertext)?)
    }

    /// Encrypts for the deprecated v1beta1 API (the key id travels inside).
    pub fn encrypt_v1(&self, plaintext: &Plaintext) -> Result<Vec<u8>, KmsError> {
        let ring = self.ring();
        let active = ring.active().ok_or(KmsError::NoActiveKey)?;
        self.take_nonce(active)?;
        Ok(active.cipher().seal_v1(&active.id, plaintext)?)
    }

    pub fn decrypt_v1(&self, ciphertext: &[u8]) -> Result<(Plaintext, KeyId), KmsError> {
        let parsed = envelope::parse_v1(ciphertext)?;
        let ring = self.ring();
        let kek = usable(&ring, &parsed.key_id)?;
        Ok((kek.cipher().open_v1(&parsed)?, parsed.key_id))
    }

    fn take_nonce(&self, key: &LoadedKek) -> Result<(), BudgetError> {
        let r = key.take_nonce();
        if key.wants_reservation() {
            self.reservation_wanted.notify_one();
        }
        if key.used() == SOFT_ENCRYPTION_LIMIT {
            tracing::warn!(key_id = %key.id, used = key.used(), "key has reached its soft encryption limit; rotate it");
        }
        r
    }
}

fn usable<'a>(ring: &'a KeyRing, key_id: &KeyId) -> Result<&'a Arc<LoadedKek>, KmsError> {
    match ring.lookup(key_id) {
        Lookup::Usable(k) => Ok(k),
        Lookup::Retired => Err(KmsError::KeyRetired(key_id.clone())),
        Lookup::Unknown => Err(KmsError::UnknownKeyId(key_id.to_string())),
    }
}

/// Decrypt only accepts annotations this plugin could have written.
fn check_annotations(annotations: &HashMap<String, Vec<u8>>) -> Result<(), KmsError> {
    for (key, value) in annotations {
        if key != ANNOTATION_KEY {
            return Err(KmsError::BadAnnotation {
                key: truncate(key, 64),
                problem: format!(
                    "not written by this plugin (it only writes {ANNOTATION_KEY:?}); the \
                     ciphertext comes from another KMS provider or was altered"
                ),
            });
        }
        let expected = FORMAT_V2.to_string();
        if value.as_slice() != expected.as_bytes() {
            return Err(KmsError::BadAnnotation {
                key: key.clone(),
                problem: format!(
                    "envelope format {:?} is unknown to this plugin version (it writes {expected:?})",
                    truncate(&String::from_utf8_lossy(value), 16)
                ),
            });
        }
    }
    Ok(())
}

fn truncate(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::software::SoftwareBackend;
    use crate::keystore::KeyStore;
    use crate::{keyadmin, keystore::KeyState};

    fn kms() -> (Kms, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let backend = SoftwareBackend::create_or_open(&dir.path().join("root.key")).unwrap();
        let store = KeyStore::new(dir.path().join("ks"));
        keyadmin::init(&store, &backend, None).unwrap();
        keyadmin::add(&store, &backend, KeyState::Active).unwrap();
        let ring = KeyRing::load(&store.load().unwrap(), &backend, None).unwrap();
        ring.active().unwrap().grant(0, 100);
        (Kms::new(ring), dir)
    }

    #[test]
    fn round_trips_and_rejects() {
        let (kms, _d) = kms();
        let seed = Plaintext::from_vec(vec![42; 32]);
        let enc = kms.encrypt_v2(&seed).unwrap();
        let ann = Kms::annotations();
        let pt = kms
            .decrypt_v2(enc.key_id.as_str(), &enc.ciphertext, &ann)
            .unwrap();
        assert_eq!(pt.expose(), seed.expose());
        // Without annotations too (they only restate the format byte).
        kms.decrypt_v2(enc.key_id.as_str(), &enc.ciphertext, &HashMap::new())
            .unwrap();
        assert!(matches!(
            kms.decrypt_v2("kek-9999-x", &enc.ciphertext, &ann),
            Err(KmsError::UnknownKeyId(_))
        ));
        assert!(matches!(
            kms.decrypt_v2("", &enc.ciphertext, &ann),
            Err(KmsError::InvalidKeyId(_))
        ));
        let mut bad = ann.clone();
        bad.insert("x.example.com".into(), b"1".to_vec());
        assert!(matches!(
            kms.decrypt_v2(enc.key_id.as_str(), &enc.ciphertext, &bad),
            Err(KmsError::BadAnnotation { .. })
        ));
        let v1 = kms.encrypt_v1(&seed).unwrap();
        let (pt, id) = kms.decrypt_v1(&v1).unwrap();
        assert_eq!(pt.expose(), seed.expose());
        assert_eq!(id, enc.key_id);
        let h = kms.health();
        assert!(h.problem.is_none());
        assert_eq!(h.key_id, Some(enc.key_id));
    }

    #[test]
    fn empty_ring_is_unhealthy() {
        let kms = Kms::new(KeyRing::empty());
        let h = kms.health();
        assert!(h.key_id.is_none());
        assert!(h.problem.unwrap().contains("key init"));
        assert!(matches!(
            kms.encrypt_v2(&Plaintext::from_vec(vec![1])),
            Err(KmsError::NoActiveKey)
        ));
    }
}
