//! Looks through the logs of the processes under test for what must never be there: a
//! secret value set in the vault, a DEK seed sent to the plugin (hex, base64 or a Rust
//! byte list), a JWT (access tokens and the service-account assertion all start `eyJ`).
//!
//! The logs can be hundreds of MB (the plugin logs every request), so nothing is searched
//! needle by needle: runs of hex or base64 characters are cut into windows of the encoded
//! length and looked up in hash sets.

use std::collections::HashSet;
use std::io::BufRead as _;
use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD_NO_PAD;

use crate::kms::seed_hash;

/// What to look for.
pub struct Needles {
    /// The random 16-hex-digit part of every secret value ever set.
    pub value_markers: HashSet<String>,
    /// [`seed_hash`] of every DEK seed ever sent.
    pub seeds: HashSet<u64>,
}

/// Lines scanned and what was found (at most a few examples per file).
#[derive(Default)]
pub struct Scan {
    pub lines: u64,
    pub bytes: u64,
    pub findings: u64,
    pub examples: Vec<String>,
}

pub fn scan(path: &Path, needles: &Needles, out: &mut Scan) -> anyhow::Result<()> {
    let Ok(f) = std::fs::File::open(path) else {
        return Ok(()); // never written: nothing logged
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut r = std::io::BufReader::with_capacity(1 << 20, f);
    let mut buf = Vec::new();
    let mut line_no = 0u64;
    loop {
        buf.clear();
        if r.read_until(b'\n', &mut buf)? == 0 {
            break;
        }
        line_no += 1;
        out.lines += 1;
        out.bytes += buf.len() as u64;
        if let Some(what) = find(&buf, needles) {
            out.findings += 1;
            if out.examples.len() < 5 {
                out.examples.push(format!("{name}:{line_no}: {what}"));
            }
        }
    }
    Ok(())
}

/// The first forbidden thing in one line (described without repeating it).
fn find(line: &[u8], n: &Needles) -> Option<&'static str> {
    if line.windows(3).any(|w| w == b"eyJ") {
        return Some("a JWT (`eyJ...`)");
    }
    for run in runs(line, |b| b.is_ascii_hexdigit()) {
        if run.len() >= 16
            && run
                .windows(16)
                .any(|w| std::str::from_utf8(w).is_ok_and(|s| n.value_markers.contains(s)))
        {
            return Some("a secret value set in the vault");
        }
        if run.len() >= 64
            && run
                .windows(64)
                .any(|w| hex32(w).is_some_and(|s| n.seeds.contains(&seed_hash(&s))))
        {
            return Some("a DEK seed, hex-encoded");
        }
    }
    let b64 = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'-' | b'_');
    for run in runs(line, b64) {
        if run.len() >= 43
            && run
                .windows(43)
                .any(|w| b64_32(w).is_some_and(|s| n.seeds.contains(&seed_hash(&s))))
        {
            return Some("a DEK seed, base64-encoded");
        }
    }
    if byte_lists(line).any(|s| n.seeds.contains(&seed_hash(&s))) {
        return Some("a DEK seed as a byte list");
    }
    None
}

/// Maximal runs of bytes for which `keep` holds.
fn runs(line: &[u8], keep: impl Fn(u8) -> bool + Copy) -> impl Iterator<Item = &[u8]> {
    line.split(move |b| !keep(*b)).filter(|r| !r.is_empty())
}

fn hex32(w: &[u8]) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    for (o, pair) in out.iter_mut().zip(w.chunks_exact(2)) {
        let hi = char::from(pair[0]).to_digit(16)?;
        let lo = char::from(pair[1]).to_digit(16)?;
        *o = u8::try_from(hi * 16 + lo).ok()?;
    }
    Some(out)
}

/// 43 characters of standard or URL-safe base64 (no padding) that encode exactly 32 bytes.
fn b64_32(w: &[u8]) -> Option<[u8; 32]> {
    let mut norm = [0u8; 43];
    for (o, &b) in norm.iter_mut().zip(w) {
        *o = match b {
            b'-' => b'+',
            b'_' => b'/',
            b => b,
        };
    }
    let mut out = [0u8; 33];
    match STANDARD_NO_PAD.decode_slice(norm, &mut out) {
        Ok(32) => {
            let mut s = [0u8; 32];
            s.copy_from_slice(&out[..32]);
            Some(s)
        }
        _ => None,
    }
}

/// `[1, 2, ...]` lists of exactly 32 numbers below 256 (how `Debug` prints a `Vec<u8>`).
fn byte_lists(line: &[u8]) -> impl Iterator<Item = [u8; 32]> + '_ {
    line.split(|b| *b == b'[').skip(1).filter_map(|rest| {
        let end = rest.iter().position(|b| *b == b']')?;
        let inner = std::str::from_utf8(&rest[..end]).ok()?;
        let nums: Vec<u8> = inner
            .split(',')
            .map(|x| x.trim().parse::<u8>().ok())
            .collect::<Option<_>>()?;
        <[u8; 32]>::try_from(nums).ok()
    })
}

#[cfg(test)]
mod tests {
    use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};

    use super::*;

    fn needles(seed: &[u8; 32]) -> Needles {
        Needles {
            value_markers: ["0123456789abcdef".to_owned()].into(),
            seeds: [seed_hash(seed)].into(),
        }
    }

    #[test]
    fn finds_every_encoding() {
        let seed: [u8; 32] = std::array::from_fn(|i| u8::try_from(i * 7 + 3).unwrap());
        let n = needles(&seed);
        let hex: String = seed.iter().map(|b| format!("{b:02x}")).collect();
        let cases = [
            format!("plaintext={hex} done"),
            format!("x {} y", hex.to_uppercase()),
            format!("prefix{hex}suffix"),
            format!("\"{}\"", STANDARD.encode(seed)),
            format!("b64={}", URL_SAFE_NO_PAD.encode(seed)),
            format!("seed: {seed:?}"),
            "value sv001-g2-0123456789abcdef here".to_owned(),
            "token eyJhbGciOi".to_owned(),
        ];
        for c in &cases {
            assert!(find(c.as_bytes(), &n).is_some(), "missed: {c}");
        }
        let clean = [
            "key_id=k-0003-20261128T040404Z-9f8e7d6c uid=soak-1-42 encrypted a DEK seed",
            "published a new set of secrets versions=soak-secret-001@0123abcd",
            "[1, 2, 3]",
        ];
        for c in clean {
            assert!(find(c.as_bytes(), &n).is_none(), "false positive: {c}");
        }
    }
}
