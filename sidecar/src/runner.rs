//! Runs the sidecar: checks the output volume, sets up identity and the vault client,
//! then syncs once (`--once`) or keeps the files fresh until SIGTERM.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use tokio::signal::unix::{SignalKind, signal};

use crate::config::Config;
use crate::deliver::tmpfs::{FsKind, fs_kind};
use crate::http;
use crate::identity::{self, Env, TokenCache};
use crate::keyvault::{KeyVault, RetryPolicy};
use crate::metrics::Metrics;
use crate::notify;
use crate::sync::Syncer;

/// What the HTTP listener reads.
pub struct State {
    pub ready: AtomicBool,
    pub metrics: Arc<Metrics>,
    pub tokens: Arc<TokenCache>,
    last_error: Mutex<Option<String>>,
}

impl State {
    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .map(|g| g.clone())
            .unwrap_or_default()
    }

    fn set_error(&self, e: Option<String>) {
        if let Ok(mut g) = self.last_error.lock() {
            *g = e;
        }
    }
}

/// Refuses an output directory that is not memory-backed, unless told otherwise (loudly).
pub fn check_output_dir(cfg: &Config) -> anyhow::Result<()> {
    let dir = &cfg.output_dir;
    let meta = std::fs::metadata(dir).with_context(|| {
        format!(
            "output directory {}: mount an emptyDir with medium: Memory there",
            dir.display()
        )
    })?;
    anyhow::ensure!(
        meta.is_dir(),
        "output directory {} is not a directory",
        dir.display()
    );
    match fs_kind(dir)
        .with_context(|| format!("inspecting the file system of {}", dir.display()))?
    {
        FsKind::Memory => Ok(()),
        FsKind::Other(magic) if cfg.allow_disk_output => {
            tracing::warn!(
                dir = %dir.display(),
                fs_magic = format!("{magic:#x}"),
                "DANGER: the output directory is not in memory; secrets will be written to disk"
            );
            Ok(())
        }
        FsKind::Other(magic) => anyhow::bail!(
            "output directory {} is not on tmpfs or ramfs (file system {magic:#x}): secrets would \
             reach a disk. Use an emptyDir with medium: Memory, or pass \
             --dangerously-allow-disk-output if you accept that",
            dir.display()
        ),
    }
}

pub async fn run(cfg: Config, env: Env) -> anyhow::Result<()> {
    check_output_dir(&cfg)?;
    let clients = http::build(cfg.ca_file.as_deref(), cfg.request_timeout)?;
    let source = identity::select(&cfg, &env, &clients)?;
    tracing::info!(
        identity = source.name(),
        vault = %cfg.vault_url,
        objects = cfg.objects.len(),
        output = %cfg.output_dir.display(),
        once = cfg.once,
        "starting"
    );
    let tokens = Arc::new(TokenCache::new(source));
    let kv = Arc::new(KeyVault::new(
        clients.external.clone(),
        cfg.vault_url.clone(),
        cfg.api_version.clone(),
        Arc::clone(&tokens),
        cfg.verify_challenge_resource,
        RetryPolicy::default(),
    ));
    let metrics = Arc::new(Metrics::new());
    let cfg = Arc::new(cfg);
    let mut syncer = Syncer::new(Arc::clone(&cfg), kv, Arc::clone(&metrics));

    if cfg.once {
        let report = syncer.sync().await?;
        // No app reads yet (an init container): a replaced set can go now, not after the
        // grace the exit would cut short.
        crate::deliver::writer::remove_replaced(&cfg.output_dir);
        tracing::info!(
            files = report.files,
            "all secrets delivered; exiting (--once)"
        );
        return Ok(());
    }

    let state = Arc::new(State {
        ready: AtomicBool::new(false),
        metrics: Arc::clone(&metrics),
        tokens: Arc::clone(&tokens),
        last_error: Mutex::new(None),
    });
    if let Some(addr) = cfg.http_addr {
        let l = tokio::net::TcpListener::bind(addr).await.with_context(|| {
            format!("binding the HTTP listener on {addr} (--http-addr; \"off\" disables it)")
        })?;
        tracing::info!(addr = ?l.local_addr().ok(), "serving /healthz, /readyz and /metrics");
        tokio::spawn(crate::server::serve(l, Arc::clone(&state)));
    }
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;

    let mut failures: u32 = 0;
    loop {
        let delay = match syncer.sync().await {
            Ok(report) => {
                let first = !state.ready.swap(true, Ordering::AcqRel);
                if first {
                    metrics.set_ready();
                    tracing::info!(
                        files = report.files,
                        "first complete set of secrets delivered: ready"
                    );
                }
                if report.stale.is_empty() {
                    metrics.sync(if report.changed {
                        "changed"
                    } else {
                        "unchanged"
                    });
                    state.set_error(None);
                    failures = 0;
                } else {
                    metrics.sync("partial");
                    state.set_error(Some(format!(
                        "could not refresh {}",
                        report.stale.join("; ")
                    )));
                    failures += 1;
                }
                if report.changed && !first && notify_configured(&cfg) {
                    match notify::notify(&cfg.notify).await {
                        Ok(_) => metrics.notification(true),
                        Err(e) => {
                            metrics.notification(false);
                            tracing::error!(error = %e, "the secrets changed but the app could not be told");
                        }
                    }
                }
                next_delay(cfg.refresh_interval, failures)
            }
            Err(e) => {
                metrics.sync("error");
                failures += 1;
                let ready = state.ready.load(Ordering::Acquire);
                tracing::error!(
                    error = %e,
                    retry_in = ?next_delay(cfg.refresh_interval, failures),
                    "sync failed; {}",
                    if ready { "the last good files stay in place" } else { "not ready yet" }
                );
                state.set_error(Some(e.to_string()));
                next_delay(cfg.refresh_interval, failures)
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = term.recv() => { tracing::info!("SIGTERM: stopping; the delivered files stay until the pod goes"); return Ok(()) }
            _ = int.recv() => { tracing::info!("SIGINT: stopping"); return Ok(()) }
        }
    }
}

fn notify_configured(cfg: &Config) -> bool {
    cfg.notify.signal.is_some() || cfg.notify.command.is_some()
}

/// The refresh interval with ±10% jitter (so a fleet of pods does not hit the vault in
/// step); after failures, exponential backoff from 2 s, capped at the refresh interval.
fn next_delay(refresh: Duration, failures: u32) -> Duration {
    let base = if failures == 0 {
        refresh
    } else {
        Duration::from_secs(2)
            .saturating_mul(1 << failures.min(16))
            .min(refresh)
    };
    let jitter = rand::random_range(0.9..1.1);
    base.mul_f64(jitter)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays() {
        let r = Duration::from_secs(120);
        for _ in 0..100 {
            let d = next_delay(r, 0);
            assert!(d >= Duration::from_secs(108) && d <= Duration::from_secs(132));
        }
        assert!(next_delay(r, 1) <= Duration::from_secs(5));
        assert!(next_delay(r, 20) <= Duration::from_secs(132));
    }
}
