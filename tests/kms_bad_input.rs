//! Bad requests: each gets the right gRPC code and a message an operator can act on,
//! never a success or a wrong plaintext, and the plugin keeps serving afterwards.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::{Plugin, Store};
use kms_proto::v1beta1;
use kms_proto::v2::key_management_service_client::KeyManagementServiceClient;
use kms_proto::v2::{DecryptRequest, EncryptRequest, EncryptResponse, StatusRequest};
use rand::{Rng, RngCore};
use tonic::transport::Channel;
use tonic::{Code, Status};

type V2 = KeyManagementServiceClient<Channel>;

const ANNOTATION_KEY: &str = "v1.envelope.edgeseal.io";
/// The largest plaintext whose ciphertext (1 + 12 nonce + n + 16 tag) fits in 1024 bytes.
const MAX_PLAINTEXT: usize = 995;

fn random_bytes(n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    rand::rng().fill_bytes(&mut v);
    v
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A running plugin, a client, and every plaintext a test sent, so that error messages
/// and logs can be searched for them at the end.
struct Fixture {
    store: Store,
    plugin: Plugin,
    c: V2,
    plaintexts: Vec<Vec<u8>>,
    messages: Vec<String>,
}

impl Fixture {
    async fn start() -> Self {
        let store = Store::init();
        let plugin = Plugin::start(&store, &[]).await;
        let c = plugin.v2().await;
        Self {
            store,
            plugin,
            c,
            plaintexts: Vec::new(),
            messages: Vec::new(),
        }
    }

    async fn encrypt(&mut self, plaintext: Vec<u8>) -> Result<EncryptResponse, Status> {
        self.plaintexts.push(plaintext.clone());
        let r = self
            .c
            .encrypt(EncryptRequest {
                plaintext,
                uid: "bad-input".into(),
            })
            .await;
        r.map(tonic::Response::into_inner)
    }

    /// A valid ciphertext of a fresh 32-byte seed: (seed, response).
    async fn sealed_seed(&mut self) -> (Vec<u8>, EncryptResponse) {
        let seed = random_bytes(32);
        let enc = self.encrypt(seed.clone()).await.unwrap();
        (seed, enc)
    }

    async fn decrypt(
        &mut self,
        ciphertext: Vec<u8>,
        key_id: &str,
        annotations: HashMap<String, Vec<u8>>,
    ) -> Result<Vec<u8>, Status> {
        let req = DecryptRequest {
            ciphertext,
            uid: "bad-input".into(),
            key_id: key_id.into(),
            annotations,
        };
        self.c.decrypt(req).await.map(|r| r.into_inner().plaintext)
    }

    /// Checks a refusal: one of `codes`, a message naming the problem (`hint`), and the
    /// plugin still does a normal round trip afterwards.
    async fn refused<T: std::fmt::Debug>(
        &mut self,
        what: &str,
        r: Result<T, Status>,
        codes: &[Code],
        hint: &str,
    ) -> Status {
        let err = match r {
            Ok(v) => panic!("{what}: accepted, answered {v:?}"),
            Err(e) => e,
        };
        assert!(
            !err.message().trim().is_empty(),
            "{what}: {:?} with an empty message",
            err.code()
        );
        assert!(
            codes.contains(&err.code()),
            "{what}: code {:?}, want one of {codes:?}: {}",
            err.code(),
            err.message()
        );
        assert!(
            err.message().to_lowercase().contains(&hint.to_lowercase()),
            "{what}: message does not say {hint:?}: {}",
            err.message()
        );
        self.messages.push(err.message().to_owned());
        self.round_trip(what).await;
        err
    }

    /// A normal Encrypt + Decrypt, as the apiserver would make next.
    async fn round_trip(&mut self, after: &str) {
        let (seed, enc) = self.sealed_seed().await;
        let back = self
            .decrypt(enc.ciphertext, &enc.key_id, enc.annotations)
            .await;
        assert_eq!(
            back.unwrap_or_else(|e| panic!("round trip after {after}: {e:?}")),
            seed
        );
    }

    /// The end of every test: the process is alive, a brand-new connection works, and no
    /// error message or log line carries a plaintext in hex.
    async fn finish(mut self) {
        assert!(
            self.plugin.child.try_wait().unwrap().is_none(),
            "the plugin exited:\n{}",
            self.plugin.logs()
        );
        self.c = self.plugin.v2().await;
        let st = self.c.status(StatusRequest {}).await.unwrap().into_inner();
        assert_eq!(st.healthz, "ok");
        self.round_trip("the test").await;
        let logs = self.plugin.logs();
        // An empty plaintext has an empty hex form, found in everything: skip it.
        for p in self.plaintexts.iter().filter(|p| !p.is_empty()) {
            // 16 bytes are plenty to recognise a leak and avoid chance matches.
            let h = hex(&p[..p.len().min(16)]);
            for m in &self.messages {
                assert!(
                    !m.to_lowercase().contains(&h),
                    "an error message carries a plaintext: {m}"
                );
            }
            assert!(!logs.contains(&h), "the logs carry a plaintext in hex");
        }
    }
}

fn annotations() -> HashMap<String, Vec<u8>> {
    HashMap::from([(ANNOTATION_KEY.to_owned(), b"1".to_vec())])
}

#[tokio::test]
async fn encrypt_refuses_empty_plaintext() {
    let mut f = Fixture::start().await;
    let r = f.encrypt(Vec::new()).await;
    f.refused(
        "empty plaintext",
        r,
        &[Code::InvalidArgument],
        "plaintext is empty",
    )
    .await;
    f.finish().await;
}

/// 995 bytes is the most that fits the apiserver's 1024-byte ciphertext limit; 996 is refused
/// with a message giving the limit.
#[tokio::test]
async fn encrypt_plaintext_size_limit() {
    let mut f = Fixture::start().await;
    let largest = random_bytes(MAX_PLAINTEXT);
    let enc = f.encrypt(largest.clone()).await.unwrap();
    assert_eq!(enc.ciphertext.len(), 1024);
    assert_eq!(
        f.decrypt(enc.ciphertext, &enc.key_id, enc.annotations)
            .await
            .unwrap(),
        largest
    );

    let r = f.encrypt(random_bytes(MAX_PLAINTEXT + 1)).await;
    let err = f
        .refused(
            "996-byte plaintext",
            r,
            &[Code::InvalidArgument],
            "996 bytes",
        )
        .await;
    assert!(
        err.message().contains("995"),
        "the limit is not named: {}",
        err.message()
    );
    f.finish().await;
}

/// Requests over the 64 KiB cap: refused (any code) without harm to the process.
#[tokio::test]
async fn oversized_requests_are_refused_without_crash() {
    let mut f = Fixture::start().await;
    let any = [
        Code::InvalidArgument,
        Code::OutOfRange,
        Code::ResourceExhausted,
        Code::FailedPrecondition,
        Code::Internal,
        Code::Unavailable,
        Code::Unknown,
        Code::Cancelled,
    ];
    for size in [64 * 1024 + 1, 1024 * 1024] {
        let r = f.encrypt(random_bytes(size)).await;
        f.refused(&format!("{size}-byte Encrypt"), r, &any, "")
            .await;
    }
    // A Decrypt whose annotations blow the cap.
    let (_, enc) = f.sealed_seed().await;
    let mut ann = annotations();
    ann.insert("big.example.org".into(), vec![b'x'; 100 * 1024]);
    let r = f.decrypt(enc.ciphertext, &enc.key_id, ann).await;
    f.refused("100 KiB of annotations", r, &any, "").await;
    f.finish().await;
}

#[tokio::test]
async fn decrypt_refuses_empty_ciphertext() {
    let mut f = Fixture::start().await;
    let key_id = f.store.active_key();
    let r = f.decrypt(Vec::new(), &key_id, annotations()).await;
    f.refused(
        "empty ciphertext",
        r,
        &[Code::InvalidArgument],
        "ciphertext is empty",
    )
    .await;
    f.finish().await;
}

/// Every prefix of a valid ciphertext is refused: too short to parse, or failing
/// authentication.
#[tokio::test]
async fn decrypt_refuses_every_truncation() {
    let mut f = Fixture::start().await;
    let (_, enc) = f.sealed_seed().await;
    for n in 0..enc.ciphertext.len() {
        let r = f
            .decrypt(
                enc.ciphertext[..n].to_vec(),
                &enc.key_id,
                enc.annotations.clone(),
            )
            .await;
        let hint = match n {
            0 => "empty",
            // format byte + nonce + 1 byte + tag
            1..30 => "truncated",
            _ => "failed authentication",
        };
        f.refused(
            &format!("ciphertext cut to {n} bytes"),
            r,
            &[Code::InvalidArgument],
            hint,
        )
        .await;
    }
    f.finish().await;
}

/// Every single-bit change is caught: in the format byte as an unknown format, anywhere
/// else as an authentication failure. Never a success, never a wrong plaintext.
#[tokio::test]
async fn decrypt_refuses_every_bit_flip() {
    let mut f = Fixture::start().await;
    let (_, enc) = f.sealed_seed().await;
    for bit in 0..enc.ciphertext.len() * 8 {
        let mut bad = enc.ciphertext.clone();
        bad[bit / 8] ^= 1 << (bit % 8);
        let r = f.decrypt(bad, &enc.key_id, enc.annotations.clone()).await;
        let what = format!("bit {bit} flipped");
        if bit < 8 {
            f.refused(&what, r, &[Code::FailedPrecondition], "format")
                .await;
        } else {
            f.refused(&what, r, &[Code::InvalidArgument], "failed authentication")
                .await;
        }
    }
    f.finish().await;
}

/// Random garbage of every plausible length, half of it behind a valid format byte so
/// that it reaches the cipher.
#[tokio::test]
async fn decrypt_refuses_random_garbage() {
    let mut f = Fixture::start().await;
    let key_id = f.store.active_key();
    let mut rng = rand::rng();
    for i in 0..300 {
        let len = rng.random_range(1..=1100);
        let mut junk = random_bytes(len);
        if i % 2 == 0 {
            junk[0] = 1;
        }
        let r = f.decrypt(junk, &key_id, annotations()).await;
        f.refused(
            &format!("garbage #{i} ({len} bytes)"),
            r,
            &[Code::InvalidArgument, Code::FailedPrecondition],
            "ciphertext",
        )
        .await;
    }
    f.finish().await;
}

/// Format bytes this API does not read: unknown (a newer plugin?) and v1beta1's.
#[tokio::test]
async fn decrypt_refuses_unknown_envelope_format() {
    let mut f = Fixture::start().await;
    let (_, enc) = f.sealed_seed().await;
    for (format, hint) in [
        (0u8, "format 0"),
        (9, "format 9"),
        (0xff, "format 255"),
        (2, "other KMS API version"),
    ] {
        let mut bad = enc.ciphertext.clone();
        bad[0] = format;
        let r = f.decrypt(bad, &enc.key_id, enc.annotations.clone()).await;
        f.refused(
            &format!("format byte {format}"),
            r,
            &[Code::FailedPrecondition],
            hint,
        )
        .await;
    }
    f.finish().await;
}

/// A well-formed key_id this plugin never had: NotFound, naming the key.
#[tokio::test]
async fn decrypt_refuses_unknown_key_id() {
    let mut f = Fixture::start().await;
    let (_, enc) = f.sealed_seed().await;
    let unknown = "kek-9999-20200101-deadbeef";
    let r = f.decrypt(enc.ciphertext, unknown, enc.annotations).await;
    let err = f
        .refused(
            "unknown key_id",
            r,
            &[Code::NotFound],
            "not in this plugin's key ring",
        )
        .await;
    assert!(err.message().contains(unknown));
    f.finish().await;
}

/// Malformed key_ids: empty, uppercase, over the apiserver's 1024 bytes.
#[tokio::test]
async fn decrypt_refuses_invalid_key_ids() {
    let mut f = Fixture::start().await;
    let (_, enc) = f.sealed_seed().await;
    let long = "a".repeat(1025);
    for (key_id, hint) in [
        (String::new(), "key id is empty"),
        (enc.key_id.to_uppercase(), "only a-z, 0-9"),
        (long, "1025 bytes"),
    ] {
        let r = f
            .decrypt(enc.ciphertext.clone(), &key_id, enc.annotations.clone())
            .await;
        let err = f
            .refused(
                &format!("key_id of {} bytes", key_id.len()),
                r,
                &[Code::InvalidArgument],
                hint,
            )
            .await;
        assert!(
            err.message().len() < 512,
            "message echoes the whole key_id: {} bytes",
            err.message().len()
        );
    }
    f.finish().await;
}

/// Another key of this very store: after a rotation the old key is decrypt-only. A
/// ciphertext presented with the other key's id fails authentication, both ways round,
/// while each still opens under its own id.
#[tokio::test]
async fn decrypt_refuses_ciphertext_under_another_key_of_the_store() {
    let mut f = Fixture::start().await;
    let (old_seed, old) = f.sealed_seed().await;
    let new_id = f.store.rotate();
    assert_ne!(new_id, old.key_id);
    // The plugin picks rotations up on its reload tick (1 s here). No SIGHUP: a hangup
    // that arrives before the plugin installs its handler would kill it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while f
        .c
        .status(StatusRequest {})
        .await
        .unwrap()
        .into_inner()
        .key_id
        != new_id
    {
        assert!(
            Instant::now() < deadline,
            "rotation to {new_id} not picked up:\n{}",
            f.plugin.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (new_seed, new) = f.sealed_seed().await;
    assert_eq!(new.key_id, new_id);

    // Active-key ciphertext with the decrypt-only key's id, and the reverse.
    let r = f
        .decrypt(new.ciphertext.clone(), &old.key_id, new.annotations.clone())
        .await;
    f.refused(
        "new ciphertext, old key_id",
        r,
        &[Code::InvalidArgument],
        "failed authentication",
    )
    .await;
    let r = f
        .decrypt(old.ciphertext.clone(), &new_id, old.annotations.clone())
        .await;
    f.refused(
        "old ciphertext, new key_id",
        r,
        &[Code::InvalidArgument],
        "failed authentication",
    )
    .await;

    assert_eq!(
        f.decrypt(old.ciphertext, &old.key_id, old.annotations)
            .await
            .unwrap(),
        old_seed
    );
    assert_eq!(
        f.decrypt(new.ciphertext, &new_id, new.annotations)
            .await
            .unwrap(),
        new_seed
    );
    f.finish().await;
}

/// Decrypt accepts only the annotation this plugin writes, with its value; none at all is
/// fine (it only restates the format byte).
#[tokio::test]
async fn decrypt_checks_annotations() {
    let mut f = Fixture::start().await;
    let (seed, enc) = f.sealed_seed().await;

    let mut unknown = enc.annotations.clone();
    unknown.insert("v1.other-kms.example.org".into(), b"1".to_vec());
    let r = f
        .decrypt(enc.ciphertext.clone(), &enc.key_id, unknown)
        .await;
    let err = f
        .refused(
            "unknown annotation",
            r,
            &[Code::InvalidArgument],
            "v1.other-kms.example.org",
        )
        .await;
    assert!(
        err.message().contains("not written by this plugin"),
        "{}",
        err.message()
    );

    for wrong in [b"2".to_vec(), Vec::new(), b"01".to_vec()] {
        let ann = HashMap::from([(ANNOTATION_KEY.to_owned(), wrong.clone())]);
        let r = f.decrypt(enc.ciphertext.clone(), &enc.key_id, ann).await;
        f.refused(
            &format!("annotation value {wrong:?}"),
            r,
            &[Code::InvalidArgument],
            ANNOTATION_KEY,
        )
        .await;
    }

    let back = f.decrypt(enc.ciphertext, &enc.key_id, HashMap::new()).await;
    assert_eq!(back.unwrap(), seed, "Decrypt without annotations");
    f.finish().await;
}

/// The v1beta1 parser reads a length and a key id out of the ciphertext: truncations and
/// garbage must not get past it, and a wrong API version is refused.
#[tokio::test]
async fn v1beta1_refuses_bad_ciphertexts_and_versions() {
    let mut f = Fixture::start().await;
    let mut v1 = f.plugin.v1().await;
    let seed = random_bytes(32);
    f.plaintexts.push(seed.clone());
    let ct = v1
        .encrypt(v1beta1::EncryptRequest {
            version: "v1beta1".into(),
            plain: seed.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .cipher;
    // A flip inside the embedded key id can turn it into another well-formed id: NotFound.
    let bad_v1 = [
        Code::InvalidArgument,
        Code::FailedPrecondition,
        Code::NotFound,
    ];

    let mut cases: Vec<(String, Vec<u8>)> = (0..ct.len())
        .map(|n| (format!("cut to {n}"), ct[..n].to_vec()))
        .collect();
    for bit in 0..ct.len() * 8 {
        let mut bad = ct.clone();
        bad[bit / 8] ^= 1 << (bit % 8);
        cases.push((format!("bit {bit} flipped"), bad));
    }
    let mut rng = rand::rng();
    for i in 0..100 {
        let mut junk = random_bytes(rng.random_range(1..=1100));
        junk[0] = 2;
        cases.push((format!("garbage #{i}"), junk));
    }
    for (what, cipher) in cases {
        let r = v1
            .decrypt(v1beta1::DecryptRequest {
                version: "v1beta1".into(),
                cipher,
            })
            .await;
        f.refused(
            &format!("v1beta1 {what}"),
            r.map(|r| r.into_inner().plain),
            &bad_v1,
            "",
        )
        .await;
    }

    let r = v1
        .decrypt(v1beta1::DecryptRequest {
            version: "v2".into(),
            cipher: ct.clone(),
        })
        .await;
    f.refused(
        "v1beta1 version \"v2\"",
        r.map(|r| r.into_inner().plain),
        &[Code::InvalidArgument],
        "unsupported KMS API version",
    )
    .await;
    let back = v1
        .decrypt(v1beta1::DecryptRequest {
            version: "v1beta1".into(),
            cipher: ct,
        })
        .await;
    assert_eq!(back.unwrap().into_inner().plain, seed);
    f.finish().await;
}
