//! Key Vault keys: `GET /keys/{name}[/{version}]`.
//!
//! Keys come from [`crate::FakeAzure::set_key`] (a public JWK per version) or, as in Key
//! Vault, from certificates: a certificate-backed secret's certificate key is the key of the
//! same name and version (`managed: true`). Keys set explicitly win over a certificate's
//! key of the same name.

use hyper::Response;
use serde_json::{Map, Value, json};

use crate::certificates;
use crate::http::{Body, json_response};
use crate::state::{Key, KeyVersion, Shared};
use crate::vault::{self, Collection};

/// JWK members that only private keys have: Key Vault never returns them.
const PRIVATE_MEMBERS: &[&str] = &["d", "p", "q", "dp", "dq", "qi", "oth", "k", "t"];

/// The `key_ops` Key Vault reports for a key of type `kty` created without explicit ones.
pub(crate) fn default_key_ops(kty: &str) -> Vec<&'static str> {
    match kty {
        "RSA" | "RSA-HSM" => vec![
            "encrypt",
            "decrypt",
            "sign",
            "verify",
            "wrapKey",
            "unwrapKey",
        ],
        "EC" | "EC-HSM" => vec!["sign", "verify"],
        "oct" | "oct-HSM" => vec!["encrypt", "decrypt", "wrapKey", "unwrapKey"],
        _ => Vec::new(),
    }
}

/// What [`crate::FakeAzure::set_key`] stores: the JWK's public members (anything but an
/// object counts as an empty JWK), without `kid` (the fake names the version), with
/// `key_ops` defaulted from `kty`.
pub(crate) fn public_jwk(jwk: Value) -> Map<String, Value> {
    let mut m = match jwk {
        Value::Object(m) => m,
        _ => Map::new(),
    };
    m.remove("kid");
    for p in PRIVATE_MEMBERS {
        m.remove(*p);
    }
    if !m.contains_key("key_ops") {
        let kty = m.get("kty").and_then(Value::as_str).unwrap_or_default();
        m.insert("key_ops".into(), json!(default_key_ops(kty)));
    }
    m
}

fn bundle(shared: &Shared, key: &Key, v: &KeyVersion) -> Value {
    let mut jwk = v.jwk.clone();
    jwk.insert(
        "kid".into(),
        Value::from(format!(
            "{}/keys/{}/{}",
            shared.vault_url, key.name, v.version
        )),
    );
    let mut attrs = vault::base_attributes(true, v.created, v.updated);
    attrs.insert("exportable".into(), Value::from(false));
    json!({ "key": jwk, "attributes": attrs })
}

pub(crate) fn get(shared: &Shared, segs: &[&str]) -> Response<Body> {
    let name = segs.first().copied().unwrap_or_default();
    let version = segs.get(1).copied();
    if shared.is_forbidden(name) {
        return vault::forbidden(shared, Collection::Keys, "read", name);
    }
    let what = vault::name_and_version(name, version);
    if let Some(key) = shared.key(name) {
        let found = match version {
            None => key.versions.last(),
            Some(want) => key
                .versions
                .iter()
                .find(|v| v.version.eq_ignore_ascii_case(want)),
        };
        return match found {
            Some(v) => json_response(200, &bundle(shared, &key, v)),
            None => vault::not_found(Collection::Keys, &what),
        };
    }
    // A certificate's key.
    if let Some(secret) = shared.secret(name)
        && let Some(v) = certificates::find_version(&secret, version)
    {
        return match certificates::certificate(v) {
            Ok(cert) => json_response(200, &certificates::key_bundle(shared, &secret, v, &cert)),
            Err(why) => certificates::unusable(&secret, v, &why),
        };
    }
    vault::not_found(Collection::Keys, &what)
}
