//! `--pcr-policy`: which PCRs a sealed KEK is bound to, e.g. `sha256:7` or `sha256:0,2,4,7`.
//! Pure parsing; no TPM types, so it is usable (and testable) without the `tpm` feature.

use std::fmt;

/// The PCR bank (hash algorithm) of a policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PcrBank {
    Sha1,
    Sha256,
    Sha384,
}

impl PcrBank {
    fn code(self) -> u8 {
        match self {
            PcrBank::Sha1 => 1,
            PcrBank::Sha256 => 2,
            PcrBank::Sha384 => 3,
        }
    }

    fn from_code(c: u8) -> Option<Self> {
        match c {
            1 => Some(PcrBank::Sha1),
            2 => Some(PcrBank::Sha256),
            3 => Some(PcrBank::Sha384),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            PcrBank::Sha1 => "sha1",
            PcrBank::Sha256 => "sha256",
            PcrBank::Sha384 => "sha384",
        }
    }
}

/// A set of PCRs (0..=23) in one bank.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PcrPolicy {
    pub bank: PcrBank,
    /// Bit n set = PCR n selected.
    pub mask: u32,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("PCR policy {input:?}: {problem} (expected e.g. \"sha256:7\" or \"sha256:0,2,4,7\")")]
pub struct PcrPolicyError {
    input: String,
    problem: String,
}

impl PcrPolicy {
    pub fn parse(s: &str) -> Result<Self, PcrPolicyError> {
        let err = |problem: &str| PcrPolicyError {
            input: s.to_owned(),
            problem: problem.to_owned(),
        };
        let (bank, list) = s
            .split_once(':')
            .ok_or_else(|| err("missing \"bank:\" prefix"))?;
        let bank = match bank.trim().to_ascii_lowercase().as_str() {
            "sha1" => PcrBank::Sha1,
            "sha256" => PcrBank::Sha256,
            "sha384" => PcrBank::Sha384,
            _ => return Err(err("unknown bank; use sha1, sha256 or sha384")),
        };
        let mut mask = 0u32;
        for item in list.split(',') {
            let n: u32 = item
                .trim()
                .parse()
                .map_err(|_| err("PCR numbers must be integers"))?;
            if n > 23 {
                return Err(err("PCR numbers go from 0 to 23"));
            }
            mask |= 1 << n;
        }
        Ok(Self { bank, mask })
    }

    pub fn pcrs(&self) -> impl Iterator<Item = u32> + '_ {
        (0..24).filter(|n| self.mask & (1 << n) != 0)
    }

    /// Two bytes of bank code and mask, as kept in the sealed blob.
    pub fn encode(&self) -> [u8; 5] {
        let m = self.mask.to_be_bytes();
        [self.bank.code(), m[0], m[1], m[2], m[3]]
    }

    pub fn decode(b: [u8; 5]) -> Option<Self> {
        let bank = PcrBank::from_code(b[0])?;
        let mask = u32::from_be_bytes([b[1], b[2], b[3], b[4]]);
        (mask != 0 && mask < (1 << 24)).then_some(Self { bank, mask })
    }
}

impl fmt::Display for PcrPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list: Vec<String> = self.pcrs().map(|n| n.to_string()).collect();
        write!(f, "{}:{}", self.bank.name(), list.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_round_trips() {
        let p = PcrPolicy::parse("sha256:0,2, 7").unwrap();
        assert_eq!(p.bank, PcrBank::Sha256);
        assert_eq!(p.mask, 0b1000_0101);
        assert_eq!(p.to_string(), "sha256:0,2,7");
        assert_eq!(PcrPolicy::decode(p.encode()), Some(p));
        assert!(PcrPolicy::parse("7").is_err());
        assert!(PcrPolicy::parse("md5:7").is_err());
        assert!(PcrPolicy::parse("sha256:24").is_err());
        assert!(PcrPolicy::parse("sha256:x").is_err());
        assert_eq!(PcrPolicy::decode([9, 0, 0, 0, 1]), None);
    }
}
