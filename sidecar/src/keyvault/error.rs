//! Key Vault errors, classified: transient ones are retried and, in the refresh loop, keep
//! the last good files in place; permanent ones need the operator (the message says how).

use std::time::Duration;

use crate::http::one_line;
use crate::identity::IdentityError;
use crate::keyvault::challenge::ChallengeError;

#[derive(Debug, thiserror::Error)]
pub enum KvError {
    #[error("{object}: {message}")]
    Service {
        object: String,
        status: Option<u16>,
        code: Option<String>,
        message: String,
        transient: bool,
        retry_after: Option<Duration>,
    },
    #[error("{object}: getting a token: {source}")]
    Identity {
        object: String,
        #[source]
        source: IdentityError,
    },
    #[error("{object}: {source}")]
    Challenge {
        object: String,
        #[source]
        source: ChallengeError,
    },
}

impl KvError {
    pub fn is_transient(&self) -> bool {
        match self {
            KvError::Service { transient, .. } => *transient,
            KvError::Identity { source, .. } => source.transient,
            KvError::Challenge { .. } => false,
        }
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            KvError::Service { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// A short label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            KvError::Service {
                status: Some(429), ..
            } => "throttled",
            KvError::Service {
                status: Some(404), ..
            } => "not_found",
            KvError::Service {
                status: Some(401 | 403),
                ..
            } => "denied",
            KvError::Service {
                transient: true, ..
            } => "unavailable",
            KvError::Service { .. } => "error",
            KvError::Identity { .. } => "identity",
            KvError::Challenge { .. } => "challenge",
        }
    }
}

/// The operator-facing text of a Key Vault error body `{"error":{"code","message"}}`.
pub fn describe(status: u16, body: &[u8]) -> (Option<String>, String) {
    #[derive(serde::Deserialize)]
    struct Outer {
        error: Inner,
    }
    #[derive(serde::Deserialize)]
    struct Inner {
        code: Option<String>,
        message: Option<String>,
        innererror: Option<Box<Inner>>,
    }
    let parsed = serde_json::from_slice::<Outer>(body).ok();
    // Key Vault's messages can hold CRLFs: keep the operator's error on one line (the
    // codes too: they come from the same server).
    let code = parsed
        .as_ref()
        .and_then(|o| o.error.code.as_deref())
        .map(one_line);
    let inner = parsed
        .as_ref()
        .and_then(|o| o.error.innererror.as_ref())
        .and_then(|i| i.code.as_deref())
        .map(one_line);
    let message = parsed
        .as_ref()
        .and_then(|o| o.error.message.as_deref())
        .map(one_line)
        .unwrap_or_else(|| {
            if body.is_empty() {
                "(empty body)".into()
            } else {
                "(no error details)".into()
            }
        });
    let hint = match status {
        401 => " (the token was rejected: check the identity's tenant)",
        403 => {
            " (grant the identity the \"Key Vault Secrets User\" role on the vault, or an access policy with get on secrets)"
        }
        404 => " (check the object name and version, and that it is not deleted)",
        429 => " (Key Vault is throttling: backing off)",
        _ => "",
    };
    let codes = match (&code, &inner) {
        (Some(c), Some(i)) => format!(" [{c}/{i}]"),
        (Some(c), None) => format!(" [{c}]"),
        _ => String::new(),
    };
    (code, format!("HTTP {status}{codes}: {message}{hint}"))
}

/// `x-ms-retry-after-ms`, `retry-after-ms` or `Retry-After` (seconds), capped.
pub fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let get = |n: &str| {
        headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .and_then(|s| s.trim().parse::<u64>().ok())
    };
    let d = get("x-ms-retry-after-ms")
        .or_else(|| get("retry-after-ms"))
        .map(Duration::from_millis)
        .or_else(|| get("retry-after").map(Duration::from_secs))?;
    Some(d.min(Duration::from_secs(300)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describes_key_vault_errors() {
        let (code, msg) = describe(404, br#"{"error":{"code":"SecretNotFound","message":"A secret with (name/id) x was not found in this key vault."}}"#);
        assert_eq!(code.as_deref(), Some("SecretNotFound"));
        assert!(
            msg.contains("SecretNotFound")
                && msg.contains("not found")
                && msg.contains("name and version")
        );
        let (_, msg) = describe(403, br#"{"error":{"code":"Forbidden","message":"Caller is not authorized.","innererror":{"code":"ForbiddenByRbac"}}}"#);
        assert!(msg.contains("Forbidden/ForbiddenByRbac") && msg.contains("Secrets User"));
        assert!(describe(500, b"").1.contains("empty body"));
        assert!(describe(502, b"<html>").1.contains("no error details"));
    }

    #[test]
    fn retry_after_headers() {
        let mut h = reqwest::header::HeaderMap::new();
        assert_eq!(retry_after(&h), None);
        h.insert("retry-after", "3".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(3)));
        h.insert("x-ms-retry-after-ms", "1500".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_millis(1500)));
        h.insert("x-ms-retry-after-ms", "99999999".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(300)));
    }
}
