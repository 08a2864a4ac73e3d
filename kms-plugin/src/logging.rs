//! Structured logs on stderr, text or JSON. Nothing secret is ever a field: requests are
//! logged by uid and key id only. Writes are synchronous on purpose: an audit line is on
//! stderr before the response leaves, and a crash loses none (it costs a few µs a request).

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

pub fn init(format: LogFormat, filter: &str) -> anyhow::Result<()> {
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
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    let result = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
    };
    result.map_err(|e| anyhow::anyhow!("setting up logging: {e}"))
}
