//! The edgeseal Key Vault sidecar: fetches a pod's secrets from Azure Key Vault with a
//! managed identity and delivers them into an in-memory volume, refreshing them and
//! telling the app when they change.
//!
//! Layers: `config` (CSI-shaped YAML and flags, validated up front), `identity` (one
//! token source per kind of managed identity, and the token cache), `keyvault` (the REST
//! client), `sync` (one read-convert-publish cycle), `deliver` (tmpfs check, atomic file
//! set, conversions), `runner` (the loop), `server` and `metrics` (probes).

pub mod check;
pub mod cli;
pub mod config;
pub mod deliver;
#[doc(hidden)]
pub mod fuzzing;
pub mod http;
pub mod identity;
pub mod keyvault;
pub mod metrics;
pub mod notify;
pub mod runner;
pub mod secret;
pub mod server;
pub mod sync;

/// An error and its causes on one line, without repeating a cause a message already quotes.
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
