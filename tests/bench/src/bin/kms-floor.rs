//! The bare floor of the KMS benchmark: a tonic server of the same
//! `v2.KeyManagementService` (and the gRPC health service) on a Unix socket, in its own
//! process, doing nothing a KMS plugin must: no crypto, no key ring, no metrics, no logs.
//! Encrypt returns the plaintext as the ciphertext with the plugin's annotation; Decrypt
//! returns the ciphertext. What the plugin costs on top of this is what it adds to tonic.
//!
//! With `--authority-layer`, every connection goes through the plugin's Unix-socket
//! authority layer first (`kms_plugin::server::authority`): that layer's cost in place.
//!
//! Usage: kms-floor SOCKET [--authority-layer] (runs until killed).

use std::collections::HashMap;

use kms_proto::v2::key_management_service_server::{
    KeyManagementService, KeyManagementServiceServer,
};
use kms_proto::v2::{
    DecryptRequest, DecryptResponse, EncryptRequest, EncryptResponse, StatusRequest, StatusResponse,
};
use tonic::{Request, Response, Status};

const KEY_ID: &str = "kek-0001-20261204-00000000";

struct Floor;

#[tonic::async_trait]
impl KeyManagementService for Floor {
    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        Ok(Response::new(StatusResponse {
            version: "v2".into(),
            healthz: "ok".into(),
            key_id: KEY_ID.into(),
        }))
    }

    async fn encrypt(
        &self,
        request: Request<EncryptRequest>,
    ) -> Result<Response<EncryptResponse>, Status> {
        let req = request.into_inner();
        Ok(Response::new(EncryptResponse {
            ciphertext: req.plaintext,
            key_id: KEY_ID.into(),
            annotations: HashMap::from([("v1.envelope.edgeseal.io".to_owned(), b"1".to_vec())]),
        }))
    }

    async fn decrypt(
        &self,
        request: Request<DecryptRequest>,
    ) -> Result<Response<DecryptResponse>, Status> {
        Ok(Response::new(DecryptResponse {
            plaintext: request.into_inner().ciphertext,
        }))
    }
}

fn main() -> anyhow::Result<()> {
    let socket = std::env::args()
        .nth(1)
        .ok_or_else(|| anyhow::anyhow!("usage: kms-floor SOCKET [--authority-layer]"))?;
    let layer = std::env::args().nth(2).as_deref() == Some("--authority-layer");
    // The plugin's runtime: two worker threads.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let _ = std::fs::remove_file(&socket);
        let listener = tokio::net::UnixListener::bind(&socket)?;
        let (reporter, health) = tonic_health::server::health_reporter();
        reporter
            .set_serving::<KeyManagementServiceServer<Floor>>()
            .await;
        let router = tonic::transport::Server::builder()
            .add_service(health)
            .add_service(KeyManagementServiceServer::new(Floor));
        let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
        if layer {
            use tokio_stream::StreamExt as _;
            let wrapped =
                incoming.map(|r| r.map(kms_plugin::server::authority::AuthorityLayer::new));
            router.serve_with_incoming(wrapped).await?;
        } else {
            router.serve_with_incoming(incoming).await?;
        }
        anyhow::Ok(())
    })
}
