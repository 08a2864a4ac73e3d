//! One soak run: start everything, load it for `--duration`, then stop in order, check,
//! and report.

use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::binaries::{self, Binaries};
use crate::cli::Args;
use crate::hygiene::{self, Needles, Scan};
use crate::kms::{self, Backend, Client, Counters, Plugin, Rotations, Rotator, Samples, lock};
use crate::memory::{self, Series, mib};
use crate::report::Report;
use crate::sidecar::{self, FaultLog, FileChecks, Sidecar, SidecarOptions, Vault};

const PROGRESS_EVERY: Duration = Duration::from_secs(10);
const CHECK_EVERY: Duration = Duration::from_millis(250);
const REDECRYPT_EVERY: Duration = Duration::from_secs(10);

/// Everything started before the clock runs.
struct World {
    work: tempfile::TempDir,
    bins: Binaries,
    backend: Backend,
    ks: PathBuf,
    cli_log: PathBuf,
    first_key: String,
    plugin: Plugin,
    channel: tonic::transport::Channel,
    vault: Arc<Vault>,
    sidecar: Sidecar,
}

async fn start(args: &Args) -> anyhow::Result<World> {
    let no_build = args.no_build;
    let bins = tokio::task::spawn_blocking(move || binaries::prepare(!no_build)).await??;
    let work = tempfile::Builder::new()
        .prefix("soak-")
        .tempdir()
        .context("creating the working directory")?;
    let dir = work.path().to_owned();
    let backend = Backend::start(&dir, args.software)?;
    let ks = dir.join("ks");
    let cli_log = dir.join("kms-cli.log");
    let first_key = kms::key_command(
        &bins.kms_plugin,
        &["key", "init"],
        &ks,
        &backend.args,
        &cli_log,
    )
    .await?;
    let plugin = Plugin::start(&bins.kms_plugin, &ks, &backend.args, &dir).await?;
    let channel = kms::connect(&plugin.socket).await?;
    let secrets = args.secrets;
    let d = dir.clone();
    let vault = tokio::task::spawn_blocking(move || Vault::start(&d, secrets)).await??;
    let sidecar = Sidecar::start(
        &bins.sidecar,
        &vault,
        &dir,
        &SidecarOptions {
            refresh_interval: args.refresh_interval,
            request_timeout: args.request_timeout,
        },
    )
    .await?;
    Ok(World {
        work,
        bins,
        backend,
        ks,
        cli_log,
        first_key,
        plugin,
        channel,
        vault,
        sidecar,
    })
}

/// Runs the soak; `Ok(true)` when every criterion holds.
pub async fn run(args: Args) -> anyhow::Result<bool> {
    args.validate()?;
    // From here on Ctrl-C is ours: the children are stopped and the report still written.
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let seed = args.seed.unwrap_or_else(rand::random);
    let mut w = tokio::select! {
        w = start(&args) => w?,
        _ = sigint.recv() => anyhow::bail!("interrupted while starting"),
    };
    println!(
        "soak: {} of {} (build: {}), KMS backend {}, rotation every {}, {} secrets refreshed every {}; seed {seed}; work dir {}",
        humantime::format_duration(args.duration),
        if args.software || w.backend.swtpm.is_none() {
            "kms-plugin + sidecar"
        } else {
            "kms-plugin on swtpm + sidecar"
        },
        w.bins.profile,
        w.backend.label,
        humantime::format_duration(args.rotate_every),
        args.secrets,
        humantime::format_duration(args.refresh_interval),
        w.work.path().display(),
    );

    // ---- load
    let counters = Arc::new(Counters::default());
    counters.start_clock();
    let samples = Arc::new(Samples::default());
    let (stop_load_tx, stop_load) = watch::channel(false);
    let (stop_check_tx, stop_check) = watch::channel(false);
    let mut tasks: Vec<JoinHandle<()>> = Vec::new();
    for t in 0..args.kms_clients {
        tasks.push(tokio::spawn(kms::client(
            t,
            Client::new(w.channel.clone()),
            stop_load.clone(),
            Arc::clone(&counters),
            Arc::clone(&samples),
        )));
    }
    let current_key = Arc::new(Mutex::new(w.first_key.clone()));
    tasks.push(tokio::spawn(kms::status_watcher(
        Client::new(w.channel.clone()),
        stop_load.clone(),
        Arc::clone(&counters),
        Arc::clone(&current_key),
    )));
    tasks.push(tokio::spawn(kms::redecrypter(
        Client::new(w.channel.clone()),
        REDECRYPT_EVERY,
        stop_load.clone(),
        Arc::clone(&samples),
        Arc::clone(&counters),
    )));
    let rotations = Arc::new(Mutex::new(Rotations::default()));
    let rotator = Rotator {
        bin: w.bins.kms_plugin.clone(),
        ks: w.ks.clone(),
        backend: w.backend.args.clone(),
        cli_log: w.cli_log.clone(),
        plugin_pid: w.plugin.child.pid(),
        every: args.rotate_every,
    };
    tasks.push(tokio::spawn(rotator.run(
        Client::new(w.channel.clone()),
        stop_load.clone(),
        Arc::clone(&counters),
        Arc::clone(&samples),
        Arc::clone(&rotations),
    )));
    let faults = Arc::new(Mutex::new(FaultLog::default()));
    tasks.push(tokio::spawn(sidecar::value_changer(
        Arc::clone(&w.vault),
        seed,
        stop_load.clone(),
    )));
    tasks.push(tokio::spawn(sidecar::fault_injector(
        Arc::clone(&w.vault),
        seed.wrapping_add(1),
        stop_load.clone(),
        Arc::clone(&faults),
    )));
    let checks = Arc::new(FileChecks::default());
    let checker = {
        let (vault, dir, checks) = (
            Arc::clone(&w.vault),
            w.sidecar.out.path().to_owned(),
            Arc::clone(&checks),
        );
        std::thread::spawn(move || sidecar::checker(vault, dir, CHECK_EVERY, stop_check, checks))
    };

    let mut rss = [
        Series::new("kms-plugin", w.plugin.child.pid()),
        Series::new("sidecar", w.sidecar.child.pid()),
    ];
    let warm_up = args.warm_up();
    let start = Instant::now();
    let mut interrupted = false;
    let mut died: Vec<String> = Vec::new();
    let mut next_progress = PROGRESS_EVERY;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = sigint.recv() => interrupted = true,
        }
        let at = start.elapsed();
        if interrupted {
            println!("soak: SIGINT at {:.0}s: stopping early", at.as_secs_f64());
            break;
        }
        for s in &mut rss {
            s.sample(at);
        }
        for c in [&mut w.plugin.child, &mut w.sidecar.child]
            .into_iter()
            .chain(w.backend.swtpm.as_mut())
        {
            if let Some(st) = c.exit_status() {
                died.push(format!(
                    "{} exited at {:.0}s ({st}); log tail:\n{}",
                    c.name,
                    at.as_secs_f64(),
                    c.log_tail(15)
                ));
            }
        }
        if !died.is_empty() {
            println!(
                "soak: a process under test died: stopping\n{}",
                died.join("\n")
            );
            break;
        }
        if at >= next_progress {
            next_progress += PROGRESS_EVERY;
            progress(at, &args, &counters, &rotations, &checks, &faults, &w, &rss).await;
        }
        if at >= args.duration {
            break;
        }
    }
    let elapsed = start.elapsed();

    // ---- stop the load, then check
    let _ = stop_load_tx.send(true);
    for t in tasks {
        if tokio::time::timeout(Duration::from_secs(60), t)
            .await
            .is_err()
        {
            died.push("a load task did not stop within 60 s".into());
        }
    }
    w.vault.fake.clear_faults();
    let plugin_alive = w.plugin.child.exit_status().is_none();
    let sidecar_alive = w.sidecar.child.exit_status().is_none();

    // Everything kept, under every key, decrypts on a fresh connection.
    let final_redecrypt = if plugin_alive {
        let mut c = Client::new(kms::connect(&w.plugin.socket).await?);
        let n = samples.keys().iter().map(|k| k.2).sum::<usize>();
        let failed = kms::redecrypt_all(&mut c, &samples, &counters).await;
        Some((n, failed))
    } else {
        None
    };

    // A new value for every secret, faults cleared: every file must follow.
    let converge_within = args.request_timeout + args.refresh_interval * 5 + Duration::from_secs(5);
    let changes_during = w.vault.changes.load(Relaxed);
    let converged = if sidecar_alive {
        sidecar::change_all(&w.vault);
        let dir = w.sidecar.out.path().to_owned();
        Some(sidecar::converge(&w.vault, &dir, converge_within).await)
    } else {
        None
    };
    let _ = stop_check_tx.send(true);
    let _ = checker.join();

    let syncs = w.sidecar.counters("syncs").await.unwrap_or_default();
    let fetches = w.sidecar.counters("fetches").await.unwrap_or_default();
    let cpu = [
        memory::cpu_time(w.plugin.child.pid()),
        memory::cpu_time(w.sidecar.child.pid()),
    ];
    let fake_stats = w.vault.fake.stats();

    // Stop both as Kubernetes would, with SIGTERM.
    drop(w.channel);
    let sidecar_exit = w.sidecar.child.terminate(Duration::from_secs(15));
    let plugin_exit = w.plugin.child.terminate(Duration::from_secs(15));

    // ---- logs
    let needles = Needles {
        value_markers: w.vault.value_markers(),
        seeds: samples.seed_hashes(),
    };
    let logs = [
        w.plugin.child.log.clone(),
        w.sidecar.child.log.clone(),
        w.cli_log.clone(),
    ];
    let seeds_checked = needles.seeds.len();
    let scan = tokio::task::spawn_blocking(move || -> anyhow::Result<Scan> {
        let mut s = Scan::default();
        for l in &logs {
            hygiene::scan(l, &needles, &mut s)?;
        }
        Ok(s)
    })
    .await??;

    // ---- report
    let mut r = Report::new(format!(
        "Soak: {} ({} build)",
        humantime::format_duration(round_s(elapsed)),
        w.bins.profile
    ));
    r.row("command", std::env::args().collect::<Vec<_>>().join(" "));
    r.row(
        "duration",
        format!(
            "{} of {} planned; warm-up {}",
            humantime::format_duration(round_s(elapsed)),
            humantime::format_duration(args.duration),
            humantime::format_duration(warm_up)
        ),
    );
    r.row("seed", seed.to_string());
    r.row("KMS backend", w.backend.label.clone());
    let ok = counters.ok();
    r.row(
        "KMS requests ok",
        format!(
            "{ok} ({:.0}/s): Encrypt {}, Decrypt {}, Status {}, re-Decrypt of kept samples {}",
            ok as f64 / elapsed.as_secs_f64(),
            counters.encrypts.load(Relaxed),
            counters.decrypts.load(Relaxed),
            counters.statuses.load(Relaxed),
            counters.redecrypts.load(Relaxed)
        ),
    );
    r.row("KMS requests failed", counters.failed().to_string());
    let rot = lock(&rotations);
    let mut cli_ms: Vec<u128> = rot.done.iter().map(|x| x.cli.as_millis()).collect();
    cli_ms.sort_unstable();
    let visible_max = rot
        .done
        .iter()
        .map(|x| x.visible_after)
        .max()
        .unwrap_or_default();
    r.row(
        "rotations",
        format!(
            "{} ({} failed); `key rotate` median {} ms, max {} ms; Status switched at most {} ms after SIGHUP",
            rot.done.len(),
            rot.errors.len(),
            cli_ms.get(cli_ms.len() / 2).copied().unwrap_or(0),
            cli_ms.last().copied().unwrap_or(0),
            visible_max.as_millis()
        ),
    );
    let keys = samples.keys();
    r.row(
        "keys",
        format!(
            "{} key ids used by Encrypt; {} samples kept (at most 64 per key)",
            keys.len(),
            keys.iter().map(|k| k.2).sum::<usize>()
        ),
    );
    if let Some((n, failed)) = final_redecrypt {
        r.row(
            "final re-Decrypt",
            format!("{n} samples under {} keys, {failed} failed", keys.len()),
        );
    }
    r.row(
        "sidecar syncs (/metrics)",
        format!(
            "{} total: {}",
            syncs.values().sum::<f64>(),
            fmt_counts(&syncs)
        ),
    );
    r.row("sidecar reads (/metrics)", fmt_counts(&fetches));
    let fl = lock(&faults);
    r.row(
        "fault windows",
        format!(
            "{}: {}",
            fl.total(),
            fl.windows
                .iter()
                .map(|(k, (n, d))| format!("{} x{n} ({:.0} s)", k.label(), d.as_secs_f64()))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    );
    r.row(
        "fake vault",
        format!(
            "{} vault requests, {} faults applied, {} tokens issued",
            fake_stats.vault_requests(),
            fake_stats.faults_applied,
            fake_stats.total_tokens()
        ),
    );
    r.row(
        "value changes",
        format!(
            "{changes_during} during the run + {} at the end; {} values set in all; token file rewritten {} times",
            args.secrets,
            w.vault.values_set(),
            w.vault.token_rewrites.load(Relaxed)
        ),
    );
    let reads = checks.reads.load(Relaxed);
    r.row(
        "file checks",
        format!(
            "{reads} reads in {} rounds: {} latest, {} an older value, {} lost; longest lag behind the vault {:.1} s",
            checks.rounds.load(Relaxed),
            checks.latest.load(Relaxed),
            checks.older.load(Relaxed),
            checks.lost.load(Relaxed),
            checks.max_lag().as_secs_f64()
        ),
    );
    match &converged {
        Some(Ok(t)) => r.row(
            "convergence after faults",
            format!("{:.1} s", t.as_secs_f64()),
        ),
        Some(Err(e)) => r.row("convergence after faults", e.clone()),
        None => r.row("convergence after faults", "not checked (the sidecar died)"),
    }
    let mut spreads = Vec::new();
    for (s, cpu) in rss.iter().zip(cpu) {
        let cpu_s = cpu.map_or("?".to_owned(), |c| {
            format!(
                "{:.1} s CPU ({:.0}% of a core)",
                c.as_secs_f64(),
                c.as_secs_f64() * 100.0 / elapsed.as_secs_f64()
            )
        });
        match s.spread(warm_up) {
            Some(sp) => {
                r.row(
                    format!("RSS {}", s.name),
                    format!(
                        "start {}, end {}; after warm-up min {}, max {}, spread {:.1}% ({} samples); {cpu_s}",
                        mib(sp.first),
                        mib(sp.last),
                        mib(sp.min),
                        mib(sp.max),
                        sp.percent,
                        sp.after_warm_up
                    ),
                );
                spreads.push((s.name, Some(sp)));
            }
            None => {
                r.row(
                    format!("RSS {}", s.name),
                    format!("no sample after warm-up; {cpu_s}"),
                );
                spreads.push((s.name, None));
            }
        }
    }
    r.row(
        "logs scanned",
        format!(
            "{} lines, {} ({} seeds, {} secret values looked for)",
            scan.lines,
            mib(scan.bytes / 1024),
            seeds_checked,
            w.vault.values_set()
        ),
    );

    // ---- criteria
    r.criterion(
        "ran the full duration",
        !interrupted && died.is_empty() && elapsed >= args.duration,
        if interrupted {
            "interrupted (SIGINT)".to_owned()
        } else if !died.is_empty() {
            died.join("; ")
        } else {
            format!("{:.0} s", elapsed.as_secs_f64())
        },
    );
    r.criterion(
        "zero failed KMS requests",
        counters.failed() == 0 && ok > 0,
        if counters.failed() == 0 {
            format!("{ok} ok, 0 failed")
        } else {
            format!(
                "{} failed, first: {}",
                counters.failed(),
                counters.first_failures().join("; ")
            )
        },
    );
    let want_rotation = elapsed > args.rotate_every + Duration::from_secs(5);
    r.criterion(
        "every rotation took effect",
        rot.errors.is_empty() && (!want_rotation || !rot.done.is_empty()),
        if rot.errors.is_empty() {
            format!(
                "{} rotations, each in Status within {ROTATION_LIMIT} s of SIGHUP and used by the next Encrypt",
                rot.done.len()
            )
        } else {
            rot.errors.join("; ")
        },
    );
    let mut expected_keys: Vec<&str> = vec![w.first_key.as_str()];
    expected_keys.extend(rot.done.iter().map(|x| x.key_id.as_str()));
    let missing: Vec<&str> = expected_keys
        .iter()
        .copied()
        .filter(|k| !keys.iter().any(|(id, _, kept)| id == k && *kept > 0))
        .collect();
    r.criterion(
        "old ciphertexts still decrypt",
        matches!(final_redecrypt, Some((n, 0)) if n > 0) && missing.is_empty(),
        match final_redecrypt {
            None => "not checked (the plugin died)".to_owned(),
            Some((n, f)) if missing.is_empty() => {
                format!(
                    "{n} samples under {} keys re-decrypted at the end, {f} failed",
                    keys.len()
                )
            }
            Some(_) => format!("no sample under key(s) {}", missing.join(", ")),
        },
    );
    let lost = checks.lost.load(Relaxed);
    r.criterion(
        "zero lost secrets",
        lost == 0 && reads > 0,
        if lost == 0 {
            format!("{reads} reads, every one a value once set")
        } else {
            format!(
                "{lost} bad reads, first: {}",
                checks.first_losses().join("; ")
            )
        },
    );
    r.criterion(
        "files converge once faults stop",
        matches!(converged, Some(Ok(_))),
        match &converged {
            Some(Ok(t)) => format!(
                "every file at a new value {:.1} s after it was set (limit {} s)",
                t.as_secs_f64(),
                converge_within.as_secs()
            ),
            Some(Err(e)) => e.clone(),
            None => "the sidecar died".to_owned(),
        },
    );
    for (name, sp) in &spreads {
        let (ok, detail) = match sp {
            Some(sp) if sp.after_warm_up >= 5 => (
                sp.percent <= args.max_rss_spread,
                format!(
                    "{:.1}% (limit {}%): {} to {}",
                    sp.percent,
                    args.max_rss_spread,
                    mib(sp.min),
                    mib(sp.max)
                ),
            ),
            _ => (false, "too few samples after warm-up".to_owned()),
        };
        r.criterion(format!("RSS flat after warm-up: {name}"), ok, detail);
    }
    r.criterion(
        "no secret in any log",
        scan.findings == 0,
        if scan.findings == 0 {
            "no secret value, DEK seed or JWT in the plugin, CLI or sidecar logs".to_owned()
        } else {
            format!("{} lines, e.g. {}", scan.findings, scan.examples.join("; "))
        },
    );
    let exit_ok = |e: &anyhow::Result<std::process::ExitStatus>| matches!(e, Ok(s) if s.success());
    r.criterion(
        "clean stop on SIGTERM",
        exit_ok(&plugin_exit) && exit_ok(&sidecar_exit),
        format!(
            "kms-plugin: {}; sidecar: {}",
            show_exit(&plugin_exit),
            show_exit(&sidecar_exit)
        ),
    );
    r.criterion(
        "faults and changes exercised",
        fl.total() > 0 && changes_during > 0,
        format!(
            "{} fault windows, {changes_during} value changes",
            fl.total()
        ),
    );

    let md = r.markdown();
    println!("\n{md}");
    if let Some(path) = &args.report {
        std::fs::write(path, &md).with_context(|| format!("writing {}", path.display()))?;
        println!("soak: report written to {}", path.display());
    }
    for f in r.failures() {
        println!("soak: FAILED: {f}");
    }
    if args.keep_work_dir {
        let kept = w.work.keep();
        println!("soak: work dir kept: {}", kept.display());
    }
    Ok(r.passed())
}

const ROTATION_LIMIT: u64 = 10;

fn round_s(d: Duration) -> Duration {
    Duration::from_secs(d.as_secs())
}

fn fmt_counts(m: &std::collections::BTreeMap<String, f64>) -> String {
    m.iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn show_exit(e: &anyhow::Result<std::process::ExitStatus>) -> String {
    match e {
        Ok(s) => s.to_string(),
        Err(e) => format!("{e:#}"),
    }
}

#[allow(clippy::too_many_arguments)]
async fn progress(
    at: Duration,
    args: &Args,
    counters: &Counters,
    rotations: &Mutex<Rotations>,
    checks: &FileChecks,
    faults: &Mutex<FaultLog>,
    w: &World,
    rss: &[Series],
) {
    let syncs = w
        .sidecar
        .counters("syncs")
        .await
        .map_or("?".to_owned(), |m| format!("{}", m.values().sum::<f64>()));
    let (windows, now) = {
        let f = lock(faults);
        (f.total(), f.current.map_or("none", |k| k.label()))
    };
    let rot = lock(rotations);
    println!(
        "[{:>4}s/{}s] kms {} ok {} failed ({:.0}/s), {} rotations | files {} reads {} lost, {} syncs | faults {windows} (now: {now}), {} changes | rss {}",
        at.as_secs(),
        args.duration.as_secs(),
        counters.ok(),
        counters.failed(),
        counters.ok() as f64 / at.as_secs_f64(),
        rot.done.len() + rot.errors.len(),
        checks.reads.load(Relaxed),
        checks.lost.load(Relaxed),
        syncs,
        w.vault.changes.load(Relaxed),
        rss.iter()
            .map(|s| format!("{} {}", s.name, s.last().map_or("?".into(), mib)))
            .collect::<Vec<_>>()
            .join(", ")
    );
}
