//! The command line. Every flag can also come from an environment variable (shown in
//! `--help`); the YAML file (`--config`) holds the CSI-shaped object list.

use std::path::PathBuf;

use clap::Parser;

use crate::config::{IdentityChoice, Overrides};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Parser)]
#[command(
    name = "sidecar",
    version,
    about = "Fetches a pod's secrets from Azure Key Vault with a managed identity and delivers them into an in-memory volume"
)]
pub struct Cli {
    /// YAML config in the shape of a Secrets Store CSI SecretProviderClass's parameters.
    #[arg(long, env = "SIDECAR_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The vault, e.g. https://myvault.vault.azure.net (or keyvaultName in the config).
    #[arg(long, env = "SIDECAR_VAULT_URL", value_name = "URL")]
    pub vault_url: Option<String>,
    /// A secret to fetch: NAME[@VERSION][=FILE]. Repeatable.
    #[arg(long = "secret", value_name = "SPEC")]
    pub secrets: Vec<String>,
    /// Where to deliver the files: an emptyDir with medium: Memory.
    #[arg(long, env = "SIDECAR_OUTPUT_DIR", value_name = "DIR")]
    pub output_dir: Option<PathBuf>,
    /// Deliver everything once and exit (for an init container).
    #[arg(long, env = "SIDECAR_ONCE")]
    pub once: bool,
    /// Check the configuration, output directory, CA file and identity settings, print
    /// the plan and exit, without any network request.
    #[arg(long, conflicts_with = "once")]
    pub check_config: bool,
    /// How often to look for new secret versions [default: 2m].
    #[arg(long, env = "SIDECAR_REFRESH_INTERVAL", value_name = "DURATION")]
    pub refresh_interval: Option<String>,
    /// Which identity to use [default: auto].
    #[arg(long, env = "SIDECAR_IDENTITY", value_enum)]
    pub identity: Option<IdentityChoice>,
    /// Entra tenant (else AZURE_TENANT_ID).
    #[arg(long, env = "SIDECAR_TENANT_ID")]
    pub tenant_id: Option<String>,
    /// Client id of the identity (else AZURE_CLIENT_ID).
    #[arg(long, env = "SIDECAR_CLIENT_ID")]
    pub client_id: Option<String>,
    /// AzurePublicCloud, AzureChinaCloud or AzureUSGovernmentCloud.
    #[arg(long, env = "SIDECAR_CLOUD")]
    pub cloud: Option<String>,
    /// Extra CA certificates (PEM) to trust besides the system's, e.g. for a TLS-inspecting proxy.
    #[arg(long, env = "SIDECAR_CA_FILE", value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
    /// Key Vault REST API version [default: 7.5].
    #[arg(long, env = "SIDECAR_API_VERSION")]
    pub api_version: Option<String>,
    /// Send tokens to a vault whose challenge names another domain (only for a vault behind
    /// a custom domain you trust).
    #[arg(long, env = "SIDECAR_DISABLE_CHALLENGE_RESOURCE_VERIFICATION")]
    pub disable_challenge_resource_verification: bool,
    /// Signal to send to the app when its secrets change (e.g. SIGHUP); needs --notify-process.
    #[arg(long, env = "SIDECAR_NOTIFY_SIGNAL", value_name = "SIGNAL")]
    pub notify_signal: Option<String>,
    /// Name of the app's process (as in /proc/PID/comm); needs shareProcessNamespace: true.
    #[arg(long, env = "SIDECAR_NOTIFY_PROCESS", value_name = "NAME")]
    pub notify_process: Option<String>,
    /// Command to run when the secrets change (split on spaces).
    #[arg(long, env = "SIDECAR_NOTIFY_COMMAND", value_name = "COMMAND")]
    pub notify_command: Option<String>,
    /// Time limit of one HTTP request to Entra ID, IMDS or Key Vault [default: 30s].
    #[arg(long, env = "SIDECAR_REQUEST_TIMEOUT", value_name = "DURATION")]
    pub request_timeout: Option<String>,
    /// Listener for /healthz, /readyz and /metrics [default: 127.0.0.1:8096]; "off" disables it.
    #[arg(long, env = "SIDECAR_HTTP_ADDR", value_name = "HOST:PORT")]
    pub http_addr: Option<String>,
    /// Directory where the Arc agent writes its challenge key files.
    #[arg(
        long,
        env = "SIDECAR_ARC_TOKEN_DIR",
        value_name = "DIR",
        hide_short_help = true
    )]
    pub arc_token_dir: Option<PathBuf>,
    /// Write secrets even if the output directory is on a disk. They will persist there.
    #[arg(long, env = "SIDECAR_DANGEROUSLY_ALLOW_DISK_OUTPUT")]
    pub dangerously_allow_disk_output: bool,
    /// Log format on stderr.
    #[arg(long, env = "SIDECAR_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Log filter: error, warn, info, debug.
    #[arg(long, env = "SIDECAR_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
}

impl Cli {
    pub fn overrides(&self) -> Overrides {
        Overrides {
            vault_url: self.vault_url.clone(),
            secrets: self.secrets.clone(),
            output_dir: self.output_dir.clone(),
            tenant_id: self.tenant_id.clone(),
            client_id: self.client_id.clone(),
            cloud: self.cloud.clone(),
            identity: self.identity,
            refresh_interval: self.refresh_interval.clone(),
            api_version: self.api_version.clone(),
            ca_file: self.ca_file.clone(),
            disable_challenge_resource_verification: self.disable_challenge_resource_verification,
            notify_signal: self.notify_signal.clone(),
            notify_process: self.notify_process.clone(),
            notify_command: self.notify_command.clone(),
            http_addr: self.http_addr.clone(),
            once: self.once,
            allow_disk_output: self.dangerously_allow_disk_output,
            arc_token_dir: self.arc_token_dir.clone(),
            request_timeout: self.request_timeout.clone(),
        }
    }
}

/// Structured logs on stderr; never a secret value or token in them.
pub fn init_logging(format: LogFormat, filter: &str) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .map_err(|e| anyhow::anyhow!("log level {filter:?} is not a valid filter: {e}"))?;
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    let r = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
    };
    r.map_err(|e| anyhow::anyhow!("setting up logging: {e}"))
}
