//! Types that hold key material or DEK seeds in clear.
//!
//! They zeroize on drop and deliberately implement neither `Debug`, `Clone` nor
//! `Serialize`, so a secret cannot reach a log line, an error message or a file by accident.

use zeroize::Zeroizing;

/// Length of a key-encryption key: AES-256.
pub const KEK_LEN: usize = 32;

/// A key-encryption key in clear. Lives only in this process's memory.
pub struct Kek(Zeroizing<[u8; KEK_LEN]>);

impl Kek {
    /// A fresh KEK from the operating system's CSPRNG.
    pub fn generate() -> Result<Self, getrandom::Error> {
        let mut bytes = Zeroizing::new([0u8; KEK_LEN]);
        getrandom::fill(bytes.as_mut())?;
        Ok(Self(bytes))
    }

    /// Takes ownership of bytes already held in zeroizing memory.
    pub fn from_bytes(bytes: Zeroizing<[u8; KEK_LEN]>) -> Self {
        Self(bytes)
    }

    /// Builds a KEK from a slice of exactly [`KEK_LEN`] bytes (e.g. an unsealed blob).
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        if bytes.len() != KEK_LEN {
            return None;
        }
        let mut out = Zeroizing::new([0u8; KEK_LEN]);
        out.copy_from_slice(bytes);
        Some(Self(out))
    }

    /// The raw key, for the cipher and the backends that seal it.
    pub fn expose(&self) -> &[u8; KEK_LEN] {
        &self.0
    }
}

/// A DEK seed (or any plaintext the apiserver hands us), zeroized on drop.
pub struct Plaintext(Zeroizing<Vec<u8>>);

impl Plaintext {
    /// Takes the bytes out of a request buffer, leaving it empty.
    pub fn take(buf: &mut Vec<u8>) -> Self {
        Self(Zeroizing::new(std::mem::take(buf)))
    }

    pub fn from_vec(bytes: Vec<u8>) -> Self {
        Self(Zeroizing::new(bytes))
    }

    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Hands the bytes to a response message. The caller gives up zeroization from here on:
    /// the gRPC stack owns the buffer until it is written to the socket.
    pub fn into_response_bytes(mut self) -> Vec<u8> {
        std::mem::take(&mut *self.0)
    }
}
