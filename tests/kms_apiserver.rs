//! kube-apiserver's view of the plugin: every rule it checks on Status and Encrypt.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{Plugin, Store};
use kms_proto::v2::{DecryptRequest, EncryptRequest, StatusRequest};

#[tokio::test]
async fn status_encrypt_decrypt_round_trip() {
    let store = Store::init();
    let plugin = Plugin::start(&store, &[]).await;
    let mut c = plugin.v2().await;
    let st = c.status(StatusRequest {}).await.unwrap().into_inner();
    assert_eq!(st.version, "v2");
    assert_eq!(st.healthz, "ok");
    assert_eq!(st.key_id, store.active_key());
    let seed = vec![7u8; 32];
    let enc = c
        .encrypt(EncryptRequest { plaintext: seed.clone(), uid: "u1".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(enc.key_id, st.key_id);
    let dec = c
        .decrypt(DecryptRequest {
            ciphertext: enc.ciphertext,
            uid: "u2".into(),
            key_id: enc.key_id,
            annotations: enc.annotations,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(dec.plaintext, seed);
}
