//! kube-apiserver's view of the plugin: every rule it checks on Status and Encrypt
//! (see the KMS v2 notes), plus the probes, metrics, logs and shutdown an operator
//! relies on. Everything goes through the real binary and the real Unix socket.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::{Plugin, Store};
use kms_proto::v1beta1;
use kms_proto::v2::key_management_service_client::KeyManagementServiceClient;
use kms_proto::v2::{
    DecryptRequest, EncryptRequest, EncryptResponse, StatusRequest, StatusResponse,
};
use rand::{Rng, RngCore};
use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

type V2 = KeyManagementServiceClient<Channel>;

/// kube-apiserver's limits (k8s.io/apiserver kmsv2).
const MAX_KEY_ID: usize = 1024;
const MAX_CIPHERTEXT: usize = 1024;
const MAX_ANNOTATION_BYTES: usize = 32 * 1024;

fn random_seed() -> Vec<u8> {
    let mut seed = vec![0u8; 32];
    rand::rng().fill_bytes(&mut seed);
    seed
}

/// A fresh request uid, shaped like the UUIDs the apiserver sends.
fn fresh_uid() -> String {
    let b: [u8; 16] = rand::random();
    let h = hex(&b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// One DNS-1123 label: 1-63 of [a-z0-9-], starting and ending alphanumeric.
fn is_dns1123_label(l: &str) -> bool {
    let alnum = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    let b = l.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && alnum(b[0])
        && alnum(b[b.len() - 1])
        && b.iter().all(|&c| alnum(c) || c == b'-')
}

/// What the apiserver requires of an annotation key: a lowercase DNS-1123 subdomain
/// (at most 253 bytes) with at least two labels, e.g. `v1.kms.example.org`.
fn is_valid_annotation_key(k: &str) -> bool {
    k.len() <= 253 && k.split('.').count() >= 2 && k.split('.').all(is_dns1123_label)
}

/// The validator itself must be right, or the checks built on it prove nothing.
#[test]
fn annotation_key_validator_matches_the_apiserver_rule() {
    for ok in [
        "v1.envelope.edgeseal.io",
        "a.b",
        "kms.example-1.org",
        "0.x9",
    ] {
        assert!(is_valid_annotation_key(ok), "{ok:?} should be valid");
    }
    let long_label = format!("{}.io", "a".repeat(64));
    let too_long = format!("{}.io", vec!["a".repeat(60); 5].join("."));
    for bad in [
        "",
        "edgeseal",
        "V1.envelope.edgeseal.io",
        "a..b",
        ".a.b",
        "a.b.",
        "-a.b",
        "a-.b",
        "a_b.c",
        "a b.c",
        "a/b.c",
        &long_label,
        &too_long,
    ] {
        assert!(!is_valid_annotation_key(bad), "{bad:?} should be invalid");
    }
}

/// Every check kube-apiserver makes on an Encrypt response.
fn assert_apiserver_accepts(enc: &EncryptResponse, status_key_id: &str) {
    assert!(!enc.ciphertext.is_empty(), "empty ciphertext");
    assert!(
        enc.ciphertext.len() <= MAX_CIPHERTEXT,
        "ciphertext of {} bytes",
        enc.ciphertext.len()
    );
    assert_eq!(
        enc.key_id, status_key_id,
        "Encrypt key_id differs from Status key_id"
    );
    let mut total = 0;
    for (k, v) in &enc.annotations {
        assert!(
            is_valid_annotation_key(k),
            "annotation key {k:?} is not a 2+ label DNS-1123 subdomain"
        );
        total += k.len() + v.len();
    }
    assert!(
        total <= MAX_ANNOTATION_BYTES,
        "annotations are {total} bytes"
    );
}

/// Every check kube-apiserver makes on a Status response.
fn assert_healthy_status(st: &StatusResponse, version: &str) {
    assert_eq!(st.version, version);
    assert_eq!(st.healthz, "ok");
    assert!(!st.key_id.is_empty(), "Status key_id is empty");
    assert!(
        st.key_id.len() <= MAX_KEY_ID,
        "Status key_id is {} bytes",
        st.key_id.len()
    );
}

async fn status(c: &mut V2) -> StatusResponse {
    c.status(StatusRequest {}).await.unwrap().into_inner()
}

async fn encrypt(c: &mut V2, seed: &[u8], uid: &str) -> EncryptResponse {
    common::log_gate::watch_bytes("a DEK seed (Encrypt plaintext)", seed);
    c.encrypt(EncryptRequest {
        plaintext: seed.to_vec(),
        uid: uid.into(),
    })
    .await
    .unwrap()
    .into_inner()
}

/// Decrypts the way the apiserver does on a DEK-cache miss: stored key_id and annotations,
/// fresh uid.
async fn decrypt(c: &mut V2, enc: &EncryptResponse, uid: &str) -> Vec<u8> {
    c.decrypt(DecryptRequest {
        ciphertext: enc.ciphertext.clone(),
        uid: uid.into(),
        key_id: enc.key_id.clone(),
        annotations: enc.annotations.clone(),
    })
    .await
    .unwrap()
    .into_inner()
    .plaintext
}

/// Value of the first sample of `name` whose labels include all of `labels`.
fn metric(body: &str, name: &str, labels: &[&str]) -> Option<f64> {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.split(['{', ' ']).next() == Some(name))
        .find(|l| labels.iter().all(|want| l.contains(want)))
        .and_then(|l| l.rsplit(' ').next())
        .map(|v| v.parse().unwrap())
}

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
        .encrypt(EncryptRequest {
            plaintext: seed.clone(),
            uid: "u1".into(),
        })
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

/// Status: "v2", healthz exactly "ok", the store's active key id, and none of it changes
/// from one poll to the next (the apiserver refuses a version that changes).
#[tokio::test]
async fn status_meets_apiserver_rules_and_is_stable() {
    let store = Store::init();
    let plugin = Plugin::start(&store, &[]).await;
    let mut c = plugin.v2().await;
    let first = status(&mut c).await;
    assert_healthy_status(&first, "v2");
    assert_eq!(first.key_id, store.active_key());
    for _ in 0..20 {
        let st = status(&mut c).await;
        assert_healthy_status(&st, "v2");
        assert_eq!(
            st.key_id, first.key_id,
            "key_id flip-flopped without a rotation"
        );
    }
    // A second connection (another apiserver) sees the same thing.
    let st = status(&mut plugin.v2().await).await;
    assert_eq!((st.version, st.key_id), (first.version, first.key_id));
}

/// 1.27 and 1.28 apiservers accept only "v2beta1"; the flag must make Status say so,
/// consistently, and leave Encrypt/Decrypt as they are.
#[tokio::test]
async fn status_version_v2beta1_for_older_apiservers() {
    let store = Store::init();
    let plugin = Plugin::start(&store, &["--status-version", "v2beta1"]).await;
    let mut c = plugin.v2().await;
    for _ in 0..5 {
        let st = status(&mut c).await;
        assert_healthy_status(&st, "v2beta1");
        assert_eq!(st.key_id, store.active_key());
    }
    let seed = random_seed();
    let enc = encrypt(&mut c, &seed, &fresh_uid()).await;
    assert_apiserver_accepts(&enc, &store.active_key());
    assert_eq!(decrypt(&mut c, &enc, &fresh_uid()).await, seed);
}

/// Many seeds: each Encrypt response passes every apiserver check and each Decrypt (with
/// the stored key_id and annotations and a fresh uid) gives back the seed.
#[tokio::test]
async fn encrypt_responses_pass_apiserver_checks_and_decrypt() {
    let store = Store::init();
    let plugin = Plugin::start(&store, &[]).await;
    let mut c = plugin.v2().await;
    let key_id = status(&mut c).await.key_id;
    assert_eq!(key_id, store.active_key());
    let mut ciphertexts = std::collections::HashSet::new();
    for _ in 0..200 {
        let seed = random_seed();
        let enc = encrypt(&mut c, &seed, &fresh_uid()).await;
        assert_apiserver_accepts(&enc, &key_id);
        assert!(
            ciphertexts.insert(enc.ciphertext.clone()),
            "a ciphertext repeated"
        );
        assert_eq!(decrypt(&mut c, &enc, &fresh_uid()).await, seed);
    }
    // Encrypt and Decrypt did not disturb Status.
    assert_eq!(status(&mut c).await.key_id, key_id);
}

/// Encryption is randomized: the same seed twice gives two different ciphertexts, and
/// both decrypt.
#[tokio::test]
async fn same_seed_encrypts_differently_each_time() {
    let store = Store::init();
    let plugin = Plugin::start(&store, &[]).await;
    let mut c = plugin.v2().await;
    let seed = random_seed();
    let a = encrypt(&mut c, &seed, &fresh_uid()).await;
    let b = encrypt(&mut c, &seed, &fresh_uid()).await;
    assert_ne!(a.ciphertext, b.ciphertext);
    assert_eq!(decrypt(&mut c, &a, &fresh_uid()).await, seed);
    assert_eq!(decrypt(&mut c, &b, &fresh_uid()).await, seed);
}

/// Several apiservers (or one under load) at once: 16 connections x 50 round trips, all
/// succeed and every answer is right.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_clients_all_succeed() {
    const TASKS: usize = 16;
    const ROUNDS: usize = 50;
    let store = Store::init();
    let plugin = Plugin::start(&store, &[]).await;
    let key_id = status(&mut plugin.v2().await).await.key_id;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..TASKS {
        let socket = plugin.socket.clone();
        let key_id = key_id.clone();
        tasks.spawn(async move {
            let mut c = V2::new(common::connect(&socket).await);
            for _ in 0..ROUNDS {
                let seed = random_seed();
                let enc = encrypt(&mut c, &seed, &fresh_uid()).await;
                assert_apiserver_accepts(&enc, &key_id);
                assert_eq!(decrypt(&mut c, &enc, &fresh_uid()).await, seed);
            }
            ROUNDS
        });
    }
    let mut done = 0;
    while let Some(r) = tasks.join_next().await {
        done += r.unwrap();
    }
    assert_eq!(done, TASKS * ROUNDS);
    let (code, body) = plugin.http_get("/metrics");
    assert_eq!(code, 200);
    let ok = metric(
        &body,
        "kms_plugin_requests_total",
        &[r#"api="v2""#, r#"op="decrypt""#, r#"code="Ok""#],
    );
    assert_eq!(
        ok,
        Some((TASKS * ROUNDS) as f64),
        "metrics missed requests:\n{body}"
    );
}

/// The deprecated v1beta1 API: Version says "v1beta1", Encrypt/Decrypt round-trip, and
/// neither API accepts the other's ciphertexts (with a message saying so).
#[tokio::test]
async fn v1beta1_round_trips_and_formats_do_not_mix() {
    let store = Store::init();
    let plugin = Plugin::start(&store, &[]).await;
    let mut v1 = plugin.v1().await;
    let mut v2 = plugin.v2().await;

    let ver = v1
        .version(v1beta1::VersionRequest {
            version: "v1beta1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ver.version, "v1beta1");
    assert!(!ver.runtime_name.is_empty() && !ver.runtime_version.is_empty());

    let seed = random_seed();
    let v1_ct = v1
        .encrypt(v1beta1::EncryptRequest {
            version: "v1beta1".into(),
            plain: seed.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .cipher;
    assert!(!v1_ct.is_empty());
    let plain = v1
        .decrypt(v1beta1::DecryptRequest {
            version: "v1beta1".into(),
            cipher: v1_ct.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .plain;
    assert_eq!(plain, seed);

    // v1beta1 ciphertext into v2 Decrypt, with everything else as the apiserver would send.
    let v2_enc = encrypt(&mut v2, &seed, &fresh_uid()).await;
    let err = v2
        .decrypt(DecryptRequest {
            ciphertext: v1_ct,
            uid: fresh_uid(),
            key_id: v2_enc.key_id.clone(),
            annotations: v2_enc.annotations.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("other KMS API version"),
        "unclear: {}",
        err.message()
    );

    // And the other way round.
    let err = v1
        .decrypt(v1beta1::DecryptRequest {
            version: "v1beta1".into(),
            cipher: v2_enc.ciphertext.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("other KMS API version"),
        "unclear: {}",
        err.message()
    );

    // Both APIs still work after the refusals.
    assert_eq!(decrypt(&mut v2, &v2_enc, &fresh_uid()).await, seed);
}

/// The standard gRPC health service answers SERVING, overall and for the KMS service.
#[tokio::test]
async fn grpc_health_service_reports_serving() {
    let store = Store::init();
    let plugin = Plugin::start(&store, &[]).await;
    let mut h = HealthClient::new(common::connect(&plugin.socket).await);
    for service in ["", "v2.KeyManagementService"] {
        let r = h
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            r.status,
            ServingStatus::Serving as i32,
            "service {service:?}"
        );
    }
    // An unknown service is reported as such, not as serving.
    let err = h
        .check(HealthCheckRequest {
            service: "no.such.Service".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

/// /healthz, /readyz (naming the key) and /metrics (request counts and the active key).
#[tokio::test]
async fn http_probes_and_metrics() {
    let store = Store::init();
    let plugin = Plugin::start(&store, &[]).await;
    let key_id = store.active_key();

    let (code, body) = plugin.http_get("/healthz");
    assert_eq!((code, body.trim()), (200, "ok"));
    let (code, body) = plugin.http_get("/readyz");
    assert_eq!(code, 200, "{body}");
    assert!(
        body.contains(&key_id),
        "/readyz does not name key {key_id}: {body}"
    );

    let mut c = plugin.v2().await;
    for _ in 0..3 {
        encrypt(&mut c, &random_seed(), &fresh_uid()).await;
    }
    let (code, body) = plugin.http_get("/metrics");
    assert_eq!(code, 200);
    let encrypts = metric(
        &body,
        "kms_plugin_requests_total",
        &[r#"api="v2""#, r#"op="encrypt""#, r#"code="Ok""#],
    );
    assert_eq!(encrypts, Some(3.0), "/metrics:\n{body}");
    let active = metric(
        &body,
        "kms_plugin_active_key",
        &[&format!(r#"key_id="{key_id}""#)],
    );
    assert_eq!(active, Some(1.0), "/metrics:\n{body}");
}

/// Logs name the request by uid, and never contain the seed in any common encoding.
/// Run at trace level so that the gRPC/HTTP2 stack's own logs are searched too.
#[tokio::test]
async fn logs_carry_the_uid_but_never_the_seed() {
    let store = Store::init();
    let plugin = Plugin::start(&store, &["--log-level", "trace"]).await;
    let mut c = plugin.v2().await;
    let mut rng = rand::rng();
    // A printable seed so that a raw leak is visible in text logs, and a binary one.
    let printable: Vec<u8> = (0..32)
        .map(|_| rng.sample(rand::distr::Alphanumeric))
        .collect();
    let seeds = [printable, random_seed()];
    let mut uids = Vec::new();
    for seed in &seeds {
        let (enc_uid, dec_uid) = (fresh_uid(), fresh_uid());
        let enc = encrypt(&mut c, seed, &enc_uid).await;
        assert_eq!(&decrypt(&mut c, &enc, &dec_uid).await, seed);
        uids.extend([enc_uid, dec_uid]);
    }
    let logs = plugin.logs();
    for uid in &uids {
        assert!(logs.contains(uid.as_str()), "uid {uid} not in the logs");
    }
    for seed in &seeds {
        let b64 = base64::engine::general_purpose::STANDARD;
        let b64_url = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let forms = [
            hex(seed),
            hex(seed).to_uppercase(),
            hex(&seed[..16]),
            b64.encode(seed),
            b64_url.encode(seed),
            format!("{seed:?}"),
            String::from_utf8_lossy(seed).into_owned(),
        ];
        for form in forms {
            assert!(
                !logs.contains(&form),
                "the seed leaked into the logs as {form:?}"
            );
        }
    }
}

/// SIGTERM with a client still connected (the apiserver keeps its connection open):
/// exit status 0, promptly, and the socket file is gone.
///
/// Not `Plugin::terminate()`: it drops the socket's temp directory as it returns, which
/// would remove the socket file whether or not the plugin did.
#[tokio::test]
async fn sigterm_exits_zero_and_removes_the_socket() {
    let store = Store::init();
    let mut plugin = Plugin::start(&store, &[]).await;
    let mut c = plugin.v2().await;
    let seed = random_seed();
    let enc = encrypt(&mut c, &seed, &fresh_uid()).await;
    assert_eq!(decrypt(&mut c, &enc, &fresh_uid()).await, seed);
    assert!(plugin.socket.exists());

    let started = Instant::now();
    plugin.signal("TERM");
    let status = wait_exit(&mut plugin, Duration::from_secs(20)).await;
    assert_eq!(status.code(), Some(0), "exit {status}:\n{}", plugin.logs());
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "shutdown took {:?} with an idle client connected",
        started.elapsed()
    );
    assert!(!plugin.socket.exists(), "socket file left behind");
    // Nor the private staging directory the socket was bound in.
    let dir = plugin.socket.parent().unwrap();
    let leftovers = leftover_entries(dir);
    assert!(
        leftovers.is_empty(),
        "left in the socket directory: {leftovers:?}"
    );
    drop(c);
}

/// Polls for the exit without blocking the runtime: the client's connection task must keep
/// running to answer the server's GOAWAY/PING, as the apiserver's would.
async fn wait_exit(plugin: &mut Plugin, limit: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(s) = plugin.child.try_wait().unwrap() {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "no exit after SIGTERM:\n{}",
            plugin.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Entries of the socket directory other than the harness's own stderr log.
fn leftover_entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "stderr.log")
        .collect()
}

/// The serving plugin holds every KEK in clear: it writes no core file on a crash (the
/// limit is 0, soft and hard, so nothing it runs can raise it).
#[tokio::test]
async fn the_plugin_can_write_no_core_dump() {
    let store = Store::init();
    let plugin = Plugin::start(&store, &[]).await;
    let pid = plugin.child.id();
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let core = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .expect("no core limit line");
    let fields: Vec<&str> = core.split_whitespace().collect();
    assert_eq!(&fields[4..6], ["0", "0"], "{core}");
    let mut c = plugin.v2().await;
    let st = c.status(StatusRequest {}).await.unwrap().into_inner();
    assert_eq!(st.healthz, "ok");
}
