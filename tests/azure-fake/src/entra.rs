//! Entra ID (Azure AD) v2.0 token endpoint, client-credentials grant, and the OpenID
//! discovery document MSAL reads first.

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use hyper::{Method, Response};
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::macros::format_description;

use crate::http::{Body, Req, json_response, with_header};
use crate::model::Flow;
use crate::state::{Shared, random_guid, unix_now};

/// `client_assertion_type` for JWT bearer assertions.
pub const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// The tenant segment of `/{tenant}/oauth2/v2.0/token`.
fn token_tenant(path: &str) -> Option<&str> {
    let rest = path.strip_prefix('/')?;
    let (tenant, tail) = rest.split_once('/')?;
    (tail == "oauth2/v2.0/token" && !tenant.is_empty()).then_some(tenant)
}

/// The tenant segment of `/{tenant}/v2.0/.well-known/openid-configuration`.
fn openid_tenant(path: &str) -> Option<&str> {
    let rest = path.strip_prefix('/')?;
    let (tenant, tail) = rest.split_once('/')?;
    (tail == "v2.0/.well-known/openid-configuration" && !tenant.is_empty()).then_some(tenant)
}

pub(crate) fn is_token_path(path: &str) -> bool {
    token_tenant(path).is_some()
}

pub(crate) fn is_openid_path(path: &str) -> bool {
    openid_tenant(path).is_some()
}

fn timestamp() -> String {
    OffsetDateTime::now_utc()
        .format(format_description!(
            "[year]-[month]-[day] [hour]:[minute]:[second]Z"
        ))
        .unwrap_or_default()
}

/// An AADSTS-style error body: `error`, `error_description` (with the trace footer),
/// `error_codes`, `timestamp`, `trace_id`, `correlation_id`, `error_uri`.
pub(crate) fn aad_error(
    shared: &Shared,
    status: u16,
    error: &str,
    code: u32,
    message: &str,
) -> Response<Body> {
    let trace_id = random_guid();
    let correlation_id = random_guid();
    let ts = timestamp();
    let body = json!({
        "error": error,
        "error_description": format!(
            "AADSTS{code}: {message}\r\nTrace ID: {trace_id}\r\nCorrelation ID: {correlation_id}\r\nTimestamp: {ts}"
        ),
        "error_codes": [code],
        "timestamp": ts,
        "trace_id": trace_id,
        "correlation_id": correlation_id,
        "error_uri": format!("{}/error?code={code}", shared.authority_host),
    });
    no_cache(json_response(status, &body))
}

fn no_cache(resp: Response<Body>) -> Response<Body> {
    let resp = with_header(resp, "Cache-Control", "no-store, no-cache");
    with_header(resp, "Pragma", "no-cache")
}

/// Error body for an injected status on the token endpoint.
pub(crate) fn status_error(shared: &Shared, status: u16, message: &str) -> Response<Body> {
    let (error, code) = match status {
        429 => ("temporarily_unavailable", 50196),
        s if s >= 500 => ("temporarily_unavailable", 90033),
        401 => ("invalid_client", 7000215),
        _ => ("invalid_request", 90100),
    };
    aad_error(shared, status, error, code, message)
}

fn wrong_tenant(shared: &Shared, tenant: &str) -> Response<Body> {
    aad_error(
        shared,
        400,
        "invalid_request",
        90002,
        &format!(
            "Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID and are signing into the correct cloud. Check with your subscription administrator, this may happen if there are no active subscriptions for the tenant."
        ),
    )
}

/// The discovery document (`GET /{tenant}/v2.0/.well-known/openid-configuration`).
pub(crate) fn openid_configuration(shared: &Shared, req: &Req) -> Response<Body> {
    let tenant = openid_tenant(&req.path).unwrap_or_default();
    if !tenant.eq_ignore_ascii_case(&shared.opts.tenant_id) {
        return wrong_tenant(shared, tenant);
    }
    let base = format!("{}/{}", shared.authority_host, shared.opts.tenant_id);
    json_response(
        200,
        &json!({
            "token_endpoint": format!("{base}/oauth2/v2.0/token"),
            "token_endpoint_auth_methods_supported": ["client_secret_post", "private_key_jwt", "client_secret_basic"],
            "jwks_uri": format!("{base}/discovery/v2.0/keys"),
            "response_modes_supported": ["query", "fragment", "form_post"],
            "subject_types_supported": ["pairwise"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
            "scopes_supported": ["openid", "profile", "email", "offline_access"],
            "issuer": format!("{base}/v2.0"),
            "request_uri_parameter_supported": false,
            "userinfo_endpoint": format!("{base}/openid/userinfo"),
            "authorization_endpoint": format!("{base}/oauth2/v2.0/authorize"),
            "device_authorization_endpoint": format!("{base}/oauth2/v2.0/devicecode"),
            "http_logout_supported": true,
            "frontchannel_logout_supported": true,
            "end_session_endpoint": format!("{base}/oauth2/v2.0/logout"),
            "claims_supported": ["sub", "iss", "aud", "exp", "iat", "nbf", "tid", "oid"],
            "kerberos_endpoint": format!("{base}/kerberos"),
            "tenant_region_scope": Value::Null,
            "cloud_instance_name": "microsoftonline.com",
            "cloud_graph_host_name": "graph.windows.net",
            "msgraph_host": "graph.microsoft.com",
            "rbac_url": "https://pas.windows.net"
        }),
    )
}

/// Decodes a base64url JWT segment (padding tolerated) into a JSON object.
fn jwt_segment(seg: &str) -> Option<serde_json::Map<String, Value>> {
    let bytes = URL_SAFE_NO_PAD.decode(seg.trim_end_matches('=')).ok()?;
    match serde_json::from_slice::<Value>(&bytes).ok()? {
        Value::Object(m) => Some(m),
        _ => None,
    }
}

/// Header and payload of a well-formed three-part JWT.
fn parse_jwt(
    token: &str,
) -> Option<(
    serde_json::Map<String, Value>,
    serde_json::Map<String, Value>,
)> {
    let parts: Vec<&str> = token.split('.').collect();
    let [h, p, s] = parts.as_slice() else {
        return None;
    };
    if s.is_empty() {
        return None;
    }
    Some((jwt_segment(h)?, jwt_segment(p)?))
}

/// `POST /{tenant}/oauth2/v2.0/token`
pub(crate) fn token(shared: &Shared, req: &Req) -> Response<Body> {
    let tenant = token_tenant(&req.path).unwrap_or_default();
    if req.method != Method::POST {
        return aad_error(
            shared,
            400,
            "invalid_request",
            900561,
            &format!(
                "The endpoint only accepts POST, OPTIONS requests. Received a {} request.",
                req.method
            ),
        );
    }
    if !tenant.eq_ignore_ascii_case(&shared.opts.tenant_id) {
        return wrong_tenant(shared, tenant);
    }

    let form: Vec<(String, String)> = form_urlencoded::parse(&req.body)
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    let field = |name: &str| {
        form.iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let missing = |name: &str| {
        aad_error(
            shared,
            400,
            "invalid_request",
            900144,
            &format!("The request body must contain the following parameter: '{name}'."),
        )
    };

    // client_secret_basic: Authorization: Basic base64(client_id:client_secret)
    let basic = req
        .header("authorization")
        .and_then(|h| {
            let (scheme, rest) = h.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("basic").then_some(rest.trim())
        })
        .and_then(|b| STANDARD.decode(b).ok())
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|s| {
            let (id, secret) = s.split_once(':')?;
            let dec = |x: &str| {
                form_urlencoded::parse(format!("x={x}").as_bytes())
                    .next()
                    .map(|(_, v)| v.into_owned())
            };
            Some((dec(id)?, dec(secret)?))
        });

    let Some(grant_type) = field("grant_type") else {
        return missing("grant_type");
    };
    if grant_type != "client_credentials" {
        return aad_error(
            shared,
            400,
            "unsupported_grant_type",
            70003,
            &format!("The app requested an unsupported grant type '{grant_type}'."),
        );
    }
    let client_id = match (field("client_id"), basic.as_ref()) {
        (Some(id), _) => id.to_owned(),
        (None, Some((id, _))) => id.clone(),
        (None, None) => return missing("client_id"),
    };
    if !client_id.eq_ignore_ascii_case(&shared.opts.client_id) {
        return aad_error(
            shared,
            400,
            "unauthorized_client",
            700016,
            &format!(
                "Application with identifier '{client_id}' was not found in the directory '{}'. This can happen if the application has not been installed by the administrator of the tenant or consented to by any user in the tenant. You may have sent your authentication request to the wrong tenant.",
                shared.opts.tenant_id
            ),
        );
    }
    let Some(scope) = field("scope") else {
        return missing("scope");
    };
    let scopes: Vec<&str> = scope
        .split_whitespace()
        .filter(|s| !matches!(*s, "openid" | "profile" | "offline_access"))
        .collect();
    let resource = match scopes.as_slice() {
        [one] => match one.strip_suffix("/.default") {
            Some(r) if !r.is_empty() => r.to_owned(),
            _ => {
                return aad_error(
                    shared,
                    400,
                    "invalid_scope",
                    1002012,
                    &format!(
                        "The provided value for scope {one} is not valid. Client credential flows must have a scope value with /.default suffixed to the resource identifier (application ID URI)."
                    ),
                );
            }
        },
        _ => {
            return aad_error(
                shared,
                400,
                "invalid_scope",
                70011,
                &format!(
                    "The provided request must include a 'scope' input parameter. The provided value for the input parameter 'scope' is not valid. The scope {scope} is not valid."
                ),
            );
        }
    };

    let assertion = field("client_assertion");
    let secret = field("client_secret").or(basic.as_ref().map(|(_, s)| s.as_str()));
    let flow = match (assertion, secret) {
        (Some(_), Some(_)) => {
            return aad_error(
                shared,
                400,
                "invalid_request",
                90023,
                "Only one of 'client_assertion' and 'client_secret' may be presented.",
            );
        }
        (None, None) => {
            return aad_error(
                shared,
                401,
                "invalid_client",
                7000218,
                "The request body must contain the following parameter: 'client_assertion' or 'client_secret'.",
            );
        }
        (None, Some(presented)) => {
            match &shared.opts.client_secret {
                Some(expected) if expected == presented => {}
                _ => {
                    return aad_error(
                        shared,
                        401,
                        "invalid_client",
                        7000215,
                        &format!(
                            "Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID, for a secret added to app '{}'.",
                            shared.opts.client_id
                        ),
                    );
                }
            }
            Flow::ClientSecret
        }
        (Some(assertion), None) => match check_assertion(shared, field, assertion) {
            Ok(flow) => flow,
            Err(resp) => return *resp,
        },
    };

    let grant = shared.issue_token(flow, &resource, &client_id);
    no_cache(json_response(
        200,
        &json!({
            "token_type": "Bearer",
            "expires_in": grant.expires_in,
            "ext_expires_in": grant.expires_in,
            "access_token": grant.access_token,
        }),
    ))
}

fn check_assertion<'a>(
    shared: &Shared,
    field: impl Fn(&str) -> Option<&'a str>,
    assertion: &str,
) -> Result<Flow, Box<Response<Body>>> {
    match field("client_assertion_type") {
        None => {
            return Err(Box::new(aad_error(
                shared,
                400,
                "invalid_request",
                900144,
                "The request body must contain the following parameter: 'client_assertion_type'.",
            )));
        }
        Some(t) if t != JWT_BEARER => {
            return Err(Box::new(aad_error(
                shared,
                400,
                "invalid_request",
                7000219,
                &format!("'client_assertion_type' must be '{JWT_BEARER}', got '{t}'."),
            )));
        }
        Some(_) => {}
    }
    let Some((header, payload)) = parse_jwt(assertion.trim()) else {
        shared.record_workload_assertion(assertion);
        return Err(Box::new(aad_error(
            shared,
            400,
            "invalid_client",
            50027,
            "JWT token is invalid or malformed.",
        )));
    };
    if header.contains_key("x5t") || header.contains_key("x5t#S256") {
        // Service principal with a certificate: any well-formed JWT is accepted.
        return Ok(Flow::ClientCertificate);
    }
    shared.record_workload_assertion(assertion);
    if let Some(exp) = payload.get("exp").and_then(Value::as_u64)
        && exp < unix_now()
    {
        return Err(Box::new(aad_error(
            shared,
            400,
            "invalid_client",
            700024,
            "Client assertion is not within its valid time range.",
        )));
    }
    if let Some(path) = &shared.opts.federated_token_file {
        let current = std::fs::read_to_string(path).unwrap_or_default();
        if current.trim().is_empty() || current.trim() != assertion.trim() {
            return Err(Box::new(aad_error(
                shared,
                401,
                "invalid_client",
                700213,
                "No matching federated identity record found for presented assertion subject. Please check your federated identity credential Subject, Audience and Issuer against the presented assertion.",
            )));
        }
    }
    Ok(Flow::WorkloadIdentity)
}
