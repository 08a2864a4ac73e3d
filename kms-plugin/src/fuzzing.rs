//! Fuzz target bodies, one function per target of `tests/fuzz` (a separate workspace built
//! with libFuzzer). They live here, not in the fuzz workspace, so that the replay test
//! (`tests/fuzz_replay_kms.rs`) runs every committed corpus and regression input through
//! exactly the code the fuzzer runs. Each takes arbitrary bytes, must never panic, and
//! asserts the invariants of what it parsed: a failed assertion is a finding.
//!
//! Not part of the plugin's API: nothing outside the fuzz harness and the replay test
//! calls these.

use std::path::Path;
use std::sync::OnceLock;

use time::OffsetDateTime;

use crate::backend::tpm::blob::TpmBlob;
use crate::backend::tpm::pcr::PcrPolicy;
use crate::envelope::{
    self, EnvelopeError, FORMAT_V1, FORMAT_V2, KekCipher, MAX_PLAINTEXT, MAX_V2_CIPHERTEXT,
};
use crate::keyid::KeyId;
use crate::keystore::{KeyState, KeyStore};
use crate::secret::{Kek, Plaintext};

/// The fixed KEK the `envelope` target decrypts with; its seed corpus holds ciphertexts
/// sealed under it, so the fuzzer starts from inputs that pass authentication.
pub const FUZZ_KEK: [u8; 32] = *b"edgeseal fuzzing key, not secret";
/// The key id those seed ciphertexts are bound to.
pub const FUZZ_KEY_ID: &str = "kek-0001-fuzz";

/// A target body: takes any bytes, panics only on a finding.
pub type Target = fn(&[u8]);

/// Every target: its name (the `[[bin]]` in `tests/fuzz/Cargo.toml` and the folder under
/// `tests/fuzz/corpus/` and `tests/fuzz/regressions/`) and its body.
pub const TARGETS: &[(&str, Target)] = &[
    ("envelope", envelope),
    ("manifest", manifest),
    ("tpm_blob", tpm_blob),
    ("http2_authority", http2_authority),
    ("hpack", hpack),
];

// The layout in envelope.rs: format byte, 96-bit nonce, body, 128-bit GCM tag.
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;

/// The fixed cipher and key id (built once: the key schedule is not what is fuzzed).
pub fn fuzz_cipher() -> &'static (KekCipher, KeyId) {
    static CIPHER: OnceLock<(KekCipher, KeyId)> = OnceLock::new();
    CIPHER.get_or_init(|| {
        let kek = Kek::from_slice(&FUZZ_KEK).unwrap_or_else(|| unreachable!("32 bytes"));
        let id = KeyId::parse(FUZZ_KEY_ID).unwrap_or_else(|_| unreachable!("a valid id"));
        (KekCipher::new(&kek), id)
    })
}

/// `envelope`: both ciphertext parsers, decryption of what they accept with the fixed
/// key, and the input as a plaintext sealed and opened in both formats.
pub fn envelope(data: &[u8]) {
    let (cipher, key_id) = fuzz_cipher();
    let within = |part: &[u8]| {
        let (outer, inner) = (data.as_ptr_range(), part.as_ptr_range());
        outer.start <= inner.start && inner.end <= outer.end
    };

    if let Ok(p) = envelope::parse_v2(data) {
        assert_eq!(data[0], FORMAT_V2);
        assert_eq!(p.nonce.len(), NONCE_LEN);
        assert!(
            p.sealed.len() > TAG_LEN,
            "a v2 envelope holds at least one byte"
        );
        assert!(within(p.nonce) && within(p.sealed));
        assert_eq!(1 + p.nonce.len() + p.sealed.len(), data.len());
        match cipher.open_v2(key_id, data) {
            Ok(pt) => {
                assert_eq!(pt.len(), p.sealed.len() - TAG_LEN);
                // The format is authenticated: the same body framed as v1 does not open.
                let mut relabelled = vec![FORMAT_V1];
                relabelled.extend_from_slice(&(FUZZ_KEY_ID.len() as u16).to_be_bytes());
                relabelled.extend_from_slice(FUZZ_KEY_ID.as_bytes());
                relabelled.extend_from_slice(p.nonce);
                relabelled.extend_from_slice(p.sealed);
                let reframed = envelope::parse_v1(&relabelled);
                assert!(reframed.is_ok_and(|r| cipher.open_v1(&r).is_err()));
            }
            Err(e) => assert_eq!(e, EnvelopeError::AuthenticationFailed),
        }
    }

    if let Ok(p) = envelope::parse_v1(data) {
        assert_eq!(data[0], FORMAT_V1);
        let id = p.key_id.as_str().as_bytes();
        assert_eq!(
            usize::from(u16::from_be_bytes([data[1], data[2]])),
            id.len()
        );
        assert_eq!(&data[3..3 + id.len()], id, "the key id is the one embedded");
        assert_eq!(p.nonce.len(), NONCE_LEN);
        assert!(p.sealed.len() > TAG_LEN);
        assert!(within(p.nonce) && within(p.sealed));
        assert_eq!(3 + id.len() + p.nonce.len() + p.sealed.len(), data.len());
        match cipher.open_v1(&p) {
            Ok(pt) => {
                assert_eq!(pt.len(), p.sealed.len() - TAG_LEN);
                // The format and the key id are authenticated: the same body does not
                // open as v2, under this key id or the fixed one.
                let mut relabelled = vec![FORMAT_V2];
                relabelled.extend_from_slice(p.nonce);
                relabelled.extend_from_slice(p.sealed);
                assert!(cipher.open_v2(&p.key_id, &relabelled).is_err());
                assert!(cipher.open_v2(key_id, &relabelled).is_err());
            }
            Err(e) => assert_eq!(e, EnvelopeError::AuthenticationFailed),
        }
    }

    // The input as a plaintext: whatever the apiserver sends round-trips.
    if (1..=MAX_PLAINTEXT).contains(&data.len()) {
        let pt = Plaintext::from_vec(data.to_vec());
        let Ok(v2) = cipher.seal_v2(key_id, &pt) else {
            unreachable!("sealing a plaintext within the limits fails only without randomness")
        };
        assert!(v2.len() <= MAX_V2_CIPHERTEXT);
        assert!(matches!(cipher.open_v2(key_id, &v2), Ok(back) if back.expose() == data));
        let Ok(v1) = cipher.seal_v1(key_id, &pt) else {
            unreachable!("sealing a plaintext within the limits fails only without randomness")
        };
        let Ok(parsed) = envelope::parse_v1(&v1) else {
            unreachable!("a v1 envelope we sealed parses")
        };
        assert_eq!(&parsed.key_id, key_id);
        assert!(matches!(cipher.open_v1(&parsed), Ok(back) if back.expose() == data));
    }
}

/// `manifest`: the key store's manifest loader (JSON, then every invariant). What it
/// accepts must be written back (as `KeyStore` writes it) into bytes that load to the same
/// manifest, and the lifecycle operations must keep a valid manifest valid.
pub fn manifest(data: &[u8]) {
    let path = Path::new("manifest.json");
    let Ok(m) = KeyStore::parse(path, data) else {
        return;
    };
    // Serialized as `KeyStore::write` does.
    let first = match serde_json::to_vec_pretty(&m) {
        Ok(b) => b,
        Err(e) => unreachable!("a loaded manifest cannot be written back: {e}"),
    };
    let again = match KeyStore::parse(path, &first) {
        Ok(m) => m,
        Err(e) => unreachable!("a written manifest does not load: {e}"),
    };
    let second = serde_json::to_vec_pretty(&again).unwrap_or_default();
    assert!(first == second, "write -> load -> write is not stable");

    let now = OffsetDateTime::UNIX_EPOCH;
    for k in &m.keys {
        let id = k.id.as_str();
        let mut promoted = m.clone();
        if promoted.promote(id, now, true).is_ok() {
            assert_eq!(promoted.validate(), Ok(()));
            assert_eq!(promoted.active().map(|a| a.id.as_str()), Some(id));
        }
        let mut retired = m.clone();
        if retired.retire(id, now).is_ok() {
            assert_eq!(retired.validate(), Ok(()));
            assert_eq!(retired.get(id).map(|r| r.state), Ok(KeyState::Retired));
            assert!(retired.reinstate(id, now).is_ok());
            assert_eq!(retired.validate(), Ok(()));
        }
        let mut reserved = m.clone();
        let before = k.encryptions_reserved;
        if let Ok((from, to)) = reserved.reserve(id, 0, 1000) {
            assert!(from >= before && to >= from);
            assert_eq!(reserved.validate(), Ok(()));
        }
    }
}

/// `tpm_blob`: the TPM-sealed key blob (plain data, built without the `tpm` feature):
/// decoding is exact, so what decodes encodes back to the same bytes. The input is also
/// tried as a `--pcr-policy` string, whose parse -> display -> parse must be stable.
pub fn tpm_blob(data: &[u8]) {
    if let Ok(blob) = TpmBlob::decode(data) {
        assert!(blob.encode() == data, "decode -> encode changed the blob");
    }
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(policy) = PcrPolicy::parse(text)
    {
        assert_eq!(PcrPolicy::parse(&policy.to_string()), Ok(policy));
        assert_eq!(PcrPolicy::decode(policy.encode()), Some(policy));
    }
}

/// `http2_authority`: the Unix-socket `:authority` layer on a client's byte stream (the
/// input, after the connection preface). Whatever the bytes, it must not panic, and the
/// way they arrive must not matter: fed whole, byte by byte, or in chunks cut by the
/// input itself, it gives the same output bytes and the same verdict.
pub fn http2_authority(data: &[u8]) {
    use crate::server::authority::Rewriter;
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let input = [PREFACE, data].concat();
    let run = |chunks: &mut dyn Iterator<Item = &[u8]>| {
        let mut r = Rewriter::new();
        let mut out = Vec::new();
        for c in chunks {
            if r.feed(c).is_err() {
                // Output already handed on before the error stays handed on.
                out.extend_from_slice(r.output());
                return (out, false);
            }
            out.extend_from_slice(&r.output().split());
        }
        (out, true)
    };
    let whole = run(&mut std::iter::once(&input[..]));
    let bytewise = run(&mut input.chunks(1));
    let step = usize::from(data.first().copied().unwrap_or(7)).max(1);
    let chunked = run(&mut input.chunks(step));
    assert_eq!(
        whole.1, bytewise.1,
        "the verdict depends on how the bytes arrive"
    );
    assert_eq!(
        whole.1, chunked.1,
        "the verdict depends on how the bytes arrive"
    );
    if whole.1 {
        assert_eq!(
            whole.0, bytewise.0,
            "the output depends on how the bytes arrive"
        );
        assert_eq!(
            whole.0, chunked.0,
            "the output depends on how the bytes arrive"
        );
    }
}

/// `hpack`: our HPACK decoder (`server::hpack`) against `loona-hpack`, block after block
/// on one connection's tables: both accept the same blocks with the same fields, until
/// the first block either refuses. The input is blocks, each a length byte and that many
/// bytes. One difference is by design: a table size update after a field, which RFC 7541
/// §4.2 forbids and loona-hpack lets through, is refused here.
pub fn hpack(data: &[u8]) {
    use crate::server::hpack::{Decoder, Flow, HpackError};
    let mut ours = Decoder::new(4096);
    let mut reference = loona_hpack::Decoder::new();
    reference.set_max_allowed_table_size(4096);
    let mut rest = data;
    while let Some((&len, tail)) = rest.split_first() {
        let len = usize::from(len).min(tail.len());
        let (block, tail) = tail.split_at(len);
        rest = tail;
        let mut got = Vec::new();
        let r = ours.decode(block, |n, v| {
            got.push((n.to_vec(), v.to_vec()));
            Flow::Continue
        });
        let want = reference.decode(block);
        if r == Err(HpackError::LateSizeUpdate) {
            return;
        }
        assert_eq!(
            r.is_ok(),
            want.is_ok(),
            "one decoder accepts a block the other refuses: ours {r:?}, loona-hpack {want:?}"
        );
        match want {
            Ok(want) => assert_eq!(got, want, "the decoders disagree on a field"),
            Err(_) => return,
        }
    }
}
