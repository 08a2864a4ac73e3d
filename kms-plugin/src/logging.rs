//! Structured logs on stderr, text or JSON. Nothing secret is ever a field: requests are
//! logged by uid and key id only.
//!
//! Every Encrypt and Decrypt writes an audit line. Lines are formatted on the request's
//! thread and handed to a writer thread through a bounded, lossless queue
//! ([`QUEUE_LINES`]): a request waits for the disk only when the queue is full, never
//! for its own line's write. The writer batches lines into one write. On exit (SIGTERM,
//! SIGINT, an error, a panic that unwinds) the [`LogGuard`] flushes the queue before the
//! process ends; a SIGKILL or an abort loses at most the lines still queued.

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Lines queued for the writer thread at most; about 2 MB of audit lines.
pub const QUEUE_LINES: usize = 8192;

/// Keeps the writer thread alive; dropping it writes out every queued line.
#[must_use = "dropping the guard stops the log writer"]
pub struct LogGuard(#[allow(dead_code)] tracing_appender::non_blocking::WorkerGuard);

pub fn init(format: LogFormat, filter: &str) -> anyhow::Result<LogGuard> {
    // tss-esapi logs every TPM error it returns, including the ones we expect and explain
    // ourselves (a missing persistent handle, a PCR mismatch): silence it unless asked.
    let filter = if filter.contains("tss_esapi") {
        filter.to_owned()
    } else {
        format!("{filter},tss_esapi=off")
    };
    let filter = EnvFilter::try_new(&filter)
        .map_err(|e| anyhow::anyhow!("log level {filter:?} is not a valid filter: {e}"))?;
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .buffered_lines_limit(QUEUE_LINES)
        .thread_name("kms-plugin-log")
        .finish(std::io::BufWriter::new(std::io::stderr()));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(ansi);
    let result = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
    };
    result.map_err(|e| anyhow::anyhow!("setting up logging: {e}"))?;
    Ok(LogGuard(guard))
}
