//! Shared mutable state: secrets, keys, issued tokens, Arc challenge secrets, faults and statistics.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::Rng as _;
use serde_json::json;

use crate::Options;
use crate::model::{Endpoint, Fault, Flow, RequestRecord, Stats, Target};

const MAX_REQUEST_RECORDS: usize = 10_000;

/// Seconds since the Unix epoch.
pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

pub(crate) fn unix_now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// `n` random bytes as lowercase hex.
pub(crate) fn random_hex(n: usize) -> String {
    let mut bytes = vec![0u8; n];
    rand::rng().fill(&mut bytes[..]);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A random version-4 GUID.
pub(crate) fn random_guid() -> String {
    let mut b = [0u8; 16];
    rand::rng().fill(&mut b[..]);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// Content types that mark a secret as backing a Key Vault certificate.
pub(crate) fn is_certificate_content_type(ct: Option<&str>) -> bool {
    matches!(
        ct.map(|c| c.trim().to_ascii_lowercase()).as_deref(),
        Some("application/x-pkcs12") | Some("application/x-pem-file")
    )
}

#[derive(Debug, Clone)]
pub(crate) struct SecretVersion {
    pub version: String,
    pub value: String,
    pub content_type: Option<String>,
    pub tags: Option<BTreeMap<String, String>>,
    pub enabled: bool,
    pub nbf: Option<u64>,
    pub exp: Option<u64>,
    pub created: u64,
    pub updated: u64,
    /// Backs a certificate: the bundle carries `kid` and `managed: true`.
    pub managed: bool,
}

#[derive(Debug, Clone)]
pub(crate) struct Secret {
    /// Name as first created (Key Vault names are case-insensitive).
    pub name: String,
    /// Oldest first; the last one is the current version.
    pub versions: Vec<SecretVersion>,
}

/// What a new version is made of.
#[derive(Debug, Clone, Default)]
pub(crate) struct NewVersion {
    pub value: String,
    pub content_type: Option<String>,
    pub tags: Option<BTreeMap<String, String>>,
    pub enabled: Option<bool>,
    pub nbf: Option<u64>,
    pub exp: Option<u64>,
    pub managed: bool,
}

/// One version of a key created with [`crate::FakeAzure::set_key`].
#[derive(Debug, Clone)]
pub(crate) struct KeyVersion {
    pub version: String,
    /// The public JSON Web Key, without `kid` (added when served).
    pub jwk: serde_json::Map<String, serde_json::Value>,
    pub created: u64,
    pub updated: u64,
}

#[derive(Debug, Clone)]
pub(crate) struct Key {
    /// Name as first created (Key Vault names are case-insensitive).
    pub name: String,
    /// Oldest first; the last one is the current version.
    pub versions: Vec<KeyVersion>,
}

#[derive(Debug, Clone)]
pub(crate) struct IssuedToken {
    pub resource: String,
    pub expires_at: Instant,
}

/// A freshly issued access token and its timing, for the response bodies.
#[derive(Debug, Clone)]
pub(crate) struct TokenGrant {
    pub access_token: String,
    /// What `expires_in` says (one second less than the lifetime, as Entra does: 3599 for 1 h).
    pub expires_in: u64,
    pub expires_on: u64,
    pub not_before: u64,
}

#[derive(Debug)]
struct ActiveFault {
    fault: Fault,
    /// `None`: until cleared.
    remaining: Option<usize>,
}

#[derive(Debug, Default)]
struct Inner {
    secrets: BTreeMap<String, Secret>,
    keys: BTreeMap<String, Key>,
    forbidden: BTreeSet<String>,
    tokens: HashMap<String, IssuedToken>,
    /// Arc challenge secret -> key file written for it.
    arc_secrets: HashMap<String, PathBuf>,
    faults: Vec<ActiveFault>,
    stats: Stats,
}

/// Everything the request handlers share.
#[derive(Debug)]
pub(crate) struct Shared {
    pub opts: Options,
    pub vault_url: String,
    pub authority_host: String,
    pub imds_endpoint: String,
    pub arc_key_dir: PathBuf,
    /// Object id reported for the identity.
    pub object_id: String,
    inner: Mutex<Inner>,
}

/// Decrements the vault in-flight counter when dropped.
pub(crate) struct VaultInFlight<'a> {
    shared: &'a Shared,
}

impl Drop for VaultInFlight<'_> {
    fn drop(&mut self) {
        let mut inner = self.shared.lock();
        inner.stats.vault_in_flight = inner.stats.vault_in_flight.saturating_sub(1);
    }
}

impl Shared {
    pub fn new(
        opts: Options,
        vault_url: String,
        authority_host: String,
        imds_endpoint: String,
        arc_key_dir: PathBuf,
    ) -> Self {
        Shared {
            opts,
            vault_url,
            authority_host,
            imds_endpoint,
            arc_key_dir,
            object_id: random_guid(),
            inner: Mutex::new(Inner::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panicking handler cannot leave the maps half-updated in a way that matters to a
        // test fake: keep serving.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    // ---- secrets ----

    pub fn put_secret(&self, name: &str, new: NewVersion) -> SecretVersion {
        let now = unix_now();
        let version = SecretVersion {
            version: random_hex(16),
            value: new.value,
            content_type: new.content_type,
            tags: new.tags,
            enabled: new.enabled.unwrap_or(true),
            nbf: new.nbf,
            exp: new.exp,
            created: now,
            updated: now,
            managed: new.managed,
        };
        let mut inner = self.lock();
        let entry = inner
            .secrets
            .entry(name.to_ascii_lowercase())
            .or_insert_with(|| Secret {
                name: name.to_owned(),
                versions: Vec::new(),
            });
        entry.versions.push(version.clone());
        version
    }

    pub fn delete_secret(&self, name: &str) {
        self.lock().secrets.remove(&name.to_ascii_lowercase());
    }

    pub fn set_forbidden(&self, name: &str, forbidden: bool) {
        let key = name.to_ascii_lowercase();
        let mut inner = self.lock();
        if forbidden {
            inner.forbidden.insert(key);
        } else {
            inner.forbidden.remove(&key);
        }
    }

    pub fn is_forbidden(&self, name: &str) -> bool {
        self.lock().forbidden.contains(&name.to_ascii_lowercase())
    }

    pub fn secret(&self, name: &str) -> Option<Secret> {
        self.lock().secrets.get(&name.to_ascii_lowercase()).cloned()
    }

    /// All secrets, in name order.
    pub fn secrets(&self) -> Vec<Secret> {
        self.lock().secrets.values().cloned().collect()
    }

    // ---- keys ----

    pub fn put_key(&self, name: &str, jwk: serde_json::Map<String, serde_json::Value>) -> String {
        let now = unix_now();
        let version = KeyVersion {
            version: random_hex(16),
            jwk,
            created: now,
            updated: now,
        };
        let id = version.version.clone();
        let mut inner = self.lock();
        inner
            .keys
            .entry(name.to_ascii_lowercase())
            .or_insert_with(|| Key {
                name: name.to_owned(),
                versions: Vec::new(),
            })
            .versions
            .push(version);
        id
    }

    pub fn delete_key(&self, name: &str) {
        self.lock().keys.remove(&name.to_ascii_lowercase());
    }

    pub fn key(&self, name: &str) -> Option<Key> {
        self.lock().keys.get(&name.to_ascii_lowercase()).cloned()
    }

    // ---- tokens ----

    /// Issues an access token (a JWT-shaped string; the signature is random bytes) for
    /// `resource` and remembers it so the vault accepts it until it expires.
    pub fn issue_token(&self, flow: Flow, resource: &str, client_id: &str) -> TokenGrant {
        let lifetime = self.opts.token_lifetime.max(Duration::from_secs(1));
        let lifetime_secs = lifetime.as_secs().max(1);
        let now = unix_now();
        let expires_on = now + lifetime_secs;
        let expires_in = if lifetime_secs >= 2 {
            lifetime_secs - 1
        } else {
            lifetime_secs
        };
        let tenant = &self.opts.tenant_id;
        let header = json!({"typ": "JWT", "alg": "RS256", "kid": "azure-fake"});
        let claims = json!({
            "aud": resource,
            "iss": format!("https://sts.windows.net/{tenant}/"),
            "iat": now,
            "nbf": now,
            "exp": expires_on,
            "appid": client_id,
            "appidacr": "2",
            "idp": format!("https://sts.windows.net/{tenant}/"),
            "idtyp": "app",
            "oid": self.object_id,
            "sub": self.object_id,
            "tid": tenant,
            "uti": random_hex(16),
            "ver": "1.0",
            "xms_azure_fake_flow": flow,
        });
        let mut sig = [0u8; 32];
        rand::rng().fill(&mut sig[..]);
        let access_token = format!(
            "{}.{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string()),
            URL_SAFE_NO_PAD.encode(sig)
        );
        let mut inner = self.lock();
        inner.tokens.insert(
            access_token.clone(),
            IssuedToken {
                resource: resource.to_owned(),
                expires_at: Instant::now() + lifetime,
            },
        );
        *inner.stats.tokens_issued.entry(flow).or_insert(0) += 1;
        TokenGrant {
            access_token,
            expires_in,
            expires_on,
            not_before: now,
        }
    }

    pub fn token(&self, access_token: &str) -> Option<IssuedToken> {
        let mut inner = self.lock();
        let now = Instant::now();
        inner.tokens.retain(|_, t| t.expires_at > now);
        inner.tokens.get(access_token).cloned()
    }

    pub fn revoke_tokens(&self) {
        self.lock().tokens.clear();
    }

    pub fn record_workload_assertion(&self, assertion: &str) {
        self.lock().stats.last_workload_assertion = Some(assertion.to_owned());
    }

    // ---- Arc ----

    pub fn add_arc_secret(&self, secret: String, file: PathBuf) {
        self.lock().arc_secrets.insert(secret, file);
    }

    pub fn arc_secret_valid(&self, secret: &str) -> bool {
        !secret.is_empty() && self.lock().arc_secrets.contains_key(secret)
    }

    /// Key files written so far (removed when the fake stops).
    pub fn take_arc_files(&self) -> Vec<PathBuf> {
        self.lock().arc_secrets.drain().map(|(_, p)| p).collect()
    }

    // ---- faults ----

    pub fn inject(&self, fault: Fault) {
        let remaining = fault.count();
        if remaining == Some(0) {
            return;
        }
        self.lock().faults.push(ActiveFault { fault, remaining });
    }

    pub fn clear_faults(&self) {
        self.lock().faults.clear();
    }

    /// The fault that applies to this request, if any (consuming one of its count).
    pub fn take_fault(&self, endpoint: Endpoint) -> Option<Fault> {
        let request_target = endpoint.target();
        let mut inner = self.lock();
        let idx = inner.faults.iter().position(|f| {
            let t = f.fault.target();
            match request_target {
                Some(rt) => t.matches(rt),
                None => t == Target::All,
            }
        })?;
        let fault = inner.faults[idx].fault.clone();
        if let Some(rem) = inner.faults[idx].remaining.as_mut() {
            *rem = rem.saturating_sub(1);
            if *rem == 0 {
                inner.faults.remove(idx);
            }
        }
        inner.stats.faults_applied += 1;
        Some(fault)
    }

    // ---- stats ----

    pub fn stats(&self) -> Stats {
        self.lock().stats.clone()
    }

    pub fn reset_stats(&self) {
        let mut inner = self.lock();
        let in_flight = inner.stats.vault_in_flight;
        inner.stats = Stats {
            vault_in_flight: in_flight,
            max_concurrent_vault_requests: in_flight,
            ..Stats::default()
        };
    }

    pub fn record_arrival(&self, endpoint: Endpoint) {
        let mut inner = self.lock();
        inner.stats.endpoints.entry(endpoint).or_default().requests += 1;
    }

    pub fn record_done(&self, record: RequestRecord) {
        let mut inner = self.lock();
        let stats = &mut inner.stats;
        *stats
            .endpoints
            .entry(record.endpoint)
            .or_default()
            .by_status
            .entry(record.status)
            .or_insert(0) += 1;
        *stats.by_status.entry(record.status).or_insert(0) += 1;
        if stats.requests.len() >= MAX_REQUEST_RECORDS {
            stats.requests.remove(0);
        }
        stats.requests.push(record);
    }

    pub fn enter_vault(&self) -> VaultInFlight<'_> {
        let mut inner = self.lock();
        inner.stats.vault_in_flight += 1;
        inner.stats.max_concurrent_vault_requests = inner
            .stats
            .max_concurrent_vault_requests
            .max(inner.stats.vault_in_flight);
        VaultInFlight { shared: self }
    }
}
