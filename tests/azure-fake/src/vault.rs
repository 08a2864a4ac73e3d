//! Key Vault: secrets (get, get version, list versions, list, set), and the common request
//! checks (api-version, bearer token, object name) of every vault endpoint. Certificates
//! and keys are read in [`crate::certificates`] and [`crate::keys`].

use std::collections::BTreeMap;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hyper::{Method, Response};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::http::{Body, Req, json_response, status_code_name, with_header};
use crate::model::Endpoint;
use crate::state::{NewVersion, Secret, SecretVersion, Shared};
use crate::{certificates, keys};

/// API versions the fake accepts (the stable ones, plus anything ending in `-preview`).
pub const API_VERSIONS: &[&str] = &[
    "2016-10-01",
    "7.0",
    "7.1",
    "7.2",
    "7.3",
    "7.4",
    "7.5",
    "7.6",
    "2025-07-01",
    "2026-04-01",
];

/// Largest page Key Vault hands out.
const MAX_PAGE: usize = 25;
/// Largest secret value Key Vault stores (25 KiB).
const MAX_VALUE_BYTES: usize = 25 * 1024;

/// The object collections of a vault the fake serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Collection {
    Secrets,
    Certificates,
    Keys,
}

impl Collection {
    /// The path segment, which is also the collection's name in RBAC actions and resource ids.
    pub fn segment(self) -> &'static str {
        match self {
            Collection::Secrets => "secrets",
            Collection::Certificates => "certificates",
            Collection::Keys => "keys",
        }
    }

    fn of(path: &str) -> Option<(Collection, &str)> {
        [
            Collection::Secrets,
            Collection::Certificates,
            Collection::Keys,
        ]
        .into_iter()
        .find_map(|c| {
            let rest = path.strip_prefix('/')?.strip_prefix(c.segment())?;
            (rest.is_empty() || rest.starts_with('/')).then_some((c, rest))
        })
    }
}

/// Whether a path on the HTTPS listener belongs to Key Vault.
pub(crate) fn is_vault_path(path: &str) -> bool {
    Collection::of(path).is_some()
}

/// Path segments after `/secrets` (`/certificates`, `/keys`), an empty trailing segment
/// removed (SDKs send `/secrets/{name}/` when they ask for the latest version).
fn segments(path: &str) -> Vec<&str> {
    let rest = Collection::of(path).map_or(path, |(_, rest)| rest);
    let mut segs: Vec<&str> = rest.split('/').skip(1).collect();
    if segs.last() == Some(&"") {
        segs.pop();
    }
    segs
}

/// Sub-resources of a certificate or key that are not versions (served by Key Vault, not by
/// the fake).
fn is_version(seg: &str) -> bool {
    !matches!(
        seg,
        "versions" | "policy" | "pending" | "backup" | "rotationpolicy"
    )
}

pub(crate) fn endpoint(method: &Method, path: &str) -> Endpoint {
    let Some((collection, _)) = Collection::of(path) else {
        return Endpoint::VaultOther;
    };
    let segs = segments(path);
    match (collection, method, segs.as_slice()) {
        (Collection::Secrets, &Method::GET, []) => Endpoint::VaultList,
        (Collection::Secrets, &Method::GET, [_, "versions"]) => Endpoint::VaultListVersions,
        (Collection::Secrets, &Method::GET, [_] | [_, _]) => Endpoint::VaultGet,
        (Collection::Secrets, &Method::PUT, [_]) => Endpoint::VaultSet,
        (Collection::Certificates, &Method::GET, [_]) => Endpoint::VaultGetCertificate,
        (Collection::Certificates, &Method::GET, [_, v]) if is_version(v) => {
            Endpoint::VaultGetCertificate
        }
        (Collection::Keys, &Method::GET, [_]) => Endpoint::VaultGetKey,
        (Collection::Keys, &Method::GET, [_, v]) if is_version(v) => Endpoint::VaultGetKey,
        _ => Endpoint::VaultOther,
    }
}

/// `WWW-Authenticate` value of the bearer challenge.
pub(crate) fn challenge(shared: &Shared) -> String {
    format!(
        "Bearer authorization=\"{}/{}\", resource=\"{}\"",
        shared.authority_host, shared.opts.tenant_id, shared.opts.vault_resource
    )
}

fn error_body(code: &str, message: &str, inner: Option<&str>) -> Value {
    let mut err = Map::new();
    err.insert("code".into(), Value::from(code));
    err.insert("message".into(), Value::from(message));
    if let Some(inner) = inner {
        err.insert("innererror".into(), json!({ "code": inner }));
    }
    json!({ "error": Value::Object(err) })
}

pub(crate) fn error(status: u16, code: &str, message: &str, inner: Option<&str>) -> Response<Body> {
    json_response(status, &error_body(code, message, inner))
}

/// A vault error for `status`; a 401 carries the bearer challenge.
pub(crate) fn error_with_challenge(shared: &Shared, status: u16, message: &str) -> Response<Body> {
    let resp = error(status, &status_code_name(status), message, None);
    if status == 401 {
        with_header(resp, "WWW-Authenticate", &challenge(shared))
    } else {
        resp
    }
}

fn unauthorized(shared: &Shared, message: &str) -> Response<Body> {
    with_header(
        error(401, "Unauthorized", message, None),
        "WWW-Authenticate",
        &challenge(shared),
    )
}

fn trim_slash(s: &str) -> &str {
    s.trim_end_matches('/')
}

/// Checks the bearer token; `Err` is the 401 to send.
fn authorize(shared: &Shared, req: &Req) -> Result<(), Box<Response<Body>>> {
    let Some(header) = req.header("authorization") else {
        return Err(Box::new(unauthorized(
            shared,
            "AKV10000: Request is missing a Bearer or PoP token.",
        )));
    };
    let mut parts = header.trim().splitn(2, ' ');
    let scheme = parts.next().unwrap_or_default();
    let token = parts.next().unwrap_or_default().trim();
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() {
        return Err(Box::new(unauthorized(
            shared,
            "AKV10000: Request is missing a Bearer or PoP token.",
        )));
    }
    let Some(issued) = shared.token(token) else {
        return Err(Box::new(unauthorized(
            shared,
            "The access token is not valid: it was not issued by this authority, has expired or was revoked (azure-fake).",
        )));
    };
    if trim_slash(&issued.resource) != trim_slash(&shared.opts.vault_resource) {
        return Err(Box::new(unauthorized(
            shared,
            &format!(
                "AKV10022: Invalid audience. Expected {}, found: {}.",
                shared.opts.vault_resource, issued.resource
            ),
        )));
    }
    Ok(())
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 127
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// 404 `SecretNotFound` / `CertificateNotFound` / `KeyNotFound`, worded as Key Vault does.
pub(crate) fn not_found(collection: Collection, what: &str) -> Response<Body> {
    let (code, kind) = match collection {
        Collection::Secrets => ("SecretNotFound", "secret"),
        Collection::Certificates => ("CertificateNotFound", "certificate"),
        Collection::Keys => ("KeyNotFound", "key"),
    };
    error(
        404,
        code,
        &format!(
            "A {kind} with (name/id) {what} was not found in this key vault. If you recently deleted this {kind} you may be able to recover it using the correct recovery command. For help resolving this issue, please see https://go.microsoft.com/fwlink/?linkid=2125182"
        ),
        None,
    )
}

/// `name` or `name/version`, as Key Vault names the object in its messages.
pub(crate) fn name_and_version(name: &str, version: Option<&str>) -> String {
    match version {
        Some(v) => format!("{name}/{v}"),
        None => name.to_owned(),
    }
}

/// 403 `Forbidden` / `ForbiddenByRbac` for `Microsoft.KeyVault/vaults/{collection}/{action}`.
pub(crate) fn forbidden(
    shared: &Shared,
    collection: Collection,
    action: &str,
    name: &str,
) -> Response<Body> {
    let host = shared
        .vault_url
        .strip_prefix("https://")
        .unwrap_or(&shared.vault_url);
    error(
        403,
        "Forbidden",
        &format!(
            "Caller is not authorized to perform action on resource.\r\nIf role assignments, deny assignments or role definitions were changed recently, please observe propagation time.\r\nCaller: appid={client};oid={oid};iss=https://sts.windows.net/{tenant}/\r\nAction: 'Microsoft.KeyVault/vaults/{collection}/{action}'\r\nResource: '/subscriptions/00000000-0000-0000-0000-000000000000/resourcegroups/azure-fake/providers/microsoft.keyvault/vaults/azure-fake/{collection}/{name}'\r\nAssignment: (not found)\r\nDenyAssignmentId: null\r\nDecisionReason: null \r\nVault: {host};location=local\r\n",
            client = shared.opts.client_id,
            oid = shared.object_id,
            tenant = shared.opts.tenant_id,
            collection = collection.segment(),
            name = name.to_ascii_lowercase(),
        ),
        Some("ForbiddenByRbac"),
    )
}

/// Timestamps and recovery settings every object's `attributes` carry.
pub(crate) fn base_attributes(enabled: bool, created: u64, updated: u64) -> Map<String, Value> {
    let mut a = Map::new();
    a.insert("enabled".into(), Value::from(enabled));
    a.insert("created".into(), Value::from(created));
    a.insert("updated".into(), Value::from(updated));
    a.insert("recoveryLevel".into(), Value::from("Recoverable+Purgeable"));
    a.insert("recoverableDays".into(), Value::from(90));
    a
}

fn attributes(v: &SecretVersion) -> Value {
    let mut a = base_attributes(v.enabled, v.created, v.updated);
    if let Some(nbf) = v.nbf {
        a.insert("nbf".into(), Value::from(nbf));
    }
    if let Some(exp) = v.exp {
        a.insert("exp".into(), Value::from(exp));
    }
    Value::Object(a)
}

/// Properties shared by bundles and list items.
fn common(shared: &Shared, secret: &Secret, v: &SecretVersion, id: String) -> Map<String, Value> {
    let mut m = Map::new();
    if let Some(ct) = &v.content_type {
        m.insert("contentType".into(), Value::from(ct.clone()));
    }
    m.insert("id".into(), Value::from(id));
    m.insert("attributes".into(), attributes(v));
    if let Some(tags) = &v.tags {
        m.insert("tags".into(), json!(tags));
    }
    if v.managed {
        m.insert(
            "kid".into(),
            Value::from(format!(
                "{}/keys/{}/{}",
                shared.vault_url, secret.name, v.version
            )),
        );
        m.insert("managed".into(), Value::from(true));
    }
    m
}

fn version_id(shared: &Shared, secret: &Secret, v: &SecretVersion) -> String {
    format!("{}/secrets/{}/{}", shared.vault_url, secret.name, v.version)
}

/// The SecretBundle JSON (with the value).
pub(crate) fn bundle(shared: &Shared, secret: &Secret, v: &SecretVersion) -> Value {
    let mut m = Map::new();
    m.insert("value".into(), Value::from(v.value.clone()));
    m.extend(common(shared, secret, v, version_id(shared, secret, v)));
    Value::Object(m)
}

pub(crate) fn handle(shared: &Shared, endpoint: Endpoint, req: &Req) -> Response<Body> {
    let api_version = match req.query_param("api-version") {
        None => {
            return error(
                400,
                "BadParameter",
                "The request URI must contain the 'api-version' query parameter.",
                None,
            );
        }
        Some(v) if v.is_empty() => {
            return error(
                400,
                "BadParameter",
                "The 'api-version' query parameter is empty.",
                None,
            );
        }
        Some(v) => v,
    };
    if !API_VERSIONS.contains(&api_version.as_str()) && !api_version.ends_with("-preview") {
        return error(
            400,
            "BadParameter",
            &format!(
                "The specified version ({api_version}) is not recognized. Consider using the latest supported version (2026-04-01)."
            ),
            None,
        );
    }
    if let Err(resp) = authorize(shared, req) {
        return *resp;
    }
    let segs = segments(&req.path);
    if let Some(name) = segs.first()
        && !valid_name(name)
    {
        return error(
            400,
            "BadParameter",
            &format!("The request URI contains an invalid name: {name}"),
            None,
        );
    }
    match endpoint {
        Endpoint::VaultGet => get(shared, &segs),
        Endpoint::VaultGetCertificate => certificates::get(shared, &segs),
        Endpoint::VaultGetKey => keys::get(shared, &segs),
        Endpoint::VaultListVersions => list_versions(shared, req, &segs, &api_version),
        Endpoint::VaultList => list(shared, req, &api_version),
        Endpoint::VaultSet => set(shared, req, &segs),
        _ => error(
            405,
            "MethodNotAllowed",
            &format!(
                "The method {} is not supported by azure-fake for {}",
                req.method, req.path
            ),
            None,
        ),
    }
}

fn get(shared: &Shared, segs: &[&str]) -> Response<Body> {
    let name = segs.first().copied().unwrap_or_default();
    let version = segs.get(1).copied();
    if shared.is_forbidden(name) {
        return forbidden(shared, Collection::Secrets, "getSecret/action", name);
    }
    let what = name_and_version(name, version);
    let Some(secret) = shared.secret(name) else {
        return not_found(Collection::Secrets, &what);
    };
    let found = match version {
        None => secret.versions.last(),
        Some(v) => secret
            .versions
            .iter()
            .find(|x| x.version.eq_ignore_ascii_case(v)),
    };
    let Some(v) = found else {
        return not_found(Collection::Secrets, &what);
    };
    if !v.enabled {
        return error(
            403,
            "Forbidden",
            "Operation get is not allowed on a disabled secret.",
            Some("SecretDisabled"),
        );
    }
    json_response(200, &bundle(shared, &secret, v))
}

/// `(offset, page size)` from `$skiptoken` and `maxresults`; `Err` is the 400 to send.
fn paging(req: &Req) -> Result<(usize, Option<usize>), Box<Response<Body>>> {
    let max = match req.query_param("maxresults") {
        None => None,
        Some(m) => match m.parse::<usize>() {
            Ok(n) if (1..=MAX_PAGE).contains(&n) => Some(n),
            _ => {
                return Err(Box::new(error(
                    400,
                    "BadParameter",
                    &format!(
                        "Invalid value '{m}' for maxresults: it must be between 1 and {MAX_PAGE}."
                    ),
                    None,
                )));
            }
        },
    };
    let offset = match req.query_param("$skiptoken") {
        None => 0,
        Some(t) => {
            let parsed = URL_SAFE_NO_PAD
                .decode(t.as_bytes())
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .and_then(|s| s.strip_prefix("azure-fake:").map(str::to_owned))
                .and_then(|s| s.parse::<usize>().ok());
            match parsed {
                Some(o) => o,
                None => {
                    return Err(Box::new(error(
                        400,
                        "BadParameter",
                        "The $skiptoken is not valid.",
                        None,
                    )));
                }
            }
        }
    };
    Ok((offset, max))
}

fn page(
    items: Vec<Value>,
    offset: usize,
    max: Option<usize>,
    next_base: &str,
    api_version: &str,
) -> Response<Body> {
    let size = max.unwrap_or(MAX_PAGE);
    let total = items.len();
    let page: Vec<Value> = items.into_iter().skip(offset).take(size).collect();
    let next = offset + page.len();
    let next_link = if next < total {
        let token = URL_SAFE_NO_PAD.encode(format!("azure-fake:{next}"));
        let mut link = format!("{next_base}?api-version={api_version}&$skiptoken={token}");
        if let Some(m) = max {
            link.push_str(&format!("&maxresults={m}"));
        }
        Value::from(link)
    } else {
        Value::Null
    };
    json_response(200, &json!({ "value": page, "nextLink": next_link }))
}

fn list_versions(shared: &Shared, req: &Req, segs: &[&str], api_version: &str) -> Response<Body> {
    let name = segs.first().copied().unwrap_or_default();
    if shared.is_forbidden(name) {
        return forbidden(shared, Collection::Secrets, "readMetadata/action", name);
    }
    let (offset, max) = match paging(req) {
        Ok(p) => p,
        Err(resp) => return *resp,
    };
    let Some(secret) = shared.secret(name) else {
        return not_found(Collection::Secrets, name);
    };
    let items = secret
        .versions
        .iter()
        .map(|v| Value::Object(common(shared, &secret, v, version_id(shared, &secret, v))))
        .collect();
    let base = format!("{}/secrets/{}/versions", shared.vault_url, secret.name);
    page(items, offset, max, &base, api_version)
}

fn list(shared: &Shared, req: &Req, api_version: &str) -> Response<Body> {
    let (offset, max) = match paging(req) {
        Ok(p) => p,
        Err(resp) => return *resp,
    };
    let items = shared
        .secrets()
        .iter()
        .filter_map(|s| {
            let v = s.versions.last()?;
            let id = format!("{}/secrets/{}", shared.vault_url, s.name);
            Some(Value::Object(common(shared, s, v, id)))
        })
        .collect();
    let base = format!("{}/secrets", shared.vault_url);
    page(items, offset, max, &base, api_version)
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SetBody {
    value: Option<String>,
    content_type: Option<String>,
    tags: Option<BTreeMap<String, String>>,
    attributes: Option<SetAttributes>,
}

#[derive(Deserialize)]
struct SetAttributes {
    enabled: Option<bool>,
    nbf: Option<u64>,
    exp: Option<u64>,
}

fn set(shared: &Shared, req: &Req, segs: &[&str]) -> Response<Body> {
    let name = segs.first().copied().unwrap_or_default();
    if shared.is_forbidden(name) {
        return forbidden(shared, Collection::Secrets, "setSecret/action", name);
    }
    let body: SetBody = match serde_json::from_slice(&req.body) {
        Ok(b) => b,
        Err(e) => {
            return error(
                400,
                "BadParameter",
                &format!("The request body is not a valid secret: {e}"),
                None,
            );
        }
    };
    let Some(value) = body.value else {
        return error(400, "BadParameter", "Property 'value' is required.", None);
    };
    if value.len() > MAX_VALUE_BYTES {
        return error(
            400,
            "BadParameter",
            &format!("The secret value exceeds the maximum size of {MAX_VALUE_BYTES} bytes."),
            None,
        );
    }
    let attrs = body.attributes;
    let v = shared.put_secret(
        name,
        NewVersion {
            value,
            content_type: body.content_type,
            tags: body.tags,
            enabled: attrs.as_ref().and_then(|a| a.enabled),
            nbf: attrs.as_ref().and_then(|a| a.nbf),
            exp: attrs.as_ref().and_then(|a| a.exp),
            // Only secrets created through a certificate are managed; a PUT never is.
            managed: false,
        },
    );
    let Some(secret) = shared.secret(name) else {
        return not_found(Collection::Secrets, name);
    };
    json_response(200, &bundle(shared, &secret, &v))
}
