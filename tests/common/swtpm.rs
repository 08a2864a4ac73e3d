//! A real software TPM per test: `swtpm` on free loopback ports, its own state directory,
//! killed on drop. Tests run in parallel, each with its own.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

pub struct Swtpm {
    child: Option<Child>,
    pub port: u16,
    state: TempDir,
}

impl Swtpm {
    /// Starts a fresh TPM (new state: a new storage root key).
    pub fn start() -> Self {
        for _ in 0..50 {
            let port = free_port_pair();
            let state = tempfile::tempdir().unwrap();
            let mut t = Self { child: None, port, state };
            if t.spawn() {
                return t;
            }
        }
        panic!("could not start swtpm on any port pair");
    }

    /// The TCTI string for `--tcti`.
    pub fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }

    pub fn state_dir(&self) -> PathBuf {
        self.state.path().to_owned()
    }

    fn spawn(&mut self) -> bool {
        let child = Command::new("swtpm")
            .args([
                "socket",
                "--tpm2",
                "--server",
                &format!("type=tcp,port={},bindaddr=127.0.0.1", self.port),
                "--ctrl",
                &format!("type=tcp,port={},bindaddr=127.0.0.1", self.port + 1),
                "--tpmstate",
                &format!("dir={}", self.state.path().display()),
                "--flags",
                "not-need-init,startup-clear",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("swtpm is not installed: apt-get install swtpm swtpm-tools (or run .ci/run)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(c) = self.child.as_mut() {
                if c.try_wait().unwrap().is_some() {
                    self.child = None;
                    return false; // port taken meanwhile: try another
                }
            }
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        self.kill();
        false
    }

    /// Kills the TPM (SIGKILL), as a crash or a pulled device would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port and state (persistent objects survive; transient
    /// ones and sessions do not, as after a reboot).
    pub fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.spawn() {
            assert!(Instant::now() < deadline, "swtpm did not restart on port {}", self.port);
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Extends a sha256 PCR (as a firmware or bootloader update would change it).
    pub fn pcr_extend(&self, pcr: u32) {
        let st = Command::new("tpm2_pcrextend")
            .env("TSS2_LOG", "all+none")
            .args(["-T", &self.tcti(), &format!("{pcr}:sha256={}", "ab".repeat(32))])
            .status()
            .expect("tpm2-tools is not installed: apt-get install tpm2-tools");
        assert!(st.success(), "tpm2_pcrextend failed");
    }

    /// Number of transient objects loaded in the TPM right now (should be 0 between calls).
    pub fn transient_handles(&self) -> usize {
        let out = Command::new("tpm2_getcap")
            .env("TSS2_LOG", "all+none")
            .args(["-T", &self.tcti(), "handles-transient"])
            .output()
            .expect("tpm2_getcap");
        assert!(out.status.success(), "tpm2_getcap failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.trim_start().starts_with("- 0x")).count()
    }
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        self.kill();
    }
}

fn free_port_pair() -> u16 {
    loop {
        let a = TcpListener::bind("127.0.0.1:0").unwrap();
        let p = a.local_addr().unwrap().port();
        if p < 65535 && TcpListener::bind(("127.0.0.1", p + 1)).is_ok() {
            return p;
        }
    }
}
