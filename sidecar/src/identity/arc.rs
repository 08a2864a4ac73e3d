//! Azure Arc HIMDS (Arc-enabled servers, host-network agents): a 401 challenge names a
//! key file that proves local access; it is read only if it is what HIMDS would write.

use std::path::{Path, PathBuf};

use super::{Env, IdentityError, TokenFuture, TokenSource, error_text, parse_token};
use crate::config::Config;
use crate::http::{Clients, read_body, without_url};
use crate::keyvault::challenge;
use crate::secret::Token;

const NAME: &str = "Azure Arc HIMDS";
const MAX_KEY_FILE: u64 = 4096;

pub struct ArcHimds {
    http: reqwest::Client,
    endpoint: String,
    token_dir: PathBuf,
}

impl ArcHimds {
    pub fn new(cfg: &Config, env: &Env, clients: &Clients) -> Result<Self, IdentityError> {
        let endpoint = env.get("IDENTITY_ENDPOINT").ok_or_else(|| {
            IdentityError::permanent(
                NAME,
                "IDENTITY_ENDPOINT is not set (the Arc agent sets it on Arc-enabled servers)",
            )
        })?;
        if env.get("IMDS_ENDPOINT").is_none() {
            return Err(IdentityError::permanent(NAME, "IMDS_ENDPOINT is not set"));
        }
        Ok(Self {
            http: clients.local.clone(),
            endpoint: endpoint.to_owned(),
            token_dir: cfg.arc_token_dir.clone(),
        })
    }

    /// The challenge's key file, if it is a `.key` file of at most 4 KiB directly inside
    /// the agent's token directory (anything else is refused: the path comes from the network).
    fn read_key_file(&self, realm: &str) -> Result<Token, IdentityError> {
        let path = Path::new(realm);
        let refuse = |why: &str| {
            IdentityError::permanent(
                NAME,
                format!("refusing the challenge's key file {realm:?}: {why}"),
            )
        };
        if path.parent() != Some(self.token_dir.as_path()) {
            return Err(refuse(&format!(
                "it is not directly inside {}",
                self.token_dir.display()
            )));
        }
        if path.extension().and_then(|e| e.to_str()) != Some("key") {
            return Err(refuse("it is not a .key file"));
        }
        let meta = std::fs::symlink_metadata(path).map_err(|e| refuse(&e.to_string()))?;
        if !meta.is_file() {
            return Err(refuse("it is not a regular file"));
        }
        if meta.len() > MAX_KEY_FILE {
            return Err(refuse("it is larger than 4096 bytes"));
        }
        let content = std::fs::read_to_string(path).map_err(|e| {
            refuse(&format!(
                "{e} (reading it needs membership of the himds group)"
            ))
        })?;
        Ok(Token::new(content))
    }
}

impl TokenSource for ArcHimds {
    fn name(&self) -> &'static str {
        NAME
    }

    fn preflight(&self) -> Result<(), IdentityError> {
        match std::fs::metadata(&self.token_dir) {
            Ok(m) if m.is_dir() => Ok(()),
            Ok(_) => Err(IdentityError::permanent(
                NAME,
                format!("{} is not a directory", self.token_dir.display()),
            )),
            Err(e) => Err(IdentityError::permanent(
                NAME,
                format!(
                    "the Arc agent's token directory {}: {e} (mount it from the host, or set \
                     --arc-token-dir)",
                    self.token_dir.display()
                ),
            )),
        }
    }

    fn fetch<'a>(&'a self, scope: &'a str, _tenant: Option<&'a str>) -> TokenFuture<'a> {
        Box::pin(async move {
            let resource = scope.trim_end_matches("/.default");
            let query = [("api-version", "2020-06-01"), ("resource", resource)];
            let first = self
                .http
                .get(&self.endpoint)
                .query(&query)
                .header("Metadata", "true")
                .send()
                .await
                .map_err(|e| {
                    IdentityError::transient(
                        NAME,
                        format!("{}: {}", self.endpoint, without_url(&e)),
                    )
                })?;
            if first.status().as_u16() != 401 {
                let status = first.status();
                let body = read_body(first)
                    .await
                    .map_err(|e| IdentityError::transient(NAME, e.to_string()))?;
                return Err(IdentityError::transient(
                    NAME,
                    format!(
                        "{} answered {status} instead of the 401 challenge: {}",
                        self.endpoint,
                        error_text(&body)
                    ),
                ));
            }
            let header = first
                .headers()
                .get("www-authenticate")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            let realm = challenge::parse(&header)
                .into_iter()
                .find(|c| c.scheme.eq_ignore_ascii_case("basic"))
                .and_then(|c| c.param("realm").map(str::to_owned))
                .ok_or_else(|| {
                    IdentityError::transient(NAME, "the 401 challenge has no Basic realm")
                })?;
            let key = self.read_key_file(&realm)?;
            let resp = self
                .http
                .get(&self.endpoint)
                .query(&query)
                .header("Metadata", "true")
                .header("Authorization", format!("Basic {}", key.expose()))
                .send()
                .await
                .map_err(|e| {
                    IdentityError::transient(
                        NAME,
                        format!("{}: {}", self.endpoint, without_url(&e)),
                    )
                })?;
            let status = resp.status();
            let body = read_body(resp)
                .await
                .map_err(|e| IdentityError::transient(NAME, e.to_string()))?;
            if status.is_success() {
                parse_token(NAME, &body)
            } else {
                let msg = format!("{} answered {status}: {}", self.endpoint, error_text(&body));
                Err(if status.is_server_error() || status.as_u16() == 429 {
                    IdentityError::transient(NAME, msg)
                } else {
                    IdentityError::permanent(NAME, msg)
                })
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn himds(dir: &Path) -> ArcHimds {
        crate::http::install_crypto_provider();
        ArcHimds {
            http: reqwest::Client::new(),
            endpoint: "http://127.0.0.1:1/x".into(),
            token_dir: dir.to_owned(),
        }
    }

    #[test]
    fn key_file_rules() {
        let d = tempfile::tempdir().unwrap();
        let h = himds(d.path());
        let good = d.path().join("abc.key");
        std::fs::write(&good, "secret").unwrap();
        assert_eq!(
            h.read_key_file(good.to_str().unwrap()).unwrap().expose(),
            "secret"
        );
        let wrong_ext = d.path().join("abc.txt");
        std::fs::write(&wrong_ext, "x").unwrap();
        assert!(h.read_key_file(wrong_ext.to_str().unwrap()).is_err());
        let big = d.path().join("big.key");
        std::fs::write(&big, vec![b'a'; 4097]).unwrap();
        assert!(
            h.read_key_file(big.to_str().unwrap())
                .err()
                .unwrap()
                .to_string()
                .contains("4096")
        );
        std::fs::create_dir(d.path().join("sub")).unwrap();
        let nested = d.path().join("sub/n.key");
        std::fs::write(&nested, "x").unwrap();
        assert!(h.read_key_file(nested.to_str().unwrap()).is_err());
        let traversal = format!("{}/sub/../abc.key", d.path().display());
        assert!(h.read_key_file(&traversal).is_err());
        assert!(h.read_key_file("/etc/shadow").is_err());
        let link = d.path().join("link.key");
        std::os::unix::fs::symlink("/etc/hostname", &link).unwrap();
        assert!(
            h.read_key_file(link.to_str().unwrap())
                .err()
                .unwrap()
                .to_string()
                .contains("regular file")
        );
    }
}
