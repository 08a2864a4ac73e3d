//! The command line: `serve`, `key ...` and `demo`. Every flag can also come from an
//! environment variable (shown in `--help`) or the TOML file given by `--config`.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Serialize;

use crate::backend::{self, BackendKind};
use crate::config::{
    FileConfig, LogFormat, ServeConfig, ServeOverrides, StoreConfig, TpmOverrides,
};
use crate::grpc::v2::StatusVersion;
use crate::keystore::{KeyState, KeyStore};
use crate::{defaults, server};
use crate::{keyadmin, keywrap};

#[derive(Debug, Parser)]
#[command(
    name = "kms-plugin",
    version,
    about = "Kubernetes KMS v2 plugin: envelope-encrypts the apiserver's DEK seeds with keys sealed to the node's TPM",
    propagate_version = true
)]
pub struct Cli {
    /// TOML config file; flags and environment variables override what it says.
    #[arg(long, global = true, env = "KMS_PLUGIN_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Log format on stderr.
    #[arg(long, global = true, env = "KMS_PLUGIN_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// Log filter: error, warn, info, debug, or a tracing directive list.
    #[arg(
        long,
        global = true,
        env = "KMS_PLUGIN_LOG_LEVEL",
        value_name = "FILTER"
    )]
    pub log_level: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the KMS v2 (and v1beta1) API on a Unix socket.
    Serve(ServeArgs),
    /// Administer the key ring: init, rotate, stage, promote, retire, list, export, import, recover.
    #[command(subcommand)]
    Key(KeyCommand),
    /// This node's identity for enrolling keys from other control-plane nodes.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Run the plugin on an embedded default: a temporary key store with the INSECURE
    /// software backend. Prints the socket and an EncryptionConfiguration to use with it.
    Demo(DemoArgs),
}

/// Where the keys live and what seals them.
#[derive(Debug, Clone, Args)]
pub struct StoreArgs {
    /// Key store directory.
    #[arg(long, env = "KMS_PLUGIN_KEY_STORE", value_name = "DIR")]
    pub key_store: Option<PathBuf>,
    /// What seals the KEKs: `tpm` (production) or `insecure-software` (development).
    #[arg(long, env = "KMS_PLUGIN_BACKEND", value_enum)]
    pub backend: Option<BackendKind>,
    /// Root key file of the insecure-software backend [default: DIR/insecure-software-root.key].
    #[arg(long, env = "KMS_PLUGIN_INSECURE_ROOT_KEY", value_name = "FILE")]
    pub insecure_root_key: Option<PathBuf>,
    /// TPM connection (tpm backend) [default: device:/dev/tpmrm0].
    #[arg(long, env = "KMS_PLUGIN_TCTI", value_name = "TCTI")]
    pub tcti: Option<String>,
    /// Bind newly sealed keys to these PCRs, e.g. sha256:7 or sha256:0,2,4,7 [default: off].
    #[arg(long, env = "KMS_PLUGIN_PCR_POLICY", value_name = "BANK:PCRS")]
    pub pcr_policy: Option<String>,
    /// File with the TPM owner hierarchy's authorization value, if it has one.
    #[arg(long, env = "KMS_PLUGIN_OWNER_AUTH_FILE", value_name = "FILE")]
    pub owner_auth_file: Option<PathBuf>,
    /// Persistent handle of the storage root key, or "off" to re-create it at every start [default: 0x81000001].
    #[arg(long, env = "KMS_PLUGIN_SRK_HANDLE", value_name = "HANDLE")]
    pub srk_handle: Option<String>,
}

/// Commands that only read or relabel the manifest need no backend.
#[derive(Debug, Clone, Args)]
pub struct StoreDirArg {
    /// Key store directory.
    #[arg(long, env = "KMS_PLUGIN_KEY_STORE", value_name = "DIR")]
    pub key_store: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    /// Unix socket to serve on [default: /var/run/edgeseal/kms.sock].
    #[arg(long, env = "KMS_PLUGIN_SOCKET", value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Socket file mode, octal [default: 0600]. 0660 with --socket-group for a non-root apiserver.
    #[arg(long, env = "KMS_PLUGIN_SOCKET_MODE", value_name = "MODE")]
    pub socket_mode: Option<String>,
    /// Group owning the socket (name or gid).
    #[arg(long, env = "KMS_PLUGIN_SOCKET_GROUP", value_name = "GROUP")]
    pub socket_group: Option<String>,
    /// HTTP listener for /healthz, /readyz, /metrics [default: 127.0.0.1:8095]; "off" disables it.
    #[arg(long, env = "KMS_PLUGIN_HTTP_ADDR", value_name = "HOST:PORT")]
    pub http_addr: Option<String>,
    /// How often to look for key store changes made by `kms-plugin key` [default: 5s].
    #[arg(long, env = "KMS_PLUGIN_RELOAD_INTERVAL", value_name = "DURATION")]
    pub reload_interval: Option<String>,
    /// Rotate automatically when the active key is this old (e.g. 30d); off by default.
    #[arg(long, env = "KMS_PLUGIN_ROTATE_EVERY", value_name = "DURATION")]
    pub rotate_every: Option<String>,
    /// `version` reported by Status: v2 (1.29+) or v2beta1 (1.27 and 1.28) [default: v2].
    #[arg(long, env = "KMS_PLUGIN_STATUS_VERSION", value_enum)]
    pub status_version: Option<StatusVersion>,
    /// Also serve the deprecated v1beta1 API on the same socket [default: true].
    #[arg(long, env = "KMS_PLUGIN_V1BETA1", value_name = "BOOL")]
    pub v1beta1: Option<bool>,
    /// Create the key store with a first key if it does not exist yet.
    #[arg(long, env = "KMS_PLUGIN_AUTO_INIT", num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub auto_init: Option<bool>,
    /// How long to let in-flight requests finish after SIGTERM [default: 10s].
    #[arg(long, env = "KMS_PLUGIN_DRAIN_TIMEOUT", value_name = "DURATION")]
    pub drain_timeout: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// Write this node's public transport key (created in the TPM on first use), which
    /// `key export --to` on another node wraps keys to. Safe to share; verify its
    /// fingerprint out of band before exporting keys to it.
    ExportPublic {
        #[command(flatten)]
        store: StoreArgs,
        /// Where to write the node public file ("-" for stdout).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// Name of this node in the file [default: the host name].
        #[arg(long, value_name = "NAME")]
        node_name: Option<String>,
    },
    /// Register another control-plane node (its `node export-public` file). From then on a
    /// key becomes active here only after that node confirmed holding it.
    AddPeer {
        #[command(flatten)]
        store: StoreDirArg,
        /// The peer's node public file.
        peer: PathBuf,
    },
    /// Forget a peer (for example a decommissioned node).
    RemovePeer {
        #[command(flatten)]
        store: StoreDirArg,
        /// The peer's name, as `node list-peers` shows it.
        name: String,
    },
    /// List the registered peers.
    ListPeers {
        #[command(flatten)]
        store: StoreDirArg,
    },
}

#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Create the key store and its first, active key.
    Init {
        #[command(flatten)]
        store: StoreArgs,
        /// Also wrap every key to this offline recovery public key (RSA >= 3072 bits, PEM),
        /// so the keys survive a cleared or replaced TPM. Strongly recommended.
        #[arg(long, env = "KMS_PLUGIN_RECOVERY_PUBLIC", value_name = "FILE")]
        recovery_public: Option<PathBuf>,
    },
    /// Set (or replace) the offline recovery public key and wrap every key in use to it.
    SetRecovery {
        #[command(flatten)]
        store: StoreArgs,
        /// The recovery public key (RSA >= 3072 bits, PEM).
        #[arg(long, value_name = "FILE")]
        recovery_public: PathBuf,
    },
    /// Wrap a key of this node to another node's transport key (see `node export-public`).
    /// The key never leaves the node in clear.
    Export {
        #[command(flatten)]
        store: StoreArgs,
        /// The key to export.
        key_id: String,
        /// The other node's public file, from `node export-public`.
        #[arg(long, value_name = "NODE_PUBLIC")]
        to: PathBuf,
        /// Where to write the bundle.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Enroll a key exported for this node: unwrapped inside the TPM and sealed here as
    /// decrypt-only (into an empty key store: as the active key).
    Import {
        #[command(flatten)]
        store: StoreArgs,
        /// The bundle from `key export`.
        bundle: PathBuf,
        /// Write an enrolment receipt here, for `key confirm` on the exporting node.
        #[arg(long, value_name = "FILE")]
        receipt: Option<PathBuf>,
        /// Name of this node in the receipt [default: the host name].
        #[arg(long, value_name = "NAME")]
        node_name: Option<String>,
    },
    /// Record a peer's enrolment receipt: that node now holds the key, so the key may
    /// become active here once every peer has confirmed it.
    Confirm {
        #[command(flatten)]
        store: StoreDirArg,
        /// The receipt from `key import --receipt` on the peer.
        receipt: PathBuf,
    },
    /// Re-seal every key into the current TPM after it was cleared or replaced, or after a
    /// PCR change: from the recovery-wrapped copies (with the offline private key), or by
    /// unsealing in place when that still works.
    Recover {
        #[command(flatten)]
        store: StoreArgs,
        /// The offline recovery private key (PEM).
        #[arg(long, value_name = "FILE")]
        recovery_private: Option<PathBuf>,
    },
    /// Add a new key and make it active at once; the old key stays for Decrypt.
    /// On a multi-node control plane use `key add` + `key promote` instead.
    Rotate(StoreArgs),
    /// Add a new key as decrypt-only (phase one of a two-phase rotation).
    Add(StoreArgs),
    /// Make a decrypt-only key the active one (phase two); the old key stays for Decrypt.
    Promote {
        #[command(flatten)]
        store: StoreDirArg,
        /// The key to promote.
        key_id: String,
        /// Promote even if some peers have not confirmed holding the key (their apiservers
        /// will fail to read what this one writes until they do).
        #[arg(long)]
        force: bool,
    },
    /// Stop using a key for Decrypt (run a storage migration first). Refuses the active key.
    Retire {
        #[command(flatten)]
        store: StoreDirArg,
        /// The key to retire.
        key_id: String,
    },
    /// Remove a retired key for good: what is still encrypted under it becomes unreadable,
    /// also with the recovery key. Refuses keys that are not retired, or were retired
    /// within the grace period.
    Destroy {
        #[command(flatten)]
        store: StoreDirArg,
        /// The key to destroy.
        key_id: String,
        /// How long the key must have been retired (e.g. 7d, 12h, 0s).
        #[arg(long, default_value = "7d", value_parser = humantime::parse_duration)]
        grace: std::time::Duration,
    },
    /// Bring a retired key back for Decrypt.
    Reinstate {
        #[command(flatten)]
        store: StoreDirArg,
        /// The key to reinstate.
        key_id: String,
    },
    /// List the keys, their states and encryption counters.
    List {
        #[command(flatten)]
        store: StoreDirArg,
        /// Output format.
        #[arg(long, short, value_enum, default_value = "table")]
        output: OutputFormat,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum OutputFormat {
    Table,
    Json,
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Directory for the demo key store and socket [default: a new temporary directory].
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// HTTP listener for probes and metrics.
    #[arg(long, default_value = defaults::HTTP_ADDR, value_name = "HOST:PORT")]
    pub http_addr: String,
}

impl Cli {
    /// The file config, read once for the logging settings and the command.
    pub fn file_config(&self) -> anyhow::Result<FileConfig> {
        Ok(FileConfig::load(self.config.as_deref())?)
    }
}

fn store_config(a: StoreArgs, file: &FileConfig) -> anyhow::Result<StoreConfig> {
    let tpm = TpmOverrides {
        tcti: a.tcti,
        pcr_policy: a.pcr_policy,
        owner_auth_file: a.owner_auth_file,
        srk_handle: a.srk_handle,
    };
    Ok(StoreConfig::resolve(
        a.key_store,
        a.backend,
        a.insecure_root_key,
        tpm,
        file,
    )?)
}

fn store_dir(a: StoreDirArg, file: &FileConfig) -> KeyStore {
    KeyStore::new(
        a.key_store
            .or_else(|| file.key_store.clone())
            .unwrap_or_else(|| PathBuf::from(defaults::KEY_STORE)),
    )
}

/// Runs a parsed command.
pub async fn run(cli: Cli, file: FileConfig) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(a) => {
            let store = store_config(a.store, &file)?;
            let overrides = ServeOverrides {
                socket: a.socket,
                socket_mode: a.socket_mode,
                socket_group: a.socket_group,
                http_addr: a.http_addr,
                reload_interval: a.reload_interval,
                rotate_every: a.rotate_every,
                status_version: a.status_version,
                v1beta1: a.v1beta1,
                auto_init: a.auto_init,
                drain_timeout: a.drain_timeout,
            };
            server::run(ServeConfig::resolve(store, overrides, &file)?).await
        }
        Command::Key(k) => tokio::task::spawn_blocking(move || key(k, &file)).await?,
        Command::Node(n) => tokio::task::spawn_blocking(move || node(n, &file)).await?,
        Command::Demo(a) => demo(a).await,
    }
}

fn key(cmd: KeyCommand, file: &FileConfig) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match cmd {
        KeyCommand::Init {
            store,
            recovery_public,
        } => {
            let cfg = store_config(store, file)?;
            let recovery_pem = recovery_public
                .map(|p| {
                    keywrap::read_public(&p, "recovery public key", keywrap::MIN_RECOVERY_BITS)
                        .and_then(|k| keywrap::public_pem(&k))
                })
                .transpose()?;
            let backend = backend::open(&cfg, true)?;
            warn_if_insecure(cfg.backend);
            let has_recovery = recovery_pem.is_some();
            let id = keyadmin::init(
                &KeyStore::new(&cfg.key_store),
                backend.as_ref(),
                recovery_pem,
            )?;
            writeln!(out, "{id}")?;
            eprintln!(
                "initialized key store {} with active key {id}",
                cfg.key_store.display()
            );
            if !has_recovery {
                eprintln!(
                    "note: no --recovery-public given: if this node's TPM is cleared or replaced, \
                     its keys can only come back from another node that holds them"
                );
            }
        }
        KeyCommand::SetRecovery {
            store,
            recovery_public,
        } => {
            let cfg = store_config(store, file)?;
            let pem = keywrap::read_public(
                &recovery_public,
                "recovery public key",
                keywrap::MIN_RECOVERY_BITS,
            )
            .and_then(|k| keywrap::public_pem(&k))?;
            let backend = backend::open(&cfg, false)?;
            let n = keyadmin::set_recovery(&KeyStore::new(&cfg.key_store), backend.as_ref(), pem)?;
            eprintln!("wrapped {n} key(s) to the recovery key; keys added later are wrapped too");
        }
        KeyCommand::Export {
            store,
            key_id,
            to,
            out: path,
        } => {
            let cfg = store_config(store, file)?;
            let backend = backend::open(&cfg, false)?;
            let node: keyadmin::NodePublic = read_json(&to, "node public file")?;
            let bundle = keyadmin::export(
                &KeyStore::new(&cfg.key_store),
                backend.as_ref(),
                &key_id,
                &node,
            )?;
            write_json(&path, &bundle)?;
            eprintln!(
                "wrapped key {key_id} (check value {}) to node {:?} (transport key {}); import it there \
                 with `kms-plugin key import {}`",
                bundle.check_value,
                node.node,
                bundle.to,
                path.display()
            );
        }
        KeyCommand::Import {
            store,
            bundle,
            receipt,
            node_name,
        } => {
            let cfg = store_config(store, file)?;
            let backend = backend::open(&cfg, false)?;
            let b: keyadmin::KeyBundle = read_json(&bundle, "key bundle")?;
            let name = node_name.unwrap_or_else(hostname);
            let (state, receipt_doc) =
                keyadmin::import(&KeyStore::new(&cfg.key_store), backend.as_ref(), &b, &name)?;
            if let Some(path) = &receipt {
                write_json(path, &receipt_doc)?;
                eprintln!(
                    "wrote the enrolment receipt to {}: give it to the exporting node's admin (`key confirm`)",
                    path.display()
                );
            }
            writeln!(out, "{}", b.key_id)?;
            eprintln!(
                "enrolled key {} as {} (check value {}: compare it with `key list` on the exporting node)",
                b.key_id,
                state.as_str(),
                b.check_value
            );
        }
        KeyCommand::Recover {
            store,
            recovery_private,
        } => {
            let cfg = store_config(store, file)?;
            let private = recovery_private
                .map(|p| keywrap::read_private(&p, "recovery private key"))
                .transpose()?;
            let backend = backend::open(&cfg, false)?;
            let report = keyadmin::recover(
                &KeyStore::new(&cfg.key_store),
                backend.as_ref(),
                private.as_ref(),
            )?;
            serde_json::to_writer_pretty(&mut out, &report)?;
            writeln!(out)?;
            eprintln!(
                "re-sealed {} key(s) into the current backend; restart or SIGHUP the plugin",
                report.recovered.len() + report.resealed_in_place.len()
            );
        }
        KeyCommand::Rotate(a) => {
            let cfg = store_config(a, file)?;
            let backend = backend::open(&cfg, false)?;
            let id = keyadmin::add(
                &KeyStore::new(&cfg.key_store),
                backend.as_ref(),
                KeyState::Active,
            )?;
            writeln!(out, "{id}")?;
            eprintln!(
                "key {id} is now active; the previous key stays for Decrypt. A running plugin picks \
                 this up within its reload interval (or at once on SIGHUP)."
            );
        }
        KeyCommand::Add(a) => {
            let cfg = store_config(a, file)?;
            let backend = backend::open(&cfg, false)?;
            let id = keyadmin::add(
                &KeyStore::new(&cfg.key_store),
                backend.as_ref(),
                KeyState::DecryptOnly,
            )?;
            writeln!(out, "{id}")?;
            eprintln!(
                "key {id} added as decrypt-only; promote it with `kms-plugin key promote {id}` once every node has it"
            );
        }
        KeyCommand::Confirm { store, receipt } => {
            let r: keyadmin::EnrolmentReceipt = read_json(&receipt, "enrolment receipt")?;
            let store = store_dir(store, file);
            let peer = keyadmin::confirm(&store, &r)?;
            let missing = store.load()?.missing_peers(r.key_id.as_str())?.join(", ");
            if missing.is_empty() {
                eprintln!(
                    "peer {peer} holds key {}; every peer does now: it can be promoted",
                    r.key_id
                );
            } else {
                eprintln!(
                    "peer {peer} holds key {}; still missing: {missing}",
                    r.key_id
                );
            }
        }
        KeyCommand::Promote {
            store,
            key_id,
            force,
        } => {
            keyadmin::promote(&store_dir(store, file), &key_id, force)?;
            eprintln!("key {key_id} is now active; the previous key stays for Decrypt");
        }
        KeyCommand::Retire { store, key_id } => {
            keyadmin::retire(&store_dir(store, file), &key_id)?;
            eprintln!(
                "key {key_id} is retired: data still encrypted under it can no longer be read until it is reinstated"
            );
        }
        KeyCommand::Destroy {
            store,
            key_id,
            grace,
        } => {
            keyadmin::destroy(&store_dir(store, file), &key_id, grace)?;
            eprintln!(
                "key {key_id} is destroyed: it is gone from the key store, with its recovery \
                 wrap (older backups of the key store still hold it)"
            );
        }
        KeyCommand::Reinstate { store, key_id } => {
            keyadmin::reinstate(&store_dir(store, file), &key_id)?;
            eprintln!("key {key_id} is back as decrypt-only");
        }
        KeyCommand::List { store, output } => {
            let store = store_dir(store, file);
            let m = store.load()?;
            let listing = Listing {
                key_store: store.dir().display().to_string(),
                backend: m.backend.kind,
                backend_fingerprint: m.backend.fingerprint.clone(),
                generation: m.generation,
                active_key_id: m.active().map(|k| k.id.to_string()),
                peers: m.peers.iter().map(|p| p.name.clone()).collect(),
                keys: m
                    .keys
                    .iter()
                    .map(|k| ListedKey {
                        id: k.id.to_string(),
                        serial: k.serial,
                        state: k.state,
                        created_at: fmt_time(k.created_at),
                        state_changed_at: fmt_time(k.state_changed_at),
                        encryptions_reserved: k.encryptions_reserved,
                        check_value: k.check_value.clone(),
                        origin: k.origin,
                        recoverable: k.recovery.is_some(),
                        enrolled_on: k.enrolled_on.clone(),
                        missing_peers: m
                            .missing_peers(k.id.as_str())
                            .map(|v| v.into_iter().map(String::from).collect())
                            .unwrap_or_default(),
                    })
                    .collect(),
            };
            match output {
                OutputFormat::Json => {
                    serde_json::to_writer_pretty(&mut out, &listing)?;
                    writeln!(out)?;
                }
                OutputFormat::Table => listing.print_table(&mut out)?,
            }
        }
    }
    Ok(())
}

fn node(cmd: NodeCommand, file: &FileConfig) -> anyhow::Result<()> {
    match cmd {
        NodeCommand::ExportPublic {
            store,
            out,
            node_name,
        } => {
            let cfg = store_config(store, file)?;
            let backend = backend::open(&cfg, false)?;
            let name = node_name.unwrap_or_else(hostname);
            let public =
                keyadmin::node_public(&KeyStore::new(&cfg.key_store), backend.as_ref(), &name)?;
            write_json(&out, &public)?;
            eprintln!(
                "node {name}: transport key {} (verify this fingerprint with the admin of the \
                 exporting node before they export keys to it)",
                public.transport_fingerprint
            );
        }
        NodeCommand::AddPeer { store, peer } => {
            let p: keyadmin::NodePublic = read_json(&peer, "node public file")?;
            keyadmin::add_peer(&store_dir(store, file), &p)?;
            eprintln!(
                "added peer {} (transport key {}); new keys now become active only once it holds them",
                p.node, p.transport_fingerprint
            );
        }
        NodeCommand::RemovePeer { store, name } => {
            keyadmin::remove_peer(&store_dir(store, file), &name)?;
            eprintln!("removed peer {name}");
        }
        NodeCommand::ListPeers { store } => {
            let m = store_dir(store, file).load()?;
            let mut out = std::io::stdout().lock();
            for p in &m.peers {
                writeln!(
                    out,
                    "{}\t{}\t{}",
                    p.name,
                    p.transport_fingerprint,
                    fmt_time(p.added_at)
                )?;
            }
        }
    }
    Ok(())
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into())
}

fn read_json<T: serde::de::DeserializeOwned>(
    path: &std::path::Path,
    what: &str,
) -> anyhow::Result<T> {
    let bytes =
        std::fs::read(path).with_context(|| format!("reading {what} {}", path.display()))?;
    serde_json::from_slice(&bytes)
        .with_context(|| format!("{what} {} is not valid", path.display()))
}

/// Writes a (public) JSON document, or prints it for "-".
fn write_json<T: Serialize>(path: &std::path::Path, value: &T) -> anyhow::Result<()> {
    let mut json = serde_json::to_vec_pretty(value)?;
    json.push(b'\n');
    if path.as_os_str() == "-" {
        std::io::stdout().write_all(&json)?;
        return Ok(());
    }
    std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))
}

fn fmt_time(t: time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

fn warn_if_insecure(kind: BackendKind) {
    if kind == BackendKind::InsecureSoftware {
        eprintln!(
            "WARNING: insecure-software backend: keys are wrapped by a root key file on disk. \
             Development and CI only; use --backend tpm in production."
        );
    }
}

#[derive(Serialize)]
struct Listing {
    key_store: String,
    backend: BackendKind,
    backend_fingerprint: String,
    generation: u64,
    active_key_id: Option<String>,
    peers: Vec<String>,
    keys: Vec<ListedKey>,
}

#[derive(Serialize)]
struct ListedKey {
    id: String,
    serial: u64,
    state: KeyState,
    created_at: String,
    state_changed_at: String,
    encryptions_reserved: u64,
    check_value: String,
    origin: crate::keystore::KeyOrigin,
    recoverable: bool,
    enrolled_on: Vec<String>,
    missing_peers: Vec<String>,
}

impl Listing {
    fn print_table(&self, out: &mut impl Write) -> std::io::Result<()> {
        writeln!(
            out,
            "key store: {} (backend {}, {})",
            self.key_store, self.backend, self.backend_fingerprint
        )?;
        if !self.peers.is_empty() {
            writeln!(out, "peers: {}", self.peers.join(", "))?;
        }
        let w = self
            .keys
            .iter()
            .map(|k| k.id.len())
            .max()
            .unwrap_or(6)
            .max(6);
        writeln!(
            out,
            "{:<w$}  {:<12}  {:<8}  {:<11}  {:<16}  {:>11}  {:<16}  CREATED",
            "KEY ID", "STATE", "ORIGIN", "RECOVERABLE", "CHECK VALUE", "ENCRYPTIONS", "ENROLLED"
        )?;
        for k in &self.keys {
            writeln!(
                out,
                "{:<w$}  {:<12}  {:<8}  {:<11}  {:<16}  {:>11}  {:<16}  {}",
                k.id,
                k.state.as_str(),
                match k.origin {
                    crate::keystore::KeyOrigin::Created => "created",
                    crate::keystore::KeyOrigin::Imported => "imported",
                },
                if k.recoverable { "yes" } else { "no" },
                k.check_value,
                k.encryptions_reserved,
                if self.peers.is_empty() {
                    "-".to_owned()
                } else if k.missing_peers.is_empty() {
                    "all peers".to_owned()
                } else {
                    format!("missing {}", k.missing_peers.join(","))
                },
                k.created_at,
            )?;
        }
        Ok(())
    }
}

async fn demo(a: DemoArgs) -> anyhow::Result<()> {
    let (dir, _temp) = match a.dir {
        Some(d) => (d, None),
        None => {
            let t = tempfile::Builder::new()
                .prefix("kms-plugin-demo-")
                .tempdir()?;
            (t.path().to_owned(), Some(t))
        }
    };
    let dir = std::path::absolute(&dir).context("resolving the demo directory")?;
    let store = StoreConfig::resolve(
        Some(dir.join("keys")),
        Some(BackendKind::InsecureSoftware),
        None,
        TpmOverrides::default(),
        &FileConfig::default(),
    )?;
    let socket = dir.join("kms.sock");
    let overrides = ServeOverrides {
        socket: Some(socket.clone()),
        http_addr: Some(a.http_addr),
        auto_init: Some(true),
        ..Default::default()
    };
    let cfg = ServeConfig::resolve(store, overrides, &FileConfig::default())?;
    println!(
        "kms-plugin demo (INSECURE software backend, for trying things out)\n\
         key store: {}\n\
         socket:    {}\n\n\
         Point kube-apiserver at it with --encryption-provider-config=<this file>:\n\n{}\n\
         Or try a round trip now with a client this project did not write: grpc-go dialled \
         as kube-apiserver dials (from a checkout, with the README's prerequisites):\n\n\
         \x20 tests/interop/go/run -socket {} -checks health,v2,v1beta1\n\n\
         Stop with Ctrl-C; the temporary directory is removed then.\n",
        dir.join("keys").display(),
        socket.display(),
        encryption_configuration(&socket),
        socket.display(),
    );
    server::run(cfg).await
}

/// An EncryptionConfiguration for a socket, as the demo prints it.
pub fn encryption_configuration(socket: &std::path::Path) -> String {
    format!(
        "apiVersion: apiserver.config.k8s.io/v1\n\
         kind: EncryptionConfiguration\n\
         resources:\n\
         \x20 - resources: [secrets]\n\
         \x20   providers:\n\
         \x20     - kms:\n\
         \x20         apiVersion: v2\n\
         \x20         name: {}\n\
         \x20         endpoint: unix://{}\n\
         \x20         timeout: 3s\n\
         \x20     - identity: {{}}\n",
        defaults::PROVIDER_NAME,
        socket.display()
    )
}
