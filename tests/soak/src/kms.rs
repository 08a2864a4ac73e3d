//! The KMS half: a software TPM (or the insecure software backend), `kms-plugin serve` on a
//! Unix socket, client tasks doing Encrypt/Decrypt back to back over one HTTP/2 connection
//! (as kube-apiserver does), a Status watcher, a rotator (`kms-plugin key rotate` + SIGHUP)
//! and a re-decrypter that keeps proving old ciphertexts still open.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::{DefaultHasher, Hasher as _};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use kms_proto::v2::key_management_service_client::KeyManagementServiceClient;
use kms_proto::v2::{DecryptRequest, EncryptRequest, StatusRequest};
use tokio::sync::watch;
use tonic::transport::Channel;

use crate::process::Child;

pub type Client = KeyManagementServiceClient<Channel>;

/// A request with no answer after this long counts as failed.
const RPC_TIMEOUT: Duration = Duration::from_secs(10);
/// Ciphertexts kept per key id for re-decryption.
const RESERVOIR: usize = 64;
/// How long a rotation may take to show in Status (SIGHUP makes it immediate).
const ROTATION_VISIBLE_WITHIN: Duration = Duration::from_secs(10);
/// The plugin's own reload interval; SIGHUP after each rotation does not wait for it.
const RELOAD_INTERVAL: &str = "5s";

pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

// ---------------------------------------------------------------- backend

/// What seals the keys: its `--backend ...` flags, and the swtpm process if there is one.
pub struct Backend {
    pub args: Vec<String>,
    pub label: String,
    pub swtpm: Option<Child>,
}

impl Backend {
    /// A fresh swtpm (state under `work`), or the software backend when asked or when
    /// swtpm is not installed (loudly).
    pub fn start(work: &Path, software: bool) -> anyhow::Result<Self> {
        if software {
            eprintln!(
                "soak: NOTE: --software: the KMS plugin runs on the INSECURE software backend, not a TPM"
            );
            return Ok(Self::software());
        }
        if !on_path("swtpm") {
            eprintln!(
                "soak: NOTE: swtpm is not installed: the KMS plugin runs on the INSECURE software \
                 backend, so the TPM path is NOT soaked (apt-get install swtpm swtpm-tools)"
            );
            return Ok(Self::software());
        }
        let state = work.join("tpm-state");
        std::fs::create_dir_all(&state)?;
        for _ in 0..30 {
            let port = edgeseal_test_support::free_port_pair()?;
            let cmd = edgeseal_test_support::swtpm_command(port, &state);
            let mut child = Child::spawn("swtpm", cmd, &work.join("swtpm.log"))?;
            let deadline = Instant::now() + Duration::from_secs(10);
            let mut up = false;
            while Instant::now() < deadline && child.exit_status().is_none() {
                if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    up = true;
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            if up {
                let tcti = edgeseal_test_support::swtpm_tcti(port);
                return Ok(Self {
                    args: vec![
                        "--backend".into(),
                        "tpm".into(),
                        "--tcti".into(),
                        tcti.clone(),
                    ],
                    label: format!("tpm (swtpm, {tcti})"),
                    swtpm: Some(child),
                });
            }
            // The port was taken meanwhile: try another pair.
        }
        anyhow::bail!("could not start swtpm on any port pair")
    }

    fn software() -> Self {
        Self {
            args: vec!["--backend".into(), "insecure-software".into()],
            label: "insecure-software (NOT a TPM)".into(),
            swtpm: None,
        }
    }
}

fn on_path(bin: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file()))
}

// ---------------------------------------------------------------- CLI and serve

/// Runs `kms-plugin ARGS --key-store KS <backend>`; its stderr is appended to `log`.
/// Returns trimmed stdout.
pub async fn key_command(
    bin: &Path,
    sub: &[&str],
    ks: &Path,
    backend: &[String],
    log: &Path,
) -> anyhow::Result<String> {
    let out = tokio::process::Command::new(bin)
        .args(sub)
        .arg("--key-store")
        .arg(ks)
        .args(backend)
        .env_remove("RUST_LOG")
        .env("TSS2_LOG", "all+none")
        .kill_on_drop(true)
        .output()
        .await
        .with_context(|| format!("running kms-plugin {}", sub.join(" ")))?;
    {
        use std::io::Write as _;
        let mut f = std::fs::File::options()
            .create(true)
            .append(true)
            .open(log)?;
        f.write_all(&out.stderr)?;
    }
    anyhow::ensure!(
        out.status.success(),
        "kms-plugin {} failed ({}): {}",
        sub.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// A running `kms-plugin serve`.
pub struct Plugin {
    pub child: Child,
    pub socket: PathBuf,
}

impl Plugin {
    pub async fn start(
        bin: &Path,
        ks: &Path,
        backend: &[String],
        work: &Path,
    ) -> anyhow::Result<Self> {
        let socket = work.join("kms.sock");
        let mut cmd = Command::new(bin);
        cmd.arg("serve")
            .arg("--key-store")
            .arg(ks)
            .args(backend)
            .arg("--socket")
            .arg(&socket)
            .args([
                "--http-addr",
                "off",
                "--reload-interval",
                RELOAD_INTERVAL,
                "--drain-timeout",
                "2s",
            ])
            .env_remove("RUST_LOG")
            .env("TSS2_LOG", "all+none");
        let mut child = Child::spawn("kms-plugin", cmd, &work.join("kms-plugin.log"))?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = child.exit_status() {
                anyhow::bail!(
                    "kms-plugin serve exited at start ({st}):\n{}",
                    child.log_tail(30)
                );
            }
            if socket.exists() && tokio::net::UnixStream::connect(&socket).await.is_ok() {
                return Ok(Self { child, socket });
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "kms-plugin serve did not listen within 30 s:\n{}",
                child.log_tail(30)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// One HTTP/2 connection over the Unix socket, as kube-apiserver dials `unix://PATH`.
pub async fn connect(socket: &Path) -> anyhow::Result<Channel> {
    edgeseal_test_support::connect_unix(socket)
        .await
        .context("connecting to the plugin's socket")
}

// ---------------------------------------------------------------- shared state

/// Every request made, and every failure (the first few kept with their message).
#[derive(Default)]
pub struct Counters {
    pub encrypts: AtomicU64,
    pub decrypts: AtomicU64,
    pub statuses: AtomicU64,
    pub redecrypts: AtomicU64,
    pub failed: AtomicU64,
    failures: Mutex<Vec<String>>,
    started: Mutex<Option<Instant>>,
}

impl Counters {
    pub fn ok(&self) -> u64 {
        self.encrypts.load(Relaxed)
            + self.decrypts.load(Relaxed)
            + self.statuses.load(Relaxed)
            + self.redecrypts.load(Relaxed)
    }

    pub fn failed(&self) -> u64 {
        self.failed.load(Relaxed)
    }

    pub fn start_clock(&self) {
        *lock(&self.started) = Some(Instant::now());
    }

    fn fail(&self, what: String) {
        self.failed.fetch_add(1, Relaxed);
        let at = lock(&self.started).map(|s| s.elapsed()).unwrap_or_default();
        let mut f = lock(&self.failures);
        if f.len() < 20 {
            f.push(format!("[{:.1}s] {what}", at.as_secs_f64()));
        }
    }

    pub fn first_failures(&self) -> Vec<String> {
        lock(&self.failures).clone()
    }
}

/// One Encrypt result and its seed.
pub struct Sample {
    key_id: String,
    ciphertext: Vec<u8>,
    annotations: HashMap<String, Vec<u8>>,
    seed: [u8; 32],
}

#[derive(Default)]
struct Reservoir {
    seen: u64,
    kept: Vec<Arc<Sample>>,
}

/// A bounded uniform sample (reservoir) of every key id's ciphertexts, and a hash of every
/// seed ever sent (to look for them in the logs).
#[derive(Default)]
pub struct Samples {
    per_key: Mutex<BTreeMap<String, Reservoir>>,
    seeds: Mutex<HashSet<u64>>,
}

pub fn seed_hash(seed: &[u8]) -> u64 {
    let mut h = DefaultHasher::new();
    h.write(seed);
    h.finish()
}

impl Samples {
    fn remember_seed(&self, seed: &[u8; 32]) {
        lock(&self.seeds).insert(seed_hash(seed));
    }

    fn offer(&self, s: Sample) {
        let mut all = lock(&self.per_key);
        let r = all.entry(s.key_id.clone()).or_default();
        r.seen += 1;
        if r.kept.len() < RESERVOIR {
            r.kept.push(Arc::new(s));
        } else {
            let j = rand::random_range(0..r.seen);
            if let Some(slot) = usize::try_from(j).ok().and_then(|j| r.kept.get_mut(j)) {
                *slot = Arc::new(s);
            }
        }
    }

    fn snapshot(&self) -> Vec<Arc<Sample>> {
        lock(&self.per_key)
            .values()
            .flat_map(|r| r.kept.iter().cloned())
            .collect()
    }

    /// Key ids seen in Encrypt responses: (id, encryptions seen, samples kept).
    pub fn keys(&self) -> Vec<(String, u64, usize)> {
        lock(&self.per_key)
            .iter()
            .map(|(k, r)| (k.clone(), r.seen, r.kept.len()))
            .collect()
    }

    pub fn seed_hashes(&self) -> HashSet<u64> {
        std::mem::take(&mut *lock(&self.seeds))
    }
}

async fn rpc<T>(
    fut: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, String> {
    match tokio::time::timeout(RPC_TIMEOUT, fut).await {
        Ok(Ok(r)) => Ok(r.into_inner()),
        Ok(Err(s)) => Err(format!("{:?}: {}", s.code(), s.message())),
        Err(_) => Err(format!("no answer within {RPC_TIMEOUT:?}")),
    }
}

async fn decrypt(c: &mut Client, s: &Sample, uid: &str) -> Result<Vec<u8>, String> {
    rpc(c.decrypt(DecryptRequest {
        ciphertext: s.ciphertext.clone(),
        uid: uid.to_owned(),
        key_id: s.key_id.clone(),
        annotations: s.annotations.clone(),
    }))
    .await
    .map(|r| r.plaintext)
}

// ---------------------------------------------------------------- tasks

/// Encrypt a fresh random seed, decrypt it at once, keep it in the reservoir; repeat.
pub async fn client(
    t: usize,
    mut c: Client,
    stop: watch::Receiver<bool>,
    counters: Arc<Counters>,
    samples: Arc<Samples>,
) {
    let mut n = 0u64;
    while !*stop.borrow() {
        n += 1;
        let seed: [u8; 32] = rand::random();
        samples.remember_seed(&seed);
        let uid = format!("soak-{t}-{n}");
        let enc = match rpc(c.encrypt(EncryptRequest {
            plaintext: seed.to_vec(),
            uid: uid.clone(),
        }))
        .await
        {
            Ok(e) => e,
            Err(e) => {
                counters.fail(format!("Encrypt {uid}: {e}"));
                continue;
            }
        };
        if enc.key_id.is_empty() || enc.ciphertext.is_empty() {
            counters.fail(format!("Encrypt {uid}: empty key_id or ciphertext"));
            continue;
        }
        counters.encrypts.fetch_add(1, Relaxed);
        let s = Sample {
            key_id: enc.key_id,
            ciphertext: enc.ciphertext,
            annotations: enc.annotations,
            seed,
        };
        match decrypt(&mut c, &s, &uid).await {
            Ok(pt) if pt == seed => {
                counters.decrypts.fetch_add(1, Relaxed);
            }
            Ok(_) => counters.fail(format!("Decrypt {uid} under {}: wrong plaintext", s.key_id)),
            Err(e) => counters.fail(format!("Decrypt {uid} under {}: {e}", s.key_id)),
        }
        samples.offer(s);
    }
}

/// Status every 200 ms, as kube-apiserver's health check does (more often): healthz must
/// stay "ok" and a key id must always be reported.
pub async fn status_watcher(
    mut c: Client,
    mut stop: watch::Receiver<bool>,
    counters: Arc<Counters>,
    current: Arc<Mutex<String>>,
) {
    loop {
        match rpc(c.status(StatusRequest {})).await {
            Ok(st) if st.healthz == "ok" && !st.key_id.is_empty() => {
                counters.statuses.fetch_add(1, Relaxed);
                *lock(&current) = st.key_id;
            }
            Ok(st) => counters.fail(format!(
                "Status: healthz {:?}, key_id {:?}",
                st.healthz, st.key_id
            )),
            Err(e) => counters.fail(format!("Status: {e}")),
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// Decrypts every kept sample again; returns how many failed.
pub async fn redecrypt_all(c: &mut Client, samples: &Samples, counters: &Counters) -> u64 {
    let mut failed = 0;
    for (i, s) in samples.snapshot().iter().enumerate() {
        let uid = format!("soak-re-{i}");
        match decrypt(c, s, &uid).await {
            Ok(pt) if pt == s.seed => {
                counters.redecrypts.fetch_add(1, Relaxed);
            }
            Ok(_) => {
                failed += 1;
                counters.fail(format!("re-Decrypt under {}: wrong plaintext", s.key_id));
            }
            Err(e) => {
                failed += 1;
                counters.fail(format!("re-Decrypt under {}: {e}", s.key_id));
            }
        }
    }
    failed
}

/// Every `every`, decrypts all kept samples again (old keys included).
pub async fn redecrypter(
    mut c: Client,
    every: Duration,
    mut stop: watch::Receiver<bool>,
    samples: Arc<Samples>,
    counters: Arc<Counters>,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        redecrypt_all(&mut c, &samples, &counters).await;
    }
}

/// One rotation as the soak saw it.
#[derive(Debug, Clone)]
pub struct Rotation {
    pub key_id: String,
    /// How long `kms-plugin key rotate` took.
    pub cli: Duration,
    /// From SIGHUP to Status reporting the new key.
    pub visible_after: Duration,
}

#[derive(Default)]
pub struct Rotations {
    pub done: Vec<Rotation>,
    pub errors: Vec<String>,
}

pub struct Rotator {
    pub bin: PathBuf,
    pub ks: PathBuf,
    pub backend: Vec<String>,
    pub cli_log: PathBuf,
    pub plugin_pid: u32,
    pub every: Duration,
}

impl Rotator {
    /// Rotates every `every` until stopped: `key rotate` on the store, SIGHUP, then Status
    /// must report the new key within 10 s and the next Encrypt must use it.
    pub async fn run(
        self,
        mut c: Client,
        mut stop: watch::Receiver<bool>,
        counters: Arc<Counters>,
        samples: Arc<Samples>,
        log: Arc<Mutex<Rotations>>,
    ) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(self.every) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            match self.rotate_once(&mut c, &counters, &samples).await {
                Ok(r) => lock(&log).done.push(r),
                Err(e) => lock(&log).errors.push(format!("{e:#}")),
            }
        }
    }

    async fn rotate_once(
        &self,
        c: &mut Client,
        counters: &Counters,
        samples: &Samples,
    ) -> anyhow::Result<Rotation> {
        let t = Instant::now();
        let key_id = key_command(
            &self.bin,
            &["key", "rotate"],
            &self.ks,
            &self.backend,
            &self.cli_log,
        )
        .await?;
        anyhow::ensure!(!key_id.is_empty(), "`key rotate` printed no key id");
        let cli = t.elapsed();
        let st = Command::new("kill")
            .args(["-HUP", &self.plugin_pid.to_string()])
            .status()?;
        anyhow::ensure!(st.success(), "kill -HUP {} failed", self.plugin_pid);
        let hup = Instant::now();
        loop {
            match rpc(c.status(StatusRequest {})).await {
                Ok(s) => {
                    counters.statuses.fetch_add(1, Relaxed);
                    if s.key_id == key_id {
                        break;
                    }
                }
                Err(e) => counters.fail(format!("Status (rotation): {e}")),
            }
            anyhow::ensure!(
                hup.elapsed() < ROTATION_VISIBLE_WITHIN,
                "Status did not report the new key {key_id} within {ROTATION_VISIBLE_WITHIN:?} of SIGHUP"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let visible_after = hup.elapsed();
        let seed: [u8; 32] = rand::random();
        samples.remember_seed(&seed);
        let enc = rpc(c.encrypt(EncryptRequest {
            plaintext: seed.to_vec(),
            uid: format!("soak-rotation-{key_id}"),
        }))
        .await;
        match enc {
            Ok(e) => {
                counters.encrypts.fetch_add(1, Relaxed);
                anyhow::ensure!(
                    e.key_id == key_id,
                    "Encrypt used {} after Status reported {key_id}",
                    e.key_id
                );
                // Every key gets at least this sample, however soon the run ends.
                samples.offer(Sample {
                    key_id: e.key_id,
                    ciphertext: e.ciphertext,
                    annotations: e.annotations,
                    seed,
                });
            }
            Err(e) => {
                counters.fail(format!("Encrypt (rotation): {e}"));
                anyhow::bail!("Encrypt right after rotating to {key_id} failed: {e}");
            }
        }
        Ok(Rotation {
            key_id,
            cli,
            visible_after,
        })
    }
}
