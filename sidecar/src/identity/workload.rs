//! Workload identity federation: the pod's projected service-account token (re-read on
//! every exchange, since kubelet rotates it) traded at Entra ID for an access token.

use std::path::PathBuf;

use super::entra::{Credential, client_credentials};
use super::{Env, IdentityError, TokenFuture, TokenSource};
use crate::config::Config;
use crate::http::Clients;
use crate::secret::Token;

const NAME: &str = "workload identity";

pub struct WorkloadIdentity {
    http: reqwest::Client,
    authority: String,
    tenant: String,
    client_id: String,
    token_file: PathBuf,
}

impl WorkloadIdentity {
    pub fn new(
        cfg: &Config,
        env: &Env,
        clients: &Clients,
        authority: String,
    ) -> Result<Self, IdentityError> {
        let missing = |v: &str| {
            IdentityError::permanent(
                NAME,
                format!(
                    "{v} is not set: label the pod azure.workload.identity/use: \"true\" and annotate its \
                     service account with azure.workload.identity/client-id, so the webhook injects it"
                ),
            )
        };
        let client_id = cfg
            .client_id
            .clone()
            .or_else(|| env.get("AZURE_CLIENT_ID").map(str::to_owned))
            .ok_or_else(|| missing("AZURE_CLIENT_ID"))?;
        let tenant = cfg
            .tenant_id
            .clone()
            .or_else(|| env.get("AZURE_TENANT_ID").map(str::to_owned))
            .ok_or_else(|| missing("AZURE_TENANT_ID"))?;
        let token_file = env
            .get("AZURE_FEDERATED_TOKEN_FILE")
            .map(PathBuf::from)
            .ok_or_else(|| missing("AZURE_FEDERATED_TOKEN_FILE"))?;
        Ok(Self {
            http: clients.external.clone(),
            authority,
            tenant,
            client_id,
            token_file,
        })
    }
}

impl TokenSource for WorkloadIdentity {
    fn name(&self) -> &'static str {
        NAME
    }

    fn preflight(&self) -> Result<(), IdentityError> {
        // Opened, not read: the check must not handle the credential.
        std::fs::File::open(&self.token_file)
            .and_then(|f| f.metadata())
            .map_err(|e| e.to_string())
            .and_then(|m| {
                if m.is_file() {
                    Ok(())
                } else {
                    Err("not a file".to_owned())
                }
            })
            .map_err(|e| {
                IdentityError::permanent(
                    NAME,
                    format!(
                        "the federated token file {} (AZURE_FEDERATED_TOKEN_FILE): {e}; the \
                         workload identity webhook mounts it when the pod has the label \
                         azure.workload.identity/use: \"true\"",
                        self.token_file.display()
                    ),
                )
            })
    }

    fn fetch<'a>(&'a self, scope: &'a str, _tenant: Option<&'a str>) -> TokenFuture<'a> {
        Box::pin(async move {
            let assertion = tokio::fs::read_to_string(&self.token_file)
                .await
                .map_err(|e| {
                    IdentityError::transient(
                        NAME,
                        format!(
                            "reading the federated token file {}: {e}",
                            self.token_file.display()
                        ),
                    )
                })?;
            let assertion = Token::new(assertion.trim().to_owned());
            if assertion.expose().is_empty() {
                return Err(IdentityError::transient(
                    NAME,
                    format!(
                        "the federated token file {} is empty",
                        self.token_file.display()
                    ),
                ));
            }
            client_credentials(
                &self.http,
                NAME,
                &self.authority,
                &self.tenant,
                &self.client_id,
                scope,
                Credential::Assertion(assertion),
            )
            .await
        })
    }
}
