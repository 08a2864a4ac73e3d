//! Key administration: the operations behind `kms-plugin key ...` / `node ...` and
//! automatic rotation. Each change is one locked, atomic key store update.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::backend::KeyBackend;
use crate::keyid::KeyId;
use crate::keyring::check_value;
use crate::keystore::{
    KeyOrigin, KeyRecord, KeyState, KeyStore, KeyStoreError, Manifest, ManifestError, Peer,
    TransportRecord,
};
use crate::keywrap::{self, Purpose, WrapError};
use crate::secret::Kek;

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error(transparent)]
    Store(#[from] KeyStoreError),
    #[error(transparent)]
    Wrap(#[from] WrapError),
    #[error("{0}")]
    Refused(String),
}

impl From<ManifestError> for AdminError {
    fn from(e: ManifestError) -> Self {
        AdminError::Store(e.into())
    }
}

impl From<crate::backend::BackendError> for AdminError {
    fn from(e: crate::backend::BackendError) -> Self {
        AdminError::Store(e.into())
    }
}

/// Creates the key store with its first (active) key. With `recovery_pem`, that key and
/// every later one is also wrapped to the offline recovery key.
pub fn init(
    store: &KeyStore,
    backend: &dyn KeyBackend,
    recovery_pem: Option<String>,
) -> Result<KeyId, AdminError> {
    let mut manifest = Manifest::new(backend.identity()?);
    if let Some(pem) = recovery_pem {
        keywrap::parse_public_pem(
            &pem,
            "recovery public key",
            std::path::Path::new("-"),
            keywrap::MIN_RECOVERY_BITS,
        )?;
        manifest.recovery_public = Some(pem);
    }
    let record = new_record(
        &mut manifest,
        backend,
        KeyState::Active,
        OffsetDateTime::now_utc(),
    )?;
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
) -> Result<KeyId, AdminError> {
    let (id, _) = store.update(|m| {
        backend.verify_identity(&m.backend)?;
        if state == KeyState::Active && !m.peers.is_empty() {
            return Err(AdminError::Refused(format!(
                "this node has peers ({}): a new key cannot be active before they hold it. Use \
                 `key add`, export it to every peer, import it there, `key confirm` the receipts, \
                 then `key promote`",
                m.peers
                    .iter()
                    .map(|p| p.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        let record = new_record(m, backend, state, OffsetDateTime::now_utc())?;
        let id = record.id.clone();
        m.add(record);
        Ok::<_, AdminError>(id)
    })?;
    Ok(id)
}

pub fn promote(store: &KeyStore, id: &str, force: bool) -> Result<(), AdminError> {
    store.update(|m| Ok::<_, AdminError>(m.promote(id, OffsetDateTime::now_utc(), force)?))?;
    Ok(())
}

pub fn retire(store: &KeyStore, id: &str) -> Result<(), AdminError> {
    store.update(|m| Ok::<_, AdminError>(m.retire(id, OffsetDateTime::now_utc())?))?;
    Ok(())
}

/// Destroys a key retired at least `grace` ago (see [`Manifest::destroy`]).
pub fn destroy(store: &KeyStore, id: &str, grace: std::time::Duration) -> Result<(), AdminError> {
    store.update(|m| {
        m.destroy(id, OffsetDateTime::now_utc(), grace)
            .map(drop)
            .map_err(AdminError::from)
    })?;
    Ok(())
}

pub fn reinstate(store: &KeyStore, id: &str) -> Result<(), AdminError> {
    store.update(|m| Ok::<_, AdminError>(m.reinstate(id, OffsetDateTime::now_utc())?))?;
    Ok(())
}

fn new_record(
    manifest: &mut Manifest,
    backend: &dyn KeyBackend,
    state: KeyState,
    now: OffsetDateTime,
) -> Result<KeyRecord, AdminError> {
    let random = |e: getrandom::Error| KeyStoreError::Random(e.to_string());
    let serial = manifest.take_serial();
    let id = KeyId::generate(serial, now).map_err(random)?;
    let kek = Kek::generate().map_err(random)?;
    let sealed = backend.seal(&id, &kek)?;
    let recovery = recovery_wrap(manifest, &id, &kek)?;
    Ok(KeyRecord {
        check_value: check_value(&kek),
        id,
        serial,
        state,
        created_at: now,
        state_changed_at: now,
        encryptions_reserved: 0,
        sealed,
        recovery,
        origin: KeyOrigin::Created,
        enrolled_on: Vec::new(),
    })
}

fn recovery_wrap(
    manifest: &Manifest,
    id: &KeyId,
    kek: &Kek,
) -> Result<Option<Vec<u8>>, AdminError> {
    let Some(pem) = &manifest.recovery_public else {
        return Ok(None);
    };
    let key = keywrap::parse_public_pem(
        pem,
        "recovery public key in the manifest",
        std::path::Path::new("manifest.json"),
        keywrap::MIN_RECOVERY_BITS,
    )?;
    Ok(Some(keywrap::wrap(&key, Purpose::Recovery, id, kek)?))
}

/// Sets (or replaces) the offline recovery key and wraps every usable key to it. Keys
/// are unsealed one at a time to be wrapped; nothing is written if any of them fails.
pub fn set_recovery(
    store: &KeyStore,
    backend: &dyn KeyBackend,
    pem: String,
) -> Result<usize, AdminError> {
    let key = keywrap::parse_public_pem(
        &pem,
        "recovery public key",
        std::path::Path::new("-"),
        keywrap::MIN_RECOVERY_BITS,
    )?;
    let (n, _) = store.update(|m| {
        backend.verify_identity(&m.backend)?;
        let mut n = 0;
        for k in m.keys.iter_mut().filter(|k| k.state != KeyState::Retired) {
            let kek = backend.unseal(&k.id, &k.sealed)?;
            if check_value(&kek) != k.check_value {
                return Err(KeyStoreError::CheckValueMismatch {
                    key_id: k.id.to_string(),
                }
                .into());
            }
            k.recovery = Some(keywrap::wrap(&key, Purpose::Recovery, &k.id, &kek)?);
            n += 1;
        }
        m.recovery_public = Some(pem);
        Ok::<_, AdminError>(n)
    })?;
    Ok(n)
}

// ---- Enrolling keys on other nodes ----------------------------------------------------

/// What `node export-public` writes: where other nodes wrap keys to, to enroll them here.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodePublic {
    pub format: String,
    pub node: String,
    /// The backend (TPM storage key) of the node, for the admin's records.
    pub backend_fingerprint: String,
    pub transport_fingerprint: String,
    pub transport_public_pem: String,
}

const NODE_PUBLIC_FORMAT: &str = "edgeseal-node-public/v1";
const BUNDLE_FORMAT: &str = "edgeseal-key-bundle/v1";

/// What `key export` writes: one KEK wrapped to one node's transport key.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyBundle {
    pub format: String,
    pub key_id: KeyId,
    pub check_value: String,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// The transport key fingerprint of the node the bundle is for.
    pub to: String,
    /// RSA-OAEP-SHA256(transport key, KEK), base64.
    pub wrapped: String,
}

/// This node's transport key (created on first use; an uninitialized key store is
/// created empty to hold it, so a new node can join before it has any key).
pub fn node_public(
    store: &KeyStore,
    backend: &dyn KeyBackend,
    node: &str,
) -> Result<NodePublic, AdminError> {
    if !store.is_initialized() {
        store.create(&Manifest::new(backend.identity()?))?;
    }
    let (record, manifest) = store.update(|m| {
        backend.verify_identity(&m.backend)?;
        if m.transport.is_none() {
            let (sealed, public) = backend.create_transport_key()?;
            let public_pem = keywrap::public_pem(&public)?;
            m.transport = Some(TransportRecord {
                fingerprint: keywrap::fingerprint(&public),
                public_pem,
                sealed,
            });
        }
        Ok::<_, AdminError>(m.transport.clone())
    })?;
    let record =
        record.ok_or_else(|| AdminError::Refused("no transport key after creating one".into()))?;
    Ok(NodePublic {
        format: NODE_PUBLIC_FORMAT.into(),
        node: node.into(),
        backend_fingerprint: manifest.backend.fingerprint,
        transport_fingerprint: record.fingerprint,
        transport_public_pem: record.public_pem,
    })
}

/// Wraps a key of this store to another node's transport key. Only keys created here can
/// be exported: an enrolled key is not passed on from node to node.
pub fn export(
    store: &KeyStore,
    backend: &dyn KeyBackend,
    key_id: &str,
    to: &NodePublic,
) -> Result<KeyBundle, AdminError> {
    if to.format != NODE_PUBLIC_FORMAT {
        return Err(AdminError::Refused(format!(
            "the node public file has format {:?}; expected {NODE_PUBLIC_FORMAT:?}",
            to.format
        )));
    }
    let manifest = store.load()?;
    backend.verify_identity(&manifest.backend)?;
    let record = manifest.get(key_id)?;
    if record.origin != KeyOrigin::Created {
        return Err(AdminError::Refused(format!(
            "key {key_id} was imported from another node; export it from the node that created it"
        )));
    }
    if record.state == KeyState::Retired {
        return Err(AdminError::Refused(format!(
            "key {key_id} is retired; reinstate it before exporting it"
        )));
    }
    let public = keywrap::parse_public_pem(
        &to.transport_public_pem,
        "node transport key",
        std::path::Path::new("node public file"),
        keywrap::MIN_TRANSPORT_BITS,
    )?;
    let fingerprint = keywrap::fingerprint(&public);
    if fingerprint != to.transport_fingerprint {
        return Err(AdminError::Refused(format!(
            "the node public file says its key is {} but the key in it is {fingerprint}: it was altered",
            to.transport_fingerprint
        )));
    }
    let kek = backend.unseal(&record.id, &record.sealed)?;
    if check_value(&kek) != record.check_value {
        return Err(KeyStoreError::CheckValueMismatch {
            key_id: key_id.into(),
        }
        .into());
    }
    let wrapped = keywrap::wrap(&public, Purpose::Transport, &record.id, &kek)?;
    Ok(KeyBundle {
        format: BUNDLE_FORMAT.into(),
        key_id: record.id.clone(),
        check_value: record.check_value.clone(),
        created_at: record.created_at,
        to: fingerprint,
        wrapped: base64::Engine::encode(&base64::engine::general_purpose::STANDARD, wrapped),
    })
}

/// What `key import` hands back to the exporting node's admin (`key confirm`), so that node
/// knows this one holds the key before making it active.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrolmentReceipt {
    pub format: String,
    pub key_id: KeyId,
    pub check_value: String,
    pub node: String,
    pub transport_fingerprint: String,
}

const RECEIPT_FORMAT: &str = "edgeseal-enrolment-receipt/v1";

/// Unwraps a bundle with this node's transport key (inside the TPM), checks it against
/// its check value and seals it here. It arrives decrypt-only, except into an empty key
/// store, where the first key becomes the active one.
pub fn import(
    store: &KeyStore,
    backend: &dyn KeyBackend,
    bundle: &KeyBundle,
    node: &str,
) -> Result<(KeyState, EnrolmentReceipt), AdminError> {
    if bundle.format != BUNDLE_FORMAT {
        return Err(AdminError::Refused(format!(
            "the bundle has format {:?}; expected {BUNDLE_FORMAT:?}",
            bundle.format
        )));
    }
    let wrapped = base64::Engine::decode(
        &base64::engine::general_purpose::STANDARD,
        bundle.wrapped.as_bytes(),
    )
    .map_err(|e| AdminError::Refused(format!("the bundle's wrapped key is not base64: {e}")))?;
    let (state, _) = store.update(|m| {
        backend.verify_identity(&m.backend)?;
        let transport = m.transport.as_ref().ok_or_else(|| {
            AdminError::Refused(
                "this node has no transport key, so no bundle can have been made for it: run \
                 `kms-plugin node export-public` here first"
                    .into(),
            )
        })?;
        if transport.fingerprint != bundle.to {
            return Err(AdminError::Refused(format!(
                "this bundle was made for the node with transport key {}, but this node's is {}",
                bundle.to, transport.fingerprint
            )));
        }
        if m.keys.iter().any(|k| k.id == bundle.key_id) {
            return Err(ManifestError::AlreadyInState {
                id: bundle.key_id.clone(),
                state: "enrolled",
            }
            .into());
        }
        let label = keywrap::label(Purpose::Transport, &bundle.key_id);
        let kek = backend.transport_unwrap(&transport.sealed, &bundle.key_id, &label, &wrapped)?;
        if check_value(&kek) != bundle.check_value {
            return Err(KeyStoreError::CheckValueMismatch {
                key_id: bundle.key_id.to_string(),
            }
            .into());
        }
        let sealed = backend.seal(&bundle.key_id, &kek)?;
        let recovery = recovery_wrap(m, &bundle.key_id, &kek)?;
        let state = if m.keys.is_empty() {
            KeyState::Active
        } else {
            KeyState::DecryptOnly
        };
        let now = OffsetDateTime::now_utc();
        let serial = m.take_serial();
        m.add(KeyRecord {
            id: bundle.key_id.clone(),
            serial,
            state,
            created_at: bundle.created_at,
            state_changed_at: now,
            check_value: bundle.check_value.clone(),
            encryptions_reserved: 0,
            sealed,
            recovery,
            origin: KeyOrigin::Imported,
            enrolled_on: Vec::new(),
        });
        let receipt = EnrolmentReceipt {
            format: RECEIPT_FORMAT.into(),
            key_id: bundle.key_id.clone(),
            check_value: bundle.check_value.clone(),
            node: node.into(),
            transport_fingerprint: bundle.to.clone(),
        };
        Ok::<_, AdminError>((state, receipt))
    })?;
    Ok(state)
}

/// Registers another control-plane node: from now on a key becomes active here only once
/// that node holds it.
pub fn add_peer(store: &KeyStore, peer: &NodePublic) -> Result<(), AdminError> {
    let public = keywrap::parse_public_pem(
        &peer.transport_public_pem,
        "node transport key",
        std::path::Path::new("node public file"),
        keywrap::MIN_TRANSPORT_BITS,
    )?;
    if keywrap::fingerprint(&public) != peer.transport_fingerprint {
        return Err(AdminError::Refused(
            "the node public file's fingerprint does not match its key: it was altered".into(),
        ));
    }
    store.update(|m| {
        if m.transport
            .as_ref()
            .is_some_and(|t| t.fingerprint == peer.transport_fingerprint)
        {
            return Err(AdminError::Refused(
                "that is this node's own public file".into(),
            ));
        }
        m.add_peer(Peer {
            name: peer.node.clone(),
            transport_fingerprint: peer.transport_fingerprint.clone(),
            transport_public_pem: peer.transport_public_pem.clone(),
            added_at: OffsetDateTime::now_utc(),
        })?;
        Ok::<_, AdminError>(())
    })?;
    Ok(())
}

pub fn remove_peer(store: &KeyStore, name: &str) -> Result<(), AdminError> {
    store.update(|m| Ok::<_, AdminError>(m.remove_peer(name)?))?;
    Ok(())
}

/// Records a peer's enrolment receipt; returns the peer's name.
pub fn confirm(store: &KeyStore, receipt: &EnrolmentReceipt) -> Result<String, AdminError> {
    if receipt.format != RECEIPT_FORMAT {
        return Err(AdminError::Refused(format!(
            "the receipt has format {:?}; expected {RECEIPT_FORMAT:?}",
            receipt.format
        )));
    }
    let (name, _) = store.update(|m| {
        let peer = m
            .peers
            .iter()
            .find(|p| p.transport_fingerprint == receipt.transport_fingerprint)
            .ok_or_else(|| {
                AdminError::Refused(format!(
                    "the receipt comes from a node (transport key {}) that is not a peer here; \
                     add it with `kms-plugin node add-peer`",
                    receipt.transport_fingerprint
                ))
            })?
            .name
            .clone();
        let key = m.get(receipt.key_id.as_str())?;
        if key.check_value != receipt.check_value {
            return Err(AdminError::Refused(format!(
                "the receipt's check value for {} does not match this node's: the peer holds a \
                 different key",
                receipt.key_id
            )));
        }
        m.confirm(receipt.key_id.as_str(), &peer)?;
        Ok::<_, AdminError>(peer)
    })?;
    Ok(name)
}

/// Automatic rotation on a node with peers, phase one: a new decrypt-only key, and a
/// bundle for every peer in `<key store>/outbox/`. It becomes active once every peer's
/// receipt is confirmed.
pub fn stage_for_peers(
    store: &KeyStore,
    backend: &dyn KeyBackend,
) -> Result<(KeyId, Vec<std::path::PathBuf>), AdminError> {
    let id = add(store, backend, KeyState::DecryptOnly)?;
    let manifest = store.load()?;
    let outbox = store.dir().join("outbox");
    std::fs::create_dir_all(&outbox).map_err(|source| KeyStoreError::Io {
        op: "creating",
        path: outbox.clone(),
        source,
    })?;
    let mut written = Vec::new();
    for peer in &manifest.peers {
        let to = NodePublic {
            format: NODE_PUBLIC_FORMAT.into(),
            node: peer.name.clone(),
            backend_fingerprint: String::new(),
            transport_fingerprint: peer.transport_fingerprint.clone(),
            transport_public_pem: peer.transport_public_pem.clone(),
        };
        let bundle = export(store, backend, id.as_str(), &to)?;
        let path = outbox.join(format!("{id}.{}.bundle", sanitize(&peer.name)));
        let json =
            serde_json::to_vec_pretty(&bundle).map_err(|e| AdminError::Refused(e.to_string()))?;
        std::fs::write(&path, json).map_err(|source| KeyStoreError::Io {
            op: "writing",
            path: path.clone(),
            source,
        })?;
        written.push(path);
    }
    Ok((id, written))
}

fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

// ---- Recovery -------------------------------------------------------------------------

/// What `key recover` did.
#[derive(Debug, Default, Serialize)]
pub struct RecoveryReport {
    pub recovered: Vec<String>,
    pub resealed_in_place: Vec<String>,
    pub not_recoverable_retired: Vec<String>,
}

/// Re-seals every key into the current backend after a TPM clear, a motherboard swap or a
/// PCR change: from its recovery-wrapped copy (needs the offline private key), or, for a
/// key without one, by unsealing it where it is. Refuses, changing nothing, if a key in
/// use cannot be recovered.
pub fn recover(
    store: &KeyStore,
    backend: &dyn KeyBackend,
    recovery_private: Option<&rsa::RsaPrivateKey>,
) -> Result<RecoveryReport, AdminError> {
    let (report, _) = store.update(|m| {
        let identity = backend.identity()?;
        let mut report = RecoveryReport::default();
        let mut failures = Vec::new();
        for k in &mut m.keys {
            let kek = match (&k.recovery, recovery_private) {
                (Some(w), Some(private)) => {
                    keywrap::unwrap(private, Purpose::Recovery, &k.id, w).map_err(|e| e.to_string())
                }
                _ => backend.unseal(&k.id, &k.sealed).map_err(|e| e.to_string()),
            };
            let kek = match kek {
                Ok(kek) if check_value(&kek) == k.check_value => kek,
                Ok(_) => {
                    failures.push(format!(
                        "{}: the recovered key does not match its check value",
                        k.id
                    ));
                    continue;
                }
                Err(e) if k.state == KeyState::Retired => {
                    report
                        .not_recoverable_retired
                        .push(format!("{}: {e}", k.id));
                    continue;
                }
                Err(e) => {
                    failures.push(format!("{}: {e}", k.id));
                    continue;
                }
            };
            k.sealed = backend.seal(&k.id, &kek)?;
            if k.recovery.is_some() && recovery_private.is_some() {
                report.recovered.push(k.id.to_string());
            } else {
                report.resealed_in_place.push(k.id.to_string());
            }
        }
        if !failures.is_empty() {
            return Err(AdminError::Refused(format!(
                "nothing was changed, because these keys could not be recovered: {}.{}",
                failures.join("; "),
                if recovery_private.is_none() {
                    " Pass --recovery-private with the offline recovery key."
                } else {
                    ""
                }
            )));
        }
        if m.backend != identity {
            // The transport key lived in the old TPM: a new one is made on next use.
            m.transport = None;
            m.backend = identity;
        }
        Ok::<_, AdminError>(report)
    })?;
    Ok(report)
}
