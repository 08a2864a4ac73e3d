//! The markdown report: a fixed preamble (what is measured and how), the machine, one
//! section per benchmark, memory, and the targets with met / not met.

use std::fmt::{self, Write as _};
use std::time::Duration;

use crate::kms_grpc::{self, KmsReport, Op, Ratio, Row, Server};
use crate::kms_tpm::{self, TpmOutcome, TpmReport};
use crate::machine::Machine;
use crate::procfs::mib;
use crate::sidecar_sync::{self, SidecarReport};
use crate::stats::Timing;

/// At the default log level, Encrypt and Decrypt p50 within this factor of the bare tonic
/// server's p50 at concurrency 1 and 16 ...
pub const KMS_RATIO_TARGET: f64 = 1.2;
/// ... and within this one at 64 ...
pub const KMS_RATIO_TARGET_64: f64 = 1.3;
/// ... with at least this share of its throughput at concurrency 1 and 16.
pub const KMS_THROUGHPUT_TARGET: f64 = 0.9;
/// Sidecar start-to-first-sync overhead over the raw fetch, at 100 secrets.
pub const SIDECAR_OVERHEAD_TARGET_MS: f64 = 20.0;
pub const SIDECAR_RSS_TARGET_MIB: f64 = 10.0;
pub const PLUGIN_RSS_TARGET_MIB: f64 = 20.0;

/// A section's result: not selected (`--only`), failed, or measured.
#[derive(Debug)]
pub enum Outcome<T> {
    NotRun,
    Failed(String),
    Done(T),
}

impl<T> Outcome<T> {
    pub fn done(&self) -> Option<&T> {
        match self {
            Outcome::Done(t) => Some(t),
            _ => None,
        }
    }

    pub fn failed(&self) -> bool {
        matches!(self, Outcome::Failed(_))
    }
}

/// Everything one run produced.
#[derive(Debug)]
pub struct Run {
    /// The command line, as the user would type it.
    pub command: String,
    /// The cargo command that built the measured binaries.
    pub build_command: String,
    pub quick: bool,
    pub machine: Machine,
    pub load_start: String,
    pub load_end: String,
    pub wall: Duration,
    pub kms: Outcome<KmsReport>,
    pub tpm: Outcome<TpmOutcome>,
    pub sidecar: Outcome<SidecarReport>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Met,
    NotMet,
    NotMeasured,
}

impl Verdict {
    fn of(met: bool) -> Self {
        if met { Verdict::Met } else { Verdict::NotMet }
    }

    fn label(self) -> &'static str {
        match self {
            Verdict::Met => "met",
            Verdict::NotMet => "**not met**",
            Verdict::NotMeasured => "not measured",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Target {
    pub what: String,
    pub verdict: Verdict,
    /// The measured value, or why there is none.
    pub value: String,
}

/// The targets of the issue, checked against the run (printed, never asserted).
pub fn targets(run: &Run) -> Vec<Target> {
    let mut out = Vec::new();
    let kms = run.kms.done();
    let concurrencies = kms.map_or_else(
        || kms_grpc::Settings::new(run.quick, crate::CLIENT_THREADS).concurrencies,
        |k| k.settings.concurrencies.clone(),
    );
    let find = |op: Op, c: usize| {
        kms.and_then(|k| {
            k.rows
                .iter()
                .find(|r| r.server == Server::Plugin && r.op == op && r.concurrency == c)
        })
    };
    let ratio = |r: Option<Ratio>| {
        r.map_or("?".to_owned(), |r| {
            format!("{:.2}× ({:.2}–{:.2})", r.median, r.min, r.max)
        })
    };
    for op in [Op::Encrypt, Op::Decrypt] {
        for &c in &concurrencies {
            let limit = if c >= 64 {
                KMS_RATIO_TARGET_64
            } else {
                KMS_RATIO_TARGET
            };
            let what = format!(
                "KMS {} p50 ≤ {limit}× the bare tonic server's at concurrency {c}, default log level",
                op.name()
            );
            out.push(match find(op, c).and_then(|r| r.p50_vs_bare) {
                Some(r) => Target {
                    what,
                    verdict: Verdict::of(r.median <= limit),
                    value: ratio(Some(r)),
                },
                None => not_measured(what, &run.kms),
            });
            if c >= 64 {
                continue;
            }
            let what = format!(
                "KMS {} throughput ≥ {KMS_THROUGHPUT_TARGET}× the bare tonic server's at concurrency {c}, default log level",
                op.name()
            );
            out.push(match find(op, c).and_then(|r| r.rps_vs_bare) {
                Some(r) => Target {
                    what,
                    verdict: Verdict::of(r.median >= KMS_THROUGHPUT_TARGET),
                    value: ratio(Some(r)),
                },
                None => not_measured(what, &run.kms),
            });
        }
    }

    let what = format!(
        "sidecar start-to-sync overhead < {SIDECAR_OVERHEAD_TARGET_MS} ms at {} secrets",
        sidecar_sync::STEADY_SECRETS
    );
    let row = run.sidecar.done().and_then(|s| {
        s.rows
            .iter()
            .find(|r| r.secrets == sidecar_sync::STEADY_SECRETS)
    });
    out.push(match row {
        Some(r) => Target {
            what,
            verdict: Verdict::of(r.overhead_ms < SIDECAR_OVERHEAD_TARGET_MS),
            value: format!("{:.1} ms", r.overhead_ms),
        },
        None => not_measured(what, &run.sidecar),
    });

    let what = format!(
        "sidecar RSS < {SIDECAR_RSS_TARGET_MIB} MiB ({} secrets, peak VmHWM)",
        sidecar_sync::STEADY_SECRETS
    );
    out.push(match run.sidecar.done() {
        Some(s) => Target {
            what,
            verdict: Verdict::of(mib(s.steady.hwm_kib) < SIDECAR_RSS_TARGET_MIB),
            value: format!("{:.1} MiB", mib(s.steady.hwm_kib)),
        },
        None => not_measured(what, &run.sidecar),
    });

    let what = format!("plugin RSS < {PLUGIN_RSS_TARGET_MIB} MiB (peak VmHWM under load)");
    out.push(match kms.and_then(|k| k.mem_after) {
        Some(m) => Target {
            what,
            verdict: Verdict::of(mib(m.hwm_kib) < PLUGIN_RSS_TARGET_MIB),
            value: format!("{:.1} MiB", mib(m.hwm_kib)),
        },
        None => not_measured(what, &run.kms),
    });
    out
}

fn not_measured<T>(what: String, outcome: &Outcome<T>) -> Target {
    Target {
        what,
        verdict: Verdict::NotMeasured,
        value: match outcome {
            Outcome::NotRun => "section not run (--only)".to_owned(),
            Outcome::Failed(_) => "section failed".to_owned(),
            Outcome::Done(_) => "no such measurement in this run".to_owned(),
        },
    }
}

pub fn render(run: &Run) -> String {
    let mut s = String::new();
    // Writing to a String cannot fail.
    let _ = write_report(&mut s, run);
    s
}

fn write_report(w: &mut String, run: &Run) -> fmt::Result {
    writeln!(w, "# Benchmarks")?;
    writeln!(w)?;
    writeln!(
        w,
        "<!-- Written by the bench tool (tests/bench): change the tool and run it again rather than editing this file. -->"
    )?;
    writeln!(w)?;
    if run.quick {
        writeln!(
            w,
            "> **Quick run**: short phases, few samples, 1 and 100 secrets. A smoke test of the \
             tool, not numbers to decide on."
        )?;
        writeln!(w)?;
    }
    writeln!(
        w,
        "Every benchmark of the project, run on one machine by one command (it took {}):",
        fmt_wall(run.wall)
    )?;
    writeln!(w)?;
    writeln!(w, "```sh\n{}\n```", run.command)?;
    writeln!(w)?;
    writeln!(
        w,
        "It builds the real binaries with its own profile (`{}`), runs them as a cluster \
         would, and writes this report. Numbers are printed, never asserted. The machine may \
         be noisy (shared cores), so every ratio is measured side by side in the same run \
         (interleaved phases, alternating runs) and holds better than the absolute numbers.",
        run.build_command
    )?;
    writeln!(w)?;

    write_machine(w, run)?;
    write_method(w, run)?;

    writeln!(w, "## KMS plugin over its Unix socket")?;
    writeln!(w)?;
    match &run.kms {
        Outcome::Done(k) => write_kms(w, k)?,
        other => write_missing(w, other)?,
    }

    writeln!(w, "## KMS plugin on a software TPM")?;
    writeln!(w)?;
    match &run.tpm {
        Outcome::Done(TpmOutcome::Measured(t)) => write_tpm(w, t)?,
        Outcome::Done(TpmOutcome::Skipped(why)) => {
            writeln!(
                w,
                "Skipped on this machine: {why}. The TPM rows (start to ready with 1 and 10 \
                 keys, rotation, TPM / software ratio) are missing from this report."
            )?;
            writeln!(w)?;
        }
        other => write_missing(w, other)?,
    }

    writeln!(w, "## Sidecar against the local test vault")?;
    writeln!(w)?;
    match &run.sidecar {
        Outcome::Done(s) => write_sidecar(w, s)?,
        other => write_missing(w, other)?,
    }

    write_memory(w, run)?;

    writeln!(w, "## Targets")?;
    writeln!(w)?;
    writeln!(w, "From the issue; printed, not asserted.")?;
    writeln!(w)?;
    for t in targets(run) {
        writeln!(w, "- {}: {} — {}", t.what, t.verdict.label(), t.value)?;
    }
    Ok(())
}

fn write_missing<T>(w: &mut String, outcome: &Outcome<T>) -> fmt::Result {
    match outcome {
        Outcome::Failed(e) => writeln!(w, "**Failed in this run**:\n\n```text\n{e}\n```")?,
        _ => writeln!(w, "Not run (`--only` left it out).")?,
    }
    writeln!(w)
}

fn write_machine(w: &mut String, run: &Run) -> fmt::Result {
    let m = &run.machine;
    writeln!(w, "## Machine")?;
    writeln!(w)?;
    writeln!(w, "| | |")?;
    writeln!(w, "|---|---|")?;
    writeln!(w, "| date | {} |", m.date)?;
    writeln!(w, "| CPUs (nproc) | {} |", m.nproc)?;
    writeln!(w, "| CPU model | {} |", m.cpu_model)?;
    let gib = |kib: Option<u64>| kib.map_or("?".to_owned(), |k| format!("{:.1}", mib(k) / 1024.0));
    writeln!(
        w,
        "| memory | {} GiB, {} GiB available at start |",
        gib(m.mem_total_kib),
        gib(m.mem_available_kib)
    )?;
    writeln!(w, "| kernel | Linux {} |", m.kernel)?;
    writeln!(
        w,
        "| load average (1, 5, 15 min) | {} at start, {} at the end |",
        run.load_start, run.load_end
    )?;
    writeln!(w, "| rustc | {} |", m.rustc)?;
    writeln!(
        w,
        "| build profile | {}{} |",
        m.profile,
        if m.profile == "release" {
            " (optimized, no debug assertions), the tool and the binaries alike"
        } else {
            " (debug assertions on: the numbers are NOT representative)"
        }
    )?;
    match &m.commit {
        Some((hash, dirty)) => writeln!(
            w,
            "| commit | {hash}{} |",
            if *dirty {
                ", dirty (tracked files differed from it)"
            } else {
                ""
            }
        )?,
        None => writeln!(w, "| commit | unknown (no git) |")?,
    }
    writeln!(w)
}

fn write_method(w: &mut String, run: &Run) -> fmt::Result {
    // The settings of this run (the defaults for a section that did not run).
    let k = run.kms.done().map_or_else(
        || kms_grpc::Settings::new(run.quick, crate::CLIENT_THREADS),
        |r| r.settings.clone(),
    );
    let t = match run.tpm.done() {
        Some(TpmOutcome::Measured(r)) => r.settings.clone(),
        _ => kms_tpm::Settings::new(run.quick),
    };
    let s = run.sidecar.done().map_or_else(
        || sidecar_sync::Settings::new(run.quick),
        |r| r.settings.clone(),
    );
    writeln!(w, "## Method")?;
    writeln!(w)?;
    writeln!(
        w,
        "- **KMS**: per concurrency, {:.1} s of unrecorded warm-up of every server and op, \
         then {} rounds of {} phases of {:.0} ms each ({} ms unrecorded at the start of \
         each). In a round, every plugin (or layer) phase of an op sits between two phases \
         of the bare server with the same op, and Status between two health phases; a \
         ratio is the median over the rounds of (the phase's p50 or req/s / the mean of the \
         two around it), with its min–max. p50, p99 and req/s are medians over the rounds. \
         Noise that lasts longer than a phase hits a phase and its references alike.",
        k.warmup.as_secs_f64(),
        k.rounds,
        kms_grpc::PHASES_PER_ROUND,
        k.phase().as_secs_f64() * 1000.0,
        k.phase_warmup.as_millis()
    )?;
    writeln!(
        w,
        "- **TPM**: medians of {} starts per ring size; {} sequential Encrypt+Decrypt pairs \
         per round, {} rounds alternating the TPM and the software backend, median of the \
         per-round p50s.",
        t.starts, t.calls, t.rounds
    )?;
    writeln!(
        w,
        "- **Sidecar**: {} secrets; {} runs per size, each a raw fetch then a sidecar run, \
         alternating; times are medians (min–max), the ratio and the overhead are medians of \
         the per-run ratio and difference. Steady state over {} s.",
        s.counts
            .iter()
            .map(usize::to_string)
            .collect::<Vec<_>>()
            .join(", "),
        s.runs,
        s.window.as_secs()
    )?;
    writeln!(
        w,
        "- **Memory and CPU**: VmRSS and VmHWM (peak) from /proc/PID/status; on-CPU time \
         from /proc/PID/task/*/schedstat. Percentiles are nearest-rank over every request \
         of a phase."
    )?;
    writeln!(w)
}

fn write_kms(w: &mut String, k: &KmsReport) -> fmt::Result {
    writeln!(
        w,
        "Four servers on Unix sockets, called as kube-apiserver calls a KMS plugin: over one \
         HTTP/2 connection each, concurrency N being N tasks multiplexing streams on it. \
         Encrypt gets 32-byte random DEK seeds, Decrypt ciphertexts made beforehand by the \
         same server. The client is tonic with {} worker threads, in the bench process, on \
         the same cores.",
        k.settings.client_threads
    )?;
    writeln!(w)?;
    writeln!(
        w,
        "- **{}**: `kms-floor` (tests/bench), a tonic server of the same \
         `v2.KeyManagementService` in its own process, with the plugin's runtime (2 worker \
         threads), that does nothing a plugin must: Encrypt echoes the plaintext, Decrypt \
         the ciphertext; no crypto, logs or metrics. The first floor.",
        Server::Bare.name()
    )?;
    writeln!(
        w,
        "- **{}**: the real `kms-plugin serve`, insecure software backend, `--http-addr \
         off`, no `--log-level`: one audit line (uid, key id) per Encrypt and Decrypt, \
         queued to the log writer thread. Its own gRPC health check \
         (`grpc.health.v1.Health/Check`) on the same connection is the second floor.",
        Server::Plugin.name()
    )?;
    writeln!(
        w,
        "- **{}**: the same with `--log-level warn` (no audit lines).",
        Server::PluginWarn.name()
    )?;
    writeln!(
        w,
        "- **{}**: `kms-floor --authority-layer`, the bare server with the plugin's \
         Unix-socket `:authority` layer on its connection. The client sends a valid \
         authority, so the layer decodes the first header block and passes everything \
         after it unchanged, reading the socket in 16 KiB pieces; h2 alone reads it in \
         smaller ones, which is why this row can be faster than the bare server under \
         concurrency.",
        Server::BareLayer.name()
    )?;
    writeln!(w)?;
    write_kms_table(w, &k.rows)?;
    writeln!(w)?;
    writeln!(
        w,
        "Where the CPU goes (on-CPU time per request of the server's process and of the \
         bench, medians over the rounds; they share the cores). When the cores are \
         saturated (high concurrency), latency and throughput follow CPU per request."
    )?;
    writeln!(w)?;
    writeln!(
        w,
        "| server | op | concurrency | server CPU µs/req | client CPU µs/req | server Δ vs bare µs |"
    )?;
    writeln!(w, "|---|---|---:|---:|---:|---:|")?;
    for r in &k.rows {
        let bare = k
            .rows
            .iter()
            .find(|b| b.server == Server::Bare && b.op == r.op && b.concurrency == r.concurrency);
        let delta = bare.map_or("".to_owned(), |b| {
            format!("{:+.1}", r.server_cpu_us - b.server_cpu_us)
        });
        writeln!(
            w,
            "| {} | {} | {} | {:.1} | {:.1} | {} |",
            r.server.name(),
            r.op.name(),
            r.concurrency,
            r.server_cpu_us,
            r.client_cpu_us,
            delta
        )?;
    }
    writeln!(w)?;
    writeln!(
        w,
        "The authority layer alone (`Rewriter`, in the bench process): the bytes a client \
         sent on one connection, recorded through a proxy in front of the bare server, fed \
         through a fresh layer in 16 KiB reads; median of 7 runs."
    )?;
    writeln!(w)?;
    writeln!(
        w,
        "| client | requests | bytes/request | ns/request | blocks re-encoded |"
    )?;
    writeln!(w, "|---|---:|---:|---:|---:|")?;
    for c in &k.layer.captures {
        writeln!(
            w,
            "| {} | {} | {:.0} | {:.0} | {} |",
            c.client, c.requests, c.bytes_per_request, c.ns_per_request, c.rewritten
        )?;
    }
    for m in &k.layer.missing {
        writeln!(w)?;
        writeln!(w, "Not measured: {m}")?;
    }
    writeln!(w)?;
    if let Some((a, b)) = k.reserved {
        writeln!(
            w,
            "Encryptions reserved under the plugin's active key in the key store: {a} → \
             {b}. The keeper reserves nonces ahead, in blocks of 4096 growing to 2^20 under \
             load (one manifest write with fsync each), off the request path; Encrypt and \
             Status each use one."
        )?;
        writeln!(w)?;
    }
    writeln!(
        w,
        "Plugin stderr (default log level): {} line(s){}.",
        k.plugin_log_lines,
        k.plugin_first_error
            .as_deref()
            .map(|l| format!("; first error: `{l}`"))
            .unwrap_or_default()
    )?;
    writeln!(w)
}

fn write_kms_table(w: &mut String, rows: &[Row]) -> fmt::Result {
    writeln!(
        w,
        "| server | op | concurrency | p50 µs | p99 µs | req/s | p50 / bare | req/s / bare | p50 / health |"
    )?;
    writeln!(w, "|---|---|---:|---:|---:|---:|---:|---:|---:|")?;
    let cell = |r: Option<Ratio>| {
        r.map_or("".to_owned(), |r| {
            format!("{:.2} ({:.2}–{:.2})", r.median, r.min, r.max)
        })
    };
    for r in rows {
        writeln!(
            w,
            "| {} | {} | {} | {:.1} | {:.1} | {:.0} | {} | {} | {} |",
            r.server.name(),
            r.op.name(),
            r.concurrency,
            r.p50_us,
            r.p99_us,
            r.rps,
            cell(r.p50_vs_bare),
            cell(r.rps_vs_bare),
            cell(r.p50_vs_health)
        )?;
    }
    for r in rows.iter().filter(|r| r.errors > 0) {
        writeln!(w)?;
        writeln!(
            w,
            "**Warning**: {} {} at concurrency {}: {} of {} requests failed (left out of the \
             latencies); first: `{}`",
            r.server.name(),
            r.op.name(),
            r.concurrency,
            r.errors,
            r.errors + r.ok,
            r.first_error.as_deref().unwrap_or("?")
        )?;
    }
    Ok(())
}

fn timing_row(w: &mut String, what: &str, t: &Timing) -> fmt::Result {
    writeln!(
        w,
        "| {what} | {:.1} | {:.1}–{:.1} | {} |",
        t.median_ms, t.min_ms, t.max_ms, t.samples
    )
}

fn write_tpm(w: &mut String, t: &TpmReport) -> fmt::Result {
    writeln!(
        w,
        "The real plugin with `--backend tpm` on a fresh swtpm (TCP, loopback). Start-up \
         unseals every key in the ring once (one TPM load and unseal per key); `key rotate` \
         seals a new key and writes the manifest; a running plugin picks the new key up at \
         its next reload (every `--reload-interval`, or at once on SIGHUP), unsealing only \
         that key. After start-up the TPM is not on the request path, which the last table \
         checks."
    )?;
    writeln!(w)?;
    writeln!(w, "| measurement | median ms | min–max ms | samples |")?;
    writeln!(w, "|---|---:|---:|---:|")?;
    timing_row(
        w,
        "start to first healthy Status over the socket, 1 key",
        &t.start_1,
    )?;
    timing_row(
        w,
        &format!(
            "start to first healthy Status over the socket, {} keys",
            t.ring_keys
        ),
        &t.start_many,
    )?;
    timing_row(w, "`key rotate`, the whole CLI process", &t.rotate_cli)?;
    timing_row(
        w,
        "rotation reaches the running plugin: SIGHUP right after `key rotate` to the first Status with the new key",
        &t.new_key_hup,
    )?;
    timing_row(
        w,
        &format!(
            "rotation reaches the running plugin, no signal: `key rotate` exited to the first Status with the new key (`--reload-interval {}`; the default is 5s)",
            kms_tpm::RELOAD_INTERVAL
        ),
        &t.new_key_interval,
    )?;
    writeln!(w)?;
    writeln!(
        w,
        "| op, concurrency 1 | TPM backend p50 µs | software backend p50 µs | TPM / software |"
    )?;
    writeln!(w, "|---|---:|---:|---:|")?;
    let (et, es) = t.encrypt_us;
    let (dt, ds) = t.decrypt_us;
    for (name, a, b) in [
        ("Encrypt", et, es),
        ("Decrypt", dt, ds),
        ("Encrypt + Decrypt", et + dt, es + ds),
    ] {
        writeln!(w, "| {name} | {a:.1} | {b:.1} | {:.2} |", a / b)?;
    }
    writeln!(w)
}

fn write_sidecar(w: &mut String, s: &SidecarReport) -> fmt::Result {
    writeln!(
        w,
        "The test vault (tests/azure-fake: Key Vault and Entra ID over HTTPS on localhost, \
         in the bench process) holds the secrets. Each run times the real `sidecar --once` \
         process from spawn to exit: start, workload-identity token exchange, challenge \
         discovery, every read, conversion, atomic publish to a tmpfs directory. Next to it, \
         the raw fetch of the same secrets: a new client from the sidecar's own HTTP builder \
         (same TLS stack, same CA loading), one token exchange, the same GETs at the same \
         concurrency (16), nothing else."
    )?;
    writeln!(w)?;
    writeln!(
        w,
        "| secrets | sidecar start → first complete sync ms | raw fetch ms | sidecar / raw | overhead ms |"
    )?;
    writeln!(w, "|---:|---:|---:|---:|---:|")?;
    for r in &s.rows {
        writeln!(
            w,
            "| {} | {:.1} ({:.1}–{:.1}) | {:.1} ({:.1}–{:.1}) | {:.2} | {:.1} |",
            r.secrets,
            r.sidecar.median_ms,
            r.sidecar.min_ms,
            r.sidecar.max_ms,
            r.raw.median_ms,
            r.raw.min_ms,
            r.raw.max_ms,
            r.ratio,
            r.overhead_ms
        )?;
    }
    writeln!(w)?;
    let st = &s.steady;
    writeln!(
        w,
        "Steady state: `sidecar --refresh-interval 1s` with {} secrets, nothing changing, measured over \
         {:.1} s after the first sync and 3 s of settling: {:.1} refresh cycles, \
         **{:.2} ms of sidecar CPU per idle refresh** (100 reads, compare, no write).",
        sidecar_sync::STEADY_SECRETS,
        st.window.as_secs_f64(),
        st.refreshes,
        st.cpu_ms_per_refresh
    )?;
    writeln!(w)
}

fn write_memory(w: &mut String, run: &Run) -> fmt::Result {
    writeln!(w, "## Memory")?;
    writeln!(w)?;
    let kms = run.kms.done();
    let side = run.sidecar.done().map(|s| &s.steady);
    if kms.is_none() && side.is_none() {
        writeln!(
            w,
            "Not measured: neither the KMS nor the sidecar section ran."
        )?;
        return writeln!(w);
    }
    writeln!(w, "| process | state | RSS MiB |")?;
    writeln!(w, "|---|---|---:|")?;
    let v = |kib: Option<u64>| kib.map_or("?".to_owned(), |k| format!("{:.1}", mib(k)));
    if let Some(k) = kms {
        let p = "kms-plugin (software backend, default log level)";
        writeln!(
            w,
            "| {p} | at rest: started, one client connected, before any load (VmRSS) | {} |",
            v(k.mem_rest.map(|m| m.rss_kib))
        )?;
        writeln!(
            w,
            "| {p} | under load: largest VmRSS sampled every 100 ms during the KMS phases | {} |",
            v(k.rss_under_load_kib)
        )?;
        writeln!(
            w,
            "| {p} | right after the load (VmRSS) | {} |",
            v(k.mem_after.map(|m| m.rss_kib))
        )?;
        writeln!(
            w,
            "| {p} | peak over the run (VmHWM) | {} |",
            v(k.mem_after.map(|m| m.hwm_kib))
        )?;
    }
    if let Some(st) = side {
        let p = format!("sidecar, {} secrets", sidecar_sync::STEADY_SECRETS);
        writeln!(
            w,
            "| {p} | at rest: median VmRSS sampled every 10 ms, refresh every 1 s | {} |",
            v(Some(st.rss_rest_kib))
        )?;
        writeln!(
            w,
            "| {p} | during refresh: largest VmRSS sample | {} |",
            v(Some(st.rss_refresh_kib))
        )?;
        writeln!(
            w,
            "| {p} | peak since start, first sync included (VmHWM) | {} |",
            v(Some(st.hwm_kib))
        )?;
    }
    writeln!(w)
}

/// `3 min 58 s`, `42.1 s`.
pub fn fmt_wall(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s < 60.0 {
        format!("{s:.1} s")
    } else {
        format!("{} min {:02} s", d.as_secs() / 60, d.as_secs() % 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::procfs::Mem;
    use crate::sidecar_sync::{Steady, SyncRow};

    fn machine() -> Machine {
        Machine {
            nproc: 2,
            cpu_model: "Test CPU".into(),
            mem_total_kib: Some(8 << 20),
            mem_available_kib: Some(6 << 20),
            kernel: "6.1.0".into(),
            rustc: "rustc 1.95.0".into(),
            profile: "release",
            commit: Some(("abc1234".into(), true)),
            date: "2026-01-01 00:00 UTC".into(),
        }
    }

    fn row(server: Server, op: Op, concurrency: usize, ratio: f64) -> Row {
        let r = |v: f64| {
            Some(Ratio {
                median: v,
                min: v - 0.1,
                max: v + 0.1,
            })
        };
        Row {
            server,
            op,
            concurrency,
            p50_us: 100.0 * ratio,
            p99_us: 200.0,
            rps: 10_000.0,
            p50_vs_bare: r(ratio),
            rps_vs_bare: r(1.0 / ratio),
            p50_vs_health: r(ratio),
            ok: 1000,
            errors: 0,
            first_error: None,
            server_cpu_us: 40.0,
            client_cpu_us: 50.0,
        }
    }

    fn timing(ms: f64) -> Timing {
        Timing {
            median_ms: ms,
            min_ms: ms,
            max_ms: ms,
            samples: 3,
        }
    }

    fn full_run() -> Run {
        let settings = kms_grpc::Settings::new(false, 2);
        let mut rows = Vec::new();
        for &c in &settings.concurrencies {
            rows.push(row(Server::Bare, Op::Encrypt, c, 1.0));
            rows.push(row(Server::Plugin, Op::Status, c, 1.05));
            rows.push(row(Server::Plugin, Op::Encrypt, c, 1.1));
            rows.push(row(Server::PluginWarn, Op::Encrypt, c, 1.05));
            // Decrypt misses the p50 target at 64 (and meets the throughput ones).
            rows.push(row(
                Server::Plugin,
                Op::Decrypt,
                c,
                if c == 64 { 1.35 } else { 1.1 },
            ));
        }
        let mem = Mem {
            rss_kib: 9 * 1024,
            hwm_kib: 11 * 1024,
        };
        Run {
            command: "cargo run --release -p bench -- --out docs/benchmarks.md".into(),
            build_command: "cargo build -p kms-plugin -p sidecar -p bench --bins --release".into(),
            quick: false,
            machine: machine(),
            load_start: "1.00 1.00 1.00".into(),
            load_end: "2.00 1.00 1.00".into(),
            wall: Duration::from_secs(200),
            kms: Outcome::Done(KmsReport {
                settings,
                rows,
                mem_rest: Some(mem),
                rss_under_load_kib: Some(10 * 1024),
                mem_after: Some(mem),
                reserved: Some((4096, 8192)),
                plugin_log_lines: 1,
                plugin_first_error: None,
                layer: crate::authority::LayerCost {
                    captures: vec![crate::authority::Capture {
                        client: "tonic".into(),
                        requests: 100,
                        bytes_per_request: 120.0,
                        ns_per_request: 60.0,
                        rewritten: 0,
                    }],
                    missing: vec!["grpc-go: go not found".into()],
                },
            }),
            tpm: Outcome::Done(TpmOutcome::Measured(TpmReport {
                settings: kms_tpm::Settings::new(false),
                start_1: timing(25.0),
                start_many: timing(150.0),
                ring_keys: 10,
                rotate_cli: timing(16.0),
                new_key_hup: timing(20.0),
                new_key_interval: timing(500.0),
                encrypt_us: (190.0, 192.0),
                decrypt_us: (190.0, 189.0),
            })),
            sidecar: Outcome::Done(SidecarReport {
                settings: sidecar_sync::Settings::new(false),
                rows: [1, 100, 1000]
                    .into_iter()
                    .map(|n| SyncRow {
                        secrets: n,
                        sidecar: timing(20.0),
                        raw: timing(10.0),
                        ratio: 2.0,
                        overhead_ms: 10.0,
                    })
                    .collect(),
                steady: Steady {
                    rss_rest_kib: 9 * 1024,
                    rss_refresh_kib: 9 * 1024 + 512,
                    hwm_kib: 9 * 1024 + 800,
                    refreshes: 20.0,
                    window: Duration::from_secs(20),
                    cpu_ms_per_refresh: 3.8,
                },
            }),
        }
    }

    /// Every table row has as many cells as its header.
    fn assert_tables_well_formed(md: &str) {
        let mut columns = None;
        for line in md.lines() {
            if line.starts_with('|') {
                let cells = line.matches('|').count();
                match columns {
                    None => columns = Some(cells),
                    Some(n) => assert_eq!(cells, n, "ragged table row: {line}"),
                }
            } else {
                columns = None;
            }
        }
    }

    #[test]
    fn a_full_report_has_every_section_and_target() {
        let run = full_run();
        let md = render(&run);
        assert_tables_well_formed(&md);
        for heading in [
            "# Benchmarks",
            "## Machine",
            "## Method",
            "## KMS plugin over its Unix socket",
            "## KMS plugin on a software TPM",
            "## Sidecar against the local test vault",
            "## Memory",
            "## Targets",
        ] {
            assert!(md.contains(&format!("\n{heading}\n")) || md.starts_with(heading));
        }
        assert!(md.contains("cargo run --release -p bench -- --out docs/benchmarks.md"));
        assert!(md.contains("| commit | abc1234, dirty"));
        assert!(!md.contains("Quick run"));
        let t = targets(&run);
        // p50 at 3 concurrencies and throughput at 2, for Encrypt and Decrypt; sidecar x2, plugin RSS.
        assert_eq!(t.len(), 2 * (3 + 2) + 3);
        let not_met: Vec<_> = t.iter().filter(|t| t.verdict == Verdict::NotMet).collect();
        assert_eq!(not_met.len(), 1);
        assert!(not_met[0].what.contains("Decrypt") && not_met[0].what.contains("64"));
        assert!(t.iter().all(|t| t.verdict != Verdict::NotMeasured));
    }

    #[test]
    fn skipped_failed_and_unselected_sections_are_said_so() {
        let mut run = full_run();
        run.quick = true;
        run.kms = Outcome::NotRun;
        run.tpm = Outcome::Done(TpmOutcome::Skipped("swtpm is not installed".into()));
        run.sidecar = Outcome::Failed("the vault did not start".into());
        let md = render(&run);
        assert_tables_well_formed(&md);
        assert!(md.contains("Quick run"));
        assert!(md.contains("Skipped on this machine: swtpm is not installed"));
        assert!(md.contains("the vault did not start"));
        assert!(md.contains("Not run (`--only` left it out)"));
        let t = targets(&run);
        assert!(t.iter().all(|t| t.verdict == Verdict::NotMeasured));
    }

    #[test]
    fn wall_times() {
        assert_eq!(fmt_wall(Duration::from_millis(42_100)), "42.1 s");
        assert_eq!(fmt_wall(Duration::from_secs(238)), "3 min 58 s");
    }
}
