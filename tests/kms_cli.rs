//! The operator's view: `--help`, key admin errors, configuration through flags,
//! environment and a TOML file, warnings, the socket's life cycle and file permissions.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use common::{BIN, Plugin, Store, cli, cli_ok, connect, wait_for_socket};
use kms_proto::v2::StatusRequest;
use kms_proto::v2::key_management_service_client::KeyManagementServiceClient as V2Client;

/// Runs the binary with a clean environment (no RUST_LOG, no KMS_PLUGIN_*) plus `envs`.
fn run_env(args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args).env_remove("RUST_LOG");
    for (k, _) in std::env::vars() {
        if k.starts_with("KMS_PLUGIN_") {
            cmd.env_remove(k);
        }
    }
    cmd.envs(envs.iter().copied()).output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Asserts failure and returns stderr.
fn fails(o: &Output, what: &str) -> String {
    assert!(
        !o.status.success(),
        "{what} should fail but succeeded:\n{}{}",
        stdout(o),
        stderr(o)
    );
    stderr(o)
}

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
}

fn serve_args<'a>(store: &'a str, socket: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "serve",
        "--key-store",
        store,
        "--backend",
        "insecure-software",
    ];
    args.extend_from_slice(&["--socket", socket.to_str().unwrap(), "--http-addr", "off"]);
    args.extend_from_slice(&["--reload-interval", "1s"]);
    args.extend_from_slice(extra);
    args
}

/// Runs `serve`, expecting it to exit on its own (a start-up failure) within 20 s.
fn serve_exit(args: &[&str]) -> Output {
    let mut child = Command::new(BIN)
        .args(args)
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "serve {args:?} kept running, expected it to fail:\n{}",
                stderr(&out)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// A `serve` on a socket path of the test's choosing.
struct Running {
    child: Child,
    socket: PathBuf,
    log: PathBuf,
}

impl Running {
    async fn start(store: &str, socket: &Path, log: &Path, extra: &[&str]) -> Self {
        let child = Command::new(BIN)
            .args(serve_args(store, socket, extra))
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap();
        let mut r = Self {
            child,
            socket: socket.to_owned(),
            log: log.to_owned(),
        };
        wait_for_socket(&mut r.child, &r.socket, &r.log).await;
        r
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap()
    }

    async fn status_ok(&self) -> String {
        let mut c = V2Client::new(connect(&self.socket).await);
        let st = c.status(StatusRequest {}).await.unwrap().into_inner();
        assert_eq!(st.healthz, "ok");
        st.key_id
    }

    /// SIGTERM, then waits (without blocking the runtime) for the exit status.
    async fn terminate(&mut self, within: Duration) -> ExitStatus {
        let ok = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
        let start = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(
                start.elapsed() < within,
                "serve still running {within:?} after SIGTERM:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn help_works_for_every_command() {
    let top = cli(&["--help"]);
    assert!(top.status.success(), "{}", stderr(&top));
    let text = stdout(&top);
    for sub in ["serve", "key", "demo"] {
        assert!(
            text.contains(sub),
            "top-level help does not mention {sub}:\n{text}"
        );
    }
    let cases: &[&[&str]] = &[
        &["serve"],
        &["key"],
        &["key", "init"],
        &["key", "rotate"],
        &["key", "add"],
        &["key", "promote"],
        &["key", "retire"],
        &["key", "reinstate"],
        &["key", "list"],
        &["demo"],
    ];
    for sub in cases {
        let mut args = sub.to_vec();
        args.push("--help");
        let out = cli(&args);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        let text = stdout(&out);
        let usage = format!("Usage: kms-plugin {}", sub.join(" "));
        assert!(
            text.contains(&usage),
            "{args:?} help lacks {usage:?}:\n{text}"
        );
    }
    let key_help = stdout(&cli(&["key", "--help"]));
    for sub in [
        "init",
        "rotate",
        "add",
        "promote",
        "retire",
        "reinstate",
        "list",
    ] {
        assert!(
            key_help.contains(sub),
            "`key --help` does not list {sub}:\n{key_help}"
        );
    }
    // Flags that matter to the operator are documented with their environment variable.
    let serve_help = stdout(&cli(&["serve", "--help"]));
    for flag in [
        "--socket",
        "--reload-interval",
        "--rotate-every",
        "KMS_PLUGIN_KEY_STORE",
    ] {
        assert!(serve_help.contains(flag), "serve --help lacks {flag}");
    }
}

#[test]
fn key_init_twice_fails() {
    let store = Store::init();
    let before = std::fs::read(store.path().join("manifest.json")).unwrap();
    let err = fails(
        &cli(&[
            "key",
            "init",
            "--key-store",
            store.path_str(),
            "--backend",
            "insecure-software",
        ]),
        "second key init",
    );
    assert!(err.contains("already initialized"), "{err}");
    assert_eq!(
        std::fs::read(store.path().join("manifest.json")).unwrap(),
        before,
        "manifest changed"
    );
}

#[test]
fn retire_refusals_name_the_reason() {
    let store = Store::init();
    let active = store.active_key();
    let generation = store.list_json()["generation"].clone();
    let err = fails(
        &cli(&["key", "retire", "--key-store", store.path_str(), &active]),
        "retire active",
    );
    assert!(err.contains("active key"), "{err}");
    assert!(err.contains("rotate"), "should say to rotate first: {err}");
    let err = fails(
        &cli(&[
            "key",
            "retire",
            "--key-store",
            store.path_str(),
            "kek-9999-nope",
        ]),
        "retire unknown",
    );
    assert!(
        err.contains("kek-9999-nope") && err.contains("key list"),
        "{err}"
    );
    let err = fails(
        &cli(&[
            "key",
            "promote",
            "--key-store",
            store.path_str(),
            "kek-9999-nope",
        ]),
        "promote unknown",
    );
    assert!(err.contains("key list"), "{err}");
    let list = store.list_json();
    assert_eq!(
        list["generation"], generation,
        "a refused change was written"
    );
    assert_eq!(list["active_key_id"], active.as_str());
}

#[test]
fn key_list_table_lists_every_id() {
    let store = Store::init();
    let k1 = store.active_key();
    let k2 = store.rotate();
    let k3 = cli_ok(&[
        "key",
        "add",
        "--key-store",
        store.path_str(),
        "--backend",
        "insecure-software",
    ]);
    cli_ok(&["key", "retire", "--key-store", store.path_str(), &k1]);
    let table = cli_ok(&["key", "list", "--key-store", store.path_str()]);
    let line = |id: &str| {
        table
            .lines()
            .find(|l| l.contains(id))
            .unwrap_or_else(|| panic!("{id} missing:\n{table}"))
    };
    assert!(line(&k1).contains("retired"), "{table}");
    assert!(line(&k2).contains("active"), "{table}");
    assert!(line(&k3).contains("decrypt-only"), "{table}");
    assert!(
        table.contains("KEY ID") && table.contains("STATE"),
        "{table}"
    );
    assert!(table.contains(store.path_str()), "{table}");
    // JSON agrees with the table.
    let list = store.list_json();
    assert_eq!(list["keys"].as_array().unwrap().len(), 3);
    assert_eq!(list["active_key_id"], k2.as_str());
}

#[test]
fn serve_on_uninitialized_store_names_key_init() {
    let store = Store::empty();
    let sock = store.dir.path().join("kms.sock");
    let out = serve_exit(&serve_args(store.path_str(), &sock, &[]));
    let err = fails(&out, "serve on an empty store");
    assert!(err.contains("key init"), "{err}");
    assert!(err.contains("not initialized"), "{err}");
    assert!(
        !store.path().join("manifest.json").exists(),
        "serve created a key store without --auto-init"
    );
    assert!(!sock.exists(), "socket left behind");
}

#[tokio::test]
async fn serve_auto_init_initializes() {
    let store = Store::empty();
    let plugin = Plugin::start(&store, &["--auto-init"]).await;
    let list = store.list_json();
    let keys = list["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 1, "{list}");
    assert_eq!(keys[0]["state"], "active");
    let mut c = plugin.v2().await;
    let st = c.status(StatusRequest {}).await.unwrap().into_inner();
    assert_eq!(st.healthz, "ok");
    assert_eq!(st.key_id, store.active_key());
    assert_eq!(
        mode(&store.path().join("insecure-software-root.key")),
        0o600
    );
    assert!(plugin.logs().contains("auto-init"), "{}", plugin.logs());
    // A second start finds it initialized and keeps the same key.
    drop(plugin);
    let again = Plugin::start(&store, &["--auto-init"]).await;
    let st2 = again
        .v2()
        .await
        .status(StatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(st2.key_id, st.key_id);
    assert_eq!(store.list_json()["keys"].as_array().unwrap().len(), 1);
}

#[test]
fn environment_variables_replace_flags() {
    let dir = tempfile::tempdir().unwrap();
    let ks = dir.path().join("env-ks");
    let ks = ks.to_str().unwrap();
    let env = [
        ("KMS_PLUGIN_KEY_STORE", ks),
        ("KMS_PLUGIN_BACKEND", "insecure-software"),
    ];
    // Without them the backend is missing: proves the variables are what makes it work.
    let err = fails(
        &run_env(&["key", "init", "--key-store", ks], &[]),
        "init without backend",
    );
    assert!(err.contains("backend"), "{err}");
    let out = run_env(&["key", "init"], &env);
    assert!(out.status.success(), "{}", stderr(&out));
    let id = stdout(&out).trim().to_owned();
    assert!(Path::new(ks).join("manifest.json").exists());
    let out = run_env(&["key", "list", "--output", "json"], &env[..1]);
    assert!(out.status.success(), "{}", stderr(&out));
    let list: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(list["active_key_id"], id.as_str());
    assert_eq!(list["backend"], "insecure-software");
    let out = run_env(&["key", "rotate"], &env);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_ne!(stdout(&out).trim(), id);
}

#[test]
fn config_file_works_and_rejects_unknown_keys() {
    let dir = tempfile::tempdir().unwrap();
    let ks = dir.path().join("cfg-ks");
    let cfg = dir.path().join("kms.toml");
    std::fs::write(
        &cfg,
        format!(
            "key_store = {:?}\nbackend = \"insecure-software\"\n",
            ks.to_str().unwrap()
        ),
    )
    .unwrap();
    let cfg_s = cfg.to_str().unwrap();
    let id = cli_ok(&["--config", cfg_s, "key", "init"]);
    assert!(ks.join("manifest.json").exists());
    let list: serde_json::Value = serde_json::from_str(&cli_ok(&[
        "key", "list", "--config", cfg_s, "--output", "json",
    ]))
    .unwrap();
    assert_eq!(list["active_key_id"], id.as_str());
    // Flags beat the file.
    let other = dir.path().join("flag-ks");
    cli_ok(&[
        "--config",
        cfg_s,
        "key",
        "init",
        "--key-store",
        other.to_str().unwrap(),
    ]);
    assert!(other.join("manifest.json").exists());

    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "key_store = \"/tmp/x\"\nbackend = \"insecure-software\"\nsockte = \"/x.sock\"\n",
    )
    .unwrap();
    let err = fails(
        &cli(&["--config", bad.to_str().unwrap(), "key", "list"]),
        "unknown config key",
    );
    assert!(err.contains("sockte"), "{err}");
    assert!(err.contains("bad.toml"), "should name the file: {err}");
    let missing = dir.path().join("missing.toml");
    let err = fails(
        &cli(&["--config", missing.to_str().unwrap(), "key", "list"]),
        "missing config",
    );
    assert!(err.contains("missing.toml"), "{err}");
}

#[tokio::test]
async fn insecure_backend_warns() {
    let dir = tempfile::tempdir().unwrap();
    let ks = dir.path().join("ks");
    let out = cli(&[
        "key",
        "init",
        "--key-store",
        ks.to_str().unwrap(),
        "--backend",
        "insecure-software",
    ]);
    assert!(out.status.success());
    assert!(
        stderr(&out).contains("WARNING") && stderr(&out).to_lowercase().contains("insecure"),
        "{}",
        stderr(&out)
    );
    let store = Store::init();
    let plugin = Plugin::start(&store, &[]).await;
    let logs = plugin.logs();
    let line = logs
        .lines()
        .find(|l| l.contains("INSECURE"))
        .unwrap_or_else(|| panic!("no INSECURE warning:\n{logs}"));
    assert!(line.contains("WARN"), "{line}");
}

#[test]
fn tpm_backend_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let ks = dir.path().join("ks");
    // A device that does not exist, so this fails the same on a machine with a TPM.
    let tcti = format!("device:{}", dir.path().join("nodev").display());
    // The plugin's own error line (the TSS library adds lines of its own).
    let names_tpm = |err: &str| {
        let line = err
            .lines()
            .rfind(|l| l.starts_with("kms-plugin: error:"))
            .unwrap_or("");
        line.contains("TPM") || line.contains("`tpm` feature")
    };
    let out = cli(&[
        "key",
        "init",
        "--key-store",
        ks.to_str().unwrap(),
        "--backend",
        "tpm",
        "--tcti",
        &tcti,
    ]);
    let err = fails(&out, "key init --backend tpm");
    assert!(names_tpm(&err), "{err}");
    assert!(!ks.join("manifest.json").exists());
    // serve on a store made by the software backend, told to use the TPM.
    let store = Store::init();
    let sock = store.dir.path().join("kms.sock");
    let mut args = serve_args(store.path_str(), &sock, &["--tcti", &tcti]);
    args[4] = "tpm";
    let err = fails(&serve_exit(&args), "serve --backend tpm");
    assert!(names_tpm(&err), "{err}");
    assert!(!sock.exists());
}

#[tokio::test]
async fn socket_modes() {
    let store = Store::init();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("a.sock");
    let a = Running::start(store.path_str(), &sock, &dir.path().join("a.log"), &[]).await;
    assert_eq!(mode(&sock), 0o600);
    assert!(
        std::fs::symlink_metadata(&sock)
            .unwrap()
            .file_type()
            .is_socket()
    );
    a.status_ok().await;
    drop(a);

    let sock = dir.path().join("b.sock");
    let b = Running::start(
        store.path_str(),
        &sock,
        &dir.path().join("b.log"),
        &["--socket-mode", "0660"],
    )
    .await;
    assert_eq!(mode(&sock), 0o660);
    b.status_ok().await;
    drop(b);

    let sock = dir.path().join("c.sock");
    let err = fails(
        &serve_exit(&serve_args(
            store.path_str(),
            &sock,
            &["--socket-mode", "0666"],
        )),
        "0666",
    );
    assert!(err.contains("local user"), "{err}");
    assert!(!sock.exists());
}

#[tokio::test]
async fn stale_socket_is_replaced() {
    let store = Store::init();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("kms.sock");
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    // A second name keeps the stale inode allocated, so a new socket cannot reuse its number.
    std::fs::hard_link(&sock, dir.path().join("stale-link")).unwrap();
    let stale_ino = std::fs::symlink_metadata(&sock).unwrap().ino();
    assert!(
        std::os::unix::net::UnixStream::connect(&sock).is_err(),
        "the stale socket answers"
    );
    let r = Running::start(store.path_str(), &sock, &dir.path().join("log"), &[]).await;
    assert_ne!(
        std::fs::symlink_metadata(&sock).unwrap().ino(),
        stale_ino,
        "still the stale socket"
    );
    assert_eq!(mode(&sock), 0o600);
    assert_eq!(r.status_ok().await, store.active_key());
    assert!(r.logs().contains("stale"), "{}", r.logs());
}

#[test]
fn regular_file_at_socket_path_is_kept() {
    let store = Store::init();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kms.sock");
    std::fs::write(&path, b"precious").unwrap();
    let err = fails(
        &serve_exit(&serve_args(store.path_str(), &path, &[])),
        "serve over a regular file",
    );
    assert!(err.contains("not a socket"), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), b"precious");
}

#[tokio::test]
async fn second_plugin_on_same_socket_fails() {
    let store = Store::init();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("kms.sock");
    let first = Running::start(store.path_str(), &sock, &dir.path().join("log"), &[]).await;
    let ino = std::fs::symlink_metadata(&sock).unwrap().ino();
    let err = fails(
        &serve_exit(&serve_args(store.path_str(), &sock, &[])),
        "second plugin",
    );
    assert!(err.contains("already serving"), "{err}");
    assert_eq!(
        std::fs::symlink_metadata(&sock).unwrap().ino(),
        ino,
        "the second plugin touched the socket"
    );
    assert_eq!(first.status_ok().await, store.active_key());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_zero_and_removes_socket() {
    let store = Store::init();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("kms.sock");
    let mut r = Running::start(store.path_str(), &sock, &dir.path().join("log"), &[]).await;
    // kube-apiserver keeps its connection open: an idle client must not hold up the exit
    // until the drain timeout (10 s).
    let mut c = V2Client::new(connect(&sock).await);
    c.status(StatusRequest {}).await.unwrap();
    let start = Instant::now();
    let status = r.terminate(Duration::from_secs(15)).await;
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "SIGTERM took {:?}:\n{}",
        start.elapsed(),
        r.logs()
    );
    assert_eq!(status.code(), Some(0), "{status}\n{}", r.logs());
    assert!(!sock.exists(), "socket left after SIGTERM");
    // Nothing else left next to it (the private staging directory is gone too).
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, vec![std::ffi::OsString::from("log")], "{left:?}");
    assert!(r.logs().contains("SIGTERM"), "{}", r.logs());
}

#[test]
fn key_store_files_are_private() {
    let store = Store::init();
    assert_eq!(mode(&store.path()), 0o700);
    assert_eq!(mode(&store.path().join("manifest.json")), 0o600);
    assert_eq!(
        mode(&store.path().join("insecure-software-root.key")),
        0o600
    );
    store.rotate();
    cli_ok(&[
        "key",
        "add",
        "--key-store",
        store.path_str(),
        "--backend",
        "insecure-software",
    ]);
    assert_eq!(
        mode(&store.path().join("manifest.json")),
        0o600,
        "after rewrites"
    );
    assert_eq!(mode(&store.path()), 0o700);
}

#[test]
fn world_readable_root_key_is_refused() {
    let store = Store::init();
    let root = store.path().join("insecure-software-root.key");
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o644)).unwrap();
    let sock = store.dir.path().join("kms.sock");
    let err = fails(
        &serve_exit(&serve_args(store.path_str(), &sock, &[])),
        "serve with a 0644 root key",
    );
    assert!(err.contains("chmod 600"), "{err}");
    assert!(!sock.exists());
    let err = fails(
        &cli(&[
            "key",
            "rotate",
            "--key-store",
            store.path_str(),
            "--backend",
            "insecure-software",
        ]),
        "rotate with a 0644 root key",
    );
    assert!(err.contains("chmod 600"), "{err}");
    // Fixed as told, it works again.
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o600)).unwrap();
    store.rotate();
}
