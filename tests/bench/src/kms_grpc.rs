//! The KMS plugin over its Unix socket, as kube-apiserver sees it.
//!
//! Starts `kms-plugin serve` (insecure software backend, `--log-level warn`) on a Unix
//! socket in a temporary directory and measures, per operation and concurrency, the latency
//! of every request and the throughput:
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
//! Like kube-apiserver (one gRPC ClientConn, i.e. one HTTP/2 connection, per KMS provider),
//! concurrency N means N tasks multiplexing streams over ONE connection. A last, shorter
//! comparison spreads 16 tasks over several connections.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use kms_proto::v2::key_management_service_client::KeyManagementServiceClient;
use kms_proto::v2::{DecryptRequest, EncryptRequest, StatusRequest};
use rand::RngCore;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::plugin::{self, Serve};
use crate::procfs::{self, Mem, RssSampler};
use crate::stats::{self, median, percentile};

/// Distinct seeds / ciphertexts / uids cycled through by the workers.
const POOL: usize = 1024;
/// The plugin's log level: `info` writes one audit line per Encrypt/Decrypt.
pub const PLUGIN_LOG_LEVEL: &str = "warn";
/// Concurrency of the multi-connection comparison.
const COMPARE_CONCURRENCY: usize = 16;

/// How long and how often to measure.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Measured seconds per (op, concurrency), spread over the rounds.
    pub seconds: f64,
    pub rounds: usize,
    /// Unrecorded warm-up of every op at each concurrency, before the rounds.
    pub warmup: Duration,
    /// Unrecorded start of every phase.
    pub phase_warmup: Duration,
    pub concurrencies: Vec<usize>,
    /// Connections of the comparison table (0: none).
    pub compare_connections: usize,
    /// Rounds of the comparison table.
    pub compare_rounds: usize,
    /// Worker threads of the client's tokio runtime (the bench process).
    pub client_threads: usize,
}

impl Settings {
    pub fn new(quick: bool, client_threads: usize) -> Self {
        Self {
            seconds: if quick { 0.45 } else { 2.5 },
            rounds: if quick { 3 } else { 10 },
            warmup: Duration::from_secs_f64(if quick { 0.2 } else { 1.0 }),
            phase_warmup: Duration::from_millis(if quick { 20 } else { 30 }),
            concurrencies: vec![1, 16, 64],
            compare_connections: 4,
            compare_rounds: if quick { 2 } else { 4 },
            client_threads,
        }
    }

    /// Length of one measured phase (after its own short warm-up).
    pub fn phase(&self) -> Duration {
        Duration::from_secs_f64(self.seconds / self.rounds as f64)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    Floor,
    Status,
    Encrypt,
    Decrypt,
}

impl Op {
    const MEASURED: [Op; 3] = [Op::Status, Op::Encrypt, Op::Decrypt];

    pub fn name(self) -> &'static str {
        match self {
            Op::Floor => "health (floor)",
            Op::Status => "Status",
            Op::Encrypt => "Encrypt",
            Op::Decrypt => "Decrypt",
        }
    }
}

/// Aggregated result of one op at one concurrency.
#[derive(Debug, Clone)]
pub struct Row {
    pub op: Op,
    pub concurrency: usize,
    pub p50_us: f64,
    pub p99_us: f64,
    pub rps: f64,
    /// Median over rounds of p50 / mean p50 of the floor phases around it (1 for the floor).
    pub ratio: f64,
    pub ratio_min: f64,
    pub ratio_max: f64,
    pub ok: usize,
    pub errors: usize,
    pub first_error: Option<String>,
    /// On-CPU time per request of the plugin process and of the bench (client) process.
    pub plugin_cpu_us: f64,
    pub client_cpu_us: f64,
}

#[derive(Debug)]
pub struct KmsReport {
    pub settings: Settings,
    pub rows: Vec<Row>,
    /// The comparison over several connections: (connections, rows).
    pub compare: Option<(usize, Vec<Row>)>,
    /// Connected, before any load.
    pub mem_rest: Option<Mem>,
    /// Largest VmRSS sampled every 100 ms during the measured phases.
    pub rss_under_load_kib: Option<u64>,
    /// Right after the load (VmHWM: the peak over the whole run).
    pub mem_after: Option<Mem>,
    pub reserved: Option<(u64, u64)>,
    pub plugin_log_lines: usize,
    pub plugin_first_error: Option<String>,
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
    async fn connect(socket: &Path) -> Result<Self> {
        let channel = plugin::connect(socket).await?;
        Ok(Self {
            kms: KeyManagementServiceClient::new(channel.clone()),
            health: HealthClient::new(channel),
        })
    }
}

/// What every phase needs: the connections, the prepared requests, the plugin's pid.
struct Ctx {
    clients: Vec<Clients>,
    fx: Arc<Fixtures>,
    pid: u32,
    verbose: bool,
}

pub async fn run(bin: &Path, settings: Settings, verbose: bool) -> Result<KmsReport> {
    let dir = tempfile::Builder::new().prefix("kms-bench-").tempdir()?;
    let ks = dir.path().join("ks");
    let ks = ks.to_str().context("temp dir path is not UTF-8")?;
    let backend = ["--backend".to_owned(), "insecure-software".to_owned()];
    plugin::cli(
        bin,
        &["key", "init", "--key-store", ks, &backend[0], &backend[1]],
    )?;
    // Declared after `dir`, so it is dropped (killed) first.
    let mut plugin = Serve::spawn(
        bin,
        ks,
        &backend,
        dir.path(),
        &["--log-level", PLUGIN_LOG_LEVEL],
    )?;
    plugin.wait_socket(Duration::from_secs(20)).await?;

    let clients = vec![Clients::connect(&plugin.socket).await?];
    let mem_rest = procfs::mem(plugin.pid());
    let reserved_before = plugin::encryptions_reserved(bin, ks);
    let fx = Arc::new(prepare(&mut clients[0].clone()).await?);
    let ctx = Ctx {
        clients,
        fx: Arc::clone(&fx),
        pid: plugin.pid(),
        verbose,
    };

    let sampler = RssSampler::start(plugin.pid(), Duration::from_millis(100));
    let mut rows = Vec::new();
    for &c in &settings.concurrencies {
        eprintln!("bench: kms: concurrency {c}");
        rows.extend(bench_concurrency(&settings, c, &ctx, &mut plugin).await?);
    }
    let rss_under_load_kib = sampler.finish().await.into_iter().max();
    let mem_after = procfs::mem(plugin.pid());

    let compare = if settings.compare_connections > 1 {
        let n = settings.compare_connections;
        eprintln!("bench: kms: concurrency {COMPARE_CONCURRENCY} over {n} connections");
        let mut multi = Vec::with_capacity(n);
        for _ in 0..n {
            multi.push(Clients::connect(&plugin.socket).await?);
        }
        let multi = Ctx {
            clients: multi,
            fx: Arc::clone(&fx),
            pid: plugin.pid(),
            verbose,
        };
        let short = Settings {
            rounds: settings.compare_rounds,
            seconds: settings.phase().as_secs_f64() * settings.compare_rounds as f64,
            ..settings.clone()
        };
        Some((
            n,
            bench_concurrency(&short, COMPARE_CONCURRENCY, &multi, &mut plugin).await?,
        ))
    } else {
        None
    };

    plugin.check_alive()?;
    let reserved = reserved_before.zip(plugin::encryptions_reserved(bin, ks));
    let logs = plugin.logs();
    Ok(KmsReport {
        settings,
        rows,
        compare,
        mem_rest,
        rss_under_load_kib,
        mem_after,
        reserved,
        plugin_log_lines: logs.lines().count(),
        plugin_first_error: logs
            .lines()
            .find(|l| l.contains("ERROR"))
            .map(str::to_owned),
    })
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
    let (Some(ct), Some(uid), Some(seed)) = (ciphertexts.first(), uids.first(), seeds.first())
    else {
        bail!("no fixtures");
    };
    let r = clients
        .kms
        .decrypt(DecryptRequest {
            ciphertext: ct.clone(),
            uid: uid.clone(),
            key_id: key_id.clone(),
            annotations: annotations.clone(),
        })
        .await?
        .into_inner();
    if &r.plaintext != seed {
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

fn status_err(s: tonic::Status) -> String {
    format!("{:?}: {}", s.code(), s.message())
}

/// One request of `op`; `i` picks the fixture. Returns an error description on failure.
async fn call(op: Op, c: &mut Clients, fx: &Fixtures, i: usize) -> Result<(), String> {
    let i = i % POOL;
    let (Some(seed), Some(uid), Some(ciphertext)) =
        (fx.seeds.get(i), fx.uids.get(i), fx.ciphertexts.get(i))
    else {
        return Err("fixture index out of range".into());
    };
    match op {
        Op::Floor => {
            let r = c
                .health
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await
                .map_err(status_err)?;
            if r.into_inner().status != ServingStatus::Serving as i32 {
                return Err("health: not serving".into());
            }
        }
        Op::Status => {
            let r = c
                .kms
                .status(StatusRequest {})
                .await
                .map_err(status_err)?
                .into_inner();
            if r.healthz != "ok" {
                return Err(format!("status: healthz {:?}", r.healthz));
            }
        }
        Op::Encrypt => {
            let r = c
                .kms
                .encrypt(EncryptRequest {
                    plaintext: seed.clone(),
                    uid: uid.clone(),
                })
                .await
                .map_err(status_err)?;
            if r.into_inner().ciphertext.is_empty() {
                return Err("encrypt: empty ciphertext".into());
            }
        }
        Op::Decrypt => {
            let r = c
                .kms
                .decrypt(DecryptRequest {
                    ciphertext: ciphertext.clone(),
                    uid: uid.clone(),
                    key_id: fx.key_id.clone(),
                    annotations: fx.annotations.clone(),
                })
                .await
                .map_err(status_err)?;
            if &r.into_inner().plaintext != seed {
                return Err("decrypt: wrong plaintext".into());
            }
        }
    }
    Ok(())
}

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
    plugin_cpu_us: f64,
    client_cpu_us: f64,
}

#[derive(Default)]
struct WorkerOut {
    lat_ns: Vec<u64>,
    errors: usize,
    first_error: Option<String>,
}

/// Runs `op` with `concurrency` tasks spread over the connections (task k uses connection
/// k % len). Requests started during the first `warmup` are not recorded; recording stops
/// `warmup + measure` after the start.
async fn run_phase(
    op: Op,
    concurrency: usize,
    ctx: &Ctx,
    warmup: Duration,
    measure: Duration,
) -> Result<Phase> {
    let start = Instant::now();
    let measure_from = start + warmup;
    let end = measure_from + measure;
    // CPU time of both processes over exactly the measured window.
    let pid = ctx.pid.to_string();
    let sampler = tokio::spawn(async move {
        tokio::time::sleep_until(measure_from.into()).await;
        let (p0, c0) = (procfs::cpu_ns(&pid), procfs::cpu_ns("self"));
        tokio::time::sleep_until(end.into()).await;
        let (p1, c1) = (procfs::cpu_ns(&pid), procfs::cpu_ns("self"));
        (p1.saturating_sub(p0), c1.saturating_sub(c0))
    });
    let per_task = (measure.as_secs_f64() * 50_000.0 / concurrency as f64) as usize + 16;
    let mut tasks = Vec::with_capacity(concurrency);
    for k in 0..concurrency {
        let Some(c) = ctx.clients.get(k % ctx.clients.len()) else {
            bail!("no connection");
        };
        let mut c = c.clone();
        let fx = Arc::clone(&ctx.fx);
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
    if ctx.verbose && !measure.is_zero() {
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

/// Warm-up, then `rounds` rounds of `floor, A, floor, B, floor, C, floor` with the op order
/// rotated each round (consecutive rounds share the floor phase between them).
async fn bench_concurrency(
    s: &Settings,
    concurrency: usize,
    ctx: &Ctx,
    plugin: &mut Serve,
) -> Result<Vec<Row>> {
    let w = s.warmup / 4;
    for op in [Op::Floor, Op::Status, Op::Encrypt, Op::Decrypt] {
        run_phase(op, concurrency, ctx, w, Duration::ZERO).await?;
    }
    plugin.check_alive()?;

    let phase = s.phase();
    let ops = Op::MEASURED;
    let mut floors: Vec<Phase> = Vec::new();
    // (phase, ratio to the mean p50 of the floors around it)
    let mut measured: Vec<(Phase, f64)> = Vec::new();
    let mut prev_floor = run_phase(Op::Floor, concurrency, ctx, s.phase_warmup, phase).await?;
    floors.push(prev_floor.clone());
    for round in 0..s.rounds {
        for j in 0..ops.len() {
            let op = ops[(j + round) % ops.len()];
            let p = run_phase(op, concurrency, ctx, s.phase_warmup, phase).await?;
            let next_floor = run_phase(Op::Floor, concurrency, ctx, s.phase_warmup, phase).await?;
            let floor_p50 = (prev_floor.p50_us + next_floor.p50_us) / 2.0;
            let ratio = p.p50_us / floor_p50;
            measured.push((p, ratio));
            floors.push(next_floor.clone());
            prev_floor = next_floor;
        }
        plugin.check_alive()?;
    }

    let row = |op: Op, phases: &[&Phase], ratios: &[f64]| {
        let med = |f: fn(&Phase) -> f64| median(&phases.iter().map(|p| f(p)).collect::<Vec<_>>());
        Row {
            op,
            concurrency,
            p50_us: med(|p| p.p50_us),
            p99_us: med(|p| p.p99_us),
            rps: med(|p| p.rps),
            ratio: median(ratios),
            ratio_min: stats::min(ratios),
            ratio_max: stats::max(ratios),
            ok: phases.iter().map(|p| p.ok).sum(),
            errors: phases.iter().map(|p| p.errors).sum(),
            first_error: phases.iter().find_map(|p| p.first_error.clone()),
            plugin_cpu_us: med(|p| p.plugin_cpu_us),
            client_cpu_us: med(|p| p.client_cpu_us),
        }
    };
    let mut rows = vec![row(Op::Floor, &floors.iter().collect::<Vec<_>>(), &[1.0])];
    for op in ops {
        let (phases, ratios): (Vec<&Phase>, Vec<f64>) = measured
            .iter()
            .filter(|(p, _)| p.op == op)
            .map(|(p, r)| (p, *r))
            .unzip();
        rows.push(row(op, &phases, &ratios));
    }
    Ok(rows)
}
