//! Azure IMDS and Azure Arc HIMDS managed-identity token endpoints.

use std::io::Write as _;

use hyper::{Method, Response};
use serde_json::{Map, Value, json};

use crate::http::{Body, Req, json_response, with_header};
use crate::model::Flow;
use crate::state::{Shared, random_hex};

/// IMDS token path (on `imds_endpoint()`).
pub const IMDS_PATH: &str = "/metadata/identity/oauth2/token";
/// Arc HIMDS token path (on the same listener).
pub const ARC_PATH: &str = "/arc/metadata/identity/oauth2/token";

fn imds_error(status: u16, error: &str, description: &str) -> Response<Body> {
    json_response(
        status,
        &json!({ "error": error, "error_description": description }),
    )
}

/// Error body for an injected status.
pub(crate) fn status_error(status: u16, message: &str) -> Response<Body> {
    let error = match status {
        400 => "invalid_request",
        401 => "unauthorized_client",
        403 => "access_denied",
        404 => "not_found",
        410 => "gone",
        429 => "too_many_requests",
        s if s >= 500 => "server_error",
        _ => "unknown_error",
    };
    imds_error(status, error, message)
}

/// Which identity was asked for, from the query.
struct Selector {
    client_id: Option<String>,
    object_id: Option<String>,
    msi_res_id: Option<String>,
}

/// Validates what IMDS and HIMDS have in common; `Err` is the response to send.
fn common_checks(req: &Req) -> Result<(String, Selector), Box<Response<Body>>> {
    if req.method != Method::GET {
        return Err(Box::new(imds_error(
            405,
            "invalid_request",
            &format!("The method {} is not allowed; use GET.", req.method),
        )));
    }
    if req.headers.contains_key("x-forwarded-for") {
        return Err(Box::new(imds_error(
            400,
            "invalid_request",
            "Requests with an X-Forwarded-For header are rejected: the metadata service cannot be reached through a proxy.",
        )));
    }
    if !req
        .header("metadata")
        .is_some_and(|v| v.eq_ignore_ascii_case("true"))
    {
        return Err(Box::new(imds_error(
            400,
            "invalid_request",
            "Required metadata header not specified",
        )));
    }
    if req.query_param("api-version").is_none_or(|v| v.is_empty()) {
        return Err(Box::new(imds_error(
            400,
            "invalid_request",
            "Required api-version parameter not specified",
        )));
    }
    let Some(resource) = req.query_param("resource").filter(|r| !r.is_empty()) else {
        return Err(Box::new(imds_error(
            400,
            "invalid_request",
            "Required audience parameter not specified",
        )));
    };
    let sel = Selector {
        client_id: req.query_param("client_id").filter(|v| !v.is_empty()),
        object_id: req.query_param("object_id").filter(|v| !v.is_empty()),
        msi_res_id: req
            .query_param("msi_res_id")
            .or_else(|| req.query_param("mi_res_id"))
            .filter(|v| !v.is_empty()),
    };
    let given = [&sel.client_id, &sel.object_id, &sel.msi_res_id]
        .iter()
        .filter(|s| s.is_some())
        .count();
    if given > 1 {
        return Err(Box::new(imds_error(
            400,
            "invalid_request",
            "Only one of client_id, object_id and msi_res_id may be specified.",
        )));
    }
    Ok((resource, sel))
}

fn token_response(shared: &Shared, flow: Flow, resource: &str, sel: &Selector) -> Response<Body> {
    let client_id = shared.opts.client_id.clone();
    if let Some(requested) = &sel.client_id
        && !requested.eq_ignore_ascii_case(&client_id)
    {
        return imds_error(400, "invalid_request", "Identity not found");
    }
    if let Some(requested) = &sel.object_id
        && !requested.eq_ignore_ascii_case(&shared.object_id)
        && !requested.eq_ignore_ascii_case(&client_id)
    {
        return imds_error(400, "invalid_request", "Identity not found");
    }
    let grant = shared.issue_token(flow, resource, &client_id);
    let mut m = Map::new();
    m.insert("access_token".into(), Value::from(grant.access_token));
    m.insert("client_id".into(), Value::from(client_id));
    m.insert(
        "expires_in".into(),
        Value::from(grant.expires_in.to_string()),
    );
    m.insert(
        "expires_on".into(),
        Value::from(grant.expires_on.to_string()),
    );
    m.insert(
        "ext_expires_in".into(),
        Value::from(grant.expires_in.to_string()),
    );
    m.insert(
        "not_before".into(),
        Value::from(grant.not_before.to_string()),
    );
    m.insert("resource".into(), Value::from(resource.to_owned()));
    m.insert("token_type".into(), Value::from("Bearer"));
    // Echo the selector the way agents that support user-assigned identities do.
    if let Some(o) = &sel.object_id {
        m.insert("object_id".into(), Value::from(o.clone()));
    }
    if let Some(r) = &sel.msi_res_id {
        m.insert("msi_res_id".into(), Value::from(r.clone()));
    }
    json_response(200, &Value::Object(m))
}

/// `GET /metadata/identity/oauth2/token?api-version=...&resource=...` with `Metadata: true`.
pub(crate) fn imds(shared: &Shared, req: &Req) -> Response<Body> {
    match common_checks(req) {
        Ok((resource, sel)) => token_response(shared, Flow::Imds, &resource, &sel),
        Err(resp) => *resp,
    }
}

/// Writes a fresh challenge key file and answers 401 with `WWW-Authenticate: Basic realm=<path>`.
fn arc_challenge(shared: &Shared) -> Response<Body> {
    let secret = random_hex(32);
    let path = shared.arc_key_dir.join(format!("{}.key", random_hex(16)));
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let written = options
        .open(&path)
        .and_then(|mut f| f.write_all(secret.as_bytes()));
    if let Err(e) = written {
        return imds_error(
            500,
            "server_error",
            &format!(
                "azure-fake could not write the key file {}: {e}",
                path.display()
            ),
        );
    }
    shared.add_arc_secret(secret, path.clone());
    with_header(
        imds_error(
            401,
            "unauthorized_client",
            "Authorization header with the challenge key file's contents is required.",
        ),
        "WWW-Authenticate",
        &format!("Basic realm={}", path.display()),
    )
}

/// `GET /arc/metadata/identity/oauth2/token?api-version=...&resource=...`: first leg 401 with
/// the key-file challenge, second leg `Authorization: Basic <file contents>`.
pub(crate) fn arc(shared: &Shared, req: &Req) -> Response<Body> {
    let (resource, sel) = match common_checks(req) {
        Ok(x) => x,
        Err(resp) => return *resp,
    };
    let presented = req.header("authorization").and_then(|h| {
        let (scheme, rest) = h.trim().split_once(' ')?;
        scheme
            .eq_ignore_ascii_case("basic")
            .then(|| rest.trim().to_owned())
    });
    match presented {
        Some(secret) if shared.arc_secret_valid(&secret) => {
            token_response(shared, Flow::Arc, &resource, &sel)
        }
        _ => arc_challenge(shared),
    }
}
