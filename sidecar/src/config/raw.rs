//! The configuration file as written: the shape of a Secrets Store CSI driver
//! `SecretProviderClass` (Azure provider) `parameters` block, plus the sidecar's own keys.
//! Unknown keys are errors, so a typo never silently falls back to a default.

use std::path::PathBuf;

use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawConfig {
    pub keyvault_name: Option<String>,
    pub vault_url: Option<String>,
    pub tenant_id: Option<String>,
    #[serde(rename = "clientID")]
    pub client_id: Option<String>,
    pub cloud_name: Option<String>,
    pub identity: Option<String>,
    /// A list of objects, or the CSI driver's string form; see [`objects_list`].
    pub objects: Option<serde_yaml_ng::Value>,
    pub output_dir: Option<PathBuf>,
    pub refresh_interval: Option<String>,
    pub write_cert_and_key_in_separate_files: Option<BoolOrString>,
    pub api_version: Option<String>,
    pub ca_file: Option<PathBuf>,
    pub disable_challenge_resource_verification: Option<BoolOrString>,
    pub notify: Option<RawNotify>,
    pub http_addr: Option<String>,
    // CSI Azure provider parameters that a copied SecretProviderClass may carry: mapped
    // where they mean something here, refused with a reason where they cannot work.
    /// "true": use the node's IMDS identity (`--identity imds`).
    #[serde(rename = "useVMManagedIdentity")]
    pub use_vm_managed_identity: Option<BoolOrString>,
    /// The user-assigned identity's client id for IMDS (same as `clientID`).
    #[serde(rename = "userAssignedIdentityID")]
    pub user_assigned_identity_id: Option<String>,
    /// AAD Pod Identity, deprecated upstream: refused when "true".
    pub use_pod_identity: Option<BoolOrString>,
    /// A custom cloud's environment file: refused (give vaultUrl and AZURE_AUTHORITY_HOST).
    pub cloud_env_file_name: Option<String>,
    /// Informational in the CSI provider; accepted and ignored.
    pub resource_group: Option<String>,
    /// Informational in the CSI provider; accepted and ignored.
    pub subscription_id: Option<String>,
}

/// CSI parameters are all strings ("true"); ours may be booleans too.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum BoolOrString {
    Bool(bool),
    String(String),
}

impl BoolOrString {
    pub fn parse(&self, key: &str) -> Result<bool, String> {
        match self {
            BoolOrString::Bool(b) => Ok(*b),
            BoolOrString::String(s) => match s.as_str() {
                "true" => Ok(true),
                "false" | "" => Ok(false),
                other => Err(format!("{key}: {other:?} is not true or false")),
            },
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CsiArray {
    pub array: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawObject {
    pub object_name: String,
    pub object_type: Option<String>,
    pub object_version: Option<String>,
    pub object_alias: Option<String>,
    pub object_format: Option<String>,
    pub object_encoding: Option<String>,
    pub file_permission: Option<String>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// CSI's "also write N older versions": not supported, refused with a hint.
    pub object_version_history: Option<serde_yaml_ng::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawNotify {
    /// e.g. SIGHUP.
    pub signal: Option<String>,
    /// The process (by name, as in /proc/PID/comm) to signal; needs a shared process namespace.
    pub process_name: Option<String>,
    /// A command run after each change (argv form).
    pub command: Option<Vec<String>>,
}

/// `objects` as a YAML list, or as the CSI driver's string form (`objects: |` then
/// `array:` then one YAML document string per object). Parsed in two steps so that an
/// error names the offending key instead of "no variant matched".
pub fn objects_list(v: serde_yaml_ng::Value) -> Result<Vec<RawObject>, String> {
    match v {
        serde_yaml_ng::Value::String(s) => {
            let arr: CsiArray = serde_yaml_ng::from_str(&s)
                .map_err(|e| format!("objects (CSI string form): {e}"))?;
            arr.array
                .iter()
                .enumerate()
                .map(|(i, doc)| {
                    serde_yaml_ng::from_str::<RawObject>(doc)
                        .map_err(|e| format!("objects.array[{i}]: {e}"))
                })
                .collect()
        }
        serde_yaml_ng::Value::Sequence(items) => items
            .into_iter()
            .enumerate()
            .map(|(i, item)| {
                serde_yaml_ng::from_value::<RawObject>(item)
                    .map_err(|e| format!("objects[{i}]: {e}"))
            })
            .collect(),
        _ => Err("objects must be a list of objects (or the CSI driver's string form)".into()),
    }
}
