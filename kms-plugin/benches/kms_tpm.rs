//! TPM benchmark on a software TPM (swtpm): plugin start to first `healthz: ok` with 1 and
//! 10 keys, the time of one `key rotate`, and Encrypt/Decrypt latency with the TPM backend
//! next to the software backend (the TPM must be off the request path).
//!
//! `cargo bench -p kms-plugin --bench kms_tpm` (needs swtpm; `.ci/run` installs it).
//! Prints a markdown report; `--quick` for a short run.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use kms_proto::v2::key_management_service_client::KeyManagementServiceClient;
use kms_proto::v2::{DecryptRequest, EncryptRequest, StatusRequest};
use tonic::transport::{Channel, Endpoint, Uri};

const BIN: &str = env!("CARGO_BIN_EXE_kms-plugin");

struct Swtpm {
    child: Child,
    port: u16,
    _state: tempfile::TempDir,
}

impl Swtpm {
    fn start() -> Self {
        loop {
            let port = TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            if TcpListener::bind(("127.0.0.1", port + 1)).is_err() {
                continue;
            }
            let state = tempfile::tempdir().unwrap();
            let child = Command::new("swtpm")
                .args([
                    "socket",
                    "--tpm2",
                    "--server",
                    &format!("type=tcp,port={port},bindaddr=127.0.0.1"),
                    "--ctrl",
                    &format!("type=tcp,port={},bindaddr=127.0.0.1", port + 1),
                    "--tpmstate",
                    &format!("dir={}", state.path().display()),
                    "--flags",
                    "not-need-init,startup-clear",
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("swtpm is not installed (apt-get install swtpm swtpm-tools)");
            let t = Self {
                child,
                port,
                _state: state,
            };
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return t;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }

    fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn cli(args: &[&str], backend: &[String]) -> Duration {
    let t = Instant::now();
    let out = Command::new(BIN)
        .args(args)
        .args(backend)
        .env("TSS2_LOG", "all+none")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    t.elapsed()
}

struct Serve {
    child: Child,
    socket: PathBuf,
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(ks: &Path, backend: &[String], dir: &Path) -> Serve {
    let socket = dir.join(format!("kms-{}.sock", rand::random::<u32>()));
    let child = Command::new(BIN)
        .args([
            "serve",
            "--key-store",
            ks.to_str().unwrap(),
            "--socket",
            socket.to_str().unwrap(),
        ])
        .args(["--http-addr", "off", "--log-level", "warn"])
        .args(backend)
        .env("TSS2_LOG", "all+none")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    Serve { child, socket }
}

async fn connect(path: &Path) -> Option<KeyManagementServiceClient<Channel>> {
    let path = path.to_owned();
    let ch = Endpoint::try_from("http://kms.local")
        .ok()?
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        }))
        .await
        .ok()?;
    Some(KeyManagementServiceClient::new(ch))
}

/// Spawn to the first Status that answers healthz "ok".
async fn start_to_healthy(ks: &Path, backend: &[String], dir: &Path) -> (Duration, Serve) {
    let t = Instant::now();
    let s = serve(ks, backend, dir);
    loop {
        if let Some(mut c) = connect(&s.socket).await
            && c.status(StatusRequest {})
                .await
                .is_ok_and(|r| r.get_ref().healthz == "ok")
        {
            return (t.elapsed(), s);
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "plugin did not become healthy"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

/// p50 of Encrypt and of Decrypt over `n` sequential calls each.
async fn latency(c: &mut KeyManagementServiceClient<Channel>, n: usize) -> (Duration, Duration) {
    let (mut enc, mut dec) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for i in 0..n {
        let seed = vec![(i % 251) as u8; 32];
        let t = Instant::now();
        let r = c
            .encrypt(EncryptRequest {
                plaintext: seed.clone(),
                uid: i.to_string(),
            })
            .await
            .unwrap()
            .into_inner();
        enc.push(t.elapsed());
        let t = Instant::now();
        let d = c
            .decrypt(DecryptRequest {
                ciphertext: r.ciphertext,
                uid: i.to_string(),
                key_id: r.key_id,
                annotations: r.annotations,
            })
            .await
            .unwrap()
            .into_inner();
        dec.push(t.elapsed());
        assert_eq!(d.plaintext, seed);
    }
    (median(enc), median(dec))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let quick = std::env::args().any(|a| a == "--quick")
        || std::env::var("KMS_BENCH_QUICK").is_ok_and(|v| v == "1");
    let (starts, rotations, calls, rounds) = if quick {
        (3, 3, 300, 2)
    } else {
        (9, 15, 2000, 5)
    };
    let dir = tempfile::tempdir().unwrap();
    let tpm = Swtpm::start();
    let tpm_args = vec![
        "--backend".to_owned(),
        "tpm".to_owned(),
        "--tcti".to_owned(),
        tpm.tcti(),
    ];
    let sw_args = vec!["--backend".to_owned(), "insecure-software".to_owned()];
    let ks_tpm = dir.path().join("ks-tpm");
    let ks_sw = dir.path().join("ks-sw");
    cli(
        &["key", "init", "--key-store", ks_tpm.to_str().unwrap()],
        &tpm_args,
    );
    cli(
        &["key", "init", "--key-store", ks_sw.to_str().unwrap()],
        &sw_args,
    );

    println!(
        "## kms-plugin on a software TPM (swtpm){}\n",
        if quick { " (quick)" } else { "" }
    );
    println!("| measurement | median | samples |\n|---|---:|---:|");
    let mut one = Vec::new();
    for _ in 0..starts {
        one.push(start_to_healthy(&ks_tpm, &tpm_args, dir.path()).await.0);
    }
    println!(
        "| start to first `healthz: ok`, 1 key (ms) | {} | {starts} |",
        ms(median(one))
    );
    let mut rot = Vec::new();
    for _ in 0..rotations {
        rot.push(cli(
            &["key", "rotate", "--key-store", ks_tpm.to_str().unwrap()],
            &tpm_args,
        ));
    }
    println!(
        "| `key rotate` CLI, whole process (ms) | {} | {rotations} |",
        ms(median(rot))
    );
    // Up to 10 keys in the ring: the first start unseals every one of them.
    let keys = 1 + rotations;
    if keys < 10 {
        for _ in keys..10 {
            cli(
                &["key", "rotate", "--key-store", ks_tpm.to_str().unwrap()],
                &tpm_args,
            );
        }
    }
    let list = Command::new(BIN)
        .args([
            "key",
            "list",
            "--key-store",
            ks_tpm.to_str().unwrap(),
            "-o",
            "json",
        ])
        .output()
        .unwrap();
    let json: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    let ring = json["keys"].as_array().unwrap().len();
    let mut many = Vec::new();
    for _ in 0..starts {
        many.push(start_to_healthy(&ks_tpm, &tpm_args, dir.path()).await.0);
    }
    println!(
        "| start to first `healthz: ok`, {ring} keys (ms) | {} | {starts} |",
        ms(median(many))
    );

    // Encrypt/Decrypt on both backends, interleaved rounds on one machine.
    let (_, s_tpm) = start_to_healthy(&ks_tpm, &tpm_args, dir.path()).await;
    let (_, s_sw) = start_to_healthy(&ks_sw, &sw_args, dir.path()).await;
    let mut c_tpm = connect(&s_tpm.socket).await.unwrap();
    let mut c_sw = connect(&s_sw.socket).await.unwrap();
    let _ = latency(&mut c_tpm, calls / 10).await;
    let _ = latency(&mut c_sw, calls / 10).await;
    let (mut et, mut dt, mut es, mut ds) = (vec![], vec![], vec![], vec![]);
    for _ in 0..rounds {
        let (e, d) = latency(&mut c_tpm, calls).await;
        et.push(e);
        dt.push(d);
        let (e, d) = latency(&mut c_sw, calls).await;
        es.push(e);
        ds.push(d);
    }
    let (et, dt, es, ds) = (median(et), median(dt), median(es), median(ds));
    let us = |d: Duration| format!("{:.1}", d.as_secs_f64() * 1e6);
    println!(
        "\n| op, concurrency 1 | tpm backend p50 µs | software backend p50 µs | tpm / software |\n|---|---:|---:|---:|"
    );
    println!(
        "| Encrypt | {} | {} | {:.2} |",
        us(et),
        us(es),
        et.as_secs_f64() / es.as_secs_f64()
    );
    println!(
        "| Decrypt | {} | {} | {:.2} |",
        us(dt),
        us(ds),
        dt.as_secs_f64() / ds.as_secs_f64()
    );
    println!(
        "\n({calls} sequential calls per round, median of {rounds} interleaved rounds; the TPM is used only at start and rotation)"
    );
}
