//! Shared by the black-box tests (`tests/common`), the benchmark report (`tests/bench`)
//! and the soak (`tests/soak`): how to run a software TPM, how to dial the plugin, and
//! the HTTP/2 frame layout the hand-made HTTP/2 tests write.
//! Each caller keeps its own lifecycle (retries, restarts, error style); only the facts
//! that must not drift apart live here.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};

/// Two consecutive free loopback ports (swtpm's server port and, above it, its control
/// port). Bound then released, so a caller must be ready to retry if one is taken meanwhile.
pub fn free_port_pair() -> std::io::Result<u16> {
    for _ in 0..100 {
        let a = TcpListener::bind("127.0.0.1:0")?;
        let p = a.local_addr()?.port();
        if p < 65535 && TcpListener::bind(("127.0.0.1", p + 1)).is_ok() {
            return Ok(p);
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AddrInUse,
        "no free pair of loopback ports",
    ))
}

/// `swtpm socket` serving TPM 2.0 on `port` (control on `port + 1`), loopback only, with
/// its state in `state`, already started up (no `tpm2_startup` needed). The caller sets
/// stdio and spawns it.
pub fn swtpm_command(port: u16, state: &Path) -> Command {
    let mut cmd = Command::new("swtpm");
    cmd.args([
        "socket",
        "--tpm2",
        "--server",
        &format!("type=tcp,port={port},bindaddr=127.0.0.1"),
        "--ctrl",
        &format!("type=tcp,port={},bindaddr=127.0.0.1", port + 1),
        "--tpmstate",
        &format!("dir={}", state.display()),
        "--flags",
        "not-need-init,startup-clear",
    ]);
    cmd
}

/// The `--tcti` value for a TPM started by [`swtpm_command`] on `port`.
pub fn swtpm_tcti(port: u16) -> String {
    format!("swtpm:host=127.0.0.1,port={port}")
}

/// A gRPC channel to the plugin's Unix socket, as kube-apiserver dials `unix://PATH`: one
/// HTTP/2 connection carrying every call.
pub async fn connect_unix(path: &Path) -> Result<Channel, tonic::transport::Error> {
    let path = path.to_owned();
    Endpoint::from_static("http://kms.local")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        }))
        .await
}

/// A minimal HTTP/1.1 GET of the plain-HTTP probes on loopback (`/healthz`, `/readyz`,
/// `/metrics` of either binary): (status, body). Blocking, with short timeouts.
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let status = raw
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {raw:?}")))?;
    let body = raw
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// One HTTP/2 frame (RFC 9113 §4.1): 24-bit length, type, flags, stream id, payload.
pub fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(9 + payload.len());
    v.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
    v.extend_from_slice(&[kind, flags]);
    v.extend_from_slice(&stream.to_be_bytes());
    v.extend_from_slice(payload);
    v
}
