//! The edgeseal Kubernetes KMS v2 plugin.
//!
//! Layers, from the wire in: `grpc` (v2 and v1beta1 handlers, thin) and `server`
//! (socket, signals, HTTP probes, the keeper that reloads keys) over the domain core:
//! `kms` (Encrypt/Decrypt/health), `keyring` (unsealed KEKs in memory), `envelope`
//! (ciphertext format, AES-256-GCM), `keystore` (sealed KEKs on disk, crash-safe) and
//! `backend` (what seals KEKs: the TPM, or an insecure root-key file for development).

pub mod backend;
pub mod cli;
pub mod config;
pub mod defaults;
pub mod envelope;
#[doc(hidden)]
pub mod fuzzing;
pub mod grpc;
pub mod hardening;
pub mod keyadmin;
pub mod keyid;
pub mod keyring;
pub mod keystore;
pub mod keywrap;
pub mod kms;
pub mod logging;
pub mod metrics;
pub mod secret;
pub mod server;

/// An error and its causes on one line, without repeating a cause that a message already
/// quotes (most of ours name their source in their own text).
pub fn error_chain(e: &anyhow::Error) -> String {
    let mut msg = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !msg.contains(&c) {
            msg.push_str(": ");
            msg.push_str(&c);
        }
    }
    msg
}
