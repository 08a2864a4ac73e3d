//! The sidecar's identity flows against the fake Entra ID / IMDS / Arc HIMDS: each one
//! delivers with `--once`, `--identity auto` picks as the Azure SDKs do, workload identity
//! re-reads its rotating token file, the token scope comes from the vault's challenge (a
//! sovereign cloud), and challenge-resource verification refuses a foreign vault.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "sidecar_support/mod.rs"]
mod support;

use std::time::Duration;

use support::*;

/// `--once` with `id` delivers a secret, in the atomic layout with mode 0400, and the
/// token came from `flow` only. A second, version-pinned secret with a file alias too.
fn once_delivers(h: &Harness, cmd: SidecarCmd, flow: Flow) {
    let v = h.value("db");
    h.set("db-password", &v);
    let old = h.value("api-old");
    let pinned = h.set("api-key", &old);
    h.set("api-key", &h.value("api-new"));
    let done = cmd
        .secret("db-password")
        .secret(&format!("api-key@{pinned}=api.txt"))
        .run_once();
    done.assert_success();
    assert_eq!(read(h.out(), "db-password").as_deref(), Some(v.as_str()));
    assert_eq!(
        read(h.out(), "api.txt").as_deref(),
        Some(old.as_str()),
        "the pinned version"
    );
    assert_eq!(mode(h.out(), "db-password"), 0o400);
    assert_eq!(mode(h.out(), "api.txt"), 0o400);
    assert_layout(h.out(), &["api.txt", "db-password"]);
    let st = h.fake.stats();
    assert!(
        st.tokens(flow) >= 1,
        "a token through {flow:?}: {:?}",
        st.tokens_issued
    );
    assert_eq!(
        st.total_tokens(),
        st.tokens(flow),
        "no other flow was used: {:?}",
        st.tokens_issued
    );
    assert!(done.log.contains("all secrets delivered"), "{}", done.log);
}

#[test]
fn workload_identity_once() {
    let h = Harness::new();
    once_delivers(&h, h.cmd(Identity::Workload), Flow::WorkloadIdentity);
    assert_eq!(
        h.fake.stats().last_workload_assertion.as_deref(),
        Some(std::fs::read_to_string(&h.token_file).unwrap().trim()),
        "the token file's content is the assertion"
    );
}

#[test]
fn imds_once() {
    let h = Harness::new();
    once_delivers(&h, h.cmd(Identity::Imds), Flow::Imds);
    let st = h.fake.stats();
    let q = st
        .requests
        .iter()
        .find(|r| r.endpoint == Endpoint::Imds)
        .unwrap()
        .query
        .clone()
        .unwrap();
    assert!(
        q.contains("api-version=2018-02-01")
            && q.contains("resource=https%3A%2F%2Fvault.azure.net"),
        "{q}"
    );
}

#[test]
fn arc_once() {
    let h = Harness::new();
    once_delivers(&h, h.cmd(Identity::Arc), Flow::Arc);
    // Challenge leg (401) then the token leg with the key file's contents.
    let st = h.fake.stats();
    assert!(
        st.responses(Endpoint::Arc, 401) >= 1 && st.responses(Endpoint::Arc, 200) >= 1,
        "{:?}",
        st.endpoints
    );
}

#[test]
fn service_principal_secret_once() {
    let h = Harness::new();
    once_delivers(&h, h.cmd(Identity::SpSecret), Flow::ClientSecret);
}

#[test]
fn service_principal_certificate_once() {
    let h = Harness::new();
    once_delivers(&h, h.cmd(Identity::SpCert), Flow::ClientCertificate);
}

/// `--identity auto`: workload identity wins over Arc and IMDS when its variables are set.
#[test]
fn auto_picks_workload_identity() {
    let h = Harness::new();
    let cmd = h
        .cmd(Identity::Workload)
        .auto_identity()
        .with_identity_env(&h, Identity::Arc)
        .with_identity_env(&h, Identity::Imds);
    once_delivers(&h, cmd, Flow::WorkloadIdentity);
    assert!(
        h.all_logs().contains("\"identity\":\"workload identity\""),
        "{}",
        h.all_logs()
    );
}

/// `--identity auto`: Arc when IDENTITY_ENDPOINT and IMDS_ENDPOINT are set (even with the
/// IMDS override present).
#[test]
fn auto_picks_arc() {
    let h = Harness::new();
    let cmd = h
        .cmd(Identity::Arc)
        .auto_identity()
        .with_identity_env(&h, Identity::Imds);
    once_delivers(&h, cmd, Flow::Arc);
}

/// `--identity auto`: IMDS when nothing else is configured.
#[test]
fn auto_falls_back_to_imds() {
    let h = Harness::new();
    let cmd = h.cmd(Identity::Imds).auto_identity();
    once_delivers(&h, cmd, Flow::Imds);
}

/// kubelet rotates the projected service-account token: with short-lived access tokens the
/// sidecar keeps exchanging, and after the file changes every exchange presents the new
/// content; the fake (which compares with the file's current content) never refuses one.
#[test]
fn workload_identity_rereads_the_token_file() {
    let h = Harness::with(|o| o.token_lifetime = Duration::from_secs(2));
    let v = h.value("wi");
    h.set("wi-secret", &v);
    let mut s = h.cmd(Identity::Workload).secret("wi-secret").spawn();
    s.wait_ready(Duration::from_secs(15));
    let first = std::fs::read_to_string(&h.token_file).unwrap();
    assert_eq!(
        h.fake.stats().last_workload_assertion.as_deref(),
        Some(first.trim())
    );

    // Swap right after an exchange, so none is in flight while the file changes.
    let n = h.fake.stats().tokens(Flow::WorkloadIdentity);
    s.wait_for(Duration::from_secs(10), "another token exchange", |_| {
        h.fake.stats().tokens(Flow::WorkloadIdentity) > n
    });
    let second = h.rotate_token_file("second");
    let n = h.fake.stats().tokens(Flow::WorkloadIdentity);
    s.wait_for(
        Duration::from_secs(10),
        "an exchange with the new assertion",
        |_| {
            let st = h.fake.stats();
            st.last_workload_assertion.as_deref() == Some(second.as_str())
                && st.tokens(Flow::WorkloadIdentity) > n
        },
    );
    // And it keeps working with the new one.
    let n = h.fake.stats().tokens(Flow::WorkloadIdentity);
    s.wait_for(Duration::from_secs(10), "a later exchange", |_| {
        h.fake.stats().tokens(Flow::WorkloadIdentity) > n
    });
    let st = h.fake.stats();
    assert_eq!(
        st.responses(Endpoint::Token, 401) + st.responses(Endpoint::Token, 400),
        0,
        "{:?}",
        st.endpoints
    );
    assert_eq!(st.last_workload_assertion.as_deref(), Some(second.as_str()));
    assert_eq!(
        s.metric(r#"sidecar_syncs_total{result="error"}"#),
        0.0,
        "{}",
        s.tail(30)
    );
    assert_eq!(
        s.metric(r#"sidecar_syncs_total{result="partial"}"#),
        0.0,
        "{}",
        s.tail(30)
    );
    assert!(s.metric(r#"sidecar_syncs_total{result="unchanged"}"#) >= 2.0);
    assert_eq!(read(h.out(), "wi-secret").as_deref(), Some(v.as_str()));
    assert!(s.terminate().success());
}

/// A sovereign cloud: the vault's challenge names `https://vault.azure.cn`; the sidecar asks
/// for that scope (the fake's vault refuses tokens for any other audience) and delivers,
/// through workload identity (scope in the form) and IMDS (resource in the query).
#[test]
fn sovereign_cloud_scope_comes_from_the_challenge() {
    for id in [Identity::Workload, Identity::Imds] {
        let h = Harness::with(|o| o.vault_resource = "https://vault.azure.cn".into());
        let v = h.value("cn");
        h.set("cn-secret", &v);
        let done = h.cmd(id).secret("cn-secret").run_once();
        done.assert_success();
        assert_eq!(read(h.out(), "cn-secret").as_deref(), Some(v.as_str()));
        assert!(
            done.log.contains("https://vault.azure.cn/.default"),
            "{}",
            done.log
        );
        assert!(!done.log.contains("vault.azure.net"), "{}", done.log);
        let st = h.fake.stats();
        assert_eq!(
            st.responses(Endpoint::VaultGet, 200),
            1,
            "{:?}",
            st.endpoints
        );
        if id == Identity::Imds {
            let q = st
                .requests
                .iter()
                .find(|r| r.endpoint == Endpoint::Imds)
                .unwrap()
                .query
                .clone()
                .unwrap();
            assert!(q.contains("resource=https%3A%2F%2Fvault.azure.cn"), "{q}");
        }
    }
}

/// With challenge-resource verification on (the default), a vault at `localhost` whose
/// challenge asks for a `vault.azure.net` token is refused: no token is even requested, and
/// nothing is written.
#[test]
fn challenge_verification_refuses_a_foreign_vault() {
    let h = Harness::new();
    h.set("guarded", &h.value("guarded"));
    let done = h
        .cmd(Identity::Workload)
        .verify_challenge()
        .secret("guarded")
        .run_once();
    let err = done.assert_failure();
    assert!(err.contains("\"guarded\""), "names the secret: {err}");
    assert!(
        err.contains("challenge-resource verification") && err.contains("vault.azure.net"),
        "{err}"
    );
    assert_empty(h.out());
    let st = h.fake.stats();
    assert_eq!(
        st.total_tokens(),
        0,
        "no token was requested for a vault that failed verification"
    );
    assert_eq!(st.token_requests(), 0);
    assert!(
        st.requests.iter().all(|r| !r.authorization),
        "no request carried a token"
    );
}

/// The vault stops accepting the cached token (revoked, or the vault moved tenants): the
/// 401 makes the sidecar drop it and get a new one within the same refresh; no refresh
/// fails and a new version is still picked up.
#[test]
fn revoked_token_is_replaced() {
    let h = Harness::new();
    h.set("rev", &h.value("rev1"));
    let mut s = h.cmd(Identity::Workload).secret("rev").spawn();
    s.wait_ready(Duration::from_secs(15));
    let before = h.fake.stats().tokens(Flow::WorkloadIdentity);
    h.fake.revoke_tokens();
    let v = h.value("rev2");
    h.set("rev", &v);
    s.wait_for(
        Duration::from_secs(10),
        "the new version with a new token",
        |_| read(h.out(), "rev").as_deref() == Some(v.as_str()),
    );
    assert!(h.fake.stats().tokens(Flow::WorkloadIdentity) > before);
    assert!(
        h.fake.stats().responses(Endpoint::VaultGet, 401) >= 2,
        "challenge at start and the rejected token"
    );
    assert_eq!(
        s.metric(r#"sidecar_syncs_total{result="partial"}"#),
        0.0,
        "{}",
        s.tail(20)
    );
    assert_eq!(s.metric(r#"sidecar_syncs_total{result="error"}"#), 0.0);
}

/// IMDS answers 410 while it updates: the sidecar retries with backoff and gets through.
#[test]
fn imds_retries_while_it_updates() {
    let h = Harness::new();
    h.fake.inject(Fault::Status {
        target: Target::Imds,
        status: 410,
        count: 2,
    });
    let v = h.value("imds");
    h.set("imds-secret", &v);
    let done = h.cmd(Identity::Imds).secret("imds-secret").run_once();
    done.assert_success();
    assert_eq!(read(h.out(), "imds-secret").as_deref(), Some(v.as_str()));
    let st = h.fake.stats();
    assert_eq!(st.responses(Endpoint::Imds, 410), 2);
    assert_eq!(st.responses(Endpoint::Imds, 200), 1);
    let imds: Vec<u64> = st
        .requests
        .iter()
        .filter(|r| r.endpoint == Endpoint::Imds)
        .map(|r| r.at_unix_ms)
        .collect();
    assert!(
        imds[1] - imds[0] >= 900 && imds[2] - imds[1] >= 1800,
        "backoff 1 s then 2 s: {imds:?}"
    );
}

/// Arc HIMDS: a challenge naming a key file outside the agent's token directory is refused
/// (the path comes from the network); no token is issued and nothing is written.
#[test]
fn arc_refuses_a_key_file_outside_its_directory() {
    let h = Harness::new();
    h.set("arc-secret", &h.value("arc"));
    let elsewhere = h.work.path().join("tokens");
    std::fs::create_dir(&elsewhere).unwrap();
    let done = h
        .cmd(Identity::Imds)
        .identity(Identity::Arc)
        .env("IDENTITY_ENDPOINT", &h.fake.arc_identity_endpoint())
        .env("IMDS_ENDPOINT", &h.fake.imds_endpoint())
        .args(["--arc-token-dir", elsewhere.to_str().unwrap()])
        .secret("arc-secret")
        .run_once();
    let err = done.assert_failure();
    assert!(
        err.contains("refusing the challenge's key file") && err.contains("not directly inside"),
        "{err}"
    );
    assert_empty(h.out());
    let st = h.fake.stats();
    assert_eq!(st.tokens(Flow::Arc), 0);
    assert!(
        st.requests
            .iter()
            .filter(|r| r.endpoint == Endpoint::Arc)
            .all(|r| !r.authorization)
    );
}
