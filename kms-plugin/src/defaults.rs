//! Defaults shared by the binary, the docs and the deploy manifests (a test checks that
//! `deploy/` agrees with these).

/// Where `serve` listens; the EncryptionConfiguration's `endpoint` is `unix://` + this.
pub const SOCKET: &str = "/var/run/edgeseal/kms.sock";
/// The key store directory on a control-plane node.
pub const KEY_STORE: &str = "/var/lib/edgeseal/kms";
/// Health and metrics listener: loopback, clear of the apiserver's and kubelet's ports.
pub const HTTP_ADDR: &str = "127.0.0.1:8095";
/// The `name` of the kms provider in the EncryptionConfiguration.
pub const PROVIDER_NAME: &str = "edgeseal-kms";
/// How often a running plugin looks for key store changes (CLI rotations).
pub const RELOAD_INTERVAL: &str = "5s";
/// How long `serve` lets in-flight requests finish after SIGTERM.
pub const DRAIN_TIMEOUT: &str = "10s";
/// The TPM device (through the kernel's resource manager).
pub const TCTI: &str = "device:/dev/tpmrm0";
