//! Key Vault certificates: `GET /certificates/{name}[/{version}]`.
//!
//! In Key Vault a certificate is three objects sharing one name and version: the
//! certificate, its key (`/keys/{name}/{version}`) and its backing secret
//! (`/secrets/{name}/{version}`, PFX or PEM with the private key, `managed: true`). The fake
//! stores only the secret: every secret version stored through the fake's own API with
//! content type `application/x-pem-file` or `application/x-pkcs12` backs a certificate, and
//! the certificate (and its key, see [`crate::keys`]) is derived from the secret's value:
//! the first `CERTIFICATE` block of the PEM, or the PKCS#12's leaf certificate (empty
//! password, as Key Vault exports them).

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use hyper::Response;
use p12_keystore::{KeyStore, KeyStoreEntry, Pkcs12ImportPolicy};
use serde_json::{Map, Value, json};
use sha1::{Digest as _, Sha1};
use x509_parser::extensions::GeneralName;
use x509_parser::public_key::PublicKey;
use x509_parser::x509::SubjectPublicKeyInfo;

use crate::http::{Body, json_response};
use crate::state::{Secret, SecretVersion, Shared};
use crate::vault::{self, Collection};

/// Average length of a month in seconds (for the policy's `validity_months`).
const MONTH_SECS: i64 = 2_629_746;

/// A certificate-backed secret's certificate, parsed.
pub(crate) struct Cert {
    /// The leaf certificate, DER.
    pub der: Vec<u8>,
    /// `notBefore` and `notAfter`, seconds since the Unix epoch.
    pub nbf: i64,
    pub exp: i64,
    pub subject: String,
    pub dns_names: Vec<String>,
    /// The public key as a JWK (`kty` and `n`/`e` or `crv`/`x`/`y`; no `kid`, no `key_ops`).
    pub jwk: Map<String, Value>,
    /// The policy's `key_props` (without `exportable` and `reuse_key`).
    pub key_props: Map<String, Value>,
}

/// The version of `secret` that backs the certificate version asked for: the latest
/// certificate-backed one, or the one named (case-insensitively).
pub(crate) fn find_version<'a>(
    secret: &'a Secret,
    version: Option<&str>,
) -> Option<&'a SecretVersion> {
    let mut backing = secret.versions.iter().filter(|v| v.managed);
    match version {
        None => backing.next_back(),
        Some(want) => backing.find(|v| v.version.eq_ignore_ascii_case(want)),
    }
}

/// The certificate a certificate-backed secret version holds; `Err` says why there is none.
pub(crate) fn certificate(v: &SecretVersion) -> Result<Cert, String> {
    let pem = v
        .content_type
        .as_deref()
        .is_some_and(|c| c.trim().eq_ignore_ascii_case("application/x-pem-file"));
    let der = if pem {
        first_pem_certificate(&v.value).ok_or("the PEM holds no CERTIFICATE block")?
    } else {
        pkcs12_leaf(&v.value)?
    };
    let parsed = {
        let (rest, x) = x509_parser::parse_x509_certificate(&der)
            .map_err(|e| format!("the certificate does not parse: {e}"))?;
        if !rest.is_empty() {
            return Err("trailing bytes after the certificate".into());
        }
        let (jwk, key_props) = public_key_jwk(x.public_key())?;
        let dns_names = match x.subject_alternative_name() {
            Ok(Some(san)) => san
                .value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::DNSName(d) => Some((*d).to_owned()),
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        };
        Cert {
            der: Vec::new(),
            nbf: x.validity().not_before.timestamp(),
            exp: x.validity().not_after.timestamp(),
            subject: x.subject().to_string(),
            dns_names,
            jwk,
            key_props,
        }
    };
    Ok(Cert { der, ..parsed })
}

/// The body of the first `-----BEGIN CERTIFICATE-----` block, decoded.
fn first_pem_certificate(pem: &str) -> Option<Vec<u8>> {
    let mut body: Option<String> = None;
    for line in pem.lines() {
        let line = line.trim();
        if line == "-----BEGIN CERTIFICATE-----" {
            body = Some(String::new());
        } else if line == "-----END CERTIFICATE-----" {
            if let Some(b) = body.take() {
                return STANDARD.decode(b).ok();
            }
        } else if let Some(b) = body.as_mut() {
            b.push_str(line);
        }
    }
    None
}

/// The leaf certificate of a base64 PKCS#12 with an empty password: the one that goes with
/// the private key, or else the first certificate in it.
fn pkcs12_leaf(base64_pfx: &str) -> Result<Vec<u8>, String> {
    let compact: String = base64_pfx.chars().filter(|c| !c.is_whitespace()).collect();
    let pfx = STANDARD
        .decode(compact)
        .map_err(|e| format!("the PKCS#12 value is not base64: {e}"))?;
    let store = KeyStore::from_pkcs12(&pfx, "", Pkcs12ImportPolicy::Relaxed)
        .map_err(|e| format!("not a PKCS#12 with an empty password: {e}"))?;
    if let Some(leaf) = store
        .private_key_chain()
        .and_then(|(_, chain)| chain.certs().first())
    {
        return Ok(leaf.as_der().to_vec());
    }
    store
        .entries()
        .find_map(|(_, e)| match e {
            KeyStoreEntry::Certificate(c) => Some(c.as_der().to_vec()),
            _ => None,
        })
        .ok_or_else(|| "the PKCS#12 holds no certificate".to_owned())
}

fn without_leading_zeros(b: &[u8]) -> &[u8] {
    let start = b
        .iter()
        .position(|&x| x != 0)
        .unwrap_or(b.len().saturating_sub(1));
    &b[start..]
}

/// A public JWK, and the certificate policy's `key_props` for the same key.
type JwkAndKeyProps = (Map<String, Value>, Map<String, Value>);

/// A SubjectPublicKeyInfo as a public JWK, and the policy's `key_props`.
fn public_key_jwk(spki: &SubjectPublicKeyInfo<'_>) -> Result<JwkAndKeyProps, String> {
    let mut jwk = Map::new();
    let mut props = Map::new();
    match spki.parsed() {
        Ok(PublicKey::RSA(rsa)) => {
            let n = without_leading_zeros(rsa.modulus);
            let e = without_leading_zeros(rsa.exponent);
            let bits = n.len() * 8 - n.first().map_or(0, |b| b.leading_zeros() as usize);
            jwk.insert("kty".into(), Value::from("RSA"));
            jwk.insert("n".into(), Value::from(URL_SAFE_NO_PAD.encode(n)));
            jwk.insert("e".into(), Value::from(URL_SAFE_NO_PAD.encode(e)));
            props.insert("kty".into(), Value::from("RSA"));
            props.insert("key_size".into(), Value::from(bits));
        }
        Ok(PublicKey::EC(point)) => {
            let oid = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok())
                .map(|o| o.to_id_string())
                .unwrap_or_default();
            let crv = match oid.as_str() {
                "1.2.840.10045.3.1.7" => "P-256",
                "1.3.132.0.34" => "P-384",
                "1.3.132.0.35" => "P-521",
                "1.3.132.0.10" => "P-256K",
                other => return Err(format!("unsupported elliptic curve {other:?}")),
            };
            let data = point.data();
            let Some((&4, xy)) = data.split_first().filter(|(_, xy)| xy.len() % 2 == 0) else {
                return Err("the EC public key is not an uncompressed point".into());
            };
            let (x, y) = xy.split_at(xy.len() / 2);
            jwk.insert("kty".into(), Value::from("EC"));
            jwk.insert("crv".into(), Value::from(crv));
            jwk.insert("x".into(), Value::from(URL_SAFE_NO_PAD.encode(x)));
            jwk.insert("y".into(), Value::from(URL_SAFE_NO_PAD.encode(y)));
            props.insert("kty".into(), Value::from("EC"));
            props.insert("crv".into(), Value::from(crv));
        }
        Ok(_) => return Err("the certificate's key is neither RSA nor EC".into()),
        Err(e) => return Err(format!("the certificate's public key does not parse: {e}")),
    }
    Ok((jwk, props))
}

/// `{vault}/{collection}/{name}/{version}`
fn object_id(
    shared: &Shared,
    collection: Collection,
    secret: &Secret,
    v: &SecretVersion,
) -> String {
    format!(
        "{}/{}/{}/{}",
        shared.vault_url,
        collection.segment(),
        secret.name,
        v.version
    )
}

/// The attributes of a certificate (and of its key): the backing secret's, with `nbf` and
/// `exp` from the certificate's validity.
fn attributes(v: &SecretVersion, cert: &Cert) -> Map<String, Value> {
    let mut a = vault::base_attributes(v.enabled, v.created, v.updated);
    a.insert("nbf".into(), Value::from(cert.nbf));
    a.insert("exp".into(), Value::from(cert.exp));
    a
}

/// The CertificateBundle JSON; `with_policy` for the latest version (Key Vault sends the
/// policy only when no version is asked for).
fn bundle(
    shared: &Shared,
    secret: &Secret,
    v: &SecretVersion,
    cert: &Cert,
    with_policy: bool,
) -> Value {
    let mut m = Map::new();
    m.insert(
        "id".into(),
        Value::from(object_id(shared, Collection::Certificates, secret, v)),
    );
    m.insert(
        "kid".into(),
        Value::from(object_id(shared, Collection::Keys, secret, v)),
    );
    m.insert(
        "sid".into(),
        Value::from(object_id(shared, Collection::Secrets, secret, v)),
    );
    m.insert(
        "x5t".into(),
        Value::from(URL_SAFE_NO_PAD.encode(Sha1::digest(&cert.der))),
    );
    m.insert("cer".into(), Value::from(STANDARD.encode(&cert.der)));
    m.insert("attributes".into(), Value::Object(attributes(v, cert)));
    if let Some(ct) = &v.content_type {
        m.insert("contentType".into(), Value::from(ct.clone()));
    }
    if let Some(tags) = &v.tags {
        m.insert("tags".into(), json!(tags));
    }
    if with_policy {
        m.insert("policy".into(), policy(shared, secret, v, cert));
    }
    Value::Object(m)
}

/// The policy Key Vault reports for an imported certificate.
fn policy(shared: &Shared, secret: &Secret, v: &SecretVersion, cert: &Cert) -> Value {
    let mut key_props = cert.key_props.clone();
    key_props.insert("exportable".into(), Value::from(true));
    key_props.insert("reuse_key".into(), Value::from(false));
    let mut x509 = Map::new();
    x509.insert("subject".into(), Value::from(cert.subject.clone()));
    if !cert.dns_names.is_empty() {
        x509.insert("sans".into(), json!({ "dns_names": cert.dns_names }));
    }
    x509.insert(
        "validity_months".into(),
        Value::from(((cert.exp - cert.nbf) / MONTH_SECS).max(1)),
    );
    let created = secret.versions.first().map_or(v.created, |f| f.created);
    json!({
        "id": format!("{}/certificates/{}/policy", shared.vault_url, secret.name),
        "key_props": key_props,
        "secret_props": { "contentType": v.content_type.clone().unwrap_or_default() },
        "x509_props": x509,
        "lifetime_actions": [
            { "trigger": { "lifetime_percentage": 80 }, "action": { "action_type": "EmailContacts" } }
        ],
        "issuer": { "name": "Unknown" },
        "attributes": { "enabled": true, "created": created, "updated": v.updated },
    })
}

/// The KeyBundle of a certificate's key (`managed: true`).
pub(crate) fn key_bundle(
    shared: &Shared,
    secret: &Secret,
    v: &SecretVersion,
    cert: &Cert,
) -> Value {
    let mut jwk = cert.jwk.clone();
    jwk.insert(
        "kid".into(),
        Value::from(object_id(shared, Collection::Keys, secret, v)),
    );
    let ops = crate::keys::default_key_ops(jwk.get("kty").and_then(Value::as_str).unwrap_or(""));
    jwk.insert("key_ops".into(), json!(ops));
    let mut attrs = attributes(v, cert);
    attrs.insert("exportable".into(), Value::from(true));
    let mut m = Map::new();
    m.insert("key".into(), Value::Object(jwk));
    m.insert("attributes".into(), Value::Object(attrs));
    if let Some(tags) = &v.tags {
        m.insert("tags".into(), json!(tags));
    }
    m.insert("managed".into(), Value::from(true));
    Value::Object(m)
}

/// 500 for a certificate-backed secret whose value holds no usable certificate (Key Vault
/// cannot get into that state; a test stored a value that is not what its content type
/// says).
pub(crate) fn unusable(secret: &Secret, v: &SecretVersion, why: &str) -> Response<Body> {
    vault::error(
        500,
        "InternalServerError",
        &format!(
            "azure-fake: the certificate-backed secret {}/{} ({}) holds no usable certificate: {why}. Store a PEM with a CERTIFICATE block, or a base64 PKCS#12 with an empty password.",
            secret.name,
            v.version,
            v.content_type.as_deref().unwrap_or_default()
        ),
        None,
    )
}

pub(crate) fn get(shared: &Shared, segs: &[&str]) -> Response<Body> {
    let name = segs.first().copied().unwrap_or_default();
    let version = segs.get(1).copied();
    if shared.is_forbidden(name) {
        return vault::forbidden(shared, Collection::Certificates, "read", name);
    }
    let what = vault::name_and_version(name, version);
    let Some(secret) = shared.secret(name) else {
        return vault::not_found(Collection::Certificates, &what);
    };
    let Some(v) = find_version(&secret, version) else {
        return vault::not_found(Collection::Certificates, &what);
    };
    match certificate(v) {
        Ok(cert) => json_response(200, &bundle(shared, &secret, v, &cert, version.is_none())),
        Err(why) => unusable(&secret, v, &why),
    }
}
