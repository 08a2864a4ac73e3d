//! Fuzz target bodies, one function per target of `tests/fuzz` (a separate workspace built
//! with libFuzzer). They live here, not in the fuzz workspace, so that the replay test
//! (`tests/fuzz_replay_sidecar.rs`) runs every committed corpus and regression input
//! through exactly the code the fuzzer runs, including the parsers that are private to the
//! crate. Each takes arbitrary bytes, must never panic, and asserts the invariants of what
//! it parsed: a failed assertion is a finding.
//!
//! Not part of the sidecar's API: nothing outside the fuzz harness and the replay test
//! calls these.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use der::{Decode, Encode};

use crate::config::raw::RawConfig;
use crate::config::{Config, Overrides};
use crate::deliver::convert::{self, Encoding};
use crate::deliver::writer::is_plain_name;
use crate::identity::{error_text, expires_in, parse_token};
use crate::keyvault::challenge;
use crate::keyvault::client::{parse_certificate, parse_key, parse_secret};
use crate::keyvault::error::describe;
use crate::secret::SecretBytes;

/// A target body: takes any bytes, panics only on a finding.
pub type Target = fn(&[u8]);

/// Every target: its name (the `[[bin]]` in `tests/fuzz/Cargo.toml` and the folder under
/// `tests/fuzz/corpus/` and `tests/fuzz/regressions/`) and its body.
pub const TARGETS: &[(&str, Target)] = &[
    ("sidecar_config", sidecar_config),
    ("challenge", challenge),
    ("kv_json", kv_json),
    ("token_json", token_json),
    ("secret_value", secret_value),
];

/// The vault host a `challenge` input is checked against when it names none.
pub const DEFAULT_VAULT_HOST: &str = "myvault.vault.azure.net";

/// `sidecar_config`: the config file (CSI-shaped YAML, parsed as `Config::load` does) and
/// its validation. What validates is safe to act on: an https vault, an absolute output
/// directory, plain and distinct file names, modes nobody else can write.
pub fn sidecar_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(raw) = serde_yaml_ng::from_str::<RawConfig>(text) else {
        return;
    };
    let Ok(cfg) = Config::resolve(raw, Overrides::default()) else {
        return;
    };
    assert_eq!(cfg.vault_url.scheme(), "https");
    assert!(cfg.vault_url.host_str().is_some_and(|h| !h.is_empty()));
    assert!(cfg.output_dir.is_absolute());
    assert!(!cfg.objects.is_empty());
    assert!(cfg.refresh_interval >= Duration::from_secs(1));
    assert!(cfg.request_timeout >= Duration::from_millis(100));
    assert_eq!(
        cfg.notify.signal.is_some(),
        cfg.notify.process_name.is_some()
    );
    assert!(cfg.notify.command.as_ref().is_none_or(|c| !c.is_empty()));
    let mut files = HashSet::new();
    for o in &cfg.objects {
        assert!((1..=127).contains(&o.name.len()));
        assert!(
            o.name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-')
        );
        assert!(
            o.version
                .as_ref()
                .is_none_or(|v| v.len() == 32 && v.chars().all(|c| c.is_ascii_hexdigit()))
        );
        assert!(o.mode <= 0o777 && o.mode & 0o002 == 0, "mode {:o}", o.mode);
        for f in o.file_names(cfg.split_cert_key) {
            assert!(
                is_plain_name(&f) && f != "." && f != "..",
                "file name {f:?} is not plain"
            );
            assert!(files.insert(f), "two objects write one file");
        }
    }
}

/// `challenge`: the `WWW-Authenticate` parser and the Bearer challenge check. An input
/// `HOST\nHEADER` names the vault host; without a newline the whole input is the header.
pub fn challenge(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (host, header) = text.split_once('\n').unwrap_or((DEFAULT_VAULT_HOST, text));
    for c in challenge::parse(header) {
        assert!(!c.scheme.is_empty());
        assert!(!c.scheme.contains([' ', '=', ',']), "scheme {:?}", c.scheme);
        for (name, _) in &c.params {
            assert!(!name.is_empty() && !name.contains([' ', '=', ',']));
        }
    }
    if let Ok(b) = challenge::bearer(header, host, true) {
        // The token never goes to a resource outside the vault's own domain.
        let suffix = format!(".{}", b.resource_host.to_ascii_lowercase());
        assert!(
            host.to_ascii_lowercase().ends_with(&suffix),
            "{host} vs {suffix}"
        );
        assert!(!b.scope.is_empty());
        assert!(b.tenant.as_ref().is_none_or(|t| !t.is_empty()));
    }
    let _ = challenge::bearer(header, host, false);
}

/// `kv_json`: Key Vault's secret, certificate and key bundles and its error bodies. A
/// public key becomes well-formed SPKI PEM; an error becomes one line of text.
pub fn kv_json(data: &[u8]) {
    if let Ok(s) = parse_secret("fuzz", data) {
        assert!(!s.version.contains('/'));
    }
    if let Ok((_, version)) = parse_certificate("fuzz", data) {
        assert!(!version.contains('/'));
    }
    if let Ok((pem, version)) = parse_key("fuzz", data) {
        assert!(!version.contains('/'));
        check_spki_pem(&pem);
    }
    for status in [403, 500] {
        let (_, message) = describe(status, data);
        assert!(!message.contains(['\n', '\r']), "{message:?}");
    }
}

fn check_spki_pem(pem: &[u8]) {
    let Ok(text) = std::str::from_utf8(pem) else {
        unreachable!("PEM is not text")
    };
    let body = text
        .strip_prefix("-----BEGIN PUBLIC KEY-----\n")
        .and_then(|t| t.strip_suffix("-----END PUBLIC KEY-----\n"));
    let Some(body) = body else {
        unreachable!("not a PUBLIC KEY PEM block: {text:?}")
    };
    assert!(body.lines().all(|l| l.len() <= 64));
    let b64: String = body.lines().collect();
    let Ok(der) = STANDARD.decode(b64) else {
        unreachable!("PEM body is not base64")
    };
    let spki = match spki::SubjectPublicKeyInfoOwned::from_der(&der) {
        Ok(s) => s,
        Err(e) => unreachable!("not DER SubjectPublicKeyInfo: {e}"),
    };
    let alg = spki.algorithm.oid.to_string();
    assert!(
        alg == "1.2.840.113549.1.1.1" || alg == "1.2.840.10045.2.1",
        "{alg}"
    );
    assert_eq!(
        spki.to_der().ok(),
        Some(der),
        "DER does not re-encode the same"
    );
}

/// `token_json`: the token responses of Entra ID, IMDS and Arc HIMDS (one parser, both
/// forms of `expires_in`), and their error bodies. A token has a value and an expiry in
/// the future; an error becomes one line of text.
pub fn token_json(data: &[u8]) {
    let before = Instant::now();
    if let Ok(t) = parse_token("fuzz", data) {
        assert!(!t.token.expose().is_empty());
        assert!(t.expires_at >= before);
    }
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(data)
        && let Some(field) = v.get("expires_in")
        && let Some(secs) = expires_in(field)
    {
        // Both forms mean the same number of seconds.
        assert_eq!(
            expires_in(&serde_json::Value::String(secs.to_string())),
            Some(secs)
        );
    }
    let text = error_text(data);
    assert!(!text.contains(['\n', '\r']), "{text:?}");
}

/// `secret_value`: what is done to a secret's value before it is written: the
/// `objectEncoding` decoders, and PKCS#12 (a certificate-backed secret, which Key Vault
/// returns base64-encoded) to PEM. The input is the PKCS#12 itself: the harness
/// base64-encodes it, so the fuzzer mutates DER rather than base64 text.
pub fn secret_value(data: &[u8]) {
    let value = SecretBytes::new(data.to_vec());
    let significant = data.iter().filter(|b| !b.is_ascii_whitespace()).count();
    if let Ok(bytes) = convert::decode(&value, Encoding::Hex) {
        assert_eq!(bytes.len() * 2, significant);
    }
    if let Ok(bytes) = convert::decode(&value, Encoding::Base64) {
        assert!(bytes.len() <= significant / 4 * 3);
    }
    let pfx = SecretBytes::new(STANDARD.encode(data).into_bytes());
    if let Ok(parts) = convert::pkcs12_to_pem(&pfx) {
        assert!(
            parts
                .key
                .expose()
                .starts_with(b"-----BEGIN PRIVATE KEY-----\n")
        );
        assert!(parts.chain.starts_with(b"-----BEGIN CERTIFICATE-----\n"));
    }
}
