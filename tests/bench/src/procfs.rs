//! What /proc says about a process: resident memory and on-CPU time.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Resident memory of a process, from /proc/PID/status.
#[derive(Debug, Clone, Copy)]
pub struct Mem {
    /// VmRSS: resident now.
    pub rss_kib: u64,
    /// VmHWM: the most it was ever resident.
    pub hwm_kib: u64,
}

pub fn mem(pid: u32) -> Option<Mem> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
    };
    Some(Mem {
        rss_kib: field("VmRSS:")?,
        hwm_kib: field("VmHWM:")?,
    })
}

pub fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Total on-CPU time (ns) of the live threads of process `pid` ("self" for this one), from
/// /proc/PID/task/*/schedstat. Time of threads that exit between two readings is lost (rare:
/// tokio's blocking threads linger for 10 s).
pub fn cpu_ns(pid: &str) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// Samples a process's VmRSS on a tokio task every `every`, until finished or dropped.
pub struct RssSampler {
    stop: Arc<AtomicBool>,
    task: Option<tokio::task::JoinHandle<Vec<u64>>>,
}

impl RssSampler {
    pub fn start(pid: u32, every: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let s = Arc::clone(&stop);
        let task = tokio::spawn(async move {
            let mut samples = Vec::new();
            while !s.load(Ordering::Relaxed) {
                if let Some(now) = mem(pid) {
                    samples.push(now.rss_kib);
                }
                tokio::time::sleep(every).await;
            }
            samples
        });
        Self {
            stop,
            task: Some(task),
        }
    }

    /// Stops sampling; returns every sample (KiB), in order.
    pub async fn finish(mut self) -> Vec<u64> {
        self.stop.store(true, Ordering::Relaxed);
        match self.task.take() {
            Some(t) => t.await.unwrap_or_default(),
            None => Vec::new(),
        }
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
