//! Listeners, connection handling, routing, fault application and response helpers.

use std::convert::Infallible;
use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::{Body as HttpBody, Bytes, Frame, Incoming, SizeHint};
use hyper::header::{HeaderName, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};
use tokio_rustls::TlsAcceptor;

use crate::model::{Endpoint, Fault, RequestRecord, Target};
use crate::state::{Shared, random_guid, unix_now_ms};
use crate::{admin, entra, imds, vault};

/// Response body type used everywhere.
pub(crate) type Body = BoxBody<Bytes, Infallible>;

/// Largest request body read (token forms, secret values, admin calls).
const MAX_REQUEST_BODY: usize = 1024 * 1024;
/// How long a `Hang` fault holds a request at most.
const HANG_LIMIT: Duration = Duration::from_secs(600);

/// Returned by the service to make hyper drop the connection without answering.
#[derive(Debug)]
pub(crate) struct DropConnection;

impl fmt::Display for DropConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("connection dropped on purpose (fault injection)")
    }
}

impl std::error::Error for DropConnection {}

/// Which listener a connection arrived on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Listener {
    /// HTTPS: Key Vault and Entra ID.
    Https,
    /// Plain HTTP on 127.0.0.1: IMDS, Arc HIMDS and the admin API.
    Http,
}

/// A request with its body already read.
pub(crate) struct Req {
    pub method: Method,
    pub path: String,
    pub query: Option<String>,
    pub headers: hyper::HeaderMap,
    pub body: Bytes,
}

impl Req {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Query parameters (first occurrence wins).
    pub fn query_param(&self, name: &str) -> Option<String> {
        let q = self.query.as_deref()?;
        form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
    }
}

// ---------------------------------------------------------------- responses

pub(crate) fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed()
}

fn base_response(status: u16, content_type: Option<&str>, body: Body) -> Response<Body> {
    let mut resp = Response::new(body);
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if let Some(ct) = content_type
        && let Ok(v) = HeaderValue::from_str(ct)
    {
        resp.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    resp
}

/// A JSON response (`application/json; charset=utf-8`).
pub(crate) fn json_response(status: u16, value: &serde_json::Value) -> Response<Body> {
    base_response(
        status,
        Some("application/json; charset=utf-8"),
        full(value.to_string()),
    )
}

pub(crate) fn empty_response(status: u16) -> Response<Body> {
    base_response(status, None, full(Bytes::new()))
}

/// Adds a header, ignoring values that are not valid header text.
pub(crate) fn with_header(mut resp: Response<Body>, name: &str, value: &str) -> Response<Body> {
    if let (Ok(n), Ok(v)) = (
        HeaderName::from_bytes(name.as_bytes()),
        HeaderValue::from_str(value),
    ) {
        resp.headers_mut().append(n, v);
    }
    resp
}

/// Chunked body of `remaining` bytes: `{"junk":"AAAA...A"}` (or just `A`s when tiny).
struct JunkBody {
    prefix: Option<Bytes>,
    fill: Bytes,
    middle: usize,
    suffix: Option<Bytes>,
}

impl JunkBody {
    fn new(total: usize) -> Self {
        const PREFIX: &[u8] = b"{\"junk\":\"";
        const SUFFIX: &[u8] = b"\"}";
        let (prefix, suffix, middle) = if total >= PREFIX.len() + SUFFIX.len() {
            (
                Some(Bytes::from_static(PREFIX)),
                Some(Bytes::from_static(SUFFIX)),
                total - PREFIX.len() - SUFFIX.len(),
            )
        } else {
            (None, None, total)
        };
        JunkBody {
            prefix,
            fill: Bytes::from(vec![b'A'; 64 * 1024]),
            middle,
            suffix,
        }
    }
}

impl HttpBody for JunkBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if let Some(p) = this.prefix.take() {
            return Poll::Ready(Some(Ok(Frame::data(p))));
        }
        if this.middle > 0 {
            let n = this.middle.min(this.fill.len());
            this.middle -= n;
            return Poll::Ready(Some(Ok(Frame::data(this.fill.slice(..n)))));
        }
        if let Some(s) = this.suffix.take() {
            return Poll::Ready(Some(Ok(Frame::data(s))));
        }
        Poll::Ready(None)
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.is_none() && self.middle == 0 && self.suffix.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        // Unknown on purpose: the client has to count (HTTP/1.1 sends it chunked).
        SizeHint::default()
    }
}

// ---------------------------------------------------------------- server

/// Accepts connections until `shutdown` fires.
pub(crate) async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    kind: Listener,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            accepted = listener.accept() => {
                let Ok((stream, _peer)) = accepted else {
                    // Out of descriptors or similar: back off briefly and keep serving.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                };
                let _ = stream.set_nodelay(true);
                tokio::spawn(connection(stream, tls.clone(), kind, shared.clone(), shutdown.clone()));
            }
        }
    }
}

async fn connection(
    stream: tokio::net::TcpStream,
    tls: Option<TlsAcceptor>,
    kind: Listener,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) {
    let kill = Arc::new(Notify::new());
    let svc_kill = kill.clone();
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let shared = shared.clone();
        let kill = svc_kill.clone();
        async move { dispatch(shared, kind, kill, req).await }
    });
    let builder = auto::Builder::new(TokioExecutor::new());
    match tls {
        Some(acceptor) => {
            let handshake =
                tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream)).await;
            let Ok(Ok(tls_stream)) = handshake else {
                return;
            };
            let conn = builder.serve_connection(TokioIo::new(tls_stream), service);
            tokio::select! {
                _ = conn => {}
                _ = kill.notified() => {}
                _ = shutdown.changed() => {}
            }
        }
        None => {
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = conn => {}
                _ = kill.notified() => {}
                _ = shutdown.changed() => {}
            }
        }
    }
}

fn route(kind: Listener, method: &Method, path: &str) -> Option<Endpoint> {
    match kind {
        Listener::Http => {
            if path.starts_with("/_fake/") || path == "/_fake" {
                None
            } else if path == imds::IMDS_PATH {
                Some(Endpoint::Imds)
            } else if path == imds::ARC_PATH {
                Some(Endpoint::Arc)
            } else {
                Some(Endpoint::Unknown)
            }
        }
        Listener::Https => {
            if vault::is_vault_path(path) {
                Some(vault::endpoint(method, path))
            } else if entra::is_token_path(path) {
                Some(Endpoint::Token)
            } else if entra::is_openid_path(path) {
                Some(Endpoint::OpenIdConfiguration)
            } else {
                Some(Endpoint::Unknown)
            }
        }
    }
}

async fn dispatch(
    shared: Arc<Shared>,
    kind: Listener,
    kill: Arc<Notify>,
    req: Request<Incoming>,
) -> Result<Response<Body>, DropConnection> {
    let (parts, incoming) = req.into_parts();
    let path = parts.uri.path().to_owned();
    let query = parts.uri.query().map(str::to_owned);

    let Some(endpoint) = route(kind, &parts.method, &path) else {
        let body = read_body(incoming).await;
        let req = Req {
            method: parts.method,
            path,
            query,
            headers: parts.headers,
            body: body.unwrap_or_default(),
        };
        return Ok(admin::handle(&shared, &req));
    };

    let _in_flight = endpoint.is_vault().then(|| shared.enter_vault());
    shared.record_arrival(endpoint);
    let mut record = RequestRecord {
        at_unix_ms: unix_now_ms(),
        endpoint,
        method: parts.method.to_string(),
        path: path.clone(),
        query: query.clone(),
        status: 0,
        authorization: parts.headers.contains_key(hyper::header::AUTHORIZATION),
        user_agent: parts
            .headers
            .get(hyper::header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        version: format!("{:?}", parts.version),
    };
    if shared.opts.log_requests {
        eprintln!(
            "azure-fake: {} {}{} ({endpoint:?})",
            parts.method,
            path,
            query
                .as_deref()
                .map(|q| format!("?{q}"))
                .unwrap_or_default()
        );
    }

    let mut response = None;
    if let Some(fault) = shared.take_fault(endpoint) {
        match apply_fault(&shared, endpoint, &fault).await {
            FaultOutcome::Respond(resp) => response = Some(resp),
            FaultOutcome::Proceed => {}
            FaultOutcome::Drop => {
                shared.record_done(record);
                kill.notify_one();
                return Err(DropConnection);
            }
            FaultOutcome::Hang => {
                // Count it now: the connection may be dropped while we wait.
                shared.record_done(record);
                tokio::time::sleep(HANG_LIMIT).await;
                kill.notify_one();
                return Err(DropConnection);
            }
        }
    }

    let response = match response {
        Some(r) => r,
        None => {
            let body = match read_body(incoming).await {
                Ok(b) => b,
                Err(status) => {
                    let resp = error_for(&shared, endpoint, status, "request body too large");
                    record.status = resp.status().as_u16();
                    shared.record_done(record);
                    return Ok(resp);
                }
            };
            let req = Req {
                method: parts.method,
                path,
                query,
                headers: parts.headers,
                body,
            };
            handle(&shared, endpoint, &req)
        }
    };
    let response = with_header(response, "x-ms-request-id", &random_guid());
    record.status = response.status().as_u16();
    if shared.opts.log_requests {
        eprintln!("azure-fake:   -> {}", record.status);
    }
    shared.record_done(record);
    Ok(response)
}

fn handle(shared: &Shared, endpoint: Endpoint, req: &Req) -> Response<Body> {
    match endpoint {
        Endpoint::Token => entra::token(shared, req),
        Endpoint::OpenIdConfiguration => entra::openid_configuration(shared, req),
        Endpoint::Imds => imds::imds(shared, req),
        Endpoint::Arc => imds::arc(shared, req),
        Endpoint::VaultGet
        | Endpoint::VaultListVersions
        | Endpoint::VaultList
        | Endpoint::VaultSet
        | Endpoint::VaultGetCertificate
        | Endpoint::VaultGetKey
        | Endpoint::VaultOther => vault::handle(shared, endpoint, req),
        Endpoint::Unknown => json_response(
            404,
            &serde_json::json!({"error": {"code": "NotFound", "message": format!("azure-fake serves nothing at {}", req.path)}}),
        ),
    }
}

async fn read_body(incoming: Incoming) -> Result<Bytes, u16> {
    match Limited::new(incoming, MAX_REQUEST_BODY).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) => {
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                Err(413)
            } else {
                Err(400)
            }
        }
    }
}

enum FaultOutcome {
    Respond(Response<Body>),
    Proceed,
    Drop,
    Hang,
}

async fn apply_fault(shared: &Shared, endpoint: Endpoint, fault: &Fault) -> FaultOutcome {
    match fault {
        Fault::Status { status, .. } => FaultOutcome::Respond(error_for(
            shared,
            endpoint,
            *status,
            "injected failure (azure-fake)",
        )),
        Fault::Throttle {
            retry_after_secs,
            retry_after_ms,
            ..
        } => {
            let mut resp = error_for(
                shared,
                endpoint,
                429,
                "Too many requests: the request was throttled (azure-fake).",
            );
            resp = with_header(resp, "Retry-After", &retry_after_secs.to_string());
            if let Some(ms) = retry_after_ms {
                resp = with_header(resp, "x-ms-retry-after-ms", &ms.to_string());
            }
            FaultOutcome::Respond(resp)
        }
        Fault::Hang { .. } => FaultOutcome::Hang,
        Fault::Malformed { .. } => FaultOutcome::Respond(base_response(
            200,
            Some("application/json; charset=utf-8"),
            full(&b"{\"value\":\"trunc"[..]),
        )),
        Fault::EmptyBody { .. } => FaultOutcome::Respond(base_response(
            200,
            Some("application/json; charset=utf-8"),
            full(Bytes::new()),
        )),
        Fault::HugeBody { bytes, .. } => FaultOutcome::Respond(base_response(
            200,
            Some("application/json; charset=utf-8"),
            JunkBody::new(*bytes).boxed(),
        )),
        Fault::Down { .. } => FaultOutcome::Drop,
        Fault::Slow { delay_ms, .. } => {
            tokio::time::sleep(Duration::from_millis(*delay_ms)).await;
            FaultOutcome::Proceed
        }
    }
}

/// An error response in the shape the endpoint's real service uses.
pub(crate) fn error_for(
    shared: &Shared,
    endpoint: Endpoint,
    status: u16,
    message: &str,
) -> Response<Body> {
    match endpoint.target() {
        Some(Target::Vault) => vault::error_with_challenge(shared, status, message),
        Some(Target::Token) | None if endpoint != Endpoint::Unknown => {
            entra::status_error(shared, status, message)
        }
        Some(Target::Imds) | Some(Target::Arc) => imds::status_error(status, message),
        _ => json_response(
            status,
            &serde_json::json!({"error": {"code": status_code_name(status), "message": message}}),
        ),
    }
}

/// Key Vault style error code for a status.
pub(crate) fn status_code_name(status: u16) -> String {
    match status {
        400 => "BadParameter".into(),
        401 => "Unauthorized".into(),
        403 => "Forbidden".into(),
        404 => "NotFound".into(),
        405 => "MethodNotAllowed".into(),
        409 => "Conflict".into(),
        410 => "Gone".into(),
        413 => "RequestEntityTooLarge".into(),
        429 => "Throttled".into(),
        500 => "InternalServerError".into(),
        502 => "BadGateway".into(),
        503 => "ServiceUnavailable".into(),
        504 => "GatewayTimeout".into(),
        s => format!("Http{s}"),
    }
}
