//! The Entra ID token endpoint (client credentials), shared by workload identity and
//! service principals.

use super::{AccessToken, IdentityError, error_text, parse_token};
use crate::http::{read_body, without_url};
use crate::secret::Token;

/// What proves the client's identity.
pub enum Credential {
    /// A signed JWT: the federated service-account token, or one signed with a certificate.
    Assertion(Token),
    Secret(Token),
}

pub async fn client_credentials(
    http: &reqwest::Client,
    source: &'static str,
    authority: &str,
    tenant: &str,
    client_id: &str,
    scope: &str,
    credential: Credential,
) -> Result<AccessToken, IdentityError> {
    let url = format!("{authority}/{tenant}/oauth2/v2.0/token");
    // Built in a block so the (non-Send) serializer is gone before the first await.
    let body = {
        let mut form = form_urlencoded::Serializer::new(String::new());
        form.append_pair("grant_type", "client_credentials")
            .append_pair("client_id", client_id)
            .append_pair("scope", scope);
        match &credential {
            Credential::Assertion(jwt) => {
                form.append_pair(
                    "client_assertion_type",
                    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                )
                .append_pair("client_assertion", jwt.expose());
            }
            Credential::Secret(s) => {
                form.append_pair("client_secret", s.expose());
            }
        }
        zeroize::Zeroizing::new(form.finish())
    };
    let resp = http
        .post(&url)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body.as_bytes().to_vec())
        .send()
        .await
        .map_err(|e| {
            IdentityError::transient(source, format!("token endpoint {url}: {}", without_url(&e)))
        })?;
    let status = resp.status();
    let body = read_body(resp)
        .await
        .map_err(|e| IdentityError::transient(source, format!("token endpoint {url}: {e}")))?;
    if status.is_success() {
        return parse_token(source, &body);
    }
    let detail = error_text(&body);
    let msg = format!("token endpoint {url} answered {status}: {detail}");
    if status.is_server_error() || status.as_u16() == 429 || status.as_u16() == 408 {
        Err(IdentityError::transient(source, msg))
    } else {
        Err(IdentityError::permanent(source, msg))
    }
}
