//! Command line of the soak run.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

#[derive(Debug, Clone, Parser)]
#[command(
    name = "soak",
    about = "Runs the real kms-plugin and sidecar for a bounded time under continuous traffic, \
             key rotations and injected vault faults; exits 0 only if no KMS request failed, \
             no delivered secret was ever lost, memory stayed flat and no secret reached a log"
)]
pub struct Args {
    /// How long to run; it stops by itself (Ctrl-C stops early and still reports).
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Rotate the KMS key this often (`kms-plugin key rotate`, then SIGHUP).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub rotate_every: Duration,
    /// Concurrent KMS client tasks (sharing one HTTP/2 connection, as kube-apiserver does).
    #[arg(long, default_value_t = 4)]
    pub kms_clients: usize,
    /// Secrets in the vault, all delivered by the sidecar.
    #[arg(long, default_value_t = 100)]
    pub secrets: usize,
    /// The sidecar's --refresh-interval.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub refresh_interval: Duration,
    /// The sidecar's --request-timeout (how long a hung vault request can hold a refresh).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub request_timeout: Duration,
    /// Largest RSS spread allowed after warm-up, in percent of the smallest sample.
    #[arg(long, default_value_t = 10.0, value_name = "PERCENT")]
    pub max_rss_spread: f64,
    /// Use kms-plugin's INSECURE software backend even when swtpm is installed.
    #[arg(long)]
    pub software: bool,
    /// Seed of the fault schedule and of the value changes, to replay a run.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Also write the summary (markdown) to this file.
    #[arg(long, value_name = "FILE")]
    pub report: Option<PathBuf>,
    /// Keep the working directory (logs, key store, TPM state) instead of removing it.
    #[arg(long)]
    pub keep_work_dir: bool,
    /// Use the kms-plugin and sidecar binaries next to this one as they are (no cargo build).
    #[arg(long)]
    pub no_build: bool,
}

impl Args {
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.duration >= Duration::from_secs(20),
            "--duration must be at least 20s (the first 20%, at least 10 s, is warm-up)"
        );
        anyhow::ensure!(
            self.rotate_every >= Duration::from_secs(2),
            "--rotate-every must be at least 2s"
        );
        anyhow::ensure!(
            (1..=64).contains(&self.kms_clients),
            "--kms-clients must be 1 to 64"
        );
        anyhow::ensure!(
            (1..=1000).contains(&self.secrets),
            "--secrets must be 1 to 1000"
        );
        anyhow::ensure!(
            self.refresh_interval >= Duration::from_millis(100),
            "--refresh-interval must be at least 100ms"
        );
        anyhow::ensure!(
            self.request_timeout >= Duration::from_secs(1),
            "--request-timeout must be at least 1s"
        );
        anyhow::ensure!(
            self.max_rss_spread > 0.0,
            "--max-rss-spread must be positive"
        );
        Ok(())
    }

    /// The first 20% of the run, at least 10 s: memory grows to its working set there.
    pub fn warm_up(&self) -> Duration {
        self.duration.mul_f64(0.2).max(Duration::from_secs(10))
    }
}
