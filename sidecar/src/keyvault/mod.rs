//! The Key Vault client: challenge-based authentication, retries with backoff that honour
//! the service's throttling hints, and errors an operator can act on.

pub mod challenge;
pub mod client;
pub mod error;
pub mod jwk;

pub use client::{KeyVault, RetryPolicy, SecretBundle};
pub use error::KvError;
