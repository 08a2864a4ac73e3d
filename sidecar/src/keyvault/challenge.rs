//! `WWW-Authenticate` challenges: Key Vault's `Bearer authorization=..., resource=...`
//! (or `scope=`) and Arc HIMDS's `Basic realm=...`. A small parser for the RFC 7235
//! auth-param syntax; everything it returns is untrusted input.

use url::Url;

/// One challenge: its scheme and its `name=value` parameters (names lowercased).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    pub scheme: String,
    pub params: Vec<(String, String)>,
}

impl Challenge {
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Parses a header value into its challenges. Malformed parts end the parse; what was
/// understood before them is kept.
pub fn parse(header: &str) -> Vec<Challenge> {
    let mut out: Vec<Challenge> = Vec::new();
    let mut rest = header.trim();
    while !rest.is_empty() {
        // A token followed by space or '=' decides between a new scheme and a parameter.
        let tok_end = rest.find([' ', '=', ',']).unwrap_or(rest.len());
        let token = &rest[..tok_end];
        let after = rest[tok_end..].trim_start();
        if token.is_empty() {
            rest = after.strip_prefix(',').unwrap_or(after).trim_start();
            if rest.len() == after.len() {
                break;
            }
            continue;
        }
        if let Some(v) = after.strip_prefix('=') {
            // name=value (quoted or token)
            let v = v.trim_start();
            let (value, remaining) = if let Some(q) = v.strip_prefix('"') {
                match quoted(q) {
                    Some(pair) => pair,
                    None => break,
                }
            } else {
                let end = v.find([',', ' ']).unwrap_or(v.len());
                (v[..end].to_owned(), &v[end..])
            };
            match out.last_mut() {
                Some(c) => c.params.push((token.to_ascii_lowercase(), value)),
                None => break,
            }
            rest = remaining.trim_start();
            rest = rest.strip_prefix(',').unwrap_or(rest).trim_start();
        } else {
            out.push(Challenge {
                scheme: token.to_owned(),
                params: Vec::new(),
            });
            rest = after.strip_prefix(',').unwrap_or(after).trim_start();
        }
    }
    out
}

/// The content of a quoted string (after the opening quote) and what follows it.
fn quoted(s: &str) -> Option<(String, &str)> {
    let mut value = String::new();
    let mut chars = s.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Some((value, &s[i + 1..])),
            '\\' => value.push(chars.next()?.1),
            c => value.push(c),
        }
    }
    None
}

/// What a Key Vault Bearer challenge tells a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BearerChallenge {
    /// The token scope to ask for, e.g. `https://vault.azure.net/.default`.
    pub scope: String,
    /// The tenant named by the authorization URI, if any.
    pub tenant: Option<String>,
    /// The resource's host, for the vault-host check.
    pub resource_host: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChallengeError {
    #[error("the vault answered 401 without a Bearer challenge: is {0} really a Key Vault?")]
    NoBearer(String),
    #[error("the Bearer challenge names neither a resource nor a scope")]
    NoScope,
    #[error("the challenge's resource {0:?} is not a URL")]
    BadResource(String),
    #[error(
        "the vault {vault} asked for a token for {resource}, which is not its domain: refusing to \
         send a token there (challenge-resource verification; disable it only for a vault behind \
         a custom domain you trust)"
    )]
    ResourceMismatch { vault: String, resource: String },
}

/// Reads Key Vault's challenge and, if `verify`, checks that the resource it asks a token
/// for belongs to the vault's own domain (as the Azure SDKs do), so a spoofed vault URL
/// cannot collect tokens for another service.
pub fn bearer(
    header: &str,
    vault_host: &str,
    verify: bool,
) -> Result<BearerChallenge, ChallengeError> {
    let all = parse(header);
    let c = all
        .iter()
        .find(|c| c.scheme.eq_ignore_ascii_case("bearer"))
        .ok_or_else(|| ChallengeError::NoBearer(vault_host.to_owned()))?;
    let scope = match (c.param("scope"), c.param("resource")) {
        (Some(s), _) if !s.is_empty() => s.to_owned(),
        (_, Some(r)) if !r.is_empty() => format!("{}/.default", r.trim_end_matches('/')),
        _ => return Err(ChallengeError::NoScope),
    };
    let resource = scope.trim_end_matches("/.default");
    let resource_host = Url::parse(resource)
        .ok()
        .and_then(|u| u.host_str().map(str::to_owned))
        .ok_or_else(|| ChallengeError::BadResource(resource.to_owned()))?;
    if verify {
        let v = vault_host.to_ascii_lowercase();
        let r = resource_host.to_ascii_lowercase();
        if !v.ends_with(&format!(".{r}")) {
            return Err(ChallengeError::ResourceMismatch {
                vault: vault_host.to_owned(),
                resource: resource_host,
            });
        }
    }
    let tenant = c
        .param("authorization")
        .or_else(|| c.param("authorization_uri"))
        .and_then(|a| Url::parse(a).ok())
        .and_then(|u| {
            u.path_segments()
                .and_then(|mut s| s.next().map(str::to_owned))
        })
        .filter(|t| !t.is_empty());
    Ok(BearerChallenge {
        scope,
        tenant,
        resource_host,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_vault_challenge() {
        let h = r#"Bearer authorization="https://login.microsoftonline.com/72f988bf-86f1-41af-91ab-2d7cd011db47", resource="https://vault.azure.net""#;
        let c = bearer(h, "myvault.vault.azure.net", true).unwrap();
        assert_eq!(c.scope, "https://vault.azure.net/.default");
        assert_eq!(
            c.tenant.as_deref(),
            Some("72f988bf-86f1-41af-91ab-2d7cd011db47")
        );
        // China and US Government are taken from the challenge, not hard-coded.
        let cn = r#"Bearer authorization="https://login.chinacloudapi.cn/t1", resource="https://vault.azure.cn""#;
        assert_eq!(
            bearer(cn, "kv.vault.azure.cn", true).unwrap().scope,
            "https://vault.azure.cn/.default"
        );
        let scoped = r#"Bearer authorization="https://login.microsoftonline.us/t2", scope="https://vault.usgovcloudapi.net/.default""#;
        let c = bearer(scoped, "kv.vault.usgovcloudapi.net", true).unwrap();
        assert_eq!(
            (c.scope.as_str(), c.tenant.as_deref()),
            ("https://vault.usgovcloudapi.net/.default", Some("t2"))
        );
    }

    #[test]
    fn resource_verification() {
        let h = r#"Bearer authorization="https://login.microsoftonline.com/t", resource="https://vault.azure.net""#;
        assert!(matches!(
            bearer(h, "evil.example.com", true),
            Err(ChallengeError::ResourceMismatch { .. })
        ));
        assert!(matches!(
            bearer(h, "vault.azure.net", true),
            Err(ChallengeError::ResourceMismatch { .. })
        ));
        assert!(bearer(h, "evil.example.com", false).is_ok());
        assert!(matches!(
            bearer("Basic realm=\"x\"", "kv", true),
            Err(ChallengeError::NoBearer(_))
        ));
        assert_eq!(
            bearer("Bearer authorization=\"https://l/t\"", "kv", false),
            Err(ChallengeError::NoScope)
        );
    }

    #[test]
    fn arc_basic_realm_and_odd_input() {
        let c = parse("Basic realm=/var/opt/azcmagent/tokens/abc.key");
        assert_eq!(c[0].scheme, "Basic");
        assert_eq!(
            c[0].param("realm"),
            Some("/var/opt/azcmagent/tokens/abc.key")
        );
        let q = parse(r#"Bearer a="x\"y", b=z, Basic realm="r""#);
        assert_eq!(q[0].param("a"), Some("x\"y"));
        assert_eq!(q[0].param("b"), Some("z"));
        assert_eq!(q[1].param("realm"), Some("r"));
        for junk in [
            "",
            "=",
            "\"",
            "Bearer a=\"unterminated",
            ",,,",
            "a=b",
            "Bearer ,=,",
            "Bearer a = ",
        ] {
            let _ = parse(junk);
        }
    }

    proptest::proptest! {
        /// Whatever a server puts in WWW-Authenticate, parsing never panics, and a verified
        /// challenge always names a resource inside the vault's domain.
        #[test]
        fn never_panics_and_verification_holds(header in "\\PC{0,300}", host in "[a-z0-9.]{1,40}") {
            let _ = parse(&header);
            if let Ok(c) = bearer(&header, &host, true) {
                let suffix = format!(".{}", c.resource_host);
                proptest::prop_assert!(host.ends_with(&suffix), "{} vs {}", host, suffix);
            }
        }

        #[test]
        fn structured_headers_round_trip(tenant in "[a-z0-9-]{1,36}", sub in "[a-z0-9]{1,20}") {
            let h = format!("Bearer authorization=\"https://login.example/{tenant}\", resource=\"https://vault.example.net\"");
            let c = bearer(&h, &format!("{sub}.vault.example.net"), true).unwrap();
            proptest::prop_assert_eq!(c.tenant.as_deref(), Some(tenant.as_str()));
            proptest::prop_assert_eq!(c.scope.as_str(), "https://vault.example.net/.default");
        }
    }
}
