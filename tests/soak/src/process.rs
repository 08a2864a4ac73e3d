//! Child processes the soak owns: their output goes to a log file, they run in their own
//! process group (a Ctrl-C in the terminal reaches the soak only, which then stops them in
//! order), and they are killed when dropped, whatever path the run took.

use std::fs::File;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;

pub struct Child {
    inner: std::process::Child,
    pub name: &'static str,
    pub log: PathBuf,
    exited: Option<ExitStatus>,
}

impl Child {
    /// Spawns `cmd` with stdout and stderr appended to `log`.
    pub fn spawn(name: &'static str, mut cmd: Command, log: &Path) -> anyhow::Result<Self> {
        let out = File::options()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("creating {}", log.display()))?;
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .process_group(0);
        let inner = cmd
            .spawn()
            .with_context(|| format!("starting {name} ({cmd:?})"))?;
        Ok(Self {
            inner,
            name,
            log: log.to_owned(),
            exited: None,
        })
    }

    pub fn pid(&self) -> u32 {
        self.inner.id()
    }

    /// `Some(status)` once the process has exited.
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.inner.try_wait().ok().flatten();
        }
        self.exited
    }

    /// Sends a signal (`HUP`, `TERM`, ...) while the process runs (never to a reaped pid).
    pub fn signal(&mut self, sig: &str) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.exit_status().is_none(),
            "{} has already exited",
            self.name
        );
        let st = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .context("running kill")?;
        anyhow::ensure!(st.success(), "kill -{sig} {} failed", self.pid());
        Ok(())
    }

    /// SIGTERM, then waits up to `within` for the exit (SIGKILL after that).
    pub fn terminate(&mut self, within: Duration) -> anyhow::Result<ExitStatus> {
        if let Some(s) = self.exit_status() {
            return Ok(s);
        }
        self.signal("TERM")?;
        let start = Instant::now();
        loop {
            if let Some(s) = self.exit_status() {
                return Ok(s);
            }
            if start.elapsed() > within {
                let _ = self.inner.kill();
                let _ = self.inner.wait();
                anyhow::bail!("{} did not stop within {within:?} of SIGTERM", self.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The last `n` lines of the log, for error messages.
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if self.exited.is_none() {
            let _ = self.inner.kill();
            let _ = self.inner.wait();
        }
    }
}
