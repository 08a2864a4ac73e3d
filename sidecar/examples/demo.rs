//! Runs the sidecar on this machine against the local test vault (tests/azure-fake), with
//! workload identity, and shows what it delivers:
//!
//! ```sh
//! cargo run -p sidecar --example demo
//! ```
//!
//! It starts the test vault (Key Vault, Entra ID token endpoint) on localhost, stores three
//! secrets, runs the sidecar's real code path (config, identity, Key Vault client, atomic
//! delivery to a tmpfs directory), prints the files, then rotates one secret in the vault
//! and shows the update arriving.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use azure_fake::{FakeAzure, Options};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sidecar::config::{Config, Overrides};
use sidecar::identity::Env;

fn jwt() -> String {
    let exp = time::OffsetDateTime::now_utc().unix_timestamp() + 3600;
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"RS256","typ":"JWT"}"#);
    let claims = URL_SAFE_NO_PAD.encode(
        format!(r#"{{"aud":["api://AzureADTokenExchange"],"sub":"system:serviceaccount:demo:app","exp":{exp}}}"#),
    );
    format!(
        "{header}.{claims}.{}",
        URL_SAFE_NO_PAD.encode(b"demo-signature")
    )
}

fn show(dir: &std::path::Path) {
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    for n in names {
        let p = dir.join(&n);
        let meta = std::fs::symlink_metadata(&p).unwrap();
        let kind = if meta.file_type().is_symlink() {
            format!("-> {}", std::fs::read_link(&p).unwrap().display())
        } else {
            "(directory)".into()
        };
        println!("  {:<28} {kind}", n.to_string_lossy());
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let work = tempfile::tempdir()?;
    let token_file = work.path().join("federated-token");
    std::fs::write(&token_file, jwt())?;
    let fake = FakeAzure::start(Options {
        federated_token_file: Some(token_file.clone()),
        ..Options::default()
    })
    .await?;
    fake.set_secret("db-password", "correct horse battery staple", None);
    fake.set_secret("api-key", "demo-api-key-1", None);
    fake.set_secret("feature-flags", "eyJkYXJrTW9kZSI6dHJ1ZX0=", None);
    println!(
        "test vault: {} (Entra ID at {})",
        fake.vault_url(),
        fake.authority_host()
    );

    let out = tempfile::Builder::new()
        .prefix("sidecar-demo-")
        .tempdir_in("/dev/shm")?;
    let config = work.path().join("sidecar.yaml");
    std::fs::write(
        &config,
        format!(
            "vaultUrl: {}\nrefreshInterval: 1s\nobjects:\n  - objectName: db-password\n    objectAlias: db-password.txt\n  - objectName: api-key\n    filePermission: \"0440\"\n  - objectName: feature-flags\n    objectAlias: flags.json\n    objectEncoding: base64\n",
            fake.vault_url()
        ),
    )?;
    println!(
        "config ({}):\n{}",
        config.display(),
        std::fs::read_to_string(&config)?
    );
    let cfg = Config::load(
        Some(&config),
        Overrides {
            output_dir: Some(out.path().to_owned()),
            ca_file: Some(fake.ca_file().to_owned()),
            // The test vault lives on localhost, which no real Key Vault challenge names.
            disable_challenge_resource_verification: true,
            http_addr: Some("off".into()),
            ..Default::default()
        },
    )?;
    let env = Env::from_pairs(&[
        ("AZURE_CLIENT_ID", &fake.options().client_id),
        ("AZURE_TENANT_ID", &fake.options().tenant_id),
        ("AZURE_FEDERATED_TOKEN_FILE", token_file.to_str().unwrap()),
        ("AZURE_AUTHORITY_HOST", &fake.authority_host()),
    ]);
    let _ = sidecar::cli::init_logging(sidecar::cli::LogFormat::Text, "warn");
    let runner = tokio::spawn(sidecar::runner::run(cfg, env));

    let wait_for = |name: &'static str, want: &'static str| {
        let dir = out.path().to_owned();
        async move {
            let t = Instant::now();
            loop {
                if std::fs::read_to_string(dir.join(name)).is_ok_and(|v| v == want) {
                    return t.elapsed();
                }
                assert!(
                    t.elapsed() < Duration::from_secs(30),
                    "{name} never showed {want:?}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    let took = wait_for("api-key", "demo-api-key-1").await;
    println!(
        "delivered to {} (tmpfs) in {} ms:",
        out.path().display(),
        took.as_millis()
    );
    show(out.path());
    for f in ["db-password.txt", "api-key", "flags.json"] {
        let p = out.path().join(f);
        let mode =
            std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&p)?.permissions()) & 0o777;
        println!("  {f} (mode {mode:o}): {}", std::fs::read_to_string(&p)?);
    }

    println!("\nrotating api-key in the vault...");
    fake.set_secret("api-key", "demo-api-key-2", None);
    let took = wait_for("api-key", "demo-api-key-2").await;
    println!(
        "api-key now reads {:?} ({} ms later); the ..data link moved to the new set:",
        std::fs::read_to_string(out.path().join("api-key"))?,
        took.as_millis()
    );
    show(out.path());
    let stats = fake.stats();
    println!(
        "\ntest vault saw {} secret reads and issued {} token(s)",
        stats.vault_get_requests(),
        stats.total_tokens()
    );
    runner.abort();
    Ok(())
}
