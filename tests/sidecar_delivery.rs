//! What the sidecar delivers and how: the CSI-shaped config (both forms of `objects`),
//! validation before any request, certificates (PKCS#12 to PEM, split files, PEM pass-
//! through), rotation in the atomic layout, and telling the app (command and signal).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "sidecar_support/mod.rs"]
mod support;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::ExitStatusExt;
use std::process::Command;
use std::time::{Duration, Instant};

use base64::Engine as _;
use support::*;

fn write_config(h: &Harness, name: &str, yaml: &str) -> String {
    let p = h.work.path().join(name);
    fs::write(&p, yaml).unwrap();
    p.to_str().unwrap().to_owned()
}

/// The list form of `objects`, with aliases, modes, base64 and hex decoding, the vault and
/// the output directory from the file.
#[test]
fn config_list_form() {
    let h = Harness::new();
    let db = h.value("db");
    h.set("db-pass", &db);
    let plain = h.value("plain");
    h.set("plain", &plain);
    // Binary content, stored base64 and hex encoded.
    let mut blob = h.value("blob").into_bytes();
    blob.extend_from_slice(&[0, 0xff, b'\n', 0x80]);
    h.set(
        "blob",
        &base64::engine::general_purpose::STANDARD.encode(&blob),
    );
    let hex: String = blob.iter().map(|b| format!("{b:02x}")).collect();
    h.set("blob-hex", &hex);
    let cfg = write_config(
        &h,
        "spc.yaml",
        &format!(
            r#"vaultUrl: "{vault}"
outputDir: "{out}"
objects:
  - objectName: db-pass
    objectType: secret
    objectAlias: db.txt
    filePermission: "0440"
  - objectName: blob
    objectAlias: blob.bin
    objectEncoding: base64
    filePermission: "0600"
  - objectName: blob-hex
    objectEncoding: hex
  - objectName: plain
"#,
            vault = h.fake.vault_url(),
            out = h.out().display()
        ),
    );
    let done = h
        .cmd(Identity::Workload)
        .no_vault_url()
        .no_output_dir()
        .args(["--config", &cfg])
        .run_once();
    done.assert_success();
    assert_layout(h.out(), &["blob-hex", "blob.bin", "db.txt", "plain"]);
    assert_eq!(read(h.out(), "db.txt").unwrap(), db);
    assert_eq!(read(h.out(), "plain").unwrap(), plain);
    assert_eq!(
        read_bytes(h.out(), "blob.bin").unwrap(),
        blob,
        "base64 decoded"
    );
    assert_eq!(
        read_bytes(h.out(), "blob-hex").unwrap(),
        blob,
        "hex decoded"
    );
    assert_eq!(mode(h.out(), "db.txt"), 0o440);
    assert_eq!(mode(h.out(), "blob.bin"), 0o600);
    assert_eq!(mode(h.out(), "blob-hex"), 0o400);
    assert_eq!(mode(h.out(), "plain"), 0o400);
}

/// The Secrets Store CSI driver's string form: `objects: |` with `array:` of YAML documents.
#[test]
fn config_csi_string_form() {
    let h = Harness::new();
    let a = h.value("a");
    h.set("first", &a);
    let b = h.value("b");
    h.set("second", &b);
    let cfg = write_config(
        &h,
        "csi.yaml",
        &format!(
            r#"vaultUrl: "{vault}"
tenantId: "{tenant}"
objects: |
  array:
    - |
      objectName: first
      objectType: secret
      objectVersion: ""
      objectAlias: first.txt
    - |
      objectName: second
      filePermission: "0440"
"#,
            vault = h.fake.vault_url(),
            tenant = h.fake.options().tenant_id
        ),
    );
    h.cmd(Identity::Workload)
        .no_vault_url()
        .args(["--config", &cfg])
        .run_once()
        .assert_success();
    assert_layout(h.out(), &["first.txt", "second"]);
    assert_eq!(read(h.out(), "first.txt").unwrap(), a);
    assert_eq!(read(h.out(), "second").unwrap(), b);
    assert_eq!(mode(h.out(), "first.txt"), 0o400);
    assert_eq!(mode(h.out(), "second"), 0o440);
}

/// Two objects of the same secret, one pinned to an old version: each file gets its own
/// version (a CSI user's way to keep the previous value next to the current one).
#[test]
fn two_versions_of_one_secret() {
    let h = Harness::new();
    let old = h.value("old");
    let v1 = h.set("rotating", &old);
    let new = h.value("new");
    h.set("rotating", &new);
    h.cmd(Identity::Workload)
        .secret(&format!("rotating@{v1}=previous"))
        .secret("rotating=current")
        .run_once()
        .assert_success();
    assert_layout(h.out(), &["current", "previous"]);
    assert_eq!(
        read(h.out(), "previous").unwrap(),
        old,
        "the pinned version"
    );
    assert_eq!(read(h.out(), "current").unwrap(), new, "the latest version");
}

/// Invalid configurations stop the sidecar before its first request, with a clear message,
/// and nothing is written.
#[test]
fn config_errors_stop_before_any_request() {
    let h = Harness::new();
    h.set("a", &h.value("a"));
    let vault = h.fake.vault_url();
    let escape = format!("edgeseal-escape-{}", rand_hex(4));
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "path traversal alias",
            format!(
                "vaultUrl: \"{vault}\"\nobjects:\n  - objectName: a\n    objectAlias: ../{escape}\n"
            ),
            "plain file name",
        ),
        (
            "hidden-file alias",
            format!(
                "vaultUrl: \"{vault}\"\nobjects:\n  - objectName: a\n    objectAlias: ..data\n"
            ),
            "plain file name",
        ),
        (
            "unknown top-level key",
            format!("vaultUrl: \"{vault}\"\nrefreshIntervall: 5s\nobjects:\n  - objectName: a\n"),
            "refreshIntervall",
        ),
        (
            "unknown object key",
            format!("vaultUrl: \"{vault}\"\nobjects:\n  - objectName: a\n    objectAliass: b\n"),
            "objectAliass",
        ),
        (
            "unknown key in the CSI string form",
            format!(
                "vaultUrl: \"{vault}\"\nobjects: |\n  array:\n    - |\n      objectName: a\n      objectTyp: secret\n"
            ),
            "objectTyp",
        ),
    ];
    for (what, yaml, expect) in cases {
        let cfg = write_config(&h, "bad.yaml", &yaml);
        let done = h
            .cmd(Identity::Workload)
            .no_vault_url()
            .args(["--config", &cfg])
            .run_once();
        let err = done.assert_failure();
        assert!(
            err.contains(expect),
            "{what}: the message names the problem ({expect}): {err}"
        );
        assert_empty(h.out());
        assert!(
            !h.out().parent().unwrap().join(&escape).exists(),
            "{what}: nothing escaped"
        );
    }

    // An output directory on a disk (this scratch directory is not tmpfs).
    let disk = tempfile::Builder::new()
        .prefix("sidecar-disk-out-")
        .tempdir()
        .unwrap();
    let done = h
        .cmd(Identity::Workload)
        .no_output_dir()
        .args(["--output-dir", disk.path().to_str().unwrap()])
        .secret("a")
        .run_once();
    let err = done.assert_failure();
    assert!(
        err.contains("not on tmpfs or ramfs") && err.contains("medium: Memory"),
        "{err}"
    );
    assert_empty(disk.path());

    let st = h.fake.stats();
    assert!(
        st.requests.is_empty() && st.endpoints.is_empty(),
        "no request was made: {:?}",
        st.endpoints
    );
}

/// PKCS#12 certificate-backed secrets become PEM (PKCS#8 key, then the certificate); PEM
/// ones pass through; `objectFormat: pfx` gives the PKCS#12 bytes.
#[test]
fn certificates_default_layout() {
    let h = Harness::new();
    let p12 = make_pkcs12(&h, "tls");
    h.set_typed("tls", &p12.base64, Some("application/x-pkcs12"));
    let (pem_key, pem_crt) = make_cert(h.work.path(), "pem");
    let pem = format!(
        "{}{}",
        fs::read_to_string(pem_key).unwrap(),
        fs::read_to_string(pem_crt).unwrap()
    );
    for (_, body) in pem_blocks(&pem).iter().take(1) {
        h.watch(body.clone());
    }
    h.set_typed("pem", &pem, Some("application/x-pem-file"));
    let cfg = write_config(
        &h,
        "certs.yaml",
        "objects:\n  - objectName: tls\n  - objectName: pem\n  - objectName: tls\n    objectAlias: tls.pfx\n    objectFormat: pfx\n",
    );
    h.cmd(Identity::Workload)
        .args(["--config", &cfg])
        .run_once()
        .assert_success();
    assert_layout(h.out(), &["pem", "tls", "tls.pfx"]);

    let tls = read(h.out(), "tls").unwrap();
    let blocks = pem_blocks(&tls);
    let labels: Vec<&str> = blocks.iter().map(|(l, _)| l.as_str()).collect();
    assert_eq!(
        labels,
        ["PRIVATE KEY", "CERTIFICATE"],
        "key first, then the chain"
    );
    assert_eq!(blocks[0].1, pem_blocks(&p12.key_pem)[0].1, "the PKCS#8 key");
    assert_eq!(
        blocks[1].1,
        pem_blocks(&p12.cert_pem)[0].1,
        "the certificate"
    );
    assert!(tls.lines().all(|l| l.len() <= 64), "64-column PEM");
    assert_eq!(
        read(h.out(), "pem").unwrap(),
        pem,
        "PEM passes through unchanged"
    );
    let pfx = read_bytes(h.out(), "tls.pfx").unwrap();
    assert_eq!(
        base64::engine::general_purpose::STANDARD.encode(pfx),
        p12.base64,
        "objectFormat: pfx"
    );
    for f in ["pem", "tls", "tls.pfx"] {
        assert_eq!(mode(h.out(), f), 0o400);
    }
    // The delivered key is the certificate's key.
    let pubkey = |args: &[&str]| {
        let out = Command::new("openssl").args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    };
    let tls_path = h.out().join("tls");
    let tls_path = tls_path.to_str().unwrap();
    assert_eq!(
        pubkey(&["pkey", "-in", tls_path, "-pubout"]),
        pubkey(&["x509", "-in", tls_path, "-pubkey", "-noout"])
    );
}

/// `writeCertAndKeyInSeparateFiles: true`: `NAME.key` and `NAME.crt`, for PKCS#12 and PEM;
/// plain secrets are untouched.
#[test]
fn certificates_in_separate_files() {
    let h = Harness::new();
    let p12 = make_pkcs12(&h, "tls");
    h.set_typed("tls", &p12.base64, Some("application/x-pkcs12"));
    let (pem_key, pem_crt) = make_cert(h.work.path(), "pem");
    let (pem_key, pem_crt) = (
        fs::read_to_string(pem_key).unwrap(),
        fs::read_to_string(pem_crt).unwrap(),
    );
    h.watch(pem_blocks(&pem_key)[0].1.clone());
    h.set_typed(
        "pem",
        &format!("{pem_key}{pem_crt}"),
        Some("application/x-pem-file"),
    );
    let plain = h.value("plain");
    h.set("plain", &plain);
    let cfg = write_config(
        &h,
        "split.yaml",
        "writeCertAndKeyInSeparateFiles: true\nobjects:\n  - objectName: tls\n    filePermission: \"0440\"\n  - objectName: pem\n  - objectName: plain\n",
    );
    h.cmd(Identity::Workload)
        .args(["--config", &cfg])
        .run_once()
        .assert_success();
    assert_layout(
        h.out(),
        &["pem.crt", "pem.key", "plain", "tls.crt", "tls.key"],
    );
    let key = pem_blocks(&read(h.out(), "tls.key").unwrap());
    let crt = pem_blocks(&read(h.out(), "tls.crt").unwrap());
    assert_eq!(key, pem_blocks(&p12.key_pem));
    assert_eq!(crt, pem_blocks(&p12.cert_pem));
    assert_eq!(read(h.out(), "pem.key").unwrap(), pem_key);
    assert_eq!(read(h.out(), "pem.crt").unwrap(), pem_crt);
    assert_eq!(read(h.out(), "plain").unwrap(), plain);
    assert_eq!(mode(h.out(), "tls.key"), 0o440);
    assert_eq!(mode(h.out(), "tls.crt"), 0o440);
    assert_eq!(mode(h.out(), "pem.key"), 0o400);
}

/// Waits until `n` more vault reads than `since` happened (refresh cycles went by).
fn wait_reads(s: &mut Sidecar, h: &Harness, since: u64, n: u64) {
    s.wait_for(
        Duration::from_secs(15),
        &format!("{n} more vault reads"),
        |_| h.fake.stats().vault_get_requests() >= since + n,
    );
}

/// Rotation: a new version shows up in the file within a few seconds, through a new
/// `..data` target, and the notify command runs once per change, after the new files are
/// in place. No change: no rewrite, no command.
#[test]
fn rotation_rewrites_only_on_change_and_runs_the_command() {
    let h = Harness::new();
    let marker = h.work.path().join("notified");
    // The "app": records what it reads when told.
    let sh = script(&h, "notify.sh", r#"cat "$2" >> "$1" && echo >> "$1""#);
    let v1 = h.value("rot1");
    h.set("rot", &v1);
    let stable = h.value("stable");
    h.set("stable", &stable);
    let cmd = format!(
        "{} {} {}",
        sh.display(),
        marker.display(),
        h.out().join("rot").display()
    );
    let mut s = h
        .cmd(Identity::Workload)
        .secret("rot")
        .secret("stable")
        .args(["--notify-command", &cmd])
        .spawn();
    s.wait_ready(Duration::from_secs(15));
    assert_layout(h.out(), &["rot", "stable"]);
    let t1 = data_target(h.out()).unwrap();

    // Three cycles without a change: same payload, no command.
    wait_reads(&mut s, &h, h.fake.stats().vault_get_requests(), 6);
    assert_eq!(
        data_target(h.out()).unwrap(),
        t1,
        "no rewrite without a change"
    );
    assert_eq!(
        line_count(&marker),
        0,
        "no notification without a change (nor for the first delivery)"
    );
    assert!(s.metric(r#"sidecar_syncs_total{result="unchanged"}"#) >= 2.0);

    let mut targets = vec![t1];
    let mut last = v1;
    for (i, tag) in ["rot2", "rot3"].iter().enumerate() {
        let v = h.value(tag);
        h.set("rot", &v);
        let changed = Instant::now();
        s.wait_for(
            Duration::from_secs(10),
            "the new version in the file",
            |_| read(h.out(), "rot").as_deref() == Some(v.as_str()),
        );
        eprintln!("{tag} delivered {:?} after set_secret", changed.elapsed());
        let t = data_target(h.out()).unwrap();
        assert!(!targets.contains(&t), "a new ..data target");
        // The old payload goes after the writer's grace for readers already inside it.
        wait_replaced_payloads_gone(h.out(), t.to_str().unwrap());
        targets.push(t.clone());
        assert_layout(h.out(), &["rot", "stable"]);
        assert_eq!(read(h.out(), "stable").unwrap(), stable);
        s.wait_for(Duration::from_secs(10), "the notify command", |_| {
            line_count(&marker) == i + 1
        });
        let seen = fs::read_to_string(&marker).unwrap();
        assert_eq!(
            seen.lines().last().unwrap(),
            v,
            "the command ran after the new files were in place"
        );
        // Several more cycles: the command ran exactly once for this change.
        wait_reads(&mut s, &h, h.fake.stats().vault_get_requests(), 6);
        assert_eq!(line_count(&marker), i + 1, "exactly one run per change");
        assert_eq!(data_target(h.out()).unwrap(), t);
        last = v;
    }
    assert_eq!(s.metric(r#"sidecar_notifications_total{result="ok"}"#), 2.0);
    assert_eq!(
        s.metric(r#"sidecar_syncs_total{result="changed"}"#),
        3.0,
        "first delivery and two changes"
    );
    assert_eq!(s.metric(r#"sidecar_secrets_delivered"#), 2.0);
    assert!(s.terminate().success());
    // The files stay after the sidecar stops (the pod may still be running).
    assert_eq!(read(h.out(), "rot").unwrap(), last);
    assert_layout(h.out(), &["rot", "stable"]);
}

/// Signal notification: the process named by `--notify-process` gets SIGHUP after a change
/// (a renamed `sleep`, which SIGHUP kills), not after the first delivery.
#[test]
fn rotation_signals_the_app_by_name() {
    let h = Harness::new();
    let name = format!("esl-{}", rand_hex(4));
    let app = h.work.path().join(&name);
    fs::copy("/usr/bin/sleep", &app).unwrap();
    fs::set_permissions(&app, fs::Permissions::from_mode(0o755)).unwrap();
    let mut helper = Command::new(&app).arg("300").spawn().unwrap();
    struct Reap<'a>(&'a mut std::process::Child);
    impl Drop for Reap<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let helper = Reap(&mut helper);

    h.set("sig", &h.value("sig1"));
    let mut s = h
        .cmd(Identity::Workload)
        .secret("sig")
        .args(["--notify-signal", "SIGHUP", "--notify-process", &name])
        .spawn();
    s.wait_ready(Duration::from_secs(15));
    wait_reads(&mut s, &h, h.fake.stats().vault_get_requests(), 2);
    assert!(
        helper.0.try_wait().unwrap().is_none(),
        "not signalled for the first delivery"
    );

    let v = h.value("sig2");
    h.set("sig", &v);
    s.wait_for(Duration::from_secs(10), "the new version", |_| {
        read(h.out(), "sig").as_deref() == Some(v.as_str())
    });
    let start = Instant::now();
    let status = loop {
        if let Some(st) = helper.0.try_wait().unwrap() {
            break st;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the app was not signalled; log:\n{}",
            s.tail(30)
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.signal(), Some(1), "killed by SIGHUP: {status:?}");
    assert_eq!(s.metric(r#"sidecar_notifications_total{result="ok"}"#), 1.0);
    assert!(s.logs().contains("signalled the app"));
    s.assert_running();
}

/// A process name that matches nothing: the error is logged and counted, the new files are
/// still delivered, and the sidecar keeps serving.
#[test]
fn signal_to_a_missing_process_is_logged_not_fatal() {
    let h = Harness::new();
    let name = format!("esl-none-{}", rand_hex(3));
    h.set("sig", &h.value("miss1"));
    let mut s = h
        .cmd(Identity::Workload)
        .secret("sig")
        .args(["--notify-signal", "SIGHUP", "--notify-process", &name])
        .spawn();
    s.wait_ready(Duration::from_secs(15));
    for tag in ["miss2", "miss3"] {
        let v = h.value(tag);
        h.set("sig", &v);
        s.wait_for(Duration::from_secs(10), "the new version", |_| {
            read(h.out(), "sig").as_deref() == Some(v.as_str())
        });
    }
    s.wait_for(Duration::from_secs(5), "two failed notifications", |s| {
        s.metric(r#"sidecar_notifications_total{result="error"}"#) == 2.0
    });
    let logs = s.logs();
    assert!(
        logs.contains(&format!("no process named \\\"{name}\\\""))
            && logs.contains("could not be told"),
        "{logs}"
    );
    assert!(
        logs.lines()
            .any(|l| l.contains("\"level\":\"ERROR\"") && l.contains(&name))
    );
    assert_eq!(s.get("/healthz").0, 200);
    assert_eq!(s.readyz().0, 200);
    s.assert_running();
}

/// Many secrets: read concurrently (faster start) but never more than 16 at once (gentle
/// on the vault), and delivered as one set.
#[test]
fn many_secrets_are_read_concurrently_but_bounded() {
    let h = Harness::new();
    let mut cmd = h.cmd(Identity::Workload);
    let mut want = Vec::new();
    for i in 0..40 {
        let name = format!("bulk-{i:02}");
        let v = h.value(&name);
        h.set(&name, &v);
        cmd = cmd.secret(&name);
        want.push((name, v));
    }
    // Slow answers, so that concurrent reads overlap at the fake.
    h.fake.inject(Fault::Slow {
        target: Target::Vault,
        delay_ms: 150,
        count: 100,
    });
    cmd.run_once().assert_success();
    let names: Vec<&str> = want.iter().map(|(n, _)| n.as_str()).collect();
    assert_layout(h.out(), &names);
    for (n, v) in &want {
        assert_eq!(read(h.out(), n).as_deref(), Some(v.as_str()));
    }
    let stats = h.fake.stats();
    let max = stats.max_concurrent_vault_requests;
    assert!((2..=16).contains(&max), "concurrent vault reads: {max}");
    // The concurrent first reads learn the vault's challenge once, not once each.
    let anonymous = stats
        .requests
        .iter()
        .filter(|r| r.endpoint.is_vault() && !r.authorization)
        .count();
    assert_eq!(anonymous, 1, "unauthenticated challenge requests");
    assert_eq!(
        stats.vault_get_requests(),
        41,
        "one challenge + one read per secret"
    );
}

/// The usual pod: an init container (`--once`) writes the secrets, then the native sidecar
/// takes over the same volume with a different list; the set it publishes replaces the
/// init container's (a file no longer configured disappears), with no leftovers.
#[test]
fn init_container_then_sidecar_on_the_same_volume() {
    let h = Harness::new();
    let a = h.value("a");
    h.set("keep", &a);
    h.set("drop", &h.value("drop"));
    h.cmd(Identity::Workload)
        .secret("keep")
        .secret("drop")
        .run_once()
        .assert_success();
    assert_layout(h.out(), &["drop", "keep"]);
    let first = data_target(h.out()).unwrap();
    let mut s = h.cmd(Identity::Workload).secret("keep").spawn();
    s.wait_ready(Duration::from_secs(15));
    assert_layout(h.out(), &["keep"]);
    assert_ne!(data_target(h.out()).unwrap(), first);
    assert_eq!(read(h.out(), "keep").unwrap(), a);
}

/// `uid`/`gid` per object (as root, which may chown).
#[test]
fn owner_per_object() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipped: changing owners needs root");
        return;
    }
    let h = Harness::new();
    h.set("owned", &h.value("owned"));
    let cfg = write_config(
        &h,
        "owner.yaml",
        "objects:\n  - objectName: owned\n    uid: 4242\n    gid: 4343\n    filePermission: \"0440\"\n",
    );
    h.cmd(Identity::Workload)
        .args(["--config", &cfg])
        .run_once()
        .assert_success();
    let meta = fs::metadata(h.out().join("owned")).unwrap();
    assert_eq!(
        (meta.uid(), meta.gid(), meta.mode() & 0o777),
        (4242, 4343, 0o440)
    );
}
