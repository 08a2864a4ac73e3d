//! A small tmpfs of its own for one test, so the test can fill a file system up. Mounted
//! on a fresh temporary directory and unmounted when dropped, also when the test panics.
//! Mounting needs root (CAP_SYS_ADMIN): [`Tmpfs::mount`] returns `None` after a loud
//! `SKIPPED` line only when the test does not run as root; as root, a failed mount fails
//! the test. Test files include it with `#[path = "common/tmpfs.rs"] mod tmpfs;`.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use tempfile::TempDir;

/// A mounted tmpfs; unmounted on drop (before its directory is removed).
pub struct Tmpfs {
    dir: TempDir,
}

/// Whether this process's effective uid is 0 (from `/proc/self/status`).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|ids| ids.split_whitespace().nth(1).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (as `mount -o size=`: `256k`, `1m`). `None`, after a
    /// `SKIPPED` line naming `test`, if not running as root.
    pub fn mount(size: &str, test: &str) -> Option<Self> {
        if !is_root() {
            eprintln!(
                "SKIPPED: {test} needs CAP_SYS_ADMIN (run as root) to mount a {size} tmpfs \
                 and fill it up"
            );
            return None;
        }
        let dir = tempfile::Builder::new()
            .prefix("edgeseal-tmpfs-")
            .tempdir()
            .unwrap();
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir.path())
            .output()
            .expect("running mount");
        assert!(
            out.status.success(),
            "mount -t tmpfs -o size={size} on {} failed while running as root: {}",
            dir.path().display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Some(Self { dir })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Appends to `name` until the file system is full (ENOSPC); returns its path. Called
    /// again, it takes whatever was freed since.
    pub fn fill(&self, name: &str) -> PathBuf {
        let path = self.path().join(name);
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap();
        let chunk = vec![0xa5u8; 4096];
        loop {
            match f.write(&chunk) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(28) => break,
                Err(e) => panic!("filling {}: {e}", path.display()),
            }
        }
        path
    }

    /// Bytes still free (`stat -f`).
    pub fn available(&self) -> u64 {
        let out = Command::new("stat")
            .args(["-f", "-c", "%a %S"])
            .arg(self.path())
            .output()
            .expect("running stat -f");
        let text = String::from_utf8_lossy(&out.stdout);
        let mut it = text.split_whitespace().map(|n| n.parse::<u64>().unwrap());
        it.next().unwrap() * it.next().unwrap()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // The test's children are gone by now (they are declared after the mount and so
        // dropped first); a lazy unmount covers a straggler holding a file open.
        let path = self.dir.path().to_owned();
        let ok = Command::new("umount")
            .arg(&path)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&path).status();
        }
    }
}
