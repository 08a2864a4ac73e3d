//! `azure-fake`: a local server speaking the real wire protocols of Azure Key Vault
//! (secrets, certificates, keys: reads), Entra ID's v2.0 token endpoint (client credentials: workload identity,
//! certificate, secret), Azure IMDS and Azure Arc HIMDS, for integration tests that cannot
//! reach Azure.
//!
//! Two listeners on 127.0.0.1, both served by a dedicated thread (so a test that blocks its
//! own runtime, e.g. waiting on a child process, does not starve the fake):
//! - HTTPS (`https://localhost:PORT`, certificate from a throw-away test CA, HTTP/1.1 and
//!   HTTP/2 by ALPN): Key Vault under `/secrets`, `/certificates` and `/keys`, and Entra ID
//!   under `/{tenant}/...`.
//! - plain HTTP (`http://127.0.0.1:PORT2`): IMDS at `/metadata/identity/oauth2/token`, Arc
//!   HIMDS at `/arc/metadata/identity/oauth2/token`, and the `/_fake/` admin API used by
//!   tests that run the binary (below).
//!
//! Key Vault objects:
//! - secrets: [`FakeAzure::set_secret`] and the vault's own `PUT /secrets/{name}`; read with
//!   `GET /secrets/{name}[/{version}]`, listed with `GET /secrets[/{name}/versions]`.
//! - certificates: a secret stored through the fake's API (not the vault's `PUT`) with content
//!   type `application/x-pem-file` or `application/x-pkcs12` backs a certificate of the same
//!   name and version, as in Key Vault: `GET /certificates/{name}[/{version}]` answers its
//!   CertificateBundle (`cer` is the leaf: the PEM's first `CERTIFICATE` block, or the
//!   PKCS#12's certificate for its key; the PKCS#12 is base64 with an empty password).
//! - keys: [`FakeAzure::set_key`] (public JWK members), and the keys of certificates (same
//!   name and version, `managed: true`); `GET /keys/{name}[/{version}]` answers the
//!   KeyBundle.
//!
//! Admin API (`admin_endpoint()`, i.e. `http://127.0.0.1:PORT2/_fake`):
//!
//! | request | effect |
//! | --- | --- |
//! | `GET /_fake/health` | 200 `{"ok":true}` |
//! | `GET /_fake/stats` | [`Stats`] as JSON |
//! | `POST /_fake/stats/reset` | zero the statistics |
//! | `POST /_fake/faults`, body a [`Fault`] as JSON, e.g. `{"kind":"throttle","target":"vault","retry_after_secs":1,"count":2}` | inject it |
//! | `DELETE /_fake/faults` | clear all faults |
//! | `PUT /_fake/secrets/{name}`, body `{"value", "contentType"?}` | [`FakeAzure::set_secret`]; answers `{"version"}` |
//! | `DELETE /_fake/secrets/{name}` | [`FakeAzure::delete_secret`] |
//! | `POST /_fake/secrets/{name}/forbid`, `.../allow` | [`FakeAzure::forbid`], [`FakeAzure::allow`] |
//! | `PUT /_fake/keys/{name}`, body a public JWK | [`FakeAzure::set_key`]; answers `{"version"}` |
//! | `DELETE /_fake/keys/{name}` | [`FakeAzure::delete_key`] |
//! | `POST /_fake/tokens/revoke` | [`FakeAzure::revoke_tokens`] |
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use azure_fake::{FakeAzure, Fault, Options, Target};
//! let fake = FakeAzure::start(Options::default()).await?;
//! let version = fake.set_secret("db-password", "hunter2", None);
//! fake.inject(Fault::Throttle { target: Target::Vault, retry_after_secs: 1, retry_after_ms: None, count: 2 });
//! // point the code under test at fake.vault_url(), fake.authority_host(), fake.ca_file() ...
//! assert!(fake.stats().vault_get_requests() <= 10);
//! # let _ = version; Ok(()) }
//! ```

mod admin;
mod certificates;
mod entra;
mod http;
mod imds;
mod keys;
mod model;
mod state;
mod tls;
mod vault;

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

pub use entra::JWT_BEARER;
pub use imds::{ARC_PATH, IMDS_PATH};
pub use model::{Endpoint, EndpointStats, Fault, Flow, RequestRecord, Stats, Target};
pub use vault::API_VERSIONS;

use crate::state::{NewVersion, Shared, is_certificate_content_type};

/// Default tenant id.
pub const DEFAULT_TENANT_ID: &str = "72f988bf-0000-4000-8000-00000000fa4e";
/// Default client (application) id.
pub const DEFAULT_CLIENT_ID: &str = "0f0e0d0c-0000-4000-8000-0000000c11e7";

/// How the fake behaves.
#[derive(Debug, Clone)]
pub struct Options {
    /// The only tenant the token endpoint knows (others get AADSTS90002).
    pub tenant_id: String,
    /// The only client id the token endpoint and IMDS/HIMDS know.
    pub client_id: String,
    /// Audience of Key Vault tokens, and the challenge's `resource`. Default
    /// `https://vault.azure.net`.
    pub vault_resource: String,
    /// Lifetime of issued access tokens (default 1 h; `expires_in` is one second less).
    pub token_lifetime: Duration,
    /// Where the Arc HIMDS challenge key files are written (created if missing). Empty
    /// (the default): `<state dir>/arc-tokens`. The Azure SDKs only read key files from
    /// `/var/opt/azcmagent/tokens` on Linux.
    pub arc_key_dir: PathBuf,
    /// If set, workload-identity assertions must equal this file's current contents
    /// (whitespace-trimmed). If not, any well-formed unexpired JWT is accepted.
    pub federated_token_file: Option<PathBuf>,
    /// The service principal's client secret; `None`: every `client_secret` is refused.
    pub client_secret: Option<String>,
    /// Where `ca.pem` is written. `None`: a private temporary directory, removed on drop.
    pub state_dir: Option<PathBuf>,
    /// HTTPS port (vault and Entra); 0 picks a free one.
    pub https_port: u16,
    /// Plain-HTTP port (IMDS, Arc, admin); 0 picks a free one.
    pub http_port: u16,
    /// Print each request to stderr.
    pub log_requests: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            tenant_id: DEFAULT_TENANT_ID.to_owned(),
            client_id: DEFAULT_CLIENT_ID.to_owned(),
            vault_resource: "https://vault.azure.net".to_owned(),
            token_lifetime: Duration::from_secs(3600),
            arc_key_dir: PathBuf::new(),
            federated_token_file: None,
            client_secret: None,
            state_dir: None,
            https_port: 0,
            http_port: 0,
            log_requests: false,
        }
    }
}

/// What the binary writes to `ready.json` (and what [`FakeAzure::ready_info`] returns).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadyInfo {
    pub vault_url: String,
    pub authority_host: String,
    pub imds_endpoint: String,
    pub arc_identity_endpoint: String,
    pub admin_endpoint: String,
    pub ca_file: PathBuf,
    pub tenant_id: String,
    pub client_id: String,
    pub vault_resource: String,
    pub arc_key_dir: PathBuf,
    pub federated_token_file: Option<PathBuf>,
    pub client_secret: Option<String>,
}

/// A secret in a seed file: either just the value, or `{"value", "contentType"?, "tags"?}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum SeedSecret {
    Value(String),
    Full {
        value: String,
        #[serde(rename = "contentType", default)]
        content_type: Option<String>,
        #[serde(default)]
        tags: Option<BTreeMap<String, String>>,
    },
}

/// Reads a seed file: a JSON object mapping secret names to [`SeedSecret`]s.
pub fn load_seed(path: &Path) -> anyhow::Result<BTreeMap<String, SeedSecret>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading seed file {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| {
        format!(
            "seed file {} must map secret names to \"value\" or {{\"value\", \"contentType\"?, \"tags\"?}}",
            path.display()
        )
    })
}

pub(crate) fn set_secret_in(
    shared: &Shared,
    name: &str,
    value: &str,
    content_type: Option<&str>,
) -> String {
    shared
        .put_secret(
            name,
            NewVersion {
                value: value.to_owned(),
                content_type: content_type.map(str::to_owned),
                managed: is_certificate_content_type(content_type),
                ..NewVersion::default()
            },
        )
        .version
}

/// A running fake. Stops (and removes the Arc key files it wrote) when dropped.
pub struct FakeAzure {
    shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
    thread: Option<std::thread::JoinHandle<()>>,
    ca_pem: String,
    ca_file: PathBuf,
    https_port: u16,
    http_port: u16,
    created_arc_dir: bool,
    _temp_dir: Option<tempfile::TempDir>,
}

impl std::fmt::Debug for FakeAzure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeAzure")
            .field("vault_url", &self.vault_url())
            .field("imds_endpoint", &self.imds_endpoint())
            .finish_non_exhaustive()
    }
}

fn bind(port: u16, what: &str) -> anyhow::Result<std::net::TcpListener> {
    let l = std::net::TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
        .with_context(|| format!("binding the {what} listener on 127.0.0.1:{port}"))?;
    l.set_nonblocking(true)?;
    Ok(l)
}

impl FakeAzure {
    /// Starts the fake (on its own thread and runtime) and returns once it is listening.
    pub async fn start(opts: Options) -> anyhow::Result<Self> {
        Self::start_blocking(opts)
    }

    /// [`FakeAzure::start`] for code without an async runtime.
    pub fn start_blocking(opts: Options) -> anyhow::Result<Self> {
        let tls = tls::generate()?;

        let (state_dir, temp_dir) = match &opts.state_dir {
            Some(d) => {
                std::fs::create_dir_all(d)
                    .with_context(|| format!("creating state dir {}", d.display()))?;
                (d.clone(), None)
            }
            None => {
                let t = tempfile::Builder::new()
                    .prefix("azure-fake-")
                    .tempdir()
                    .context("creating a temporary state dir")?;
                (t.path().to_path_buf(), Some(t))
            }
        };
        let ca_file = state_dir.join("ca.pem");
        std::fs::write(&ca_file, &tls.ca_pem)
            .with_context(|| format!("writing {}", ca_file.display()))?;

        let arc_key_dir = if opts.arc_key_dir.as_os_str().is_empty() {
            state_dir.join("arc-tokens")
        } else {
            opts.arc_key_dir.clone()
        };
        let arc_display = arc_key_dir.display().to_string();
        anyhow::ensure!(
            !arc_display.contains('=') && !arc_display.contains(','),
            "arc_key_dir {arc_display} must not contain '=' or ',' (clients split the challenge on them)"
        );
        let created_arc_dir = !arc_key_dir.exists();
        std::fs::create_dir_all(&arc_key_dir)
            .with_context(|| format!("creating Arc key dir {arc_display}"))?;

        let https = bind(opts.https_port, "HTTPS")?;
        let https_port = https.local_addr()?.port();
        let http = bind(opts.http_port, "HTTP")?;
        let http_port = http.local_addr()?.port();
        // `localhost` may resolve to ::1 first: serve it there too when we can.
        let https6 =
            std::net::TcpListener::bind(SocketAddr::from((Ipv6Addr::LOCALHOST, https_port)))
                .ok()
                .filter(|l| l.set_nonblocking(true).is_ok());

        let vault_url = format!("https://localhost:{https_port}");
        let imds_endpoint = format!("http://127.0.0.1:{http_port}");
        let shared = Arc::new(Shared::new(
            opts,
            vault_url.clone(),
            vault_url,
            imds_endpoint,
            arc_key_dir,
        ));

        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("building the fake's runtime")?;
        let (shutdown, rx) = watch::channel(false);
        let acceptor = tokio_rustls::TlsAcceptor::from(tls.server_config);
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("azure-fake".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let mut listeners = vec![
                        (https, Some(acceptor.clone()), http::Listener::Https),
                        (http, None, http::Listener::Http),
                    ];
                    if let Some(l) = https6 {
                        listeners.push((l, Some(acceptor), http::Listener::Https));
                    }
                    let mut tasks = Vec::new();
                    for (l, tls, kind) in listeners {
                        match tokio::net::TcpListener::from_std(l) {
                            Ok(l) => tasks.push(tokio::spawn(http::serve(
                                l,
                                tls,
                                kind,
                                thread_shared.clone(),
                                rx.clone(),
                            ))),
                            Err(e) => eprintln!("azure-fake: cannot serve a listener: {e}"),
                        }
                    }
                    let mut wait = rx.clone();
                    let _ = wait.wait_for(|stop| *stop).await;
                    for t in tasks {
                        let _ = t.await;
                    }
                });
                runtime.shutdown_timeout(Duration::from_millis(500));
            })
            .context("spawning the fake's thread")?;

        Ok(FakeAzure {
            shared,
            shutdown,
            thread: Some(thread),
            ca_pem: tls.ca_pem,
            ca_file,
            https_port,
            http_port,
            created_arc_dir,
            _temp_dir: temp_dir,
        })
    }

    /// `https://localhost:PORT`
    pub fn vault_url(&self) -> String {
        self.shared.vault_url.clone()
    }

    /// `https://localhost:PORT` (same listener as the vault); the token endpoint is
    /// `{authority_host}/{tenant}/oauth2/v2.0/token`.
    pub fn authority_host(&self) -> String {
        self.shared.authority_host.clone()
    }

    /// `http://127.0.0.1:PORT2`: what `AZURE_POD_IDENTITY_AUTHORITY_HOST` and, for Arc,
    /// `IMDS_ENDPOINT` point at.
    pub fn imds_endpoint(&self) -> String {
        self.shared.imds_endpoint.clone()
    }

    /// `http://127.0.0.1:PORT2/arc/metadata/identity/oauth2/token`: Arc's `IDENTITY_ENDPOINT`.
    pub fn arc_identity_endpoint(&self) -> String {
        format!("{}{}", self.shared.imds_endpoint, imds::ARC_PATH)
    }

    /// `http://127.0.0.1:PORT2/_fake`: the admin API.
    pub fn admin_endpoint(&self) -> String {
        format!("{}/_fake", self.shared.imds_endpoint)
    }

    /// The HTTPS listener's port.
    pub fn https_port(&self) -> u16 {
        self.https_port
    }

    /// The plain-HTTP listener's port.
    pub fn http_port(&self) -> u16 {
        self.http_port
    }

    /// The test CA certificate (PEM) that signed the HTTPS certificate.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// Where the test CA was written.
    pub fn ca_file(&self) -> &Path {
        &self.ca_file
    }

    /// Directory receiving the Arc challenge key files.
    pub fn arc_key_dir(&self) -> &Path {
        &self.shared.arc_key_dir
    }

    /// The options the fake runs with.
    pub fn options(&self) -> &Options {
        &self.shared.opts
    }

    /// The `WWW-Authenticate` value the vault sends with its 401s.
    pub fn vault_challenge(&self) -> String {
        vault::challenge(&self.shared)
    }

    /// Everything a client needs, as the binary writes it to `ready.json`.
    pub fn ready_info(&self) -> ReadyInfo {
        let o = &self.shared.opts;
        ReadyInfo {
            vault_url: self.vault_url(),
            authority_host: self.authority_host(),
            imds_endpoint: self.imds_endpoint(),
            arc_identity_endpoint: self.arc_identity_endpoint(),
            admin_endpoint: self.admin_endpoint(),
            ca_file: self.ca_file.clone(),
            tenant_id: o.tenant_id.clone(),
            client_id: o.client_id.clone(),
            vault_resource: o.vault_resource.clone(),
            arc_key_dir: self.shared.arc_key_dir.clone(),
            federated_token_file: o.federated_token_file.clone(),
            client_secret: o.client_secret.clone(),
        }
    }

    /// Adds a new version of `name` (creating the secret) and returns the version id (32 hex
    /// chars). `application/x-pkcs12` and `application/x-pem-file` make it certificate-backed
    /// (`kid`, `managed: true`).
    pub fn set_secret(&self, name: &str, value: &str, content_type: Option<&str>) -> String {
        set_secret_in(&self.shared, name, value, content_type)
    }

    /// Adds a new version with tags.
    pub fn set_secret_with_tags(
        &self,
        name: &str,
        value: &str,
        content_type: Option<&str>,
        tags: BTreeMap<String, String>,
    ) -> String {
        self.shared
            .put_secret(
                name,
                NewVersion {
                    value: value.to_owned(),
                    content_type: content_type.map(str::to_owned),
                    tags: Some(tags),
                    managed: is_certificate_content_type(content_type),
                    ..NewVersion::default()
                },
            )
            .version
    }

    /// Adds every seed secret.
    pub fn seed(&self, secrets: &BTreeMap<String, SeedSecret>) {
        for (name, s) in secrets {
            match s {
                SeedSecret::Value(v) => {
                    self.set_secret(name, v, None);
                }
                SeedSecret::Full {
                    value,
                    content_type,
                    tags,
                } => match tags {
                    Some(t) => {
                        self.set_secret_with_tags(name, value, content_type.as_deref(), t.clone());
                    }
                    None => {
                        self.set_secret(name, value, content_type.as_deref());
                    }
                },
            }
        }
    }

    /// Version ids of `name`, oldest first (empty if it does not exist).
    pub fn secret_versions(&self, name: &str) -> Vec<String> {
        self.shared
            .secret(name)
            .map(|s| s.versions.into_iter().map(|v| v.version).collect())
            .unwrap_or_default()
    }

    /// Removes `name` and all its versions (later reads get 404 SecretNotFound, and
    /// CertificateNotFound for the certificate it backed).
    pub fn delete_secret(&self, name: &str) {
        self.shared.delete_secret(name);
    }

    /// Adds a new version of key `name` (creating the key) and returns the version id (32 hex
    /// chars). `jwk` is a JSON Web Key as Key Vault returns it: `kty` (`RSA`, `RSA-HSM`,
    /// `EC`, `EC-HSM`, ...), `n`/`e` or `crv`/`x`/`y` (base64url without padding), and
    /// optionally `key_ops` (default: what Key Vault gives a new key of that type). Private
    /// members (`d`, `p`, `q`, ...) and `kid` are dropped; the fake does not check the rest,
    /// so tests can serve malformed keys too. A key set here hides the key of a certificate
    /// with the same name.
    pub fn set_key(&self, name: &str, jwk: serde_json::Value) -> String {
        self.shared.put_key(name, keys::public_jwk(jwk))
    }

    /// Version ids of key `name` set with [`FakeAzure::set_key`], oldest first.
    pub fn key_versions(&self, name: &str) -> Vec<String> {
        self.shared
            .key(name)
            .map(|k| k.versions.into_iter().map(|v| v.version).collect())
            .unwrap_or_default()
    }

    /// Removes key `name` set with [`FakeAzure::set_key`] and all its versions (later reads
    /// get 404 KeyNotFound, unless a certificate of that name has a key).
    pub fn delete_key(&self, name: &str) {
        self.shared.delete_key(name);
    }

    /// Makes every request for `name` (secret, certificate or key) answer 403 Forbidden /
    /// ForbiddenByRbac.
    pub fn forbid(&self, name: &str) {
        self.shared.set_forbidden(name, true);
    }

    /// Undoes [`FakeAzure::forbid`].
    pub fn allow(&self, name: &str) {
        self.shared.set_forbidden(name, false);
    }

    /// Queues a fault (see [`Fault`]).
    pub fn inject(&self, fault: Fault) {
        self.shared.inject(fault);
    }

    /// Removes every queued or standing fault.
    pub fn clear_faults(&self) {
        self.shared.clear_faults();
    }

    /// Forgets every issued access token: the vault answers 401 + challenge until the client
    /// gets a new one.
    pub fn revoke_tokens(&self) {
        self.shared.revoke_tokens();
    }

    /// A snapshot of the statistics.
    pub fn stats(&self) -> Stats {
        self.shared.stats()
    }

    /// Zeroes the statistics.
    pub fn reset_stats(&self) {
        self.shared.reset_stats();
    }
}

impl Drop for FakeAzure {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        for f in self.shared.take_arc_files() {
            let _ = std::fs::remove_file(f);
        }
        if self.created_arc_dir {
            // Only if empty: never remove what someone else put there.
            let _ = std::fs::remove_dir(&self.shared.arc_key_dir);
        }
    }
}
