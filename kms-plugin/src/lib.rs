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
pub mod grpc;
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
