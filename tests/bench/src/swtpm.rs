//! A software TPM (`swtpm`) on free loopback ports with its own state directory, killed on
//! drop; the same set-up as the TPM tests (tests/common/swtpm.rs).

use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

pub struct Swtpm {
    child: Child,
    port: u16,
    _state: tempfile::TempDir,
}

/// Why the TPM section cannot run here, if it cannot: swtpm is not installed.
pub fn missing() -> Option<String> {
    match Command::new("swtpm")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Ok(s) if s.success() => None,
        Ok(s) => Some(format!("`swtpm --version` failed ({s})")),
        Err(e) => Some(format!(
            "swtpm is not installed ({e}); apt-get install swtpm swtpm-tools (or run .ci/run)"
        )),
    }
}

impl Swtpm {
    /// A fresh TPM (new state, so a new storage root key).
    pub fn start() -> Result<Self> {
        for _ in 0..50 {
            let port = edgeseal_test_support::free_port_pair()?;
            let state = tempfile::tempdir()?;
            let mut child = edgeseal_test_support::swtpm_command(port, state.path())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("spawning swtpm")?;
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if child.try_wait()?.is_some() {
                    break; // the port was taken meanwhile: try another pair
                }
                if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Ok(Self {
                        child,
                        port,
                        _state: state,
                    });
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        bail!("could not start swtpm on any port pair")
    }

    /// The TCTI string for `--tcti`.
    pub fn tcti(&self) -> String {
        edgeseal_test_support::swtpm_tcti(self.port)
    }
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
