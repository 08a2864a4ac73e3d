//! The sidecar half: the fake Key Vault in-process with N secrets, the real sidecar
//! refreshing them into a tmpfs directory, a value changer (remembering every value ever
//! set), a fault injector (short windows of vault and token-endpoint failures) and a
//! checker that reads every delivered file several times a second.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use azure_fake::{FakeAzure, Fault, Options, Target};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use tempfile::TempDir;
use tokio::sync::watch;

use crate::kms::lock;

/// Secrets whose value changes at every change tick.
const CHANGES_PER_TICK: usize = 3;
const CHANGE_EVERY: Duration = Duration::from_secs(3);
/// kubelet rewrites a projected service-account token well before it expires.
const TOKEN_FILE_EVERY: Duration = Duration::from_secs(300);
/// Access tokens the fake issues live this long; the sidecar refreshes 5 min ahead, so
/// it asks for a new one about every minute.
const TOKEN_LIFETIME: Duration = Duration::from_secs(360);
/// "Until cleared" for faults that take a count.
const WINDOW_COUNT: usize = 1_000_000;

fn rand_hex(bytes: usize) -> String {
    (0..bytes)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect()
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A projected service-account token as kubelet writes it (a JWT; the fake checks that the
/// assertion equals the file's current content).
fn service_account_jwt() -> String {
    let now = unix_now();
    let header = URL_SAFE_NO_PAD.encode(r#"{"alg":"RS256","kid":"soak","typ":"JWT"}"#);
    let claims = URL_SAFE_NO_PAD.encode(format!(
        r#"{{"aud":["api://AzureADTokenExchange"],"exp":{},"iat":{now},"nbf":{now},"iss":"https://oidc.soak.local","sub":"system:serviceaccount:soak:sidecar","jti":"{}"}}"#,
        now + 3600,
        rand_hex(8)
    ));
    let sig = URL_SAFE_NO_PAD.encode(rand_hex(32));
    format!("{header}.{claims}.{sig}")
}

fn write_atomic(path: &Path, content: &str) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("tmp{}", rand_hex(4)));
    std::fs::write(&tmp, content)?;
    std::fs::rename(&tmp, path)
}

struct History {
    name: String,
    all: HashSet<String>,
    latest: String,
    latest_at: Instant,
    generation: u64,
}

/// What a delivered file holds, compared with what was set.
pub enum Verdict {
    Latest,
    /// An older value; the latest was set this long ago.
    Older(Duration),
    /// Not a value ever set for this secret (empty, partial, foreign).
    Unknown,
}

/// The fake vault and every value ever set in it.
pub struct Vault {
    pub fake: FakeAzure,
    history: Mutex<Vec<History>>,
    pub changes: AtomicU64,
    pub token_file: PathBuf,
    pub token_rewrites: AtomicU64,
}

impl Vault {
    pub fn start(work: &Path, n: usize) -> anyhow::Result<Arc<Self>> {
        let token_file = work.join("sa-token");
        write_atomic(&token_file, &service_account_jwt())?;
        let fake = FakeAzure::start_blocking(Options {
            federated_token_file: Some(token_file.clone()),
            token_lifetime: TOKEN_LIFETIME,
            state_dir: Some(work.join("azure-fake")),
            ..Options::default()
        })
        .context("starting the fake Key Vault")?;
        let history = (0..n)
            .map(|i| History {
                name: format!("soak-secret-{i:03}"),
                all: HashSet::new(),
                latest: String::new(),
                latest_at: Instant::now(),
                generation: 0,
            })
            .collect();
        let v = Arc::new(Self {
            fake,
            history: Mutex::new(history),
            changes: AtomicU64::new(0),
            token_file,
            token_rewrites: AtomicU64::new(0),
        });
        for i in 0..n {
            v.change(i);
        }
        v.changes.store(0, Relaxed);
        Ok(v)
    }

    pub fn len(&self) -> usize {
        lock(&self.history).len()
    }

    pub fn name(&self, i: usize) -> String {
        lock(&self.history)
            .get(i)
            .map(|h| h.name.clone())
            .unwrap_or_default()
    }

    /// Sets a new value: remembered first, so the checker never sees a value it does not
    /// know yet.
    pub fn change(&self, i: usize) {
        let (name, value) = {
            let mut all = lock(&self.history);
            let Some(h) = all.get_mut(i) else {
                return;
            };
            h.generation += 1;
            // The 16 hex digits make every value findable in the logs.
            let value = format!("sv{i:03}-g{}-{}", h.generation, rand_hex(8));
            h.all.insert(value.clone());
            h.latest = value.clone();
            h.latest_at = Instant::now();
            (h.name.clone(), value)
        };
        self.fake.set_secret(&name, &value, None);
        self.changes.fetch_add(1, Relaxed);
    }

    pub fn check(&self, i: usize, content: &[u8]) -> Verdict {
        let all = lock(&self.history);
        let Some(h) = all.get(i) else {
            return Verdict::Unknown;
        };
        let Ok(s) = std::str::from_utf8(content) else {
            return Verdict::Unknown;
        };
        if s == h.latest {
            Verdict::Latest
        } else if h.all.contains(s) {
            Verdict::Older(h.latest_at.elapsed())
        } else {
            Verdict::Unknown
        }
    }

    /// The random part of every value ever set (what the log scan looks for).
    pub fn value_markers(&self) -> HashSet<String> {
        lock(&self.history)
            .iter()
            .flat_map(|h| h.all.iter())
            .filter_map(|v| v.rsplit('-').next().map(str::to_owned))
            .collect()
    }

    pub fn values_set(&self) -> usize {
        lock(&self.history).iter().map(|h| h.all.len()).sum()
    }

    fn rewrite_token_file(&self) -> std::io::Result<()> {
        write_atomic(&self.token_file, &service_account_jwt())?;
        self.token_rewrites.fetch_add(1, Relaxed);
        Ok(())
    }
}

/// Changes a few values every few seconds, and rewrites the service-account token file
/// every few minutes (as kubelet does), until stopped.
pub async fn value_changer(vault: Arc<Vault>, seed: u64, mut stop: watch::Receiver<bool>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut token_written = Instant::now();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(CHANGE_EVERY) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        for _ in 0..CHANGES_PER_TICK {
            vault.change(rng.random_range(0..vault.len()));
        }
        if token_written.elapsed() >= TOKEN_FILE_EVERY {
            token_written = Instant::now();
            if let Err(e) = vault.rewrite_token_file() {
                eprintln!("soak: rewriting the token file: {e}");
            }
        }
    }
}

// ---------------------------------------------------------------- faults

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum FaultKind {
    Vault5xx,
    Throttled,
    Malformed,
    EmptyBody,
    Hang,
    Slow,
    VaultDown,
    TokenEndpointDown,
    TokensRevoked,
}

const KINDS: [FaultKind; 9] = [
    FaultKind::Vault5xx,
    FaultKind::Throttled,
    FaultKind::Malformed,
    FaultKind::EmptyBody,
    FaultKind::Hang,
    FaultKind::Slow,
    FaultKind::VaultDown,
    FaultKind::TokenEndpointDown,
    FaultKind::TokensRevoked,
];

impl FaultKind {
    pub fn label(self) -> &'static str {
        match self {
            FaultKind::Vault5xx => "vault 500/503",
            FaultKind::Throttled => "vault 429 + Retry-After",
            FaultKind::Malformed => "vault malformed JSON",
            FaultKind::EmptyBody => "vault empty body",
            FaultKind::Hang => "vault hangs",
            FaultKind::Slow => "vault slow (1.5-3 s)",
            FaultKind::VaultDown => "vault drops connections",
            FaultKind::TokenEndpointDown => "token endpoint down (tokens revoked)",
            FaultKind::TokensRevoked => "access tokens revoked",
        }
    }

    fn apply(self, fake: &FakeAzure, rng: &mut StdRng) {
        let target = Target::Vault;
        let count = WINDOW_COUNT;
        match self {
            FaultKind::Vault5xx => fake.inject(Fault::Status {
                target,
                status: if rng.random_bool(0.5) { 500 } else { 503 },
                count,
            }),
            FaultKind::Throttled => fake.inject(Fault::Throttle {
                target,
                retry_after_secs: rng.random_range(1..=2),
                retry_after_ms: None,
                count,
            }),
            FaultKind::Malformed => fake.inject(Fault::Malformed { target, count }),
            FaultKind::EmptyBody => fake.inject(Fault::EmptyBody { target, count }),
            FaultKind::Hang => fake.inject(Fault::Hang { target, count }),
            FaultKind::Slow => fake.inject(Fault::Slow {
                target,
                delay_ms: rng.random_range(1500..=3000),
                count,
            }),
            FaultKind::VaultDown => fake.inject(Fault::Down { target }),
            FaultKind::TokenEndpointDown => {
                // A cached token would hide the outage: make the sidecar need a new one.
                fake.inject(Fault::Down {
                    target: Target::Token,
                });
                fake.revoke_tokens();
            }
            FaultKind::TokensRevoked => fake.revoke_tokens(),
        }
    }
}

#[derive(Default)]
pub struct FaultLog {
    pub windows: BTreeMap<FaultKind, (u64, Duration)>,
    pub current: Option<FaultKind>,
}

impl FaultLog {
    pub fn total(&self) -> u64 {
        self.windows.values().map(|(n, _)| n).sum()
    }
}

/// Calm for 3-8 s, then one random fault for 2-6 s, then cleared; until stopped (which
/// clears any fault in place).
pub async fn fault_injector(
    vault: Arc<Vault>,
    seed: u64,
    mut stop: watch::Receiver<bool>,
    log: Arc<Mutex<FaultLog>>,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    loop {
        let calm = Duration::from_millis(rng.random_range(3000..=8000));
        tokio::select! {
            _ = tokio::time::sleep(calm) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let kind = KINDS[rng.random_range(0..KINDS.len())];
        let window = Duration::from_millis(rng.random_range(2000..=6000));
        kind.apply(&vault.fake, &mut rng);
        lock(&log).current = Some(kind);
        let started = Instant::now();
        let stopped = tokio::select! {
            _ = tokio::time::sleep(window) => false,
            _ = stop.wait_for(|s| *s) => true,
        };
        vault.fake.clear_faults();
        let mut l = lock(&log);
        l.current = None;
        let e = l.windows.entry(kind).or_default();
        e.0 += 1;
        e.1 += started.elapsed();
        if stopped {
            return;
        }
    }
}

// ---------------------------------------------------------------- the sidecar

pub struct Sidecar {
    pub child: crate::process::Child,
    pub out: TempDir,
    pub addr: SocketAddr,
}

pub struct SidecarOptions {
    pub refresh_interval: Duration,
    pub request_timeout: Duration,
}

impl Sidecar {
    /// Starts the long-running sidecar with workload identity against the fake, output on
    /// a fresh tmpfs directory, probes on an ephemeral port; waits until it is ready.
    pub async fn start(
        bin: &Path,
        vault: &Vault,
        work: &Path,
        opts: &SidecarOptions,
    ) -> anyhow::Result<Self> {
        let out = tempfile::Builder::new()
            .prefix("soak-out-")
            .tempdir_in("/dev/shm")
            .context("creating the output directory under /dev/shm (a tmpfs)")?;
        let o = vault.fake.options();
        let mut cmd = Command::new(bin);
        cmd.env_clear()
            .env(
                "PATH",
                std::env::var("PATH").unwrap_or_else(|_| "/usr/bin:/bin".into()),
            )
            .env("AZURE_CLIENT_ID", &o.client_id)
            .env("AZURE_TENANT_ID", &o.tenant_id)
            .env("AZURE_FEDERATED_TOKEN_FILE", &vault.token_file)
            .env("AZURE_AUTHORITY_HOST", vault.fake.authority_host())
            .args(["--vault-url", &vault.fake.vault_url()])
            .arg("--ca-file")
            .arg(vault.fake.ca_file())
            // The fake's vault is `localhost`, not a *.vault.azure.net name.
            .arg("--disable-challenge-resource-verification")
            .arg("--output-dir")
            .arg(out.path())
            .args(["--identity", "workload-identity"])
            .args(["--http-addr", "127.0.0.1:0"])
            .args([
                "--refresh-interval",
                &humantime::format_duration(opts.refresh_interval).to_string(),
            ])
            .args([
                "--request-timeout",
                &humantime::format_duration(opts.request_timeout).to_string(),
            ])
            .args(["--log-format", "json", "--log-level", "info,sidecar=debug"]);
        for i in 0..vault.len() {
            cmd.arg("--secret").arg(vault.name(i));
        }
        let mut child = crate::process::Child::spawn("sidecar", cmd, &work.join("sidecar.log"))?;
        let deadline = Instant::now() + Duration::from_secs(60);
        let addr = loop {
            if let Some(st) = child.exit_status() {
                anyhow::bail!(
                    "the sidecar exited at start ({st}):\n{}",
                    child.log_tail(30)
                );
            }
            if let Some(a) = listen_addr(&child.log) {
                break a;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "the sidecar did not open its probe listener within 60 s:\n{}",
                child.log_tail(30)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        loop {
            if let Some(st) = child.exit_status() {
                anyhow::bail!(
                    "the sidecar exited at start ({st}):\n{}",
                    child.log_tail(30)
                );
            }
            if matches!(get(addr, "/readyz").await, Ok((200, _))) {
                break;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "the sidecar was not ready within 60 s:\n{}",
                child.log_tail(30)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(Self { child, out, addr })
    }

    /// `sidecar_<family>_total{result="..."}` series of /metrics, by result.
    pub async fn counters(&self, family: &str) -> anyhow::Result<BTreeMap<String, f64>> {
        let (status, body) = get(self.addr, "/metrics").await?;
        anyhow::ensure!(status == 200, "GET /metrics answered {status}");
        let prefix = format!("sidecar_{family}_total{{result=\"");
        Ok(body
            .lines()
            .filter_map(|l| {
                let rest = l.strip_prefix(&prefix)?;
                let (result, value) = rest.split_once("\"} ")?;
                Some((result.to_owned(), value.trim().parse().ok()?))
            })
            .collect())
    }
}

/// The probe listener's address, from the `serving /healthz` log line.
fn listen_addr(log: &Path) -> Option<SocketAddr> {
    let text = std::fs::read_to_string(log).ok()?;
    let line = text.lines().find(|l| l.contains("serving /healthz"))?;
    let i = line.find("Some(")? + 5;
    let j = line[i..].find(')')? + i;
    line[i..j].parse().ok()
}

/// A plain HTTP/1.1 GET on loopback, off the async threads: (status, body).
pub async fn get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || -> anyhow::Result<(u16, String)> {
        Ok(edgeseal_test_support::http_get(addr, &path)?)
    })
    .await?
}

// ---------------------------------------------------------------- the checker

/// What the checker saw.
#[derive(Default)]
pub struct FileChecks {
    pub rounds: AtomicU64,
    pub reads: AtomicU64,
    pub latest: AtomicU64,
    pub older: AtomicU64,
    pub lost: AtomicU64,
    losses: Mutex<Vec<String>>,
    max_lag: Mutex<Duration>,
}

impl FileChecks {
    fn lose(&self, at: Duration, what: String) {
        self.lost.fetch_add(1, Relaxed);
        let mut l = lock(&self.losses);
        if l.len() < 20 {
            l.push(format!("[{:.1}s] {what}", at.as_secs_f64()));
        }
    }

    pub fn first_losses(&self) -> Vec<String> {
        lock(&self.losses).clone()
    }

    /// The longest a file was seen behind the latest value set.
    pub fn max_lag(&self) -> Duration {
        *lock(&self.max_lag)
    }
}

/// Reads every delivered file every `every` until stopped (on its own thread: plain
/// blocking reads, as an app does). A file that is missing, unreadable, empty or holds
/// anything but a value once set for its secret is a lost secret.
pub fn checker(
    vault: Arc<Vault>,
    dir: PathBuf,
    every: Duration,
    stop: watch::Receiver<bool>,
    checks: Arc<FileChecks>,
) {
    let start = Instant::now();
    while !*stop.borrow() {
        let round = Instant::now();
        for i in 0..vault.len() {
            let name = vault.name(i);
            let path = dir.join(&name);
            checks.reads.fetch_add(1, Relaxed);
            match std::fs::read(&path) {
                Err(e) => {
                    // Tell a swap race (gone for an instant) from a real disappearance.
                    let again = if std::fs::read(&path).is_ok() {
                        "present again on an immediate re-read"
                    } else {
                        "still missing on an immediate re-read"
                    };
                    checks.lose(start.elapsed(), format!("{name}: {e} ({again})"));
                }
                Ok(b) if b.is_empty() => checks.lose(start.elapsed(), format!("{name}: empty")),
                Ok(b) => match vault.check(i, &b) {
                    Verdict::Latest => {
                        checks.latest.fetch_add(1, Relaxed);
                    }
                    Verdict::Older(lag) => {
                        checks.older.fetch_add(1, Relaxed);
                        let mut m = lock(&checks.max_lag);
                        *m = (*m).max(lag);
                    }
                    Verdict::Unknown => checks.lose(
                        start.elapsed(),
                        format!("{name}: {} bytes that are no value ever set", b.len()),
                    ),
                },
            }
        }
        checks.rounds.fetch_add(1, Relaxed);
        std::thread::sleep(every.saturating_sub(round.elapsed()));
    }
}

/// Waits until every file holds its latest value; returns how long that took, or what
/// was still behind at the deadline.
pub async fn converge(vault: &Vault, dir: &Path, within: Duration) -> Result<Duration, String> {
    let start = Instant::now();
    loop {
        let mut behind = Vec::new();
        for i in 0..vault.len() {
            let b = std::fs::read(dir.join(vault.name(i))).unwrap_or_default();
            if !matches!(vault.check(i, &b), Verdict::Latest) {
                behind.push(vault.name(i));
            }
        }
        if behind.is_empty() {
            return Ok(start.elapsed());
        }
        if start.elapsed() > within {
            return Err(format!(
                "{} of {} files not at their latest value after {within:?}, e.g. {}",
                behind.len(),
                vault.len(),
                behind[..behind.len().min(5)].join(", ")
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Sets a new value for every secret (the end of the run: every file must follow).
pub fn change_all(vault: &Vault) {
    for i in 0..vault.len() {
        vault.change(i);
    }
}
