//! The sealed form of a KEK in the key store when the TPM seals it: the TPM's public and
//! private areas of the sealed-data object, and the PCR policy it was bound to.
//!
//! ```text
//! "ESTPM" | version 1 | has_pcr (u8) | pcr policy (5 bytes, if has_pcr)
//!         | public length (u16 BE) | TPMT_PUBLIC | private length (u16 BE) | TPM2B_PRIVATE buffer
//! ```
//! The private area is encrypted by the TPM under its storage key: it is useless elsewhere.

use super::pcr::PcrPolicy;

const MAGIC: &[u8] = b"ESTPM";
const VERSION: u8 = 1;

/// A parsed TPM-sealed blob (all public data).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TpmBlob {
    pub pcr: Option<PcrPolicy>,
    pub public: Vec<u8>,
    pub private: Vec<u8>,
}

impl TpmBlob {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 + self.public.len() + self.private.len());
        out.extend_from_slice(MAGIC);
        out.push(VERSION);
        match &self.pcr {
            Some(p) => {
                out.push(1);
                out.extend_from_slice(&p.encode());
            }
            None => out.push(0),
        }
        for part in [&self.public, &self.private] {
            // Both are TPM2B buffers: their sizes fit in u16 by definition.
            out.extend_from_slice(&u16::try_from(part.len()).unwrap_or(u16::MAX).to_be_bytes());
            out.extend_from_slice(part);
        }
        out
    }

    pub fn decode(b: &[u8]) -> Result<Self, String> {
        let rest = b
            .strip_prefix(MAGIC)
            .ok_or("not a TPM-sealed key (wrong magic)")?;
        let (&version, rest) = rest.split_first().ok_or("truncated")?;
        if version != VERSION {
            return Err(format!(
                "TPM blob version {version} is unknown to this plugin version"
            ));
        }
        let (&has_pcr, mut rest) = rest.split_first().ok_or("truncated")?;
        let pcr = match has_pcr {
            0 => None,
            1 => {
                let (p, r) = rest.split_first_chunk::<5>().ok_or("truncated")?;
                rest = r;
                Some(PcrPolicy::decode(*p).ok_or("invalid PCR policy")?)
            }
            _ => return Err("invalid PCR flag".into()),
        };
        let mut take = |what: &str| -> Result<Vec<u8>, String> {
            let (len, r) = rest
                .split_first_chunk::<2>()
                .ok_or(format!("truncated before {what}"))?;
            let len = usize::from(u16::from_be_bytes(*len));
            if r.len() < len {
                return Err(format!("truncated {what}"));
            }
            let (v, r) = r.split_at(len);
            rest = r;
            Ok(v.to_vec())
        };
        let public = take("public area")?;
        let private = take("private area")?;
        if !rest.is_empty() {
            return Err("trailing bytes".into());
        }
        Ok(Self {
            pcr,
            public,
            private,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_rejects_damage() {
        let b = TpmBlob {
            pcr: Some(PcrPolicy::parse("sha256:7").unwrap()),
            public: vec![1; 70],
            private: vec![2; 120],
        };
        let enc = b.encode();
        assert_eq!(TpmBlob::decode(&enc).unwrap(), b);
        for n in 0..enc.len() {
            assert!(
                TpmBlob::decode(&enc[..n]).is_err(),
                "truncation to {n} accepted"
            );
        }
        let mut extra = enc.clone();
        extra.push(0);
        assert!(TpmBlob::decode(&extra).is_err());
        let none = TpmBlob { pcr: None, ..b };
        assert_eq!(TpmBlob::decode(&none.encode()).unwrap(), none);
    }

    proptest::proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let _ = TpmBlob::decode(&bytes);
            let mut framed = b"ESTPM\x01".to_vec();
            framed.extend_from_slice(&bytes);
            let _ = TpmBlob::decode(&framed);
        }
    }
}
