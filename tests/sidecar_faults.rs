//! The sidecar when Azure misbehaves: the vault down, 500s, 429s (and a 429 storm at start),
//! malformed / empty / huge / hung responses, an oversized secret, the token endpoint down at
//! start and mid-run. In `--once` mode each is a non-zero exit naming the secret and the
//! problem; in the long-running mode the last good files stay in place, readiness is kept,
//! and it recovers. (The output volume filling up: `sidecar_faults_disk.rs`.)
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "sidecar_support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use support::*;

const NAME: &str = "app-secret";

/// A bad answer from the vault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Bad {
    /// HTTP 500 with Key Vault's error body.
    ServerError,
    /// HTTP 429 with `Retry-After: 1`.
    Throttled,
    /// 200 with a body that is not JSON.
    Malformed,
    /// 200 with no body.
    Empty,
    /// 200 with 10 MB of junk, chunked.
    Huge,
    /// No answer at all (`--request-timeout 1s`).
    Hang,
    /// A secret value bigger than the sidecar's 1 MiB response limit.
    Oversized,
}

const ALL: [Bad; 7] = [
    Bad::ServerError,
    Bad::Throttled,
    Bad::Malformed,
    Bad::Empty,
    Bad::Huge,
    Bad::Hang,
    Bad::Oversized,
];

impl Bad {
    fn fault(self, count: usize) -> Option<Fault> {
        let target = Target::Vault;
        match self {
            Bad::ServerError => Some(Fault::Status {
                target,
                status: 500,
                count,
            }),
            Bad::Throttled => Some(Fault::Throttle {
                target,
                retry_after_secs: 1,
                retry_after_ms: None,
                count,
            }),
            Bad::Malformed => Some(Fault::Malformed { target, count }),
            Bad::Empty => Some(Fault::EmptyBody { target, count }),
            Bad::Huge => Some(Fault::HugeBody {
                target,
                bytes: 10 << 20,
                count,
            }),
            Bad::Hang => Some(Fault::Hang { target, count }),
            Bad::Oversized => None,
        }
    }

    /// What the operator must read.
    fn expect(self) -> &'static str {
        match self {
            Bad::ServerError => "HTTP 500",
            Bad::Throttled => "Key Vault is throttling",
            Bad::Malformed => "malformed response from Key Vault",
            Bad::Empty => "empty response body",
            Bad::Huge | Bad::Oversized => "larger than 1048576 bytes",
            Bad::Hang => "timed out",
        }
    }

    /// Vault reads one refresh makes before giving up on the object: a read and four
    /// retries (a 200 whose body does not parse counts as a failed read, too).
    fn reads_per_sync(self) -> usize {
        5
    }

    fn args(self) -> Vec<&'static str> {
        match self {
            Bad::Hang => vec!["--request-timeout", "1s"],
            _ => vec![],
        }
    }

    /// Makes the vault misbehave for `count` reads (the oversized value until replaced).
    fn apply(self, h: &Harness, count: usize) {
        match self.fault(count) {
            Some(f) => h.fake.inject(f),
            None => {
                let big = format!("{}{}", h.value("big"), "x".repeat(2 << 20));
                h.fake.set_secret(NAME, &big, None);
            }
        }
    }
}

/// Runs `f` for every case at once, each on its own thread with its own fake and sidecar
/// (most of the time is the sidecar's retry backoff, so this keeps the suite short).
fn each_in_parallel(cases: &[Bad], f: fn(Bad)) {
    std::thread::scope(|sc| {
        for &b in cases {
            std::thread::Builder::new()
                .name(format!("{b:?}"))
                .spawn_scoped(sc, move || f(b))
                .unwrap();
        }
    });
}

fn once_fails_cleanly(bad: Bad) {
    let h = Harness::new();
    h.set(NAME, &h.value("ok"));
    if bad.fault(1).is_some() {
        // Let the challenge discovery through; spoil every read of the secret.
        h.fake.inject(Fault::Slow {
            target: Target::Vault,
            delay_ms: 0,
            count: 1,
        });
    }
    bad.apply(&h, 10);
    let done = h
        .cmd(Identity::Workload)
        .secret(NAME)
        .args(bad.args())
        .run_once();
    let err = done.assert_failure();
    assert!(
        err.contains(&format!("secret \"{NAME}\"")),
        "{bad:?}: names the secret: {err}"
    );
    assert!(
        err.contains(bad.expect()),
        "{bad:?}: names the problem ({}): {err}",
        bad.expect()
    );
    assert_empty(h.out());
    let st = h.fake.stats();
    let reads = st
        .requests
        .iter()
        .filter(|r| r.endpoint == Endpoint::VaultGet && r.authorization)
        .count();
    assert_eq!(
        reads,
        bad.reads_per_sync(),
        "{bad:?}: bounded retries, then it gives up"
    );
    assert!(
        done.took < Duration::from_secs(40),
        "{bad:?}: took {:?}",
        done.took
    );
    eprintln!("{bad:?}: --once failed after {:?}: {err}", done.took);
}

/// `--once`: a 500, a 429, a malformed, empty, 10 MB or hung answer, or an oversized secret,
/// is a non-zero exit (after bounded retries) whose message names the secret and the
/// problem; nothing is written.
#[test]
fn once_bad_responses_fail_with_a_clear_error() {
    each_in_parallel(&ALL, once_fails_cleanly);
}

fn long_running_keeps_the_last_good_files(bad: Bad) {
    let h = Harness::new();
    let v1 = h.value("keep");
    h.set(NAME, &v1);
    let mut s = h
        .cmd(Identity::Workload)
        .secret(NAME)
        .args(bad.args())
        .spawn();
    s.wait_ready(Duration::from_secs(15));
    let t1 = data_target(h.out()).unwrap();
    // Bad answers to every attempt of one refresh.
    bad.apply(&h, bad.reads_per_sync());
    s.wait_for(
        Duration::from_secs(40),
        "a refresh that kept the old value",
        |s| {
            assert_eq!(
                read(h.out(), NAME).as_deref(),
                Some(v1.as_str()),
                "{bad:?}: the old file stays"
            );
            assert_eq!(
                data_target(h.out()).as_ref(),
                Some(&t1),
                "{bad:?}: no rewrite"
            );
            assert_eq!(s.readyz().0, 200, "{bad:?}: still ready");
            s.metric(r#"sidecar_syncs_total{result="partial"}"#) >= 1.0
        },
    );
    let logs = s.logs();
    assert!(
        logs.lines()
            .any(|l| l.contains("keeping the last good value")
                && l.contains(NAME)
                && l.contains(bad.expect())),
        "{bad:?}: a warning names the secret and the problem; log tail:\n{}",
        s.tail(30)
    );
    assert_layout(h.out(), &[NAME]);
    // Recovery: a new version is picked up once the vault answers properly.
    let v2 = h.value("after");
    h.set(NAME, &v2);
    s.wait_for(
        Duration::from_secs(30),
        "the new version after recovery",
        |_| read(h.out(), NAME).as_deref() == Some(v2.as_str()),
    );
    assert_layout(h.out(), &[NAME]);
    s.assert_running();
}

/// Long-running: the same bad answers (500, 429, malformed, empty, 10 MB, hung, oversized)
/// after the first delivery keep the old files in place and the sidecar ready; it recovers
/// afterwards.
#[test]
fn long_running_bad_responses_keep_the_last_good_files() {
    each_in_parallel(&ALL, long_running_keeps_the_last_good_files);
}

/// The vault goes down after the first delivery: the files stay unchanged (even though a
/// new version exists), /readyz stays 200 with a warning, the failure shows in the
/// metrics, nothing crashes; when it comes back the new version is delivered.
#[test]
fn vault_down_keeps_files_and_readiness_then_recovers() {
    let h = Harness::new();
    let v1 = h.value("before");
    h.set(NAME, &v1);
    let mut s = h.cmd(Identity::Workload).secret(NAME).spawn();
    s.wait_ready(Duration::from_secs(15));
    let t1 = data_target(h.out()).unwrap();

    h.fake.inject(Fault::Down {
        target: Target::Vault,
    });
    let v2 = h.value("during");
    h.set(NAME, &v2);
    s.wait_for(
        Duration::from_secs(40),
        "a failed refresh while the vault is down",
        |s| {
            assert_eq!(
                read(h.out(), NAME).as_deref(),
                Some(v1.as_str()),
                "the old file stays"
            );
            assert_eq!(data_target(h.out()).as_ref(), Some(&t1), "no rewrite");
            assert_eq!(s.readyz().0, 200, "still ready");
            s.metric(r#"sidecar_syncs_total{result="partial"}"#) >= 1.0
        },
    );
    let (code, body) = s.readyz();
    assert_eq!(code, 200);
    // It names the secret and why: the vault's host did not answer.
    assert!(
        body.contains("last refresh failed") && body.contains(&format!("{NAME}: localhost: ")),
        "{body}"
    );
    assert!(s.metric(r#"sidecar_fetches_total{result="unavailable"}"#) >= 1.0);
    assert_eq!(s.get("/healthz").0, 200);
    let dropped = h.fake.stats().responses(Endpoint::VaultGet, 0);
    assert!(
        dropped >= 5,
        "the vault really was down: {dropped} dropped connections"
    );

    h.fake.clear_faults();
    s.wait_for(
        Duration::from_secs(30),
        "the new version once the vault is back",
        |_| read(h.out(), NAME).as_deref() == Some(v2.as_str()),
    );
    assert_ne!(data_target(h.out()).unwrap(), t1);
    s.wait_for(Duration::from_secs(10), "the warning to clear", |s| {
        !s.readyz().1.contains("last refresh failed")
    });
    s.assert_running();
    assert!(s.terminate().success());
}

/// A 429 storm at start (10 answers with `Retry-After: 1`, two full refreshes' worth: with
/// the sidecar's backoff, 20 would take ~40 s): the sidecar waits at least the hinted second
/// between reads instead of hammering the vault, stays up (not ready yet), reports why, and
/// delivers as soon as the throttling ends.
#[test]
fn throttling_storm_backs_off_and_then_delivers() {
    const THROTTLED: usize = 10;
    let h = Harness::new();
    let v = h.value("throttled");
    h.set(NAME, &v);
    h.fake.inject(Fault::Throttle {
        target: Target::Vault,
        retry_after_secs: 1,
        retry_after_ms: None,
        count: THROTTLED,
    });
    let start = Instant::now();
    let mut s = h.cmd(Identity::Workload).secret(NAME).spawn();
    let window = Duration::from_secs(6);
    while start.elapsed() < window {
        s.assert_running();
        let (code, body) = s.readyz();
        assert_eq!(code, 503, "not ready while throttled: {body}");
        assert!(body.starts_with("not ready: "), "{body}");
        std::thread::sleep(Duration::from_millis(250));
    }
    let in_window = h.fake.stats().vault_get_requests();
    // A tight loop would make hundreds of requests in 6 s; Retry-After: 1 allows about 6.
    assert!(
        (3..=8).contains(&in_window),
        "{in_window} vault reads in {window:?}"
    );
    s.wait_for(Duration::from_secs(20), "/readyz to say why", |s| {
        let (code, body) = s.readyz();
        assert_eq!(code, 503, "not ready while throttled: {body}");
        body.contains("HTTP 429") && body.contains("throttling") && body.contains(NAME)
    });

    s.wait_ready(Duration::from_secs(45));
    eprintln!(
        "ready {:?} after start, through {THROTTLED} throttled reads",
        start.elapsed()
    );
    assert_eq!(read(h.out(), NAME).as_deref(), Some(v.as_str()));
    let st = h.fake.stats();
    assert_eq!(st.responses(Endpoint::VaultGet, 429), THROTTLED as u64);
    let mut reads: Vec<_> = st
        .requests
        .iter()
        .filter(|r| r.endpoint == Endpoint::VaultGet)
        .collect();
    reads.sort_by_key(|r| r.at_unix_ms);
    let min_gap = reads
        .windows(2)
        .filter(|w| w[0].status == 429)
        .map(|w| w[1].at_unix_ms - w[0].at_unix_ms)
        .min()
        .unwrap();
    assert!(
        min_gap >= 850,
        "after a 429 with Retry-After: 1 the next read waits ~1 s, not {min_gap} ms"
    );
    assert!(s.metric(r#"sidecar_fetches_total{result="throttled"}"#) >= 1.0);
    assert!(s.metric(r#"sidecar_syncs_total{result="error"}"#) >= 1.0);
    s.assert_running();
}

/// The token endpoint is unreachable at start: not ready, /readyz 503 with the reason, and
/// nothing is written; once it is back the sidecar becomes ready.
#[test]
fn token_endpoint_down_at_start_then_ready() {
    let h = Harness::new();
    let v = h.value("late");
    h.set(NAME, &v);
    h.fake.inject(Fault::Down {
        target: Target::Token,
    });
    let mut s = h.cmd(Identity::Workload).secret(NAME).spawn();
    s.wait_for(
        Duration::from_secs(40),
        "/readyz to name the token problem",
        |s| {
            let (code, body) = s.readyz();
            assert_eq!(code, 503, "not ready without a token: {body}");
            assert_empty(h.out());
            body.contains("getting a token")
                && body.contains("workload identity")
                && body.contains("token endpoint")
        },
    );
    let (_, body) = s.readyz();
    assert!(
        body.starts_with("not ready: ") && body.contains(NAME),
        "{body}"
    );
    assert_eq!(s.get("/healthz").0, 200, "alive while not ready");
    assert!(s.metric(r#"sidecar_syncs_total{result="error"}"#) >= 1.0);
    assert_eq!(s.metric("sidecar_ready"), 0.0);
    assert_eq!(h.fake.stats().total_tokens(), 0);

    h.fake.clear_faults();
    s.wait_ready(Duration::from_secs(30));
    assert_eq!(read(h.out(), NAME).as_deref(), Some(v.as_str()));
    assert_layout(h.out(), &[NAME]);
    assert_eq!(s.metric("sidecar_ready"), 1.0);
    assert!(h.fake.stats().tokens(Flow::WorkloadIdentity) >= 1);
}

/// Errors only a person can fix (403 without the role, 404 for a missing secret) are not
/// retried: `--once` fails at once with Key Vault's code and a hint; the long-running
/// sidecar keeps the last good file and picks the secret up again once access is back.
#[test]
fn permanent_errors_name_the_fix() {
    let h = Harness::new();
    h.set(NAME, &h.value("perm"));
    h.fake.forbid(NAME);
    let done = h.cmd(Identity::Workload).secret(NAME).run_once();
    let err = done.assert_failure();
    assert!(
        err.contains(NAME)
            && err.contains("HTTP 403")
            && err.contains("ForbiddenByRbac")
            && err.contains("Key Vault Secrets User"),
        "{err}"
    );
    assert!(
        done.took < Duration::from_secs(5),
        "not retried: {:?}",
        done.took
    );
    let done = h
        .cmd(Identity::Workload)
        .secret("no-such-secret")
        .run_once();
    let err = done.assert_failure();
    assert!(
        err.contains("no-such-secret")
            && err.contains("SecretNotFound")
            && err.contains("check the object name"),
        "{err}"
    );
    assert_empty(h.out());
    h.fake.allow(NAME);

    let v1 = h.value("perm1");
    h.set(NAME, &v1);
    let mut s = h.cmd(Identity::Workload).secret(NAME).spawn();
    s.wait_ready(Duration::from_secs(15));
    h.fake.forbid(NAME);
    let v2 = h.value("perm2");
    h.set(NAME, &v2);
    s.wait_for(Duration::from_secs(10), "a refresh refused with 403", |s| {
        assert_eq!(read(h.out(), NAME).as_deref(), Some(v1.as_str()));
        s.metric(r#"sidecar_fetches_total{result="denied"}"#) >= 1.0
    });
    assert_eq!(s.readyz().0, 200);
    h.fake.allow(NAME);
    s.wait_for(
        Duration::from_secs(15),
        "the new version once access is back",
        |_| read(h.out(), NAME).as_deref() == Some(v2.as_str()),
    );
}

/// The token endpoint goes down after a successful start, with short-lived tokens (8 s): a
/// new version is still delivered with the cached token while it is valid (no new token
/// asked for); once it expires, a newer version cannot be read: the files stay as they were,
/// /readyz stays 200 with a warning naming the token endpoint, the log says so; when the
/// endpoint is back the newest version is delivered and the warning goes away.
#[test]
fn token_endpoint_down_mid_run_uses_the_cached_token_then_recovers() {
    const LIFETIME: Duration = Duration::from_secs(8);
    let h = Harness::with(|o| o.token_lifetime = LIFETIME);
    let v1 = h.value("tok1");
    h.set(NAME, &v1);
    let mut s = h.cmd(Identity::Workload).secret(NAME).spawn();
    s.wait_ready(Duration::from_secs(15));
    let issued = h.fake.stats().tokens(Flow::WorkloadIdentity);
    assert_eq!(issued, 1);
    h.fake.inject(Fault::Down {
        target: Target::Token,
    });
    let down = Instant::now();

    // While the cached token is valid: business as usual, without the token endpoint.
    let v2 = h.value("tok2");
    h.set(NAME, &v2);
    s.wait_for(
        Duration::from_secs(5),
        "the new version with the cached token",
        |_| read(h.out(), NAME).as_deref() == Some(v2.as_str()),
    );
    assert!(
        down.elapsed() < LIFETIME,
        "delivered only after the token expired: the test proves nothing"
    );
    assert_eq!(h.fake.stats().tokens(Flow::WorkloadIdentity), issued);
    let t2 = data_target(h.out()).unwrap();

    // Past its expiry (it was issued before `down`), a new version cannot be read: refreshes
    // fail, the file stays, the warning names the token endpoint.
    s.wait_for(LIFETIME, "the cached token to expire", |_| {
        assert_eq!(read(h.out(), NAME).as_deref(), Some(v2.as_str()));
        down.elapsed() > LIFETIME
    });
    let v3 = h.value("tok3");
    h.set(NAME, &v3);
    s.wait_for(
        LIFETIME + Duration::from_secs(30),
        "/readyz to name the token endpoint",
        |s| {
            assert_eq!(
                read(h.out(), NAME).as_deref(),
                Some(v2.as_str()),
                "the file stays"
            );
            assert_eq!(data_target(h.out()).as_ref(), Some(&t2), "no rewrite");
            let (code, body) = s.readyz();
            assert_eq!(code, 200, "still ready: {body}");
            body.contains("last refresh failed")
                && body.contains("getting a token")
                && body.contains("token endpoint")
        },
    );
    println!(
        "/readyz with the token endpoint down: {}",
        s.readyz().1.trim()
    );
    assert_layout(h.out(), &[NAME]);
    let logs = s.logs();
    assert!(
        logs.lines()
            .any(|l| l.contains("keeping the last good value")
                && l.contains(NAME)
                && l.contains("token endpoint")),
        "a warning names the secret and the token endpoint; log tail:\n{}",
        s.tail(30)
    );
    assert!(s.metric(r#"sidecar_fetches_total{result="identity"}"#) >= 1.0);
    assert!(
        h.fake.stats().responses(Endpoint::Token, 0) >= 1,
        "the endpoint really was down when asked"
    );

    // Back: a new token, the newest version, the warning gone.
    h.fake.clear_faults();
    s.wait_for(
        Duration::from_secs(20),
        "the newest version once the token endpoint is back",
        |_| read(h.out(), NAME).as_deref() == Some(v3.as_str()),
    );
    assert_layout(h.out(), &[NAME]);
    assert!(h.fake.stats().tokens(Flow::WorkloadIdentity) > issued);
    s.wait_for(Duration::from_secs(10), "the warning to clear", |s| {
        !s.readyz().1.contains("last refresh failed")
    });
    s.assert_running();
}
