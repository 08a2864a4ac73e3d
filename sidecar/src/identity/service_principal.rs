//! A service principal with a client secret or a client certificate, for clusters without
//! workload identity. The certificate signs a short-lived JWT client assertion (RS256).

use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rsa::pkcs1v15::SigningKey;
use rsa::signature::{SignatureEncoding, Signer};
use sha2::{Digest, Sha256};

use super::entra::{Credential, client_credentials};
use super::{Env, IdentityError, TokenFuture, TokenSource};
use crate::config::Config;
use crate::http::Clients;
use crate::secret::Token;

const NAME: &str = "service principal";

enum Proof {
    Secret(Token),
    Certificate(PathBuf),
}

pub struct ServicePrincipal {
    http: reqwest::Client,
    authority: String,
    tenant: String,
    client_id: String,
    proof: Proof,
}

impl ServicePrincipal {
    pub fn new(
        cfg: &Config,
        env: &Env,
        clients: &Clients,
        authority: String,
    ) -> Result<Self, IdentityError> {
        let client_id = cfg
            .client_id
            .clone()
            .or_else(|| env.get("AZURE_CLIENT_ID").map(str::to_owned))
            .ok_or_else(|| {
                IdentityError::permanent(NAME, "AZURE_CLIENT_ID (or clientID) is not set")
            })?;
        let tenant = cfg
            .tenant_id
            .clone()
            .or_else(|| env.get("AZURE_TENANT_ID").map(str::to_owned))
            .ok_or_else(|| {
                IdentityError::permanent(NAME, "AZURE_TENANT_ID (or tenantId) is not set")
            })?;
        let proof = match (
            env.get("AZURE_CLIENT_SECRET"),
            env.get("AZURE_CLIENT_CERTIFICATE_PATH"),
        ) {
            (Some(s), _) => Proof::Secret(Token::new(s.to_owned())),
            (None, Some(p)) => {
                let p = PathBuf::from(p);
                // Fail now, not at the first request, if the certificate cannot be used.
                load_certificate(&p)?;
                Proof::Certificate(p)
            }
            (None, None) => {
                return Err(IdentityError::permanent(
                    NAME,
                    "neither AZURE_CLIENT_SECRET nor AZURE_CLIENT_CERTIFICATE_PATH is set",
                ));
            }
        };
        Ok(Self {
            http: clients.external.clone(),
            authority,
            tenant,
            client_id,
            proof,
        })
    }

    fn assertion(&self, path: &std::path::Path) -> Result<Token, IdentityError> {
        let (key, thumbprint) = load_certificate(path)?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let mut jti = [0u8; 16];
        let _ = getrandom::fill(&mut jti);
        let header = serde_json::json!({"alg": "RS256", "typ": "JWT", "x5t#S256": thumbprint});
        let claims = serde_json::json!({
            "aud": format!("{}/{}/oauth2/v2.0/token", self.authority, self.tenant),
            "iss": self.client_id,
            "sub": self.client_id,
            "jti": URL_SAFE_NO_PAD.encode(jti),
            "nbf": now,
            "iat": now,
            "exp": now + 600,
        });
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let sig = key.sign(signing_input.as_bytes()).to_vec();
        Ok(Token::new(format!(
            "{signing_input}.{}",
            URL_SAFE_NO_PAD.encode(sig)
        )))
    }
}

/// The RSA key and the certificate's SHA-256 thumbprint from a PEM file holding both.
fn load_certificate(path: &std::path::Path) -> Result<(SigningKey<Sha256>, String), IdentityError> {
    use rsa::pkcs1::DecodeRsaPrivateKey;
    use rsa::pkcs8::DecodePrivateKey;
    use rustls_pki_types::pem::{PemObject, SectionKind};
    let fail = |why: String| {
        IdentityError::permanent(
            NAME,
            format!("client certificate {}: {why}", path.display()),
        )
    };
    let pem = zeroize::Zeroizing::new(std::fs::read(path).map_err(|e| fail(e.to_string()))?);
    let mut key = None;
    let mut cert = None;
    for item in <(SectionKind, Vec<u8>)>::pem_slice_iter(&pem) {
        let (kind, der) = item.map_err(|e| fail(e.to_string()))?;
        match kind {
            SectionKind::PrivateKey => key = rsa::RsaPrivateKey::from_pkcs8_der(&der).ok(),
            SectionKind::RsaPrivateKey => key = rsa::RsaPrivateKey::from_pkcs1_der(&der).ok(),
            SectionKind::Certificate if cert.is_none() => cert = Some(der),
            _ => {}
        }
    }
    let key = key.ok_or_else(|| fail("no RSA private key in it (PKCS#8 or PKCS#1 PEM)".into()))?;
    let cert = cert.ok_or_else(|| fail("no certificate in it".into()))?;
    Ok((
        SigningKey::<Sha256>::new(key),
        URL_SAFE_NO_PAD.encode(Sha256::digest(&cert)),
    ))
}

impl TokenSource for ServicePrincipal {
    fn name(&self) -> &'static str {
        NAME
    }

    fn fetch<'a>(&'a self, scope: &'a str, _tenant: Option<&'a str>) -> TokenFuture<'a> {
        Box::pin(async move {
            let credential = match &self.proof {
                Proof::Secret(s) => Credential::Secret(s.duplicate()),
                Proof::Certificate(p) => Credential::Assertion(self.assertion(p)?),
            };
            client_credentials(
                &self.http,
                NAME,
                &self.authority,
                &self.tenant,
                &self.client_id,
                scope,
                credential,
            )
            .await
        })
    }
}
