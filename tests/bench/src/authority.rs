//! The Unix-socket authority layer alone (`kms_plugin::server::authority::Rewriter`), in
//! this process, on the bytes real clients write: the client-to-server half of a
//! connection is recorded through a proxy in front of the bare floor (behind the layer),
//! then fed through a fresh layer in 16 KiB reads, several times.
//!
//! * tonic (this bench's client, `:authority` valid): the first header block is decoded,
//!   then everything passes unchanged.
//! * grpc-go 1.33 dialled as older kube-apiservers dial (`tests/interop/go`; the socket
//!   path as `:authority`): every block is decoded and re-encoded. Needs Go (the README's
//!   prerequisites); not measured without it.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use kms_plugin::server::authority::Rewriter;
use kms_proto::v2::EncryptRequest;
use kms_proto::v2::key_management_service_client::KeyManagementServiceClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const RUNS: usize = 7;
const TONIC_REQUESTS: usize = 2000;
const GO_ROUND_TRIPS: usize = 1000;

#[derive(Debug, Clone)]
pub struct Capture {
    pub client: String,
    pub requests: usize,
    pub bytes_per_request: f64,
    /// Median time per request through the layer, in ns.
    pub ns_per_request: f64,
    pub rewritten: u64,
}

#[derive(Debug, Clone)]
pub struct LayerCost {
    pub captures: Vec<Capture>,
    /// Why a client was not measured.
    pub missing: Vec<String>,
}

/// Accepts one connection on `listen`, forwards it to `upstream` both ways, and returns
/// what the client sent once it closes.
async fn record_one(listen: tokio::net::UnixListener, upstream: PathBuf) -> Result<Vec<u8>> {
    let (client, _) = listen.accept().await?;
    let server = tokio::net::UnixStream::connect(&upstream).await?;
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let back = tokio::spawn(async move {
        let _ = tokio::io::copy(&mut sr, &mut cw).await;
        let _ = cw.shutdown().await;
    });
    let mut recorded = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = cr.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        recorded.extend_from_slice(&buf[..n]);
        sw.write_all(&buf[..n]).await?;
    }
    let _ = sw.shutdown().await;
    let _ = tokio::time::timeout(Duration::from_secs(5), back).await;
    Ok(recorded)
}

/// Client HEADERS frames in a recorded stream: one per request.
fn requests_in(stream: &[u8]) -> usize {
    let mut rest = stream.get(24..).unwrap_or_default();
    let mut n = 0;
    while rest.len() >= 9 {
        let len = (usize::from(rest[0]) << 16) | (usize::from(rest[1]) << 8) | usize::from(rest[2]);
        if rest[3] == 0x1 {
            n += 1;
        }
        rest = rest.get(9 + len..).unwrap_or_default();
    }
    n
}

fn time(client: &str, stream: &[u8]) -> Result<Capture> {
    let requests = requests_in(stream).max(1);
    let mut samples = Vec::with_capacity(RUNS);
    let mut rewritten = 0;
    for _ in 0..RUNS {
        let mut r = Rewriter::new();
        let t = Instant::now();
        for chunk in stream.chunks(16 * 1024) {
            r.feed(chunk)
                .with_context(|| format!("the layer refused the {client} stream"))?;
            r.output().clear();
        }
        samples.push(t.elapsed().as_nanos() as f64 / requests as f64);
        rewritten = r.rewritten();
    }
    Ok(Capture {
        client: client.to_owned(),
        requests,
        bytes_per_request: stream.len() as f64 / requests as f64,
        ns_per_request: crate::stats::median(&samples),
        rewritten,
    })
}

async fn tonic_stream(dir: &Path, upstream: &Path) -> Result<Vec<u8>> {
    let proxy = dir.join("record-tonic.sock");
    let recorder = tokio::spawn(record_one(
        tokio::net::UnixListener::bind(&proxy)?,
        upstream.to_owned(),
    ));
    let mut c = KeyManagementServiceClient::new(crate::plugin::connect(&proxy).await?);
    for i in 0..TONIC_REQUESTS {
        c.encrypt(EncryptRequest {
            plaintext: vec![7; 32],
            uid: format!("0f0e0d0c-0b0a-0908-0706-{i:012}"),
        })
        .await?;
    }
    drop(c);
    tokio::time::timeout(Duration::from_secs(10), recorder)
        .await
        .context("the tonic client did not close its connection")??
}

async fn go_stream(dir: &Path, upstream: &Path) -> Result<Vec<u8>> {
    let root = crate::binaries::workspace_root();
    let bin = dir.join("kmsclient");
    let build = tokio::process::Command::new(root.join("tests/interop/go/build"))
        .arg(&bin)
        .output()
        .await
        .context("running tests/interop/go/build")?;
    if !build.status.success() {
        bail!(
            "the Go client did not build (Go and grpc-go are in the README's prerequisites): {}",
            String::from_utf8_lossy(&build.stderr).trim()
        );
    }
    let proxy = dir.join("record-go.sock");
    let recorder = tokio::spawn(record_one(
        tokio::net::UnixListener::bind(&proxy)?,
        upstream.to_owned(),
    ));
    let out = tokio::process::Command::new(&bin)
        .arg("-socket")
        .arg(&proxy)
        .args(["-authority", "path", "-checks", "v2", "-rounds"])
        .arg(GO_ROUND_TRIPS.to_string())
        .output()
        .await?;
    // The exit status is not checked: the bare floor accepts any ciphertext, so the
    // client's last check (a tampered ciphertext must be refused) fails after the round
    // trips, which are what is recorded.
    let _ = out;
    tokio::time::timeout(Duration::from_secs(10), recorder)
        .await
        .context("the Go client did not close its connection")??
}

/// Records both clients against `upstream` (the bare floor behind the layer, which serves
/// the path authority) and times the layer on them.
pub async fn measure(dir: &Path, upstream: &Path) -> LayerCost {
    let mut cost = LayerCost {
        captures: Vec::new(),
        missing: Vec::new(),
    };
    let tonic = tonic_stream(dir, upstream).await.and_then(|s| {
        time(
            "tonic 0.14 (`:authority` valid: first block decoded, the rest passed)",
            &s,
        )
    });
    let go = go_stream(dir, upstream).await.and_then(|s| {
        time(
            "grpc-go 1.33, socket path as `:authority` (every block re-encoded)",
            &s,
        )
    });
    for r in [tonic, go] {
        match r {
            Ok(c) => cost.captures.push(c),
            Err(e) => cost.missing.push(format!("{e:#}")),
        }
    }
    cost
}
