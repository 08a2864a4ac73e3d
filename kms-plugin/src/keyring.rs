//! The in-memory key ring: every usable KEK unsealed once, as a ready AES-GCM cipher,
//! plus the active one. Encrypt and Decrypt touch only this: no disk, no TPM.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::backend::KeyBackend;
use crate::envelope::KekCipher;
use crate::keyid::{KeyId, hex};
use crate::keystore::{KeyState, KeyStoreError, Manifest};
use crate::secret::Kek;

/// NIST SP 800-38D caps random 96-bit nonces at 2^32 encryptions per key. We refuse at
/// half of that, and ask for rotation at a quarter.
pub const HARD_ENCRYPTION_LIMIT: u64 = 1 << 31;
/// Past this many encryptions the plugin logs, reports it in metrics and, with automatic
/// rotation on, rotates.
pub const SOFT_ENCRYPTION_LIMIT: u64 = 1 << 30;
/// Encryptions reserved in the key store per write. Small, so a crash-looping plugin
/// wastes little of the budget; a top-up is requested when half is used.
pub const RESERVATION_BLOCK: u64 = 4096;

/// One-way check value of a KEK, recorded at creation and verified at every unseal.
pub fn check_value(kek: &Kek) -> String {
    match <Hmac<Sha256> as Mac>::new_from_slice(kek.expose()) {
        Ok(mut mac) => {
            mac.update(b"edgeseal/kek-check-value/v1");
            hex(&mac.finalize().into_bytes()[..8])
        }
        // HMAC takes keys of any length.
        Err(_) => String::new(),
    }
}

/// One unsealed KEK and its encryption counter.
pub struct LoadedKek {
    pub id: KeyId,
    cipher: KekCipher,
    /// Encryptions made or reserved so far (starts at the key store's reservation).
    used: AtomicU64,
    /// Encryptions this process may make before it must reserve more.
    reserved: AtomicU64,
    /// Size of the last reservation: a top-up is wanted when half of it is left.
    last_grant: AtomicU64,
}

/// Why an encryption under the active key was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BudgetError {
    #[error(
        "key {id} has reached {used} encryptions, the safety limit for random nonces; \
         rotate the key (kms-plugin key rotate)"
    )]
    Exhausted { id: KeyId, used: u64 },
    #[error("key {id} is waiting for the key store to record more encryptions; retry shortly")]
    ReservationPending { id: KeyId },
}

impl LoadedKek {
    fn new(id: KeyId, kek: &Kek, used_so_far: u64) -> Self {
        Self {
            id,
            cipher: KekCipher::new(kek),
            used: AtomicU64::new(used_so_far),
            reserved: AtomicU64::new(used_so_far),
            last_grant: AtomicU64::new(0),
        }
    }

    pub fn cipher(&self) -> &KekCipher {
        &self.cipher
    }

    /// Takes one nonce from the budget. Lock-free; never touches disk.
    pub fn take_nonce(&self) -> Result<(), BudgetError> {
        let n = self.used.fetch_add(1, Ordering::Relaxed);
        if n >= HARD_ENCRYPTION_LIMIT {
            return Err(BudgetError::Exhausted {
                id: self.id.clone(),
                used: n,
            });
        }
        if n >= self.reserved.load(Ordering::Acquire) {
            // Give the nonce back: it was not used.
            self.used.fetch_sub(1, Ordering::Relaxed);
            return Err(BudgetError::ReservationPending {
                id: self.id.clone(),
            });
        }
        Ok(())
    }

    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    pub fn reserved(&self) -> u64 {
        self.reserved.load(Ordering::Acquire)
    }

    /// True when less than half a block of reserved encryptions is left.
    pub fn wants_reservation(&self) -> bool {
        let margin = (RESERVATION_BLOCK.max(self.last_grant.load(Ordering::Relaxed))) / 2;
        self.used() + margin >= self.reserved() && self.used() < HARD_ENCRYPTION_LIMIT
    }

    /// Records a reservation made in the key store: `[from, to)`. If the store's count was
    /// ahead of ours (another writer reserved in between), skip the gap: counting only
    /// ever errs on the high side.
    pub fn grant(&self, from: u64, to: u64) {
        if from > self.reserved.load(Ordering::Acquire) {
            self.used.fetch_max(from, Ordering::Relaxed);
        }
        self.last_grant
            .store(to.saturating_sub(from), Ordering::Relaxed);
        self.reserved.fetch_max(to, Ordering::Release);
    }
}

/// One immutable version of the ring. A reload builds a new one and swaps it in.
pub struct KeyRing {
    generation: u64,
    active: Option<Arc<LoadedKek>>,
    usable: HashMap<KeyId, Arc<LoadedKek>>,
    states: HashMap<KeyId, KeyState>,
}

/// What a lookup by key id found.
pub enum Lookup<'a> {
    Usable(&'a Arc<LoadedKek>),
    Retired,
    Unknown,
}

impl KeyRing {
    pub fn empty() -> Self {
        Self {
            generation: 0,
            active: None,
            usable: HashMap::new(),
            states: HashMap::new(),
        }
    }

    /// Builds the ring for `manifest`, reusing keys already unsealed in `previous` (so a
    /// reload does not touch the backend for keys it has) and unsealing the rest.
    pub fn load(
        manifest: &Manifest,
        backend: &dyn KeyBackend,
        previous: Option<&KeyRing>,
    ) -> Result<Self, KeyStoreError> {
        let mut usable = HashMap::new();
        let mut states = HashMap::new();
        let mut active = None;
        for record in &manifest.keys {
            states.insert(record.id.clone(), record.state);
            if record.state == KeyState::Retired {
                continue;
            }
            let loaded = match previous.and_then(|p| p.usable.get(&record.id)) {
                Some(existing) => Arc::clone(existing),
                None => {
                    let kek = backend.unseal(&record.id, &record.sealed)?;
                    if check_value(&kek) != record.check_value {
                        return Err(KeyStoreError::CheckValueMismatch {
                            key_id: record.id.to_string(),
                        });
                    }
                    Arc::new(LoadedKek::new(
                        record.id.clone(),
                        &kek,
                        record.encryptions_reserved,
                    ))
                }
            };
            if record.state == KeyState::Active {
                active = Some(Arc::clone(&loaded));
            }
            usable.insert(record.id.clone(), loaded);
        }
        Ok(Self {
            generation: manifest.generation,
            active,
            usable,
            states,
        })
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// After this process's own counter reservation (and nothing else) bumped the
    /// manifest's generation, the ring still matches it.
    pub fn set_generation(&mut self, generation: u64) {
        self.generation = generation;
    }

    pub fn active(&self) -> Option<&Arc<LoadedKek>> {
        self.active.as_ref()
    }

    pub fn lookup(&self, id: &KeyId) -> Lookup<'_> {
        match self.usable.get(id) {
            Some(k) => Lookup::Usable(k),
            None if self.states.get(id) == Some(&KeyState::Retired) => Lookup::Retired,
            None => Lookup::Unknown,
        }
    }

    /// Number of keys per state, for metrics and logs.
    pub fn count(&self, state: KeyState) -> usize {
        self.states.values().filter(|s| **s == state).count()
    }

    pub fn key_ids(&self) -> HashSet<&KeyId> {
        self.usable.keys().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_refuses_past_reservation_and_limit() {
        let kek = Kek::generate().unwrap();
        let id = KeyId::parse("k").unwrap();
        let k = LoadedKek::new(id.clone(), &kek, 0);
        assert_eq!(
            k.take_nonce(),
            Err(BudgetError::ReservationPending { id: id.clone() })
        );
        assert!(k.wants_reservation());
        k.grant(0, 2);
        k.take_nonce().unwrap();
        k.take_nonce().unwrap();
        assert!(matches!(
            k.take_nonce(),
            Err(BudgetError::ReservationPending { .. })
        ));
        assert_eq!(k.used(), 2);
        let worn = LoadedKek::new(id, &kek, HARD_ENCRYPTION_LIMIT);
        worn.grant(HARD_ENCRYPTION_LIMIT, HARD_ENCRYPTION_LIMIT + 10);
        assert!(matches!(
            worn.take_nonce(),
            Err(BudgetError::Exhausted { .. })
        ));
        assert!(!worn.wants_reservation());
    }

    #[test]
    fn check_value_differs_per_key() {
        let a = Kek::generate().unwrap();
        let b = Kek::generate().unwrap();
        assert_eq!(check_value(&a).len(), 16);
        assert_ne!(check_value(&a), check_value(&b));
    }
}
