//! Key identifiers: public, stable, never reused, never derived from key material.

use std::fmt;

use serde::{Deserialize, Serialize};

/// kube-apiserver rejects longer key ids.
pub const MAX_KEY_ID_LEN: usize = 1024;

/// The name of one KEK, as the apiserver stores it next to every DEK.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct KeyId(String);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyIdError {
    #[error("key id is empty")]
    Empty,
    #[error("key id is {0} bytes long; the limit is {MAX_KEY_ID_LEN}")]
    TooLong(usize),
    #[error("key id contains {0:?}; only a-z, 0-9, '-' and '.' are allowed")]
    BadChar(char),
}

impl KeyId {
    /// A new id: serial, creation day and 32 random bits (so that two key stores created
    /// independently never hand out the same id). Contains nothing derived from the key.
    pub fn generate(serial: u64, now: time::OffsetDateTime) -> Result<Self, getrandom::Error> {
        let mut rnd = [0u8; 4];
        getrandom::fill(&mut rnd)?;
        Ok(Self(format!(
            "kek-{serial:04}-{:04}{:02}{:02}-{}",
            now.year(),
            u8::from(now.month()),
            now.day(),
            hex(&rnd)
        )))
    }

    pub fn parse(s: &str) -> Result<Self, KeyIdError> {
        if s.is_empty() {
            return Err(KeyIdError::Empty);
        }
        if s.len() > MAX_KEY_ID_LEN {
            return Err(KeyIdError::TooLong(s.len()));
        }
        if let Some(c) = s
            .chars()
            .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-' || *c == '.'))
        {
            return Err(KeyIdError::BadChar(c));
        }
        Ok(Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for KeyId {
    type Error = KeyIdError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::parse(&s)
    }
}

impl From<KeyId> for String {
    fn from(k: KeyId) -> String {
        k.0
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({})", self.0)
    }
}

/// Lowercase hex of public bytes (ids, fingerprints). Never used on secrets.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_are_valid_and_distinct() {
        let now = time::OffsetDateTime::now_utc();
        let a = KeyId::generate(1, now).unwrap();
        let b = KeyId::generate(1, now).unwrap();
        assert_ne!(a, b);
        assert_eq!(KeyId::parse(a.as_str()).unwrap(), a);
        assert!(a.as_str().starts_with("kek-0001-"));
    }

    #[test]
    fn rejects_bad_ids() {
        assert_eq!(KeyId::parse(""), Err(KeyIdError::Empty));
        assert_eq!(
            KeyId::parse(&"a".repeat(1025)),
            Err(KeyIdError::TooLong(1025))
        );
        assert_eq!(KeyId::parse("Kek"), Err(KeyIdError::BadChar('K')));
        assert_eq!(KeyId::parse("a/b"), Err(KeyIdError::BadChar('/')));
        assert!(KeyId::parse(&"a".repeat(1024)).is_ok());
    }
}
