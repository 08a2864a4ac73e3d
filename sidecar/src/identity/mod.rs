//! Managed identity: where tokens come from (one [`TokenSource`] per kind) and the cache
//! that refreshes them 5 minutes before they expire. Tokens are never logged.

pub mod arc;
mod entra;
pub mod imds;
pub mod service_principal;
pub mod workload;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

use crate::config::{Config, IdentityChoice};
use crate::http::{Clients, one_line};
use crate::secret::Token;

/// A bearer token and when it stops working.
pub struct AccessToken {
    pub token: Token,
    pub expires_at: Instant,
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("{source_name}: {message}")]
pub struct IdentityError {
    pub source_name: &'static str,
    pub message: String,
    /// Worth retrying later (network, throttling, 5xx) rather than a configuration error.
    pub transient: bool,
}

impl IdentityError {
    pub fn permanent(source_name: &'static str, message: impl Into<String>) -> Self {
        Self {
            source_name,
            message: message.into(),
            transient: false,
        }
    }
    pub fn transient(source_name: &'static str, message: impl Into<String>) -> Self {
        Self {
            source_name,
            message: message.into(),
            transient: true,
        }
    }
}

pub type TokenFuture<'a> =
    Pin<Box<dyn Future<Output = Result<AccessToken, IdentityError>> + Send + 'a>>;

/// One way of getting tokens.
pub trait TokenSource: Send + Sync {
    /// For logs and metrics.
    fn name(&self) -> &'static str;
    /// A fresh token for `scope` (e.g. `https://vault.azure.net/.default`). `tenant` is the
    /// tenant the resource's challenge named, for sources that can use it.
    fn fetch<'a>(&'a self, scope: &'a str, tenant: Option<&'a str>) -> TokenFuture<'a>;
    /// Local checks only (files present and readable), for `--check-config`.
    fn preflight(&self) -> Result<(), IdentityError> {
        Ok(())
    }
}

/// The environment the identity sources read, captured once (tests pass their own).
#[derive(Debug, Clone, Default)]
pub struct Env {
    vars: HashMap<String, String>,
}

impl Env {
    pub fn from_process() -> Self {
        Self {
            vars: std::env::vars().collect(),
        }
    }

    pub fn from_pairs(pairs: &[(&str, &str)]) -> Self {
        Self {
            vars: pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        }
    }

    pub fn get(&self, k: &str) -> Option<&str> {
        self.vars
            .get(k)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }
}

/// Picks the token source: the configured one, or with `auto` the first that applies in
/// the Azure SDKs' order (service principal from the environment, workload identity, Arc,
/// IMDS). Everything it needs is checked here, before any request.
pub fn select(
    cfg: &Config,
    env: &Env,
    clients: &Clients,
) -> Result<Box<dyn TokenSource>, IdentityError> {
    let choice = match cfg.identity {
        IdentityChoice::Auto => {
            if env.get("AZURE_CLIENT_SECRET").is_some()
                || env.get("AZURE_CLIENT_CERTIFICATE_PATH").is_some()
            {
                IdentityChoice::ServicePrincipal
            } else if env.get("AZURE_FEDERATED_TOKEN_FILE").is_some() {
                IdentityChoice::WorkloadIdentity
            } else if env.get("IDENTITY_ENDPOINT").is_some() && env.get("IMDS_ENDPOINT").is_some() {
                IdentityChoice::Arc
            } else {
                IdentityChoice::Imds
            }
        }
        c => c,
    };
    let authority = authority_host(cfg, env)?;
    Ok(match choice {
        IdentityChoice::WorkloadIdentity => Box::new(workload::WorkloadIdentity::new(
            cfg, env, clients, authority,
        )?),
        IdentityChoice::ServicePrincipal => Box::new(service_principal::ServicePrincipal::new(
            cfg, env, clients, authority,
        )?),
        IdentityChoice::Arc => Box::new(arc::ArcHimds::new(cfg, env, clients)?),
        IdentityChoice::Imds | IdentityChoice::Auto => {
            Box::new(imds::Imds::new(cfg, env, clients)?)
        }
    })
}

/// `AZURE_AUTHORITY_HOST`, or the cloud's; https only, as the SDKs insist.
fn authority_host(cfg: &Config, env: &Env) -> Result<String, IdentityError> {
    let a = env
        .get("AZURE_AUTHORITY_HOST")
        .unwrap_or(&cfg.cloud.authority_host)
        .trim_end_matches('/')
        .to_owned();
    if !a.starts_with("https://") {
        return Err(IdentityError::permanent(
            "identity",
            format!("authority host {a:?} must use https"),
        ));
    }
    Ok(a)
}

/// Refresh this long before expiry (all Azure SDKs do).
pub const REFRESH_MARGIN: Duration = Duration::from_secs(300);
/// And not more often than this when a refresh fails but the cached token still works.
pub const MIN_REFRESH_GAP: Duration = Duration::from_secs(30);

struct Cached {
    token: AccessToken,
    last_attempt: Instant,
}

/// Tokens per scope, refreshed ahead of expiry; a failed early refresh keeps the cached
/// token in use until it really expires.
pub struct TokenCache {
    source: Box<dyn TokenSource>,
    cached: tokio::sync::Mutex<HashMap<String, Cached>>,
    refreshes: std::sync::atomic::AtomicU64,
}

impl TokenCache {
    pub fn new(source: Box<dyn TokenSource>) -> Self {
        Self {
            source,
            cached: tokio::sync::Mutex::new(HashMap::new()),
            refreshes: Default::default(),
        }
    }

    pub fn source_name(&self) -> &'static str {
        self.source.name()
    }

    /// Tokens fetched from the source so far (for metrics).
    pub fn refreshes(&self) -> u64 {
        self.refreshes.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// A token for `scope` that is valid for at least a few more minutes, if one can be had.
    pub async fn get(&self, scope: &str, tenant: Option<&str>) -> Result<Token, IdentityError> {
        let mut cache = self.cached.lock().await;
        let now = Instant::now();
        if let Some(c) = cache.get(scope) {
            let fresh = c.token.expires_at.saturating_duration_since(now) > REFRESH_MARGIN;
            let recently_tried = now.duration_since(c.last_attempt) < MIN_REFRESH_GAP;
            if fresh || (recently_tried && c.token.expires_at > now) {
                return Ok(c.token.token.duplicate());
            }
        }
        let result = self.source.fetch(scope, tenant).await;
        self.refreshes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        match result {
            Ok(token) => {
                let t = token.token.duplicate();
                tracing::debug!(source = self.source.name(), scope, valid_for = ?token.expires_at.saturating_duration_since(now), "got a token");
                cache.insert(
                    scope.to_owned(),
                    Cached {
                        token,
                        last_attempt: now,
                    },
                );
                Ok(t)
            }
            Err(e) => match cache.get_mut(scope) {
                Some(c) if c.token.expires_at > now => {
                    c.last_attempt = now;
                    tracing::warn!(source = self.source.name(), error = %e, "token refresh failed; using the cached token until it expires");
                    Ok(c.token.token.duplicate())
                }
                _ => Err(e),
            },
        }
    }

    /// Forgets a token the resource rejected.
    pub async fn invalidate(&self, scope: &str) {
        self.cached.lock().await.remove(scope);
    }
}

/// `expires_in` arrives as a number (Entra ID) or a string (IMDS, HIMDS).
pub(crate) fn expires_in(v: &serde_json::Value) -> Option<u64> {
    match v {
        serde_json::Value::Number(n) => n.as_u64(),
        serde_json::Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

/// No token is kept longer than this, whatever its `expires_in` says: Entra ID's access
/// tokens live about a day (up to 28 h with continuous access evaluation), and an absurd
/// value must neither overflow the clock nor keep a token cached for ever.
pub const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(48 * 3600);

/// Parses a token response body shared by all sources.
pub(crate) fn parse_token(source: &'static str, body: &[u8]) -> Result<AccessToken, IdentityError> {
    #[derive(serde::Deserialize)]
    struct Resp {
        access_token: Option<String>,
        expires_in: Option<serde_json::Value>,
    }
    let r: Resp = serde_json::from_slice(body).map_err(|e| {
        IdentityError::transient(source, format!("token response is not valid JSON: {e}"))
    })?;
    let token = r
        .access_token
        .filter(|t| !t.is_empty())
        .ok_or_else(|| IdentityError::transient(source, "token response has no access_token"))?;
    let secs = r.expires_in.as_ref().and_then(expires_in).ok_or_else(|| {
        IdentityError::transient(source, "token response has no valid expires_in")
    })?;
    Ok(AccessToken {
        token: Token::new(token),
        expires_at: Instant::now() + Duration::from_secs(secs).min(MAX_TOKEN_LIFETIME),
    })
}

/// Entra ID / IMDS error bodies: `{"error": "...", "error_description": "..."}`, on one
/// line (the first line of the description; anything else that is not JSON, such as a
/// proxy's HTML page, cut to 200 bytes).
pub(crate) fn error_text(body: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct E {
        error: Option<serde_json::Value>,
        error_description: Option<String>,
        message: Option<String>,
    }
    match serde_json::from_slice::<E>(body) {
        Ok(e) => {
            let code = match e.error {
                Some(serde_json::Value::String(s)) => s,
                Some(other) => other.to_string(),
                None => String::new(),
            };
            let desc = e.error_description.or(e.message).unwrap_or_default();
            let desc = desc.lines().next().unwrap_or_default();
            format!("{}: {}", one_line(&code), one_line(desc))
                .trim_matches([':', ' '])
                .to_owned()
        }
        Err(_) => one_line(&String::from_utf8_lossy(&body[..body.len().min(200)])),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_expires_in_forms() {
        let a = parse_token(
            "t",
            br#"{"access_token":"x","expires_in":3599,"token_type":"Bearer"}"#,
        )
        .unwrap();
        assert!(a.expires_at > Instant::now() + Duration::from_secs(3500));
        let b = parse_token(
            "t",
            br#"{"access_token":"x","expires_in":"3599","resource":"r"}"#,
        )
        .unwrap();
        assert!(b.expires_at > Instant::now() + Duration::from_secs(3500));
        // Found by the token_json fuzz target: this used to overflow `Instant`.
        let far = parse_token(
            "t",
            br#"{"access_token":"x","expires_in":"18446744073709551615"}"#,
        )
        .unwrap();
        assert!(far.expires_at <= Instant::now() + MAX_TOKEN_LIFETIME);
        assert!(parse_token("t", br#"{"expires_in":1}"#).is_err());
        assert!(parse_token("t", b"not json").is_err());
        assert!(parse_token("t", br#"{"access_token":"x","expires_in":"soon"}"#).is_err());
    }

    #[test]
    fn error_text_from_aadsts() {
        let t = error_text(br#"{"error":"invalid_client","error_description":"AADSTS70021: No matching federated identity record found.\r\nTrace ID: x"}"#);
        assert_eq!(
            t,
            "invalid_client: AADSTS70021: No matching federated identity record found."
        );
    }

    struct Counting(std::sync::atomic::AtomicU32, u64);
    impl TokenSource for Counting {
        fn name(&self) -> &'static str {
            "counting"
        }
        fn fetch<'a>(&'a self, _: &'a str, _: Option<&'a str>) -> TokenFuture<'a> {
            Box::pin(async move {
                let n = self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if n >= 1 && self.1 == 0 {
                    return Err(IdentityError::transient("counting", "down"));
                }
                Ok(AccessToken {
                    token: Token::new(format!("t{n}")),
                    expires_at: Instant::now() + Duration::from_secs(self.1.max(1)),
                })
            })
        }
    }

    #[tokio::test]
    async fn cache_reuses_and_refreshes() {
        let c = TokenCache::new(Box::new(Counting(Default::default(), 3600)));
        assert_eq!(c.get("s", None).await.unwrap().expose(), "t0");
        assert_eq!(
            c.get("s", None).await.unwrap().expose(),
            "t0",
            "fresh token reused"
        );
        assert_eq!(
            c.get("other", None).await.unwrap().expose(),
            "t1",
            "per scope"
        );
        // A token inside the refresh margin is replaced.
        let short = TokenCache::new(Box::new(Counting(Default::default(), 60)));
        assert_eq!(short.get("s", None).await.unwrap().expose(), "t0");
        short.cached.lock().await.get_mut("s").unwrap().last_attempt -= MIN_REFRESH_GAP;
        assert_eq!(short.get("s", None).await.unwrap().expose(), "t1");
    }
}
