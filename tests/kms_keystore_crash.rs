//! Crash safety of the key store: `key rotate` SIGKILLed at random moments (also while a
//! running plugin reserves counters) never leaves a store that fails to load, never loses
//! or half-adds a key, and never stops the plugin from decrypting what it encrypted.
//! A damaged manifest stops a new `serve`, not a running one.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::{HashMap, HashSet};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{
    BIN, Plugin, Sample, Store, assert_all_decrypt, cli, connect, encrypt_sample as encrypt,
    wait_key_id,
};
use kms_proto::v2::key_management_service_client::KeyManagementServiceClient as V2Client;
use kms_proto::v2::{EncryptRequest, StatusRequest};
use rand::Rng;
use tonic::transport::Channel;

const ITERATIONS: usize = 40;

/// `key list --output json`, which must succeed whatever state a kill left.
fn list(store: &Store, when: &str) -> serde_json::Value {
    let out = cli(&[
        "key",
        "list",
        "--key-store",
        store.path_str(),
        "--output",
        "json",
    ]);
    assert!(
        out.status.success(),
        "{when}: key store does not load: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn key_ids(list: &serde_json::Value) -> Vec<String> {
    list["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["id"].as_str().unwrap().to_owned())
        .collect()
}

fn state_of<'a>(list: &'a serde_json::Value, id: &str) -> &'a str {
    list["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["id"] == id)
        .unwrap()["state"]
        .as_str()
        .unwrap()
}

/// Files in the key store other than the expected ones and leftover temp files.
fn unexpected_files(store: &Store) -> (Vec<String>, usize) {
    let mut odd = Vec::new();
    let mut temps = 0;
    for e in std::fs::read_dir(store.path()).unwrap() {
        let name = e.unwrap().file_name().into_string().unwrap();
        match name.as_str() {
            "manifest.json" | ".lock" | "insecure-software-root.key" => {}
            n if n.starts_with(".manifest.") && n.ends_with(".tmp") => temps += 1,
            _ => odd.push(name),
        }
    }
    (odd, temps)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_rotations_never_break_the_store() {
    let store = Store::init();
    let plugin = Plugin::start(&store, &[]).await;
    let mut c = plugin.v2().await;
    let mut samples = vec![encrypt(&mut c, "seed-0").await];

    // Clients hammering Encrypt in every other iteration, so the plugin keeps reserving
    // counters (a key store write every 2048 encryptions) while rotations are being killed.
    let hammering = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut hammers = Vec::new();
    for _ in 0..3 {
        let mut c = V2Client::new(connect(&plugin.socket).await);
        let (hammering, stop, ok, failed) =
            (hammering.clone(), stop.clone(), ok.clone(), failed.clone());
        hammers.push(tokio::spawn(async move {
            let mut errors = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                if !hammering.load(Ordering::Relaxed) {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                }
                match c
                    .encrypt(EncryptRequest {
                        plaintext: vec![1; 32],
                        uid: "hammer".into(),
                    })
                    .await
                {
                    Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        if errors.len() < 5 {
                            errors.push(format!("{e:?}"));
                        }
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
            errors
        }));
    }

    // Kill within 0..15 ms, or within the time a whole `key rotate` takes on this machine if
    // that is longer (a loaded machine), so kills also land during and after the write.
    let t = Instant::now();
    store.rotate();
    let window_us = (t.elapsed().as_micros() as u64 * 6 / 5).max(15_000);
    let mut rng = rand::rng();
    let mut prev = list(&store, "start");
    let first_generation = prev["generation"].as_u64().unwrap();
    let (mut landed, mut killed, mut finished) = (0u64, 0, 0);
    let mut durations = Vec::new();
    for i in 0..ITERATIONS {
        // Every other iteration: with the plugin busy reserving counters, and reloading.
        let busy = i % 2 == 1;
        hammering.store(busy, Ordering::Relaxed);
        if busy {
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
        let delay = Duration::from_micros(rng.random_range(0..window_us));
        let started = Instant::now();
        let mut child = Command::new(BIN)
            .args([
                "key",
                "rotate",
                "--key-store",
                store.path_str(),
                "--backend",
                "insecure-software",
            ])
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        if busy {
            // Reload now: picks up the previous iteration's rotation, if it landed, and
            // reserves counters for the new key while this rotation runs.
            plugin.signal("HUP");
        }
        tokio::time::sleep(delay).await;
        match child.try_wait().unwrap() {
            Some(st) => {
                assert!(
                    st.success(),
                    "iteration {i}: key rotate failed on its own: {st}"
                );
                finished += 1;
                durations.push(started.elapsed());
            }
            None => {
                child.kill().unwrap();
                killed += 1;
            }
        }
        child.wait().unwrap();

        let when = format!("iteration {i} (kill due at {delay:?})");
        let now = list(&store, &when);
        let manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(store.path().join("manifest.json")).unwrap())
                .unwrap_or_else(|e| panic!("{when}: manifest.json does not parse: {e}"));
        assert_eq!(
            manifest["keys"].as_array().unwrap().len(),
            now["keys"].as_array().unwrap().len()
        );
        let active: Vec<_> = now["keys"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|k| k["state"] == "active")
            .collect();
        assert_eq!(active.len(), 1, "{when}: {now}");
        assert_eq!(active[0]["id"], now["active_key_id"], "{when}");
        assert!(
            now["generation"].as_u64() >= prev["generation"].as_u64(),
            "{when}: generation went back"
        );

        // Either the rotation happened as a whole or not at all: one new key, now active,
        // the previous active key decrypt-only; nothing else changed state or disappeared.
        let (before, after) = (key_ids(&prev), key_ids(&now));
        assert_eq!(
            after[..before.len().min(after.len())],
            before[..],
            "{when}: keys lost or reordered"
        );
        match after.len() - before.len() {
            0 => assert_eq!(now["active_key_id"], prev["active_key_id"], "{when}"),
            1 => {
                landed += 1;
                assert_eq!(
                    now["active_key_id"].as_str().unwrap(),
                    after[before.len()],
                    "{when}"
                );
                assert_eq!(
                    state_of(&now, prev["active_key_id"].as_str().unwrap()),
                    "decrypt-only"
                );
            }
            n => panic!("{when}: {n} keys added by one rotation"),
        }
        let (odd, _) = unexpected_files(&store);
        assert!(
            odd.is_empty(),
            "{when}: unexpected files in the key store: {odd:?}"
        );

        // The running plugin still decrypts everything, and encrypts a new seed.
        samples.push(encrypt(&mut c, &format!("seed-{}", i + 1)).await);
        assert_all_decrypt(&mut c, &samples, &when).await;
        prev = now;
    }
    stop.store(true, Ordering::Relaxed);
    let mut hammer_errors = Vec::new();
    for h in hammers {
        hammer_errors.extend(h.await.unwrap());
    }
    let (_, temps) = unexpected_files(&store);
    // Every key store write bumps the generation: what the CLI did not write, serve did.
    let serve_writes = prev["generation"].as_u64().unwrap() - first_generation - landed;
    println!(
        "{ITERATIONS} iterations, kills within {window_us} us: {killed} rotations killed, {finished} finished before the kill \
         (fastest {:?}), {landed} took effect; {serve_writes} counter reservations by serve; \
         {temps} leftover temp files; hammer: {} ok, {} failed {:?}",
        durations.iter().min(),
        ok.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
        hammer_errors
    );
    assert!(
        killed > 0,
        "no rotation was killed mid-way: the test exercised nothing"
    );
    assert!(
        serve_writes > 0,
        "the plugin never wrote the key store during the test"
    );
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "Encrypt failed during killed rotations: {hammer_errors:?}"
    );
    assert!(ok.load(Ordering::Relaxed) > 0);
    let keys_used: HashSet<_> = samples.iter().map(|s| s.key_id.clone()).collect();
    println!("samples span {} keys", keys_used.len());

    // The plugin saw the surviving rotations: its Status matches the store.
    let want = prev["active_key_id"].as_str().unwrap().to_owned();
    wait_key_id(&mut c, &want, Duration::from_secs(10)).await;

    // A fresh plugin on the same store decrypts everything too.
    drop(c);
    drop(plugin);
    let plugin = Plugin::start(&store, &[]).await;
    let mut c = plugin.v2().await;
    assert_all_decrypt(&mut c, &samples, "after restart").await;
    let st = c.status(StatusRequest {}).await.unwrap().into_inner();
    assert_eq!(st.key_id, want);
}

fn serve_exit(store: &Store) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("kms.sock");
    let mut child = Command::new(BIN)
        .args([
            "serve",
            "--key-store",
            store.path_str(),
            "--backend",
            "insecure-software",
        ])
        .args(["--socket", sock.to_str().unwrap(), "--http-addr", "off"])
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("serve on a damaged key store kept running");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    assert!(!sock.exists());
    out
}

#[tokio::test]
async fn damaged_manifest_stops_new_serve_not_running_one() {
    let store = Store::init();
    let plugin = Plugin::start(&store, &[]).await;
    let mut c = plugin.v2().await;
    let old = encrypt(&mut c, "old").await;
    let k1 = store.rotate();
    let start = Instant::now();
    while c
        .status(StatusRequest {})
        .await
        .unwrap()
        .into_inner()
        .key_id
        != k1
    {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "rotation not picked up"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let new = encrypt(&mut c, "new").await;

    let path = store.path().join("manifest.json");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();

    let out = serve_exit(&store);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("damaged"), "{err}");
    assert!(err.contains("manifest.json"), "should name the file: {err}");
    let out = cli(&["key", "list", "--key-store", store.path_str()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("damaged"));
    // A rotation refuses to build on a damaged manifest (and does not overwrite it).
    let out = cli(&[
        "key",
        "rotate",
        "--key-store",
        store.path_str(),
        "--backend",
        "insecure-software",
    ]);
    assert!(!out.status.success());
    assert_eq!(std::fs::read(&path).unwrap(), &bytes[..bytes.len() / 2]);

    // The running plugin notices at its next reload, logs it, and keeps serving.
    plugin.signal("HUP");
    let start = Instant::now();
    while !plugin.logs().contains("damaged") {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no error logged:\n{}",
            plugin.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let logs = plugin.logs();
    let line = logs.lines().find(|l| l.contains("damaged")).unwrap();
    assert!(line.contains("ERROR"), "{line}");
    assert_all_decrypt(&mut c, &[old.clone(), new.clone()], "damaged manifest").await;
    let st = c.status(StatusRequest {}).await.unwrap().into_inner();
    assert_eq!(
        (st.healthz.as_str(), st.key_id.as_str()),
        ("ok", k1.as_str())
    );
    assert_eq!(encrypt(&mut c, "during").await.key_id, k1);

    // Restoring the manifest brings everything back; nothing was lost meanwhile.
    std::fs::write(&path, &bytes).unwrap();
    drop(c);
    drop(plugin);
    let plugin = Plugin::start(&store, &[]).await;
    assert_all_decrypt(&mut plugin.v2().await, &[old, new], "restored manifest").await;
}

/// One Encrypt that may fail (the plugin is being killed); `None` if it did.
async fn try_encrypt(c: &mut V2Client<Channel>, uid: &str) -> Option<Sample> {
    let seed = rand::random::<[u8; 32]>().to_vec();
    let enc = c
        .encrypt(EncryptRequest {
            plaintext: seed.clone(),
            uid: uid.to_owned(),
        })
        .await
        .ok()?
        .into_inner();
    Some(Sample {
        key_id: enc.key_id,
        ciphertext: enc.ciphertext,
        annotations: enc.annotations,
        seed,
    })
}

/// `serve --rotate-every 1s` under Encrypt traffic, SIGKILLed at a random moment and
/// restarted, again and again. It rotates at its first tick and every second after, and
/// reserves counters for each new key, so kills land before, during and after those writes.
/// After every kill: the manifest loads, no key was lost or reordered, ids and serials are
/// never reused, every key's recorded counter never went down and covers every Encrypt
/// answered under that key; after every restart everything answered before the kill
/// decrypts (and at the end, everything ever answered).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_serve_rotating_under_traffic_loses_nothing() {
    const RUNS: usize = 15;
    let store = Store::init();
    let mut rng = rand::rng();
    let mut all: Vec<Sample> = Vec::new();
    let mut last_run: Vec<Sample> = Vec::new();
    let mut answered: HashMap<String, u64> = HashMap::new();
    let mut prev = list(&store, "start");
    let mut kill_delays = Vec::new();
    // Kills that left a temporary manifest behind: they landed in the middle of a write.
    let mut mid_write = 0;
    for run in 0..RUNS {
        let plugin = Plugin::start(&store, &["--rotate-every", "1s"]).await;
        let mut c = plugin.v2().await;
        assert_all_decrypt(&mut c, &last_run, &format!("run {run}, after the restart")).await;

        let stop = Arc::new(AtomicBool::new(false));
        let mut clients = Vec::new();
        for n in 0..2 {
            let mut c = plugin.v2().await;
            let stop = Arc::clone(&stop);
            clients.push(tokio::spawn(async move {
                let mut got = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    match try_encrypt(&mut c, &format!("run{run}-c{n}")).await {
                        Some(s) => got.push(s),
                        None => break,
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                got
            }));
        }
        let delay = Duration::from_millis(rng.random_range(0..1500));
        kill_delays.push(delay);
        tokio::time::sleep(delay).await;
        let mut plugin = plugin;
        plugin.child.kill().unwrap();
        plugin.child.wait().unwrap();
        stop.store(true, Ordering::Relaxed);
        last_run.clear();
        for h in clients {
            last_run.extend(h.await.unwrap());
        }
        drop(c);
        drop(plugin);

        let when = format!("run {run} (killed after {delay:?})");
        let now = list(&store, &when);
        let manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(store.path().join("manifest.json")).unwrap())
                .unwrap_or_else(|e| panic!("{when}: manifest.json does not parse: {e}"));
        assert_eq!(
            manifest["keys"].as_array().unwrap().len(),
            now["keys"].as_array().unwrap().len()
        );
        let (before, after) = (key_ids(&prev), key_ids(&now));
        assert!(
            after.len() >= before.len() && after[..before.len()] == before[..],
            "{when}: keys lost or reordered: {before:?} -> {after:?}"
        );
        let unique: HashSet<_> = after.iter().collect();
        assert_eq!(unique.len(), after.len(), "{when}: a key id twice");
        let serials: Vec<u64> = manifest["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k["serial"].as_u64().unwrap())
            .collect();
        assert!(
            serials.windows(2).all(|w| w[0] < w[1]),
            "{when}: serials {serials:?}"
        );
        assert!(
            manifest["next_serial"].as_u64().unwrap() > *serials.last().unwrap(),
            "{when}: next_serial reuses a serial"
        );
        assert!(
            now["generation"].as_u64() >= prev["generation"].as_u64(),
            "{when}: generation went back"
        );
        assert_eq!(
            state_of(&now, now["active_key_id"].as_str().unwrap()),
            "active"
        );
        let (odd, temps) = unexpected_files(&store);
        assert!(odd.is_empty(), "{when}: unexpected files {odd:?}");
        mid_write += usize::from(temps > 0);

        // Counters: never down, and above every Encrypt answered under the key.
        for s in &last_run {
            *answered.entry(s.key_id.clone()).or_default() += 1;
        }
        let recorded = |l: &serde_json::Value, id: &str| {
            l["keys"]
                .as_array()
                .unwrap()
                .iter()
                .find(|k| k["id"] == id)
                .map_or(0, |k| k["encryptions_reserved"].as_u64().unwrap())
        };
        for id in &before {
            assert!(
                recorded(&now, id) >= recorded(&prev, id),
                "{when}: the counter of {id} went down"
            );
        }
        for (id, n) in &answered {
            assert!(
                after.contains(id),
                "{when}: Encrypt answered under {id}, which is not in the key store"
            );
            assert!(
                recorded(&now, id) >= *n,
                "{when}: {n} Encrypts answered under {id} but {} recorded",
                recorded(&now, id)
            );
        }
        all.extend(last_run.iter().cloned());
        prev = now;
    }

    let plugin = Plugin::start(&store, &[]).await;
    let mut c = plugin.v2().await;
    assert_all_decrypt(&mut c, &all, "the end").await;
    let keys = key_ids(&prev).len();
    let used: HashSet<_> = all.iter().map(|s| s.key_id.as_str()).collect();
    println!(
        "{RUNS} kills at {kill_delays:?} ({mid_write} left a temporary manifest): {keys} keys \
         in the store, {} Encrypts under {} of them, all decrypt",
        all.len(),
        used.len()
    );
    assert!(
        keys > RUNS / 2,
        "only {keys} keys: the plugin hardly rotated"
    );
    assert!(
        used.len() > RUNS / 2,
        "traffic under only {} keys",
        used.len()
    );
}
