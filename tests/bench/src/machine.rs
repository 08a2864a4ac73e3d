//! The machine and the build the numbers come from: the report's first table.

use std::path::Path;
use std::process::Command;

#[derive(Debug, Clone)]
pub struct Machine {
    pub nproc: usize,
    pub cpu_model: String,
    pub mem_total_kib: Option<u64>,
    pub mem_available_kib: Option<u64>,
    pub kernel: String,
    pub rustc: String,
    /// "release" or "debug".
    pub profile: &'static str,
    /// Short hash of HEAD, and whether tracked files differ from it.
    pub commit: Option<(String, bool)>,
    /// When the benchmarks started, UTC.
    pub date: String,
}

/// True when this binary is an optimized build (`--release`): the binaries it measures are
/// built the same way.
pub fn optimized() -> bool {
    !cfg!(debug_assertions)
}

impl Machine {
    pub fn describe(workspace: &Path) -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| {
                l.strip_prefix("model name")
                    .and_then(|r| r.split_once(':'))
                    .map(|(_, v)| v.trim().to_owned())
            })
            .unwrap_or_else(|| "unknown".to_owned());
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let mem_field = |name: &str| {
            meminfo
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        };
        let commit = output(workspace, "git", &["rev-parse", "--short", "HEAD"]).map(|hash| {
            let dirty = output(
                workspace,
                "git",
                &["status", "--porcelain", "--untracked-files=no"],
            )
            .is_some_and(|s| !s.is_empty());
            (hash, dirty)
        });
        let date = time::OffsetDateTime::now_utc()
            .format(time::macros::format_description!(
                "[year]-[month]-[day] [hour]:[minute] UTC"
            ))
            .unwrap_or_default();
        Self {
            nproc: std::thread::available_parallelism().map_or(0, |n| n.get()),
            cpu_model,
            mem_total_kib: mem_field("MemTotal:"),
            mem_available_kib: mem_field("MemAvailable:"),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_owned())
                .unwrap_or_else(|_| "unknown".to_owned()),
            rustc: output(workspace, "rustc", &["-V"]).unwrap_or_else(|| "unknown".to_owned()),
            profile: if optimized() { "release" } else { "debug" },
            commit,
            date,
        }
    }
}

/// The 1, 5 and 15 minute load averages.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".to_owned())
}

/// Trimmed stdout of a command that succeeded.
fn output(dir: &Path, program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}
