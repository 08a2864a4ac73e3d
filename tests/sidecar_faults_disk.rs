//! The sidecar's output volume (an `emptyDir` with `medium: Memory` and a `sizeLimit`) fills
//! up while secrets rotate: the files already delivered stay whole and consistent (`..data`
//! still points at the complete old generation, no half-written generation is left), the
//! sidecar keeps running, its log and `/readyz` name the full volume and the fix,
//! `/metrics` counts the failed syncs; once there is room the new values are delivered and
//! the app is told. Mounts a small tmpfs of its own: needs root, skips otherwise.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "sidecar_support/mod.rs"]
mod support;
#[path = "common/tmpfs.rs"]
mod tmpfs;

use std::time::Duration;

use support::*;
use tmpfs::Tmpfs;

const DB: &str = "db-password";
const API: &str = "api-key";

/// Waits for one more failed sync, checking at every poll that the delivered files are the
/// old ones, unchanged.
fn wait_failed_sync(s: &mut Sidecar, out: &std::path::Path, old: &[(&str, &str)], what: &str) {
    let target = data_target(out).unwrap();
    let before = s.metric(r#"sidecar_syncs_total{result="error"}"#);
    s.wait_for(Duration::from_secs(20), what, |s| {
        for (name, value) in old {
            assert_eq!(read(out, name).as_deref(), Some(*value), "{name} changed");
        }
        assert_eq!(data_target(out).as_ref(), Some(&target), "..data moved");
        assert_eq!(s.readyz().0, 200, "still ready: the old files are good");
        s.metric(r#"sidecar_syncs_total{result="error"}"#) > before
    });
    assert_layout(out, &[API, DB]);
}

/// A value larger than the whole volume, then a small one while something else fills the
/// volume: each write fails and leaves the old generation in place; log and `/readyz` say
/// "No space left on device" and "raise the emptyDir sizeLimit or free space"; freeing the space
/// delivers the latest value and runs the notify command once.
#[test]
fn full_output_volume_keeps_the_delivered_files_then_delivers_and_notifies() {
    let Some(fs) = Tmpfs::mount(
        "512k",
        "full_output_volume_keeps_the_delivered_files_then_delivers_and_notifies",
    ) else {
        return;
    };
    let out = fs.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let h = Harness::new();
    let marker = h.work.path().join("notified");
    let sh = script(&h, "notify.sh", r#"cat "$2" >> "$1" && echo >> "$1""#);
    let cmd = format!(
        "{} {} {}",
        sh.display(),
        marker.display(),
        out.join(DB).display()
    );
    let (db1, api1) = (h.value("db1"), h.value("api1"));
    h.set(DB, &db1);
    h.set(API, &api1);
    let mut s = h
        .cmd(Identity::Workload)
        .no_output_dir()
        .args(["--output-dir", out.to_str().unwrap()])
        .secret(DB)
        .secret(API)
        .args(["--notify-command", &cmd])
        .spawn();
    s.wait_ready(Duration::from_secs(15));
    assert_layout(&out, &[API, DB]);
    let old = [(DB, db1.as_str()), (API, api1.as_str())];

    // 1. A new version bigger than the volume (not watched by the harness: it is 600 KiB;
    //    its distinctive prefix is).
    let big = format!("{}{}", h.value("big"), "x".repeat(600 << 10));
    h.fake.set_secret(DB, &big, None);
    wait_failed_sync(&mut s, &out, &old, "a sync failing on the oversized value");
    let logs = s.logs();
    let line = logs
        .lines()
        .find(|l| l.contains("sync failed") && l.contains("No space left on device"))
        .unwrap_or_else(|| panic!("no error naming the full volume; log tail:\n{}", s.tail(20)));
    println!("sidecar log on a full volume: {line}");
    assert!(line.contains("ERROR"), "{line}");
    assert!(
        line.contains("raise the emptyDir sizeLimit or free space"),
        "names the fix: {line}"
    );
    assert!(
        line.contains(out.to_str().unwrap()),
        "names the directory: {line}"
    );
    let (code, body) = s.readyz();
    println!("/readyz on a full volume: {body}");
    assert_eq!(code, 200);
    assert!(
        body.contains("last refresh failed")
            && body.contains("No space left on device")
            && body.contains("sizeLimit"),
        "{body}"
    );
    assert_eq!(s.metric("sidecar_secrets_delivered"), 2.0);
    assert_eq!(s.metric("sidecar_ready"), 1.0);

    // 2. A value that fits, but something else fills the volume.
    let filler = fs.fill("filler");
    assert_eq!(fs.available(), 0);
    let db2 = h.value("db2");
    h.set(DB, &db2);
    wait_failed_sync(&mut s, &out, &old, "a sync failing on the filled volume");
    assert_eq!(line_count(&marker), 0, "nothing changed: no notification");

    // 3. Room again: the latest value arrives, the app is told once, the warning goes.
    std::fs::remove_file(&filler).unwrap();
    s.wait_for(
        Duration::from_secs(15),
        "the new value once there is room",
        |_| read(&out, DB).as_deref() == Some(db2.as_str()),
    );
    assert_layout(&out, &[API, DB]);
    assert_eq!(read(&out, API).as_deref(), Some(api1.as_str()));
    s.wait_for(Duration::from_secs(10), "the notify command", |_| {
        line_count(&marker) == 1
    });
    assert_eq!(
        std::fs::read_to_string(&marker).unwrap().lines().last(),
        Some(db2.as_str()),
        "the app read the new value when told"
    );
    s.wait_for(Duration::from_secs(10), "the warning to clear", |s| {
        let (code, body) = s.readyz();
        code == 200 && !body.contains("warning")
    });
    assert_eq!(s.metric(r#"sidecar_notifications_total{result="ok"}"#), 1.0);
    s.assert_running();
    assert!(s.terminate().success());
}
