//! `bench`: every benchmark of the project, on this machine, against the real binaries, in
//! one markdown report.
//!
//! ```text
//! cargo run --release -p bench -- --out docs/benchmarks.md   # full run, a few minutes
//! cargo run --release -p bench -- --quick                     # smoke run (< 1 min), stdout
//! cargo run --release -p bench -- --only kms --only tpm       # some sections only
//! ```
//!
//! It first builds `kms-plugin` and `sidecar` with its own profile
//! (`cargo build -p kms-plugin -p sidecar -p bench --bins [--release]`; bench's
//! `kms-floor` is the bare tonic floor), then runs, in order:
//! the KMS gRPC benchmark ([`kms_grpc`]), the TPM one on swtpm ([`kms_tpm`], skipped with a
//! note when swtpm is missing) and the sidecar one against the in-process test vault
//! ([`sidecar_sync`]). Progress goes to stderr, the report to stdout or `--out`. Numbers are
//! printed, never asserted; a section that fails is reported as failed, the others still
//! run, and the exit status is then non-zero (and `--out` is left untouched).

mod authority;
mod binaries;
mod kms_grpc;
mod kms_tpm;
mod machine;
mod plugin;
mod procfs;
mod report;
mod sidecar_sync;
mod stats;
mod swtpm;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};
use clap::{Parser, ValueEnum};

use crate::kms_tpm::TpmOutcome;
use crate::machine::Machine;
use crate::report::{Outcome, Run, Verdict};

/// Worker threads of the bench's own runtime (the gRPC and HTTP clients, the test vault's
/// clients): the plugin and the sidecar get the rest of the cores.
pub const CLIENT_THREADS: usize = 2;

/// Runs every benchmark of the project against the real binaries and writes a markdown
/// report.
#[derive(Debug, Parser)]
#[command(name = "bench")]
struct Cli {
    /// Write the report to this file instead of stdout.
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    /// Short phases and fewer samples (1 and 100 secrets): a smoke run under a minute.
    #[arg(long)]
    quick: bool,
    /// Run only this section; repeatable [default: all].
    #[arg(long, value_enum, value_name = "SECTION")]
    only: Vec<Section>,
    /// Print every measured KMS phase on stderr.
    #[arg(long, short)]
    verbose: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Section {
    /// Status/Encrypt/Decrypt over the Unix socket next to the gRPC floor.
    Kms,
    /// Start-up, rotation and the TPM / software ratio on swtpm.
    Tpm,
    /// Start to first sync next to the raw fetch, RSS, CPU per idle refresh.
    Sidecar,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let wants = |s: Section| cli.only.is_empty() || cli.only.contains(&s);

    // Built before any thread spawns processes (a copy still open for writing in a forked
    // child would make exec fail with ETXTBSY).
    let bins = binaries::build()?;
    let machine = Machine::describe(&binaries::workspace_root());
    let load_start = machine::loadavg();
    let started = Instant::now();

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(CLIENT_THREADS)
        .enable_all()
        .build()?;
    // Ctrl-C / SIGTERM drop the sections' futures, and with them every child process guard
    // (SIGKILL + reap) and temporary directory.
    let (kms, tpm, sidecar) = runtime.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let sections = async {
            let kms = section(wants(Section::Kms), "kms", async {
                kms_grpc::run(
                    &bins.kms_plugin,
                    &bins.kms_floor,
                    kms_grpc::Settings::new(cli.quick, CLIENT_THREADS),
                    cli.verbose,
                )
                .await
            })
            .await;
            let tpm = section(wants(Section::Tpm), "tpm", async {
                kms_tpm::run(&bins.kms_plugin, kms_tpm::Settings::new(cli.quick)).await
            })
            .await;
            let sidecar = section(wants(Section::Sidecar), "sidecar", async {
                sidecar_sync::run(&bins.sidecar, sidecar_sync::Settings::new(cli.quick)).await
            })
            .await;
            (kms, tpm, sidecar)
        };
        tokio::select! {
            r = sections => Ok(r),
            _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted (SIGINT)")),
            _ = term.recv() => Err(anyhow!("terminated (SIGTERM)")),
        }
    })?;
    drop(runtime);

    let run = Run {
        command: command_line(),
        build_command: bins.command.clone(),
        quick: cli.quick,
        machine,
        load_start,
        load_end: machine::loadavg(),
        wall: started.elapsed(),
        kms,
        tpm,
        sidecar,
    };
    let markdown = report::render(&run);
    let failed = run.kms.failed() || run.tpm.failed() || run.sidecar.failed();

    eprintln!();
    eprintln!(
        "bench: done in {} (binaries from {})",
        report::fmt_wall(run.wall),
        bins.built_in.display()
    );
    if let Outcome::Done(TpmOutcome::Skipped(why)) = &run.tpm {
        eprintln!("bench: the TPM section was SKIPPED: {why}");
    }
    for t in report::targets(&run) {
        let mark = match t.verdict {
            Verdict::Met => "met    ",
            Verdict::NotMet => "NOT MET",
            Verdict::NotMeasured => "-      ",
        };
        eprintln!("bench: target {mark} {}: {}", t.what, t.value);
    }

    match &cli.out {
        Some(path) if !failed => {
            std::fs::write(path, &markdown)
                .with_context(|| format!("writing {}", path.display()))?;
            eprintln!("bench: report written to {}", path.display());
        }
        Some(path) => {
            print!("{markdown}");
            bail!(
                "a section failed: {} left untouched, the report is on stdout",
                path.display()
            );
        }
        None => {
            print!("{markdown}");
            if failed {
                bail!("a section failed (see the report)");
            }
        }
    }
    Ok(())
}

/// Runs a section if selected; a failure is kept for the report (the others still run).
async fn section<T>(wanted: bool, name: &str, run: impl Future<Output = Result<T>>) -> Outcome<T> {
    if !wanted {
        return Outcome::NotRun;
    }
    let t = Instant::now();
    eprintln!("bench: == {name}");
    match run.await {
        Ok(v) => {
            eprintln!("bench: {name} done in {}", report::fmt_wall(t.elapsed()));
            Outcome::Done(v)
        }
        Err(e) => {
            eprintln!("bench: {name} FAILED: {e:#}");
            Outcome::Failed(format!("{e:#}"))
        }
    }
}

/// This invocation as one would type it: `cargo run --release -p bench -- ARGS`.
fn command_line() -> String {
    let mut cmd = String::from("cargo run");
    if machine::optimized() {
        cmd.push_str(" --release");
    }
    cmd.push_str(" -p bench");
    let args: Vec<String> = std::env::args().skip(1).map(|a| shell_quote(&a)).collect();
    if !args.is_empty() {
        cmd.push_str(" -- ");
        cmd.push_str(&args.join(" "));
    }
    cmd
}

fn shell_quote(s: &str) -> String {
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,@%+".contains(c));
    if plain {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cli_parses_repeated_sections() {
        let cli = Cli::try_parse_from([
            "bench", "--quick", "--only", "kms", "--only", "tpm", "--out", "x.md",
        ])
        .unwrap();
        assert!(cli.quick);
        assert_eq!(cli.only, [Section::Kms, Section::Tpm]);
        assert_eq!(cli.out, Some(PathBuf::from("x.md")));
        assert!(Cli::try_parse_from(["bench", "--only", "gpu"]).is_err());
    }

    #[test]
    fn arguments_are_quoted_only_when_needed() {
        assert_eq!(shell_quote("docs/benchmarks.md"), "docs/benchmarks.md");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }
}
