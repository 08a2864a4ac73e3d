//! The TPM backend against a real software TPM (swtpm), one per test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::swtpm::{
    Swtpm, TpmNode, decrypt, encrypt, recovery_keypair, sealed_blobs, status_key_id, wait_http,
    wait_key_id,
};
use common::{Plugin, cli, cli_ok};
use kms_plugin::backend::KeyBackend;
use kms_plugin::backend::tpm::pcr::PcrPolicy;
use kms_plugin::backend::tpm::{DEFAULT_SRK_HANDLE, TpmBackend, TpmOptions};
use kms_plugin::keyid::KeyId;
use kms_plugin::keyring::KeyRing;
use kms_plugin::keystore::{KeyState, KeyStore};
use kms_plugin::secret::Kek;
use kms_proto::v2::{DecryptRequest, EncryptRequest, EncryptResponse, StatusRequest};

/// Backend flags for `swtpm`.
fn tpm_args(t: &Swtpm) -> Vec<String> {
    vec!["--backend".into(), "tpm".into(), "--tcti".into(), t.tcti()]
}

fn with<'a>(base: &'a [&'a str], extra: &'a [String]) -> Vec<&'a str> {
    base.iter()
        .copied()
        .chain(extra.iter().map(String::as_str))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sealed_in_one_process_unsealed_in_another() {
    let tpm = Swtpm::start();
    let dir = tempfile::tempdir().unwrap();
    let ks = dir.path().join("ks");
    let ks = ks.to_str().unwrap();
    let args = tpm_args(&tpm);
    let id = cli_ok(&with(&["key", "init", "--key-store", ks], &args));
    // The key store holds no key in clear: only the TPM can open it.
    let manifest = std::fs::read_to_string(dir.path().join("ks/manifest.json")).unwrap();
    assert!(manifest.contains("\"kind\": \"tpm\""), "{manifest}");

    let backend: Vec<&str> = args.iter().map(String::as_str).collect();
    let plugin = Plugin::start_with(ks, &backend, &[]).await;
    let mut c = plugin.v2().await;
    let st = c.status(StatusRequest {}).await.unwrap().into_inner();
    assert_eq!(
        (st.healthz.as_str(), st.key_id.as_str()),
        ("ok", id.as_str())
    );
    let seed = vec![9u8; 32];
    let enc = c
        .encrypt(EncryptRequest {
            plaintext: seed.clone(),
            uid: "1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let dec = c
        .decrypt(DecryptRequest {
            ciphertext: enc.ciphertext,
            uid: "2".into(),
            key_id: enc.key_id,
            annotations: enc.annotations,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(dec.plaintext, seed);
    drop(c);
    assert!(plugin.terminate().success());
    // Every object the plugin loaded was flushed.
    assert_eq!(tpm.transient_handles(), 0);
}

#[tokio::test]
async fn key_store_copied_to_another_tpm_fails_clearly() {
    let tpm_a = Swtpm::start();
    let tpm_b = Swtpm::start();
    let dir = tempfile::tempdir().unwrap();
    let ks = dir.path().join("ks");
    let ks = ks.to_str().unwrap();
    cli_ok(&with(
        &["key", "init", "--key-store", ks],
        &tpm_args(&tpm_a),
    ));
    let out = cli(&with(
        &[
            "serve",
            "--key-store",
            ks,
            "--socket",
            &format!("{}/s.sock", dir.path().display()),
            "--http-addr",
            "off",
        ],
        &tpm_args(&tpm_b),
    ));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cleared or replaced") && err.contains("key recover"),
        "{err}"
    );
}

// ---- Recovery, TPM loss, handle hygiene and timings --------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pcr_change_blocks_unseal_until_recovered_with_the_recovery_key() {
    let node = TpmNode::new(&["--pcr-policy", "sha256:7"]);
    let (rec_key, rec_pub) = recovery_keypair(node.dir.path());
    let id = node.ok(&["key", "init"], &["--recovery-public", &rec_pub]);
    let policy = PcrPolicy::parse("sha256:7").unwrap();
    let blobs = sealed_blobs(&node.manifest_bytes());
    assert_eq!(blobs.len(), 1);
    assert_eq!(
        blobs[0].1.pcr,
        Some(policy),
        "the key was not sealed to PCR 7"
    );

    let plugin = node.serve().await;
    let mut c = plugin.v2().await;
    assert_eq!(status_key_id(&mut c).await, id);
    let seed = b"a DEK seed made before the PCR change".to_vec();
    let before = encrypt(&mut c, &seed).await;
    assert_eq!(before.key_id, id);
    drop(c);
    assert!(plugin.terminate().success());

    // A firmware or bootloader update changes PCR 7: the sealed key no longer opens.
    node.tpm.pcr_extend(7);
    let err = node.serve_refuses();
    assert!(err.contains("boot state") && err.contains("PCR"), "{err}");
    assert!(
        err.contains("recover"),
        "the error does not point at recovery:\n{err}"
    );

    // Without the offline private key nothing can be done, and nothing is changed.
    let manifest = node.manifest_bytes();
    let err = node.fails(&["key", "recover"], &[]);
    assert!(
        err.contains("nothing was changed") && err.contains("--recovery-private"),
        "{err}"
    );
    assert_eq!(
        node.manifest_bytes(),
        manifest,
        "a failed recovery changed the manifest"
    );

    // With it, the key is re-sealed to the new boot state (same policy, same id).
    let report: serde_json::Value =
        serde_json::from_str(&node.ok(&["key", "recover"], &["--recovery-private", &rec_key]))
            .unwrap();
    assert_eq!(report["recovered"], serde_json::json!([id]), "{report}");
    let blobs = sealed_blobs(&node.manifest_bytes());
    assert_eq!(blobs[0].0, id);
    assert_eq!(
        blobs[0].1.pcr,
        Some(policy),
        "recovery dropped the PCR binding"
    );

    let plugin = node.serve().await;
    let mut c = plugin.v2().await;
    assert_eq!(status_key_id(&mut c).await, id);
    assert_eq!(
        decrypt(&mut c, &before).await.unwrap(),
        seed,
        "a ciphertext from before the PCR change"
    );
    let after = encrypt(&mut c, b"new").await;
    assert_eq!(decrypt(&mut c, &after).await.unwrap(), b"new");
    drop(c);
    assert!(plugin.terminate().success());

    // It is bound to the new state, not unbound: another change locks it again.
    node.tpm.pcr_extend(7);
    let err = node.serve_refuses();
    assert!(err.contains("boot state"), "{err}");
    assert_eq!(node.tpm.transient_handles(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleared_tpm_is_named_and_recovered_with_the_recovery_key() {
    let node = TpmNode::new(&[]);
    let (rec_key, rec_pub) = recovery_keypair(node.dir.path());
    let first = node.ok(&["key", "init"], &["--recovery-public", &rec_pub]);

    // Ciphertexts under two keys: the first (decrypt-only after the rotation) and the second.
    let plugin = node.serve().await;
    let mut c = plugin.v2().await;
    let ct1 = encrypt(&mut c, b"under the first key").await;
    let second = node.ok(&["key", "rotate"], &[]);
    plugin.signal("HUP");
    wait_key_id(&mut c, &second, Duration::from_secs(10)).await;
    let ct2 = encrypt(&mut c, b"under the second key").await;
    assert_eq!(
        (ct1.key_id.as_str(), ct2.key_id.as_str()),
        (first.as_str(), second.as_str())
    );
    drop(c);
    assert!(plugin.terminate().success());

    // The TPM is cleared (new owner seed; the persistent SRK is evicted).
    node.tpm.clear();
    let err = node.serve_refuses();
    assert!(
        err.contains("cleared or replaced") && err.contains("key recover"),
        "{err}"
    );

    // Recovery without the offline key fails and leaves the manifest byte-for-byte alone.
    let manifest = node.manifest_bytes();
    let err = node.fails(&["key", "recover"], &[]);
    assert!(
        err.contains("nothing was changed") && err.contains("--recovery-private"),
        "{err}"
    );
    assert!(
        err.contains(&first) && err.contains(&second),
        "the error should name both keys:\n{err}"
    );
    assert_eq!(
        node.manifest_bytes(),
        manifest,
        "a failed recovery changed the manifest"
    );

    let report: serde_json::Value =
        serde_json::from_str(&node.ok(&["key", "recover"], &["--recovery-private", &rec_key]))
            .unwrap();
    let mut recovered: Vec<String> = report["recovered"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect();
    recovered.sort();
    assert_eq!(recovered, vec![first.clone(), second.clone()], "{report}");
    let list = node.list();
    assert_eq!(
        list["active_key_id"],
        second.as_str(),
        "recovery changed the active key"
    );
    let before: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
    assert_ne!(
        list["backend_fingerprint"], before["backend"]["fingerprint"],
        "the new SRK was not recorded"
    );

    let plugin = node.serve().await;
    let mut c = plugin.v2().await;
    assert_eq!(status_key_id(&mut c).await, second);
    assert_eq!(decrypt(&mut c, &ct1).await.unwrap(), b"under the first key");
    assert_eq!(
        decrypt(&mut c, &ct2).await.unwrap(),
        b"under the second key"
    );
    let ct3 = encrypt(&mut c, b"after recovery").await;
    assert_eq!(decrypt(&mut c, &ct3).await.unwrap(), b"after recovery");
    drop(c);
    assert!(plugin.terminate().success());
    assert_eq!(node.tpm.transient_handles(), 0);
}

/// True if the exposition has the sample line `NAME VALUE` (not just the name in a HELP text).
fn metric(body: &str, name: &str, value: &str) -> bool {
    body.lines()
        .any(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')) == Some(value))
}

/// Clients on their own connections calling Encrypt, Decrypt (of that and of an early
/// ciphertext) and Status in a loop, as kube-apiserver does, until stopped. Rounds that
/// worked are counted; every failed call is kept.
struct Traffic {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<Vec<String>>>,
}

impl Traffic {
    async fn start(p: &Plugin, early: &EncryptResponse, early_plaintext: &'static [u8]) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for n in 0..2 {
            let mut c = p.v2().await;
            let (stop, ok, early) = (Arc::clone(&stop), Arc::clone(&ok), early.clone());
            tasks.push(tokio::spawn(async move {
                let mut failed = Vec::new();
                let plaintext = format!("traffic {n}").into_bytes();
                while !stop.load(Ordering::Relaxed) {
                    let round = async {
                        let e = c
                            .encrypt(EncryptRequest {
                                plaintext: plaintext.clone(),
                                uid: format!("traffic-{n}"),
                            })
                            .await
                            .map_err(|e| format!("Encrypt: {e:?}"))?
                            .into_inner();
                        let pt = decrypt(&mut c, &e)
                            .await
                            .map_err(|e| format!("Decrypt of a new ciphertext: {e:?}"))?;
                        if pt != plaintext {
                            return Err("Decrypt returned the wrong plaintext".to_owned());
                        }
                        let pt = decrypt(&mut c, &early)
                            .await
                            .map_err(|e| format!("Decrypt of the early ciphertext: {e:?}"))?;
                        if pt != early_plaintext {
                            return Err("Decrypt of the early ciphertext: wrong plaintext".into());
                        }
                        let st = c
                            .status(StatusRequest {})
                            .await
                            .map_err(|e| format!("Status: {e:?}"))?
                            .into_inner();
                        if st.healthz != "ok" {
                            return Err(format!("Status: healthz {:?}", st.healthz));
                        }
                        Ok(())
                    };
                    match round.await {
                        Ok(()) => {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => failed.push(e),
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                failed
            }));
        }
        Self { stop, ok, tasks }
    }

    fn rounds(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    /// Stops the clients; returns the rounds that worked and every failure.
    async fn finish(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let mut failed = Vec::new();
        for t in self.tasks {
            failed.extend(t.await.unwrap());
        }
        (self.ok.load(Ordering::Relaxed), failed)
    }
}

/// swtpm killed under traffic and restarted: every Encrypt, Decrypt and Status of two
/// clients succeeds throughout (before, during the outage, across the restart, across the
/// rotation after it: zero failed calls); the probes and metrics say the backend is gone
/// and come back; a rotation after the restart reaches the running plugin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tpm_lost_while_serving_keeps_serving_from_memory_and_recovers() {
    let mut node = TpmNode::new(&[]);
    let first = node.ok(&["key", "init"], &[]);
    let plugin = node.serve().await;
    let mut c = plugin.v2().await;
    let early = encrypt(&mut c, b"before the TPM went away").await;
    wait_http(&plugin, "/metrics", Duration::from_secs(5), |_, b| {
        metric(b, "kms_plugin_backend_healthy", "1")
    })
    .await;
    let traffic = Traffic::start(&plugin, &early, b"before the TPM went away").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let at_kill = traffic.rounds();
    assert!(at_kill > 0, "no traffic before the kill");

    node.tpm.kill();
    // Encrypt and Decrypt need only the keys in memory: they go on working.
    let until = Instant::now() + Duration::from_secs(3);
    let mut served = 0;
    while Instant::now() < until {
        let e = encrypt(&mut c, b"while the TPM is gone").await;
        assert_eq!(e.key_id, first);
        assert_eq!(decrypt(&mut c, &e).await.unwrap(), b"while the TPM is gone");
        assert_eq!(
            decrypt(&mut c, &early).await.unwrap(),
            b"before the TPM went away"
        );
        assert_eq!(status_key_id(&mut c).await, first);
        served += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(served >= 10, "only {served} rounds in 3 s");
    // ...but the probes and metrics say the backend is gone (rotation is impossible).
    let ready = wait_http(&plugin, "/readyz", Duration::from_secs(5), |code, b| {
        code == 200 && b.contains("key backend unavailable")
    })
    .await;
    assert!(ready.starts_with("ok"), "{ready}");
    wait_http(&plugin, "/metrics", Duration::from_secs(5), |_, b| {
        metric(b, "kms_plugin_backend_healthy", "0")
    })
    .await;
    let logs = plugin.logs();
    let line = logs.lines().find(|l| {
        l.contains("ERROR") && l.contains("key backend became unavailable") && l.contains("TPM")
    });
    let line = line.unwrap_or_else(|| panic!("no error naming the TPM in the logs:\n{logs}"));
    println!("plugin log when the TPM went away: {line}");
    let at_restart = traffic.rounds();
    assert!(
        at_restart > at_kill + 10,
        "little traffic during the outage"
    );

    // Blocking (it may wait out TIME_WAIT): off the worker the clients run on.
    tokio::task::block_in_place(|| node.tpm.restart());
    wait_http(&plugin, "/metrics", Duration::from_secs(10), |_, b| {
        metric(b, "kms_plugin_backend_healthy", "1")
    })
    .await;
    let (code, ready) = plugin.http_get("/readyz");
    assert_eq!(code, 200);
    assert!(!ready.contains("unavailable"), "{ready}");

    // The TPM is usable again: a rotation made now reaches the running plugin.
    let second = node.ok(&["key", "rotate"], &[]);
    assert_ne!(second, first);
    wait_key_id(&mut c, &second, Duration::from_secs(10)).await;
    let e = encrypt(&mut c, b"after the TPM came back").await;
    assert_eq!(e.key_id, second);
    assert_eq!(
        decrypt(&mut c, &e).await.unwrap(),
        b"after the TPM came back"
    );
    assert_eq!(
        decrypt(&mut c, &early).await.unwrap(),
        b"before the TPM went away"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let at_rotation = traffic.rounds();
    let (rounds, failed) = traffic.finish().await;
    println!(
        "traffic: {rounds} rounds of Encrypt+Decrypt+Decrypt+Status ({at_kill} before the kill, \
         {} during the outage, {} across restart and rotation), {} failed",
        at_restart - at_kill,
        at_rotation - at_restart,
        failed.len()
    );
    assert!(
        failed.is_empty(),
        "{} calls failed around the TPM outage, first: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(at_rotation > at_restart, "no traffic after the restart");
    drop(c);
    assert!(plugin.terminate().success());
    assert_eq!(node.tpm.transient_handles(), 0);
}

/// Rotations driven through the library (the CLI's and the keeper's code paths) for speed.
const ROTATIONS: usize = 1000;
/// Rotations that go through the key store on disk before the in-memory ones.
const STORE_ROTATIONS: usize = 25;

#[test]
fn a_thousand_rotations_leak_no_tpm_handles() {
    let tpm = Swtpm::start();
    let dir = tempfile::tempdir().unwrap();
    let store = KeyStore::new(dir.path().join("ks"));
    let backend = TpmBackend::open(TpmOptions {
        tcti: tpm.tcti(),
        pcr_policy: None,
        owner_auth_file: None,
        srk_handle: Some(DEFAULT_SRK_HANDLE),
    })
    .unwrap();
    kms_plugin::keyadmin::init(&store, &backend, None).unwrap();
    let mut ring = KeyRing::load(&store.load().unwrap(), &backend, None).unwrap();
    let started = Instant::now();
    // The first rotations go the whole way: `key add` (seal in the TPM, rewrite the
    // manifest) and the keeper's reload (unseal the new key).
    for i in 1..=STORE_ROTATIONS {
        let id = kms_plugin::keyadmin::add(&store, &backend, KeyState::Active)
            .unwrap_or_else(|e| panic!("rotation {i} failed: {e}"));
        let next = KeyRing::load(&store.load().unwrap(), &backend, Some(&ring))
            .unwrap_or_else(|e| panic!("reload after rotation {i} failed: {e}"));
        assert_eq!(next.active().unwrap().id.as_str(), id.as_str());
        ring = next;
    }
    assert_eq!(tpm.transient_handles(), 0);
    // The rest exercise the same TPM paths (seal a new key, unseal it in the reload) on
    // an in-memory manifest that drops retired keys, so the test measures handles rather
    // than the cost of rewriting an ever-growing manifest.
    let mut manifest = store.load().unwrap();
    let first = manifest.keys[0].clone();
    for i in STORE_ROTATIONS + 1..=ROTATIONS {
        let kek = Kek::generate().unwrap();
        let serial = manifest.take_serial();
        let id = KeyId::generate(serial, time::OffsetDateTime::now_utc()).unwrap();
        let sealed = backend
            .seal(&id, &kek)
            .unwrap_or_else(|e| panic!("seal {i} failed: {e}"));
        let mut record = manifest.keys.last().unwrap().clone();
        record.id = id.clone();
        record.serial = serial;
        record.state = KeyState::Active;
        record.sealed = sealed;
        record.check_value = kms_plugin::keyring::check_value(&kek);
        manifest.add(record);
        let now = time::OffsetDateTime::now_utc();
        let old: Vec<String> = manifest
            .keys
            .iter()
            .filter(|k| k.state == KeyState::DecryptOnly)
            .map(|k| k.id.to_string())
            .collect();
        for o in old.iter().skip(1) {
            manifest.retire(o, now).unwrap();
        }
        manifest.keys.retain(|k| k.state != KeyState::Retired);
        let next = KeyRing::load(&manifest, &backend, Some(&ring))
            .unwrap_or_else(|e| panic!("reload after rotation {i} failed: {e}"));
        assert_eq!(next.active().unwrap().id, id);
        ring = next;
        if i % 250 == 0 {
            assert_eq!(
                tpm.transient_handles(),
                0,
                "transient handles left after {i} rotations"
            );
        }
    }
    let elapsed = started.elapsed();
    println!(
        "{ROTATIONS} rotations in {:.1} s ({:.2} ms each)",
        elapsed.as_secs_f64(),
        elapsed.as_secs_f64() * 1000.0 / ROTATIONS as f64,
    );
    // Only the persistent SRK remains; nothing transient, while the backend is open...
    assert_eq!(tpm.transient_handles(), 0);
    // ...and the very first key, sealed 1000 rotations ago, still unseals to itself.
    let kek = backend.unseal(&first.id, &first.sealed).unwrap();
    assert_eq!(kms_plugin::keyring::check_value(&kek), first.check_value);
    drop(backend);
    assert_eq!(tpm.transient_handles(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timings_start_and_rotate_on_swtpm() {
    let node = TpmNode::new(&[]);
    let mut last = node.ok(&["key", "init"], &[]);

    let start_to_healthz = |label: &'static str, want: String| {
        let node = &node;
        async move {
            let t = Instant::now();
            let plugin = node.serve().await;
            wait_http(&plugin, "/healthz", Duration::from_secs(10), |code, _| {
                code == 200
            })
            .await;
            let took = t.elapsed();
            let mut c = plugin.v2().await;
            assert_eq!(status_key_id(&mut c).await, want);
            drop(c);
            assert!(plugin.terminate().success());
            println!(
                "plugin start to first /healthz ok with {label}: {} ms",
                took.as_millis()
            );
            took
        }
    };
    let one = start_to_healthz("1 key", last.clone()).await;

    let mut rotate_ms = Vec::new();
    for _ in 0..9 {
        let t = Instant::now();
        last = node.ok(&["key", "rotate"], &[]);
        rotate_ms.push(t.elapsed().as_millis());
    }
    rotate_ms.sort_unstable();
    println!(
        "`key rotate` CLI call: median {} ms (min {}, max {})",
        rotate_ms[4], rotate_ms[0], rotate_ms[8]
    );
    assert_eq!(node.list()["keys"].as_array().unwrap().len(), 10);

    let ten = start_to_healthz("10 keys", last.clone()).await;
    // Generous bounds: these are for the report, not a benchmark; they catch a hang.
    assert!(one < Duration::from_secs(10) && ten < Duration::from_secs(10));
    assert_eq!(node.tpm.transient_handles(), 0);
}
