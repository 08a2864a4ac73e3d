//! The key store on a small tmpfs that fills up. A rotation (the CLI's, or the plugin's own
//! `--rotate-every`) and a reservation of encryption counters fail with an error that says
//! "No space left on device" and what to do; the manifest stays as it was, no temporary file
//! is left, the running plugin keeps decrypting everything and encrypting as far as its
//! recorded counters allow (never beyond), `/readyz` and `/metrics` show the problem, and
//! everything resumes by itself once space is freed. Needs root to mount the tmpfs.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
#[path = "common/tmpfs.rs"]
mod tmpfs;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{Plugin, assert_all_decrypt, cli, cli_ok, encrypt_sample as encrypt, wait_key_id};
use kms_proto::v2::{EncryptRequest, StatusRequest};
use tmpfs::Tmpfs;

const SOFTWARE: &[&str] = &["--backend", "insecure-software"];
/// Small: a manifest with a few keys takes one or two of its 64 pages.
const SIZE: &str = "256k";

/// A key store at `ks` on the tmpfs, initialized.
fn init(fs: &Tmpfs) -> String {
    let ks = fs.path().join("ks").to_str().unwrap().to_owned();
    cli_ok(&[
        "key",
        "init",
        "--key-store",
        &ks,
        "--backend",
        "insecure-software",
    ]);
    ks
}

fn list(ks: &str) -> serde_json::Value {
    serde_json::from_str(&cli_ok(&[
        "key",
        "list",
        "--key-store",
        ks,
        "--output",
        "json",
    ]))
    .unwrap()
}

fn key_ids(list: &serde_json::Value) -> Vec<String> {
    list["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["id"].as_str().unwrap().to_owned())
        .collect()
}

/// The active key and the encryptions recorded (reserved) for it in the key store.
fn reserved(ks: &str) -> (String, u64) {
    let l = list(ks);
    let id = l["active_key_id"].as_str().unwrap().to_owned();
    let n = l["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["id"] == id.as_str())
        .unwrap()["encryptions_reserved"]
        .as_u64()
        .unwrap();
    (id, n)
}

fn rotate(ks: &str) -> std::process::Output {
    cli(&[
        "key",
        "rotate",
        "--key-store",
        ks,
        "--backend",
        "insecure-software",
    ])
}

/// Temporary manifests (`.manifest.*.tmp`) in the key store.
fn temp_files(ks: &str) -> Vec<String> {
    std::fs::read_dir(ks)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with(".manifest.") && n.ends_with(".tmp"))
        .collect()
}

/// The value of one series of `/metrics` (0 when absent).
fn metric(plugin: &Plugin, series: &str) -> f64 {
    let (code, body) = plugin.http_get("/metrics");
    assert_eq!(code, 200);
    body.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|r| r.strip_prefix(' ')))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

/// Polls `GET path` until `pred(code, body)`; returns the body. Fails after `timeout`.
async fn wait_http(
    plugin: &Plugin,
    path: &str,
    timeout: Duration,
    pred: impl Fn(u16, &str) -> bool,
) -> String {
    let start = Instant::now();
    loop {
        let (code, body) = plugin.http_get(path);
        if pred(code, &body) {
            return body;
        }
        assert!(
            start.elapsed() < timeout,
            "GET {path} did not get there in {timeout:?}; last answer {code}: {body}\nlog:\n{}",
            plugin.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The operator's error names the cause and the fix.
fn assert_names_full_disk(text: &str, what: &str) {
    assert!(
        text.contains("No space left on device"),
        "{what} should say the disk is full: {text}"
    );
    assert!(
        text.contains("free space"),
        "{what} should say what to do: {text}"
    );
}

/// `key rotate` on a full key store: a non-zero exit naming the full disk, the file and
/// the fix; the manifest byte for byte as it was, no temporary file left; the running
/// plugin decrypts and encrypts as before; once space is freed rotation works and the
/// plugin (and a fresh one) takes the new key and still decrypts everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_key_store_refuses_rotation_and_loses_nothing() {
    let Some(fs) = Tmpfs::mount(SIZE, "full_key_store_refuses_rotation_and_loses_nothing") else {
        return;
    };
    let ks = init(&fs);
    let plugin = Plugin::start_with(&ks, SOFTWARE, &[]).await;
    let mut c = plugin.v2().await;
    let mut samples = vec![encrypt(&mut c, "first").await];
    let out = rotate(&ks);
    assert!(out.status.success());
    let k2 = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    wait_key_id(&mut c, &k2, Duration::from_secs(10)).await;
    samples.push(encrypt(&mut c, "second").await);

    let manifest = std::path::Path::new(&ks).join("manifest.json");
    let (list_before, bytes_before) = (list(&ks), std::fs::read(&manifest).unwrap());
    let filler = fs.fill("filler");
    assert_eq!(fs.available(), 0);

    let out = rotate(&ks);
    let err = String::from_utf8_lossy(&out.stderr);
    println!("`key rotate` on a full key store: {}", err.trim());
    assert!(!out.status.success(), "rotation on a full disk succeeded?");
    assert_names_full_disk(&err, "key rotate");
    assert!(
        err.contains(manifest.to_str().unwrap()),
        "names the file: {err}"
    );
    assert_eq!(
        std::fs::read(&manifest).unwrap(),
        bytes_before,
        "manifest changed"
    );
    assert_eq!(list(&ks), list_before, "key list changed");
    assert_eq!(
        temp_files(&ks),
        Vec::<String>::new(),
        "temporary files left"
    );

    // The running plugin: a reload finds nothing new; everything old decrypts, Encrypt works.
    plugin.signal("HUP");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_all_decrypt(&mut c, &samples, "disk full").await;
    for i in 0..20 {
        let s = encrypt(&mut c, &format!("full-{i}")).await;
        assert_eq!(s.key_id, k2);
        samples.push(s);
    }
    assert_all_decrypt(&mut c, &samples, "disk full").await;
    let st = c.status(StatusRequest {}).await.unwrap().into_inner();
    assert_eq!(
        (st.healthz.as_str(), st.key_id.as_str()),
        ("ok", k2.as_str())
    );
    let (code, ready) = plugin.http_get("/readyz");
    assert_eq!(code, 200, "{ready}");

    // Space back: rotation works, the plugin takes the new key, nothing was lost.
    std::fs::remove_file(&filler).unwrap();
    let out = rotate(&ks);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let k3 = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let after = list(&ks);
    let mut want = key_ids(&list_before);
    want.push(k3.clone());
    assert_eq!(key_ids(&after), want);
    wait_key_id(&mut c, &k3, Duration::from_secs(10)).await;
    samples.push(encrypt(&mut c, "after").await);
    assert_eq!(samples.last().unwrap().key_id, k3);
    assert_all_decrypt(&mut c, &samples, "space freed").await;
    drop(c);
    drop(plugin);
    let plugin = Plugin::start_with(&ks, SOFTWARE, &[]).await;
    assert_all_decrypt(&mut plugin.v2().await, &samples, "fresh plugin").await;
}

/// `serve --rotate-every 1s` on a key store that fills up: the automatic rotation fails
/// every tick without changing the store; `/readyz` stays 200 with a warning naming the
/// full disk and the fix, the failures are counted in `/metrics` and logged as errors;
/// traffic goes on; once space is freed rotation resumes and the warning goes away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_key_store_stops_automatic_rotation_visibly_then_it_resumes() {
    let Some(fs) = Tmpfs::mount(
        SIZE,
        "full_key_store_stops_automatic_rotation_visibly_then_it_resumes",
    ) else {
        return;
    };
    const FAILURES: &str = r#"kms_plugin_key_store_update_failures_total{operation="rotation"}"#;
    let ks = init(&fs);
    let plugin = Plugin::start_with(&ks, SOFTWARE, &["--rotate-every", "1s"]).await;
    let mut c = plugin.v2().await;
    let mut samples = vec![encrypt(&mut c, "first").await];
    // Rotation works while there is space.
    let start = Instant::now();
    while key_ids(&list(&ks)).len() < 3 {
        assert!(start.elapsed() < Duration::from_secs(10), "no rotation");
        samples.push(encrypt(&mut c, "rotating").await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Fill up. The plugin may be replacing the manifest right now (which frees the old
    // one's pages): top the filler up until a rotation has failed.
    let filler = fs.fill("filler");
    let start = Instant::now();
    while metric(&plugin, FAILURES) < 1.0 {
        assert!(start.elapsed() < Duration::from_secs(10), "no failure");
        fs.fill("filler");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ready = wait_http(&plugin, "/readyz", Duration::from_secs(5), |code, b| {
        code == 200 && b.contains("automatic rotation failed")
    })
    .await;
    println!("/readyz with a full key store:\n{ready}");
    assert!(ready.starts_with("ok"), "{ready}");
    assert_names_full_disk(&ready, "/readyz");
    let logs = plugin.logs();
    let line = logs
        .lines()
        .find(|l| l.contains("ERROR") && l.contains("automatic rotation failed"))
        .unwrap_or_else(|| panic!("no error logged:\n{logs}"));
    assert_names_full_disk(line, "the log");

    // While full: several due rotations fail, the store does not change, traffic goes on.
    let frozen = list(&ks);
    let failures = metric(&plugin, FAILURES);
    for i in 0..25 {
        samples.push(encrypt(&mut c, &format!("full-{i}")).await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_all_decrypt(&mut c, &samples, "disk full").await;
    assert!(
        metric(&plugin, FAILURES) >= failures + 1.0,
        "the due rotation is retried every tick"
    );
    let now = list(&ks);
    assert_eq!(key_ids(&now), key_ids(&frozen), "keys changed while full");
    assert_eq!(now["active_key_id"], frozen["active_key_id"]);
    assert_eq!(
        temp_files(&ks),
        Vec::<String>::new(),
        "temporary files left"
    );
    let st = c.status(StatusRequest {}).await.unwrap().into_inner();
    assert_eq!(st.healthz, "ok");

    // Space back: the next tick rotates, the warning goes, failures stop.
    std::fs::remove_file(&filler).unwrap();
    let start = Instant::now();
    while key_ids(&list(&ks)).len() <= key_ids(&frozen).len() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "rotation did not resume"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_http(&plugin, "/readyz", Duration::from_secs(5), |code, b| {
        code == 200 && !b.contains("warning")
    })
    .await;
    let failures = metric(&plugin, FAILURES);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(metric(&plugin, FAILURES), failures, "still failing");
    let newest = list(&ks)["active_key_id"].as_str().unwrap().to_owned();
    assert!(!key_ids(&frozen).contains(&newest));
    samples.push(encrypt(&mut c, "after").await);
    assert_all_decrypt(&mut c, &samples, "space freed").await;
}

/// The counter reservation (a key store write every few thousand Encrypts) fails on a
/// full disk: the plugin hands out only the encryptions already recorded in the store,
/// then refuses Encrypt with UNAVAILABLE naming the full disk and the fix; `/readyz` says
/// so (503), Decrypt goes on, the failed write is retried on the reload tick (not once per
/// request); once space is freed Encrypt comes back by itself with a new reservation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_key_store_stops_encrypt_at_the_recorded_counter_then_recovers() {
    let Some(fs) = Tmpfs::mount(
        SIZE,
        "full_key_store_stops_encrypt_at_the_recorded_counter_then_recovers",
    ) else {
        return;
    };
    const FAILURES: &str = r#"kms_plugin_key_store_update_failures_total{operation="reservation"}"#;
    let ks = init(&fs);
    let plugin = Plugin::start_with(&ks, SOFTWARE, &[]).await;
    let mut c = plugin.v2().await;
    let (key, recorded) = reserved(&ks);
    assert!(recorded > 0, "the plugin reserves before it encrypts");
    let samples = vec![
        encrypt(&mut c, "first").await,
        encrypt(&mut c, "second").await,
    ];
    let filler = fs.fill("filler");
    assert_eq!(fs.available(), 0);
    let full_since = Instant::now();

    // Four clients encrypt until refused.
    let ok = Arc::new(AtomicU64::new(samples.len() as u64));
    let mut clients = Vec::new();
    for _ in 0..4 {
        let mut c = plugin.v2().await;
        let ok = Arc::clone(&ok);
        clients.push(tokio::spawn(async move {
            loop {
                match c
                    .encrypt(EncryptRequest {
                        plaintext: vec![7; 32],
                        uid: "hammer".into(),
                    })
                    .await
                {
                    Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                    Err(e) => return e,
                };
            }
        }));
    }
    let mut refusals = Vec::new();
    for h in clients {
        refusals.push(
            tokio::time::timeout(Duration::from_secs(40), h)
                .await
                .unwrap()
                .unwrap(),
        );
    }
    let ok = ok.load(Ordering::Relaxed);
    println!(
        "{ok} Encrypts with {recorded} recorded in the key store, then: {}",
        refusals[0].message()
    );
    assert!(
        ok <= recorded,
        "{ok} encryptions handed out but only {recorded} recorded in the key store"
    );
    assert!(ok >= recorded / 2, "refused too early: {ok} of {recorded}");
    for r in &refusals {
        assert_eq!(r.code(), tonic::Code::Unavailable, "{r:?}");
        assert_names_full_disk(r.message(), "the Encrypt error");
        assert!(r.message().contains(&key), "{}", r.message());
    }
    assert_eq!(reserved(&ks), (key.clone(), recorded), "the store changed");
    assert_eq!(
        temp_files(&ks),
        Vec::<String>::new(),
        "temporary files left"
    );

    // Probes and Status say why; Decrypt is unaffected.
    let (code, ready) = plugin.http_get("/readyz");
    println!("/readyz while Encrypt is refused:\n{ready}");
    assert_eq!(code, 503, "{ready}");
    assert_names_full_disk(&ready, "/readyz");
    let st = c.status(StatusRequest {}).await.unwrap().into_inner();
    assert_names_full_disk(&st.healthz, "Status");
    assert!(metric(&plugin, FAILURES) >= 1.0);
    assert_all_decrypt(&mut c, &samples, "Encrypt refused").await;
    // The write is retried on the 1 s reload tick, not once per refused request: a few
    // error lines, not one per Encrypt.
    let errors = plugin
        .logs()
        .lines()
        .filter(|l| l.contains("ERROR") && l.contains("No space left on device"))
        .count();
    let secs = full_since.elapsed().as_secs() as usize;
    assert!(
        (1..=secs + 3).contains(&errors),
        "{errors} error lines in {secs} s:\n{}",
        plugin.logs()
    );

    // Space back: Encrypt works again within a tick or two, with a new reservation.
    std::fs::remove_file(&filler).unwrap();
    let freed = Instant::now();
    let after = loop {
        match c
            .encrypt(EncryptRequest {
                plaintext: vec![8; 32],
                uid: "after".into(),
            })
            .await
        {
            Ok(r) => break r.into_inner(),
            Err(e) => assert!(
                freed.elapsed() < Duration::from_secs(10),
                "Encrypt did not come back: {e:?}"
            ),
        }
    };
    println!("Encrypt back {:?} after space was freed", freed.elapsed());
    assert_eq!(after.key_id, key);
    let (_, now) = reserved(&ks);
    assert!(now > recorded, "no new reservation: {now}");
    wait_http(&plugin, "/readyz", Duration::from_secs(5), |code, b| {
        code == 200 && !b.contains("warning")
    })
    .await;
    assert_all_decrypt(&mut c, &samples, "space freed").await;
}
