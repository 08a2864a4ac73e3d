//! KMS clients this project did not write, against the real binary on the real socket:
//! grpc-go (Debian's golang-google-grpc-dev, 1.33) dialled exactly as kube-apiserver's
//! KMS v2 and v1 clients dial, with each `:authority` apiservers send, and Python's grpcio
//! with its default authority. Plus hand-made HTTP/2 for what neither client can send (an
//! empty or missing authority, malformed header blocks).
//!
//! Needs `apt-get install golang-go golang-google-grpc-dev protobuf-compiler
//! golang-goprotobuf-dev` and `pip install -r tests/requirements.txt` (`.ci/run` does both).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use common::swtpm::TpmNode;
use common::{Plugin, Store};
use prost::Message as _;
use serde_json::Value;

const REPO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

/// The Go client, built once per test binary (a few seconds with a warm Go cache).
fn go_client() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("interop/kmsclient");
        let build = Command::new(format!("{REPO}/tests/interop/go/build"))
            .arg(&out)
            .output()
            .expect("running tests/interop/go/build");
        assert!(
            build.status.success(),
            "building the Go KMS client failed (apt-get install golang-go golang-google-grpc-dev \
             protobuf-compiler golang-goprotobuf-dev):\n{}{}",
            String::from_utf8_lossy(&build.stdout),
            String::from_utf8_lossy(&build.stderr)
        );
        out
    })
}

/// Runs a client command; its JSON summary line, or a panic with its stderr and the
/// plugin's log.
fn summary(cmd: &mut Command, plugin: &Plugin) -> Value {
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{stdout}{}\nplugin log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        plugin.logs()
    );
    serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("{cmd:?} printed no JSON summary ({e}):\n{stdout}"))
}

fn go(plugin: &Plugin, authority: &str, checks: &str, extra: &[&str]) -> Value {
    let mut cmd = Command::new(go_client());
    cmd.arg("-socket")
        .arg(&plugin.socket)
        .args(["-authority", authority, "-checks", checks])
        .args(extra);
    summary(&mut cmd, plugin)
}

fn python(plugin: &Plugin, authority: Option<&str>, checks: &str) -> Value {
    let mut cmd = Command::new("python3");
    cmd.arg(format!("{REPO}/tests/interop/python/kms_client.py"))
        .arg("--socket")
        .arg(&plugin.socket)
        .args(["--checks", checks]);
    if let Some(a) = authority {
        cmd.args(["--authority", a]);
    }
    summary(&mut cmd, plugin)
}

/// The plugin's debug lines that say a connection's authority was replaced.
fn replaced_authorities(plugin: &Plugin) -> Vec<String> {
    plugin
        .logs()
        .lines()
        .filter(|l| l.contains("serving it as localhost"))
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn go_client_dialled_as_kube_apiserver_with_each_authority() {
    let store = Store::init();
    let plugin = Plugin::start(&store, &["--log-level", "debug"]).await;
    let key = store.active_key();
    let socket = plugin.socket.to_str().unwrap().to_owned();
    let escaped = socket.replace('/', "%2F");
    for (mode, sent) in [
        ("path", socket.as_str()),
        ("escaped", escaped.as_str()),
        ("localhost", "localhost"),
    ] {
        let s = go(&plugin, mode, "health,v2,v1beta1", &[]);
        assert_eq!(s["authority"], sent, "{mode}");
        assert_eq!(s["grpc_go_version"], "1.33.3");
        assert_eq!(s["health"], "SERVING", "{mode}");
        assert_eq!(s["key_id"], key.as_str(), "{mode}");
        assert_eq!(s["status_version"], "v2", "{mode}");
        assert_eq!(s["round_trips"], 200, "{mode}");
        assert_eq!(s["v1beta1_round_trips"], 20, "{mode}");
    }
    // The two path forms went through the rewrite (so h2 alone would have refused them);
    // localhost did not need it.
    let replaced = replaced_authorities(&plugin);
    assert_eq!(replaced.len(), 2, "{replaced:#?}");
    assert!(replaced[0].contains(&socket), "{}", replaced[0]);
    assert!(replaced[1].contains(&escaped), "{}", replaced[1]);
    assert!(!plugin.logs().contains("closing a KMS socket connection"));
}

#[tokio::test]
async fn go_client_across_rotations_and_a_restart() {
    let store = Store::init();
    let saved = store.dir.path().join("samples");
    let mut keys = vec![store.active_key()];
    let mut plugin = Plugin::start(&store, &[]).await;
    for round in 0..3u32 {
        let file = saved.with_extension(round.to_string());
        let mut extra = vec!["-save", file.to_str().unwrap()];
        let previous = round
            .checked_sub(1)
            .map(|r| saved.with_extension(r.to_string()));
        if let Some(p) = &previous {
            extra.extend(["-verify", p.to_str().unwrap()]);
        }
        let s = go(&plugin, "path", "v2", &extra);
        assert_eq!(s["key_id"], keys.last().unwrap().as_str(), "round {round}");
        if previous.is_some() {
            assert_eq!(s["verified"], 200, "round {round}");
        }
        // Rotate, and restart the plugin on the second rotation.
        keys.push(store.rotate());
        if round == 1 {
            drop(plugin);
            plugin = Plugin::start(&store, &[]).await;
        } else {
            plugin.signal("HUP");
        }
        let mut c = plugin.v2().await;
        common::wait_key_id(&mut c, keys.last().unwrap(), Duration::from_secs(10)).await;
    }
    // Every sample from every key still decrypts through the old apiserver's dial.
    for round in 0..3 {
        let file = saved.with_extension(round.to_string());
        let s = go(
            &plugin,
            "escaped",
            "health",
            &["-verify", file.to_str().unwrap()],
        );
        assert_eq!(s["verified"], 200);
    }
    let distinct: std::collections::HashSet<_> = keys.iter().collect();
    assert_eq!(distinct.len(), 4);
}

#[tokio::test]
async fn go_client_on_a_v2beta1_plugin_for_kubernetes_1_27() {
    let store = Store::init();
    let plugin = Plugin::start(&store, &["--status-version", "v2beta1"]).await;
    let s = go(&plugin, "path", "health,v2", &[]);
    assert_eq!(s["status_version"], "v2beta1");
}

#[tokio::test]
async fn go_client_against_the_tpm_backend() {
    let node = TpmNode::new(&[]);
    node.ok(&["key", "init"], &[]);
    let plugin = node.serve().await;
    let s = go(&plugin, "path", "health,v2,v1beta1", &[]);
    assert_eq!(s["key_id"], node.list()["active_key_id"]);
    assert_eq!(s["round_trips"], 200);
}

#[tokio::test]
async fn python_grpcio_with_its_default_and_a_path_authority() {
    let store = Store::init();
    let plugin = Plugin::start(&store, &["--log-level", "debug"]).await;
    let key = store.active_key();
    let socket = plugin.socket.to_str().unwrap().to_owned();
    for authority in [None, Some(socket.as_str())] {
        let s = python(&plugin, authority, "health,v2,v1beta1");
        assert_eq!(s["health"], "SERVING");
        assert_eq!(s["key_id"], key.as_str());
        assert_eq!(s["round_trips"], 200);
        assert_eq!(s["v1beta1_round_trips"], 20);
    }
    // grpcio's default for a unix: target is one h2 refuses too: both were rewritten.
    let replaced = replaced_authorities(&plugin);
    assert_eq!(replaced.len(), 2, "{replaced:#?}");
    assert!(replaced[1].contains(&socket));
}

// ---- Hand-made HTTP/2: what no gRPC client sends -------------------------------------

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

use edgeseal_test_support::h2_frame as frame;

/// A literal header field without indexing (RFC 7541 §6.2.2), short strings only.
fn literal(name: &str, value: &str) -> Vec<u8> {
    assert!(name.len() < 127 && value.len() < 127);
    let mut v = vec![0, name.len() as u8];
    v.extend_from_slice(name.as_bytes());
    v.push(value.len() as u8);
    v.extend_from_slice(value.as_bytes());
    v
}

enum Outcome {
    /// grpc-status and the response messages' bytes.
    Answered(String, Vec<u8>),
    /// The server reset the stream or closed the connection.
    Refused(String),
}

/// One unary gRPC call over a fresh connection, headers exactly as given.
fn raw_call(socket: &Path, block: &[u8], message: &[u8]) -> Outcome {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut body = vec![0];
    body.extend_from_slice(&(message.len() as u32).to_be_bytes());
    body.extend_from_slice(message);
    let mut out = PREFACE.to_vec();
    out.extend(frame(0x4, 0, 0, &[])); // SETTINGS
    out.extend(frame(0x1, 0x4, 1, block)); // HEADERS, END_HEADERS
    out.extend(frame(0x0, 0x1, 1, &body)); // DATA, END_STREAM
    s.write_all(&out).unwrap();

    let mut dec = loona_hpack::Decoder::new();
    let mut data = Vec::new();
    loop {
        let mut head = [0u8; 9];
        if let Err(e) = s.read_exact(&mut head) {
            return Outcome::Refused(format!("connection closed: {e}"));
        }
        let len = (head[0] as usize) << 16 | (head[1] as usize) << 8 | head[2] as usize;
        let mut payload = vec![0; len];
        if let Err(e) = s.read_exact(&mut payload) {
            return Outcome::Refused(format!("connection closed: {e}"));
        }
        match head[3] {
            0x0 => data.extend_from_slice(&payload),
            0x1 => {
                let fields = dec.decode(&payload).unwrap();
                if let Some((_, v)) = fields.iter().find(|(n, _)| n == b"grpc-status") {
                    return Outcome::Answered(String::from_utf8_lossy(v).into(), data);
                }
            }
            0x3 => return Outcome::Refused(format!("RST_STREAM {payload:?}")),
            0x4 if head[4] & 1 == 0 => {
                if let Err(e) = s.write_all(&frame(0x4, 1, 0, &[])) {
                    return Outcome::Refused(format!("connection closed: {e}"));
                }
            }
            0x7 => return Outcome::Refused(format!("GOAWAY {payload:?}")),
            _ => {}
        }
    }
}

fn status_request_block(authority: Option<&str>) -> Vec<u8> {
    let mut b = [
        literal(":method", "POST"),
        literal(":scheme", "http"),
        literal(":path", "/v2.KeyManagementService/Status"),
    ]
    .concat();
    if let Some(a) = authority {
        b.extend(literal(":authority", a));
    }
    b.extend(literal("content-type", "application/grpc"));
    b.extend(literal("te", "trailers"));
    b
}

#[tokio::test]
async fn any_authority_including_empty_and_none_is_served() {
    let store = Store::init();
    let plugin = Plugin::start(&store, &[]).await;
    let key = store.active_key();
    let socket = plugin.socket.to_str().unwrap().to_owned();
    let escaped = socket.replace('/', "%2F");
    for authority in [
        None,
        Some(""),
        Some("localhost"),
        Some(socket.as_str()),
        Some(escaped.as_str()),
        Some("@abstract/kms"),
    ] {
        let block = status_request_block(authority);
        match raw_call(&plugin.socket, &block, &[]) {
            Outcome::Answered(status, data) => {
                assert_eq!(status, "0", "{authority:?}");
                let st = kms_proto::v2::StatusResponse::decode(&data[5..]).unwrap();
                assert_eq!(st.key_id, key, "{authority:?}");
                assert_eq!(st.healthz, "ok");
            }
            Outcome::Refused(why) => panic!("authority {authority:?}: {why}"),
        }
    }
}

#[tokio::test]
async fn malformed_http2_closes_that_connection_only() {
    let store = Store::init();
    let plugin = Plugin::start(&store, &[]).await;
    // Other clients stay connected and served throughout.
    let mut c = plugin.v2().await;
    for bad in [
        vec![0xff, 0x7f],                   // an index past both HPACK tables
        vec![0x3f, 0xe1, 0xff, 0x03, 0x82], // a table size above the server's
        vec![0x00, 0x7f],                   // a name whose length runs past the block
    ] {
        match raw_call(&plugin.socket, &bad, &[]) {
            Outcome::Refused(_) => {}
            Outcome::Answered(s, _) => panic!("{bad:?} was answered with grpc-status {s}"),
        }
        let st = c
            .status(kms_proto::v2::StatusRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(st.healthz, "ok");
    }
    let logs = plugin.logs();
    assert!(
        logs.matches("closing a KMS socket connection").count() >= 3,
        "{logs}"
    );
    // And the Go client still gets through on a new connection.
    go(&plugin, "path", "health", &[]);
}

/// The command `kms-plugin demo` prints for trying a third-party client works as printed.
#[tokio::test]
async fn the_demo_prints_a_working_third_party_client_command() {
    use std::io::BufRead as _;
    let dir = tempfile::tempdir().unwrap();
    let http = format!("127.0.0.1:{}", common::free_port());
    let mut demo = Command::new(common::BIN)
        .args([
            "demo",
            "--dir",
            dir.path().to_str().unwrap(),
            "--http-addr",
            &http,
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = std::io::BufReader::new(demo.stdout.take().unwrap());
    let line = stdout
        .lines()
        .map(Result::unwrap)
        .find(|l| l.trim_start().starts_with("tests/interop/go/run"))
        .expect("the demo prints no client command");
    let socket = dir.path().join("kms.sock");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while UnixStream::connect(&socket).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "the demo socket never answered"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    go_client(); // builds the client's dependencies into the Go cache once
    let out = Command::new("bash")
        .args(["-c", line.trim()])
        .current_dir(REPO)
        .output()
        .unwrap();
    let _ = demo.kill();
    let _ = demo.wait();
    assert!(
        out.status.success(),
        "{line}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let s: Value = serde_json::from_slice(out.stdout.trim_ascii()).unwrap();
    assert_eq!(s["health"], "SERVING");
    assert_eq!(s["v1beta1_round_trips"], 20);
}
