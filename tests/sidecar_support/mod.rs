//! Shared harness for the sidecar's black-box tests: a local fake of Key Vault, Entra ID,
//! IMDS and Arc HIMDS (`azure-fake`), the real `sidecar` binary started with a clean
//! environment and a chosen identity, its logs collected to a file, its probes read over
//! plain HTTP, and the delivered files inspected on a tmpfs output directory.
//!
//! Every [`Harness`] checks, when it is dropped at the end of a test, that no secret value
//! it handed to the fake, no client secret, no Arc key and no JWT (access token or
//! federated assertion: they all start with `eyJ`) appears in any log of any sidecar it ran.
#![allow(
    dead_code,
    unused_imports,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic
)]

use std::cell::RefCell;
use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

#[path = "../common/log_gate.rs"]
pub mod log_gate;

pub use azure_fake::{Endpoint, FakeAzure, Fault, Flow, Options, Stats, Target};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use tempfile::TempDir;

pub const BIN: &str = env!("CARGO_BIN_EXE_sidecar");

/// How long a `--once` run may take before the test gives up on it.
const ONCE_LIMIT: Duration = Duration::from_secs(60);

/// Which identity the sidecar is given (environment, plus `--identity` unless auto).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Identity {
    Workload,
    Imds,
    Arc,
    SpSecret,
    SpCert,
}

impl Identity {
    pub fn flag(self) -> &'static str {
        match self {
            Identity::Workload => "workload-identity",
            Identity::Imds => "imds",
            Identity::Arc => "arc",
            Identity::SpSecret | Identity::SpCert => "service-principal",
        }
    }
}

/// Lowercase hex of `n` random bytes.
pub fn rand_hex(n: usize) -> String {
    (0..n)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect()
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A projected service-account token as kubelet writes it: a three-part JWT.
pub fn service_account_jwt(subject: &str) -> String {
    let now = unix_now();
    let header = URL_SAFE_NO_PAD.encode(r#"{"alg":"RS256","kid":"sidecar-test","typ":"JWT"}"#);
    let claims = URL_SAFE_NO_PAD.encode(format!(
        r#"{{"aud":["api://AzureADTokenExchange"],"exp":{},"iat":{now},"nbf":{now},"iss":"https://oidc.sidecar-test.local","sub":"system:serviceaccount:app:{subject}","jti":"{}"}}"#,
        now + 3600,
        rand_hex(8)
    ));
    let sig = URL_SAFE_NO_PAD.encode(rand_hex(32));
    format!("{header}.{claims}.{sig}")
}

/// Replaces a file's content by rename, as kubelet does, so no reader sees half of it.
pub fn write_atomic(path: &Path, content: &str) {
    let tmp = path.with_extension(format!("tmp{}", rand_hex(4)));
    fs::write(&tmp, content).unwrap();
    fs::rename(&tmp, path).unwrap();
}

/// Runs `openssl ARGS` in `dir`, asserting success.
pub fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .expect("running openssl");
    assert!(
        out.status.success(),
        "openssl {args:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A self-signed RSA certificate and its unencrypted PKCS#8 key: `(key.pem, cert.pem)`.
pub fn make_cert(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let key = format!("{name}.key.pem");
    let crt = format!("{name}.crt.pem");
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &crt,
            "-subj",
            &format!("/CN={name}"),
            "-days",
            "2",
        ],
    );
    (dir.join(key), dir.join(crt))
}

/// The base64 bodies of a PEM text's blocks, by label, in order (whitespace removed).
pub fn pem_blocks(pem: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut current: Option<(String, String)> = None;
    for line in pem.lines() {
        let line = line.trim();
        if let Some(label) = line
            .strip_prefix("-----BEGIN ")
            .and_then(|l| l.strip_suffix("-----"))
        {
            current = Some((label.to_owned(), String::new()));
        } else if line.starts_with("-----END ") {
            if let Some(c) = current.take() {
                out.push(c);
            }
        } else if let Some((_, body)) = current.as_mut() {
            body.push_str(line);
        }
    }
    out
}

/// One test's world: a fake Azure, a scratch directory on disk (token file, logs, scripts,
/// configs) and an output directory on tmpfs.
pub struct Harness {
    pub fake: FakeAzure,
    pub work: TempDir,
    pub out: TempDir,
    pub token_file: PathBuf,
    pub client_secret: String,
    /// Strings that must never appear in a log.
    watched: RefCell<Vec<String>>,
    logs: RefCell<Vec<PathBuf>>,
    client_cert: RefCell<Option<PathBuf>>,
}

impl Default for Harness {
    fn default() -> Self {
        Self::new()
    }
}

impl Harness {
    pub fn new() -> Self {
        Self::with(|_| {})
    }

    /// A harness whose fake runs with `tweak`ed options. The fake always checks workload
    /// identity assertions against [`Harness::token_file`] and knows the client secret.
    pub fn with(tweak: impl FnOnce(&mut Options)) -> Self {
        let work = tempfile::Builder::new()
            .prefix("sidecar-test-")
            .tempdir()
            .unwrap();
        let out = tempfile::Builder::new()
            .prefix("sidecar-out-")
            .tempdir_in("/dev/shm")
            .unwrap();
        let token_file = work.path().join("sa-token");
        let assertion = service_account_jwt("first");
        write_atomic(&token_file, &assertion);
        let client_secret = format!("client-secret-{}", rand_hex(12));
        let mut opts = Options {
            federated_token_file: Some(token_file.clone()),
            client_secret: Some(client_secret.clone()),
            ..Default::default()
        };
        tweak(&mut opts);
        let fake = FakeAzure::start_blocking(opts).expect("starting azure-fake");
        Harness {
            fake,
            work,
            out,
            token_file,
            watched: RefCell::new(vec![client_secret.clone(), assertion]),
            client_secret,
            logs: RefCell::new(Vec::new()),
            client_cert: RefCell::new(None),
        }
    }

    pub fn out(&self) -> &Path {
        self.out.path()
    }

    /// Adds a string that must never appear in a log.
    pub fn watch(&self, s: impl Into<String>) {
        let s = s.into();
        assert!(s.len() >= 12, "watched strings must be distinctive");
        log_gate::watch_str("a secret value or credential", &s);
        self.watched.borrow_mut().push(s);
    }

    /// A distinctive secret value, watched for in the logs.
    pub fn value(&self, tag: &str) -> String {
        let v = format!("sv-{tag}-{}", rand_hex(12));
        self.watch(v.clone());
        v
    }

    /// Stores a plain secret (its value watched for in the logs); returns the version.
    pub fn set(&self, name: &str, value: &str) -> String {
        self.set_typed(name, value, None)
    }

    pub fn set_typed(&self, name: &str, value: &str, content_type: Option<&str>) -> String {
        if value.len() >= 12 {
            self.watch(value.to_owned());
        }
        self.fake.set_secret(name, value, content_type)
    }

    /// Replaces the federated token file's content (atomically); the new JWT is watched.
    pub fn rotate_token_file(&self, subject: &str) -> String {
        let jwt = service_account_jwt(subject);
        self.watch(jwt.clone());
        write_atomic(&self.token_file, &jwt);
        jwt
    }

    /// A PEM file with an RSA key and its certificate, for the service-principal flow.
    pub fn client_cert(&self) -> PathBuf {
        if let Some(p) = self.client_cert.borrow().as_ref() {
            return p.clone();
        }
        let (key, crt) = make_cert(self.work.path(), "client");
        let key_pem = fs::read_to_string(&key).unwrap();
        for (_, body) in pem_blocks(&key_pem) {
            self.watch(body);
        }
        let both = self.work.path().join("client-cert.pem");
        fs::write(
            &both,
            format!("{key_pem}{}", fs::read_to_string(&crt).unwrap()),
        )
        .unwrap();
        *self.client_cert.borrow_mut() = Some(both.clone());
        both
    }

    /// The environment and extra flags an identity needs.
    pub fn identity_env(&self, id: Identity) -> (Vec<(String, String)>, Vec<String>) {
        let o = self.fake.options();
        let kv = |k: &str, v: &str| (k.to_owned(), v.to_owned());
        match id {
            Identity::Workload => (
                vec![
                    kv("AZURE_CLIENT_ID", &o.client_id),
                    kv("AZURE_TENANT_ID", &o.tenant_id),
                    kv(
                        "AZURE_FEDERATED_TOKEN_FILE",
                        self.token_file.to_str().unwrap(),
                    ),
                    kv("AZURE_AUTHORITY_HOST", &self.fake.authority_host()),
                ],
                vec![],
            ),
            Identity::Imds => (
                vec![kv(
                    "AZURE_POD_IDENTITY_AUTHORITY_HOST",
                    &self.fake.imds_endpoint(),
                )],
                vec![],
            ),
            Identity::Arc => (
                vec![
                    kv("IDENTITY_ENDPOINT", &self.fake.arc_identity_endpoint()),
                    kv("IMDS_ENDPOINT", &self.fake.imds_endpoint()),
                ],
                vec![
                    "--arc-token-dir".into(),
                    self.fake.arc_key_dir().to_str().unwrap().to_owned(),
                ],
            ),
            Identity::SpSecret => (
                vec![
                    kv("AZURE_CLIENT_ID", &o.client_id),
                    kv("AZURE_TENANT_ID", &o.tenant_id),
                    kv("AZURE_CLIENT_SECRET", &self.client_secret),
                    kv("AZURE_AUTHORITY_HOST", &self.fake.authority_host()),
                ],
                vec![],
            ),
            Identity::SpCert => (
                vec![
                    kv("AZURE_CLIENT_ID", &o.client_id),
                    kv("AZURE_TENANT_ID", &o.tenant_id),
                    kv(
                        "AZURE_CLIENT_CERTIFICATE_PATH",
                        self.client_cert().to_str().unwrap(),
                    ),
                    kv("AZURE_AUTHORITY_HOST", &self.fake.authority_host()),
                ],
                vec![],
            ),
        }
    }

    /// A sidecar command for `id`: clean environment, the fake's vault and CA, challenge
    /// verification off (the fake's vault is `localhost`), JSON logs at debug level into a
    /// file of the scratch directory, the tmpfs output directory. No secrets yet.
    pub fn cmd(&self, id: Identity) -> SidecarCmd {
        let n = self.logs.borrow().len();
        let log = self.work.path().join(format!("sidecar-{n}.log"));
        self.logs.borrow_mut().push(log.clone());
        let (env, extra) = self.identity_env(id);
        SidecarCmd {
            env,
            args: extra,
            identity: Some(id.flag()),
            vault_url: Some(self.fake.vault_url()),
            ca_file: self.fake.ca_file().to_owned(),
            verify_challenge: false,
            output_dir: Some(self.out().to_owned()),
            log,
        }
    }

    /// Every log written so far, concatenated.
    pub fn all_logs(&self) -> String {
        self.logs
            .borrow()
            .iter()
            .map(|p| fs::read_to_string(p).unwrap_or_default())
            .collect()
    }

    fn check_logs(&self) {
        let mut watched = self.watched.borrow().clone();
        // The Arc challenge keys the fake wrote (it removes them when it stops).
        if let Ok(rd) = fs::read_dir(self.fake.arc_key_dir()) {
            for e in rd.flatten() {
                if let Ok(k) = fs::read_to_string(e.path())
                    && k.trim().len() >= 12
                {
                    watched.push(k.trim().to_owned());
                }
            }
        }
        for w in &watched {
            log_gate::watch_str("a secret value or credential", w);
        }
        for log in self.logs.borrow().iter() {
            let Ok(text) = fs::read_to_string(log) else {
                continue;
            };
            log_gate::check(&format!("sidecar log {}", log.display()), &text);
            // Access tokens and assertions are JWTs: base64url JSON starting `{"` = `eyJ`.
            assert!(
                !text.contains("eyJ"),
                "a JWT (token or assertion) is in {}:\n{text}",
                log.display()
            );
            assert!(
                !text.contains("Bearer ey"),
                "a bearer token is in {}",
                log.display()
            );
            for w in &watched {
                assert!(
                    !text.contains(w.as_str()),
                    "a secret value or credential ({}...) is in {}:\n{text}",
                    &w[..w.len().min(12)],
                    log.display()
                );
            }
        }
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            self.check_logs();
        }
    }
}

/// A sidecar invocation being put together.
pub struct SidecarCmd {
    env: Vec<(String, String)>,
    args: Vec<String>,
    identity: Option<&'static str>,
    vault_url: Option<String>,
    ca_file: PathBuf,
    verify_challenge: bool,
    output_dir: Option<PathBuf>,
    log: PathBuf,
}

impl SidecarCmd {
    pub fn arg(mut self, a: impl Into<String>) -> Self {
        self.args.push(a.into());
        self
    }

    pub fn args<I: IntoIterator<Item = S>, S: Into<String>>(mut self, it: I) -> Self {
        self.args.extend(it.into_iter().map(Into::into));
        self
    }

    /// `--secret SPEC`
    pub fn secret(self, spec: &str) -> Self {
        self.arg("--secret").arg(spec)
    }

    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.env.push((k.to_owned(), v.to_owned()));
        self
    }

    /// Adds another identity's environment and flags (to test `--identity auto`'s order).
    pub fn with_identity_env(mut self, h: &Harness, id: Identity) -> Self {
        let (env, args) = h.identity_env(id);
        self.env.extend(env);
        self.args.extend(args);
        self
    }

    /// `--identity` for another kind than the environment was made for.
    pub fn identity(mut self, id: Identity) -> Self {
        self.identity = Some(id.flag());
        self
    }

    /// No `--identity` flag: `auto`, the default.
    pub fn auto_identity(mut self) -> Self {
        self.identity = None;
        self
    }

    /// No `--vault-url` (the config file names the vault).
    pub fn no_vault_url(mut self) -> Self {
        self.vault_url = None;
        self
    }

    /// No `--output-dir` (the config file names it, or the test gives its own).
    pub fn no_output_dir(mut self) -> Self {
        self.output_dir = None;
        self
    }

    /// Challenge-resource verification on (no `--disable-challenge-resource-verification`).
    pub fn verify_challenge(mut self) -> Self {
        self.verify_challenge = true;
        self
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    fn command(&self, extra: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.env_clear();
        c.env(
            "PATH",
            std::env::var("PATH").unwrap_or_else(|_| "/usr/bin:/bin".into()),
        );
        for (k, v) in &self.env {
            c.env(k, v);
        }
        if let Some(u) = &self.vault_url {
            c.args(["--vault-url", u]);
        }
        c.arg("--ca-file").arg(&self.ca_file);
        if !self.verify_challenge {
            c.arg("--disable-challenge-resource-verification");
        }
        if let Some(o) = &self.output_dir {
            c.arg("--output-dir").arg(o);
        }
        if let Some(i) = self.identity {
            c.args(["--identity", i]);
        }
        c.args(["--log-format", "json", "--log-level", "debug"]);
        c.args(&self.args);
        c.args(extra);
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        c.stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        c
    }

    /// Runs with `--once` to completion.
    pub fn run_once(self) -> Finished {
        self.run_to_end(&["--once"])
    }

    /// Runs with `extra` arguments (e.g. `--once`, `--check-config`) to completion; stdout
    /// and stderr both go to the log.
    pub fn run_to_end(self, extra: &[&str]) -> Finished {
        let started = Instant::now();
        let mut child = self.command(extra).spawn().expect("spawning sidecar");
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if started.elapsed() > ONCE_LIMIT {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "sidecar --once did not finish within {ONCE_LIMIT:?}; log:\n{}",
                    fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        Finished {
            status,
            log: fs::read_to_string(&self.log).unwrap_or_default(),
            took: started.elapsed(),
        }
    }

    /// Starts the long-running sidecar with its probes on an ephemeral port and, unless the
    /// test gave one, `--refresh-interval 1s`.
    pub fn spawn(self) -> Sidecar {
        let mut extra = vec!["--http-addr", "127.0.0.1:0"];
        if !self.args.iter().any(|a| a == "--refresh-interval") {
            extra.extend(["--refresh-interval", "1s"]);
        }
        let child = self.command(&extra).spawn().expect("spawning sidecar");
        Sidecar {
            child: Some(child),
            log: self.log,
            addr: None,
            exited: None,
        }
    }
}

/// A finished `--once` run.
#[derive(Debug)]
pub struct Finished {
    pub status: ExitStatus,
    pub log: String,
    pub took: Duration,
}

impl Finished {
    pub fn assert_success(&self) {
        assert!(
            self.status.success(),
            "sidecar --once failed ({}); log:\n{}",
            self.status,
            self.log
        );
    }

    /// Asserts a non-zero exit; returns the final error (`sidecar: error: ...` to the end).
    pub fn assert_failure(&self) -> String {
        assert!(
            !self.status.success(),
            "sidecar --once succeeded but should not have; log:\n{}",
            self.log
        );
        assert_eq!(
            self.status.code(),
            Some(1),
            "exit by error, not by a signal; log:\n{}",
            self.log
        );
        // The message may span lines (Key Vault's own messages contain CRLFs).
        let at = self
            .log
            .rfind("sidecar: error: ")
            .unwrap_or_else(|| panic!("no `sidecar: error:` line; log:\n{}", self.log));
        self.log[at..].to_owned()
    }
}

/// A running long-running sidecar; killed when dropped.
pub struct Sidecar {
    child: Option<Child>,
    pub log: PathBuf,
    addr: Option<SocketAddr>,
    exited: Option<ExitStatus>,
}

impl Sidecar {
    pub fn logs(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last `n` lines of the log, for failure messages.
    pub fn tail(&self, n: usize) -> String {
        let logs = self.logs();
        let lines: Vec<&str> = logs.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// `None` while running.
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none()
            && let Some(c) = self.child.as_mut()
        {
            self.exited = c.try_wait().unwrap();
        }
        self.exited
    }

    pub fn assert_running(&mut self) {
        if let Some(s) = self.exit_status() {
            panic!("the sidecar exited ({s}); log:\n{}", self.logs());
        }
    }

    /// Polls `f` every 100 ms until it holds; fails with the log tail after `timeout`, or
    /// at once if the sidecar exits.
    pub fn wait_for(
        &mut self,
        timeout: Duration,
        what: &str,
        mut f: impl FnMut(&mut Sidecar) -> bool,
    ) {
        let start = Instant::now();
        loop {
            if f(self) {
                return;
            }
            self.assert_running();
            if start.elapsed() > timeout {
                panic!(
                    "timed out after {timeout:?} waiting for {what}; log tail:\n{}",
                    self.tail(40)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The probe listener's address, from the `serving /healthz` log line.
    pub fn addr(&mut self) -> SocketAddr {
        if let Some(a) = self.addr {
            return a;
        }
        let mut found = None;
        self.wait_for(Duration::from_secs(15), "the HTTP listener", |s| {
            found = s
                .logs()
                .lines()
                .find(|l| l.contains("serving /healthz"))
                .and_then(|l| {
                    let i = l.find("Some(")? + 5;
                    let j = l[i..].find(')')? + i;
                    l[i..j].parse::<SocketAddr>().ok()
                });
            found.is_some()
        });
        self.addr = found;
        found.unwrap()
    }

    /// `GET path` on the probe listener: status and body.
    pub fn get(&mut self, path: &str) -> (u16, String) {
        let addr = self.addr();
        http_get(addr, path)
            .unwrap_or_else(|e| panic!("GET {path}: {e}; log tail:\n{}", self.tail(20)))
    }

    pub fn readyz(&mut self) -> (u16, String) {
        self.get("/readyz")
    }

    /// Waits until `/readyz` answers 200.
    pub fn wait_ready(&mut self, timeout: Duration) {
        self.wait_for(timeout, "/readyz to answer 200", |s| s.readyz().0 == 200);
    }

    /// The value of one series of `/metrics`, e.g. `sidecar_syncs_total{result="error"}`;
    /// 0 when the series does not exist (yet).
    pub fn metric(&mut self, series: &str) -> f64 {
        let (status, body) = self.get("/metrics");
        assert_eq!(status, 200, "{body}");
        metric_value(&body, series)
    }

    /// SIGTERM, then wait for the exit.
    pub fn terminate(&mut self) -> ExitStatus {
        if let Some(s) = self.exit_status() {
            return s;
        }
        let child = self.child.as_mut().unwrap();
        rustix::process::kill_process(
            rustix::process::Pid::from_child(child),
            rustix::process::Signal::TERM,
        )
        .unwrap();
        let start = Instant::now();
        loop {
            if let Some(s) = self.exit_status() {
                return s;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "the sidecar ignored SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// One series' value in a Prometheus/OpenMetrics text body (0 if absent).
pub fn metric_value(body: &str, series: &str) -> f64 {
    body.lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

pub use edgeseal_test_support::http_get;

/// Polls `f` until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

// ---------------------------------------------------------------- delivered files

/// A delivered file's content (through its stable symlink), if it exists.
pub fn read(dir: &Path, name: &str) -> Option<String> {
    fs::read(dir.join(name))
        .ok()
        .map(|b| String::from_utf8_lossy(&b).into_owned())
}

pub fn read_bytes(dir: &Path, name: &str) -> Option<Vec<u8>> {
    fs::read(dir.join(name)).ok()
}

/// Where `..data` points now.
pub fn data_target(dir: &Path) -> Option<PathBuf> {
    fs::read_link(dir.join("..data")).ok()
}

/// The permission bits of a delivered file (through the symlinks).
pub fn mode(dir: &Path, name: &str) -> u32 {
    fs::metadata(dir.join(name)).unwrap().permissions().mode() & 0o7777
}

/// Every entry of the directory, sorted.
pub fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Asserts kubelet's AtomicWriter layout with exactly `names` visible: `..data` a symlink
/// to one `..<timestamp>` directory holding regular files, each name a symlink to
/// `..data/<name>`, and nothing else in the directory. A payload replaced just before is
/// removed after the writer's grace (500 ms, for readers already inside it): waits that out.
pub fn assert_layout(dir: &Path, names: &[&str]) {
    let target = data_target(dir)
        .unwrap_or_else(|| panic!("no ..data symlink in {}: {:?}", dir.display(), entries(dir)));
    let t = target.to_str().unwrap();
    wait_replaced_payloads_gone(dir, t);
    assert!(
        t.starts_with("..") && !t.contains('/') && t != "..data",
        "..data -> {t}"
    );
    let payload = dir.join(&target);
    assert!(
        fs::symlink_metadata(&payload).unwrap().is_dir(),
        "{t} is a directory"
    );
    let mut want: Vec<String> = names.iter().map(|s| (*s).to_owned()).collect();
    want.push("..data".into());
    want.push(t.to_owned());
    want.sort();
    assert_eq!(entries(dir), want, "entries of the output directory");
    let mut in_payload: Vec<String> = entries(&payload);
    in_payload.sort();
    let mut names_sorted: Vec<String> = names.iter().map(|s| (*s).to_owned()).collect();
    names_sorted.sort();
    assert_eq!(
        in_payload, names_sorted,
        "files of the payload directory {t}"
    );
    for n in names {
        let link =
            fs::read_link(dir.join(n)).unwrap_or_else(|e| panic!("{n} is not a symlink: {e}"));
        assert_eq!(link, Path::new("..data").join(n), "{n} -> ..data/{n}");
        let meta = fs::symlink_metadata(payload.join(n)).unwrap();
        assert!(meta.is_file(), "{t}/{n} is a regular file");
        assert_eq!(meta.nlink(), 1);
    }
}

/// Waits (at most 3 s) until no payload directory but `current` is left.
pub fn wait_replaced_payloads_gone(dir: &Path, current: &str) {
    let others = || {
        entries(dir)
            .into_iter()
            .filter(|n| n.starts_with("..") && n != "..data" && n != current)
            .collect::<Vec<_>>()
    };
    let start = Instant::now();
    while !others().is_empty() && start.elapsed() < Duration::from_secs(3) {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        others(),
        Vec::<String>::new(),
        "replaced payloads still in {} after 3 s",
        dir.display()
    );
}

/// Asserts nothing was delivered: the directory is empty.
pub fn assert_empty(dir: &Path) {
    assert!(
        entries(dir).is_empty(),
        "nothing should be written to {}: {:?}",
        dir.display(),
        entries(dir)
    );
}

/// A base64 PKCS#12 (empty password) of a fresh self-signed certificate, as Key Vault
/// stores certificate-backed secrets; with the PEM key and certificate it was made from.
pub struct Pkcs12 {
    pub base64: String,
    pub key_pem: String,
    pub cert_pem: String,
}

pub fn make_pkcs12(h: &Harness, name: &str) -> Pkcs12 {
    let dir = h.work.path();
    let (key, crt) = make_cert(dir, name);
    let p12 = dir.join(format!("{name}.p12"));
    openssl(
        dir,
        &[
            "pkcs12",
            "-export",
            "-inkey",
            key.to_str().unwrap(),
            "-in",
            crt.to_str().unwrap(),
            "-passout",
            "pass:",
            "-out",
            p12.to_str().unwrap(),
        ],
    );
    let key_pem = fs::read_to_string(&key).unwrap();
    for (_, body) in pem_blocks(&key_pem) {
        h.watch(body);
    }
    let base64 = STANDARD.encode(fs::read(&p12).unwrap());
    h.watch(base64.clone());
    Pkcs12 {
        base64,
        key_pem,
        cert_pem: fs::read_to_string(&crt).unwrap(),
    }
}

/// Writes an executable script into the scratch directory.
pub fn script(h: &Harness, name: &str, body: &str) -> PathBuf {
    let p = h.work.path().join(name);
    fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
    p
}

/// Lines of a file, 0 if it does not exist.
pub fn line_count(p: &Path) -> usize {
    fs::read_to_string(p)
        .map(|s| s.lines().count())
        .unwrap_or(0)
}
