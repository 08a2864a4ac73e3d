//! `azure-fake serve --state-dir DIR ...`: runs the fake until SIGTERM/SIGINT, writing
//! `DIR/ca.pem` and then `DIR/ready.json` (atomically) once it is listening.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use azure_fake::{FakeAzure, Options};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "azure-fake",
    about = "Local Key Vault / Entra ID / IMDS / Arc HIMDS fake for integration tests"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve until SIGTERM or SIGINT.
    Serve(Serve),
}

#[derive(clap::Args)]
struct Serve {
    /// Directory for ca.pem and ready.json (created if missing).
    #[arg(long)]
    state_dir: PathBuf,
    /// JSON object mapping secret names to "value" or {"value", "contentType"?, "tags"?}.
    #[arg(long)]
    seed: Option<PathBuf>,
    /// Tenant id the token endpoint accepts.
    #[arg(long, default_value = azure_fake::DEFAULT_TENANT_ID)]
    tenant: String,
    /// Client id the token endpoint, IMDS and HIMDS accept.
    #[arg(long, default_value = azure_fake::DEFAULT_CLIENT_ID)]
    client_id: String,
    /// Client secret accepted by the token endpoint (none: secrets are refused).
    #[arg(long)]
    client_secret: Option<String>,
    /// Workload-identity assertions must equal this file's contents.
    #[arg(long)]
    federated_token_file: Option<PathBuf>,
    /// Where Arc HIMDS key files are written (default DIR/arc-tokens). The Azure SDKs only
    /// read them from /var/opt/azcmagent/tokens.
    #[arg(long)]
    arc_key_dir: Option<PathBuf>,
    /// Audience of vault tokens and the challenge's resource.
    #[arg(long, default_value = "https://vault.azure.net")]
    vault_resource: String,
    /// Lifetime of issued tokens, in seconds.
    #[arg(long, default_value_t = 3600)]
    token_lifetime_secs: u64,
    /// HTTPS port (0: any free port).
    #[arg(long, default_value_t = 0)]
    https_port: u16,
    /// Plain-HTTP port (0: any free port).
    #[arg(long, default_value_t = 0)]
    http_port: u16,
    /// Do not log requests to stderr.
    #[arg(long)]
    quiet: bool,
}

fn main() -> anyhow::Result<()> {
    let Command::Serve(args) = Cli::parse().command;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(serve(args))
}

async fn serve(args: Serve) -> anyhow::Result<()> {
    let seed = args
        .seed
        .as_deref()
        .map(azure_fake::load_seed)
        .transpose()?;
    let opts = Options {
        tenant_id: args.tenant,
        client_id: args.client_id,
        vault_resource: args.vault_resource,
        token_lifetime: Duration::from_secs(args.token_lifetime_secs),
        arc_key_dir: args.arc_key_dir.unwrap_or_default(),
        federated_token_file: args.federated_token_file,
        client_secret: args.client_secret,
        state_dir: Some(args.state_dir.clone()),
        https_port: args.https_port,
        http_port: args.http_port,
        log_requests: !args.quiet,
    };
    let fake = FakeAzure::start(opts).await?;
    if let Some(seed) = &seed {
        fake.seed(seed);
    }

    let ready = serde_json::to_string_pretty(&fake.ready_info())?;
    let ready_path = args.state_dir.join("ready.json");
    let tmp = args.state_dir.join(".ready.json.tmp");
    std::fs::write(&tmp, format!("{ready}\n"))
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &ready_path)
        .with_context(|| format!("renaming to {}", ready_path.display()))?;
    println!("{}", serde_json::to_string(&fake.ready_info())?);
    eprintln!("azure-fake: ready ({})", ready_path.display());

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        _ = term.recv() => {}
        r = tokio::signal::ctrl_c() => r.context("waiting for SIGINT")?,
    }
    eprintln!("azure-fake: stopping");
    let _ = std::fs::remove_file(&ready_path);
    drop(fake);
    Ok(())
}
