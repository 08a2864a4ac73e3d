//! A minimal HTTP(S) client for talking to the fake in tests: raw hyper over tokio-rustls,
//! trusting only the fake's CA, so what is asserted is exactly what went over the wire.

#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper::{HeaderMap, Method, Request};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::Value;

/// A response, fully read.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub version: hyper::Version,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            Value::String(format!(
                "<not JSON: {e}: {:?}>",
                String::from_utf8_lossy(&self.body)
            ))
        })
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    }
}

/// Which HTTP version to offer over TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    H1,
    H2,
}

/// A client that trusts `ca_pem` and connects to 127.0.0.1 whatever the URL's host says
/// (the host is still used for SNI and certificate verification).
#[derive(Clone)]
pub struct Client {
    tls: Arc<rustls::ClientConfig>,
    tls_h2: Arc<rustls::ClientConfig>,
}

impl Client {
    pub fn new(ca_pem: &str) -> anyhow::Result<Self> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
            roots.add(cert?)?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let mut h1 = config.clone();
        h1.alpn_protocols = vec![b"http/1.1".to_vec()];
        let mut h2 = config;
        h2.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Client {
            tls: Arc::new(h1),
            tls_h2: Arc::new(h2),
        })
    }

    pub async fn get(&self, url: &str, headers: &[(&str, &str)]) -> anyhow::Result<Resp> {
        self.send(Method::GET, url, headers, None, Proto::H1).await
    }

    pub async fn post_form(&self, url: &str, form: &[(&str, &str)]) -> anyhow::Result<Resp> {
        let body = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(form)
            .finish();
        self.send(
            Method::POST,
            url,
            &[("content-type", "application/x-www-form-urlencoded")],
            Some(body.into_bytes()),
            Proto::H1,
        )
        .await
    }

    pub async fn send(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
        body: Option<Vec<u8>>,
        proto: Proto,
    ) -> anyhow::Result<Resp> {
        let uri: hyper::Uri = url.parse().context("parsing URL")?;
        let host = uri.host().context("URL without host")?.to_owned();
        let port = uri.port_u16().context("URL without port")?;
        let path = uri
            .path_and_query()
            .map(|p| p.as_str().to_owned())
            .unwrap_or_else(|| "/".into());
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;

        let method_for_h2 = method.clone();
        let mut builder = Request::builder()
            .method(method)
            .uri(path)
            .header("host", format!("{host}:{port}"));
        for (k, v) in headers {
            builder = builder.header(*k, *v);
        }
        let body = Full::new(Bytes::from(body.unwrap_or_default()));

        match uri.scheme_str() {
            Some("https") => {
                let config = match proto {
                    Proto::H1 => self.tls.clone(),
                    Proto::H2 => self.tls_h2.clone(),
                };
                let connector = tokio_rustls::TlsConnector::from(config);
                let name = ServerName::try_from(host.clone())?;
                let tls = connector.connect(name, tcp).await?;
                let io = TokioIo::new(tls);
                match proto {
                    Proto::H1 => {
                        let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
                        tokio::spawn(conn);
                        read(sender.send_request(builder.body(body)?).await?).await
                    }
                    Proto::H2 => {
                        // HTTP/2 takes the authority from the URI, not a Host header.
                        let mut req = Request::builder().method(method_for_h2).uri(url);
                        for (k, v) in headers {
                            req = req.header(*k, *v);
                        }
                        let (mut sender, conn) =
                            hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
                        tokio::spawn(conn);
                        read(sender.send_request(req.body(body)?).await?).await
                    }
                }
            }
            Some("http") => {
                let (mut sender, conn) =
                    hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
                tokio::spawn(conn);
                read(sender.send_request(builder.body(body)?).await?).await
            }
            other => bail!("unsupported scheme {other:?}"),
        }
    }
}

async fn read(resp: hyper::Response<hyper::body::Incoming>) -> anyhow::Result<Resp> {
    let status = resp.status().as_u16();
    let version = resp.version();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok(Resp {
        status,
        headers,
        body,
        version,
    })
}

/// Runs `f` with a deadline.
pub async fn within<T>(
    secs: u64,
    f: impl std::future::Future<Output = T>,
) -> Result<T, tokio::time::error::Elapsed> {
    tokio::time::timeout(Duration::from_secs(secs), f).await
}

/// An unsigned JWT with the given header and claims (base64url, no padding).
pub fn jwt(header: &Value, claims: &Value) -> String {
    use base64::Engine as _;
    let e = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    format!(
        "{}.{}.{}",
        e.encode(header.to_string()),
        e.encode(claims.to_string()),
        e.encode(b"signature")
    )
}

/// Seconds since the Unix epoch.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
