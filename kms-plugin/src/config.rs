//! Configuration in two stages: what the operator wrote (flags, environment, a TOML file;
//! flags and environment win), then a validated, typed config checked before anything
//! is bound or unsealed.

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::backend::BackendKind;
use crate::backend::software::SoftwareBackend;
use crate::backend::tpm::pcr::PcrPolicy;
use crate::backend::tpm::{DEFAULT_SRK_HANDLE, TpmOptions};
use crate::defaults;
use crate::grpc::v2::StatusVersion;

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
    #[error("{setting}: {problem}")]
    Invalid {
        setting: &'static str,
        problem: String,
    },
}

fn invalid(setting: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        setting,
        problem: problem.into(),
    }
}

/// The config file (TOML). Every key is optional and mirrors a flag; see
/// `deploy/kms-plugin/config.toml` for the commented reference.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub key_store: Option<PathBuf>,
    pub backend: Option<BackendKind>,
    pub insecure_root_key: Option<PathBuf>,
    pub tcti: Option<String>,
    pub pcr_policy: Option<String>,
    pub owner_auth_file: Option<PathBuf>,
    pub srk_handle: Option<String>,
    pub socket: Option<PathBuf>,
    pub socket_mode: Option<String>,
    pub socket_group: Option<String>,
    pub http_addr: Option<String>,
    pub reload_interval: Option<String>,
    pub rotate_every: Option<String>,
    pub status_version: Option<StatusVersion>,
    pub v1beta1: Option<bool>,
    pub auto_init: Option<bool>,
    pub drain_timeout: Option<String>,
    pub log_format: Option<LogFormat>,
    pub log_level: Option<String>,
}

impl FileConfig {
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let Some(path) = path else {
            return Ok(Self::default());
        };
        let text = fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// Where the keys are and what protects them.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub key_store: PathBuf,
    pub backend: BackendKind,
    pub insecure_root_key: PathBuf,
    pub tpm: TpmOptions,
}

/// The TPM flags as given, before validation.
#[derive(Debug, Default, Clone)]
pub struct TpmOverrides {
    pub tcti: Option<String>,
    pub pcr_policy: Option<String>,
    pub owner_auth_file: Option<PathBuf>,
    pub srk_handle: Option<String>,
}

impl StoreConfig {
    pub fn resolve(
        key_store: Option<PathBuf>,
        backend: Option<BackendKind>,
        insecure_root_key: Option<PathBuf>,
        tpm: TpmOverrides,
        file: &FileConfig,
    ) -> Result<Self, ConfigError> {
        let key_store = key_store
            .or_else(|| file.key_store.clone())
            .unwrap_or_else(|| PathBuf::from(defaults::KEY_STORE));
        if key_store.as_os_str().is_empty() {
            return Err(invalid("key_store", "is empty"));
        }
        let backend = backend.or(file.backend).ok_or_else(|| {
            invalid(
                "backend",
                "is not set: choose --backend tpm (production) or --backend insecure-software \
                 (development only; keys are wrapped by a file on disk)",
            )
        })?;
        let insecure_root_key = insecure_root_key
            .or_else(|| file.insecure_root_key.clone())
            .unwrap_or_else(|| SoftwareBackend::default_root_key_path(&key_store));
        let tcti = tpm
            .tcti
            .or_else(|| file.tcti.clone())
            .unwrap_or_else(|| defaults::TCTI.to_owned());
        let pcr_policy = tpm
            .pcr_policy
            .or_else(|| file.pcr_policy.clone())
            .filter(|s| !s.is_empty() && s != "off")
            .map(|s| PcrPolicy::parse(&s))
            .transpose()
            .map_err(|e| invalid("pcr_policy", e.to_string()))?;
        let srk_handle = match tpm
            .srk_handle
            .or_else(|| file.srk_handle.clone())
            .as_deref()
        {
            None => Some(DEFAULT_SRK_HANDLE),
            Some("off" | "transient" | "none") => None,
            Some(h) => {
                let v = u32::from_str_radix(h.trim_start_matches("0x"), 16).map_err(|_| {
                    invalid(
                        "srk_handle",
                        format!("{h:?} is not a hex handle like 0x81000001 (or \"off\")"),
                    )
                })?;
                if v >> 24 != 0x81 {
                    return Err(invalid(
                        "srk_handle",
                        format!("{h:?} is not a persistent handle (0x81xxxxxx)"),
                    ));
                }
                Some(v)
            }
        };
        let owner_auth_file = tpm.owner_auth_file.or_else(|| file.owner_auth_file.clone());
        Ok(Self {
            key_store,
            backend,
            insecure_root_key,
            tpm: TpmOptions {
                tcti,
                pcr_policy,
                owner_auth_file,
                srk_handle,
            },
        })
    }
}

/// Everything `serve` needs, validated.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub store: StoreConfig,
    pub socket: PathBuf,
    pub socket_mode: u32,
    pub socket_group: Option<u32>,
    pub http_addr: Option<SocketAddr>,
    pub reload_interval: Duration,
    pub rotate_every: Option<Duration>,
    pub status_version: StatusVersion,
    pub v1beta1: bool,
    pub auto_init: bool,
    pub drain_timeout: Duration,
}

/// The raw `serve` settings after flags and environment, before the file is merged.
#[derive(Debug, Default)]
pub struct ServeOverrides {
    pub socket: Option<PathBuf>,
    pub socket_mode: Option<String>,
    pub socket_group: Option<String>,
    pub http_addr: Option<String>,
    pub reload_interval: Option<String>,
    pub rotate_every: Option<String>,
    pub status_version: Option<StatusVersion>,
    pub v1beta1: Option<bool>,
    pub auto_init: Option<bool>,
    pub drain_timeout: Option<String>,
}

impl ServeConfig {
    pub fn resolve(
        store: StoreConfig,
        o: ServeOverrides,
        file: &FileConfig,
    ) -> Result<Self, ConfigError> {
        let socket = o
            .socket
            .or_else(|| file.socket.clone())
            .unwrap_or_else(|| PathBuf::from(defaults::SOCKET));
        validate_socket_path(&socket)?;
        let socket_mode = parse_mode(
            o.socket_mode
                .or_else(|| file.socket_mode.clone())
                .as_deref()
                .unwrap_or("0600"),
        )?;
        let socket_group = o
            .socket_group
            .or_else(|| file.socket_group.clone())
            .map(|g| resolve_group(&g))
            .transpose()?;
        let http_addr = match o
            .http_addr
            .or_else(|| file.http_addr.clone())
            .unwrap_or_else(|| defaults::HTTP_ADDR.to_owned())
            .as_str()
        {
            "off" | "none" | "" => None,
            a => Some(a.parse::<SocketAddr>().map_err(|e| {
                invalid(
                    "http_addr",
                    format!("{a:?} is not HOST:PORT ({e}); use \"off\" to disable"),
                )
            })?),
        };
        let reload_interval = parse_duration(
            "reload_interval",
            o.reload_interval
                .or_else(|| file.reload_interval.clone())
                .as_deref()
                .unwrap_or(defaults::RELOAD_INTERVAL),
        )?;
        if reload_interval < Duration::from_millis(100)
            || reload_interval > Duration::from_secs(600)
        {
            return Err(invalid("reload_interval", "must be between 100ms and 10m"));
        }
        let rotate_every = o
            .rotate_every
            .or_else(|| file.rotate_every.clone())
            .filter(|s| s != "off" && !s.is_empty())
            .map(|s| parse_duration("rotate_every", &s))
            .transpose()?;
        if rotate_every.is_some_and(|r| r < Duration::from_secs(1)) {
            return Err(invalid(
                "rotate_every",
                "must be at least 1s (30d is typical)",
            ));
        }
        let drain_timeout = parse_duration(
            "drain_timeout",
            o.drain_timeout
                .or_else(|| file.drain_timeout.clone())
                .as_deref()
                .unwrap_or(defaults::DRAIN_TIMEOUT),
        )?;
        Ok(Self {
            store,
            socket,
            socket_mode,
            socket_group,
            http_addr,
            reload_interval,
            rotate_every,
            status_version: o
                .status_version
                .or(file.status_version)
                .unwrap_or(StatusVersion::V2),
            v1beta1: o.v1beta1.or(file.v1beta1).unwrap_or(true),
            auto_init: o.auto_init.or(file.auto_init).unwrap_or(false),
            drain_timeout,
        })
    }
}

fn validate_socket_path(p: &Path) -> Result<(), ConfigError> {
    if !p.is_absolute() {
        return Err(invalid(
            "socket",
            format!("{} is not an absolute path", p.display()),
        ));
    }
    // sun_path holds 108 bytes including the terminating NUL.
    let len = p.as_os_str().len();
    if len > 107 {
        return Err(invalid(
            "socket",
            format!(
                "{} is {len} bytes; Unix socket paths are limited to 107",
                p.display()
            ),
        ));
    }
    Ok(())
}

fn parse_duration(setting: &'static str, s: &str) -> Result<Duration, ConfigError> {
    humantime::parse_duration(s).map_err(|e| {
        invalid(
            setting,
            format!("{s:?} is not a duration like 5s, 10m or 30d ({e})"),
        )
    })
}

/// Octal socket mode. Refuses bits for "others": anyone who can connect can decrypt.
pub fn parse_mode(s: &str) -> Result<u32, ConfigError> {
    let mode = u32::from_str_radix(s.trim_start_matches("0o"), 8).map_err(|_| {
        invalid(
            "socket_mode",
            format!("{s:?} is not an octal mode like 0600"),
        )
    })?;
    if mode > 0o777 {
        return Err(invalid(
            "socket_mode",
            format!("{s:?} has bits beyond 0777"),
        ));
    }
    if mode & 0o007 != 0 {
        return Err(invalid(
            "socket_mode",
            format!(
                "{s:?} lets every local user connect, and whoever connects can decrypt every \
                 secret; use 0600, or 0660 with socket_group set to the apiserver's group"
            ),
        ));
    }
    if mode & 0o600 != 0o600 {
        return Err(invalid(
            "socket_mode",
            format!("{s:?} must include 0600 (owner read/write)"),
        ));
    }
    Ok(mode)
}

/// A numeric gid, or a group name looked up in /etc/group.
fn resolve_group(g: &str) -> Result<u32, ConfigError> {
    if let Ok(gid) = g.parse::<u32>() {
        return Ok(gid);
    }
    let groups = fs::read_to_string("/etc/group").map_err(|e| {
        invalid(
            "socket_group",
            format!("cannot read /etc/group to look up {g:?}: {e}; give a numeric gid"),
        )
    })?;
    groups
        .lines()
        .filter_map(|l| {
            let mut f = l.split(':');
            Some((f.next()?, f.nth(1)?))
        })
        .find(|(name, _)| *name == g)
        .and_then(|(_, gid)| gid.parse().ok())
        .ok_or_else(|| invalid("socket_group", format!("no group {g:?} in /etc/group")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> StoreConfig {
        StoreConfig::resolve(
            None,
            Some(BackendKind::InsecureSoftware),
            None,
            TpmOverrides::default(),
            &FileConfig::default(),
        )
        .unwrap()
    }

    #[test]
    fn defaults_resolve() {
        let c = ServeConfig::resolve(store(), ServeOverrides::default(), &FileConfig::default())
            .unwrap();
        assert_eq!(c.socket, PathBuf::from(defaults::SOCKET));
        assert_eq!(c.socket_mode, 0o600);
        assert_eq!(c.http_addr, Some(defaults::HTTP_ADDR.parse().unwrap()));
        assert_eq!(c.reload_interval, Duration::from_secs(5));
        assert!(c.rotate_every.is_none());
        assert!(c.v1beta1);
        assert_eq!(
            c.store.insecure_root_key,
            Path::new(defaults::KEY_STORE).join("insecure-software-root.key")
        );
    }

    #[test]
    fn flags_beat_file() {
        let file: FileConfig = toml::from_str(
            "socket = \"/run/a.sock\"\nrotate_every = \"30d\"\nhttp_addr = \"off\"\nbackend = \"tpm\"",
        )
        .unwrap();
        let o = ServeOverrides {
            socket: Some("/run/b.sock".into()),
            ..Default::default()
        };
        let s = StoreConfig::resolve(None, None, None, TpmOverrides::default(), &file).unwrap();
        assert_eq!(s.backend, BackendKind::Tpm);
        let c = ServeConfig::resolve(s, o, &file).unwrap();
        assert_eq!(c.socket, PathBuf::from("/run/b.sock"));
        assert_eq!(c.rotate_every, Some(Duration::from_secs(30 * 86400)));
        assert_eq!(c.http_addr, None);
    }

    #[test]
    fn rejects_bad_values() {
        assert!(
            toml::from_str::<FileConfig>("sockte = \"/x\"").is_err(),
            "unknown keys are errors"
        );
        assert!(
            parse_mode("0666")
                .unwrap_err()
                .to_string()
                .contains("every local user")
        );
        assert!(parse_mode("0640").is_ok());
        assert!(parse_mode("0400").is_err());
        assert!(parse_mode("abc").is_err());
        let bad = |o: ServeOverrides| {
            ServeConfig::resolve(store(), o, &FileConfig::default())
                .unwrap_err()
                .to_string()
        };
        assert!(
            bad(ServeOverrides {
                socket: Some("rel.sock".into()),
                ..Default::default()
            })
            .contains("absolute")
        );
        assert!(
            bad(ServeOverrides {
                socket: Some(format!("/{}", "a".repeat(120)).into()),
                ..Default::default()
            })
            .contains("107")
        );
        assert!(
            bad(ServeOverrides {
                http_addr: Some("localhost".into()),
                ..Default::default()
            })
            .contains("HOST:PORT")
        );
        assert!(
            bad(ServeOverrides {
                reload_interval: Some("1h".into()),
                ..Default::default()
            })
            .contains("between")
        );
        assert!(
            bad(ServeOverrides {
                rotate_every: Some("soon".into()),
                ..Default::default()
            })
            .contains("duration")
        );
        let none = StoreConfig::resolve(
            None,
            None,
            None,
            TpmOverrides::default(),
            &FileConfig::default(),
        )
        .unwrap_err();
        let tpm = |pcr: &str, srk: &str| {
            StoreConfig::resolve(
                None,
                Some(BackendKind::Tpm),
                None,
                TpmOverrides {
                    pcr_policy: Some(pcr.into()),
                    srk_handle: Some(srk.into()),
                    ..Default::default()
                },
                &FileConfig::default(),
            )
        };
        let ok = tpm("sha256:7", "0x81000005").unwrap();
        assert_eq!(ok.tpm.srk_handle, Some(0x8100_0005));
        assert_eq!(ok.tpm.pcr_policy.unwrap().to_string(), "sha256:7");
        assert_eq!(tpm("off", "off").unwrap().tpm.srk_handle, None);
        assert!(
            tpm("sha256:99", "off")
                .unwrap_err()
                .to_string()
                .contains("0 to 23")
        );
        assert!(
            tpm("off", "0x80000001")
                .unwrap_err()
                .to_string()
                .contains("persistent")
        );
        assert!(none.to_string().contains("--backend tpm"));
    }

    #[test]
    fn group_lookup() {
        assert_eq!(resolve_group("0").unwrap(), 0);
        assert_eq!(resolve_group("root").unwrap(), 0);
        assert!(resolve_group("no-such-group-here").is_err());
    }
}

#[cfg(test)]
mod reference_file {
    use super::*;

    /// The commented reference config in deploy/ must parse and agree with the defaults.
    #[test]
    fn reference_config_parses_and_matches_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kms-plugin/config.toml");
        let file = FileConfig::load(Some(&path)).unwrap();
        assert_eq!(
            file.key_store.as_deref(),
            Some(Path::new(defaults::KEY_STORE))
        );
        assert_eq!(file.socket.as_deref(), Some(Path::new(defaults::SOCKET)));
        assert_eq!(file.http_addr.as_deref(), Some(defaults::HTTP_ADDR));
        assert_eq!(file.backend, Some(BackendKind::Tpm));
        // Every commented-out key is a real key too: uncomment them all and parse again.
        let text = std::fs::read_to_string(&path).unwrap();
        let uncommented: String = text
            .lines()
            .map(|l| match l.strip_prefix("# ") {
                Some(rest)
                    if rest.split_once(" = ").is_some_and(|(k, _)| {
                        !k.is_empty() && k.chars().all(|c| c.is_ascii_lowercase() || c == '_')
                    }) =>
                {
                    rest
                }
                _ => l,
            })
            .collect::<Vec<_>>()
            .join("\n");
        let all: FileConfig = toml::from_str(&uncommented).unwrap();
        assert!(all.rotate_every.is_some() && all.socket_group.is_some() && all.tcti.is_some());
        assert!(
            all.pcr_policy.is_some() && all.srk_handle.is_some() && all.owner_auth_file.is_some()
        );
    }
}
