//! Multi-node rotation guard on real software TPMs: a node with registered peers never
//! makes a key active that a peer does not hold, and automatic rotation stages a key,
//! writes the peers' bundles and waits for their receipts.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use common::swtpm::{TpmNode, decrypt, encrypt, status_key_id, wait_key_id};
use common::{Plugin, cli, cli_ok};

fn outbox_bundle(node: &TpmNode, within: Duration) -> std::path::PathBuf {
    let outbox = std::path::Path::new(&node.ks).join("outbox");
    let deadline = Instant::now() + within;
    loop {
        if let Some(e) = std::fs::read_dir(&outbox).ok().and_then(|mut d| d.next()) {
            return e.unwrap().path();
        }
        assert!(
            Instant::now() < deadline,
            "no bundle appeared in {}",
            outbox.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn automatic_rotation_waits_for_every_peer() {
    let a = TpmNode::new(&[]);
    let b = TpmNode::new(&[]);
    let k1 = a.ok(&["key", "init"], &[]);
    b.ok(
        &["node", "export-public"],
        &["--out", &b.file("b.pub"), "--node-name", "node-b"],
    );
    a.ok(
        &["key", "export", &k1],
        &["--to", &b.file("b.pub"), "--out", &a.file("k1.bundle")],
    );
    b.ok(
        &["key", "import", &a.file("k1.bundle")],
        &["--receipt", &b.file("k1.receipt")],
    );
    cli_ok(&["node", "add-peer", &b.file("b.pub"), "--key-store", &a.ks]);
    assert_eq!(a.list()["keys"][0]["missing_peers"][0], "node-b");
    cli_ok(&[
        "key",
        "confirm",
        &b.file("k1.receipt"),
        "--key-store",
        &a.ks,
    ]);
    assert!(
        a.list()["keys"][0]["missing_peers"]
            .as_array()
            .unwrap()
            .is_empty()
    );

    // One-step rotation would activate a key node-b lacks: refused.
    let err = a.fails(&["key", "rotate"], &[]);
    assert!(err.contains("peers") && err.contains("node-b"), "{err}");

    let plugin_a = Plugin::start_with(
        &a.ks,
        &a.backend_strs(),
        &["--rotate-every", "1s", "--drain-timeout", "1s"],
    )
    .await;
    let plugin_b = b.serve().await;
    let mut ca = plugin_a.v2().await;
    let mut cb = plugin_b.v2().await;
    let before = encrypt(&mut ca, b"before rotation, 32 bytes long..").await;

    // Phase one happens by itself: a staged key and a bundle for node-b.
    let bundle = outbox_bundle(&a, Duration::from_secs(10));
    let staged: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&bundle).unwrap()).unwrap();
    let k2 = staged["key_id"].as_str().unwrap().to_owned();
    assert_ne!(k2, k1);
    // It stays staged while node-b has not confirmed: several reload intervals later,
    // Encrypt still uses k1, and a manual promote is refused.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(status_key_id(&mut ca).await, k1);
    let refused = cli(&["key", "promote", &k2, "--key-store", &a.ks]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("not enrolled on peer(s) node-b"));
    let (_, metrics) = plugin_a.http_get("/metrics");
    assert!(
        metrics
            .lines()
            .any(|l| l == "kms_plugin_rotation_waiting_peers 1"),
        "{metrics}"
    );

    // Phase two: node-b imports and confirms; node-a promotes on its own.
    b.ok(
        &["key", "import", bundle.to_str().unwrap()],
        &["--receipt", &b.file("k2.receipt")],
    );
    cli_ok(&[
        "key",
        "confirm",
        &b.file("k2.receipt"),
        "--key-store",
        &a.ks,
    ]);
    wait_key_id(&mut ca, &k2, Duration::from_secs(10)).await;

    // node-b (still encrypting under k1) reads what node-a now writes under k2, and both
    // read what was written before.
    let after = encrypt(&mut ca, b"after rotation, also 32 bytes....").await;
    assert_eq!(after.key_id, k2);
    tokio::time::sleep(Duration::from_secs(2)).await; // node-b's reload interval
    assert_eq!(
        decrypt(&mut cb, &after).await.unwrap(),
        b"after rotation, also 32 bytes...."
    );
    assert_eq!(
        decrypt(&mut cb, &before).await.unwrap(),
        b"before rotation, 32 bytes long.."
    );
    assert_eq!(
        decrypt(&mut ca, &before).await.unwrap(),
        b"before rotation, 32 bytes long.."
    );
    assert!(
        plugin_a
            .logs()
            .contains("every peer holds the staged key: promoted it")
    );
}
