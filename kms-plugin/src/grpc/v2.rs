//! `v2.KeyManagementService`, as kube-apiserver 1.27+ calls it.

use std::sync::Arc;
use std::time::Instant;

use kms_proto::v2::key_management_service_server::KeyManagementService;
use kms_proto::v2::{
    DecryptRequest, DecryptResponse, EncryptRequest, EncryptResponse, StatusRequest, StatusResponse,
};
use tonic::{Request, Response, Status};

use super::{log_uid, to_status};
use crate::kms::Kms;
use crate::metrics::{Api, Metrics, Op};
use crate::secret::Plaintext;

/// What Status reports as `version`: 1.29+ accept "v2", 1.27-1.28 only "v2beta1".
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum StatusVersion {
    V2,
    V2beta1,
}

impl StatusVersion {
    pub fn as_str(self) -> &'static str {
        match self {
            StatusVersion::V2 => "v2",
            StatusVersion::V2beta1 => "v2beta1",
        }
    }
}

pub struct V2Service {
    kms: Arc<Kms>,
    metrics: Arc<Metrics>,
    version: StatusVersion,
}

impl V2Service {
    pub fn new(kms: Arc<Kms>, metrics: Arc<Metrics>, version: StatusVersion) -> Self {
        Self {
            kms,
            metrics,
            version,
        }
    }

    fn record<T>(&self, op: Op, start: Instant, r: &Result<T, Status>) {
        let code = r.as_ref().map_or_else(Status::code, |_| tonic::Code::Ok);
        self.metrics
            .observe(Api::v2, op, code, start.elapsed().as_secs_f64());
    }
}

#[tonic::async_trait]
impl KeyManagementService for V2Service {
    async fn status(
        &self,
        _request: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        let start = Instant::now();
        let health = self.kms.health();
        let healthz = match &health.problem {
            None => "ok".to_owned(),
            Some(problem) => {
                tracing::warn!(%problem, "status: unhealthy");
                problem.clone()
            }
        };
        let r = Ok(Response::new(StatusResponse {
            version: self.version.as_str().to_owned(),
            healthz,
            key_id: health.key_id.map(String::from).unwrap_or_default(),
        }));
        self.record(Op::status, start, &r);
        r
    }

    async fn encrypt(
        &self,
        request: Request<EncryptRequest>,
    ) -> Result<Response<EncryptResponse>, Status> {
        let start = Instant::now();
        let mut req = request.into_inner();
        let plaintext = Plaintext::take(&mut req.plaintext);
        let uid = log_uid(&req.uid);
        let r = match self
            .kms
            .with_reservation(|| self.kms.encrypt_v2(&plaintext))
            .await
        {
            Ok(enc) => {
                tracing::info!(op = "encrypt", uid, key_id = %enc.key_id, "encrypted a DEK seed");
                Ok(Response::new(EncryptResponse {
                    ciphertext: enc.ciphertext,
                    key_id: enc.key_id.into(),
                    annotations: Kms::annotations(),
                }))
            }
            Err(e) => {
                tracing::warn!(op = "encrypt", uid, error = %e, "encrypt failed");
                Err(to_status(&e))
            }
        };
        self.record(Op::encrypt, start, &r);
        r
    }

    async fn decrypt(
        &self,
        request: Request<DecryptRequest>,
    ) -> Result<Response<DecryptResponse>, Status> {
        let start = Instant::now();
        let req = request.into_inner();
        let uid = log_uid(&req.uid);
        let key_id = super::log_uid(&req.key_id);
        let r = match self
            .kms
            .decrypt_v2(&req.key_id, &req.ciphertext, &req.annotations)
        {
            Ok(plaintext) => {
                tracing::info!(op = "decrypt", uid, key_id, "decrypted a DEK seed");
                Ok(Response::new(DecryptResponse {
                    plaintext: plaintext.into_response_bytes(),
                }))
            }
            Err(e) => {
                tracing::warn!(op = "decrypt", uid, key_id, error = %e, "decrypt failed");
                Err(to_status(&e))
            }
        };
        self.record(Op::decrypt, start, &r);
        r
    }
}
