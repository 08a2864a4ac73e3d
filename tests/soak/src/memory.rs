//! Resident memory and CPU time of the processes under test, from /proc.

use std::time::Duration;

/// `VmRSS` of `pid` in KiB; `None` once it has exited (a zombie has no VmRSS).
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// User + system CPU time of `pid` (all threads), from /proc/PID/stat.
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces) start at field 3, `state`;
    // utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // USER_HZ is 100 on every Linux architecture the project targets.
    Some(Duration::from_millis(ticks * 10))
}

/// RSS samples of one process, one per second.
pub struct Series {
    pub name: &'static str,
    pub pid: u32,
    pub samples: Vec<(Duration, u64)>,
}

/// The RSS figures the report shows.
pub struct Spread {
    pub first: u64,
    pub last: u64,
    pub min: u64,
    pub max: u64,
    pub after_warm_up: usize,
    /// (max - min) / min over the samples after warm-up, in percent.
    pub percent: f64,
}

impl Series {
    pub fn new(name: &'static str, pid: u32) -> Self {
        Self {
            name,
            pid,
            samples: Vec::new(),
        }
    }

    /// Takes one sample; `false` if the process is gone.
    pub fn sample(&mut self, at: Duration) -> bool {
        match rss_kib(self.pid) {
            Some(kib) => {
                self.samples.push((at, kib));
                true
            }
            None => false,
        }
    }

    pub fn last(&self) -> Option<u64> {
        self.samples.last().map(|s| s.1)
    }

    pub fn spread(&self, warm_up: Duration) -> Option<Spread> {
        let after: Vec<u64> = self
            .samples
            .iter()
            .filter(|(t, _)| *t >= warm_up)
            .map(|s| s.1)
            .collect();
        let min = *after.iter().min()?;
        let max = *after.iter().max()?;
        Some(Spread {
            first: self.samples.first()?.1,
            last: self.samples.last()?.1,
            min,
            max,
            after_warm_up: after.len(),
            percent: if min == 0 {
                f64::INFINITY
            } else {
                (max - min) as f64 * 100.0 / min as f64
            },
        })
    }
}

pub fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}
