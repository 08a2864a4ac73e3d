//! `objectType: cert` and `objectType: key` objects of the CSI-shaped config: a certificate
//! object delivers exactly the leaf certificate of a certificate-backed secret (PEM or
//! PKCS#12) as one PEM `CERTIFICATE` block, read from `/certificates`, also for a pinned
//! version; a key object delivers the key's public part as one PEM `PUBLIC KEY`
//! (SubjectPublicKeyInfo), read from `/keys`, for RSA and EC keys; unknown names fail the run
//! with a message naming the object. Every delivered DER is compared with openssl's.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "sidecar_support/mod.rs"]
mod support;

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use rsa::pkcs8::DecodePublicKey as _;
use rsa::traits::PublicKeyParts as _;
use serde_json::json;
use support::*;

fn write_config(h: &Harness, name: &str, yaml: &str) -> String {
    let p = h.work.path().join(name);
    fs::write(&p, yaml).unwrap();
    p.to_str().unwrap().to_owned()
}

/// `vaultUrl` and the `objects:` list (each object given as its YAML mapping lines).
fn config(h: &Harness, name: &str, objects: &[&str]) -> String {
    let mut yaml = format!("vaultUrl: \"{}\"\nobjects:\n", h.fake.vault_url());
    for o in objects {
        for (i, line) in o.trim().lines().enumerate() {
            let lead = if i == 0 { "  - " } else { "    " };
            yaml.push_str(&format!("{lead}{}\n", line.trim()));
        }
    }
    write_config(h, name, &yaml)
}

/// Runs `openssl ARGS` in `dir` and returns its standard output.
fn openssl_out(dir: &Path, args: &[&str]) -> Vec<u8> {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .expect("running openssl");
    assert!(
        out.status.success(),
        "openssl {args:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// A certificate chain made with openssl: an RSA leaf signed by its own test CA.
struct Chain {
    /// The leaf's private key (PKCS#8 PEM).
    key_pem: String,
    leaf_pem: String,
    ca_pem: String,
    /// `openssl x509 -outform der` of the leaf.
    leaf_der: Vec<u8>,
    /// `openssl pkey -pubout -outform der` of the leaf's key.
    leaf_spki: Vec<u8>,
    /// The leaf's key, certificate and CA as a base64 PKCS#12 with an empty password (the
    /// CA first in the bag, so the leaf is found by its key, not by its position).
    pfx_base64: String,
}

fn make_chain(h: &Harness, name: &str) -> Chain {
    let dir = h.work.path();
    let o = |args: &[&str]| openssl_out(dir, args);
    let (ca_key, ca) = make_cert(dir, &format!("{name}-ca"));
    let (ca_key, ca) = (ca_key.to_str().unwrap(), ca.to_str().unwrap());
    let key = format!("{name}.key.pem");
    let csr = format!("{name}.csr");
    let leaf = format!("{name}.crt.pem");
    o(&[
        "genpkey",
        "-algorithm",
        "RSA",
        "-pkeyopt",
        "rsa_keygen_bits:2048",
        "-out",
        &key,
    ]);
    o(&[
        "req",
        "-new",
        "-key",
        &key,
        "-out",
        &csr,
        "-subj",
        &format!("/CN={name} leaf"),
    ]);
    o(&[
        "x509",
        "-req",
        "-in",
        &csr,
        "-CA",
        ca,
        "-CAkey",
        ca_key,
        "-CAcreateserial",
        "-out",
        &leaf,
        "-days",
        "2",
    ]);
    let p12 = format!("{name}.p12");
    o(&[
        "pkcs12",
        "-export",
        "-inkey",
        &key,
        "-in",
        &leaf,
        "-certfile",
        ca,
        "-passout",
        "pass:",
        "-out",
        &p12,
    ]);
    let key_pem = fs::read_to_string(dir.join(&key)).unwrap();
    for (_, body) in pem_blocks(&key_pem) {
        h.watch(body);
    }
    let pfx_base64 = STANDARD.encode(fs::read(dir.join(&p12)).unwrap());
    h.watch(pfx_base64.clone());
    Chain {
        key_pem,
        leaf_pem: fs::read_to_string(dir.join(&leaf)).unwrap(),
        ca_pem: fs::read_to_string(ca).unwrap(),
        leaf_der: o(&["x509", "-in", &leaf, "-outform", "der"]),
        leaf_spki: o(&["pkey", "-in", &key, "-pubout", "-outform", "der"]),
        pfx_base64,
    }
}

/// The DER of the one PEM block with `label` a delivered file must consist of.
fn single_block(dir: &Path, file: &str, label: &str) -> Vec<u8> {
    let text = read(dir, file).unwrap_or_else(|| panic!("{file} was not delivered"));
    let blocks = pem_blocks(&text);
    assert_eq!(
        blocks.len(),
        1,
        "{file}: exactly one PEM block, got {:?}:\n{text}",
        blocks.iter().map(|(l, _)| l).collect::<Vec<_>>()
    );
    assert_eq!(blocks[0].0, label, "{file}: a {label} block");
    assert!(
        text.starts_with(&format!("-----BEGIN {label}-----\n"))
            && text.trim_end().ends_with(&format!("-----END {label}-----")),
        "{file}: nothing around the block:\n{text}"
    );
    assert!(text.lines().all(|l| l.len() <= 64), "{file}: 64-column PEM");
    STANDARD.decode(&blocks[0].1).unwrap()
}

/// Version-pinned and latest paths the fake saw for `collection` (`certificates`, `keys`).
fn paths_seen(h: &Harness, collection: &str) -> Vec<String> {
    let prefix = format!("/{collection}/");
    h.fake
        .stats()
        .requests
        .iter()
        .filter(|r| r.path.starts_with(&prefix) && r.status == 200)
        .map(|r| r.path.clone())
        .collect()
}

/// PEM- and PKCS#12-backed certificates: `objectType: cert` gives the leaf alone (no key,
/// no CA), read from `/certificates`; the same secret as `objectType: secret` still gives
/// the key and chain.
#[test]
fn cert_objects_deliver_exactly_the_leaf_certificate() {
    let h = Harness::new();
    let pem = make_chain(&h, "web-pem");
    h.set_typed(
        "web-pem",
        &format!("{}{}{}", pem.key_pem, pem.leaf_pem, pem.ca_pem),
        Some("application/x-pem-file"),
    );
    let pfx = make_chain(&h, "web-pfx");
    h.set_typed("web-pfx", &pfx.pfx_base64, Some("application/x-pkcs12"));
    let cfg = config(
        &h,
        "certs.yaml",
        &[
            "objectName: web-pem\nobjectType: cert\nobjectAlias: pem.crt",
            "objectName: web-pfx\nobjectType: cert\nobjectAlias: pfx.crt\nfilePermission: \"0440\"",
            "objectName: web-pfx\nobjectType: secret\nobjectAlias: pfx-bundle.pem",
        ],
    );
    h.cmd(Identity::Workload)
        .no_vault_url()
        .args(["--config", &cfg])
        .run_once()
        .assert_success();
    assert_layout(h.out(), &["pem.crt", "pfx-bundle.pem", "pfx.crt"]);

    assert_eq!(
        single_block(h.out(), "pem.crt", "CERTIFICATE"),
        pem.leaf_der,
        "the PEM's leaf, not its CA"
    );
    assert_eq!(
        single_block(h.out(), "pfx.crt", "CERTIFICATE"),
        pfx.leaf_der,
        "the PKCS#12's leaf, not its CA"
    );
    assert_eq!(mode(h.out(), "pem.crt"), 0o400);
    assert_eq!(mode(h.out(), "pfx.crt"), 0o440);
    // The secret object of the same certificate: key, leaf and CA.
    let bundle = pem_blocks(&read(h.out(), "pfx-bundle.pem").unwrap());
    let labels: Vec<&str> = bundle.iter().map(|(l, _)| l.as_str()).collect();
    assert_eq!(labels, ["PRIVATE KEY", "CERTIFICATE", "CERTIFICATE"]);

    // Certificates came from /certificates, the secret from /secrets.
    let st = h.fake.stats();
    assert_eq!(st.responses(Endpoint::VaultGetCertificate, 200), 2);
    assert_eq!(st.responses(Endpoint::VaultGet, 200), 1);
    let mut seen = paths_seen(&h, "certificates");
    seen.sort();
    assert_eq!(seen, ["/certificates/web-pem", "/certificates/web-pfx"]);
}

/// `objectVersion` on a certificate: the pinned file keeps the old certificate, the
/// unpinned one has the latest.
#[test]
fn cert_object_pinned_to_a_version() {
    let h = Harness::new();
    let old = make_chain(&h, "old");
    let v1 = h.set_typed("rotating", &old.pfx_base64, Some("application/x-pkcs12"));
    let new = make_chain(&h, "new");
    let v2 = h.set_typed(
        "rotating",
        &format!("{}{}", new.key_pem, new.leaf_pem),
        Some("application/x-pem-file"),
    );
    let cfg = config(
        &h,
        "pinned.yaml",
        &[
            &format!(
                "objectName: rotating\nobjectType: cert\nobjectVersion: \"{v1}\"\nobjectAlias: previous.crt"
            ),
            "objectName: rotating\nobjectType: cert\nobjectAlias: current.crt",
        ],
    );
    h.cmd(Identity::Workload)
        .no_vault_url()
        .args(["--config", &cfg])
        .run_once()
        .assert_success();
    assert_layout(h.out(), &["current.crt", "previous.crt"]);
    assert_eq!(
        single_block(h.out(), "previous.crt", "CERTIFICATE"),
        old.leaf_der,
        "the pinned version"
    );
    assert_eq!(
        single_block(h.out(), "current.crt", "CERTIFICATE"),
        new.leaf_der,
        "the latest version ({v2})"
    );
    let mut seen = paths_seen(&h, "certificates");
    seen.sort();
    assert_eq!(
        seen,
        [
            "/certificates/rotating".to_owned(),
            format!("/certificates/rotating/{v1}")
        ]
    );
}

fn b64url(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// A fresh key pair made with openssl (`genpkey ARGS`), and its public key as
/// `openssl pkey -pubout -outform der` prints it (SubjectPublicKeyInfo).
fn openssl_key(h: &Harness, name: &str, genpkey: &[&str]) -> Vec<u8> {
    let dir = h.work.path();
    let key = format!("{name}.key.pem");
    let mut args = vec!["genpkey"];
    args.extend_from_slice(genpkey);
    args.extend(["-out", key.as_str()]);
    openssl_out(dir, &args);
    for (_, body) in pem_blocks(&fs::read_to_string(dir.join(&key)).unwrap()) {
        h.watch(body);
    }
    openssl_out(dir, &["pkey", "-in", &key, "-pubout", "-outform", "der"])
}

/// The public JWK of an RSA SubjectPublicKeyInfo (via the `rsa` crate).
fn rsa_jwk(kty: &str, spki: &[u8]) -> serde_json::Value {
    let key = rsa::RsaPublicKey::from_public_key_der(spki).unwrap();
    json!({
        "kty": kty,
        "n": b64url(&key.n().to_bytes_be()),
        "e": b64url(&key.e().to_bytes_be()),
    })
}

/// The DER header of a P-256 SubjectPublicKeyInfo: SEQUENCE { SEQUENCE { id-ecPublicKey,
/// prime256v1 }, BIT STRING (66 bytes) }; the uncompressed point `04 || x || y` follows.
const P256_SPKI_PREFIX: &[u8] = &[
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];

/// The public JWK of a P-256 SubjectPublicKeyInfo.
fn p256_jwk(kty: &str, spki: &[u8]) -> serde_json::Value {
    let point = spki
        .strip_prefix(P256_SPKI_PREFIX)
        .expect("a P-256 SubjectPublicKeyInfo");
    assert_eq!(point.len(), 65);
    assert_eq!(point[0], 0x04, "uncompressed point");
    json!({
        "kty": kty,
        "crv": "P-256",
        "x": b64url(&point[1..33]),
        "y": b64url(&point[33..]),
    })
}

/// `objectType: key`: the public key as one PEM `PUBLIC KEY` block whose DER is exactly what
/// openssl gives for the original key, for RSA-2048 (`RSA` and `RSA-HSM`), EC P-256 (`EC`
/// and `EC-HSM`), a version-pinned key, and a certificate's key.
#[test]
fn key_objects_deliver_the_public_key() {
    let h = Harness::new();
    let rsa_spki = openssl_key(
        &h,
        "rsa",
        &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
    );
    h.fake.set_key("rsa-key", rsa_jwk("RSA", &rsa_spki));
    h.fake.set_key("rsa-hsm", rsa_jwk("RSA-HSM", &rsa_spki));
    let ec_opts = ["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"];
    let ec_old = openssl_key(&h, "ec-old", &ec_opts);
    let v1 = h.fake.set_key("ec-key", p256_jwk("EC", &ec_old));
    let ec_new = openssl_key(&h, "ec-new", &ec_opts);
    h.fake.set_key("ec-key", p256_jwk("EC-HSM", &ec_new));
    let chain = make_chain(&h, "tls");
    h.set_typed("tls", &chain.pfx_base64, Some("application/x-pkcs12"));

    let cfg = config(
        &h,
        "keys.yaml",
        &[
            "objectName: rsa-key\nobjectType: key\nobjectAlias: rsa.pub",
            "objectName: rsa-hsm\nobjectType: key",
            "objectName: ec-key\nobjectType: key\nobjectAlias: ec.pub\nfilePermission: \"0440\"",
            &format!(
                "objectName: ec-key\nobjectType: key\nobjectVersion: \"{v1}\"\nobjectAlias: ec-old.pub"
            ),
            "objectName: tls\nobjectType: key\nobjectAlias: tls.pub",
        ],
    );
    h.cmd(Identity::Workload)
        .no_vault_url()
        .args(["--config", &cfg])
        .run_once()
        .assert_success();
    assert_layout(
        h.out(),
        &["ec-old.pub", "ec.pub", "rsa-hsm", "rsa.pub", "tls.pub"],
    );
    assert_eq!(single_block(h.out(), "rsa.pub", "PUBLIC KEY"), rsa_spki);
    assert_eq!(single_block(h.out(), "rsa-hsm", "PUBLIC KEY"), rsa_spki);
    assert_eq!(single_block(h.out(), "ec.pub", "PUBLIC KEY"), ec_new);
    assert_eq!(
        single_block(h.out(), "ec-old.pub", "PUBLIC KEY"),
        ec_old,
        "the pinned version"
    );
    assert_eq!(
        single_block(h.out(), "tls.pub", "PUBLIC KEY"),
        chain.leaf_spki,
        "the certificate's key"
    );
    assert_eq!(mode(h.out(), "rsa.pub"), 0o400);
    assert_eq!(mode(h.out(), "ec.pub"), 0o440);
    // openssl reads what was delivered as the same key.
    let ec_path = h.out().join("ec.pub");
    assert_eq!(
        openssl_out(
            h.work.path(),
            &[
                "pkey",
                "-pubin",
                "-in",
                ec_path.to_str().unwrap(),
                "-outform",
                "der"
            ]
        ),
        ec_new
    );

    let st = h.fake.stats();
    assert_eq!(st.responses(Endpoint::VaultGetKey, 200), 5);
    assert!(
        paths_seen(&h, "keys").contains(&format!("/keys/ec-key/{v1}")),
        "{:?}",
        paths_seen(&h, "keys")
    );
    assert_eq!(st.vault_get_requests(), 0, "no secret was read");
}

/// A run that must fail on `object`: the final error names it and says it was not found,
/// and nothing is delivered.
fn assert_not_found(h: &Harness, cfg: &str, object: &str) {
    let done = h
        .cmd(Identity::Workload)
        .no_vault_url()
        .args(["--config", cfg])
        .run_once();
    let err = done.assert_failure();
    assert!(
        err.contains(object) && err.to_ascii_lowercase().contains("not found"),
        "the error names {object} and says it was not found: {err}"
    );
    assert_empty(h.out());
}

/// Unknown certificates fail `--once` with a message naming the object; so does a plain
/// secret asked for as a certificate (it backs none).
#[test]
fn unknown_certificate_fails_the_run() {
    let h = Harness::new();
    h.set("present", &h.value("present"));
    let cfg = config(
        &h,
        "missing-cert.yaml",
        &[
            "objectName: present",
            "objectName: no-such-cert\nobjectType: cert",
        ],
    );
    assert_not_found(&h, &cfg, "no-such-cert");
    assert!(h.fake.stats().responses(Endpoint::VaultGetCertificate, 404) >= 1);

    let cfg = config(
        &h,
        "secret-as-cert.yaml",
        &["objectName: present\nobjectType: cert"],
    );
    assert_not_found(&h, &cfg, "present");
}

/// Unknown keys (and unknown versions of a known key) fail `--once` with a message naming
/// the object.
#[test]
fn unknown_key_fails_the_run() {
    let h = Harness::new();
    let spki = openssl_key(
        &h,
        "known",
        &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"],
    );
    h.fake.set_key("known-key", p256_jwk("EC", &spki));
    let cfg = config(
        &h,
        "missing-key.yaml",
        &[
            "objectName: known-key\nobjectType: key",
            "objectName: no-such-key\nobjectType: key",
        ],
    );
    assert_not_found(&h, &cfg, "no-such-key");
    assert!(h.fake.stats().responses(Endpoint::VaultGetKey, 404) >= 1);

    let cfg = config(
        &h,
        "missing-key-version.yaml",
        &[
            "objectName: known-key\nobjectType: key\nobjectVersion: \"0123456789abcdef0123456789abcdef\"",
        ],
    );
    assert_not_found(&h, &cfg, "known-key");
}
