use std::process::ExitCode;

use clap::Parser;
use sidecar::cli::Cli;
use sidecar::config::Config;
use sidecar::identity::Env;

fn main() -> ExitCode {
    // No core dumps: they would hold secret values and tokens.
    let _ = rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable);
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sidecar: error: {}", sidecar::error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    sidecar::cli::init_logging(cli.log_format, &cli.log_level)?;
    let cfg = Config::load(cli.config.as_deref(), cli.overrides())?;
    if cli.check_config {
        return match sidecar::check::check(&cfg, &Env::from_process()) {
            Ok(plan) => {
                print!("{plan}");
                Ok(())
            }
            Err(plan) => {
                print!("{plan}");
                anyhow::bail!("the configuration check failed (see above)")
            }
        };
    }
    // One thread: the sidecar mostly waits on the network, and every extra thread costs
    // memory in a pod that should stay small.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(sidecar::runner::run(cfg, Env::from_process()))
}
