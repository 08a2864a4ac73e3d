//! The TPM backend against a real software TPM (swtpm), one per test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::swtpm::Swtpm;
use common::{Plugin, cli, cli_ok};
use kms_proto::v2::{DecryptRequest, EncryptRequest, StatusRequest};

/// Backend flags for `swtpm`.
fn tpm_args(t: &Swtpm) -> Vec<String> {
    vec!["--backend".into(), "tpm".into(), "--tcti".into(), t.tcti()]
}

fn with<'a>(base: &'a [&'a str], extra: &'a [String]) -> Vec<&'a str> {
    base.iter().copied().chain(extra.iter().map(String::as_str)).collect()
}

#[tokio::test]
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
    assert_eq!((st.healthz.as_str(), st.key_id.as_str()), ("ok", id.as_str()));
    let seed = vec![9u8; 32];
    let enc = c.encrypt(EncryptRequest { plaintext: seed.clone(), uid: "1".into() }).await.unwrap().into_inner();
    let dec = c
        .decrypt(DecryptRequest { ciphertext: enc.ciphertext, uid: "2".into(), key_id: enc.key_id, annotations: enc.annotations })
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
    cli_ok(&with(&["key", "init", "--key-store", ks], &tpm_args(&tpm_a)));
    let out = cli(&with(
        &["serve", "--key-store", ks, "--socket", &format!("{}/s.sock", dir.path().display()), "--http-addr", "off"],
        &tpm_args(&tpm_b),
    ));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cleared or replaced") && err.contains("key recover"), "{err}");
}
