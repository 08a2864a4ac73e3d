//! Proves the fake against the official Azure SDK for Python: starts the `azure-fake`
//! binary with a seed, runs `python/check_sdk.py` against its ready.json, and stops it with
//! SIGTERM. Needs `pip install -r tests/azure-fake/python/requirements.txt`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

const REQUIREMENTS: &str = "tests/azure-fake/python/requirements.txt";
/// The only directory the SDKs read Arc key files from on Linux.
const ARC_SDK_KEY_DIR: &str = "/var/opt/azcmagent/tokens";

/// Kills the fake if the test fails before stopping it.
struct Fake {
    child: Option<Child>,
    log: PathBuf,
}

impl Fake {
    fn log(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    }

    fn stop(&mut self) -> ExitStatus {
        let mut child = self.child.take().unwrap();
        let term = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(term.success(), "kill -TERM failed");
        wait_with_deadline(&mut child, Duration::from_secs(15))
            .expect("azure-fake did not exit within 15 s of SIGTERM")
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn wait_with_deadline(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs a command to completion, killing it after `limit`.
fn run_with_deadline(cmd: &mut Command, limit: Duration) -> (Option<ExitStatus>, String) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let status = wait_with_deadline(&mut child, limit);
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let text = format!(
        "--- stdout\n{}\n--- stderr\n{}",
        out.join().unwrap_or_default(),
        err.join().unwrap_or_default()
    );
    (status, text)
}

fn python_sdk_available() -> Result<(), String> {
    let probe: std::io::Result<Output> = Command::new("python3")
        .args([
            "-c",
            "import azure.identity, azure.keyvault.secrets, cryptography",
        ])
        .output();
    match probe {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => Err(String::from_utf8_lossy(&o.stderr).into_owned()),
        Err(e) => Err(format!("cannot run python3: {e}")),
    }
}

/// A JWT shaped like a projected service-account token (unsigned), valid for an hour.
fn service_account_token() -> String {
    use base64::Engine as _;
    let e = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let header = serde_json::json!({"alg": "RS256", "kid": "azure-fake-test"});
    let claims = serde_json::json!({
        "aud": ["api://AzureADTokenExchange"],
        "iss": "https://oidc.example.invalid/",
        "sub": "system:serviceaccount:default:sdk-check",
        "iat": now, "nbf": now, "exp": now + 3600,
    });
    format!(
        "{}.{}.{}",
        e.encode(header.to_string()),
        e.encode(claims.to_string()),
        e.encode(b"unsigned")
    )
}

/// `/var/opt/azcmagent/tokens` when it exists or can be created (root), else `None`. It is
/// left in place afterwards: other tests (the sidecar's Arc tests) may be using it.
fn arc_sdk_dir() -> Option<PathBuf> {
    let dir = Path::new(ARC_SDK_KEY_DIR);
    if fs::create_dir_all(dir).is_ok() {
        let probe = dir.join(format!(".azure-fake-probe-{}", std::process::id()));
        if fs::write(&probe, b"").is_ok() {
            let _ = fs::remove_file(probe);
            return Some(dir.to_path_buf());
        }
    }
    None
}

#[test]
fn official_azure_sdk_for_python_works_against_the_fake() -> anyhow::Result<()> {
    if let Err(why) = python_sdk_available() {
        anyhow::bail!(
            "the Azure SDK for Python is not installed, so the fake cannot be proven against it.\n\
             Install it with: pip install -r {REQUIREMENTS}\n(import failed: {why})"
        );
    }

    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let seed = dir.path().join("seed.json");
    fs::write(
        &seed,
        serde_json::json!({
            "db-password": {"value": "s3cret", "contentType": "text/plain"},
            "tls-cert": {
                "value": "-----BEGIN CERTIFICATE-----\nMIIBfake\n-----END CERTIFICATE-----\n",
                "contentType": "application/x-pem-file"
            },
            "plain": "just-a-value"
        })
        .to_string(),
    )
    .unwrap();
    let token_file = dir.path().join("sa-token");
    fs::write(&token_file, service_account_token()).unwrap();

    let arc_dir = arc_sdk_dir();
    if arc_dir.is_none() {
        eprintln!(
            "note: {ARC_SDK_KEY_DIR} cannot be created (not root?): check_sdk.py will skip the Arc SDK check"
        );
    }
    let arc_dir = arc_dir.unwrap_or_else(|| dir.path().join("arc-tokens"));

    let log = dir.path().join("azure-fake.log");
    let child = Command::new(env!("CARGO_BIN_EXE_azure-fake"))
        .arg("serve")
        .arg("--state-dir")
        .arg(&state)
        .arg("--seed")
        .arg(&seed)
        .args(["--client-secret", "sdk-check-secret"])
        .arg("--federated-token-file")
        .arg(&token_file)
        .arg("--arc-key-dir")
        .arg(&arc_dir)
        .stdout(Stdio::null())
        .stderr(fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut fake = Fake {
        child: Some(child),
        log,
    };

    let ready = state.join("ready.json");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ready.exists() {
        if let Some(status) = fake.child.as_mut().unwrap().try_wait().unwrap() {
            anyhow::bail!("azure-fake exited early ({status}):\n{}", fake.log());
        }
        assert!(
            Instant::now() < deadline,
            "azure-fake wrote no ready.json within 30 s:\n{}",
            fake.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let info: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&ready).unwrap()).unwrap();
    for key in [
        "vault_url",
        "authority_host",
        "imds_endpoint",
        "arc_identity_endpoint",
        "ca_file",
        "tenant_id",
        "client_id",
    ] {
        assert!(info[key].is_string(), "ready.json lacks {key}: {info}");
    }
    assert!(Path::new(info["ca_file"].as_str().unwrap()).exists());

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/check_sdk.py");
    let (status, output) = run_with_deadline(
        Command::new("python3").arg(&script).arg(&ready),
        Duration::from_secs(300),
    );
    println!("{output}");
    match status {
        Some(s) if s.success() => {}
        Some(s) if s.code() == Some(3) => anyhow::bail!(
            "check_sdk.py found no Azure SDK: pip install -r {REQUIREMENTS}\n{output}"
        ),
        Some(s) => anyhow::bail!(
            "the Azure SDK check failed ({s}):\n{output}\n--- azure-fake log (tail)\n{}",
            fake.log()
        ),
        None => anyhow::bail!(
            "check_sdk.py did not finish within 300 s:\n{output}\n--- azure-fake log (tail)\n{}",
            fake.log()
        ),
    }
    assert!(output.contains(" passed, 0 failed"), "{output}");

    let status = fake.stop();
    assert!(
        status.success(),
        "azure-fake exit status after SIGTERM: {status}"
    );
    assert!(!ready.exists(), "ready.json should be removed on shutdown");
    Ok(())
}
