//! Reads secrets and certificates from one vault.

use std::sync::Arc;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use base64::Engine;
use url::Url;

use super::challenge::{self, BearerChallenge};
use super::error::{KvError, describe, retry_after};
use crate::http::{read_body, without_url};
use crate::identity::TokenCache;
use crate::secret::SecretBytes;

/// A secret as delivered: its value and what Key Vault says about it.
pub struct SecretBundle {
    pub value: SecretBytes,
    pub version: String,
    pub content_type: Option<String>,
}

/// How hard to retry one read before giving up on it for this sync.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub min_delay: Duration,
    pub max_delay: Duration,
    pub max_times: usize,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            min_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(30),
            max_times: 4,
        }
    }
}

pub struct KeyVault {
    http: reqwest::Client,
    vault: Url,
    host: String,
    api_version: String,
    tokens: Arc<TokenCache>,
    verify_resource: bool,
    auth: tokio::sync::RwLock<Option<BearerChallenge>>,
    /// Held while one read discovers the challenge, so the others of a sync (up to the
    /// fetch concurrency) wait for it instead of each sending their own anonymous request.
    discovering: tokio::sync::Mutex<()>,
    policy: RetryPolicy,
}

impl KeyVault {
    pub fn new(
        http: reqwest::Client,
        vault: Url,
        api_version: String,
        tokens: Arc<TokenCache>,
        verify_resource: bool,
        policy: RetryPolicy,
    ) -> Self {
        let host = vault.host_str().unwrap_or_default().to_owned();
        Self {
            http,
            vault,
            host,
            api_version,
            tokens,
            verify_resource,
            auth: Default::default(),
            discovering: Default::default(),
            policy,
        }
    }

    pub fn vault(&self) -> &Url {
        &self.vault
    }

    /// `GET /secrets/{name}[/{version}]`.
    pub async fn get_secret(
        &self,
        name: &str,
        version: Option<&str>,
    ) -> Result<SecretBundle, KvError> {
        let path = match version {
            Some(v) => format!("secrets/{name}/{v}"),
            None => format!("secrets/{name}"),
        };
        self.get_with_retries(&path, name, |body| parse_secret(name, body))
            .await
    }

    /// `GET /certificates/{name}[/{version}]`: the public certificate (DER).
    pub async fn get_certificate(
        &self,
        name: &str,
        version: Option<&str>,
    ) -> Result<(Vec<u8>, String), KvError> {
        let path = match version {
            Some(v) => format!("certificates/{name}/{v}"),
            None => format!("certificates/{name}"),
        };
        self.get_with_retries(&path, name, |body| parse_certificate(name, body))
            .await
    }

    /// One read with retries; a response that does not parse counts as a failed attempt
    /// (a proxy or an outage can truncate a body) and is retried too.
    /// `GET /keys/{name}[/{version}]`: the public key as PEM.
    pub async fn get_public_key(
        &self,
        name: &str,
        version: Option<&str>,
    ) -> Result<(Vec<u8>, String), KvError> {
        let path = match version {
            Some(v) => format!("keys/{name}/{v}"),
            None => format!("keys/{name}"),
        };
        self.get_with_retries(&path, name, |body| parse_key(name, body))
            .await
    }

    async fn get_with_retries<T>(
        &self,
        path: &str,
        object: &str,
        parse: impl Fn(&[u8]) -> Result<T, KvError>,
    ) -> Result<T, KvError> {
        let backoff = ExponentialBuilder::default()
            .with_min_delay(self.policy.min_delay)
            .with_max_delay(self.policy.max_delay)
            .with_max_times(self.policy.max_times)
            .with_jitter();
        (|| async { parse(&self.get_once(path, object).await?) })
            .retry(backoff)
            .when(KvError::is_transient)
            // The service's own hint wins over our schedule, but never ends the retries.
            .adjust(|e, next| next.map(|d| e.retry_after().map_or(d, |ra| ra.max(d))))
            .notify(|e, d| tracing::debug!(object, error = %e, retry_in = ?d, "retrying"))
            .await
    }

    fn url(&self, path: &str) -> Result<Url, KvError> {
        let mut u = self.vault.join(path).map_err(|e| KvError::Service {
            object: path.to_owned(),
            status: None,
            code: None,
            message: format!("invalid URL: {e}"),
            transient: false,
            retry_after: None,
        })?;
        u.query_pairs_mut()
            .append_pair("api-version", &self.api_version);
        Ok(u)
    }

    async fn get_once(
        &self,
        path: &str,
        object: &str,
    ) -> Result<zeroize::Zeroizing<Vec<u8>>, KvError> {
        let url = self.url(path)?;
        let known = self.auth.read().await.clone();
        let challenge = match known {
            Some(c) => c,
            None => {
                let _one_at_a_time = self.discovering.lock().await;
                // Another read may have learnt it while this one waited.
                let learnt = self.auth.read().await.clone();
                match learnt {
                    Some(c) => c,
                    None => self.discover(&url, object).await?,
                }
            }
        };
        let token = self
            .tokens
            .get(&challenge.scope, challenge.tenant.as_deref())
            .await
            .map_err(|source| KvError::Identity {
                object: object.to_owned(),
                source,
            })?;
        let resp = self
            .http
            .get(url.clone())
            .bearer_auth(token.expose())
            .send()
            .await
            .map_err(|e| transport(object, &self.host, &e))?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        if status == 401 {
            // The vault moved tenants or wants another scope: learn the new challenge and
            // start over with a fresh token (the retry does that).
            self.tokens.invalidate(&challenge.scope).await;
            if let Some(h) = headers
                .get("www-authenticate")
                .and_then(|v| v.to_str().ok())
            {
                let c =
                    challenge::bearer(h, &self.host, self.verify_resource).map_err(|source| {
                        KvError::Challenge {
                            object: object.to_owned(),
                            source,
                        }
                    })?;
                *self.auth.write().await = Some(c);
            }
        }
        let body = read_body(resp).await.map_err(|e| KvError::Service {
            object: object.to_owned(),
            status: Some(status),
            code: None,
            message: e.to_string(),
            transient: true,
            retry_after: None,
        })?;
        if (200..300).contains(&status) {
            if body.is_empty() {
                return Err(malformed(object, "empty response body"));
            }
            return Ok(body);
        }
        let (code, message) = describe(status, &body);
        Err(KvError::Service {
            object: object.to_owned(),
            status: Some(status),
            code,
            message,
            // 401 once is a stale token (retried with a new one); 403/404/400 need a person.
            transient: matches!(status, 401 | 408 | 429) || status >= 500,
            retry_after: retry_after(&headers),
        })
    }

    /// An unauthenticated request, answered with the 401 challenge that says which
    /// tenant and scope the vault wants.
    async fn discover(&self, url: &Url, object: &str) -> Result<BearerChallenge, KvError> {
        let resp = self
            .http
            .get(url.clone())
            .send()
            .await
            .map_err(|e| transport(object, &self.host, &e))?;
        let status = resp.status().as_u16();
        let header = resp
            .headers()
            .get("www-authenticate")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        match (status, header) {
            (401, Some(h)) => {
                let c =
                    challenge::bearer(&h, &self.host, self.verify_resource).map_err(|source| {
                        KvError::Challenge {
                            object: object.to_owned(),
                            source,
                        }
                    })?;
                tracing::info!(vault = %self.host, scope = %c.scope, tenant = c.tenant.as_deref().unwrap_or(""), "vault authentication challenge");
                *self.auth.write().await = Some(c.clone());
                Ok(c)
            }
            (s, _) => {
                let retry = retry_after(resp.headers());
                let body = read_body(resp).await.unwrap_or_default();
                let (code, message) = describe(s, &body);
                Err(KvError::Service {
                    object: object.to_owned(),
                    status: Some(s),
                    code,
                    message: format!("expected a 401 authentication challenge, got {message}"),
                    transient: s == 429 || s >= 500,
                    retry_after: retry,
                })
            }
        }
    }
}

pub(crate) fn parse_secret(name: &str, body: &[u8]) -> Result<SecretBundle, KvError> {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Bundle {
        value: Option<String>,
        id: Option<String>,
        content_type: Option<String>,
    }
    let b: Bundle = serde_json::from_slice(body).map_err(|e| malformed(name, &e.to_string()))?;
    let value = b
        .value
        .ok_or_else(|| malformed(name, "no value in the response"))?;
    let version =
        b.id.as_deref()
            .and_then(|id| id.rsplit('/').next())
            .unwrap_or_default()
            .to_owned();
    Ok(SecretBundle {
        value: SecretBytes::new(value.into_bytes()),
        version,
        content_type: b.content_type,
    })
}

pub(crate) fn parse_key(name: &str, body: &[u8]) -> Result<(Vec<u8>, String), KvError> {
    #[derive(serde::Deserialize)]
    struct Bundle {
        key: Option<super::jwk::Jwk>,
    }
    let b: Bundle = serde_json::from_slice(body).map_err(|e| malformed(name, &e.to_string()))?;
    let jwk = b
        .key
        .ok_or_else(|| malformed(name, "no key in the response"))?;
    let pem = super::jwk::public_pem(&jwk).map_err(|why| KvError::Service {
        object: name.to_owned(),
        status: Some(200),
        code: None,
        message: why,
        transient: false,
        retry_after: None,
    })?;
    let version = jwk
        .kid
        .as_deref()
        .and_then(|id| id.rsplit('/').next())
        .unwrap_or_default()
        .to_owned();
    Ok((pem, version))
}

pub(crate) fn parse_certificate(name: &str, body: &[u8]) -> Result<(Vec<u8>, String), KvError> {
    #[derive(serde::Deserialize)]
    struct Cert {
        cer: Option<String>,
        id: Option<String>,
    }
    let c: Cert = serde_json::from_slice(body).map_err(|e| malformed(name, &e.to_string()))?;
    let der = c
        .cer
        .as_deref()
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
        .ok_or_else(|| malformed(name, "no valid cer in the response"))?;
    let version =
        c.id.as_deref()
            .and_then(|id| id.rsplit('/').next())
            .unwrap_or_default()
            .to_owned();
    Ok((der, version))
}

fn malformed(object: &str, why: &str) -> KvError {
    KvError::Service {
        object: object.to_owned(),
        status: Some(200),
        code: None,
        message: format!("malformed response from Key Vault: {why}"),
        transient: true,
        retry_after: None,
    }
}

fn transport(object: &str, host: &str, e: &reqwest::Error) -> KvError {
    KvError::Service {
        object: object.to_owned(),
        status: None,
        code: None,
        message: format!("{host}: {}", without_url(e)),
        transient: true,
        retry_after: None,
    }
}
