//! Sidecar benchmark against the local test vault (tests/azure-fake):
//! - start to first complete sync (`--once`, the whole process) with 1, 100 and 1000
//!   secrets, next to the raw fetch of the same secrets (one token, the same GETs, same
//!   concurrency) measured in the same run;
//! - steady-state RSS with 100 secrets; CPU per refresh cycle when nothing changed.
//!
//! `cargo bench -p sidecar --bench sidecar_sync` (`-- --quick` for a short run).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use azure_fake::{FakeAzure, Options};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

const BIN: &str = env!("CARGO_BIN_EXE_sidecar");

fn jwt() -> String {
    let exp = time::OffsetDateTime::now_utc().unix_timestamp() + 3600;
    let h = URL_SAFE_NO_PAD.encode(br#"{"alg":"RS256","typ":"JWT"}"#);
    let c = URL_SAFE_NO_PAD.encode(format!(
        r#"{{"aud":["api://AzureADTokenExchange"],"sub":"bench","exp":{exp}}}"#
    ));
    format!("{h}.{c}.{}", URL_SAFE_NO_PAD.encode(b"sig"))
}

struct Setup {
    fake: FakeAzure,
    token_file: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, jwt()).unwrap();
    let fake = FakeAzure::start_blocking(Options {
        federated_token_file: Some(token_file.clone()),
        ..Options::default()
    })
    .unwrap();
    Setup {
        fake,
        token_file,
        _dir: dir,
    }
}

fn sidecar_cmd(s: &Setup, n: usize, out: &std::path::Path, extra: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.env_clear()
        .env("AZURE_CLIENT_ID", &s.fake.options().client_id)
        .env("AZURE_TENANT_ID", &s.fake.options().tenant_id)
        .env("AZURE_FEDERATED_TOKEN_FILE", &s.token_file)
        .env("AZURE_AUTHORITY_HOST", s.fake.authority_host())
        .args(["--vault-url", &s.fake.vault_url()])
        .args(["--ca-file", s.fake.ca_file().to_str().unwrap()])
        .args(["--disable-challenge-resource-verification"])
        .args(["--output-dir", out.to_str().unwrap()])
        .args(["--log-level", "warn", "--http-addr", "off"])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    for i in 0..n {
        cmd.arg("--secret").arg(format!("s{i}"));
    }
    cmd
}

/// The same reads without the sidecar: one token exchange, then every GET at the
/// sidecar's concurrency (16), on one HTTP client.
async fn raw_fetch(s: &Setup, n: usize) -> Duration {
    let t = Instant::now();
    // A plain reqwest client (rustls, the test CA): the same HTTP stack, none of the
    // sidecar's logic.
    let client = sidecar::http::build(Some(s.fake.ca_file()), Duration::from_secs(30))
        .unwrap()
        .external;
    let form = [
        ("grant_type", "client_credentials".to_owned()),
        ("client_id", s.fake.options().client_id.clone()),
        ("scope", "https://vault.azure.net/.default".to_owned()),
        ("client_assertion_type", azure_fake::JWT_BEARER.to_owned()),
        (
            "client_assertion",
            std::fs::read_to_string(&s.token_file).unwrap(),
        ),
    ];
    let body = form
        .iter()
        .map(|(k, v)| {
            let v: String = form_urlencoded::byte_serialize(v.as_bytes()).collect();
            format!("{k}={v}")
        })
        .collect::<Vec<_>>()
        .join("&");
    let tok: serde_json::Value = client
        .post(format!(
            "{}/{}/oauth2/v2.0/token",
            s.fake.authority_host(),
            s.fake.options().tenant_id
        ))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = Arc::new(tok["access_token"].as_str().unwrap().to_owned());
    let sem = Arc::new(tokio::sync::Semaphore::new(16));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let (client, token, sem) = (client.clone(), Arc::clone(&token), Arc::clone(&sem));
        let url = format!("{}/secrets/s{i}?api-version=7.5", s.fake.vault_url());
        tasks.spawn(async move {
            let _p = sem.acquire_owned().await;
            let r = client
                .get(url)
                .bearer_auth(token.as_str())
                .send()
                .await
                .unwrap();
            assert!(r.status().is_success());
            let _ = r.bytes().await.unwrap();
        });
    }
    while tasks.join_next().await.is_some() {}
    t.elapsed()
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn proc_field(pid: u32, key: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// utime + stime in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let runs = if quick { 3 } else { 7 };
    let s = setup();
    for i in 0..1000 {
        s.fake.set_secret(
            &format!("s{i}"),
            &format!("value-{i}-{}", "x".repeat(64)),
            None,
        );
    }
    println!(
        "## sidecar against the local test vault{}\n",
        if quick { " (quick)" } else { "" }
    );
    println!(
        "machine: nproc={}, build: release; identity: workload identity; {runs} runs each, medians\n",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    println!(
        "| secrets | sidecar start to first complete sync (ms) | raw fetch of the same secrets (ms) | overhead (ms) | ratio |"
    );
    println!("|---:|---:|---:|---:|---:|");
    for n in [1usize, 100, 1000] {
        let (mut side, mut raw) = (Vec::new(), Vec::new());
        for _ in 0..runs {
            raw.push(raw_fetch(&s, n).await);
            let out = tempfile::Builder::new().tempdir_in("/dev/shm").unwrap();
            let t = Instant::now();
            let st = sidecar_cmd(&s, n, out.path(), &["--once"])
                .status()
                .unwrap();
            side.push(t.elapsed());
            assert!(st.success(), "sidecar --once failed with {n} secrets");
        }
        let (sd, rw) = (median(side), median(raw));
        println!(
            "| {n} | {:.1} | {:.1} | {:.1} | {:.2} |",
            sd.as_secs_f64() * 1e3,
            rw.as_secs_f64() * 1e3,
            (sd.as_secs_f64() - rw.as_secs_f64()) * 1e3,
            sd.as_secs_f64() / rw.as_secs_f64()
        );
    }

    // Steady state: 100 secrets refreshed every second, nothing changing.
    let out = tempfile::Builder::new().tempdir_in("/dev/shm").unwrap();
    let mut child = sidecar_cmd(&s, 100, out.path(), &["--refresh-interval", "1s"])
        .spawn()
        .unwrap();
    let pid = child.id();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !out.path().join("s99").exists() {
        assert!(Instant::now() < deadline, "sidecar did not deliver");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let window = if quick { 5 } else { 20 };
    let reads0 = s.fake.stats().vault_get_requests();
    let ticks0 = cpu_ticks(pid);
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(window)).await;
    let ticks = cpu_ticks(pid) - ticks0;
    let secs = t0.elapsed().as_secs_f64();
    let reads = s.fake.stats().vault_get_requests() - reads0;
    let refreshes = reads as f64 / 100.0;
    // USER_HZ is 100 on Linux.
    let cpu_ms = ticks as f64 * 10.0;
    let rss = proc_field(pid, "VmRSS:").unwrap_or(0);
    let hwm = proc_field(pid, "VmHWM:").unwrap_or(0);
    let _ = child.kill();
    let _ = child.wait();
    println!("\n| steady state: 100 secrets, refresh 1 s, nothing changing | value |\n|---|---:|");
    println!(
        "| RSS (MiB) | {:.1} (peak {:.1}) |",
        rss as f64 / 1024.0,
        hwm as f64 / 1024.0
    );
    println!("| refresh cycles measured | {refreshes:.1} in {secs:.1} s |");
    println!(
        "| CPU per refresh cycle: 100 reads, compare, no write (ms) | {:.1} |",
        cpu_ms / refreshes.max(1.0)
    );
}
