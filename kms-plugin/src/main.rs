use std::process::ExitCode;

use clap::Parser;
use kms_plugin::cli::Cli;
use kms_plugin::config::LogFormat;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kms-plugin: error: {}", kms_plugin::error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let file = cli.file_config()?;
    let format = cli
        .log_format
        .or(file.log_format)
        .unwrap_or(LogFormat::Text);
    let level = cli
        .log_level
        .clone()
        .or_else(|| file.log_level.clone())
        .unwrap_or_else(|| "info".into());
    // Declared before the runtime, so it is dropped after it: every line is written out.
    let _log = kms_plugin::logging::init(format, &level)?;
    // Before any command can unseal a key.
    kms_plugin::hardening::apply();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(kms_plugin::cli::run(cli, file))
}
