//! Structured logs on stderr, text or JSON. Nothing secret is ever a field: requests are
//! logged by uid and key id only.
//!
//! Every Encrypt and Decrypt writes an audit line. Lines are formatted on the request's
//! thread and appended to a bounded, lossless buffer that a writer thread writes out in
//! batches ([`batch`]): a request waits for stderr only when the buffer is full, never
//! for its own line's write. On exit (SIGTERM, SIGINT, an error, a panic that unwinds)
//! the [`LogGuard`] writes out what is buffered before the process ends; a SIGKILL or an
//! abort loses at most the last [`batch::LINGER`] of lines.

pub mod batch;

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Keeps the writer thread alive; dropping it writes out every buffered line.
#[must_use = "dropping the guard stops the log writer"]
pub struct LogGuard(#[allow(dead_code)] batch::BatchGuard);

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
    let (writer, guard) = batch::start(std::io::stderr())
        .map_err(|e| anyhow::anyhow!("starting the log writer thread: {e}"))?;
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
