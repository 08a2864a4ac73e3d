//! The gRPC Unix socket: stale-socket clean-up, race-free permissions, removal on exit.

use std::fs;
use std::io::ErrorKind;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error(
        "another process is already serving on {}; stop it first, or give this plugin its \
         own --socket", path.display()
    )]
    InUse { path: PathBuf },
    #[error(
        "{} exists and is not a socket; refusing to remove it. Remove it by hand or choose \
         another --socket", path.display()
    )]
    NotASocket { path: PathBuf },
    #[error("{op} {}: {source}{hint}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
        hint: &'static str,
    },
}

fn io(op: &'static str, path: &Path, source: std::io::Error) -> SocketError {
    let hint = match source.kind() {
        ErrorKind::PermissionDenied => " (run as root or as a user that owns the socket directory)",
        _ => "",
    };
    SocketError::Io {
        op,
        path: path.to_owned(),
        source,
        hint,
    }
}

/// Removes the socket file on drop, if it is still the one this process created.
pub struct SocketGuard {
    path: PathBuf,
    ino: u64,
}

impl Drop for SocketGuard {
    fn drop(&mut self) {
        if fs::symlink_metadata(&self.path).is_ok_and(|m| m.ino() == self.ino) {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Binds `path` with `mode` (and `group`), removing a stale socket left by a crash.
///
/// The socket is bound inside a fresh 0700 directory next to `path`, given its mode and
/// group there, then renamed into place: no other user can ever connect to it with
/// looser permissions, whatever the umask.
pub fn bind(
    path: &Path,
    mode: u32,
    group: Option<u32>,
) -> Result<(tokio::net::UnixListener, SocketGuard), SocketError> {
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or_else(|| Path::new("/"));
    fs::create_dir_all(parent).map_err(|e| io("creating socket directory", parent, e))?;
    remove_stale(path)?;

    let staging = tempfile::Builder::new()
        .prefix(".kms-plugin-")
        .tempdir_in(parent)
        .map_err(|e| io("creating a private staging directory in", parent, e))?;
    let staged = staging.path().join("s");
    let listener = UnixListener::bind(&staged).map_err(|e| io("binding", &staged, e))?;
    fs::set_permissions(&staged, fs::Permissions::from_mode(mode))
        .map_err(|e| io("setting the mode of", &staged, e))?;
    if let Some(gid) = group {
        std::os::unix::fs::chown(&staged, None, Some(gid))
            .map_err(|e| io("changing the group of", &staged, e))?;
    }
    fs::rename(&staged, path).map_err(|e| io("moving the socket into place at", path, e))?;
    let ino = fs::symlink_metadata(path)
        .map_err(|e| io("inspecting", path, e))?
        .ino();
    listener
        .set_nonblocking(true)
        .map_err(|e| io("configuring", path, e))?;
    let listener =
        tokio::net::UnixListener::from_std(listener).map_err(|e| io("registering", path, e))?;
    Ok((
        listener,
        SocketGuard {
            path: path.to_owned(),
            ino,
        },
    ))
}

fn remove_stale(path: &Path) -> Result<(), SocketError> {
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io("inspecting", path, e)),
    };
    if !meta.file_type().is_socket() {
        return Err(SocketError::NotASocket {
            path: path.to_owned(),
        });
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(SocketError::InUse {
            path: path.to_owned(),
        }),
        Err(_) => {
            tracing::info!(socket = %path.display(), "removing stale socket left by an earlier run");
            fs::remove_file(path).map_err(|e| io("removing stale socket", path, e))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn binds_with_mode_and_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/kms.sock");
        let (l, guard) = bind(&path, 0o600, None).unwrap();
        let meta = fs::symlink_metadata(&path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        // A second plugin on the same path is refused while the first listens.
        assert!(matches!(
            bind(&path, 0o600, None),
            Err(SocketError::InUse { .. })
        ));
        drop(l);
        drop(guard);
        assert!(!path.exists());
        // No staging directory is left behind.
        assert_eq!(fs::read_dir(dir.path().join("sub")).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn replaces_stale_socket_but_not_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kms.sock");
        // A socket nobody listens on, as a crash leaves it.
        drop(UnixListener::bind(&path).unwrap());
        let (_l, _g) = bind(&path, 0o660, None).unwrap();
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o660
        );
        let file = dir.path().join("file");
        fs::write(&file, b"x").unwrap();
        assert!(matches!(
            bind(&file, 0o600, None),
            Err(SocketError::NotASocket { .. })
        ));
        assert!(file.exists());
    }
}
