//! `soak`: a bounded soak run of the real `kms-plugin` and `sidecar` binaries.
//!
//! - KMS: `kms-plugin serve` on a software TPM (swtpm) with client tasks doing
//!   Encrypt/Decrypt back to back over one HTTP/2 connection, a rotation (`key rotate` +
//!   SIGHUP) every `--rotate-every`, and a reservoir of every key's ciphertexts decrypted
//!   again every 10 s and at the end.
//! - Sidecar: the fake Key Vault in-process with `--secrets` secrets, the sidecar
//!   refreshing them every `--refresh-interval` into a tmpfs directory, values changing
//!   every few seconds, random fault windows, every delivered file checked 4 times a second.
//! - Memory: RSS of both every second; after warm-up (20%, at least 10 s) the spread must
//!   stay within `--max-rss-spread`.
//! - Hygiene: no secret value, DEK seed or JWT in any log.
//!
//! Exits 0 only if every criterion holds (1 otherwise, 2 if the run could not start).
//! See docs/soak.md.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod binaries;
mod cli;
mod hygiene;
mod kms;
mod memory;
mod process;
mod report;
mod run;
mod sidecar;

use std::process::ExitCode;

use clap::Parser as _;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    let args = cli::Args::parse();
    match run::run(args).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("soak: error: {e:#}");
            ExitCode::from(2)
        }
    }
}
