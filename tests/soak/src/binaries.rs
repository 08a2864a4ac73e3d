//! The binaries under test: built with the soak's own profile (so `cargo run --release -p
//! soak` soaks release builds) and taken from the directory the soak runs from.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context as _;

pub struct Binaries {
    pub kms_plugin: PathBuf,
    pub sidecar: PathBuf,
    /// `debug` or `release`.
    pub profile: &'static str,
}

pub fn prepare(build: bool) -> anyhow::Result<Binaries> {
    let exe = std::env::current_exe().context("locating the soak binary")?;
    let dir = exe
        .parent()
        .context("the soak binary has no parent directory")?;
    let release = !cfg!(debug_assertions);
    let profile = if release { "release" } else { "debug" };
    if build {
        // `cargo run` sets CARGO to the cargo that runs us.
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../Cargo.toml");
        let mut cmd = Command::new(&cargo);
        cmd.arg("build")
            .arg("--manifest-path")
            .arg(&manifest)
            .args(["-p", "kms-plugin", "-p", "sidecar", "--bins"]);
        if release {
            cmd.arg("--release");
        }
        eprintln!("soak: building kms-plugin and sidecar ({profile})");
        let st = cmd
            .status()
            .with_context(|| format!("running {}", cargo.to_string_lossy()))?;
        anyhow::ensure!(
            st.success(),
            "building kms-plugin and sidecar failed ({st})"
        );
    }
    let find = |name: &str| {
        let p = dir.join(name);
        anyhow::ensure!(
            p.is_file(),
            "{} not found next to the soak binary{}",
            p.display(),
            if build {
                ""
            } else {
                " (drop --no-build to build it)"
            }
        );
        Ok(p)
    };
    Ok(Binaries {
        kms_plugin: find("kms-plugin")?,
        sidecar: find("sidecar")?,
        profile,
    })
}
