//! Several nodes, each with its own software TPM (swtpm): enrolling a key from one node's
//! TPM into another's, checking at the TPM level that KEKs cannot be duplicated out, and
//! two plugins serving one cluster through a two-phase rotation.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::HashSet;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::swtpm::{
    TpmNode, V2, decrypt, encrypt, sealed_blobs, status_key_id, wait_http, wait_key_id,
};
use kms_plugin::backend::tpm::DEFAULT_SRK_HANDLE;
use kms_plugin::backend::tpm::blob::TpmBlob;
use tss_esapi::attributes::ObjectAttributesBuilder;
use tss_esapi::constants::response_code::Tss2ResponseCodeKind;
use tss_esapi::constants::{CommandCode, SessionType};
use tss_esapi::handles::{KeyHandle, PersistentTpmHandle, SessionHandle, TpmHandle};
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, PublicAlgorithm};
use tss_esapi::interface_types::session_handles::PolicySession;
use tss_esapi::structures::{
    Digest, KeyedHashScheme, PcrSelectionListBuilder, PcrSlot, Private, Public, PublicBuilder,
    PublicKeyedHashParameters, SensitiveData, SymmetricDefinition, SymmetricDefinitionObject,
};
use tss_esapi::traits::UnMarshall;
use tss_esapi::{Context, TctiNameConf};

fn read_json(path: &str) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn write_json(path: &str, v: &serde_json::Value) {
    std::fs::write(path, serde_json::to_vec_pretty(v).unwrap()).unwrap();
}

fn decode_b64(s: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(s).unwrap()
}

// ---- Raw TPM access (tss-esapi), as an attacker with access to the node's TPM would have ----

fn tpm_context(tcti: &str) -> (Context, KeyHandle) {
    let mut ctx = Context::new(TctiNameConf::from_str(tcti).unwrap()).unwrap();
    let srk = ctx
        .tr_from_tpm_public(TpmHandle::Persistent(
            PersistentTpmHandle::new(DEFAULT_SRK_HANDLE).unwrap(),
        ))
        .unwrap();
    (ctx, KeyHandle::from(srk))
}

/// How the policy session offered to TPM2_Duplicate is satisfied.
#[derive(Debug, Clone, Copy)]
enum DupPolicy {
    /// PolicyCommandCode(TPM_CC_Duplicate): the usual "may be duplicated" policy.
    DuplicateCommand,
    /// PolicyPCR(sha256:7) at the current values: exactly the auth policy of a PCR-bound KEK.
    Pcr7,
}

fn pcr7() -> tss_esapi::structures::PcrSelectionList {
    PcrSelectionListBuilder::new()
        .with_selection(HashingAlgorithm::Sha256, &[PcrSlot::Slot7])
        .build()
        .unwrap()
}

/// Loads `public`/`private` under the SRK and asks the TPM to duplicate it to a new parent
/// (the SRK itself, which is a valid storage parent), in a policy session. Flushes every
/// handle it made, whatever happens.
fn try_duplicate(
    tcti: &str,
    public: Public,
    private: Private,
    policy: DupPolicy,
) -> Result<(), tss_esapi::Error> {
    let (mut ctx, srk) = tpm_context(tcti);
    let object = ctx
        .execute_with_nullauth_session(|ctx| ctx.load(srk, private, public))
        .unwrap();
    let session = ctx
        .start_auth_session(
            None,
            None,
            None,
            SessionType::Policy,
            SymmetricDefinition::AES_128_CFB,
            HashingAlgorithm::Sha256,
        )
        .unwrap()
        .unwrap();
    let policy_session = PolicySession::try_from(session).unwrap();
    match policy {
        DupPolicy::DuplicateCommand => ctx
            .policy_command_code(policy_session, CommandCode::Duplicate)
            .unwrap(),
        DupPolicy::Pcr7 => ctx
            .policy_pcr(policy_session, Digest::default(), pcr7())
            .unwrap(),
    }
    let r = ctx.execute_with_session(Some(session), |ctx| {
        ctx.duplicate(
            object.into(),
            srk.into(),
            None,
            SymmetricDefinitionObject::Null,
        )
    });
    let _ = ctx.flush_context(object.into());
    // Gone already if the command succeeded (continueSession clear); flush it otherwise.
    let _ = ctx.flush_context(SessionHandle::from(session).into());
    r.map(|_| ())
}

/// A sealed-data object under the SRK whose policy allows duplication
/// (PolicyCommandCode(Duplicate)). With `fixed` false (fixedTPM and fixedParent clear) it
/// is the positive control proving that [`try_duplicate`] itself works; with `fixed` true
/// it shows that those two attributes alone stop duplication, whatever the policy says.
fn object_with_duplication_policy(tcti: &str, fixed: bool) -> (Public, Private) {
    let (mut ctx, srk) = tpm_context(tcti);
    let trial = ctx
        .start_auth_session(
            None,
            None,
            None,
            SessionType::Trial,
            SymmetricDefinition::AES_128_CFB,
            HashingAlgorithm::Sha256,
        )
        .unwrap()
        .unwrap();
    let trial_policy = PolicySession::try_from(trial).unwrap();
    ctx.policy_command_code(trial_policy, CommandCode::Duplicate)
        .unwrap();
    let digest = ctx.policy_get_digest(trial_policy).unwrap();
    ctx.flush_context(SessionHandle::from(trial).into())
        .unwrap();
    let attrs = ObjectAttributesBuilder::new()
        .with_fixed_tpm(fixed)
        .with_fixed_parent(fixed)
        .with_user_with_auth(true)
        .with_no_da(true)
        .build()
        .unwrap();
    let template = PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::KeyedHash)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attrs)
        .with_auth_policy(digest)
        .with_keyed_hash_parameters(PublicKeyedHashParameters::new(KeyedHashScheme::Null))
        .with_keyed_hash_unique_identifier(Digest::default())
        .build()
        .unwrap();
    let data = SensitiveData::try_from(vec![7u8; 32]).unwrap();
    let created = ctx
        .execute_with_nullauth_session(|ctx| {
            ctx.create(srk, template, None, Some(data), None, None)
        })
        .unwrap();
    (created.out_public, created.out_private)
}

fn tpm_rc(e: &tss_esapi::Error) -> Option<Tss2ResponseCodeKind> {
    match e {
        tss_esapi::Error::Tss2Error(rc) => rc.kind(),
        tss_esapi::Error::WrapperError(_) => None,
    }
}

/// The public and private areas of a sealed blob from a manifest.
fn areas(blob: &TpmBlob) -> (Public, Private) {
    (
        Public::unmarshall(&blob.public).unwrap(),
        Private::try_from(blob.private.clone()).unwrap(),
    )
}

#[test]
fn enrolment_moves_a_key_between_tpms_and_no_kek_can_be_duplicated_out() {
    let a = TpmNode::new(&[]);
    // B seals what it enrolls to PCR 7, so the TPM-level check below covers both kinds of KEK.
    let b = TpmNode::new(&["--pcr-policy", "sha256:7"]);
    let c = TpmNode::new(&[]);
    let id = a.ok(&["key", "init"], &[]);

    // B publishes its transport key (its key store did not exist: it is created empty).
    let b_pub = b.file("b.pub");
    b.ok(
        &["node", "export-public"],
        &["--out", &b_pub, "--node-name", "node-b"],
    );
    let b_node = read_json(&b_pub);
    assert_eq!(b_node["node"], "node-b");
    assert!(
        b_node["transport_public_pem"]
            .as_str()
            .unwrap()
            .contains("BEGIN PUBLIC KEY"),
        "{b_node}"
    );
    assert_eq!(b.list()["keys"].as_array().unwrap().len(), 0);

    let bundle = a.file("k.bundle");
    a.ok(&["key", "export", &id], &["--to", &b_pub, "--out", &bundle]);
    let bundle_json = read_json(&bundle);
    let a_key = a.list()["keys"][0].clone();
    assert_eq!(bundle_json["key_id"], id.as_str());
    assert_eq!(bundle_json["to"], b_node["transport_fingerprint"]);
    assert_eq!(bundle_json["check_value"], a_key["check_value"]);

    // One base64 character of `wrapped` changed: the TPM's OAEP unwrap rejects it, and
    // nothing is written. (Tried before the real import, so only the damage can make it fail.)
    let mut tampered = bundle_json.clone();
    let mut wrapped: Vec<char> = tampered["wrapped"].as_str().unwrap().chars().collect();
    let i = wrapped.len() / 2;
    wrapped[i] = if wrapped[i] == 'A' { 'B' } else { 'A' };
    tampered["wrapped"] = serde_json::Value::String(wrapped.into_iter().collect());
    let tampered_path = b.file("tampered.bundle");
    write_json(&tampered_path, &tampered);
    let before = b.manifest_bytes();
    let err = b.fails(&["key", "import", &tampered_path], &[]);
    assert!(err.contains("altered"), "{err}");
    assert_eq!(
        b.manifest_bytes(),
        before,
        "a failed import changed the manifest"
    );

    // The real import: same id and check value, origin "imported", active (B had no key).
    assert_eq!(b.ok(&["key", "import", &bundle], &[]), id);
    let b_list = b.list();
    assert_eq!(b_list["active_key_id"], id.as_str());
    let b_keys = b_list["keys"].as_array().unwrap();
    assert_eq!(b_keys.len(), 1);
    assert_eq!(b_keys[0]["id"], id.as_str());
    assert_eq!(b_keys[0]["check_value"], a_key["check_value"]);
    assert_eq!(b_keys[0]["origin"], "imported");
    assert_eq!(b_keys[0]["state"], "active");
    assert_eq!(a_key["origin"], "created");
    // B really unseals it: its own TPM, its own SRK, its own sealed blob.
    assert_ne!(
        b_list["backend_fingerprint"],
        a.list()["backend_fingerprint"]
    );

    // Importing the same bundle again is refused.
    let before = b.manifest_bytes();
    let err = b.fails(&["key", "import", &bundle], &[]);
    assert!(err.contains(&id) && err.contains("already"), "{err}");
    assert_eq!(b.manifest_bytes(), before);

    // C cannot use B's bundle: its transport key is another one...
    let c_pub = c.file("c.pub");
    c.ok(
        &["node", "export-public"],
        &["--out", &c_pub, "--node-name", "node-c"],
    );
    let c_node = read_json(&c_pub);
    let err = c.fails(&["key", "import", &bundle], &[]);
    assert!(
        err.contains("made for the node with transport key"),
        "{err}"
    );
    assert!(
        err.contains(b_node["transport_fingerprint"].as_str().unwrap()),
        "{err}"
    );
    // ...and relabelling the bundle for C does not help: C's TPM cannot unwrap it.
    let mut forged = bundle_json.clone();
    forged["to"] = c_node["transport_fingerprint"].clone();
    let forged_path = c.file("forged.bundle");
    write_json(&forged_path, &forged);
    let err = c.fails(&["key", "import", &forged_path], &[]);
    assert!(err.contains("another node, or altered"), "{err}");
    assert_eq!(c.list()["keys"].as_array().unwrap().len(), 0);

    // B does not pass an enrolled key on.
    let err = b.fails(
        &["key", "export", &id],
        &["--to", &c_pub, "--out", &b.file("again.bundle")],
    );
    assert!(err.contains("imported"), "{err}");

    // ---- TPM level: every KEK (created or enrolled) and the transport key are bound to
    // their TPM and parent.
    for (node, pcr_bound) in [(&a, false), (&b, true)] {
        let manifest = node.manifest_bytes();
        for (kid, blob) in sealed_blobs(&manifest) {
            assert_eq!(blob.pcr.is_some(), pcr_bound, "{kid}");
            let (public, _) = areas(&blob);
            let attrs = public.object_attributes();
            assert!(
                attrs.fixed_tpm() && attrs.fixed_parent(),
                "{kid} can leave its TPM: {attrs:?}"
            );
        }
    }
    let b_manifest: serde_json::Value = serde_json::from_slice(&b.manifest_bytes()).unwrap();
    let transport = TpmBlob::decode(&decode_b64(
        b_manifest["transport"]["sealed"].as_str().unwrap(),
    ))
    .unwrap();
    let (transport_public, _) = areas(&transport);
    let attrs = transport_public.object_attributes();
    assert!(
        attrs.fixed_tpm() && attrs.fixed_parent(),
        "the transport key can leave its TPM: {attrs:?}"
    );

    // ---- A real TPM2_Duplicate on B's TPM. First the controls: an object made to be
    // duplicable is duplicated by exactly this procedure; the same object with fixedTPM and
    // fixedParent set is refused for its attributes although its policy allows it.
    let tcti_b = b.tpm.tcti();
    let (public, private) = object_with_duplication_policy(&tcti_b, false);
    try_duplicate(&tcti_b, public, private, DupPolicy::DuplicateCommand)
        .expect("the positive control (a duplicable object) failed: the procedure is wrong");
    let (public, private) = object_with_duplication_policy(&tcti_b, true);
    let err = try_duplicate(&tcti_b, public, private, DupPolicy::DuplicateCommand)
        .expect_err("the TPM duplicated a fixedTPM/fixedParent object");
    assert_eq!(
        tpm_rc(&err),
        Some(Tss2ResponseCodeKind::Attributes),
        "{err}"
    );

    // The enrolled KEK: refused with the duplication policy and with the very PCR policy it
    // is sealed under. (The TPM stops both at the policy check: its auth policy has no
    // PolicyCommandCode(Duplicate), which the DUP role requires; fixedParent is a second wall.)
    let refused = |e: &tss_esapi::Error| {
        matches!(
            tpm_rc(e),
            Some(Tss2ResponseCodeKind::PolicyFail | Tss2ResponseCodeKind::Attributes)
        )
    };
    let (_, kek) = sealed_blobs(&b.manifest_bytes()).remove(0);
    for policy in [DupPolicy::DuplicateCommand, DupPolicy::Pcr7] {
        let (public, private) = areas(&kek);
        let err = try_duplicate(&tcti_b, public, private, policy)
            .expect_err("the TPM duplicated an enrolled KEK out of node B");
        println!(
            "TPM2_Duplicate of B's enrolled KEK with {policy:?}: {err} ({:?})",
            tpm_rc(&err)
        );
        assert!(
            refused(&err),
            "not refused by the TPM's policy or attribute checks: {err}"
        );
    }
    // A's created (not PCR-bound) KEK on A's TPM: refused too.
    let (_, kek) = sealed_blobs(&a.manifest_bytes()).remove(0);
    let (public, private) = areas(&kek);
    let err = try_duplicate(&a.tpm.tcti(), public, private, DupPolicy::DuplicateCommand)
        .expect_err("the TPM duplicated a KEK out of node A");
    println!("TPM2_Duplicate of A's KEK: {err} ({:?})", tpm_rc(&err));
    assert!(
        refused(&err),
        "not refused by the TPM's policy or attribute checks: {err}"
    );

    for node in [&a, &b, &c] {
        assert_eq!(node.tpm.transient_handles(), 0);
    }
}

// ---- Two plugins, one cluster --------------------------------------------------------

#[derive(Default)]
struct Traffic {
    ok: AtomicU64,
    failures: Mutex<Vec<String>>,
    /// (direction, key_id) pairs that carried traffic.
    seen: Mutex<HashSet<(&'static str, String)>>,
}

/// Encrypts on `from`, decrypts on `to`, until `stop`. Every failure is recorded.
async fn round_trips(
    dir: &'static str,
    task: usize,
    mut from: V2,
    mut to: V2,
    stop: Arc<AtomicBool>,
    t: Arc<Traffic>,
) {
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let plaintext = format!("{dir}/{task}/{n}").into_bytes();
        let outcome = match from
            .encrypt(kms_proto::v2::EncryptRequest {
                plaintext: plaintext.clone(),
                uid: format!("{dir}-{task}-{n}"),
            })
            .await
        {
            Err(e) => Err(format!("{dir} #{n}: Encrypt: {e}")),
            Ok(r) => {
                let e = r.into_inner();
                match decrypt(&mut to, &e).await {
                    Ok(p) if p == plaintext => Ok(e.key_id),
                    Ok(_) => Err(format!("{dir} #{n}: Decrypt returned other bytes")),
                    Err(err) => Err(format!("{dir} #{n}: Decrypt under {}: {err}", e.key_id)),
                }
            }
        };
        match outcome {
            Ok(key_id) => {
                t.ok.fetch_add(1, Ordering::Relaxed);
                t.seen.lock().unwrap().insert((dir, key_id));
            }
            Err(e) => t.failures.lock().unwrap().push(e),
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn decrypt_only_in_ring(metrics: &str) -> bool {
    metrics.lines().any(|l| {
        l.starts_with("kms_plugin_keys{")
            && l.contains("state=\"decrypt-only\"")
            && l.ends_with(" 1")
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_plugins_on_two_tpms_rotate_in_two_phases_without_a_failed_request() {
    let a = TpmNode::new(&[]);
    let b = TpmNode::new(&[]);
    let old = a.ok(&["key", "init"], &[]);
    let b_pub = b.file("b.pub");
    b.ok(&["node", "export-public"], &["--out", &b_pub]);
    let old_bundle = a.file("old.bundle");
    a.ok(
        &["key", "export", &old],
        &["--to", &b_pub, "--out", &old_bundle],
    );
    assert_eq!(b.ok(&["key", "import", &old_bundle], &[]), old);
    assert_eq!(
        b.list()["active_key_id"],
        old.as_str(),
        "the first enrolled key must be active"
    );

    let pa = a.serve().await;
    let pb = b.serve().await;
    let mut ca = pa.v2().await;
    let mut cb = pb.v2().await;
    assert_eq!(status_key_id(&mut ca).await, old);
    assert_eq!(status_key_id(&mut cb).await, old);
    let early_a = encrypt(&mut ca, b"written through A before the rotation").await;
    let early_b = encrypt(&mut cb, b"written through B before the rotation").await;

    let stop = Arc::new(AtomicBool::new(false));
    let traffic = Arc::new(Traffic::default());
    let mut tasks = Vec::new();
    for task in 0..2 {
        for (dir, from, to) in [("A->B", &ca, &cb), ("B->A", &cb, &ca)] {
            tasks.push(tokio::spawn(round_trips(
                dir,
                task,
                from.clone(),
                to.clone(),
                Arc::clone(&stop),
                Arc::clone(&traffic),
            )));
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Phase one: stage the new key everywhere, decrypt-only.
    let new = a.ok(&["key", "add"], &[]);
    let new_bundle = a.file("new.bundle");
    a.ok(
        &["key", "export", &new],
        &["--to", &b_pub, "--out", &new_bundle],
    );
    assert_eq!(b.ok(&["key", "import", &new_bundle], &[]), new);
    for node in [&a, &b] {
        let list = node.list();
        assert_eq!(list["active_key_id"], old.as_str());
        let staged = list["keys"]
            .as_array()
            .unwrap()
            .iter()
            .find(|k| k["id"] == new.as_str())
            .cloned()
            .unwrap();
        assert_eq!(staged["state"], "decrypt-only");
    }
    // Both running plugins have it in their rings before anyone encrypts with it.
    for p in [&pa, &pb] {
        wait_http(p, "/metrics", Duration::from_secs(10), |_, m| {
            decrypt_only_in_ring(m)
        })
        .await;
    }
    assert_eq!(status_key_id(&mut ca).await, old);
    assert_eq!(status_key_id(&mut cb).await, old);

    // Phase two: promote on each node, one after the other.
    a.promote(&new);
    wait_key_id(&mut ca, &new, Duration::from_secs(10)).await;
    // The window where A encrypts under the new key and B still under the old one.
    tokio::time::sleep(Duration::from_millis(500)).await;
    b.promote(&new);
    wait_key_id(&mut cb, &new, Duration::from_secs(10)).await;

    // Data written before the rotation still reads on both nodes.
    for c in [&mut ca, &mut cb] {
        assert_eq!(
            decrypt(c, &early_a).await.unwrap(),
            b"written through A before the rotation"
        );
        assert_eq!(
            decrypt(c, &early_b).await.unwrap(),
            b"written through B before the rotation"
        );
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }

    let failures = traffic.failures.lock().unwrap().clone();
    let ok = traffic.ok.load(Ordering::Relaxed);
    let seen = traffic.seen.lock().unwrap().clone();
    println!(
        "cross-node round trips: {ok} ok, {} failed; seen {seen:?}",
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} failed requests, e.g. {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(
        ok >= 100,
        "only {ok} round trips: the traffic did not really run"
    );
    for dir in ["A->B", "B->A"] {
        for key in [&old, &new] {
            assert!(
                seen.contains(&(dir, key.clone())),
                "no {dir} traffic under {key}: {seen:?}"
            );
        }
    }
    let (ka, kb) = (status_key_id(&mut ca).await, status_key_id(&mut cb).await);
    assert_eq!((ka.as_str(), kb.as_str()), (new.as_str(), new.as_str()));
    assert_eq!(a.list()["active_key_id"], b.list()["active_key_id"]);
    drop((ca, cb));
    assert!(pa.terminate().success());
    assert!(pb.terminate().success());
}
