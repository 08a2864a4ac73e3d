//! A real software TPM per test: `swtpm` on free loopback ports, its own state directory,
//! killed on drop. Tests run in parallel, each with its own.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kms_plugin::backend::tpm::blob::TpmBlob;
use kms_proto::v2::key_management_service_client::KeyManagementServiceClient;
use kms_proto::v2::{DecryptRequest, EncryptRequest, EncryptResponse, StatusRequest};
use tempfile::TempDir;
use tonic::transport::Channel;

use super::{Plugin, cli, cli_ok};

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
            let mut t = Self {
                child: None,
                port,
                state,
            };
            if t.spawn() {
                return t;
            }
        }
        panic!("could not start swtpm on any port pair");
    }

    /// The TCTI string for `--tcti`.
    pub fn tcti(&self) -> String {
        edgeseal_test_support::swtpm_tcti(self.port)
    }

    pub fn state_dir(&self) -> PathBuf {
        self.state.path().to_owned()
    }

    fn spawn(&mut self) -> bool {
        let child = edgeseal_test_support::swtpm_command(self.port, self.state.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("swtpm is not installed: apt-get install swtpm swtpm-tools (or run .ci/run)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let exited = self
                .child
                .as_mut()
                .is_some_and(|c| c.try_wait().unwrap().is_some());
            if exited {
                self.child = None;
                return false; // port taken meanwhile: try another
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
    ///
    /// swtpm binds without SO_REUSEADDR, so when the killed instance left connections in
    /// TIME_WAIT (a client had one open), the port stays taken for up to 60 s (Linux's
    /// fixed TIME_WAIT): wait that long rather than fail.
    pub fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + Duration::from_secs(75);
        while !self.spawn() {
            assert!(
                Instant::now() < deadline,
                "swtpm did not restart on port {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Extends a sha256 PCR (as a firmware or bootloader update would change it).
    pub fn pcr_extend(&self, pcr: u32) {
        let st = Command::new("tpm2_pcrextend")
            .env("TSS2_LOG", "all+none")
            .args([
                "-T",
                &self.tcti(),
                &format!("{pcr}:sha256={}", "ab".repeat(32)),
            ])
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
        assert!(
            out.status.success(),
            "tpm2_getcap failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.trim_start().starts_with("- 0x"))
            .count()
    }
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        self.kill();
    }
}

fn free_port_pair() -> u16 {
    edgeseal_test_support::free_port_pair().unwrap()
}

// ---- Node harness for multi-step TPM scenarios (recovery, enrolment, clusters) ----------

impl Swtpm {
    /// Clears the owner hierarchy (`tpm2_clear`): a new storage seed, the persistent SRK
    /// evicted; what "Clear TPM" in the firmware setup does.
    pub fn clear(&self) {
        let st = Command::new("tpm2_clear")
            .env("TSS2_LOG", "all+none")
            .args(["-T", &self.tcti(), "-c", "p"])
            .status()
            .expect("tpm2-tools is not installed: apt-get install tpm2-tools");
        assert!(st.success(), "tpm2_clear failed");
    }
}

pub type V2 = KeyManagementServiceClient<Channel>;

/// Extra `serve` flags for plugins started by [`TpmNode::serve`]: a short drain keeps
/// stops fast.
pub const SERVE_EXTRA: &[&str] = &["--drain-timeout", "1s"];

/// One node: its own swtpm and key store directory.
pub struct TpmNode {
    pub tpm: Swtpm,
    pub dir: TempDir,
    pub ks: String,
    /// Backend flags: `--backend tpm --tcti ...` plus any extra (e.g. `--pcr-policy`).
    pub backend: Vec<String>,
}

impl TpmNode {
    /// A fresh swtpm and an empty key store directory.
    pub fn new(extra_backend: &[&str]) -> Self {
        let tpm = Swtpm::start();
        let dir = tempfile::tempdir().unwrap();
        let ks = dir.path().join("ks").to_str().unwrap().to_owned();
        let mut backend = vec![
            "--backend".to_owned(),
            "tpm".to_owned(),
            "--tcti".to_owned(),
            tpm.tcti(),
        ];
        backend.extend(extra_backend.iter().map(|s| (*s).to_owned()));
        Self {
            tpm,
            dir,
            ks,
            backend,
        }
    }

    /// A path in this node's temp directory (for bundles, public files...).
    pub fn file(&self, name: &str) -> String {
        self.dir.path().join(name).to_str().unwrap().to_owned()
    }

    /// `BASE --key-store KS <backend flags> EXTRA`.
    pub fn argv(&self, base: &[&str], extra: &[&str]) -> Vec<String> {
        let mut v: Vec<String> = base.iter().map(|s| (*s).to_owned()).collect();
        v.extend(["--key-store".to_owned(), self.ks.clone()]);
        v.extend(self.backend.iter().cloned());
        v.extend(extra.iter().map(|s| (*s).to_owned()));
        v
    }

    /// Runs a store command (with backend flags) that must succeed; trimmed stdout.
    pub fn ok(&self, base: &[&str], extra: &[&str]) -> String {
        let v = self.argv(base, extra);
        cli_ok(&v.iter().map(String::as_str).collect::<Vec<_>>())
    }

    /// Runs a store command (with backend flags) that must fail; its stderr.
    pub fn fails(&self, base: &[&str], extra: &[&str]) -> String {
        let v = self.argv(base, extra);
        let out = cli(&v.iter().map(String::as_str).collect::<Vec<_>>());
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            !out.status.success(),
            "kms-plugin {v:?} succeeded but should have failed:\n{err}"
        );
        err
    }

    /// `key promote ID` (a manifest-only command: no backend flags).
    pub fn promote(&self, id: &str) {
        cli_ok(&["key", "promote", id, "--key-store", &self.ks]);
    }

    /// `key list --output json`.
    pub fn list(&self) -> serde_json::Value {
        serde_json::from_str(&cli_ok(&[
            "key",
            "list",
            "--key-store",
            &self.ks,
            "--output",
            "json",
        ]))
        .unwrap()
    }

    pub fn manifest_path(&self) -> PathBuf {
        Path::new(&self.ks).join("manifest.json")
    }

    pub fn manifest_bytes(&self) -> Vec<u8> {
        std::fs::read(self.manifest_path()).unwrap()
    }

    pub fn backend_strs(&self) -> Vec<&str> {
        self.backend.iter().map(String::as_str).collect()
    }

    /// `serve` on this node (reload interval 1 s), ready.
    pub async fn serve(&self) -> Plugin {
        Plugin::start_with(&self.ks, &self.backend_strs(), SERVE_EXTRA).await
    }

    /// `serve` must refuse to start (it fails before binding); returns its stderr.
    pub fn serve_refuses(&self) -> String {
        let sock = self.dir.path().join("refused.sock");
        let log = self.dir.path().join("refused.log");
        let v = self.argv(
            &["serve"],
            &["--socket", sock.to_str().unwrap(), "--http-addr", "off"],
        );
        let mut child = Command::new(super::BIN)
            .args(&v)
            .env_remove("RUST_LOG")
            .env("TSS2_LOG", "all+none")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "serve kept running but should have refused:\n{}",
                    std::fs::read_to_string(&log).unwrap()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let err = std::fs::read_to_string(&log).unwrap();
        super::log_gate::check("refused kms-plugin serve stderr", &err);
        assert!(
            !status.success(),
            "serve exited 0 but should have refused:\n{err}"
        );
        err
    }
}

/// A 3072-bit RSA recovery key pair made with openssl: (private PEM, public PEM) paths.
pub fn recovery_keypair(dir: &Path) -> (String, String) {
    let key = dir.join("rec.key");
    let public = dir.join("rec.pub");
    let st = Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:3072",
            "-out",
        ])
        .arg(&key)
        .stderr(Stdio::null())
        .status()
        .expect("openssl is not installed");
    assert!(st.success(), "openssl genpkey failed");
    let st = Command::new("openssl")
        .args(["pkey", "-pubout", "-in"])
        .arg(&key)
        .arg("-out")
        .arg(&public)
        .status()
        .unwrap();
    assert!(st.success(), "openssl pkey -pubout failed");
    (
        key.to_str().unwrap().to_owned(),
        public.to_str().unwrap().to_owned(),
    )
}

/// The sealed blob of every key in a manifest, decoded: (key id, blob).
pub fn sealed_blobs(manifest: &[u8]) -> Vec<(String, TpmBlob)> {
    use base64::Engine;
    let m: serde_json::Value = serde_json::from_slice(manifest).unwrap();
    m["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| {
            let raw = base64::engine::general_purpose::STANDARD
                .decode(k["sealed"].as_str().unwrap())
                .unwrap();
            (
                k["id"].as_str().unwrap().to_owned(),
                TpmBlob::decode(&raw).unwrap(),
            )
        })
        .collect()
}

pub async fn encrypt(c: &mut V2, plaintext: &[u8]) -> EncryptResponse {
    super::log_gate::watch_bytes("an Encrypt plaintext", plaintext);
    c.encrypt(EncryptRequest {
        plaintext: plaintext.to_vec(),
        uid: "enc".into(),
    })
    .await
    .unwrap()
    .into_inner()
}

pub async fn decrypt(c: &mut V2, e: &EncryptResponse) -> Result<Vec<u8>, tonic::Status> {
    c.decrypt(DecryptRequest {
        ciphertext: e.ciphertext.clone(),
        uid: "dec".into(),
        key_id: e.key_id.clone(),
        annotations: e.annotations.clone(),
    })
    .await
    .map(|r| r.into_inner().plaintext)
}

/// Status's key_id, asserting healthz "ok".
pub async fn status_key_id(c: &mut V2) -> String {
    let st = c.status(StatusRequest {}).await.unwrap().into_inner();
    assert_eq!(st.healthz, "ok");
    st.key_id
}

/// Polls Status until it reports `want`, then asserts healthz "ok".
pub async fn wait_key_id(c: &mut V2, want: &str, within: Duration) {
    let st = super::wait_key_id(c, want, within).await;
    assert_eq!(st.healthz, "ok");
}

/// Polls `GET path` until `pred(status, body)` holds; returns that body.
pub async fn wait_http(
    p: &Plugin,
    path: &str,
    within: Duration,
    pred: impl Fn(u16, &str) -> bool,
) -> String {
    let deadline = Instant::now() + within;
    loop {
        let (code, body) = p.http_get(path);
        if pred(code, &body) {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "GET {path} did not reach the expected state in {within:?}: {code}\n{body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
