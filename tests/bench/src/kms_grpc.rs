//! The KMS plugin over its Unix socket, as kube-apiserver sees it, against two floors.
//!
//! Four servers run side by side, each on its own Unix socket:
//!
//! * `bare`: `kms-floor`, a tonic server of the same `v2.KeyManagementService` in its own
//!   process that does nothing a plugin must (no crypto, no logs, no metrics). The floor
//!   users care about: what the plugin adds to tonic itself.
//! * `plugin`: the real `kms-plugin serve` at the default log level (`info`: one audit
//!   line per Encrypt and Decrypt), insecure software backend.
//! * `plugin, warn`: the same at `--log-level warn` (no audit lines).
//! * `bare + layer`: `kms-floor --authority-layer`, the bare server with the plugin's
//!   Unix-socket authority layer on its connections: the layer's cost in place.
//!
//! and the plugin's own gRPC health check (`grpc.health.v1.Health/Check`) is the second
//! floor: transport, HTTP/2 and protobuf in the plugin's process, doing nothing.
//!
//! The machine is noisy, so phases are short and interleaved: every plugin phase sits
//! between two `bare` phases of the same op (or two health phases), and its ratios are
//! against the mean of those two. Ratios are medians over the rounds; p50, p99 and req/s
//! are medians of the per-phase values.
//!
//! Like kube-apiserver (one gRPC ClientConn, i.e. one HTTP/2 connection, per KMS provider),
//! concurrency N means N tasks multiplexing streams over ONE connection.

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

/// How long and how often to measure.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Measured seconds per (server, op, concurrency), spread over the rounds.
    pub seconds: f64,
    pub rounds: usize,
    /// Unrecorded warm-up of every server and op at each concurrency, before the rounds.
    pub warmup: Duration,
    /// Unrecorded start of every phase.
    pub phase_warmup: Duration,
    pub concurrencies: Vec<usize>,
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
    Health,
    Status,
    Encrypt,
    Decrypt,
}

impl Op {
    pub fn name(self) -> &'static str {
        match self {
            Op::Health => "health",
            Op::Status => "Status",
            Op::Encrypt => "Encrypt",
            Op::Decrypt => "Decrypt",
        }
    }
}

/// The servers measured side by side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Server {
    Bare,
    Plugin,
    PluginWarn,
    BareLayer,
}

impl Server {
    pub fn name(self) -> &'static str {
        match self {
            Server::Bare => "bare tonic",
            Server::Plugin => "plugin (info, default)",
            Server::PluginWarn => "plugin (warn)",
            Server::BareLayer => "bare tonic + authority layer",
        }
    }
}

/// A ratio measured once per round: its median and range.
#[derive(Debug, Clone, Copy)]
pub struct Ratio {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Ratio {
    fn of(values: &[f64]) -> Option<Self> {
        (!values.is_empty()).then(|| Ratio {
            median: median(values),
            min: stats::min(values),
            max: stats::max(values),
        })
    }
}

/// Aggregated result of one server and op at one concurrency.
#[derive(Debug, Clone)]
pub struct Row {
    pub server: Server,
    pub op: Op,
    pub concurrency: usize,
    pub p50_us: f64,
    pub p99_us: f64,
    pub rps: f64,
    /// p50 / the bare server's p50 for the same op (phases on either side).
    pub p50_vs_bare: Option<Ratio>,
    /// req/s / the bare server's req/s for the same op.
    pub rps_vs_bare: Option<Ratio>,
    /// p50 / the p50 of the plugin's own health check (phases on either side).
    pub p50_vs_health: Option<Ratio>,
    pub ok: usize,
    pub errors: usize,
    pub first_error: Option<String>,
    /// On-CPU time per request of the server process and of the bench (client) process.
    pub server_cpu_us: f64,
    pub client_cpu_us: f64,
}

#[derive(Debug)]
pub struct KmsReport {
    pub settings: Settings,
    pub rows: Vec<Row>,
    /// The plugin (default log level), connected, before any load.
    pub mem_rest: Option<Mem>,
    /// Largest VmRSS of the plugin sampled every 100 ms during the measured phases.
    pub rss_under_load_kib: Option<u64>,
    /// Right after the load (VmHWM: the peak over the whole run).
    pub mem_after: Option<Mem>,
    pub reserved: Option<(u64, u64)>,
    pub plugin_log_lines: usize,
    pub plugin_first_error: Option<String>,
    pub layer: crate::authority::LayerCost,
}

/// Requests prepared before any measurement, so the client does no crypto or RNG work
/// while timing. Ciphertexts are each server's own.
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

/// One server under test: its connection, its fixtures, its pid.
struct Target {
    server: Server,
    clients: Clients,
    fx: Arc<Fixtures>,
    pid: u32,
}

/// `kms-floor` as a child process, killed on drop.
struct Floor {
    child: std::process::Child,
    socket: std::path::PathBuf,
}

impl Drop for Floor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Floor {
    async fn spawn(bin: &Path, dir: &Path, name: &str, layer: bool) -> Result<Self> {
        let socket = dir.join(format!("{name}.sock"));
        let mut cmd = std::process::Command::new(bin);
        cmd.arg(&socket);
        if layer {
            cmd.arg("--authority-layer");
        }
        let child = cmd
            .stdin(std::process::Stdio::null())
            .spawn()
            .context("spawning kms-floor")?;
        let mut f = Self { child, socket };
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::UnixStream::connect(&f.socket).await.is_err() {
            if let Some(st) = f.child.try_wait()? {
                bail!("kms-floor exited ({st})");
            }
            if Instant::now() > deadline {
                bail!("kms-floor did not open {} in 10 s", f.socket.display());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(f)
    }
}

async fn start_plugin(
    bin: &Path,
    dir: &Path,
    name: &str,
    extra: &[&str],
) -> Result<(Serve, String)> {
    let ks = dir.join(name);
    let ks = ks
        .to_str()
        .context("temp dir path is not UTF-8")?
        .to_owned();
    let backend = ["--backend".to_owned(), "insecure-software".to_owned()];
    plugin::cli(
        bin,
        &["key", "init", "--key-store", &ks, &backend[0], &backend[1]],
    )?;
    let mut serve = Serve::spawn(bin, &ks, &backend, dir, extra)?;
    serve.wait_socket(Duration::from_secs(20)).await?;
    Ok((serve, ks))
}

pub async fn run(
    bin: &Path,
    floor_bin: &Path,
    settings: Settings,
    verbose: bool,
) -> Result<KmsReport> {
    let dir = tempfile::Builder::new().prefix("kms-bench-").tempdir()?;
    // Declared after `dir`, so they are dropped (killed) first.
    let (mut info, ks) = start_plugin(bin, dir.path(), "info", &[]).await?;
    let (mut warn, _) = start_plugin(bin, dir.path(), "warn", &["--log-level", "warn"]).await?;
    let bare = Floor::spawn(floor_bin, dir.path(), "bare", false).await?;
    let bare_layer = Floor::spawn(floor_bin, dir.path(), "bare-layer", true).await?;

    let layer = crate::authority::measure(dir.path(), &bare_layer.socket).await;
    for c in &layer.captures {
        eprintln!(
            "bench: kms: authority layer alone, {}: {:.0} ns/request",
            c.client, c.ns_per_request
        );
    }
    let seeds_uids = Arc::new(pool());
    let mut targets = Vec::new();
    for (server, socket, pid) in [
        (Server::Bare, &bare.socket, bare.child.id()),
        (Server::Plugin, &info.socket, info.pid()),
        (Server::PluginWarn, &warn.socket, warn.pid()),
        (Server::BareLayer, &bare_layer.socket, bare_layer.child.id()),
    ] {
        let mut clients = Clients::connect(socket).await?;
        let fx = prepare(&mut clients, &seeds_uids, server)
            .await
            .with_context(|| format!("preparing {}", server.name()))?;
        targets.push(Target {
            server,
            clients,
            fx: Arc::new(fx),
            pid,
        });
    }
    let mem_rest = procfs::mem(info.pid());
    let reserved_before = plugin::encryptions_reserved(bin, &ks);

    let sampler = RssSampler::start(info.pid(), Duration::from_millis(100));
    let mut rows = Vec::new();
    for &c in &settings.concurrencies {
        eprintln!("bench: kms: concurrency {c}");
        rows.extend(
            bench_concurrency(&settings, c, &targets, verbose, &mut [&mut info, &mut warn]).await?,
        );
    }
    let rss_under_load_kib = sampler.finish().await.into_iter().max();
    let mem_after = procfs::mem(info.pid());

    info.check_alive()?;
    warn.check_alive()?;
    let reserved = reserved_before.zip(plugin::encryptions_reserved(bin, &ks));
    let logs = info.logs();
    Ok(KmsReport {
        settings,
        rows,
        mem_rest,
        rss_under_load_kib,
        mem_after,
        reserved,
        plugin_log_lines: logs.lines().count(),
        plugin_first_error: logs
            .lines()
            .find(|l| l.contains("ERROR"))
            .map(str::to_owned),
        layer,
    })
}

/// Seeds and uids shared by every server.
fn pool() -> (Vec<Vec<u8>>, Vec<String>) {
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
    (seeds, uids)
}

async fn prepare(
    clients: &mut Clients,
    pool: &(Vec<Vec<u8>>, Vec<String>),
    server: Server,
) -> Result<Fixtures> {
    let (seeds, uids) = (pool.0.clone(), pool.1.clone());

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
        bail!(
            "{}: Decrypt returned a different seed than was encrypted",
            server.name()
        );
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
        Op::Health => {
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
    p50_us: f64,
    p99_us: f64,
    rps: f64,
    ok: usize,
    errors: usize,
    first_error: Option<String>,
    server_cpu_us: f64,
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
    target: &Target,
    verbose: bool,
    warmup: Duration,
    measure: Duration,
) -> Result<Phase> {
    let start = Instant::now();
    let measure_from = start + warmup;
    let end = measure_from + measure;
    // CPU time of both processes over exactly the measured window.
    let pid = target.pid.to_string();
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
        let mut c = target.clients.clone();
        let fx = Arc::clone(&target.fx);
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
        p50_us: percentile(&all, 50.0) as f64 / 1000.0,
        p99_us: percentile(&all, 99.0) as f64 / 1000.0,
        rps: all.len() as f64 / measure.as_secs_f64(),
        ok: all.len(),
        errors,
        first_error,
        server_cpu_us: plugin_ns as f64 / 1000.0 / requests,
        client_cpu_us: client_ns as f64 / 1000.0 / requests,
    };
    if verbose && !measure.is_zero() {
        eprintln!(
            "  phase {:<29} {:<8} c={:<3} p50 {:>8.1} µs  p99 {:>8.1} µs  {:>7.0} req/s  cpu/req server {:>5.1} µs client {:>5.1} µs  errors {}",
            target.server.name(),
            op.name(),
            concurrency,
            phase.p50_us,
            phase.p99_us,
            phase.rps,
            phase.server_cpu_us,
            phase.client_cpu_us,
            phase.errors
        );
    }
    Ok(phase)
}

/// Phases in one round of [`round_plan`].
pub const PHASES_PER_ROUND: usize = 18;

/// One round at one concurrency: which phases, in order. Every plugin phase of an op sits
/// between two `bare` phases of that op, Status between two health phases.
fn round_plan() -> Vec<(Server, Op)> {
    use Op::*;
    use Server::*;
    vec![
        (Plugin, Health),
        (Plugin, Status),
        (Plugin, Health),
        (Bare, Encrypt),
        (Plugin, Encrypt),
        (Bare, Encrypt),
        (PluginWarn, Encrypt),
        (Bare, Encrypt),
        (BareLayer, Encrypt),
        (Bare, Encrypt),
        (Plugin, Health),
        (Bare, Decrypt),
        (Plugin, Decrypt),
        (Bare, Decrypt),
        (PluginWarn, Decrypt),
        (Bare, Decrypt),
        (BareLayer, Decrypt),
        (Bare, Decrypt),
    ]
}

/// Warm-up of every (server, op), then `rounds` rounds of [`round_plan`].
async fn bench_concurrency(
    s: &Settings,
    concurrency: usize,
    targets: &[Target],
    verbose: bool,
    plugins: &mut [&mut Serve],
) -> Result<Vec<Row>> {
    let target = |server: Server| {
        targets
            .iter()
            .find(|t| t.server == server)
            .ok_or_else(|| anyhow!("no {} target", server.name()))
    };
    let w = s.warmup / 4;
    for t in targets {
        for op in [Op::Health, Op::Status, Op::Encrypt, Op::Decrypt] {
            run_phase(op, concurrency, t, false, w, Duration::ZERO).await?;
        }
    }
    for p in plugins.iter_mut() {
        p.check_alive()?;
    }

    let plan = round_plan();
    // Every phase of every round, in order: (server, op, phase).
    let mut all: Vec<Vec<(Server, Op, Phase)>> = Vec::new();
    for _ in 0..s.rounds {
        let mut round = Vec::new();
        for &(server, op) in &plan {
            let p = run_phase(
                op,
                concurrency,
                target(server)?,
                verbose,
                s.phase_warmup,
                s.phase(),
            )
            .await?;
            round.push((server, op, p));
        }
        all.push(round);
        for p in plugins.iter_mut() {
            p.check_alive()?;
        }
    }

    // Ratios of each phase to the reference phases just before and after it in its round.
    let around = |round: &[(Server, Op, Phase)], i: usize, server: Server, op: Op| {
        let is_ref = |j: &usize| round[*j].0 == server && round[*j].1 == op;
        let before = (0..i).rev().find(is_ref);
        let after = (i + 1..round.len()).find(is_ref);
        let refs: Vec<&Phase> = before
            .into_iter()
            .chain(after)
            .map(|j| &round[j].2)
            .collect();
        (!refs.is_empty()).then(|| {
            let n = refs.len() as f64;
            (
                refs.iter().map(|p| p.p50_us).sum::<f64>() / n,
                refs.iter().map(|p| p.rps).sum::<f64>() / n,
            )
        })
    };
    let mut rows = Vec::new();
    let mut kinds: Vec<(Server, Op)> = Vec::new();
    for k in plan {
        if !kinds.contains(&k) {
            kinds.push(k);
        }
    }
    for (server, op) in kinds {
        let mut phases = Vec::new();
        let (mut vs_bare, mut rps_bare, mut vs_health) = (Vec::new(), Vec::new(), Vec::new());
        for round in &all {
            for (i, (sv, o, p)) in round.iter().enumerate() {
                if *sv != server || *o != op {
                    continue;
                }
                phases.push(p);
                let bare_ref = server != Server::Bare && matches!(op, Op::Encrypt | Op::Decrypt);
                if let Some((p50, rps)) = bare_ref
                    .then(|| around(round, i, Server::Bare, op))
                    .flatten()
                {
                    vs_bare.push(p.p50_us / p50);
                    rps_bare.push(p.rps / rps);
                }
                let plugin = matches!(server, Server::Plugin | Server::PluginWarn);
                if let Some((p50, _)) = (plugin && op != Op::Health)
                    .then(|| around(round, i, Server::Plugin, Op::Health))
                    .flatten()
                {
                    vs_health.push(p.p50_us / p50);
                }
            }
        }
        let med = |f: fn(&Phase) -> f64| median(&phases.iter().map(|p| f(p)).collect::<Vec<_>>());
        rows.push(Row {
            server,
            op,
            concurrency,
            p50_us: med(|p| p.p50_us),
            p99_us: med(|p| p.p99_us),
            rps: med(|p| p.rps),
            p50_vs_bare: Ratio::of(&vs_bare),
            rps_vs_bare: Ratio::of(&rps_bare),
            p50_vs_health: Ratio::of(&vs_health),
            ok: phases.iter().map(|p| p.ok).sum(),
            errors: phases.iter().map(|p| p.errors).sum(),
            first_error: phases.iter().find_map(|p| p.first_error.clone()),
            server_cpu_us: med(|p| p.server_cpu_us),
            client_cpu_us: med(|p| p.client_cpu_us),
        });
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_measured_phase_has_its_references_in_the_round() {
        let plan = round_plan();
        assert_eq!(plan.len(), PHASES_PER_ROUND);
        for (i, &(server, op)) in plan.iter().enumerate() {
            let has =
                |s: Server, o: Op| plan[..i].contains(&(s, o)) && plan[i + 1..].contains(&(s, o));
            if server != Server::Bare && matches!(op, Op::Encrypt | Op::Decrypt) {
                assert!(has(Server::Bare, op), "{server:?} {op:?} at {i}");
            }
            if op == Op::Status {
                assert!(has(Server::Plugin, Op::Health));
            }
        }
    }
}
