//! Shared harness for the black-box tests: start the real `kms-plugin` binary on a temp
//! key store and socket, and talk to it over the real Unix socket like kube-apiserver.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod log_gate;
pub mod swtpm;

use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use kms_proto::v1beta1::key_management_service_client::KeyManagementServiceClient as V1Client;
use kms_proto::v2::key_management_service_client::KeyManagementServiceClient as V2Client;
use tempfile::TempDir;
use tonic::transport::Channel;

pub const BIN: &str = env!("CARGO_BIN_EXE_kms-plugin");

/// Runs `kms-plugin ARGS` to completion.
pub fn cli(args: &[&str]) -> Output {
    let out = Command::new(BIN)
        .args(args)
        .env_remove("RUST_LOG")
        .env("TSS2_LOG", "all+none")
        .output()
        .expect("spawn kms-plugin");
    let what = args.iter().take(2).copied().collect::<Vec<_>>().join(" ");
    log_gate::check(
        &format!("`kms-plugin {what}` stderr"),
        &String::from_utf8_lossy(&out.stderr),
    );
    log_gate::check(
        &format!("`kms-plugin {what}` stdout"),
        &String::from_utf8_lossy(&out.stdout),
    );
    out
}

/// Runs `kms-plugin ARGS`, asserts success, returns trimmed stdout.
pub fn cli_ok(args: &[&str]) -> String {
    let out = cli(args);
    assert!(
        out.status.success(),
        "kms-plugin {args:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// A free loopback TCP port (bound then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A temporary key store initialized with the insecure software backend.
pub struct Store {
    pub dir: TempDir,
}

impl Store {
    pub fn init() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let s = Self { dir };
        cli_ok(&[
            "key",
            "init",
            "--key-store",
            s.path_str(),
            "--backend",
            "insecure-software",
        ]);
        s
    }

    /// An empty directory: nothing initialized yet.
    pub fn empty() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.path().join("ks")
    }

    pub fn path_str(&self) -> &str {
        // Leaked once per store: tests are short-lived processes.
        Box::leak(self.path().to_str().unwrap().to_owned().into_boxed_str())
    }

    pub fn rotate(&self) -> String {
        cli_ok(&[
            "key",
            "rotate",
            "--key-store",
            self.path_str(),
            "--backend",
            "insecure-software",
        ])
    }

    pub fn list_json(&self) -> serde_json::Value {
        serde_json::from_str(&cli_ok(&[
            "key",
            "list",
            "--key-store",
            self.path_str(),
            "--output",
            "json",
        ]))
        .unwrap()
    }

    pub fn active_key(&self) -> String {
        self.list_json()["active_key_id"]
            .as_str()
            .unwrap()
            .to_owned()
    }
}

/// A running `kms-plugin serve`. Killed (SIGKILL) on drop if still running.
pub struct Plugin {
    pub child: Child,
    pub socket: PathBuf,
    pub http: String,
    _sock_dir: TempDir,
    stderr_path: PathBuf,
}

impl Plugin {
    /// Starts `serve` on `store` with a 1 s reload interval; waits until the socket answers.
    pub async fn start(store: &Store, extra: &[&str]) -> Self {
        Self::start_with(store.path_str(), &["--backend", "insecure-software"], extra).await
    }

    /// Starts `serve` on any key store and backend (e.g. `--backend tpm --tcti ...`).
    pub async fn start_with(key_store: &str, backend: &[&str], extra: &[&str]) -> Self {
        let sock_dir = tempfile::tempdir().unwrap();
        let socket = sock_dir.path().join("kms.sock");
        let http = format!("127.0.0.1:{}", free_port());
        let stderr_path = sock_dir.path().join("stderr.log");
        let stderr = std::fs::File::create(&stderr_path).unwrap();
        let mut args = vec!["serve", "--key-store", key_store];
        args.extend_from_slice(backend);
        args.extend_from_slice(&[
            "--socket",
            socket.to_str().unwrap(),
            "--http-addr",
            &http,
            "--reload-interval",
            "1s",
        ]);
        args.extend_from_slice(extra);
        let child = Command::new(BIN)
            .args(&args)
            .env_remove("RUST_LOG")
            .env("TSS2_LOG", "all+none")
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap();
        let mut p = Self {
            child,
            socket,
            http,
            _sock_dir: sock_dir,
            stderr_path,
        };
        p.wait_ready().await;
        p
    }

    async fn wait_ready(&mut self) {
        wait_for_socket(&mut self.child, &self.socket, &self.stderr_path).await;
    }

    /// Everything the plugin wrote to stderr so far. The plugin writes its log lines from a
    /// writer thread, a moment after the event: wait until the file has been quiet for
    /// 30 ms (at most 2 s), so a line for something that already happened is in it.
    pub fn logs(&self) -> String {
        let size = || std::fs::metadata(&self.stderr_path).map_or(0, |m| m.len());
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut last = size();
        while Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(30));
            let now = size();
            if now == last {
                break;
            }
            last = now;
        }
        let mut s = String::new();
        std::fs::File::open(&self.stderr_path)
            .unwrap()
            .read_to_string(&mut s)
            .unwrap();
        s
    }

    pub async fn v2(&self) -> V2Client<Channel> {
        V2Client::new(connect(&self.socket).await)
    }

    pub async fn v1(&self) -> V1Client<Channel> {
        V1Client::new(connect(&self.socket).await)
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        self.signal("TERM");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "plugin ignored SIGTERM:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// GET http://{http}{path}: (status, body).
    pub fn http_get(&self, path: &str) -> (u16, String) {
        let addr = self.http.parse().unwrap();
        edgeseal_test_support::http_get(addr, path)
            .unwrap_or_else(|e| panic!("GET {path} on {}: {e}", self.http))
    }
}

impl Drop for Plugin {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if !std::thread::panicking() {
            log_gate::check_file("kms-plugin serve stderr", &self.stderr_path);
        }
    }
}

/// A gRPC channel over a Unix socket, as kube-apiserver dials `unix://PATH`.
pub async fn connect(path: &Path) -> Channel {
    edgeseal_test_support::connect_unix(path).await.unwrap()
}

/// One Encrypt result and its seed, kept to decrypt again later.
#[derive(Clone, Debug)]
pub struct Sample {
    pub key_id: String,
    pub ciphertext: Vec<u8>,
    pub annotations: std::collections::HashMap<String, Vec<u8>>,
    pub seed: Vec<u8>,
}

/// Encrypts a fresh random 32-byte seed.
pub async fn encrypt_sample(c: &mut V2Client<Channel>, uid: &str) -> Sample {
    let seed = rand::random::<[u8; 32]>().to_vec();
    log_gate::watch_bytes("a DEK seed (Encrypt plaintext)", &seed);
    let enc = c
        .encrypt(kms_proto::v2::EncryptRequest {
            plaintext: seed.clone(),
            uid: uid.to_owned(),
        })
        .await
        .unwrap_or_else(|e| panic!("encrypt {uid}: {e:?}"))
        .into_inner();
    assert!(!enc.key_id.is_empty());
    Sample {
        key_id: enc.key_id,
        ciphertext: enc.ciphertext,
        annotations: enc.annotations,
        seed,
    }
}

/// Decrypts a sample as the apiserver would (stored key_id and annotations).
pub async fn decrypt_sample(
    c: &mut V2Client<Channel>,
    s: &Sample,
    uid: &str,
) -> Result<Vec<u8>, tonic::Status> {
    c.decrypt(kms_proto::v2::DecryptRequest {
        ciphertext: s.ciphertext.clone(),
        uid: uid.to_owned(),
        key_id: s.key_id.clone(),
        annotations: s.annotations.clone(),
    })
    .await
    .map(|r| r.into_inner().plaintext)
}

/// Decrypts every sample and checks its seed; `when` names the moment in failures.
pub async fn assert_all_decrypt(c: &mut V2Client<Channel>, samples: &[Sample], when: &str) {
    for (i, s) in samples.iter().enumerate() {
        let pt = decrypt_sample(c, s, &format!("check-{i}"))
            .await
            .unwrap_or_else(|e| panic!("{when}: sample {i} under {}: {e:?}", s.key_id));
        assert_eq!(pt, s.seed, "{when}: sample {i} decrypted to the wrong seed");
    }
}

/// Polls Status until its key id is `want` (a rotation reached the plugin); returns that
/// Status response.
pub async fn wait_key_id(
    c: &mut V2Client<Channel>,
    want: &str,
    within: Duration,
) -> kms_proto::v2::StatusResponse {
    let deadline = Instant::now() + within;
    loop {
        let st = c
            .status(kms_proto::v2::StatusRequest {})
            .await
            .unwrap()
            .into_inner();
        if st.key_id == want {
            return st;
        }
        assert!(
            Instant::now() < deadline,
            "Status still reports {}, expected {want} after {within:?}",
            st.key_id
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until a spawned `serve` accepts connections on `socket`; panics with its log
/// (`log`) if it exits first or takes more than 20 s.
pub async fn wait_for_socket(child: &mut Child, socket: &Path, log: &Path) {
    let logs = || std::fs::read_to_string(log).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("kms-plugin serve exited early ({status}):\n{}", logs());
        }
        if socket.exists() && tokio::net::UnixStream::connect(socket).await.is_ok() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "serve not ready in 20s:\n{}",
            logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
