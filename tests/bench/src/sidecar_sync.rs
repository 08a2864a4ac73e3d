//! The sidecar against the local test vault (tests/azure-fake, in this process):
//! - start to first complete sync: the real `sidecar --once` process from spawn to exit
//!   (start, workload-identity token exchange, challenge discovery, every read, conversion,
//!   atomic publish to tmpfs) with 1, 100 and 1000 secrets, next to the raw fetch of the same
//!   secrets (one token, the same GETs, same concurrency, the same HTTP client) measured in
//!   the same run, alternately;
//! - steady state with 100 secrets refreshed every second, nothing changing: RSS at rest and
//!   during refreshes, CPU per refresh cycle.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use azure_fake::{FakeAzure, Options};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use crate::procfs::{self, RssSampler};
use crate::stats::{Timing, median};

/// The sidecar's own read concurrency, used by the raw fetch too.
const FETCH_CONCURRENCY: usize = 16;
/// Secrets of the steady-state measurement.
pub const STEADY_SECRETS: usize = 100;

#[derive(Debug, Clone)]
pub struct Settings {
    pub counts: Vec<usize>,
    /// Sidecar runs (and raw fetches) per count.
    pub runs: usize,
    /// Steady-state measurement window.
    pub window: Duration,
}

impl Settings {
    pub fn new(quick: bool) -> Self {
        if quick {
            Self {
                counts: vec![1, 100],
                runs: 3,
                window: Duration::from_secs(5),
            }
        } else {
            Self {
                counts: vec![1, 100, 1000],
                runs: 7,
                window: Duration::from_secs(20),
            }
        }
    }
}

#[derive(Debug)]
pub struct SyncRow {
    pub secrets: usize,
    pub sidecar: Timing,
    pub raw: Timing,
    /// Median over runs of sidecar / raw fetch of the same run.
    pub ratio: f64,
    /// Median over runs of sidecar - raw fetch of the same run (ms).
    pub overhead_ms: f64,
}

#[derive(Debug)]
pub struct Steady {
    /// Median of the VmRSS samples (every 10 ms): between refreshes.
    pub rss_rest_kib: u64,
    /// Largest VmRSS sample, during a refresh.
    pub rss_refresh_kib: u64,
    /// VmHWM at the end: the peak since start (includes the first sync).
    pub hwm_kib: u64,
    pub refreshes: f64,
    pub window: Duration,
    pub cpu_ms_per_refresh: f64,
}

#[derive(Debug)]
pub struct SidecarReport {
    pub settings: Settings,
    pub rows: Vec<SyncRow>,
    pub steady: Steady,
}

pub async fn run(bin: &Path, settings: Settings) -> Result<SidecarReport> {
    let vault = Vault::start()?;
    let most = settings
        .counts
        .iter()
        .copied()
        .max()
        .unwrap_or(0)
        .max(STEADY_SECRETS);
    for i in 0..most {
        vault.fake.set_secret(
            &format!("s{i}"),
            &format!("value-{i}-{}", "x".repeat(64)),
            None,
        );
    }
    let mut rows = Vec::new();
    for &n in &settings.counts {
        eprintln!("bench: sidecar: {n} secret(s)");
        let (mut side, mut raw) = (Vec::new(), Vec::new());
        for _ in 0..settings.runs {
            raw.push(raw_fetch(&vault, n).await?);
            let out = tmpfs_dir()?;
            let t = Instant::now();
            let st = vault
                .sidecar(bin, n, out.path(), &["--once"])
                .status()
                .context("spawning the sidecar")?;
            side.push(t.elapsed());
            if !st.success() {
                bail!("sidecar --once failed with {n} secrets ({st})");
            }
        }
        let ratios: Vec<f64> = side
            .iter()
            .zip(&raw)
            .map(|(s, r)| s.as_secs_f64() / r.as_secs_f64())
            .collect();
        let overheads: Vec<f64> = side
            .iter()
            .zip(&raw)
            .map(|(s, r)| (s.as_secs_f64() - r.as_secs_f64()) * 1e3)
            .collect();
        rows.push(SyncRow {
            secrets: n,
            sidecar: Timing::of(&side),
            raw: Timing::of(&raw),
            ratio: median(&ratios),
            overhead_ms: median(&overheads),
        });
    }

    eprintln!(
        "bench: sidecar: steady state, {STEADY_SECRETS} secrets, {:?}",
        settings.window
    );
    let steady = steady(bin, &vault, settings.window).await?;
    Ok(SidecarReport {
        settings,
        rows,
        steady,
    })
}

/// The fake Key Vault + Entra ID, and a federated token file for workload identity.
struct Vault {
    fake: FakeAzure,
    token_file: PathBuf,
    _dir: tempfile::TempDir,
}

impl Vault {
    fn start() -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let token_file = dir.path().join("token");
        std::fs::write(&token_file, jwt())?;
        let fake = FakeAzure::start_blocking(Options {
            federated_token_file: Some(token_file.clone()),
            ..Options::default()
        })?;
        Ok(Self {
            fake,
            token_file,
            _dir: dir,
        })
    }

    /// The sidecar with workload identity and `--secret s0 ... s{n-1}`, quiet.
    fn sidecar(&self, bin: &Path, n: usize, out: &Path, extra: &[&str]) -> Command {
        let mut cmd = Command::new(bin);
        cmd.env_clear()
            .env("AZURE_CLIENT_ID", &self.fake.options().client_id)
            .env("AZURE_TENANT_ID", &self.fake.options().tenant_id)
            .env("AZURE_FEDERATED_TOKEN_FILE", &self.token_file)
            .env("AZURE_AUTHORITY_HOST", self.fake.authority_host())
            .args(["--vault-url", &self.fake.vault_url()])
            .arg("--ca-file")
            .arg(self.fake.ca_file())
            .arg("--disable-challenge-resource-verification")
            .arg("--output-dir")
            .arg(out)
            .args(["--log-level", "warn", "--http-addr", "off"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        for i in 0..n {
            cmd.arg("--secret").arg(format!("s{i}"));
        }
        cmd
    }
}

/// A workload-identity token as the kubelet projects it (the fake checks only its shape).
fn jwt() -> String {
    let exp = time::OffsetDateTime::now_utc().unix_timestamp() + 3600;
    let h = URL_SAFE_NO_PAD.encode(br#"{"alg":"RS256","typ":"JWT"}"#);
    let c = URL_SAFE_NO_PAD.encode(format!(
        r#"{{"aud":["api://AzureADTokenExchange"],"sub":"bench","exp":{exp}}}"#
    ));
    format!("{h}.{c}.{}", URL_SAFE_NO_PAD.encode(b"sig"))
}

/// The sidecar delivers only to memory-backed file systems.
fn tmpfs_dir() -> Result<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix("sidecar-bench-")
        .tempdir_in("/dev/shm")
        .context("creating an output directory in /dev/shm (tmpfs)")
}

/// The same reads without the sidecar: a new HTTP client from the sidecar's own builder
/// (same TLS and HTTP stack, same CA loading, none of its logic), one token exchange, then
/// every GET at the sidecar's concurrency. Nothing is shared between runs, as nothing is
/// shared between two sidecar processes.
async fn raw_fetch(vault: &Vault, n: usize) -> Result<Duration> {
    let t = Instant::now();
    let client = sidecar::http::build(Some(vault.fake.ca_file()), Duration::from_secs(30))
        .map_err(|e| anyhow!("building the HTTP client: {e}"))?
        .external;
    let fake = &vault.fake;
    let assertion = std::fs::read_to_string(&vault.token_file)?;
    let form = [
        ("grant_type", "client_credentials"),
        ("client_id", fake.options().client_id.as_str()),
        ("scope", "https://vault.azure.net/.default"),
        ("client_assertion_type", azure_fake::JWT_BEARER),
        ("client_assertion", assertion.as_str()),
    ];
    let body = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(form)
        .finish();
    let tok: serde_json::Value = client
        .post(format!(
            "{}/{}/oauth2/v2.0/token",
            fake.authority_host(),
            fake.options().tenant_id
        ))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let token = Arc::new(
        tok["access_token"]
            .as_str()
            .context("no access_token in the token response")?
            .to_owned(),
    );
    let sem = Arc::new(tokio::sync::Semaphore::new(FETCH_CONCURRENCY));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let (client, token, sem) = (client.clone(), Arc::clone(&token), Arc::clone(&sem));
        let url = format!("{}/secrets/s{i}?api-version=7.5", fake.vault_url());
        tasks.spawn(async move {
            let _permit = sem.acquire_owned().await?;
            let r = client
                .get(url)
                .bearer_auth(token.as_str())
                .send()
                .await?
                .error_for_status()?;
            r.bytes().await?;
            anyhow::Ok(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    Ok(t.elapsed())
}

/// Kills the child on drop.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// 100 secrets refreshed every second, nothing changing.
async fn steady(bin: &Path, vault: &Vault, window: Duration) -> Result<Steady> {
    let out = tmpfs_dir()?;
    let mut child = Running(
        vault
            .sidecar(
                bin,
                STEADY_SECRETS,
                out.path(),
                &["--refresh-interval", "1s"],
            )
            .spawn()
            .context("spawning the sidecar")?,
    );
    let pid = child.0.id();
    let last = out.path().join(format!("s{}", STEADY_SECRETS - 1));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !last.exists() {
        if let Some(st) = child.0.try_wait()? {
            bail!("the sidecar exited ({st}) before delivering");
        }
        if Instant::now() > deadline {
            bail!("the sidecar did not deliver {STEADY_SECRETS} secrets within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Let the first refreshes pass (connections, caches) before measuring.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let reads0 = vault.fake.stats().vault_get_requests();
    let cpu0 = procfs::cpu_ns(&pid.to_string());
    let sampler = RssSampler::start(pid, Duration::from_millis(10));
    let t0 = Instant::now();
    tokio::time::sleep(window).await;
    let mut samples = sampler.finish().await;
    let cpu = procfs::cpu_ns(&pid.to_string()).saturating_sub(cpu0);
    let elapsed = t0.elapsed();
    let reads = vault.fake.stats().vault_get_requests() - reads0;
    let mem = procfs::mem(pid).context("reading the sidecar's memory")?;
    if let Some(st) = child.0.try_wait()? {
        bail!("the sidecar exited ({st}) during the steady-state window");
    }
    drop(child);
    samples.sort_unstable();
    let refreshes = reads as f64 / STEADY_SECRETS as f64;
    Ok(Steady {
        rss_rest_kib: samples.get(samples.len() / 2).copied().unwrap_or(0),
        rss_refresh_kib: samples.last().copied().unwrap_or(0),
        hwm_kib: mem.hwm_kib,
        refreshes,
        window: elapsed,
        cpu_ms_per_refresh: cpu as f64 / 1e6 / refreshes.max(1.0),
    })
}
