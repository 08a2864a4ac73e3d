//! `kms-plugin serve`: wires the key store, backend and key ring to the gRPC socket and
//! the HTTP listener, and runs until SIGTERM/SIGINT.

pub mod authority;
pub mod hpack;
pub mod http;
pub mod keeper;
pub mod socket;

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use anyhow::Context;
use kms_proto::v1beta1::key_management_service_server::KeyManagementServiceServer as V1Server;
use kms_proto::v2::key_management_service_server::KeyManagementServiceServer as V2Server;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;
use tokio_stream::wrappers::UnixListenerStream;

use crate::backend::{self, BackendKind, KeyBackend};
use crate::config::ServeConfig;
use crate::grpc::v1beta1::V1beta1Service;
use crate::grpc::v2::V2Service;
use crate::keyadmin;
use crate::keyring::KeyRing;
use crate::keystore::{KeyStore, KeyStoreError};
use crate::kms::Kms;
use crate::metrics::Metrics;

/// The largest request accepted: a Decrypt with 32 KiB of annotations and a 1 KiB
/// ciphertext fits with room to spare.
const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// What the gRPC handlers, the HTTP listener and the keeper share.
pub struct Shared {
    pub kms: Arc<Kms>,
    pub metrics: Arc<Metrics>,
    pub store: KeyStore,
    pub backend: Arc<dyn KeyBackend>,
    pub backend_healthy: AtomicBool,
    /// When the last counter reservation was made and how big it was.
    pub reservations: std::sync::Mutex<(Option<std::time::Instant>, u64)>,
    /// Why the last automatic rotation failed (`None` after one worked), for `/readyz`.
    pub rotation_failure: std::sync::Mutex<Option<String>>,
}

impl Shared {
    /// The size of the next counter reservation: the base block, grown fourfold (up to
    /// 2^20) while blocks last less than 10 s, so a burst of Encrypts is not throttled by
    /// key store writes; back to the base when traffic is calm. A crash forfeits at most
    /// one block of the 2^31 budget.
    pub fn next_reservation_block(&self) -> u64 {
        use crate::keyring::RESERVATION_BLOCK;
        let mut g = self.reservations.lock().unwrap_or_else(|p| p.into_inner());
        let now = std::time::Instant::now();
        let block = match g.0 {
            Some(last) if now.duration_since(last) < std::time::Duration::from_secs(10) => {
                (g.1 * 4).min(1 << 20)
            }
            _ => RESERVATION_BLOCK,
        };
        *g = (Some(now), block);
        block
    }
}

/// Runs a blocking closure (file I/O, TPM) off the async runtime.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .context("a blocking task failed")?
}

pub async fn run(cfg: ServeConfig) -> anyhow::Result<()> {
    if cfg.store.backend == BackendKind::InsecureSoftware {
        tracing::warn!(
            root_key = %cfg.store.insecure_root_key.display(),
            "INSECURE backend: KEKs are wrapped by a root key file on disk. Anyone who can read \
             it and the key store can decrypt every secret. Use --backend tpm in production."
        );
    }
    let store = KeyStore::new(&cfg.store.key_store);
    let shared = {
        let (store_cfg, auto_init, store) = (cfg.store.clone(), cfg.auto_init, store.clone());
        blocking(move || {
            // Say "not initialized" (and how to fix it) before the backend complains
            // about a root key file that `key init` would have created.
            if !store.is_initialized() && !auto_init {
                return Err(KeyStoreError::NotInitialized { dir: store.dir().to_owned() }.into());
            }
            let backend = backend::open(&store_cfg, auto_init && !store.is_initialized())?;
            if !store.is_initialized() && auto_init {
                let id = keyadmin::init(&store, backend.as_ref(), None)?;
                tracing::info!(key_id = %id, key_store = %store.dir().display(), "initialized a new key store (--auto-init)");
            }
            let shared = Shared {
                kms: Arc::new(Kms::new(KeyRing::empty())),
                metrics: Arc::new(Metrics::new()),
                store,
                backend,
                backend_healthy: AtomicBool::new(true),
                reservations: std::sync::Mutex::new((None, 0)),
                rotation_failure: std::sync::Mutex::new(None),
            };
            let ring = keeper::load_ring(&shared, None)?;
            shared.metrics.ring_loaded(&ring, false);
            shared.kms.install(ring);
            Ok(Arc::new(shared))
        })
        .await
        .with_context(|| format!("loading key store {}", cfg.store.key_store.display()))?
    };
    let ring = shared.kms.ring();
    let active = ring.active().map(|a| a.id.to_string()).unwrap_or_default();
    shared.metrics.set_backend_healthy(true);

    // Signal handlers go in before the socket exists: a SIGHUP or SIGTERM that arrives as
    // soon as clients can connect must not hit the default action (terminate).
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let hup = match signal(SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot install the SIGHUP handler; reloads happen on the interval only");
            None
        }
    };

    let (listener, _socket_guard) = socket::bind(&cfg.socket, cfg.socket_mode, cfg.socket_group)?;
    let (shutdown_tx, shutdown_rx) = watch::channel(false);

    let http = match cfg.http_addr {
        Some(addr) => {
            let l = http::bind(addr).await.with_context(|| {
                format!("binding the HTTP listener on {addr} (--http-addr; \"off\" disables it)")
            })?;
            let bound = l.local_addr().ok();
            tracing::info!(addr = ?bound, "serving /healthz, /readyz and /metrics");
            Some(tokio::spawn(http::serve(
                l,
                Arc::clone(&shared),
                shutdown_rx.clone(),
            )))
        }
        None => None,
    };

    let keeper = tokio::spawn(keep(
        Arc::clone(&shared),
        cfg.clone(),
        hup,
        shutdown_rx.clone(),
    ));

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<V2Server<V2Service>>().await;
    let v2 = V2Server::new(V2Service::new(
        Arc::clone(&shared.kms),
        Arc::clone(&shared.metrics),
        cfg.status_version,
    ))
    .max_decoding_message_size(MAX_REQUEST_BYTES);
    let v1 = cfg.v1beta1.then(|| {
        V1Server::new(V1beta1Service::new(
            Arc::clone(&shared.kms),
            Arc::clone(&shared.metrics),
        ))
        .max_decoding_message_size(MAX_REQUEST_BYTES)
    });
    tracing::info!(
        socket = %cfg.socket.display(),
        key_id = %active,
        backend = %cfg.store.backend,
        status_version = cfg.status_version.as_str(),
        v1beta1 = cfg.v1beta1,
        "KMS plugin serving"
    );

    let mut stop = shutdown_rx.clone();
    let server = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(v2)
        .add_optional_service(v1)
        .serve_with_incoming_shutdown(incoming(listener), async move {
            let _ = stop.changed().await;
        });
    tokio::pin!(server);

    let result = tokio::select! {
        r = &mut server => r.context("the gRPC server failed"),
        _ = term.recv() => { tracing::info!("SIGTERM: draining and shutting down"); Ok(()) }
        _ = int.recv() => { tracing::info!("SIGINT: draining and shutting down"); Ok(()) }
    };
    let _ = shutdown_tx.send(true);
    if result.is_ok()
        && tokio::time::timeout(cfg.drain_timeout, &mut server)
            .await
            .is_err()
    {
        tracing::warn!(timeout = ?cfg.drain_timeout, "clients kept their connections open past the drain timeout; exiting anyway");
    }
    keeper.abort();
    if let Some(h) = http {
        h.abort();
    }
    tracing::info!("stopped");
    result
}

/// Accepted connections, each behind the layer that lets any `:authority` through (older
/// kube-apiservers send the socket path, which `h2` refuses).
fn incoming(
    listener: tokio::net::UnixListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<authority::AuthorityLayer<tokio::net::UnixStream>>>
{
    use tokio_stream::StreamExt as _;
    UnixListenerStream::new(listener).map(|r| r.map(authority::AuthorityLayer::new))
}

/// The keeper loop: refresh on every tick, on SIGHUP, and when the active key asks for
/// more reserved encryptions.
async fn keep(
    shared: Arc<Shared>,
    cfg: ServeConfig,
    mut hup: Option<tokio::signal::unix::Signal>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(cfg.reload_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => {
                tracing::info!("SIGHUP: reloading the key store now");
            }
            // After a failed reservation (a full key store) retry on the tick, not on every
            // Encrypt that asks: that would be a failing write and an error line per request.
            () = shared.kms.reservation_wanted().notified(), if shared.kms.reservation_failure().is_none() => {}
            _ = shutdown.changed() => return,
        }
        let s = Arc::clone(&shared);
        let every = cfg.rotate_every;
        if let Err(e) = tokio::task::spawn_blocking(move || keeper::refresh(&s, every)).await {
            tracing::error!(error = %e, "key store refresh task failed");
        }
    }
}
