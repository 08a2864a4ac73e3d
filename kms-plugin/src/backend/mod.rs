//! The key-backend seam: whatever protects KEKs at rest (the TPM in production, a root-key
//! file for development) implements [`KeyBackend`]. The key ring never sees how.

pub mod software;
pub mod tpm;

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::keyid::KeyId;
use crate::secret::Kek;

/// A KEK in the form the backend keeps at rest. Not secret: useless without the backend.
#[derive(Clone, PartialEq, Eq)]
pub struct SealedKek(pub Vec<u8>);

impl fmt::Debug for SealedKek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SealedKek({} bytes)", self.0.len())
    }
}

/// Which backend sealed a key store, and a public fingerprint of the sealing root
/// (root-key check value, TPM storage key name). Recorded in the manifest and checked at
/// every start, so "sealed elsewhere" is reported as exactly that.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendIdentity {
    pub kind: BackendKind,
    pub fingerprint: String,
}

/// The backends this build knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum BackendKind {
    /// KEKs sealed to the node's TPM 2.0 (production).
    Tpm,
    /// KEKs wrapped by a root-key file on disk. Development and CI only: anyone who can
    /// read the key store directory and the root key can decrypt every secret.
    #[value(name = "insecure-software", alias = "software")]
    #[serde(rename = "insecure-software")]
    InsecureSoftware,
}

impl BackendKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Tpm => "tpm",
            BackendKind::InsecureSoftware => "insecure-software",
        }
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Errors of a backend. Messages name the device or file and the likely fix.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "root key file {} is readable or writable by group or others (mode {mode:o}); \
         run: chmod 600 {}", path.display(), path.display()
    )]
    RootKeyPermissions { path: PathBuf, mode: u32 },
    #[error("root key file {} holds {len} bytes; it must hold exactly 32", path.display())]
    RootKeyLength { path: PathBuf, len: usize },
    #[error(
        "this key store was sealed by {recorded} ({recorded_fp}), but the configured backend is \
         {current} ({current_fp}): {hint}"
    )]
    WrongRoot {
        recorded: BackendKind,
        recorded_fp: String,
        current: BackendKind,
        current_fp: String,
        hint: &'static str,
    },
    #[error("sealed key {key_id} could not be unsealed: {reason}")]
    Unseal { key_id: KeyId, reason: String },
    #[error("the system random number generator failed: {0}")]
    Random(String),
    #[error("the {0} backend is not available in this build: {1}")]
    Unavailable(BackendKind, &'static str),
    #[error("TPM: {0}")]
    Tpm(String),
}

/// Seals and unseals KEKs. Implementations are blocking (a TPM call takes milliseconds):
/// async callers go through `spawn_blocking`.
pub trait KeyBackend: Send + Sync {
    fn kind(&self) -> BackendKind;

    /// The public identity of the sealing root, recorded in the manifest at `key init`.
    fn identity(&self) -> Result<BackendIdentity, BackendError>;

    /// Checks that this backend is the one that sealed a key store.
    fn verify_identity(&self, recorded: &BackendIdentity) -> Result<(), BackendError> {
        let current = self.identity()?;
        if &current == recorded {
            return Ok(());
        }
        Err(BackendError::WrongRoot {
            recorded: recorded.kind,
            recorded_fp: recorded.fingerprint.clone(),
            current: current.kind,
            current_fp: current.fingerprint,
            hint: "point --backend (and its root key or TPM) at the ones this key store was \
                   created with, or recover the keys with the recovery key",
        })
    }

    /// Seals a new KEK for storage. `key_id` is bound to the sealed form.
    fn seal(&self, key_id: &KeyId, kek: &Kek) -> Result<SealedKek, BackendError>;

    /// Recovers a KEK sealed by [`KeyBackend::seal`].
    fn unseal(&self, key_id: &KeyId, sealed: &SealedKek) -> Result<Kek, BackendError>;

    /// Whether the backend can seal and unseal right now (a TPM may have gone away).
    fn health(&self) -> Result<(), BackendError>;

    /// Creates this node's transport key: a decryption key that never leaves the backend,
    /// to which other nodes wrap the KEKs they enroll here. Returns its sealed form and
    /// its public half.
    fn create_transport_key(&self) -> Result<(SealedKek, rsa::RsaPublicKey), BackendError> {
        Err(BackendError::Unavailable(
            self.kind(),
            "enrolling keys from other nodes needs a backend that can hold a private key \
             (--backend tpm)",
        ))
    }

    /// Unwraps a KEK that another node wrapped to this node's transport key
    /// (RSA-OAEP-SHA256 with `label`).
    fn transport_unwrap(
        &self,
        transport: &SealedKek,
        key_id: &KeyId,
        label: &str,
        wrapped: &[u8],
    ) -> Result<Kek, BackendError> {
        let _ = (transport, key_id, label, wrapped);
        Err(BackendError::Unavailable(
            self.kind(),
            "it has no transport key",
        ))
    }
}

/// Opens the configured backend. `create` lets the software backend make its root key
/// (at `key init` and `serve --auto-init`); everything else needs an existing one.
pub fn open(
    cfg: &crate::config::StoreConfig,
    create: bool,
) -> Result<std::sync::Arc<dyn KeyBackend>, BackendError> {
    match cfg.backend {
        BackendKind::InsecureSoftware => {
            let b = if create {
                software::SoftwareBackend::create_or_open(&cfg.insecure_root_key)?
            } else {
                software::SoftwareBackend::open(&cfg.insecure_root_key)?
            };
            Ok(std::sync::Arc::new(b))
        }
        #[cfg(feature = "tpm")]
        BackendKind::Tpm => Ok(std::sync::Arc::new(tpm::TpmBackend::open(cfg.tpm.clone())?)),
        #[cfg(not(feature = "tpm"))]
        BackendKind::Tpm => Err(BackendError::Unavailable(
            BackendKind::Tpm,
            "it was built without the `tpm` feature; rebuild with `--features tpm` \
             (needs libtss2-dev)",
        )),
    }
}
