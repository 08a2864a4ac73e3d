//! The HTTP listener for probes and metrics, apart from the gRPC socket:
//! `/healthz` (alive), `/readyz` (the active KEK works), `/metrics` (Prometheus).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::Shared;

/// Binds now (so a bad address fails start-up), then serves until shutdown.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

pub async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "http accept failed");
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let shared = Arc::clone(&shared);
                async move { Ok::<_, Infallible>(route(&shared, &req)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .max_buf_size(16 * 1024)
                .serve_connection(TokioIo::new(stream), svc);
            // Probes and scrapes are short; bound a connection's life.
            let _ = tokio::time::timeout(std::time::Duration::from_secs(30), conn).await;
        });
    }
}

fn route(shared: &Shared, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "only GET is served here\n".into(),
        );
    }
    match req.uri().path() {
        "/healthz" | "/livez" => text(StatusCode::OK, "ok\n".into()),
        "/readyz" => {
            let health = shared.kms.health();
            match health.problem {
                None => {
                    let mut body = format!(
                        "ok: key {}\n",
                        health.key_id.map(String::from).unwrap_or_default()
                    );
                    if !shared.backend_healthy.load(Ordering::Relaxed) {
                        body.push_str("warning: key backend unavailable: serving from memory, rotation impossible\n");
                    }
                    if let Some(e) = shared.kms.reservation_failure() {
                        body.push_str(&format!("warning: cannot reserve more encryptions in the key store, Encrypt stops when the reserved ones are used: {e}\n"));
                    }
                    let rotation = shared
                        .rotation_failure
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .clone();
                    if let Some(e) = rotation {
                        body.push_str(&format!(
                            "warning: automatic rotation failed, the current key stays active: {e}\n"
                        ));
                    }
                    text(StatusCode::OK, body)
                }
                Some(p) => text(StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {p}\n")),
            }
        }
        "/metrics" => {
            let mut r = Response::new(Full::new(Bytes::from(shared.metrics.encode())));
            if let Ok(v) = "application/openmetrics-text; version=1.0.0; charset=utf-8".parse() {
                r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
            }
            r
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /healthz, /readyz or /metrics\n".into(),
        ),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r
}
