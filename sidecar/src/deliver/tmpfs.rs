//! Secrets are delivered only to memory-backed file systems: a tmpfs or ramfs volume
//! (`emptyDir: {medium: Memory}`) never writes them to a disk.

use std::path::Path;

const TMPFS_MAGIC: i64 = 0x0102_1994;
const RAMFS_MAGIC: i64 = 0x8584_58f6;

/// What file system a path is on, by its `statfs` magic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsKind {
    Memory,
    Other(i64),
}

pub fn fs_kind(path: &Path) -> std::io::Result<FsKind> {
    let st = rustix::fs::statfs(path)?;
    #[allow(clippy::useless_conversion, clippy::unnecessary_cast)]
    let magic = i64::from(st.f_type as i64);
    Ok(if magic == TMPFS_MAGIC || magic == RAMFS_MAGIC {
        FsKind::Memory
    } else {
        FsKind::Other(magic)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_shm_is_memory_and_a_disk_dir_usually_is_not() {
        if Path::new("/dev/shm").exists() {
            assert_eq!(fs_kind(Path::new("/dev/shm")).unwrap(), FsKind::Memory);
        }
        // The crate directory lives on the build machine's disk (overlay, ext4...).
        let here = fs_kind(Path::new(env!("CARGO_MANIFEST_DIR"))).unwrap();
        assert_ne!(here, FsKind::Memory);
    }
}
