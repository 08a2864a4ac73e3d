//! Configuration: the file (CSI-shaped YAML) and flags, merged and validated into one typed
//! [`Config`] before the first request is made.

pub mod raw;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use raw::{RawConfig, RawObject};
use url::Url;

use crate::deliver::convert::{CertFormat, Encoding};
use crate::deliver::writer::is_plain_name;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading config file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {}: {message}", path.display())]
    Parse { path: PathBuf, message: String },
    #[error("{0}")]
    Invalid(String),
}

fn invalid(msg: impl Into<String>) -> ConfigError {
    ConfigError::Invalid(msg.into())
}

/// A sovereign cloud: where its Entra ID and Key Vault live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cloud {
    pub name: String,
    pub authority_host: String,
    pub vault_suffix: String,
}

impl Cloud {
    pub fn parse(name: Option<&str>) -> Result<Self, ConfigError> {
        let c = |n: &str, a: &str, v: &str| Self {
            name: n.into(),
            authority_host: a.into(),
            vault_suffix: v.into(),
        };
        match name
            .unwrap_or("AzurePublicCloud")
            .to_ascii_lowercase()
            .as_str()
        {
            "" | "azurepubliccloud" | "azurecloud" | "public" => Ok(c(
                "AzurePublicCloud",
                "https://login.microsoftonline.com",
                "vault.azure.net",
            )),
            "azurechinacloud" | "china" => Ok(c(
                "AzureChinaCloud",
                "https://login.chinacloudapi.cn",
                "vault.azure.cn",
            )),
            "azureusgovernmentcloud" | "azureusgovernment" | "usgovernment" => Ok(c(
                "AzureUSGovernmentCloud",
                "https://login.microsoftonline.us",
                "vault.usgovcloudapi.net",
            )),
            _ => Err(invalid(format!(
                "cloudName {:?} is unknown; use AzurePublicCloud, AzureChinaCloud or \
                 AzureUSGovernmentCloud, or give vaultUrl (and AZURE_AUTHORITY_HOST) for a custom cloud",
                name.unwrap_or_default()
            ))),
        }
    }
}

/// Which managed identity to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum IdentityChoice {
    /// As the Azure SDKs choose: workload identity, then Arc, then IMDS (service principal if its variables are set).
    Auto,
    /// Workload identity federation (AZURE_CLIENT_ID, AZURE_TENANT_ID, AZURE_FEDERATED_TOKEN_FILE).
    WorkloadIdentity,
    /// Azure Instance Metadata Service (AKS on Azure).
    Imds,
    /// Azure Arc HIMDS (Arc-enabled servers).
    Arc,
    /// A service principal with a client secret or certificate.
    ServicePrincipal,
}

impl IdentityChoice {
    fn parse(s: &str) -> Result<Self, ConfigError> {
        match s {
            "auto" => Ok(Self::Auto),
            "workload-identity" | "workload" => Ok(Self::WorkloadIdentity),
            "imds" => Ok(Self::Imds),
            "arc" => Ok(Self::Arc),
            "service-principal" => Ok(Self::ServicePrincipal),
            other => Err(invalid(format!(
                "identity {other:?} is unknown; use auto, workload-identity, imds, arc or service-principal"
            ))),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectKind {
    Secret,
    Cert,
    /// The public half of a Key Vault key, as PEM (private keys never leave Key Vault).
    Key,
}

/// One object to fetch and where it goes.
#[derive(Debug, Clone)]
pub struct ObjectSpec {
    pub name: String,
    pub kind: ObjectKind,
    pub version: Option<String>,
    /// The file name in the output directory.
    pub file: String,
    pub format: CertFormat,
    pub encoding: Encoding,
    pub mode: u32,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}

impl ObjectSpec {
    /// The files this object produces (a certificate may be split in two).
    pub fn file_names(&self, split_cert_key: bool) -> Vec<String> {
        if split_cert_key && self.kind == ObjectKind::Secret && self.format == CertFormat::Pem {
            // Only certificate-backed secrets are split; which ones is known after the
            // fetch, so both names are reserved.
            vec![
                self.file.clone(),
                format!("{}.crt", self.file),
                format!("{}.key", self.file),
            ]
        } else {
            vec![self.file.clone()]
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct NotifyConfig {
    pub signal: Option<i32>,
    pub process_name: Option<String>,
    pub command: Option<Vec<String>>,
}

/// Everything the sidecar needs, validated.
#[derive(Debug, Clone)]
pub struct Config {
    pub vault_url: Url,
    pub cloud: Cloud,
    pub tenant_id: Option<String>,
    pub client_id: Option<String>,
    pub identity: IdentityChoice,
    pub objects: Vec<ObjectSpec>,
    pub output_dir: PathBuf,
    pub refresh_interval: Duration,
    pub api_version: String,
    pub ca_file: Option<PathBuf>,
    pub verify_challenge_resource: bool,
    pub split_cert_key: bool,
    pub notify: NotifyConfig,
    pub http_addr: Option<SocketAddr>,
    pub once: bool,
    pub allow_disk_output: bool,
    pub arc_token_dir: PathBuf,
    pub request_timeout: Duration,
}

pub const DEFAULT_API_VERSION: &str = "7.5";
pub const DEFAULT_REFRESH: Duration = Duration::from_secs(120);
pub const DEFAULT_HTTP_ADDR: &str = "127.0.0.1:8096";
pub const DEFAULT_ARC_TOKEN_DIR: &str = "/var/opt/azcmagent/tokens";

/// Settings from flags and environment variables; they win over the file.
#[derive(Debug, Default)]
pub struct Overrides {
    pub vault_url: Option<String>,
    pub secrets: Vec<String>,
    pub output_dir: Option<PathBuf>,
    pub tenant_id: Option<String>,
    pub client_id: Option<String>,
    pub cloud: Option<String>,
    pub identity: Option<IdentityChoice>,
    pub refresh_interval: Option<String>,
    pub api_version: Option<String>,
    pub ca_file: Option<PathBuf>,
    pub disable_challenge_resource_verification: bool,
    pub notify_signal: Option<String>,
    pub notify_process: Option<String>,
    pub notify_command: Option<String>,
    pub http_addr: Option<String>,
    pub once: bool,
    pub allow_disk_output: bool,
    pub arc_token_dir: Option<PathBuf>,
    pub request_timeout: Option<String>,
}

impl Config {
    pub fn load(file: Option<&Path>, o: Overrides) -> Result<Self, ConfigError> {
        let raw = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_owned(),
                    source,
                })?;
                serde_yaml_ng::from_str::<RawConfig>(&text).map_err(|e| ConfigError::Parse {
                    path: path.to_owned(),
                    message: e.to_string(),
                })?
            }
            None => RawConfig::default(),
        };
        Self::resolve(raw, o)
    }

    pub fn resolve(raw: RawConfig, o: Overrides) -> Result<Self, ConfigError> {
        let cloud = Cloud::parse(o.cloud.as_deref().or(raw.cloud_name.as_deref()))?;
        let vault_url = match (o.vault_url.or(raw.vault_url), raw.keyvault_name) {
            (Some(u), _) => parse_vault_url(&u)?,
            (None, Some(name)) => {
                if !(3..=24).contains(&name.len())
                    || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                {
                    return Err(invalid(format!(
                        "keyvaultName {name:?} is not a Key Vault name (3-24 letters, digits, '-')"
                    )));
                }
                parse_vault_url(&format!("https://{name}.{}", cloud.vault_suffix))?
            }
            (None, None) => {
                return Err(invalid(
                    "no vault: set keyvaultName or vaultUrl in the config, or --vault-url",
                ));
            }
        };

        let mut raw_objects = match raw.objects {
            Some(objs) => raw::objects_list(objs).map_err(invalid)?,
            None => Vec::new(),
        };
        for spec in &o.secrets {
            raw_objects.push(parse_secret_flag(spec)?);
        }
        if raw_objects.is_empty() {
            return Err(invalid(
                "no objects to fetch: list them under objects: in the config, or give --secret NAME",
            ));
        }
        let split_cert_key = raw
            .write_cert_and_key_in_separate_files
            .map(|b| b.parse("writeCertAndKeyInSeparateFiles"))
            .transpose()
            .map_err(invalid)?
            .unwrap_or(false);
        let objects = raw_objects
            .into_iter()
            .map(validate_object)
            .collect::<Result<Vec<_>, _>>()?;
        let mut seen = std::collections::HashSet::new();
        for obj in &objects {
            for f in obj.file_names(split_cert_key) {
                // The `.crt`/`.key` of a split certificate add 4 bytes to its name.
                if !is_plain_name(&f) {
                    return Err(invalid(format!(
                        "object {:?}: file name {f:?} is longer than 255 bytes: give it a \
                         shorter objectAlias",
                        obj.name
                    )));
                }
                if !seen.insert(f.clone()) {
                    return Err(invalid(format!(
                        "two objects would write the same file {f:?}: give one an objectAlias"
                    )));
                }
            }
        }

        let output_dir = o.output_dir.or(raw.output_dir).ok_or_else(|| {
            invalid("no output directory: set outputDir in the config or --output-dir")
        })?;
        if !output_dir.is_absolute() {
            return Err(invalid(format!(
                "output directory {} must be an absolute path",
                output_dir.display()
            )));
        }
        let refresh = o.refresh_interval.or(raw.refresh_interval);
        let refresh_interval = match refresh {
            Some(s) => humantime::parse_duration(&s)
                .map_err(|e| invalid(format!("refresh interval {s:?}: {e}")))?,
            None => DEFAULT_REFRESH,
        };
        if refresh_interval < Duration::from_secs(1) {
            return Err(invalid(
                "refresh interval must be at least 1s (Key Vault throttles at ~4000 reads per 10 s per vault)",
            ));
        }
        let request_timeout = match o.request_timeout.as_deref() {
            Some(s) => humantime::parse_duration(s)
                .map_err(|e| invalid(format!("request timeout {s:?}: {e}")))?,
            None => Duration::from_secs(30),
        };
        if request_timeout < Duration::from_millis(100) {
            return Err(invalid("request timeout must be at least 100ms"));
        }
        let api_version = o
            .api_version
            .or(raw.api_version)
            .unwrap_or_else(|| DEFAULT_API_VERSION.into());
        if api_version.is_empty()
            || !api_version
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-')
        {
            return Err(invalid(format!("api version {api_version:?} is not valid")));
        }
        if raw
            .use_pod_identity
            .as_ref()
            .map(|b| b.parse("usePodIdentity"))
            .transpose()
            .map_err(invalid)?
            .unwrap_or(false)
        {
            return Err(invalid(
                "usePodIdentity: AAD Pod Identity is deprecated and not supported; use workload \
                 identity (remove usePodIdentity, label the pod azure.workload.identity/use)",
            ));
        }
        if raw.cloud_env_file_name.is_some() {
            return Err(invalid(
                "cloudEnvFileName is not supported: for a custom cloud give vaultUrl, and set \
                 AZURE_AUTHORITY_HOST to its Entra ID authority",
            ));
        }
        let vm_identity = raw
            .use_vm_managed_identity
            .as_ref()
            .map(|b| b.parse("useVMManagedIdentity"))
            .transpose()
            .map_err(invalid)?
            .unwrap_or(false);
        let identity = match (o.identity, raw.identity) {
            (Some(i), _) => i,
            (None, Some(s)) => IdentityChoice::parse(&s)?,
            (None, None) if vm_identity => IdentityChoice::Imds,
            (None, None) => IdentityChoice::Auto,
        };
        let disable_verify = o.disable_challenge_resource_verification
            || raw
                .disable_challenge_resource_verification
                .map(|b| b.parse("disableChallengeResourceVerification"))
                .transpose()
                .map_err(invalid)?
                .unwrap_or(false);
        let raw_notify = raw.notify.unwrap_or_default();
        let signal = o
            .notify_signal
            .or(raw_notify.signal)
            .map(|s| parse_signal(&s))
            .transpose()?;
        let process_name = o.notify_process.or(raw_notify.process_name);
        if signal.is_some() != process_name.is_some() {
            return Err(invalid(
                "notify: a signal needs a process name to send it to, and the other way round",
            ));
        }
        let command = match o.notify_command {
            Some(c) => Some(c.split_whitespace().map(String::from).collect::<Vec<_>>()),
            None => raw_notify.command,
        };
        if command.as_ref().is_some_and(|c| c.is_empty()) {
            return Err(invalid("notify command is empty"));
        }
        let http_addr = match o
            .http_addr
            .or(raw.http_addr)
            .unwrap_or_else(|| DEFAULT_HTTP_ADDR.into())
            .as_str()
        {
            "off" | "" => None,
            a => Some(a.parse().map_err(|e| {
                invalid(format!(
                    "http address {a:?} is not HOST:PORT ({e}); \"off\" disables it"
                ))
            })?),
        };
        Ok(Self {
            vault_url,
            cloud,
            tenant_id: o.tenant_id.or(raw.tenant_id),
            client_id: o
                .client_id
                .or(raw.client_id)
                .or(raw.user_assigned_identity_id),
            identity,
            objects,
            output_dir,
            refresh_interval,
            api_version,
            request_timeout,
            ca_file: o.ca_file.or(raw.ca_file),
            verify_challenge_resource: !disable_verify,
            split_cert_key,
            notify: NotifyConfig {
                signal,
                process_name,
                command,
            },
            http_addr,
            once: o.once,
            allow_disk_output: o.allow_disk_output,
            arc_token_dir: o
                .arc_token_dir
                .unwrap_or_else(|| PathBuf::from(DEFAULT_ARC_TOKEN_DIR)),
        })
    }
}

fn parse_vault_url(s: &str) -> Result<Url, ConfigError> {
    let u = Url::parse(s).map_err(|e| invalid(format!("vault URL {s:?}: {e}")))?;
    if u.scheme() != "https" {
        return Err(invalid(format!("vault URL {s:?} must use https")));
    }
    if u.host_str().is_none()
        || u.query().is_some()
        || u.fragment().is_some()
        || !matches!(u.path(), "" | "/")
    {
        return Err(invalid(format!(
            "vault URL {s:?} must be just https://HOST[:PORT]"
        )));
    }
    Ok(u)
}

/// `NAME[@VERSION][=FILE]`
fn parse_secret_flag(s: &str) -> Result<RawObject, ConfigError> {
    let (rest, file) = match s.split_once('=') {
        Some((r, f)) => (r, Some(f.to_owned())),
        None => (s, None),
    };
    let (name, version) = match rest.split_once('@') {
        Some((n, v)) => (n, Some(v.to_owned())),
        None => (rest, None),
    };
    Ok(RawObject {
        object_name: name.to_owned(),
        object_type: Some("secret".into()),
        object_version: version,
        object_alias: file,
        ..Default::default()
    })
}

fn validate_object(r: RawObject) -> Result<ObjectSpec, ConfigError> {
    let name = r.object_name;
    let what = |msg: String| invalid(format!("object {name:?}: {msg}"));
    if r.object_version_history.is_some() {
        return Err(what(
            "objectVersionHistory is not supported: list each version you need as its own \
             object with objectVersion and objectAlias"
                .into(),
        ));
    }
    if name.is_empty()
        || name.len() > 127
        || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    {
        return Err(what(
            "objectName must be 1-127 letters, digits or '-', as Key Vault names are".into(),
        ));
    }
    let kind = match r.object_type.as_deref().unwrap_or("secret") {
        "secret" => ObjectKind::Secret,
        "cert" => ObjectKind::Cert,
        "key" => ObjectKind::Key,
        other => {
            return Err(what(format!(
                "objectType {other:?} is not secret, cert or key"
            )));
        }
    };
    let version = r.object_version.filter(|v| !v.is_empty());
    if let Some(v) = version
        .as_ref()
        .filter(|v| v.len() != 32 || !v.chars().all(|c| c.is_ascii_hexdigit()))
    {
        return Err(what(format!(
            "objectVersion {v:?} is not a Key Vault version (32 hex digits)"
        )));
    }
    let file = r
        .object_alias
        .filter(|a| !a.is_empty())
        .unwrap_or_else(|| name.clone());
    if !is_plain_name(&file) || file == "." || file == ".." {
        return Err(what(format!(
            "file name {file:?} must be a plain file name: no '/', no '..', no leading '.'"
        )));
    }
    let format = match r.object_format.as_deref().unwrap_or("pem") {
        "pem" | "" => CertFormat::Pem,
        "pfx" => CertFormat::Pfx,
        other => return Err(what(format!("objectFormat {other:?} is not pem or pfx"))),
    };
    let encoding = match r
        .object_encoding
        .as_deref()
        .unwrap_or("utf-8")
        .to_ascii_lowercase()
        .as_str()
    {
        "utf-8" | "utf8" | "" => Encoding::Utf8,
        "base64" => Encoding::Base64,
        "hex" => Encoding::Hex,
        other => {
            return Err(what(format!(
                "objectEncoding {other:?} is not utf-8, base64 or hex"
            )));
        }
    };
    let mode = match r.file_permission.as_deref() {
        None | Some("") => 0o400,
        Some(p) => {
            let m = u32::from_str_radix(p.trim_start_matches("0o"), 8).map_err(|_| {
                what(format!(
                    "filePermission {p:?} is not an octal mode like 0440"
                ))
            })?;
            if m > 0o777 {
                return Err(what(format!("filePermission {p:?} has bits beyond 0777")));
            }
            if m & 0o002 != 0 {
                return Err(what(format!(
                    "filePermission {p:?} would let anyone write the secret"
                )));
            }
            m
        }
    };
    Ok(ObjectSpec {
        name,
        kind,
        version,
        file,
        format,
        encoding,
        mode,
        uid: r.uid,
        gid: r.gid,
    })
}

fn parse_signal(s: &str) -> Result<i32, ConfigError> {
    let name = s.trim_start_matches("SIG").to_ascii_uppercase();
    let n = match name.as_str() {
        "HUP" => 1,
        "INT" => 2,
        "QUIT" => 3,
        "USR1" => 10,
        "USR2" => 12,
        "TERM" => 15,
        other => other.parse().map_err(|_| {
            invalid(format!(
                "signal {s:?} is not one of SIGHUP, SIGUSR1, SIGUSR2, SIGINT, SIGQUIT, SIGTERM"
            ))
        })?,
    };
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from_yaml(y: &str, o: Overrides) -> Result<Config, ConfigError> {
        let raw: RawConfig = serde_yaml_ng::from_str(y).map_err(|e| invalid(e.to_string()))?;
        Config::resolve(raw, o)
    }

    fn out() -> Overrides {
        Overrides {
            output_dir: Some("/mnt/secrets".into()),
            ..Default::default()
        }
    }

    #[test]
    fn csi_shape_in_both_forms() {
        let list = "keyvaultName: myvault\ntenantId: t\nclientID: c\nobjects:\n  - objectName: db-pass\n    objectAlias: db.txt\n    filePermission: \"0440\"\n  - objectName: tls\n    objectType: cert\n";
        let c = from_yaml(list, out()).unwrap();
        assert_eq!(c.vault_url.as_str(), "https://myvault.vault.azure.net/");
        assert_eq!(c.objects.len(), 2);
        assert_eq!(
            (c.objects[0].file.as_str(), c.objects[0].mode),
            ("db.txt", 0o440)
        );
        assert_eq!(c.objects[1].kind, ObjectKind::Cert);
        assert_eq!(c.refresh_interval, DEFAULT_REFRESH);
        let csi = "keyvaultName: kv1\ncloudName: AzureChinaCloud\nobjects: |\n  array:\n    - |\n      objectName: s1\n      objectType: secret\n      objectVersion: \"\"\n";
        let c = from_yaml(csi, out()).unwrap();
        assert_eq!(c.vault_url.as_str(), "https://kv1.vault.azure.cn/");
        assert_eq!(c.cloud.authority_host, "https://login.chinacloudapi.cn");
        assert_eq!(c.objects[0].name, "s1");
    }

    #[test]
    fn csi_provider_parameters_are_mapped_or_refused() {
        let spc = "keyvaultName: kv1\nuseVMManagedIdentity: \"true\"\nuserAssignedIdentityID: uai\nresourceGroup: rg\nsubscriptionId: sub\ntenantId: t\nobjects:\n  - objectName: a\n";
        let c = from_yaml(spc, out()).unwrap();
        assert_eq!(c.identity, IdentityChoice::Imds);
        assert_eq!(c.client_id.as_deref(), Some("uai"));
        let bad = |y: &str| from_yaml(y, out()).unwrap_err().to_string();
        assert!(
            bad("keyvaultName: kv1\nusePodIdentity: \"true\"\nobjects:\n  - objectName: a\n")
                .contains("workload identity")
        );
        assert!(
            bad("keyvaultName: kv1\ncloudEnvFileName: x.json\nobjects:\n  - objectName: a\n")
                .contains("AZURE_AUTHORITY_HOST")
        );
        assert!(
            bad("keyvaultName: kv1\nobjects:\n  - objectName: a\n    objectVersionHistory: 3\n")
                .contains("objectVersionHistory")
        );
        assert!(
            from_yaml(
                "keyvaultName: kv1\nusePodIdentity: \"false\"\nobjects:\n  - objectName: a\n",
                out()
            )
            .is_ok()
        );
    }

    #[test]
    fn flags_for_the_simple_case() {
        let o = Overrides {
            vault_url: Some("https://kv.vault.usgovcloudapi.net".into()),
            secrets: vec![
                "a".into(),
                format!("b@{}=b.txt", "0123456789abcdef0123456789abcdef"),
            ],
            ..out()
        };
        let c = Config::resolve(RawConfig::default(), o).unwrap();
        assert_eq!(c.objects[1].file, "b.txt");
        assert_eq!(
            c.objects[1].version.as_deref(),
            Some("0123456789abcdef0123456789abcdef")
        );
        assert_eq!(c.objects[0].mode, 0o400);
    }

    #[test]
    fn rejects_what_it_must() {
        let bad = |y: &str| from_yaml(y, out()).unwrap_err().to_string();
        assert!(
            bad("keyvaultName: kv1\nobjects:\n  - objectName: a\n    objectAlias: ../x\n")
                .contains("plain file name")
        );
        assert!(
            bad("keyvaultName: kv1\nobjects:\n  - objectName: a\n    objectAlias: .hidden\n")
                .contains("plain file name")
        );
        assert!(
            bad("keyvaultName: kv1\nobjects:\n  - objectName: a\n    objectAlias: a/b\n")
                .contains("plain file name")
        );
        assert!(bad("keyvaultName: kv1\nsurprise: 1\n").contains("surprise"));
        // Found with the sidecar_config fuzz target's invariant: a 253-byte alias is a
        // plain name, but its split certificate's "<alias>.crt" is not.
        let long = format!(
            "keyvaultName: kv1\nwriteCertAndKeyInSeparateFiles: true\nobjects:\n  - objectName: a\n    objectAlias: {}\n",
            "b".repeat(253)
        );
        assert!(bad(&long).contains("longer than 255 bytes"));
        assert!(
            bad("keyvaultName: kv1\nobjects:\n  - objectName: a\n    objectNmae: b\n")
                .contains("objectNmae")
        );
        assert!(bad("keyvaultName: kv1\nobjects:\n  - objectName: a\n  - objectName: b\n    objectAlias: a\n").contains("same file"));
        assert!(
            bad("keyvaultName: kv1\nobjects:\n  - objectName: a\n    objectVersion: v1\n")
                .contains("32 hex")
        );
        assert!(
            bad("keyvaultName: kv1\nobjects:\n  - objectName: a\n    filePermission: \"0666\"\n")
                .contains("anyone write")
        );
        assert!(
            bad("keyvaultName: kv1\nobjects:\n  - objectName: a\n    objectType: blob\n")
                .contains("not secret, cert or key")
        );
        assert!(bad("vaultUrl: http://kv\nobjects:\n  - objectName: a\n").contains("https"));
        assert!(
            bad("keyvaultName: kv1\ncloudName: Mars\nobjects:\n  - objectName: a\n")
                .contains("Mars")
        );
        assert!(bad("keyvaultName: kv1\n").contains("no objects"));
        let no_out = from_yaml(
            "keyvaultName: kv1\nobjects:\n  - objectName: a\n",
            Overrides::default(),
        )
        .unwrap_err();
        assert!(no_out.to_string().contains("output directory"));
        let sig = Overrides {
            notify_signal: Some("SIGHUP".into()),
            ..out()
        };
        assert!(
            from_yaml("keyvaultName: kv1\nobjects:\n  - objectName: a\n", sig)
                .unwrap_err()
                .to_string()
                .contains("process name")
        );
    }

    proptest::proptest! {
        /// Arbitrary YAML-ish input is either a valid config or a clear error; never a panic.
        #[test]
        fn config_parsing_never_panics(text in "\\PC{0,400}") {
            if let Ok(raw) = serde_yaml_ng::from_str::<RawConfig>(&text) {
                let _ = Config::resolve(raw, out());
            }
        }
    }
}
