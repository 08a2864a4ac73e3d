//! The key store directory: `manifest.json` (every KEK sealed, plus states and counters)
//! and a lock file. Every change is one atomic replacement of the manifest
//! (write temp, fsync, rename, fsync dir) under an exclusive lock, so a crash at any
//! point leaves either the old or the new manifest, and concurrent writers (the CLI and a
//! running plugin) never lose each other's changes.

pub mod manifest;

use std::fs;
use std::io::{ErrorKind, Write};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

pub use manifest::{
    KeyOrigin, KeyRecord, KeyState, Manifest, ManifestError, Peer, TransportRecord,
};

use crate::backend::BackendError;

pub const MANIFEST_FILE: &str = "manifest.json";
const LOCK_FILE: &str = ".lock";

#[derive(Debug, thiserror::Error)]
pub enum KeyStoreError {
    #[error("{op} {}: {source}{}", path.display(), io_hint(source))]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "key store {} is not initialized (no {MANIFEST_FILE}); create it with: \
         kms-plugin key init --key-store {} --backend <tpm|insecure-software>",
        dir.display(), dir.display()
    )]
    NotInitialized { dir: PathBuf },
    #[error(
        "key store {} is already initialized with {keys} key(s); use `kms-plugin key rotate` \
         to add a key", dir.display()
    )]
    AlreadyInitialized { dir: PathBuf, keys: usize },
    #[error("key store manifest {} is damaged: {reason}; restore it from a backup", path.display())]
    Corrupt { path: PathBuf, reason: String },
    #[error(transparent)]
    Rule(#[from] ManifestError),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error("the system random number generator failed: {0}")]
    Random(String),
    #[error(
        "unsealed key {key_id} does not match its recorded check value: the backend returned \
         a different key; the key store and backend do not belong together"
    )]
    CheckValueMismatch { key_id: String },
}

/// What the operator can do about an I/O error, appended to its message.
fn io_hint(e: &std::io::Error) -> &'static str {
    match e.kind() {
        ErrorKind::StorageFull | ErrorKind::QuotaExceeded => {
            " (the file system holding the key store is full: free space on it, or move the key \
             store to a larger one, then retry)"
        }
        _ => "",
    }
}

/// A key store directory.
#[derive(Debug, Clone)]
pub struct KeyStore {
    dir: PathBuf,
}

impl KeyStore {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn manifest_path(&self) -> PathBuf {
        self.dir.join(MANIFEST_FILE)
    }

    pub fn is_initialized(&self) -> bool {
        self.manifest_path().exists()
    }

    /// Reads and validates the manifest. Needs no lock: the file is only ever replaced
    /// atomically, so a reader sees one whole version.
    pub fn load(&self) -> Result<Manifest, KeyStoreError> {
        let path = self.manifest_path();
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == ErrorKind::NotFound => {
                return Err(KeyStoreError::NotInitialized {
                    dir: self.dir.clone(),
                });
            }
            Err(source) => {
                return Err(KeyStoreError::Io {
                    op: "reading",
                    path,
                    source,
                });
            }
        };
        Self::parse(&path, &bytes)
    }

    /// Parses manifest bytes (also the fuzzing entry point).
    pub fn parse(path: &Path, bytes: &[u8]) -> Result<Manifest, KeyStoreError> {
        let corrupt = |reason: String| KeyStoreError::Corrupt {
            path: path.to_owned(),
            reason,
        };
        let manifest: Manifest =
            serde_json::from_slice(bytes).map_err(|e| corrupt(e.to_string()))?;
        manifest.validate().map_err(|e| corrupt(e.to_string()))?;
        Ok(manifest)
    }

    /// Writes the first manifest. Fails if one exists.
    pub fn create(&self, manifest: &Manifest) -> Result<(), KeyStoreError> {
        self.ensure_dir()?;
        let _lock = self.lock()?;
        if let Ok(existing) = self.load() {
            return Err(KeyStoreError::AlreadyInitialized {
                dir: self.dir.clone(),
                keys: existing.keys.len(),
            });
        }
        manifest.validate()?;
        self.write(manifest)
    }

    /// Applies `change` to the current manifest under the lock and writes the result
    /// atomically. Nothing is written if `change` fails.
    pub fn update<T, E: From<KeyStoreError>>(
        &self,
        change: impl FnOnce(&mut Manifest) -> Result<T, E>,
    ) -> Result<(T, Manifest), E> {
        let _lock = self.lock()?;
        self.remove_stale_temp_files();
        let mut manifest = self.load()?;
        let out = change(&mut manifest)?;
        manifest.generation += 1;
        manifest.validate().map_err(KeyStoreError::from)?;
        self.write(&manifest)?;
        Ok((out, manifest))
    }

    /// Temporary manifests left by a writer that was killed mid-write. Only called under
    /// the lock, when no writer can be busy with one.
    fn remove_stale_temp_files(&self) {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            if name.starts_with(".manifest.") && name.ends_with(".tmp") {
                let _ = fs::remove_file(e.path());
            }
        }
    }

    fn ensure_dir(&self) -> Result<(), KeyStoreError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(|source| KeyStoreError::Io {
                op: "creating key store directory",
                path: self.dir.clone(),
                source,
            })
    }

    /// Exclusive advisory lock on `DIR/.lock`, released when the guard drops (or when the
    /// process dies, so a killed CLI never wedges the store).
    fn lock(&self) -> Result<fs::File, KeyStoreError> {
        let path = self.dir.join(LOCK_FILE);
        let io = |op, source| KeyStoreError::Io {
            op,
            path: path.clone(),
            source,
        };
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| io("opening lock file", e))?;
        file.lock().map_err(|e| io("locking", e))?;
        Ok(file)
    }

    fn write(&self, manifest: &Manifest) -> Result<(), KeyStoreError> {
        let path = self.manifest_path();
        let io = |op, source| KeyStoreError::Io {
            op,
            path: path.clone(),
            source,
        };
        let json = serde_json::to_vec_pretty(manifest)
            .map_err(|e| io("serializing", std::io::Error::other(e)))?;
        // tempfile creates the file 0600 in the same directory, so the rename is atomic.
        let mut tmp = tempfile::Builder::new()
            .prefix(".manifest.")
            .suffix(".tmp")
            .permissions(fs::Permissions::from_mode(0o600))
            .tempfile_in(&self.dir)
            .map_err(|e| io("creating temporary file next to", e))?;
        tmp.write_all(&json)
            .map_err(|e| io("writing temporary file for", e))?;
        tmp.write_all(b"\n")
            .map_err(|e| io("writing temporary file for", e))?;
        tmp.as_file()
            .sync_all()
            .map_err(|e| io("syncing temporary file for", e))?;
        tmp.persist(&path).map_err(|e| io("replacing", e.error))?;
        fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io("syncing the directory of", e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{BackendIdentity, BackendKind};

    fn ident() -> BackendIdentity {
        BackendIdentity {
            kind: BackendKind::InsecureSoftware,
            fingerprint: "x".into(),
        }
    }

    #[test]
    fn create_load_update() {
        let dir = tempfile::tempdir().unwrap();
        let store = KeyStore::new(dir.path().join("ks"));
        assert!(matches!(
            store.load(),
            Err(KeyStoreError::NotInitialized { .. })
        ));
        store.create(&Manifest::new(ident())).unwrap();
        assert!(matches!(
            store.create(&Manifest::new(ident())),
            Err(KeyStoreError::AlreadyInitialized { .. })
        ));
        let (_, m) = store
            .update(|m| Ok::<_, KeyStoreError>(m.take_serial()))
            .unwrap();
        assert_eq!(m.generation, 1);
        assert_eq!(store.load().unwrap().next_serial, 2);
        let mode = fs::metadata(store.manifest_path())
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        let dmode = fs::metadata(store.dir()).unwrap().permissions().mode() & 0o777;
        assert_eq!(dmode, 0o700);
    }

    #[test]
    fn failed_change_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = KeyStore::new(dir.path());
        store.create(&Manifest::new(ident())).unwrap();
        let before = fs::read(store.manifest_path()).unwrap();
        let r: Result<((), _), KeyStoreError> = store.update(|m| {
            m.next_serial = 99;
            Err(ManifestError::UnknownKey("x".into()).into())
        });
        assert!(r.is_err());
        assert_eq!(fs::read(store.manifest_path()).unwrap(), before);
    }

    #[test]
    fn damaged_manifest_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let store = KeyStore::new(dir.path());
        fs::write(store.manifest_path(), b"{\"format\": 1, \"trunc").unwrap();
        let err = store.load().unwrap_err().to_string();
        assert!(err.contains("damaged"), "{err}");
    }

    proptest::proptest! {
        /// A damaged manifest is an error naming the file, never a panic.
        #[test]
        fn manifest_parsing_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let _ = KeyStore::parse(Path::new("manifest.json"), &bytes);
        }
    }
}
