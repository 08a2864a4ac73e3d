//! Writes one complete set of files atomically, in the layout kubelet's AtomicWriter uses
//! for Secret and ConfigMap volumes (which apps and file watchers already understand):
//!
//! ```text
//! DIR/..2026_11_28_10_15_02.123456789_ab12/   the payload of one sync (mode per file)
//! DIR/..data -> ..2026_11_28_10_15_02.123456789_ab12   swapped by rename: the atomic step
//! DIR/db-password -> ..data/db-password         one stable symlink per visible file
//! ```
//!
//! A reader that opens `DIR/db-password` sees either the whole old set or the whole new
//! one. A failure before the swap (disk full, bad owner) leaves the old set untouched.
//!
//! The replaced payload is removed [`RETIRE_AFTER`] later, not at once: a reader whose path
//! walk went through `..data` just before the swap still has to find its file in the old
//! payload. Removing it right after the swap (as kubelet does, kubernetes/kubernetes#92851)
//! lets such a reader see the file missing.

use std::fs;
use std::io::{ErrorKind, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::secret::SecretBytes;

const DATA_LINK: &str = "..data";
const DATA_TMP: &str = "..data_tmp";
/// How long a replaced payload stays for readers that were already on their way into it.
pub const RETIRE_AFTER: Duration = Duration::from_millis(500);

/// One file of a payload.
pub struct FileSpec {
    /// A plain file name, validated by the config layer.
    pub name: String,
    pub content: SecretBytes,
    pub mode: u32,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("{op} {}: {source}{hint}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
        hint: &'static str,
    },
    #[error("file name {0:?} is not a plain file name")]
    BadName(String),
}

fn io(op: &'static str, path: &Path, source: std::io::Error) -> WriteError {
    let hint = match source.raw_os_error() {
        Some(28) => {
            " (the volume is full: an update needs room for a second copy of the secrets; \
             raise the emptyDir sizeLimit or free space on it)"
        }
        Some(1) => " (changing owners needs CAP_CHOWN: drop uid/gid from the config or grant it)",
        _ => "",
    };
    WriteError::Io {
        op,
        path: path.to_owned(),
        source,
        hint,
    }
}

/// Publishes `files` as the new content of `dir`. Files of the previous set that are not
/// in `files` disappear with the swap.
pub fn publish(dir: &Path, files: &[FileSpec]) -> Result<(), WriteError> {
    for f in files {
        if !is_plain_name(&f.name) {
            return Err(WriteError::BadName(f.name.clone()));
        }
    }
    let old_target = fs::read_link(dir.join(DATA_LINK)).ok();
    let ts_name = timestamped_name();
    let ts_dir = dir.join(&ts_name);
    fs::DirBuilder::new()
        .mode(0o755)
        .create(&ts_dir)
        .map_err(|e| io("creating payload directory", &ts_dir, e))?;
    // From here on, any failure removes the half-written payload and keeps the old one.
    let result = write_payload(&ts_dir, files).and_then(|()| swap(dir, &ts_name, files));
    if let Err(e) = result {
        let _ = fs::remove_dir_all(&ts_dir);
        return Err(e);
    }
    // New readers cannot reach the old payload any more; ones already inside get a grace.
    if let Some(old) = old_target.filter(|o| o.as_os_str() != ts_name.as_str()) {
        retire(dir.join(old));
    }
    remove_orphans(dir, &ts_name, RETIRE_AFTER);
    Ok(())
}

/// Removes a replaced payload after [`RETIRE_AFTER`], off the caller's thread. If the
/// process exits first, the next publish (or [`remove_replaced`]) removes it.
fn retire(payload: PathBuf) {
    let spawned = std::thread::Builder::new()
        .name("retire-payload".into())
        .spawn({
            let payload = payload.clone();
            move || {
                std::thread::sleep(RETIRE_AFTER);
                let _ = fs::remove_dir_all(payload);
            }
        });
    if spawned.is_err() {
        let _ = fs::remove_dir_all(payload);
    }
}

/// Removes every payload but the current one at once, grace or not: for when no reader can
/// be inside an old one (`--once`, which exits right after publishing).
pub fn remove_replaced(dir: &Path) {
    if let Ok(current) = fs::read_link(dir.join(DATA_LINK)) {
        remove_orphans(dir, &current.to_string_lossy(), Duration::ZERO);
    }
}

fn write_payload(ts_dir: &Path, files: &[FileSpec]) -> Result<(), WriteError> {
    for f in files {
        let path = ts_dir.join(&f.name);
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| io("creating", &path, e))?;
        file.write_all(f.content.expose())
            .map_err(|e| io("writing", &path, e))?;
        file.sync_all().map_err(|e| io("syncing", &path, e))?;
        if f.uid.is_some() || f.gid.is_some() {
            std::os::unix::fs::fchown(&file, f.uid, f.gid)
                .map_err(|e| io("changing the owner of", &path, e))?;
        }
        // The final mode last: it may remove our own write permission.
        fs::set_permissions(&path, fs::Permissions::from_mode(f.mode))
            .map_err(|e| io("setting the mode of", &path, e))?;
    }
    Ok(())
}

fn swap(dir: &Path, ts_name: &str, files: &[FileSpec]) -> Result<(), WriteError> {
    let tmp = dir.join(DATA_TMP);
    let _ = fs::remove_file(&tmp);
    symlink(ts_name, &tmp).map_err(|e| io("creating symlink", &tmp, e))?;
    fs::rename(&tmp, dir.join(DATA_LINK)).map_err(|e| io("swapping", &dir.join(DATA_LINK), e))?;
    // Stable per-file links. Creating one for a new name is safe to do after the swap:
    // until it exists the file is simply not visible yet.
    for f in files {
        let link = dir.join(&f.name);
        let want = Path::new(DATA_LINK).join(&f.name);
        match fs::read_link(&link) {
            Ok(target) if target == want => {}
            Ok(_) => {
                fs::remove_file(&link).map_err(|e| io("replacing symlink", &link, e))?;
                symlink(&want, &link).map_err(|e| io("creating symlink", &link, e))?;
            }
            Err(e) if e.kind() == ErrorKind::NotFound => {
                symlink(&want, &link).map_err(|e| io("creating symlink", &link, e))?;
            }
            Err(e) => return Err(io("inspecting", &link, e)),
        }
    }
    // Links of files no longer in the set.
    let keep: std::collections::HashSet<&str> = files.iter().map(|f| f.name.as_str()).collect();
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("..") || keep.contains(name.as_str()) {
                continue;
            }
            let is_our_link = fs::read_link(e.path()).is_ok_and(|t| t.starts_with(DATA_LINK));
            if is_our_link {
                let _ = fs::remove_file(e.path());
            }
        }
    }
    Ok(())
}

/// Payload directories other than `current`: replaced ones whose removal did not happen
/// (the process exited during the grace) and half-written ones of a crashed run. Those
/// written less than `grace` ago are left to their own removal.
fn remove_orphans(dir: &Path, current: &str, grace: Duration) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("..")
            && name != DATA_LINK
            && name != DATA_TMP
            && name != current
            && e.file_type().is_ok_and(|t| t.is_dir())
            && !written_within(&e, grace)
        {
            let _ = fs::remove_dir_all(e.path());
        }
    }
}

fn written_within(e: &fs::DirEntry, grace: Duration) -> bool {
    !grace.is_zero()
        && e.metadata()
            .and_then(|m| m.modified())
            .is_ok_and(|t| t.elapsed().is_ok_and(|age| age < grace))
}

fn timestamped_name() -> String {
    let now = time::OffsetDateTime::now_utc();
    let mut rnd = [0u8; 2];
    let _ = getrandom::fill(&mut rnd);
    format!(
        "..{:04}_{:02}_{:02}_{:02}_{:02}_{:02}.{:09}_{:02x}{:02x}",
        now.year(),
        u8::from(now.month()),
        now.day(),
        now.hour(),
        now.minute(),
        now.second(),
        now.nanosecond(),
        rnd[0],
        rnd[1]
    )
}

/// A name that stays inside the output directory and is visible: no separators, no `.`
/// or `..`, no leading dot (those are the writer's own), no NUL, at most 255 bytes.
pub fn is_plain_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && !name.starts_with('.')
        && !name.contains('/')
        && !name.contains('\0')
}

/// Reads a delivered file through its stable link (for tests and the demo).
pub fn read_delivered(dir: &Path, name: &str) -> std::io::Result<Vec<u8>> {
    fs::read(dir.join(name))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    fn spec(name: &str, content: &str, mode: u32) -> FileSpec {
        FileSpec {
            name: name.into(),
            content: SecretBytes::new(content.as_bytes().to_vec()),
            mode,
            uid: None,
            gid: None,
        }
    }

    #[test]
    fn publishes_replaces_and_removes() {
        let d = tempfile::tempdir().unwrap();
        publish(d.path(), &[spec("a", "1", 0o400), spec("b", "2", 0o440)]).unwrap();
        assert_eq!(read_delivered(d.path(), "a").unwrap(), b"1");
        assert_eq!(
            fs::metadata(d.path().join("b")).unwrap().mode() & 0o777,
            0o440
        );
        let first = fs::read_link(d.path().join(DATA_LINK)).unwrap();
        publish(d.path(), &[spec("a", "10", 0o400), spec("c", "3", 0o400)]).unwrap();
        assert_eq!(read_delivered(d.path(), "a").unwrap(), b"10");
        assert_eq!(read_delivered(d.path(), "c").unwrap(), b"3");
        assert!(!d.path().join("b").exists(), "removed files disappear");
        // The old payload goes after the grace for readers already inside it.
        std::thread::sleep(RETIRE_AFTER * 3);
        assert!(!d.path().join(&first).exists(), "old payload removed");
        // Exactly: ..data, one payload dir, a, c.
        let names: Vec<String> = fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 4, "{names:?}");
    }

    #[test]
    fn remove_replaced_keeps_only_the_current_payload() {
        let d = tempfile::tempdir().unwrap();
        publish(d.path(), &[spec("a", "1", 0o400)]).unwrap();
        let first = fs::read_link(d.path().join(DATA_LINK)).unwrap();
        publish(d.path(), &[spec("a", "2", 0o400)]).unwrap();
        remove_replaced(d.path());
        assert!(!d.path().join(&first).exists());
        assert_eq!(read_delivered(d.path(), "a").unwrap(), b"2");
    }

    #[test]
    fn failure_keeps_the_old_set() {
        let d = tempfile::tempdir().unwrap();
        publish(d.path(), &[spec("a", "1", 0o400)]).unwrap();
        // Two files of the same name: the second create_new fails mid-payload.
        let err = publish(d.path(), &[spec("a", "2", 0o400), spec("a", "3", 0o400)]).unwrap_err();
        assert!(err.to_string().contains("creating"), "{err}");
        assert_eq!(read_delivered(d.path(), "a").unwrap(), b"1");
        let dirs = fs::read_dir(d.path())
            .unwrap()
            .filter(|e| e.as_ref().unwrap().file_type().unwrap().is_dir())
            .count();
        assert_eq!(dirs, 1, "the half-written payload was removed");
        assert!(matches!(
            publish(d.path(), &[spec("../x", "1", 0o400)]),
            Err(WriteError::BadName(_))
        ));
    }

    /// A reader that resolved `..data` just before a swap must still find its file: the
    /// replaced payload may not vanish under it (kubelet's writer has this race,
    /// kubernetes/kubernetes#92851). Publishes back to back while another thread reads.
    #[test]
    fn a_reader_never_finds_a_file_missing_during_swaps() {
        let shm = Path::new("/dev/shm");
        let d = if shm.is_dir() {
            tempfile::tempdir_in(shm).unwrap()
        } else {
            tempfile::tempdir().unwrap()
        };
        let names: Vec<String> = (0..20).map(|i| format!("f{i}")).collect();
        let set = |g: usize| -> Vec<FileSpec> {
            names
                .iter()
                .map(|n| spec(n, &format!("{n}-{g}"), 0o400))
                .collect()
        };
        publish(d.path(), &set(0)).unwrap();
        let stop = std::sync::atomic::AtomicBool::new(false);
        let (missing, reads) = std::thread::scope(|s| {
            let reader = s.spawn(|| {
                let (mut missing, mut reads) = (0u32, 0u64);
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    for n in &names {
                        reads += 1;
                        match fs::read(d.path().join(n)) {
                            Ok(b) => assert!(
                                String::from_utf8_lossy(&b).starts_with(&format!("{n}-")),
                                "{n}: foreign content"
                            ),
                            Err(e) if e.kind() == ErrorKind::NotFound => missing += 1,
                            Err(e) => panic!("{n}: {e}"),
                        }
                    }
                }
                (missing, reads)
            });
            for g in 1..=1500 {
                publish(d.path(), &set(g)).unwrap();
            }
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            reader.join().unwrap()
        });
        assert_eq!(
            missing, 0,
            "{missing} of {reads} reads found a file missing"
        );
    }

    #[test]
    fn plain_names() {
        for bad in ["", ".", "..", ".hidden", "a/b", "../etc", "x\0y"] {
            assert!(!is_plain_name(bad), "{bad:?}");
        }
        assert!(!is_plain_name(&"a".repeat(256)));
        for good in ["db-password", "tls.crt", "a..b", "x y"] {
            assert!(is_plain_name(good), "{good:?}");
        }
    }
}
