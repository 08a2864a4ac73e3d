//! The deprecated `v1beta1.KeyManagementService`, for clusters still on KMS v1.
//! Its requests carry no key id, so the ciphertext format embeds one.

use std::sync::Arc;
use std::time::Instant;

use kms_proto::v1beta1::key_management_service_server::KeyManagementService;
use kms_proto::v1beta1::{
    DecryptRequest, DecryptResponse, EncryptRequest, EncryptResponse, VersionRequest,
    VersionResponse,
};
use tonic::{Request, Response, Status};

use super::to_status;
use crate::kms::Kms;
use crate::metrics::{Api, Metrics, Op};
use crate::secret::Plaintext;

const API_VERSION: &str = "v1beta1";

pub struct V1beta1Service {
    kms: Arc<Kms>,
    metrics: Arc<Metrics>,
}

impl V1beta1Service {
    pub fn new(kms: Arc<Kms>, metrics: Arc<Metrics>) -> Self {
        Self { kms, metrics }
    }

    fn record<T>(&self, op: Op, start: Instant, r: &Result<T, Status>) {
        let code = r.as_ref().map_or_else(Status::code, |_| tonic::Code::Ok);
        self.metrics
            .observe(Api::v1beta1, op, code, start.elapsed().as_secs_f64());
    }
}

fn check_version(v: &str) -> Result<(), Status> {
    if v == API_VERSION || v.is_empty() {
        Ok(())
    } else {
        Err(Status::invalid_argument(format!(
            "unsupported KMS API version {:?}; this service speaks {API_VERSION:?}",
            super::log_uid(v)
        )))
    }
}

#[tonic::async_trait]
impl KeyManagementService for V1beta1Service {
    async fn version(
        &self,
        request: Request<VersionRequest>,
    ) -> Result<Response<VersionResponse>, Status> {
        let start = Instant::now();
        let r = check_version(&request.into_inner().version).map(|()| {
            Response::new(VersionResponse {
                version: API_VERSION.to_owned(),
                runtime_name: "edgeseal-kms-plugin".to_owned(),
                runtime_version: env!("CARGO_PKG_VERSION").to_owned(),
            })
        });
        self.record(Op::version, start, &r);
        r
    }

    async fn encrypt(
        &self,
        request: Request<EncryptRequest>,
    ) -> Result<Response<EncryptResponse>, Status> {
        let start = Instant::now();
        let mut req = request.into_inner();
        let plaintext = Plaintext::take(&mut req.plain);
        let r = match check_version(&req.version) {
            Err(e) => Err(e),
            Ok(()) => match self
                .kms
                .with_reservation(|| self.kms.encrypt_v1(&plaintext))
                .await
            {
                Ok(cipher) => {
                    tracing::info!(op = "encrypt", api = API_VERSION, "encrypted a DEK");
                    Ok(Response::new(EncryptResponse { cipher }))
                }
                Err(e) => {
                    tracing::warn!(op = "encrypt", api = API_VERSION, error = %e, "encrypt failed");
                    Err(to_status(&e))
                }
            },
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
        let r = check_version(&req.version).and_then(|()| match self.kms.decrypt_v1(&req.cipher) {
            Ok((plain, key_id)) => {
                tracing::info!(op = "decrypt", api = API_VERSION, %key_id, "decrypted a DEK");
                Ok(Response::new(DecryptResponse {
                    plain: plain.into_response_bytes(),
                }))
            }
            Err(e) => {
                tracing::warn!(op = "decrypt", api = API_VERSION, error = %e, "decrypt failed");
                Err(to_status(&e))
            }
        });
        self.record(Op::decrypt, start, &r);
        r
    }
}
