//! The TPM 2.0 key backend. `pcr` and `blob` are plain data and always built; the device
//! code needs the `tpm` feature (it links the system's tss2 libraries).

pub mod blob;
pub mod pcr;

#[cfg(feature = "tpm")]
mod device;

#[cfg(feature = "tpm")]
pub use device::TpmBackend;

use std::path::PathBuf;

use pcr::PcrPolicy;

/// Default persistent handle of the storage root key (TCG provisioning convention).
pub const DEFAULT_SRK_HANDLE: u32 = 0x8100_0001;

/// How to reach and use the TPM.
#[derive(Debug, Clone)]
pub struct TpmOptions {
    /// e.g. `device:/dev/tpmrm0`, `swtpm:host=127.0.0.1,port=2321`.
    pub tcti: String,
    /// PCRs new keys are sealed to (existing keys keep the policy they were sealed with).
    pub pcr_policy: Option<PcrPolicy>,
    /// File holding the owner hierarchy's authorization value, if it has one.
    pub owner_auth_file: Option<PathBuf>,
    /// Persistent handle for the SRK, or `None` to re-create it at every start.
    pub srk_handle: Option<u32>,
}
