//! The `/_fake/` control API on the plain-HTTP listener (documented in the crate docs).

use hyper::{Method, Response};
use serde::Deserialize;
use serde_json::json;

use crate::http::{Body, Req, empty_response, json_response};
use crate::model::Fault;
use crate::state::Shared;

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AdminSecret {
    value: String,
    content_type: Option<String>,
}

fn bad(message: String) -> Response<Body> {
    json_response(400, &json!({ "error": message }))
}

pub(crate) fn handle(shared: &Shared, req: &Req) -> Response<Body> {
    let path = req.path.trim_end_matches('/');
    let segs: Vec<&str> = path.split('/').skip(2).collect();
    match (&req.method, segs.as_slice()) {
        (&Method::GET, ["health"]) => json_response(200, &json!({"ok": true})),
        (&Method::GET, ["stats"]) => match serde_json::to_value(shared.stats()) {
            Ok(v) => json_response(200, &v),
            Err(e) => json_response(500, &json!({"error": e.to_string()})),
        },
        (&Method::POST, ["stats", "reset"]) => {
            shared.reset_stats();
            empty_response(204)
        }
        (&Method::POST, ["faults"]) => match serde_json::from_slice::<Fault>(&req.body) {
            Ok(f) => {
                shared.inject(f);
                empty_response(204)
            }
            Err(e) => bad(format!("not a fault: {e}")),
        },
        (&Method::DELETE, ["faults"]) => {
            shared.clear_faults();
            empty_response(204)
        }
        (&Method::PUT, ["secrets", name]) => {
            match serde_json::from_slice::<AdminSecret>(&req.body) {
                Ok(s) => {
                    let version =
                        crate::set_secret_in(shared, name, &s.value, s.content_type.as_deref());
                    json_response(200, &json!({ "version": version }))
                }
                Err(e) => bad(format!("not a secret: {e}")),
            }
        }
        (&Method::DELETE, ["secrets", name]) => {
            shared.delete_secret(name);
            empty_response(204)
        }
        (&Method::POST, ["secrets", name, "forbid"]) => {
            shared.set_forbidden(name, true);
            empty_response(204)
        }
        (&Method::POST, ["secrets", name, "allow"]) => {
            shared.set_forbidden(name, false);
            empty_response(204)
        }
        (&Method::PUT, ["keys", name]) => {
            match serde_json::from_slice::<serde_json::Value>(&req.body) {
                Ok(jwk) if jwk.is_object() => {
                    let version = shared.put_key(name, crate::keys::public_jwk(jwk));
                    json_response(200, &json!({ "version": version }))
                }
                Ok(_) => bad("not a JWK: the body must be a JSON object".into()),
                Err(e) => bad(format!("not a JWK: {e}")),
            }
        }
        (&Method::DELETE, ["keys", name]) => {
            shared.delete_key(name);
            empty_response(204)
        }
        (&Method::POST, ["tokens", "revoke"]) => {
            shared.revoke_tokens();
            empty_response(204)
        }
        _ => json_response(
            404,
            &json!({"error": format!("no admin route {} {}", req.method, req.path)}),
        ),
    }
}
