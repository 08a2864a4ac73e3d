//! End-to-end gRPC benchmark of the real `kms-plugin` binary, as kube-apiserver sees it.
//!
//! Starts `kms-plugin serve` (insecure software backend) on a Unix socket in a temporary
//! directory and measures, per operation and concurrency, the latency of every request
//! and the throughput:
//!
//! * `health` — `grpc.health.v1.Health/Check` on the same socket: a gRPC call that does
//!   almost nothing. It is the floor: transport, HTTP/2, protobuf and the client itself.
//! * `status`, `encrypt` (32-byte random DEK seeds), `decrypt` (of ciphertexts made
//!   beforehand) — `v2.KeyManagementService`.
//!
//! The machine is noisy, so measured phases are short and interleaved with floor phases:
//! `floor, op A, floor, op B, floor, op C, floor, ...` (the op order rotates each round).
//! Each op phase is compared with the mean p50 of the two floor phases around it, and the
//! reported ratio is the median of those per-phase ratios. p50, p99 and req/s are medians
//! over the rounds.
//!
//! Like kube-apiserver (one gRPC ClientConn, i.e. one HTTP/2 connection, per KMS
//! provider), concurrency N means N tasks multiplexing streams over ONE connection.
//! Full runs also print a short comparison with the tasks spread over several connections.
//!
//! ```text
//! cargo bench -p kms-plugin --bench kms_grpc              # full run (~1-2 min)
//! cargo bench -p kms-plugin --bench kms_grpc -- --quick   # smoke run (< 10 s)
//! ```
//!
//! Environment (all optional):
//!
//! | variable                      | default (quick)      | meaning                                              |
//! |-------------------------------|----------------------|------------------------------------------------------|
//! | `KMS_BENCH_QUICK`             | 0                    | 1 = smoke run, same as `--quick`                     |
//! | `KMS_BENCH_SECONDS`           | 2.5 (0.3)            | measured seconds per (op, concurrency), over rounds  |
//! | `KMS_BENCH_ROUNDS`            | 10 (3)               | interleaved rounds                                   |
//! | `KMS_BENCH_WARMUP_SECONDS`    | 1.0 (0.2)            | warm-up per concurrency before the rounds            |
//! | `KMS_BENCH_PHASE_WARMUP_MS`   | 30 (20)              | unrecorded start of every phase                      |
//! | `KMS_BENCH_CONCURRENCY`       | 1,16,64 (1,16)       | concurrency levels                                   |
//! | `KMS_BENCH_CHANNELS`          | 1                    | connections the tasks share (kube-apiserver: 1)      |
//! | `KMS_BENCH_COMPARE_CHANNELS`  | 4 (0)                | extra table at concurrency 16 over this many; 0 off  |
//! | `KMS_BENCH_CLIENT_THREADS`    | 2                    | worker threads of the client's tokio runtime         |
//! | `KMS_BENCH_PLUGIN_LOG_LEVEL`  | warn                 | the plugin's `--log-level` (info logs every request) |
//! | `KMS_BENCH_OPS`               | all three            | e.g. `encrypt,decrypt`; the floor always runs        |
//! | `KMS_BENCH_VERBOSE`           | 0                    | 1 = print every phase on stderr                      |
//!
//! Numbers are printed, never asserted: this is a benchmark, not a timed test.

use std::collections::HashMap;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use hyper_util::rt::TokioIo;
use kms_proto::v2::key_management_service_client::KeyManagementServiceClient;
use kms_proto::v2::{DecryptRequest, EncryptRequest, StatusRequest};
use rand::RngCore;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const BIN: &str = env!("CARGO_BIN_EXE_kms-plugin");
/// The issue's target: Encrypt and Decrypt p50 within this factor of the floor's p50.
const TARGET_RATIO: f64 = 1.2;
/// Distinct seeds / ciphertexts / uids cycled through by the workers.
const POOL: usize = 1024;

// ---------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Config {
    quick: bool,
    seconds: f64,
    rounds: usize,
    warmup: Duration,
    phase_warmup: Duration,
    concurrencies: Vec<usize>,
    channels: usize,
    compare_channels: usize,
    client_threads: usize,
    plugin_log_level: String,
    /// The measured ops (the floor always runs).
    ops: Vec<Op>,
}

fn env_parse<T: std::str::FromStr>(name: &str, default: T) -> Result<T> {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => v
            .trim()
            .parse()
            .map_err(|_| anyhow!("{name}={v:?} is not a valid value")),
        _ => Ok(default),
    }
}

impl Config {
    fn from_env_and_args() -> Result<Self> {
        // cargo bench passes `--bench` (and any filter): everything but --quick is ignored.
        let arg_quick = std::env::args().skip(1).any(|a| a == "--quick");
        let env_quick = matches!(
            std::env::var("KMS_BENCH_QUICK").as_deref().map(str::trim),
            Ok("1" | "true" | "yes")
        );
        let quick = arg_quick || env_quick;
        let concurrency_default = if quick { "1,16" } else { "1,16,64" };
        let concurrencies = std::env::var("KMS_BENCH_CONCURRENCY")
            .ok()
            .filter(|s| !s.trim().is_empty())
            .unwrap_or_else(|| concurrency_default.to_owned())
            .split(',')
            .map(|s| {
                s.trim()
                    .parse::<usize>()
                    .map_err(|_| anyhow!("KMS_BENCH_CONCURRENCY: bad value {s:?}"))
            })
            .collect::<Result<Vec<_>>>()?;
        if concurrencies.contains(&0) {
            bail!("KMS_BENCH_CONCURRENCY: concurrency must be at least 1");
        }
        let ops = match std::env::var("KMS_BENCH_OPS") {
            Ok(v) if !v.trim().is_empty() => v
                .split(',')
                .map(|s| match s.trim() {
                    "status" => Ok(Op::Status),
                    "encrypt" => Ok(Op::Encrypt),
                    "decrypt" => Ok(Op::Decrypt),
                    other => Err(anyhow!(
                        "KMS_BENCH_OPS: unknown op {other:?} (status, encrypt, decrypt)"
                    )),
                })
                .collect::<Result<Vec<_>>>()?,
            _ => Op::MEASURED.to_vec(),
        };
        let cfg = Self {
            quick,
            seconds: env_parse("KMS_BENCH_SECONDS", if quick { 0.3 } else { 2.5 })?,
            rounds: env_parse("KMS_BENCH_ROUNDS", if quick { 3 } else { 10 })?.max(1),
            warmup: Duration::from_secs_f64(env_parse(
                "KMS_BENCH_WARMUP_SECONDS",
                if quick { 0.2 } else { 1.0 },
            )?),
            phase_warmup: Duration::from_millis(env_parse(
                "KMS_BENCH_PHASE_WARMUP_MS",
                if quick { 20 } else { 30 },
            )?),
            concurrencies,
            ops,
            channels: env_parse("KMS_BENCH_CHANNELS", 1usize)?.max(1),
            compare_channels: env_parse("KMS_BENCH_COMPARE_CHANNELS", if quick { 0 } else { 4 })?,
            client_threads: env_parse("KMS_BENCH_CLIENT_THREADS", 2usize)?.max(1),
            plugin_log_level: std::env::var("KMS_BENCH_PLUGIN_LOG_LEVEL")
                .ok()
                .filter(|s| !s.trim().is_empty())
                .unwrap_or_else(|| "warn".to_owned()),
        };
        if cfg.seconds.is_nan() || cfg.seconds <= 0.0 {
            bail!("KMS_BENCH_SECONDS must be positive");
        }
        Ok(cfg)
    }

    /// Length of one measured phase (after its own short warm-up).
    fn phase(&self) -> Duration {
        Duration::from_secs_f64(self.seconds / self.rounds as f64)
    }
}

// ---------------------------------------------------------------------------------------
// The plugin process
// ---------------------------------------------------------------------------------------

/// The running `kms-plugin serve`. SIGKILLed and reaped on drop, including on panic.
struct Plugin {
    child: Child,
    socket: PathBuf,
    key_store: PathBuf,
    stderr_path: PathBuf,
}

impl Drop for Plugin {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `Command` for the plugin with no inherited plugin settings from the environment.
fn plugin_command() -> Command {
    let mut cmd = Command::new(BIN);
    cmd.env_remove("RUST_LOG");
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("KMS_PLUGIN_") {
            cmd.env_remove(k);
        }
    }
    cmd
}

impl Plugin {
    fn start(dir: &Path, log_level: &str) -> Result<Self> {
        let key_store = dir.join("ks");
        let socket = dir.join("kms.sock");
        let stderr_path = dir.join("plugin-stderr.log");
        let ks = key_store.to_str().context("temp dir path is not UTF-8")?;
        let out = plugin_command()
            .args([
                "key",
                "init",
                "--key-store",
                ks,
                "--backend",
                "insecure-software",
            ])
            .output()
            .context("spawning kms-plugin key init")?;
        if !out.status.success() {
            bail!(
                "kms-plugin key init failed ({}):\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let child = plugin_command()
            .args([
                "serve",
                "--key-store",
                ks,
                "--backend",
                "insecure-software",
                "--socket",
                socket.to_str().context("temp dir path is not UTF-8")?,
                "--http-addr",
                "off",
                "--log-level",
                log_level,
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr_path)?)
            .spawn()
            .context("spawning kms-plugin serve")?;
        Ok(Self {
            child,
            socket,
            key_store,
            stderr_path,
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn logs(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.stderr_path) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    async fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("kms-plugin exited early ({status}):\n{}", self.logs());
            }
            if self.socket.exists() && tokio::net::UnixStream::connect(&self.socket).await.is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "kms-plugin did not open its socket within 20 s:\n{}",
                    self.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "kms-plugin died during the benchmark ({status}):\n{}",
                self.logs()
            );
        }
        Ok(())
    }

    /// `(VmRSS, VmHWM)` in KiB from /proc/PID/status.
    fn rss_kib(&self) -> Option<(u64, u64)> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        };
        Some((field("VmRSS:")?, field("VmHWM:")?))
    }

    /// Encryptions reserved under the active key in the key store (one manifest write,
    /// with fsyncs, per 4096).
    fn encryptions_reserved(&self) -> Option<u64> {
        let out = plugin_command()
            .args([
                "key",
                "list",
                "--key-store",
                self.key_store.to_str()?,
                "--output",
                "json",
            ])
            .output()
            .ok()?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        let active = v["active_key_id"].as_str()?;
        v["keys"].as_array()?.iter().find(|k| k["id"] == active)?["encryptions_reserved"].as_u64()
    }
}

/// A gRPC channel over the Unix socket, as kube-apiserver dials `unix://PATH`: one
/// HTTP/2 connection, many multiplexed streams.
async fn connect(path: &Path) -> Result<Channel> {
    let path = path.to_owned();
    Endpoint::try_from("http://kms.local")?
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        }))
        .await
        .context("connecting to the plugin socket")
}

// ---------------------------------------------------------------------------------------
// Operations and fixtures
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Op {
    Floor,
    Status,
    Encrypt,
    Decrypt,
}

impl Op {
    const MEASURED: [Op; 3] = [Op::Status, Op::Encrypt, Op::Decrypt];

    fn name(self) -> &'static str {
        match self {
            Op::Floor => "health (floor)",
            Op::Status => "status",
            Op::Encrypt => "encrypt",
            Op::Decrypt => "decrypt",
        }
    }
}

/// Requests prepared before any measurement, so the client does no crypto or RNG work
/// while timing.
struct Fixtures {
    seeds: Vec<Vec<u8>>,
    uids: Vec<String>,
    ciphertexts: Vec<Vec<u8>>,
    key_id: String,
    annotations: HashMap<String, Vec<u8>>,
}

#[derive(Clone)]
struct Clients {
    kms: KeyManagementServiceClient<Channel>,
    health: HealthClient<Channel>,
}

impl Clients {
    fn new(channel: Channel) -> Self {
        Self {
            kms: KeyManagementServiceClient::new(channel.clone()),
            health: HealthClient::new(channel),
        }
    }
}

async fn prepare(clients: &mut Clients) -> Result<Fixtures> {
    let mut rng = rand::rng();
    let seeds: Vec<Vec<u8>> = (0..POOL)
        .map(|_| {
            let mut s = vec![0u8; 32];
            rng.fill_bytes(&mut s);
            s
        })
        .collect();
    // uid: kube-apiserver sends a fresh UUID per call; any 36-char string will do.
    let uids: Vec<String> = (0..POOL)
        .map(|_| {
            let mut b = [0u8; 16];
            rng.fill_bytes(&mut b);
            let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
            format!(
                "{}-{}-{}-{}-{}",
                &h[0..8],
                &h[8..12],
                &h[12..16],
                &h[16..20],
                &h[20..32]
            )
        })
        .collect();

    let h = clients
        .health
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await?
        .into_inner();
    if h.status != ServingStatus::Serving as i32 {
        bail!("health check says {:?}", h.status);
    }
    let st = clients.kms.status(StatusRequest {}).await?.into_inner();
    if st.healthz != "ok" {
        bail!("plugin Status is unhealthy: {}", st.healthz);
    }

    let mut ciphertexts = Vec::with_capacity(POOL);
    let mut key_id = String::new();
    let mut annotations = HashMap::new();
    for (seed, uid) in seeds.iter().zip(&uids) {
        let r = clients
            .kms
            .encrypt(EncryptRequest {
                plaintext: seed.clone(),
                uid: uid.clone(),
            })
            .await
            .context("preparing ciphertexts")?
            .into_inner();
        key_id = r.key_id;
        annotations = r.annotations;
        ciphertexts.push(r.ciphertext);
    }
    // Sanity: the prepared ciphertexts decrypt to their seeds.
    let r = clients
        .kms
        .decrypt(DecryptRequest {
            ciphertext: ciphertexts[0].clone(),
            uid: uids[0].clone(),
            key_id: key_id.clone(),
            annotations: annotations.clone(),
        })
        .await?
        .into_inner();
    if r.plaintext != seeds[0] {
        bail!("Decrypt returned a different seed than was encrypted");
    }
    Ok(Fixtures {
        seeds,
        uids,
        ciphertexts,
        key_id,
        annotations,
    })
}

/// One request of `op`; `i` picks the fixture. Returns an error description on failure.
async fn call(op: Op, c: &mut Clients, fx: &Fixtures, i: usize) -> Result<(), String> {
    let i = i % POOL;
    match op {
        Op::Floor => {
            let r = c
                .health
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await
                .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?;
            if r.into_inner().status != ServingStatus::Serving as i32 {
                return Err("health: not serving".into());
            }
        }
        Op::Status => {
            let r = c
                .kms
                .status(StatusRequest {})
                .await
                .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?;
            let r = r.into_inner();
            if r.healthz != "ok" {
                return Err(format!("status: healthz {:?}", r.healthz));
            }
        }
        Op::Encrypt => {
            let r = c
                .kms
                .encrypt(EncryptRequest {
                    plaintext: fx.seeds[i].clone(),
                    uid: fx.uids[i].clone(),
                })
                .await
                .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?;
            if r.into_inner().ciphertext.is_empty() {
                return Err("encrypt: empty ciphertext".into());
            }
        }
        Op::Decrypt => {
            let r = c
                .kms
                .decrypt(DecryptRequest {
                    ciphertext: fx.ciphertexts[i].clone(),
                    uid: fx.uids[i].clone(),
                    key_id: fx.key_id.clone(),
                    annotations: fx.annotations.clone(),
                })
                .await
                .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?;
            if r.into_inner().plaintext != fx.seeds[i] {
                return Err("decrypt: wrong plaintext".into());
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Measurement
// ---------------------------------------------------------------------------------------

/// One measured phase: `op` at some concurrency for a fixed time.
#[derive(Debug, Clone)]
struct Phase {
    op: Op,
    p50_us: f64,
    p99_us: f64,
    rps: f64,
    ok: usize,
    errors: usize,
    first_error: Option<String>,
    /// On-CPU time of the plugin process / of this client process per request.
    plugin_cpu_us: f64,
    client_cpu_us: f64,
}

#[derive(Default)]
struct WorkerOut {
    lat_ns: Vec<u64>,
    errors: usize,
    first_error: Option<String>,
}

/// `KMS_BENCH_VERBOSE=1`: every phase's numbers on stderr.
fn verbose() -> bool {
    matches!(
        std::env::var("KMS_BENCH_VERBOSE").as_deref().map(str::trim),
        Ok("1" | "true" | "yes")
    )
}

/// Total on-CPU time (ns) of all live threads of process `pid` ("self" for this one),
/// from /proc/PID/task/*/schedstat. Threads that exit mid-phase are lost (rare: the
/// plugin's blocking threads linger for 10 s).
fn cpu_ns(pid: &str) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// Nearest-rank percentile of sorted samples.
fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// Runs `op` with `concurrency` tasks spread over `clients` (task k uses connection
/// k % len). Requests started during the first `warmup` are not recorded; recording
/// stops `warmup + measure` after the start. `record = false` runs a pure warm-up.
async fn run_phase(
    op: Op,
    concurrency: usize,
    ctx: &Ctx,
    warmup: Duration,
    measure: Duration,
) -> Result<Phase> {
    let (clients, fx) = (&ctx.clients, &ctx.fx);
    let start = Instant::now();
    let measure_from = start + warmup;
    let end = measure_from + measure;
    // CPU time of both processes over exactly the measured window.
    let pid = ctx.pid.to_string();
    let sampler = tokio::spawn(async move {
        tokio::time::sleep_until(measure_from.into()).await;
        let (p0, c0) = (cpu_ns(&pid), cpu_ns("self"));
        tokio::time::sleep_until(end.into()).await;
        let (p1, c1) = (cpu_ns(&pid), cpu_ns("self"));
        (p1.saturating_sub(p0), c1.saturating_sub(c0))
    });
    let per_task = (measure.as_secs_f64() * 50_000.0 / concurrency as f64) as usize + 16;
    let mut tasks = Vec::with_capacity(concurrency);
    for k in 0..concurrency {
        let mut c = clients[k % clients.len()].clone();
        let fx = Arc::clone(fx);
        tasks.push(tokio::spawn(async move {
            let mut out = WorkerOut {
                lat_ns: Vec::with_capacity(per_task),
                ..WorkerOut::default()
            };
            // Spread the tasks over the fixture pool.
            let mut i = k * (POOL / concurrency.max(1)).max(1);
            loop {
                let t0 = Instant::now();
                if t0 >= end {
                    break;
                }
                let r = call(op, &mut c, &fx, i).await;
                let dt = t0.elapsed();
                i += 1;
                if t0 >= measure_from {
                    match r {
                        Ok(()) => out
                            .lat_ns
                            .push(u64::try_from(dt.as_nanos()).unwrap_or(u64::MAX)),
                        Err(e) => {
                            out.errors += 1;
                            out.first_error.get_or_insert(e);
                        }
                    }
                }
            }
            out
        }));
    }
    let limit = warmup + measure + Duration::from_secs(60);
    let mut all = Vec::new();
    let (mut errors, mut first_error) = (0, None);
    for t in tasks {
        let out = tokio::time::timeout(limit, t)
            .await
            .map_err(|_| anyhow!("{} requests hung for over a minute", op.name()))??;
        all.extend_from_slice(&out.lat_ns);
        errors += out.errors;
        if first_error.is_none() {
            first_error = out.first_error;
        }
    }
    all.sort_unstable();
    let (plugin_ns, client_ns) = sampler.await?;
    let requests = (all.len() + errors).max(1) as f64;
    let phase = Phase {
        op,
        p50_us: percentile(&all, 50.0) as f64 / 1000.0,
        p99_us: percentile(&all, 99.0) as f64 / 1000.0,
        rps: all.len() as f64 / measure.as_secs_f64(),
        ok: all.len(),
        errors,
        first_error,
        plugin_cpu_us: plugin_ns as f64 / 1000.0 / requests,
        client_cpu_us: client_ns as f64 / 1000.0 / requests,
    };
    if verbose() && !measure.is_zero() {
        eprintln!(
            "  phase {:<15} c={:<3} p50 {:>8.1} µs  p99 {:>8.1} µs  {:>7.0} req/s  cpu/req plugin {:>5.1} µs client {:>5.1} µs  errors {}",
            op.name(),
            concurrency,
            phase.p50_us,
            phase.p99_us,
            phase.rps,
            phase.plugin_cpu_us,
            phase.client_cpu_us,
            phase.errors
        );
    }
    Ok(phase)
}

/// Aggregated result of one op at one concurrency.
#[derive(Debug, Clone)]
struct Row {
    op: Op,
    concurrency: usize,
    p50_us: f64,
    p99_us: f64,
    rps: f64,
    ratio: f64,
    ratio_min: f64,
    ratio_max: f64,
    ok: usize,
    errors: usize,
    first_error: Option<String>,
    plugin_cpu_us: f64,
    client_cpu_us: f64,
}

/// What every phase needs: the connections, the prepared requests, the plugin's pid.
struct Ctx {
    clients: Vec<Clients>,
    fx: Arc<Fixtures>,
    pid: u32,
}

/// Warm-up, then `rounds` rounds of `floor, A, floor, B, floor, C, floor` with the op
/// order rotated each round (consecutive rounds share the floor phase between them).
async fn bench_concurrency(
    cfg: &Config,
    concurrency: usize,
    ctx: &Ctx,
    plugin: &mut Plugin,
) -> Result<Vec<Row>> {
    // Warm-up: every op, unrecorded.
    let w = cfg.warmup / 4;
    for op in [Op::Floor, Op::Status, Op::Encrypt, Op::Decrypt] {
        run_phase(op, concurrency, ctx, w, Duration::ZERO).await?;
    }
    plugin.check_alive()?;

    let phase = cfg.phase();
    let mut floors: Vec<Phase> = Vec::new();
    // (op, phase, ratio to the mean p50 of the floors around it)
    let mut measured: Vec<(Phase, f64)> = Vec::new();
    let mut prev_floor = run_phase(Op::Floor, concurrency, ctx, cfg.phase_warmup, phase).await?;
    floors.push(prev_floor.clone());
    for round in 0..cfg.rounds {
        for j in 0..cfg.ops.len() {
            let op = cfg.ops[(j + round) % cfg.ops.len()];
            let p = run_phase(op, concurrency, ctx, cfg.phase_warmup, phase).await?;
            let next_floor =
                run_phase(Op::Floor, concurrency, ctx, cfg.phase_warmup, phase).await?;
            let floor_p50 = (prev_floor.p50_us + next_floor.p50_us) / 2.0;
            measured.push((p.clone(), p.p50_us / floor_p50));
            floors.push(next_floor.clone());
            prev_floor = next_floor;
        }
        plugin.check_alive()?;
    }

    let row = |op: Op, phases: &[&Phase], ratios: &[f64]| Row {
        op,
        concurrency,
        p50_us: median(&phases.iter().map(|p| p.p50_us).collect::<Vec<_>>()),
        p99_us: median(&phases.iter().map(|p| p.p99_us).collect::<Vec<_>>()),
        rps: median(&phases.iter().map(|p| p.rps).collect::<Vec<_>>()),
        ratio: median(ratios),
        ratio_min: ratios.iter().copied().fold(f64::INFINITY, f64::min),
        ratio_max: ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        ok: phases.iter().map(|p| p.ok).sum(),
        errors: phases.iter().map(|p| p.errors).sum(),
        first_error: phases.iter().find_map(|p| p.first_error.clone()),
        plugin_cpu_us: median(&phases.iter().map(|p| p.plugin_cpu_us).collect::<Vec<_>>()),
        client_cpu_us: median(&phases.iter().map(|p| p.client_cpu_us).collect::<Vec<_>>()),
    };
    let mut rows = vec![row(Op::Floor, &floors.iter().collect::<Vec<_>>(), &[1.0])];
    for &op in &cfg.ops {
        let (phases, ratios): (Vec<&Phase>, Vec<f64>) = measured
            .iter()
            .filter(|(p, _)| p.op == op)
            .map(|(p, r)| (p, *r))
            .unzip();
        rows.push(row(op, &phases, &ratios));
    }
    Ok(rows)
}

// ---------------------------------------------------------------------------------------
// Reporting
// ---------------------------------------------------------------------------------------

fn machine_header() -> String {
    let nproc = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .and_then(|r| r.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    let load = loadavg();
    let profile = if cfg!(debug_assertions) {
        "debug (debug assertions on: numbers are NOT representative)"
    } else {
        "release/bench (optimized, no debug assertions)"
    };
    format!(
        "machine: nproc={nproc}, CPU \"{cpu}\", kernel {kernel}, loadavg {load}; build profile: {profile}; \
         plugin: {BIN}"
    )
}

fn print_table(rows: &[Row]) {
    println!("| op | concurrency | p50 µs | p99 µs | req/s | p50 / floor |");
    println!("|---|---:|---:|---:|---:|---:|");
    for r in rows {
        let ratio = if r.op == Op::Floor {
            "1.00".to_owned()
        } else {
            format!("{:.2} ({:.2}–{:.2})", r.ratio, r.ratio_min, r.ratio_max)
        };
        println!(
            "| {} | {} | {:.1} | {:.1} | {:.0} | {} |",
            r.op.name(),
            r.concurrency,
            r.p50_us,
            r.p99_us,
            r.rps,
            ratio
        );
    }
}

fn print_notes(rows: &[Row]) {
    for r in rows.iter().filter(|r| r.errors > 0) {
        println!(
            "- WARNING: {} at concurrency {}: {} of {} requests failed (excluded from latency); first: {}",
            r.op.name(),
            r.concurrency,
            r.errors,
            r.errors + r.ok,
            r.first_error.as_deref().unwrap_or("?")
        );
    }
}

fn print_target(rows: &[Row]) {
    println!();
    println!(
        "Target (issue): Encrypt and Decrypt p50 within {TARGET_RATIO}x of the floor's p50 (not asserted):"
    );
    for r in rows
        .iter()
        .filter(|r| matches!(r.op, Op::Encrypt | Op::Decrypt))
    {
        let verdict = if r.ratio <= TARGET_RATIO {
            "met"
        } else {
            "MISSED"
        };
        println!(
            "- {} @ {}: {:.2}x (per-round {:.2}–{:.2}) -> {verdict}",
            r.op.name(),
            r.concurrency,
            r.ratio,
            r.ratio_min,
            r.ratio_max
        );
    }
}

fn print_cpu_table(rows: &[Row]) {
    println!(
        "| op | concurrency | plugin CPU µs/req | client CPU µs/req | plugin Δ vs floor µs | (plugin+client) CPU / floor |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    for r in rows {
        let floor = rows
            .iter()
            .find(|f| f.op == Op::Floor && f.concurrency == r.concurrency);
        let (floor_plugin, floor_total) = floor.map_or((f64::NAN, f64::NAN), |f| {
            (f.plugin_cpu_us, f.plugin_cpu_us + f.client_cpu_us)
        });
        println!(
            "| {} | {} | {:.1} | {:.1} | {:+.1} | {:.2} |",
            r.op.name(),
            r.concurrency,
            r.plugin_cpu_us,
            r.client_cpu_us,
            r.plugin_cpu_us - floor_plugin,
            (r.plugin_cpu_us + r.client_cpu_us) / floor_total
        );
    }
    println!();
    println!(
        "(When the cores are saturated (high concurrency), latency follows CPU per request: the last column \
         predicts p50 / floor there, without the scheduling noise.)"
    );
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn fmt_rss(v: Option<(u64, u64)>) -> String {
    match v {
        Some((rss, hwm)) => format!(
            "VmRSS {:.1} MiB (peak VmHWM {:.1} MiB)",
            rss as f64 / 1024.0,
            hwm as f64 / 1024.0
        ),
        None => "unavailable".into(),
    }
}

// ---------------------------------------------------------------------------------------
// Main
// ---------------------------------------------------------------------------------------

fn main() -> Result<()> {
    let cfg = Config::from_env_and_args()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cfg.client_threads)
        .enable_all()
        .build()?;
    // Ctrl-C / SIGTERM drop the `run` future, and with it the plugin guard (SIGKILL + reap)
    // and the temporary directory: no plugin is left behind.
    runtime.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = run(cfg) => r,
            _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted (SIGINT)")),
            _ = term.recv() => Err(anyhow!("terminated (SIGTERM)")),
        }
    })
}

async fn run(cfg: Config) -> Result<()> {
    let t_start = Instant::now();
    let dir = tempfile::Builder::new().prefix("kms-bench-").tempdir()?;
    // Declared after `dir`, so it is dropped (killed) first, also when unwinding.
    let mut plugin = Plugin::start(dir.path(), &cfg.plugin_log_level)?;
    plugin.wait_ready().await?;

    let mut clients = Vec::with_capacity(cfg.channels);
    for _ in 0..cfg.channels {
        clients.push(Clients::new(connect(&plugin.socket).await?));
    }
    let rss_rest = plugin.rss_kib();
    let reserved_before = plugin.encryptions_reserved();
    let fx = Arc::new(prepare(&mut clients[0].clone()).await?);
    let ctx = Ctx {
        clients,
        fx: Arc::clone(&fx),
        pid: plugin.pid(),
    };

    println!(
        "## kms-plugin gRPC benchmark{}",
        if cfg.quick { " (quick)" } else { "" }
    );
    println!();
    println!("{}", machine_header());
    println!(
        "client: tonic over the Unix socket, {} tokio worker thread(s) in the bench process; \
         concurrency N = N tasks sharing {} HTTP/2 connection(s) (like kube-apiserver, which uses one); \
         plugin --log-level {}, --http-addr off",
        cfg.client_threads, cfg.channels, cfg.plugin_log_level
    );
    println!(
        "method: per concurrency {:.1} s warm-up, then {} rounds of floor/op phases of {:.0} ms each \
         ({} ms unrecorded at each phase start), op order rotated per round; p50/p99/req/s = median \
         over rounds; p50 / floor = median of (op p50 / mean p50 of the floor phases just before and \
         after), with (min–max)",
        cfg.warmup.as_secs_f64(),
        cfg.rounds,
        cfg.phase().as_secs_f64() * 1000.0,
        cfg.phase_warmup.as_millis()
    );
    println!();

    let mut rows = Vec::new();
    for &c in &cfg.concurrencies {
        rows.extend(bench_concurrency(&cfg, c, &ctx, &mut plugin).await?);
    }
    let rss_loaded = plugin.rss_kib();

    print_table(&rows);
    print_notes(&rows);
    print_target(&rows);
    println!();
    println!(
        "Where the CPU goes (on-CPU time per request from /proc/PID/task/*/schedstat, medians over rounds; plugin and bench share the cores):"
    );
    println!();
    print_cpu_table(&rows);

    if cfg.compare_channels > 1 {
        let n = cfg.compare_channels;
        let mut multi = Vec::with_capacity(n);
        for _ in 0..n {
            multi.push(Clients::new(connect(&plugin.socket).await?));
        }
        let multi = Ctx {
            clients: multi,
            fx: Arc::clone(&fx),
            pid: plugin.pid(),
        };
        let rounds = cfg.rounds.min(4);
        let short = Config {
            rounds,
            seconds: cfg.phase().as_secs_f64() * rounds as f64,
            ..cfg.clone()
        };
        println!();
        println!(
            "Comparison (not what kube-apiserver does): concurrency 16 spread over {n} connections, \
             {rounds} rounds"
        );
        println!();
        let cmp = bench_concurrency(&short, 16, &multi, &mut plugin).await?;
        print_table(&cmp);
        print_notes(&cmp);
    }

    println!();
    println!(
        "plugin memory at rest (connected, before load): {}",
        fmt_rss(rss_rest)
    );
    println!(
        "plugin memory right after the load:              {}",
        fmt_rss(rss_loaded)
    );
    if let (Some(a), Some(b)) = (reserved_before, plugin.encryptions_reserved()) {
        println!(
            "encryptions reserved in the key store: {a} -> {b} (reserved ahead by the plugin's \
             keeper in blocks of 4096 growing to 2^20 under load, off the request path; Encrypt \
             and Status each use one nonce)"
        );
    }
    let logs = plugin.logs();
    println!(
        "plugin stderr: {} line(s) at --log-level {}{}",
        logs.lines().count(),
        cfg.plugin_log_level,
        logs.lines()
            .find(|l| l.contains("ERROR"))
            .map(|l| format!("; first error: {l}"))
            .unwrap_or_default()
    );
    println!(
        "loadavg at the end: {}; total wall time: {:.1} s",
        loadavg(),
        t_start.elapsed().as_secs_f64()
    );
    plugin.check_alive()?;
    drop(plugin);
    drop(dir);
    Ok(())
}
