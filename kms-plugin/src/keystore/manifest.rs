//! The key store manifest: which KEKs exist, their states and counters, each KEK in
//! sealed form only. Pure data and the rules for changing it; no I/O here.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::backend::{BackendIdentity, SealedKek};
use crate::keyid::KeyId;

/// The manifest layout this build reads and writes.
pub const MANIFEST_FORMAT: u32 = 1;

/// What a KEK may be used for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KeyState {
    /// Used for Encrypt (exactly one key at a time) and Decrypt.
    Active,
    /// Used for Decrypt only: an older key, or a new one staged on every node before it
    /// is promoted.
    DecryptOnly,
    /// Kept sealed but no longer used; Decrypt under it fails until it is reinstated.
    Retired,
}

impl KeyState {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyState::Active => "active",
            KeyState::DecryptOnly => "decrypt-only",
            KeyState::Retired => "retired",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: u32,
    /// The backend that sealed every key here, checked at every start.
    pub backend: BackendIdentity,
    /// Bumped on every change, so a running plugin notices a rotation cheaply.
    pub generation: u64,
    /// Serial for the next key; serials and ids are never reused.
    pub next_serial: u64,
    /// The offline recovery public key (PEM): every new key is also wrapped to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovery_public: Option<String>,
    /// This node's transport key, which other nodes wrap keys to when enrolling them here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transport: Option<TransportRecord>,
    /// The other control-plane nodes every key must be enrolled on before it may become
    /// active here (multi-node clusters; empty on a single node).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peers: Vec<Peer>,
    pub keys: Vec<KeyRecord>,
}

/// Another control-plane node, known by its transport key.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Peer {
    pub name: String,
    pub transport_fingerprint: String,
    pub transport_public_pem: String,
    #[serde(with = "time::serde::rfc3339")]
    pub added_at: OffsetDateTime,
}

/// A decryption key held by the backend (in the TPM) for receiving keys from other nodes.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransportRecord {
    pub public_pem: String,
    pub fingerprint: String,
    #[serde(with = "sealed_base64")]
    pub sealed: SealedKek,
}

/// Where a key came from on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum KeyOrigin {
    /// Generated here.
    #[default]
    Created,
    /// Enrolled from another node with `key import`.
    Imported,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyRecord {
    pub id: KeyId,
    pub serial: u64,
    pub state: KeyState,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub state_changed_at: OffsetDateTime,
    /// One-way check value of the KEK: proves an unsealed key is the one recorded.
    pub check_value: String,
    /// Upper bound of the encryptions (random nonces) ever made under this key: plugins
    /// reserve ranges here before using them, so a crash can only over-count.
    pub encryptions_reserved: u64,
    #[serde(with = "sealed_base64")]
    pub sealed: SealedKek,
    /// The KEK wrapped to the recovery public key (RSA-OAEP), if one was configured.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "opt_base64")]
    pub recovery: Option<Vec<u8>>,
    #[serde(default)]
    pub origin: KeyOrigin,
    /// Peers that confirmed (with an enrolment receipt) that they hold this key.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub enrolled_on: Vec<String>,
}

/// Rule violations when changing or loading a manifest.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ManifestError {
    #[error("unsupported manifest format {0}; this build reads format {MANIFEST_FORMAT}")]
    Format(u32),
    #[error("{0} keys are marked active; exactly one may be")]
    SeveralActive(usize),
    #[error("key id {0} appears more than once")]
    DuplicateId(KeyId),
    #[error("serial {0} appears more than once")]
    DuplicateSerial(u64),
    #[error("next_serial {next} is not above the highest serial {highest}")]
    SerialBehind { next: u64, highest: u64 },
    #[error("key {0} has an empty sealed blob")]
    EmptyBlob(KeyId),
    #[error("the key store has keys but none is active; promote one with `kms-plugin key promote`")]
    NoActive,
    #[error("no key {0} in this key store; `kms-plugin key list` shows the ids")]
    UnknownKey(String),
    #[error("key {0} is the active key; rotate to a new key first, then retire this one")]
    RetireActive(KeyId),
    #[error("key {0} is retired; reinstate it before promoting it")]
    PromoteRetired(KeyId),
    #[error("key {id} is already {state}")]
    AlreadyInState { id: KeyId, state: &'static str },
    #[error(
        "key {id} is not enrolled on peer(s) {missing}: if it became active here, their \
         apiservers could not read what this one writes. Export it to them, import it there, \
         and confirm with `kms-plugin key confirm RECEIPT` (or promote with --force if you \
         are sure)"
    )]
    NotEnrolled { id: KeyId, missing: String },
    #[error("there is already a peer named {0}")]
    DuplicatePeer(String),
    #[error("no peer named {0}; `kms-plugin node list-peers` shows them")]
    UnknownPeer(String),
    #[error(
        "key {id} is {state}: only a retired key can be destroyed. Retire it first \
         (`kms-plugin key retire`), then wait long enough to know nothing still needs it"
    )]
    DestroyNotRetired { id: KeyId, state: &'static str },
    #[error(
        "key {id} was retired {ago} ago, within the {grace} grace period: anything still \
         encrypted under it would become unreadable for good. Wait, reinstate it if a \
         Decrypt failed since, or pass a shorter --grace if you are sure"
    )]
    DestroyTooSoon {
        id: KeyId,
        ago: String,
        grace: String,
    },
}

impl Manifest {
    pub fn new(backend: BackendIdentity) -> Self {
        Self {
            format: MANIFEST_FORMAT,
            backend,
            generation: 0,
            next_serial: 1,
            recovery_public: None,
            transport: None,
            peers: Vec::new(),
            keys: Vec::new(),
        }
    }

    /// Checks every invariant; called on each load and before each write.
    pub fn validate(&self) -> Result<(), ManifestError> {
        if self.format != MANIFEST_FORMAT {
            return Err(ManifestError::Format(self.format));
        }
        let active = self
            .keys
            .iter()
            .filter(|k| k.state == KeyState::Active)
            .count();
        if active > 1 {
            return Err(ManifestError::SeveralActive(active));
        }
        if active == 0 && !self.keys.is_empty() {
            return Err(ManifestError::NoActive);
        }
        let mut ids = std::collections::HashSet::new();
        let mut serials = std::collections::HashSet::new();
        for k in &self.keys {
            if !ids.insert(&k.id) {
                return Err(ManifestError::DuplicateId(k.id.clone()));
            }
            if !serials.insert(k.serial) {
                return Err(ManifestError::DuplicateSerial(k.serial));
            }
            if k.sealed.0.is_empty() {
                return Err(ManifestError::EmptyBlob(k.id.clone()));
            }
        }
        let highest = self.keys.iter().map(|k| k.serial).max().unwrap_or(0);
        if self.next_serial <= highest {
            return Err(ManifestError::SerialBehind {
                next: self.next_serial,
                highest,
            });
        }
        Ok(())
    }

    pub fn active(&self) -> Option<&KeyRecord> {
        self.keys.iter().find(|k| k.state == KeyState::Active)
    }

    pub fn get(&self, id: &str) -> Result<&KeyRecord, ManifestError> {
        self.keys
            .iter()
            .find(|k| k.id.as_str() == id)
            .ok_or_else(|| ManifestError::UnknownKey(id.to_owned()))
    }

    fn get_mut(&mut self, id: &str) -> Result<&mut KeyRecord, ManifestError> {
        self.keys
            .iter_mut()
            .find(|k| k.id.as_str() == id)
            .ok_or_else(|| ManifestError::UnknownKey(id.to_owned()))
    }

    /// Takes the next serial. Serials only grow, so ids are never reused.
    pub fn take_serial(&mut self) -> u64 {
        let s = self.next_serial;
        self.next_serial += 1;
        s
    }

    /// Adds a freshly sealed key. The first key of a store is always active.
    pub fn add(&mut self, mut record: KeyRecord) {
        if self.keys.is_empty() {
            record.state = KeyState::Active;
        } else if record.state == KeyState::Active {
            let now = record.created_at;
            for k in self.keys.iter_mut().filter(|k| k.state == KeyState::Active) {
                k.state = KeyState::DecryptOnly;
                k.state_changed_at = now;
            }
        }
        self.keys.push(record);
    }

    /// Peers that have not confirmed holding key `id` (empty on a single node).
    pub fn missing_peers(&self, id: &str) -> Result<Vec<&str>, ManifestError> {
        let k = self.get(id)?;
        Ok(self
            .peers
            .iter()
            .filter(|p| !k.enrolled_on.contains(&p.name))
            .map(|p| p.name.as_str())
            .collect())
    }

    /// Makes `id` the key Encrypt uses; the previous active key becomes decrypt-only.
    /// Refuses a key some peer does not hold, unless `force`.
    pub fn promote(
        &mut self,
        id: &str,
        now: OffsetDateTime,
        force: bool,
    ) -> Result<(), ManifestError> {
        let missing = self.missing_peers(id)?;
        if !missing.is_empty() && !force {
            return Err(ManifestError::NotEnrolled {
                id: self.get(id)?.id.clone(),
                missing: missing.join(", "),
            });
        }
        let target = self.get(id)?;
        match target.state {
            KeyState::Active => {
                return Err(ManifestError::AlreadyInState {
                    id: target.id.clone(),
                    state: "active",
                });
            }
            KeyState::Retired => return Err(ManifestError::PromoteRetired(target.id.clone())),
            KeyState::DecryptOnly => {}
        }
        for k in self.keys.iter_mut().filter(|k| k.state == KeyState::Active) {
            k.state = KeyState::DecryptOnly;
            k.state_changed_at = now;
        }
        let target = self.get_mut(id)?;
        target.state = KeyState::Active;
        target.state_changed_at = now;
        Ok(())
    }

    /// Stops using `id` for Decrypt. Refuses the active key.
    pub fn retire(&mut self, id: &str, now: OffsetDateTime) -> Result<(), ManifestError> {
        let k = self.get_mut(id)?;
        match k.state {
            KeyState::Active => Err(ManifestError::RetireActive(k.id.clone())),
            KeyState::Retired => Err(ManifestError::AlreadyInState {
                id: k.id.clone(),
                state: "retired",
            }),
            KeyState::DecryptOnly => {
                k.state = KeyState::Retired;
                k.state_changed_at = now;
                Ok(())
            }
        }
    }

    /// Removes a retired key for good, with its sealed blob and its recovery wrap, once it
    /// has been retired for at least `grace`. Its serial is never re-issued.
    pub fn destroy(
        &mut self,
        id: &str,
        now: OffsetDateTime,
        grace: std::time::Duration,
    ) -> Result<KeyRecord, ManifestError> {
        let k = self.get_mut(id)?;
        if k.state != KeyState::Retired {
            return Err(ManifestError::DestroyNotRetired {
                id: k.id.clone(),
                state: k.state.as_str(),
            });
        }
        // A clock that went backwards counts as "just retired".
        let ago = std::time::Duration::try_from(now - k.state_changed_at).unwrap_or_default();
        if ago < grace {
            return Err(ManifestError::DestroyTooSoon {
                id: k.id.clone(),
                ago: humantime::format_duration(std::time::Duration::from_secs(ago.as_secs()))
                    .to_string(),
                grace: humantime::format_duration(grace).to_string(),
            });
        }
        let at = self
            .keys
            .iter()
            .position(|k| k.id.as_str() == id)
            .ok_or_else(|| ManifestError::UnknownKey(id.to_owned()))?;
        Ok(self.keys.remove(at))
    }

    /// Brings a retired key back for Decrypt (same id: ids are never re-issued).
    pub fn reinstate(&mut self, id: &str, now: OffsetDateTime) -> Result<(), ManifestError> {
        let k = self.get_mut(id)?;
        if k.state != KeyState::Retired {
            return Err(ManifestError::AlreadyInState {
                id: k.id.clone(),
                state: k.state.as_str(),
            });
        }
        k.state = KeyState::DecryptOnly;
        k.state_changed_at = now;
        Ok(())
    }

    pub fn add_peer(&mut self, peer: Peer) -> Result<(), ManifestError> {
        if self.peers.iter().any(|p| p.name == peer.name) {
            return Err(ManifestError::DuplicatePeer(peer.name));
        }
        self.peers.push(peer);
        Ok(())
    }

    pub fn remove_peer(&mut self, name: &str) -> Result<(), ManifestError> {
        let before = self.peers.len();
        self.peers.retain(|p| p.name != name);
        if self.peers.len() == before {
            return Err(ManifestError::UnknownPeer(name.to_owned()));
        }
        for k in &mut self.keys {
            k.enrolled_on.retain(|n| n != name);
        }
        Ok(())
    }

    /// Records that peer `name` holds key `id`.
    pub fn confirm(&mut self, id: &str, name: &str) -> Result<(), ManifestError> {
        if !self.peers.iter().any(|p| p.name == name) {
            return Err(ManifestError::UnknownPeer(name.to_owned()));
        }
        let k = self.get_mut(id)?;
        if !k.enrolled_on.iter().any(|n| n == name) {
            k.enrolled_on.push(name.to_owned());
        }
        Ok(())
    }

    /// Reserves `count` more encryptions under `id`; returns the range `[from, to)`.
    pub fn reserve(
        &mut self,
        id: &str,
        at_least_from: u64,
        count: u64,
    ) -> Result<(u64, u64), ManifestError> {
        let k = self.get_mut(id)?;
        let from = k.encryptions_reserved.max(at_least_from);
        let to = from.saturating_add(count);
        k.encryptions_reserved = to;
        Ok((from, to))
    }
}

mod sealed_base64 {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::backend::SealedKek;

    pub fn serialize<S: Serializer>(v: &SealedKek, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(&v.0))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SealedKek, D::Error> {
        let s = String::deserialize(d)?;
        STANDARD
            .decode(s.as_bytes())
            .map(SealedKek)
            .map_err(serde::de::Error::custom)
    }
}

mod opt_base64 {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(b) => s.serialize_str(&STANDARD.encode(b)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        match Option::<String>::deserialize(d)? {
            Some(s) => STANDARD
                .decode(s.as_bytes())
                .map(Some)
                .map_err(serde::de::Error::custom),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::BackendKind;

    fn record(m: &mut Manifest, state: KeyState) -> KeyId {
        let serial = m.take_serial();
        let id = KeyId::parse(&format!("kek-{serial}")).unwrap();
        m.add(KeyRecord {
            id: id.clone(),
            serial,
            state,
            created_at: OffsetDateTime::UNIX_EPOCH,
            state_changed_at: OffsetDateTime::UNIX_EPOCH,
            check_value: "00".into(),
            encryptions_reserved: 0,
            sealed: SealedKek(vec![1, 2, 3]),
            recovery: Some(vec![4, 5]),
            origin: KeyOrigin::Created,
            enrolled_on: Vec::new(),
        });
        id
    }

    fn manifest() -> Manifest {
        Manifest::new(BackendIdentity {
            kind: BackendKind::InsecureSoftware,
            fingerprint: "x".into(),
        })
    }

    #[test]
    fn lifecycle() {
        let mut m = manifest();
        let a = record(&mut m, KeyState::DecryptOnly);
        assert_eq!(m.active().unwrap().id, a, "first key is active");
        let b = record(&mut m, KeyState::DecryptOnly);
        assert_eq!(m.active().unwrap().id, a, "staged key is not active yet");
        m.validate().unwrap();
        assert_eq!(
            m.retire(a.as_str(), OffsetDateTime::UNIX_EPOCH),
            Err(ManifestError::RetireActive(a.clone()))
        );
        m.promote(b.as_str(), OffsetDateTime::UNIX_EPOCH, false)
            .unwrap();
        assert_eq!(m.active().unwrap().id, b);
        assert_eq!(m.get(a.as_str()).unwrap().state, KeyState::DecryptOnly);
        m.retire(a.as_str(), OffsetDateTime::UNIX_EPOCH).unwrap();
        assert!(
            m.promote(a.as_str(), OffsetDateTime::UNIX_EPOCH, false)
                .is_err()
        );
        m.reinstate(a.as_str(), OffsetDateTime::UNIX_EPOCH).unwrap();
        let c = record(&mut m, KeyState::Active);
        assert_eq!(m.active().unwrap().id, c);
        assert_eq!(
            m.keys
                .iter()
                .filter(|k| k.state == KeyState::Active)
                .count(),
            1
        );
        m.validate().unwrap();
        assert!(m.retire("nope", OffsetDateTime::UNIX_EPOCH).is_err());
    }

    #[test]
    fn promotion_waits_for_every_peer() {
        let mut m = manifest();
        record(&mut m, KeyState::Active);
        let b = record(&mut m, KeyState::DecryptOnly);
        let peer = |name: &str| Peer {
            name: name.into(),
            transport_fingerprint: format!("fp-{name}"),
            transport_public_pem: String::new(),
            added_at: OffsetDateTime::UNIX_EPOCH,
        };
        m.add_peer(peer("n2")).unwrap();
        m.add_peer(peer("n3")).unwrap();
        assert!(matches!(
            m.add_peer(peer("n2")),
            Err(ManifestError::DuplicatePeer(_))
        ));
        let err = m
            .promote(b.as_str(), OffsetDateTime::UNIX_EPOCH, false)
            .unwrap_err();
        assert!(err.to_string().contains("n2, n3"), "{err}");
        m.confirm(b.as_str(), "n2").unwrap();
        assert_eq!(m.missing_peers(b.as_str()).unwrap(), vec!["n3"]);
        assert!(m.confirm(b.as_str(), "n9").is_err());
        assert!(
            m.promote(b.as_str(), OffsetDateTime::UNIX_EPOCH, false)
                .is_err()
        );
        m.remove_peer("n3").unwrap();
        m.promote(b.as_str(), OffsetDateTime::UNIX_EPOCH, false)
            .unwrap();
        assert_eq!(m.active().unwrap().id, b);
    }

    #[test]
    fn reservations_only_grow() {
        let mut m = manifest();
        let a = record(&mut m, KeyState::Active);
        assert_eq!(m.reserve(a.as_str(), 0, 10).unwrap(), (0, 10));
        assert_eq!(m.reserve(a.as_str(), 0, 10).unwrap(), (10, 20));
        assert_eq!(m.reserve(a.as_str(), 50, 10).unwrap(), (50, 60));
    }

    #[test]
    fn validation_catches_damage() {
        let mut m = manifest();
        let a = record(&mut m, KeyState::Active);
        record(&mut m, KeyState::DecryptOnly);
        let mut dup = m.clone();
        dup.keys[1].id = a.clone();
        assert_eq!(dup.validate(), Err(ManifestError::DuplicateId(a)));
        let mut two = m.clone();
        two.keys[1].state = KeyState::Active;
        assert_eq!(two.validate(), Err(ManifestError::SeveralActive(2)));
        let mut behind = m.clone();
        behind.next_serial = 1;
        assert!(matches!(
            behind.validate(),
            Err(ManifestError::SerialBehind { .. })
        ));
        let mut none = m.clone();
        none.keys[0].state = KeyState::Retired;
        assert_eq!(none.validate(), Err(ManifestError::NoActive));
    }

    #[test]
    fn json_round_trip_rejects_unknown_fields() {
        let mut m = manifest();
        record(&mut m, KeyState::Active);
        let json = serde_json::to_string(&m).unwrap();
        let back: Manifest = serde_json::from_str(&json).unwrap();
        assert_eq!(back.keys[0].sealed, m.keys[0].sealed);
        assert_eq!(back.keys[0].recovery, Some(vec![4, 5]));
        let extra = json.replacen("{", "{\"surprise\":1,", 1);
        assert!(serde_json::from_str::<Manifest>(&extra).is_err());
    }
}
