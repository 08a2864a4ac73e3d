//! Generated gRPC types for the Kubernetes KMS plugin APIs.
//!
//! `v2` is what kube-apiserver 1.27+ speaks (wire-identical to `k8s.io/kms/apis/v2`);
//! `v1beta1` is the deprecated v1 API, kept for older clusters.

/// KMS v2: `/v2.KeyManagementService/{Status,Encrypt,Decrypt}`.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod v2 {
    tonic::include_proto!("v2");
}

/// KMS v1 (deprecated): `/v1beta1.KeyManagementService/{Version,Encrypt,Decrypt}`.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod v1beta1 {
    tonic::include_proto!("v1beta1");
}
