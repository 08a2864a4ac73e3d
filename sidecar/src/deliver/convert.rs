//! Turns a Key Vault value into the bytes of the file(s) to write: `objectEncoding`
//! decoding, and PKCS#12 certificates to PEM.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;

use crate::secret::SecretBytes;

/// How the stored value is encoded (`objectEncoding`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Encoding {
    #[default]
    Utf8,
    Base64,
    Hex,
}

/// How a certificate-backed secret is written (`objectFormat`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CertFormat {
    /// PEM: the private key (PKCS#8) followed by the certificate chain.
    #[default]
    Pem,
    /// The PKCS#12 bytes as stored (decoded from base64).
    Pfx,
}

#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error("value is not valid {0}: {1}")]
    Decode(&'static str, String),
    #[error("PKCS#12 certificate could not be read: {0}")]
    Pkcs12(String),
    #[error("PKCS#12 certificate holds no private key with a certificate chain")]
    NoKeyChain,
}

pub fn decode(value: &SecretBytes, encoding: Encoding) -> Result<SecretBytes, ConvertError> {
    match encoding {
        Encoding::Utf8 => Ok(value.duplicate()),
        Encoding::Base64 => {
            let trimmed: Vec<u8> = value
                .expose()
                .iter()
                .copied()
                .filter(|b| !b.is_ascii_whitespace())
                .collect();
            let trimmed = SecretBytes::new(trimmed);
            STANDARD
                .decode(trimmed.expose())
                .map(SecretBytes::new)
                .map_err(|e| ConvertError::Decode("base64", e.to_string()))
        }
        Encoding::Hex => {
            let s = value.expose();
            let s: Vec<u8> = s
                .iter()
                .copied()
                .filter(|b| !b.is_ascii_whitespace())
                .collect();
            let s = SecretBytes::new(s);
            let h = s.expose();
            if !h.len().is_multiple_of(2) {
                return Err(ConvertError::Decode("hex", "odd number of digits".into()));
            }
            let mut out = Vec::with_capacity(h.len() / 2);
            for pair in h.chunks(2) {
                let hi = hex_digit(pair[0]);
                let lo = hex_digit(pair[1]);
                match (hi, lo) {
                    (Some(hi), Some(lo)) => out.push(hi << 4 | lo),
                    _ => return Err(ConvertError::Decode("hex", "non-hex character".into())),
                }
            }
            Ok(SecretBytes::new(out))
        }
    }
}

fn hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// The parts of a certificate-backed secret in PEM.
pub struct PemParts {
    pub key: SecretBytes,
    /// Leaf first, then the rest of the chain.
    pub chain: Vec<u8>,
}

impl PemParts {
    /// Key then chain, in one file (the CSI driver's default layout).
    pub fn combined(&self) -> SecretBytes {
        let mut v = Vec::with_capacity(self.key.len() + self.chain.len());
        v.extend_from_slice(self.key.expose());
        v.extend_from_slice(&self.chain);
        SecretBytes::new(v)
    }
}

/// Key Vault returns the PFX of a certificate base64-encoded, with an empty password.
pub fn pkcs12_to_pem(base64_pfx: &SecretBytes) -> Result<PemParts, ConvertError> {
    let pfx = decode(base64_pfx, Encoding::Base64)?;
    let store = p12_keystore::KeyStore::from_pkcs12(
        pfx.expose(),
        "",
        p12_keystore::Pkcs12ImportPolicy::Relaxed,
    )
    .map_err(|e| ConvertError::Pkcs12(e.to_string()))?;
    let (_, chain) = store.private_key_chain().ok_or(ConvertError::NoKeyChain)?;
    let key = SecretBytes::new(pem_block("PRIVATE KEY", chain.key().as_der()));
    let mut certs = Vec::new();
    for c in chain.certs() {
        certs.extend_from_slice(&pem_block("CERTIFICATE", c.as_der()));
    }
    Ok(PemParts { key, chain: certs })
}

/// One PEM block, 64 characters a line.
pub fn pem_block(label: &str, der: &[u8]) -> Vec<u8> {
    let b64 = zeroize::Zeroizing::new(STANDARD.encode(der));
    let mut out = Vec::with_capacity(b64.len() + b64.len() / 64 + 64);
    out.extend_from_slice(format!("-----BEGIN {label}-----\n").as_bytes());
    for line in b64.as_bytes().chunks(64) {
        out.extend_from_slice(line);
        out.push(b'\n');
    }
    out.extend_from_slice(format!("-----END {label}-----\n").as_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &str) -> SecretBytes {
        SecretBytes::new(v.as_bytes().to_vec())
    }

    #[test]
    fn decodes() {
        assert_eq!(
            decode(&s("aGVsbG8="), Encoding::Base64).unwrap().expose(),
            b"hello"
        );
        assert_eq!(
            decode(&s("aGVs\nbG8=\n"), Encoding::Base64)
                .unwrap()
                .expose(),
            b"hello"
        );
        assert_eq!(
            decode(&s("68656C6c6f"), Encoding::Hex).unwrap().expose(),
            b"hello"
        );
        assert!(decode(&s("6"), Encoding::Hex).is_err());
        assert!(decode(&s("zz"), Encoding::Hex).is_err());
        assert!(decode(&s("!!"), Encoding::Base64).is_err());
        assert_eq!(
            decode(&s("plain"), Encoding::Utf8).unwrap().expose(),
            b"plain"
        );
    }

    #[test]
    fn pem_lines() {
        let p = String::from_utf8(pem_block("CERTIFICATE", &[0u8; 100])).unwrap();
        assert!(p.starts_with("-----BEGIN CERTIFICATE-----\n"));
        assert!(p.lines().all(|l| l.len() <= 64));
        assert!(pkcs12_to_pem(&s("bm90IGEgcGZ4")).is_err());
    }
}
