//! The binaries under test: built by cargo with this binary's profile, then copied aside so
//! that a concurrent build in the same target directory cannot swap them mid-run.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::machine::optimized;

#[derive(Debug)]
pub struct Binaries {
    pub kms_plugin: PathBuf,
    pub sidecar: PathBuf,
    /// The bare tonic floor of the KMS benchmark (this package's other binary).
    pub kms_floor: PathBuf,
    /// Where cargo put them (for the report).
    pub built_in: PathBuf,
    /// The cargo command that built them.
    pub command: String,
    _copies: tempfile::TempDir,
}

/// The workspace root (this package lives in tests/bench).
pub fn workspace_root() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    dir.canonicalize().unwrap_or(dir)
}

/// `$CARGO build -p kms-plugin -p sidecar --bins [--release]`, then the binaries from the
/// directory this executable is in (the same target directory and profile).
pub fn build() -> Result<Binaries> {
    // `cargo run` sets CARGO to the cargo that runs us.
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    // `-p bench` for kms-floor (and this binary, already up to date).
    let mut args = vec![
        "build",
        "-p",
        "kms-plugin",
        "-p",
        "sidecar",
        "-p",
        "bench",
        "--bins",
    ];
    if optimized() {
        args.push("--release");
    }
    let command = format!("cargo {}", args.join(" "));
    eprintln!("bench: {command}");
    let status = Command::new(&cargo)
        .args(&args)
        .current_dir(workspace_root())
        .status()
        .with_context(|| format!("running {}", Path::new(&cargo).display()))?;
    if !status.success() {
        bail!("{command} failed ({status})");
    }
    let exe = std::env::current_exe().context("locating the bench binary")?;
    let built_in = exe
        .parent()
        .context("the bench binary has no parent directory")?
        .to_owned();
    let copies = tempfile::Builder::new()
        .prefix("edgeseal-bench-bin-")
        .tempdir()?;
    let copy = |name: &str| -> Result<PathBuf> {
        let from = built_in.join(name);
        if !from.is_file() {
            bail!(
                "{} does not exist after `{command}`: is the target directory shared with this binary's?",
                from.display()
            );
        }
        let to = copies.path().join(name);
        std::fs::copy(&from, &to).with_context(|| format!("copying {} aside", from.display()))?;
        Ok(to)
    };
    Ok(Binaries {
        kms_plugin: copy("kms-plugin")?,
        sidecar: copy("sidecar")?,
        kms_floor: copy("kms-floor")?,
        built_in,
        command,
        _copies: copies,
    })
}
