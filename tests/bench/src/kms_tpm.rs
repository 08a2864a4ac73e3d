//! The KMS plugin on a software TPM (swtpm): start to the first healthy Status with 1 and
//! 10 keys in the ring (start-up unseals each key once), `key rotate`, the time until a
//! running plugin serves the new key, and Encrypt/Decrypt latency with the TPM backend next
//! to the software backend (the TPM must be off the request path).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use kms_proto::v2::key_management_service_client::KeyManagementServiceClient;
use kms_proto::v2::{DecryptRequest, EncryptRequest, StatusRequest};
use tonic::transport::Channel;

use crate::plugin::{self, Serve};
use crate::stats::{Timing, median};
use crate::swtpm::{self, Swtpm};

type Client = KeyManagementServiceClient<Channel>;

/// Rotations on the TPM key store: 1 key from `key init` + 9 = the 10-key ring.
const ROTATIONS: usize = 9;
/// The running plugin's `--reload-interval` while rotating (the default is 5s).
pub const RELOAD_INTERVAL: &str = "1s";

#[derive(Debug, Clone)]
pub struct Settings {
    /// Starts measured per ring size.
    pub starts: usize,
    /// Sequential Encrypt+Decrypt pairs per round and backend.
    pub calls: usize,
    /// Interleaved rounds (TPM, software, TPM, ...).
    pub rounds: usize,
}

impl Settings {
    pub fn new(quick: bool) -> Self {
        if quick {
            Self {
                starts: 3,
                calls: 300,
                rounds: 2,
            }
        } else {
            Self {
                starts: 9,
                calls: 2000,
                rounds: 5,
            }
        }
    }
}

#[derive(Debug)]
pub struct TpmReport {
    pub settings: Settings,
    pub start_1: Timing,
    pub start_many: Timing,
    /// Keys in the ring for `start_many` (10).
    pub ring_keys: usize,
    /// `key rotate`, the whole CLI process.
    pub rotate_cli: Timing,
    /// SIGHUP sent right after `key rotate` to the first Status with the new key id.
    pub new_key_hup: Timing,
    /// `key rotate` exited to the first Status with the new key id, no signal (reload
    /// interval [`RELOAD_INTERVAL`]).
    pub new_key_interval: Timing,
    /// Encrypt and Decrypt p50 (µs) at concurrency 1: (tpm, software).
    pub encrypt_us: (f64, f64),
    pub decrypt_us: (f64, f64),
}

#[derive(Debug)]
pub enum TpmOutcome {
    /// Not run here, and why.
    Skipped(String),
    Measured(TpmReport),
}

pub async fn run(bin: &Path, settings: Settings) -> Result<TpmOutcome> {
    if let Some(why) = swtpm::missing() {
        eprintln!("bench: tpm: SKIPPED: {why}");
        return Ok(TpmOutcome::Skipped(why));
    }
    let dir = tempfile::Builder::new()
        .prefix("kms-tpm-bench-")
        .tempdir()?;
    let tpm = Swtpm::start()?;
    let tpm_args = vec![
        "--backend".to_owned(),
        "tpm".to_owned(),
        "--tcti".to_owned(),
        tpm.tcti(),
    ];
    let sw_args = vec!["--backend".to_owned(), "insecure-software".to_owned()];
    let ks_tpm = dir.path().join("ks-tpm");
    let ks_tpm = ks_tpm.to_str().context("temp dir path is not UTF-8")?;
    let ks_sw = dir.path().join("ks-sw");
    let ks_sw = ks_sw.to_str().context("temp dir path is not UTF-8")?;
    let store_cmd = |verb: &str, ks: &str, backend: &[String]| -> Result<(Duration, String)> {
        let mut args = vec!["key", verb, "--key-store", ks];
        args.extend(backend.iter().map(String::as_str));
        plugin::cli(bin, &args)
    };
    store_cmd("init", ks_tpm, &tpm_args)?;
    store_cmd("init", ks_sw, &sw_args)?;

    eprintln!("bench: tpm: start to ready, 1 key");
    let mut one = Vec::new();
    for _ in 0..settings.starts {
        one.push(
            start_to_healthy(bin, ks_tpm, &tpm_args, dir.path())
                .await?
                .0,
        );
    }

    eprintln!("bench: tpm: {ROTATIONS} rotations under a running plugin");
    let (mut rotate, mut hup, mut interval) = (Vec::new(), Vec::new(), Vec::new());
    {
        let (_, mut running) = start_to_healthy_with(
            bin,
            ks_tpm,
            &tpm_args,
            dir.path(),
            &["--reload-interval", RELOAD_INTERVAL],
        )
        .await?;
        let mut c = Client::new(plugin::connect(&running.socket).await?);
        for i in 0..ROTATIONS {
            let (took, new_id) = store_cmd("rotate", ks_tpm, &tpm_args)?;
            rotate.push(took);
            let t = Instant::now();
            if i % 2 == 0 {
                running.hup()?;
                wait_key_id(&mut c, &new_id, Duration::from_millis(1)).await?;
                hup.push(t.elapsed());
            } else {
                wait_key_id(&mut c, &new_id, Duration::from_millis(5)).await?;
                interval.push(t.elapsed());
            }
        }
        running.check_alive()?;
    }
    let (ring_keys, _) = plugin::key_ring(bin, ks_tpm)?;

    eprintln!("bench: tpm: start to ready, {ring_keys} keys");
    let mut many = Vec::new();
    for _ in 0..settings.starts {
        many.push(
            start_to_healthy(bin, ks_tpm, &tpm_args, dir.path())
                .await?
                .0,
        );
    }

    eprintln!("bench: tpm: Encrypt/Decrypt, TPM vs software backend");
    let (_, s_tpm) = start_to_healthy(bin, ks_tpm, &tpm_args, dir.path()).await?;
    let (_, s_sw) = start_to_healthy(bin, ks_sw, &sw_args, dir.path()).await?;
    let mut c_tpm = Client::new(plugin::connect(&s_tpm.socket).await?);
    let mut c_sw = Client::new(plugin::connect(&s_sw.socket).await?);
    latency(&mut c_tpm, settings.calls / 10).await?;
    latency(&mut c_sw, settings.calls / 10).await?;
    let (mut et, mut dt, mut es, mut ds) = (vec![], vec![], vec![], vec![]);
    for _ in 0..settings.rounds {
        let (e, d) = latency(&mut c_tpm, settings.calls).await?;
        et.push(e);
        dt.push(d);
        let (e, d) = latency(&mut c_sw, settings.calls).await?;
        es.push(e);
        ds.push(d);
    }
    drop((s_tpm, s_sw));
    drop(tpm);
    Ok(TpmOutcome::Measured(TpmReport {
        settings,
        start_1: Timing::of(&one),
        start_many: Timing::of(&many),
        ring_keys,
        rotate_cli: Timing::of(&rotate),
        new_key_hup: Timing::of(&hup),
        new_key_interval: Timing::of(&interval),
        encrypt_us: (median(&et), median(&es)),
        decrypt_us: (median(&dt), median(&ds)),
    }))
}

async fn start_to_healthy(
    bin: &Path,
    ks: &str,
    backend: &[String],
    dir: &Path,
) -> Result<(Duration, Serve)> {
    start_to_healthy_with(bin, ks, backend, dir, &[]).await
}

/// Spawn to the first Status over the socket that answers healthz "ok".
async fn start_to_healthy_with(
    bin: &Path,
    ks: &str,
    backend: &[String],
    dir: &Path,
    extra: &[&str],
) -> Result<(Duration, Serve)> {
    let mut args = vec!["--log-level", "warn"];
    args.extend_from_slice(extra);
    let t = Instant::now();
    let mut s = Serve::spawn(bin, ks, backend, dir, &args)?;
    loop {
        if let Ok(ch) = plugin::connect(&s.socket).await
            && Client::new(ch)
                .status(StatusRequest {})
                .await
                .is_ok_and(|r| r.get_ref().healthz == "ok")
        {
            return Ok((t.elapsed(), s));
        }
        s.check_alive()?;
        if t.elapsed() > Duration::from_secs(20) {
            bail!("the plugin was not healthy within 20 s:\n{}", s.logs());
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Polls Status every `every` until it reports `want` as the key id.
async fn wait_key_id(c: &mut Client, want: &str, every: Duration) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let st = c.status(StatusRequest {}).await?.into_inner();
        if st.key_id == want {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("Status still reports key {} instead of {want}", st.key_id);
        }
        tokio::time::sleep(every).await;
    }
}

/// p50 (µs) of Encrypt and of Decrypt over `n` sequential pairs.
async fn latency(c: &mut Client, n: usize) -> Result<(f64, f64)> {
    let (mut enc, mut dec) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for i in 0..n {
        let seed = vec![(i % 251) as u8; 32];
        let t = Instant::now();
        let r = c
            .encrypt(EncryptRequest {
                plaintext: seed.clone(),
                uid: i.to_string(),
            })
            .await?
            .into_inner();
        enc.push(t.elapsed().as_secs_f64() * 1e6);
        let t = Instant::now();
        let d = c
            .decrypt(DecryptRequest {
                ciphertext: r.ciphertext,
                uid: i.to_string(),
                key_id: r.key_id,
                annotations: r.annotations,
            })
            .await?
            .into_inner();
        dec.push(t.elapsed().as_secs_f64() * 1e6);
        if d.plaintext != seed {
            bail!("Decrypt returned a different seed than was encrypted");
        }
    }
    Ok((median(&enc), median(&dec)))
}
