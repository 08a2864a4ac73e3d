//! HTTP clients on reqwest (hyper + rustls): TLS 1.2+ with the system roots plus an optional
//! CA file; `HTTPS_PROXY`/`NO_PROXY` honoured for Entra ID and Key Vault; a separate,
//! proxy-less client for the node-local IMDS and HIMDS endpoints. Response bodies are read
//! with a size limit, into zeroizing memory.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use zeroize::Zeroizing;

/// No response we read is legitimately larger (a Key Vault secret is at most 25 KiB).
pub const MAX_BODY: usize = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("reading CA file {}: {message}", path.display())]
    CaFile {
        path: std::path::PathBuf,
        message: String,
    },
    #[error("no trusted root certificates: the system store is empty and no --ca-file was given")]
    NoRoots,
    #[error("TLS setup: {0}")]
    Tls(String),
    #[error("HTTP client setup: {0}")]
    Client(String),
}

#[derive(Clone)]
pub struct Clients {
    /// Entra ID and Key Vault: TLS, proxy from the environment.
    pub external: reqwest::Client,
    /// IMDS / HIMDS: link-local or localhost plain HTTP, never through a proxy.
    pub local: reqwest::Client,
}

/// reqwest needs a process-wide rustls provider even for plain-HTTP clients: ring.
pub fn install_crypto_provider() {
    // Err means one is installed already, which is fine.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

pub fn build(ca_file: Option<&Path>, timeout: Duration) -> Result<Clients, HttpError> {
    install_crypto_provider();
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for cert in native.certs {
        let _ = roots.add(cert);
    }
    if let Some(path) = ca_file {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
            .map_err(|e| HttpError::CaFile {
                path: path.to_owned(),
                message: e.to_string(),
            })?
            .collect::<Result<_, _>>()
            .map_err(|e| HttpError::CaFile {
                path: path.to_owned(),
                message: e.to_string(),
            })?;
        if certs.is_empty() {
            return Err(HttpError::CaFile {
                path: path.to_owned(),
                message: "no PEM certificates in it".into(),
            });
        }
        for c in certs {
            roots.add(c).map_err(|e| HttpError::CaFile {
                path: path.to_owned(),
                message: e.to_string(),
            })?;
        }
    }
    if roots.is_empty() {
        return Err(HttpError::NoRoots);
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| HttpError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let ua = concat!("edgeseal-sidecar/", env!("CARGO_PKG_VERSION"));
    let external = reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .https_only(true)
        .user_agent(ua)
        .connect_timeout(timeout.min(Duration::from_secs(10)))
        .timeout(timeout)
        .pool_idle_timeout(Duration::from_secs(90))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| HttpError::Client(e.to_string()))?;
    let local = reqwest::Client::builder()
        .no_proxy()
        .user_agent(ua)
        .connect_timeout(timeout.min(Duration::from_secs(5)))
        .timeout(timeout)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| HttpError::Client(e.to_string()))?;
    Ok(Clients { external, local })
}

/// Why a body could not be read.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("response body is larger than {MAX_BODY} bytes")]
    TooLarge,
    #[error("reading the response body: {0}")]
    Read(String),
}

/// Reads a response body of at most [`MAX_BODY`] bytes into zeroizing memory.
pub async fn read_body(mut resp: reqwest::Response) -> Result<Zeroizing<Vec<u8>>, BodyError> {
    if resp.content_length().is_some_and(|n| n > MAX_BODY as u64) {
        return Err(BodyError::TooLarge);
    }
    let mut body = Zeroizing::new(Vec::new());
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| BodyError::Read(without_url(&e)))?
    {
        if body.len() + chunk.len() > MAX_BODY {
            return Err(BodyError::TooLarge);
        }
        // Grow by copying into a fresh zeroizing buffer, so no stale copy stays behind.
        if body.capacity() < body.len() + chunk.len() {
            let mut bigger = Zeroizing::new(Vec::with_capacity(
                (body.len() + chunk.len()).max(body.capacity() * 2),
            ));
            bigger.extend_from_slice(&body);
            body = bigger;
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// A server's text (an error code, a message, a body) on one line: each run of whitespace,
/// line breaks included, becomes one space, so that what a server sends can neither split
/// a log line nor an operator's error message.
pub fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// reqwest errors print the URL, which may carry a query string; keep messages to the cause.
pub fn without_url(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "could not connect"
    } else if e.is_body() || e.is_decode() {
        "broken response"
    } else {
        "request failed"
    };
    let mut msg = kind.to_owned();
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    msg
}
