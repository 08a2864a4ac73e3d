//! `sidecar --check-config`: validates what the sidecar checks at start-up (config, output
//! volume, CA file, identity settings) and prints the plan, without one network request:
//! the fake Azure sees nothing, every failed check is listed (not just the first) with its
//! fix, and the exit code says whether the pod would start.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "sidecar_support/mod.rs"]
mod support;

use support::*;

#[test]
fn a_good_config_prints_the_plan_and_touches_nothing() {
    let h = Harness::new();
    let done = h
        .cmd(Identity::Workload)
        .secret("db-password")
        .secret("api-key@0123456789abcdef0123456789abcdef=api.txt")
        .run_to_end(&["--check-config"]);
    done.assert_success();
    let out = &done.log;
    for want in [
        "ok   config: vault https://localhost:",
        "2 object(s)",
        "ok   output directory:",
        "(in memory)",
        "ok   identity: workload identity",
        "secret db-password@latest -> db-password (mode 0400)",
        "secret api-key@0123456789abcdef0123456789abcdef -> api.txt",
    ] {
        assert!(out.contains(want), "missing {want:?} in:\n{out}");
    }
    assert_eq!(h.fake.stats().vault_requests(), 0, "no vault request");
    assert_eq!(h.fake.stats().token_requests(), 0, "no token request");
    assert_empty(h.out());
}

#[test]
fn every_failed_check_is_listed_with_its_fix() {
    let h = Harness::new();
    let disk = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let done = h
        .cmd(Identity::Workload)
        .secret("db-password")
        .no_output_dir()
        .arg("--output-dir")
        .arg(disk.path().to_str().unwrap())
        .env("AZURE_FEDERATED_TOKEN_FILE", "/nonexistent/token")
        .run_to_end(&["--check-config"]);
    let err = done.assert_failure();
    assert!(err.contains("configuration check failed"), "{err}");
    let out = &done.log;
    for want in [
        "FAIL output directory:",
        "medium: Memory",
        "FAIL identity:",
        "/nonexistent/token",
        "2 check(s) failed: output directory, identity",
    ] {
        assert!(out.contains(want), "missing {want:?} in:\n{out}");
    }
    assert_eq!(h.fake.stats().vault_requests(), 0);
    assert_eq!(h.fake.stats().token_requests(), 0);
}

#[test]
fn a_bad_config_fails_before_any_check() {
    let h = Harness::new();
    let done = h
        .cmd(Identity::Workload)
        .secret("bad name with spaces")
        .run_to_end(&["--check-config"]);
    let err = done.assert_failure();
    assert!(err.contains("bad name with spaces"), "{err}");
    assert_eq!(h.fake.stats().token_requests(), 0);
}
