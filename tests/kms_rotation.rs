//! Key rotation as kube-apiserver lives through it: rotation under load with no failed
//! request, SIGHUP reloads, two-phase rotation, retire/reinstate, automatic rotation and
//! the encryption counters reserved in the key store.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{
    BIN, Plugin, Sample, Store, cli, cli_ok, connect, decrypt_sample, encrypt_sample as encrypt,
    wait_for_socket,
};
use kms_proto::v2::key_management_service_client::KeyManagementServiceClient as V2Client;
use kms_proto::v2::{EncryptRequest, StatusRequest};
use tempfile::TempDir;
use tonic::transport::Channel;

/// Encryptions the plugin reserves in the key store per write (documented behaviour).
const RESERVATION_BLOCK: u64 = 4096;

async fn decrypt(c: &mut V2Client<Channel>, s: &Sample) -> Result<Vec<u8>, tonic::Status> {
    decrypt_sample(c, s, &format!("dec-{}", rand::random::<u32>())).await
}

async fn assert_decrypts(c: &mut V2Client<Channel>, s: &Sample) {
    let pt = decrypt(c, s)
        .await
        .unwrap_or_else(|e| panic!("decrypt under {}: {e:?}", s.key_id));
    assert_eq!(pt, s.seed, "wrong plaintext under {}", s.key_id);
}

async fn status_key(c: &mut V2Client<Channel>) -> String {
    let st = c.status(StatusRequest {}).await.unwrap().into_inner();
    assert_eq!(st.healthz, "ok");
    st.key_id
}

/// Polls Status until it reports `want`; returns how long that took. Panics after `within`.
async fn wait_status(c: &mut V2Client<Channel>, want: &str, within: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let got = status_key(c).await;
        if got == want {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < within,
            "Status still reports {got} {:?} after the change to {want}",
            start.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn serials(store: &Store) -> HashMap<String, u64> {
    store.list_json()["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| {
            (
                k["id"].as_str().unwrap().to_owned(),
                k["serial"].as_u64().unwrap(),
            )
        })
        .collect()
}

fn key_field<'a>(list: &'a serde_json::Value, id: &str, field: &str) -> &'a serde_json::Value {
    let k = list["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["id"] == id);
    &k.unwrap_or_else(|| panic!("key {id} not listed: {list}"))[field]
}

/// `kms-plugin key rotate` off the async runtime, so client tasks keep running.
async fn rotate_blocking(store: &Store) -> String {
    let ks = store.path_str().to_owned();
    tokio::task::spawn_blocking(move || {
        cli_ok(&[
            "key",
            "rotate",
            "--key-store",
            &ks,
            "--backend",
            "insecure-software",
        ])
    })
    .await
    .unwrap()
}

#[derive(Default)]
struct ClientReport {
    requests: u64,
    errors: Vec<String>,
    /// (Status key_id seen just before, Encrypt's key_id).
    pairs: HashSet<(String, String)>,
    /// The first ciphertext made under each key.
    samples: BTreeMap<String, Sample>,
}

/// (a) `key rotate` three times while clients loop Status+Encrypt+Decrypt: no request
/// fails, Encrypt never uses a key older than the Status just before, Status switches
/// within 10 s and never flip-flops, and everything encrypted under old keys still decrypts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_under_traffic_fails_no_request() {
    let store = Store::init();
    let plugin = Plugin::start(&store, &[]).await;
    let k0 = store.active_key();
    let stop = Arc::new(AtomicBool::new(false));

    let mut clients = Vec::new();
    for t in 0..4 {
        let mut c = V2Client::new(connect(&plugin.socket).await);
        let stop = Arc::clone(&stop);
        clients.push(tokio::spawn(async move {
            let mut r = ClientReport::default();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let st = match c.status(StatusRequest {}).await {
                    Ok(s) => s.into_inner(),
                    Err(e) => {
                        r.errors.push(format!("status: {e:?}"));
                        continue;
                    }
                };
                if st.healthz != "ok" {
                    r.errors.push(format!("status healthz {:?}", st.healthz));
                }
                let seed = rand::random::<[u8; 32]>().to_vec();
                let uid = format!("t{t}-{n}");
                let enc = match c
                    .encrypt(EncryptRequest {
                        plaintext: seed.clone(),
                        uid,
                    })
                    .await
                {
                    Ok(e) => e.into_inner(),
                    Err(e) => {
                        r.errors.push(format!("encrypt: {e:?}"));
                        continue;
                    }
                };
                r.pairs.insert((st.key_id, enc.key_id.clone()));
                let s = Sample {
                    key_id: enc.key_id,
                    ciphertext: enc.ciphertext,
                    annotations: enc.annotations,
                    seed,
                };
                match decrypt(&mut c, &s).await {
                    Ok(pt) if pt == s.seed => {}
                    Ok(_) => r
                        .errors
                        .push(format!("decrypt under {}: wrong plaintext", s.key_id)),
                    Err(e) => r.errors.push(format!("decrypt under {}: {e:?}", s.key_id)),
                }
                r.requests += 3;
                r.samples.entry(s.key_id.clone()).or_insert(s);
            }
            r
        }));
    }

    // Watches Status the way the apiserver does (much more often), to catch flip-flops.
    let monitor = {
        let mut c = V2Client::new(connect(&plugin.socket).await);
        let stop = Arc::clone(&stop);
        tokio::spawn(async move {
            let mut seen: Vec<String> = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                if let Ok(st) = c.status(StatusRequest {}).await {
                    let id = st.into_inner().key_id;
                    if seen.last() != Some(&id) {
                        seen.push(id);
                    }
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            seen
        })
    };

    let mut c = plugin.v2().await;
    let mut keys = vec![k0.clone()];
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for i in 0..3 {
        let new = rotate_blocking(&store).await;
        assert!(!keys.contains(&new), "key id {new} reused");
        let took = wait_status(&mut c, &new, Duration::from_secs(10)).await;
        println!(
            "rotation {}: Status switched to {new} after {took:?}",
            i + 1
        );
        keys.push(new);
        tokio::time::sleep(Duration::from_millis(2000)).await;
    }
    stop.store(true, Ordering::Relaxed);

    let mut samples: BTreeMap<String, Sample> = BTreeMap::new();
    let mut pairs = HashSet::new();
    let mut errors = Vec::new();
    let mut total = 0;
    for (t, h) in clients.into_iter().enumerate() {
        let r = h.await.unwrap();
        assert!(r.requests > 0, "client {t} made no request");
        total += r.requests;
        errors.extend(r.errors);
        pairs.extend(r.pairs);
        for (k, s) in r.samples {
            samples.entry(k).or_insert(s);
        }
    }
    println!("{total} successful requests across 4 clients");
    assert!(
        errors.is_empty(),
        "{} failed requests, e.g. {:?}",
        errors.len(),
        &errors[..errors.len().min(5)]
    );

    let serial = serials(&store);
    for (status_key, enc_key) in &pairs {
        assert!(
            serial[enc_key] >= serial[status_key],
            "Encrypt used {enc_key} although Status had already reported the newer {status_key}"
        );
    }
    let seen = monitor.await.unwrap();
    assert_eq!(
        seen, keys,
        "Status key_id sequence (must switch once per rotation, in order)"
    );
    assert_eq!(
        samples.keys().cloned().collect::<HashSet<_>>(),
        keys.iter().cloned().collect::<HashSet<_>>(),
        "expected Encrypt results under every key"
    );

    // Everything made under every old key still decrypts, on a fresh connection.
    let mut c = plugin.v2().await;
    for s in samples.values() {
        assert_decrypts(&mut c, s).await;
    }
    let list = store.list_json();
    assert_eq!(list["active_key_id"], keys[3].as_str());
    for k in &keys[..3] {
        assert_eq!(key_field(&list, k, "state"), "decrypt-only");
    }
}

/// A `serve` started by hand, for flags the harness fixes (the reload interval).
struct Serve {
    child: Child,
    socket: PathBuf,
    log: PathBuf,
    _dir: TempDir,
}

impl Serve {
    async fn start(store: &Store, extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("kms.sock");
        let log = dir.path().join("stderr.log");
        let mut args = vec![
            "serve",
            "--key-store",
            store.path_str(),
            "--backend",
            "insecure-software",
        ];
        args.extend_from_slice(&["--socket", socket.to_str().unwrap(), "--http-addr", "off"]);
        args.extend_from_slice(extra);
        let child = Command::new(BIN)
            .args(&args)
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut s = Self {
            child,
            socket,
            log,
            _dir: dir,
        };
        wait_for_socket(&mut s.child, &s.socket, &s.log).await;
        s
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap()
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// (b) With a 60 s reload interval a rotation stays invisible for a while, and SIGHUP
/// makes it visible at once.
#[tokio::test]
async fn sighup_reloads_at_once() {
    let store = Store::init();
    let plugin = Serve::start(&store, &["--reload-interval", "60s"]).await;
    let mut c = V2Client::new(connect(&plugin.socket).await);
    let k0 = status_key(&mut c).await;
    let before = encrypt(&mut c, "before").await;
    let k1 = store.rotate();
    // The interval has not come round: the plugin still uses the old key.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        status_key(&mut c).await,
        k0,
        "reloaded without SIGHUP, before the 60s interval"
    );
    plugin.signal("HUP");
    let took = wait_status(&mut c, &k1, Duration::from_secs(3)).await;
    println!("SIGHUP: Status switched after {took:?}");
    assert_eq!(encrypt(&mut c, "after").await.key_id, k1);
    assert_decrypts(&mut c, &before).await;
    assert!(
        plugin.logs().contains("SIGHUP"),
        "no SIGHUP log line:\n{}",
        plugin.logs()
    );
}

/// (c) Two-phase rotation: `key add` stages a key without changing Status (even after the
/// plugin has reloaded); `key promote` switches Status to it.
#[tokio::test]
async fn two_phase_add_then_promote() {
    let store = Store::init();
    let plugin = Plugin::start(&store, &[]).await;
    let mut c = plugin.v2().await;
    let k0 = status_key(&mut c).await;
    let old = encrypt(&mut c, "old").await;

    let staged = cli_ok(&[
        "key",
        "add",
        "--key-store",
        store.path_str(),
        "--backend",
        "insecure-software",
    ]);
    assert_ne!(staged, k0);
    let list = store.list_json();
    assert_eq!(list["active_key_id"], k0.as_str());
    assert_eq!(key_field(&list, &staged, "state"), "decrypt-only");
    // Wait until the plugin has reloaded the store with the staged key in it.
    plugin.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !plugin.logs().contains("key ring reloaded") {
        assert!(
            Instant::now() < deadline,
            "plugin never reloaded after `key add`:\n{}",
            plugin.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        status_key(&mut c).await,
        k0,
        "`key add` changed the Status key_id"
    );
    assert_eq!(encrypt(&mut c, "still-old").await.key_id, k0);

    cli_ok(&["key", "promote", "--key-store", store.path_str(), &staged]);
    let took = wait_status(&mut c, &staged, Duration::from_secs(10)).await;
    println!("promote: Status switched after {took:?}");
    let new = encrypt(&mut c, "new").await;
    assert_eq!(new.key_id, staged);
    assert_decrypts(&mut c, &old).await;
    assert_decrypts(&mut c, &new).await;
    let list = store.list_json();
    assert_eq!(key_field(&list, &k0, "state"), "decrypt-only");
    // Promoting the active key again is refused.
    let again = cli(&["key", "promote", "--key-store", store.path_str(), &staged]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already active"));
}

/// (d) A retired key no longer decrypts (FailedPrecondition naming `reinstate`); after
/// `key reinstate` it decrypts again, under the same key id.
#[tokio::test]
async fn retire_and_reinstate() {
    let store = Store::init();
    let plugin = Plugin::start(&store, &[]).await;
    let mut c = plugin.v2().await;
    let k0 = status_key(&mut c).await;
    let old = encrypt(&mut c, "old").await;
    let k1 = store.rotate();
    wait_status(&mut c, &k1, Duration::from_secs(10)).await;
    let new = encrypt(&mut c, "new").await;

    cli_ok(&["key", "retire", "--key-store", store.path_str(), &k0]);
    assert_eq!(key_field(&store.list_json(), &k0, "state"), "retired");
    let start = Instant::now();
    let err = loop {
        match decrypt(&mut c, &old).await {
            Err(e) => break e,
            Ok(_) => assert!(
                start.elapsed() < Duration::from_secs(10),
                "retired key still decrypts after 10s"
            ),
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    println!("retire took effect after {:?}", start.elapsed());
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("reinstate"), "{err:?}");
    assert!(err.message().contains(&k0), "{err:?}");
    // The current key is unaffected.
    assert_decrypts(&mut c, &new).await;
    assert_eq!(status_key(&mut c).await, k1);

    cli_ok(&["key", "reinstate", "--key-store", store.path_str(), &k0]);
    let list = store.list_json();
    assert_eq!(key_field(&list, &k0, "state"), "decrypt-only");
    assert_eq!(list["active_key_id"], k1.as_str());
    let start = Instant::now();
    loop {
        match decrypt(&mut c, &old).await {
            Ok(pt) => {
                assert_eq!(pt, old.seed);
                break;
            }
            // Reload interval is 1 s: allow a few, on a loaded machine.
            Err(e) => assert!(
                start.elapsed() < Duration::from_secs(5),
                "reinstated key still refused: {e:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    println!("reinstate took effect after {:?}", start.elapsed());
    assert_eq!(
        status_key(&mut c).await,
        k1,
        "reinstating must not make the old key active"
    );
}

/// `key destroy`: only a retired key, only after the grace period; the running plugin
/// keeps serving the others, and the destroyed key's serial is never issued again.
#[tokio::test]
async fn destroy_only_retired_keys_after_the_grace_period() {
    let store = Store::init();
    let plugin = Plugin::start(&store, &[]).await;
    let mut c = plugin.v2().await;
    let k0 = status_key(&mut c).await;
    let k1 = store.rotate();
    wait_status(&mut c, &k1, Duration::from_secs(10)).await;
    let under_k1 = encrypt(&mut c, "k1").await;
    let k2 = store.rotate();
    wait_status(&mut c, &k2, Duration::from_secs(10)).await;
    let under_k2 = encrypt(&mut c, "k2").await;
    let ks = store.path_str();
    let destroy =
        |id: &str, grace: &str| cli(&["key", "destroy", "--key-store", ks, id, "--grace", grace]);
    let refused = |out: std::process::Output| {
        assert!(!out.status.success(), "destroy should have been refused");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };

    let err = refused(destroy(&k2, "0s"));
    assert!(
        err.contains("is active") && err.contains("only a retired key"),
        "{err}"
    );
    let err = refused(destroy(&k0, "0s"));
    assert!(
        err.contains("is decrypt-only") && err.contains("key retire"),
        "{err}"
    );
    let err = refused(destroy("k-nonexistent", "0s"));
    assert!(err.contains("no key k-nonexistent"), "{err}");

    cli_ok(&["key", "retire", "--key-store", ks, &k0]);
    let before = std::fs::read(store.path().join("manifest.json")).unwrap();
    // The default grace (7 days) protects a key retired a moment ago.
    let out = cli(&["key", "destroy", "--key-store", ks, &k0]);
    let err = refused(out);
    assert!(
        err.contains("grace period") && err.contains("reinstate"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(store.path().join("manifest.json")).unwrap(),
        before,
        "a refused destroy changes nothing"
    );

    let out = destroy(&k0, "0s");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list = store.list_json();
    let ids: Vec<&str> = list["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["id"].as_str().unwrap())
        .collect();
    assert!(!ids.contains(&k0.as_str()), "{ids:?}");
    assert!(
        ids.contains(&k1.as_str()) && ids.contains(&k2.as_str()),
        "{ids:?}"
    );
    assert!(
        !std::fs::read_to_string(store.path().join("manifest.json"))
            .unwrap()
            .contains(&k0),
        "nothing of the destroyed key is left in the manifest"
    );

    // The running plugin reloads and goes on serving the remaining keys.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_decrypts(&mut c, &under_k1).await;
    assert_decrypts(&mut c, &under_k2).await;
    assert_eq!(status_key(&mut c).await, k2);
    let earlier = serials(&store);
    let k3 = store.rotate();
    let after = serials(&store);
    assert!(
        after[&k3] > *earlier.values().max().unwrap(),
        "a new key never reuses a serial: {after:?}"
    );
    assert!(!plugin.logs().contains("panicked"));
}

/// (e) `--rotate-every 2s` rotates on its own; old ciphertexts still decrypt.
#[tokio::test]
async fn rotate_every_rotates_by_itself() {
    let store = Store::init();
    let plugin = Plugin::start(&store, &["--rotate-every", "2s"]).await;
    let mut c = plugin.v2().await;
    let k0 = status_key(&mut c).await;
    let old = encrypt(&mut c, "old").await;
    let start = Instant::now();
    let k1 = loop {
        let k = status_key(&mut c).await;
        if k != k0 {
            break k;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no automatic rotation in 10s:\n{}",
            plugin.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    println!("automatic rotation after {:?}", start.elapsed());
    let new = encrypt(&mut c, "new").await;
    assert_ne!(new.key_id, k0);
    assert_decrypts(&mut c, &old).await;
    assert_decrypts(&mut c, &new).await;
    let list = store.list_json();
    let keys = list["keys"].as_array().unwrap();
    assert!(keys.len() >= 2, "{list}");
    assert_eq!(
        keys.iter().filter(|k| k["state"] == "active").count(),
        1,
        "{list}"
    );
    assert_eq!(key_field(&list, &k0, "state"), "decrypt-only");
    assert!(serials(&store)[&k1] > serials(&store)[&k0]);
    assert!(
        plugin.logs().contains("rotated automatically"),
        "{}",
        plugin.logs()
    );
}

fn reserved(store: &Store) -> (String, u64) {
    let list = store.list_json();
    let id = list["active_key_id"].as_str().unwrap().to_owned();
    let n = key_field(&list, &id, "encryptions_reserved")
        .as_u64()
        .unwrap();
    (id, n)
}

/// (f) Encryption counters: reserved in the key store before use, so after N encryptions
/// and a restart the recorded count is >= N; every start reserves one more block and the
/// count never goes down. (Multi-threaded so the open client connection can answer the
/// plugin's GOAWAY while `terminate` blocks this thread; otherwise each stop waits out
/// the 10 s drain timeout.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encryption_counters_survive_restarts() {
    let store = Store::init();
    let (k, r0) = reserved(&store);
    assert_eq!(r0, 0);
    let mut done = 0u64; // Encrypt calls made so far (Status calls use the budget too).
    let mut history = vec![r0];
    let mut ciphertexts = HashSet::new();
    for (run, n) in [3000u64, 100, 0].into_iter().enumerate() {
        let plugin = Plugin::start(&store, &[]).await;
        let (id, r) = reserved(&store);
        assert_eq!(id, k);
        let prev = *history.last().unwrap();
        assert!(
            r >= prev + RESERVATION_BLOCK,
            "start {run}: reserved {r} after {prev}"
        );
        if run > 0 {
            // Nothing used the budget between stop and start: exactly one more block.
            assert_eq!(r, prev + RESERVATION_BLOCK, "start {run}");
        }
        history.push(r);
        let mut c = plugin.v2().await;
        for i in 0..n {
            let s = encrypt(&mut c, &format!("r{run}-{i}")).await;
            assert!(ciphertexts.insert(s.ciphertext), "ciphertext repeated");
        }
        done += n;
        // Give the keeper a tick to top up the reservation if it asked for one.
        tokio::time::sleep(Duration::from_millis(1200)).await;
        let (_, r) = reserved(&store);
        assert!(
            r >= done,
            "run {run}: {done} encryptions but only {r} reserved"
        );
        assert!(
            r >= *history.last().unwrap(),
            "reservation went down: {history:?} then {r}"
        );
        history.push(r);
        assert!(plugin.terminate().success());
        let (_, r) = reserved(&store);
        assert!(
            r >= done && r >= *history.last().unwrap(),
            "after stop: {r}, {history:?}"
        );
        history.push(r);
    }
    println!("encryptions_reserved over starts and stops: {history:?}");
    assert!(history.windows(2).all(|w| w[0] <= w[1]), "{history:?}");
    // 3000 > half a block: the first run must have topped up its reservation once.
    assert!(history[2] >= 2 * RESERVATION_BLOCK, "{history:?}");
}
