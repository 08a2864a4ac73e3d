//! Types that hold secret values and tokens. They zeroize on drop and implement neither
//! `Debug`, `Clone` nor `Serialize`: a secret cannot reach a log line or a file by
//! accident, only through `expose`.

use secrecy::{ExposeSecret, SecretSlice, SecretString};

/// A secret's bytes (a Key Vault secret value, a private key, a file's content).
pub struct SecretBytes(SecretSlice<u8>);

impl SecretBytes {
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(SecretSlice::from(bytes))
    }

    pub fn expose(&self) -> &[u8] {
        self.0.expose_secret()
    }

    pub fn len(&self) -> usize {
        self.expose().len()
    }

    pub fn is_empty(&self) -> bool {
        self.expose().is_empty()
    }

    /// Constant-time comparison, so refresh checks do not leak where values differ.
    pub fn same_as(&self, other: &SecretBytes) -> bool {
        let (a, b) = (self.expose(), other.expose());
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }

    /// A copy, made on purpose (the type is deliberately not `Clone`).
    pub fn duplicate(&self) -> Self {
        Self::new(self.expose().to_vec())
    }
}

/// A bearer token or client secret.
pub struct Token(SecretString);

impl Token {
    pub fn new(s: String) -> Self {
        Self(SecretString::from(s))
    }

    pub fn expose(&self) -> &str {
        self.0.expose_secret()
    }

    pub fn duplicate(&self) -> Self {
        Self::new(self.expose().to_owned())
    }
}
