//! The edgeseal Key Vault sidecar: fetches a pod's secrets from Azure Key Vault with a
//! managed identity and delivers them into an in-memory volume, refreshing them and
//! telling the app when they change.

pub mod config;
pub mod deliver;
pub mod http;
pub mod identity;
pub mod keyvault;
pub mod secret;
