//! The suite-wide log gate (see tests/common/log_gate.rs): the detector catches every form
//! of a planted secret, and no log archived by any test of the suite contains a secret or
//! token of any test. `.ci/run` runs this again after the whole suite with
//! `EDGESEAL_LOG_GATE_MIN_LOGS` set, so that the sweep covers the sidecar's tests too (Cargo
//! runs this binary before the sidecar package's tests) and cannot pass on an empty archive.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use common::log_gate::{
    Detector, Watched, archive_dir, archived_watched, find_leak, forms_of_bytes,
};

fn watched(label: &str, bytes: &[u8]) -> Vec<Watched> {
    vec![Watched {
        label: label.into(),
        forms: forms_of_bytes(bytes),
    }]
}

#[test]
fn planted_secrets_are_caught_in_every_form() {
    let seed: Vec<u8> = (0..32u8)
        .map(|i| i.wrapping_mul(37).wrapping_add(11))
        .collect();
    let w = watched("a DEK seed", &seed);
    let hex: String = seed.iter().map(|b| format!("{b:02x}")).collect();
    let leaks = [
        format!("{{\"level\":\"DEBUG\",\"plaintext\":\"{hex}\"}}"),
        format!("seed={}", hex.to_uppercase()),
        format!("body {}", STANDARD.encode(&seed)),
        format!("b64url {}", URL_SAFE_NO_PAD.encode(&seed)),
        format!("request: EncryptRequest {{ plaintext: {seed:?}, uid: \"x\" }}"),
    ];
    for (i, leak) in leaks.iter().enumerate() {
        let text = format!("first line\nsecond line\n{leak}\nlast line\n");
        let found = find_leak(&text, &w);
        assert_eq!(
            found,
            Some((3, "a DEK seed".to_owned())),
            "form {i} not caught"
        );
    }
    // Neighbouring but different bytes are not a leak.
    let mut other = seed.clone();
    other[0] ^= 1;
    let clean = format!(
        "hex {} b64 {}\n",
        other.iter().map(|b| format!("{b:02x}")).collect::<String>(),
        STANDARD.encode(&other[1..])
    );
    assert_eq!(find_leak(&clean, &w), None);

    // A text secret, and one line of a multi-line (PEM) secret.
    let value = "sv-db-password-6f1c2a9e77d0";
    assert!(
        find_leak(
            &format!("value={value}\n"),
            &watched("a value", value.as_bytes())
        )
        .is_some()
    );
    let pem = "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\nBKcwggSjAgEAAoIBAQC7\n-----END PRIVATE KEY-----\n";
    let w = watched("a private key", pem.as_bytes());
    assert!(find_leak("key: MIIEvQIBADANBgkqhkiG9w0BAQEFAASC\n", &w).is_some());
    assert_eq!(
        find_leak("-----BEGIN PRIVATE KEY----- is not a leak\n", &w),
        None
    );

    // JWTs by shape, whoever issued them.
    let jwt = format!(
        "{}.{}.sig",
        URL_SAFE_NO_PAD.encode(r#"{"alg":"RS256","typ":"JWT"}"#),
        URL_SAFE_NO_PAD.encode(r#"{"aud":"x"}"#)
    );
    assert_eq!(
        find_leak(&format!("ok\nAuthorization: Bearer {jwt}\n"), &[]),
        Some((2, "a JWT (token or assertion)".to_owned()))
    );
    assert_eq!(
        find_leak("the word eyJ alone, eyJhbGciOi without a dot\n", &[]),
        None
    );
}

#[test]
fn no_archived_log_of_the_suite_holds_any_tests_secret() {
    let dir = archive_dir();
    let all = archived_watched(&dir);
    let mut logs = Vec::new();
    if let Ok(rd) = std::fs::read_dir(&dir) {
        for e in rd.flatten() {
            if e.path().extension().and_then(|x| x.to_str()) == Some("log") {
                logs.push(e.path());
            }
        }
    }
    logs.sort();
    let detector = Detector::new(&all);
    let mut leaks = Vec::new();
    for log in &logs {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some((line, what)) = detector.find(&text) {
            leaks.push(format!("{what} in {}, line {line}", log.display()));
        }
    }
    let forms: usize = all.iter().map(|w| w.forms.len()).sum();
    eprintln!(
        "log gate: {} archived logs checked against {} secrets ({forms} forms) in {}",
        logs.len(),
        all.len(),
        dir.display()
    );
    assert!(
        leaks.is_empty(),
        "secrets found in the suite's logs (values not shown):\n{}\n(stale archives from an \
         older build can be removed with `rm -r {}`)",
        leaks.join("\n"),
        dir.display()
    );
    if let Ok(min) = std::env::var("EDGESEAL_LOG_GATE_MIN_LOGS") {
        let min: usize = min.parse().expect("EDGESEAL_LOG_GATE_MIN_LOGS is a number");
        assert!(
            logs.len() >= min && !all.is_empty(),
            "only {} archived logs and {} secrets (at least {min} logs expected): did the \
             suite run first?",
            logs.len(),
            all.len()
        );
    }
}
