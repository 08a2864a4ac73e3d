//! The ciphertext formats this plugin returns to kube-apiserver, and the AES-256-GCM
//! construction behind them.
//!
//! ```text
//! format 1 (KMS v2):       0x01 | nonce (12) | AES-256-GCM(seed) | tag (16)
//! format 2 (KMS v1beta1):  0x02 | key_id length (u16 BE) | key_id | nonce (12) | ciphertext | tag (16)
//! associated data:         "edgeseal/kms-envelope" 0x00 | format byte | key_id
//! ```
//!
//! The associated data binds every ciphertext to the format and to the KEK's id, so a
//! ciphertext presented with another key_id, or re-labelled as another format, fails
//! authentication instead of decrypting to garbage. Nonces are random (96 bits); the
//! key ring limits how many are drawn per KEK.

use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce, Tag};

use crate::keyid::KeyId;
use crate::secret::{Kek, Plaintext};

/// Ciphertext for the KMS v2 API, where the apiserver keeps the key_id for us.
pub const FORMAT_V2: u8 = 1;
/// Ciphertext for the v1beta1 API, which has no key_id field: it travels inside.
pub const FORMAT_V1: u8 = 2;

const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
const AAD_DOMAIN: &[u8] = b"edgeseal/kms-envelope\0";

/// kube-apiserver rejects KMS v2 ciphertexts longer than this.
pub const MAX_V2_CIPHERTEXT: usize = 1024;
/// The largest plaintext whose format-1 ciphertext still fits in [`MAX_V2_CIPHERTEXT`].
pub const MAX_PLAINTEXT: usize = MAX_V2_CIPHERTEXT - 1 - NONCE_LEN - TAG_LEN;

/// Why a ciphertext could not be produced or opened. Messages never carry key material
/// or plaintext.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EnvelopeError {
    #[error("plaintext is empty; kube-apiserver always sends a DEK seed")]
    EmptyPlaintext,
    #[error("plaintext is {0} bytes; the limit is {MAX_PLAINTEXT} (a DEK seed is 32)")]
    PlaintextTooLarge(usize),
    #[error("ciphertext is empty")]
    EmptyCiphertext,
    #[error(
        "ciphertext is {len} bytes, shorter than the {min} bytes of any envelope: it was truncated"
    )]
    Truncated { len: usize, min: usize },
    #[error(
        "ciphertext has envelope format {0}, which this plugin version does not know: it was \
         written by a newer plugin or by another KMS provider"
    )]
    UnknownFormat(u8),
    #[error(
        "ciphertext has envelope format {found}, but this API expects format {expected}: it was \
         written through the other KMS API version"
    )]
    WrongFormat { found: u8, expected: u8 },
    #[error("embedded key id is invalid: {0}")]
    BadEmbeddedKeyId(String),
    #[error(
        "ciphertext failed authentication: it was modified or truncated, or it belongs to \
         another key_id"
    )]
    AuthenticationFailed,
    #[error("the system random number generator failed: {0}")]
    Random(String),
}

/// The AES-256-GCM cipher for one KEK, with its key schedule expanded once.
/// Zeroized on drop (the `zeroize` feature of `aes`/`aes-gcm`).
pub struct KekCipher {
    cipher: Aes256Gcm,
}

impl KekCipher {
    pub fn new(kek: &Kek) -> Self {
        Self {
            cipher: Aes256Gcm::new(kek.expose().into()),
        }
    }

    /// Encrypts for the KMS v2 API (format 1).
    pub fn seal_v2(&self, key_id: &KeyId, plaintext: &Plaintext) -> Result<Vec<u8>, EnvelopeError> {
        let mut out = Vec::with_capacity(1 + NONCE_LEN + plaintext.len() + TAG_LEN);
        out.push(FORMAT_V2);
        self.seal_into(out, FORMAT_V2, key_id, plaintext)
    }

    /// Decrypts a format-1 ciphertext under `key_id`.
    pub fn open_v2(&self, key_id: &KeyId, ciphertext: &[u8]) -> Result<Plaintext, EnvelopeError> {
        let parsed = parse_v2(ciphertext)?;
        self.open(FORMAT_V2, key_id, parsed.nonce, parsed.sealed)
    }

    /// Encrypts for the v1beta1 API (format 2, key id embedded).
    pub fn seal_v1(&self, key_id: &KeyId, plaintext: &Plaintext) -> Result<Vec<u8>, EnvelopeError> {
        let id = key_id.as_str().as_bytes();
        let id_len = u16::try_from(id.len())
            .map_err(|_| EnvelopeError::BadEmbeddedKeyId("longer than 65535 bytes".into()))?;
        let mut out = Vec::with_capacity(3 + id.len() + NONCE_LEN + plaintext.len() + TAG_LEN);
        out.push(FORMAT_V1);
        out.extend_from_slice(&id_len.to_be_bytes());
        out.extend_from_slice(id);
        self.seal_into(out, FORMAT_V1, key_id, plaintext)
    }

    /// Decrypts a format-2 ciphertext; the caller found the KEK with [`parse_v1`] first.
    pub fn open_v1(&self, parsed: &ParsedV1<'_>) -> Result<Plaintext, EnvelopeError> {
        self.open(FORMAT_V1, &parsed.key_id, parsed.nonce, parsed.sealed)
    }

    /// Round-trips a random canary through the real cipher: proves the KEK in memory works.
    pub fn self_check(&self, key_id: &KeyId) -> Result<(), EnvelopeError> {
        let mut canary = vec![0u8; 32];
        getrandom::fill(&mut canary).map_err(|e| EnvelopeError::Random(e.to_string()))?;
        let canary = Plaintext::from_vec(canary);
        let sealed = self.seal_v2(key_id, &canary)?;
        let opened = self.open_v2(key_id, &sealed)?;
        if opened.expose() == canary.expose() {
            Ok(())
        } else {
            Err(EnvelopeError::AuthenticationFailed)
        }
    }

    fn seal_into(
        &self,
        mut out: Vec<u8>,
        format: u8,
        key_id: &KeyId,
        plaintext: &Plaintext,
    ) -> Result<Vec<u8>, EnvelopeError> {
        if plaintext.is_empty() {
            return Err(EnvelopeError::EmptyPlaintext);
        }
        if plaintext.len() > MAX_PLAINTEXT {
            return Err(EnvelopeError::PlaintextTooLarge(plaintext.len()));
        }
        let nonce = random_nonce()?;
        out.extend_from_slice(&nonce);
        let body_start = out.len();
        out.extend_from_slice(plaintext.expose());
        let aad = associated_data(format, key_id);
        let tag = self
            .cipher
            .encrypt_in_place_detached(Nonce::from_slice(&nonce), &aad, &mut out[body_start..])
            // Only fails for plaintexts beyond GCM's 64 GiB limit, excluded above.
            .map_err(|_| EnvelopeError::PlaintextTooLarge(plaintext.len()))?;
        out.extend_from_slice(&tag);
        Ok(out)
    }

    fn open(
        &self,
        format: u8,
        key_id: &KeyId,
        nonce: &[u8],
        sealed: &[u8],
    ) -> Result<Plaintext, EnvelopeError> {
        let Some(body_len) = sealed.len().checked_sub(TAG_LEN) else {
            return Err(EnvelopeError::AuthenticationFailed);
        };
        let (body, tag) = sealed.split_at(body_len);
        let mut buf = body.to_vec();
        let aad = associated_data(format, key_id);
        match self.cipher.decrypt_in_place_detached(
            Nonce::from_slice(nonce),
            &aad,
            &mut buf,
            Tag::from_slice(tag),
        ) {
            Ok(()) => Ok(Plaintext::from_vec(buf)),
            Err(_) => Err(EnvelopeError::AuthenticationFailed),
        }
    }
}

fn associated_data(format: u8, key_id: &KeyId) -> Vec<u8> {
    let id = key_id.as_str().as_bytes();
    let mut aad = Vec::with_capacity(AAD_DOMAIN.len() + 1 + id.len());
    aad.extend_from_slice(AAD_DOMAIN);
    aad.push(format);
    aad.extend_from_slice(id);
    aad
}

/// The parts of a format-1 ciphertext. `sealed` is the encrypted body followed by the tag.
pub struct ParsedV2<'a> {
    pub nonce: &'a [u8],
    pub sealed: &'a [u8],
}

/// Splits a format-1 ciphertext without decrypting it.
pub fn parse_v2(ciphertext: &[u8]) -> Result<ParsedV2<'_>, EnvelopeError> {
    let (&format, rest) = ciphertext
        .split_first()
        .ok_or(EnvelopeError::EmptyCiphertext)?;
    check_format(format, FORMAT_V2)?;
    // At least one byte of plaintext: Encrypt never seals an empty one.
    let min = 1 + NONCE_LEN + 1 + TAG_LEN;
    if ciphertext.len() < min {
        return Err(EnvelopeError::Truncated {
            len: ciphertext.len(),
            min,
        });
    }
    let (nonce, sealed) = rest.split_at(NONCE_LEN);
    Ok(ParsedV2 { nonce, sealed })
}

/// The parts of a format-2 ciphertext.
pub struct ParsedV1<'a> {
    pub key_id: KeyId,
    pub nonce: &'a [u8],
    pub sealed: &'a [u8],
}

/// Splits a format-2 ciphertext and reads the key id it names.
pub fn parse_v1(ciphertext: &[u8]) -> Result<ParsedV1<'_>, EnvelopeError> {
    let (&format, rest) = ciphertext
        .split_first()
        .ok_or(EnvelopeError::EmptyCiphertext)?;
    check_format(format, FORMAT_V1)?;
    let truncated = || EnvelopeError::Truncated {
        len: ciphertext.len(),
        min: 3 + 1 + NONCE_LEN + 1 + TAG_LEN,
    };
    let (len_bytes, rest) = rest.split_first_chunk::<2>().ok_or_else(truncated)?;
    let id_len = usize::from(u16::from_be_bytes(*len_bytes));
    if rest.len() < id_len + NONCE_LEN + 1 + TAG_LEN {
        return Err(truncated());
    }
    let (id, rest) = rest.split_at(id_len);
    let id =
        std::str::from_utf8(id).map_err(|_| EnvelopeError::BadEmbeddedKeyId("not UTF-8".into()))?;
    let key_id = KeyId::parse(id).map_err(|e| EnvelopeError::BadEmbeddedKeyId(e.to_string()))?;
    let (nonce, sealed) = rest.split_at(NONCE_LEN);
    Ok(ParsedV1 {
        key_id,
        nonce,
        sealed,
    })
}

fn check_format(found: u8, expected: u8) -> Result<(), EnvelopeError> {
    match found {
        f if f == expected => Ok(()),
        FORMAT_V1 | FORMAT_V2 => Err(EnvelopeError::WrongFormat { found, expected }),
        other => Err(EnvelopeError::UnknownFormat(other)),
    }
}

/// Nonces taken from the OS generator per thread in batches of [`NONCES_PER_FILL`]: one
/// `getrandom` call per batch instead of one per Encrypt. Each nonce is still 96 bits
/// straight from the OS generator, used once; nonces are not secret, so the batch needs no
/// zeroizing.
const NONCES_PER_FILL: usize = 32;

struct NoncePool {
    bytes: [u8; NONCE_LEN * NONCES_PER_FILL],
    next: usize,
}

thread_local! {
    static NONCES: std::cell::RefCell<NoncePool> = const {
        std::cell::RefCell::new(NoncePool {
            bytes: [0; NONCE_LEN * NONCES_PER_FILL],
            next: NONCES_PER_FILL,
        })
    };
}

fn random_nonce() -> Result<[u8; NONCE_LEN], EnvelopeError> {
    NONCES.with(|pool| {
        let mut pool = pool.borrow_mut();
        if pool.next == NONCES_PER_FILL {
            getrandom::fill(&mut pool.bytes).map_err(|e| EnvelopeError::Random(e.to_string()))?;
            pool.next = 0;
        }
        let at = pool.next * NONCE_LEN;
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&pool.bytes[at..at + NONCE_LEN]);
        pool.next += 1;
        Ok(nonce)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cipher() -> (KekCipher, KeyId) {
        let kek = Kek::generate().unwrap();
        (KekCipher::new(&kek), KeyId::parse("kek-0001-test").unwrap())
    }

    fn seed() -> Plaintext {
        Plaintext::from_vec((0u8..32).collect())
    }

    #[test]
    fn nonces_are_distinct_across_batches_and_threads() {
        let mine: Vec<_> = (0..10 * NONCES_PER_FILL + 3)
            .map(|_| random_nonce().unwrap())
            .collect();
        let other = std::thread::spawn(|| {
            (0..100)
                .map(|_| random_nonce().unwrap())
                .collect::<Vec<_>>()
        })
        .join()
        .unwrap();
        let all: std::collections::HashSet<_> = mine.iter().chain(&other).collect();
        assert_eq!(all.len(), mine.len() + other.len());
        assert!(!all.contains(&[0u8; NONCE_LEN]));
    }

    #[test]
    fn v2_round_trip_and_size() {
        let (c, id) = cipher();
        let ct = c.seal_v2(&id, &seed()).unwrap();
        assert_eq!(ct.len(), 1 + 12 + 32 + 16);
        assert_eq!(c.open_v2(&id, &ct).unwrap().expose(), seed().expose());
        // Two encryptions of the same seed differ (random nonce).
        assert_ne!(ct, c.seal_v2(&id, &seed()).unwrap());
    }

    #[test]
    fn largest_plaintext_fits_the_apiserver_limit() {
        let (c, id) = cipher();
        let big = Plaintext::from_vec(vec![7; MAX_PLAINTEXT]);
        assert_eq!(c.seal_v2(&id, &big).unwrap().len(), MAX_V2_CIPHERTEXT);
        let too_big = Plaintext::from_vec(vec![7; MAX_PLAINTEXT + 1]);
        assert_eq!(
            c.seal_v2(&id, &too_big).err(),
            Some(EnvelopeError::PlaintextTooLarge(MAX_PLAINTEXT + 1))
        );
        assert_eq!(
            c.seal_v2(&id, &Plaintext::from_vec(vec![])).err(),
            Some(EnvelopeError::EmptyPlaintext)
        );
    }

    #[test]
    fn every_bit_flip_is_detected() {
        let (c, id) = cipher();
        let ct = c.seal_v2(&id, &seed()).unwrap();
        for i in 0..ct.len() * 8 {
            let mut bad = ct.clone();
            bad[i / 8] ^= 1 << (i % 8);
            assert!(
                c.open_v2(&id, &bad).is_err(),
                "flip of bit {i} went unnoticed"
            );
        }
    }

    #[test]
    fn every_truncation_is_detected() {
        let (c, id) = cipher();
        let ct = c.seal_v2(&id, &seed()).unwrap();
        for n in 0..ct.len() {
            assert!(
                c.open_v2(&id, &ct[..n]).is_err(),
                "truncation to {n} went unnoticed"
            );
        }
    }

    #[test]
    fn key_id_is_bound() {
        let (c, id) = cipher();
        let ct = c.seal_v2(&id, &seed()).unwrap();
        let other = KeyId::parse("kek-0002-test").unwrap();
        assert_eq!(
            c.open_v2(&other, &ct).err(),
            Some(EnvelopeError::AuthenticationFailed)
        );
    }

    #[test]
    fn other_key_fails() {
        let (c, id) = cipher();
        let (c2, _) = cipher();
        let ct = c.seal_v2(&id, &seed()).unwrap();
        assert_eq!(
            c2.open_v2(&id, &ct).err(),
            Some(EnvelopeError::AuthenticationFailed)
        );
    }

    #[test]
    fn formats_are_told_apart() {
        let (c, id) = cipher();
        let v1 = c.seal_v1(&id, &seed()).unwrap();
        assert_eq!(
            c.open_v2(&id, &v1).err(),
            Some(EnvelopeError::WrongFormat {
                found: FORMAT_V1,
                expected: FORMAT_V2
            })
        );
        let parsed = parse_v1(&v1).unwrap();
        assert_eq!(parsed.key_id, id);
        assert_eq!(c.open_v1(&parsed).unwrap().expose(), seed().expose());
        let mut unknown = c.seal_v2(&id, &seed()).unwrap();
        unknown[0] = 9;
        assert_eq!(
            c.open_v2(&id, &unknown).err(),
            Some(EnvelopeError::UnknownFormat(9))
        );
        // Relabelling a v1 ciphertext's body as v2 fails authentication.
        let mut relabelled = vec![FORMAT_V2];
        relabelled.extend_from_slice(parsed.nonce);
        relabelled.extend_from_slice(parsed.sealed);
        assert_eq!(
            c.open_v2(&id, &relabelled).err(),
            Some(EnvelopeError::AuthenticationFailed)
        );
    }

    #[test]
    fn v1_parser_survives_garbage() {
        for len in 0..80 {
            let junk: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
            let mut framed = vec![FORMAT_V1];
            framed.extend_from_slice(&junk);
            let _ = parse_v1(&framed);
            let _ = parse_v2(&junk);
        }
        assert!(matches!(
            parse_v1(&[FORMAT_V1, 0xff, 0xff, 1, 2]),
            Err(EnvelopeError::Truncated { .. })
        ));
    }

    #[test]
    fn self_check_passes() {
        let (c, id) = cipher();
        c.self_check(&id).unwrap();
    }

    mod properties {
        use proptest::prelude::*;

        use super::*;

        fn key_id() -> impl Strategy<Value = KeyId> {
            "[a-z0-9][a-z0-9.-]{0,200}".prop_map(|s| KeyId::parse(&s).unwrap())
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            /// Every plaintext the apiserver may send round-trips, in both formats, and
            /// the v2 ciphertext always fits the apiserver's 1 KiB limit.
            #[test]
            fn round_trips(pt in proptest::collection::vec(any::<u8>(), 1..=MAX_PLAINTEXT), id in key_id()) {
                let kek = Kek::generate().unwrap();
                let c = KekCipher::new(&kek);
                let p = Plaintext::from_vec(pt.clone());
                let v2 = c.seal_v2(&id, &p).unwrap();
                prop_assert!(v2.len() <= MAX_V2_CIPHERTEXT);
                let opened = c.open_v2(&id, &v2).unwrap();
                prop_assert_eq!(opened.expose(), &pt[..]);
                let v1 = c.seal_v1(&id, &p).unwrap();
                let parsed = parse_v1(&v1).unwrap();
                prop_assert_eq!(&parsed.key_id, &id);
                let opened = c.open_v1(&parsed).unwrap();
                prop_assert_eq!(opened.expose(), &pt[..]);
            }

            /// Changing any byte of a ciphertext to any other value is detected.
            #[test]
            fn any_change_is_detected(pt in proptest::collection::vec(any::<u8>(), 1..64), pos in any::<prop::sample::Index>(), delta in 1u8..=255) {
                let kek = Kek::generate().unwrap();
                let c = KekCipher::new(&kek);
                let id = KeyId::parse("kek-0001-prop").unwrap();
                let mut ct = c.seal_v2(&id, &Plaintext::from_vec(pt)).unwrap();
                let i = pos.index(ct.len());
                ct[i] = ct[i].wrapping_add(delta);
                prop_assert!(c.open_v2(&id, &ct).is_err());
            }

            /// The parsers never panic, whatever they are given.
            #[test]
            fn parsers_survive_anything(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
                let _ = parse_v1(&bytes);
                let _ = parse_v2(&bytes);
            }
        }
    }
}
