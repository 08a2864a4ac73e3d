//! Key administration: the operations behind `kms-plugin key ...` and automatic rotation.
//! Each is one locked, atomic key store update.

use time::OffsetDateTime;

use crate::backend::KeyBackend;
use crate::keyid::KeyId;
use crate::keyring::check_value;
use crate::keystore::{KeyRecord, KeyState, KeyStore, KeyStoreError, Manifest};
use crate::secret::Kek;

/// Creates the key store with its first (active) key.
pub fn init(store: &KeyStore, backend: &dyn KeyBackend) -> Result<KeyId, KeyStoreError> {
    let mut manifest = Manifest::new(backend.identity()?);
    let now = OffsetDateTime::now_utc();
    let record = new_record(&mut manifest, backend, KeyState::Active, now)?;
    let id = record.id.clone();
    manifest.add(record);
    store.create(&manifest)?;
    Ok(id)
}

/// Adds a new key, `Active` (rotation in one step: the old key turns decrypt-only) or
/// `DecryptOnly` (staged, for two-phase rotation across nodes).
pub fn add(
    store: &KeyStore,
    backend: &dyn KeyBackend,
    state: KeyState,
) -> Result<KeyId, KeyStoreError> {
    let (id, _) = store.update(|m| {
        backend.verify_identity(&m.backend)?;
        let record = new_record(m, backend, state, OffsetDateTime::now_utc())?;
        let id = record.id.clone();
        m.add(record);
        Ok(id)
    })?;
    Ok(id)
}

pub fn promote(store: &KeyStore, id: &str) -> Result<(), KeyStoreError> {
    store.update(|m| Ok(m.promote(id, OffsetDateTime::now_utc())?))?;
    Ok(())
}

pub fn retire(store: &KeyStore, id: &str) -> Result<(), KeyStoreError> {
    store.update(|m| Ok(m.retire(id, OffsetDateTime::now_utc())?))?;
    Ok(())
}

pub fn reinstate(store: &KeyStore, id: &str) -> Result<(), KeyStoreError> {
    store.update(|m| Ok(m.reinstate(id, OffsetDateTime::now_utc())?))?;
    Ok(())
}

fn new_record(
    manifest: &mut Manifest,
    backend: &dyn KeyBackend,
    state: KeyState,
    now: OffsetDateTime,
) -> Result<KeyRecord, KeyStoreError> {
    let random = |e: getrandom::Error| KeyStoreError::Random(e.to_string());
    let serial = manifest.take_serial();
    let id = KeyId::generate(serial, now).map_err(random)?;
    let kek = Kek::generate().map_err(random)?;
    let sealed = backend.seal(&id, &kek)?;
    Ok(KeyRecord {
        check_value: check_value(&kek),
        id,
        serial,
        state,
        created_at: now,
        state_changed_at: now,
        encryptions_reserved: 0,
        sealed,
    })
}
