//! RSA-OAEP (SHA-256) wrapping of KEKs to a public key, from the `rsa` crate: for the
//! offline recovery key (software on both ends) and for enrolling a KEK on another node
//! (this end in software, the other end in that node's TPM with TPM2_RSA_Decrypt).
//!
//! The OAEP label names the purpose and the key id, so a wrapped key cannot be replayed
//! for another purpose or under another id. It ends in a NUL byte because the TPM insists.

use std::path::Path;

use rsa::pkcs1::{DecodeRsaPrivateKey, DecodeRsaPublicKey};
use rsa::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePublicKey, LineEnding};
use rsa::traits::PublicKeyParts;
use rsa::{Oaep, RsaPrivateKey, RsaPublicKey};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::keyid::{KeyId, hex};
use crate::secret::Kek;

/// The smallest recovery key accepted (NIST: 3072-bit RSA for 128-bit security).
pub const MIN_RECOVERY_BITS: usize = 3072;
/// The smallest node transport key accepted (TPMs commonly only do RSA-2048).
pub const MIN_TRANSPORT_BITS: usize = 2048;

#[derive(Debug, thiserror::Error)]
pub enum WrapError {
    #[error("reading {}: {source}", path.display())]
    Read {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} {}: not an RSA key in PEM form (\"PUBLIC KEY\", \"RSA PUBLIC KEY\", \"PRIVATE KEY\" or \"RSA PRIVATE KEY\")", path.display())]
    NotAKey {
        what: &'static str,
        path: std::path::PathBuf,
    },
    #[error("{what} is a {bits}-bit RSA key; at least {min} bits are required")]
    TooSmall {
        what: &'static str,
        bits: usize,
        min: usize,
    },
    #[error("RSA-OAEP wrapping failed: {0}")]
    Wrap(String),
    #[error(
        "the wrapped key for {key_id} could not be unwrapped: wrong private key, or the blob was \
         altered or belongs to another key id"
    )]
    Unwrap { key_id: KeyId },
}

/// What a wrapped key is for; part of the OAEP label.
#[derive(Debug, Clone, Copy)]
pub enum Purpose {
    Recovery,
    Transport,
}

/// The OAEP label for `purpose` and `key_id`, NUL-terminated as TPM2_RSA_Decrypt requires.
/// The key id enters as a hash so the label fits the TPM's 64-byte limit for any id.
pub fn label(purpose: Purpose, key_id: &KeyId) -> String {
    let p = match purpose {
        Purpose::Recovery => "edgeseal/kek-recovery/v1",
        Purpose::Transport => "edgeseal/kek-transport/v1",
    };
    format!(
        "{p} {}\0",
        hex(&Sha256::digest(key_id.as_str().as_bytes())[..16])
    )
}

/// Public identity of an RSA key: SHA-256 of its SubjectPublicKeyInfo, shortened.
pub fn fingerprint(key: &RsaPublicKey) -> String {
    match key.to_public_key_der() {
        Ok(der) => format!("sha256:{}", hex(&Sha256::digest(der.as_bytes())[..16])),
        Err(_) => "sha256:unknown".into(),
    }
}

pub fn public_pem(key: &RsaPublicKey) -> Result<String, WrapError> {
    key.to_public_key_pem(LineEnding::LF)
        .map_err(|e| WrapError::Wrap(e.to_string()))
}

pub fn parse_public_pem(
    pem: &str,
    what: &'static str,
    path: &Path,
    min_bits: usize,
) -> Result<RsaPublicKey, WrapError> {
    let key = RsaPublicKey::from_public_key_pem(pem)
        .or_else(|_| RsaPublicKey::from_pkcs1_pem(pem))
        .map_err(|_| WrapError::NotAKey {
            what,
            path: path.to_owned(),
        })?;
    let bits = key.size() * 8;
    if bits < min_bits {
        return Err(WrapError::TooSmall {
            what,
            bits,
            min: min_bits,
        });
    }
    Ok(key)
}

pub fn read_public(
    path: &Path,
    what: &'static str,
    min_bits: usize,
) -> Result<RsaPublicKey, WrapError> {
    let pem = std::fs::read_to_string(path).map_err(|source| WrapError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse_public_pem(&pem, what, path, min_bits)
}

pub fn read_private(path: &Path, what: &'static str) -> Result<RsaPrivateKey, WrapError> {
    let pem = Zeroizing::new(
        std::fs::read_to_string(path).map_err(|source| WrapError::Read {
            path: path.to_owned(),
            source,
        })?,
    );
    RsaPrivateKey::from_pkcs8_pem(&pem)
        .or_else(|_| RsaPrivateKey::from_pkcs1_pem(&pem))
        .map_err(|_| WrapError::NotAKey {
            what,
            path: path.to_owned(),
        })
}

pub fn wrap(
    to: &RsaPublicKey,
    purpose: Purpose,
    key_id: &KeyId,
    kek: &Kek,
) -> Result<Vec<u8>, WrapError> {
    let padding = Oaep::new_with_label::<Sha256, _>(label(purpose, key_id));
    to.encrypt(&mut rsa::rand_core::OsRng, padding, kek.expose())
        .map_err(|e| WrapError::Wrap(e.to_string()))
}

pub fn unwrap(
    with: &RsaPrivateKey,
    purpose: Purpose,
    key_id: &KeyId,
    wrapped: &[u8],
) -> Result<Kek, WrapError> {
    let padding = Oaep::new_with_label::<Sha256, _>(label(purpose, key_id));
    let fail = || WrapError::Unwrap {
        key_id: key_id.clone(),
    };
    let clear = Zeroizing::new(with.decrypt(padding, wrapped).map_err(|_| fail())?);
    Kek::from_slice(&clear).ok_or_else(fail)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrap_round_trip_and_binding() {
        // 1024 bits keeps the unit test fast; the size floor is checked separately.
        let private = RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 1024).unwrap();
        let public = RsaPublicKey::from(&private);
        let id = KeyId::parse("kek-1").unwrap();
        let kek = Kek::generate().unwrap();
        let w = wrap(&public, Purpose::Recovery, &id, &kek).unwrap();
        assert_eq!(
            unwrap(&private, Purpose::Recovery, &id, &w)
                .unwrap()
                .expose(),
            kek.expose()
        );
        assert!(
            unwrap(&private, Purpose::Transport, &id, &w).is_err(),
            "purpose is bound"
        );
        let other = KeyId::parse("kek-2").unwrap();
        assert!(
            unwrap(&private, Purpose::Recovery, &other, &w).is_err(),
            "key id is bound"
        );
        let pem = public_pem(&public).unwrap();
        let err = parse_public_pem(&pem, "recovery key", Path::new("r.pem"), MIN_RECOVERY_BITS)
            .unwrap_err();
        assert!(err.to_string().contains("1024-bit"), "{err}");
        assert_eq!(
            fingerprint(&parse_public_pem(&pem, "k", Path::new("r.pem"), 1024).unwrap()),
            fingerprint(&public)
        );
        assert!(label(Purpose::Transport, &id).ends_with('\0'));
        let long = KeyId::parse(&"k".repeat(1024)).unwrap();
        assert!(label(Purpose::Transport, &long).len() <= 64);
    }
}
