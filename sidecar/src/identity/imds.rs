//! Azure Instance Metadata Service (AKS on Azure VMs). Plain HTTP to a link-local address,
//! never through a proxy; retried on the answers IMDS gives while it updates or throttles.

use std::time::Duration;

use super::{Env, IdentityError, TokenFuture, TokenSource, error_text, parse_token};
use crate::config::Config;
use crate::http::{Clients, read_body, without_url};

const NAME: &str = "IMDS";
const DEFAULT_HOST: &str = "http://169.254.169.254";
/// IMDS answers 410 for up to 70 s while it updates: the backoff covers that.
const ATTEMPTS: u32 = 6;

pub struct Imds {
    http: reqwest::Client,
    endpoint: String,
    client_id: Option<String>,
    object_id: Option<String>,
    msi_res_id: Option<String>,
    first_backoff: Duration,
}

impl Imds {
    pub fn new(cfg: &Config, env: &Env, clients: &Clients) -> Result<Self, IdentityError> {
        // The Azure SDKs let tests point IMDS elsewhere with this variable; so do we.
        let host = env
            .get("AZURE_POD_IDENTITY_AUTHORITY_HOST")
            .unwrap_or(DEFAULT_HOST)
            .trim_end_matches('/')
            .to_owned();
        Ok(Self {
            http: clients.local.clone(),
            endpoint: format!("{host}/metadata/identity/oauth2/token"),
            client_id: cfg
                .client_id
                .clone()
                .or_else(|| env.get("AZURE_CLIENT_ID").map(str::to_owned)),
            object_id: env.get("AZURE_OBJECT_ID").map(str::to_owned),
            msi_res_id: env.get("AZURE_MSI_RESOURCE_ID").map(str::to_owned),
            first_backoff: Duration::from_secs(1),
        })
    }

    /// For tests: start retrying sooner.
    pub fn with_first_backoff(mut self, d: Duration) -> Self {
        self.first_backoff = d;
        self
    }
}

impl TokenSource for Imds {
    fn name(&self) -> &'static str {
        NAME
    }

    fn fetch<'a>(&'a self, scope: &'a str, _tenant: Option<&'a str>) -> TokenFuture<'a> {
        Box::pin(async move {
            let resource = scope.trim_end_matches("/.default");
            let mut query = vec![("api-version", "2018-02-01"), ("resource", resource)];
            if let Some(c) = &self.client_id {
                query.push(("client_id", c));
            } else if let Some(o) = &self.object_id {
                query.push(("object_id", o));
            } else if let Some(m) = &self.msi_res_id {
                query.push(("msi_res_id", m));
            }
            let mut delay = self.first_backoff;
            let mut last = String::new();
            for attempt in 1..=ATTEMPTS {
                let sent = self
                    .http
                    .get(&self.endpoint)
                    .query(&query)
                    .header("Metadata", "true")
                    .send()
                    .await;
                match sent {
                    Ok(resp) => {
                        let status = resp.status();
                        let body = read_body(resp)
                            .await
                            .map_err(|e| IdentityError::transient(NAME, e.to_string()))?;
                        if status.is_success() {
                            return parse_token(NAME, &body);
                        }
                        last =
                            format!("{} answered {status}: {}", self.endpoint, error_text(&body));
                        let retry =
                            matches!(status.as_u16(), 404 | 410 | 429) || status.is_server_error();
                        if !retry {
                            return Err(IdentityError::permanent(
                                NAME,
                                format!(
                                    "{last} (is a managed identity assigned to this node, and is client_id right?)"
                                ),
                            ));
                        }
                    }
                    Err(e) => last = format!("{}: {}", self.endpoint, without_url(&e)),
                }
                if attempt < ATTEMPTS {
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(30));
                }
            }
            Err(IdentityError::transient(
                NAME,
                format!("{last} (after {ATTEMPTS} attempts)"),
            ))
        })
    }
}
